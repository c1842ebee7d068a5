//! Peer scores: misbehaviour lowers a score; at zero the peer (or, before it proved an
//! identity, the connection) is banned for [`BAN_DURATION`]; good requests slowly restore it.
//!
//! Keys are strings: `node 0x...` for a node that authenticated, `conn ip:port` for a libp2p
//! connection (every stream and channel on it shares the score). A forged signature is charged to the
//! connection, not to the node it claims to be, so nobody can get another node banned.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use neuroshard_identity::Address;
use parking_lot::{Mutex, MutexGuard};

/// A fresh peer's score, and the most it can reach again.
pub const MAX_SCORE: i32 = 100;
/// How long a peer whose score reached zero is refused.
pub const BAN_DURATION: Duration = Duration::from_secs(120);
/// Score a peer has when its ban ends.
const SCORE_AFTER_BAN: i32 = 50;
/// Entries kept at most (full scores are forgotten first, then the oldest).
const MAX_ENTRIES: usize = 4096;

/// What a peer did wrong, and what it costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offence {
    /// Undecodable, oversized or malformed request.
    Malformed,
    /// Missing, forged or replayed authentication, or no handshake.
    Unauthenticated,
    /// A ledger message or a DiLoCo delta that failed verification.
    BadLedgerMessage,
}

impl Offence {
    pub fn cost(self) -> i32 {
        match self {
            Offence::Malformed => 25,
            Offence::Unauthenticated => 20,
            Offence::BadLedgerMessage => 10,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    score: i32,
    banned_until: Option<Instant>,
    touched: Instant,
}

/// Scores of nodes and connections.
#[derive(Debug, Default)]
pub struct Scores {
    inner: Mutex<HashMap<String, Entry>>,
}

impl Scores {
    /// Charges `key` for `offence` (`times` over); returns true when this made it banned.
    pub fn penalize(&self, key: &str, offence: Offence, times: u32, now: Instant) -> bool {
        let mut g = self.lock();
        Self::make_room(&mut g, key);
        let e = g.entry(key.to_string()).or_insert(Entry {
            score: MAX_SCORE,
            banned_until: None,
            touched: now,
        });
        Self::expire(e, now);
        e.touched = now;
        let cost = offence.cost().saturating_mul(times.min(100) as i32);
        e.score = e.score.saturating_sub(cost);
        if e.score <= 0 && e.banned_until.is_none() {
            e.banned_until = Some(now + BAN_DURATION);
            return true;
        }
        false
    }

    /// A well-behaved request: +1, up to [`MAX_SCORE`].
    pub fn reward(&self, key: &str, now: Instant) {
        let mut g = self.lock();
        if let Some(e) = g.get_mut(key) {
            Self::expire(e, now);
            e.score = (e.score + 1).min(MAX_SCORE);
            e.touched = now;
        }
    }

    /// Seconds of ban left for `key`, if banned.
    pub fn banned(&self, key: &str, now: Instant) -> Option<u64> {
        let mut g = self.lock();
        let e = g.get_mut(key)?;
        Self::expire(e, now);
        e.banned_until
            .map(|until| until.saturating_duration_since(now).as_secs().max(1))
    }

    pub fn score(&self, key: &str, now: Instant) -> i32 {
        let mut g = self.lock();
        match g.get_mut(key) {
            Some(e) => {
                Self::expire(e, now);
                e.score
            }
            None => MAX_SCORE,
        }
    }

    fn expire(e: &mut Entry, now: Instant) {
        if e.banned_until.is_some_and(|until| now >= until) {
            e.banned_until = None;
            e.score = SCORE_AFTER_BAN;
        }
    }

    fn make_room(g: &mut HashMap<String, Entry>, key: &str) {
        if g.len() < MAX_ENTRIES || g.contains_key(key) {
            return;
        }
        g.retain(|_, e| e.score < MAX_SCORE || e.banned_until.is_some());
        if g.len() >= MAX_ENTRIES
            && let Some(oldest) = g
                .iter()
                .min_by_key(|(_, e)| e.touched)
                .map(|(k, _)| k.clone())
        {
            g.remove(&oldest);
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.inner.lock()
    }
}

/// Score key of an authenticated node.
pub fn node_key(id: &Address) -> String {
    format!("node {id}")
}

/// Score key of a connection (its remote address: every stream on it shares the score).
pub fn conn_key(addr: Option<std::net::SocketAddr>) -> String {
    match addr {
        Some(a) => format!("conn {a}"),
        None => "conn unknown".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_offences_ban_then_the_ban_ends() {
        let s = Scores::default();
        let t0 = Instant::now();
        assert_eq!(s.banned("conn a", t0), None);
        for _ in 0..3 {
            assert!(!s.penalize("conn a", Offence::Malformed, 1, t0));
        }
        assert!(s.banned("conn a", t0).is_none());
        assert!(s.penalize("conn a", Offence::Malformed, 1, t0));
        assert_eq!(s.banned("conn a", t0), Some(BAN_DURATION.as_secs()));
        // Other keys are untouched.
        assert_eq!(s.banned("conn b", t0), None);
        assert_eq!(s.score("conn b", t0), MAX_SCORE);
        let later = t0 + BAN_DURATION;
        assert_eq!(s.banned("conn a", later), None);
        assert_eq!(s.score("conn a", later), SCORE_AFTER_BAN);
        s.reward("conn a", later);
        assert_eq!(s.score("conn a", later), SCORE_AFTER_BAN + 1);
    }

    #[test]
    fn many_bad_messages_in_one_request_count() {
        let s = Scores::default();
        let t0 = Instant::now();
        assert!(s.penalize("node x", Offence::BadLedgerMessage, 10, t0));
        assert!(s.banned("node x", t0).is_some());
    }

    #[test]
    fn table_stays_bounded() {
        let s = Scores::default();
        let t0 = Instant::now();
        for i in 0..(MAX_ENTRIES + 50) {
            s.penalize(&format!("conn {i}"), Offence::Unauthenticated, 1, t0);
        }
        assert!(s.lock().len() <= MAX_ENTRIES);
    }
}
