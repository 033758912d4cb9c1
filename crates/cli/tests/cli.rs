//! The `reel` binary end to end: eval against transformers' NLL, generation, bench output and
//! clear errors for bad input.

use std::path::{Path, PathBuf};
use std::process::Command;

fn reel() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_reel"));
    c.env("RUST_LOG", "warn");
    c
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

#[test]
fn eval_matches_transformers_mean_nll() {
    let model = fixtures().join("qwen2-tiny");
    let out = reel()
        .args(["eval", "--json", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(fixtures().join("sft-eval.jsonl"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("eval.json")).unwrap()).unwrap();
    assert_eq!(got["tokens"], want["tokens"]);
    let (a, b) = (
        got["mean_nll"].as_f64().unwrap(),
        want["mean_nll"].as_f64().unwrap(),
    );
    assert!(
        (a - b).abs() <= 1e-4 * b.abs(),
        "reel {a} vs transformers {b}"
    );
}

#[test]
fn generate_prints_the_greedy_continuation() {
    let model = fixtures().join("qwen2-tiny");
    let gen: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("gen.json")).unwrap()).unwrap();
    let out = reel()
        .args(["generate", "--max-new-tokens", "12", "--raw", "--model"])
        .arg(&model)
        .arg("--prompt")
        .arg(gen["prompt"].as_str().unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // transformers' greedy ids, decoded with the fixture tokenizer, skipping special tokens.
    let tok = reel_data::Tokenizer::from_dir(&model).unwrap();
    let ids: Vec<u32> = gen["generated_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let expected = tok.decode(&ids, true).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim_end_matches('\n'),
        expected
    );
}

#[test]
fn bad_input_gets_a_clear_error_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("bad.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"a\", \"response\": \"b\"}\nnot json\n",
    )
    .unwrap();
    let out = reel()
        .args(["eval", "--model"])
        .arg(fixtures().join("qwen2-tiny"))
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("bad.jsonl:2"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let out = reel()
        .args(["eval", "--model"])
        .arg(tmp.path().join("no-model"))
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("no-model"), "{err}");

    let cfg = tmp.path().join("run.toml");
    std::fs::write(&cfg, "[train]\nlearning_rate = 1.0\n").unwrap();
    let out = reel().args(["sft", "--config"]).arg(&cfg).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("learning_rate") && err.contains("run.toml"),
        "{err}"
    );
}

#[test]
fn print_config_parses_back() {
    let out = reel().args(["sft", "--print-config"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("[train]") && text.contains("checkpoint"));
    assert!(text.contains("prefetch_workers = 2") && text.contains("prefetch_depth = 4"));
}

#[test]
fn bench_gemm_reports_both_sides() {
    let out = reel()
        .args(["bench", "gemm", "--reps", "1", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = v["gemm"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    for r in rows {
        assert!(r["reel_gflops"].as_f64().unwrap() > 0.0);
        assert!(r["gemm_crate_gflops"].as_f64().unwrap() > 0.0);
    }
}

/// Outside `reel launch` (or without the `cuda` feature) `bench sp-nccl` says what it needs.
#[test]
fn bench_sp_nccl_outside_a_launch_is_a_clear_error() {
    let out = reel()
        .args(["bench", "sp-nccl"])
        .env_remove("RANK")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("reel launch --nproc") || err.contains("without the `cuda` feature"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn sft_runs_sequence_parallel_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    reel_data::char_tokenizer().save(&dir.join("tok")).unwrap();
    let convs = reel_data::synth_examples(
        reel_data::SynthTask::new(reel_data::SynthKind::Reverse),
        40,
        3,
    );
    reel_data::write_jsonl(&dir.join("train.jsonl"), &convs).unwrap();
    let cfg = format!(
        "[model]\ntokenizer = {tok:?}\n[model.init]\nhidden_size = 32\nintermediate_size = 64\n\
         max_position_embeddings = 128\n[data]\ntrain = {train:?}\nmax_len = 64\n\
         tokens_per_batch = 512\n[train]\nsteps = 3\n[output]\ndir = {out:?}\n",
        tok = dir.join("tok"),
        train = dir.join("train.jsonl"),
        out = dir.join("run"),
    );
    std::fs::write(dir.join("run.toml"), cfg).unwrap();
    let out = reel()
        .args(["sft", "--sp", "2", "--dp", "2", "--config"])
        .arg(dir.join("run.toml"))
        .env("CI", "true")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir
        .join("run/checkpoints/step-3/model.safetensors")
        .exists());
    let metrics = std::fs::read_to_string(dir.join("run/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 3);

    let bad = reel()
        .args(["sft", "--sp", "0", "--config"])
        .arg(dir.join("run.toml"))
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("parallel.sp"));
}

/// `reel sft` under `reel launch` trains one process per GPU: on the CPU, with sp not the world
/// size, or with more processes than GPUs, every rank stops at once with an error saying what to
/// change (before any rendezvous, so nothing waits for a timeout).
#[test]
fn sft_under_launch_without_a_gpu_per_process_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    reel_data::char_tokenizer().save(&dir.join("tok")).unwrap();
    let convs = reel_data::synth_examples(
        reel_data::SynthTask::new(reel_data::SynthKind::Reverse),
        10,
        3,
    );
    reel_data::write_jsonl(&dir.join("train.jsonl"), &convs).unwrap();
    let cfg = format!(
        "[model]\ntokenizer = {tok:?}\n[model.init]\nhidden_size = 32\nintermediate_size = 64\n\
         max_position_embeddings = 128\n[data]\ntrain = {train:?}\nmax_len = 64\n\
         tokens_per_batch = 512\n[train]\nsteps = 2\n[output]\ndir = {out:?}\n",
        tok = dir.join("tok"),
        train = dir.join("train.jsonl"),
        out = dir.join("run"),
    );
    std::fs::write(dir.join("run.toml"), cfg).unwrap();
    let launch = |extra: &[&str]| {
        let out = reel()
            .args([
                "launch",
                "--nproc",
                "2",
                "--grace-secs",
                "5",
                "--",
                "reel",
                "sft",
            ])
            .args(extra)
            .arg("--config")
            .arg(dir.join("run.toml"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(err.contains("rank 0 exited with status 1"), "{err}");
        assert!(err.contains("rank 1 exited with status 1"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        err
    };
    let err = launch(&["--sp", "2", "--device", "cpu"]);
    assert!(
        err.contains("train.device = \"cpu\" has no multi-process path"),
        "{err}"
    );
    let err = launch(&["--sp", "1", "--device", "cuda"]);
    assert!(
        err.contains("parallel.sp must be 2") || err.contains("without the `cuda` feature"),
        "{err}"
    );
    // Without a GPU (CI), or on a machine with fewer GPUs than processes: named.
    if std::env::var("REEL_GPU_TESTS").is_err() {
        let err = launch(&["--sp", "2", "--device", "cuda"]);
        assert!(
            err.contains("no usable GPU") || err.contains("without the `cuda` feature"),
            "{err}"
        );
    }
    assert!(!dir.join("run/checkpoints/step-1").exists());
}

/// `reel sft --vl-*` builds a Qwen2.5-VL run config that `--set`, `--sp` and `--dp` apply to
/// (here a trained tower over 2 sp ranks × 2 replicas); the run's own config.toml then resumes
/// it through `--config` with more steps.
#[test]
fn vl_sft_flags_and_config_train_and_resume_a_qwen2_5_vl() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let out = reel()
        .current_dir(dir)
        .args([
            "sft",
            "--vl-model",
            "m",
            "--vl-data",
            "d/train.jsonl",
            "--vl-init-tiny",
            "--vl-synth",
            "4",
            "--vl-steps",
            "2",
            "--vl-batch",
            "1",
            "--vl-train-vision",
            "--vl-out",
            "run",
            "--sp",
            "2",
            "--dp",
            "2",
            "--set",
            "output.save_every=1",
        ])
        .env("CI", "true")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("trained 2 steps") && stdout.contains("4 videos"),
        "{stdout}"
    );
    let ckpt = dir.join("run/checkpoints/step-2");
    let cfg_json = std::fs::read_to_string(ckpt.join("config.json")).unwrap();
    assert!(cfg_json.contains("qwen2_5_vl"), "{cfg_json}");
    let toml = std::fs::read_to_string(dir.join("run/config.toml")).unwrap();
    assert!(
        toml.contains("train_vision = true") && toml.contains("sp = 2"),
        "{toml}"
    );

    let more = reel()
        .current_dir(dir)
        .args([
            "sft",
            "--config",
            "run/config.toml",
            "--set",
            "train.steps=3",
            "--resume",
        ])
        .env("CI", "true")
        .output()
        .unwrap();
    assert!(
        more.status.success(),
        "{}",
        String::from_utf8_lossy(&more.stderr)
    );
    assert!(String::from_utf8_lossy(&more.stdout).contains("trained 3 steps"));
    let metrics = std::fs::read_to_string(dir.join("run/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 3);
    assert!(metrics.contains("tower_forwards"));
}

#[test]
fn grpo_runs_sequence_parallel_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"hi\", \"answer\": \"a\"}\n{\"prompt\": \"ho\", \"answer\": \"b\"}\n",
    )
    .unwrap();
    let cfg_path = dir.path().join("grpo.toml");
    let run = dir.path().join("run");
    std::fs::write(
        &cfg_path,
        format!(
            "[model]\npath = {:?}\n[data]\nprompts = {:?}\nprompts_per_step = 2\n\
             [train]\nsteps = 1\n[grpo]\ngroup_size = 3\nmax_response_tokens = 5\n\
             [output]\ndir = {:?}\n",
            fixtures().join("qwen2-tiny").display().to_string(),
            prompts.display().to_string(),
            run.display().to_string()
        ),
    )
    .unwrap();
    let out = reel()
        .args(["grpo", "--config"])
        .arg(&cfg_path)
        .args(["--set", "parallel.sp=2", "--set", "parallel.dp=1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("ran 1 GRPO steps"), "{stdout}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let rec: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert!(rec["loss"].as_f64().unwrap().is_finite(), "{rec}");
    assert!(run.join("checkpoints/step-1/model.safetensors").exists());
}

#[test]
fn grpo_print_config_parses_back_and_a_tiny_run_trains() {
    let out = reel().args(["grpo", "--print-config"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("[grpo]") && text.contains("group_size"));
    assert!(text.contains("prefetch_workers = 2") && text.contains("prefetch_depth = 8"));
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("grpo.toml");
    // The printed defaults are a valid config once the two required paths are set.
    std::fs::write(&cfg_path, &text).unwrap();
    let prompts = dir.path().join("p.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"hi\", \"answer\": \"a\", \"problem_type\": \"x\"}\n\
         {\"problem_id\": \"v1\", \"problem\": \"which? A. a B. b\", \"answer\": \"<answer>A</answer>\", \
          \"problem_type\": \"mc\", \"data_type\": \"video\", \"videos\": [\"v.avi\"]}\n",
    )
    .unwrap();
    let model = fixtures().join("qwen2-tiny");
    let run = dir.path().join("run");
    let out = reel()
        .args(["grpo", "--config"])
        .arg(&cfg_path)
        .arg("--set")
        .arg(format!("model.path={}", model.display()))
        .arg("--set")
        .arg(format!("data.prompts={}", prompts.display()))
        .arg("--set")
        .arg(format!("output.dir={}", run.display()))
        .args([
            "--set",
            "train.steps=2",
            "--set",
            "data.prompts_per_step=2",
            "--set",
            "grpo.group_size=3",
            "--set",
            "grpo.max_response_tokens=4",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("videos ignored"), "{stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("ran 2 GRPO steps"), "{stdout}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 2);

    // Accuracy of the run's model on the same prompts, as JSON, per problem_type.
    let out = reel()
        .args([
            "eval",
            "--accuracy",
            "--json",
            "--max-new-tokens",
            "4",
            "--model",
        ])
        .arg(run.join("checkpoints/step-2"))
        .arg("--data")
        .arg(&prompts)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["overall"]["total"], 2);
    assert_eq!(v["per_type"]["mc"]["total"], 1);
    assert_eq!(v["per_type"]["x"]["total"], 1);
    // `--device cpu` decodes on the CPU; "cuda" without a usable GPU decoder is an error naming
    // the setting and the reason (the fixture's head dimension, or no `cuda` feature/GPU).
    let eval_on = |device: &str| {
        reel()
            .args(["eval", "--accuracy", "--json", "--max-new-tokens", "4"])
            .args(["--device", device, "--model"])
            .arg(run.join("checkpoints/step-2"))
            .arg("--data")
            .arg(&prompts)
            .output()
            .unwrap()
    };
    let out = eval_on("cpu");
    assert!(out.status.success());
    let cpu: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cpu["device"], "cpu");
    assert_eq!(cpu["overall"], v["overall"]);
    let out = eval_on("cuda");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("device = \"cuda\""), "{stderr}");

    // The metrics as a PNG of the requested size; an unknown key is named.
    let png = dir.path().join("m.png");
    let out = reel()
        .arg("plot")
        .arg(run.join("metrics.jsonl"))
        .arg("--out")
        .arg(&png)
        .args([
            "--keys",
            "loss,reward_mean",
            "--width",
            "640",
            "--height",
            "480",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let img = image::open(&png).unwrap();
    assert_eq!((img.width(), img.height()), (640, 480));
    let out = reel()
        .arg("plot")
        .arg(run.join("metrics.jsonl"))
        .args(["--keys", "loss,no_such_metric"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("`no_such_metric`"));
}

/// `reel eval` on a transformers-made Qwen2.5-VL checkpoint and LongVideo-Reason records gives
/// transformers' mean NLL over the target tokens (fixture: scripts/make_vl_eval_fixture.py); a
/// record with a missing video and a malformed one are skipped, counted, and the run finishes.
#[test]
fn eval_on_a_vlm_checkpoint_matches_transformers() {
    let dir = fixtures().join("qwen2_5_vl-eval");
    let run = |data: &Path| {
        let out = reel()
            .args(["eval", "--json", "--sample", "all", "--model"])
            .arg(dir.join("model"))
            .arg("--data")
            .arg(data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (got, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (got, _) = run(&dir.join("data.jsonl"));
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("eval.json")).unwrap()).unwrap();
    assert_eq!(got["tokens"], want["tokens"]);
    let (a, b) = (
        got["mean_nll"].as_f64().unwrap(),
        want["mean_nll"].as_f64().unwrap(),
    );
    assert!(
        (a - b).abs() <= 1e-4 * b.abs(),
        "reel {a} vs transformers {b}"
    );
    // Same records plus a missing video and a malformed line, in a copy beside the video.
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("data.jsonl");
    let mut text = std::fs::read_to_string(dir.join("data.jsonl"))
        .unwrap()
        .replace(
            "\"video\"",
            &format!("{:?}", dir.join("video").display().to_string()),
        );
    text.push_str(
        "{\"problem_id\": \"x\", \"problem\": \"Q?\\nA. a\\nB. b\", \"problem_type\": \"t\", \
         \"reasoning\": \"r\", \"videos\": [\"gone.avi\"], \"answer\": \"<answer>A</answer>\"}\n",
    );
    text.push_str("{not json\n");
    std::fs::write(&copy, text).unwrap();
    let (got2, stderr) = run(&copy);
    assert_eq!(got2["skipped_records"], 2);
    assert_eq!(got2["tokens"], want["tokens"]);
    assert!(stderr.contains("gone.avi"), "{stderr}");
    assert!(stderr.contains("data.jsonl:4"), "{stderr}");
}

#[test]
fn text_demo_runs_sft_then_grpo_and_prints_both_accuracies() {
    let dir = tempfile::tempdir().unwrap();
    let out = reel()
        .args(["demo", "--text", "--out"])
        .arg(dir.path())
        .args([
            "--steps",
            "20",
            "--train-per-task",
            "60",
            "--eval-per-task",
            "4",
            "--eval-every",
            "20",
            "--hidden",
            "32",
            "--layers",
            "1",
            "--grpo-steps",
            "2",
            "--grpo-prompts",
            "2",
            "--grpo-group",
            "3",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("after SFT") && stdout.contains("after GRPO"),
        "{stdout}"
    );
    let metrics = std::fs::read_to_string(dir.path().join("grpo/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 2);
    assert!(image::open(dir.path().join("grpo/metrics.png")).is_ok());
}

/// `reel eval --accuracy` on a Qwen2.5-VL checkpoint: greedy answers from the rollout engine,
/// scored per problem type; batching does not change them.
#[test]
fn vlm_accuracy_eval_reports_every_record_whatever_the_batch() {
    let dir = fixtures().join("qwen2_5_vl-eval");
    let run = |batch: &str| {
        let out = reel()
            .args(["eval", "--accuracy", "--json", "--sample", "all"])
            .args(["--max-new-tokens", "16", "--batch", batch, "--model"])
            .arg(dir.join("model"))
            .arg("--data")
            .arg(dir.join("data.jsonl"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let got = run("1");
    let records = std::fs::read_to_string(dir.join("data.jsonl")).unwrap();
    let n = records.lines().filter(|l| !l.trim().is_empty()).count();
    assert_eq!(got["overall"]["total"], n);
    assert_eq!(got["skipped_records"], 0);
    let per_type = got["per_type"].as_object().unwrap();
    let sum: u64 = per_type
        .values()
        .map(|t| t["total"].as_u64().unwrap())
        .sum();
    assert_eq!(sum as usize, n);
    for line in records.lines().filter(|l| !l.trim().is_empty()) {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(per_type.contains_key(r["problem_type"].as_str().unwrap()));
    }
    let rate = got["overall"]["format_rate"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&rate));
    assert_eq!(run("8"), got);
}

/// The long-video demo, scaled down to seconds: data, tiny VLM, accuracy before and after SFT
/// (sequence parallel) and after GRPO, side by side, with the metrics plotted.
#[test]
fn video_demo_runs_sft_and_grpo_and_prints_the_accuracies_side_by_side() {
    let dir = tempfile::tempdir().unwrap();
    let out = reel()
        .args(["demo", "--out"])
        .arg(dir.path())
        .args(["--videos", "12", "--frames", "8", "--held-out", "0.34"])
        .args([
            "--steps", "3", "--batch", "2", "--sp", "2", "--hidden", "32",
        ])
        .args(["--layers", "1", "--max-new-tokens", "8"])
        .args([
            "--grpo-steps",
            "2",
            "--grpo-prompts",
            "2",
            "--grpo-group",
            "2",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "before SFT",
        "after SFT",
        "after GRPO",
        "CoT-SFT",
        "sequence parallel",
    ] {
        assert!(stdout.contains(want), "`{want}` missing:\n{stdout}");
    }
    let table = stdout.lines().find(|l| l.starts_with("all ")).unwrap();
    assert_eq!(table.matches('%').count(), 3, "{table}");
    for f in [
        "data/train.jsonl",
        "data/heldout.jsonl",
        "data/rl/train.jsonl",
        "model/config.json",
        "sft/checkpoints/latest",
        "sft/metrics.png",
        "grpo/metrics.jsonl",
        "grpo/metrics.png",
        "accuracy.json",
    ] {
        assert!(dir.path().join(f).is_file(), "{f} missing");
    }
    // The SFT model the GRPO stage starts from is a loadable checkpoint folder.
    let sft_ckpts = dir.path().join("sft/checkpoints");
    let latest = std::fs::read_to_string(sft_ckpts.join("latest")).unwrap();
    assert!(
        sft_ckpts.join(latest.trim()).join("config.json").is_file(),
        "sft/checkpoints/{} has no config.json",
        latest.trim()
    );
    let acc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("accuracy.json")).unwrap())
            .unwrap();
    let n = acc["before_sft"]["overall"]["total"].as_u64().unwrap();
    assert!(n > 0);
    assert_eq!(acc["after_sft"]["overall"]["total"], n);
    assert_eq!(acc["after_grpo"]["overall"]["total"], n);
    let grpo = std::fs::read_to_string(dir.path().join("grpo/metrics.jsonl")).unwrap();
    assert_eq!(grpo.lines().count(), 2);
}

#[test]
fn launch_runs_one_process_per_rank_and_names_failures() {
    let ok = reel()
        .args(["launch", "--nproc", "3", "--", "/bin/sh", "-c"])
        .arg("test \"$WORLD_SIZE\" = 3 && test \"$RANK\" -lt 3 && test -n \"$REEL_RENDEZVOUS\"")
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // `reel` after `--` is this executable.
    let ok = reel()
        .args(["launch", "--nproc", "2", "--", "reel", "--version"])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&ok.stdout).matches("reel").count(),
        2
    );
    let bad = reel()
        .args([
            "launch",
            "--nproc",
            "2",
            "--grace-secs",
            "1",
            "--",
            "/bin/sh",
            "-c",
        ])
        .arg("exit $((RANK + 4))")
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("rank 0 exited with status 4"), "{err}");
    assert!(err.contains("rank 1 exited with status 5"), "{err}");
}

#[test]
fn grpo_on_a_vlm_checkpoint_runs_mr_sp_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("vl");
    reel_train::vl::write_tiny_vl_model(&model, 3).unwrap();
    let data = dir.path().join("data");
    let synth = reel_data::SynthVideoConfig {
        videos: 3,
        frames: 8,
        width: 56,
        height: 56,
        held_out: 0.0,
        ..Default::default()
    };
    reel_data::write_synth_dataset(&synth, &data).unwrap();
    let cfg_path = dir.path().join("grpo.toml");
    let run = dir.path().join("run");
    std::fs::write(
        &cfg_path,
        format!(
            "[model]\npath = {:?}\n[data]\nprompts = {:?}\nprompts_per_step = 2\n[train]\n\
             steps = 1\n[grpo]\ngroup_size = 2\nmax_response_tokens = 3\n[video]\n\
             sampling = \"uniform:8\"\n[parallel]\nsp = 2\n[output]\ndir = {:?}\n",
            model.display().to_string(),
            data.join("train.jsonl").display().to_string(),
            run.display().to_string()
        ),
    )
    .unwrap();
    let out = reel()
        .args(["grpo", "--config"])
        .arg(&cfg_path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("ran 1 GRPO steps"), "{stdout}");
    assert!(stdout.contains("2 encoded by the tower"), "{stdout}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let r: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert_eq!(r["videos_encoded"], 2);
    assert!(reel_model::load_vl_checkpoint(&run.join("checkpoints/step-1")).is_ok());
}
