//! Errors the ops return for bad data (ids, targets). Shape mismatches between slices are
//! programmer errors and are asserted instead.

/// Error from a CPU op whose input holds ids (token ids, targets) that come from data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    /// A token id or target is not below the table / live vocabulary size.
    #[error("id {id} out of range (limit {limit})")]
    IdOutOfRange { id: u32, limit: usize },
}
