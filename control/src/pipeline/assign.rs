//! The dynamic layer pool (the rule itself is in `neuroshard_coordination::pool`), and this
//! node's capacity from its configuration.

use neuroshard_shared::model::ModelConfig;

pub use neuroshard_coordination::pool::{
    Assignment, Holder, Role, choose, first_gap, layer_bytes, takeover,
};

use crate::config::Config;

/// How many layers this node may hold (`resources.max_layers`, else from
/// `resources.max_memory_gb`).
pub fn capacity(cfg: &Config, m: &ModelConfig) -> u32 {
    neuroshard_coordination::pool::capacity(
        cfg.resources.max_layers,
        cfg.resources.max_memory_gb,
        m,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_configuration_holds_the_default_model() {
        let m = ModelConfig::preset("default").unwrap();
        let mut cfg = Config::default();
        assert!(capacity(&cfg, &m) >= m.layers);
        cfg.resources.max_layers = 1;
        assert_eq!(capacity(&cfg, &m), 1);
    }
}
