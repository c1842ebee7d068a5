//! Pipeline training across real processes on loopback. The `default` preset has 4 layers;
//! capacities 2, 1, 1 (`resources.max_layers`) split it into a driver (embedding + layers
//! 0-1), a worker (layer 2) and a validator (layer 3 + head), started one after another with
//! `seed_peers`. (The `tiny` preset has only 2 layers, too few for three stages.)

use crate::network_common;
use crate::pipeline_common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use neuroshard_proto::engine as pb;
use neuroshard_proto::peer as pb_peer;
use neuroshard_tests::{EngineProcess, Node, NodeOptions, wait_for};
use pipeline_common::{POLL, START, code_of, dump, loss, status, step};

const TRAIN: Duration = Duration::from_secs(600);

fn training(extra: &str) -> String {
    format!(
        "[training]\nenabled = true\nmodel = \"default\"\nbatch_size = 4\nseq_len = 32\n\
         learning_rate = 0.003\nmicro_batches = 2\npipeline_timeout_secs = 20\n{extra}"
    )
}

fn options(max_layers: u32, extra: &str) -> NodeOptions {
    NodeOptions {
        config: format!(
            "{}\n[resources]\nmax_layers = {max_layers}\n",
            training(extra)
        ),
        ..NodeOptions::default()
    }
}

fn three_stages(extra: &str) -> (Node, Node, Node) {
    pipeline_common::three_stages([options(2, extra), options(1, extra), options(1, extra)])
}

#[test]
fn three_stages_train_and_the_loss_falls() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    // The middle stage sends int8 rows (activations up, gradients down), the others bf16:
    // every receiver takes what the tensor names.
    let ledger = network_common::ATTESTED_LEDGER;
    let (a, b, c) = pipeline_common::three_stages([
        options(2, ledger),
        options(1, &format!("pipeline_wire = \"int8\"\n{ledger}")),
        options(1, ledger),
    ]);
    let nodes = [&a, &b, &c];
    wait_for("a first pipeline step", START, POLL, || {
        step(&a).filter(|s| *s >= 1).and_then(|_| loss(&a))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", dump(&nodes)));

    // The network view: one of each role, every layer covered, steps going through.
    let net = a.get("/api/v1/network").unwrap().1;
    assert_eq!(net["nodes"]["drivers"], 1, "{net}");
    assert_eq!(net["nodes"]["workers"], 1, "{net}");
    assert_eq!(net["nodes"]["validators"], 1, "{net}");
    assert_eq!(net["coverage"]["uncovered"], 0, "{net}");
    let layers = b
        .authed(reqwest::Method::GET, "/api/v1/layers", None)
        .unwrap()
        .1;
    assert_eq!(layers["my_layer_count"], 1, "{layers}");
    assert_eq!(layers["layers"][0]["index"], 2, "{layers}");
    assert_eq!(layers["total_layers"], 4, "{layers}");

    wait_for("80 pipeline steps", TRAIN, POLL, || {
        step(&a).filter(|s| *s >= 80)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", dump(&nodes)));
    // Every stage stepped its own optimizer as often as the driver (give or take the step
    // in flight).
    for n in [&b, &c] {
        let s = step(n).unwrap();
        assert!(s >= 79, "a stage is at step {s}");
    }
    // One batch's loss is noisy (±0.4 around the plateau, more where the data gets harder):
    // compare the mean of the first three steps with the mean of the last twenty, from the
    // driver's loss history.
    let history = a.get("/api/v1/training/history").unwrap().1;
    let points: Vec<f64> = history["points"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p[1].as_f64())
        .collect();
    assert!(points.len() >= 80, "{history}");
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (first, later) = (mean(&points[..3]), mean(&points[points.len() - 20..]));
    eprintln!("loss {first:.3} -> {later:.3} over {} steps", points.len());
    assert!(
        later < first * 0.9,
        "loss did not fall: {first} -> {later}\n{history}\n{}",
        dump(&nodes)
    );
    let net = a.get("/api/v1/network").unwrap().1;
    assert!(net["pipeline"]["steps"].as_u64().unwrap() >= 80, "{net}");
    assert!(
        net["pipeline"]["tensor_bytes"].as_u64().unwrap() > 0,
        "{net}"
    );

    // Every stage earned training rewards, each backed by receipts of its neighbours: the
    // driver's forward work by the worker, the worker's by the validator (forward) and the
    // driver (backward), the validator's by the worker (backward).
    let [ia, ib, ic] = [&a, &b, &c].map(network_common::address);
    for (node, neighbours) in [
        (&a, vec![ib.clone()]),
        (&b, vec![ia.clone(), ic.clone()]),
        (&c, vec![ib.clone()]),
    ] {
        network_common::wait_attested_training(node, &neighbours, START)
            .unwrap_or_else(|e| panic!("{e}\n{}", dump(&nodes)));
    }
}

/// f32 tensors of a safetensors file by name.
fn tensors(path: &Path) -> BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .filter(|(_, t)| t.dtype() == safetensors::Dtype::F32)
        .map(|(name, t)| {
            let v = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (name, v)
        })
        .collect()
}

async fn engine_client(socket: &Path) -> neuroshard::engine::raw::Client {
    for _ in 0..500 {
        if let Ok(c) = neuroshard::engine::raw::connect(socket.to_path_buf()).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("engine socket {} does not answer", socket.display());
}

#[test]
fn one_pipeline_step_equals_the_same_step_on_one_node() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    // f32 between stages: the step must equal the single node's to fp32 summation order
    // (bf16 on the wire, the default, rounds every activation and gradient).
    let (a, b, c) = three_stages("max_steps = 1\npipeline_wire = \"f32\"");
    let nodes = [&a, &b, &c];
    wait_for("the one pipeline step on every stage", START, POLL, || {
        nodes.iter().all(|n| step(n) == Some(1)).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", dump(&nodes)));
    let pipeline_loss = loss(&a).unwrap();
    let node_id = status(&a).unwrap()["node_id"].as_str().unwrap().to_string();

    let out = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (single_loss, reference, stages) = rt.block_on(async {
        // The stages' weights after the step, exported by their own engines.
        let mut stages = BTreeMap::new();
        for (i, n) in nodes.iter().enumerate() {
            let mut client = engine_client(&n.data_dir().join("engine.sock")).await;
            let path = out.path().join(format!("stage{i}.safetensors"));
            client
                .export_weights(pb::ExportWeightsRequest {
                    dest: Some(pb::export_weights_request::Dest::Path(
                        path.display().to_string(),
                    )),
                    format: "safetensors".into(),
                    sources: Vec::new(),
                })
                .await
                .unwrap();
            stages.extend(tensors(&path));
        }
        // The same step on one engine holding every layer: same config, seed and node id,
        // so the same batch.
        let socket = out.path().join("single.sock");
        let _engine = EngineProcess::start(&socket, &out.path().join("single.log")).unwrap();
        let mut client = engine_client(&socket).await;
        let cfg = config("max_steps = 1");
        client
            .load_model(neuroshard::engine::raw::load_request(
                &neuroshard::trainer::load_spec(
                    &cfg,
                    &node_id,
                    None,
                    &neuroshard::pipeline::Assignment::full(
                        neuroshard::trainer::held_layers(&cfg).end,
                    ),
                ),
            ))
            .await
            .unwrap();
        let r = client
            .train_step(pb::TrainStepRequest::default())
            .await
            .unwrap()
            .into_inner();
        let path = out.path().join("single.safetensors");
        client
            .export_weights(pb::ExportWeightsRequest {
                dest: Some(pb::export_weights_request::Dest::Path(
                    path.display().to_string(),
                )),
                format: "safetensors".into(),
                sources: Vec::new(),
            })
            .await
            .unwrap();
        (r.loss, tensors(&path), stages)
    });

    assert!(
        (f64::from(single_loss) - pipeline_loss).abs() < 1e-4 * pipeline_loss.abs().max(1.0),
        "loss: pipeline {pipeline_loss}, single node {single_loss}"
    );
    assert_eq!(
        reference.keys().collect::<Vec<_>>(),
        stages.keys().collect::<Vec<_>>(),
        "the stages together hold exactly the model's tensors"
    );
    // One AdamW step moves a weight by lr · m/(√v + ε) = lr · g/(|g| + ε): about ±lr wherever
    // |g| ≫ ε, whatever the summation order. Where a gradient is within fp32 noise of zero
    // (the pipeline sums two micro-batches, the single node one batch, in another order) the
    // update can land anywhere in ±lr, so a few such elements may differ by up to 2·lr; a real
    // fault (a stage that got no gradient, a wrong one) moves a whole tensor.
    let lr = cfg_lr();
    let total: usize = reference.values().map(Vec::len).sum();
    let mut off = Vec::new();
    let mut worst = 0.0f32;
    for (name, want) in &reference {
        let got = &stages[name];
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let d = (g - w).abs();
            worst = worst.max(d);
            if d > lr * 1e-2 {
                off.push(format!("{name}[{i}]: {d:e}"));
            }
        }
    }
    eprintln!(
        "{} of {total} weights differ by more than lr/100; largest difference {worst:e}",
        off.len()
    );
    assert!(
        worst <= 2.0 * lr * 1.001,
        "largest weight difference {worst} (lr {lr})"
    );
    assert!(
        off.len() <= total / 100_000 + 2,
        "{} of {total} weights differ by more than lr/100 (lr {lr}): {:?}",
        off.len(),
        &off[..off.len().min(20)]
    );
}

fn refused_count(node: &Node) -> Option<u64> {
    node.get("/api/v1/network")?.1["pipeline"]["refused"].as_u64()
}

#[test]
fn pipeline_calls_from_a_peer_that_is_not_the_stage_before_are_refused() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let (a, b, c) = three_stages("");
    let nodes = [&a, &b, &c];
    wait_for("pipeline steps", START, POLL, || {
        step(&a).filter(|s| *s >= 3)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", dump(&nodes)));

    // A peer that holds no layers sends well-formed calls: a forward of real-looking
    // activations (were it run, it would add a micro-batch to the stage's gradients), and
    // steps far ahead of the driver's (were they taken, every real step would look old and
    // be refused from then on).
    let obs = network_common::Observer::new().unwrap();
    let deadline = Duration::from_secs(10);
    let now_ms = network_common::now_s() as u64 * 1000;
    let (rows, t, hidden) = (2u64, 32u64, 192u64);
    let forward =
        |step: u64, layer_start: u32, route: Vec<String>| pb_peer::PipelineForwardRequest {
            auth: None,
            step,
            micro_batch: 0,
            activations: Some(pb_peer::PipelineTensor {
                dtype: "f32".into(),
                shape: vec![rows, t, hidden],
                data: (0..rows * t * hidden)
                    .flat_map(|i| ((i % 7) as f32 * 0.01).to_le_bytes())
                    .collect(),
            }),
            labels: Some(pb_peer::PipelineTensor {
                dtype: "u32".into(),
                shape: vec![rows, t],
                data: (0..rows * t)
                    .flat_map(|i| (i as u32 % 50).to_le_bytes())
                    .collect(),
            }),
            layer_start,
            route,
            driver: "0x0000000000000000000000000000000000000001".into(),
        };
    let c_id = status(&c).unwrap()["node_id"].as_str().unwrap().to_string();
    let refused_before = [refused_count(&b).unwrap(), refused_count(&c).unwrap()];
    for (node, layer_start, route) in [(&c, 3, vec![]), (&b, 2, vec![c_id.clone()])] {
        let conn = obs.connect(node).unwrap();
        for step in [now_ms, u64::MAX] {
            let r = obs.rt.block_on(
                conn.pipeline_forward(forward(step, layer_start, route.clone()), deadline),
            );
            assert_eq!(code_of(r), tonic::Code::InvalidArgument);
        }
        let r = obs.rt.block_on(conn.pipeline_step(
            pb_peer::PipelineStepRequest {
                auth: None,
                step: u64::MAX,
                phase: "apply".into(),
                global_norm: 1.0,
                route: route.clone(),
                // A malformed receipt is refused and counted, never trusted.
                receipt: b"not a receipt".to_vec(),
                driver: "0x0000000000000000000000000000000000000001".into(),
            },
            deadline,
        ));
        assert_eq!(code_of(r), tonic::Code::InvalidArgument);
    }
    let refused_after = [refused_count(&b).unwrap(), refused_count(&c).unwrap()];
    for (before, after) in refused_before.iter().zip(refused_after) {
        assert!(after >= before + 3, "refusals counted: {before} -> {after}");
    }

    // Training goes on through the real stages, every stage in step with the driver.
    let at = step(&a).unwrap();
    wait_for("5 more pipeline steps", TRAIN, POLL, || {
        step(&a).filter(|s| *s >= at + 5)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", dump(&nodes)));
    let (a1, c_step, a2) = (step(&a).unwrap(), step(&c).unwrap(), step(&a).unwrap());
    assert!(
        c_step + 1 >= a1 && c_step <= a2 + 1,
        "driver at {a1}..{a2}, validator at {c_step}"
    );
}

fn config(extra: &str) -> neuroshard::config::Config {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("neuroshard.toml");
    std::fs::write(&path, training(extra)).unwrap();
    neuroshard::config::Config::load(&path).unwrap()
}

fn cfg_lr() -> f32 {
    config("").training.learning_rate as f32
}
