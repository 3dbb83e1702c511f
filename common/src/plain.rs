//! serde's messages in the words of the formats people write (JSON, TOML), not of the
//! Rust types they are read into: `expected f64` is "expected a number", `expected
//! struct ManualMitigationRequest` is "expected an object".

/// `message` with Rust type names replaced by what a user would write.
pub fn plain_serde(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find("expected ") {
        let (before, after) = rest.split_at(at + "expected ".len());
        out.push_str(before);
        let (said, used) = plain_expectation(after);
        out.push_str(said);
        rest = &after[used..];
    }
    out.push_str(rest);
    out
}

/// What follows "expected ", reworded, and how many bytes of it were replaced.
fn plain_expectation(after: &str) -> (&str, usize) {
    let word_len = after
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(after.len());
    let word = &after[..word_len];
    let said = match word {
        "f32" | "f64" => "a number",
        "u8" => "a whole number from 0 to 255",
        "u16" => "a whole number from 0 to 65535",
        "u32" => "a whole number from 0 to 4294967295",
        "u64" | "u128" | "usize" => "a whole number of 0 or more",
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "a whole number",
        "struct" => {
            // `struct Name`, or `struct Name with 3 elements` when an array was given.
            let named = after[word_len..].trim_start_matches(' ');
            let name_len = named
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(named.len());
            let mut used = after.len() - named.len() + name_len;
            if let Some(t) = after[used..].strip_prefix(" with ") {
                let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
                if let Some(unit) = [" elements", " element"]
                    .into_iter()
                    .find(|u| t[digits..].starts_with(u))
                {
                    used += " with ".len() + digits + unit.len();
                }
            }
            return ("an object", used);
        }
        _ => return ("", 0),
    };
    (said, word_len)
}

#[cfg(test)]
mod tests {
    use super::plain_serde;

    #[test]
    fn rust_types_read_as_what_people_write() {
        for (serde, plain) in [
            (
                "invalid type: string \"ten\", expected f64",
                "invalid type: string \"ten\", expected a number",
            ),
            (
                "invalid value: integer `99999`, expected u16",
                "invalid value: integer `99999`, expected a whole number from 0 to 65535",
            ),
            (
                "invalid type: integer `42`, expected struct ManualMitigationRequest at line 1 column 2",
                "invalid type: integer `42`, expected an object at line 1 column 2",
            ),
            (
                "invalid length 0, expected struct Body with 5 elements",
                "invalid length 0, expected an object",
            ),
            (
                "invalid length 0, expected struct Body with 1 element at line 1",
                "invalid length 0, expected an object at line 1",
            ),
            (
                "missing field `entity`; expected a string",
                "missing field `entity`; expected a string",
            ),
            ("expected usize", "expected a whole number of 0 or more"),
            ("nothing to change", "nothing to change"),
        ] {
            assert_eq!(plain_serde(serde), plain, "{serde}");
        }
    }
}
