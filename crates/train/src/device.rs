//! Where a run trains: the `train.device` setting ("auto", "cpu", "cuda"), its resolution against
//! what this build and machine have, and the device-resident model the SFT loop drives on a GPU.
//!
//! "auto" (the default) takes the GPU when the binary was built with the `cuda` feature and a
//! GPU with its libraries opens; otherwise it trains on the CPU and says why. "cuda" refuses to
//! start without one (naming what is missing); "cpu" never opens a GPU. The same binary runs on
//! machines without a GPU: `reel_cuda` opens every CUDA library at run time.
//!
//! A Qwen2.5-VL run trains its decoder on the GPU the same way ([`GpuModel::forward_embeds`]:
//! input-embedding rows — text rows from the device embedding table, video rows the merged
//! vision features — and per-token M-RoPE angles), the frozen vision tower encoding on the GPU
//! too ([`GpuTower`], [`gpu_tower`]: `video.gpu_tower`, bf16 or f32, or "off" for the CPU tower),
//! its features served from the embedding cache; a run that trains the tower stays on the CPU
//! ([`gpu_unsupported`]).
//!
//! A run with `parallel.sp > 1` (and dp = 1) on the GPU puts its sp in-process ranks on GPU 0,
//! each a thread with its own stream ([`GpuSpGroup`], [`GpuPlace::Sp`]): every rank's
//! [`GpuModel`] holds its token shard and attends through the group's schedule on the device.
//!
//! Under `reel launch` (one process per GPU, [`Launched`]) a run with `parallel.sp` = the world
//! size trains one sequence-parallel rank per process: [`process_gpu`] checks the run fits (text
//! decoder, dp = 1, enough GPUs on the machine) and names the process's GPU (its local rank), and
//! [`gpu_proc`] opens it and joins the world's NCCL communicator ([`GpuPlace::Proc`]): attention
//! through the device DistAttn executor over NCCL point-to-point, gradients all-reduced by NCCL.
//!
//! A GRPO run (text or Qwen2.5-VL) resolves the same setting for its rollouts
//! ([`gpu_rollout_unsupported`], [`rollout_gpu`], [`rollout_decoder`]): one [`RolloutDecoder`] on
//! GPU 0 when dp = sp = 1 (a Qwen2.5-VL's at any dp × sp). Both trainers then also score (old
//! policy, reference) and update there ([`grpo_policy_gpu`]: a [`GpuModel`] holding the policy,
//! its AdamW state and the bf16 reference weights; the decoder takes the updated weights device
//! to device, [`RolloutDecoder::load_from_policy`]); the VLM trainer on dp × sp ranks
//! ([`grpo_policy_ranks`], [`GpuPolicy`]: in-process ranks sharing the GPU, or under `reel
//! launch` this process's rank on its GPU, [`PolicyRanks`]; a launched process opens its own GPU
//! by default, [`set_process_gpu_ordinal`]). Greedy accuracy evaluation
//! (`reel eval --accuracy --device`) decodes through the same decoder ([`step_model`]).
//!
//! Without the `cuda` feature, [`GpuHandle`], [`GpuSpGroup`], [`GpuProc`], [`GpuModel`],
//! [`GpuTower`] and [`RolloutDecoder`] are uninhabited, so the CPU-only build carries the same
//! code paths with no GPU in them.

use crate::config::ZeroStage;
use anyhow::Result;
use reel_model::{CheckpointPolicy, Qwen2Config};
use reel_optim::{AdamWConfig, AdamWState};
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

/// What [`resolve`] chose: the CPU (with the reason when "auto" fell back, for the caller to say
/// what runs there), or the opened GPU.
#[derive(Debug)]
pub enum Chosen<G> {
    Cpu { note: Option<String> },
    Cuda(G),
}

/// Chooses the device for `want`: `built_with_cuda` says whether this binary has the GPU path,
/// `open` tries to open GPU 0 (called only when needed), `cpu_only` says why this run has no GPU
/// path (more than one rank, or a model family the GPU path does not train yet). Errors only for
/// an explicit "cuda", naming `setting` (the option the user set it with, e.g. `train.device`).
pub fn resolve<G>(
    want: Device,
    setting: &str,
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
        Device::Cuda => Err(format!("{setting} = \"cuda\": {why_not}")),
        _ => Ok(Chosen::Cpu {
            note: Some(why_not),
        }),
    }
}

/// Why a run (training a Qwen2.5-VL's vision tower too when `trained_tower`) cannot train on
/// the GPU yet, for [`resolve`]'s `cpu_only`; `None` when it can: the decoder (Qwen2, or
/// Qwen2.5-VL's with a frozen tower), on one rank or on its dp × sp ranks sharing the GPU.
pub fn gpu_unsupported(trained_tower: bool) -> Option<&'static str> {
    trained_tower.then_some(
        "GPU training takes Qwen2.5-VL with a frozen vision tower (video.train_vision = false); \
         this run trains the tower, so it trains on the CPU",
    )
}

/// Why a text GRPO run with `dims` rolls out with the CPU engine, for [`resolve`]'s `cpu_only`;
/// `None` when one GPU decoder rolls it out (dp = sp = 1).
pub fn gpu_rollout_unsupported(dims: reel_parallel::ParallelDims) -> Option<&'static str> {
    (dims.world() > 1).then_some(
        "GPU rollouts run on one rank (dp = sp = 1); this dp × sp run rolls out with the CPU \
         engine",
    )
}

/// Why `config`'s model cannot roll out on the GPU decoder (its paged attention is built for
/// the head dimensions `dims`), or `None` when it can.
pub fn rollout_model_unfit(config: &Qwen2Config, dims: &[usize]) -> Option<String> {
    (!dims.contains(&config.head_dim)).then(|| {
        format!(
            "the GPU decoder's paged attention takes head dimensions {dims:?}; this model's is \
             {}, so it rolls out with the CPU engine",
            config.head_dim
        )
    })
}

/// Resolves `want` (the `setting` the user set, named in errors) for rollouts or greedy answers
/// (`what`, named in the log): GPU 0 when [`resolve`] picks it, else `None` after logging why
/// "auto" fell back. `cpu_only` as for [`resolve`] (e.g. [`gpu_rollout_unsupported`]). An
/// explicit "cuda" that cannot be met is an error naming `setting` and the reason.
pub fn rollout_gpu(
    want: Device,
    cpu_only: Option<&str>,
    setting: &str,
    what: &str,
) -> Result<Option<GpuHandle>> {
    match resolve(want, setting, BUILT_WITH_CUDA, cpu_only, open_gpu) {
        Ok(Chosen::Cuda(g)) => Ok(Some(g)),
        Ok(Chosen::Cpu { note }) => {
            if let Some(n) = note {
                tracing::info!("{what} with the CPU engine ({n})");
            }
            Ok(None)
        }
        Err(e) => Err(anyhow::anyhow!(e)),
    }
}

/// The rollout decoder of `model` on `gpu` (from [`rollout_gpu`]; f32 weights and KV cache when
/// `f32`, else bf16), or `None` without a GPU or when the model does not fit the decoder
/// ([`rollout_model_unfit`]: "auto" logs why and decodes on the CPU, an explicit "cuda" in `want`
/// is an error naming `setting`). Logs the decoder it made for `what`.
pub fn rollout_decoder(
    gpu: Option<GpuHandle>,
    want: Device,
    model: &reel_model::Qwen2,
    f32: bool,
    setting: &str,
    what: &str,
) -> Result<Option<RolloutDecoder>> {
    use anyhow::Context;
    let Some(gpu) = gpu else { return Ok(None) };
    if let Some(why) = rollout_model_unfit(&model.config, ROLLOUT_HEAD_DIMS) {
        if want == Device::Cuda {
            anyhow::bail!("{setting} = \"cuda\": {why}");
        }
        tracing::info!("{what} with the CPU engine ({why})");
        return Ok(None);
    }
    let d = RolloutDecoder::new(gpu, model, f32).context("the GPU rollout decoder")?;
    tracing::info!("{what} on the GPU: {}", d.describe());
    Ok(Some(d))
}

/// A GRPO run's policy (a text decoder, or a Qwen2.5-VL's) on the GPU for the scoring passes and the update (dp = sp = 1, after
/// [`rollout_gpu`] chose the GPU: `have_gpu`): [`grpo_policy_ranks`] with one rank.
#[allow(clippy::too_many_arguments)]
pub fn grpo_policy_gpu(
    have_gpu: bool,
    gpu_update: bool,
    want: Device,
    model: &reel_model::Qwen2,
    reference: Option<&[f32]>,
    policy: CheckpointPolicy,
    opt: &reel_optim::AdamW,
    setting: &str,
) -> Result<Option<GpuModel>> {
    let p = grpo_policy_ranks(
        have_gpu,
        gpu_update,
        want,
        model,
        reference,
        policy,
        opt,
        setting,
        PolicyRanks::One,
        ZeroStage::Replicated,
        None,
    )?;
    Ok(p.and_then(|mut p| p.models.pop()))
}

/// Where a GRPO run's device policy runs its ranks.
pub enum PolicyRanks {
    /// One rank on GPU 0.
    One,
    /// `dims.dp() × dims.sp()` in-process ranks sharing GPU 0, each on its own stream
    /// ([`gpu_sp_group`]): attention by `method` within each replica, gradients summed over
    /// both levels on the device.
    InProcess {
        dims: reel_parallel::ParallelDims,
        method: reel_parallel::SpMethod,
        overlap: reel_parallel::Overlap,
        timeout: std::time::Duration,
    },
    /// This process's rank of a launched dp × sp world, one process per GPU ([`gpu_proc`]).
    Proc(Box<GpuProc>),
}

/// A GRPO run's policy on the device: one [`GpuModel`] per rank this process runs (one; or the
/// in-process ranks of [`PolicyRanks::InProcess`]), each holding the whole policy, its AdamW
/// state and the bf16 reference, its token shard of every row under sequence parallelism.
/// After every update every rank holds the same weights (gradients all-reduced, the same AdamW
/// step), so the lead rank's serve the rollout decoder and the checkpoints.
pub struct GpuPolicy {
    models: Vec<GpuModel>,
}

impl GpuPolicy {
    /// The first rank's model (world rank 0 in process, or this process's).
    pub fn lead(&self) -> &GpuModel {
        &self.models[0]
    }

    /// The weights and optimizer state, whole, as the lead rank holds them (`keep`; `None`
    /// otherwise): [`GpuModel::gather_state`] on every rank here, which every process of a
    /// launched world calls at the same point when the optimizer is sharded.
    pub fn gather_state(&mut self, keep: bool) -> Result<Option<(Vec<f32>, AdamWState)>> {
        let mut all = self.each(|r, g| Ok(g.gather_state(keep && r == 0)?))?;
        Ok(all.swap_remove(0))
    }

    /// The fp32 master weights whole on the host, as the lead rank holds them: its own copy, or
    /// with sharded gradients [`GpuModel::gather_params`] on every rank here (every process of
    /// a launched world calls this at the same point).
    pub fn params_host(&mut self) -> Result<Vec<f32>> {
        if !self.lead().grads_sharded() {
            return Ok(self.lead().params_host()?);
        }
        let mut all = self.each(|r, g| Ok(g.gather_params(r == 0)?))?;
        Ok(all.swap_remove(0).expect("the lead keeps them"))
    }

    /// The weights of `range` (flat layout) into `dst` for a bf16 rollout decoder's host side
    /// (the prompts' embedding rows): the fp32 master values, or with sharded gradients — no
    /// GPU holds them whole — the bf16 ones the decoder computes with, which every rank holds.
    pub fn decoder_range_into(&self, range: std::ops::Range<usize>, dst: &mut [f32]) -> Result<()> {
        let g = self.lead();
        match g.grads_sharded() {
            true => g.weights_range_into(range, dst)?,
            false => g.params_range_into(range, dst)?,
        }
        Ok(())
    }

    /// A checksum of the lead rank's weights, to compare replicas: of the fp32 master weights,
    /// or with sharded gradients (each master value on one rank only) of the bf16 weights every
    /// rank holds, a piece at a time.
    pub fn weights_checksum(&mut self) -> Result<u64> {
        let g = self.lead();
        if !g.grads_sharded() {
            return Ok(crate::sft::param_checksum(&g.params_host()?));
        }
        let Some(total) = g.opt_shard().map(|p| p.total) else {
            anyhow::bail!("sharded gradients without an optimizer shard");
        };
        // 64 MiB of host f32 at a time.
        const PIECE: usize = 1 << 24;
        let mut sum = crate::sft::FNV_SEED;
        let mut buf = Vec::new();
        for start in (0..total).step_by(PIECE) {
            let end = total.min(start + PIECE);
            buf.resize(end - start, 0.0);
            g.weights_range_into(start..end, &mut buf)?;
            sum = crate::sft::param_checksum_from(sum, &buf);
        }
        Ok(sum)
    }

    /// Runs `f(r, model)` on every rank's model (r: its index here), each on a thread of its
    /// own when there are several (their collectives meet), and returns the results in rank
    /// order; a failing rank has aborted its groups, so the others fail too instead of waiting.
    pub fn each<T: Send>(
        &mut self,
        f: impl Fn(usize, &mut GpuModel) -> Result<T> + Sync,
    ) -> Result<Vec<T>> {
        if let [one] = self.models.as_mut_slice() {
            return Ok(vec![f(0, one)?]);
        }
        on_threads(self.models.iter_mut().enumerate(), |(r, g)| f(r, g))
    }
}

/// `f` of every item, each on a thread of its own, the results in item order: every rank's, or
/// the error naming the cause ([`crate::sft::all_ranks_ok`]; a failing rank has aborted its
/// groups, so the others fail too instead of waiting).
fn on_threads<A: Send, T: Send>(
    items: impl IntoIterator<Item = A>,
    f: impl Fn(A) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let f = &f;
    let results: Vec<Result<T>> = std::thread::scope(|s| {
        let handles: Vec<_> = items.into_iter().map(|a| s.spawn(move || f(a))).collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(r, h)| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("the rank's thread panicked")))
                    .map_err(|e| e.context(format!("GPU policy rank {r}")))
            })
            .collect()
    });
    crate::sft::all_ranks_ok(results)
}

/// `upload(place)` of every rank of `group` (`dims.dp() × dims.sp()` ranks), each on a thread
/// of its own (a rank opens its stream and device endpoints on its thread), in rank order.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables, unreachable_code))]
fn on_rank_threads<T: Send>(
    group: GpuSpGroup,
    dims: reel_parallel::ParallelDims,
    upload: &(impl Fn(GpuPlace) -> Result<T> + Sync),
) -> Result<Vec<T>> {
    on_threads(0..dims.world(), |r| {
        let c = dims.coords(r)?;
        upload(GpuPlace::Sp {
            group: group.clone(),
            dp_rank: c.dp_rank,
            sp_rank: c.sp_rank,
        })
    })
}

/// The policy of a GRPO run on the GPU for the scoring passes and the update, its ranks where
/// `ranks` says (after [`rollout_gpu`] chose the GPU: `have_gpu`, or a launched process's):
/// `model`'s weights and `opt`'s state (a resumed run's) uploaded to each rank's [`GpuModel`],
/// `reference` (a flat parameter buffer) as its frozen reference copy. `None` when `gpu_update`
/// is off or there is no GPU; when the model cannot be put there, "auto" logs why and keeps
/// scoring and the update on the CPU, an explicit "cuda" in `want` is an error naming
/// `setting` (a launched process's, always an error: it has no CPU path). With `zero`
/// sharded (`parallel.shard_optimizer`) each rank keeps its shard of the fp32 master weights and
/// AdamW moments only, and of the gradients too at [`ZeroStage::Gradients`] ([`gpu_model`]).
/// With `resume_opt` (a checkpoint's optimizer file, whose moments `opt` was not given) each
/// rank reads only its part of the moments from it
/// ([`crate::checkpoint::optimizer_state_part`]): no process holds the whole state.
#[allow(clippy::too_many_arguments)]
pub fn grpo_policy_ranks(
    have_gpu: bool,
    gpu_update: bool,
    want: Device,
    model: &reel_model::Qwen2,
    reference: Option<&[f32]>,
    policy: CheckpointPolicy,
    opt: &reel_optim::AdamW,
    setting: &str,
    ranks: PolicyRanks,
    zero: ZeroStage,
    resume_opt: Option<&std::path::Path>,
) -> Result<Option<GpuPolicy>> {
    let launched = matches!(ranks, PolicyRanks::Proc(_));
    if !have_gpu && !launched {
        return Ok(None);
    }
    if !gpu_update {
        if launched {
            anyhow::bail!(
                "train.gpu_update = false: a launched GRPO run scores and updates on its GPUs"
            );
        }
        tracing::info!("GRPO scoring and update on the CPU (train.gpu_update = false)");
        return Ok(None);
    }
    let upload = |place: GpuPlace| -> Result<GpuModel> {
        let mut gm = gpu_model(
            place,
            model.config.clone(),
            &model.params,
            policy,
            *opt.config(),
            zero,
        )?;
        match resume_opt {
            Some(path) => {
                let entries = model.layout.entry_ranges();
                let (step, m, v) =
                    crate::checkpoint::optimizer_state_part(path, &entries, gm.opt_part())?;
                gm.load_opt_moments(step, &m, &v)?;
            }
            None => upload_opt_state(&mut gm, opt)?,
        }
        if let Some(r) = reference {
            gm.set_reference(r)?;
        }
        Ok(gm)
    };
    let made = (|| -> Result<GpuPolicy> {
        let models = match ranks {
            PolicyRanks::One => {
                let g = open_gpu().map_err(|e| anyhow::anyhow!(e))?;
                vec![upload(GpuPlace::One(Box::new(g)))?]
            }
            PolicyRanks::Proc(p) => vec![upload(GpuPlace::Proc(p))?],
            PolicyRanks::InProcess {
                dims,
                method,
                overlap,
                timeout,
            } => {
                let g = open_gpu().map_err(|e| anyhow::anyhow!(e))?;
                on_rank_threads(
                    gpu_sp_group(g, dims, method, overlap, timeout),
                    dims,
                    &upload,
                )?
            }
        };
        Ok(GpuPolicy { models })
    })();
    match made {
        Ok(p) => {
            tracing::info!(
                "GRPO scoring and update on the GPU ({} rank(s) here; bf16 compute, fp32 master \
                 weights)",
                p.models.len()
            );
            Ok(Some(p))
        }
        Err(e) if want == Device::Cuda || launched => {
            anyhow::bail!("{setting} = \"cuda\": putting the policy on the GPU: {e:#}")
        }
        Err(e) => {
            tracing::info!("GRPO scoring and update on the CPU (the policy on the GPU: {e:#})");
            Ok(None)
        }
    }
}

/// `opt`'s state onto the device model when it has taken a step (a resumed run's): a fresh
/// optimizer's moments are the device model's zeros already, and copying billions of zeros
/// costs tens of seconds at 3B.
pub fn upload_opt_state(gm: &mut GpuModel, opt: &reel_optim::AdamW) -> Result<()> {
    if opt.step_count() > 0 {
        gm.load_opt_state(opt.state_ref())?;
    }
    Ok(())
}

/// The metrics' name of where GRPO scores and updates: "cuda-bf16" on the GPU, else "cpu".
pub fn update_device(gpu: Option<&GpuModel>) -> &'static str {
    if gpu.is_some() {
        "cuda-bf16"
    } else {
        "cpu"
    }
}

/// The step model an engine decodes with: `gpu`'s decoder when there is one, else `cpu` (the
/// CPU reference). The one switch between the two for every rollout and greedy evaluation.
pub fn step_model<'a>(
    gpu: Option<&'a mut RolloutDecoder>,
    cpu: &'a reel_model::Qwen2,
) -> Box<dyn reel_rollout::StepModel + 'a> {
    match gpu {
        Some(d) => d.step_model(),
        None => Box::new(reel_rollout::CpuStep::new(cpu)),
    }
}

/// Tokens one GPU rollout step may run (`EngineConfig::max_step_tokens`, raised to this when the
/// decoder is on the GPU): a long prompt then prefills in few large chunks, each of which takes
/// cuDNN's attention (`reel_cuda::CUDNN_PREFILL_ROWS`), instead of 512-token chunks through the
/// paged kernel, whose traffic grows with the square of the prompt.
pub const GPU_STEP_TOKENS: usize = 16_384;

/// The rollout engine for `config` over [`step_model`]`(gpu, cpu)`; on the GPU with at least
/// [`GPU_STEP_TOKENS`] tokens a step.
pub fn rollout_engine<'a>(
    gpu: Option<&'a mut RolloutDecoder>,
    cpu: &'a reel_model::Qwen2,
    mut config: reel_rollout::EngineConfig,
) -> Result<reel_rollout::Engine<'a>> {
    if gpu.is_some() {
        config.max_step_tokens = config.max_step_tokens.max(GPU_STEP_TOKENS);
    }
    Ok(reel_rollout::Engine::with_model(
        step_model(gpu, cpu),
        config,
    )?)
}

/// The metrics' name of where an engine decodes: the decoder's ([`RolloutDecoder::name`]) or
/// "cpu".
pub fn rollout_device(gpu: Option<&RolloutDecoder>) -> &'static str {
    gpu.map_or("cpu", RolloutDecoder::name)
}

/// The head dimensions the GPU rollout decoder takes (none without the `cuda` feature).
#[cfg(feature = "cuda")]
pub const ROLLOUT_HEAD_DIMS: &[usize] = &reel_cuda::PAGED_HEAD_DIMS;
#[cfg(not(feature = "cuda"))]
pub const ROLLOUT_HEAD_DIMS: &[usize] = &[];

/// Whether this binary has the GPU path.
pub const BUILT_WITH_CUDA: bool = cfg!(feature = "cuda");

/// This process's place in a world started by `reel launch` (see `reel_comm::launch`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launched {
    /// `RANK`: the process's rank in the world (its sequence-parallel rank).
    pub rank: usize,
    /// `WORLD_SIZE`.
    pub world: usize,
    /// `LOCAL_RANK`: its rank on this machine, the ordinal of its GPU (default `rank`).
    pub local_rank: usize,
    /// `LOCAL_WORLD_SIZE`: the processes on this machine (default `world`).
    pub local_world: usize,
    /// `REEL_RENDEZVOUS`: `host:port` of rank 0's rendezvous.
    pub rendezvous: String,
}

impl Launched {
    /// The launcher's environment, or `None` when this process was not launched (no `RANK`).
    /// A malformed variable is an error naming it.
    pub fn from_env() -> Result<Option<Launched>, String> {
        use reel_comm::launch::{from_env, ENV_LOCAL_RANK, ENV_LOCAL_WORLD};
        let Some((rank, world, rendezvous)) = from_env()? else {
            return Ok(None);
        };
        let num = |name: &str, default: usize| match std::env::var(name) {
            Err(_) => Ok(default),
            Ok(v) => v
                .parse::<usize>()
                .map_err(|_| format!("{name}={v:?} is not a number")),
        };
        Ok(Some(Launched {
            rank,
            world,
            local_rank: num(ENV_LOCAL_RANK, rank)?,
            local_world: num(ENV_LOCAL_WORLD, world)?,
            rendezvous,
        }))
    }
}

/// The GPU this process opens by default: 0, or a launched process's own
/// ([`set_process_gpu_ordinal`]).
static PROCESS_GPU: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Makes `ordinal` the GPU every later [`open_gpu`], GPU tower and in-process device rank of
/// this process opens: a launched process's own GPU (its local rank, [`process_gpu`]).
pub fn set_process_gpu_ordinal(ordinal: usize) {
    PROCESS_GPU.store(ordinal, std::sync::atomic::Ordering::Relaxed);
}

/// The GPU this process opens by default (module docs of [`set_process_gpu_ordinal`]).
pub fn process_gpu_ordinal() -> usize {
    PROCESS_GPU.load(std::sync::atomic::Ordering::Relaxed)
}

/// Refuses a command that runs in one process (`what`, e.g. "grpo") when this process is one
/// of a world of several started by `reel launch`: every process would run the whole job and
/// write the same output folder. `None` (not launched) and a world of one pass.
pub fn one_process_only(what: &str, l: Option<&Launched>) -> Result<(), String> {
    match l {
        Some(l) if l.world > 1 => Err(format!(
            "`reel {what}` of a text decoder runs in one process (its dp × sp ranks in process; \
             the GPU at dp = sp = 1): under `reel launch` (WORLD_SIZE = {}) every process would \
             run the whole job into the same output folder; run it without `reel launch` (a \
             Qwen2.5-VL's GRPO runs one process per GPU)",
            l.world
        )),
        _ => Ok(()),
    }
}

/// Checks that the launched process `l` can train its share of a run with `dims` on one GPU of
/// its own (one process per GPU): the run trains on the GPU (`device` not "cpu", `cuda` built
/// in), not a Qwen2.5-VL SFT run (`vlm`: SFT of the VLM runs in one process; `reel grpo`
/// passes false, its VLM runs launched), dp · sp = the world size, and this machine has a
/// GPU for every process the launcher started on it (`gpus` counts them). `what` names the
/// command ("sft", "grpo"). Returns the process's GPU ordinal, its local rank; the error says
/// what to change.
pub fn process_gpu(
    what: &str,
    l: &Launched,
    dims: reel_parallel::ParallelDims,
    device: Device,
    vlm: bool,
    built_with_cuda: bool,
    gpus: impl FnOnce() -> Result<usize, String>,
) -> Result<usize, String> {
    let w = l.world;
    let under =
        format!("under `reel launch` (WORLD_SIZE = {w}), {what} trains one process per GPU");
    if device == Device::Cpu {
        return Err(format!(
            "{under}; train.device = \"cpu\" has no multi-process path: run it without `reel \
             launch` (`--sp {w}` trains {w} in-process ranks on the CPU)"
        ));
    }
    if !built_with_cuda {
        return Err(format!(
            "{under}, and this reel was built without the `cuda` feature (cargo build --release \
             -p reel-cli --features cuda)"
        ));
    }
    if vlm {
        return Err(format!(
            "{under} for the text decoder (Qwen2); a Qwen2.5-VL run trains in one process: run it \
             without `reel launch`"
        ));
    }
    if dims.world() != w {
        return Err(format!(
            "{under}, each one rank of the dp × sp grid: parallel.dp · parallel.sp must be {w} \
             (e.g. --sp {w}, or --dp {w}); this run has dp = {} and sp = {}",
            dims.dp(),
            dims.sp()
        ));
    }
    if l.local_rank >= l.local_world {
        return Err(format!(
            "LOCAL_RANK = {} is outside LOCAL_WORLD_SIZE = {}",
            l.local_rank, l.local_world
        ));
    }
    let n = gpus().map_err(|e| format!("rank {}: no usable GPU: {e}", l.rank))?;
    if n < l.local_world {
        return Err(format!(
            "rank {}: `reel launch` started {} processes on this machine, which has {n} GPU(s); \
             {what} needs one GPU per process (at most --nproc {n} here)",
            l.rank, l.local_world
        ));
    }
    Ok(l.local_rank)
}

/// Where one rank's device model lives.
pub enum GpuPlace {
    /// The run's only rank, on the opened GPU.
    One(Box<GpuHandle>),
    /// Rank (`dp_rank`, `sp_rank`) of a dp × sp grid of in-process ranks on one GPU.
    Sp {
        group: GpuSpGroup,
        dp_rank: usize,
        sp_rank: usize,
    },
    /// This process's rank of a dp × sp grid of processes, one per GPU: its GPU and its NCCL
    /// communicators ([`gpu_proc`]).
    Proc(Box<GpuProc>),
}

impl GpuPlace {
    /// The rank of a [`GpuPlace::Proc`] in its world of processes.
    pub fn process_rank(&self) -> Option<usize> {
        match self {
            GpuPlace::Proc(p) => Some(p.rank()),
            _ => None,
        }
    }
}

/// One process's GPU and NCCL communicators in a launched dp × sp run, and the attention
/// method the ranks run (a ring-family schedule, or Ulysses / the hybrid): its sequence-parallel
/// group (the ranks of its replica; none when sp = 1) and its data-parallel group (the ranks
/// with its token shard in the other replicas; none when dp = 1).
#[cfg(feature = "cuda")]
pub struct GpuProc {
    gpu: reel_cuda::Gpu,
    rank: usize,
    sp: Option<reel_cuda::NcclComm>,
    dp: Option<reel_cuda::NcclComm>,
    /// The whole world as a host-level communicator (asked of [`gpu_proc`]; see
    /// [`GpuProc::take_host`]).
    host: Option<reel_cuda::NcclComm>,
    /// The sequence-parallel group again, for the rollout decoder's shared prefill (asked of
    /// [`gpu_proc`]; see [`GpuProc::take_prefill`]).
    prefill: Option<reel_cuda::NcclComm>,
    method: reel_parallel::SpMethod,
    overlap: reel_parallel::Overlap,
}

#[cfg(feature = "cuda")]
impl GpuProc {
    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn describe(&self) -> String {
        self.gpu.info().to_string()
    }

    /// The world's host-level communicator (host buffers, staged through the GPU by NCCL),
    /// when [`gpu_proc`] was asked for one: what the processes exchange outside the model's
    /// passes, such as MR-SP's encoding split over them.
    pub fn take_host(&mut self) -> Option<HostComm> {
        self.host.take()
    }

    /// A communicator of this process's sequence-parallel group of its own (none when sp = 1),
    /// when [`gpu_proc`] was asked for one: the rollout decoder prefills long prompts over it
    /// ([`RolloutDecoder::set_prefill_group`]).
    pub fn take_prefill(&mut self) -> Option<reel_cuda::NcclComm> {
        self.prefill.take()
    }
}

/// A launched world's host-level communicator ([`GpuProc::take_host`]): NCCL's.
#[cfg(feature = "cuda")]
pub type HostComm = reel_cuda::NcclComm;
/// A launched world's host-level communicator: never made without the `cuda` feature (a
/// [`GpuProc`] cannot be), so any communicator type stands in.
#[cfg(not(feature = "cuda"))]
pub type HostComm = reel_comm::InProcess;

/// Opens GPU `ordinal` (its own stream) and joins the launched world `l` over NCCL (rendezvous,
/// init and every later wait bounded by `timeout`), split into the dp × sp grid `dims`
/// (rank = dp_rank · sp + sp_rank: a replica's sequence-parallel ranks are consecutive, so they
/// share a node where they can); with `extra.host`, also a host-level communicator of the whole
/// world ([`GpuProc::take_host`]); with `extra.prefill` and sp > 1, a second communicator of the
/// sequence-parallel group ([`GpuProc::take_prefill`]).
#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
pub fn gpu_proc(
    l: &Launched,
    dims: reel_parallel::ParallelDims,
    ordinal: usize,
    method: reel_parallel::SpMethod,
    overlap: reel_parallel::Overlap,
    timeout: std::time::Duration,
    extra: ProcComms,
) -> Result<GpuProc> {
    use anyhow::Context;
    use reel_comm::Communicator;
    let gpu = reel_cuda::Gpu::open_on_new_stream(ordinal)
        .with_context(|| format!("rank {}: opening GPU {ordinal}", l.rank))?;
    let world = reel_cuda::NcclComm::init(l.rank, l.world, &l.rendezvous, ordinal, timeout)
        .with_context(|| format!("rank {}: joining the NCCL world", l.rank))?;
    let host = match extra.host {
        true => Some(
            world
                .split(0, l.rank)
                .with_context(|| format!("rank {}: forming its host communicator", l.rank))?,
        ),
        false => None,
    };
    let c = dims.coords(l.rank)?;
    let prefill = match extra.prefill && dims.sp() > 1 {
        true => Some(
            world
                .split(c.dp_rank, c.sp_rank)
                .with_context(|| format!("rank {}: forming its rollout prefill group", l.rank))?,
        ),
        false => None,
    };
    let (sp, dp) = match (dims.dp() > 1, dims.sp() > 1) {
        (false, _) => (Some(world), None),
        (true, false) => (None, Some(world)),
        (true, true) => {
            let split = |color, key, what| {
                world
                    .split(color, key)
                    .with_context(|| format!("rank {}: forming its {what} group", l.rank))
            };
            let sp = split(c.dp_rank, c.sp_rank, "sequence-parallel")?;
            let dp = split(c.sp_rank, c.dp_rank, "data-parallel")?;
            (Some(sp), Some(dp))
        }
    };
    Ok(GpuProc {
        gpu,
        rank: l.rank,
        sp: sp.filter(|_| dims.sp() > 1),
        dp,
        host,
        prefill,
        method,
        overlap,
    })
}

/// The communicators a launched process asks of [`gpu_proc`] beside its model's groups.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcComms {
    /// A host-level communicator of the whole world ([`GpuProc::take_host`]).
    pub host: bool,
    /// A second communicator of the sequence-parallel group ([`GpuProc::take_prefill`]).
    pub prefill: bool,
}

/// The in-process device ranks of a dp × sp run on one GPU: a device world per replica (its sp
/// ranks) and per token shard (the dp replicas' ranks holding it), each rank's endpoints made
/// on its own thread, and the attention method they run.
#[cfg(feature = "cuda")]
#[derive(Clone)]
pub struct GpuSpGroup {
    /// `sp_worlds[dp_rank]`: that replica's sequence-parallel ranks (empty when sp = 1).
    sp_worlds: Vec<reel_cuda::DeviceWorld>,
    /// `dp_worlds[sp_rank]`: the replicas' ranks holding that shard (empty when dp = 1).
    dp_worlds: Vec<reel_cuda::DeviceWorld>,
    method: reel_parallel::SpMethod,
    overlap: reel_parallel::Overlap,
}

/// The `dims.dp()` × `method.ranks()` device ranks on the GPU `gpu` was opened on (GPU 0; each
/// rank opens its own stream, so `gpu` itself is let go); a rank that waits longer than
/// `timeout` for a peer fails.
#[cfg(feature = "cuda")]
pub fn gpu_sp_group(
    gpu: GpuHandle,
    dims: reel_parallel::ParallelDims,
    method: reel_parallel::SpMethod,
    overlap: reel_parallel::Overlap,
    timeout: std::time::Duration,
) -> GpuSpGroup {
    drop(gpu);
    let worlds = |n: usize, size: usize| -> Vec<reel_cuda::DeviceWorld> {
        if size > 1 {
            (0..n)
                .map(|_| reel_cuda::DeviceWorld::new(size, timeout))
                .collect()
        } else {
            Vec::new()
        }
    };
    GpuSpGroup {
        sp_worlds: worlds(dims.dp(), dims.sp()),
        dp_worlds: worlds(dims.sp(), dims.dp()),
        method,
        overlap,
    }
}

/// The device model of one rank: the model's weights `params` (flat `ParamLayout`) uploaded
/// where `place` says, with local attention (one rank) or the group's sequence-parallel
/// attention (its own stream and device endpoint, opened here on the rank's thread). With
/// `zero` sharded (`parallel.shard_optimizer`) the fp32 master weights and AdamW moments are
/// sharded over the rank's dp × sp world ([`GpuModel::new_sharded`]), at
/// [`ZeroStage::Gradients`] the gradients too ([`GpuModel::shard_gradients`]); one rank keeps
/// them whole.
#[cfg(feature = "cuda")]
pub fn gpu_model(
    place: GpuPlace,
    config: Qwen2Config,
    params: &[f32],
    policy: CheckpointPolicy,
    adamw: AdamWConfig,
    zero: ZeroStage,
) -> Result<GpuModel> {
    use anyhow::Context;
    let model = ModelParts {
        config,
        params,
        policy,
        adamw,
        zero,
    };
    match place {
        GpuPlace::One(g) => Ok(GpuModel::new(*g, model.config, params, policy, adamw)?),
        GpuPlace::Sp {
            group,
            dp_rank,
            sp_rank,
        } => {
            let at = format!("rank (dp {dp_rank}, sp {sp_rank})");
            let g = reel_cuda::Gpu::open_on_new_stream(process_gpu_ordinal())
                .with_context(|| format!("{at}: opening its stream"))?;
            let sp = match group.sp_worlds.get(dp_rank) {
                Some(w) => Some(
                    reel_cuda::GpuSpAttention::with_method(
                        w.comm(sp_rank, &g)?,
                        group.method,
                        group.overlap,
                    )
                    .with_context(|| format!("{at}: device attention"))?,
                ),
                None => None,
            };
            let dp = match group.dp_worlds.get(sp_rank) {
                Some(w) => Some(w.comm(dp_rank, &g)?),
                None => None,
            };
            model.rank(g, sp, dp)
        }
        GpuPlace::Proc(p) => {
            let GpuProc {
                gpu,
                rank,
                sp,
                dp,
                method,
                overlap,
                host: _,
                prefill: _,
            } = *p;
            let sp = match sp {
                Some(c) => Some(
                    reel_cuda::GpuSpAttention::with_method(
                        c.into_device_p2p(&gpu)?,
                        method,
                        overlap,
                    )
                    .with_context(|| format!("rank {rank}: device attention"))?,
                ),
                None => None,
            };
            let dp = match dp {
                Some(c) => Some(c.into_device_p2p(&gpu)?),
                None => None,
            };
            model.rank(gpu, sp, dp)
        }
    }
}

/// What [`gpu_model`] uploads, before it knows the rank's groups.
#[cfg(feature = "cuda")]
struct ModelParts<'a> {
    config: Qwen2Config,
    params: &'a [f32],
    policy: CheckpointPolicy,
    adamw: AdamWConfig,
    zero: ZeroStage,
}

#[cfg(feature = "cuda")]
impl ModelParts<'_> {
    /// The model of a rank of a dp × sp grid with its sequence-parallel attention and
    /// data-parallel group (either absent at size 1), its optimizer shard planned from them.
    fn rank<S, D>(
        self,
        gpu: reel_cuda::Gpu,
        sp: Option<reel_cuda::GpuSpAttention<S>>,
        dp: Option<D>,
    ) -> Result<GpuModel>
    where
        S: reel_cuda::DeviceGroup + Send + 'static,
        D: reel_cuda::DeviceGroup + Send + 'static,
    {
        let (sp_rank, sp_size) = sp.as_ref().map_or((0, 1), |s| (s.rank(), s.world_size()));
        let (dp_rank, dp_size) = dp.as_ref().map_or((0, 1), |d| (d.rank(), d.world_size()));
        let plan = (self.zero.sharded() && sp_size * dp_size > 1).then(|| {
            let total = reel_model::ParamLayout::new(&self.config).total();
            reel_optim::OptShard::new(total, sp_size, dp_size, sp_rank, dp_rank)
        });
        let mut m =
            GpuModel::new_sharded(gpu, self.config, self.params, self.policy, self.adamw, plan)?;
        if let Some(sp) = sp {
            m.set_attention(reel_cuda::GpuAttention::Sp(Box::new(sp)));
        }
        if let Some(dp) = dp {
            m.set_dp_group(Box::new(dp));
        }
        if self.zero == ZeroStage::Gradients && m.opt_shard().is_some() {
            m.shard_gradients()?;
        }
        Ok(m)
    }
}

#[cfg(feature = "cuda")]
pub use reel_cuda::{Gpu as GpuHandle, GpuEmbedsBatch, GpuQwen2 as GpuModel, Weights};

/// A GRPO run's rollout decoder on one GPU, kept for the whole run: weights and KV cache in
/// bf16 (the speed path) or f32 (`rollout.gpu_f32`); the engine steps it through
/// [`RolloutDecoder::step_model`], and [`RolloutDecoder::load_params`] refreshes its weights
/// from the CPU policy.
#[cfg(feature = "cuda")]
pub enum RolloutDecoder {
    Bf16(reel_cuda::GpuDecoder),
    F32(reel_cuda::GpuDecoder<f32>),
}

#[cfg(feature = "cuda")]
impl RolloutDecoder {
    /// Whether it keeps f32 weights (which [`RolloutDecoder::load_from_policy`] reads from the
    /// policy's whole fp32 master copy).
    pub fn is_f32(&self) -> bool {
        matches!(self, RolloutDecoder::F32(_))
    }

    /// Uploads `model`'s weights to `gpu` (f32 storage when `f32`, else bf16).
    pub fn new(gpu: GpuHandle, model: &reel_model::Qwen2, f32: bool) -> Result<Self> {
        Ok(if f32 {
            RolloutDecoder::F32(reel_cuda::GpuDecoder::from_model(gpu, model)?)
        } else {
            RolloutDecoder::Bf16(reel_cuda::GpuDecoder::from_model(gpu, model)?)
        })
    }

    /// Replaces the weights with `params` (the policy's flat f32 buffer in `ParamLayout`).
    pub fn load_params(&mut self, params: &[f32]) -> Result<()> {
        match self {
            RolloutDecoder::Bf16(d) => d.load_params(params)?,
            RolloutDecoder::F32(d) => d.load_params(params)?,
        }
        Ok(())
    }

    /// Replaces the weights with `policy`'s fp32 master weights, device to device (no host
    /// copy; both on GPU 0). A decoder reading the policy's weights in place
    /// ([`RolloutDecoder::read_policy_weights`]) only waits for the update to finish.
    pub fn load_from_policy(&mut self, policy: &GpuModel) -> Result<()> {
        policy.gpu().synchronize()?;
        if let RolloutDecoder::Bf16(d) = self {
            if d.weights_in_place() {
                return Ok(());
            }
        }
        match self {
            RolloutDecoder::Bf16(d) => d.load_params_device(&policy.params_device()?)?,
            RolloutDecoder::F32(_) if policy.grads_sharded() => anyhow::bail!(
                "an f32 rollout decoder reads the whole fp32 policy weights, which \
                 parallel.shard_gradients keeps on no GPU: roll out in bf16 or leave the \
                 gradients unsharded"
            ),
            RolloutDecoder::F32(d) => d.load_params_device(&policy.params_device()?)?,
        }
        Ok(())
    }

    /// Frees a bf16 decoder's own weights before the policy is put on the GPU, which it will
    /// read in place ([`RolloutDecoder::attach_policy`] gives it weights again either way): the
    /// two copies never sit on the device together (15 GB at 7B, the margin a 7B policy over
    /// 2 GPUs needs to be placed). An f32 decoder keeps its own.
    pub fn release_for_policy(&mut self) -> Result<()> {
        if let RolloutDecoder::Bf16(d) = self {
            d.release_weights()?;
        }
        Ok(())
    }

    /// After the policy was put on the GPU (`Some`) or not: reads its bf16 weights in place
    /// where it can ([`RolloutDecoder::read_policy_weights`]); otherwise a decoder whose
    /// weights were released loads `params` (the host policy's) again.
    ///
    /// # Safety
    /// As [`RolloutDecoder::read_policy_weights`].
    pub unsafe fn attach_policy(
        &mut self,
        policy: Option<&GpuModel>,
        params: &[f32],
    ) -> Result<()> {
        let in_place = match policy {
            // SAFETY: the caller's contract.
            Some(p) => unsafe { self.read_policy_weights(p)? },
            None => false,
        };
        match self {
            RolloutDecoder::Bf16(d) if !in_place && d.weights_released() => {
                d.load_params(params)?
            }
            _ => {}
        }
        Ok(())
    }

    /// Drops a bf16 decoder's own weights and reads `policy`'s bf16 compute copy in place from
    /// now on (the same values: both cast from the same fp32 master weights): one copy of the
    /// model on the GPU instead of two (6 GB at 3B, 15 GB at 7B). Returns whether it does (and
    /// logs it); an f32 decoder, or a policy on another device, keeps its own copy.
    ///
    /// # Safety
    /// `policy` must outlive every later step of this decoder, and its updates reach the
    /// decoder only through [`RolloutDecoder::load_from_policy`] (which waits for them) before
    /// the next rollout, as GRPO's step does.
    pub unsafe fn read_policy_weights(&mut self, policy: &GpuModel) -> Result<bool> {
        let RolloutDecoder::Bf16(d) = self else {
            return Ok(false);
        };
        if d.gpu().info().ordinal != policy.gpu().info().ordinal {
            return Ok(false);
        }
        policy.gpu().synchronize()?;
        // SAFETY: the caller's contract above.
        unsafe { d.read_weights_in_place(policy.weights_device())? };
        tracing::info!("the rollout decoder reads the policy's bf16 weights in place");
        Ok(true)
    }

    /// Prefills long prompts together with the other processes of `comm`'s group from now on
    /// ([`reel_rollout::Engine::add_group_shared`]): each computes its share of the rows, and
    /// every layer's keys and values are gathered over NCCL.
    pub fn set_prefill_group(&mut self, comm: reel_cuda::NcclComm) -> Result<()> {
        match self {
            RolloutDecoder::Bf16(d) => {
                let p2p = comm.into_device_p2p(d.gpu())?;
                d.set_prefill_group(Box::new(p2p));
            }
            RolloutDecoder::F32(d) => {
                let p2p = comm.into_device_p2p(d.gpu())?;
                d.set_prefill_group(Box::new(p2p));
            }
        }
        Ok(())
    }

    /// The decoder as the rollout engine's step model (borrowed for one engine's life).
    pub fn step_model(&mut self) -> Box<dyn reel_rollout::StepModel + '_> {
        match self {
            RolloutDecoder::Bf16(d) => Box::new(d),
            RolloutDecoder::F32(d) => Box::new(d),
        }
    }

    /// The metrics' name of the rollout device: "cuda-bf16" or "cuda-f32".
    pub fn name(&self) -> &'static str {
        match self {
            RolloutDecoder::Bf16(_) => "cuda-bf16",
            RolloutDecoder::F32(_) => "cuda-f32",
        }
    }

    /// One line: the storage type and the GPU.
    pub fn describe(&self) -> String {
        let gpu = match self {
            RolloutDecoder::Bf16(d) => d.gpu(),
            RolloutDecoder::F32(d) => d.gpu(),
        };
        format!("{} decoder on {}", self.name(), gpu.info())
    }
}

/// The frozen vision tower's device copy a run on the GPU encodes its videos with
/// (`video.gpu_tower`): bf16 or f32 storage on GPU 0 (its own stream), kept for the run and shared
/// by the run's in-process ranks.
#[cfg(feature = "cuda")]
pub enum GpuTower {
    Bf16(reel_cuda::GpuVisionTower),
    F32(reel_cuda::GpuVisionTower<f32>),
}

#[cfg(feature = "cuda")]
impl GpuTower {
    /// Uploads `tower`'s weights to this process's GPU ([`process_gpu_ordinal`]; f32 storage
    /// when `f32`, else bf16).
    pub fn new(tower: &reel_model::VisionTower, f32: bool) -> Result<Self> {
        let gpu = reel_cuda::Gpu::open_on_new_stream(process_gpu_ordinal())?;
        Ok(if f32 {
            GpuTower::F32(reel_cuda::GpuVisionTower::new(gpu, tower)?)
        } else {
            GpuTower::Bf16(reel_cuda::GpuVisionTower::new(gpu, tower)?)
        })
    }

    /// The tower as the MR-SP encoder's forward (`SpVisionEncoder::encode_cached_on`).
    pub fn forward(&self) -> Box<dyn reel_model::TowerForward + Send + '_> {
        match self {
            GpuTower::Bf16(t) => Box::new(t),
            GpuTower::F32(t) => Box::new(t),
        }
    }

    /// "cuda-bf16" or "cuda-f32".
    pub fn name(&self) -> &'static str {
        match self {
            GpuTower::Bf16(_) => "cuda-bf16",
            GpuTower::F32(_) => "cuda-f32",
        }
    }
}

/// The GPU tower of a run whose model is on the GPU and whose tower is frozen, per `mode`
/// (`video.gpu_tower`): `None` for "off"; when the tower cannot be put on the GPU (no device
/// memory, a head size the attention kernel lacks) the CPU tower encodes, with a warning naming
/// why. Logs the tower it made for `what`.
pub fn gpu_tower(
    mode: crate::config::GpuTowerMode,
    tower: &reel_model::VisionTower,
    what: &str,
) -> Option<GpuTower> {
    use crate::config::GpuTowerMode;
    let f32 = match mode {
        GpuTowerMode::Off => return None,
        GpuTowerMode::Bf16 => false,
        GpuTowerMode::F32 => true,
    };
    match GpuTower::new(tower, f32) {
        Ok(t) => {
            tracing::info!(
                "{what}: the frozen vision tower encodes on the GPU ({})",
                t.name()
            );
            Some(t)
        }
        Err(e) => {
            tracing::warn!("{what}: the vision tower stays on the CPU: {e:#}");
            None
        }
    }
}

/// The name of where videos are encoded: the GPU tower's ([`GpuTower::name`]) or "cpu".
pub fn tower_device(t: Option<&GpuTower>) -> &'static str {
    t.map_or("cpu", GpuTower::name)
}

/// One line naming the device.
#[cfg(feature = "cuda")]
pub fn describe(g: &GpuHandle) -> String {
    g.info().to_string()
}

#[cfg(not(feature = "cuda"))]
pub fn describe(g: &GpuHandle) -> String {
    match g.never {}
}

/// Opens this process's GPU ([`process_gpu_ordinal`]: 0 unless launched; the error says what is
/// missing).
#[cfg(feature = "cuda")]
pub fn open_gpu() -> Result<GpuHandle, String> {
    reel_cuda::Gpu::open(process_gpu_ordinal()).map_err(|e| e.to_string())
}

/// How many GPUs this machine has (or why none can be counted).
#[cfg(feature = "cuda")]
pub fn gpu_count() -> Result<usize, String> {
    reel_cuda::Gpu::device_count().map_err(|e| e.to_string())
}

#[cfg(not(feature = "cuda"))]
pub fn gpu_count() -> Result<usize, String> {
    Err("built without the `cuda` feature".into())
}

#[cfg(not(feature = "cuda"))]
pub use cpu_only::{
    GpuEmbedsBatch, GpuHandle, GpuModel, GpuProc, GpuSpGroup, GpuTower, RolloutDecoder, Weights,
};

#[cfg(not(feature = "cuda"))]
pub fn gpu_proc(
    _: &Launched,
    _: reel_parallel::ParallelDims,
    _: usize,
    _: reel_parallel::SpMethod,
    _: reel_parallel::Overlap,
    _: std::time::Duration,
    _: ProcComms,
) -> Result<GpuProc> {
    anyhow::bail!("one process per GPU needs the `cuda` feature")
}

#[cfg(not(feature = "cuda"))]
pub fn open_gpu() -> Result<GpuHandle, String> {
    Err("built without the `cuda` feature".into())
}

#[cfg(not(feature = "cuda"))]
pub fn gpu_sp_group(
    gpu: GpuHandle,
    _: reel_parallel::ParallelDims,
    _: reel_parallel::SpMethod,
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
    _: ZeroStage,
) -> Result<GpuModel> {
    match place {
        GpuPlace::One(g) => match g.never {},
        GpuPlace::Sp { group, .. } => match group.never {},
        GpuPlace::Proc(p) => match p.never {},
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

    /// `reel_cuda::GpuEmbedsBatch`'s fields: a micro-batch as input-embedding rows.
    #[derive(Clone, Copy, Debug)]
    pub struct GpuEmbedsBatch<'a> {
        pub tokens: &'a [u32],
        pub targets: &'a [i32],
        pub feature_token: u32,
        pub feature_rows: Option<&'a [bool]>,
        pub features: &'a [f32],
        pub cos: &'a [f32],
        pub sin: &'a [f32],
        pub b: usize,
        pub t: usize,
    }

    /// Never made (its field cannot be).
    #[derive(Clone)]
    pub struct GpuSpGroup {
        pub(in crate::device) never: Infallible,
    }

    /// Never made (its field cannot be).
    pub struct RolloutDecoder {
        never: Infallible,
    }

    impl RolloutDecoder {
        pub fn is_f32(&self) -> bool {
            match self.never {}
        }
        pub fn new(g: GpuHandle, _: &reel_model::Qwen2, _: bool) -> anyhow::Result<Self> {
            match g.never {}
        }
        pub fn load_params(&mut self, _: &[f32]) -> anyhow::Result<()> {
            match self.never {}
        }
        pub fn load_from_policy(&mut self, _: &GpuModel) -> anyhow::Result<()> {
            match self.never {}
        }
        /// # Safety
        /// Never callable: no value exists.
        pub unsafe fn read_policy_weights(&mut self, _: &GpuModel) -> anyhow::Result<bool> {
            match self.never {}
        }
        pub fn release_for_policy(&mut self) -> anyhow::Result<()> {
            match self.never {}
        }
        /// # Safety
        /// Never callable: no value exists.
        pub unsafe fn attach_policy(
            &mut self,
            _: Option<&GpuModel>,
            _: &[f32],
        ) -> anyhow::Result<()> {
            match self.never {}
        }
        pub fn step_model(&mut self) -> Box<dyn reel_rollout::StepModel + '_> {
            match self.never {}
        }
        pub fn set_prefill_group(&mut self, _: super::HostComm) -> anyhow::Result<()> {
            match self.never {}
        }
        pub fn name(&self) -> &'static str {
            match self.never {}
        }
        pub fn describe(&self) -> String {
            match self.never {}
        }
    }

    /// `reel_cuda::Weights`: which weights a scoring forward runs.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Weights {
        Policy,
        Reference,
    }

    /// Never made (its field cannot be).
    pub struct GpuTower {
        never: Infallible,
    }

    impl GpuTower {
        pub fn new(_: &reel_model::VisionTower, _: bool) -> anyhow::Result<Self> {
            anyhow::bail!("the GPU vision tower needs the `cuda` feature")
        }
        pub fn forward(&self) -> Box<dyn reel_model::TowerForward + Send + '_> {
            match self.never {}
        }
        pub fn name(&self) -> &'static str {
            match self.never {}
        }
    }

    /// Never made (its field cannot be).
    pub struct GpuProc {
        pub(in crate::device) never: Infallible,
    }

    impl GpuProc {
        pub fn rank(&self) -> usize {
            match self.never {}
        }
        pub fn describe(&self) -> String {
            match self.never {}
        }
        pub fn take_host(&mut self) -> Option<super::HostComm> {
            match self.never {}
        }
        pub fn take_prefill(&mut self) -> Option<super::HostComm> {
            match self.never {}
        }
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
        pub fn release_workspace(&mut self) -> R<()> {
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
        pub fn sp_rank(&self) -> usize {
            match self.never {}
        }
        pub fn dp_coords(&self) -> (usize, usize) {
            match self.never {}
        }
        pub fn all_gather_u64(&self, _: u64) -> R<Vec<u64>> {
            match self.never {}
        }
        pub fn all_gather_f32(&self, _: &[f32]) -> R<Vec<f32>> {
            match self.never {}
        }
        pub fn all_reduce_sum_host(&self, _: &mut [f32]) -> R<()> {
            match self.never {}
        }
        pub fn backward(&mut self, _: &TokenBatch, _: f32) -> R<()> {
            match self.never {}
        }
        pub fn forward_embeds(&mut self, _: &GpuEmbedsBatch) -> R<LossStats> {
            match self.never {}
        }
        pub fn backward_embeds(
            &mut self,
            _: &GpuEmbedsBatch,
            _: f32,
            _: bool,
        ) -> R<Option<Vec<f32>>> {
            match self.never {}
        }
        pub fn zero_grads(&mut self) -> R<()> {
            match self.never {}
        }
        pub fn set_reference(&mut self, _: &[f32]) -> R<()> {
            match self.never {}
        }
        pub fn token_logprobs(
            &mut self,
            _: &TokenBatch,
            _: Weights,
            _: f32,
            _: &mut [f32],
            _: Option<&mut [f32]>,
        ) -> R<usize> {
            match self.never {}
        }
        pub fn backward_logprobs(&mut self, _: &TokenBatch, _: &[f32]) -> R<()> {
            match self.never {}
        }
        pub fn token_logprobs_embeds(
            &mut self,
            _: &GpuEmbedsBatch,
            _: Weights,
            _: f32,
            _: &mut [f32],
            _: Option<&mut [f32]>,
        ) -> R<usize> {
            match self.never {}
        }
        pub fn backward_logprobs_embeds(
            &mut self,
            _: &GpuEmbedsBatch,
            _: &[f32],
            _: bool,
        ) -> R<Option<Vec<f32>>> {
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
        pub fn params_range_into(&self, _: std::ops::Range<usize>, _: &mut [f32]) -> R<()> {
            match self.never {}
        }
        pub fn weights_range_into(&self, _: std::ops::Range<usize>, _: &mut [f32]) -> R<()> {
            match self.never {}
        }
        pub fn gather_params(&mut self, _: bool) -> R<Option<Vec<f32>>> {
            match self.never {}
        }
        pub fn grads_sharded(&self) -> bool {
            match self.never {}
        }
        pub fn skip_backward(&mut self) -> R<()> {
            match self.never {}
        }
        pub fn gather_state(&mut self, _: bool) -> R<Option<(Vec<f32>, AdamWState)>> {
            match self.never {}
        }
        pub fn opt_shard(&self) -> Option<&reel_optim::OptShard> {
            match self.never {}
        }
        pub fn load_opt_state(&mut self, _: reel_optim::AdamWStateRef<'_>) -> R<()> {
            match self.never {}
        }
        pub fn opt_part(&self) -> std::ops::Range<usize> {
            match self.never {}
        }
        pub fn load_opt_moments(&mut self, _: u64, _: &[f32], _: &[f32]) -> R<()> {
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
        let r = resolve(
            Device::Cpu,
            "train.device",
            true,
            None,
            || -> Result<u8, String> { panic!("opened a GPU for device = cpu") },
        );
        assert_eq!(note(r.unwrap()), None);
        // "auto": the GPU when it opens, else the CPU and why.
        assert!(matches!(
            resolve(Device::Auto, "train.device", true, None, gpu),
            Ok(Chosen::Cuda(7))
        ));
        let n = note(resolve(Device::Auto, "train.device", true, None, no_gpu).unwrap()).unwrap();
        assert!(n.contains("no NVIDIA driver"), "{n}");
        let n = note(resolve(Device::Auto, "train.device", false, None, gpu).unwrap()).unwrap();
        assert!(n.contains("without the `cuda` feature"), "{n}");
        let n = note(
            resolve(
                Device::Auto,
                "train.device",
                true,
                Some("one rank only"),
                gpu,
            )
            .unwrap(),
        )
        .unwrap();
        assert!(n.contains("one rank"), "{n}");
        // "cuda": an error naming the reason.
        let e = resolve(Device::Cuda, "train.device", true, None, no_gpu).unwrap_err();
        assert!(
            e.contains("train.device") && e.contains("no NVIDIA driver"),
            "{e}"
        );
        let e = resolve(Device::Cuda, "train.device", false, None, gpu).unwrap_err();
        assert!(e.contains("cuda` feature"), "{e}");
        assert!(matches!(
            resolve(Device::Cuda, "train.device", true, None, gpu),
            Ok(Chosen::Cuda(7))
        ));
        assert_eq!("gpu".parse::<Device>(), Ok(Device::Cuda));
        assert!("tpu".parse::<Device>().is_err());
    }

    #[test]
    fn dp_and_sp_runs_and_a_frozen_tower_go_to_the_gpu_and_a_trained_tower_stays_on_the_cpu() {
        assert_eq!(
            gpu_unsupported(false),
            None,
            "one rank or dp × sp ranks, text or a frozen tower"
        );
        let vl = gpu_unsupported(true).unwrap();
        assert!(
            vl.contains("Qwen2.5-VL") && vl.contains("video.train_vision = false"),
            "{vl}"
        );
        // A trained tower: "auto" trains on the CPU saying why, "cuda" refuses with it.
        match resolve(
            Device::Auto,
            "train.device",
            true,
            gpu_unsupported(true),
            || Ok::<u8, String>(1),
        ) {
            Ok(Chosen::Cpu { note: Some(n) }) => {
                assert!(n.contains("tower"), "{n}")
            }
            other => panic!("expected the CPU with a note, got {other:?}"),
        }
        let e = resolve(
            Device::Cuda,
            "train.device",
            true,
            gpu_unsupported(true),
            || Ok::<u8, String>(1),
        )
        .unwrap_err();
        assert!(
            e.contains("train.device") && e.contains("trains the tower"),
            "{e}"
        );
        let gpu = || -> Result<u8, String> { Ok(1) };
        assert!(matches!(
            resolve(
                Device::Auto,
                "train.device",
                true,
                gpu_unsupported(false),
                gpu
            ),
            Ok(Chosen::Cuda(1))
        ));
    }

    #[test]
    fn grpo_rolls_out_on_the_gpu_with_one_rank_only() {
        let dims =
            |dp: usize, sp: usize| reel_parallel::ParallelDims::new(dp, sp, dp * sp).unwrap();
        assert_eq!(gpu_rollout_unsupported(dims(1, 1)), None);
        for (dp, sp) in [(2, 1), (1, 2), (2, 2)] {
            let why = gpu_rollout_unsupported(dims(dp, sp)).unwrap();
            assert!(why.contains("dp = sp = 1"), "{why}");
        }
        let gpu = || -> Result<u8, String> { Ok(3) };
        assert!(matches!(
            resolve(
                Device::Auto,
                "train.device",
                true,
                gpu_rollout_unsupported(dims(1, 1)),
                gpu
            ),
            Ok(Chosen::Cuda(3))
        ));
        // "auto" falls back with the reason; "cuda" refuses with it.
        match resolve(
            Device::Auto,
            "train.device",
            true,
            gpu_rollout_unsupported(dims(1, 2)),
            gpu,
        ) {
            Ok(Chosen::Cpu { note: Some(n) }) => assert!(n.contains("CPU engine"), "{n}"),
            other => panic!("expected the CPU with a note, got {other:?}"),
        }
        let e = resolve(
            Device::Cuda,
            "train.device",
            true,
            gpu_rollout_unsupported(dims(2, 1)),
            gpu,
        )
        .unwrap_err();
        assert!(
            e.contains("train.device") && e.contains("dp = sp = 1"),
            "{e}"
        );
    }

    #[test]
    fn rollout_gpu_names_the_setting_and_a_missing_gpu_leaves_the_cpu_engine() {
        assert!(rollout_gpu(Device::Cpu, None, "--device", "answers")
            .unwrap()
            .is_none());
        // An explicit "cuda" that cannot be met names the caller's setting and the reason.
        let e = rollout_gpu(Device::Cuda, Some("one rank only"), "--device", "answers")
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--device = \"cuda\": "), "{e}");
        let why = if BUILT_WITH_CUDA {
            "one rank only"
        } else {
            "`cuda` feature"
        };
        assert!(e.contains(why), "{e}");
        // "auto" with a reason to stay on the CPU falls back.
        assert!(
            rollout_gpu(Device::Auto, Some("one rank only"), "--device", "answers")
                .unwrap()
                .is_none()
        );
        // No GPU: no decoder, and the engine steps the CPU model.
        let m = reel_model::Qwen2::new_random(Qwen2Config::tiny(32), 1).unwrap();
        let d = rollout_decoder(None, Device::Cuda, &m, true, "--device", "answers").unwrap();
        assert!(d.is_none());
        assert_eq!(rollout_device(d.as_ref()), "cpu");
        assert_eq!(step_model(None, &m).config().vocab_size, 32);
    }

    #[test]
    fn a_head_dimension_the_decoder_lacks_rolls_out_on_the_cpu() {
        let mut c = Qwen2Config::tiny(64);
        let dims = [32, 64, 128, 256];
        c.head_dim = 64;
        assert_eq!(rollout_model_unfit(&c, &dims), None);
        c.head_dim = 16;
        let why = rollout_model_unfit(&c, &dims).unwrap();
        assert!(
            why.contains("head dimensions") && why.contains("is 16"),
            "{why}"
        );
    }

    #[test]
    fn one_process_commands_refuse_a_launched_world() {
        let l = |world: usize| Launched {
            rank: 0,
            world,
            local_rank: 0,
            local_world: world,
            rendezvous: "127.0.0.1:29533".into(),
        };
        assert_eq!(one_process_only("grpo", None), Ok(()));
        assert_eq!(one_process_only("grpo", Some(&l(1))), Ok(()));
        let e = one_process_only("grpo", Some(&l(4))).unwrap_err();
        assert!(
            e.contains("`reel grpo`") && e.contains("WORLD_SIZE = 4") && e.contains("without"),
            "{e}"
        );
    }

    #[test]
    fn a_launched_process_takes_the_gpu_of_its_local_rank_or_says_what_to_change() {
        let l = |rank: usize, world: usize, local_world: usize| Launched {
            rank,
            world,
            local_rank: rank % local_world,
            local_world,
            rendezvous: "127.0.0.1:29533".into(),
        };
        let dims =
            |sp: usize, dp: usize| reel_parallel::ParallelDims::new(dp, sp, dp * sp).unwrap();
        let two = || -> Result<usize, String> { Ok(2) };
        let plan = |l: &Launched, d, dev, vlm, built, gpus: Result<usize, String>| {
            process_gpu("sft", l, d, dev, vlm, built, || gpus)
        };
        // Two processes, two GPUs: each its local rank.
        assert_eq!(
            process_gpu(
                "sft",
                &l(0, 2, 2),
                dims(2, 1),
                Device::Cuda,
                false,
                true,
                two
            ),
            Ok(0)
        );
        assert_eq!(
            process_gpu(
                "sft",
                &l(1, 2, 2),
                dims(2, 1),
                Device::Auto,
                false,
                true,
                two
            ),
            Ok(1)
        );
        // Two nodes of 2 processes: global rank 3 is local rank 1.
        assert_eq!(
            plan(&l(3, 4, 2), dims(4, 1), Device::Cuda, false, true, Ok(2)),
            Ok(1)
        );
        // Fewer GPUs than processes on this machine: named, with the --nproc that fits.
        let e = plan(&l(0, 4, 4), dims(4, 1), Device::Cuda, false, true, Ok(2)).unwrap_err();
        assert!(
            e.contains("started 4 processes") && e.contains("2 GPU(s)"),
            "{e}"
        );
        assert!(e.contains("--nproc 2"), "{e}");
        let e = plan(
            &l(1, 2, 2),
            dims(2, 1),
            Device::Cuda,
            false,
            true,
            Err("no driver".into()),
        )
        .unwrap_err();
        assert!(e.contains("rank 1") && e.contains("no driver"), "{e}");
        // dp · sp must be the world size: dp × sp grids of 4 processes fit, 2 × 1 does not.
        for (sp, dp) in [(4, 1), (2, 2), (1, 4)] {
            assert_eq!(
                plan(&l(3, 4, 4), dims(sp, dp), Device::Cuda, false, true, Ok(4)),
                Ok(3),
                "sp {sp} × dp {dp}"
            );
        }
        let e = plan(&l(0, 2, 2), dims(1, 1), Device::Cuda, false, true, Ok(2)).unwrap_err();
        assert!(
            e.contains("parallel.dp · parallel.sp must be 2") && e.contains("--sp 2"),
            "{e}"
        );
        let e = plan(&l(0, 4, 4), dims(2, 1), Device::Cuda, false, true, Ok(4)).unwrap_err();
        assert!(e.contains("dp = 1 and sp = 2"), "{e}");
        // The CPU, a build without CUDA and the VLM have no multi-process path.
        let e = plan(&l(0, 2, 2), dims(2, 1), Device::Cpu, false, true, Ok(2)).unwrap_err();
        assert!(
            e.contains("\"cpu\"") && e.contains("without `reel launch`"),
            "{e}"
        );
        let e = plan(&l(0, 2, 2), dims(2, 1), Device::Auto, false, false, Ok(2)).unwrap_err();
        assert!(e.contains("`cuda` feature"), "{e}");
        let e = plan(&l(0, 2, 2), dims(2, 1), Device::Cuda, true, true, Ok(2)).unwrap_err();
        assert!(e.contains("Qwen2.5-VL"), "{e}");
        // A local rank outside the machine's processes.
        let mut odd = l(0, 2, 2);
        odd.local_rank = 2;
        let e = plan(&odd, dims(2, 1), Device::Cuda, false, true, Ok(8)).unwrap_err();
        assert!(e.contains("LOCAL_RANK = 2"), "{e}");
    }

    #[test]
    fn this_build_opens_a_gpu_or_says_why() {
        match resolve(
            Device::Auto,
            "train.device",
            BUILT_WITH_CUDA,
            None,
            open_gpu,
        ) {
            Ok(Chosen::Cuda(g)) => assert!(!describe(&g).is_empty(), "the GPU is named"),
            Ok(Chosen::Cpu { note }) => {
                let n = note.expect("auto explains a fallback");
                assert!(n.contains("GPU") || n.contains("cuda"), "{n}");
            }
            Err(e) => panic!("auto never fails: {e}"),
        }
    }
}
