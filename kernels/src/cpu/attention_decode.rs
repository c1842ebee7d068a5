//! One decode step of attention for a batch of sequences of ragged lengths (the reference):
//! sequence `i` has its own KV cache [TMAX_i, KVH, D] and its next position `pos_i`; its new
//! query row q [H,D] and key row k [KVH,D] are rotated (RoPE at `pos_i`), the key and value
//! rows are written to cache row `pos_i`, and its output row attends over cache rows
//! `0..=pos_i`. So one call does, for all N sequences, what `rope_forward` (t = 1), two row
//! copies and `attention_cached` (tq = 1, past = pos_i) do for one.
//!
//! q_pre, out [N,H,D]; k_pre, v [N,KVH,D].

/// One sequence of the batch: its caches (rows `0..pos` filled) and its next position.
pub struct DecodeSeq<'a> {
    pub k_cache: &'a mut [f32],
    pub v_cache: &'a mut [f32],
    pub pos: usize,
}

/// Checks the shapes shared by the reference and the fast path.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_decode_shapes(
    out: usize,
    q: usize,
    k: usize,
    v: usize,
    seqs: &[DecodeSeq],
    h: usize,
    kvh: usize,
    d: usize,
) {
    let n = seqs.len();
    assert!(
        d > 0 && d.is_multiple_of(2) && kvh > 0 && h.is_multiple_of(kvh),
        "attention_decode: heads {h}/{kvh}, head dim {d}"
    );
    assert_eq!(out, n * h * d, "attention_decode: out is not [N, H, D]");
    assert_eq!(q, n * h * d, "attention_decode: q is not [N, H, D]");
    assert_eq!(k, n * kvh * d, "attention_decode: k is not [N, KVH, D]");
    assert_eq!(v, n * kvh * d, "attention_decode: v is not [N, KVH, D]");
    for s in seqs {
        let kv = kvh * d;
        assert!(
            s.k_cache.len() == s.v_cache.len() && s.k_cache.len().is_multiple_of(kv),
            "attention_decode: caches are not [TMAX, KVH, D]"
        );
        assert!(
            s.pos < s.k_cache.len() / kv,
            "attention_decode: position {} beyond cache of {} rows",
            s.pos,
            s.k_cache.len() / kv
        );
    }
}

/// out [N,H,D]; appends each sequence's rotated key and its value at its position.
#[allow(clippy::too_many_arguments)]
pub fn attention_decode_forward(
    out: &mut [f32],
    q_pre: &[f32],
    k_pre: &[f32],
    v: &[f32],
    seqs: &mut [DecodeSeq],
    h: usize,
    kvh: usize,
    d: usize,
    theta: f32,
) {
    check_decode_shapes(
        out.len(),
        q_pre.len(),
        k_pre.len(),
        v.len(),
        seqs,
        h,
        kvh,
        d,
    );
    let (c, kv) = (h * d, kvh * d);
    for (i, s) in seqs.iter_mut().enumerate() {
        let tmax = s.k_cache.len() / kv;
        let mut q = vec![0.0; c];
        super::rope_forward(&mut q, &q_pre[i * c..(i + 1) * c], 1, 1, h, d, s.pos, theta);
        let row = s.pos * kv..(s.pos + 1) * kv;
        super::rope_forward(
            &mut s.k_cache[row.clone()],
            &k_pre[i * kv..(i + 1) * kv],
            1,
            1,
            kvh,
            d,
            s.pos,
            theta,
        );
        s.v_cache[row].copy_from_slice(&v[i * kv..(i + 1) * kv]);
        super::attention_cached_forward(
            &mut out[i * c..(i + 1) * c],
            &q,
            s.k_cache,
            s.v_cache,
            1,
            1,
            s.pos,
            tmax,
            h,
            kvh,
            d,
        );
    }
}
