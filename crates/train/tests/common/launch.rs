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

/// A rank dying in the middle of step `step`: writes the time (milliseconds since the epoch)
/// into `stamp`, then exits the process.
pub fn die_now(stamp: &std::path::Path, step: u64) -> ! {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    std::fs::write(stamp, ms.to_string()).unwrap();
    eprintln!("rank 1 exits in the middle of step {step}");
    std::process::exit(9);
}

/// Asserts that this rank's failure `msg` (just returned) came within the collective timeout
/// `timeout_s` (+5 s) of its peer's death stamped by [`die_now`], and names step `step` and
/// the last good checkpoint `ckpt` (e.g. "step-3").
pub fn assert_failed_in_time(
    stamp: &std::path::Path,
    timeout_s: u64,
    msg: &str,
    step: u64,
    ckpt: &str,
) {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};
    let failed_at = SystemTime::now();
    let rank = std::env::var("RANK").unwrap_or_default();
    eprintln!("rank {rank} failed: {msg}");
    let died: u64 = std::fs::read_to_string(stamp)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let waited = failed_at
        .duration_since(UNIX_EPOCH + Duration::from_millis(died))
        .unwrap_or_default();
    eprintln!("rank {rank}: failed {waited:.1?} after rank 1 died (timeout {timeout_s} s)");
    assert!(
        waited < Duration::from_secs(timeout_s + 5),
        "rank {rank} failed {waited:?} after its peer died"
    );
    assert!(msg.contains(&format!("step {step}")), "{msg}");
    assert!(msg.contains("last good checkpoint intact"), "{msg}");
    assert!(msg.contains(ckpt), "{msg}");
}
