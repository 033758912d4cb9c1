//! Attention on the GPU, with `reel_kernels::attention`'s layouts and conventions: q, out
//! [B, Tq, H, D], k, v [B, Tk, H_kv, D] (query head hh reads KV head hh / (H / H_kv)), lse
//! [B, Tq, H] f32, `lse_i = ln Σ_j e^{s·q_i·k_j}` over the keys row i sees, s = 1/√D.
//!
//! - [`Gpu::attention_forward`] / [`Gpu::attention_backward`] (feature `cudnn`): cuDNN's fused
//!   flash attention (FlashAttention-2 style; Dao 2023) through cudnn-frontend, bf16 storage and
//!   f32 compute, full or causal masks. The backward OVERWRITES dq, dk, dv (the CPU reference
//!   accumulates, so that block pairs of a schedule add up).
//! - [`Gpu::attention_merge`]: the f32 merge of a partial (o_b, lse_b) into a running (o, lse), as
//!   `reel_kernels::attention::attention_merge` (DESIGN.md "Attention math").

use crate::buffer::{DevRead, DevWrite};
use crate::ops::{cfg, check, launch};
use crate::{Gpu, Result};

impl Gpu {
    /// `attention_merge(o, lse, o_b, lse_b, rows, d)` as `reel_kernels::attention::attention_merge`:
    /// o, o_b [rows, d], lse, lse_b [rows], all f32; `lse' = lse − logsigmoid(lse − lse_b)`,
    /// `o' = o − sigmoid(lse_b − lse)·(o − o_b)`; a row with lse_b = −∞ is left as is, a row with
    /// lse = −∞ takes (o_b, lse_b).
    pub fn attention_merge(
        &self,
        o: &mut impl DevWrite<f32>,
        lse: &mut impl DevWrite<f32>,
        o_b: &impl DevRead<f32>,
        lse_b: &impl DevRead<f32>,
        rows: usize,
        d: usize,
    ) -> Result<()> {
        let op = "attention_merge";
        check(op, "o", o.dlen(), rows * d)?;
        check(op, "o_b", o_b.dlen(), rows * d)?;
        check(op, "lse", lse.dlen(), rows)?;
        check(op, "lse_b", lse_b.dlen(), rows)?;
        if rows == 0 {
            return Ok(());
        }
        let d32 = crate::ops::as_i32(op, "d", d)?;
        self.bind()?;
        // One warp a row, 8 rows a block.
        let blocks = rows.div_ceil(8).min(132 * 64) as u32;
        let (op_, lp, obp, lbp, rows64) =
            (o.dptr(), lse.dptr(), o_b.dptr(), lse_b.dptr(), rows as i64);
        launch!(
            self,
            &self.kernels.attention_merge,
            cfg((blocks, 1, 1), (256, 1, 1)),
            &op_,
            &lp,
            &obp,
            &lbp,
            &rows64,
            &d32
        )
    }
}

#[cfg(feature = "cudnn")]
mod fused {
    use half::bf16;
    use reel_kernels::attention::{AttnMask, AttnShape};

    use super::*;
    use crate::cudnn::{Cudnn, PlanKey};
    use crate::ops::elementwise_grid;
    use crate::{shape_err, GpuError};

    /// Checks lengths, heads, head dimension, alignment and mask; the plan key.
    #[allow(clippy::too_many_arguments)]
    fn plan_key(
        op: &str,
        shape: AttnShape,
        mask: AttnMask,
        backward: bool,
        q_like: &[(&str, usize, u64)],
        kv_like: &[(&str, usize, u64)],
        lse: (&str, usize),
    ) -> Result<PlanKey> {
        let AttnShape {
            b,
            tq,
            tk,
            h,
            h_kv,
            d,
        } = shape;
        if h_kv == 0 || h % h_kv != 0 {
            return shape_err(format!(
                "{op}: H = {h} must be a positive multiple of H_kv = {h_kv}"
            ));
        }
        if d == 0 || d % 8 != 0 || d > 256 {
            return shape_err(format!(
                "{op}: head dimension D = {d} must be a multiple of 8 of at most 256 for cuDNN"
            ));
        }
        let causal = match mask {
            AttnMask::Full => false,
            AttnMask::Causal { q_offset, k_offset } if q_offset == k_offset => true,
            AttnMask::Causal { q_offset, k_offset } => {
                return shape_err(format!(
                    "{op}: causal masks with q_offset {q_offset} != k_offset {k_offset} are not supported on the GPU yet"
                ))
            }
        };
        for &(name, len, ptr) in q_like {
            check(op, name, len, b * tq * h * d)?;
            if ptr % 16 != 0 {
                return shape_err(format!("{op}: {name} must be 16-byte aligned for cuDNN"));
            }
        }
        for &(name, len, ptr) in kv_like {
            check(op, name, len, b * tk * h_kv * d)?;
            if ptr % 16 != 0 {
                return shape_err(format!("{op}: {name} must be 16-byte aligned for cuDNN"));
            }
        }
        check(op, lse.0, lse.1, b * tq * h)?;
        if backward && tq == 1 && tk == 1 {
            return shape_err(format!(
                "{op}: cuDNN has no backward for Tq = Tk = 1 (run it on the CPU)"
            ));
        }
        Ok(PlanKey {
            b,
            tq,
            tk,
            h,
            h_kv,
            d,
            causal,
            backward,
        })
    }

    impl Gpu {
        /// The cuDNN state, made on first use (cuDNN missing or too old: a clear error, and the
        /// rest of the GPU path still works).
        fn with_cudnn<R>(&self, f: impl FnOnce(&mut Cudnn) -> Result<R>) -> Result<R> {
            let mut guard = self
                .cudnn
                .lock()
                .map_err(|_| GpuError::Cudnn("cuDNN state poisoned".into()))?;
            if guard.is_none() {
                *guard = Some(crate::catch("opening cuDNN", || Cudnn::open(&self.stream))?);
            }
            f(guard.as_mut().expect("just made"))
        }

        /// cuDNN's version (91900 for 9.19.0), opening it if needed.
        pub fn cudnn_version(&self) -> Result<i64> {
            self.bind()?;
            self.with_cudnn(|c| Ok(c.version()))
        }

        /// Attention forward as `reel_kernels::attention::attention_forward` through cuDNN: out
        /// [B, Tq, H, D] and lse [B, Tq, H] (f32, natural log) from q [B, Tq, H, D] and k, v
        /// [B, Tk, H_kv, D], bf16, f32 compute; `mask` Full, or Causal with q_offset = k_offset.
        /// Overwrites out and lse. The plan for each shape and mask is built on first use.
        #[allow(clippy::too_many_arguments)]
        pub fn attention_forward(
            &self,
            out: &mut impl DevWrite<bf16>,
            lse: &mut impl DevWrite<f32>,
            q: &impl DevRead<bf16>,
            k: &impl DevRead<bf16>,
            v: &impl DevRead<bf16>,
            shape: AttnShape,
            mask: AttnMask,
        ) -> Result<()> {
            self.timed("attention", "attention_forward", || {
                let key = plan_key(
                    "attention_forward",
                    shape,
                    mask,
                    false,
                    &[("q", q.dlen(), q.dptr()), ("out", out.dlen(), out.dptr())],
                    &[("k", k.dlen(), k.dptr()), ("v", v.dlen(), v.dptr())],
                    ("lse", lse.dlen()),
                )?;
                if shape.b * shape.tq * shape.h == 0 {
                    return Ok(());
                }
                if shape.tk == 0 {
                    return shape_err("attention_forward: no keys (Tk = 0)".into());
                }
                self.bind()?;
                let (qp, kp, vp, op, lp) = (q.dptr(), k.dptr(), v.dptr(), out.dptr(), lse.dptr());
                self.with_cudnn(|c| c.forward(key, qp, kp, vp, op, lp))
            })
        }

        /// Attention backward through cuDNN: dq [B, Tq, H, D], dk, dv [B, Tk, H_kv, D]
        /// OVERWRITTEN from dout, q, k, v, the forward's out and lse, as
        /// `reel_kernels::attention::attention_backward` computes them (which accumulates).
        #[allow(clippy::too_many_arguments)]
        pub fn attention_backward(
            &self,
            dq: &mut impl DevWrite<bf16>,
            dk: &mut impl DevWrite<bf16>,
            dv: &mut impl DevWrite<bf16>,
            dout: &impl DevRead<bf16>,
            q: &impl DevRead<bf16>,
            k: &impl DevRead<bf16>,
            v: &impl DevRead<bf16>,
            out: &impl DevRead<bf16>,
            lse: &impl DevRead<f32>,
            shape: AttnShape,
            mask: AttnMask,
        ) -> Result<()> {
            self.timed("attention", "attention_backward", || {
                let key = plan_key(
                    "attention_backward",
                    shape,
                    mask,
                    true,
                    &[
                        ("dq", dq.dlen(), dq.dptr()),
                        ("dout", dout.dlen(), dout.dptr()),
                        ("q", q.dlen(), q.dptr()),
                        ("out", out.dlen(), out.dptr()),
                    ],
                    &[
                        ("dk", dk.dlen(), dk.dptr()),
                        ("dv", dv.dlen(), dv.dptr()),
                        ("k", k.dlen(), k.dptr()),
                        ("v", v.dlen(), v.dptr()),
                    ],
                    ("lse", lse.dlen()),
                )?;
                let AttnShape { b, tq, tk, h, .. } = shape;
                if b * tq * h == 0 || tk == 0 {
                    self.zero(dq)?;
                    self.zero(dk)?;
                    return self.zero(dv);
                }
                let t32 = crate::ops::as_i32("attention_backward", "Tq", tq)?;
                let h32 = crate::ops::as_i32("attention_backward", "H", h)?;
                self.bind()?;
                let ptrs = (
                    q.dptr(),
                    k.dptr(),
                    v.dptr(),
                    out.dptr(),
                    dout.dptr(),
                    dq.dptr(),
                    dk.dptr(),
                    dv.dptr(),
                );
                let src = lse.dptr();
                // The [B, H, T] copy of lse cuDNN's backward reads, from the scratch pool.
                let bht_buf = self.scratch::<f32>(b * tq * h)?;
                let bht = bht_buf.dptr();
                self.with_cudnn(|c| {
                    let b64 = b as i64;
                    launch!(
                        self,
                        &self.kernels.lse_bth_to_bht,
                        cfg((elementwise_grid(b * tq * h), 1, 1), (256, 1, 1)),
                        &bht,
                        &src,
                        &b64,
                        &t32,
                        &h32
                    )?;
                    let (qp, kp, vp, op, dop, dqp, dkp, dvp) = ptrs;
                    c.backward(key, qp, kp, vp, op, dop, bht, dqp, dkp, dvp)
                })
            })
        }
    }
}
