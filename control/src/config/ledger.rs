//! The `[ledger]` section: the network's ledger rules this node applies. Every node of a
//! network must use the same values (they are part of the ledger root, so a node with other
//! values shows a different root instead of silently different balances). Read at start.

use serde::{Deserialize, Serialize};

use neuroshard_ledger::rules::{DEFAULT_CHALLENGE_WINDOW_SECONDS, Rules, RulesError};

use super::ConfigError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct LedgerConfig {
    /// Seconds a reward stays pending (its challenge window, in which a fraud proof can still
    /// void it) before it can be spent; 0 makes rewards spendable at once.
    pub challenge_window_secs: i64,
    /// Development networks only: training rewards without receipts from other nodes, so a
    /// node training alone earns (every node of the network must agree; logged at start).
    pub accept_unattested_training: bool,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            challenge_window_secs: DEFAULT_CHALLENGE_WINDOW_SECONDS,
            accept_unattested_training: false,
        }
    }
}

impl LedgerConfig {
    /// The ledger rules for a network whose model has `model_layers` layers.
    pub fn rules(&self, model_layers: u32) -> Result<Rules, ConfigError> {
        let rules = Rules::new(self.challenge_window_secs, model_layers).map_err(|e| {
            let key = match e {
                RulesError::Window(_) => "ledger.challenge_window_secs",
                RulesError::Layers(_) => "training.model",
            };
            ConfigError::Invalid {
                key: key.into(),
                message: e.to_string(),
            }
        })?;
        Ok(if self.accept_unattested_training {
            rules.unattested()
        } else {
            rules
        })
    }
}
