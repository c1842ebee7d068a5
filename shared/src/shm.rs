//! The shared-memory segment through which control and engine exchange tensors.
//!
//! Control creates (and owns) one segment per node instance; the engine maps it after
//! `Attach`. Commands on the Unix socket name a slot and its sequence number; the payload
//! never travels on the socket.
//!
//! # Layout (version 1, little-endian, offsets from the segment start)
//!
//! ```text
//! 0x0000  Header (HEADER_BYTES = 4096)
//!         magic        [u8; 8]  b"NSHMSEG\0"
//!         version      u32      LAYOUT_VERSION
//!         slot_count   u32
//!         slot_bytes   u64      payload capacity of each slot
//!         table_offset u64      = HEADER_BYTES
//!         data_offset  u64      first payload byte (page aligned)
//!         owner_pid    u32      pid of the creating control process
//!         _pad         u32
//!         created_ms   u64      unix milliseconds at creation
//! 0x1000  Slot table: slot_count x SlotMeta (SLOT_META_BYTES = 128 each)
//!         state        u32 (atomic)  FREE=0 WRITING=1 READY=2
//!         dtype        u32           DType as u32
//!         seq          u64 (atomic)  bumped on every completed write
//!         ndim         u32
//!         _pad         u32
//!         shape        [u64; MAX_DIMS]
//!         payload_off  u64           absolute offset of the slot's payload
//!         payload_len  u64           bytes written
//! data_offset + i * slot_bytes: payload of slot i
//! ```
//!
//! # Protocol
//!
//! A writer sets `state = WRITING`, copies the payload and metadata, increments `seq` and
//! publishes `state = READY` with release ordering. A reader loads `state` with acquire
//! ordering and refuses the slot unless it is `READY` with the expected `seq`, so a stale or
//! half-written tensor is never read. Control decides which slot each command uses (it is
//! the only process that issues commands), so two writers never share a slot.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use memmap2::{MmapOptions, MmapRaw};
use nix::fcntl::OFlag;
use nix::sys::mman::{shm_open, shm_unlink};
use nix::sys::stat::Mode;
use sha2::{Digest, Sha256};

pub const MAGIC: [u8; 8] = *b"NSHMSEG\0";
pub const LAYOUT_VERSION: u32 = 1;
pub const HEADER_BYTES: u64 = 4096;
pub const SLOT_META_BYTES: u64 = 128;
pub const MAX_DIMS: usize = 8;
const PAGE: u64 = 4096;

const STATE_FREE: u32 = 0;
const STATE_WRITING: u32 = 1;
const STATE_READY: u32 = 2;

// Header field offsets.
const H_MAGIC: usize = 0;
const H_VERSION: usize = 8;
const H_SLOT_COUNT: usize = 12;
const H_SLOT_BYTES: usize = 16;
const H_TABLE_OFFSET: usize = 24;
const H_DATA_OFFSET: usize = 32;
const H_OWNER_PID: usize = 40;
const H_CREATED_MS: usize = 48;

// Slot meta field offsets (relative to the slot's meta entry).
const S_STATE: usize = 0;
const S_DTYPE: usize = 4;
const S_SEQ: usize = 8;
const S_NDIM: usize = 16;
const S_SHAPE: usize = 24;
const S_PAYLOAD_OFF: usize = S_SHAPE + 8 * MAX_DIMS;
const S_PAYLOAD_LEN: usize = S_PAYLOAD_OFF + 8;

#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    #[error("shared memory {op} failed for {name}: {source}")]
    Os {
        op: &'static str,
        name: String,
        source: nix::Error,
    },
    #[error("mapping {name} failed: {source}")]
    Map {
        name: String,
        source: std::io::Error,
    },
    #[error("segment {name} is not a neuroshard segment (bad magic or version {version})")]
    BadHeader { name: String, version: u32 },
    #[error("segment {name} is too small: {len} bytes, layout needs {needed}")]
    TooSmall { name: String, len: u64, needed: u64 },
    #[error("slot {slot} out of range (segment has {count} slots)")]
    SlotOutOfRange { slot: u32, count: u32 },
    #[error("tensor of {bytes} bytes does not fit slot capacity {capacity}")]
    TooLarge { bytes: u64, capacity: u64 },
    #[error("tensor has {ndim} dimensions, at most {MAX_DIMS} are supported")]
    TooManyDims { ndim: usize },
    #[error("shape {shape:?} of {dtype:?} needs {expected} bytes, payload has {actual}")]
    ShapeMismatch {
        shape: Vec<u64>,
        dtype: DType,
        expected: u64,
        actual: u64,
    },
    #[error("slot {slot} is not ready with sequence {seq} (state {state}, sequence {current})")]
    Stale {
        slot: u32,
        seq: u64,
        state: u32,
        current: u64,
    },
    #[error("slot {slot} holds unknown dtype code {code}")]
    UnknownDType { slot: u32, code: u32 },
    #[error("invalid segment name {0:?}: must start with '/' and contain no other '/'")]
    BadName(String),
}

/// Element type of a tensor in a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[repr(u32)]
pub enum DType {
    F32 = 0,
    BF16 = 1,
    U32 = 2,
    F16 = 3,
    U8 = 4,
}

impl DType {
    pub fn size(self) -> u64 {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::U8 => 1,
        }
    }

    fn from_code(code: u32) -> Option<DType> {
        Some(match code {
            0 => DType::F32,
            1 => DType::BF16,
            2 => DType::U32,
            3 => DType::F16,
            4 => DType::U8,
            _ => return None,
        })
    }
}

/// Names a written tensor: the slot and the sequence number the write produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorRef {
    pub slot: u32,
    pub seq: u64,
}

/// A tensor read out of a slot.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub bytes: Vec<u8>,
}

impl Tensor {
    pub fn from_f32(shape: &[u64], values: &[f32]) -> Tensor {
        Tensor {
            dtype: DType::F32,
            shape: shape.to_vec(),
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    pub fn from_u32(shape: &[u64], values: &[u32]) -> Tensor {
        Tensor {
            dtype: DType::U32,
            shape: shape.to_vec(),
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// The values as f32; `None` unless the dtype is F32.
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        (self.dtype == DType::F32).then(|| {
            self.bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        })
    }

    /// The values as u32; `None` unless the dtype is U32.
    pub fn to_u32(&self) -> Option<Vec<u32>> {
        (self.dtype == DType::U32).then(|| {
            self.bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        })
    }

    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// The shm name for the node whose data directory is `data_dir`: stable across restarts, so
/// the next start finds (and reclaims) a segment a crashed daemon left behind, and distinct
/// for two nodes on one machine.
pub fn segment_name_for(data_dir: &std::path::Path) -> String {
    let canonical = data_dir
        .canonicalize()
        .unwrap_or_else(|_| data_dir.to_path_buf());
    let digest = Sha256::digest(canonical.as_os_str().as_encoded_bytes());
    format!("/neuroshard-{}", &hex::encode(digest)[..16])
}

/// A mapped segment. Created by control (owner: unlinks on drop) or opened by the engine.
pub struct Segment {
    name: String,
    map: MmapRaw,
    slot_count: u32,
    slot_bytes: u64,
    data_offset: u64,
    owner: bool,
}

// SAFETY: the mapping is plain shared memory. All metadata that two threads or processes can
// touch concurrently (state, seq) is accessed through atomics; payload bytes of a slot are
// written only by the party the controlling command assigned the slot to (see the protocol in
// the module docs), and read only after an acquire load observed READY.
unsafe impl Send for Segment {}
unsafe impl Sync for Segment {}

fn check_name(name: &str) -> Result<(), ShmError> {
    if !name.starts_with('/') || name[1..].contains('/') || name.len() < 2 || name.len() > 250 {
        return Err(ShmError::BadName(name.to_string()));
    }
    Ok(())
}

fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

impl Segment {
    /// Creates the segment `name` with `slot_count` slots of `slot_bytes` each. A segment of
    /// that name left by a crashed process is unlinked first (reclaimed); the returned flag
    /// says whether that happened.
    pub fn create(
        name: &str,
        slot_count: u32,
        slot_bytes: u64,
    ) -> Result<(Segment, bool), ShmError> {
        check_name(name)?;
        let slot_bytes = round_up(slot_bytes.max(PAGE), PAGE);
        let data_offset = round_up(HEADER_BYTES + SLOT_META_BYTES * slot_count as u64, PAGE);
        let len = data_offset + slot_bytes * slot_count as u64;

        let os = |op, source| ShmError::Os {
            op,
            name: name.to_string(),
            source,
        };
        let flags = OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR;
        let mode = Mode::S_IRUSR | Mode::S_IWUSR;
        let (fd, reclaimed) = match shm_open(name, flags, mode) {
            Ok(fd) => (fd, false),
            Err(nix::Error::EEXIST) => {
                shm_unlink(name).map_err(|e| os("unlink", e))?;
                (
                    shm_open(name, flags, mode).map_err(|e| os("open", e))?,
                    true,
                )
            }
            Err(e) => return Err(os("open", e)),
        };
        let created = (|| {
            nix::unistd::ftruncate(&fd, len as i64).map_err(|e| os("ftruncate", e))?;
            let mut seg = Self::map(name, fd, len, true)?;
            seg.slot_count = slot_count;
            seg.slot_bytes = slot_bytes;
            seg.data_offset = data_offset;
            seg.init_header(slot_count, slot_bytes, data_offset);
            Ok(seg)
        })();
        if created.is_err() {
            let _ = shm_unlink(name);
        }
        created.map(|s| (s, reclaimed))
    }

    /// Opens a segment created by control and validates its header.
    pub fn open(name: &str) -> Result<Segment, ShmError> {
        check_name(name)?;
        let fd = shm_open(name, OFlag::O_RDWR, Mode::empty()).map_err(|source| ShmError::Os {
            op: "open",
            name: name.to_string(),
            source,
        })?;
        let len = nix::sys::stat::fstat(&fd)
            .map_err(|source| ShmError::Os {
                op: "fstat",
                name: name.to_string(),
                source,
            })?
            .st_size as u64;
        if len < HEADER_BYTES {
            return Err(ShmError::TooSmall {
                name: name.to_string(),
                len,
                needed: HEADER_BYTES,
            });
        }
        let mut seg = Self::map(name, fd, len, false)?;
        let version = seg.read_u32(H_VERSION);
        if seg.bytes(H_MAGIC, 8) != MAGIC || version != LAYOUT_VERSION {
            return Err(ShmError::BadHeader {
                name: name.to_string(),
                version,
            });
        }
        seg.slot_count = seg.read_u32(H_SLOT_COUNT);
        seg.slot_bytes = seg.read_u64(H_SLOT_BYTES);
        seg.data_offset = seg.read_u64(H_DATA_OFFSET);
        let needed = seg
            .data_offset
            .saturating_add(seg.slot_bytes.saturating_mul(seg.slot_count as u64));
        if needed > len {
            return Err(ShmError::TooSmall {
                name: name.to_string(),
                len,
                needed,
            });
        }
        Ok(seg)
    }

    /// Removes the name of a segment (e.g. one left behind by a crash). Missing is fine.
    pub fn unlink(name: &str) -> Result<(), ShmError> {
        check_name(name)?;
        match shm_unlink(name) {
            Ok(()) | Err(nix::Error::ENOENT) => Ok(()),
            Err(source) => Err(ShmError::Os {
                op: "unlink",
                name: name.to_string(),
                source,
            }),
        }
    }

    fn map(name: &str, fd: OwnedFd, len: u64, owner: bool) -> Result<Segment, ShmError> {
        let map = MmapOptions::new()
            .len(len as usize)
            .map_raw(&fd)
            .map_err(|source| ShmError::Map {
                name: name.to_string(),
                source,
            })?;
        Ok(Segment {
            name: name.to_string(),
            map,
            slot_count: 0,
            slot_bytes: 0,
            data_offset: 0,
            owner,
        })
    }

    fn init_header(&self, slot_count: u32, slot_bytes: u64, data_offset: u64) {
        self.write_bytes(H_MAGIC, &MAGIC);
        self.write_bytes(H_VERSION, &LAYOUT_VERSION.to_le_bytes());
        self.write_bytes(H_SLOT_COUNT, &slot_count.to_le_bytes());
        self.write_bytes(H_SLOT_BYTES, &slot_bytes.to_le_bytes());
        self.write_bytes(H_TABLE_OFFSET, &HEADER_BYTES.to_le_bytes());
        self.write_bytes(H_DATA_OFFSET, &data_offset.to_le_bytes());
        self.write_bytes(H_OWNER_PID, &std::process::id().to_le_bytes());
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.write_bytes(H_CREATED_MS, &now_ms.to_le_bytes());
        for slot in 0..slot_count {
            let meta = self.meta_offset(slot);
            self.atomic_u32(meta + S_STATE)
                .store(STATE_FREE, Ordering::Relaxed);
            self.atomic_u64(meta + S_SEQ).store(0, Ordering::Relaxed);
            let payload = data_offset + slot as u64 * slot_bytes;
            self.write_bytes(meta + S_PAYLOAD_OFF, &payload.to_le_bytes());
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn slot_count(&self) -> u32 {
        self.slot_count
    }

    pub fn slot_bytes(&self) -> u64 {
        self.slot_bytes
    }

    pub fn owner_pid(&self) -> u32 {
        self.read_u32(H_OWNER_PID)
    }

    /// Writes a tensor into `slot` and publishes it; returns the reference to hand over.
    pub fn write(
        &self,
        slot: u32,
        dtype: DType,
        shape: &[u64],
        payload: &[u8],
    ) -> Result<TensorRef, ShmError> {
        self.check_slot(slot)?;
        if shape.len() > MAX_DIMS {
            return Err(ShmError::TooManyDims { ndim: shape.len() });
        }
        let expected = shape
            .iter()
            .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
            .unwrap_or(u64::MAX);
        if expected != payload.len() as u64 {
            return Err(ShmError::ShapeMismatch {
                shape: shape.to_vec(),
                dtype,
                expected,
                actual: payload.len() as u64,
            });
        }
        if expected > self.slot_bytes {
            return Err(ShmError::TooLarge {
                bytes: expected,
                capacity: self.slot_bytes,
            });
        }
        let meta = self.meta_offset(slot);
        let state = self.atomic_u32(meta + S_STATE);
        state.store(STATE_WRITING, Ordering::Release);
        let payload_off = self.data_offset + slot as u64 * self.slot_bytes;
        self.write_bytes(payload_off as usize, payload);
        self.write_bytes(meta + S_DTYPE, &(dtype as u32).to_le_bytes());
        self.write_bytes(meta + S_NDIM, &(shape.len() as u32).to_le_bytes());
        for (i, d) in shape.iter().enumerate() {
            self.write_bytes(meta + S_SHAPE + 8 * i, &d.to_le_bytes());
        }
        self.write_bytes(meta + S_PAYLOAD_OFF, &payload_off.to_le_bytes());
        self.write_bytes(meta + S_PAYLOAD_LEN, &expected.to_le_bytes());
        let seq = self.atomic_u64(meta + S_SEQ).fetch_add(1, Ordering::AcqRel) + 1;
        state.store(STATE_READY, Ordering::Release);
        Ok(TensorRef { slot, seq })
    }

    /// Convenience: writes an f32 tensor.
    pub fn write_f32(
        &self,
        slot: u32,
        shape: &[u64],
        values: &[f32],
    ) -> Result<TensorRef, ShmError> {
        self.write(slot, DType::F32, shape, bytemuck::cast_slice(values))
    }

    /// Reads the tensor `r` names; refuses a slot that was rewritten or is not ready.
    pub fn read(&self, r: TensorRef) -> Result<Tensor, ShmError> {
        self.check_slot(r.slot)?;
        let meta = self.meta_offset(r.slot);
        let state = self.atomic_u32(meta + S_STATE).load(Ordering::Acquire);
        let current = self.atomic_u64(meta + S_SEQ).load(Ordering::Acquire);
        if state != STATE_READY || current != r.seq {
            return Err(ShmError::Stale {
                slot: r.slot,
                seq: r.seq,
                state,
                current,
            });
        }
        let code = self.read_u32(meta + S_DTYPE);
        let dtype = DType::from_code(code).ok_or(ShmError::UnknownDType { slot: r.slot, code })?;
        let ndim = (self.read_u32(meta + S_NDIM) as usize).min(MAX_DIMS);
        let shape: Vec<u64> = (0..ndim)
            .map(|i| self.read_u64(meta + S_SHAPE + 8 * i))
            .collect();
        let len = self.read_u64(meta + S_PAYLOAD_LEN).min(self.slot_bytes);
        let off = self.data_offset + r.slot as u64 * self.slot_bytes;
        let bytes = self.bytes(off as usize, len as usize).to_vec();
        // A writer that raced us would have bumped seq; re-check so torn reads are refused.
        let after = self.atomic_u64(meta + S_SEQ).load(Ordering::Acquire);
        if after != r.seq {
            return Err(ShmError::Stale {
                slot: r.slot,
                seq: r.seq,
                state,
                current: after,
            });
        }
        let expected = shape.iter().product::<u64>() * dtype.size();
        if expected != len {
            return Err(ShmError::ShapeMismatch {
                shape,
                dtype,
                expected,
                actual: len,
            });
        }
        Ok(Tensor {
            dtype,
            shape,
            bytes,
        })
    }

    /// Marks a slot free again (its data is no longer referenced).
    pub fn release(&self, slot: u32) -> Result<(), ShmError> {
        self.check_slot(slot)?;
        let meta = self.meta_offset(slot);
        self.atomic_u32(meta + S_STATE)
            .store(STATE_FREE, Ordering::Release);
        Ok(())
    }

    fn check_slot(&self, slot: u32) -> Result<(), ShmError> {
        if slot >= self.slot_count {
            return Err(ShmError::SlotOutOfRange {
                slot,
                count: self.slot_count,
            });
        }
        Ok(())
    }

    fn meta_offset(&self, slot: u32) -> usize {
        (HEADER_BYTES + SLOT_META_BYTES * slot as u64) as usize
    }

    fn ptr(&self, offset: usize, len: usize) -> *mut u8 {
        assert!(offset + len <= self.map.len(), "shm access out of bounds");
        // SAFETY: bounds checked above; the mapping lives as long as self.
        unsafe { self.map.as_mut_ptr().add(offset) }
    }

    fn bytes(&self, offset: usize, len: usize) -> &[u8] {
        // SAFETY: in bounds (checked in ptr); see the Send/Sync note for concurrent access.
        unsafe { std::slice::from_raw_parts(self.ptr(offset, len), len) }
    }

    fn write_bytes(&self, offset: usize, data: &[u8]) {
        // SAFETY: in bounds; only the slot's assigned writer writes these bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr(offset, data.len()), data.len())
        }
    }

    fn read_u32(&self, offset: usize) -> u32 {
        let b = self.bytes(offset, 4);
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    fn read_u64(&self, offset: usize) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.bytes(offset, 8));
        u64::from_le_bytes(a)
    }

    fn atomic_u32(&self, offset: usize) -> &AtomicU32 {
        debug_assert_eq!(offset % 4, 0);
        // SAFETY: aligned (layout offsets are multiples of 4 from a page-aligned base), in bounds.
        unsafe { &*(self.ptr(offset, 4) as *const AtomicU32) }
    }

    fn atomic_u64(&self, offset: usize) -> &AtomicU64 {
        debug_assert_eq!(offset % 8, 0);
        // SAFETY: aligned (multiples of 8 from a page-aligned base), in bounds.
        unsafe { &*(self.ptr(offset, 8) as *const AtomicU64) }
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        if self.owner {
            let _ = shm_unlink(self.name.as_str());
        }
    }
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("name", &self.name)
            .field("slot_count", &self.slot_count)
            .field("slot_bytes", &self.slot_bytes)
            .field("owner", &self.owner)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unique(tag: &str) -> String {
        format!("/nstest-{}-{}-{}", tag, std::process::id(), rand_suffix())
    }

    fn rand_suffix() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    }

    #[test]
    fn write_then_read_round_trips_and_stale_refs_are_refused() {
        let name = unique("rt");
        let (seg, reclaimed) = Segment::create(&name, 4, 1 << 16).unwrap();
        assert!(!reclaimed);
        let other = Segment::open(&name).unwrap();
        assert_eq!(other.slot_count(), 4);
        let values: Vec<f32> = (0..30).map(|i| i as f32 * 0.5 - 3.0).collect();
        let r = seg.write_f32(2, &[5, 6], &values).unwrap();
        let t = other.read(r).unwrap();
        assert_eq!(t.shape, vec![5, 6]);
        assert_eq!(t.to_f32().unwrap(), values);
        let r2 = seg.write_f32(2, &[1], &[1.0]).unwrap();
        assert!(matches!(other.read(r), Err(ShmError::Stale { .. })));
        assert_eq!(other.read(r2).unwrap().to_f32().unwrap(), vec![1.0]);
        seg.release(2).unwrap();
        assert!(other.read(r2).is_err());
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let name = unique("bad");
        let (seg, _) = Segment::create(&name, 1, 4096).unwrap();
        assert!(matches!(
            seg.write_f32(5, &[1], &[1.0]),
            Err(ShmError::SlotOutOfRange { .. })
        ));
        assert!(matches!(
            seg.write_f32(0, &[3], &[1.0]),
            Err(ShmError::ShapeMismatch { .. })
        ));
        let big = vec![0f32; 2048];
        assert!(matches!(
            seg.write_f32(0, &[2048], &big),
            Err(ShmError::TooLarge { .. })
        ));
        assert!(matches!(
            seg.read(TensorRef { slot: 0, seq: 99 }),
            Err(ShmError::Stale { .. })
        ));
        assert!(matches!(
            Segment::open("no-slash"),
            Err(ShmError::BadName(_))
        ));
    }

    #[test]
    fn create_reclaims_a_leftover_segment_and_drop_unlinks() {
        let name = unique("reclaim");
        let (first, _) = Segment::create(&name, 1, 4096).unwrap();
        std::mem::forget(first); // as if the owner crashed
        let (second, reclaimed) = Segment::create(&name, 2, 4096).unwrap();
        assert!(reclaimed);
        assert_eq!(Segment::open(&name).unwrap().slot_count(), 2);
        drop(second);
        assert!(Segment::open(&name).is_err());
    }

    #[test]
    fn segment_name_is_stable_and_valid() {
        let dir = tempfile::tempdir().unwrap();
        let a = segment_name_for(dir.path());
        assert_eq!(a, segment_name_for(dir.path()));
        check_name(&a).unwrap();
    }
}
