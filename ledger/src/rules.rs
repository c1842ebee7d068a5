//! The network's parameters that every node must share to agree on balances: how long a
//! reward stays pending (the challenge window in which it can still be voided) and how many
//! layers the network's model has (a proof may only claim layers that exist). Nodes of one
//! network run the same model, so `model_layers` is the model preset's layer count; both are
//! part of the ledger root (`LedgerState::root_hash` encodes them), so two nodes with
//! different rules see different roots instead of silently different balances.

use super::proof::MAX_LAYERS;

/// Default challenge window: a reward is pending for ten epochs before it can be spent.
pub const DEFAULT_CHALLENGE_WINDOW_SECONDS: i64 = 600;
/// Longest challenge window a network may choose (one day).
pub const MAX_CHALLENGE_WINDOW_SECONDS: i64 = 86_400;
/// Staked weight that decides a fraud verdict: 100 NEURO.
pub const DEFAULT_FRAUD_QUORUM: u64 = 100 * super::amount::UNITS_PER_NEURO;
/// Half of a convicted account's stake is slashed.
pub const DEFAULT_SLASH_BPS: u32 = 5_000;
/// A fifth of a slash goes to the voters who found the fraud.
pub const DEFAULT_REPORTER_BPS: u32 = 2_000;
/// An acquitted accusation costs the accuser a tenth of its stake.
pub const DEFAULT_FALSE_ACCUSATION_BPS: u32 = 1_000;
/// Uptime is credited per epoch up to the second largest heartbeat count among the attesters a
/// proof cites: one Sybil attester cannot lift a claim alone (see docs/economics.md).
pub const DEFAULT_UPTIME_ATTESTERS: u32 = 2;
/// Most attesters a network may require for uptime.
pub const MAX_UPTIME_ATTESTERS: u32 = 16;
/// Stake below which an account is unbonded in an open network: 100 NEURO (see
/// docs/economics.md, "When cheating does not pay").
pub const DEFAULT_BOND: u64 = 100 * super::amount::UNITS_PER_NEURO;
/// An unbonded account's rewards stay pending this many challenge windows (600 s x 144 = one
/// day), capped at the longest window.
pub const DEFAULT_UNBONDED_WINDOW_FACTOR: u32 = 144;
/// Largest factor a network may choose.
pub const MAX_UNBONDED_WINDOW_FACTOR: u32 = 1_440;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// Seconds from a reward block's timestamp until its amount is available. 0: at once.
    pub challenge_window_secs: i64,
    /// Layers of the network's model: a proof's `layers_held` must lie in `0..model_layers`,
    /// `holds_embedding` means layer 0 is held and `holds_lm_head` the last layer.
    pub model_layers: u32,
    /// Development networks only: training and uptime claims need no receipts from other
    /// nodes (a lone node earns for its own training and uptime). Off in every open network.
    pub accept_unattested_training: bool,
    /// Fraud verdicts (see `fraud.rs`): the staked weight of guilty votes that convicts a
    /// reward (with at least twice the innocent weight), or of innocent votes that acquits it.
    pub fraud_quorum: u64,
    /// Share of a convicted account's stake (staked and cooling down) that is slashed, in basis
    /// points.
    pub slash_bps: u32,
    /// Share of a slash paid to the voters who found the fraud (pro rata to their weight), in
    /// basis points; the rest is burned.
    pub reporter_bps: u32,
    /// Share of its stake an accuser loses to the accused when the accusation is acquitted, in
    /// basis points.
    pub false_accusation_bps: u32,
    /// Uptime: per epoch, the heartbeat count of the `uptime_attesters`-th largest attester is
    /// credited (a node heard by fewer peers earns no uptime, unless the network accepts
    /// unattested claims).
    pub uptime_attesters: u32,
    /// Open networks: an account whose stake (when its reward is minted) is below `bond` has
    /// nothing to slash, so its rewards stay pending `unbonded_window_factor` challenge
    /// windows (at most `MAX_CHALLENGE_WINDOW_SECONDS`) instead of one: a conviction in that
    /// time voids them all, so an unbonded cheater keeps about `(1 - p)^epochs` of its claims.
    pub bond: u64,
    /// See `bond`; 1 makes bonded and unbonded accounts wait the same.
    pub unbonded_window_factor: u32,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            challenge_window_secs: DEFAULT_CHALLENGE_WINDOW_SECONDS,
            model_layers: MAX_LAYERS as u32,
            accept_unattested_training: false,
            fraud_quorum: DEFAULT_FRAUD_QUORUM,
            slash_bps: DEFAULT_SLASH_BPS,
            reporter_bps: DEFAULT_REPORTER_BPS,
            false_accusation_bps: DEFAULT_FALSE_ACCUSATION_BPS,
            uptime_attesters: DEFAULT_UPTIME_ATTESTERS,
            bond: DEFAULT_BOND,
            unbonded_window_factor: DEFAULT_UNBONDED_WINDOW_FACTOR,
        }
    }
}

/// Why a set of rules cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RulesError {
    #[error("challenge window must be between 0 and {MAX_CHALLENGE_WINDOW_SECONDS} s, got {0}")]
    Window(i64),
    #[error("model layers must be between 1 and {MAX_LAYERS}, got {0}")]
    Layers(u32),
    #[error("a share must be at most 10000 basis points, got {0}")]
    Share(u32),
    #[error("the fraud quorum must be above zero")]
    Quorum,
    #[error("uptime attesters must be between 1 and {MAX_UPTIME_ATTESTERS}, got {0}")]
    UptimeAttesters(u32),
    #[error(
        "the unbonded window factor must be between 1 and {MAX_UNBONDED_WINDOW_FACTOR}, got {0}"
    )]
    UnbondedWindowFactor(u32),
}

impl Rules {
    pub fn new(challenge_window_secs: i64, model_layers: u32) -> Result<Rules, RulesError> {
        if !(0..=MAX_CHALLENGE_WINDOW_SECONDS).contains(&challenge_window_secs) {
            return Err(RulesError::Window(challenge_window_secs));
        }
        if model_layers == 0 || model_layers as usize > MAX_LAYERS {
            return Err(RulesError::Layers(model_layers));
        }
        Ok(Rules {
            challenge_window_secs,
            model_layers,
            ..Rules::default()
        })
    }

    /// The same rules, crediting uptime up to the `k`-th largest heartbeat count.
    pub fn with_uptime_attesters(self, k: u32) -> Result<Rules, RulesError> {
        if !(1..=MAX_UPTIME_ATTESTERS).contains(&k) {
            return Err(RulesError::UptimeAttesters(k));
        }
        Ok(Rules {
            uptime_attesters: k,
            ..self
        })
    }

    /// The same rules, accepting training and uptime claims without receipts (development
    /// networks).
    pub fn unattested(self) -> Rules {
        Rules {
            accept_unattested_training: true,
            ..self
        }
    }

    /// The same rules with other fraud parameters (all shares at most 10 000 basis points).
    pub fn with_fraud(
        self,
        fraud_quorum: u64,
        slash_bps: u32,
        reporter_bps: u32,
        false_accusation_bps: u32,
    ) -> Result<Rules, RulesError> {
        for bps in [slash_bps, reporter_bps, false_accusation_bps] {
            if bps > 10_000 {
                return Err(RulesError::Share(bps));
            }
        }
        if fraud_quorum == 0 {
            return Err(RulesError::Quorum);
        }
        Ok(Rules {
            fraud_quorum,
            slash_bps,
            reporter_bps,
            false_accusation_bps,
            ..self
        })
    }

    /// The same rules with another bond and unbonded window factor.
    pub fn with_bond(self, bond: u64, unbonded_window_factor: u32) -> Result<Rules, RulesError> {
        if !(1..=MAX_UNBONDED_WINDOW_FACTOR).contains(&unbonded_window_factor) {
            return Err(RulesError::UnbondedWindowFactor(unbonded_window_factor));
        }
        Ok(Rules {
            bond,
            unbonded_window_factor,
            ..self
        })
    }

    /// Seconds a reward minted for an account with `staked` stays pending: one challenge
    /// window, or `unbonded_window_factor` of them (capped at the longest window) for an
    /// unbonded account of an open network.
    pub fn window_for(&self, staked: u64) -> i64 {
        let w = self.challenge_window_secs;
        if self.accept_unattested_training || staked >= self.bond {
            return w;
        }
        w.saturating_mul(i64::from(self.unbonded_window_factor))
            .min(MAX_CHALLENGE_WINDOW_SECONDS.max(w))
    }

    /// When a reward minted in a block dated `block_ts` for an account with `staked` becomes
    /// available.
    pub fn release_at(&self, block_ts: i64, staked: u64) -> i64 {
        block_ts.saturating_add(self.window_for(staked))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds() {
        assert!(Rules::new(0, 1).is_ok());
        assert!(Rules::new(MAX_CHALLENGE_WINDOW_SECONDS, MAX_LAYERS as u32).is_ok());
        assert_eq!(Rules::new(-1, 4), Err(RulesError::Window(-1)));
        assert_eq!(Rules::new(86_401, 4), Err(RulesError::Window(86_401)));
        assert_eq!(Rules::new(600, 0), Err(RulesError::Layers(0)));
        assert_eq!(Rules::new(600, 1025), Err(RulesError::Layers(1025)));
        let r = Rules::default();
        assert_eq!(r.release_at(1000, DEFAULT_BOND), 1600);
        assert_eq!(r.release_at(1000, u64::MAX), 1600);
        // Unbonded: 144 windows of 600 s, one day.
        assert_eq!(r.release_at(1000, DEFAULT_BOND - 1), 1000 + 86_400);
        assert_eq!(r.release_at(1000, 0), 1000 + 86_400);
        // Development networks trust every claim: one window whatever the stake.
        assert_eq!(r.unattested().release_at(1000, 0), 1600);
        // The cap, and a factor of 1.
        let long = Rules::new(3600, 4).unwrap();
        assert_eq!(long.window_for(0), MAX_CHALLENGE_WINDOW_SECONDS);
        assert_eq!(long.with_bond(DEFAULT_BOND, 1).unwrap().window_for(0), 3600);
        assert_eq!(Rules::new(0, 4).unwrap().window_for(0), 0);
        assert_eq!(r.with_bond(1, 0), Err(RulesError::UnbondedWindowFactor(0)));
        assert!(r.with_bond(0, MAX_UNBONDED_WINDOW_FACTOR).is_ok());
        assert!(Rules::default().with_uptime_attesters(1).is_ok());
        assert_eq!(
            Rules::default().with_uptime_attesters(0),
            Err(RulesError::UptimeAttesters(0))
        );
        assert!(Rules::default().with_uptime_attesters(17).is_err());
    }
}
