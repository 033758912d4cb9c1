//! The SFT loop end to end on a tiny model: the loss falls, an interrupted run resumes onto the
//! same loss curve, every checkpoint policy trains identically, a non-finite step stops the run
//! with the last checkpoint intact, and bad input is refused with its file and line.

mod common;

use common::{assert_resume_continues, quiet, setup};
use reel_model::{load_checkpoint, CheckpointPolicy};
use reel_train::{run_sft, RunOptions};

#[test]
fn loss_falls_and_checkpoints_are_hf_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = setup(tmp.path(), 30);
    let s = run_sft(&cfg, quiet()).unwrap();
    assert_eq!(s.steps, 30);
    let first: f32 = s.losses[..3].iter().sum::<f32>() / 3.0;
    let last: f32 = s.losses[27..].iter().sum::<f32>() / 3.0;
    assert!(last < 0.8 * first, "loss {first} → {last}");
    // The final checkpoint is a model folder that loads on its own.
    let m = load_checkpoint(&s.final_model_dir).unwrap();
    assert_eq!(m.config.hidden_size, 32);
    assert!(reel_data::Tokenizer::from_dir(&s.final_model_dir).is_ok());
    // metrics.jsonl has one line per step with the documented fields, plus eval at the end.
    let text = std::fs::read_to_string(cfg.output.dir.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 30);
    for key in ["step", "loss", "lr", "grad_norm", "tokens_per_s"] {
        assert!(
            lines[5].get(key).is_some(),
            "metrics lack {key}: {}",
            lines[5]
        );
    }
    assert!(lines[29].get("eval_loss").is_some());
}

#[test]
fn resume_continues_the_same_loss_curve() {
    let tmp = tempfile::tempdir().unwrap();
    let straight = setup(&tmp.path().join("a"), 9);
    let cfg = setup(&tmp.path().join("b"), 9);
    // Interrupted after 5 steps: the newest checkpoint is step 3.
    assert_resume_continues(&straight, &cfg, 5, 3);
    // metrics.jsonl was truncated at the resume point: steps 1..=9 once each.
    let text = std::fs::read_to_string(cfg.output.dir.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, (1..=9).collect::<Vec<_>>());
}

#[test]
fn checkpoint_policies_train_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let mut curves = Vec::new();
    for policy in [
        CheckpointPolicy::None,
        CheckpointPolicy::Layer,
        CheckpointPolicy::Remat,
    ] {
        let mut cfg = setup(&tmp.path().join(policy.to_string()), 4);
        cfg.train.checkpoint = policy;
        curves.push(run_sft(&cfg, quiet()).unwrap().losses);
    }
    for c in &curves[1..] {
        for (a, b) in c.iter().zip(&curves[0]) {
            assert!((a - b).abs() <= 1e-5 * b.abs(), "{c:?} vs {:?}", curves[0]);
        }
    }
}

#[test]
fn non_finite_step_stops_with_the_last_checkpoint_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = setup(tmp.path(), 10);
    let err = run_sft(
        &cfg,
        RunOptions {
            poison_step: Some(5),
            ..quiet()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("step 5") && err.contains("non-finite"),
        "{err}"
    );
    assert!(
        err.contains("step-3"),
        "names the last good checkpoint: {err}"
    );
    let latest = cfg.output.dir.join("checkpoints/step-3");
    let m = load_checkpoint(&latest).unwrap();
    assert!(m.params.iter().all(|x| x.is_finite()));
    assert!(!cfg.output.dir.join("checkpoints/step-6").exists());
}

#[test]
fn malformed_jsonl_is_refused_with_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = setup(tmp.path(), 2);
    let text = std::fs::read_to_string(&cfg.data.train).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.insert(6, "{\"messages\": [{\"role\": \"user\"}]}");
    std::fs::write(&cfg.data.train, lines.join("\n")).unwrap();
    let err = format!("{:#}", run_sft(&cfg, quiet()).unwrap_err());
    assert!(err.contains("train.jsonl:7"), "{err}");
}

#[test]
fn missing_files_name_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = setup(tmp.path(), 2);
    cfg.data.train = tmp.path().join("nope.jsonl");
    let err = format!("{:#}", run_sft(&cfg, quiet()).unwrap_err());
    assert!(err.contains("nope.jsonl"), "{err}");
}

#[test]
fn a_fresh_run_refuses_a_folder_with_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = setup(tmp.path(), 3);
    run_sft(&cfg, quiet()).unwrap();
    let err = run_sft(&cfg, quiet()).unwrap_err().to_string();
    assert!(err.contains("--resume") && err.contains("step-3"), "{err}");
    let mut long = setup(&tmp.path().join("long"), 3);
    long.data.max_len = 4096;
    let err = run_sft(&long, quiet()).unwrap_err().to_string();
    assert!(err.contains("data.max_len"), "{err}");
}

#[test]
fn a_template_error_names_the_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = setup(tmp.path(), 2);
    let mut tok = reel_data::char_tokenizer();
    let src = "{% for m in messages %}{% if m.content == 'boom' %}\
               {{ raise_exception('bad turn') }}{% endif %}<|im_start|>{{ m.role }}\n\
               {{ m.content }}<|im_end|>\n{% endfor %}\
               {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    tok.set_chat_template(reel_data::ChatTemplate::new(src).unwrap());
    tok.save(cfg.model.tokenizer.as_ref().unwrap()).unwrap();
    let text = std::fs::read_to_string(&cfg.data.train).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    lines.insert(1, String::new());
    lines.insert(2, r#"{"prompt": "boom", "response": "x"}"#.to_string());
    std::fs::write(&cfg.data.train, lines.join("\n")).unwrap();
    let err = format!("{:#}", run_sft(&cfg, quiet()).unwrap_err());
    assert!(
        err.contains("train.jsonl:3") && err.contains("bad turn"),
        "{err}"
    );
}
