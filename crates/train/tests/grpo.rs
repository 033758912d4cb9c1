//! The GRPO loop on the fixture model (fixtures/qwen2-tiny, random weights): a few short steps
//! with a reward computed by a shell command from the response's length, so groups differ.

use reel_data::Tokenizer;
use reel_model::{load_checkpoint, LocalAttention, Qwen2, TokenBatch, Workspace};
use reel_train::{run_grpo, Device, GrpoOptions, GrpoRunConfig, ProgressMode};
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/qwen2-tiny")
}

/// Reward: 1 for prompts whose answer is "same" (an all-equal group), else the length of the
/// JSON line the command reads (so it varies with the response).
const LEN_REWARD: &str =
    r#"read l; case "$l" in *'"answer":"same"'*) echo 1;; *) echo ${#l};; esac"#;

fn setup(dir: &Path, steps: u64) -> GrpoRunConfig {
    std::fs::create_dir_all(dir).unwrap();
    let prompts = dir.join("prompts.jsonl");
    let mut lines = String::new();
    for i in 0..6 {
        let answer = if i % 3 == 2 { "same" } else { "x" };
        lines.push_str(&format!(
            "{{\"prompt\": \"say {i}\", \"answer\": \"{answer}\", \"problem_type\": \"t{}\"}}\n",
            i % 2
        ));
    }
    std::fs::write(&prompts, lines).unwrap();
    let mut cfg = GrpoRunConfig::default();
    cfg.model.path = fixture();
    cfg.data.prompts = prompts;
    cfg.data.prompts_per_step = 2;
    cfg.train.steps = steps;
    cfg.train.micro_batch_seqs = 3;
    cfg.grpo.group_size = 4;
    cfg.grpo.max_response_tokens = 6;
    cfg.grpo.lr = 1e-3;
    cfg.grpo.kl_coef = 0.0;
    cfg.grpo.reward.accuracy_weight = 0.0;
    cfg.grpo.reward.format_weight = 0.0;
    cfg.grpo.reward.command = vec!["sh".into(), "-c".into(), LEN_REWARD.into()];
    cfg.output.dir = dir.join("run");
    cfg.output.save_every = 1;
    cfg.output.keep_last = 0;
    // The CPU engine, also in a build with the `cuda` feature on a machine with a GPU.
    cfg.train.device = Device::Cpu;
    cfg
}

fn quiet() -> GrpoOptions {
    GrpoOptions {
        progress: Some(ProgressMode::Log),
        ..GrpoOptions::default()
    }
}

fn seq_logprob(m: &Qwen2, ids: &[u32], prompt_len: usize) -> f64 {
    let t = ids.len() - 1;
    let targets: Vec<i32> = (0..t)
        .map(|i| {
            if i + 1 >= prompt_len {
                ids[i + 1] as i32
            } else {
                -1
            }
        })
        .collect();
    let positions: Vec<u32> = (0..t as u32).collect();
    let tb = TokenBatch {
        tokens: &ids[..t],
        targets: &targets,
        positions: &positions,
        b: 1,
        t,
    };
    let mut ws = Workspace::new(&m.config, reel_model::CheckpointPolicy::None);
    let mut lp = vec![0.0; t];
    m.token_logprobs(&mut ws, &tb, &LocalAttention, 1.0, &mut lp, None)
        .unwrap();
    lp.iter().map(|&x| x as f64).sum()
}

#[test]
fn grpo_steps_write_metrics_and_raise_a_positive_advantage_sample() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), 1);
    let s = run_grpo(&cfg, quiet()).unwrap();
    assert_eq!(s.steps, 1);
    assert_eq!(s.ref_passes, 0, "β = 0 runs no reference pass");
    assert_eq!(
        s.old_passes, 0,
        "one update per rollout batch: no old-policy pass"
    );
    let text = std::fs::read_to_string(cfg.output.dir.join("metrics.jsonl")).unwrap();
    let rec: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    for k in [
        "loss",
        "reward_mean",
        "reward_std",
        "accuracy",
        "format_rate",
        "entropy",
        "clip_frac_low",
        "clip_frac_high",
        "response_len_mean",
        "response_len_max",
        "groups_kept",
        "rollout_s",
        "scoring_s",
        "update_s",
        "prefill_tokens",
        "decode_tokens",
    ] {
        assert!(!rec[k].is_null(), "metrics lack {k}: {rec}");
    }
    // Shared prefixes: each group's prompt is prefilled once, not G times.
    assert!(rec["prefill_tokens"].as_u64().unwrap() > 0);
    // The sample with the largest advantage is more likely after the update.
    let best = s
        .last_batch
        .iter()
        .max_by(|a, b| a.2.total_cmp(&b.2))
        .unwrap();
    assert!(best.2 > 0.0);
    let before = load_checkpoint(&fixture()).unwrap();
    let after = load_checkpoint(&s.final_model_dir).unwrap();
    let (lb, la) = (
        seq_logprob(&before, &best.0, best.1),
        seq_logprob(&after, &best.0, best.1),
    );
    assert!(la > lb, "log π of a positive-advantage sample: {lb} → {la}");
    let worst = s
        .last_batch
        .iter()
        .min_by(|a, b| a.2.total_cmp(&b.2))
        .unwrap();
    let (wb, wa) = (
        seq_logprob(&before, &worst.0, worst.1),
        seq_logprob(&after, &worst.0, worst.1),
    );
    assert!(wa < wb, "log π of a negative-advantage sample: {wb} → {wa}");
}

#[test]
fn kl_runs_one_reference_pass_per_step_and_several_updates_score_the_old_policy() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = setup(dir.path(), 2);
    cfg.grpo.kl_coef = 0.05;
    cfg.train.mini_batches = 2;
    let s = run_grpo(&cfg, quiet()).unwrap();
    assert_eq!(s.ref_passes, 2);
    assert_eq!(s.old_passes, 2);
    // k3 KL is ≥ 0, and small: the reference is the initial weights.
    let kl = s.records[0]["kl"].as_f64().unwrap();
    assert!((0.0..0.1).contains(&kl), "{kl}");
    assert!(cfg.output.dir.join("checkpoints/step-2").is_dir());
    // A run told to write no checkpoint writes none, the last step's included.
    cfg.output.dir = dir.path().join("unsaved");
    let s = run_grpo(
        &cfg,
        GrpoOptions {
            no_checkpoints: true,
            ..quiet()
        },
    )
    .unwrap();
    assert_eq!(s.steps, 2);
    let saved = std::fs::read_dir(cfg.output.dir.join("checkpoints"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(saved, 0, "checkpoints written");
}

#[test]
fn dynamic_sampling_drops_all_equal_groups() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = setup(dir.path(), 3);
    cfg.grpo.dynamic_sampling = true;
    cfg.grpo.dynamic_sampling_max_rounds = 4;
    let s = run_grpo(&cfg, quiet()).unwrap();
    let dropped: u64 = s
        .records
        .iter()
        .map(|r| r["groups_dropped"].as_u64().unwrap())
        .sum();
    // Prompts 2 and 5 (answer "same") have constant rewards: 6 prompts over 3 steps of 2
    // groups each, topped up, must meet at least one of them.
    assert!(dropped >= 1, "{:?}", s.records);
    for r in &s.records {
        assert_eq!(r["groups_kept"].as_u64().unwrap(), 2, "{r}");
        assert!(r["rollout_rounds"].as_u64().unwrap() >= 1);
    }
}

#[test]
fn resume_reproduces_the_metrics_curve() {
    let dir = tempfile::tempdir().unwrap();
    let straight = setup(&dir.path().join("a"), 4);
    let cfg = setup(&dir.path().join("b"), 4);
    let full = run_grpo(&straight, quiet()).unwrap();
    let part = run_grpo(
        &cfg,
        GrpoOptions {
            stop_after: Some(2),
            ..quiet()
        },
    )
    .unwrap();
    assert_eq!(part.steps, 2);
    let rest = run_grpo(
        &cfg,
        GrpoOptions {
            resume: true,
            ..quiet()
        },
    )
    .unwrap();
    assert_eq!(rest.steps, 4);
    let curve = |recs: &[serde_json::Value]| -> Vec<(f64, f64)> {
        recs.iter()
            .map(|r| {
                (
                    r["reward_mean"].as_f64().unwrap(),
                    r["loss"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    let mut resumed = curve(&part.records);
    resumed.extend(curve(&rest.records));
    assert_eq!(curve(&full.records), resumed);
    // Rewards vary, so the comparison is not vacuous.
    assert!(full
        .records
        .iter()
        .any(|r| r["reward_std"].as_f64().unwrap() > 0.0));
}

#[test]
fn a_failing_reward_command_gives_zero_and_the_run_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = setup(dir.path(), 2);
    cfg.grpo.reward.command = vec!["sh".into(), "-c".into(), "echo garbage; exit 3".into()];
    let s = run_grpo(&cfg, quiet()).unwrap();
    assert_eq!(s.steps, 2);
    for r in &s.records {
        assert_eq!(r["reward_mean"].as_f64().unwrap(), 0.0);
    }
}

#[test]
fn a_non_finite_loss_stops_with_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), 3);
    let e = run_grpo(
        &cfg,
        GrpoOptions {
            poison_step: Some(2),
            ..quiet()
        },
    )
    .unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("step 2") && msg.contains("step-1"), "{msg}");
    let latest = std::fs::read_to_string(cfg.output.dir.join("checkpoints/latest")).unwrap();
    assert_eq!(latest.trim(), "step-1");
}

#[test]
fn bad_configs_are_refused_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = setup(dir.path(), 1);
    cfg.parallel.dp = 0;
    let e = format!("{:#}", run_grpo(&cfg, quiet()).unwrap_err());
    assert!(e.contains("parallel.dp"), "{e}");
    let mut cfg = setup(dir.path(), 1);
    cfg.apply_override("grpo.group_size=1").unwrap();
    let e = format!("{:#}", run_grpo(&cfg, quiet()).unwrap_err());
    assert!(e.contains("grpo.group_size"), "{e}");
    assert!(cfg.apply_override("grpo.nope=1").is_err());
    let _ = Tokenizer::from_dir(&fixture()).unwrap();
}

/// `train.device` for the rollouts, scoring and update, resolved as SFT's: "cuda" is refused
/// (naming why) with dp × sp > 1 or without the `cuda` feature; "auto" then rolls out, scores and
/// updates on the CPU and says so in the metrics; "auto" and `gpu_update = true` stay out of the
/// config.
#[test]
fn the_rollout_device_falls_back_to_the_cpu_or_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = setup(&dir.path().join("dp2"), 1);
    cfg.parallel.dp = 2;
    cfg.train.device = Device::Cuda;
    let e = format!("{:#}", run_grpo(&cfg, quiet()).unwrap_err());
    // A build with the `cuda` feature names dp × sp; one without names the feature first.
    let why = if cfg!(feature = "cuda") {
        "dp = sp = 1"
    } else {
        "`cuda` feature"
    };
    assert!(e.contains("train.device") && e.contains(why), "{e}");
    cfg.train.device = Device::Auto;
    let s = run_grpo(&cfg, quiet()).unwrap();
    assert_eq!(s.records[0]["rollout_device"], "cpu");
    assert_eq!(s.records[0]["update_device"], "cpu");
    if !cfg!(feature = "cuda") {
        let mut cfg = setup(&dir.path().join("one"), 1);
        cfg.apply_override("train.device=cuda").unwrap();
        let e = format!("{:#}", run_grpo(&cfg, quiet()).unwrap_err());
        assert!(e.contains("`cuda` feature"), "{e}");
        cfg.apply_override("train.device=auto").unwrap();
        let s = run_grpo(&cfg, quiet()).unwrap();
        assert_eq!(s.records[0]["rollout_device"], "cpu");
        assert_eq!(s.records[0]["update_device"], "cpu");
    }
    let mut cfg = GrpoRunConfig::default();
    assert!(cfg.train.gpu_update);
    let toml = cfg.to_toml();
    assert!(
        !toml.contains("device") && !toml.contains("gpu_update"),
        "{toml}"
    );
    let hash = cfg.config_hash();
    cfg.apply_override("train.gpu_update=false").unwrap();
    assert!(cfg.to_toml().contains("gpu_update = false"));
    assert_ne!(cfg.config_hash(), hash);
    cfg.apply_override("train.gpu_update=true").unwrap();
    assert_eq!(cfg.config_hash(), hash);
    cfg.apply_override("train.device=cuda").unwrap();
    cfg.apply_override("rollout.gpu_f32=true").unwrap();
    let toml = cfg.to_toml();
    assert!(
        toml.contains("device = \"cuda\"") && toml.contains("gpu_f32 = true"),
        "{toml}"
    );
    assert!(cfg.apply_override("train.device=tpu").is_err());
}

/// The config the parallel runs share: a reference pass (β > 0), two mini-batches (an old-policy
/// pass), three groups (dp replicas split them unevenly), seq-mean-token-mean (each sequence's
/// whole response length matters when its response spans token shards).
fn parallel_setup(dir: &Path, dp: usize, sp: usize, schedule: &str) -> GrpoRunConfig {
    let mut cfg = setup(dir, 1);
    // Prompts of 62 tokens: responses of up to 40 span two shards under zigzag (sp 2) and
    // contiguous (sp 3) layouts.
    cfg.grpo.max_response_tokens = 40;
    cfg.apply_override(&format!("parallel.schedule={schedule}"))
        .unwrap();
    cfg.data.prompts_per_step = 3;
    cfg.train.mini_batches = 2;
    cfg.train.micro_batch_seqs = 3;
    cfg.grpo.kl_coef = 0.05;
    cfg.grpo.loss_aggregation = reel_rl::LossAggregation::SeqMeanTokenMean;
    cfg.parallel.dp = dp;
    cfg.parallel.sp = sp;
    cfg.output.dir = dir.join(format!("run-dp{dp}-sp{sp}-{schedule}"));
    cfg
}

/// One rank with every sample in its own row is the reference; packed by prompt (the default)
/// on one rank and over dp × sp ranks, and plain rows over sp ranks (ring-family schedules,
/// Ulysses and the hybrid), give the same step.
#[test]
fn dp_and_sp_ranks_match_one_rank() {
    let dir = tempfile::tempdir().unwrap();
    let mut plain = parallel_setup(dir.path(), 1, 1, "distattn");
    plain.train.share_prompt = false;
    plain.output.dir = dir.path().join("plain");
    let one = run_grpo(&plain, quiet()).unwrap();
    let r1 = &one.records[0];
    let m1 = load_checkpoint(&one.final_model_dir).unwrap();
    let m0 = load_checkpoint(&fixture()).unwrap();
    assert!(
        m1.params.iter().zip(&m0.params).any(|(a, b)| a != b),
        "the step moved the weights"
    );
    for (dp, sp, schedule, share) in [
        (1, 1, "distattn", true),
        (2, 1, "distattn", true),
        (1, 2, "zigzag", true),
        (1, 2, "zigzag", false),
        (2, 2, "zigzag", true),
        (1, 3, "distattn", true),
        (1, 2, "ulysses", false),
        (2, 2, "hybrid", false),
    ] {
        let what = format!("dp {dp} × sp {sp} ({schedule}, share_prompt {share})");
        let mut cfg = parallel_setup(dir.path(), dp, sp, schedule);
        cfg.train.share_prompt = share;
        cfg.output.dir = dir.path().join(format!("run-{dp}-{sp}-{schedule}-{share}"));
        let s = run_grpo(&cfg, quiet()).unwrap();
        let r = &s.records[0];
        // The same rollouts, rewards and advantages, in the same order.
        assert_eq!(s.last_batch.len(), one.last_batch.len(), "{what}");
        for (a, b) in s.last_batch.iter().zip(&one.last_batch) {
            assert_eq!((&a.0, a.1), (&b.0, b.1), "{what}: samples");
            assert!(
                (a.2 - b.2).abs() < 1e-5,
                "{what}: advantage {} vs {}",
                a.2,
                b.2
            );
        }
        for k in [
            "reward_mean",
            "prefill_tokens",
            "decode_tokens",
            "response_tokens",
        ] {
            assert_eq!(r[k], r1[k], "{what}: {k}");
        }
        assert_eq!(
            (s.ref_passes, s.old_passes),
            (one.ref_passes, one.old_passes)
        );
        // Log-probabilities (through the KL to the reference, the ratio to the old policy and
        // the entropy), the loss and the gradient norm agree.
        for k in [
            "loss",
            "kl",
            "entropy",
            "ratio_mean",
            "ratio_max",
            "pg_loss",
            "grad_norm",
        ] {
            let (a, b) = (r[k].as_f64().unwrap(), r1[k].as_f64().unwrap());
            assert!(
                (a - b).abs() <= 1e-5 + 1e-4 * b.abs(),
                "{what}: {k} {a} vs {b}"
            );
        }
        let m = load_checkpoint(&s.final_model_dir).unwrap();
        reel_tensor::check_close(
            &format!("{what}: parameters after a step"),
            &m.params,
            &m1.params,
            reel_tensor::Tolerance::new(2e-5, 1e-4),
        )
        .unwrap();
    }
}

/// Ulysses takes plain rows: packing by prompt under it is refused, naming the key.
#[test]
fn ulysses_refuses_packed_rows() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = parallel_setup(dir.path(), 1, 2, "ulysses");
    assert!(cfg.train.share_prompt, "packing is the default");
    let e = format!("{:#}", run_grpo(&cfg, quiet()).unwrap_err());
    assert!(
        e.contains("train.share_prompt") && e.contains("ring-family"),
        "{e}"
    );
}

#[test]
fn stop_strings_end_responses_where_they_first_appear() {
    let dir = tempfile::tempdir().unwrap();
    let tok = Tokenizer::from_dir(&fixture()).unwrap();
    let mut cfg = setup(dir.path(), 1);
    cfg.grpo.max_response_tokens = 12;
    cfg.output.dir = dir.path().join("free");
    let free = run_grpo(&cfg, quiet()).unwrap();
    let response = |b: &(Vec<u32>, usize, f32)| b.0[b.1..].to_vec();
    // A stop string: the text of the third token of the first full-length response.
    let long = free
        .last_batch
        .iter()
        .map(response)
        .find(|r| r.len() == 12)
        .expect("a response that ran to max_response_tokens");
    let stop = tok.decode(&long[2..3], true).unwrap();
    assert!(!stop.is_empty());
    cfg.rollout.stop = vec![stop.clone()];
    cfg.output.dir = dir.path().join("stopped");
    let stopped = run_grpo(&cfg, quiet()).unwrap();
    let mut shortened = 0;
    for (a, b) in stopped.last_batch.iter().zip(&free.last_batch) {
        let (a, b) = (response(a), response(b));
        // The same draws up to the stop: a prefix of the free response.
        assert_eq!(a[..], b[..a.len()], "{a:?} vs {b:?}");
        let text = tok.decode(&a, true).unwrap();
        if a.len() < b.len() {
            shortened += 1;
            assert!(text.contains(&stop), "{text:?} stopped without {stop:?}");
        }
        let before = tok.decode(&a[..a.len() - 1], true).unwrap();
        assert!(!before.contains(&stop), "{before:?} ran past {stop:?}");
    }
    assert!(shortened > 0, "the stop string ended some response");
    let mut bad = setup(dir.path(), 1);
    bad.rollout.stop = vec![String::new()];
    let e = format!("{:#}", run_grpo(&bad, quiet()).unwrap_err());
    assert!(e.contains("rollout.stop"), "{e}");
}
