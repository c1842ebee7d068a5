//! SwiGLU gate: `out = silu(gate) * up` elementwise, `silu(x) = x * sigmoid(x)`.

/// out [n] = silu(gate [n]) * up [n] (overwrites out).
pub fn swiglu_forward(out: &mut [f32], gate: &[f32], up: &[f32]) {
    assert_eq!(gate.len(), out.len(), "swiglu: gate length");
    assert_eq!(up.len(), out.len(), "swiglu: up length");
    for i in 0..out.len() {
        let g = gate[i];
        let sig = 1.0 / (1.0 + (-g).exp());
        out[i] = g * sig * up[i];
    }
}

/// dgate [n] += dout * up * silu'(gate); dup [n] += dout * silu(gate).
/// `silu'(x) = sigmoid(x) * (1 + x * (1 - sigmoid(x)))`.
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
    for i in 0..n {
        let g = gate[i];
        let sig = 1.0 / (1.0 + (-g).exp());
        dgate[i] += dout[i] * up[i] * sig * (1.0 + g * (1.0 - sig));
        dup[i] += dout[i] * g * sig;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::*;

    #[test]
    fn forward_known_values() {
        let mut out = [0.0; 3];
        swiglu_forward(&mut out, &[0.0, 1.0, -2.0], &[5.0, 2.0, 1.0]);
        let s1 = 1.0 / (1.0 + (-1f32).exp());
        let s2 = 1.0 / (1.0 + 2f32.exp());
        assert_close("out", &out, &[0.0, 2.0 * s1, -2.0 * s2], 1e-6, 1e-7);
    }

    #[test]
    fn backward_matches_finite_differences() {
        // rtol 1e-2, atol 1e-3 with h = 1e-2.
        let mut r = rng(16);
        let n = 37;
        let gate = rand_vec(&mut r, n, 4.0);
        let up = rand_vec(&mut r, n, 2.0);
        let w = rand_vec(&mut r, n, 1.0);
        let mut dgate = vec![0.0; n];
        let mut dup = vec![0.0; n];
        swiglu_backward(&mut dgate, &mut dup, &w, &gate, &up);
        let loss = |g: &[f32], u: &[f32]| {
            let mut out = vec![0.0; n];
            swiglu_forward(&mut out, g, u);
            dot64(&out, &w)
        };
        check_grad("dgate", &gate, &dgate, 1e-2, 1e-2, 1e-3, |g| loss(g, &up));
        check_grad("dup", &up, &dup, 1e-2, 1e-2, 1e-3, |u| loss(&gate, u));
    }
}
