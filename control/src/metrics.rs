//! The node's counters and sliding windows, read by `GET /api/v1/metrics` and the Prometheus
//! exposition at `/metrics`. Everything here counts real events; nothing is estimated.
//!
//! Latency quantiles come from `hdrhistogram`: one histogram per [`BUCKET`] of time, merged
//! over the window when read. The exposition is built with `prometheus-client`'s registry and
//! its Prometheus text encoder, so HELP/TYPE lines, escaping and counters' `_total` suffix are
//! right by construction.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Metric, Registry};

/// Window for requests per minute and latency figures.
pub const LATENCY_WINDOW: Duration = Duration::from_secs(300);
/// One histogram per bucket of this width; a window holds every bucket that overlaps its last
/// [`LATENCY_WINDOW`], so it reaches back at most one bucket further.
pub const BUCKET: Duration = Duration::from_secs(10);
/// Latencies are kept in microseconds to 3 significant digits (0.1 %).
const SIGFIGS: u8 = 3;
/// Larger latencies are recorded as this (an hour), which bounds a histogram's size.
const HIGHEST_US: u64 = 3_600_000_000;

/// The samples of one bucket.
#[derive(Debug)]
struct Bucket {
    /// Bucket number since the window's first sample.
    index: u64,
    micros: Histogram<u32>,
    /// Exact sum of the samples, for the mean.
    sum_ms: f64,
}

/// Latencies of the requests finished within [`LATENCY_WINDOW`] (and up to one [`BUCKET`]
/// more).
#[derive(Debug, Default)]
pub struct LatencyWindow {
    /// The first sample's instant: buckets are counted from it.
    origin: Option<Instant>,
    /// Buckets holding samples, oldest first; at most `LATENCY_WINDOW / BUCKET + 1`.
    buckets: VecDeque<Bucket>,
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

fn histogram() -> Histogram<u32> {
    // An auto-resizing histogram; `new` fails only for more than 5 significant digits.
    Histogram::new(SIGFIGS).expect("3 significant digits are valid")
}

impl LatencyWindow {
    pub fn record(&mut self, at: Instant, ms: f64) {
        let origin = *self.origin.get_or_insert(at);
        let since = at.saturating_duration_since(origin);
        self.expire(since);
        let index = (since.as_nanos() / BUCKET.as_nanos()) as u64;
        // A sample whose instant was taken before the newest bucket's (it waited for the lock)
        // joins the newest bucket.
        if self.buckets.back().is_none_or(|b| b.index < index) {
            self.buckets.push_back(Bucket {
                index,
                micros: histogram(),
                sum_ms: 0.0,
            });
        }
        if let Some(b) = self.buckets.back_mut() {
            let us = ((ms * 1e3).round() as u64).min(HIGHEST_US);
            // With auto-resize, recording fails only past the histogram's own limit (2^62).
            if b.micros.record(us).is_err() {
                b.micros.saturating_record(us);
            }
            b.sum_ms += ms;
        }
    }

    /// Drops the buckets that ended before the window that ends `since` after the origin.
    fn expire(&mut self, since: Duration) {
        while let Some(b) = self.buckets.front() {
            let end = u128::from(b.index + 1) * BUCKET.as_nanos();
            if end + LATENCY_WINDOW.as_nanos() <= since.as_nanos() {
                self.buckets.pop_front();
            } else {
                break;
            }
        }
    }

    /// Figures over the window ending at `now`; `alive` is how long the node has been up (a
    /// younger node's rate is over its lifetime, not diluted by time it did not exist).
    pub fn figures(&mut self, now: Instant, alive: Duration) -> WindowFigures {
        let Some(origin) = self.origin else {
            return WindowFigures::default();
        };
        let since = now.saturating_duration_since(origin);
        self.expire(since);
        let mut merged = histogram();
        let mut sum_ms = 0.0;
        for b in &self.buckets {
            // Auto-resizing histograms of one precision always add up.
            let _ = merged.add(&b.micros);
            sum_ms += b.sum_ms;
        }
        let n = merged.len();
        if n == 0 {
            return WindowFigures::default();
        }
        // The window starts at the beginning of the bucket that holds `now - LATENCY_WINDOW`.
        let reach = match since.checked_sub(LATENCY_WINDOW) {
            Some(start) => {
                LATENCY_WINDOW + Duration::from_nanos((start.as_nanos() % BUCKET.as_nanos()) as u64)
            }
            None => LATENCY_WINDOW,
        };
        let span = alive.min(reach).as_secs_f64().max(1.0);
        let quantile_ms = |q: f64| merged.value_at_quantile(q) as f64 / 1e3;
        WindowFigures {
            per_minute: n as f64 * 60.0 / span,
            avg_ms: sum_ms / n as f64,
            p50_ms: quantile_ms(0.50),
            p99_ms: quantile_ms(0.99),
            count: n as usize,
        }
    }
}

/// One snapshot in the Prometheus text format (0.0.4): every metric is named
/// `neuroshard_<name>`, with the value it had when the snapshot was taken.
#[derive(Debug)]
pub struct Exposition(Registry);

impl Default for Exposition {
    fn default() -> Self {
        Self(Registry::with_prefix("neuroshard"))
    }
}

impl Exposition {
    /// The `Content-Type` of [`Exposition::encode`]'s text.
    pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

    /// A counter: `name` comes without `_total`, which the encoder appends; `help` without a
    /// final full stop, which it appends too.
    pub fn counter<N>(&mut self, name: &str, help: &str, value: N)
    where
        ConstCounter<N>: Metric,
    {
        self.0.register(name, help, ConstCounter::new(value));
    }

    /// A gauge (`help` without a final full stop).
    pub fn gauge<N>(&mut self, name: &str, help: &str, value: N)
    where
        ConstGauge<N>: Metric,
    {
        self.0.register(name, help, ConstGauge::new(value));
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.0);
        out
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
    /// Connections to the REST port: accepted, refused at accept, open (`listen.rs`).
    pub http: std::sync::Arc<neuroshard_net::admission::ConnStats>,
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
        self.api_latency
            .lock()
            .record(Instant::now(), elapsed.as_secs_f64() * 1e3);
    }

    pub fn record_inference(&self, tokens: u64, elapsed: Duration) {
        self.inference_requests.fetch_add(1, Ordering::Relaxed);
        self.tokens_generated.fetch_add(tokens, Ordering::Relaxed);
        self.inference_latency
            .lock()
            .record(Instant::now(), elapsed.as_secs_f64() * 1e3);
    }

    pub fn api_window(&self, alive: Duration) -> WindowFigures {
        self.api_latency.lock().figures(Instant::now(), alive)
    }

    pub fn inference_window(&self, alive: Duration) -> WindowFigures {
        self.inference_latency.lock().figures(Instant::now(), alive)
    }
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
    fn quantiles_of_known_inputs() {
        let mut w = LatencyWindow::default();
        let t0 = Instant::now();
        // 1 µs to 1 ms: below 2048 µs the histogram is exact.
        for us in 1..=1000 {
            w.record(t0, f64::from(us) / 1e3);
        }
        let f = w.figures(t0, Duration::from_secs(600));
        assert_eq!(f.count, 1000);
        assert_eq!(f.p50_ms, 0.5);
        assert_eq!(f.p99_ms, 0.99);
        assert!((f.avg_ms - 0.5005).abs() < 1e-12, "{}", f.avg_ms);

        // 1 to 100 ms: within the histogram's 0.1 %, never below the true rank; the mean is exact.
        let mut w = LatencyWindow::default();
        for ms in 1..=100 {
            w.record(t0, f64::from(ms));
        }
        let f = w.figures(t0, Duration::from_secs(600));
        assert_eq!(f.count, 100);
        assert!(f.p50_ms >= 50.0 && f.p50_ms <= 50.0 * 1.001, "{}", f.p50_ms);
        assert!(f.p99_ms >= 99.0 && f.p99_ms <= 99.0 * 1.001, "{}", f.p99_ms);
        assert!((f.avg_ms - 50.5).abs() < 1e-9);
        // 100 requests, the window is 5 minutes: 20 per minute.
        assert!((f.per_minute - 20.0).abs() < 1e-9);
        // One slow request among a hundred fast ones: p99 is the 100th of 101, 100 ms.
        w.record(t0, 60_000.0);
        let f = w.figures(t0, Duration::from_secs(600));
        assert!(f.p99_ms >= 100.0 && f.p99_ms <= 100.1, "{}", f.p99_ms);
        assert_eq!(w.figures(t0, Duration::ZERO).per_minute, 101.0 * 60.0);
    }

    #[test]
    fn window_keeps_the_last_five_minutes_by_bucket() {
        let mut w = LatencyWindow::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let long = Duration::from_secs(3600);
        w.record(t0, 1000.0);
        w.record(at(200), 1.0);
        // The first sample's bucket [0, 10 s) still overlaps the last 5 minutes at 305 s ...
        assert_eq!(w.figures(at(305), long).count, 2);
        // ... not at 310 s.
        let f = w.figures(at(310), long);
        assert_eq!((f.count, f.p99_ms), (1, 1.0));
        assert_eq!(w.figures(at(510), long).count, 0);
        assert_eq!(w.figures(at(510), long), WindowFigures::default());
        assert_eq!(
            LatencyWindow::default().figures(t0, long),
            WindowFigures::default()
        );
    }

    #[test]
    fn rate_is_over_the_span_the_window_covers() {
        let mut w = LatencyWindow::default();
        let t0 = Instant::now();
        for s in 0..600 {
            w.record(t0 + Duration::from_secs(s), 2.0);
        }
        let long = Duration::from_secs(3600);
        // At 600 s the window is [300 s, 600 s]: 300 samples in 5 minutes.
        let f = w.figures(t0 + Duration::from_secs(600), long);
        assert_eq!(f.count, 300);
        assert!((f.per_minute - 60.0).abs() < 1e-9, "{}", f.per_minute);
        // At 605 s it is [300 s, 605 s], the bucket that holds 305 s whole.
        let f = w.figures(t0 + Duration::from_secs(605), long);
        assert_eq!(f.count, 300);
        assert!(
            (f.per_minute - 300.0 * 60.0 / 305.0).abs() < 1e-9,
            "{}",
            f.per_minute
        );
        // A node up for 2 minutes has its rate over those 2 minutes.
        let f = w.figures(t0 + Duration::from_secs(600), Duration::from_secs(120));
        assert!((f.per_minute - 150.0).abs() < 1e-9, "{}", f.per_minute);
    }

    /// Parses a Prometheus text exposition: (name, type, help, value) per sample, checking that
    /// each sample follows its family's HELP and TYPE lines.
    fn parse(text: &str) -> Vec<(String, String, String, f64)> {
        let valid = |n: &str| {
            !n.is_empty()
                && !n.starts_with(|c: char| c.is_ascii_digit())
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        };
        let mut out = Vec::new();
        let (mut help, mut kind) = (None, None);
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, h) = rest.split_once(' ').unwrap();
                help = Some((name.to_string(), h.to_string()));
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, k) = rest.split_once(' ').unwrap();
                assert_eq!(Some(name), help.as_ref().map(|(n, _)| n.as_str()), "{line}");
                assert!(["counter", "gauge"].contains(&k), "{line}");
                kind = Some(k.to_string());
            } else {
                let (name, value) = line.split_once(' ').unwrap();
                assert!(valid(name), "{line}");
                let (family, h) = help.take().unwrap();
                assert_eq!(name, family, "{line}");
                let k = kind.take().unwrap();
                if k == "counter" {
                    assert!(name.ends_with("_total"), "{line}");
                }
                out.push((name.to_string(), k, h, value.parse::<f64>().unwrap()));
            }
        }
        out
    }

    #[test]
    fn exposition_is_valid_prometheus_text() {
        let mut e = Exposition::default();
        e.counter("api_requests", "REST requests answered", 7u64);
        e.counter("rewards_minted", "NEURO minted", 1.5f64);
        e.gauge("uptime_seconds", "Seconds since the daemon started", 42u64);
        e.gauge("engine_up", "1 when the engine answers", 1i64);
        e.gauge(
            "training_loss",
            "Latest loss (NaN before the first step)",
            f64::NAN,
        );
        e.gauge("odd", "A back\\slash and a\nnew line", -0.25f64);
        let text = e.encode();
        assert!(text.contains("\nneuroshard_engine_up 1\n"), "{text}");
        assert!(text.starts_with(
            "# HELP neuroshard_api_requests_total REST requests answered.\n\
             # TYPE neuroshard_api_requests_total counter\n\
             neuroshard_api_requests_total 7\n"
        ));
        let samples = parse(&text);
        let names: Vec<_> = samples
            .iter()
            .map(|s| (s.0.as_str(), s.1.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("neuroshard_api_requests_total", "counter"),
                ("neuroshard_rewards_minted_total", "counter"),
                ("neuroshard_uptime_seconds", "gauge"),
                ("neuroshard_engine_up", "gauge"),
                ("neuroshard_training_loss", "gauge"),
                ("neuroshard_odd", "gauge"),
            ]
        );
        let values: Vec<f64> = samples.iter().map(|s| s.3).collect();
        assert_eq!(values[..4], [7.0, 1.5, 42.0, 1.0]);
        assert!(values[4].is_nan());
        assert_eq!(values[5], -0.25);
        // HELP escapes the backslash and the line break, so the text stays one line a field.
        assert_eq!(samples[5].2, "A back\\\\slash and a\\nnew line.");
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
