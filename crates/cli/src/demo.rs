//! `reel demo --text`: the text demo on the embedded string tasks (`reel demo` without `--text`
//! is the long-video main job, [`crate::demo_vl`]).
//!
//! Generates three small string tasks (reverse letters, sort digits, add numbers) as chat SFT
//! data with a character-level tokenizer, trains a tiny Qwen2 from scratch with the SFT trainer,
//! and reports held-out exact-match accuracy (greedy decoding with the KV cache) before, during
//! and after training, with the loss curve. Then GRPO from the SFT model, `--grpo-steps` steps on
//! fresh prompts (in neither the SFT data nor the held-out set) of the task SFT left weakest,
//! with an exact-match accuracy reward; the held-out accuracy after SFT and after GRPO (greedy
//! answers from the rollout engine) is printed side by side, with that task also measured on 1000
//! more unseen prompts, and the GRPO metrics are plotted. The data and tokenizer land in `--out`, the
//! runs in `--out/sft` and `--out/grpo` (config.toml, metrics.jsonl, metrics.png, checkpoints/
//! that `reel eval` and `reel generate` read); a new demo replaces the earlier one's runs.

use anyhow::{Context, Result};
use reel_data::{
    char_tokenizer, prompt_ids, solve, synth_examples, write_jsonl, Message, SynthKind, SynthTask,
    Tokenizer,
};
use reel_model::generate::SamplingParams;
use reel_model::Qwen2;
use reel_rl::AccuracyReward;
use reel_train::{
    eval_accuracy, run_grpo, run_sft, stop_token_ids, AccuracyOptions, AccuracyReport, GrpoOptions,
    GrpoRunConfig, InitConfig, PromptItem, RunOptions, SftConfig,
};
use serde_json::json;
use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// The text demo (string tasks on a tiny Qwen2) instead of the long-video one.
    #[arg(long)]
    pub text: bool,
    /// Run folder (data, model, checkpoints, metrics). Default runs/demo (runs/demo-text with
    /// --text).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// SFT optimizer steps. Default 2500 (--text) / 900 (video).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Peak SFT learning rate. Default 3e-3 (both).
    #[arg(long)]
    pub lr: Option<f32>,
    /// Width of the model (decoder). Default 128 (both).
    #[arg(long)]
    pub hidden: Option<usize>,
    /// Decoder layers. Default 2 (both).
    #[arg(long)]
    pub layers: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// GRPO steps after SFT (0 = no GRPO stage). Default 300 (--text) / 120 (video).
    #[arg(long)]
    pub grpo_steps: Option<u64>,
    /// GRPO learning rate (constant). Default 1e-4 (both).
    #[arg(long)]
    pub grpo_lr: Option<f32>,
    /// Samples per prompt. Default 8 (both).
    #[arg(long)]
    pub grpo_group: Option<usize>,
    /// Prompts per GRPO step. Default 16 (--text) / 8 (video).
    #[arg(long)]
    pub grpo_prompts: Option<usize>,
    /// KL coefficient β to the SFT model (k3 estimator). Default 0.05 (both).
    #[arg(long)]
    pub grpo_kl: Option<f32>,
    /// (--text) Training conversations per task.
    #[arg(long, default_value_t = 6000)]
    pub train_per_task: usize,
    /// (--text) Held-out conversations per task for accuracy.
    #[arg(long, default_value_t = 50)]
    pub eval_per_task: usize,
    /// (--text) Evaluate accuracy every this many steps.
    #[arg(long, default_value_t = 500)]
    pub eval_every: u64,
    /// (--text) Tokens per batch (padded).
    #[arg(long, default_value_t = 1536)]
    pub batch_tokens: usize,
    #[command(flatten)]
    pub video: crate::demo_vl::VideoDemoArgs,
}

impl DemoArgs {
    pub fn out(&self) -> PathBuf {
        self.out.clone().unwrap_or_else(|| {
            PathBuf::from(if self.text {
                "runs/demo-text"
            } else {
                "runs/demo"
            })
        })
    }
    pub fn steps(&self) -> u64 {
        self.steps.unwrap_or(if self.text { 2500 } else { 900 })
    }
    pub fn lr(&self) -> f32 {
        self.lr.unwrap_or(3e-3)
    }
    pub fn hidden(&self) -> usize {
        self.hidden.unwrap_or(128)
    }
    pub fn layers(&self) -> usize {
        self.layers.unwrap_or(2)
    }
    pub fn grpo_steps(&self) -> u64 {
        self.grpo_steps.unwrap_or(if self.text { 300 } else { 120 })
    }
    pub fn grpo_lr(&self) -> f32 {
        self.grpo_lr.unwrap_or(1e-4)
    }
    pub fn grpo_group(&self) -> usize {
        self.grpo_group.unwrap_or(8)
    }
    pub fn grpo_prompts(&self) -> usize {
        self.grpo_prompts.unwrap_or(if self.text { 16 } else { 8 })
    }
}

const KINDS: [SynthKind; 3] = [SynthKind::Reverse, SynthKind::Sort, SynthKind::Add];

/// The demo's tasks: 3–5 letters or digits, additions of 1–2 digit numbers.
fn task(kind: SynthKind) -> SynthTask {
    match kind {
        SynthKind::Add => SynthTask::new(kind),
        _ => SynthTask::new(kind).with_lengths(3, 5),
    }
}

/// Held-out prompts and their answers, by task.
struct HeldOut {
    items: Vec<(SynthKind, String, String)>,
}

impl HeldOut {
    /// Exact-match accuracy of greedy answers, overall and per task.
    fn accuracy(&self, model: &Qwen2, tok: &Tokenizer) -> Result<serde_json::Value> {
        let stop: Vec<u32> = tok.eos_token_id().into_iter().collect();
        let mut right = [0usize; 3];
        let mut total = [0usize; 3];
        for (kind, prompt, answer) in &self.items {
            let ids = prompt_ids(tok, &[Message::user(prompt.clone())])?;
            let out = model.generate(&ids, 12, &stop, &SamplingParams::default())?;
            let text = tok.decode(&out, true)?;
            let k = KINDS.iter().position(|x| x == kind).unwrap_or(0);
            total[k] += 1;
            if text.trim() == answer {
                right[k] += 1;
            }
        }
        let acc = |r: usize, t: usize| r as f64 / t.max(1) as f64;
        let mut v = json!({
            "accuracy": acc(right.iter().sum(), total.iter().sum())
        });
        for (k, kind) in KINDS.iter().enumerate() {
            v[format!("acc_{}", kind.name())] = json!(acc(right[k], total[k]));
        }
        Ok(v)
    }
}

fn pct(v: &serde_json::Value, key: &str) -> String {
    format!("{:5.1}%", 100.0 * v[key].as_f64().unwrap_or(0.0))
}

pub fn run(args: DemoArgs) -> Result<()> {
    if !args.text {
        return crate::demo_vl::run(&args);
    }
    let start = Instant::now();
    let out = &args.out();
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    // The demo regenerates everything: an earlier demo's run folder goes.
    for run in ["sft", "grpo"] {
        let run_dir = out.join(run);
        if run_dir.exists() {
            std::fs::remove_dir_all(&run_dir)
                .with_context(|| format!("removing the earlier demo run {}", run_dir.display()))?;
        }
    }
    println!(
        "reel demo: a tiny Qwen2 learns reverse / sort / add from scratch on {} CPU threads",
        rayon::current_num_threads()
    );

    // Data: train and held-out sets with no prompt in common.
    let tok = char_tokenizer();
    let tok_dir = out.join("tokenizer");
    tok.save(&tok_dir)?;
    let mut train = Vec::new();
    for (i, kind) in KINDS.iter().enumerate() {
        train.extend(synth_examples(
            task(*kind),
            args.train_per_task,
            args.seed * 1000 + i as u64,
        ));
    }
    let seen: HashSet<&str> = train.iter().map(|c| c[0].content.as_str()).collect();
    let mut held = HeldOut { items: Vec::new() };
    let mut eval_convs = Vec::new();
    for (i, kind) in KINDS.iter().enumerate() {
        let mut n = 0;
        for c in synth_examples(
            task(*kind),
            20 * args.eval_per_task,
            args.seed * 1000 + 500 + i as u64,
        ) {
            if n == args.eval_per_task || seen.contains(c[0].content.as_str()) {
                continue;
            }
            let answer = solve(&c[0].content).context("synthetic prompt without an answer")?;
            held.items.push((*kind, c[0].content.clone(), answer));
            eval_convs.push(c);
            n += 1;
        }
    }
    let train_path = out.join("train.jsonl");
    let eval_path = out.join("eval.jsonl");
    write_jsonl(&train_path, &train)?;
    write_jsonl(&eval_path, &eval_convs)?;
    println!(
        "data: {} training and {} held-out conversations in {}",
        train.len(),
        eval_convs.len(),
        out.display()
    );

    let mut cfg = SftConfig::default();
    cfg.model.init = Some(InitConfig {
        hidden_size: args.hidden(),
        num_hidden_layers: args.layers(),
        num_attention_heads: 4,
        num_key_value_heads: 2,
        intermediate_size: args.hidden() * 11 / 4,
        rope_theta: 10000.0,
        max_position_embeddings: 128,
        seed: args.seed,
        ..InitConfig::default()
    });
    cfg.model.tokenizer = Some(tok_dir.clone());
    cfg.data.train = train_path;
    cfg.data.eval = Some(eval_path);
    cfg.data.max_len = 96;
    cfg.data.tokens_per_batch = args.batch_tokens;
    cfg.data.seed = args.seed;
    cfg.train.steps = args.steps();
    cfg.train.lr = args.lr();
    cfg.train.warmup_steps = 30;
    cfg.train.min_lr_ratio = 0.05;
    cfg.output.dir = out.join("sft");
    cfg.output.save_every = args.steps().div_ceil(2);
    cfg.output.eval_every = args.eval_every;
    cfg.output.log_every = 10;
    reel_train::write_atomic(out.join("sft.toml"), cfg.to_toml().as_bytes())?;

    let init = reel_train::sft::init_model(&cfg, &tok)?;
    println!(
        "model: Qwen2 d={} L={} H={}/{} I={} V={} ({} parameters), checkpointing {}",
        init.config.hidden_size,
        init.config.num_hidden_layers,
        init.config.num_attention_heads,
        init.config.num_key_value_heads,
        init.config.intermediate_size,
        init.config.vocab_size,
        init.params.len(),
        cfg.train.checkpoint
    );
    let before = held.accuracy(&init, &tok)?;
    println!(
        "held-out accuracy before training: {}",
        pct(&before, "accuracy")
    );

    let mut curve: Vec<(u64, serde_json::Value)> = Vec::new();
    let summary = run_sft(
        &cfg,
        RunOptions {
            eval_hook: Some(Box::new(|step, model: &Qwen2, tok: &Tokenizer| {
                let acc = held.accuracy(model, tok)?;
                curve.push((step, acc.clone()));
                Ok(acc)
            })),
            ..RunOptions::default()
        },
    )?;
    let after = curve.last().map(|c| c.1.clone()).unwrap_or_default();

    println!();
    print!("{}", loss_chart(&summary.losses, 25, 8));
    println!(
        "loss: {:.3} (first step) → {:.3} (last step)",
        summary.losses.first().copied().unwrap_or(f32::NAN),
        summary.final_loss
    );
    println!(
        "{:<10} {:>8} {:>8} {:>8} {:>8}",
        "step", "all", "reverse", "sort", "add"
    );
    let row = |label: String, v: &serde_json::Value| {
        println!(
            "{:<10} {:>8} {:>8} {:>8} {:>8}",
            label,
            pct(v, "accuracy"),
            pct(v, "acc_reverse"),
            pct(v, "acc_sort"),
            pct(v, "acc_add")
        )
    };
    row("before".into(), &before);
    for (step, v) in &curve {
        row(format!("{step}"), v);
    }
    println!(
        "\nheld-out accuracy: {} before → {} after training; {:.0} s in all",
        pct(&before, "accuracy").trim(),
        pct(&after, "accuracy").trim(),
        start.elapsed().as_secs_f64()
    );
    println!(
        "final model: {} (try: reel generate --model {} --prompt \"reverse: hello\")",
        summary.final_model_dir.display(),
        summary.final_model_dir.display()
    );
    if args.grpo_steps() > 0 {
        grpo_stage(&args, &train, &held, &tok, &summary.final_model_dir)?;
        println!("demo done in {:.0} s", start.elapsed().as_secs_f64());
    }
    Ok(())
}

/// Exact match: numbers must be equal, strings equal after normalisation.
fn exact() -> AccuracyReward {
    AccuracyReward {
        rel_tol: 0.0,
        abs_tol: 0.0,
    }
}

fn held_accuracy(model: &Qwen2, tok: &Tokenizer, items: &[PromptItem]) -> Result<AccuracyReport> {
    let opts = AccuracyOptions {
        max_new_tokens: 12,
        batch: 64,
        stop_token_ids: stop_token_ids(tok, model),
        accuracy: exact(),
        ..AccuracyOptions::default()
    };
    let decode = |ids: &[u32]| -> Result<String> { Ok(tok.decode(ids, true)?) };
    eval_accuracy(model, items, &decode, &opts)
}

/// GRPO on the task the SFT model does worst, then held-out accuracy after SFT and after GRPO.
fn grpo_stage(
    args: &DemoArgs,
    train: &[Vec<Message>],
    held: &HeldOut,
    tok: &Tokenizer,
    sft_dir: &std::path::Path,
) -> Result<()> {
    let t0 = Instant::now();
    let out = &args.out();
    let items: Vec<PromptItem> = held
        .items
        .iter()
        .map(|(kind, prompt, answer)| {
            Ok(PromptItem {
                text: prompt.clone(),
                ids: prompt_ids(tok, &[Message::user(prompt.clone())])?,
                answer: answer.clone(),
                problem_type: kind.name().to_string(),
                problem_id: String::new(),
            })
        })
        .collect::<Result<_>>()?;
    let sft_model = reel_model::load_checkpoint(sft_dir)?;
    let after_sft = held_accuracy(&sft_model, tok, &items)?;
    let weakest = KINDS
        .iter()
        .min_by(|a, b| {
            let acc = |k: &SynthKind| after_sft.per_type.get(k.name()).map_or(0.0, |t| t.accuracy);
            acc(a).total_cmp(&acc(b))
        })
        .copied()
        .unwrap_or(SynthKind::Add);

    // Fresh prompts of that task, seen neither in SFT nor in the held-out set: the first
    // `RL_EVAL` measure the task once more (a larger sample than the held-out table's), the rest
    // are GRPO's training prompts.
    let seen: HashSet<&str> = train
        .iter()
        .map(|c| c[0].content.as_str())
        .chain(held.items.iter().map(|(_, p, _)| p.as_str()))
        .collect();
    let mut fresh: Vec<(String, String)> = Vec::new();
    let mut taken: HashSet<String> = HashSet::new();
    for c in synth_examples(task(weakest), 20_000, args.seed * 1000 + 900) {
        let p = c[0].content.clone();
        if seen.contains(p.as_str()) || !taken.insert(p.clone()) {
            continue;
        }
        if let Some(a) = solve(&p) {
            fresh.push((p, a));
        }
    }
    const RL_EVAL: usize = 1000;
    if fresh.len() < RL_EVAL + 100 {
        anyhow::bail!(
            "only {} fresh `{}` prompts for GRPO and its evaluation",
            fresh.len(),
            weakest.name()
        );
    }
    let extra: Vec<PromptItem> = fresh[..RL_EVAL]
        .iter()
        .map(|(p, a)| {
            Ok(PromptItem {
                text: p.clone(),
                ids: prompt_ids(tok, &[Message::user(p.clone())])?,
                answer: a.clone(),
                problem_type: weakest.name().to_string(),
                problem_id: String::new(),
            })
        })
        .collect::<Result<_>>()?;
    let prompts_path = out.join("grpo_prompts.jsonl");
    let mut lines = String::new();
    for (p, a) in &fresh[RL_EVAL..] {
        lines.push_str(&serde_json::to_string(
            &json!({"prompt": p, "answer": a, "problem_type": weakest.name()}),
        )?);
        lines.push('\n');
    }
    reel_train::write_atomic(&prompts_path, lines.as_bytes())?;
    let extra_sft = held_accuracy(&sft_model, tok, &extra)?.overall.accuracy;

    let mut cfg = GrpoRunConfig::default();
    cfg.model.path = sft_dir.to_path_buf();
    cfg.data.prompts = prompts_path;
    cfg.data.prompts_per_step = args.grpo_prompts();
    cfg.data.max_prompt_len = 64;
    cfg.data.seed = args.seed;
    cfg.train.steps = args.grpo_steps();
    cfg.train.micro_batch_seqs = 64;
    cfg.train.seed = args.seed;
    cfg.train.checkpoint = reel_model::CheckpointPolicy::None;
    cfg.grpo.group_size = args.grpo_group();
    cfg.grpo.max_response_tokens = 12;
    cfg.grpo.lr = args.grpo_lr();
    // A k3 KL to the SFT model keeps the other tasks from drifting.
    cfg.grpo.kl_coef = args.grpo_kl.unwrap_or(0.05);
    cfg.grpo.top_p = 1.0;
    cfg.grpo.dynamic_sampling = true;
    cfg.grpo.dynamic_sampling_max_rounds = 2;
    cfg.grpo.reward.accuracy_weight = 1.0;
    cfg.grpo.reward.format_weight = 0.0;
    cfg.grpo.reward.number_rel_tol = 0.0;
    cfg.grpo.reward.number_abs_tol = 0.0;
    cfg.output.dir = out.join("grpo");
    cfg.output.save_every = 0;
    cfg.output.log_every = 5;
    reel_train::write_atomic(out.join("grpo.toml"), cfg.to_toml().as_bytes())?;
    println!(
        "\nGRPO on `{}` (weakest after SFT): {} steps, {} prompts × {} samples, lr {}, \
         exact-match reward, KL β {}, dynamic sampling",
        weakest.name(),
        cfg.train.steps,
        cfg.data.prompts_per_step,
        cfg.grpo.group_size,
        cfg.grpo.lr,
        cfg.grpo.kl_coef
    );
    let summary = run_grpo(&cfg, GrpoOptions::default())?;
    let grpo_model = reel_model::load_checkpoint(&summary.final_model_dir)?;
    let after_grpo = held_accuracy(&grpo_model, tok, &items)?;
    let extra_grpo = held_accuracy(&grpo_model, tok, &extra)?.overall.accuracy;
    let metrics = cfg.output.dir.join("metrics.jsonl");
    let png = cfg.output.dir.join("metrics.png");
    // Entropy and KL exist only for steps that kept a group (dynamic sampling may keep none).
    let keys: Vec<String> = ["reward_mean", "loss", "entropy", "kl", "response_len_mean"]
        .iter()
        .filter(|k| summary.records.iter().any(|r| r[**k].is_number()))
        .map(|s| s.to_string())
        .collect();
    crate::plot::plot(&metrics, &keys, &png, 900, 260 * keys.len() as u32)?;

    let rewards: Vec<f64> = summary
        .records
        .iter()
        .filter_map(|r| r["reward_mean"].as_f64())
        .collect();
    let span = (rewards.len() / 4).max(1);
    let avg = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len().max(1) as f64;
    println!(
        "training reward (accuracy of sampled answers): {:.3} over the first {span} steps → \
         {:.3} over the last {span}",
        avg(&rewards[..span.min(rewards.len())]),
        avg(&rewards[rewards.len().saturating_sub(span)..])
    );
    println!("held-out accuracy (greedy, exact match):");
    println!("{:<10} {:>10} {:>10}", "task", "after SFT", "after GRPO");
    let cell = |r: &AccuracyReport, k: &str| {
        r.per_type
            .get(k)
            .map_or("-".to_string(), |t| format!("{:5.1}%", 100.0 * t.accuracy))
    };
    for kind in KINDS {
        println!(
            "{:<10} {:>10} {:>10}",
            kind.name(),
            cell(&after_sft, kind.name()),
            cell(&after_grpo, kind.name())
        );
    }
    println!(
        "{:<10} {:>10} {:>10}",
        "all",
        format!("{:5.1}%", 100.0 * after_sft.overall.accuracy),
        format!("{:5.1}%", 100.0 * after_grpo.overall.accuracy)
    );
    println!(
        "`{}` on {RL_EVAL} more unseen prompts: {:5.1}% after SFT → {:5.1}% after GRPO",
        weakest.name(),
        100.0 * extra_sft,
        100.0 * extra_grpo
    );
    println!(
        "GRPO stage {:.0} s; metrics {} and plot {}; model {}",
        t0.elapsed().as_secs_f64(),
        metrics.display(),
        png.display(),
        summary.final_model_dir.display()
    );
    Ok(())
}

/// A text chart of the loss curve: the mean loss of each of `cols` equal spans of steps, as
/// columns `rows` high, on a log scale.
pub(crate) fn loss_chart(losses: &[f32], cols: usize, rows: usize) -> String {
    if losses.is_empty() {
        return String::new();
    }
    let span = losses.len().div_ceil(cols);
    let means: Vec<f32> = losses
        .chunks(span)
        .map(|c| c.iter().sum::<f32>() / c.len() as f32)
        .collect();
    let (lo, hi) = means
        .iter()
        .fold((f32::INFINITY, 0.0f32), |(a, b), &x| (a.min(x), b.max(x)));
    let (llo, lhi) = (lo.max(1e-4).ln(), hi.max(1e-4).ln());
    let height = |x: f32| {
        let f = if lhi > llo {
            (x.max(1e-4).ln() - llo) / (lhi - llo)
        } else {
            1.0
        };
        1 + (f * (rows - 1) as f32).round() as usize
    };
    let mut out = format!("training loss (log scale), {} steps per column\n", span);
    for r in (1..=rows).rev() {
        let label = if r == rows {
            format!("{hi:7.3} ")
        } else if r == 1 {
            format!("{lo:7.3} ")
        } else {
            " ".repeat(8)
        };
        out.push_str(&label);
        for &m in &means {
            out.push_str(if height(m) >= r { "██" } else { "  " });
        }
        out.push('\n');
    }
    out
}
