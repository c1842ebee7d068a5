//! Upkeep of a pipeline stage's layers: when it checks the layer coverage, when it takes a gap
//! over, and when a replica left off the training route refreshes its layers from a holder
//! that trained them further (resync), with its backoff.
//!
//! The executor (the daemon's trainer) feeds [`Event`]s in with the time and carries out the
//! [`Action`]s that come back, reporting their outcome as the next event:
//!
//! ```text
//! Tick{step} ──► [PublishStep, CheckCoverage]   (at most once per CHECK_EVERY)
//! Coverage{gap, mine} ──► [TakeOver(range)]     (the same gap seen on two checks in a row,
//!                                                and the takeover rule picks this node)
//!                     └─► [Resync]              (else, once the step has not moved for the
//!                                                resync wait)
//! Balance{mine} ──► [Rebalance(range)]          (no gap; the same move proposed on two checks
//!                                                in a row, REBALANCE_COOLDOWN after this
//!                                                node's last change of layers)
//! TookOver ──► []        TakeoverFailed ──► [Resync] when due
//! Resynced{tried, step} ──► []   (a try doubles the wait up to MAX_RESYNC_WAIT)
//! ```

use std::ops::Range;

use crate::Millis;

/// How often the coverage is checked (and the step published to peers).
pub const CHECK_EVERY: Millis = 1_000;
/// A stage whose optimizer step has not moved for this long looks for a holder ahead.
pub const RESYNC_WAIT: Millis = 10_000;
/// The wait doubles after each resync up to this (a standby replica of a large stage should
/// not pull it every few seconds); it is back to [`RESYNC_WAIT`] once the stage trains again.
pub const MAX_RESYNC_WAIT: Millis = 300_000;
/// A node moves for balance ([`crate::balance`]) at most once per this long, counted from its
/// start and from its last change of layers: the peers' advertisements (layers, measured
/// throughput) catch up with a move before the next one is weighed.
pub const REBALANCE_COOLDOWN: Millis = 20_000;

/// What happened, as the executor reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The run loop's turn; `step` is the stage's optimizer step now.
    Tick { step: u64 },
    /// The result of [`Action::CheckCoverage`]: the first run of layers nobody holds, and the
    /// range the takeover rule gives this node for it (`None`: another node takes it, or this
    /// node's range would not change).
    Coverage {
        gap: Option<Range<u32>>,
        mine: Option<Range<u32>>,
    },
    /// Sent after [`Event::Coverage`] when no layer is uncovered: the range the balance rule
    /// ([`crate::balance::rebalance`]) moves this node to (`None`: no move passes the
    /// threshold, or another node moves first).
    Balance { mine: Option<Range<u32>> },
    /// [`Action::TakeOver`] or [`Action::Rebalance`] succeeded: the stage holds the new range.
    TookOver,
    /// [`Action::TakeOver`] or [`Action::Rebalance`] failed; the old range is back.
    TakeoverFailed,
    /// [`Action::Resync`] ran: `tried` when a holder ahead was found and the reload was
    /// attempted; `step` is the stage's step after it.
    Resynced { tried: bool, step: u64 },
}

/// What the executor is asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Tell peers this stage's optimizer step.
    PublishStep(u64),
    /// Look at the peers' layers and answer with [`Event::Coverage`] (then, when nothing is
    /// uncovered, with [`Event::Balance`]).
    CheckCoverage,
    /// Reload the engine with this range (covering the gap), answer with [`Event::TookOver`]
    /// or [`Event::TakeoverFailed`].
    TakeOver(Range<u32>),
    /// Reload the engine with this range (moving for balance); answer as for
    /// [`Action::TakeOver`].
    Rebalance(Range<u32>),
    /// Refresh the stage's layers from a holder at least `RESYNC_LAG` steps ahead, if there is
    /// one; answer with [`Event::Resynced`].
    Resync,
}

/// The upkeep state of one stage.
#[derive(Debug, Clone)]
pub struct Upkeep {
    last_check: Option<Millis>,
    /// The step last seen to change, and when.
    unchanged: (u64, Millis),
    resync_wait: Millis,
    /// The gap seen on the previous check.
    seen_gap: Option<Range<u32>>,
    /// The balance move proposed on the previous check.
    seen_move: Option<Range<u32>>,
    /// When this node last changed its layers (or started).
    last_move: Millis,
}

impl Upkeep {
    /// A stage that starts at `now` (its step counts as just changed).
    pub fn new(now: Millis) -> Upkeep {
        Upkeep {
            last_check: None,
            unchanged: (0, now),
            resync_wait: RESYNC_WAIT,
            seen_gap: None,
            seen_move: None,
            last_move: now,
        }
    }

    /// The wait before the next resync.
    pub fn resync_wait(&self) -> Millis {
        self.resync_wait
    }

    /// Takes one event at `now`; the actions to carry out, in order.
    pub fn on(&mut self, event: Event, now: Millis) -> Vec<Action> {
        match event {
            Event::Tick { step } => {
                if self
                    .last_check
                    .is_some_and(|t| now.saturating_sub(t) < CHECK_EVERY)
                {
                    return Vec::new();
                }
                self.last_check = Some(now);
                if step != self.unchanged.0 {
                    self.unchanged = (step, now);
                    self.resync_wait = RESYNC_WAIT;
                }
                vec![Action::PublishStep(step), Action::CheckCoverage]
            }
            Event::Coverage { gap, mine } => {
                // A gap must be seen on two checks in a row: a peer that reconnects or whose
                // ping lags must not make the pool move.
                let confirmed = gap.is_some() && self.seen_gap == gap;
                self.seen_gap = gap;
                match mine {
                    Some(range) if confirmed => vec![Action::TakeOver(range)],
                    _ => self.resync_if_due(now),
                }
            }
            Event::Balance { mine } => {
                let confirmed = mine.is_some() && self.seen_move == mine;
                self.seen_move = mine.clone();
                let cooled = now.saturating_sub(self.last_move) >= REBALANCE_COOLDOWN;
                match mine {
                    Some(range) if confirmed && cooled => vec![Action::Rebalance(range)],
                    _ => Vec::new(),
                }
            }
            Event::TookOver => {
                self.seen_gap = None;
                self.seen_move = None;
                self.last_move = now;
                Vec::new()
            }
            Event::TakeoverFailed => self.resync_if_due(now),
            Event::Resynced { tried, step } => {
                if tried {
                    self.unchanged = (step, now);
                    self.resync_wait = (self.resync_wait * 2).min(MAX_RESYNC_WAIT);
                }
                Vec::new()
            }
        }
    }

    fn resync_if_due(&self, now: Millis) -> Vec<Action> {
        if now.saturating_sub(self.unchanged.1) >= self.resync_wait {
            vec![Action::Resync]
        } else {
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tick(u: &mut Upkeep, step: u64, now: Millis) -> Vec<Action> {
        u.on(Event::Tick { step }, now)
    }

    fn coverage(
        u: &mut Upkeep,
        gap: Option<Range<u32>>,
        mine: Option<Range<u32>>,
        now: Millis,
    ) -> Vec<Action> {
        u.on(Event::Coverage { gap, mine }, now)
    }

    #[test]
    fn coverage_is_checked_at_most_once_a_second() {
        let mut u = Upkeep::new(0);
        assert_eq!(
            tick(&mut u, 5, 0),
            vec![Action::PublishStep(5), Action::CheckCoverage]
        );
        assert_eq!(tick(&mut u, 5, 999), vec![]);
        assert_eq!(
            tick(&mut u, 6, 1_000),
            vec![Action::PublishStep(6), Action::CheckCoverage]
        );
    }

    #[test]
    fn a_gap_is_taken_over_only_when_seen_on_two_checks_in_a_row() {
        let mut u = Upkeep::new(0);
        tick(&mut u, 1, 0);
        assert_eq!(coverage(&mut u, Some(2..4), Some(0..4), 0), vec![]);
        tick(&mut u, 2, 1_000);
        // Another gap this time: not confirmed either.
        assert_eq!(coverage(&mut u, Some(3..4), Some(0..4), 1_000), vec![]);
        tick(&mut u, 3, 2_000);
        assert_eq!(
            coverage(&mut u, Some(3..4), Some(0..4), 2_000),
            vec![Action::TakeOver(0..4)]
        );
        // After the takeover the gap has to be seen twice again.
        assert_eq!(u.on(Event::TookOver, 2_100), vec![]);
        tick(&mut u, 4, 3_000);
        assert_eq!(coverage(&mut u, Some(3..4), Some(0..4), 3_000), vec![]);
    }

    #[test]
    fn a_gap_another_node_takes_never_moves_this_one() {
        let mut u = Upkeep::new(0);
        for t in 0..5 {
            tick(&mut u, t, t * 1_000);
            assert_eq!(coverage(&mut u, Some(2..4), None, t * 1_000), vec![]);
        }
    }

    #[test]
    fn an_idle_stage_resyncs_with_a_doubling_wait_reset_by_training() {
        let mut u = Upkeep::new(0);
        // The step stays at 7: no resync before 10 s, one at 10 s.
        for t in (0..10).map(|s| s * 1_000) {
            tick(&mut u, 7, t);
            assert_eq!(coverage(&mut u, None, None, t), vec![], "at {t} ms");
        }
        tick(&mut u, 7, 10_000);
        assert_eq!(coverage(&mut u, None, None, 10_000), vec![Action::Resync]);
        u.on(
            Event::Resynced {
                tried: true,
                step: 7,
            },
            10_000,
        );
        assert_eq!(u.resync_wait(), 20_000);
        // Next due 20 s after the try.
        tick(&mut u, 7, 29_000);
        assert_eq!(coverage(&mut u, None, None, 29_000), vec![]);
        tick(&mut u, 7, 30_000);
        assert_eq!(coverage(&mut u, None, None, 30_000), vec![Action::Resync]);
        // A try that found nobody ahead changes nothing: due again at the next check.
        u.on(
            Event::Resynced {
                tried: false,
                step: 7,
            },
            30_000,
        );
        tick(&mut u, 7, 31_000);
        assert_eq!(coverage(&mut u, None, None, 31_000), vec![Action::Resync]);
        // Training again: the wait is back to 10 s from the step's change.
        tick(&mut u, 8, 32_000);
        assert_eq!(u.resync_wait(), RESYNC_WAIT);
        assert_eq!(coverage(&mut u, None, None, 32_000), vec![]);
    }

    #[test]
    fn the_resync_wait_stops_doubling_at_its_bound() {
        let mut u = Upkeep::new(0);
        for _ in 0..12 {
            u.on(
                Event::Resynced {
                    tried: true,
                    step: 1,
                },
                0,
            );
        }
        assert_eq!(u.resync_wait(), MAX_RESYNC_WAIT);
    }

    #[test]
    fn a_balance_move_needs_two_checks_in_a_row_and_the_cooldown() {
        let mut u = Upkeep::new(0);
        let balance =
            |u: &mut Upkeep, mine: Option<Range<u32>>, t| u.on(Event::Balance { mine }, t);
        // Proposed twice in a row, but within the cooldown after the start: nothing.
        assert_eq!(balance(&mut u, Some(0..2), 1_000), vec![]);
        assert_eq!(balance(&mut u, Some(0..2), 2_000), vec![]);
        // After it, twice in a row: the move.
        assert_eq!(
            balance(&mut u, Some(0..2), REBALANCE_COOLDOWN),
            vec![Action::Rebalance(0..2)]
        );
        assert_eq!(u.on(Event::TookOver, REBALANCE_COOLDOWN), vec![]);
        // A proposal that changes or disappears between checks is not confirmed.
        let t = 3 * REBALANCE_COOLDOWN;
        assert_eq!(balance(&mut u, Some(2..4), t), vec![]);
        assert_eq!(balance(&mut u, None, t + 1_000), vec![]);
        assert_eq!(balance(&mut u, Some(2..4), t + 2_000), vec![]);
        assert_eq!(
            balance(&mut u, Some(2..4), t + 3_000),
            vec![Action::Rebalance(2..4)]
        );
        // The next move waits for the cooldown again.
        u.on(Event::TookOver, t + 3_000);
        assert_eq!(balance(&mut u, Some(0..2), t + 4_000), vec![]);
        assert_eq!(balance(&mut u, Some(0..2), t + 5_000), vec![]);
    }

    #[test]
    fn a_failed_takeover_falls_back_to_the_resync_check() {
        let mut u = Upkeep::new(0);
        tick(&mut u, 1, 0);
        coverage(&mut u, Some(2..4), Some(0..4), 0);
        tick(&mut u, 1, 11_000);
        assert_eq!(
            coverage(&mut u, Some(2..4), Some(0..4), 11_000),
            vec![Action::TakeOver(0..4)]
        );
        assert_eq!(u.on(Event::TakeoverFailed, 11_000), vec![Action::Resync]);
    }
}
