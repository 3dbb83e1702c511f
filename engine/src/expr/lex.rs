//! The tokens of the filter language and the lexer that finds them, each with its byte
//! offset in the expression so errors can point at it.

use super::ExprError;

/// One token.
#[derive(Clone, Debug, PartialEq)]
pub enum Tok {
    Ident(String),
    Str(String),
    Num(f64),
    /// `==`, `!=`, `<`, `<=`, `>`, `>=`, `&&`, `||`, `!`, `(`, `)`, `[`, `]`, `,`, `.`
    Op(&'static str),
    End,
}

/// A token and where it starts.
#[derive(Clone, Debug, PartialEq)]
pub struct Token {
    pub tok: Tok,
    pub at: usize,
}

const OPS: &[&str] = &[
    "==", "!=", "<=", ">=", "&&", "||", "<", ">", "!", "(", ")", "[", "]", ",", ".",
];

/// Splits an expression into tokens, ending with [`Tok::End`].
pub fn lex(src: &str) -> Result<Vec<Token>, ExprError> {
    let bytes = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        if c.is_ascii_alphabetic() || c == b'_' {
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            out.push(Token {
                tok: Tok::Ident(src[start..i].to_string()),
                at: start,
            });
        } else if c.is_ascii_digit() {
            while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'.') {
                i += 1;
            }
            let text = &src[start..i];
            let n = text
                .parse::<f64>()
                .map_err(|_| ExprError::new(start, format!("\"{text}\" is not a number")))?;
            out.push(Token {
                tok: Tok::Num(n),
                at: start,
            });
        } else if c == b'"' || c == b'\'' {
            let (s, next) = string(src, start)?;
            out.push(Token {
                tok: Tok::Str(s),
                at: start,
            });
            i = next;
        } else if let Some(op) = OPS.iter().find(|op| src[i..].starts_with(**op)) {
            out.push(Token {
                tok: Tok::Op(op),
                at: start,
            });
            i += op.len();
        } else {
            let ch = src[i..].chars().next().unwrap_or('?');
            let hint = match ch {
                '=' => " (write == to compare)",
                '&' => " (write && for and)",
                '|' => " (write || for or)",
                _ => "",
            };
            return Err(ExprError::new(
                i,
                format!("unexpected character '{ch}'{hint}"),
            ));
        }
    }
    out.push(Token {
        tok: Tok::End,
        at: src.len(),
    });
    Ok(out)
}

/// A quoted string starting at `start`; returns its value and the offset after it.
fn string(src: &str, start: usize) -> Result<(String, usize), ExprError> {
    let quote = src.as_bytes()[start] as char;
    let mut value = String::new();
    let mut chars = src[start + 1..].char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            c if c == quote => return Ok((value, start + 1 + i + 1)),
            '\\' => match chars.next() {
                Some((_, 'n')) => value.push('\n'),
                Some((_, 't')) => value.push('\t'),
                Some((_, c @ ('\\' | '"' | '\'' | '.' | '/'))) => {
                    // `\.` and `\/` are kept escaped: they are meant for regexes.
                    if matches!(c, '.' | '/') {
                        value.push('\\');
                    }
                    value.push(c)
                }
                Some((j, other)) => {
                    if other == 'd' || other == 'w' || other == 's' {
                        value.push('\\');
                        value.push(other);
                    } else {
                        return Err(ExprError::new(
                            start + 1 + j - 1,
                            format!("unknown escape \\{other}"),
                        ));
                    }
                }
                None => break,
            },
            c => value.push(c),
        }
    }
    Err(ExprError::new(start, "unterminated string"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(src: &str) -> Vec<Tok> {
        lex(src).unwrap().into_iter().map(|t| t.tok).collect()
    }

    #[test]
    fn tokens_and_offsets() {
        assert_eq!(
            toks(r#"status >= 400 && path == "/a\"b""#),
            vec![
                Tok::Ident("status".into()),
                Tok::Op(">="),
                Tok::Num(400.0),
                Tok::Op("&&"),
                Tok::Ident("path".into()),
                Tok::Op("=="),
                Tok::Str("/a\"b".into()),
                Tok::End
            ]
        );
        assert_eq!(toks("'x'"), vec![Tok::Str("x".into()), Tok::End]);
        assert_eq!(
            toks(r"'\d+\.php'"),
            vec![Tok::Str(r"\d+\.php".into()), Tok::End]
        );
        let t = lex("a  ||b").unwrap();
        assert_eq!((t[1].at, t[2].at), (3, 5));
    }

    #[test]
    fn lexical_errors() {
        let e = lex("path = '/x'").unwrap_err();
        assert_eq!(e.offset, 5);
        assert!(e.message.contains("write =="), "{}", e.message);
        assert_eq!(lex("'abc").unwrap_err().message, "unterminated string");
        assert!(lex("1.2.3").is_err());
        assert!(lex("a & b").unwrap_err().message.contains("&&"));
    }
}
