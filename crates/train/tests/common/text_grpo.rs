//! The tiny text GRPO run of the GPU GRPO tests: a random model of the fixture's shape
//! (fixtures/qwen2-tiny) with 2 query heads, 1 KV head of dimension 32 (the paged attention
//! kernel's smallest), six prompts, a reward command that varies with the response.

use reel_data::Tokenizer;
use reel_model::{Qwen2, Qwen2Config};
use reel_train::{save_model_folder, Device, GrpoRunConfig};
use std::path::{Path, PathBuf};

pub fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/qwen2-tiny")
}

/// Reward: the length of the JSON line the command reads (it varies with the response).
pub const LEN_REWARD: &str = r#"read l; echo ${#l}"#;

/// The fixture's model with 2 query heads, 1 KV head, head dimension 32, random weights, saved
/// with the fixture's tokenizer in `dir/model`.
pub fn model(dir: &Path) -> PathBuf {
    let mut c = Qwen2Config::from_file(&fixture().join("config.json")).unwrap();
    c.num_attention_heads = 2;
    c.num_key_value_heads = 1;
    c.head_dim = 32;
    let m = Qwen2::new_random(c, 5).unwrap();
    let tok = Tokenizer::from_dir(&fixture()).unwrap();
    let out = dir.join("model");
    save_model_folder(&m, &tok, &out).unwrap();
    out
}

/// Three steps of 2 prompts × 4 samples of at most 12 tokens on `device` (`f32`: the f32 GPU
/// decoder), the length reward only, no KL, a learning rate that moves the policy, no
/// checkpoints; run folder `dir/run`.
pub fn setup(dir: &Path, model: &Path, device: Device, f32: bool) -> GrpoRunConfig {
    std::fs::create_dir_all(dir).unwrap();
    let prompts = dir.join("prompts.jsonl");
    let lines: String = (0..6)
        .map(|i| format!("{{\"prompt\": \"say {i}\", \"answer\": \"x\"}}\n"))
        .collect();
    std::fs::write(&prompts, lines).unwrap();
    let mut cfg = GrpoRunConfig::default();
    cfg.model.path = model.to_path_buf();
    cfg.data.prompts = prompts;
    cfg.data.prompts_per_step = 2;
    cfg.train.steps = 3;
    cfg.train.micro_batch_seqs = 4;
    cfg.train.device = device;
    cfg.rollout.gpu_f32 = f32;
    cfg.grpo.group_size = 4;
    cfg.grpo.max_response_tokens = 12;
    cfg.grpo.lr = 2e-2;
    cfg.grpo.kl_coef = 0.0;
    cfg.grpo.reward.accuracy_weight = 0.0;
    cfg.grpo.reward.format_weight = 0.0;
    cfg.grpo.reward.command = vec!["sh".into(), "-c".into(), LEN_REWARD.into()];
    cfg.output.dir = dir.join("run");
    cfg.output.save_every = 0;
    cfg
}
