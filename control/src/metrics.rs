//! The node's counters and sliding windows, read by `GET /api/v1/metrics` and the Prometheus
//! exposition at `/metrics`. Everything here counts real events; nothing is estimated.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Window for requests per minute and latency figures.
pub const LATENCY_WINDOW: Duration = Duration::from_secs(300);
/// Most samples kept in a window (bounded memory under any load).
const MAX_SAMPLES: usize = 100_000;

/// Latencies of the requests finished within [`LATENCY_WINDOW`].
#[derive(Debug, Default)]
pub struct LatencyWindow {
    samples: VecDeque<(Instant, f64)>,
}

/// What a window says at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WindowFigures {
    pub per_minute: f64,
    pub avg_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub count: usize,
}

impl LatencyWindow {
    pub fn record(&mut self, at: Instant, ms: f64) {
        self.expire(at);
        if self.samples.len() == MAX_SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back((at, ms));
    }

    fn expire(&mut self, now: Instant) {
        while let Some((t, _)) = self.samples.front() {
            if now.duration_since(*t) > LATENCY_WINDOW {
                self.samples.pop_front();
            } else {
                break;
            }
        }
    }

    /// Figures over the window ending at `now`; `alive` is how long the node has been up (a
    /// younger node's rate is over its lifetime, not diluted by time it did not exist).
    pub fn figures(&mut self, now: Instant, alive: Duration) -> WindowFigures {
        self.expire(now);
        let n = self.samples.len();
        if n == 0 {
            return WindowFigures::default();
        }
        let mut ms: Vec<f64> = self.samples.iter().map(|(_, m)| *m).collect();
        ms.sort_by(f64::total_cmp);
        let rank = |q: f64| ms[((q * n as f64).ceil() as usize).clamp(1, n) - 1];
        let span = alive.min(LATENCY_WINDOW).as_secs_f64().max(1.0);
        WindowFigures {
            per_minute: n as f64 * 60.0 / span,
            avg_ms: ms.iter().sum::<f64>() / n as f64,
            p50_ms: rank(0.50),
            p99_ms: rank(0.99),
            count: n,
        }
    }
}

/// Counters shared by the API, the trainer and (later) inference and DiLoCo.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Every REST request answered, by class.
    pub api_requests: AtomicU64,
    pub api_client_errors: AtomicU64,
    pub api_server_errors: AtomicU64,
    pub api_rate_limited: AtomicU64,
    pub api_unauthorized: AtomicU64,
    api_latency: Mutex<LatencyWindow>,
    /// Inference requests finished (successfully or not) and tokens produced.
    pub inference_requests: AtomicU64,
    pub tokens_generated: AtomicU64,
    inference_latency: Mutex<LatencyWindow>,
    /// Pseudo-gradients sent to replicas and accepted from them (DiLoCo).
    pub gradients_submitted: AtomicU64,
    pub gradients_accepted: AtomicU64,
    /// DiLoCo rounds this node completed with its replicas, and rounds it missed.
    pub syncs_ok: AtomicU64,
    pub syncs_failed: AtomicU64,
}

impl Metrics {
    pub fn record_api(&self, status: u16, elapsed: Duration) {
        self.api_requests.fetch_add(1, Ordering::Relaxed);
        match status {
            401 => self.api_unauthorized.fetch_add(1, Ordering::Relaxed),
            429 => self.api_rate_limited.fetch_add(1, Ordering::Relaxed),
            400..=499 => self.api_client_errors.fetch_add(1, Ordering::Relaxed),
            500..=599 => self.api_server_errors.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        lock(&self.api_latency).record(Instant::now(), elapsed.as_secs_f64() * 1e3);
    }

    pub fn record_inference(&self, tokens: u64, elapsed: Duration) {
        self.inference_requests.fetch_add(1, Ordering::Relaxed);
        self.tokens_generated.fetch_add(tokens, Ordering::Relaxed);
        lock(&self.inference_latency).record(Instant::now(), elapsed.as_secs_f64() * 1e3);
    }

    pub fn api_window(&self, alive: Duration) -> WindowFigures {
        lock(&self.api_latency).figures(Instant::now(), alive)
    }

    pub fn inference_window(&self, alive: Duration) -> WindowFigures {
        lock(&self.inference_latency).figures(Instant::now(), alive)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Training steps per minute over the last hour, for `steps_per_hour`.
#[derive(Debug, Clone, Default)]
pub struct StepRate {
    /// (minute since `origin`, steps in it), oldest first, at most 61 entries.
    minutes: VecDeque<(u64, u64)>,
    origin: Option<Instant>,
}

impl StepRate {
    pub fn record(&mut self, at: Instant) {
        let origin = *self.origin.get_or_insert(at);
        let minute = at.duration_since(origin).as_secs() / 60;
        match self.minutes.back_mut() {
            Some((m, n)) if *m == minute => *n += 1,
            _ => self.minutes.push_back((minute, 1)),
        }
        while self.minutes.len() > 61 {
            self.minutes.pop_front();
        }
    }

    /// Steps per hour over the last hour (or since the first step, when that is shorter).
    pub fn per_hour(&self, now: Instant) -> f64 {
        let Some(origin) = self.origin else {
            return 0.0;
        };
        let elapsed = now.duration_since(origin);
        let minute = elapsed.as_secs() / 60;
        let steps: u64 = self
            .minutes
            .iter()
            .filter(|(m, _)| minute.saturating_sub(*m) < 60)
            .map(|(_, n)| n)
            .sum();
        let span = elapsed.as_secs_f64().clamp(1.0, 3600.0);
        steps as f64 * 3600.0 / span
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_figures_and_expiry() {
        let mut w = LatencyWindow::default();
        let t0 = Instant::now();
        for i in 1..=100 {
            w.record(t0, i as f64);
        }
        let f = w.figures(t0, Duration::from_secs(600));
        assert_eq!(f.count, 100);
        assert_eq!(f.p99_ms, 99.0);
        assert_eq!(f.p50_ms, 50.0);
        assert!((f.avg_ms - 50.5).abs() < 1e-9);
        assert!((f.per_minute - 20.0).abs() < 1e-9);
        let later = t0 + LATENCY_WINDOW + Duration::from_secs(1);
        assert_eq!(w.figures(later, Duration::from_secs(900)).count, 0);
    }

    #[test]
    fn step_rate_extrapolates_young_runs_and_forgets_old_minutes() {
        let mut r = StepRate::default();
        let t0 = Instant::now();
        for s in 0..120 {
            r.record(t0 + Duration::from_secs(s));
        }
        // 120 steps in 120 s: 3600 per hour.
        let rate = r.per_hour(t0 + Duration::from_secs(120));
        assert!((rate - 3600.0).abs() < 1.0, "{rate}");
        // Two hours later those minutes are out of the window.
        assert_eq!(r.per_hour(t0 + Duration::from_secs(7300)), 0.0);
    }
}
