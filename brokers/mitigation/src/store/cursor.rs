//! Delta-stream cursors: `GENERATION-SEQ`, opaque to clients. The generation is random
//! per store instance and per clear, so a cursor from before a restart or a clear never
//! matches and its holder gets a snapshot.

use std::fmt;

/// A position in one generation of the change log: the last change seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub generation: String,
    pub seq: u64,
}

impl Cursor {
    /// A fresh random generation (16 hex digits).
    pub fn new_generation() -> String {
        let mut g = uuid::Uuid::new_v4().simple().to_string();
        g.truncate(16);
        g
    }

    /// Parses `GENERATION-SEQ`; `None` for anything else.
    pub fn parse(text: &str) -> Option<Cursor> {
        let (generation, seq) = text.split_once('-')?;
        if generation.is_empty()
            || generation.len() > 64
            || !generation.chars().all(|c| c.is_ascii_alphanumeric())
        {
            return None;
        }
        // Digits only: `u64::from_str` would also take a leading `+`.
        if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(Cursor {
            generation: generation.to_string(),
            seq: seq.parse().ok()?,
        })
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.generation, self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_garbage() {
        let c = Cursor {
            generation: Cursor::new_generation(),
            seq: 42,
        };
        assert_eq!(Cursor::parse(&c.to_string()), Some(c));
        for bad in [
            "",
            "abc",
            "-1",
            "abc-",
            "abc-+1",
            "abc--1",
            "a b-1",
            "abc-99999999999999999999999",
        ] {
            assert_eq!(Cursor::parse(bad), None, "{bad}");
        }
        assert_ne!(Cursor::new_generation(), Cursor::new_generation());
    }
}
