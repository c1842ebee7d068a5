//! Values of a few bits packed into bytes, least significant bit first: the sparse DiLoCo
//! codec (`diloco/sparse.rs`) and the pipeline's integer rows (`pipeline/wire.rs`).

/// Packs values of `width` bits, least significant bit first.
pub(crate) struct BitWriter<'a> {
    out: &'a mut Vec<u8>,
    acc: u64,
    n: usize,
}

impl<'a> BitWriter<'a> {
    pub(crate) fn new(out: &'a mut Vec<u8>) -> Self {
        BitWriter { out, acc: 0, n: 0 }
    }

    pub(crate) fn put(&mut self, v: u32, width: usize) {
        self.acc |= u64::from(v) << self.n;
        self.n += width;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }

    /// Writes the last partial byte, if any.
    pub(crate) fn finish(self) {
        if self.n > 0 {
            self.out.push(self.acc as u8);
        }
    }
}

/// Reads values of `width` bits from a byte slice whose length was already checked (past its
/// end it reads zeros).
pub(crate) struct BitReader<'a> {
    bytes: &'a [u8],
    pos: usize,
    acc: u64,
    n: usize,
}

impl<'a> BitReader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        BitReader {
            bytes,
            pos: 0,
            acc: 0,
            n: 0,
        }
    }

    pub(crate) fn get(&mut self, width: usize) -> u32 {
        while self.n < width {
            self.acc |= u64::from(self.bytes.get(self.pos).copied().unwrap_or(0)) << self.n;
            self.pos += 1;
            self.n += 8;
        }
        let v = (self.acc & ((1u64 << width) - 1)) as u32;
        self.acc >>= width;
        self.n -= width;
        v
    }
}
