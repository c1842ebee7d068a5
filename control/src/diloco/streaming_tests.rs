use super::*;
use crate::diloco::aggregate::{Aggregator, AggregatorKind, Input};

/// A small model: the names of a two-layer Llama (sorted, as the daemon's layout is), with
/// a few values each.
fn names() -> Vec<&'static str> {
    vec![
        "lm_head.weight",
        "model.embed_tokens.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.norm.weight",
    ]
}

fn initial() -> Vec<Vec<f32>> {
    [6usize, 9, 5, 7, 4, 8, 3]
        .iter()
        .enumerate()
        .map(|(t, &n)| (0..n).map(|j| ((t * 13 + j) as f32 * 0.37).sin()).collect())
        .collect()
}

/// One deterministic "inner step" of replica `r`: a gradient step towards the replica's own
/// target with a step-dependent wobble, so replicas drift apart as real ones do.
fn inner_step(local: &mut [Vec<f32>], r: usize, step: u64) {
    for (t, tensor) in local.iter_mut().enumerate() {
        for (j, v) in tensor.iter_mut().enumerate() {
            let target = ((r * 7 + t * 3 + j) as f32 * 0.91).cos();
            let wobble = ((step as f32) * 0.3 + (r + j) as f32).sin() * 0.01;
            *v -= 0.05 * (*v - target) + wobble;
        }
    }
}

fn aggregate(agg: &Aggregator, contributions: &[Vec<f32>]) -> Vec<f32> {
    let inputs: Vec<Input<'_>> = contributions
        .iter()
        .map(|c| Input {
            values: c,
            weight: 1.0,
        })
        .collect();
    agg.aggregate(&inputs).unwrap()
}

/// Today's DiLoCo, as `sync.rs` computes it: H inner steps, Δ = θ_start − θ_local per
/// tensor encoded with error feedback and decoded, aggregated in sender order, the outer
/// step from θ_start, every replica set to the result.
fn plain(
    h: u32,
    rounds: u32,
    replicas: usize,
    encoding: Encoding,
) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let agg = Aggregator::new(AggregatorKind::TrimmedMean);
    let opt = OuterOpt::default();
    let mut theta = initial();
    let mut momentum: Vec<Vec<f32>> = theta.iter().map(|t| vec![0.0; t.len()]).collect();
    let mut residuals = vec![vec![Vec::new(); theta.len()]; replicas];
    let mut locals = vec![theta.clone(); replicas];
    let mut step = 0;
    for _ in 0..rounds {
        let mut contributions = Vec::new();
        for _ in 0..h {
            step += 1;
            for (r, local) in locals.iter_mut().enumerate() {
                inner_step(local, r, step);
            }
        }
        for (r, local) in locals.iter().enumerate() {
            let mut own = Vec::new();
            for (i, (start, now)) in theta.iter().zip(local).enumerate() {
                let delta: Vec<f32> = start.iter().zip(now).map(|(a, b)| a - b).collect();
                let bytes = compress::encode(encoding, &delta, &mut residuals[r][i]);
                own.extend(compress::decode(encoding, &bytes, delta.len()).unwrap());
            }
            contributions.push(own);
        }
        let a = aggregate(&agg, &contributions);
        let mut off = 0;
        for (t, m) in theta.iter_mut().zip(momentum.iter_mut()) {
            let n = t.len();
            *t = opt.step(t, &a[off..off + n], m);
            off += n;
        }
        for local in &mut locals {
            local.clone_from(&theta);
        }
    }
    (theta, momentum)
}

/// Streaming DiLoCo over `steps` inner steps: every replica keeps its own [`State`] and
/// aggregates the decoded contributions of all (in sender order) when a fragment's merge is
/// due. Returns the replicas' states and local weights.
fn streaming(
    h: u32,
    settings: Settings,
    steps: u64,
    replicas: usize,
    encoding: Encoding,
) -> (Vec<State>, Vec<Vec<Vec<f32>>>) {
    let agg = Aggregator::new(AggregatorKind::TrimmedMean);
    let opt = OuterOpt::default();
    let schedule = Schedule::new(h, &settings).unwrap();
    let partition = Partition::new(&names(), settings.fragments).unwrap();
    let mut states: Vec<State> = (0..replicas)
        .map(|_| State::new(partition.clone(), initial()).unwrap())
        .collect();
    let mut locals = vec![initial(); replicas];
    // Contributions in flight, by fragment.
    let mut in_flight: Vec<Option<Vec<Vec<f32>>>> = vec![None; settings.fragments as usize];
    for step in 1..=steps {
        for (r, local) in locals.iter_mut().enumerate() {
            inner_step(local, r, step);
        }
        for p in schedule.sends_after(step) {
            let sent = states
                .iter_mut()
                .zip(&locals)
                .map(|(s, l)| s.encode(p, l, encoding, 1.0).unwrap().decoded)
                .collect();
            assert!(in_flight[p as usize].replace(sent).is_none());
        }
        for p in schedule.merges_after(step) {
            let contributions = in_flight[p as usize].take().unwrap();
            for (state, local) in states.iter_mut().zip(locals.iter_mut()) {
                let a = aggregate(&agg, &contributions);
                state.outer_step(p, &a, opt).unwrap();
                state
                    .merge(p, local, schedule.alpha(settings.alpha))
                    .unwrap();
            }
        }
    }
    (states, locals)
}

fn bits(v: &[Vec<f32>]) -> Vec<Vec<u32>> {
    v.iter()
        .map(|t| t.iter().map(|x| x.to_bits()).collect())
        .collect()
}

#[test]
fn fragments_interleave_layers_with_the_embedding_first_and_the_head_last() {
    let p = Partition::new(&names(), 2).unwrap();
    // lm_head, embed, l0, l0, l1, l1, norm
    assert_eq!(
        (0..7).map(|i| p.of(i)).collect::<Vec<_>>(),
        vec![1, 0, 0, 0, 1, 1, 1]
    );
    assert_eq!(p.tensors(0), vec![1, 2, 3]);
    let one = Partition::new(&names(), 1).unwrap();
    assert_eq!(one.tensors(0), (0..7).collect::<Vec<_>>());
    // Four layers over three fragments: 0 and 3 share one.
    let four = [
        "model.layers.0.a",
        "model.layers.1.a",
        "model.layers.2.a",
        "model.layers.3.a",
    ];
    let p = Partition::new(&four, 3).unwrap();
    assert_eq!(p.tensors(0), vec![0, 3]);
    // More fragments than layers (and ends), an unknown tensor: refused.
    assert_eq!(
        Partition::new(&names(), 4),
        Err(StreamingError::EmptyFragment {
            fragment: 2,
            fragments: 4
        })
    );
    assert!(matches!(
        Partition::new(&["model.layers.x.a"], 1),
        Err(StreamingError::Tensor(_))
    ));
}

#[test]
fn each_fragment_syncs_every_h_steps_at_its_own_offset() {
    let s = |fragments, overlap| Settings {
        fragments,
        overlap,
        alpha: 0.5,
    };
    let sch = Schedule::new(6, &s(3, 1)).unwrap();
    assert_eq!((sch.offset(0), sch.offset(1), sch.offset(2)), (2, 4, 0));
    let mut sends = Vec::new();
    let mut merges = Vec::new();
    for step in 1..=18 {
        sends.extend(sch.sends_after(step).into_iter().map(|p| (step, p)));
        merges.extend(sch.merges_after(step).into_iter().map(|p| (step, p)));
    }
    assert_eq!(
        sends,
        vec![
            (2, 0),
            (4, 1),
            (6, 2),
            (8, 0),
            (10, 1),
            (12, 2),
            (14, 0),
            (16, 1),
            (18, 2)
        ]
    );
    // Merged one step after each send.
    assert_eq!(
        merges,
        sends
            .iter()
            .map(|&(t, p)| (t + 1, p))
            .take(8)
            .collect::<Vec<_>>()
    );
    // One fragment: plain DiLoCo's boundaries.
    let one = Schedule::new(5, &s(1, 0)).unwrap();
    let at: Vec<u64> = (1..=15)
        .filter(|&t| !one.sends_after(t).is_empty())
        .collect();
    assert_eq!(at, vec![5, 10, 15]);
    assert_eq!(one.alpha(0.5), 0.0);
    assert_eq!(sch.alpha(0.5), 0.5);
    // P ≤ H, τ < H, α in [0, 1].
    assert!(matches!(
        Schedule::new(2, &s(3, 0)),
        Err(StreamingError::Fragments { .. })
    ));
    assert!(matches!(
        Schedule::new(4, &s(2, 4)),
        Err(StreamingError::Overlap { .. })
    ));
    let bad_alpha = Settings {
        alpha: 1.5,
        ..s(1, 0)
    };
    assert_eq!(
        Schedule::new(4, &bad_alpha),
        Err(StreamingError::Alpha(1.5))
    );
}

#[test]
fn one_fragment_without_overlap_is_plain_diloco_bit_for_bit() {
    for encoding in [Encoding::Bf16, Encoding::Int8] {
        let (theta, momentum) = plain(4, 5, 3, encoding);
        let (states, locals) = streaming(4, Settings::default(), 20, 3, encoding);
        for (state, local) in states.iter().zip(&locals) {
            assert_eq!(bits(&state.global), bits(&theta), "{encoding:?}");
            assert_eq!(bits(&state.momentum), bits(&momentum), "{encoding:?}");
            assert_eq!(bits(local), bits(&theta), "{encoding:?}");
            assert_eq!(state.syncs, vec![5]);
        }
    }
}

#[test]
fn replicas_aggregating_the_same_contributions_stay_bit_identical() {
    let settings = Settings {
        fragments: 2,
        overlap: 2,
        alpha: 0.5,
    };
    let (states, locals) = streaming(6, settings, 40, 3, Encoding::Int8);
    for s in &states[1..] {
        assert_eq!(bits(&s.global), bits(&states[0].global));
        assert_eq!(bits(&s.momentum), bits(&states[0].momentum));
        assert_eq!(s.syncs, states[0].syncs);
    }
    // Both fragments synced: sent after steps 3, 9, ..., 39 and 6, ..., 36, merged 2 steps
    // later (the send after 39 is still in flight).
    assert_eq!(states[0].syncs, vec![6, 6]);
    // The local weights are each replica's own (merged, not replaced) and differ.
    assert_ne!(bits(&locals[0]), bits(&locals[1]));
    // Each replica's residuals are its own too.
    assert_ne!(states[0].residuals, states[1].residuals);
}

#[test]
fn a_fragment_step_moves_only_its_tensors_and_the_merge_keeps_alpha_of_the_local() {
    let partition = Partition::new(&names(), 2).unwrap();
    let mut state = State::new(partition, initial()).unwrap();
    let before = state.global.clone();
    let n0: usize = state
        .partition
        .tensors(0)
        .iter()
        .map(|&i| before[i].len())
        .sum();
    state
        .outer_step(0, &vec![0.1; n0], OuterOpt::default())
        .unwrap();
    for (i, b) in before.iter().enumerate() {
        let moved = state.global[i] != *b;
        assert_eq!(moved, state.partition.of(i) == 0, "tensor {i}");
    }
    assert_eq!(state.syncs, vec![1, 0]);
    // A wrong-sized aggregate or an unknown fragment is an error, not a panic.
    assert!(state.outer_step(1, &[0.0; 3], OuterOpt::default()).is_err());
    assert!(state.outer_step(2, &[], OuterOpt::default()).is_err());
    let mut local: Vec<Vec<f32>> = state.global.iter().map(|t| vec![1.0; t.len()]).collect();
    state.merge(0, &mut local, 0.5).unwrap();
    for (i, tensor) in local.iter().enumerate() {
        for (l, g) in tensor.iter().zip(&state.global[i]) {
            let want = if state.partition.of(i) == 0 {
                0.5 + 0.5 * g
            } else {
                1.0
            };
            assert_eq!(*l, want);
        }
    }
    assert!(state.merge(0, &mut local[..3], 0.5).is_err());
}

#[test]
fn daemon_rounds_follow_the_schedule() {
    // One fragment: every round is H steps.
    assert_eq!(round_steps(500, 1, 0), 500);
    assert_eq!(round_steps(500, 0, 7), 500);
    // P rounds make H steps, and fragment q is sent after the steps the schedule names.
    for (h, p) in [(50u32, 2u32), (7, 3), (500, 4), (5, 5)] {
        let schedule = Schedule::new(
            h,
            &Settings {
                fragments: p,
                ..Settings::default()
            },
        )
        .unwrap();
        let mut step = 0u64;
        for round in 0..u64::from(3 * p) {
            let n = round_steps(h, p, round);
            assert!(n >= 1, "h {h} p {p} round {round}");
            step += u64::from(n);
            let q = (round % u64::from(p)) as u32;
            assert_eq!(
                schedule.sends_after(step),
                vec![q],
                "h {h} p {p} round {round}"
            );
        }
        assert_eq!(step, 3 * u64::from(h));
    }
}

#[test]
fn daemon_settings_are_checked_with_the_key_named() {
    assert_eq!(check_config(500, 4, 1, 0, 0.5), Ok(()));
    assert_eq!(check_config(500, 4, 5, 99, 0.0), Ok(()));
    let key = |r: Result<(), (&'static str, String)>| r.unwrap_err().0;
    // More fragments than layers + 1, than H, or none.
    assert_eq!(
        key(check_config(500, 4, 6, 0, 0.5)),
        "training.diloco_fragments"
    );
    assert_eq!(
        key(check_config(3, 4, 4, 0, 0.5)),
        "training.diloco_fragments"
    );
    assert_eq!(
        key(check_config(500, 4, 0, 0, 0.5)),
        "training.diloco_fragments"
    );
    // The overlap must end before the next round's send: below ⌊H/P⌋.
    assert_eq!(
        key(check_config(20, 2, 2, 10, 0.5)),
        "training.diloco_overlap_steps"
    );
    assert_eq!(check_config(20, 2, 2, 9, 0.5), Ok(()));
    assert_eq!(
        key(check_config(20, 2, 1, 20, 0.5)),
        "training.diloco_overlap_steps"
    );
    assert_eq!(
        key(check_config(20, 2, 2, 1, 1.5)),
        "training.diloco_merge_alpha"
    );
    assert_eq!(
        key(check_config(20, 2, 2, 1, f64::NAN)),
        "training.diloco_merge_alpha"
    );
}
