//! AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization"), exactly as
//! torch.optim.AdamW computes it (single-tensor path), with fp32 moments per parameter.
//!
//! For parameter `p`, gradient `g`, step `t` (1-based, counted by the optimizer):
//!
//! ```text
//! p      *= 1 - lr·wd                            (only where decay[i])
//! m       = m + (1-β1)·(g - m)                   (= β1·m + (1-β1)·g; torch's lerp_)
//! v       = β2·v + (1-β2)·g²
//! step    = lr / (1 - β1^t)
//! denom   = sqrt(v) / sqrt(1 - β2^t) + eps
//! p      -= step · m / denom
//! ```
//!
//! Bias corrections are computed in f64 like Python does, then applied in f32 like the tensors.
//! Tensors of at least [`PAR_CHUNK`] elements are updated in parallel chunks with rayon.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::PAR_CHUNK;

/// Hyper-parameters of [`AdamW`]. Defaults: lr 1e-3, β1 0.9, β2 0.95, eps 1e-8, weight decay 0.01.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    /// Base learning rate (a schedule scales it; [`AdamW::step`] takes the current value). 1e-3.
    pub lr: f32,
    /// Decay of the first moment. 0.9.
    pub beta1: f32,
    /// Decay of the second moment. 0.95.
    pub beta2: f32,
    /// Added to the bias-corrected `sqrt(v)`. 1e-8.
    pub eps: f32,
    /// Decoupled weight decay, applied to parameters whose decay flag is set. 0.01.
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// Errors from importing optimizer state.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OptimError {
    /// The state holds a different number of `which` ("m" or "v") vectors than there are parameters.
    #[error(
        "optimizer state has {got} `{which}` vectors, the optimizer has {expected} parameters"
    )]
    ParamCount {
        which: &'static str,
        expected: usize,
        got: usize,
    },
    /// One moment vector has the wrong length.
    #[error("optimizer state `{which}` of parameter {index} has {got} elements, the parameter has {expected}")]
    StateLength {
        which: &'static str,
        index: usize,
        expected: usize,
        got: usize,
    },
}

/// The exportable state of [`AdamW`]: the step counter and both moments, one vector a parameter.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AdamWState {
    /// Optimizer steps taken so far (the `t` of the next step is `step + 1`).
    pub step: u64,
    /// First moments, `m[i].len()` = size of parameter `i`.
    pub m: Vec<Vec<f32>>,
    /// Second moments, same layout as `m`.
    pub v: Vec<Vec<f32>>,
}

/// [`AdamWState`] borrowed: what an upload of the state reads without a copy of it.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStateRef<'a> {
    pub step: u64,
    pub m: &'a [Vec<f32>],
    pub v: &'a [Vec<f32>],
}

impl AdamWState {
    /// This state, borrowed.
    pub fn as_ref(&self) -> AdamWStateRef<'_> {
        AdamWStateRef {
            step: self.step,
            m: &self.m,
            v: &self.v,
        }
    }
}

/// AdamW over parameters addressed by index; see the module docs for the update.
#[derive(Debug, Clone)]
pub struct AdamW {
    cfg: AdamWConfig,
    decay: Vec<bool>,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    step: u64,
}

/// The scalars of one AdamW step, in the f32 the element-wise update uses (from
/// [`AdamWConfig::scalars`]). A GPU kernel given these and the module docs' order of operations
/// reproduces [`AdamW::step`] to the bit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWScalars {
    /// `1 - lr·wd`: parameters with decay are multiplied by it first.
    pub decay_factor: f32,
    /// `1 - β1`, the lerp weight of the first moment.
    pub one_minus_beta1: f32,
    /// β2.
    pub beta2: f32,
    /// `1 - β2`.
    pub one_minus_beta2: f32,
    /// `sqrt(1 - β2^t)`.
    pub bias_correction2_sqrt: f32,
    /// `-lr / (1 - β1^t)`.
    pub neg_step_size: f32,
    /// eps.
    pub eps: f32,
}

impl AdamWConfig {
    /// The scalars of step `t` (1-based) at learning rate `lr`: bias corrections in f64 from the
    /// β's as typed (0.9, not 0.8999999761…), like Python, then rounded to f32 once.
    pub fn scalars(&self, t: u64, lr: f32) -> AdamWScalars {
        let beta1 = f32_as_typed_f64(self.beta1);
        let beta2 = f32_as_typed_f64(self.beta2);
        let weight_decay = f32_as_typed_f64(self.weight_decay);
        let t = t as f64;
        let lr64 = lr as f64;
        let bias_correction1 = 1.0 - beta1.powf(t);
        let bias_correction2 = 1.0 - beta2.powf(t);
        AdamWScalars {
            decay_factor: (1.0 - lr64 * weight_decay) as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: self.beta2,
            one_minus_beta2: (1.0 - beta2) as f32,
            bias_correction2_sqrt: bias_correction2.sqrt() as f32,
            neg_step_size: -(lr64 / bias_correction1) as f32,
            eps: self.eps,
        }
    }
}

/// The f64 whose shortest decimal is that of `x` (0.9f32 → 0.9, not 0.89999997615814).
fn f32_as_typed_f64(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(x as f64)
}

impl AdamW {
    /// An optimizer for parameters of `sizes[i]` elements; `decay[i]` says whether parameter `i`
    /// gets weight decay (convention: 2-D weights yes, biases and norm weights no).
    ///
    /// # Panics
    /// If `sizes` and `decay` differ in length.
    pub fn new(sizes: &[usize], decay: &[bool], cfg: AdamWConfig) -> Self {
        assert_eq!(
            sizes.len(),
            decay.len(),
            "AdamW::new: {} parameter sizes but {} decay flags",
            sizes.len(),
            decay.len()
        );
        Self {
            cfg,
            decay: decay.to_vec(),
            m: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            step: 0,
        }
    }

    /// The hyper-parameters this optimizer was built with.
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        self.m.len()
    }

    /// Optimizer steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// One AdamW step at learning rate `lr` (the scheduled value, not the base rate).
    ///
    /// # Panics
    /// If the number of parameters or gradients, or any of their lengths, differs from the sizes
    /// given to [`AdamW::new`] (a programming error; the message names the parameter index).
    pub fn step(&mut self, params: &mut [&mut [f32]], grads: &[&[f32]], lr: f32) {
        let n = self.m.len();
        assert_eq!(
            params.len(),
            n,
            "AdamW::step: {} params, optimizer has {n}",
            params.len()
        );
        assert_eq!(
            grads.len(),
            n,
            "AdamW::step: {} grads, optimizer has {n}",
            grads.len()
        );
        self.step += 1;
        let k = self.cfg.scalars(self.step, lr);
        for (i, (p, g)) in params.iter_mut().zip(grads).enumerate() {
            let (m, v) = (&mut self.m[i], &mut self.v[i]);
            assert!(
                p.len() == m.len() && g.len() == m.len(),
                "AdamW::step: parameter {i} has {} elements and gradient {}, expected {}",
                p.len(),
                g.len(),
                m.len()
            );
            let decay = self.decay[i];
            if p.len() >= PAR_CHUNK {
                p.par_chunks_mut(PAR_CHUNK)
                    .zip(g.par_chunks(PAR_CHUNK))
                    .zip(m.par_chunks_mut(PAR_CHUNK))
                    .zip(v.par_chunks_mut(PAR_CHUNK))
                    .for_each(|(((p, g), m), v)| update_chunk(p, g, m, v, k, decay));
            } else {
                update_chunk(p, g, m, v, k, decay);
            }
        }
    }

    /// The step counter and moments, borrowed (no copy: an upload to a device reads them).
    pub fn state_ref(&self) -> AdamWStateRef<'_> {
        AdamWStateRef {
            step: self.step,
            m: &self.m,
            v: &self.v,
        }
    }

    /// A copy of the step counter and moments, for checkpoints.
    pub fn state(&self) -> AdamWState {
        AdamWState {
            step: self.step,
            m: self.m.clone(),
            v: self.v.clone(),
        }
    }

    /// Replaces the step counter and moments with `state` (from [`AdamW::state`] of an optimizer
    /// over the same parameters). Nothing changes when it fails.
    pub fn load_state(&mut self, state: AdamWState) -> Result<(), OptimError> {
        for (which, vecs) in [("m", &state.m), ("v", &state.v)] {
            if vecs.len() != self.m.len() {
                return Err(OptimError::ParamCount {
                    which,
                    expected: self.m.len(),
                    got: vecs.len(),
                });
            }
            for (index, (got, want)) in vecs.iter().zip(&self.m).enumerate() {
                if got.len() != want.len() {
                    return Err(OptimError::StateLength {
                        which,
                        index,
                        expected: want.len(),
                        got: got.len(),
                    });
                }
            }
        }
        self.step = state.step;
        self.m = state.m;
        self.v = state.v;
        Ok(())
    }
}

/// The element-wise update of one chunk, in torch's order of operations.
#[inline]
fn update_chunk(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    k: AdamWScalars,
    decay: bool,
) {
    if decay {
        let f = k.decay_factor;
        p.iter_mut().for_each(|p| *p *= f);
    }
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        // torch's lerp_ for weight < 0.5: start + weight·(end - start), fused on CPU.
        *m = k.one_minus_beta1.mul_add(g - *m, *m);
        *v = *v * k.beta2 + k.one_minus_beta2 * g * g;
        let denom = v.sqrt() / k.bias_correction2_sqrt + k.eps;
        *p += k.neg_step_size * (*m / denom);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The update of one scalar over `grads.len()` steps, in f64 straight from the formulas.
    fn reference_trace(
        cfg: &AdamWConfig,
        p0: f64,
        grads: &[f64],
        lrs: &[f64],
        decay: bool,
    ) -> Vec<f64> {
        let (b1, b2, eps) = (0.9f64, 0.95f64, 1e-8f64);
        assert_eq!(
            (cfg.beta1, cfg.beta2, cfg.eps),
            (b1 as f32, b2 as f32, eps as f32)
        );
        let wd = if decay { cfg.weight_decay as f64 } else { 0.0 };
        let (mut p, mut m, mut v) = (p0, 0.0, 0.0);
        let mut out = Vec::new();
        for (t, (&g, &lr)) in grads.iter().zip(lrs).enumerate() {
            let t = (t + 1) as i32;
            p *= 1.0 - lr * wd;
            m = b1 * m + (1.0 - b1) * g;
            v = b2 * v + (1.0 - b2) * g * g;
            let step_size = lr / (1.0 - b1.powi(t));
            let denom = v.sqrt() / (1.0 - b2.powi(t)).sqrt() + eps;
            p -= step_size * m / denom;
            out.push(p);
        }
        out
    }

    #[test]
    fn two_step_trace_matches_formulas() {
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let p0 = [0.5f32, -1.25, 2.0, 0.03];
        let g1 = [0.1f32, -0.7, 3.0, -1e-3];
        let g2 = [-0.2f32, 0.4, 2.5, 5e-3];
        let decay = [true, false, true, false];
        let lrs = [1e-2f32, 5e-3];
        let mut opt = AdamW::new(&[1; 4], &decay, cfg);
        let mut params: Vec<Vec<f32>> = p0.iter().map(|&x| vec![x]).collect();
        let mut after = vec![Vec::new(); 4];
        for (gs, &lr) in [g1, g2].iter().zip(&lrs) {
            let grads: Vec<Vec<f32>> = gs.iter().map(|&x| vec![x]).collect();
            let grad_refs: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
            let mut param_refs: Vec<&mut [f32]> =
                params.iter_mut().map(|p| p.as_mut_slice()).collect();
            opt.step(&mut param_refs, &grad_refs, lr);
            for (i, p) in params.iter().enumerate() {
                after[i].push(p[0]);
            }
        }
        assert_eq!(opt.step_count(), 2);
        for i in 0..4 {
            let want = reference_trace(
                &cfg,
                p0[i] as f64,
                &[g1[i] as f64, g2[i] as f64],
                &[lrs[0] as f64, lrs[1] as f64],
                decay[i],
            );
            for (step, (&got, &want)) in after[i].iter().zip(&want).enumerate() {
                let err = (got as f64 - want).abs();
                assert!(
                    err <= 1e-7 + 1e-6 * want.abs(),
                    "param {i} step {}: got {got}, want {want} (err {err})",
                    step + 1
                );
            }
        }
    }

    /// Made by `scripts/adamw_golden.py` (torch 2.11.0, CPU, float32, foreach=False): the
    /// parameters after each of 3 steps, as f32 bits.
    const TORCH_W: [[u32; 6]; 3] = [
        [
            0x3efa9fbf, 0xbf9e8f5c, 0x3ffe76c9, 0x3d23b77a, 0xbf330553, 0xbc1378ef,
        ],
        [
            0x3efb6dce, 0xbf9e580b, 0x3ffdb373, 0x3d178531, 0xbf33dbed, 0xbc0f164a,
        ],
        [
            0x3efaeed3, 0xbf9e53a6, 0x3ffd72cd, 0x3d129cae, 0xbf336a4e, 0xbc23349d,
        ],
    ];
    const TORCH_B: [[u32; 3]; 3] = [
        [0x3e75c28f, 0xbdeb851f, 0x407f5c53],
        [0x3e70a784, 0xbdef3daf, 0x407f60a2],
        [0x3e70e8af, 0xbdf2bd8c, 0x407f6252],
    ];

    #[test]
    fn matches_torch_golden() {
        let mut w = vec![0.5f32, -1.25, 2.0, 0.03, -0.7, 1e-3];
        let mut b = vec![0.25f32, -0.125, 4.0];
        let grads_w = [
            [0.1f32, -0.7, 3.0, -1e-3, 0.0, 0.25],
            [-0.2, 0.4, 2.5, 5e-3, 1e-6, -0.25],
            [0.3, 0.3, -1.0, 1e-4, -2.0, 0.5],
        ];
        let grads_b = [[0.5f32, -0.05, 1e-5], [0.45, 0.1, -1e-5], [-1.0, 0.2, 0.0]];
        let lrs = [1e-2f32, 5e-3, 2.5e-3];
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut opt = AdamW::new(&[6, 3], &[true, false], cfg);
        for t in 0..3 {
            opt.step(&mut [&mut w, &mut b], &[&grads_w[t], &grads_b[t]], lrs[t]);
            for (name, got, want) in [
                ("w", &w[..], &TORCH_W[t][..]),
                ("b", &b[..], &TORCH_B[t][..]),
            ] {
                for (i, (&g, &bits)) in got.iter().zip(want).enumerate() {
                    let want = f32::from_bits(bits);
                    // Bit-exact: same operation order, lerp fused like torch's CPU kernel
                    // (`mul_add` is a fused multiply-add on every target).
                    let ulps = (g.to_bits() as i64 - bits as i64).abs();
                    assert!(
                        ulps == 0,
                        "step {} {name}[{i}]: got {g:e}, torch {want:e} ({ulps} ulp)",
                        t + 1
                    );
                }
            }
        }
    }

    #[test]
    fn decay_mask_is_respected() {
        // Zero gradients: the moments stay zero, so only weight decay can move a parameter.
        let cfg = AdamWConfig {
            weight_decay: 0.5,
            ..Default::default()
        };
        let mut opt = AdamW::new(&[3, 2], &[true, false], cfg);
        let mut w = vec![1.0f32, -2.0, 4.0];
        let mut b = vec![1.0f32, -2.0];
        let (gw, gb) = (vec![0.0f32; 3], vec![0.0f32; 2]);
        opt.step(&mut [&mut w, &mut b], &[&gw, &gb], 0.1);
        assert_eq!(w, vec![0.95, -1.9, 3.8]);
        assert_eq!(b, vec![1.0, -2.0]);
    }

    #[test]
    fn parallel_chunks_match_serial_update() {
        // A tensor big enough for the rayon path against the same values one element at a time.
        let n = PAR_CHUNK * 2 + 17;
        let p0: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01)
            .collect();
        let g: Vec<f32> = (0..n)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) * 0.02)
            .collect();
        let cfg = AdamWConfig::default();
        let mut big = AdamW::new(&[n], &[true], cfg);
        let mut p = p0.clone();
        for lr in [1e-2, 2e-2] {
            big.step(&mut [&mut p], &[&g], lr);
        }
        let mut small = AdamW::new(&[1], &[true], cfg);
        for i in [0, 1, PAR_CHUNK - 1, PAR_CHUNK, n - 1] {
            small
                .load_state(AdamWState {
                    step: 0,
                    m: vec![vec![0.0]],
                    v: vec![vec![0.0]],
                })
                .unwrap();
            let mut q = [p0[i]];
            for lr in [1e-2, 2e-2] {
                small.step(&mut [&mut q], &[&g[i..i + 1]], lr);
            }
            assert_eq!(q[0].to_bits(), p[i].to_bits(), "element {i}");
        }
    }

    #[test]
    fn state_round_trip_continues_identically() {
        let cfg = AdamWConfig::default();
        let sizes = [4, 2];
        let decay = [true, false];
        let mut a = AdamW::new(&sizes, &decay, cfg);
        let mut w = vec![0.1f32, 0.2, -0.3, 0.4];
        let mut b = vec![0.5f32, -0.6];
        let gw = [0.3f32, -0.1, 0.2, 0.05];
        let gb = [-0.4f32, 0.25];
        a.step(&mut [&mut w, &mut b], &[&gw, &gb], 1e-2);

        let state = a.state();
        assert_eq!(state.step, 1);
        // The borrowed view holds the same step and moments as the copy.
        let (view, copy) = (a.state_ref(), state.as_ref());
        assert_eq!((view.step, view.m, view.v), (copy.step, copy.m, copy.v));
        assert!(view.m.iter().flatten().any(|&x| x != 0.0));
        let mut c = AdamW::new(&sizes, &decay, cfg);
        c.load_state(state.clone()).unwrap();
        assert_eq!(c.state(), state);

        let (mut w2, mut b2) = (w.clone(), b.clone());
        a.step(&mut [&mut w, &mut b], &[&gw, &gb], 1e-2);
        c.step(&mut [&mut w2, &mut b2], &[&gw, &gb], 1e-2);
        assert_eq!((w, b), (w2, b2));
        assert_eq!(a.state(), c.state());
    }

    #[test]
    fn load_state_rejects_wrong_lengths() {
        let mut opt = AdamW::new(&[4, 2], &[true, false], AdamWConfig::default());
        let good = opt.state();

        let mut short = good.clone();
        short.v[1] = vec![0.0; 3];
        assert_eq!(
            opt.load_state(short),
            Err(OptimError::StateLength {
                which: "v",
                index: 1,
                expected: 2,
                got: 3
            })
        );
        let msg = OptimError::StateLength {
            which: "v",
            index: 1,
            expected: 2,
            got: 3,
        }
        .to_string();
        assert!(
            msg.contains("parameter 1") && msg.contains('3') && msg.contains('2'),
            "{msg}"
        );

        let mut fewer = good.clone();
        fewer.m.pop();
        assert_eq!(
            opt.load_state(fewer),
            Err(OptimError::ParamCount {
                which: "m",
                expected: 2,
                got: 1
            })
        );
        assert_eq!(opt.state(), good, "a failed load changes nothing");
    }

    #[test]
    fn config_defaults_and_serde() {
        let cfg: AdamWConfig = toml::from_str("lr = 3e-4").unwrap();
        assert_eq!(
            cfg,
            AdamWConfig {
                lr: 3e-4,
                ..Default::default()
            }
        );
        assert!(toml::from_str::<AdamWConfig>("betas = 1").is_err());
    }
}
