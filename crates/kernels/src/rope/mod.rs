//! Rotary position embedding (Su et al. 2021, RoFormer) in the HF Qwen2 "rotate_half" layout.
//!
//! x [N, H, D] with positions [N]; element i of a head pairs with i + D/2 and turns by
//! `pos · inv_freq[i]`, `inv_freq[j] = 1 / theta^(2j/D)`:
//! `x1' = x1·cos − x2·sin`, `x2' = x2·cos + x1·sin`. The rotation is orthogonal, so the backward
//! pass is the same rotation by −angle. Applied in place.
//!
//! [`rope_forward_angles`] takes the angles per token instead of one position per token
//! (cos, sin [N, D/2]): multimodal RoPE (Qwen2-VL's M-RoPE, frequency bands driven by the
//! temporal, height and width positions) and the 2-D vision RoPE build their own, usually from
//! [`RopeTable::row`]s of the axes' positions.

mod cpu;

use reel_tensor::Float;

/// cos and sin of every (position, frequency) pair: [max_positions, head_dim/2] each, f32.
#[derive(Clone, Debug)]
pub struct RopeTable {
    head_dim: usize,
    max_positions: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// `inv_freq[j] = 1 / theta^(2j/D)` in f32 as transformers computes it
    /// (`1.0 / (theta ** (arange(0, D, 2).float() / D))`), angle `= (pos as f32) · inv_freq[j]`
    /// in f32, then cos and sin of that f32 angle.
    pub fn new(head_dim: usize, max_positions: usize, theta: f32) -> Self {
        assert!(
            head_dim > 0 && head_dim & 1 == 0,
            "RopeTable: head_dim {head_dim} must be even and positive"
        );
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|j| 1.0 / theta.powf((2 * j) as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for pos in 0..max_positions {
            for &f in &inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        RopeTable {
            head_dim,
            max_positions,
            cos,
            sin,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// cos and sin of position `pos` for every frequency (head_dim/2 each).
    pub fn row(&self, pos: usize) -> (&[f32], &[f32]) {
        assert!(
            pos < self.max_positions,
            "RopeTable::row: position {pos} is outside the table of {} positions",
            self.max_positions
        );
        let half = self.head_dim / 2;
        (
            &self.cos[pos * half..][..half],
            &self.sin[pos * half..][..half],
        )
    }
}

/// Rotates `x` [n_tokens, n_heads, head_dim] in place; `positions` [n_tokens] are global
/// positions (sequence parallelism passes non-contiguous ones).
/// `x1' = x1·cos − x2·sin`, `x2' = x2·cos + x1·sin`.
pub fn rope_forward<T: Float>(x: &mut [T], positions: &[u32], table: &RopeTable, n_heads: usize) {
    check("rope_forward", x.len(), positions, table, n_heads);
    if x.is_empty() {
        return;
    }
    cpu::rotate(x, positions, table, n_heads, 1.0);
}

/// The transpose rotation (by −angle), in place on the gradient.
pub fn rope_backward<T: Float>(dx: &mut [T], positions: &[u32], table: &RopeTable, n_heads: usize) {
    check("rope_backward", dx.len(), positions, table, n_heads);
    if dx.is_empty() {
        return;
    }
    cpu::rotate(dx, positions, table, n_heads, -1.0);
}

/// Rotates `x` [n_tokens, n_heads, head_dim] in place by per-token angles: `cos`, `sin`
/// [n_tokens, head_dim/2]. Same rotation as [`rope_forward`], whose angles come from a table.
pub fn rope_forward_angles<T: Float>(
    x: &mut [T],
    cos: &[f32],
    sin: &[f32],
    n_heads: usize,
    head_dim: usize,
) {
    check_angles("rope_forward_angles", x.len(), cos, sin, n_heads, head_dim);
    angles(x, cos, sin, n_heads, head_dim, 1.0);
}

/// The transpose of [`rope_forward_angles`] (rotation by −angle), in place on the gradient.
pub fn rope_backward_angles<T: Float>(
    dx: &mut [T],
    cos: &[f32],
    sin: &[f32],
    n_heads: usize,
    head_dim: usize,
) {
    check_angles(
        "rope_backward_angles",
        dx.len(),
        cos,
        sin,
        n_heads,
        head_dim,
    );
    angles(dx, cos, sin, n_heads, head_dim, -1.0);
}

fn angles<T: Float>(x: &mut [T], cos: &[f32], sin: &[f32], n_heads: usize, d: usize, sign: f32) {
    if x.is_empty() {
        return;
    }
    let half = d / 2;
    cpu::rotate_rows(x, d, n_heads, sign, |t| {
        (&cos[t * half..][..half], &sin[t * half..][..half])
    });
}

fn check_angles(op: &str, len: usize, cos: &[f32], sin: &[f32], n_heads: usize, d: usize) {
    assert!(
        d > 0 && d.is_multiple_of(2),
        "{op}: head_dim {d} must be even and positive"
    );
    let n = cos.len() / (d / 2);
    assert!(
        cos.len() == n * (d / 2) && sin.len() == cos.len(),
        "{op}: cos has {} and sin {} elements; both must be n_tokens·head_dim/2 (head_dim {d})",
        cos.len(),
        sin.len()
    );
    assert_eq!(
        len,
        n * n_heads * d,
        "{op}: x has {len} elements, expected n_tokens·n_heads·head_dim = {n}·{n_heads}·{d}"
    );
}

fn check(op: &str, len: usize, positions: &[u32], table: &RopeTable, n_heads: usize) {
    let (n, d) = (positions.len(), table.head_dim);
    assert_eq!(
        len,
        n * n_heads * d,
        "{op}: x has {len} elements, expected n_tokens·n_heads·head_dim = {n}·{n_heads}·{d}"
    );
    if let Some(&p) = positions
        .iter()
        .find(|&&p| p as usize >= table.max_positions)
    {
        panic!(
            "{op}: position {p} is outside the rope table of {} positions",
            table.max_positions
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reel_tensor::gradcheck::{numeric_grad, probe_loss};
    use reel_tensor::{bf16, check_close, rng, uniform_vec, Tolerance};

    /// HF `apply_rotary_pos_emb` on one head: `q·cos + rotate_half(q)·sin` with
    /// `cos = cat(cos, cos)`, in f64 from the f32 angles.
    fn reference(x: &[f32], positions: &[u32], n_heads: usize, d: usize, theta: f32) -> Vec<f32> {
        let half = d / 2;
        let mut out = x.to_vec();
        for (t, &pos) in positions.iter().enumerate() {
            for h in 0..n_heads {
                let q = &x[(t * n_heads + h) * d..][..d];
                for i in 0..d {
                    let j = i % half;
                    let inv_freq = 1.0 / theta.powf((2 * j) as f32 / d as f32);
                    let angle = (pos as f32 * inv_freq) as f64;
                    let rot = if i < half { -q[i + half] } else { q[i - half] };
                    out[(t * n_heads + h) * d + i] =
                        (q[i] as f64 * angle.cos() + rot as f64 * angle.sin()) as f32;
                }
            }
        }
        out
    }

    #[test]
    fn forward_matches_hf_reference() {
        let mut r = rng(30);
        for &(n_heads, d, theta) in &[
            (3, 6, 10000.0f32),
            (1, 2, 10000.0),
            (2, 64, 1_000_000.0),
            (4, 8, 500.0),
        ] {
            let positions = [0u32, 5, 1, 77, 200, 3];
            let table = RopeTable::new(d, 256, theta);
            let x = uniform_vec(&mut r, positions.len() * n_heads * d, 1.0);
            let mut y = x.clone();
            rope_forward(&mut y, &positions, &table, n_heads);
            let expected = reference(&x, &positions, n_heads, d, theta);
            check_close(
                &format!("rope H={n_heads} D={d} theta={theta}"),
                &y,
                &expected,
                Tolerance::new(1e-5, 1e-5),
            )
            .unwrap();
        }
    }

    #[test]
    fn hand_computed_value() {
        // D = 4, theta = 1e4: inv_freq = [1, 0.01]; position 3 turns by angles [3, 0.03].
        let table = RopeTable::new(4, 8, 10000.0);
        assert_eq!((table.head_dim(), table.max_positions()), (4, 8));
        let mut x = [1.0f32, 2.0, 3.0, 4.0];
        rope_forward(&mut x, &[3], &table, 1);
        let expected = [-1.4133525, 1.8791181, -2.8288575, 4.0581911];
        check_close("rope pos 3", &x, &expected, Tolerance::new(2e-6, 1e-6)).unwrap();
        // Position 0 is the identity.
        let mut x = [1.0f32, 2.0, 3.0, 4.0];
        rope_forward(&mut x, &[0], &table, 1);
        assert_eq!(x, [1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn backward_inverts_forward() {
        let (n_heads, d) = (3, 6);
        let positions = [9u32, 2, 40, 41, 0];
        let table = RopeTable::new(d, 64, 10000.0);
        let x = uniform_vec(&mut rng(31), positions.len() * n_heads * d, 1.0);
        let mut y = x.clone();
        rope_forward(&mut y, &positions, &table, n_heads);
        assert!(
            y.iter().zip(&x).any(|(a, b)| (a - b).abs() > 1e-2),
            "rope moved nothing"
        );
        rope_backward(&mut y, &positions, &table, n_heads);
        check_close("rope round trip", &y, &x, Tolerance::new(1e-6, 1e-5)).unwrap();
    }

    #[test]
    fn backward_matches_numeric_grad() {
        let mut r = rng(32);
        for &(n_heads, d) in &[(3, 6), (2, 4), (1, 10)] {
            let positions = [7u32, 0, 13];
            let table = RopeTable::new(d, 16, 10000.0);
            let x = uniform_vec(&mut r, positions.len() * n_heads * d, 1.0);
            let probe = uniform_vec(&mut r, x.len(), 1.0);
            let mut dx = probe.clone();
            rope_backward(&mut dx, &positions, &table, n_heads);
            let g = numeric_grad(&x, 1e-2, |x| {
                probe_loss(&reference(x, &positions, n_heads, d, 10000.0), &probe)
            });
            check_close(
                &format!("dx H={n_heads} D={d}"),
                &dx,
                &g,
                Tolerance::new(2e-3, 2e-2),
            )
            .unwrap();
        }
    }

    #[test]
    fn bf16_matches_f32() {
        let (n_heads, d) = (3, 6);
        let positions = [1u32, 100, 5, 63];
        let table = RopeTable::new(d, 128, 10000.0);
        let x: Vec<bf16> = uniform_vec(&mut rng(33), positions.len() * n_heads * d, 2.0)
            .iter()
            .map(|&v| bf16::from_f32(v))
            .collect();
        let mut x32: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        let mut xh = x.clone();
        rope_forward(&mut xh, &positions, &table, n_heads);
        rope_forward(&mut x32, &positions, &table, n_heads);
        let widen = |v: &[bf16]| v.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
        check_close(
            "bf16 forward",
            &widen(&xh),
            &x32,
            Tolerance::new(1e-2, 1e-2),
        )
        .unwrap();
        rope_backward(&mut xh, &positions, &table, n_heads);
        rope_backward(&mut x32, &positions, &table, n_heads);
        check_close(
            "bf16 backward",
            &widen(&xh),
            &x32,
            Tolerance::new(2e-2, 2e-2),
        )
        .unwrap();
    }

    /// Angles gathered from table rows equal the table path; mixed rows (different positions
    /// for different frequency bands) match the HF formula band by band; backward inverts.
    #[test]
    fn angles_match_table_and_per_band_reference() {
        let mut r = rng(34);
        for &(n_heads, d) in &[(3, 6), (1, 2), (2, 16)] {
            let half = d / 2;
            let table = RopeTable::new(d, 64, 10000.0);
            let positions = [0u32, 9, 63, 4, 17];
            let x = uniform_vec(&mut r, positions.len() * n_heads * d, 1.0);
            let (mut cos, mut sin) = (Vec::new(), Vec::new());
            for &p in &positions {
                let (c, s) = table.row(p as usize);
                cos.extend_from_slice(c);
                sin.extend_from_slice(s);
            }
            let (mut a, mut b) = (x.clone(), x.clone());
            rope_forward_angles(&mut a, &cos, &sin, n_heads, d);
            rope_forward(&mut b, &positions, &table, n_heads);
            assert_eq!(a, b, "H={n_heads} D={d}");
            // Band j < half/2 follows position p, the rest position q (an M-RoPE-like split).
            let (p, q) = ([3u32, 40], [11u32, 0]);
            let (mut cos, mut sin) = (Vec::new(), Vec::new());
            for t in 0..2 {
                for j in 0..half {
                    let pos = if j < half / 2 { p[t] } else { q[t] };
                    let (c, s) = table.row(pos as usize);
                    cos.push(c[j]);
                    sin.push(s[j]);
                }
            }
            let x2 = uniform_vec(&mut r, 2 * n_heads * d, 1.0);
            let mut y = x2.clone();
            rope_forward_angles(&mut y, &cos, &sin, n_heads, d);
            let rp = reference(&x2, &p, n_heads, d, 10000.0);
            let rq = reference(&x2, &q, n_heads, d, 10000.0);
            let expected: Vec<f32> = (0..x2.len())
                .map(|i| {
                    let j = (i % d) % half;
                    if j < half / 2 {
                        rp[i]
                    } else {
                        rq[i]
                    }
                })
                .collect();
            check_close("per-band", &y, &expected, Tolerance::new(1e-5, 1e-5)).unwrap();
            rope_backward_angles(&mut y, &cos, &sin, n_heads, d);
            check_close("angles round trip", &y, &x2, Tolerance::new(1e-6, 1e-5)).unwrap();
        }
    }

    #[test]
    #[should_panic(expected = "position 16 is outside the rope table of 16 positions")]
    fn position_past_table_panics() {
        let table = RopeTable::new(4, 16, 10000.0);
        let mut x = [0.5f32; 8];
        rope_forward(&mut x, &[3, 16], &table, 1);
    }
}
