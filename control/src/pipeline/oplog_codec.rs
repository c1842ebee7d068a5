//! The byte format of a stage's operation log (`oplog.rs`) and of a served segment: a tag
//! byte per record, then little-endian fields; a peer's log that does not decode is refused
//! whole, never a panic.

use neuroshard_ledger::Address;
use neuroshard_ledger::keys::Hash32;
use neuroshard_shared::shm::DType;

use super::oplog::{Dir, LogError, Op, Sent};
use super::wire::Wire;

/// Most dimensions a logged tensor may have.
const MAX_DIMS: usize = 8;

/// A segment as `GetStageLog` serves it: when it started (unix ms, i64 LE), the checkpoint's
/// length (u64 LE), the checkpoint, the log.
pub fn pack(started_ms: i64, checkpoint: &[u8], log: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + checkpoint.len() + log.len());
    out.extend_from_slice(&started_ms.to_le_bytes());
    out.extend_from_slice(&(checkpoint.len() as u64).to_le_bytes());
    out.extend_from_slice(checkpoint);
    out.extend_from_slice(log);
    out
}

/// The (started ms, checkpoint, log) of a served segment.
pub fn unpack(bytes: &[u8]) -> Result<(i64, &[u8], &[u8]), LogError> {
    let word = |at: usize| -> Result<[u8; 8], LogError> {
        bytes
            .get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .ok_or(LogError::Truncated(at))
    };
    let started = i64::from_le_bytes(word(0)?);
    let end = usize::try_from(u64::from_le_bytes(word(8)?))
        .ok()
        .and_then(|n| n.checked_add(16))
        .filter(|end| *end <= bytes.len())
        .ok_or(LogError::Truncated(16))?;
    Ok((started, &bytes[16..end], &bytes[end..]))
}

// ---- encoding: tag byte, then little-endian fields ----

const T_RESET: u8 = 1;
const T_FORWARD: u8 = 2;
const T_BACKWARD: u8 = 3;
const T_APPLY: u8 = 4;
const T_ROUTE: u8 = 5;
const T_TOUCHED: u8 = 6;
const T_RECEIVED: u8 = 7;
const T_CLASS: u8 = 8;

fn put_wire(w: &Wire, out: &mut Vec<u8>) {
    out.push(w.dtype as u8);
    out.push(w.shape.len() as u8);
    for d in &w.shape {
        out.extend_from_slice(&d.to_le_bytes());
    }
    out.extend_from_slice(&(w.data.len() as u64).to_le_bytes());
    out.extend_from_slice(&w.data);
}

fn put_str(s: &str, out: &mut Vec<u8>) {
    let b = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(b.len() as u16).to_le_bytes());
    out.extend_from_slice(b);
}

fn put_key(at_ms: i64, driver: &str, step: u64, mb: u32, out: &mut Vec<u8>) {
    out.extend_from_slice(&at_ms.to_le_bytes());
    put_str(driver, out);
    out.extend_from_slice(&step.to_le_bytes());
    out.extend_from_slice(&mb.to_le_bytes());
}

/// Appends `op`'s encoding to `out`.
pub fn encode(op: &Op, out: &mut Vec<u8>) {
    match op {
        Op::Reset => out.push(T_RESET),
        Op::Touched => out.push(T_TOUCHED),
        Op::Class(class) => {
            out.push(T_CLASS);
            put_str(class, out);
        }
        Op::Forward {
            at_ms,
            driver,
            step,
            mb,
            input,
            labels,
            sent,
        } => {
            out.push(T_FORWARD);
            put_key(*at_ms, driver, *step, *mb, out);
            put_wire(input, out);
            match labels {
                Some(l) => {
                    out.push(1);
                    put_wire(l, out);
                }
                None => out.push(0),
            }
            match sent {
                Sent::Acts(a) => {
                    out.push(1);
                    put_wire(a, out);
                }
                Sent::Loss(l) => {
                    out.push(2);
                    out.extend_from_slice(&l.to_le_bytes());
                }
            }
        }
        Op::Backward {
            at_ms,
            driver,
            step,
            mb,
            grad,
            sent,
        } => {
            out.push(T_BACKWARD);
            put_key(*at_ms, driver, *step, *mb, out);
            for w in [grad, sent] {
                match w {
                    Some(w) => {
                        out.push(1);
                        put_wire(w, out);
                    }
                    None => out.push(0),
                }
            }
        }
        Op::Apply { global_norm } => {
            out.push(T_APPLY);
            out.extend_from_slice(&global_norm.to_le_bytes());
        }
        Op::Route {
            dir,
            driver,
            step,
            mb,
            to,
        } => {
            out.push(T_ROUTE);
            put_dir(*dir, out);
            put_key(0, driver, *step, *mb, out);
            out.extend_from_slice(&to.0);
        }
        Op::Received {
            at_ms,
            dir,
            driver,
            step,
            mb,
            from,
            digest,
        } => {
            out.push(T_RECEIVED);
            put_dir(*dir, out);
            put_key(*at_ms, driver, *step, *mb, out);
            out.extend_from_slice(&from.0);
            out.extend_from_slice(&digest.0);
        }
    }
}

fn put_dir(dir: Dir, out: &mut Vec<u8>) {
    out.push(match dir {
        Dir::Forward => 1,
        Dir::Backward => 2,
    });
}

/// Reads a log's bytes; a peer's log that does not decode is refused whole.
pub fn decode(bytes: &[u8]) -> Result<Vec<Op>, LogError> {
    let mut r = Reader { b: bytes, at: 0 };
    let mut ops = Vec::new();
    while r.at < bytes.len() {
        ops.push(r.op()?);
    }
    Ok(ops)
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], LogError> {
        let end = self.at.checked_add(n).ok_or(LogError::Truncated(self.at))?;
        let s = self
            .b
            .get(self.at..end)
            .ok_or(LogError::Truncated(self.at))?;
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, LogError> {
        Ok(self.take(1)?[0])
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], LogError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u64(&mut self) -> Result<u64, LogError> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn str(&mut self) -> Result<String, LogError> {
        let n = u16::from_le_bytes(self.arr()?) as usize;
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| LogError::Malformed("a string is not UTF-8".into()))
    }
    fn key(&mut self) -> Result<(i64, String, u64, u32), LogError> {
        let at = i64::from_le_bytes(self.arr()?);
        let driver = self.str()?;
        let step = self.u64()?;
        let mb = u32::from_le_bytes(self.arr()?);
        Ok((at, driver, step, mb))
    }
    fn wire(&mut self) -> Result<Wire, LogError> {
        let dtype = match self.u8()? {
            0 => DType::F32,
            1 => DType::BF16,
            2 => DType::U32,
            3 => DType::F16,
            4 => DType::U8,
            d => return Err(LogError::Malformed(format!("unknown dtype {d}"))),
        };
        let ndim = self.u8()? as usize;
        if ndim > MAX_DIMS {
            return Err(LogError::Malformed(format!("{ndim} dimensions")));
        }
        let shape = (0..ndim)
            .map(|_| self.u64())
            .collect::<Result<Vec<_>, _>>()?;
        let len = self.u64()?;
        let expect = shape
            .iter()
            .try_fold(dtype.size(), |a, d| a.checked_mul(*d))
            .ok_or_else(|| LogError::Malformed("shape overflows".into()))?;
        if len != expect {
            return Err(LogError::Malformed(format!(
                "a tensor of shape {shape:?} has {len} bytes"
            )));
        }
        let data = self
            .take(usize::try_from(len).map_err(|_| LogError::Truncated(self.at))?)?
            .to_vec();
        Ok(Wire { dtype, shape, data })
    }
    fn dir(&mut self) -> Result<Dir, LogError> {
        match self.u8()? {
            1 => Ok(Dir::Forward),
            2 => Ok(Dir::Backward),
            d => Err(LogError::Malformed(format!("direction {d}"))),
        }
    }
    fn opt_wire(&mut self) -> Result<Option<Wire>, LogError> {
        match self.u8()? {
            0 => Ok(None),
            1 => self.wire().map(Some),
            f => Err(LogError::Malformed(format!("option flag {f}"))),
        }
    }
    fn op(&mut self) -> Result<Op, LogError> {
        Ok(match self.u8()? {
            T_RESET => Op::Reset,
            T_TOUCHED => Op::Touched,
            T_CLASS => Op::Class(self.str()?),
            T_FORWARD => {
                let (at_ms, driver, step, mb) = self.key()?;
                let input = self.wire()?;
                let labels = self.opt_wire()?;
                let sent = match self.u8()? {
                    1 => Sent::Acts(self.wire()?),
                    2 => Sent::Loss(f32::from_le_bytes(self.arr()?)),
                    f => return Err(LogError::Malformed(format!("sent flag {f}"))),
                };
                Op::Forward {
                    at_ms,
                    driver,
                    step,
                    mb,
                    input,
                    labels,
                    sent,
                }
            }
            T_BACKWARD => {
                let (at_ms, driver, step, mb) = self.key()?;
                Op::Backward {
                    at_ms,
                    driver,
                    step,
                    mb,
                    grad: self.opt_wire()?,
                    sent: self.opt_wire()?,
                }
            }
            T_APPLY => Op::Apply {
                global_norm: f32::from_le_bytes(self.arr()?),
            },
            T_ROUTE => {
                let dir = self.dir()?;
                let (_, driver, step, mb) = self.key()?;
                Op::Route {
                    dir,
                    driver,
                    step,
                    mb,
                    to: Address(self.arr()?),
                }
            }
            T_RECEIVED => {
                let dir = self.dir()?;
                let (at_ms, driver, step, mb) = self.key()?;
                Op::Received {
                    at_ms,
                    dir,
                    driver,
                    step,
                    mb,
                    from: Address(self.arr()?),
                    digest: Hash32(self.arr()?),
                }
            }
            t => return Err(LogError::Malformed(format!("unknown record {t}"))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::oplog::tests::sample;

    #[test]
    fn a_log_round_trips_and_garbage_is_refused() {
        let ops = sample(Address([7; 20]));
        let (mut bytes, mut ends) = (Vec::new(), vec![0]);
        for op in &ops {
            encode(op, &mut bytes);
            ends.push(bytes.len());
        }
        assert_eq!(decode(&bytes).unwrap(), ops);
        // A cut between records reads the records before it; any other cut is an error.
        for cut in 0..bytes.len() {
            match ends.iter().position(|e| *e == cut) {
                Some(n) => assert_eq!(decode(&bytes[..cut]).unwrap(), ops[..n]),
                None => assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}"),
            }
        }
        assert!(decode(&[9]).is_err());
        // A tensor whose length disagrees with its shape.
        let mut bad = Vec::new();
        encode(&ops[1], &mut bad);
        bad[1 + 8 + 2 + 1 + 8 + 4 + 2 + 8 * 3] = 9;
        assert!(decode(&bad).is_err());
    }
}
