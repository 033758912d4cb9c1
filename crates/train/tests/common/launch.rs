//! Multi-process GPU tests: each test re-executes its own binary once per rank through
//! `reel_comm::launch` (RANK, WORLD_SIZE, LOCAL_RANK, REEL_RENDEZVOUS), with `SCENARIO` naming
//! the test the rank runs, as the NCCL tests of reel-cuda do.

use std::time::Instant;

use reel_comm::launch::{Launch, LaunchError};
use reel_cuda::libs;

/// Names the test a rank process runs.
pub const SCENARIO: &str = "REEL_NCCL_SCENARIO";
/// The run config a rank process reads (written by the launcher).
pub const CONFIG: &str = "REEL_SFT_TEST_CONFIG";

/// Runs test `name` as `world` rank processes with `env`; the launcher's result.
pub fn launch(
    name: &str,
    world: usize,
    port: u16,
    env: &[(&str, String)],
) -> Result<(), LaunchError> {
    let dirs = libs::lib_dirs();
    let shim = std::env::temp_dir().join(format!("reel-nccl-sft-shim-{}", std::process::id()));
    let shim = libs::make_nccl_shim(dirs, &shim)
        .ok()
        .filter(|&m| m)
        .map(|_| shim);
    let ld = libs::library_path(
        shim.as_deref(),
        dirs,
        std::env::var("LD_LIBRARY_PATH").ok().as_deref(),
    );
    let exe = std::env::current_exe().unwrap();
    let args = vec![
        name.into(),
        "--exact".into(),
        "--nocapture".into(),
        "--test-threads=1".into(),
    ];
    let mut l = Launch::local(exe, args, world);
    l.rendezvous = format!("127.0.0.1:{port}");
    l.env = vec![
        (SCENARIO.into(), name.into()),
        ("LD_LIBRARY_PATH".into(), ld),
        (libs::REEXEC_MARK.into(), "1".into()),
        ("NCCL_NVLS_ENABLE".into(), "0".into()),
    ];
    l.env
        .extend(env.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let t = Instant::now();
    let r = reel_comm::launch::run(&l);
    eprintln!("{name}: world {world} ran {:.1?}: {r:?}", t.elapsed());
    r
}

/// Whether this process is a rank of test `name` (else the launcher).
pub fn is_rank_of(name: &str) -> Option<bool> {
    std::env::var(SCENARIO).ok().map(|s| s == name)
}
