//! One pre-norm transformer layer, forward and backward, on any backend:
//!
//! ```text
//! n1 = rmsnorm(x) ; q = rope(n1 Wq^T) ; k = rope(n1 Wk^T) ; v = n1 Wv^T
//! att = causal_gqa(q, k, v) ; x2 = x + att Wo^T
//! n2 = rmsnorm(x2) ; h = silu(n2 Wg^T) * (n2 Wu^T) ; out = x2 + h Wd^T
//! ```
//!
//! Shapes: x, n1, q, att, x2, n2 [Bt,C]; k, v [Bt,KV] (KV = KVH*D); gate, up, h [Bt,F].
//! Saved for backward (per micro-batch): everything above except the pre-rope q/k and the
//! projection outputs, which live in the shared [`Scratch`].
//!
//! Mixed precision: when the backend computes in bf16 ([`Backend::compute_dtype`]) every GEMM
//! reads bf16 operands (the weights' bf16 copies, the rounded inputs n1, att, n2, h saved for
//! backward, the rounded output gradients) and accumulates in f32 into f32 outputs and f32
//! weight gradients; norms, RoPE, attention, SwiGLU and the residual stream stay f32.

use crate::backend::{AttnShape, Backend, Dtype, Result};

use super::params::Param;

/// Index of each tensor inside a layer's 9 parameters (the order of `params::layer_specs`).
pub const ATTN_NORM: usize = 0;
pub const WQ: usize = 1;
pub const WK: usize = 2;
pub const WV: usize = 3;
pub const WO: usize = 4;
pub const MLP_NORM: usize = 5;
pub const WG: usize = 6;
pub const WU: usize = 7;
pub const WD: usize = 8;
pub const PARAMS_PER_LAYER: usize = 9;

/// The sizes every layer call needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dims {
    pub b: usize,
    pub t: usize,
    pub c: usize,
    pub h: usize,
    pub kvh: usize,
    pub d: usize,
    pub f: usize,
    pub eps: f32,
    pub theta: f32,
}

impl Dims {
    pub fn bt(&self) -> usize {
        self.b * self.t
    }
    pub fn kv(&self) -> usize {
        self.kvh * self.d
    }
    fn attn(&self) -> AttnShape {
        AttnShape {
            b: self.b,
            t: self.t,
            h: self.h,
            kvh: self.kvh,
            d: self.d,
        }
    }
}

/// What one layer saves in forward for its backward.
pub struct LayerActs<B: Backend> {
    n1: B::Buf,
    rstd1: B::Buf,
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    att: B::Buf,
    lse: B::Buf,
    x2: B::Buf,
    n2: B::Buf,
    rstd2: B::Buf,
    gate: B::Buf,
    up: B::Buf,
    h: B::Buf,
    /// bf16 copies of the GEMM inputs (bf16 compute only).
    half: Option<HalfActs<B>>,
}

/// The rounded GEMM inputs a bf16 layer saves: n1, att, n2 [Bt,C], h [Bt,F].
struct HalfActs<B: Backend> {
    n1: B::Half,
    att: B::Half,
    n2: B::Half,
    h: B::Half,
}

/// The rounded output gradients of a bf16 layer's GEMMs: dres, dq [Bt,C], dk, dv [Bt,KV],
/// dgate, dup [Bt,F].
struct HalfGrads<B: Backend> {
    dres: B::Half,
    dq: B::Half,
    dk: B::Half,
    dv: B::Half,
    dgate: B::Half,
    dup: B::Half,
}

impl<B: Backend> LayerActs<B> {
    pub fn new(be: &B, d: &Dims) -> Result<Self> {
        let (bt, c, kv, f) = (d.bt(), d.c, d.kv(), d.f);
        let half = if be.compute_dtype() == Dtype::Bf16 {
            Some(HalfActs {
                n1: be.zeros_half(bt * c)?,
                att: be.zeros_half(bt * c)?,
                n2: be.zeros_half(bt * c)?,
                h: be.zeros_half(bt * f)?,
            })
        } else {
            None
        };
        Ok(LayerActs {
            half,
            n1: be.zeros(bt * c)?,
            rstd1: be.zeros(bt)?,
            q: be.zeros(bt * c)?,
            k: be.zeros(bt * kv)?,
            v: be.zeros(bt * kv)?,
            att: be.zeros(bt * c)?,
            lse: be.zeros(d.b * d.h * d.t)?,
            x2: be.zeros(bt * c)?,
            n2: be.zeros(bt * c)?,
            rstd2: be.zeros(bt)?,
            gate: be.zeros(bt * f)?,
            up: be.zeros(bt * f)?,
            h: be.zeros(bt * f)?,
        })
    }

    /// Floats held, for memory accounting.
    pub fn floats(d: &Dims) -> usize {
        let (bt, c, kv, f) = (d.bt(), d.c, d.kv(), d.f);
        bt * (6 * c + 2 * kv + 3 * f + 2) + d.b * d.h * d.t
    }
}

/// Buffers shared by all layers and micro-batches of one shape (never saved across calls).
pub struct Scratch<B: Backend> {
    q_pre: B::Buf,
    k_pre: B::Buf,
    proj: B::Buf,
    /// [Bt,C] gradient of a norm's output; also used by the head.
    pub dn: B::Buf,
    datt: B::Buf,
    dq: B::Buf,
    dk: B::Buf,
    dv: B::Buf,
    dq_pre: B::Buf,
    dk_pre: B::Buf,
    dh: B::Buf,
    dgate: B::Buf,
    dup: B::Buf,
    half: Option<HalfGrads<B>>,
}

impl<B: Backend> Scratch<B> {
    pub fn new(be: &B, d: &Dims) -> Result<Self> {
        let (bt, c, kv, f) = (d.bt(), d.c, d.kv(), d.f);
        let half = if be.compute_dtype() == Dtype::Bf16 {
            Some(HalfGrads {
                dres: be.zeros_half(bt * c)?,
                dq: be.zeros_half(bt * c)?,
                dk: be.zeros_half(bt * kv)?,
                dv: be.zeros_half(bt * kv)?,
                dgate: be.zeros_half(bt * f)?,
                dup: be.zeros_half(bt * f)?,
            })
        } else {
            None
        };
        Ok(Scratch {
            half,
            q_pre: be.zeros(bt * c)?,
            k_pre: be.zeros(bt * kv)?,
            proj: be.zeros(bt * c)?,
            dn: be.zeros(bt * c)?,
            datt: be.zeros(bt * c)?,
            dq: be.zeros(bt * c)?,
            dk: be.zeros(bt * kv)?,
            dv: be.zeros(bt * kv)?,
            dq_pre: be.zeros(bt * c)?,
            dk_pre: be.zeros(bt * kv)?,
            dh: be.zeros(bt * f)?,
            dgate: be.zeros(bt * f)?,
            dup: be.zeros(bt * f)?,
        })
    }
}

/// out [Bt,C] = layer(x [Bt,C]) with weights `w` (9 params), saving into `a`.
pub fn layer_forward<B: Backend>(
    be: &B,
    w: &[Param<B>],
    x: &B::Buf,
    out: &mut B::Buf,
    a: &mut LayerActs<B>,
    s: &mut Scratch<B>,
    d: &Dims,
) -> Result<()> {
    let (b, t, bt, c, kv, f) = (d.b, d.t, d.bt(), d.c, d.kv(), d.f);
    be.rmsnorm_forward(
        &mut a.n1,
        &mut a.rstd1,
        x,
        &w[ATTN_NORM].value,
        bt,
        c,
        d.eps,
    )?;
    let n1h = round(be, a.half.as_mut().map(|h| &mut h.n1), &a.n1)?;
    linear_forward(be, &mut s.q_pre, &a.n1, n1h, &w[WQ], bt, c, c)?;
    be.rope_forward(&mut a.q, &s.q_pre, b, t, d.h, d.d, 0, d.theta)?;
    linear_forward(be, &mut s.k_pre, &a.n1, n1h, &w[WK], bt, c, kv)?;
    be.rope_forward(&mut a.k, &s.k_pre, b, t, d.kvh, d.d, 0, d.theta)?;
    linear_forward(be, &mut a.v, &a.n1, n1h, &w[WV], bt, c, kv)?;
    be.attention_forward(&mut a.att, &mut a.lse, &a.q, &a.k, &a.v, d.attn())?;
    let atth = round(be, a.half.as_mut().map(|h| &mut h.att), &a.att)?;
    linear_forward(be, &mut s.proj, &a.att, atth, &w[WO], bt, c, c)?;
    be.add(&mut a.x2, x, &s.proj)?;
    be.rmsnorm_forward(
        &mut a.n2,
        &mut a.rstd2,
        &a.x2,
        &w[MLP_NORM].value,
        bt,
        c,
        d.eps,
    )?;
    let n2h = round(be, a.half.as_mut().map(|h| &mut h.n2), &a.n2)?;
    linear_forward(be, &mut a.gate, &a.n2, n2h, &w[WG], bt, c, f)?;
    linear_forward(be, &mut a.up, &a.n2, n2h, &w[WU], bt, c, f)?;
    be.swiglu_forward(&mut a.h, &a.gate, &a.up)?;
    let hh = round(be, a.half.as_mut().map(|h| &mut h.h), &a.h)?;
    linear_forward(be, &mut s.proj, &a.h, hh, &w[WD], bt, f, c)?;
    be.add(out, &a.x2, &s.proj)
}

/// Backward of one layer. On entry `dres` [Bt,C] holds the gradient of the layer's output; on
/// exit, the gradient of its input `x`. Parameter gradients are accumulated into `w[..].grad`.
pub fn layer_backward<B: Backend>(
    be: &B,
    w: &mut [Param<B>],
    x: &B::Buf,
    a: &LayerActs<B>,
    s: &mut Scratch<B>,
    dres: &mut B::Buf,
    d: &Dims,
) -> Result<()> {
    let (b, t, bt, c, kv, f) = (d.b, d.t, d.bt(), d.c, d.kv(), d.f);
    let ah = a.half.as_ref();
    let mut gh = s.half.take();
    // MLP: out = x2 + h Wd^T.
    be.fill(&mut s.dh, 0.0)?;
    let dresh = round(be, gh.as_mut().map(|g| &mut g.dres), dres)?;
    let io = (&*dres, dresh, &a.h, ah.map(|h| &h.h));
    linear_backward(be, &mut s.dh, &mut w[WD], io, bt, f, c)?;
    be.fill(&mut s.dgate, 0.0)?;
    be.fill(&mut s.dup, 0.0)?;
    be.swiglu_backward(&mut s.dgate, &mut s.dup, &s.dh, &a.gate, &a.up)?;
    be.fill(&mut s.dn, 0.0)?;
    let n2h = ah.map(|h| &h.n2);
    let dgh = round(be, gh.as_mut().map(|g| &mut g.dgate), &s.dgate)?;
    linear_backward(
        be,
        &mut s.dn,
        &mut w[WG],
        (&s.dgate, dgh, &a.n2, n2h),
        bt,
        c,
        f,
    )?;
    let duh = round(be, gh.as_mut().map(|g| &mut g.dup), &s.dup)?;
    linear_backward(
        be,
        &mut s.dn,
        &mut w[WU],
        (&s.dup, duh, &a.n2, n2h),
        bt,
        c,
        f,
    )?;
    let p = &mut w[MLP_NORM];
    be.rmsnorm_backward(dres, &mut p.grad, &s.dn, &a.x2, &p.value, &a.rstd2, bt, c)?;
    // Attention: x2 = x + att Wo^T.
    be.fill(&mut s.datt, 0.0)?;
    let dresh = round(be, gh.as_mut().map(|g| &mut g.dres), dres)?;
    let io = (&*dres, dresh, &a.att, ah.map(|h| &h.att));
    linear_backward(be, &mut s.datt, &mut w[WO], io, bt, c, c)?;
    be.fill(&mut s.dq, 0.0)?;
    be.fill(&mut s.dk, 0.0)?;
    be.fill(&mut s.dv, 0.0)?;
    be.attention_backward(
        &mut s.dq,
        &mut s.dk,
        &mut s.dv,
        &s.datt,
        &a.q,
        &a.k,
        &a.v,
        &a.att,
        &a.lse,
        d.attn(),
    )?;
    be.fill(&mut s.dq_pre, 0.0)?;
    be.fill(&mut s.dk_pre, 0.0)?;
    be.rope_backward(&mut s.dq_pre, &s.dq, b, t, d.h, d.d, 0, d.theta)?;
    be.rope_backward(&mut s.dk_pre, &s.dk, b, t, d.kvh, d.d, 0, d.theta)?;
    be.fill(&mut s.dn, 0.0)?;
    let n1h = ah.map(|h| &h.n1);
    let dqh = round(be, gh.as_mut().map(|g| &mut g.dq), &s.dq_pre)?;
    linear_backward(
        be,
        &mut s.dn,
        &mut w[WQ],
        (&s.dq_pre, dqh, &a.n1, n1h),
        bt,
        c,
        c,
    )?;
    let dkh = round(be, gh.as_mut().map(|g| &mut g.dk), &s.dk_pre)?;
    linear_backward(
        be,
        &mut s.dn,
        &mut w[WK],
        (&s.dk_pre, dkh, &a.n1, n1h),
        bt,
        c,
        kv,
    )?;
    let dvh = round(be, gh.as_mut().map(|g| &mut g.dv), &s.dv)?;
    linear_backward(
        be,
        &mut s.dn,
        &mut w[WV],
        (&s.dv, dvh, &a.n1, n1h),
        bt,
        c,
        kv,
    )?;
    s.half = gh;
    let p = &mut w[ATTN_NORM];
    be.rmsnorm_backward(dres, &mut p.grad, &s.dn, x, &p.value, &a.rstd1, bt, c)
}

/// `dst = bf16(src)` when the layer runs in bf16 (`dst` given); the rounded copy, or `None`.
pub(crate) fn round<'a, B: Backend>(
    be: &B,
    dst: Option<&'a mut B::Half>,
    src: &B::Buf,
) -> Result<Option<&'a B::Half>> {
    match dst {
        Some(h) => {
            be.to_half(h, src)?;
            Ok(Some(h))
        }
        None => Ok(None),
    }
}

/// out [M,N] = x [M,K] @ p^T: from the bf16 copies when both exist, else in f32.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_forward<B: Backend>(
    be: &B,
    out: &mut B::Buf,
    x: &B::Buf,
    xh: Option<&B::Half>,
    p: &Param<B>,
    m: usize,
    k: usize,
    n: usize,
) -> Result<()> {
    match (xh, &p.half) {
        (Some(xh), Some(wh)) => be.matmul_forward_bf16(out, xh, wh, m, k, n),
        _ => be.matmul_forward(out, x, &p.value, m, k, n),
    }
}

/// The output gradient and the input of a linear layer, each in f32 and (bf16 compute) in
/// bf16: (dout, dout_bf16, x, x_bf16).
pub(crate) type LinearIo<'a, B> = (
    &'a <B as Backend>::Buf,
    Option<&'a <B as Backend>::Half>,
    &'a <B as Backend>::Buf,
    Option<&'a <B as Backend>::Half>,
);

/// dinp [M,K] += dout @ p; p.grad [N,K] += dout^T @ x: from the bf16 copies when all exist,
/// else in f32. The weight gradient accumulates in f32 either way.
pub(crate) fn linear_backward<B: Backend>(
    be: &B,
    dinp: &mut B::Buf,
    p: &mut Param<B>,
    (dout, douth, x, xh): LinearIo<'_, B>,
    m: usize,
    k: usize,
    n: usize,
) -> Result<()> {
    match (douth, xh, &p.half) {
        (Some(dh), Some(xh), Some(wh)) => {
            be.matmul_backward_bf16(dinp, &mut p.grad, dh, xh, wh, m, k, n)
        }
        _ => be.matmul_backward(dinp, &mut p.grad, dout, x, &p.value, m, k, n),
    }
}
