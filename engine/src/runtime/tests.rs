//! Runtime tests: the commands as the server calls them, through a real shm segment.

use neuroshard_proto::engine as pb;
use neuroshard_shared::shm::{Segment, Tensor, TensorRef};

use super::*;

fn segment(tag: &str) -> Segment {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let name = format!("/nsrt-{tag}-{}-{nanos}", std::process::id());
    Segment::create(&name, 8, 4 << 20).unwrap().0
}

fn load(
    rt: &mut Runtime,
    start: u32,
    end: u32,
    emb: bool,
    head: bool,
    lr: f32,
) -> pb::LoadModelReply {
    load_clip(rt, start, end, emb, head, lr, 0.0)
}

fn load_clip(
    rt: &mut Runtime,
    start: u32,
    end: u32,
    emb: bool,
    head: bool,
    lr: f32,
    clip: f32,
) -> pb::LoadModelReply {
    rt.load_model(&load_request(start, end, emb, head, lr, clip))
        .unwrap()
}

/// LoadModel of layers `start..end` of `tiny` (seed 11, node "node-a", batch 4 × 32).
fn load_request(
    start: u32,
    end: u32,
    emb: bool,
    head: bool,
    lr: f32,
    clip: f32,
) -> pb::LoadModelRequest {
    pb::LoadModelRequest {
        model: Some(pb::ModelSpec {
            preset: "tiny".into(),
            ..Default::default()
        }),
        layer_start: start,
        layer_end: end,
        has_embedding: emb,
        has_head: head,
        seed: 11,
        train: Some(pb::TrainSpec {
            learning_rate: lr,
            clip_norm: clip,
            batch_size: 4,
            seq_len: 32,
            ..Default::default()
        }),
        node_id: "node-a".into(),
        ..Default::default()
    }
}

fn pbref(r: TensorRef) -> Option<pb::TensorRef> {
    Some(pb::TensorRef {
        slot: r.slot,
        seq: r.seq,
    })
}

fn write_u32(seg: &Segment, slot: u32, shape: &[u64], v: &[u32]) -> Option<pb::TensorRef> {
    let t = Tensor::from_u32(shape, v);
    pbref(seg.write(slot, t.dtype, &t.shape, &t.bytes).unwrap())
}

#[test]
fn commands_need_a_model_first() {
    let mut rt = Runtime::new(DeviceChoice::Cpu).unwrap();
    assert!(matches!(rt.model_hash(), Err(RuntimeError::NoModel)));
    assert!(matches!(
        rt.train_step(&pb::TrainStepRequest::default()),
        Err(RuntimeError::NoModel)
    ));
    assert!(!rt.health().model_loaded);
}

#[test]
fn pipeline_through_shm_equals_the_full_model() {
    let seg = segment("pipe");
    let mut full = Runtime::new(DeviceChoice::Cpu).unwrap();
    let mut s1 = Runtime::new(DeviceChoice::Cpu).unwrap();
    let mut s2 = Runtime::new(DeviceChoice::Cpu).unwrap();
    // Clipping is per node (over its held gradients): switch it off so one step of the split
    // model is exactly the step of the whole model.
    let h_full = load_clip(&mut full, 0, 0, false, false, 1e-3, 1e9);
    load_clip(&mut s1, 0, 1, true, false, 1e-3, 1e9);
    load_clip(&mut s2, 1, 2, false, true, 1e-3, 1e9);
    let (b, t) = (2u64, 6u64);
    let ids: Vec<u32> = (0..12).map(|i| 20 + i * 7).collect();
    let labels: Vec<u32> = (0..12).map(|i| 30 + i * 5).collect();
    let input = write_u32(&seg, 0, &[b, t], &ids);
    let lab = write_u32(&seg, 1, &[b, t], &labels);
    let f = full
        .forward(
            &pb::ForwardRequest {
                input,
                labels: lab,
                output_slot: 2,
                micro_batch: 1,
            },
            &seg,
        )
        .unwrap();
    let input = write_u32(&seg, 0, &[b, t], &ids);
    let a = s1
        .forward(
            &pb::ForwardRequest {
                input,
                labels: None,
                output_slot: 2,
                micro_batch: 1,
            },
            &seg,
        )
        .unwrap();
    let acts = seg
        .read(TensorRef {
            slot: 2,
            seq: a.output.unwrap().seq,
        })
        .unwrap();
    assert_eq!(acts.shape, vec![b, t, 64]);
    let lab = write_u32(&seg, 1, &[b, t], &labels);
    let l = s2
        .forward(
            &pb::ForwardRequest {
                input: a.output,
                labels: lab,
                output_slot: 3,
                micro_batch: 1,
            },
            &seg,
        )
        .unwrap();
    assert_eq!(f.loss, l.loss);
    assert!(l.loss.unwrap() > 5.0);
    full.backward(
        &pb::BackwardRequest {
            grad_output: None,
            grad_input_slot: 4,
            micro_batch: 1,
        },
        &seg,
    )
    .unwrap();
    let g = s2
        .backward(
            &pb::BackwardRequest {
                grad_output: None,
                grad_input_slot: 4,
                micro_batch: 1,
            },
            &seg,
        )
        .unwrap();
    let r = s1
        .backward(
            &pb::BackwardRequest {
                grad_output: g.grad_input,
                grad_input_slot: 5,
                micro_batch: 1,
            },
            &seg,
        )
        .unwrap();
    assert!(
        r.grad_input.is_none(),
        "the first stage has no input gradient"
    );
    // One optimizer step on every node: the stages' weights must equal the full model's.
    for rt in [&mut full, &mut s1, &mut s2] {
        let st = rt
            .optimizer_step(&pb::OptimizerStepRequest {
                learning_rate: 0.0,
                global_norm: None,
            })
            .unwrap();
        assert_eq!(st.step, 1);
    }
    let dir = tempfile::tempdir().unwrap();
    let export = |rt: &mut Runtime, name: &str| {
        let p = dir.path().join(name);
        rt.export_weights(
            &pb::ExportWeightsRequest {
                dest: Some(pb::export_weights_request::Dest::Path(
                    p.display().to_string(),
                )),
                format: "safetensors".into(),
                sources: Vec::new(),
            },
            None,
        )
        .unwrap();
        crate::checkpoint::read_tensor_file(&p).unwrap().tensors
    };
    let wf = export(&mut full, "full");
    let w1 = export(&mut s1, "s1");
    let w2 = export(&mut s2, "s2");
    assert_eq!(w1.len() + w2.len(), wf.len());
    for (name, (_, v)) in w1.iter().chain(w2.iter()) {
        let (_, want) = &wf[name];
        for (a, b) in v.iter().zip(want) {
            assert!((a - b).abs() <= 1e-6, "{name}: {a} vs {b}");
        }
    }
    assert_ne!(
        full.model_hash().unwrap().model_hash,
        h_full.model_hash,
        "weights moved"
    );
    // A stale reference is refused, not read.
    let stale = pb::ForwardRequest {
        input: write_u32(&seg, 0, &[b, t], &ids),
        labels: None,
        output_slot: 2,
        micro_batch: 9,
    };
    let mut bad = stale;
    bad.input.as_mut().unwrap().seq += 1;
    assert!(matches!(s1.forward(&bad, &seg), Err(RuntimeError::Shm(_))));
    // Activations into the embedding stage, ids into a middle stage: clear errors.
    assert!(s2.forward(&stale, &seg).is_err());
}

#[test]
fn train_step_learns_on_the_builtin_corpus() {
    let mut rt = Runtime::new(DeviceChoice::Cpu).unwrap();
    load(&mut rt, 0, 0, false, false, 3e-3);
    let mut losses = Vec::new();
    for i in 0..40 {
        let r = rt.train_step(&pb::TrainStepRequest::default()).unwrap();
        assert_eq!(r.step, i + 1);
        assert_eq!(r.tokens, 4 * 32);
        losses.push(r.loss);
    }
    let first: f32 = losses[..5].iter().sum::<f32>() / 5.0;
    let last: f32 = losses[35..].iter().sum::<f32>() / 5.0;
    assert!(last < first - 0.5, "loss {first} -> {last}: {losses:?}");
}

#[test]
fn checkpoint_restore_resumes_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ck").join("node.safetensors");
    let mut a = Runtime::new(DeviceChoice::Cpu).unwrap();
    load(&mut a, 0, 0, false, false, 1e-3);
    for _ in 0..3 {
        a.train_step(&pb::TrainStepRequest::default()).unwrap();
    }
    let ck = a
        .checkpoint(&pb::CheckpointRequest {
            path: path.display().to_string(),
        })
        .unwrap();
    assert_eq!(ck.step, 3);
    let hash = a.model_hash().unwrap().model_hash;
    let mut b = Runtime::new(DeviceChoice::Cpu).unwrap();
    let r = b
        .restore(&pb::RestoreRequest {
            path: path.display().to_string(),
        })
        .unwrap();
    assert_eq!((r.step, &r.model_hash), (3, &hash));
    let na = a.train_step(&pb::TrainStepRequest::default()).unwrap();
    let nb = b.train_step(&pb::TrainStepRequest::default()).unwrap();
    assert_eq!(
        na.loss.to_bits(),
        nb.loss.to_bits(),
        "same next batch, same weights, same loss"
    );
    assert_eq!(na.step, nb.step);
    assert_eq!(a.model_hash().unwrap(), b.model_hash().unwrap());
    // LoadModel from the checkpoint works too.
    let mut c = Runtime::new(DeviceChoice::Cpu).unwrap();
    let reply = c
        .load_model(&pb::LoadModelRequest {
            model: Some(pb::ModelSpec {
                preset: "tiny".into(),
                ..Default::default()
            }),
            checkpoint_path: path.display().to_string(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!((reply.step, reply.model_hash), (3, hash.clone()));
    // A truncated file is an error and leaves the running model alone.
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let before = b.model_hash().unwrap();
    let err = b
        .restore(&pb::RestoreRequest {
            path: cut.display().to_string(),
        })
        .unwrap_err();
    assert!(err.to_string().contains("truncated or corrupted"), "{err}");
    assert_eq!(b.model_hash().unwrap(), before);
}

/// The per-step state hash a DiLoCo claimant commits to (issue #19): it changes every step,
/// a checkpoint records the hash of the state it holds, and that state restored or loaded
/// (in either dtype) hashes the same and trains on to the same next hash. Also prints the
/// hash's cost against the step's (BENCHMARKS.md, "Checked work: replay windows").
#[test]
fn state_hashes_commit_to_each_step_and_survive_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.ckpt");
    let mut a = Runtime::new(DeviceChoice::Cpu).unwrap();
    let first = load(&mut a, 0, 0, false, false, 1e-3).state_hash;
    assert_eq!(first.len(), 64);
    let commit = pb::TrainStepRequest { state_hash: true };
    let mut hashes = vec![first];
    for _ in 0..3 {
        let plain = a.train_step(&pb::TrainStepRequest::default()).unwrap();
        assert!(plain.state_hash.is_empty(), "only hashed when asked");
        hashes.push(with_state!(a.loaded().unwrap(), |s| s
            .state_hash()
            .unwrap()));
    }
    let ck = a
        .checkpoint(&pb::CheckpointRequest {
            path: path.display().to_string(),
        })
        .unwrap();
    assert_eq!(&ck.state_hash, hashes.last().unwrap());
    let next = a.train_step(&commit).unwrap().state_hash;
    hashes.push(next.clone());
    let mut seen = hashes.clone();
    seen.dedup();
    assert_eq!(seen.len(), hashes.len(), "every step changes the state");
    let mut b = Runtime::new(DeviceChoice::Cpu).unwrap();
    let r = b
        .restore(&pb::RestoreRequest {
            path: path.display().to_string(),
        })
        .unwrap();
    assert_eq!(r.state_hash, ck.state_hash);
    assert_eq!(b.train_step(&commit).unwrap().state_hash, next);
    for dtype in ["f32", "bf16"] {
        let mut c = Runtime::new(DeviceChoice::Cpu).unwrap();
        let mut req = load_request(0, 0, false, false, 1e-3, 0.0);
        req.checkpoint_path = path.display().to_string();
        req.dtype = dtype.into();
        let loaded = c.load_model(&req).unwrap();
        assert_eq!(loaded.state_hash, ck.state_hash, "{dtype}");
    }
    // The cost against a step, on `NEUROSHARD_STATE_HASH_PRESET` (default tiny).
    let preset = std::env::var("NEUROSHARD_STATE_HASH_PRESET").unwrap_or_else(|_| "tiny".into());
    let mut t = Runtime::new(DeviceChoice::Cpu).unwrap();
    let mut req = load_request(0, 0, false, false, 1e-3, 0.0);
    req.model = Some(pb::ModelSpec {
        preset: preset.clone(),
        ..Default::default()
    });
    // `NEUROSHARD_STATE_HASH_BATCH` = "BxT" (default the test's 4 x 32).
    if let Some((b, t)) = std::env::var("NEUROSHARD_STATE_HASH_BATCH")
        .ok()
        .and_then(|v| {
            v.split_once('x')
                .map(|(b, t)| (b.parse().ok(), t.parse().ok()))
        })
        .and_then(|(b, t)| Some((b?, t?)))
    {
        let train = req.train.as_mut().unwrap();
        (train.batch_size, train.seq_len) = (b, t);
    }
    t.load_model(&req).unwrap();
    t.train_step(&pb::TrainStepRequest::default()).unwrap();
    let params = with_state!(t.loaded().unwrap(), |s| s.parameters());
    // The anchor: sha256 (SHA-NI where the CPU has it) over as many bytes as the state
    // (12 per parameter), the hash this one replaced.
    let state_bytes = vec![0x5au8; params as usize * 12];
    let (mut step_s, mut hash_s, mut sha_s) = (0.0, 0.0, 0.0);
    for _ in 0..5 {
        let at = std::time::Instant::now();
        t.train_step(&pb::TrainStepRequest::default()).unwrap();
        step_s += at.elapsed().as_secs_f64();
        let at = std::time::Instant::now();
        with_state!(t.loaded().unwrap(), |s| s.state_hash().unwrap());
        hash_s += at.elapsed().as_secs_f64();
        let at = std::time::Instant::now();
        std::hint::black_box(<sha2::Sha256 as sha2::Digest>::digest(&state_bytes));
        sha_s += at.elapsed().as_secs_f64();
    }
    eprintln!(
        "{preset} ({} MB of state): train step {:.2} ms, state hash {:.3} ms ({:.1}%), \
         sha256 over as many bytes {:.3} ms ({:.1}%)",
        state_bytes.len() >> 20,
        step_s * 200.0,
        hash_s * 200.0,
        hash_s / step_s * 100.0,
        sha_s * 200.0,
        sha_s / step_s * 100.0
    );
}

#[test]
fn independently_built_nodes_agree_on_the_hash() {
    let mut a = Runtime::new(DeviceChoice::Cpu).unwrap();
    let mut b = Runtime::new(DeviceChoice::Cpu).unwrap();
    let ha = load(&mut a, 1, 2, false, true, 0.0);
    let hb = load(&mut b, 1, 2, false, true, 0.0);
    assert_eq!(ha.model_hash, hb.model_hash);
    assert_eq!(ha.model_hash.len(), 64);
}

#[test]
fn generate_streams_and_stops() {
    let mut rt = Runtime::new(DeviceChoice::Cpu).unwrap();
    load(&mut rt, 0, 0, false, false, 0.0);
    let req = pb::GenerateRequest {
        prompt_ids: vec![1, 50, 60],
        max_tokens: 5,
        sampling: Some(pb::SamplingParams {
            temperature: 0.8,
            top_p: 0.9,
            top_k: 20,
            seed: Some(4),
        }),
        request_id: "r".into(),
        prompt: String::new(),
        commit_top_k: 0,
    };
    let mut got = Vec::new();
    rt.generate(&req, &mut |r| {
        got.push(r);
        true
    })
    .unwrap();
    let last = got.last().unwrap();
    assert!(!last.finish_reason.is_empty());
    assert!(got.len() <= 5);
    assert!(got.iter().enumerate().all(|(i, r)| r.index == i as u32));
    let mut again = Vec::new();
    rt.generate(&req, &mut |r| {
        again.push(r.token_id);
        true
    })
    .unwrap();
    assert_eq!(
        again,
        got.iter().map(|r| r.token_id).collect::<Vec<_>>(),
        "a seed fixes the sample"
    );
    // The client going away stops generation after one token.
    let mut n = 0;
    rt.generate(&req, &mut |_| {
        n += 1;
        false
    })
    .unwrap();
    assert_eq!(n, 1);
    let bad = pb::GenerateRequest {
        prompt_ids: vec![100_000],
        ..req
    };
    assert!(rt.generate(&bad, &mut |_| true).is_err());
}

#[test]
fn weights_travel_through_a_slot_and_hf_export_needs_the_full_model() {
    let seg = segment("w");
    let mut a = Runtime::new(DeviceChoice::Cpu).unwrap();
    let mut b = Runtime::new(DeviceChoice::Cpu).unwrap();
    load(&mut a, 0, 0, false, false, 1e-3);
    load(&mut b, 0, 0, false, false, 1e-3);
    b.train_step(&pb::TrainStepRequest::default()).unwrap();
    let ha = a.model_hash().unwrap().model_hash;
    assert_ne!(b.model_hash().unwrap().model_hash, ha);
    let e = a
        .export_weights(
            &pb::ExportWeightsRequest {
                dest: Some(pb::export_weights_request::Dest::Slot(6)),
                format: String::new(),
                sources: Vec::new(),
            },
            Some(&seg),
        )
        .unwrap();
    assert_eq!(e.model_hash, ha);
    let r = b
        .import_weights(
            &pb::ImportWeightsRequest {
                src: e.tensor.map(pb::import_weights_request::Src::Tensor),
            },
            Some(&seg),
        )
        .unwrap();
    assert_eq!(r.model_hash, ha);
    // HF export of a stage is refused; of the full model it writes the three files.
    let dir = tempfile::tempdir().unwrap();
    let hf = |p: &std::path::Path| pb::ExportWeightsRequest {
        dest: Some(pb::export_weights_request::Dest::Path(
            p.display().to_string(),
        )),
        format: "hf-llama".into(),
        sources: Vec::new(),
    };
    a.export_weights(&hf(&dir.path().join("hf")), None).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(dir.path().join("hf").join(f).exists(), "{f}");
    }
    let mut s = Runtime::new(DeviceChoice::Cpu).unwrap();
    load(&mut s, 0, 1, true, false, 1e-3);
    assert!(
        s.export_weights(&hf(&dir.path().join("part")), None)
            .is_err()
    );
    assert!(
        s.import_weights(&pb::ImportWeightsRequest { src: None }, None)
            .is_err()
    );
}

fn load_sources(
    rt: &mut Runtime,
    start: u32,
    end: u32,
    emb: bool,
    head: bool,
    sources: &[(&std::path::Path, &str)],
) -> Result<pb::LoadModelReply, RuntimeError> {
    rt.load_model(&pb::LoadModelRequest {
        sources: sources
            .iter()
            .map(|(p, h)| pb::WeightSource {
                path: p.display().to_string(),
                model_hash: h.to_string(),
            })
            .collect(),
        ..load_request(start, end, emb, head, 1e-3, 0.0)
    })
}

#[test]
fn a_stage_takes_its_layers_from_other_stages_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let full_ck = dir.path().join("full.ckpt");
    let mut a = Runtime::new(DeviceChoice::Cpu).unwrap();
    load(&mut a, 0, 0, false, false, 1e-3);
    for _ in 0..3 {
        a.train_step(&pb::TrainStepRequest::default()).unwrap();
    }
    a.checkpoint(&pb::CheckpointRequest {
        path: full_ck.display().to_string(),
    })
    .unwrap();
    let full_hash = a.model_hash().unwrap().model_hash;

    // The whole model from the full checkpoint (hash checked): same weights, moments, step and
    // data position, so the next step is the same.
    let mut e = Runtime::new(DeviceChoice::Cpu).unwrap();
    let r = load_sources(&mut e, 0, 2, true, true, &[(&full_ck, &full_hash)]).unwrap();
    assert_eq!((r.step, &r.model_hash), (3, &full_hash));
    assert!(r.seeded_layers.is_empty());
    let na = a.train_step(&pb::TrainStepRequest::default()).unwrap();
    let ne = e.train_step(&pb::TrainStepRequest::default()).unwrap();
    assert_eq!(na.loss.to_bits(), ne.loss.to_bits());
    assert_eq!(a.model_hash().unwrap(), e.model_hash().unwrap());

    // The last stage (layer 1 + head) from the full checkpoint: not the seed's weights.
    let mut b = Runtime::new(DeviceChoice::Cpu).unwrap();
    let seeded_hash = load(&mut b, 1, 2, false, true, 1e-3).model_hash;
    let r = load_sources(&mut b, 1, 2, false, true, &[(&full_ck, "")]).unwrap();
    assert_ne!(r.model_hash, seeded_hash);
    assert_eq!(r.step, 3);
    let stage_ck = dir.path().join("stage.ckpt");
    b.checkpoint(&pb::CheckpointRequest {
        path: stage_ck.display().to_string(),
    })
    .unwrap();
    // The whole model from that stage: layer 0 (and the embedding) from the seed.
    let mut d = Runtime::new(DeviceChoice::Cpu).unwrap();
    let r = load_sources(&mut d, 0, 2, true, true, &[(&stage_ck, &r.model_hash)]).unwrap();
    assert_eq!(r.seeded_layers, vec![0]);
    // A hash that does not match, or a missing file, is refused.
    let err = load_sources(&mut d, 0, 2, true, true, &[(&stage_ck, &full_hash)]).unwrap_err();
    assert!(err.to_string().contains("hash"), "{err}");
    let missing = dir.path().join("nope.ckpt");
    assert!(load_sources(&mut d, 0, 2, true, true, &[(&missing, "")]).is_err());
}

#[test]
fn stage_sessions_generate_what_the_full_model_generates() {
    let seg = segment("stage");
    let mut full = Runtime::new(DeviceChoice::Cpu).unwrap();
    load(&mut full, 0, 0, false, false, 0.0);
    let mut first = Runtime::new(DeviceChoice::Cpu).unwrap();
    load(&mut first, 0, 1, true, false, 0.0);
    let mut last = Runtime::new(DeviceChoice::Cpu).unwrap();
    load(&mut last, 1, 2, false, true, 0.0);
    let sampling = pb::SamplingParams {
        temperature: 0.8,
        top_p: 0.9,
        top_k: 20,
        seed: Some(4),
    };
    let req = pb::GenerateRequest {
        prompt_ids: vec![1, 50, 60],
        max_tokens: 6,
        sampling: Some(sampling),
        request_id: "r".into(),
        prompt: String::new(),
        commit_top_k: 0,
    };
    let mut want = Vec::new();
    full.generate(&req, &mut |r| {
        want.push((r.token_id, r.finish_reason));
        true
    })
    .unwrap();

    // The requester's front end on the first stage's engine; layers on both.
    let session = 0xfeed;
    let start = first
        .stage_start(&pb::StageStartRequest {
            session,
            prompt: String::new(),
            prompt_ids: vec![1, 50, 60],
            max_tokens: 6,
            sampling: Some(sampling),
            draws: 0,
        })
        .unwrap();
    assert_eq!(start.prompt_ids, vec![1, 50, 60]);
    let mut got = Vec::new();
    let mut input = start.prompt_ids.clone();
    let mut position = 0u32;
    loop {
        let ids = write_u32(&seg, 0, &[input.len() as u64], &input);
        let acts = first
            .stage_forward(
                &pb::StageForwardRequest {
                    session,
                    input: ids,
                    output_slot: 1,
                    position,
                    rows: start.rows,
                },
                &seg,
            )
            .unwrap();
        let logits = last
            .stage_forward(
                &pb::StageForwardRequest {
                    session,
                    input: acts.output,
                    output_slot: 2,
                    position,
                    rows: start.rows,
                },
                &seg,
            )
            .unwrap();
        assert!(logits.kv_bytes > 0);
        let t = first
            .stage_sample(
                &pb::StageSampleRequest {
                    session,
                    logits: logits.output,
                },
                &seg,
            )
            .unwrap()
            .token
            .unwrap();
        position += input.len() as u32;
        got.push((t.token_id, t.finish_reason.clone()));
        if !t.finish_reason.is_empty() {
            break;
        }
        input = vec![t.token_id];
    }
    assert_eq!(got, want);

    // Out of step or unknown sessions are refused; End frees once.
    let one = write_u32(&seg, 0, &[1], &[5]);
    let stale = pb::StageForwardRequest {
        session,
        input: one,
        output_slot: 1,
        position: 1,
        rows: start.rows,
    };
    assert!(first.stage_forward(&stale, &seg).is_err());
    let unknown = pb::StageForwardRequest {
        session: 7,
        ..stale
    };
    assert!(first.stage_forward(&unknown, &seg).is_err());
    let too_many_rows = pb::StageForwardRequest {
        session: 8,
        position: 0,
        rows: 1 << 20,
        ..stale
    };
    assert!(first.stage_forward(&too_many_rows, &seg).is_err());
    for rt in [&mut first, &mut last] {
        let end = pb::StageEndRequest { session };
        assert!(rt.stage_end(&end).unwrap().ended);
        assert!(!rt.stage_end(&end).unwrap().ended);
    }
}

#[test]
fn a_stage_exports_the_full_model_with_the_other_stages_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let export =
        |rt: &mut Runtime, format: &str, name: &str, sources: &[(&std::path::Path, &str)]| {
            rt.export_weights(
                &pb::ExportWeightsRequest {
                    dest: Some(pb::export_weights_request::Dest::Path(
                        dir.path().join(name).display().to_string(),
                    )),
                    format: format.into(),
                    sources: sources
                        .iter()
                        .map(|(p, h)| pb::WeightSource {
                            path: p.display().to_string(),
                            model_hash: h.to_string(),
                        })
                        .collect(),
                },
                None,
            )
        };
    let full_ck = dir.path().join("full.ckpt");
    let mut f = Runtime::new(DeviceChoice::Cpu).unwrap();
    load(&mut f, 0, 0, false, false, 1e-3);
    for _ in 0..2 {
        f.train_step(&pb::TrainStepRequest::default()).unwrap();
    }
    f.checkpoint(&pb::CheckpointRequest {
        path: full_ck.display().to_string(),
    })
    .unwrap();
    let hash = f.model_hash().unwrap().model_hash;
    let whole = export(&mut f, "gguf", "whole.gguf", &[]).unwrap();
    assert_eq!(whole.model_hash, hash);
    export(&mut f, "hf-llama", "whole-hf", &[]).unwrap();

    // A node holding layer 0 and the embedding (trained, from the same checkpoint) exports
    // the same file with the rest taken from the checkpoint.
    let mut s = Runtime::new(DeviceChoice::Cpu).unwrap();
    load_sources(&mut s, 0, 1, true, false, &[(&full_ck, &hash)]).unwrap();
    let e = export(&mut s, "gguf", "part.gguf", &[]).unwrap_err();
    assert!(e.to_string().contains("needs every layer"), "{e}");
    let part = export(&mut s, "gguf", "part.gguf", &[(&full_ck, &hash)]).unwrap();
    assert_eq!(part.model_hash, hash);
    let gguf = |n: &str| std::fs::read(dir.path().join(n)).unwrap();
    assert!(gguf("whole.gguf") == gguf("part.gguf"));
    export(&mut s, "hf-llama", "part-hf", &[(&full_ck, &hash)]).unwrap();
    let st = |d: &str| {
        crate::checkpoint::read_tensor_file(&dir.path().join(d).join("model.safetensors")).unwrap()
    };
    let (w, p) = (st("whole-hf"), st("part-hf"));
    assert!(w.tensors == p.tensors && w.metadata == p.metadata);
    assert_eq!(w.metadata["model_hash"], hash);
    // A source whose weights are not the ones its holder claimed is refused.
    let e = export(&mut s, "gguf", "bad.gguf", &[(&full_ck, "00ff")]).unwrap_err();
    assert!(e.to_string().contains("not the expected 00ff"), "{e}");
    assert!(!dir.path().join("bad.gguf").exists());
}
