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

use crate::backend::{AttnShape, Backend, Result};

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
}

impl<B: Backend> LayerActs<B> {
    pub fn new(be: &B, d: &Dims) -> Result<Self> {
        let (bt, c, kv, f) = (d.bt(), d.c, d.kv(), d.f);
        Ok(LayerActs {
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
}

impl<B: Backend> Scratch<B> {
    pub fn new(be: &B, d: &Dims) -> Result<Self> {
        let (bt, c, kv, f) = (d.bt(), d.c, d.kv(), d.f);
        Ok(Scratch {
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
    be.matmul_forward(&mut s.q_pre, &a.n1, &w[WQ].value, bt, c, c)?;
    be.rope_forward(&mut a.q, &s.q_pre, b, t, d.h, d.d, 0, d.theta)?;
    be.matmul_forward(&mut s.k_pre, &a.n1, &w[WK].value, bt, c, kv)?;
    be.rope_forward(&mut a.k, &s.k_pre, b, t, d.kvh, d.d, 0, d.theta)?;
    be.matmul_forward(&mut a.v, &a.n1, &w[WV].value, bt, c, kv)?;
    be.attention_forward(&mut a.att, &mut a.lse, &a.q, &a.k, &a.v, d.attn())?;
    be.matmul_forward(&mut s.proj, &a.att, &w[WO].value, bt, c, c)?;
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
    be.matmul_forward(&mut a.gate, &a.n2, &w[WG].value, bt, c, f)?;
    be.matmul_forward(&mut a.up, &a.n2, &w[WU].value, bt, c, f)?;
    be.swiglu_forward(&mut a.h, &a.gate, &a.up)?;
    be.matmul_forward(&mut s.proj, &a.h, &w[WD].value, bt, f, c)?;
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
    // MLP: out = x2 + h Wd^T.
    be.fill(&mut s.dh, 0.0)?;
    let p = &mut w[WD];
    be.matmul_backward(&mut s.dh, &mut p.grad, dres, &a.h, &p.value, bt, f, c)?;
    be.fill(&mut s.dgate, 0.0)?;
    be.fill(&mut s.dup, 0.0)?;
    be.swiglu_backward(&mut s.dgate, &mut s.dup, &s.dh, &a.gate, &a.up)?;
    be.fill(&mut s.dn, 0.0)?;
    let p = &mut w[WG];
    be.matmul_backward(&mut s.dn, &mut p.grad, &s.dgate, &a.n2, &p.value, bt, c, f)?;
    let p = &mut w[WU];
    be.matmul_backward(&mut s.dn, &mut p.grad, &s.dup, &a.n2, &p.value, bt, c, f)?;
    let p = &mut w[MLP_NORM];
    be.rmsnorm_backward(dres, &mut p.grad, &s.dn, &a.x2, &p.value, &a.rstd2, bt, c)?;
    // Attention: x2 = x + att Wo^T.
    be.fill(&mut s.datt, 0.0)?;
    let p = &mut w[WO];
    be.matmul_backward(&mut s.datt, &mut p.grad, dres, &a.att, &p.value, bt, c, c)?;
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
    let p = &mut w[WQ];
    be.matmul_backward(&mut s.dn, &mut p.grad, &s.dq_pre, &a.n1, &p.value, bt, c, c)?;
    let p = &mut w[WK];
    be.matmul_backward(
        &mut s.dn,
        &mut p.grad,
        &s.dk_pre,
        &a.n1,
        &p.value,
        bt,
        c,
        kv,
    )?;
    let p = &mut w[WV];
    be.matmul_backward(&mut s.dn, &mut p.grad, &s.dv, &a.n1, &p.value, bt, c, kv)?;
    let p = &mut w[ATTN_NORM];
    be.rmsnorm_backward(dres, &mut p.grad, &s.dn, x, &p.value, &a.rstd1, bt, c)
}
