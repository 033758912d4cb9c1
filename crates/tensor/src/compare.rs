//! Numeric comparison for tests: `|a - b| <= atol + rtol * |b|`, with the first mismatches named.

/// Absolute and relative tolerance, chosen per dtype and op.
#[derive(Clone, Copy, Debug)]
pub struct Tolerance {
    pub atol: f32,
    pub rtol: f32,
}

impl Tolerance {
    pub const fn new(atol: f32, rtol: f32) -> Self {
        Tolerance { atol, rtol }
    }
}

/// One element outside tolerance.
#[derive(Clone, Debug)]
pub struct Mismatch {
    pub index: usize,
    pub actual: f32,
    pub expected: f32,
}

/// Largest `|a - b|` over the two slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Compares `actual` with `expected`; on failure the error names `what`, the count of mismatches,
/// the largest difference and the first few mismatching indices. NaN never compares close.
pub fn check_close(
    what: &str,
    actual: &[f32],
    expected: &[f32],
    tol: Tolerance,
) -> Result<(), String> {
    if actual.len() != expected.len() {
        return Err(format!(
            "{what}: length {} but expected {}",
            actual.len(),
            expected.len()
        ));
    }
    let mut bad = Vec::new();
    let mut count = 0usize;
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let ok = (a - e).abs() <= tol.atol + tol.rtol * e.abs();
        if !ok {
            count += 1;
            if bad.len() < 8 {
                bad.push(Mismatch {
                    index: i,
                    actual: a,
                    expected: e,
                });
            }
        }
    }
    if count == 0 {
        return Ok(());
    }
    let list: Vec<String> = bad
        .iter()
        .map(|m| format!("[{}] {} vs {}", m.index, m.actual, m.expected))
        .collect();
    Err(format!(
        "{what}: {count}/{} elements outside atol={} rtol={} (max |diff| {}); first: {}",
        actual.len(),
        tol.atol,
        tol.rtol,
        max_abs_diff(actual, expected),
        list.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_and_far() {
        let t = Tolerance::new(1e-3, 1e-2);
        assert!(check_close("x", &[1.0, 100.0], &[1.0005, 100.5], t).is_ok());
        let err = check_close("x", &[1.0, 100.0], &[1.1, 100.0], t).unwrap_err();
        assert!(err.contains("[0]"), "{err}");
        assert!(check_close("x", &[f32::NAN], &[0.0], t).is_err());
        assert!(check_close("x", &[1.0], &[1.0, 2.0], t).is_err());
    }
}
