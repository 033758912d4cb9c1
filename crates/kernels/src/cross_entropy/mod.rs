//! LM head fused with cross-entropy: h [N, D], weight [V, D], targets [N] → losses [N], lse [N].
//!
//! For each labelled row, `z = h·weightᵀ`, `lse = ln Σ_c e^{z_c}`, `loss = lse − z_target`; the
//! logits are produced `chunk` vocabulary columns at a time with an online log-sum-exp, so [N, V]
//! never exists (as in Liger's fused linear cross-entropy). Backward recomputes each chunk:
//! `dz = (softmax(z) − onehot(target))·dloss`, `dh = dz·weight`, `dweight += dzᵀ·h`.
//!
//! The same kernel scores a policy for RL: `log π(target) = −loss` per labelled row, the entropy
//! `−Σ_c p_c ln p_c` of each row's distribution optionally in the same pass
//! ([`lm_head_ce_entropy_forward`]), and a per-row `dloss = −∂L/∂log π` turns the backward into
//! `dz = ∂L/∂log π · (onehot − softmax)`, the policy-gradient backward.

mod cpu;

use reel_tensor::Float;

/// Targets below zero (this one by convention) carry no loss.
pub const IGNORE_INDEX: i32 = -100;

#[allow(clippy::too_many_arguments)]
fn check(what: &str, hl: usize, wl: usize, tl: usize, n: usize, d: usize, v: usize, chunk: usize) {
    assert!(chunk > 0, "{what}: chunk must be positive");
    assert_eq!(
        hl,
        n * d,
        "{what}: h has {hl} elements, expected n·d = {n}·{d}"
    );
    assert_eq!(
        wl,
        v * d,
        "{what}: weight has {wl} elements, expected v·d = {v}·{d}"
    );
    assert_eq!(tl, n, "{what}: targets has {tl} elements, expected n = {n}");
}

/// h: [n, d] final hidden states; weight: [v, d] (lm_head, or the tied embedding); targets: [n]
/// (negative = no loss here). For labelled rows only, logits = h·weightᵀ are computed `chunk`
/// vocabulary columns at a time with an online log-sum-exp, never [n, v] at once. Writes
/// losses[n] = lse − logit[target] (0 where unlabelled) and lse[n] (f32; 0 where unlabelled).
/// Returns (sum of losses as f64, number of labelled rows).
///
/// # Panics
/// On a target ≥ v (naming the row and value), and on mismatched lengths.
#[allow(clippy::too_many_arguments)]
pub fn lm_head_ce_forward<T: Float>(
    losses: &mut [f32],
    lse: &mut [f32],
    h: &[T],
    weight: &[T],
    targets: &[i32],
    n: usize,
    d: usize,
    v: usize,
    chunk: usize,
) -> (f64, usize) {
    let w = "lm_head_ce_forward";
    check(w, h.len(), weight.len(), targets.len(), n, d, v, chunk);
    assert_eq!(
        losses.len(),
        n,
        "{w}: losses has {} elements, expected {n}",
        losses.len()
    );
    assert_eq!(
        lse.len(),
        n,
        "{w}: lse has {} elements, expected {n}",
        lse.len()
    );
    cpu::forward(losses, lse, None, h, weight, targets, d, v, chunk)
}

/// [`lm_head_ce_forward`] that also writes entropy[n] = −Σ_c p_c ln p_c of each labelled row's
/// softmax (f32; 0 where unlabelled), from the same logit chunks (no second pass over the
/// vocabulary). The entropy is an output only: [`lm_head_ce_backward`] differentiates the losses.
///
/// # Panics
/// As [`lm_head_ce_forward`], and on an entropy buffer that is not [n].
#[allow(clippy::too_many_arguments)]
pub fn lm_head_ce_entropy_forward<T: Float>(
    losses: &mut [f32],
    lse: &mut [f32],
    entropy: &mut [f32],
    h: &[T],
    weight: &[T],
    targets: &[i32],
    n: usize,
    d: usize,
    v: usize,
    chunk: usize,
) -> (f64, usize) {
    let w = "lm_head_ce_entropy_forward";
    check(w, h.len(), weight.len(), targets.len(), n, d, v, chunk);
    for (name, len) in [
        ("losses", losses.len()),
        ("lse", lse.len()),
        ("entropy", entropy.len()),
    ] {
        assert_eq!(len, n, "{w}: {name} has {len} elements, expected {n}");
    }
    cpu::forward(losses, lse, Some(entropy), h, weight, targets, d, v, chunk)
}

/// dloss[i] = dL/dlosses[i] (e.g. 1/count for a mean loss). dh [n,d] OVERWRITTEN (0 on unlabelled
/// rows); dweight [v,d] ACCUMULATED. Recomputes each logit chunk:
/// dlogits = (softmax − onehot(target))·dloss[i], with softmax from the forward's lse.
#[allow(clippy::too_many_arguments)]
pub fn lm_head_ce_backward<T: Float>(
    dh: &mut [T],
    dweight: &mut [T],
    h: &[T],
    weight: &[T],
    targets: &[i32],
    lse: &[f32],
    dloss: &[f32],
    n: usize,
    d: usize,
    v: usize,
    chunk: usize,
) {
    let w = "lm_head_ce_backward";
    check(w, h.len(), weight.len(), targets.len(), n, d, v, chunk);
    assert_eq!(
        dh.len(),
        n * d,
        "{w}: dh has {} elements, expected n·d",
        dh.len()
    );
    assert_eq!(
        dweight.len(),
        v * d,
        "{w}: dweight has {} elements, expected v·d",
        dweight.len()
    );
    assert_eq!(
        lse.len(),
        n,
        "{w}: lse has {} elements, expected {n}",
        lse.len()
    );
    assert_eq!(
        dloss.len(),
        n,
        "{w}: dloss has {} elements, expected {n}",
        dloss.len()
    );
    cpu::backward(dh, dweight, h, weight, targets, lse, dloss, d, v, chunk);
}

/// Naive reference with the full [n, v] logits in f64 (tests only): returns (losses, lse), 0 on
/// unlabelled rows.
pub fn lm_head_ce_forward_ref(
    h: &[f32],
    weight: &[f32],
    targets: &[i32],
    n: usize,
    d: usize,
    v: usize,
) -> (Vec<f32>, Vec<f32>) {
    let (losses, lse, _) = cpu::forward_ref(h, weight, targets, n, d, v);
    (losses, lse)
}

/// Naive reference of the per-row entropy −Σ_c p_c ln p_c with the full [n, v] logits in f64
/// (tests only); 0 on unlabelled rows.
pub fn lm_head_entropy_ref(
    h: &[f32],
    weight: &[f32],
    targets: &[i32],
    n: usize,
    d: usize,
    v: usize,
) -> Vec<f32> {
    cpu::forward_ref(h, weight, targets, n, d, v).2
}

#[cfg(test)]
mod tests {
    use super::*;
    use reel_tensor::gradcheck::numeric_grad;
    use reel_tensor::{bf16, check_close, convert, rng, uniform_vec, Tolerance};

    const TOL: Tolerance = Tolerance::new(1e-5, 1e-5);

    /// 9 rows, 3 of them unlabelled (two ways), targets spread over the vocabulary.
    fn problem(n: usize, d: usize, v: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<i32>) {
        let mut r = rng(seed);
        let h = uniform_vec(&mut r, n * d, 1.0);
        let w = uniform_vec(&mut r, v * d, 1.0);
        let targets = (0..n)
            .map(|i| match i % 4 {
                1 => IGNORE_INDEX,
                3 if i % 8 == 3 => -1,
                _ => ((i * 7 + 3) % v) as i32,
            })
            .collect();
        (h, w, targets)
    }

    #[test]
    fn forward_matches_full_logits_reference() {
        let (n, d, v) = (9, 6, 13);
        let (h, w, targets) = problem(n, d, v, 1);
        let (loss_r, lse_r) = lm_head_ce_forward_ref(&h, &w, &targets, n, d, v);
        let count_r = targets.iter().filter(|&&t| t >= 0).count();
        assert!(count_r > 0 && count_r < n);
        let sum_r: f64 = loss_r.iter().map(|&x| x as f64).sum();
        for chunk in [1, 3, 4, v, v + 5] {
            let mut losses = vec![f32::NAN; n];
            let mut lse = vec![f32::NAN; n];
            let (sum, count) =
                lm_head_ce_forward(&mut losses, &mut lse, &h, &w, &targets, n, d, v, chunk);
            check_close(&format!("losses chunk {chunk}"), &losses, &loss_r, TOL).unwrap();
            check_close(&format!("lse chunk {chunk}"), &lse, &lse_r, TOL).unwrap();
            assert_eq!(count, count_r);
            assert!((sum - sum_r).abs() < 1e-4, "sum {sum} vs {sum_r}");
            for (i, &t) in targets.iter().enumerate() {
                if t < 0 {
                    assert_eq!((losses[i], lse[i]), (0.0, 0.0), "row {i}");
                } else {
                    assert!(losses[i] > 0.0, "row {i}");
                }
            }
        }
    }

    /// Entropy alongside the losses: same losses and lse as without it, entropy equal to the
    /// f64 full-logits reference at every chunk size (chunk 1 exercises the online merge most),
    /// including rows with a large logit scale (peaked distributions, entropy near 0).
    #[test]
    fn entropy_matches_full_logits_reference() {
        let (n, d, v) = (9, 6, 13);
        for scale in [1.0f32, 30.0] {
            let (h, w, targets) = problem(n, d, v, 11);
            let h: Vec<f32> = h.iter().map(|x| x * scale).collect();
            let (loss_r, lse_r) = lm_head_ce_forward_ref(&h, &w, &targets, n, d, v);
            let ent_r = lm_head_entropy_ref(&h, &w, &targets, n, d, v);
            assert!(ent_r.iter().any(|&e| e > 1e-3));
            for chunk in [1, 3, 4, v, v + 5] {
                let mut losses = vec![f32::NAN; n];
                let mut lse = vec![f32::NAN; n];
                let mut ent = vec![f32::NAN; n];
                let (_, count) = lm_head_ce_entropy_forward(
                    &mut losses,
                    &mut lse,
                    &mut ent,
                    &h,
                    &w,
                    &targets,
                    n,
                    d,
                    v,
                    chunk,
                );
                assert_eq!(count, targets.iter().filter(|&&t| t >= 0).count());
                let what = format!("scale {scale} chunk {chunk}");
                let tol = Tolerance::new(1e-4, 1e-4);
                check_close(&format!("{what} losses"), &losses, &loss_r, tol).unwrap();
                check_close(&format!("{what} lse"), &lse, &lse_r, tol).unwrap();
                check_close(&format!("{what} entropy"), &ent, &ent_r, tol).unwrap();
                for (i, &t) in targets.iter().enumerate() {
                    if t < 0 {
                        assert_eq!(ent[i], 0.0, "row {i}");
                    } else {
                        assert!(ent[i] >= 0.0 && ent[i] <= (v as f32).ln() + 1e-5);
                    }
                }
            }
        }
    }

    /// The policy-gradient use of the backward: with dloss = −g per row, dh and dweight are the
    /// gradients of Σ g_i·log π(target_i) = −Σ g_i·loss_i (central differences, random signs).
    #[test]
    fn backward_with_per_row_weights_is_the_logprob_gradient() {
        let (n, d, v) = (7, 4, 9);
        let (h, w, targets) = problem(n, d, v, 12);
        let g: Vec<f32> = uniform_vec(&mut rng(13), n, 1.0);
        let objective = |h: &[f32], w: &[f32]| -> f64 {
            let (l, _) = lm_head_ce_forward_ref(h, w, &targets, n, d, v);
            l.iter()
                .zip(&g)
                .map(|(&l, &g)| -(l as f64) * g as f64)
                .sum()
        };
        let nh = numeric_grad(&h, 1e-2, |x| objective(x, &w));
        let nw = numeric_grad(&w, 1e-2, |x| objective(&h, x));
        let mut losses = vec![0.0; n];
        let mut lse = vec![0.0; n];
        lm_head_ce_forward(&mut losses, &mut lse, &h, &w, &targets, n, d, v, 4);
        let dloss: Vec<f32> = g.iter().map(|x| -x).collect();
        let mut dh = vec![f32::NAN; n * d];
        let mut dw = vec![0.0f32; v * d];
        lm_head_ce_backward(&mut dh, &mut dw, &h, &w, &targets, &lse, &dloss, n, d, v, 4);
        let tol = Tolerance::new(1e-4, 1e-3);
        check_close("dh", &dh, &nh, tol).unwrap();
        check_close("dweight", &dw, &nw, tol).unwrap();
    }

    #[test]
    fn all_rows_ignored_costs_nothing() {
        let (n, d, v) = (3, 4, 5);
        let (h, w, _) = problem(n, d, v, 2);
        let targets = vec![IGNORE_INDEX; n];
        let mut losses = vec![f32::NAN; n];
        let mut lse = vec![f32::NAN; n];
        let (sum, count) = lm_head_ce_forward(&mut losses, &mut lse, &h, &w, &targets, n, d, v, 2);
        assert_eq!((sum, count), (0.0, 0));
        assert!(losses.iter().chain(&lse).all(|&x| x == 0.0));
        let mut dh = vec![f32::NAN; n * d];
        let mut dw = vec![0.5f32; v * d];
        let dloss = vec![1.0f32; n];
        lm_head_ce_backward(&mut dh, &mut dw, &h, &w, &targets, &lse, &dloss, n, d, v, 2);
        assert!(dh.iter().all(|&x| x == 0.0));
        assert!(dw.iter().all(|&x| x == 0.5));
    }

    #[test]
    #[should_panic(expected = "target 13 at row 2")]
    fn target_outside_vocabulary_panics() {
        let (n, d, v) = (4, 3, 13);
        let (h, w, mut targets) = problem(n, d, v, 3);
        targets[2] = 13;
        let mut losses = vec![0.0; n];
        let mut lse = vec![0.0; n];
        lm_head_ce_forward(&mut losses, &mut lse, &h, &w, &targets, n, d, v, 4);
    }

    /// Mean loss over labelled rows: analytic dh and dweight (accumulated onto random values)
    /// against central differences through the f64 reference, at several chunk sizes.
    #[test]
    fn backward_matches_numeric_grad() {
        let (n, d, v) = (9, 5, 11);
        let (h, w, targets) = problem(n, d, v, 4);
        let count = targets.iter().filter(|&&t| t >= 0).count();
        let mean = |h: &[f32], w: &[f32]| -> f64 {
            let (l, _) = lm_head_ce_forward_ref(h, w, &targets, n, d, v);
            l.iter().map(|&x| x as f64).sum::<f64>() / count as f64
        };
        let eps = 1e-2;
        let nh = numeric_grad(&h, eps, |x| mean(x, &w));
        let nw = numeric_grad(&w, eps, |x| mean(&h, x));
        assert!(nw.iter().any(|&x| x.abs() > 1e-3));
        let tol = Tolerance::new(1e-4, 1e-3);
        for chunk in [1, 3, v, v + 2] {
            let mut losses = vec![0.0; n];
            let mut lse = vec![0.0; n];
            lm_head_ce_forward(&mut losses, &mut lse, &h, &w, &targets, n, d, v, chunk);
            let dloss: Vec<f32> = targets
                .iter()
                .map(|&t| if t >= 0 { 1.0 / count as f32 } else { 7.0 })
                .collect();
            let mut dh = vec![f32::NAN; n * d];
            let dw0 = uniform_vec(&mut rng(5), v * d, 1.0);
            let mut dw = dw0.clone();
            lm_head_ce_backward(
                &mut dh, &mut dw, &h, &w, &targets, &lse, &dloss, n, d, v, chunk,
            );
            let dw_delta: Vec<f32> = dw.iter().zip(&dw0).map(|(a, b)| a - b).collect();
            check_close(&format!("dh chunk {chunk}"), &dh, &nh, tol).unwrap();
            check_close(&format!("dweight chunk {chunk}"), &dw_delta, &nw, tol).unwrap();
        }
    }

    /// Enough labelled rows to cross the internal row block, bf16 storage against f32.
    #[test]
    fn many_rows_and_bf16() {
        let (n, d, v) = (600, 16, 70);
        let (h, w, targets) = problem(n, d, v, 6);
        let (loss_r, lse_r) = lm_head_ce_forward_ref(&h, &w, &targets, n, d, v);
        let mut losses = vec![f32::NAN; n];
        let mut lse = vec![f32::NAN; n];
        lm_head_ce_forward(&mut losses, &mut lse, &h, &w, &targets, n, d, v, 16);
        check_close("losses", &losses, &loss_r, Tolerance::new(1e-4, 1e-5)).unwrap();
        check_close("lse", &lse, &lse_r, Tolerance::new(1e-4, 1e-5)).unwrap();

        let (hb, wb): (Vec<bf16>, Vec<bf16>) = (convert(&h), convert(&w));
        let (hr, wr): (Vec<f32>, Vec<f32>) = (convert(&hb), convert(&wb));
        let (loss_rb, _) = lm_head_ce_forward_ref(&hr, &wr, &targets, n, d, v);
        let mut lb = vec![f32::NAN; n];
        let mut lseb = vec![f32::NAN; n];
        lm_head_ce_forward(&mut lb, &mut lseb, &hb, &wb, &targets, n, d, v, 16);
        check_close("bf16 losses", &lb, &loss_rb, Tolerance::new(1e-4, 1e-5)).unwrap();

        // bf16 backward against f32 backward on the same (rounded) values.
        let dloss = vec![0.01f32; n];
        let mut dh = vec![0.0f32; n * d];
        let mut dw = vec![0.0f32; v * d];
        let mut lse_f = vec![0.0; n];
        lm_head_ce_forward(
            &mut vec![0.0; n],
            &mut lse_f,
            &hr,
            &wr,
            &targets,
            n,
            d,
            v,
            16,
        );
        lm_head_ce_backward(
            &mut dh, &mut dw, &hr, &wr, &targets, &lse_f, &dloss, n, d, v, 16,
        );
        let mut dhb = vec![bf16::ZERO; n * d];
        let mut dwb = vec![bf16::ZERO; v * d];
        lm_head_ce_backward(
            &mut dhb, &mut dwb, &hb, &wb, &targets, &lseb, &dloss, n, d, v, 16,
        );
        let bt = Tolerance::new(1e-4, 1e-2);
        check_close("bf16 dh", &convert(&dhb), &dh, bt).unwrap();
        check_close("bf16 dweight", &convert(&dwb), &dw, bt).unwrap();
    }
}
