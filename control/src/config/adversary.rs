//! The `[adversary]` section: a node that cheats on purpose, for the tests of checked work
//! (issue #19). Honoured only by a build with the `adversary` cargo feature (never in release
//! builds); any other build refuses to start with a cheat configured.

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// How the node cheats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Cheat {
    /// Honest.
    #[default]
    None,
    /// A DiLoCo replica that reports its inner steps without computing any (the engine is
    /// never asked): its pseudo-gradient is zero.
    SkipInnerSteps,
    /// A DiLoCo replica that computes one inner step in four and sends its pseudo-gradient
    /// times four, so it looks like a whole round's.
    FewerStepsScaled,
    /// Claims the most uptime a proof may (120 s) every epoch, whatever its peers' heartbeat
    /// receipts attest.
    InflateUptime,
    /// A pipeline stage that answers forwards with random activations (a random loss on the
    /// last stage), backwards with random input gradients and the norm phase with a made-up
    /// norm, and skips its optimizer step, without running its engine (its weights still
    /// follow the stage's DiLoCo rounds, so it claims its steps like an honest stage).
    GarbageActivations,
    /// A node that serves generation from a truncated model (its engine skips every layer
    /// but the first and the last, of two layers the last, `--serve-truncated`) while it
    /// claims the full model: its
    /// weights and their hash stay whole, its commitments come from the truncated pass.
    TruncatedModel,
    /// A pipeline stage that sends what a stage of zero weights would, without running its
    /// engine (a middle stage: random activations, and its output gradient back; the last:
    /// the loss ln(vocabulary) and zero input gradients), and logs the forgery it would serve
    /// when drawn: checkpoints of zero weights and moments, and inputs made up to fit (a
    /// middle stage's equal to its outputs, the last stage's zero), logged as received.
    SpoofedStageLog,
    /// `spoofed_stage_log`, naming a made-up node (an address of no node of the network) as
    /// the sender of every input it logs, so that no sender's reward ever cites a receipt for
    /// them: the inputs of its forged log are bound only by asking the senders it names
    /// (`pipeline/senders.rs`).
    MadeUpSender,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct AdversaryConfig {
    pub cheat: Cheat,
}

impl AdversaryConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.cheat != Cheat::None && !cfg!(feature = "adversary") {
            return Err(ConfigError::Invalid {
                key: "adversary.cheat".into(),
                message: "cheating needs a build with the `adversary` cargo feature (tests \
                          only, never a release build)"
                    .into(),
            });
        }
        Ok(())
    }

    /// Whether this inner step is computed (`n`: the steps done so far this run).
    pub fn computes(&self, n: u64) -> bool {
        match self.cheat {
            Cheat::None
            | Cheat::InflateUptime
            | Cheat::GarbageActivations
            | Cheat::TruncatedModel
            | Cheat::SpoofedStageLog
            | Cheat::MadeUpSender => true,
            Cheat::SkipInnerSteps => false,
            Cheat::FewerStepsScaled => n.is_multiple_of(4),
        }
    }

    /// Whether the minter claims the maximum uptime regardless of receipts.
    pub fn inflates_uptime(&self) -> bool {
        self.cheat == Cheat::InflateUptime
    }

    /// Whether pipeline commands are answered with garbage instead of the engine's results.
    pub fn garbage_activations(&self) -> bool {
        self.cheat == Cheat::GarbageActivations
    }

    /// Whether the engine serves generation from a truncated model.
    pub fn serves_truncated(&self) -> bool {
        cfg!(feature = "adversary") && self.cheat == Cheat::TruncatedModel
    }

    /// Whether pipeline commands are answered as zero weights would, with a forged log.
    pub fn spoofs_stage_log(&self) -> bool {
        matches!(self.cheat, Cheat::SpoofedStageLog | Cheat::MadeUpSender)
    }

    /// Whether the forged log names a made-up sender for its inputs.
    pub fn names_made_up_sender(&self) -> bool {
        self.cheat == Cheat::MadeUpSender
    }

    /// What the sent pseudo-gradient is multiplied by.
    pub fn delta_scale(&self) -> f32 {
        match self.cheat {
            Cheat::FewerStepsScaled => 4.0,
            _ => 1.0,
        }
    }
}
