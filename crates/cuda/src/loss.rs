//! LM head fused with cross-entropy on the GPU, as `reel_kernels::cross_entropy`: h [N, D],
//! weight [V, D], targets [N] (negative: no loss) → losses [N], lse [N] (f32, 0 on unlabelled rows).
//!
//! For the M labelled rows (gathered into hl [M, D]), the logits are made `chunk` vocabulary
//! columns at a time by cuBLASLt (`z_c = hl·W_cᵀ`, f32 out) and folded into each row's running
//! (max, Σe^{z−max}) by `ce_fwd_chunk` (an online log-sum-exp), so [N, V] never exists;
//! `loss = lse − z_target`; the same fold carries Σ e^{z−max}(z−max), so the entropy of each
//! labelled row's distribution comes out too ([`Gpu::lm_head_ce_entropy_forward`], as the CPU
//! kernel's). The backward recomputes each chunk's logits, forms
//! `dz = (e^{z−lse} − 1[target])·dloss` in the GEMMs' type, and accumulates `dhl += dz·W_c` (f32)
//! and `dW_c += dzᵀ·hl` with cuBLASLt (β = 1); dh rows are then written (0 on unlabelled rows).

use crate::blas::Spec;
use crate::buffer::{DView, DViewMut, DevRead, DevWrite, DeviceBuf};
use crate::ops::{as_i32, cfg, check, launch, row_threads};
use crate::{shape_err, Gpu, GpuFloat, Result, Scratch};

/// The labelled rows of `targets`: their indices and targets, or a Shape error naming the row
/// whose target is ≥ v.
fn labelled(op: &str, targets: &[i32], v: usize) -> Result<(Vec<u32>, Vec<u32>)> {
    let mut idx = Vec::new();
    let mut tgt = Vec::new();
    for (i, &t) in targets.iter().enumerate() {
        if t < 0 {
            continue;
        }
        if t as usize >= v {
            return shape_err(format!(
                "{op}: target {t} at row {i} is outside the vocabulary of {v}"
            ));
        }
        idx.push(i as u32);
        tgt.push(t as u32);
    }
    Ok((idx, tgt))
}

#[allow(clippy::too_many_arguments)]
fn check_common(
    op: &str,
    h: usize,
    weight: usize,
    targets: usize,
    n: usize,
    d: usize,
    v: usize,
    chunk: usize,
) -> Result<()> {
    if chunk == 0 {
        return shape_err(format!("{op}: chunk must be positive"));
    }
    check(op, "h", h, n * d)?;
    check(op, "weight", weight, v * d)?;
    check(op, "targets", targets, n)?;
    as_i32(op, "n", n)?;
    as_i32(op, "d", d)?;
    as_i32(op, "v", v)?;
    Ok(())
}

impl Gpu {
    /// Gathers rows `idx` of `src` [*, d] into a [idx.len(), d] scratch buffer.
    fn gather<T: GpuFloat>(
        &self,
        src: &impl DevRead<T>,
        idx: &impl DevRead<u32>,
        d: usize,
    ) -> Result<Scratch<'_, T>> {
        let mut dst = self.scratch::<T>(idx.dlen() * d)?;
        self.gather_into(&mut dst, src, idx, d)?;
        Ok(dst)
    }

    /// Writes rows `idx` of `src` [*, d] into the first idx.len() rows of `dst`.
    pub(crate) fn gather_into<T: GpuFloat>(
        &self,
        dst: &mut impl DevWrite<T>,
        src: &impl DevRead<T>,
        idx: &impl DevRead<u32>,
        d: usize,
    ) -> Result<()> {
        let m = idx.dlen();
        if dst.dlen() < m * d {
            return shape_err(format!(
                "gather: {} destination values for {m} rows of {d}",
                dst.dlen()
            ));
        }
        if m > 0 && d > 0 {
            let (o, s, i, d32) = (dst.dptr(), src.dptr(), idx.dptr(), d as i32);
            launch!(
                self,
                &self.kernels.gather_rows[T::INDEX],
                cfg((m as u32, 1, 1), (row_threads(d), 1, 1)),
                &o,
                &s,
                &i,
                &d32
            )?;
        }
        Ok(())
    }

    /// LM head + cross-entropy forward as `reel_kernels::cross_entropy::lm_head_ce_forward`:
    /// losses[n] = lse − logit[target] and lse[n] (f32; both 0 on rows whose target is negative),
    /// from h [n, d] and weight [v, d] (f32 or bf16; logits in f32), `chunk` vocabulary columns at
    /// a time (the logits scratch is M × chunk f32). `targets` are host ids (a target ≥ v is
    /// refused). Returns the number of labelled rows; the loss sum is the sum of `losses`.
    #[allow(clippy::too_many_arguments)]
    pub fn lm_head_ce_forward<T: GpuFloat>(
        &self,
        losses: &mut impl DevWrite<f32>,
        lse: &mut impl DevWrite<f32>,
        h: &impl DevRead<T>,
        weight: &impl DevRead<T>,
        targets: &[i32],
        n: usize,
        d: usize,
        v: usize,
        chunk: usize,
    ) -> Result<usize> {
        let op = "lm_head_ce_forward";
        self.ce_forward(
            op,
            losses,
            lse,
            None::<&mut DeviceBuf<f32>>,
            h,
            weight,
            targets,
            n,
            d,
            v,
            chunk,
        )
    }

    /// [`Gpu::lm_head_ce_forward`] that also writes `entropy[n]`, −Σ_c p_c ln p_c of each
    /// labelled row's softmax (0 on unlabelled rows), from the same vocabulary chunks
    /// (`reel_kernels::cross_entropy::lm_head_ce_entropy_forward`).
    #[allow(clippy::too_many_arguments)]
    pub fn lm_head_ce_entropy_forward<T: GpuFloat>(
        &self,
        losses: &mut impl DevWrite<f32>,
        lse: &mut impl DevWrite<f32>,
        entropy: &mut impl DevWrite<f32>,
        h: &impl DevRead<T>,
        weight: &impl DevRead<T>,
        targets: &[i32],
        n: usize,
        d: usize,
        v: usize,
        chunk: usize,
    ) -> Result<usize> {
        let op = "lm_head_ce_entropy_forward";
        self.ce_forward(
            op,
            losses,
            lse,
            Some(entropy),
            h,
            weight,
            targets,
            n,
            d,
            v,
            chunk,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn ce_forward<T: GpuFloat>(
        &self,
        op: &str,
        losses: &mut impl DevWrite<f32>,
        lse: &mut impl DevWrite<f32>,
        mut entropy: Option<&mut impl DevWrite<f32>>,
        h: &impl DevRead<T>,
        weight: &impl DevRead<T>,
        targets: &[i32],
        n: usize,
        d: usize,
        v: usize,
        chunk: usize,
    ) -> Result<usize> {
        self.timed("lm_head_ce", "lm_head_ce_forward", || {
            check_common(op, h.dlen(), weight.dlen(), targets.len(), n, d, v, chunk)?;
            check(op, "losses", losses.dlen(), n)?;
            check(op, "lse", lse.dlen(), n)?;
            if let Some(e) = &entropy {
                check(op, "entropy", e.dlen(), n)?;
            }
            let (idx, tgt) = labelled(op, targets, v)?;
            self.bind()?;
            self.zero(losses)?;
            self.zero(lse)?;
            if let Some(e) = entropy.as_deref_mut() {
                self.zero(e)?;
            }
            let m = idx.len();
            if m == 0 {
                return Ok(0);
            }
            let idx_d = self.scratch_from(&idx)?;
            let tgt_d = self.scratch_from(&tgt)?;
            let hl = self.gather(h, &idx_d, d)?;
            let row_max = self.scratch_from(&vec![f32::NEG_INFINITY; m])?;
            let row_sum = self.scratch_from(&vec![0.0f32; m])?;
            // Null when no entropy is asked for: the kernels then skip its fold.
            let row_ent = match entropy {
                Some(_) => Some(self.scratch_from(&vec![0.0f32; m])?),
                None => None,
            };
            let ent_ptr = row_ent.as_ref().map_or(0, |e| e.dptr());
            let target_logit = self.scratch_from(&vec![0.0f32; m])?;
            let mut logits = self.scratch::<f32>(m * chunk.min(v))?;
            for c0 in (0..v).step_by(chunk) {
                let cw = chunk.min(v - c0);
                let w_c = DView::of(weight, c0 * d..(c0 + cw) * d)?;
                let mut z = DViewMut::of(&mut logits, 0..m * cw)?;
                self.matmul_forward::<T, f32>(&mut z, &hl, &w_c, None, m, d, cw)?;
                let (mx, sm, en, tl, zp, tp) = (
                    row_max.dptr(),
                    row_sum.dptr(),
                    ent_ptr,
                    target_logit.dptr(),
                    z.dptr(),
                    tgt_d.dptr(),
                );
                let (cw32, c0u) = (cw as i32, c0 as u32);
                launch!(
                    self,
                    &self.kernels.ce_fwd_chunk,
                    cfg((m as u32, 1, 1), (row_threads(cw), 1, 1)),
                    &mx,
                    &sm,
                    &en,
                    &tl,
                    &zp,
                    &tp,
                    &cw32,
                    &c0u
                )?;
            }
            let ep = entropy.as_ref().map_or(0, |e| e.dptr());
            let (lp, lsp, ip) = (losses.dptr(), lse.dptr(), idx_d.dptr());
            let (mx, sm, en, tl, m32) = (
                row_max.dptr(),
                row_sum.dptr(),
                ent_ptr,
                target_logit.dptr(),
                m as i32,
            );
            launch!(
                self,
                &self.kernels.ce_fwd_finish,
                cfg((m.div_ceil(256) as u32, 1, 1), (256, 1, 1)),
                &lp,
                &lsp,
                &ep,
                &ip,
                &mx,
                &sm,
                &en,
                &tl,
                &m32
            )?;
            Ok(m)
        })
    }

    /// LM head + cross-entropy backward as `reel_kernels::cross_entropy::lm_head_ce_backward`:
    /// dloss[n] = dL/dlosses (e.g. 1/count); dh [n, d] OVERWRITTEN (0 on unlabelled rows), dweight
    /// [v, d] ACCUMULATED (each chunk's rows summed in f32 and rounded once); lse from the forward.
    /// `dz` is rounded to the storage type for the GEMMs (bf16 with bf16 storage).
    #[allow(clippy::too_many_arguments)]
    pub fn lm_head_ce_backward<T: GpuFloat>(
        &self,
        dh: &mut impl DevWrite<T>,
        dweight: &mut impl DevWrite<T>,
        h: &impl DevRead<T>,
        weight: &impl DevRead<T>,
        targets: &[i32],
        lse: &impl DevRead<f32>,
        dloss: &impl DevRead<f32>,
        n: usize,
        d: usize,
        v: usize,
        chunk: usize,
    ) -> Result<()> {
        self.timed("lm_head_ce", "lm_head_ce_backward", || {
            let op = "lm_head_ce_backward";
            check_common(op, h.dlen(), weight.dlen(), targets.len(), n, d, v, chunk)?;
            check(op, "dh", dh.dlen(), n * d)?;
            check(op, "dweight", dweight.dlen(), v * d)?;
            check(op, "lse", lse.dlen(), n)?;
            check(op, "dloss", dloss.dlen(), n)?;
            let (idx, tgt) = labelled(op, targets, v)?;
            self.bind()?;
            self.zero(dh)?;
            let m = idx.len();
            if m == 0 || d == 0 {
                return Ok(());
            }
            let idx_d = self.scratch_from(&idx)?;
            let tgt_d = self.scratch_from(&tgt)?;
            let hl = self.gather(h, &idx_d, d)?;
            let lse_l = self.gather::<f32>(lse, &idx_d, 1)?;
            let dloss_l = self.gather::<f32>(dloss, &idx_d, 1)?;
            let mut dhl = self.scratch::<f32>(m * d)?;
            self.zero(&mut dhl)?;
            let cmax = chunk.min(v);
            let mut logits = self.scratch::<f32>(m * cmax)?;
            // Every element of a chunk's part is written by ce_bwd_chunk before it is read.
            let dz_buf = self.scratch::<T>(m * cmax)?;
            let t = T::cuda_type();
            for c0 in (0..v).step_by(chunk) {
                let cw = chunk.min(v - c0);
                let w_c = DView::of(weight, c0 * d..(c0 + cw) * d)?;
                let z = {
                    let mut z = DViewMut::of(&mut logits, 0..m * cw)?;
                    self.matmul_forward::<T, f32>(&mut z, &hl, &w_c, None, m, d, cw)?;
                    z.dptr()
                };
                let dz = dz_buf.dptr();
                let (lp, gp, tp, cw32, c0u) = (
                    lse_l.dptr(),
                    dloss_l.dptr(),
                    tgt_d.dptr(),
                    cw as i32,
                    c0 as u32,
                );
                launch!(
                    self,
                    &self.kernels.ce_bwd_chunk[T::INDEX],
                    cfg((m as u32, 1, 1), (row_threads(cw), 1, 1)),
                    &dz,
                    &z,
                    &lp,
                    &gp,
                    &tp,
                    &cw32,
                    &c0u
                )?;
                // dhl[M, D] += dz[M, cw] · W_c[cw, D]  (f32 out, β = 1).
                let s = Spec {
                    ta: false,
                    tb: false,
                    m: d as u64,
                    n: m as u64,
                    k: cw as u64,
                    lda: d as i64,
                    ldb: cw as i64,
                    ldc: d as i64,
                    ab: t,
                    cd: f32::cuda_type(),
                    bias: false,
                    accumulate: true,
                    align: [0; 3],
                };
                self.blas.gemm(s, 1.0, w_c.dptr(), dz, dhl.dptr(), None)?;
                // dW_c[cw, D] += dz[M, cw]ᵀ · hl[M, D]  (β = 1).
                let dw_c = DViewMut::of(dweight, c0 * d..(c0 + cw) * d)?;
                let s = Spec {
                    ta: false,
                    tb: true,
                    m: d as u64,
                    n: cw as u64,
                    k: m as u64,
                    lda: d as i64,
                    ldb: cw as i64,
                    ldc: d as i64,
                    ab: t,
                    cd: t,
                    bias: false,
                    accumulate: true,
                    align: [0; 3],
                };
                self.blas.gemm(s, 1.0, hl.dptr(), dz, dw_c.dptr(), None)?;
            }
            let (o, s, i, d32) = (dh.dptr(), dhl.dptr(), idx_d.dptr(), d as i32);
            launch!(
                self,
                &self.kernels.scatter_rows[T::INDEX],
                cfg((m as u32, 1, 1), (row_threads(d), 1, 1)),
                &o,
                &s,
                &i,
                &d32
            )?;
            Ok(())
        })
    }
}
