//! Linear layer without bias, PyTorch layout: `out[M,N] = inp[M,K] @ weight[N,K]^T`.

/// out [M,N] = inp [M,K] @ weight [N,K]^T (overwrites out).
pub fn matmul_forward(out: &mut [f32], inp: &[f32], weight: &[f32], m: usize, k: usize, n: usize) {
    assert_eq!(out.len(), m * n, "matmul: out is not [M, N]");
    assert_eq!(inp.len(), m * k, "matmul: inp is not [M, K]");
    assert_eq!(weight.len(), n * k, "matmul: weight is not [N, K]");
    for i in 0..m {
        let x = &inp[i * k..(i + 1) * k];
        for j in 0..n {
            let w = &weight[j * k..(j + 1) * k];
            let mut acc = 0.0f32;
            for p in 0..k {
                acc += x[p] * w[p];
            }
            out[i * n + j] = acc;
        }
    }
}

/// dinp [M,K] += dout [M,N] @ weight [N,K]; dweight [N,K] += dout^T @ inp [M,K].
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward(
    dinp: &mut [f32],
    dweight: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    m: usize,
    k: usize,
    n: usize,
) {
    assert_eq!(dout.len(), m * n, "matmul: dout is not [M, N]");
    assert_eq!(inp.len(), m * k, "matmul: inp is not [M, K]");
    assert_eq!(dinp.len(), m * k, "matmul: dinp is not [M, K]");
    assert_eq!(weight.len(), n * k, "matmul: weight is not [N, K]");
    assert_eq!(dweight.len(), n * k, "matmul: dweight is not [N, K]");
    for i in 0..m {
        let dx = &mut dinp[i * k..(i + 1) * k];
        for j in 0..n {
            let d = dout[i * n + j];
            let w = &weight[j * k..(j + 1) * k];
            for p in 0..k {
                dx[p] += d * w[p];
            }
        }
    }
    for j in 0..n {
        let dw = &mut dweight[j * k..(j + 1) * k];
        for i in 0..m {
            let d = dout[i * n + j];
            let x = &inp[i * k..(i + 1) * k];
            for p in 0..k {
                dw[p] += d * x[p];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::*;

    #[test]
    fn forward_matches_hand_computed_product() {
        // inp [2,3], weight [2,3]: out = inp @ weight^T.
        let inp = [1.0, 2.0, 3.0, -1.0, 0.5, 4.0];
        let weight = [1.0, 0.0, -1.0, 2.0, 1.0, 0.5];
        let mut out = [0.0; 4];
        matmul_forward(&mut out, &inp, &weight, 2, 3, 2);
        assert_eq!(out, [-2.0, 5.5, -5.0, 0.5]);
    }

    #[test]
    fn backward_matches_finite_differences() {
        // Linear in each argument, so central differences are exact up to f32 rounding:
        // rtol 1e-3, atol 1e-3 with h = 1e-2.
        for (seed, m, k, n) in [(6u64, 7usize, 13usize, 5usize), (7, 1, 4, 3), (8, 3, 1, 2)] {
            let mut r = rng(seed);
            let inp = rand_vec(&mut r, m * k, 1.0);
            let weight = rand_vec(&mut r, n * k, 1.0);
            let w = rand_vec(&mut r, m * n, 1.0);
            let mut dinp = vec![1.0; m * k];
            let mut dweight = vec![2.0; n * k];
            matmul_backward(&mut dinp, &mut dweight, &w, &inp, &weight, m, k, n);
            let dinp: Vec<f32> = dinp.iter().map(|d| d - 1.0).collect();
            let dweight: Vec<f32> = dweight.iter().map(|d| d - 2.0).collect();
            let loss = |x: &[f32], wt: &[f32]| {
                let mut out = vec![0.0; m * n];
                matmul_forward(&mut out, x, wt, m, k, n);
                dot64(&out, &w)
            };
            check_grad("dinp", &inp, &dinp, 1e-2, 1e-3, 1e-3, |x| loss(x, &weight));
            check_grad("dweight", &weight, &dweight, 1e-2, 1e-3, 1e-3, |wt| {
                loss(&inp, wt)
            });
        }
    }
}
