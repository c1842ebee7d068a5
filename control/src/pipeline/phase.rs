//! The phases of a pipeline step's optimizer (PipelineStep's `phase`), parsed once at the
//! edge; the wire keeps the strings.

/// A phase of the optimizer down the route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Sum the squared gradient norms of the receiver and the stages after it.
    Norm,
    /// Step every stage's optimizer, clipped by the global norm.
    Apply,
}

impl Phase {
    /// The phase's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Norm => "norm",
            Phase::Apply => "apply",
        }
    }

    /// The phase named `s` on the wire; None for an unknown one.
    pub fn parse(s: &str) -> Option<Phase> {
        match s {
            "norm" => Some(Phase::Norm),
            "apply" => Some(Phase::Apply),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_keep_their_wire_names() {
        for p in [Phase::Norm, Phase::Apply] {
            assert_eq!(Phase::parse(p.as_str()), Some(p));
        }
        assert_eq!(Phase::parse("Norm"), None);
        assert_eq!(Phase::parse(""), None);
    }
}
