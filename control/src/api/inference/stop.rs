//! Stop sequences, matched on the decoded text across token boundaries.

/// Releases generated text, holding back what might be the start of a stop sequence, and
/// ends it before the first stop sequence, also one spread over several tokens.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    text: String,
    released: usize,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> StopMatcher {
        StopMatcher {
            stops,
            ..Default::default()
        }
    }

    /// Adds a piece; returns the text now safe to release and whether a stop was reached.
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        self.text.push_str(piece);
        let first_stop = self
            .stops
            .iter()
            .filter_map(|s| self.text.find(s.as_str()))
            .min();
        if let Some(at) = first_stop {
            self.text.truncate(at);
            let out = self.text[self.released.min(at)..].to_string();
            self.released = self.text.len();
            return (out, true);
        }
        // Hold back the longest tail that is a proper prefix of a stop sequence.
        let mut hold = 0;
        for s in &self.stops {
            for len in (1..s.len()).rev() {
                if len > hold && s.is_char_boundary(len) && self.text.ends_with(&s[..len]) {
                    hold = len;
                    break;
                }
            }
        }
        let end = self.text.len() - hold;
        let out = self.text[self.released.min(end)..end].to_string();
        self.released = self.released.max(end);
        (out, false)
    }

    /// Everything not yet released (generation ended without a stop).
    pub fn finish(&mut self) -> String {
        let out = self.text[self.released..].to_string();
        self.released = self.text.len();
        out
    }

    pub fn text(&self) -> &str {
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (r, stop) = m.push(p);
            out.push_str(&r);
            if stop {
                return (out, m.text().to_string(), true);
            }
        }
        out.push_str(&m.finish());
        (out, m.text().to_string(), false)
    }

    #[test]
    fn stops_across_token_boundaries_and_holds_back_prefixes() {
        let (out, text, stopped) = run(&["\n\n"], &["Hello", " world", "\n", "\nmore"]);
        assert_eq!(
            (out.as_str(), text.as_str(), stopped),
            ("Hello world", "Hello world", true)
        );
        let (out, _, stopped) = run(&["END"], &["a", "E", "N", "x", "b"]);
        assert_eq!((out.as_str(), stopped), ("aENxb", false));
        let (out, _, stopped) = run(&["END", "b"], &["aE", "Nb"]);
        assert_eq!((out.as_str(), stopped), ("aEN", true));
        let (out, _, stopped) = run(&[], &["x", "y"]);
        assert_eq!((out.as_str(), stopped), ("xy", false));
        // Stops with multi-byte characters are held back and matched on character boundaries.
        let (out, _, stopped) = run(&["üx"], &["aü", "b"]);
        assert_eq!((out.as_str(), stopped), ("aüb", false));
        let (out, _, stopped) = run(&["\u{202e}ü"], &["a\u{202e}", "ü"]);
        assert_eq!((out.as_str(), stopped), ("a", true));
        // The first stop in the text wins, even when a later-listed one.
        let (out, _, _) = run(&["zz", "y"], &["xyzz"]);
        assert_eq!(out, "x");
    }
}
