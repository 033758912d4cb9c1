//! AdamW on the GPU, as `reel_optim::AdamW::step` computes it (torch.optim.AdamW, decoupled
//! weight decay, bias-corrected moments; Loshchilov & Hutter), over fp32 parameters, gradients and
//! moments. The step's scalars come from `reel_optim::AdamWConfig::scalars`, and the kernel spells
//! the CPU's operations in the CPU's order with round-to-nearest intrinsics, so a GPU step gives
//! the CPU step's bits.

use reel_optim::AdamWScalars;

use crate::buffer::{DevRead, DevWrite};
use crate::ops::{cfg, check, elementwise_grid, launch};
use crate::{Gpu, Result};

impl Gpu {
    /// One AdamW update of one parameter tensor (the t-th step's `scalars`, from
    /// `AdamWConfig::scalars(t, lr)`): `param`, `m`, `v` updated in place from `grad`, all f32 of
    /// the same length; `decay` says whether this tensor gets weight decay.
    pub fn adamw_step(
        &self,
        param: &mut impl DevWrite<f32>,
        grad: &impl DevRead<f32>,
        m: &mut impl DevWrite<f32>,
        v: &mut impl DevWrite<f32>,
        scalars: &AdamWScalars,
        decay: bool,
    ) -> Result<()> {
        self.timed("optimizer", "adamw_step", || {
            let op = "adamw_step";
            let n = param.dlen();
            check(op, "grad", grad.dlen(), n)?;
            check(op, "m", m.dlen(), n)?;
            check(op, "v", v.dlen(), n)?;
            if n == 0 {
                return Ok(());
            }
            self.bind()?;
            let k = scalars;
            let (p, g, mp, vp, n64, dec) = (
                param.dptr(),
                grad.dptr(),
                m.dptr(),
                v.dptr(),
                n as i64,
                decay as i32,
            );
            launch!(
                self,
                &self.kernels.adamw_step,
                cfg((elementwise_grid(n), 1, 1), (256, 1, 1)),
                &p,
                &g,
                &mp,
                &vp,
                &n64,
                &dec,
                &k.decay_factor,
                &k.one_minus_beta1,
                &k.beta2,
                &k.one_minus_beta2,
                &k.bias_correction2_sqrt,
                &k.neg_step_size,
                &k.eps
            )
        })
    }
}
