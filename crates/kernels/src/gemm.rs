//! The one wrapper around the unsafe `gemm::gemm` call: strided f32 products, bounds-checked.

pub(crate) use ::gemm::Parallelism;

/// `dst[m, n] = (accumulate ? dst : 0) + beta · lhs[m, k] · rhs[k, n]` on f32 slices with explicit
/// strides: element (i, p) of lhs is `lhs[i·lhs_rs + p·lhs_cs]`, (p, j) of rhs is
/// `rhs[p·rhs_rs + j·rhs_cs]`, (i, j) of dst is `dst[i·dst_rs + j]`. `parallelism` is passed to
/// gemm as is: `Parallelism::None` from inside rayon tasks, `Parallelism::Rayon` for large
/// standalone products. Bounds are checked before the unsafe call.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_strided(
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[f32],
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: &[f32],
    rhs_rs: usize,
    rhs_cs: usize,
    beta: f32,
    m: usize,
    n: usize,
    k: usize,
    parallelism: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        (m - 1) * dst_rs + n <= dst.len(),
        "gemm_strided: dst too short"
    );
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    assert!(
        (m - 1) * lhs_rs + (k - 1) * lhs_cs < lhs.len(),
        "gemm_strided: lhs too short"
    );
    assert!(
        (k - 1) * rhs_rs + (n - 1) * rhs_cs < rhs.len(),
        "gemm_strided: rhs too short"
    );
    // SAFETY: every index the product touches was bounds-checked above; dst is exclusively
    // borrowed and distinct from lhs/rhs; gemm returns only once every thread it used is done, so
    // the borrows cover the whole product.
    unsafe {
        ::gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            parallelism,
        );
    }
}
