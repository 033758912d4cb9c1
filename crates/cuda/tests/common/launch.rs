//! Multi-process GPU tests: a test re-executes its own binary once per rank through
//! `reel_comm::launch` (RANK, WORLD_SIZE, LOCAL_RANK, REEL_RENDEZVOUS), one GPU per rank, with
//! NCCL reachable (the `libnccl.so` shim on LD_LIBRARY_PATH) and `NCCL_NVLS_ENABLE=0`.

use std::time::Instant;

use reel_cuda::libs;

/// Names the test a rank process runs.
pub const SCENARIO: &str = "REEL_NCCL_SCENARIO";

/// World sizes from `REEL_NCCL_WORLDS` (comma-separated; default `1,2`).
pub fn worlds() -> Vec<usize> {
    std::env::var("REEL_NCCL_WORLDS")
        .unwrap_or_else(|_| "1,2".into())
        .split(',')
        .filter_map(|w| w.trim().parse().ok())
        .collect()
}

/// In the launcher: runs `name` at every world size as separate processes and asserts they all
/// succeed; returns false. In a rank process of `name`: returns true (run the rank code).
pub fn launch_or_run(name: &str, port: u16, world_sizes: &[usize]) -> bool {
    if let Ok(s) = std::env::var(SCENARIO) {
        return s == name;
    }
    if std::env::var("REEL_GPU_TESTS").as_deref() != Ok("1") {
        eprintln!("skipped: set REEL_GPU_TESTS=1 to run the GPU tests");
        return false;
    }
    let dirs = libs::lib_dirs();
    let shim = std::env::temp_dir().join(format!("reel-nccl-test-shim-{}", std::process::id()));
    let shim = libs::make_nccl_shim(dirs, &shim)
        .ok()
        .filter(|&m| m)
        .map(|_| shim);
    let ld = libs::library_path(
        shim.as_deref(),
        dirs,
        std::env::var("LD_LIBRARY_PATH").ok().as_deref(),
    );
    for &w in world_sizes {
        let exe = std::env::current_exe().unwrap();
        let args = vec![
            name.into(),
            "--exact".into(),
            "--nocapture".into(),
            "--test-threads=1".into(),
        ];
        let mut l = reel_comm::launch::Launch::local(exe, args, w);
        l.rendezvous = format!("127.0.0.1:{}", port + w as u16);
        l.env = vec![
            (SCENARIO.into(), name.into()),
            ("LD_LIBRARY_PATH".into(), ld.clone()),
            (libs::REEXEC_MARK.into(), "1".into()),
            ("NCCL_NVLS_ENABLE".into(), "0".into()),
        ];
        let t = Instant::now();
        reel_comm::launch::run(&l).unwrap_or_else(|e| panic!("{name} at world {w}: {e}"));
        eprintln!("{name}: world {w} passed in {:.1?}", t.elapsed());
    }
    false
}

/// This rank process's device: `LOCAL_RANK` (or `RANK`).
pub fn local_rank() -> usize {
    ["LOCAL_RANK", "RANK"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.parse().ok())
        .unwrap_or(0)
}
