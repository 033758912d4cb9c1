//! Whole-model gradient check at shapes the golden fixtures do not reach: several sequences,
//! lengths past one attention tile, GQA. Analytic gradients of a few hundred parameters are
//! compared with central differences of the summed loss.

use reel_model::{
    default_positions, load_checkpoint, CheckpointPolicy, LocalAttention, TokenBatch, Workspace,
};
use std::path::Path;

#[test]
fn model_gradients_match_finite_differences_on_long_batches() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/qwen2-tiny");
    let mut model = load_checkpoint(&dir).unwrap();
    let (b, t) = (3, 150);
    let mut rng = reel_tensor::rng(7);
    use rand::Rng;
    let tokens: Vec<u32> = (0..b * t).map(|_| rng.random_range(0..99)).collect();
    let targets: Vec<i32> = (0..b * t)
        .map(|i| {
            if i % t == t - 1 || i % 7 == 0 {
                -100
            } else {
                tokens[i + 1] as i32
            }
        })
        .collect();
    let positions = default_positions(b, t);
    let batch = TokenBatch {
        tokens: &tokens,
        targets: &targets,
        positions: &positions,
        b,
        t,
    };
    let mut ws = Workspace::new(&model.config, CheckpointPolicy::Remat);
    let attn = LocalAttention;
    model.forward(&mut ws, &batch, &attn).unwrap();
    let mut grads = vec![0.0f32; model.params.len()];
    model
        .backward(&mut grads, &mut ws, &batch, 1.0, &attn)
        .unwrap();

    let mut worst = 0.0f32;
    let mut checked = 0;
    for e in model.layout.entries.clone() {
        for j in 0..4 {
            let idx = e.range.start + (j * 7919) % e.range.len();
            let orig = model.params[idx];
            let eps = 1e-2f32;
            model.params[idx] = orig + eps;
            let up = model.forward(&mut ws, &batch, &attn).unwrap().loss_sum;
            model.params[idx] = orig - eps;
            let down = model.forward(&mut ws, &batch, &attn).unwrap().loss_sum;
            model.params[idx] = orig;
            let numeric = ((up - down) / (2.0 * eps as f64)) as f32;
            let err = (numeric - grads[idx]).abs() / (numeric.abs().max(grads[idx].abs()) + 1e-1);
            worst = worst.max(err);
            checked += 1;
            assert!(
                err < 2e-2,
                "{} [{idx}]: analytic {} vs numeric {numeric}",
                e.name,
                grads[idx]
            );
        }
    }
    println!("checked {checked} parameters, worst relative error {worst}");
}
