//! The node's throughput and peer count over time, for the dashboard's plots next to the loss
//! curve: a sample every [`SAMPLE_INTERVAL`], the last [`MAX_SAMPLES`] kept (one hour), served
//! by `GET /api/v1/training/history` with the losses.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::watch;

/// How often a sample is taken.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(2);
/// Samples kept: one hour at [`SAMPLE_INTERVAL`]; older ones are dropped.
pub const MAX_SAMPLES: usize = 1800;

/// One sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Unix seconds.
    pub at: i64,
    /// Tokens trained on and generated per second since the previous sample.
    pub tokens_per_second: f64,
    /// Connected peers.
    pub peers: usize,
}

/// The bounded history of samples.
#[derive(Debug, Default)]
pub struct Samples {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    points: VecDeque<Sample>,
    /// When the previous sample was taken and the token count then.
    last: Option<(Instant, u64)>,
}

impl Samples {
    /// Records a sample at `now` (`at`: the same instant in unix seconds) from the node's
    /// running token count and its peer count. The first call only sets the baseline.
    pub fn record(&self, at: i64, now: Instant, tokens: u64, peers: usize) {
        let mut g = self.inner.lock();
        let previous = g.last.replace((now, tokens));
        let Some((then, before)) = previous else {
            return;
        };
        let secs = now.saturating_duration_since(then).as_secs_f64();
        if secs <= 0.0 {
            return;
        }
        let tokens_per_second = tokens.saturating_sub(before) as f64 / secs;
        if g.points.len() >= MAX_SAMPLES {
            g.points.pop_front();
        }
        g.points.push_back(Sample {
            at,
            tokens_per_second,
            peers,
        });
    }

    /// The samples kept, oldest first.
    pub fn points(&self) -> Vec<Sample> {
        self.inner.lock().points.iter().copied().collect()
    }
}

/// What a sample reads: the training figures, the API's counters and the peer table.
pub struct Sources {
    pub training: Arc<Mutex<crate::stats::TrainingStats>>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub net: Arc<neuroshard_net::Network>,
}

impl Sources {
    fn tokens(&self) -> u64 {
        let trained = self.training.lock().tokens;
        trained.saturating_add(self.metrics.tokens_generated.load(Ordering::Relaxed))
    }
}

/// Samples every [`SAMPLE_INTERVAL`] until `shutdown` turns true.
pub async fn run(samples: Arc<Samples>, sources: Sources, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = neuroshard_net::stopped(&mut shutdown) => break,
            _ = tick.tick() => {
                let at = chrono::Utc::now().timestamp();
                samples.record(at, Instant::now(), sources.tokens(), sources.net.peers.len());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_come_from_the_previous_sample_and_the_history_is_bounded() {
        let s = Samples::default();
        let t0 = Instant::now();
        s.record(100, t0, 1000, 0);
        assert!(s.points().is_empty(), "the first call is the baseline");
        s.record(102, t0 + Duration::from_secs(2), 1600, 1);
        s.record(104, t0 + Duration::from_secs(4), 1600, 2);
        assert_eq!(
            s.points(),
            [
                Sample {
                    at: 102,
                    tokens_per_second: 300.0,
                    peers: 1
                },
                Sample {
                    at: 104,
                    tokens_per_second: 0.0,
                    peers: 2
                },
            ]
        );
        for i in 0..MAX_SAMPLES as u64 + 10 {
            s.record(106 + i as i64, t0 + Duration::from_secs(6 + i), 2000 + i, 3);
        }
        let points = s.points();
        assert_eq!(points.len(), MAX_SAMPLES);
        assert_eq!(points.last().unwrap().at, 106 + MAX_SAMPLES as i64 + 9);
        assert_eq!(points[0].at, 106 + 10);
    }
}
