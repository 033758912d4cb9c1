//! Token embedding lookup: table [V, D], tokens [N] → out [N, D].
//!
//! Forward `out[i, :] = table[tokens[i], :]`; backward `dtable[tokens[i], :] += dout[i, :]`
//! (a parameter gradient, so it accumulates). Token ids are validated by the caller; an id
//! outside the table panics here with the id and the table size.

mod cpu;

use reel_tensor::Float;

/// `out[n, d] = table[tokens[i], :]`. Overwrites `out`.
pub fn embedding_forward<T: Float>(out: &mut [T], tokens: &[u32], table: &[T], d: usize) {
    let vocab = check("embedding_forward", out.len(), tokens, table.len(), d);
    if d == 0 || vocab == 0 {
        return;
    }
    cpu::embedding_forward(out, tokens, table, d);
}

/// `dtable[tokens[i], :] += dout[i, :]`, summed in f32 per table row.
pub fn embedding_backward<T: Float>(dtable: &mut [T], dout: &[T], tokens: &[u32], d: usize) {
    let vocab = check("embedding_backward", dout.len(), tokens, dtable.len(), d);
    if d == 0 || vocab == 0 {
        return;
    }
    cpu::embedding_backward(dtable, dout, tokens, d);
}

/// Asserts the [N, D] rows, a [V, D] table and every token id < V; returns V.
fn check(op: &str, rows: usize, tokens: &[u32], table: usize, d: usize) -> usize {
    let n = tokens.len();
    let vocab = table.checked_div(d).unwrap_or(0);
    assert!(
        rows == n * d && vocab * d == table,
        "{op}: out/dout has {rows} elements for {n} tokens × d={d} (expected {}), table has {table}",
        n * d
    );
    if d > 0 {
        if let Some((i, &t)) = tokens
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= vocab)
        {
            panic!("{op}: token id {t} at index {i} is outside the table of {vocab} rows");
        }
    }
    vocab
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng as _;
    use reel_tensor::gradcheck::{numeric_grad, probe_loss};
    use reel_tensor::{bf16, check_close, rng, uniform_vec, Tolerance};

    fn tokens(r: &mut reel_tensor::Rng, n: usize, vocab: usize) -> Vec<u32> {
        (0..n).map(|_| r.random_range(0..vocab as u32)).collect()
    }

    #[test]
    fn forward_copies_rows() {
        let mut r = rng(10);
        for &(n, vocab, d) in &[(1, 1, 1), (5, 4, 3), (17, 11, 8), (64, 7, 33)] {
            let table = uniform_vec(&mut r, vocab * d, 1.0);
            let toks = tokens(&mut r, n, vocab);
            let mut out = vec![f32::NAN; n * d];
            embedding_forward(&mut out, &toks, &table, d);
            let expected: Vec<f32> = toks
                .iter()
                .flat_map(|&t| table[t as usize * d..(t as usize + 1) * d].to_vec())
                .collect();
            check_close(
                &format!("out n={n} V={vocab} d={d}"),
                &out,
                &expected,
                Tolerance::new(0.0, 0.0),
            )
            .unwrap();
        }
    }

    #[test]
    fn backward_matches_numeric_grad_with_repeated_tokens() {
        let mut r = rng(11);
        for &(n, vocab, d) in &[(5, 4, 3), (9, 3, 2), (1, 6, 5)] {
            let table = uniform_vec(&mut r, vocab * d, 1.0);
            let toks = tokens(&mut r, n, vocab);
            let probe = uniform_vec(&mut r, n * d, 1.0);
            let prev = uniform_vec(&mut r, vocab * d, 1.0);
            let mut dtable = prev.clone();
            embedding_backward(&mut dtable, &probe, &toks, d);
            let g = numeric_grad(&table, 1e-2, |t| {
                let mut out = vec![0.0; n * d];
                embedding_forward(&mut out, &toks, t, d);
                probe_loss(&out, &probe)
            });
            let expected: Vec<f32> = prev.iter().zip(&g).map(|(a, b)| a + b).collect();
            check_close(
                &format!("dtable n={n} V={vocab} d={d}"),
                &dtable,
                &expected,
                Tolerance::new(2e-3, 2e-2),
            )
            .unwrap();
        }
    }

    #[test]
    fn bf16_matches_f32() {
        let (n, vocab, d) = (40, 6, 7);
        let mut r = rng(12);
        let round = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
        let widen = |v: &[bf16]| v.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
        let table = round(&uniform_vec(&mut r, vocab * d, 1.0));
        let toks = tokens(&mut r, n, vocab);
        let dout = round(&uniform_vec(&mut r, n * d, 1.0));
        let mut out = vec![bf16::from_f32(f32::NAN); n * d];
        embedding_forward(&mut out, &toks, &table, d);
        let mut out32 = vec![0.0f32; n * d];
        embedding_forward(&mut out32, &toks, &widen(&table), d);
        check_close("bf16 out", &widen(&out), &out32, Tolerance::new(0.0, 0.0)).unwrap();

        let mut dtable = round(&uniform_vec(&mut r, vocab * d, 1.0));
        let mut dtable32 = widen(&dtable);
        embedding_backward(&mut dtable, &dout, &toks, d);
        embedding_backward(&mut dtable32, &widen(&dout), &toks, d);
        // Each row is rounded once after an f32 sum, so one bf16 ulp of the sum at most.
        check_close(
            "bf16 dtable",
            &widen(&dtable),
            &dtable32,
            Tolerance::new(1e-6, 4e-3),
        )
        .unwrap();
    }

    #[test]
    #[should_panic(expected = "token id 4 at index 1 is outside the table of 4 rows")]
    fn out_of_range_token_panics() {
        let mut out = vec![0.0f32; 4];
        embedding_forward(&mut out, &[0, 4], &[1.0; 8], 2);
    }
}
