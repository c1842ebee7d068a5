//! Which shared-memory slot each command uses. Control decides, so two writers never share
//! a slot: training (one step at a time, under the stage lock) owns slots 0-3; inference owns
//! 4-5 when the segment has them, and otherwise borrows the training slots under the training
//! lock as well (the pipeline takes those locks, `pipeline/infer.rs`).

/// Token ids or activations into a training forward.
pub const TRAIN_INPUT: u32 = 0;
/// Labels of the micro-batch (on the stage holding the head).
pub const TRAIN_LABELS: u32 = 1;
/// Activations out of a forward; the input gradient out of a backward.
pub const TRAIN_OUTPUT: u32 = 2;
/// The output gradient into a backward.
pub const TRAIN_GRAD: u32 = 3;
const INFER_INPUT: u32 = 4;
const INFER_OUTPUT: u32 = 5;

/// A pair of slots a command reads its input from and writes its output to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slots {
    pub input: u32,
    pub output: u32,
}

/// The training slots, as inference borrows them on a small segment.
pub const TRAINING: Slots = Slots {
    input: TRAIN_INPUT,
    output: TRAIN_OUTPUT,
};

/// Inference's own slots, if a segment of `slot_count` slots has them.
pub fn inference(slot_count: u32) -> Option<Slots> {
    (slot_count > INFER_OUTPUT).then_some(Slots {
        input: INFER_INPUT,
        output: INFER_OUTPUT,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inference_never_shares_a_slot_with_training_when_it_has_its_own() {
        let own = inference(8).unwrap();
        for s in [TRAIN_INPUT, TRAIN_LABELS, TRAIN_OUTPUT, TRAIN_GRAD] {
            assert_ne!(own.input, s);
            assert_ne!(own.output, s);
        }
        assert_eq!(inference(5), None);
        assert_eq!(inference(6), Some(own));
    }
}
