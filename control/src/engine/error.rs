//! The one error of the engine boundary: what a command to the engine can end in, mapped once
//! from the gRPC status the engine answers with. Callers decide what each kind means for them
//! (a pipeline refusal, a 400 or a 503 at the REST edge); none of them sees a `tonic::Status`.

/// Why an engine command did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The engine refused the request itself: bad input, a file it cannot read.
    #[error("{0}")]
    Invalid(String),
    /// The engine cannot run this command in its current state (no model loaded yet, a model
    /// being loaded, an unknown session).
    #[error("{0}")]
    NotReady(String),
    /// The engine is unreachable or answered that it is unavailable (dying, restarting).
    #[error("{0}")]
    Unavailable(String),
    /// The engine is at capacity (a full batch, a KV cache over its budget).
    #[error("{0}")]
    Busy(String),
    /// A command that did not answer within its deadline.
    #[error("{0}")]
    Timeout(String),
    /// Anything else: a device fault, an internal error, a malformed answer.
    #[error("{0}")]
    Failed(String),
}

impl EngineError {
    /// The engine's own words (or the transport's), without a prefix.
    pub fn message(&self) -> String {
        self.to_string()
    }
}

impl From<tonic::Status> for EngineError {
    fn from(s: tonic::Status) -> EngineError {
        let m = s.message().to_string();
        match s.code() {
            tonic::Code::InvalidArgument => EngineError::Invalid(m),
            tonic::Code::FailedPrecondition => EngineError::NotReady(m),
            tonic::Code::Unavailable => EngineError::Unavailable(m),
            tonic::Code::ResourceExhausted => EngineError::Busy(m),
            tonic::Code::DeadlineExceeded => EngineError::Timeout(m),
            _ => EngineError::Failed(m),
        }
    }
}

impl From<neuroshard_shared::shm::ShmError> for EngineError {
    fn from(e: neuroshard_shared::shm::ShmError) -> EngineError {
        EngineError::Failed(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_status_code_keeps_its_meaning_and_message() {
        let cases = [
            (
                tonic::Status::invalid_argument("bad ids"),
                EngineError::Invalid("bad ids".into()),
            ),
            (
                tonic::Status::failed_precondition("loading"),
                EngineError::NotReady("loading".into()),
            ),
            (
                tonic::Status::unavailable("gone"),
                EngineError::Unavailable("gone".into()),
            ),
            (
                tonic::Status::resource_exhausted("full"),
                EngineError::Busy("full".into()),
            ),
            (
                tonic::Status::deadline_exceeded("late"),
                EngineError::Timeout("late".into()),
            ),
            (
                tonic::Status::internal("fault"),
                EngineError::Failed("fault".into()),
            ),
            (tonic::Status::aborted("x"), EngineError::Failed("x".into())),
        ];
        for (status, want) in cases {
            let got = EngineError::from(status);
            assert_eq!(got, want);
            assert_eq!(got.message(), want.to_string());
        }
    }
}
