//! Model tests on the CPU backend: stage chaining, overfitting, determinism, generation.

use neuroshard_shared::model::ModelConfig;

use super::generate::Sampling;
use super::*;
use crate::backend::cpu::CpuBackend;
use crate::optim::{AdamState, OptimConfig};

fn tiny() -> ModelConfig {
    ModelConfig::preset("tiny").unwrap()
}

fn batch(b: usize, t: usize, vocab: u32, seed: u64) -> (Vec<u32>, Vec<u32>) {
    let mut rng = params::SplitMix64(seed);
    let ids: Vec<u32> = (0..b * (t + 1))
        .map(|_| (rng.next_u64() % vocab as u64) as u32)
        .collect();
    let mut inp = Vec::new();
    let mut lab = Vec::new();
    for r in 0..b {
        inp.extend_from_slice(&ids[r * (t + 1)..r * (t + 1) + t]);
        lab.extend_from_slice(&ids[r * (t + 1) + 1..(r + 1) * (t + 1)]);
    }
    (inp, lab)
}

fn stage(cfg: &ModelConfig, a: u32, b: u32, emb: bool, head: bool) -> Model<CpuBackend> {
    let spec = StageSpec {
        layer_start: a,
        layer_end: b,
        has_embedding: emb,
        has_head: head,
    };
    Model::new(CpuBackend::new(), cfg.clone(), spec, 42).unwrap()
}

fn close(what: &str, a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}

#[test]
fn split_stages_chain_to_the_full_model() {
    let cfg = tiny();
    let (b, t) = (2, 9);
    let (ids, labels) = batch(b, t, cfg.vocab_size, 3);
    let mut full = stage(&cfg, 0, 2, true, true);
    let mut s1 = stage(&cfg, 0, 1, true, false);
    let mut s2 = stage(&cfg, 1, 2, false, true);
    let loss_full = full
        .forward(7, b, t, StageInput::Ids(&ids), Some(&labels))
        .unwrap()
        .unwrap();
    assert!(
        s1.forward(7, b, t, StageInput::Ids(&ids), None)
            .unwrap()
            .is_none()
    );
    let acts = s1
        .with_output(7, |v, shape| {
            assert_eq!(shape, [b, t, cfg.hidden as usize]);
            v.to_vec()
        })
        .unwrap();
    let loss_split = s2
        .forward(7, b, t, StageInput::Acts(&acts), Some(&labels))
        .unwrap()
        .unwrap();
    assert_eq!(loss_full, loss_split, "same arithmetic in the same order");
    full.backward(7, None).unwrap();
    s2.backward(7, None).unwrap();
    let dx = s2.with_grad_input(|g| g.to_vec()).unwrap();
    s1.backward(7, Some(&dx)).unwrap();
    // Every parameter gradient of the full model equals the one of the stage holding it.
    for p in 0..full.params.len() {
        let name = &full.params[p].name;
        let (m, i) = match s1.params.iter().position(|q| &q.name == name) {
            Some(i) => (&s1, i),
            None => (&s2, s2.params.iter().position(|q| &q.name == name).unwrap()),
        };
        close(
            name,
            &m.param_grad(i).unwrap(),
            &full.param_grad(p).unwrap(),
            1e-6,
        );
        assert_eq!(
            m.param_values(i).unwrap(),
            full.param_values(p).unwrap(),
            "{name} init"
        );
    }
    assert_eq!(full.outstanding(), 0);
}

#[test]
fn a_middle_stage_maps_activations_both_ways() {
    let mut cfg = tiny();
    cfg.layers = 3;
    let (b, t) = (1, 5);
    let (ids, labels) = batch(b, t, cfg.vocab_size, 4);
    let mut full = stage(&cfg, 0, 3, true, true);
    let mut s = [
        stage(&cfg, 0, 1, true, false),
        stage(&cfg, 1, 2, false, false),
        stage(&cfg, 2, 3, false, true),
    ];
    let lf = full
        .forward(1, b, t, StageInput::Ids(&ids), Some(&labels))
        .unwrap()
        .unwrap();
    s[0].forward(1, b, t, StageInput::Ids(&ids), None).unwrap();
    let a0 = s[0].with_output(1, |v, _| v.to_vec()).unwrap();
    s[1].forward(1, b, t, StageInput::Acts(&a0), None).unwrap();
    let a1 = s[1].with_output(1, |v, _| v.to_vec()).unwrap();
    let ls = s[2]
        .forward(1, b, t, StageInput::Acts(&a1), Some(&labels))
        .unwrap()
        .unwrap();
    assert_eq!(lf, ls);
    s[2].backward(1, None).unwrap();
    let g2 = s[2].with_grad_input(|g| g.to_vec()).unwrap();
    s[1].backward(1, Some(&g2)).unwrap();
    let g1 = s[1].with_grad_input(|g| g.to_vec()).unwrap();
    s[0].backward(1, Some(&g1)).unwrap();
    full.backward(1, None).unwrap();
    close(
        "embedding grad",
        &s[0].param_grad(0).unwrap(),
        &full.param_grad(0).unwrap(),
        1e-6,
    );
}

#[test]
fn loss_falls_when_overfitting_a_fixed_batch() {
    let cfg = tiny();
    let (b, t) = (2, 16);
    let (ids, labels) = batch(b, t, cfg.vocab_size, 5);
    let mut m = stage(&cfg, 0, 2, true, true);
    let mut opt = AdamState::new(&m).unwrap();
    let oc = OptimConfig {
        lr: 3e-3,
        ..OptimConfig::default()
    };
    let mut losses = Vec::new();
    for step in 0..50 {
        let loss = m
            .forward(step, b, t, StageInput::Ids(&ids), Some(&labels))
            .unwrap()
            .unwrap();
        m.backward(step, None).unwrap();
        let norm = opt.step(&mut m, &oc, oc.lr).unwrap();
        assert!(norm.is_finite() && norm > 0.0);
        losses.push(loss);
    }
    let first = losses[0];
    assert!(
        (first - (cfg.vocab_size as f32).ln()).abs() < 0.1,
        "initial loss {first} ~ ln V"
    );
    let last = *losses.last().unwrap();
    assert!(
        last < 0.5 * first,
        "loss went {first} -> {last}: {losses:?}"
    );
}

#[test]
fn two_builds_with_one_seed_hash_the_same() {
    let cfg = tiny();
    let a = stage(&cfg, 0, 2, true, true);
    let b = stage(&cfg, 0, 2, true, true);
    assert_eq!(a.hash().unwrap(), b.hash().unwrap());
    let other = Model::new(CpuBackend::new(), cfg.clone(), StageSpec::full(&cfg), 43).unwrap();
    assert_ne!(a.hash().unwrap(), other.hash().unwrap());
}

#[test]
fn bad_inputs_are_errors() {
    let cfg = tiny();
    let mut m = stage(&cfg, 0, 2, true, true);
    let big = vec![cfg.vocab_size; 4];
    assert!(matches!(
        m.forward(0, 1, 4, StageInput::Ids(&big), None),
        Err(ModelError::Input(_))
    ));
    assert!(matches!(
        m.forward(0, 1, 4, StageInput::Ids(&[1, 2, 3]), None),
        Err(ModelError::Input(_))
    ));
    assert!(matches!(
        m.forward(0, 1, 4, StageInput::Acts(&[0.0; 4]), None),
        Err(ModelError::Input(_))
    ));
    let long = vec![1u32; cfg.max_seq as usize + 1];
    assert!(
        m.forward(0, 1, long.len(), StageInput::Ids(&long), None)
            .is_err()
    );
    assert!(matches!(
        m.backward(99, None),
        Err(ModelError::NoActivations { .. })
    ));
    m.max_outstanding = 2;
    m.forward(1, 1, 2, StageInput::Ids(&[1, 2]), None).unwrap();
    m.forward(2, 1, 2, StageInput::Ids(&[1, 2]), None).unwrap();
    assert!(matches!(
        m.forward(3, 1, 2, StageInput::Ids(&[1, 2]), None),
        Err(ModelError::TooManyOutstanding { .. })
    ));
    // Backward without labels or logits gradient on the head stage.
    assert!(m.backward(1, None).is_err());
    let spec = StageSpec {
        layer_start: 1,
        layer_end: 1,
        has_embedding: true,
        has_head: false,
    };
    assert!(Model::new(CpuBackend::new(), cfg.clone(), spec, 1).is_err());
}

#[test]
fn cached_generation_matches_full_forward_argmax() {
    let cfg = tiny();
    let mut m = stage(&cfg, 0, 2, true, true);
    let prompt = [1u32, 40, 41, 42, 300];
    let greedy = Sampling {
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
        seed: 0,
    };
    let mut got = Vec::new();
    m.generate(&prompt, 6, greedy, &mut |tok, _, _| {
        got.push(tok);
        true
    })
    .unwrap();
    assert!(!got.is_empty());
    // Recompute each step without the cache.
    let mut seq = prompt.to_vec();
    let v = cfg.vocab_size as usize;
    for (i, &tok) in got.iter().enumerate() {
        let t = seq.len();
        m.forward(100 + i as u64, 1, t, StageInput::Ids(&seq), None)
            .unwrap();
        let want = m
            .with_output(100 + i as u64, |l, _| {
                let last = &l[(t - 1) * v..t * v];
                (0..v).max_by(|&a, &b| last[a].total_cmp(&last[b])).unwrap() as u32
            })
            .unwrap();
        m.clear_activations();
        assert_eq!(tok, want, "token {i}");
        seq.push(tok);
    }
}

/// Tokens of `prompt` decoded alone by the sequential path.
fn alone(m: &Model<CpuBackend>, prompt: &[u32], max_tokens: u32, s: Sampling) -> Vec<u32> {
    let mut got = Vec::new();
    m.generate(prompt, max_tokens, s, &mut |tok, _, _| {
        got.push(tok);
        true
    })
    .unwrap();
    got
}

#[test]
fn batched_decoding_matches_each_request_alone() {
    use super::batch::{BatchScratch, Sequence};
    let cfg = tiny();
    let m = stage(&cfg, 0, 2, true, true);
    let sampled = |seed| Sampling {
        temperature: 0.9,
        top_p: 0.95,
        top_k: 40,
        seed,
    };
    let greedy = Sampling {
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
        seed: 0,
    };
    // (arrives before decode step, prompt, max_tokens, sampling)
    let requests: Vec<(usize, Vec<u32>, u32, Sampling)> = vec![
        (0, vec![1, 40, 41, 42, 300], 12, greedy),
        (0, vec![7, 8], 20, sampled(11)),
        (0, vec![], 5, sampled(12)),
        (3, vec![100, 200, 300, 400, 500, 510], 9, greedy),
        (3, vec![55], 15, sampled(13)),
        (7, vec![9, 9, 9], 4, sampled(14)),
    ];
    let mut got: Vec<Vec<u32>> = vec![Vec::new(); requests.len()];
    let mut active: Vec<(usize, Sequence<CpuBackend>)> = Vec::new();
    let mut scratch: Option<BatchScratch<CpuBackend>> = None;
    let mut widest = 0;
    for step in 0..40 {
        for (i, (at, prompt, max_tokens, s)) in requests.iter().enumerate() {
            if *at == step {
                let (seq, first) = m.start_sequence(prompt, *max_tokens, *s).unwrap();
                got[i].push(first.token);
                if first.finish.is_none() {
                    active.push((i, seq));
                }
            }
        }
        widest = widest.max(active.len());
        let mut refs: Vec<&mut Sequence<CpuBackend>> = active.iter_mut().map(|(_, s)| s).collect();
        let out = m.decode_batch(&mut refs, &mut scratch).unwrap();
        for ((i, _), e) in active.iter().zip(&out) {
            assert_eq!(e.index as usize, got[*i].len());
            got[*i].push(e.token);
        }
        // Finished sequences leave; the others continue.
        active.retain(|(_, s)| !s.finished());
    }
    assert!(active.is_empty());
    assert!(widest >= 4, "the batch held {widest} sequences at most");
    for (i, (_, prompt, max_tokens, s)) in requests.iter().enumerate() {
        assert_eq!(got[i], alone(&m, prompt, *max_tokens, *s), "request {i}");
    }
}

#[test]
fn sequences_refuse_bad_input_and_reserve_their_length() {
    use super::batch::{kv_cache_bytes, reserved_rows};
    let cfg = tiny();
    let m = stage(&cfg, 0, 2, true, true);
    let s = Sampling {
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
        seed: 0,
    };
    assert!(m.start_sequence(&[cfg.vocab_size], 4, s).is_err());
    assert!(m.start_sequence(&[5], 0, s).is_err());
    let long = vec![5u32; cfg.max_seq as usize];
    assert!(m.start_sequence(&long, 4, s).is_err());
    let (seq, _) = m.start_sequence(&[5, 6, 7], 10, s).unwrap();
    assert_eq!(seq.rows(), 13);
    assert_eq!(reserved_rows(&cfg, 3, u32::MAX), cfg.max_seq as usize);
    assert_eq!(
        kv_cache_bytes(&cfg, 13),
        cfg.layers as u64 * 2 * 13 * cfg.kv_heads as u64 * cfg.head_dim() as u64 * 4
    );
    // A stage without the head cannot generate.
    let part = stage(&cfg, 0, 1, true, false);
    assert!(part.start_sequence(&[5], 4, s).is_err());
}

/// Ragged batch wider than the decode kernels' blocks: 11 sequences with prompts of 1 to 37
/// tokens (caches of different lengths), a model whose widths are not multiples of the
/// vector width (hidden 72, head dim 18, ffn 100), all admitted before one shared decode
/// loop: each gets exactly the tokens it gets alone.
#[test]
fn ragged_batch_matches_each_request_alone() {
    use super::batch::{BatchScratch, Sequence};
    let cfg = ModelConfig {
        hidden: 72,
        heads: 4,
        kv_heads: 2,
        ffn: 100,
        ..tiny()
    };
    cfg.validate().unwrap();
    let m = Model::new(CpuBackend::new(), cfg.clone(), StageSpec::full(&cfg), 7).unwrap();
    let requests: Vec<(Vec<u32>, u32, Sampling)> = (0..11u32)
        .map(|i| {
            let len = [1, 37, 5, 12, 2, 30, 8, 19, 3, 25, 14][i as usize];
            let prompt = (0..len).map(|j| 3 + (i * 31 + j * 7) % 500).collect();
            let s = Sampling {
                temperature: if i % 3 == 0 { 0.0 } else { 0.8 },
                top_p: 0.9,
                top_k: 0,
                seed: 100 + i as u64,
            };
            (prompt, 6 + i % 5 * 3, s)
        })
        .collect();
    let mut got: Vec<Vec<u32>> = vec![Vec::new(); requests.len()];
    let mut active: Vec<(usize, Sequence<CpuBackend>)> = Vec::new();
    for (i, (prompt, max_tokens, s)) in requests.iter().enumerate() {
        let (seq, first) = m.start_sequence(prompt, *max_tokens, *s).unwrap();
        got[i].push(first.token);
        if first.finish.is_none() {
            active.push((i, seq));
        }
    }
    assert!(
        active.len() >= 9,
        "only {} sequences in the batch",
        active.len()
    );
    let mut scratch: Option<BatchScratch<CpuBackend>> = None;
    while !active.is_empty() {
        let mut refs: Vec<&mut Sequence<CpuBackend>> = active.iter_mut().map(|(_, s)| s).collect();
        let out = m.decode_batch(&mut refs, &mut scratch).unwrap();
        for ((i, _), e) in active.iter().zip(&out) {
            got[*i].push(e.token);
        }
        active.retain(|(_, s)| !s.finished());
    }
    for (i, (prompt, max_tokens, s)) in requests.iter().enumerate() {
        assert_eq!(got[i], alone(&m, prompt, *max_tokens, *s), "request {i}");
    }
}
