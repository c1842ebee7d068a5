//! Scheduler tests on the CPU with the tiny preset. Most drive `Scheduler::tick` by hand, so
//! which request arrives before which decode step is exact, with no thread and no clock.

use tokio::sync::mpsc::UnboundedReceiver;

use super::*;
use crate::runtime::DeviceChoice;

fn runtime() -> Arc<Mutex<Runtime>> {
    let mut rt = Runtime::new(DeviceChoice::Cpu).unwrap();
    load(&mut rt);
    Arc::new(Mutex::new(rt))
}

fn load(rt: &mut Runtime) {
    rt.load_model(&pb::LoadModelRequest {
        model: Some(pb::ModelSpec {
            preset: "tiny".into(),
            ..Default::default()
        }),
        seed: 5,
        ..Default::default()
    })
    .unwrap();
}

fn scheduler(rt: &Arc<Mutex<Runtime>>, limits: BatchLimits) -> Scheduler {
    Scheduler::new(
        rt.clone(),
        Arc::new(Mutex::new(RuntimeHealth::default())),
        limits,
        Arc::new(BatchStats::default()),
    )
}

impl Scheduler {
    /// What `Batcher::submit` does, without the thread.
    fn push(&mut self, req: &pb::GenerateRequest) -> UnboundedReceiver<Reply> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.stats.waiting.fetch_add(1, Ordering::SeqCst);
        self.waiting.push_back((
            Job {
                req: req.clone(),
                tx,
                arrived: Instant::now(),
            },
            None,
        ));
        rx
    }

    fn step(&mut self) {
        let rt = self.runtime.clone();
        let mut rt = rt.lock();
        self.tick(&mut rt);
        self.publish();
    }
}

fn request(
    prompt_ids: Vec<u32>,
    prompt: &str,
    max_tokens: u32,
    seed: Option<u64>,
) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt_ids,
        max_tokens,
        sampling: Some(pb::SamplingParams {
            temperature: if seed.is_some() { 0.9 } else { 0.0 },
            top_p: 0.95,
            top_k: 50,
            seed: Some(seed.unwrap_or(0)),
        }),
        request_id: String::new(),
        prompt: prompt.into(),
        commit_top_k: 0,
    }
}

/// Every reply received so far.
fn drain(rx: &mut UnboundedReceiver<Reply>) -> Vec<Reply> {
    let mut out = Vec::new();
    while let Ok(r) = rx.try_recv() {
        out.push(r);
    }
    out
}

fn tokens(replies: &[Reply]) -> Vec<(u32, String, String)> {
    replies
        .iter()
        .map(|r| {
            let r = r.as_ref().expect("a token, not an error");
            (r.token_id, r.text.clone(), r.finish_reason.clone())
        })
        .collect()
}

fn alone(rt: &Arc<Mutex<Runtime>>, req: &pb::GenerateRequest) -> Vec<(u32, String, String)> {
    let mut out = Vec::new();
    rt.lock()
        .generate(req, &mut |r| {
            out.push((r.token_id, r.text, r.finish_reason));
            true
        })
        .unwrap();
    out
}

#[test]
fn requests_joining_a_running_batch_get_the_tokens_they_get_alone() {
    let rt = runtime();
    let mut s = scheduler(
        &rt,
        BatchLimits {
            max_batch: 3,
            ..BatchLimits::default()
        },
    );
    // (arrives before tick, request)
    let reqs = [
        (0, request(vec![1, 40, 41, 42], "", 30, None)),
        (0, request(vec![], "Once upon a time", 25, Some(7))),
        (2, request(vec![300, 301], "", 12, Some(8))),
        (2, request(vec![], "The node", 40, None)),
        (5, request(vec![9], "", 8, Some(9))),
        (9, request(vec![], "héllo wörld", 20, Some(10))),
    ];
    let mut rxs: Vec<Option<UnboundedReceiver<Reply>>> = (0..reqs.len()).map(|_| None).collect();
    let mut got: Vec<Vec<Reply>> = vec![Vec::new(); reqs.len()];
    let mut widest = 0;
    for tick in 0..200 {
        for (i, (at, req)) in reqs.iter().enumerate() {
            if *at == tick {
                rxs[i] = Some(s.push(req));
            }
        }
        s.step();
        widest = widest.max(s.live.len());
        assert!(s.live.len() <= 3);
        for (i, rx) in rxs.iter_mut().enumerate() {
            if let Some(rx) = rx {
                got[i].extend(drain(rx));
            }
        }
        if tick > 9 && s.live.is_empty() && s.waiting.is_empty() {
            break;
        }
    }
    assert_eq!(widest, 3, "the batch filled up");
    for (i, (_, req)) in reqs.iter().enumerate() {
        let batched = tokens(&got[i]);
        assert!(
            !batched.last().unwrap().2.is_empty(),
            "request {i} finished"
        );
        assert_eq!(batched, alone(&rt, req), "request {i}");
        let first = got[i][0].as_ref().unwrap();
        assert!(first.prompt_tokens > 0 || req.prompt_ids.is_empty());
    }
    assert_eq!(s.kv_used, 0);
    assert_eq!(s.stats.waiting.load(Ordering::SeqCst), 0);
    assert_eq!(s.stats.active.load(Ordering::SeqCst), 0);
}

#[test]
fn a_dropped_stream_frees_its_place_and_its_cache() {
    let rt = runtime();
    let mut s = scheduler(
        &rt,
        BatchLimits {
            max_batch: 1,
            ..BatchLimits::default()
        },
    );
    // A request that runs its full length alone (no early eos), so only the drop can end it.
    let long = (0..50)
        .map(|seed| request(vec![1, 2, 3], "", 100, Some(seed)))
        .find(|r| alone(&rt, r).len() == 100)
        .expect("a seed without an early eos");
    let mut a = s.push(&long);
    s.step();
    assert_eq!(drain(&mut a).len(), 2, "prefill token and one decode step");
    assert_eq!(s.live.len(), 1);
    assert_eq!(s.kv_used, crate::model::batch::kv_cache_bytes(&cfg(), 103));
    // The client goes away; another request was waiting for the only place.
    drop(a);
    let short = request(vec![5], "", 6, None);
    let mut b = s.push(&short);
    s.step();
    assert_eq!(s.live.len(), 1, "b took the place");
    assert_eq!(s.kv_used, crate::model::batch::kv_cache_bytes(&cfg(), 7));
    let mut got = drain(&mut b);
    while !s.live.is_empty() {
        s.step();
        got.extend(drain(&mut b));
    }
    assert_eq!(tokens(&got), alone(&rt, &short));
    assert_eq!(s.kv_used, 0);
}

fn cfg() -> neuroshard_shared::model::ModelConfig {
    neuroshard_shared::model::ModelConfig::preset("tiny").unwrap()
}

#[test]
fn the_kv_budget_makes_requests_wait_or_refuses_them() {
    use crate::model::batch::kv_cache_bytes;
    let rt = runtime();
    let mut s = scheduler(
        &rt,
        BatchLimits {
            max_batch: 8,
            kv_budget_bytes: kv_cache_bytes(&cfg(), 20),
            max_waiting: 8,
        },
    );
    let too_big = request(vec![1, 2, 3], "", 40, None);
    let fits = request(vec![1, 2, 3], "", 17, Some(1));
    let mut c = s.push(&too_big);
    let mut a = s.push(&fits);
    let mut b = s.push(&fits);
    s.step();
    let refused = drain(&mut c);
    assert_eq!(refused.len(), 1);
    let err = refused[0].as_ref().unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert!(err.message().contains("KV cache"), "{}", err.message());
    assert_eq!(s.live.len(), 1, "only one request fits the budget");
    assert!(drain(&mut b).is_empty(), "b waits");
    assert_eq!(s.stats.waiting.load(Ordering::SeqCst), 1);
    let mut got_a = drain(&mut a);
    let mut got_b = Vec::new();
    for _ in 0..100 {
        if s.live.is_empty() && s.waiting.is_empty() {
            break;
        }
        s.step();
        assert!(s.kv_used <= s.limits.kv_budget_bytes);
        got_a.extend(drain(&mut a));
        got_b.extend(drain(&mut b));
    }
    assert_eq!(tokens(&got_a), alone(&rt, &fits));
    assert_eq!(tokens(&got_b), alone(&rt, &fits));
    assert_eq!(s.kv_used, 0);
}

#[test]
fn bad_requests_and_a_reload_end_their_streams_cleanly() {
    let rt = runtime();
    let mut s = scheduler(&rt, BatchLimits::default());
    let mut bad = s.push(&request(vec![100_000], "", 5, None));
    let mut a = s.push(&request(vec![1], "", 50, Some(2)));
    s.step();
    let e = drain(&mut bad);
    assert_eq!(
        e[0].as_ref().unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    assert_eq!(s.live.len(), 1);
    load(&mut rt.lock());
    s.step();
    let got = drain(&mut a);
    let last = got.last().unwrap().as_ref().unwrap_err();
    assert_eq!(last.code(), tonic::Code::Unavailable);
    assert!(s.live.is_empty());
    assert_eq!(s.kv_used, 0);
    // No model: refused as a precondition, nothing kept.
    let empty = Arc::new(Mutex::new(Runtime::new(DeviceChoice::Cpu).unwrap()));
    let mut s = scheduler(&empty, BatchLimits::default());
    let mut c = s.push(&request(vec![1], "", 5, None));
    s.step();
    assert_eq!(
        drain(&mut c)[0].as_ref().unwrap_err().code(),
        tonic::Code::FailedPrecondition
    );
    assert_eq!(s.stats.waiting.load(Ordering::SeqCst), 0);
}

#[test]
fn a_full_wait_queue_refuses_at_once_and_the_thread_serves_the_rest() {
    let rt = runtime();
    let limits = BatchLimits {
        max_batch: 2,
        kv_budget_bytes: 1 << 20,
        max_waiting: 1,
    };
    let batcher = Batcher::start(
        rt.clone(),
        Arc::new(Mutex::new(RuntimeHealth::default())),
        limits,
    )
    .unwrap();
    let req = request(vec![1, 2], "", 10, Some(4));
    let want = alone(&rt, &req);
    let (tx1, mut rx1) = tokio::sync::mpsc::unbounded_channel();
    let (tx2, _rx2) = tokio::sync::mpsc::unbounded_channel();
    {
        // While the runtime is held nothing leaves the queue.
        let _held = rt.lock();
        batcher.submit(req.clone(), tx1).unwrap();
        let refused = batcher.submit(req.clone(), tx2).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    }
    let mut got = Vec::new();
    while let Some(r) = rx1.blocking_recv() {
        let done = r.as_ref().is_ok_and(|r| !r.finish_reason.is_empty());
        got.push(r);
        if done {
            break;
        }
    }
    assert_eq!(tokens(&got), want);
}
