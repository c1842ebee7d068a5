//! GPT-2's reversible byte-to-unicode mapping, which the Hugging Face `ByteLevel` pre-tokenizer
//! and decoder use to write every byte as a printable character in `tokenizer.json`.

use std::collections::HashMap;
use std::sync::LazyLock;

/// `BYTE_TO_CHAR[b]` is the character that stands for byte `b`.
static BYTE_TO_CHAR: LazyLock<[char; 256]> = LazyLock::new(|| {
    let printable = |b: u32| {
        (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
    };
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..256u32 {
        let code = if printable(b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        table[b as usize] = char::from_u32(code).expect("codes below 0x200 are characters");
    }
    table
});

static CHAR_TO_BYTE: LazyLock<HashMap<char, u8>> = LazyLock::new(|| {
    BYTE_TO_CHAR
        .iter()
        .enumerate()
        .map(|(b, &c)| (c, b as u8))
        .collect()
});

/// Writes bytes as their byte-level string.
pub(crate) fn bytes_to_string(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| BYTE_TO_CHAR[b as usize]).collect()
}

/// Reads a byte-level string back into bytes; `None` if a character is outside the mapping.
pub(crate) fn string_to_bytes(s: &str) -> Option<Vec<u8>> {
    s.chars().map(|c| CHAR_TO_BYTE.get(&c).copied()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_is_gpt2() {
        assert_eq!(bytes_to_string(b" "), "\u{120}"); // 'Ġ'
        assert_eq!(bytes_to_string(b"\n"), "\u{10a}"); // 'Ċ'
        assert_eq!(bytes_to_string(b"A~!"), "A~!");
        assert_eq!(bytes_to_string(&[0x00]), "\u{100}");
        assert_eq!(bytes_to_string(&[0xad]), "\u{143}");
        assert_eq!(bytes_to_string(&[0xff]), "\u{ff}");
    }

    #[test]
    fn mapping_is_a_bijection() {
        let all: Vec<u8> = (0..=255).collect();
        let s = bytes_to_string(&all);
        assert_eq!(s.chars().count(), 256);
        assert!(!s.contains(' '));
        assert_eq!(string_to_bytes(&s).unwrap(), all);
        assert_eq!(string_to_bytes("a b"), None);
    }
}
