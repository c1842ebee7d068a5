//! TOPLOC-style checks of inference on the CPU backend (`neuroshard_shared::toploc`): a node
//! serves a generation with its KV cache and commits the top-k logits of every 32nd position;
//! a verifier recomputes the whole sequence with one prefill of the honest model and compares.
//! Measures the honest distance (decode vs prefill, CPU vs CPU) and the distance of two cheats
//! (a model from another seed; a truncated model that skips its middle layers), and the cost of
//! the check. Run with `--nocapture` for the figures (BENCHMARKS.md).

use std::time::Instant;

use neuroshard_shared::model::ModelConfig;
use neuroshard_shared::toploc::{
    self, ChunkCommit, ChunkDistance, DEFAULT_TOP_K, Tolerance, commitment_bytes,
};

use super::stage_gen::{PassInput, StageCache};
use super::{Model, StageInput, StageSpec};
use crate::backend::cpu::CpuBackend;

fn stage(cfg: &ModelConfig, start: u32, end: u32, seed: u64) -> Model<CpuBackend> {
    let spec = StageSpec {
        layer_start: start,
        layer_end: end,
        has_embedding: start == 0,
        has_head: end == cfg.layers,
    };
    Model::new(CpuBackend::new(), cfg.clone(), spec, seed).unwrap()
}

/// A served model: one or more stages run in order with their KV caches.
struct Server {
    stages: Vec<Model<CpuBackend>>,
    caches: Vec<StageCache<CpuBackend>>,
}

impl Server {
    fn new(stages: Vec<Model<CpuBackend>>, rows: usize) -> Server {
        let caches = stages
            .iter()
            .map(|s| s.stage_cache(rows).unwrap())
            .collect();
        Server { stages, caches }
    }

    /// Feeds `tokens`; the next-token logits of the last one.
    fn pass(&mut self, tokens: &[u32]) -> Vec<f32> {
        let mut x = self.stages[0]
            .stage_pass(&mut self.caches[0], PassInput::Ids(tokens))
            .unwrap();
        for (s, c) in self.stages.iter().zip(&mut self.caches).skip(1) {
            x = s.stage_pass(c, PassInput::Acts(&x)).unwrap();
        }
        x
    }

    /// Greedy generation of `n` tokens: the tokens and the logits each was drawn from.
    fn generate(&mut self, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
        let (mut tokens, mut rows) = (Vec::new(), Vec::new());
        let mut input = prompt.to_vec();
        for _ in 0..n {
            let logits = self.pass(&input);
            let next = logits
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0 as u32;
            tokens.push(next);
            rows.push(logits);
            input = vec![next];
        }
        (tokens, rows)
    }
}

/// The verifier: one prefill of prompt + generated tokens (all but the last) with the honest
/// model, compared with the served commitment at the rows that drew the generated tokens.
fn verify(
    honest: &mut Model<CpuBackend>,
    prompt: &[u32],
    generated: &[u32],
    commits: &[ChunkCommit],
) -> Vec<ChunkDistance> {
    let seq: Vec<u32> = prompt
        .iter()
        .chain(&generated[..generated.len() - 1])
        .copied()
        .collect();
    honest
        .forward(7, 1, seq.len(), StageInput::Ids(&seq), None)
        .unwrap();
    let first = prompt.len() - 1;
    // Served rows are over the live vocabulary (a prefix of the head's).
    let live = honest.v_live;
    honest
        .with_output(7, |logits, [_, _, v]| {
            toploc::compare_sequence(commits, generated.len(), |i| {
                &logits[(first + i) * v..(first + i) * v + live]
            })
            .expect("one chunk per chunk")
        })
        .unwrap()
}

fn worst(ds: &[ChunkDistance]) -> ChunkDistance {
    ds.iter().fold(
        ChunkDistance {
            overlap: 1.0,
            ..ChunkDistance::default()
        },
        |w, d| ChunkDistance {
            overlap: w.overlap.min(d.overlap),
            exponent_mismatches: w.exponent_mismatches.max(d.exponent_mismatches),
            mantissa_mean: w.mantissa_mean.max(d.mantissa_mean),
            mantissa_median: w.mantissa_median.max(d.mantissa_median),
        },
    )
}

#[test]
fn honest_serving_passes_and_foreign_or_truncated_models_fail() {
    let cfg = ModelConfig::preset("default").unwrap();
    let n = cfg.layers;
    let generated_tokens = 128;
    let rows = 160;
    let tol = Tolerance::default();
    let mut honest = stage(&cfg, 0, n, 42);
    let prompts: [&[u32]; 3] = [
        &[1, 17, 99, 5, 230, 7, 64, 300],
        &[1, 1000, 3, 44],
        &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
    ];
    let (mut honest_all, mut seed_all, mut trunc_all) = (Vec::new(), Vec::new(), Vec::new());
    let (mut serve_s, mut verify_s) = (0.0, 0.0);
    for prompt in prompts {
        // Honest: the full model of seed 42, decoding with its KV cache.
        let t = Instant::now();
        let mut server = Server::new(vec![stage(&cfg, 0, n, 42)], rows);
        let (tokens, logits) = server.generate(prompt, generated_tokens);
        serve_s += t.elapsed().as_secs_f64();
        let commits = toploc::commit_sequence(tokens.len(), DEFAULT_TOP_K, |i| &logits[i]);
        let t = Instant::now();
        let d = verify(&mut honest, prompt, &tokens, &commits);
        verify_s += t.elapsed().as_secs_f64();
        honest_all.extend(d);
        // Another model (seed 43) served in its place.
        let mut server = Server::new(vec![stage(&cfg, 0, n, 43)], rows);
        let (tokens, logits) = server.generate(prompt, generated_tokens);
        let commits = toploc::commit_sequence(tokens.len(), DEFAULT_TOP_K, |i| &logits[i]);
        seed_all.extend(verify(&mut honest, prompt, &tokens, &commits));
        // Truncated: layer 0 and the last layer of the honest model, the middle skipped.
        let mut server = Server::new(vec![stage(&cfg, 0, 1, 42), stage(&cfg, n - 1, n, 42)], rows);
        let (tokens, logits) = server.generate(prompt, generated_tokens);
        let commits = toploc::commit_sequence(tokens.len(), DEFAULT_TOP_K, |i| &logits[i]);
        trunc_all.extend(verify(&mut honest, prompt, &tokens, &commits));
    }
    let (h, s, tr) = (worst(&honest_all), worst(&seed_all), worst(&trunc_all));
    let caught = |ds: &[ChunkDistance]| ds.iter().filter(|d| !d.within(&tol)).count();
    eprintln!(
        "toploc (default model, CPU vs CPU, k = {DEFAULT_TOP_K}, {} chunks of 32 tokens each):",
        honest_all.len()
    );
    eprintln!(
        "  honest    worst: {h:?}; outside tolerance: {}",
        caught(&honest_all)
    );
    eprintln!(
        "  seed 43   worst: {s:?}; outside tolerance: {} of {}",
        caught(&seed_all),
        seed_all.len()
    );
    eprintln!(
        "  truncated worst: {tr:?}; outside tolerance: {} of {}",
        caught(&trunc_all),
        trunc_all.len()
    );
    eprintln!(
        "  serving {:.3} s, verifying (one prefill each) {:.3} s for {} generated tokens; evidence {} bytes per 1k tokens",
        serve_s,
        verify_s,
        3 * generated_tokens,
        commitment_bytes(1000, DEFAULT_TOP_K)
    );
    assert_eq!(
        caught(&honest_all),
        0,
        "an honest chunk outside the tolerance: {h:?}"
    );
    assert_eq!(caught(&seed_all), seed_all.len(), "{s:?}");
    assert_eq!(caught(&trunc_all), trunc_all.len(), "{tr:?}");
}

/// The server's own path: a batched sequence that commits (`start_sequence_committed`,
/// `decode_batch`) carries a commitment on the last token of every chunk and of the
/// sequence, which a prefill of the honest model reproduces; the same model serving
/// truncated (`Serving::truncated`, the adversary tests' cheat) is refused in every chunk.
#[test]
fn batched_serving_commits_per_chunk_and_truncated_serving_is_caught() {
    let cfg = ModelConfig::preset("default").unwrap();
    let n = cfg.layers;
    let tol = Tolerance::default();
    let mut honest = stage(&cfg, 0, n, 42);
    let prompt: &[u32] = &[1, 17, 99, 5, 230, 7, 64, 300];
    let sampling = super::generate::Sampling {
        temperature: 0.8,
        top_p: 0.95,
        top_k: 40,
        seed: 7,
    };
    let serve = |truncated: bool| {
        let mut m = stage(&cfg, 0, n, 42);
        m.serving.truncated = truncated;
        let (mut seq, first) = m
            .start_sequence_committed(prompt, 70, sampling, DEFAULT_TOP_K)
            .unwrap();
        let mut out = vec![first];
        let mut scratch = None;
        while out.last().unwrap().finish.is_none() {
            out.extend(m.decode_batch(&mut [&mut seq], &mut scratch).unwrap());
        }
        out
    };
    let out = serve(false);
    let tokens: Vec<u32> = out.iter().map(|e| e.token).collect();
    let at: Vec<u32> = out
        .iter()
        .filter(|e| e.commit.is_some())
        .map(|e| e.index)
        .collect();
    let expected: Vec<u32> = toploc::committed_positions(tokens.len())
        .map(|p| p as u32)
        .collect();
    assert_eq!(at, expected);
    let commits: Vec<ChunkCommit> = out.into_iter().filter_map(|e| e.commit).collect();
    let d = verify(&mut honest, prompt, &tokens, &commits);
    assert!(d.iter().all(|d| d.within(&tol)), "{d:?}");
    let out = serve(true);
    let tokens: Vec<u32> = out.iter().map(|e| e.token).collect();
    let commits: Vec<ChunkCommit> = out.into_iter().filter_map(|e| e.commit).collect();
    let d = verify(&mut honest, prompt, &tokens, &commits);
    assert!(d.iter().all(|d| !d.within(&tol)), "{d:?}");
}

/// The cost of committing on the serving path: batched decode of 4 sequences of 160 tokens
/// with and without the commitment (one top-k of the live vocabulary per 32 tokens),
/// alternated, best of five. Run with `--nocapture` for the figures (BENCHMARKS.md).
#[test]
fn committing_costs_little_on_the_decode_path() {
    let cfg = ModelConfig::preset("default").unwrap();
    let m = stage(&cfg, 0, cfg.layers, 42);
    let sampling = super::generate::Sampling {
        temperature: 0.8,
        top_p: 0.95,
        top_k: 40,
        seed: 7,
    };
    let run = |k: usize| {
        let mut seqs: Vec<_> = (0..4u32)
            .map(|i| {
                m.start_sequence_committed(&[1, 17 + i, 99, 5], 160, sampling, k)
                    .unwrap()
                    .0
            })
            .collect();
        let mut scratch = None;
        let (mut tokens, mut commits) = (0usize, 0usize);
        let t = Instant::now();
        while !seqs.iter().any(|s| s.finished()) {
            let mut refs: Vec<_> = seqs.iter_mut().collect();
            let out = m.decode_batch(&mut refs, &mut scratch).unwrap();
            tokens += out.len();
            commits += out.iter().filter(|e| e.commit.is_some()).count();
        }
        (tokens as f64 / t.elapsed().as_secs_f64(), commits)
    };
    // Alternated, best of five each: the machine's other load hits both alike.
    let (mut plain, mut committed, mut none, mut chunks) = (0.0f64, 0.0f64, 0, 0);
    for _ in 0..5 {
        let (r, n) = run(0);
        plain = plain.max(r);
        none = n;
        let (r, n) = run(DEFAULT_TOP_K);
        committed = committed.max(r);
        chunks = n;
    }
    eprintln!(
        "decode, 4 sequences, default model: {plain:.0} tokens/s plain, {committed:.0} tokens/s \
         committing ({chunks} chunks)"
    );
    assert_eq!(none, 0);
    assert!(chunks > 0);
}
