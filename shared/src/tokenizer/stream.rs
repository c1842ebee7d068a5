//! Streaming decode for generation: ids arrive one at a time and the text is emitted as soon as
//! it is complete, never splitting a UTF-8 character across two pieces.

use super::Tokenizer;

/// Decodes ids one at a time. Bytes that can never become valid UTF-8 are emitted as U+FFFD,
/// exactly as [`Tokenizer::decode`] would render them, so the concatenated pieces plus
/// [`DecodeStream::finish`] equal `decode` of all the ids.
#[derive(Debug)]
pub struct DecodeStream<'t> {
    tokenizer: &'t Tokenizer,
    /// Bytes received but not yet emitted: at most an incomplete UTF-8 character.
    pending: Vec<u8>,
}

impl<'t> DecodeStream<'t> {
    pub fn new(tokenizer: &'t Tokenizer) -> DecodeStream<'t> {
        DecodeStream {
            tokenizer,
            pending: Vec::new(),
        }
    }

    /// Continues a stream whose undecoded bytes were kept by [`DecodeStream::into_pending`]
    /// (a caller that cannot hold the borrow between ids, such as a batch of sequences).
    pub fn resume(tokenizer: &'t Tokenizer, pending: Vec<u8>) -> DecodeStream<'t> {
        DecodeStream { tokenizer, pending }
    }

    /// The bytes not yet emitted, to [`DecodeStream::resume`] later.
    pub fn into_pending(self) -> Vec<u8> {
        self.pending
    }

    /// Adds one id; returns the text completed by it (often empty in the middle of a multi-byte
    /// character). Ids outside the vocabulary add nothing.
    pub fn step(&mut self, id: u32) -> String {
        if let Some(bytes) = self.tokenizer.id_to_bytes(id) {
            self.pending.extend_from_slice(bytes);
        }
        let mut out = String::new();
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = start + e.valid_up_to();
                    out.push_str(
                        std::str::from_utf8(&self.pending[start..valid])
                            .expect("checked valid prefix"),
                    );
                    match e.error_len() {
                        // Invalid whatever follows: one replacement character, as lossy decoding does.
                        Some(len) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            start = valid + len;
                        }
                        // An incomplete character at the end: wait for more bytes.
                        None => {
                            start = valid;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
        out
    }

    /// Ends the stream: whatever incomplete character is left, as U+FFFD.
    pub fn finish(self) -> String {
        String::from_utf8_lossy(&self.pending).into_owned()
    }
}
