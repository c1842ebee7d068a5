//! CPU ops: references and fast paths.
