//! Reward and staking economics in integer arithmetic, so every node computes the same units.
//! The formulas are written out in `docs/economics.md` (see also the module docs of `ledger`).

use super::amount::{MAX_AMOUNT, UNITS_PER_NEURO};

/// Uptime: 0.0001 NEURO per minute.
pub const UPTIME_UNITS_PER_MINUTE: u64 = UNITS_PER_NEURO / 10_000;
/// Training: 0.0005 NEURO per batch per layer held.
pub const TRAINING_UNITS_PER_BATCH_LAYER: u64 = UNITS_PER_NEURO / 2_000;
/// Data: 0.00001 NEURO per sample served.
pub const DATA_UNITS_PER_SAMPLE: u64 = UNITS_PER_NEURO / 100_000;
/// Inference: 0.0001 NEURO per million tokens (the original's market price at zero
/// utilization; utilization is not verifiable, so it is left out).
pub const INFERENCE_UNITS_PER_MILLION_TOKENS: u64 = UNITS_PER_NEURO / 10_000;
/// Role bonus in parts per million: +0.2 for holding the embedding, +0.3 for the LM head.
pub const EMBEDDING_BONUS_PPM: u64 = 200_000;
pub const LM_HEAD_BONUS_PPM: u64 = 300_000;
/// Stake multiplier: 1 + 0.1 * log2(1 + stake / 1000 NEURO) + 0.005 per locked day (at most
/// 90 days). The lock bonus is ours: it makes the contract's example (10,000 NEURO for 30 days)
/// come out at 1.50 (1.4959) while keeping the notes' logarithmic stake term.
pub const STAKE_LOG_COEFF_PPM: u64 = 100_000;
pub const STAKE_REFERENCE_UNITS: u64 = 1_000 * UNITS_PER_NEURO;
pub const LOCK_BONUS_PPM_PER_DAY: u64 = 5_000;
pub const LOCK_BONUS_MAX_DAYS: u32 = 90;
/// Staking duration bounds (days).
pub const MIN_STAKE_DAYS: u32 = 1;
pub const MAX_STAKE_DAYS: u32 = 365;
/// Unstaked funds become available after this cooldown.
pub const UNSTAKE_COOLDOWN_DAYS: i64 = 7;
pub const SECONDS_PER_DAY: i64 = 86_400;

const PPM: u128 = 1_000_000;

/// log2(a / b) in Q32 fixed point (floor), for a >= b > 0, a < 2^64, b < 2^64.
pub fn log2_q32(a: u64, b: u64) -> u64 {
    assert!(b > 0 && a >= b, "log2_q32 needs a >= b > 0");
    let (a, b) = (a as u128, b as u128);
    let mut n = 0u32;
    while a >= b << (n + 1) {
        n += 1;
    }
    // y = a / (b * 2^n) in [1, 2), Q62.
    let one = 1u128 << 62;
    let mut y = (a << 62) / (b << n);
    let mut result = u64::from(n) << 32;
    for bit in (0..32).rev() {
        y = (y * y) >> 62;
        if y >= 2 * one {
            y >>= 1;
            result |= 1 << bit;
        }
    }
    result
}

/// The stake multiplier in parts per million for `staked` units locked for `days`.
pub fn stake_multiplier_ppm(staked: u64, days: u32) -> u64 {
    if staked == 0 {
        return PPM as u64;
    }
    let reference = STAKE_REFERENCE_UNITS;
    let log_q32 = log2_q32(reference.saturating_add(staked), reference);
    let log_term = (u128::from(log_q32) * u128::from(STAKE_LOG_COEFF_PPM)) >> 32;
    let lock_term = u64::from(days.min(LOCK_BONUS_MAX_DAYS)) * LOCK_BONUS_PPM_PER_DAY;
    PPM as u64 + log_term as u64 + lock_term
}

/// The stake multiplier as a float for display.
pub fn stake_multiplier(staked: u64, days: u32) -> f64 {
    stake_multiplier_ppm(staked, days) as f64 / PPM as f64
}

/// The role bonus in parts per million.
pub fn role_multiplier_ppm(holds_embedding: bool, holds_lm_head: bool) -> u64 {
    PPM as u64
        + if holds_embedding {
            EMBEDDING_BONUS_PPM
        } else {
            0
        }
        + if holds_lm_head { LM_HEAD_BONUS_PPM } else { 0 }
}

/// What one proof's work is worth, before and after multipliers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RewardBreakdown {
    pub uptime: u64,
    pub training: u64,
    pub inference: u64,
    pub data: u64,
    pub role_ppm: u64,
    pub stake_ppm: u64,
    pub total: u64,
}

/// The work counted by a proof, after plausibility checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Work {
    /// Uptime seconds credited (the proof's uptime, capped by the time since the last one).
    pub uptime_seconds: u64,
    pub training_batches: u64,
    pub layers_held: u64,
    pub tokens_processed: u64,
    pub data_samples: u64,
    pub holds_embedding: bool,
    pub holds_lm_head: bool,
}

/// reward = (uptime + training + inference + data) * role * stake multiplier, floored to units.
pub fn compute_reward(work: &Work, staked: u64, stake_days: u32) -> RewardBreakdown {
    let uptime = work.uptime_seconds * UPTIME_UNITS_PER_MINUTE / 60;
    let training = TRAINING_UNITS_PER_BATCH_LAYER
        .saturating_mul(work.training_batches)
        .saturating_mul(work.layers_held);
    let inference = (u128::from(work.tokens_processed)
        * u128::from(INFERENCE_UNITS_PER_MILLION_TOKENS)
        / 1_000_000) as u64;
    let data = DATA_UNITS_PER_SAMPLE.saturating_mul(work.data_samples);
    let base = u128::from(uptime) + u128::from(training) + u128::from(inference) + u128::from(data);
    let role_ppm = role_multiplier_ppm(work.holds_embedding, work.holds_lm_head);
    let stake_ppm = stake_multiplier_ppm(staked, stake_days);
    let total = base * u128::from(role_ppm) / PPM * u128::from(stake_ppm) / PPM;
    RewardBreakdown {
        uptime,
        training,
        inference,
        data,
        role_ppm,
        stake_ppm,
        total: total.min(u128::from(MAX_AMOUNT)) as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log2_matches_float_reference() {
        for (a, b) in [
            (1u64, 1u64),
            (2, 1),
            (3, 1),
            (11, 1),
            (1000, 7),
            (u64::MAX, 1),
            (12345678, 1000),
        ] {
            let got = log2_q32(a, b) as f64 / (1u64 << 32) as f64;
            let want = (a as f64 / b as f64).log2();
            assert!((got - want).abs() < 1e-8, "{a}/{b}: {got} vs {want}");
        }
    }

    #[test]
    fn contract_stake_example_is_1_50() {
        let m = stake_multiplier(10_000 * UNITS_PER_NEURO, 30);
        assert_eq!((m * 100.0).round() / 100.0, 1.50, "{m}");
        assert_eq!(stake_multiplier(0, 30), 1.0);
        // The notes' log term alone: 1 + 0.1 * log2(11).
        let log_only = stake_multiplier_ppm(10_000 * UNITS_PER_NEURO, 0) as f64 / 1e6;
        assert!((log_only - (1.0 + 0.1 * 11f64.log2())).abs() < 1e-6);
    }

    #[test]
    fn reward_constants() {
        let w = Work {
            uptime_seconds: 60,
            ..Work::default()
        };
        assert_eq!(compute_reward(&w, 0, 0).total, UNITS_PER_NEURO / 10_000);
        let w = Work {
            training_batches: 2,
            layers_held: 4,
            ..Work::default()
        };
        // 0.0005 * 2 * 4 = 0.004 NEURO
        assert_eq!(compute_reward(&w, 0, 0).total, 4_000_000);
        let w = Work {
            data_samples: 100,
            holds_embedding: true,
            holds_lm_head: true,
            ..Work::default()
        };
        // 0.001 NEURO * 1.5
        assert_eq!(compute_reward(&w, 0, 0).total, 1_500_000);
        let w = Work {
            tokens_processed: 2_000_000,
            ..Work::default()
        };
        assert_eq!(compute_reward(&w, 0, 0).total, 200_000);
    }
}
