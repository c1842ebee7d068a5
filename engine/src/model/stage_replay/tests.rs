//! How far an honest pipeline-stage segment lands from its claim when a verifier replays it
//! on other hardware (issue #19: stage replays across hardware). A verifier of a stage
//! replays the claimant's logged segment (`control/src/pipeline/recheck.rs`): from the
//! segment's checkpoint, the logged inputs (activations in, gradients from the next stage),
//! each optimizer step clipped by the logged global norm, and compares every recomputed
//! output (activations, input gradients) with the one sent, `‖replayed − sent‖ / ‖replayed‖`
//! per tensor, against `ledger.verify_tolerance` = 0.05. The inputs are the logged ones, so
//! only the stage's own weights can drift: after k optimizer steps they differ by what k
//! steps of chaotic training make of a last-bit difference.
//!
//! Measured here on a middle stage of the `default` model (layers 1-2, batch 4 x 32, 2
//! micro-batches a step, after 30 f32 warm-up steps, AdamW at 3e-3, sent tensors rounded to
//! bf16 as on the wire), for a replay in the claimant's dtype with the weights perturbed by
//! 1e-7 relative (about one f32 ulp: another CPU's summation order) and for a replay in the
//! other dtype: `NEUROSHARD_STAGE_REPLAY_STEPS` (default 50) steps, the largest distance
//! within the first k steps printed for k = 1, 3, 5, 10, 20, 50, ... (figures in BENCHMARKS.md,
//! "Stage replays across hardware").

use neuroshard_shared::model::ModelConfig;

use super::*;
use crate::backend::Dtype;
use crate::backend::cpu::CpuBackend;
use crate::optim::{AdamState, OptimConfig};

const B: usize = 4;
const T: usize = 32;
const MICRO: u64 = 2;
const LR: f32 = 3e-3;

/// A middle stage (layers 1-2: activations in, activations out, the output gradient from
/// the next stage) or the last one (layers 2-3 and the head: the loss from its own logits,
/// so its gradients follow its own weights, as in a whole model).
fn spec(last: bool) -> StageSpec {
    StageSpec {
        layer_start: if last { 2 } else { 1 },
        layer_end: if last { 4 } else { 3 },
        has_embedding: false,
        has_head: last,
    }
}

fn normals(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = params::SplitMix64(seed);
    (0..n).map(|_| rng.normal_pair().0 * scale).collect()
}

fn wire(v: &[f32]) -> Vec<f32> {
    v.iter()
        .map(|x| half::bf16::from_f32(*x).to_f32())
        .collect()
}

fn distance(replayed: &[f32], sent: &[f32]) -> f64 {
    let (mut d, mut n) = (0.0f64, 0.0f64);
    for (a, b) in replayed.iter().zip(sent) {
        d += f64::from(a - b).powi(2);
        n += f64::from(*a).powi(2);
    }
    (d / n.max(1e-30)).sqrt()
}

/// What a claimant sent in one step: per micro-batch (activations, input gradient), and the
/// global norm its optimizer step was clipped by.
struct Step {
    sent: Vec<(Vec<f32>, Vec<f32>)>,
    norm: f32,
}

/// A segment of `h` steps in `dtype` from the warm state, weights scaled by
/// `1 + perturb * u` at the start (u uniform in [-1, 1)). With `claim`, the optimizer steps
/// take the claim's norms and each step's largest distance from the claim is returned.
fn segment(
    last: bool,
    dtype: Dtype,
    perturb: f32,
    h: u64,
    claim: Option<&[Step]>,
) -> (Vec<Step>, Vec<f64>) {
    let c = ModelConfig::preset("default").unwrap();
    let n = B * T * c.hidden as usize;
    let oc = OptimConfig::default();
    let mut w = Model::new(
        CpuBackend::with_dtype(Dtype::F32),
        c.clone(),
        spec(last),
        11,
    )
    .unwrap();
    let mut wa = AdamState::new(&w).unwrap();
    let run =
        |m: &mut Model<CpuBackend>, a: &mut AdamState<CpuBackend>, s: u64, norm: Option<f32>| {
            let mut sent = Vec::new();
            for mb in 0..MICRO {
                let x = normals(n, 1000 + 2 * (s * MICRO + mb), 1.0);
                let g = normals(n, 1001 + 2 * (s * MICRO + mb), 1e-3);
                let (out, g) = if last {
                    let mut rng = params::SplitMix64(7 + s * MICRO + mb);
                    let labels: Vec<u32> = (0..B * T)
                        .map(|_| (rng.next_u64() % u64::from(c.vocab_size)) as u32)
                        .collect();
                    let loss = m.forward(mb, B, T, StageInput::Acts(&x), Some(&labels));
                    (vec![loss.unwrap().unwrap()], None)
                } else {
                    m.forward(mb, B, T, StageInput::Acts(&x), None).unwrap();
                    (m.with_output(mb, |o, _| o.to_vec()).unwrap(), Some(g))
                };
                m.backward(mb, g.as_deref()).unwrap();
                let din = m.with_grad_input(|d| d.to_vec()).unwrap();
                sent.push((out, din));
            }
            let norm = norm.unwrap_or_else(|| AdamState::sq_grad_norm(m).unwrap().sqrt() as f32);
            a.step_clipped_by(m, &oc, LR, Some(norm)).unwrap();
            Step { sent, norm }
        };
    for s in 0..30 {
        run(&mut w, &mut wa, s, None);
    }
    let mut m = Model::new(CpuBackend::with_dtype(dtype), c.clone(), spec(last), 11).unwrap();
    let mut adam = super::bf16_tests::take_state(&mut m, &w, &wa, perturb);
    let (mut steps, mut far) = (Vec::new(), Vec::new());
    for i in 0..h {
        let mut st = run(&mut m, &mut adam, 30 + i, claim.map(|c| c[i as usize].norm));
        if claim.is_none() {
            // What the claimant sent: rounded to bf16 on the wire; a replay compares its own
            // f32 recomputation with that.
            // (the loss travels as an f32).
            for (o, g) in &mut st.sent {
                if !last {
                    *o = wire(o);
                }
                *g = wire(g);
            }
        }
        if let Some(c) = claim {
            let d = st
                .sent
                .iter()
                .zip(&c[i as usize].sent)
                .flat_map(|((o, g), (co, cg))| [distance(o, co), distance(g, cg)])
                .fold(0.0f64, f64::max);
            far.push(d);
        }
        steps.push(st);
    }
    (steps, far)
}

#[test]
fn stage_segments_replayed_on_other_hardware() {
    let h: u64 = std::env::var("NEUROSHARD_STAGE_REPLAY_STEPS")
        .map(|v| v.parse().unwrap())
        .unwrap_or(50);
    let upto = |far: &[f64], k: usize| {
        far[..k.min(far.len())]
            .iter()
            .fold(0.0f64, |a, b| a.max(*b))
    };
    let ks: Vec<usize> = [1, 3, 5, 10, 20, 50, 100, 200]
        .into_iter()
        .filter(|k| *k as u64 <= h)
        .collect();
    let mut table = Vec::new();
    for (stage, last) in [("middle", false), ("last", true)] {
        for claimant in [Dtype::F32, Dtype::Bf16] {
            let other = if claimant == Dtype::F32 {
                Dtype::Bf16
            } else {
                Dtype::F32
            };
            let (claim, _) = segment(last, claimant, 0.0, h, None);
            let (_, exact) = segment(last, claimant, 0.0, h, Some(&claim));
            let (_, bits) = segment(last, claimant, 1e-7, h, Some(&claim));
            let (_, cross) = segment(last, other, 0.0, h, Some(&claim));
            for (what, far) in [
                ("same class", &exact),
                ("last bits", &bits),
                ("other dtype", &cross),
            ] {
                let row: Vec<String> = ks
                    .iter()
                    .map(|k| format!("{k}: {:.5}", upto(far, *k)))
                    .collect();
                eprintln!(
                    "{stage} stage, {claimant:?} claimant, {what}: worst within the first k steps {}",
                    row.join(", ")
                );
            }
            table.push((claimant, exact, bits, cross));
        }
    }
    for (claimant, exact, bits, cross) in &table {
        // The verifier's own class replays bit for bit: only the claim's bf16 wire rounding
        // is left (at most 2^-9 relative per value, about 0.002 over a tensor).
        assert!(upto(exact, exact.len()) < 0.004, "{claimant:?}: {exact:?}");
        // The window a verifier of another class replays (`CROSS_CLASS_STEPS` = 50 in
        // `control/src/trainer/stagecheck.rs`), in the claimant's dtype, stays far within the
        // tolerance on other hardware (last bits); so does even the other dtype.
        let k = 50;
        assert!(upto(bits, k) < 0.01, "{claimant:?}, last bits: {bits:?}");
        assert!(
            upto(cross, k) < 0.05,
            "{claimant:?}, other dtype: {cross:?}"
        );
    }
}
