//! Rate limits: a token bucket per API token and one per client address for requests without
//! a valid token (`api.rate_limit_per_token`, `api.rate_limit_per_ip`, requests per minute,
//! bursts up to the same number). Changing either limit in the config takes effect at once.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use parking_lot::RwLock;

use crate::config::ApiConfig;

/// Whose budget a request spends.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    Token(String),
    Ip(IpAddr),
}

struct Limiters {
    per_token: u32,
    per_ip: u32,
    tokens: DefaultKeyedRateLimiter<String>,
    ips: DefaultKeyedRateLimiter<IpAddr>,
}

impl Limiters {
    fn new(per_token: u32, per_ip: u32) -> Limiters {
        let quota =
            |n: u32| Quota::per_minute(NonZeroU32::new(n.max(1)).unwrap_or(NonZeroU32::MIN));
        Limiters {
            per_token,
            per_ip,
            tokens: RateLimiter::keyed(quota(per_token)),
            ips: RateLimiter::keyed(quota(per_ip)),
        }
    }
}

pub struct RateLimits {
    limiters: RwLock<Limiters>,
    checks: AtomicU64,
}

impl RateLimits {
    pub fn new(cfg: &ApiConfig) -> RateLimits {
        RateLimits {
            limiters: RwLock::new(Limiters::new(
                cfg.rate_limit_per_token,
                cfg.rate_limit_per_ip,
            )),
            checks: AtomicU64::new(0),
        }
    }

    /// Spends one request of `key`'s budget; `Err(wait)` when it is exhausted.
    pub fn check(&self, cfg: &ApiConfig, key: &Key) -> Result<(), Duration> {
        {
            let current = self.limiters.read();
            if current.per_token != cfg.rate_limit_per_token
                || current.per_ip != cfg.rate_limit_per_ip
            {
                drop(current);
                *self.limiters.write() =
                    Limiters::new(cfg.rate_limit_per_token, cfg.rate_limit_per_ip);
            }
        }
        let l = self.limiters.read();
        // Forget idle keys now and then, so memory stays bounded under many clients.
        if self.checks.fetch_add(1, Ordering::Relaxed) % 4096 == 4095 {
            l.tokens.retain_recent();
            l.ips.retain_recent();
        }
        let verdict = match key {
            Key::Token(t) => l.tokens.check_key(t),
            Key::Ip(ip) => l.ips.check_key(ip),
        };
        verdict.map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_is_per_key_and_follows_the_config() {
        let mut cfg = ApiConfig {
            rate_limit_per_token: 3,
            rate_limit_per_ip: 2,
            ..ApiConfig::default()
        };
        let limits = RateLimits::new(&cfg);
        let a = Key::Token("a".into());
        let ip = Key::Ip("127.0.0.1".parse().unwrap());
        for _ in 0..3 {
            limits.check(&cfg, &a).unwrap();
        }
        let wait = limits.check(&cfg, &a).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
        limits.check(&cfg, &Key::Token("b".into())).unwrap();
        limits.check(&cfg, &ip).unwrap();
        limits.check(&cfg, &ip).unwrap();
        assert!(limits.check(&cfg, &ip).is_err());
        cfg.rate_limit_per_ip = 100;
        limits.check(&cfg, &ip).unwrap();
    }
}
