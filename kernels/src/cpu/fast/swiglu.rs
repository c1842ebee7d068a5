//! Fast SwiGLU: parallel over chunks, vectorized with the polynomial `exp`.

use rayon::prelude::*;

use super::simd::{exp, multiversion};

/// Elements per parallel task.
const CHUNK: usize = 16 * 1024;

/// out [n] = silu(gate [n]) * up [n].
pub fn swiglu_forward(out: &mut [f32], gate: &[f32], up: &[f32]) {
    assert_eq!(gate.len(), out.len(), "swiglu: gate length");
    assert_eq!(up.len(), out.len(), "swiglu: up length");
    out.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK))
        .zip(up.par_chunks(CHUNK))
        .for_each(|((o, g), u)| forward_chunk(o, g, u));
}

multiversion! {
    fn forward_chunk(out: &mut [f32], gate: &[f32], up: &[f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = g / (1.0 + exp(-g)) * u;
        }
    }
}

/// dgate [n] += dout * up * silu'(gate); dup [n] += dout * silu(gate).
pub fn swiglu_backward(dgate: &mut [f32], dup: &mut [f32], dout: &[f32], gate: &[f32], up: &[f32]) {
    let n = dout.len();
    for (name, len) in [
        ("dgate", dgate.len()),
        ("dup", dup.len()),
        ("gate", gate.len()),
        ("up", up.len()),
    ] {
        assert_eq!(len, n, "swiglu: {name} length");
    }
    dgate
        .par_chunks_mut(CHUNK)
        .zip(dup.par_chunks_mut(CHUNK))
        .zip(dout.par_chunks(CHUNK))
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .for_each(|(((dg, du), d), (g, u))| backward_chunk(dg, du, d, g, u));
}

multiversion! {
    fn backward_chunk(dgate: &mut [f32], dup: &mut [f32], dout: &[f32], gate: &[f32], up: &[f32]) {
        let it = dgate.iter_mut().zip(dup.iter_mut()).zip(dout).zip(gate).zip(up);
        for ((((dg, du), &d), &g), &u) in it {
            let sig = 1.0 / (1.0 + exp(-g));
            *dg += d * u * sig * (1.0 + g * (1.0 - sig));
            *du += d * g * sig;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::swiglu as reference;
    use crate::cpu::testutil::*;

    #[test]
    fn matches_reference() {
        for (seed, n) in [(500u64, 1usize), (501, 37), (502, 3 * CHUNK + 5)] {
            let mut r = rng(seed);
            let gate = rand_vec(&mut r, n, 12.0);
            let up = rand_vec(&mut r, n, 2.0);
            let dout = rand_vec(&mut r, n, 1.0);
            let mut want = vec![0.0; n];
            reference::swiglu_forward(&mut want, &gate, &up);
            let mut got = vec![f32::NAN; n];
            swiglu_forward(&mut got, &gate, &up);
            assert_close("out", &got, &want, 1e-5, 1e-6);
            let dg0 = rand_vec(&mut r, n, 1.0);
            let du0 = rand_vec(&mut r, n, 1.0);
            let (mut dg_r, mut du_r) = (dg0.clone(), du0.clone());
            reference::swiglu_backward(&mut dg_r, &mut du_r, &dout, &gate, &up);
            let (mut dg, mut du) = (dg0, du0);
            swiglu_backward(&mut dg, &mut du, &dout, &gate, &up);
            assert_close("dgate", &dg, &dg_r, 1e-5, 1e-6);
            assert_close("dup", &du, &du_r, 1e-5, 1e-6);
        }
    }
}
