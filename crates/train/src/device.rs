//! Where a run trains: the `train.device` setting ("auto", "cpu", "cuda"), its resolution against
//! what this build and machine have, and the device-resident model the SFT loop drives on a GPU.
//!
//! "auto" (the default) takes the GPU when the binary was built with the `cuda` feature and a
//! GPU with its libraries opens; otherwise it trains on the CPU and says why. "cuda" refuses to
//! start without one (naming what is missing); "cpu" never opens a GPU. The same binary runs on
//! machines without a GPU: `reel_cuda` opens every CUDA library at run time.
//!
//! A run with `parallel.sp > 1` (and dp = 1) on the GPU puts its sp in-process ranks on GPU 0,
//! each a thread with its own stream ([`GpuSpGroup`], [`GpuPlace::Sp`]): every rank's
//! [`GpuModel`] holds its token shard and attends through the group's schedule on the device.
//!
//! Without the `cuda` feature, [`GpuHandle`], [`GpuSpGroup`] and [`GpuModel`] are uninhabited,
//! so the CPU-only build carries the same code paths with no GPU in them.

use anyhow::Result;
use reel_model::{CheckpointPolicy, Qwen2Config};
use reel_optim::AdamWConfig;
use serde::{Deserialize, Serialize};

/// `train.device`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Device {
    /// The GPU when there is a usable one, else the CPU (with a message saying why).
    #[default]
    Auto,
    /// The CPU, always.
    Cpu,
    /// GPU 0; an error when there is none.
    Cuda,
}

impl Device {
    pub fn is_auto(&self) -> bool {
        *self == Device::Auto
    }
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda),
            _ => Err(format!("unknown device `{s}` (auto, cpu, cuda)")),
        }
    }
}

/// What [`resolve`] chose: the CPU (with the reason when "auto" fell back), or the opened GPU.
#[derive(Debug)]
pub enum Chosen<G> {
    Cpu { note: Option<String> },
    Cuda(G),
}

/// Chooses the device for `want`: `built_with_cuda` says whether this binary has the GPU path,
/// `open` tries to open GPU 0 (called only when needed), `cpu_only` says why this run has no GPU
/// path (more than one rank, or a model family the GPU path does not train yet). Errors only for
/// an explicit "cuda".
pub fn resolve<G>(
    want: Device,
    built_with_cuda: bool,
    cpu_only: Option<&str>,
    open: impl FnOnce() -> Result<G, String>,
) -> Result<Chosen<G>, String> {
    let why_not = if want == Device::Cpu {
        return Ok(Chosen::Cpu { note: None });
    } else if !built_with_cuda {
        "this reel was built without the `cuda` feature (cargo build --release -p reel-cli \
         --features cuda)"
            .to_string()
    } else if let Some(why) = cpu_only {
        why.to_string()
    } else {
        match open() {
            Ok(g) => return Ok(Chosen::Cuda(g)),
            Err(e) => format!("no usable GPU: {e}"),
        }
    };
    match want {
        Device::Cuda => Err(format!("train.device = \"cuda\": {why_not}")),
        _ => Ok(Chosen::Cpu {
            note: Some(format!("training on the CPU: {why_not}")),
        }),
    }
}

/// Why a run with `dp` data-parallel replicas (of a vision-language model when `vlm`) cannot
/// train on the GPU yet, for [`resolve`]'s `cpu_only`; `None` when it can: the text decoder
/// with dp = 1, on one rank or on its sp ranks sharing the GPU.
pub fn gpu_unsupported(dp: usize, vlm: bool) -> Option<&'static str> {
    if vlm {
        Some("GPU training covers the text decoder (Qwen2); this Qwen2.5-VL run trains on the CPU")
    } else if dp > 1 {
        Some(
            "GPU training runs one data-parallel replica (dp = 1; sp ranks share the GPU); this \
             dp > 1 run trains on the CPU",
        )
    } else {
        None
    }
}

/// Whether this binary has the GPU path.
pub const BUILT_WITH_CUDA: bool = cfg!(feature = "cuda");

/// Where one rank's device model lives.
pub enum GpuPlace {
    /// The run's only rank, on the opened GPU.
    One(Box<GpuHandle>),
    /// Rank `rank` of a sequence-parallel group of in-process ranks on one GPU.
    Sp { group: GpuSpGroup, rank: usize },
}

/// The in-process device ranks of a sequence-parallel run on one GPU: their device world (each
/// rank's endpoint made on its own thread) and the attention schedule they run.
#[cfg(feature = "cuda")]
#[derive(Clone)]
pub struct GpuSpGroup {
    world: reel_cuda::DeviceWorld,
    schedule: reel_parallel::Schedule,
    overlap: reel_parallel::Overlap,
}

/// The group of `schedule.ranks` device ranks on the GPU `gpu` was opened on (GPU 0; each rank
/// opens its own stream, so `gpu` itself is let go); a rank that waits longer than `timeout`
/// for a peer fails.
#[cfg(feature = "cuda")]
pub fn gpu_sp_group(
    gpu: GpuHandle,
    schedule: reel_parallel::Schedule,
    overlap: reel_parallel::Overlap,
    timeout: std::time::Duration,
) -> GpuSpGroup {
    drop(gpu);
    GpuSpGroup {
        world: reel_cuda::DeviceWorld::new(schedule.ranks, timeout),
        schedule,
        overlap,
    }
}

/// The device model of one rank: the model's weights `params` (flat `ParamLayout`) uploaded
/// where `place` says, with local attention (one rank) or the group's sequence-parallel
/// attention (its own stream and device endpoint, opened here on the rank's thread).
#[cfg(feature = "cuda")]
pub fn gpu_model(
    place: GpuPlace,
    config: Qwen2Config,
    params: &[f32],
    policy: CheckpointPolicy,
    adamw: AdamWConfig,
) -> Result<GpuModel> {
    use anyhow::Context;
    match place {
        GpuPlace::One(g) => Ok(GpuModel::new(*g, config, params, policy, adamw)?),
        GpuPlace::Sp { group, rank } => {
            let g = reel_cuda::Gpu::open_on_new_stream(0)
                .with_context(|| format!("sequence-parallel rank {rank}: opening its stream"))?;
            let comm = group.world.comm(rank, &g)?;
            let sp = reel_cuda::GpuSpAttention::new(comm, group.schedule, group.overlap)
                .with_context(|| format!("sequence-parallel rank {rank}: device attention"))?;
            let mut m = GpuModel::new(g, config, params, policy, adamw)?;
            m.set_attention(reel_cuda::GpuAttention::Sp(Box::new(sp)));
            Ok(m)
        }
    }
}

#[cfg(feature = "cuda")]
pub use reel_cuda::{Gpu as GpuHandle, GpuQwen2 as GpuModel};

/// One line naming the device.
#[cfg(feature = "cuda")]
pub fn describe(g: &GpuHandle) -> String {
    g.info().to_string()
}

#[cfg(not(feature = "cuda"))]
pub fn describe(g: &GpuHandle) -> String {
    match g.never {}
}

/// Opens GPU 0 (the error says what is missing).
#[cfg(feature = "cuda")]
pub fn open_gpu() -> Result<GpuHandle, String> {
    reel_cuda::Gpu::open(0).map_err(|e| e.to_string())
}

#[cfg(not(feature = "cuda"))]
pub use cpu_only::{GpuHandle, GpuModel, GpuSpGroup};

#[cfg(not(feature = "cuda"))]
pub fn open_gpu() -> Result<GpuHandle, String> {
    Err("built without the `cuda` feature".into())
}

#[cfg(not(feature = "cuda"))]
pub fn gpu_sp_group(
    gpu: GpuHandle,
    _: reel_parallel::Schedule,
    _: reel_parallel::Overlap,
    _: std::time::Duration,
) -> GpuSpGroup {
    match gpu.never {}
}

#[cfg(not(feature = "cuda"))]
pub fn gpu_model(
    place: GpuPlace,
    _: Qwen2Config,
    _: &[f32],
    _: CheckpointPolicy,
    _: AdamWConfig,
) -> Result<GpuModel> {
    match place {
        GpuPlace::One(g) => match g.never {},
        GpuPlace::Sp { group, .. } => match group.never {},
    }
}

#[cfg(not(feature = "cuda"))]
mod cpu_only {
    //! Uninhabited stand-ins: a CPU-only build can never hold a GPU.
    use reel_model::{CheckpointPolicy, LossStats, Qwen2Config, TokenBatch};
    use reel_optim::{AdamWConfig, AdamWState};

    use std::convert::Infallible;

    /// Never made (its field cannot be).
    #[derive(Debug)]
    pub struct GpuHandle {
        pub(super) never: Infallible,
    }

    /// Never made (its field cannot be).
    pub struct GpuModel {
        never: Infallible,
    }

    /// Never made (its field cannot be).
    #[derive(Clone)]
    pub struct GpuSpGroup {
        pub(in crate::device) never: Infallible,
    }

    type R<T> = Result<T, std::convert::Infallible>;

    #[allow(clippy::missing_errors_doc)]
    impl GpuModel {
        pub fn new(
            g: GpuHandle,
            _: Qwen2Config,
            _: &[f32],
            _: CheckpointPolicy,
            _: AdamWConfig,
        ) -> R<Self> {
            match g.never {}
        }
        pub fn forward(&mut self, _: &TokenBatch) -> R<LossStats> {
            match self.never {}
        }
        pub fn set_seq_len(&mut self, _: usize) -> R<Option<reel_parallel::Sharding>> {
            match self.never {}
        }
        pub fn all_reduce_grads(&mut self, _: LossStats) -> R<LossStats> {
            match self.never {}
        }
        pub fn abort_peers(&self, _: &str) {
            match self.never {}
        }
        pub fn backward(&mut self, _: &TokenBatch, _: f32) -> R<()> {
            match self.never {}
        }
        pub fn zero_grads(&mut self) -> R<()> {
            match self.never {}
        }
        pub fn clip_grad_norm(&mut self, _: f32) -> R<f32> {
            match self.never {}
        }
        pub fn adamw_step(&mut self, _: f32) -> R<()> {
            match self.never {}
        }
        pub fn params_host(&self) -> R<Vec<f32>> {
            match self.never {}
        }
        pub fn opt_state(&self) -> R<AdamWState> {
            match self.never {}
        }
        pub fn load_opt_state(&mut self, _: &AdamWState) -> R<()> {
            match self.never {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_falls_back_to_the_cpu_with_the_reason_and_cuda_refuses() {
        let no_gpu = || -> Result<u8, String> { Err("no NVIDIA driver".into()) };
        let gpu = || -> Result<u8, String> { Ok(7) };
        let note = |c: Chosen<u8>| match c {
            Chosen::Cpu { note } => note,
            Chosen::Cuda(_) => panic!("expected the CPU"),
        };
        // "cpu" never opens anything.
        let r = resolve(Device::Cpu, true, None, || -> Result<u8, String> {
            panic!("opened a GPU for device = cpu")
        });
        assert_eq!(note(r.unwrap()), None);
        // "auto": the GPU when it opens, else the CPU and why.
        assert!(matches!(
            resolve(Device::Auto, true, None, gpu),
            Ok(Chosen::Cuda(7))
        ));
        let n = note(resolve(Device::Auto, true, None, no_gpu).unwrap()).unwrap();
        assert!(n.contains("no NVIDIA driver"), "{n}");
        let n = note(resolve(Device::Auto, false, None, gpu).unwrap()).unwrap();
        assert!(n.contains("without the `cuda` feature"), "{n}");
        let n = note(resolve(Device::Auto, true, Some("one rank only"), gpu).unwrap()).unwrap();
        assert!(n.contains("one rank"), "{n}");
        // "cuda": an error naming the reason.
        let e = resolve(Device::Cuda, true, None, no_gpu).unwrap_err();
        assert!(
            e.contains("train.device") && e.contains("no NVIDIA driver"),
            "{e}"
        );
        let e = resolve(Device::Cuda, false, None, gpu).unwrap_err();
        assert!(e.contains("cuda` feature"), "{e}");
        assert!(matches!(
            resolve(Device::Cuda, true, None, gpu),
            Ok(Chosen::Cuda(7))
        ));
        assert_eq!("gpu".parse::<Device>(), Ok(Device::Cuda));
        assert!("tpu".parse::<Device>().is_err());
    }

    #[test]
    fn sequence_parallel_text_runs_go_to_the_gpu_and_dp_or_the_vlm_stay_on_the_cpu() {
        assert_eq!(
            gpu_unsupported(1, false),
            None,
            "one rank or sp ranks, dp 1"
        );
        let dp = gpu_unsupported(2, false).unwrap();
        assert!(dp.contains("dp > 1"), "{dp}");
        let vl = gpu_unsupported(1, true).unwrap();
        assert!(vl.contains("Qwen2.5-VL"), "{vl}");
        // "cuda" names the reason; "auto" falls back with it.
        let gpu = || -> Result<u8, String> { Ok(1) };
        let e = resolve(Device::Cuda, true, gpu_unsupported(4, false), gpu).unwrap_err();
        assert!(e.contains("dp > 1"), "{e}");
        assert!(matches!(
            resolve(Device::Auto, true, gpu_unsupported(1, false), gpu),
            Ok(Chosen::Cuda(1))
        ));
    }

    #[test]
    fn this_build_opens_a_gpu_or_says_why() {
        match resolve(Device::Auto, BUILT_WITH_CUDA, None, open_gpu) {
            Ok(Chosen::Cuda(g)) => assert!(!describe(&g).is_empty(), "the GPU is named"),
            Ok(Chosen::Cpu { note }) => {
                let n = note.expect("auto explains a fallback");
                assert!(n.starts_with("training on the CPU: "), "{n}");
            }
            Err(e) => panic!("auto never fails: {e}"),
        }
    }
}
