//! The GPipe schedule of one pipeline step driven from this node, and what becomes of its
//! batch when the step fails.
//!
//! The driver (the daemon's pipeline stage holding the embedding) feeds [`Event`]s in and
//! carries out the [`Action`]s that come back; every action of one answer may run at the same
//! time (the micro-batches' forwards, then their backwards):
//!
//! ```text
//! Started{rows, want} ──► [Forward{0}, …, Forward{m-1}]   (m: the largest divisor of rows
//!                                                          not above want)
//! Forwarded{mb, loss} ──► [Backward{0}, …, Backward{m-1}] (once every loss is back)
//! BackwardDone{mb}    ──► [GatherNorm]                    (once every backward is done)
//! NormGathered{local, remote} ──► [Apply{global_norm}]    (√(local + remote))
//! Applied{optimizer_step} ──► [Done(summary)]              (loss: the micro-batches' mean)
//! failed() ──► Retry{requeue, after}   (requeue while no stage can have stepped on the
//!                                        batch, i.e. before Apply; then retry after
//!                                        RETRY_AFTER)
//! ```
//!
//! The numbers a peer sends (a loss, a squared norm) are checked by the executor before they
//! come in as events, like every tensor at the edge.

use std::ops::Range;

use crate::Millis;

/// How long the driver waits after a failed step before the next one.
pub const RETRY_AFTER: Millis = 500;

/// What happened in the step, as the driver reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The step's batch is in hand (a new one, or the one a failed step requeued): `rows`
    /// rows, to be split into at most `want` micro-batches.
    Started { rows: u64, want: u32 },
    /// [`Action::Forward`] of micro-batch `mb` came back with its loss (finite).
    Forwarded { mb: u32, loss: f32 },
    /// [`Action::Backward`] of micro-batch `mb` is done on every stage.
    BackwardDone { mb: u32 },
    /// [`Action::GatherNorm`]: this stage's squared gradient norm and the sum of the other
    /// stages' (finite, not negative).
    NormGathered { local: f64, remote: f64 },
    /// [`Action::Apply`] is done on every stage; this stage's optimizer step after it.
    Applied { optimizer_step: u64 },
}

/// What the driver is asked to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Emitted for every micro-batch once the step has started: run this stage's forward of
    /// the batch's `rows` (micro-batch `mb`) and send the activations down the route; answer
    /// with [`Event::Forwarded`].
    Forward { mb: u32, rows: Range<u64> },
    /// Emitted for every micro-batch once every loss is back: run the backward of micro-batch
    /// `mb` (the batch's `rows`, which the gradient that comes back covers) down the route
    /// and this stage's with that gradient; answer with [`Event::BackwardDone`].
    Backward { mb: u32, rows: Range<u64> },
    /// Emitted once every backward is done (phase `norm`): the squared gradient norm of this
    /// stage and of the stages down the route; answer with [`Event::NormGathered`].
    GatherNorm,
    /// Emitted once the norm is gathered (phase `apply`): every stage steps its optimizer
    /// clipped by `global_norm`. From here a stage may have stepped on the batch, so a
    /// failure no longer requeues it. Answer with [`Event::Applied`].
    Apply { global_norm: f32 },
    /// Emitted once every stage applied: the step is over.
    Done(Summary),
}

/// The figures of a finished step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Mean of the micro-batches' losses.
    pub loss: f32,
    /// This stage's optimizer step after the step.
    pub optimizer_step: u64,
    pub micro_batches: u32,
}

/// What the driver does after a failed step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Keep the batch for the next step (no stage can have stepped on it), so a failure
    /// never skips data; else it is given up.
    pub requeue: bool,
    /// Wait this long before the next step.
    pub after: Millis,
}

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    /// No batch yet.
    Idle,
    /// Forwards out; the losses that came back, by micro-batch.
    Forward(Vec<Option<f32>>),
    /// Backwards out: the mean loss, and which micro-batches are done.
    Backward {
        loss: f32,
        done: Vec<bool>,
    },
    Norm {
        loss: f32,
    },
    Apply {
        loss: f32,
    },
    Done,
}

/// The schedule of one driven step.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    phase: Phase,
    /// The micro-batches the batch was split into (0 before it started), and their rows.
    micro_batches: u32,
    per: u64,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule::new()
    }
}

/// Largest divisor of `rows` not above `want` (at least 1): the micro-batches of a batch.
pub fn micro_batches(rows: u64, want: u32) -> u32 {
    (1..=want.max(1))
        .rev()
        .find(|m| rows.is_multiple_of(u64::from(*m)))
        .unwrap_or(1)
}

impl Schedule {
    /// A step that has no batch yet.
    pub fn new() -> Schedule {
        Schedule {
            phase: Phase::Idle,
            micro_batches: 0,
            per: 0,
        }
    }

    /// Takes one event; the actions to carry out (those of one answer may run at once). An
    /// event the step is not waiting for changes nothing.
    pub fn on(&mut self, event: Event) -> Vec<Action> {
        match (&mut self.phase, event) {
            (Phase::Idle, Event::Started { rows, want }) => {
                let m = micro_batches(rows, want);
                let per = rows / u64::from(m);
                self.phase = Phase::Forward(vec![None; m as usize]);
                self.micro_batches = m;
                self.per = per;
                (0..m)
                    .map(|mb| Action::Forward {
                        mb,
                        rows: self.rows(mb),
                    })
                    .collect()
            }
            (Phase::Forward(losses), Event::Forwarded { mb, loss }) => {
                if let Some(slot) = losses.get_mut(mb as usize) {
                    *slot = Some(loss);
                }
                let Some(all) = losses.iter().copied().collect::<Option<Vec<f32>>>() else {
                    return Vec::new();
                };
                let loss = all.iter().sum::<f32>() / all.len().max(1) as f32;
                self.phase = Phase::Backward {
                    loss,
                    done: vec![false; all.len()],
                };
                (0..self.micro_batches)
                    .map(|mb| Action::Backward {
                        mb,
                        rows: self.rows(mb),
                    })
                    .collect()
            }
            (Phase::Backward { loss, done }, Event::BackwardDone { mb }) => {
                if let Some(slot) = done.get_mut(mb as usize) {
                    *slot = true;
                }
                if !done.iter().all(|d| *d) {
                    return Vec::new();
                }
                self.phase = Phase::Norm { loss: *loss };
                vec![Action::GatherNorm]
            }
            (Phase::Norm { loss }, Event::NormGathered { local, remote }) => {
                self.phase = Phase::Apply { loss: *loss };
                vec![Action::Apply {
                    global_norm: (local + remote).sqrt() as f32,
                }]
            }
            (Phase::Apply { loss }, Event::Applied { optimizer_step }) => {
                let summary = Summary {
                    loss: *loss,
                    optimizer_step,
                    micro_batches: self.micro_batches,
                };
                self.phase = Phase::Done;
                vec![Action::Done(summary)]
            }
            _ => Vec::new(),
        }
    }

    /// The rows of the batch in micro-batch `mb`.
    fn rows(&self, mb: u32) -> Range<u64> {
        u64::from(mb) * self.per..u64::from(mb + 1) * self.per
    }

    /// The step failed (a hop timed out, died or refused, the engine failed, a peer's answer
    /// was malformed): the batch is requeued unless a stage may have stepped on it.
    pub fn failed(&mut self) -> Retry {
        let requeue = matches!(
            self.phase,
            Phase::Forward(_) | Phase::Backward { .. } | Phase::Norm { .. }
        );
        self.phase = Phase::Done;
        Retry {
            requeue,
            after: RETRY_AFTER,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a step whose every hop succeeds, with these losses and norms; the answers in order.
    fn run(rows: u64, want: u32, losses: &[f32], local: f64, remote: f64) -> Vec<Vec<Action>> {
        let mut s = Schedule::new();
        let mut out = vec![s.on(Event::Started { rows, want })];
        for (mb, loss) in losses.iter().enumerate() {
            out.push(s.on(Event::Forwarded {
                mb: mb as u32,
                loss: *loss,
            }));
        }
        for mb in 0..losses.len() {
            out.push(s.on(Event::BackwardDone { mb: mb as u32 }));
        }
        out.push(s.on(Event::NormGathered { local, remote }));
        out.push(s.on(Event::Applied { optimizer_step: 7 }));
        out
    }

    #[test]
    fn micro_batches_divide_the_batch() {
        assert_eq!(micro_batches(8, 4), 4);
        assert_eq!(micro_batches(6, 4), 3);
        assert_eq!(micro_batches(7, 4), 1);
        assert_eq!(micro_batches(2, 0), 1);
    }

    #[test]
    fn one_micro_batch_goes_forward_backward_norm_apply_done() {
        let out = run(4, 1, &[2.5], 9.0, 16.0);
        assert_eq!(
            out,
            vec![
                vec![Action::Forward { mb: 0, rows: 0..4 }],
                vec![Action::Backward { mb: 0, rows: 0..4 }],
                vec![Action::GatherNorm],
                vec![Action::Apply { global_norm: 5.0 }],
                vec![Action::Done(Summary {
                    loss: 2.5,
                    optimizer_step: 7,
                    micro_batches: 1,
                })],
            ]
        );
    }

    #[test]
    fn four_micro_batches_go_forward_all_at_once_then_backward_all_at_once() {
        let out = run(8, 4, &[1.0, 2.0, 3.0, 6.0], 1.0, 3.0);
        let forwards: Vec<Action> = (0..4)
            .map(|mb| Action::Forward {
                mb,
                rows: u64::from(mb) * 2..u64::from(mb + 1) * 2,
            })
            .collect();
        let backwards: Vec<Action> = (0..4)
            .map(|mb| Action::Backward {
                mb,
                rows: u64::from(mb) * 2..u64::from(mb + 1) * 2,
            })
            .collect();
        assert_eq!(
            out,
            vec![
                forwards,
                vec![],
                vec![],
                vec![],
                backwards,
                vec![],
                vec![],
                vec![],
                vec![Action::GatherNorm],
                vec![Action::Apply { global_norm: 2.0 }],
                vec![Action::Done(Summary {
                    loss: 3.0,
                    optimizer_step: 7,
                    micro_batches: 4,
                })],
            ]
        );
    }

    #[test]
    fn losses_arriving_out_of_order_are_averaged_in_micro_batch_order() {
        let mut s = Schedule::new();
        s.on(Event::Started { rows: 3, want: 4 });
        assert_eq!(s.on(Event::Forwarded { mb: 2, loss: 0.3 }), vec![]);
        assert_eq!(s.on(Event::Forwarded { mb: 0, loss: 0.1 }), vec![]);
        assert_eq!(s.on(Event::Forwarded { mb: 1, loss: 0.2 }).len(), 3);
        for mb in [1, 2, 0] {
            s.on(Event::BackwardDone { mb });
        }
        s.on(Event::NormGathered {
            local: 0.0,
            remote: 0.0,
        });
        let done = s.on(Event::Applied { optimizer_step: 1 });
        // The same sum, in the same order, as the driver's mean over its micro-batches.
        let loss = (0.1f32 + 0.2 + 0.3) / 3.0;
        assert_eq!(
            done,
            vec![Action::Done(Summary {
                loss,
                optimizer_step: 1,
                micro_batches: 3,
            })]
        );
    }

    #[test]
    fn an_event_the_step_is_not_waiting_for_changes_nothing() {
        let mut s = Schedule::new();
        assert_eq!(s.on(Event::Applied { optimizer_step: 1 }), vec![]);
        s.on(Event::Started { rows: 2, want: 2 });
        assert_eq!(s.on(Event::BackwardDone { mb: 0 }), vec![]);
        assert_eq!(s.on(Event::Forwarded { mb: 5, loss: 1.0 }), vec![]);
        assert_eq!(s.on(Event::Forwarded { mb: 0, loss: 1.0 }), vec![]);
        assert_eq!(s.on(Event::Forwarded { mb: 1, loss: 1.0 }).len(), 2);
    }

    /// A failed step's batch is driven again by the next step, as the driver does it with
    /// its batch slot.
    #[test]
    fn a_hop_failing_mid_forward_requeues_the_batch_for_the_next_step() {
        let mut slot: Option<&str> = None;
        let mut fresh = ["batch 1", "batch 2"].into_iter();
        let mut driven = Vec::new();
        for fail in [true, false] {
            let batch = slot.take().or_else(|| fresh.next()).unwrap();
            driven.push(batch);
            let mut s = Schedule::new();
            s.on(Event::Started { rows: 4, want: 2 });
            s.on(Event::Forwarded { mb: 1, loss: 1.0 });
            if fail {
                // Micro-batch 0's hop timed out.
                let retry = s.failed();
                assert_eq!(
                    retry,
                    Retry {
                        requeue: true,
                        after: RETRY_AFTER,
                    }
                );
                if retry.requeue {
                    slot = Some(batch);
                }
            }
        }
        assert_eq!(driven, vec!["batch 1", "batch 1"]);
    }

    #[test]
    fn a_failure_requeues_until_apply_and_always_backs_off() {
        let requeued = |events: &[Event]| {
            let mut s = Schedule::new();
            for e in events {
                s.on(e.clone());
            }
            let r = s.failed();
            assert_eq!(r.after, RETRY_AFTER);
            r.requeue
        };
        let started = Event::Started { rows: 1, want: 1 };
        let forwarded = Event::Forwarded { mb: 0, loss: 1.0 };
        let backward = Event::BackwardDone { mb: 0 };
        let norm = Event::NormGathered {
            local: 1.0,
            remote: 1.0,
        };
        // No batch yet (no route, the data loader failed): nothing to requeue.
        assert!(!requeued(&[]));
        assert!(requeued(std::slice::from_ref(&started)));
        assert!(requeued(&[started.clone(), forwarded.clone()]));
        assert!(requeued(&[
            started.clone(),
            forwarded.clone(),
            backward.clone()
        ]));
        // Apply is out: a stage may have stepped on the batch, it is given up.
        assert!(!requeued(&[started, forwarded, backward, norm]));
    }
}
