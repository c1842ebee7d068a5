//! The `[ledger]` section: the network's ledger rules this node applies. Every node of a
//! network must use the same values (they are part of the ledger root, so a node with other
//! values shows a different root instead of silently different balances). Read at start.

use serde::{Deserialize, Serialize};

use neuroshard_ledger::parse_neuro_f64;
use neuroshard_ledger::rules::{
    DEFAULT_BOND, DEFAULT_CHALLENGE_WINDOW_SECONDS, DEFAULT_FALSE_ACCUSATION_BPS,
    DEFAULT_FRAUD_QUORUM, DEFAULT_REPORTER_BPS, DEFAULT_SLASH_BPS, DEFAULT_UNBONDED_WINDOW_FACTOR,
    DEFAULT_UPTIME_ATTESTERS, Rules, RulesError,
};
use neuroshard_ledger::units_to_neuro;

use super::ConfigError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct LedgerConfig {
    /// Seconds a reward stays pending (its challenge window, in which a fraud proof can still
    /// void it) before it can be spent; 0 makes rewards spendable at once.
    pub challenge_window_secs: i64,
    /// Development networks only: training and uptime rewards without receipts from other
    /// nodes, so a node alone earns (every node of the network must agree; logged at start).
    pub accept_unattested_training: bool,
    /// Uptime is credited per epoch up to the heartbeat count of this many peers (the k-th
    /// largest count among the attesters a proof cites): 2 keeps one Sybil peer from lifting
    /// a claim alone; a network of two nodes needs 1 to earn uptime at all.
    pub uptime_attesters: u32,
    /// Staked NEURO of guilty fraud verdicts that convicts a reward (with twice the innocent
    /// stake), or of innocent verdicts that acquits it.
    pub fraud_quorum_neuro: f64,
    /// Share of a convicted node's stake slashed, in basis points (5000 = half).
    pub slash_bps: u32,
    /// Share of a slash paid to the verifiers who found the fraud, in basis points.
    pub reporter_bps: u32,
    /// Share of its stake an accuser pays the accused when acquitted, in basis points.
    pub false_accusation_bps: u32,
    /// Open networks: a node with less than this many NEURO staked when its reward is minted
    /// is unbonded (nothing to slash), and its rewards stay pending `unbonded_window_factor`
    /// challenge windows (at most a day) instead of one.
    pub bond_neuro: f64,
    /// See `bond_neuro`: 144 x 600 s = one day; 1 makes everyone wait one window.
    pub unbonded_window_factor: u32,
    /// This node's own choice (not a network rule): how many replays of each DiLoCo
    /// contribution it aims at with the other replicas (each of the V that may check one
    /// draws with this / V after aggregating a round; 0 = never), and the rate at which it
    /// checks other holders of its pipeline layers.
    pub verify_probability: f64,
    /// Largest relative distance between a replayed and a sent pseudo-gradient that counts
    /// as reproduced.
    pub verify_tolerance: f64,
    /// Inner steps a DiLoCo replay window recomputes (1 to 16): short enough that honest
    /// nodes on other hardware reproduce it (`diloco::window`).
    pub verify_window_steps: u32,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            challenge_window_secs: DEFAULT_CHALLENGE_WINDOW_SECONDS,
            accept_unattested_training: false,
            uptime_attesters: DEFAULT_UPTIME_ATTESTERS,
            fraud_quorum_neuro: units_to_neuro(DEFAULT_FRAUD_QUORUM),
            slash_bps: DEFAULT_SLASH_BPS,
            reporter_bps: DEFAULT_REPORTER_BPS,
            false_accusation_bps: DEFAULT_FALSE_ACCUSATION_BPS,
            bond_neuro: units_to_neuro(DEFAULT_BOND),
            unbonded_window_factor: DEFAULT_UNBONDED_WINDOW_FACTOR,
            verify_probability: DEFAULT_VERIFY_PROBABILITY,
            verify_tolerance: DEFAULT_VERIFY_TOLERANCE,
            verify_window_steps: DEFAULT_VERIFY_WINDOW_STEPS,
        }
    }
}

/// Each other replica's contribution is replayed with this probability: with three replicas
/// a node replays 5% of the rounds it aggregates (its compute budget for checking others).
pub const DEFAULT_VERIFY_PROBABILITY: f64 = 0.025;
/// Relative distance a replay may differ by (bf16 on the wire costs ~0.4%).
pub const DEFAULT_VERIFY_TOLERANCE: f64 = 0.05;
/// A window of 3 steps after warm-up: 0.0037 at most on other hardware in bf16 (BENCHMARKS.md).
pub const DEFAULT_VERIFY_WINDOW_STEPS: u32 = 3;

impl LedgerConfig {
    /// The ledger rules for a network whose model has `model_layers` layers.
    pub fn rules(&self, model_layers: u32) -> Result<Rules, ConfigError> {
        let invalid = |e: RulesError| {
            let key = match e {
                RulesError::Window(_) => "ledger.challenge_window_secs",
                RulesError::Layers(_) => "training.model",
                RulesError::Share(_) => "ledger.slash_bps/reporter_bps/false_accusation_bps",
                RulesError::Quorum => "ledger.fraud_quorum_neuro",
                RulesError::UptimeAttesters(_) => "ledger.uptime_attesters",
                RulesError::UnbondedWindowFactor(_) => "ledger.unbonded_window_factor",
            };
            ConfigError::Invalid {
                key: key.into(),
                message: e.to_string(),
            }
        };
        for (key, v, max) in [
            ("ledger.verify_probability", self.verify_probability, 1.0),
            ("ledger.verify_tolerance", self.verify_tolerance, 10.0),
        ] {
            if !(0.0..=max).contains(&v) {
                return Err(ConfigError::Invalid {
                    key: key.into(),
                    message: format!("must be between 0 and {max}, got {v}"),
                });
            }
        }
        if !(1..=crate::diloco::window::MAX_WINDOW).contains(&self.verify_window_steps) {
            return Err(ConfigError::Invalid {
                key: "ledger.verify_window_steps".into(),
                message: format!(
                    "must be between 1 and {}, got {}",
                    crate::diloco::window::MAX_WINDOW,
                    self.verify_window_steps
                ),
            });
        }
        let quorum =
            parse_neuro_f64(self.fraud_quorum_neuro).map_err(|e| ConfigError::Invalid {
                key: "ledger.fraud_quorum_neuro".into(),
                message: e.to_string(),
            })?;
        let bond = parse_neuro_f64(self.bond_neuro).map_err(|e| ConfigError::Invalid {
            key: "ledger.bond_neuro".into(),
            message: e.to_string(),
        })?;
        let rules = Rules::new(self.challenge_window_secs, model_layers)
            .and_then(|r| {
                r.with_fraud(
                    quorum,
                    self.slash_bps,
                    self.reporter_bps,
                    self.false_accusation_bps,
                )
            })
            .and_then(|r| r.with_uptime_attesters(self.uptime_attesters))
            .and_then(|r| r.with_bond(bond, self.unbonded_window_factor))
            .map_err(invalid)?;
        Ok(if self.accept_unattested_training {
            rules.unattested()
        } else {
            rules
        })
    }
}
