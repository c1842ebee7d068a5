//! Distributed inference across real processes on loopback: three nodes each holding part of
//! the `default` preset (capacities 2, 1, 1: embedding + layers 0-1, layer 2, layer 3 + head,
//! as in `pipeline.rs`) serve generations through each other, and give the text one node
//! holding every layer gives (same seed, training off, so the same initial weights). A stage
//! stalled (504) or killed (502) in the middle of a generation fails it with an error, not a
//! hang, and every surviving stage frees the session. Inference runs while the pipeline
//! trains; malformed peer requests are refused.

use crate::network_common;
use crate::pipeline_common;

use std::io::{BufRead, BufReader};
use std::time::Duration;

use neuroshard_proto::peer as pb;

use neuroshard_tests::{Node, NodeOptions, children_named, wait_for};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pipeline_common::{POLL, START, code_of, dump, step, wait_role};
use serde_json::{Value, json};

fn options(max_layers: Option<u32>) -> NodeOptions {
    options_with(max_layers, "enabled = false\n")
}

fn options_with(max_layers: Option<u32>, training: &str) -> NodeOptions {
    let resources = max_layers
        .map(|n| format!("[resources]\nmax_layers = {n}\n"))
        .unwrap_or_default();
    NodeOptions {
        config: format!(
            "[training]\nmodel = \"default\"\npipeline_timeout_secs = 10\n{training}\
             {resources}"
        ),
        ..NodeOptions::default()
    }
}

fn three_stages() -> (Node, Node, Node) {
    three_stages_with("enabled = false\n")
}

fn three_stages_with(training: &str) -> (Node, Node, Node) {
    let (a, b, c) = pipeline_common::three_stages([
        options_with(Some(2), training),
        options_with(Some(1), training),
        options_with(Some(1), training),
    ]);
    for n in [&a, &b, &c] {
        n.wait_model_loaded(START)
            .unwrap_or_else(|e| panic!("{e}\n{}", n.logs()));
    }
    (a, b, c)
}

/// Inference sessions open on `node`'s engine (its layers for any generation).
fn sessions(node: &Node) -> Option<u64> {
    node.get("/api/v1/network")?.1["pipeline"]["inference_sessions"].as_u64()
}

/// Waits until no inference session is open on any of `nodes` (ended well before the
/// engines' 120 s idle expiry).
fn wait_sessions_freed(nodes: &[&Node]) {
    wait_for(
        "every stage session freed",
        Duration::from_secs(20),
        POLL,
        || nodes.iter().all(|n| sessions(n) == Some(0)).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", dump(nodes)));
}

/// A greedy generation at `node`, retried while the node answers 503 (its peers' layers not
/// known yet); any other answer than 200 fails the test.
fn generate(node: &Node, nodes: &[&Node], body: Value) -> Value {
    wait_for("a generation", START, POLL, || {
        let (code, reply) = node.authed(
            reqwest::Method::POST,
            "/api/v1/inference",
            Some(body.clone()),
        )?;
        match code {
            200 => Some(reply),
            503 => None,
            other => panic!("inference answered {other}: {reply}\n{}", dump(nodes)),
        }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", dump(nodes)))
}

/// A streamed generation: the text of its token events and its closing event.
fn stream(node: &Node, body: Value, mut on_token: impl FnMut(usize)) -> (String, Value) {
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let r = http
        .post(node.url("/api/v1/inference"))
        .bearer_auth(node.api_token().unwrap())
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let mut text = String::new();
    let mut last = Value::Null;
    let mut tokens = 0;
    for line in BufReader::new(r).lines() {
        let line = line.expect("the stream ends cleanly, not by a timeout");
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        let event: Value = serde_json::from_str(data).unwrap();
        if event.get("index").is_some() {
            text.push_str(event["token"].as_str().unwrap());
            tokens += 1;
            on_token(tokens);
        } else {
            last = event;
        }
    }
    (text, last)
}

#[test]
fn nodes_without_every_layer_generate_what_one_node_generates() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let (a, b, c) = three_stages();
    let single = Node::start(options(None)).unwrap();
    single.wait_model_loaded(START).unwrap();
    let nodes = [&a, &b, &c, &single];
    let body = json!({"prompt": "The river", "max_tokens": 24, "temperature": 0});

    let want = generate(&single, &nodes, body.clone());
    assert!(want["tokens_generated"].as_u64().unwrap() >= 1, "{want}");
    // At the first stage, a middle stage and the last stage: each serves through the others.
    for (name, n) in [("first", &a), ("middle", &b), ("last", &c)] {
        let got = generate(n, &nodes, body.clone());
        assert_eq!(got["text"], want["text"], "{name} stage: {got} vs {want}");
        assert_eq!(got["tokens_generated"], want["tokens_generated"], "{name}");
        assert_eq!(got["finish_reason"], want["finish_reason"], "{name}");
        assert_eq!(
            got["usage"]["prompt_tokens"], want["usage"]["prompt_tokens"],
            "{name}"
        );
    }

    // Streaming through the pipeline: the same text, token by token, then [DONE].
    let (text, last) = stream(
        &b,
        json!({"prompt": "The river", "max_tokens": 24, "temperature": 0, "stream": true}),
        |_| {},
    );
    assert_eq!(last["token"], "[DONE]", "{last}");
    assert_eq!(text, want["text"].as_str().unwrap());

    // The OpenAI API goes the same way.
    let (code, oa) = c
        .authed(
            reqwest::Method::POST,
            "/v1/completions",
            Some(json!({"model": "neurollm-default", "prompt": "The river", "max_tokens": 24, "temperature": 0})),
        )
        .unwrap();
    assert_eq!(code, 200, "{oa}");
    assert_eq!(oa["choices"][0]["text"], want["text"], "{oa}");

    // Concurrent generations at every stage do not mix their sessions.
    std::thread::scope(|scope| {
        let handles: Vec<_> = [&a, &b, &c, &a]
            .into_iter()
            .map(|n| {
                let body = body.clone();
                scope.spawn(move || generate(n, &nodes, body))
            })
            .collect();
        for h in handles {
            let got = h.join().unwrap();
            assert_eq!(got["text"], want["text"], "concurrent: {got} vs {want}");
        }
    });

    // Seeded sampling samples the same way too (the requester's engine samples).
    let sampled = json!({"prompt": "The river", "max_tokens": 16, "temperature": 0.9, "seed": 7});
    let want = generate(&single, &nodes, sampled.clone());
    let got = generate(&a, &nodes, sampled);
    assert_eq!(got["text"], want["text"], "{got} vs {want}");

    // The middle stage counted the activations it received and sent.
    let net = b.get("/api/v1/network").unwrap().1;
    assert!(
        net["pipeline"]["tensor_bytes"].as_u64().unwrap() > 0,
        "{net}"
    );
}

#[test]
fn a_stage_stalled_or_killed_mid_generation_fails_the_request_cleanly() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let (a, b, c) = three_stages();
    let nodes = [&a, &b, &c];
    // The route is up.
    generate(
        &a,
        &nodes,
        json!({"prompt": "x", "max_tokens": 2, "temperature": 0}),
    );

    let worker = b.pid().unwrap();
    let long = json!({"prompt": "The river", "max_tokens": 240, "temperature": 0, "stream": true});

    // A stalled stage (SIGSTOP): the stream ends with PIPELINE_TIMEOUT after the pipeline
    // deadline (10 s), not never.
    let started = std::time::Instant::now();
    let mut stopped = false;
    let (_, last) = stream(&a, long.clone(), |n| {
        if n == 3 && !stopped {
            kill(Pid::from_raw(worker), Signal::SIGSTOP).unwrap();
            stopped = true;
        }
    });
    kill(Pid::from_raw(worker), Signal::SIGCONT).unwrap();
    assert!(stopped, "the generation ended before the stop: {last}");
    assert_eq!(
        last["error"]["code"],
        "PIPELINE_TIMEOUT",
        "{last}\n{}",
        dump(&nodes)
    );
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "the timeout took {:?}",
        started.elapsed()
    );
    // The stage is back: generations go through again.
    generate(
        &a,
        &nodes,
        json!({"prompt": "x", "max_tokens": 2, "temperature": 0}),
    );

    // A killed stage (SIGKILL, daemon and engine).
    let engines = children_named(worker, "neuroshard-engine");
    let started = std::time::Instant::now();
    let mut killed = false;
    // Greedy from random weights rarely reaches eos; it runs to max_tokens unless stopped.
    let (_, last) = stream(&a, long, |n| {
        if n == 3 && !killed {
            kill(Pid::from_raw(worker), Signal::SIGKILL).unwrap();
            for e in &engines {
                let _ = kill(Pid::from_raw(*e), Signal::SIGKILL);
            }
            killed = true;
        }
    });
    assert!(killed, "the generation ended before the kill: {last}");
    assert!(
        last.get("error").is_some(),
        "the stream did not end with an error: {last}\n{}",
        dump(&nodes)
    );
    let code = last["error"]["code"].as_str().unwrap();
    assert!(
        code == "PIPELINE_STAGE_FAILED" || code == "PIPELINE_TIMEOUT",
        "{last}"
    );
    assert!(last["error"]["message"].is_string(), "{last}");
    // Within the pipeline deadline (10 s) plus slack: no hang.
    assert!(
        started.elapsed() < Duration::from_secs(45),
        "the failure took {:?}",
        started.elapsed()
    );

    // The requester stays healthy; a new request is refused cleanly (the worker is gone).
    // Until the worker misses its heartbeats the route may still name it: the call's redial
    // of its peer port is refused, which fails it at once (measured: 502 in 19 ms),
    // not after the pipeline deadline (10 s); 8 s leaves a loaded machine room and still
    // catches a call that waits for that deadline again.
    let (code, health) = a.get("/api/v1/health").unwrap();
    assert_eq!(code, 200, "{health}");
    let started = std::time::Instant::now();
    let r = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(8))
        .build()
        .unwrap()
        .post(a.url("/api/v1/inference"))
        .bearer_auth(a.api_token().unwrap())
        .json(&json!({"prompt": "x", "max_tokens": 2}))
        .send()
        .unwrap_or_else(|e| {
            panic!(
                "no answer in {:?}: {e}\n{}",
                started.elapsed(),
                dump(&nodes)
            )
        });
    let code = r.status().as_u16();
    let reply: Value = r.json().unwrap_or(Value::Null);
    eprintln!(
        "a request after the kill answered {code} in {:?}",
        started.elapsed()
    );
    assert!(
        [502, 503, 504].contains(&code),
        "{code} {reply}\n{}",
        dump(&nodes)
    );
    assert!(reply["error"]["code"].is_string(), "{reply}");
    // The surviving stages freed the failed generation's sessions.
    wait_sessions_freed(&[&a, &c]);
}

#[test]
fn a_generation_goes_on_over_another_route_when_a_stage_dies() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let (a, b, c) = three_stages();
    // Greedy through the worker and the validator: the text every route must give.
    let body = json!({"prompt": "The river", "max_tokens": 60, "temperature": 0});
    let want = generate(&a, &[&a, &b, &c], body.clone());
    assert_eq!(want["tokens_generated"], 60, "{want}");

    // A fourth node with room for two layers adds redundancy at the end: layers 2 and 3, so
    // the driver's route is one peer call (it) instead of two (worker, validator).
    let seeds = [a.peer_addr(), b.peer_addr(), c.peer_addr()];
    let d = Node::start(options(Some(2)).with_seed_peers(&seeds)).unwrap();
    let nodes = [&a, &b, &c, &d];
    wait_role(&d, "validator", &[2, 3]);
    d.wait_model_loaded(START)
        .unwrap_or_else(|e| panic!("{e}\n{}", dump(&nodes)));
    wait_for("the driver to see every node", START, POLL, || {
        let n = a.get("/api/v1/network")?.1;
        (n["nodes"]["total"] == 4 && n["coverage"]["layers"][3]["holders"] == 2).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", dump(&nodes)));
    let failovers = || {
        a.get("/api/v1/network").unwrap().1["pipeline"]["inference_failovers"]
            .as_u64()
            .unwrap()
    };
    let got = generate(&a, &nodes, body.clone());
    assert_eq!(got["text"], want["text"], "through the fourth node");
    assert_eq!(failovers(), 0);

    // The fourth node dies (daemon and engine) three tokens into a seeded, sampled stream: the
    // stream goes on through the worker and the validator and gives exactly the text of an
    // unbroken route (the new route's sampler skips the draws already made).
    let sampled = json!({"prompt": "The river", "max_tokens": 60, "temperature": 1.0, "seed": 7});
    let want = generate(&a, &[&a, &b, &c], sampled.clone());
    assert_eq!(want["tokens_generated"], 60, "{want}");
    let greedy = got["text"].clone();
    assert_ne!(
        want["text"], greedy,
        "sampling at temperature 1 gave the greedy text"
    );
    assert_eq!(failovers(), 0);
    let engines = children_named(d.pid().unwrap(), "neuroshard-engine");
    let mut killed = false;
    let mut streamed = sampled;
    streamed["stream"] = json!(true);
    let (text, last) = stream(&a, streamed, |n| {
        if n == 3 && !killed {
            kill(Pid::from_raw(d.pid().unwrap()), Signal::SIGKILL).unwrap();
            for e in &engines {
                let _ = kill(Pid::from_raw(*e), Signal::SIGKILL);
            }
            killed = true;
        }
    });
    assert!(killed, "the generation ended before the kill: {last}");
    assert_eq!(last["token"], "[DONE]", "{last}\n{}", dump(&nodes));
    assert_eq!(text, want["text"].as_str().unwrap(), "{}", dump(&nodes));
    assert_eq!(
        last["usage"]["completion_tokens"], 60,
        "every token delivered and charged once: {last}"
    );
    assert_eq!(failovers(), 1, "{}", dump(&nodes));
    // The stages of the new route free their sessions.
    wait_sessions_freed(&[&a, &b, &c]);
}

#[test]
fn inference_runs_while_the_pipeline_trains() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let (a, b, c) = three_stages_with(
        "enabled = true\nbatch_size = 4\nseq_len = 32\nlearning_rate = 0.003\nmicro_batches = 2\n",
    );
    let nodes = [&a, &b, &c];
    let at = wait_for("pipeline steps", START, POLL, || {
        step(&a).filter(|s| *s >= 2)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", dump(&nodes)));
    // Generations at the middle and the last stage while the driver keeps stepping.
    for n in [&b, &c] {
        let r = generate(
            n,
            &nodes,
            json!({"prompt": "The river", "max_tokens": 16, "temperature": 0}),
        );
        let tokens = r["tokens_generated"].as_u64().unwrap();
        assert!((1..=16).contains(&tokens), "{r}");
        assert_eq!(r["usage"]["completion_tokens"], tokens, "{r}");
    }
    // Training goes on, on every stage, with finite losses.
    wait_for("more pipeline steps", START, POLL, || {
        step(&a).filter(|s| *s >= at + 5)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", dump(&nodes)));
    let loss = a.get("/api/v1/status").unwrap().1["training"]["loss"]
        .as_f64()
        .unwrap();
    assert!(loss.is_finite(), "{loss}");
    for n in [&b, &c] {
        assert!(step(n).unwrap() >= at + 3, "a stage stopped stepping");
    }
}

fn ids(v: &[u32]) -> Option<pb::PipelineTensor> {
    Some(pb::PipelineTensor {
        dtype: "u32".into(),
        shape: vec![v.len() as u64],
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    })
}

#[test]
fn malformed_inference_requests_from_a_peer_are_refused() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let a = Node::start(options(Some(2))).unwrap();
    wait_role(&a, "driver", &[0, 1]);
    a.wait_model_loaded(START).unwrap();
    let obs = network_common::Observer::new().unwrap();
    let deadline = Duration::from_secs(10);
    let base = pb::InferForwardRequest {
        auth: None,
        session: 1,
        layer_start: 0,
        input: ids(&[1, 5, 6]),
        position: 0,
        rows: 8,
    };
    // A well-formed step: activations [1, 3, hidden] back.
    let conn = obs.connect(&a).unwrap();
    let ok = wait_for("the stage ready", START, POLL, || {
        obs.rt
            .block_on(conn.infer_forward(base.clone(), deadline))
            .ok()
    })
    .unwrap();
    let out = ok.output.unwrap();
    assert_eq!(
        (out.dtype.as_str(), out.shape.as_slice()),
        ("f32", &[1u64, 3, 192][..])
    );
    assert_eq!(out.data.len(), 3 * 192 * 4);

    // Three refusals per connection (a fourth would ban it).
    let bad: Vec<pb::InferForwardRequest> = vec![
        pb::InferForwardRequest {
            layer_start: 2,
            ..base.clone()
        },
        pb::InferForwardRequest {
            input: ids(&[2048]),
            session: 2,
            ..base.clone()
        },
        pb::InferForwardRequest {
            input: Some(pb::PipelineTensor {
                dtype: "f32".into(),
                shape: vec![1, 1, 192],
                data: vec![0; 192 * 4],
            }),
            session: 3,
            ..base.clone()
        },
        pb::InferForwardRequest {
            rows: 0,
            session: 4,
            ..base.clone()
        },
        // Session 1 is at position 3, not 0.
        base.clone(),
        pb::InferForwardRequest {
            position: 3,
            input: ids(&[1; 6]),
            ..base.clone()
        },
        pb::InferForwardRequest {
            rows: 100_000,
            session: 5,
            ..base.clone()
        },
        pb::InferForwardRequest {
            input: None,
            session: 6,
            ..base.clone()
        },
    ];
    for chunk in bad.chunks(3) {
        // A new libp2p connection: bans are per connection, every stream on it shares one.
        obs.disconnect(&a);
        let conn = obs.connect(&a).unwrap();
        for req in chunk {
            let code = code_of(obs.rt.block_on(conn.infer_forward(req.clone(), deadline)));
            assert_eq!(code, tonic::Code::InvalidArgument, "{req:?}");
        }
    }
    // The session survived the refusals: the next position goes on; End frees it once.
    obs.disconnect(&a);
    let conn = obs.connect(&a).unwrap();
    // A session this stage does not hold (ended, expired, engine restarted) is not the
    // caller's fault: UNAVAILABLE, not INVALID_ARGUMENT.
    let gone = pb::InferForwardRequest {
        session: 99,
        position: 3,
        input: ids(&[7]),
        ..base.clone()
    };
    let code = code_of(obs.rt.block_on(conn.infer_forward(gone, deadline)));
    assert_eq!(code, tonic::Code::Unavailable);
    let next = pb::InferForwardRequest {
        position: 3,
        input: ids(&[7]),
        ..base.clone()
    };
    assert!(obs.rt.block_on(conn.infer_forward(next, deadline)).is_ok());
    // The open session shows in the node's figures until it ends.
    wait_for("the session counted", Duration::from_secs(20), POLL, || {
        (sessions(&a) == Some(1)).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", a.logs()));
    let end = pb::InferEndRequest {
        auth: None,
        session: 1,
    };
    assert!(
        obs.rt
            .block_on(conn.infer_end(end.clone(), deadline))
            .unwrap()
            .ended
    );
    assert!(
        !obs.rt
            .block_on(conn.infer_end(end, deadline))
            .unwrap()
            .ended
    );
    wait_sessions_freed(&[&a]);
    let (code, health) = a.get("/api/v1/health").unwrap();
    assert_eq!(code, 200, "{health}");
}
