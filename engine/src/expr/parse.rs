//! The parser: tokens to a syntax tree, with CEL's precedence
//! (`||` < `&&` < `!` < comparisons and `in` < member calls and indexing).

use super::ExprError;
use super::lex::{Tok, Token, lex};

/// A node of the syntax tree and the offset it starts at.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub ast: Ast,
    pub at: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Ast {
    Ident(String),
    Str(String),
    Num(f64),
    Bool(bool),
    List(Vec<Node>),
    /// `headers["x"]`
    Index(Box<Node>, Box<Node>),
    /// `f(args)` or `recv.f(args)`
    Call {
        recv: Option<Box<Node>>,
        name: String,
        args: Vec<Node>,
    },
    /// A comparison or `in`: `==`, `!=`, `<`, `<=`, `>`, `>=`, `in`.
    Cmp(&'static str, Box<Node>, Box<Node>),
    Not(Box<Node>),
    And(Vec<Node>),
    Or(Vec<Node>),
}

/// Parses a whole expression.
pub fn parse(src: &str) -> Result<Node, ExprError> {
    let tokens = lex(src)?;
    let mut p = Parser {
        tokens,
        pos: 0,
        depth: 0,
    };
    let node = p.or()?;
    let t = p.peek();
    if t.tok != Tok::End {
        return Err(ExprError::new(
            t.at,
            format!(
                "unexpected {} after the end of the expression",
                describe(&t.tok)
            ),
        ));
    }
    Ok(node)
}

fn describe(t: &Tok) -> String {
    match t {
        Tok::Ident(s) => format!("`{s}`"),
        Tok::Str(s) => format!("string \"{s}\""),
        Tok::Num(n) => format!("number {n}"),
        Tok::Op(op) => format!("`{op}`"),
        Tok::End => "end of expression".to_string(),
    }
}

/// Nesting limit, so a hostile expression cannot exhaust the stack.
const MAX_DEPTH: usize = 64;

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> Token {
        self.tokens
            .get(self.pos)
            .or(self.tokens.last())
            .cloned()
            .unwrap_or(Token {
                tok: Tok::End,
                at: 0,
            })
    }

    fn bump(&mut self) -> Token {
        let t = self.peek();
        if self.pos < self.tokens.len() {
            self.pos += 1;
        }
        t
    }

    fn eat(&mut self, op: &str) -> bool {
        if self.peek().tok == Tok::Op(op_static(op)) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, op: &'static str) -> Result<(), ExprError> {
        let t = self.peek();
        if t.tok == Tok::Op(op) {
            self.pos += 1;
            Ok(())
        } else {
            Err(ExprError::new(
                t.at,
                format!("expected `{op}`, found {}", describe(&t.tok)),
            ))
        }
    }

    /// One level deeper (the caller restores `depth`), refused past [`MAX_DEPTH`].
    fn enter(&mut self, at: usize) -> Result<(), ExprError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(ExprError::new(at, "expression nested too deeply"));
        }
        Ok(())
    }

    fn or(&mut self) -> Result<Node, ExprError> {
        let base = self.depth;
        let out = self.enter(self.peek().at).and_then(|()| self.or_inner());
        self.depth = base;
        out
    }

    fn or_inner(&mut self) -> Result<Node, ExprError> {
        let first = self.and()?;
        if self.peek().tok != Tok::Op("||") {
            return Ok(first);
        }
        let at = first.at;
        let mut items = vec![first];
        while self.eat("||") {
            items.push(self.and()?);
        }
        Ok(Node {
            ast: Ast::Or(items),
            at,
        })
    }

    fn and(&mut self) -> Result<Node, ExprError> {
        let first = self.unary()?;
        if self.peek().tok != Tok::Op("&&") {
            return Ok(first);
        }
        let at = first.at;
        let mut items = vec![first];
        while self.eat("&&") {
            items.push(self.unary()?);
        }
        Ok(Node {
            ast: Ast::And(items),
            at,
        })
    }

    fn unary(&mut self) -> Result<Node, ExprError> {
        let t = self.peek();
        if t.tok == Tok::Op("!") {
            self.pos += 1;
            let base = self.depth;
            let inner = self.enter(t.at).and_then(|()| self.unary());
            self.depth = base;
            let inner = inner?;
            return Ok(Node {
                ast: Ast::Not(Box::new(inner)),
                at: t.at,
            });
        }
        self.comparison()
    }

    fn comparison(&mut self) -> Result<Node, ExprError> {
        let left = self.postfix()?;
        let t = self.peek();
        let op = match &t.tok {
            Tok::Op(op @ ("==" | "!=" | "<" | "<=" | ">" | ">=")) => *op,
            Tok::Ident(s) if s == "in" => "in",
            _ => return Ok(left),
        };
        self.pos += 1;
        let right = self.postfix()?;
        let at = left.at;
        let next = self.peek();
        if matches!(&next.tok, Tok::Op("==" | "!=" | "<" | "<=" | ">" | ">="))
            || matches!(&next.tok, Tok::Ident(s) if s == "in")
        {
            return Err(ExprError::new(
                next.at,
                "comparisons cannot be chained; join them with && or ||",
            ));
        }
        Ok(Node {
            ast: Ast::Cmp(op, Box::new(left), Box::new(right)),
            at,
        })
    }

    /// Each `.f()` or `[i]` nests the tree one level deeper, as a parenthesis does.
    fn postfix(&mut self) -> Result<Node, ExprError> {
        let base = self.depth;
        let out = self.postfix_inner();
        self.depth = base;
        out
    }

    fn postfix_inner(&mut self) -> Result<Node, ExprError> {
        let mut node = self.primary()?;
        loop {
            let t = self.peek();
            if t.tok == Tok::Op(".") || t.tok == Tok::Op("[") {
                self.enter(t.at)?;
            }
            if t.tok == Tok::Op(".") {
                self.pos += 1;
                let name_tok = self.bump();
                let Tok::Ident(name) = name_tok.tok else {
                    return Err(ExprError::new(
                        name_tok.at,
                        format!(
                            "expected a function name after `.`, found {}",
                            describe(&name_tok.tok)
                        ),
                    ));
                };
                self.expect("(")?;
                let args = self.args(")")?;
                node = Node {
                    at: node.at,
                    ast: Ast::Call {
                        recv: Some(Box::new(node)),
                        name,
                        args,
                    },
                };
            } else if t.tok == Tok::Op("[") {
                self.pos += 1;
                let index = self.or()?;
                self.expect("]")?;
                node = Node {
                    at: node.at,
                    ast: Ast::Index(Box::new(node), Box::new(index)),
                };
            } else {
                return Ok(node);
            }
        }
    }

    /// Comma-separated expressions up to `close` (consumed); a trailing comma is allowed.
    fn args(&mut self, close: &'static str) -> Result<Vec<Node>, ExprError> {
        let mut args = Vec::new();
        if self.eat(close) {
            return Ok(args);
        }
        loop {
            args.push(self.or()?);
            if self.eat(close) {
                return Ok(args);
            }
            self.expect(",")?;
            if self.eat(close) {
                return Ok(args);
            }
        }
    }

    fn primary(&mut self) -> Result<Node, ExprError> {
        let t = self.bump();
        let at = t.at;
        let ast = match t.tok {
            Tok::Str(s) => Ast::Str(s),
            Tok::Num(n) => Ast::Num(n),
            Tok::Ident(s) if s == "true" => Ast::Bool(true),
            Tok::Ident(s) if s == "false" => Ast::Bool(false),
            Tok::Ident(s) if s == "in" => {
                return Err(ExprError::new(at, "`in` needs a value on its left"));
            }
            Tok::Ident(name) => {
                if self.eat("(") {
                    let args = self.args(")")?;
                    Ast::Call {
                        recv: None,
                        name,
                        args,
                    }
                } else {
                    Ast::Ident(name)
                }
            }
            Tok::Op("(") => {
                let inner = self.or()?;
                self.expect(")")?;
                return Ok(inner);
            }
            Tok::Op("[") => Ast::List(self.args("]")?),
            other => {
                return Err(ExprError::new(
                    at,
                    format!("expected a value, found {}", describe(&other)),
                ));
            }
        };
        Ok(Node { ast, at })
    }
}

fn op_static(op: &str) -> &'static str {
    match op {
        "||" => "||",
        "&&" => "&&",
        "(" => "(",
        ")" => ")",
        "[" => "[",
        "]" => "]",
        "," => ",",
        _ => ".",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence() {
        let n = parse("a == 1 || b == 2 && !c").unwrap();
        let Ast::Or(items) = n.ast else { panic!() };
        assert_eq!(items.len(), 2);
        assert!(matches!(&items[1].ast, Ast::And(v) if v.len() == 2));
        let n = parse("headers[\"x\"].startsWith('a')").unwrap();
        assert!(matches!(n.ast, Ast::Call { ref name, .. } if name == "startsWith"));
        let n = parse("x in [1, 2,]").unwrap();
        assert!(
            matches!(n.ast, Ast::Cmp("in", _, ref r) if matches!(r.ast, Ast::List(ref l) if l.len() == 2))
        );
    }

    #[test]
    fn errors_point_at_the_problem() {
        let e = parse("path == ").unwrap_err();
        assert_eq!(
            (e.offset, e.message.as_str()),
            (8, "expected a value, found end of expression")
        );
        let e = parse("(a == 1").unwrap_err();
        assert_eq!(e.offset, 7);
        assert!(e.message.contains("expected `)`"));
        let e = parse("a == 1 b").unwrap_err();
        assert_eq!(e.offset, 7);
        let e = parse("1 < a < 3").unwrap_err();
        assert!(e.message.contains("cannot be chained"));
        let deep = format!("{}a{}", "(".repeat(100), ")".repeat(100));
        assert!(parse(&deep).unwrap_err().message.contains("too deeply"));
        // Postfix chains nest as deep without a parenthesis; a long one must be refused
        // before the tree is deep enough to overflow the stack of whatever walks it.
        for deep in [
            format!("path{} == \"x\"", "[0]".repeat(300_000)),
            format!("path{} == \"x\"", ".lower()".repeat(300_000)),
            format!("{}path{}", "!".repeat(40), "[0]".repeat(40)),
        ] {
            assert!(parse(&deep).unwrap_err().message.contains("too deeply"));
        }
        // Flat chains are not nesting.
        let wide = vec!["path == \"x\""; 1000].join(" || ");
        assert!(parse(&wide).is_ok());
        assert!(parse(&format!("path{}.lower() == \"x\"", "[0]".repeat(40))).is_ok());
    }
}
