//! Generation split across stages (distributed inference): each stage keeps, per session, a
//! KV cache of its own layers and runs one pass per generation step. The stage holding the
//! embedding takes token ids, the others activations [T, C]; the stage holding the head
//! answers with the next-token logits of the last position (live vocabulary only), the others
//! with their output activations. Chained stage by stage the passes compute exactly what
//! [`Model::generate`] computes on a full model: the same layer code (`cached_layers`) runs
//! on each stage.

use crate::backend::Backend;

use super::generate::Step;
use super::{Model, ModelError, Result};

/// One session's KV cache on this stage.
pub struct StageCache<B: Backend> {
    kc: Vec<B::Buf>,
    vc: Vec<B::Buf>,
    /// Rows reserved in each cache.
    rows: usize,
    /// Rows filled: the position of the next input token.
    pos: usize,
    /// Step buffers of the last pass (reused while the input length stays the same).
    step: Option<(usize, Step<B>)>,
}

impl<B: Backend> StageCache<B> {
    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// What one stage pass takes.
#[derive(Debug, Clone, Copy)]
pub enum PassInput<'a> {
    /// Token ids (the stage holding the embedding).
    Ids(&'a [u32]),
    /// Activations [T, C] (any other stage).
    Acts(&'a [f32]),
}

impl<B: Backend> Model<B> {
    /// Bytes of a session's KV cache of `rows` positions on this stage.
    pub fn stage_cache_bytes(&self, rows: usize) -> u64 {
        let kv = u64::from(self.cfg.kv_heads * self.cfg.head_dim());
        self.num_layers() as u64 * 2 * rows as u64 * kv * 4
    }

    /// A fresh session cache of `rows` positions (1..=max_seq).
    pub fn stage_cache(&self, rows: usize) -> Result<StageCache<B>> {
        if rows == 0 || rows > self.cfg.max_seq as usize {
            return Err(ModelError::Input(format!(
                "a session reserves 1 to {} cache rows, not {rows}",
                self.cfg.max_seq
            )));
        }
        let kv = (self.cfg.kv_heads * self.cfg.head_dim()) as usize;
        let layers = self.num_layers();
        let mut kc = Vec::with_capacity(layers);
        let mut vc = Vec::with_capacity(layers);
        for _ in 0..layers {
            kc.push(self.be.zeros(rows * kv)?);
            vc.push(self.be.zeros(rows * kv)?);
        }
        Ok(StageCache {
            kc,
            vc,
            rows,
            pos: 0,
            step: None,
        })
    }

    /// Runs this stage's part of one generation step over the `T` new positions of `input`,
    /// appending to `cache`. Returns the output activations [T, C], or on the head stage the
    /// logits of the last position over the live vocabulary.
    pub fn stage_pass(&self, cache: &mut StageCache<B>, input: PassInput<'_>) -> Result<Vec<f32>> {
        let c = self.cfg.hidden as usize;
        let vocab = self.cfg.vocab_size as usize;
        let tq = match input {
            PassInput::Ids(ids) => {
                if !self.spec.has_embedding {
                    return Err(ModelError::Input(
                        "this stage takes activations, not token ids".into(),
                    ));
                }
                if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
                    return Err(ModelError::Input(format!(
                        "token {bad} not below vocab_size {vocab}"
                    )));
                }
                ids.len()
            }
            PassInput::Acts(x) => {
                if self.spec.has_embedding {
                    return Err(ModelError::Input(
                        "this stage holds the embedding: it takes token ids".into(),
                    ));
                }
                if x.len() % c != 0 {
                    return Err(ModelError::Input(format!(
                        "{} activation values are not rows of {c}",
                        x.len()
                    )));
                }
                if x.iter().any(|v| !v.is_finite()) {
                    return Err(ModelError::Input("activations hold NaN or Inf".into()));
                }
                x.len() / c
            }
        };
        if tq == 0 {
            return Err(ModelError::Input(
                "a pass needs at least one position".into(),
            ));
        }
        if cache.pos + tq > cache.rows {
            return Err(ModelError::Input(format!(
                "{} cached + {tq} new positions exceed the {} rows reserved",
                cache.pos, cache.rows
            )));
        }
        if cache.step.as_ref().is_none_or(|(n, _)| *n != tq) {
            cache.step = None;
            cache.step = Some((tq, self.step_buffers(tq)?));
        }
        let be = &self.be;
        let (_, st) = cache.step.as_mut().expect("just set");
        match input {
            PassInput::Ids(ids) => {
                let ids = be.upload_ids(ids)?;
                be.embedding_forward(&mut st.x, &ids, &self.params[0].value, c)?;
            }
            PassInput::Acts(x) => be.write(&mut st.x, x)?,
        }
        let past = cache.pos;
        self.cached_layers(
            self.layer_offset(),
            tq,
            past,
            cache.rows,
            st,
            &mut cache.kc,
            &mut cache.vc,
        )?;
        cache.pos += tq;
        if !self.spec.has_head {
            let mut out = vec![0.0f32; tq * c];
            be.download(&st.x, &mut out)?;
            return Ok(out);
        }
        self.last_logits(tq, st)?;
        let mut logits = vec![0.0f32; vocab];
        be.download(&st.logits, &mut logits)?;
        logits.truncate(self.v_live.clamp(1, vocab));
        Ok(logits)
    }
}

#[cfg(test)]
mod tests {
    use neuroshard_shared::model::ModelConfig;

    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::model::StageSpec;

    fn stage(cfg: &ModelConfig, start: u32, end: u32) -> Model<CpuBackend> {
        let spec = StageSpec {
            layer_start: start,
            layer_end: end,
            has_embedding: start == 0,
            has_head: end == cfg.layers,
        };
        Model::new(CpuBackend::new(), cfg.clone(), spec, 42).unwrap()
    }

    /// Logits of the full model after `tokens` at positions `past..` (the single-node path).
    fn full_logits(
        m: &Model<CpuBackend>,
        tokens: &[u32],
        past: usize,
        st: &mut Step<CpuBackend>,
        kc: &mut [Vec<f32>],
        vc: &mut [Vec<f32>],
    ) -> Vec<f32> {
        let max_seq = m.cfg.max_seq as usize;
        m.decode_pass(tokens, past, max_seq, st, kc, vc).unwrap();
        let mut out = vec![0.0; m.cfg.vocab_size as usize];
        m.be.download(&st.logits, &mut out).unwrap();
        out
    }

    #[test]
    fn a_split_prefill_and_decode_gives_the_full_models_logits() {
        let cfg = ModelConfig::preset("default").unwrap();
        assert!(cfg.layers >= 3, "the test splits into three stages");
        let full = stage(&cfg, 0, cfg.layers);
        let stages = [
            stage(&cfg, 0, 1),
            stage(&cfg, 1, cfg.layers - 1),
            stage(&cfg, cfg.layers - 1, cfg.layers),
        ];
        let rows = 12;
        let mut caches: Vec<_> = stages
            .iter()
            .map(|s| s.stage_cache(rows).unwrap())
            .collect();
        let kv = (cfg.kv_heads * cfg.head_dim()) as usize;
        let max_seq = cfg.max_seq as usize;
        let mut kc: Vec<Vec<f32>> = (0..cfg.layers).map(|_| vec![0.0; max_seq * kv]).collect();
        let mut vc = kc.clone();

        let prompt = [1u32, 17, 99, 5, 230];
        let mut input: Vec<u32> = prompt.to_vec();
        let mut past = 0;
        for step in 0..5 {
            let mut st = full.step_buffers(input.len()).unwrap();
            let want = full_logits(&full, &input, past, &mut st, &mut kc, &mut vc);
            let mut x = stages[0]
                .stage_pass(&mut caches[0], PassInput::Ids(&input))
                .unwrap();
            assert_eq!(x.len(), input.len() * cfg.hidden as usize);
            x = stages[1]
                .stage_pass(&mut caches[1], PassInput::Acts(&x))
                .unwrap();
            let got = stages[2]
                .stage_pass(&mut caches[2], PassInput::Acts(&x))
                .unwrap();
            assert_eq!(got.len(), want.len());
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(worst <= 1e-5, "step {step}: logits differ by {worst}");
            past += input.len();
            assert!(caches.iter().all(|c| c.position() == past));
            // Greedy next token, fed to the next step.
            let next = want
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0 as u32;
            input = vec![next];
        }
    }

    #[test]
    fn bad_stage_input_is_refused() {
        let cfg = ModelConfig::preset("default").unwrap();
        let first = stage(&cfg, 0, 1);
        let mid = stage(&cfg, 1, 2);
        let mut c0 = first.stage_cache(4).unwrap();
        let mut c1 = mid.stage_cache(4).unwrap();
        assert!(first.stage_cache(0).is_err());
        assert!(first.stage_cache(cfg.max_seq as usize + 1).is_err());
        // Out-of-vocabulary id, activations to the embedding stage, ids to a middle stage.
        assert!(
            first
                .stage_pass(&mut c0, PassInput::Ids(&[cfg.vocab_size]))
                .is_err()
        );
        assert!(
            first
                .stage_pass(&mut c0, PassInput::Acts(&[0.0; 4]))
                .is_err()
        );
        assert!(mid.stage_pass(&mut c1, PassInput::Ids(&[1])).is_err());
        // Ragged rows, NaN, empty input, more positions than reserved.
        let c = cfg.hidden as usize;
        assert!(
            mid.stage_pass(&mut c1, PassInput::Acts(&vec![0.0; c + 1]))
                .is_err()
        );
        let mut nan = vec![0.0; c];
        nan[3] = f32::NAN;
        assert!(mid.stage_pass(&mut c1, PassInput::Acts(&nan)).is_err());
        assert!(mid.stage_pass(&mut c1, PassInput::Acts(&[])).is_err());
        assert!(first.stage_pass(&mut c0, PassInput::Ids(&[1; 5])).is_err());
        // Nothing above moved the caches.
        assert_eq!((c0.position(), c1.position()), (0, 0));
        assert!(
            first
                .stage_pass(&mut c0, PassInput::Ids(&[1, 2, 3, 4]))
                .is_ok()
        );
        assert!(first.stage_pass(&mut c0, PassInput::Ids(&[1])).is_err());
    }
}
