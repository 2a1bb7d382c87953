//! The lexer: logos does the scanning; this wrapper decides which line breaks end a
//! statement and enforces the size limits that keep every later stage free of deep
//! recursion.
//!
//! A line break ends a statement unless it is inside `(` `)` or `[` `]`; `;` also ends a
//! statement. Runs of terminators collapse into one, leading terminators are dropped and a
//! terminator is added at the end of the input, so the grammar sees exactly one terminator
//! after every statement.

use einattn_ir::Span;
use logos::Logos;
use std::fmt;

/// The most tokens one statement may have. The parser itself uses an explicit stack, but the
/// AST is a tree that lowering walks (and drops) recursively; this bound keeps that
/// recursion far from the stack limit whatever the input. Real statements have ~40 tokens.
pub const MAX_STATEMENT_TOKENS: usize = 1000;

/// Tokens as logos scans them, before terminators are filtered.
///
/// A line break is `\n`, `\r\n` or a lone `\r` (classic Mac files): with `\r` skipped as
/// a space, a file of `\r` line endings was one line, its first comment ran to the end of
/// the file, and it read as an empty program.
#[derive(Logos, Clone, Copy, Debug, PartialEq)]
#[logos(skip r"[ \t\f]+")]
#[logos(skip(r"#[^\r\n]*", allow_greedy = true))]
enum RawToken<'a> {
    #[regex(r"\r\n|\r|\n")]
    Newline,
    #[token(";")]
    Semicolon,
    #[token("kernel")]
    Kernel,
    #[token("size")]
    Size,
    #[token("rank")]
    Rank,
    #[token("split")]
    Split,
    #[token("input")]
    Input,
    #[token("output")]
    Output,
    #[token("param")]
    Param,
    #[token("init")]
    Init,
    #[token("where")]
    Where,
    #[token("and")]
    And,
    #[token("inf")]
    Inf,
    #[regex(r"[A-Za-z_][A-Za-z0-9_]*", |lex| lex.slice())]
    Ident(&'a str),
    #[regex(r"[0-9]+", |lex| lex.slice(), priority = 3)]
    Int(&'a str),
    #[regex(r"[0-9]+\.[0-9]+([eE][+-]?[0-9]+)?", |lex| lex.slice())]
    #[regex(r"[0-9]+[eE][+-]?[0-9]+", |lex| lex.slice())]
    Float(&'a str),
    #[token("(")]
    LParen,
    #[token(")")]
    RParen,
    #[token("[")]
    LBracket,
    #[token("]")]
    RBracket,
    #[token(",")]
    Comma,
    #[token(":")]
    Colon,
    #[token("=")]
    Assign,
    #[token("->")]
    Arrow,
    #[token("+")]
    Plus,
    #[token("-")]
    Minus,
    #[token("*")]
    Star,
    #[token("/")]
    Slash,
    #[token("^")]
    Caret,
    #[token("<")]
    Lt,
    #[token("<=")]
    Le,
    #[token(">")]
    Gt,
    #[token(">=")]
    Ge,
    #[token("==")]
    EqEq,
    #[token("!=")]
    Ne,
}

/// A token as the grammar sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Token<'a> {
    /// End of a statement: a line break outside brackets, `;`, or the end of the input.
    Terminator,
    Kernel,
    Size,
    Rank,
    Split,
    Input,
    Output,
    Param,
    Init,
    Where,
    And,
    Inf,
    Ident(&'a str),
    Int(u64),
    Float(f64),
    LParen,
    RParen,
    LBracket,
    RBracket,
    Comma,
    Colon,
    Assign,
    Arrow,
    Plus,
    Minus,
    Star,
    Slash,
    Caret,
    Lt,
    Le,
    Gt,
    Ge,
    EqEq,
    Ne,
}

impl Token<'_> {
    /// How the token is written, for "unexpected `...`" messages.
    pub fn describe(&self) -> String {
        let fixed = match self {
            Token::Terminator => return "end of statement".to_string(),
            Token::Ident(s) => return format!("`{s}`"),
            Token::Int(v) => return format!("`{v}`"),
            Token::Float(v) => return format!("`{v}`"),
            Token::Kernel => "kernel",
            Token::Size => "size",
            Token::Rank => "rank",
            Token::Split => "split",
            Token::Input => "input",
            Token::Output => "output",
            Token::Param => "param",
            Token::Init => "init",
            Token::Where => "where",
            Token::And => "and",
            Token::Inf => "inf",
            Token::LParen => "(",
            Token::RParen => ")",
            Token::LBracket => "[",
            Token::RBracket => "]",
            Token::Comma => ",",
            Token::Colon => ":",
            Token::Assign => "=",
            Token::Arrow => "->",
            Token::Plus => "+",
            Token::Minus => "-",
            Token::Star => "*",
            Token::Slash => "/",
            Token::Caret => "^",
            Token::Lt => "<",
            Token::Le => "<=",
            Token::Gt => ">",
            Token::Ge => ">=",
            Token::EqEq => "==",
            Token::Ne => "!=",
        };
        format!("`{fixed}`")
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LexErrorKind {
    InvalidCharacter(String),
    IntegerTooLarge,
    InvalidNumber,
    StatementTooLong,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LexError {
    pub kind: LexErrorKind,
    pub span: Span,
}

impl fmt::Display for LexError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            LexErrorKind::InvalidCharacter(text) => write!(f, "unexpected character `{text}`"),
            LexErrorKind::IntegerTooLarge => f.write_str("integer literal too large"),
            LexErrorKind::InvalidNumber => f.write_str("invalid number"),
            LexErrorKind::StatementTooLong => write!(
                f,
                "statement too long (more than {MAX_STATEMENT_TOKENS} tokens)"
            ),
        }
    }
}

pub type Spanned<'a> = Result<(usize, Token<'a>, usize), LexError>;

pub struct Lexer<'a> {
    inner: logos::Lexer<'a, RawToken<'a>>,
    source_len: usize,
    /// Open `(` and `[` not yet closed: line breaks inside them do not end statements.
    depth: usize,
    /// True at the start and right after a terminator, so runs of terminators collapse.
    after_terminator: bool,
    tokens_in_statement: usize,
    finished: bool,
}

impl<'a> Lexer<'a> {
    pub fn new(source: &'a str) -> Self {
        Lexer {
            inner: RawToken::lexer(source),
            source_len: source.len(),
            depth: 0,
            after_terminator: true,
            tokens_in_statement: 0,
            finished: false,
        }
    }

    fn terminator(&mut self, start: usize, end: usize) -> Spanned<'a> {
        self.after_terminator = true;
        self.tokens_in_statement = 0;
        Ok((start, Token::Terminator, end))
    }
}

impl<'a> Iterator for Lexer<'a> {
    type Item = Spanned<'a>;

    fn next(&mut self) -> Option<Spanned<'a>> {
        if self.finished {
            return None;
        }
        loop {
            let Some(raw) = self.inner.next() else {
                self.finished = true;
                if self.after_terminator {
                    return None;
                }
                let end = self.source_len;
                return Some(self.terminator(end, end));
            };
            let range = self.inner.span();
            let span = Span::new(range.start, range.end);
            let raw = match raw {
                Ok(raw) => raw,
                Err(()) => {
                    // Stop at the first bad character: what follows would only cascade.
                    self.finished = true;
                    return Some(Err(LexError {
                        kind: LexErrorKind::InvalidCharacter(self.inner.slice().to_string()),
                        span,
                    }));
                }
            };
            let token = match raw {
                RawToken::Newline if self.depth > 0 => continue,
                RawToken::Newline | RawToken::Semicolon => {
                    if self.after_terminator {
                        continue;
                    }
                    return Some(self.terminator(range.start, range.end));
                }
                RawToken::Kernel => Token::Kernel,
                RawToken::Size => Token::Size,
                RawToken::Rank => Token::Rank,
                RawToken::Split => Token::Split,
                RawToken::Input => Token::Input,
                RawToken::Output => Token::Output,
                RawToken::Param => Token::Param,
                RawToken::Init => Token::Init,
                RawToken::Where => Token::Where,
                RawToken::And => Token::And,
                RawToken::Inf => Token::Inf,
                RawToken::Ident(s) => Token::Ident(s),
                RawToken::Int(s) => match s.parse::<u64>() {
                    Ok(v) => Token::Int(v),
                    Err(_) => {
                        self.finished = true;
                        return Some(Err(LexError {
                            kind: LexErrorKind::IntegerTooLarge,
                            span,
                        }));
                    }
                },
                RawToken::Float(s) => match s.parse::<f64>() {
                    Ok(v) if v.is_finite() => Token::Float(v),
                    _ => {
                        self.finished = true;
                        return Some(Err(LexError {
                            kind: LexErrorKind::InvalidNumber,
                            span,
                        }));
                    }
                },
                RawToken::LParen => {
                    self.depth += 1;
                    Token::LParen
                }
                RawToken::LBracket => {
                    self.depth += 1;
                    Token::LBracket
                }
                RawToken::RParen => {
                    self.depth = self.depth.saturating_sub(1);
                    Token::RParen
                }
                RawToken::RBracket => {
                    self.depth = self.depth.saturating_sub(1);
                    Token::RBracket
                }
                RawToken::Comma => Token::Comma,
                RawToken::Colon => Token::Colon,
                RawToken::Assign => Token::Assign,
                RawToken::Arrow => Token::Arrow,
                RawToken::Plus => Token::Plus,
                RawToken::Minus => Token::Minus,
                RawToken::Star => Token::Star,
                RawToken::Slash => Token::Slash,
                RawToken::Caret => Token::Caret,
                RawToken::Lt => Token::Lt,
                RawToken::Le => Token::Le,
                RawToken::Gt => Token::Gt,
                RawToken::Ge => Token::Ge,
                RawToken::EqEq => Token::EqEq,
                RawToken::Ne => Token::Ne,
            };
            self.after_terminator = false;
            self.tokens_in_statement += 1;
            if self.tokens_in_statement > MAX_STATEMENT_TOKENS {
                self.finished = true;
                return Some(Err(LexError {
                    kind: LexErrorKind::StatementTooLong,
                    span,
                }));
            }
            return Some(Ok((range.start, token, range.end)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(source: &str) -> Vec<Token<'_>> {
        Lexer::new(source)
            .map(|t| t.map(|(_, t, _)| t))
            .collect::<Result<_, _>>()
            .unwrap_or_default()
    }

    #[test]
    fn line_breaks_inside_brackets_do_not_end_statements() {
        let t = tokens("\n\nA[p,\n q] = (1 +\n 2)  # c\n\n;B");
        assert_eq!(t.iter().filter(|t| **t == Token::Terminator).count(), 2);
        assert_eq!(t.last(), Some(&Token::Terminator));
        assert_eq!(t.first(), Some(&Token::Ident("A")));
    }

    #[test]
    fn every_line_ending_ends_a_statement_and_a_comment() {
        for nl in ["\n", "\r\n", "\r"] {
            let source = format!("A = 1 # c{nl}B = 2{nl}{nl}C = 3");
            let t = tokens(&source);
            assert_eq!(
                t.iter().filter(|t| **t == Token::Terminator).count(),
                3,
                "{nl:?}: {t:?}"
            );
            assert!(t.contains(&Token::Ident("C")), "{nl:?}: {t:?}");
        }
    }

    #[test]
    fn numbers() {
        assert_eq!(
            tokens("12 1.5 1e30 2.5e-3"),
            vec![
                Token::Int(12),
                Token::Float(1.5),
                Token::Float(1e30),
                Token::Float(2.5e-3),
                Token::Terminator
            ]
        );
        let err = Lexer::new("99999999999999999999999").next();
        assert!(matches!(
            err,
            Some(Err(LexError {
                kind: LexErrorKind::IntegerTooLarge,
                ..
            }))
        ));
    }
}
