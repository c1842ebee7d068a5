//! The kernel sources, embedded at build time: one `.cu` file per op family under
//! `kernels/cuda/`, each with the list of kernel symbols the Rust side launches.

/// One `.cu` file and the `extern "C"` kernels it defines.
#[derive(Debug, Clone, Copy)]
pub struct KernelFamily {
    /// File stem under `kernels/cuda/` (also the module name when loaded).
    pub name: &'static str,
    /// The file's text, with `#include "common.cuh"` not yet expanded.
    pub source: &'static str,
    /// Every `extern "C" __global__` symbol of the file.
    pub symbols: &'static [&'static str],
}

/// Shared helpers, pasted in place of `#include "common.cuh"`.
pub const COMMON: &str = include_str!("../../cuda/common.cuh");

macro_rules! family {
    ($name:literal, [$($sym:literal),* $(,)?]) => {
        KernelFamily {
            name: $name,
            source: include_str!(concat!("../../cuda/", $name, ".cu")),
            symbols: &[$($sym),*],
        }
    };
}

/// Every kernel family, in a fixed order.
pub const FAMILIES: &[KernelFamily] = &[
    family!(
        "elementwise",
        [
            "fill_fwd_f32",
            "fill_fwd_bf16",
            "scale_fwd_f32",
            "scale_fwd_bf16",
            "add_fwd_f32",
            "add_fwd_bf16",
            "accumulate_fwd_f32",
            "accumulate_fwd_bf16",
            "accumulate_fwd_f32_bf16",
            "cast_fwd_f32_bf16",
            "cast_fwd_bf16_f32",
        ]
    ),
    family!(
        "embedding",
        [
            "embedding_fwd_f32",
            "embedding_fwd_bf16",
            "embedding_bwd_f32",
            "embedding_bwd_bf16",
        ]
    ),
    family!(
        "rmsnorm",
        [
            "rmsnorm_fwd_f32",
            "rmsnorm_fwd_bf16",
            "rmsnorm_bwd_f32",
            "rmsnorm_bwd_bf16",
            "rmsnorm_bwd_dweight_f32",
            "rmsnorm_bwd_dweight_bf16",
        ]
    ),
    family!(
        "rope",
        [
            "rope_fwd_f32",
            "rope_fwd_bf16",
            "rope_bwd_f32",
            "rope_bwd_bf16"
        ]
    ),
    family!(
        "swiglu",
        [
            "swiglu_fwd_f32",
            "swiglu_fwd_bf16",
            "swiglu_bwd_f32",
            "swiglu_bwd_bf16"
        ]
    ),
    family!(
        "cross_entropy",
        [
            "cross_entropy_fwd_f32",
            "cross_entropy_fwd_bf16",
            "cross_entropy_bwd_f32",
            "cross_entropy_bwd_bf16",
            "cross_entropy_mean_f32",
        ]
    ),
    family!(
        "adamw",
        [
            "adamw_step_f32",
            "adamw_step_bf16",
            "global_norm_partial_f32",
            "global_norm_finalize_f32",
            "clip_scale_f32",
            "scale_in_place_f32",
        ]
    ),
    family!(
        "matmul",
        [
            "matmul_fwd_f32",
            "matmul_bwd_dinp_f32",
            "matmul_bwd_dweight_f32",
            "matmul_fwd_bf16",
            "matmul_bwd_dinp_bf16",
            "matmul_bwd_dweight_bf16",
            "matmul_fwd_bf16_f32out",
        ]
    ),
    family!(
        "attention",
        [
            "attention_fwd_f32",
            "attention_cached_fwd_f32",
            "attention_bwd_delta_f32",
            "attention_bwd_dq_f32",
            "attention_bwd_dkv_f32",
            "attention_fwd_bf16",
            "attention_cached_fwd_bf16",
            "attention_bwd_delta_bf16",
            "attention_bwd_dq_bf16",
            "attention_bwd_dkv_bf16",
        ]
    ),
];

const INCLUDE_LINE: &str = "#include \"common.cuh\"";

impl KernelFamily {
    /// The self-contained source handed to NVRTC: `common.cuh` pasted in place of its
    /// include line (NVRTC then needs no include path for our own header).
    pub fn expanded_source(&self) -> String {
        self.source.replacen(INCLUDE_LINE, COMMON, 1)
    }
}

/// The family with this name.
pub fn family(name: &str) -> Option<&'static KernelFamily> {
    FAMILIES.iter().find(|f| f.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_symbol_is_defined_in_its_file_and_every_kernel_is_listed() {
        for f in FAMILIES {
            assert!(
                f.source.contains(INCLUDE_LINE),
                "{} lacks the common include",
                f.name
            );
            for sym in f.symbols {
                let defined = f.source.contains(&format!(" {sym}("))
                    || (f.name == "attention" && attention_macro_defines(f.source, sym));
                assert!(defined, "{}: symbol {sym} not defined", f.name);
            }
            let kernels = f.source.matches("__global__ void ").count();
            let listed = if f.name == "attention" {
                5
            } else {
                f.symbols.len()
            };
            assert_eq!(kernels, listed, "{}: kernels defined vs listed", f.name);
        }
    }

    fn attention_macro_defines(src: &str, sym: &str) -> bool {
        let (stem, suffix) = sym.rsplit_once('_').expect("symbol has a dtype suffix");
        src.contains(&format!("{stem}_##SUF(")) && src.contains(&format!("ATT_ENTRY({suffix},"))
    }

    #[test]
    fn expansion_replaces_the_include_once() {
        for f in FAMILIES {
            let s = f.expanded_source();
            assert!(!s.contains(INCLUDE_LINE));
            assert!(s.contains("typedef unsigned short bf16_t;"));
        }
        assert!(family("matmul").is_some() && family("nope").is_none());
    }
}
