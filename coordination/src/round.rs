//! The DiLoCo round boundary of a replica training the whole model: when its round state has
//! to be read in, when it catches up with the replicas between boundaries, and when H inner
//! steps are done and the round is finished with the replicas.
//!
//! The executor (the daemon's trainer) reports every inner step and carries out the actions:
//!
//! ```text
//! InnerStep{loss, initialized, h} ──► [CountInnerSteps(n), InitRound]  (no round state yet)
//!                                 ├─► [CountInnerSteps(n), CatchUp]    (n < h)
//!                                 └─► [CountInnerSteps(n), FinishRound{loss, batches}]
//!                                                     (n ≥ h: the inner losses are cleared)
//! CaughtUp ──► []      (the replicas' state was adopted: the inner losses are cleared)
//! ```
//!
//! The inner losses of a round are kept across an `InitRound` (the round state is read in
//! while the steps go on counting).

/// What happened, as the trainer reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// An inner (local) step finished with `loss`; `initialized`: the round state holds the
    /// weights the round started from; `h`: the inner steps per round now configured.
    InnerStep {
        loss: f32,
        initialized: bool,
        h: u32,
    },
    /// [`Action::CatchUp`] adopted the replicas' agreed state: the round starts over.
    CaughtUp,
}

/// What the trainer is asked to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Emitted first on every inner step: record the round's inner step count (the API and
    /// the replicas' figures read it).
    CountInnerSteps(u32),
    /// Emitted on an inner step while the round state is not initialized: read the loaded
    /// model into it (and catch up with the replicas if they agree on other weights).
    InitRound,
    /// Emitted on an inner step before the boundary: adopt the replicas' agreed state if the
    /// peers' figures show this node is out of step; answer [`Event::CaughtUp`] if it did.
    CatchUp,
    /// Emitted on the inner step that reaches H: finish the round with the replicas; `loss`
    /// is the mean of the round's inner losses, `batches` their count.
    FinishRound { loss: f32, batches: u64 },
}

/// The inner steps of the current round.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Boundary {
    losses: Vec<f32>,
}

impl Boundary {
    /// A round with no inner step yet (the trainer starts one with every engine start).
    pub fn new() -> Boundary {
        Boundary::default()
    }

    /// Inner steps counted in this round.
    pub fn inner_steps(&self) -> usize {
        self.losses.len()
    }

    /// Takes one event; the actions to carry out, in order.
    pub fn on(&mut self, event: Event) -> Vec<Action> {
        match event {
            Event::InnerStep {
                loss,
                initialized,
                h,
            } => {
                self.losses.push(loss);
                let n = self.losses.len();
                let mut out = vec![Action::CountInnerSteps(
                    u32::try_from(n).unwrap_or(u32::MAX),
                )];
                if !initialized {
                    out.push(Action::InitRound);
                } else if n < h as usize {
                    out.push(Action::CatchUp);
                } else {
                    let loss = self.losses.iter().sum::<f32>() / n.max(1) as f32;
                    self.losses.clear();
                    out.push(Action::FinishRound {
                        loss,
                        batches: n as u64,
                    });
                }
                out
            }
            Event::CaughtUp => {
                self.losses.clear();
                Vec::new()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(b: &mut Boundary, loss: f32, h: u32) -> Vec<Action> {
        b.on(Event::InnerStep {
            loss,
            initialized: true,
            h,
        })
    }

    #[test]
    fn the_round_finishes_at_h_inner_steps_with_their_mean_loss() {
        let mut b = Boundary::new();
        for (i, loss) in [1.0, 2.0].into_iter().enumerate() {
            assert_eq!(
                step(&mut b, loss, 3),
                vec![Action::CountInnerSteps(i as u32 + 1), Action::CatchUp]
            );
        }
        assert_eq!(
            step(&mut b, 6.0, 3),
            vec![
                Action::CountInnerSteps(3),
                Action::FinishRound {
                    loss: 3.0,
                    batches: 3,
                },
            ]
        );
        // The next round counts from one again.
        assert_eq!(b.inner_steps(), 0);
        assert_eq!(
            step(&mut b, 1.0, 3),
            vec![Action::CountInnerSteps(1), Action::CatchUp]
        );
    }

    #[test]
    fn between_boundaries_a_catch_up_starts_the_round_over() {
        let mut b = Boundary::new();
        step(&mut b, 1.0, 4);
        step(&mut b, 1.0, 4);
        assert_eq!(b.on(Event::CaughtUp), vec![]);
        assert_eq!(b.inner_steps(), 0);
        for i in 1..4 {
            assert_eq!(
                step(&mut b, 2.0, 4),
                vec![Action::CountInnerSteps(i), Action::CatchUp]
            );
        }
        assert_eq!(
            step(&mut b, 2.0, 4),
            vec![
                Action::CountInnerSteps(4),
                Action::FinishRound {
                    loss: 2.0,
                    batches: 4,
                },
            ]
        );
    }

    #[test]
    fn without_round_state_it_is_read_in_and_the_steps_go_on_counting() {
        let mut b = Boundary::new();
        let uninit = |b: &mut Boundary| {
            b.on(Event::InnerStep {
                loss: 1.0,
                initialized: false,
                h: 2,
            })
        };
        assert_eq!(
            uninit(&mut b),
            vec![Action::CountInnerSteps(1), Action::InitRound]
        );
        assert_eq!(
            uninit(&mut b),
            vec![Action::CountInnerSteps(2), Action::InitRound]
        );
        // Initialized now, already past H: the round finishes on the next step.
        assert_eq!(
            step(&mut b, 4.0, 2),
            vec![
                Action::CountInnerSteps(3),
                Action::FinishRound {
                    loss: 2.0,
                    batches: 3,
                },
            ]
        );
    }

    #[test]
    fn a_smaller_h_set_live_finishes_the_round_at_once() {
        let mut b = Boundary::new();
        for _ in 0..3 {
            step(&mut b, 1.0, 10);
        }
        assert_eq!(
            step(&mut b, 1.0, 2),
            vec![
                Action::CountInnerSteps(4),
                Action::FinishRound {
                    loss: 1.0,
                    batches: 4,
                },
            ]
        );
    }
}
