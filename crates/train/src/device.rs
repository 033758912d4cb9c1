//! Where a run trains: the `train.device` setting ("auto", "cpu", "cuda"), its resolution against
//! what this build and machine have, and the device-resident model the SFT loop drives on a GPU.
//!
//! "auto" (the default) takes the GPU when the binary was built with the `cuda` feature and a
//! GPU with its libraries opens; otherwise it trains on the CPU and says why. "cuda" refuses to
//! start without one (naming what is missing); "cpu" never opens a GPU. The same binary runs on
//! machines without a GPU: `reel_cuda` opens every CUDA library at run time.
//!
//! Without the `cuda` feature, [`GpuHandle`] and [`GpuModel`] are uninhabited, so the CPU-only
//! build carries the same code paths with no GPU in them.

use anyhow::Result;
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

/// Whether this binary has the GPU path.
pub const BUILT_WITH_CUDA: bool = cfg!(feature = "cuda");

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
pub use cpu_only::{GpuHandle, GpuModel};

#[cfg(not(feature = "cuda"))]
pub fn open_gpu() -> Result<GpuHandle, String> {
    Err("built without the `cuda` feature".into())
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
