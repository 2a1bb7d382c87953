//! The einattn language front end: `.ein` text -> AST -> validated Cascade IR.
//!
//! ```
//! let source = "kernel k\nrank i: 4\ninput A[i]: f32\noutput S: f32\nS = A[i]\n";
//! let cascade = einattn_dsl::compile_source("k.ein", source, &[]).unwrap();
//! assert_eq!(cascade.einsums.len(), 1);
//! ```
//!
//! The language is specified in `docs/language.md`. Errors come back as [`Diagnostics`],
//! which render as `file:line:col` with the source line and a caret.

pub mod ast;
pub mod diagnostics;
pub mod lexer;
pub mod lower;

pub use diagnostics::{line_col, Diagnostic, DiagnosticKind, Diagnostics, LineCol, Severity};

use einattn_ir::{Cascade, Span};
use lalrpop_util::ParseError;
use lexer::{LexError, LexErrorKind, Lexer, Token};

lalrpop_util::lalrpop_mod!(
    #[allow(clippy::all, clippy::pedantic, unused_qualifications, dead_code)]
    grammar
);

/// The largest source file read: spans are 32-bit byte offsets, and real programs are a
/// few kilobytes.
pub const MAX_SOURCE_BYTES: u64 = 64 << 20;

/// Reads a source file: at most [`MAX_SOURCE_BYTES`] (so `/dev/zero` is refused, not read
/// until memory runs out), and UTF-8 (the error names the byte offset of the first byte
/// that is not, with its line, column and a caret). Errors come back rendered.
pub fn read_source(path: &std::path::Path) -> Result<String, String> {
    use std::io::Read as _;
    let name = path.display().to_string();
    let file =
        std::fs::File::open(path).map_err(|e| format!("error: cannot read `{name}`: {e}"))?;
    let mut bytes = Vec::new();
    file.take(MAX_SOURCE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("error: cannot read `{name}`: {e}"))?;
    if bytes.len() as u64 > MAX_SOURCE_BYTES {
        return Err(format!(
            "error: `{name}` is larger than {} MiB; einattn reads source files up to that size",
            MAX_SOURCE_BYTES >> 20
        ));
    }
    decode_source(&name, bytes)
}

/// Decodes source bytes as UTF-8, or renders where they stop being UTF-8.
pub fn decode_source(file_name: &str, bytes: Vec<u8>) -> Result<String, String> {
    let error = match String::from_utf8(bytes) {
        Ok(text) => return Ok(text),
        Err(e) => e,
    };
    let offset = error.utf8_error().valid_up_to();
    let bytes = error.into_bytes();
    let byte = bytes.get(offset).copied().unwrap_or(0);
    // The lossy text equals the source up to `offset`, where U+FFFD (3 bytes) stands for
    // the bad byte: the caret lands on it.
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let d = Diagnostic::error(
        einattn_ir::validate::DiagnosticKind::Syntax,
        format!("the file is not UTF-8 text: byte offset {offset} (0x{byte:02X}) does not start a valid character"),
        Span::new(offset, offset + '\u{FFFD}'.len_utf8()),
    )
    .with_label("not UTF-8")
    .with_help("save the file as UTF-8 (plain ASCII is UTF-8)");
    Err(Diagnostics::new(vec![d]).render(file_name, &text))
}

/// Parses `source` into its syntax tree. `file_name` is only for the caller's rendering
/// of the diagnostics; spans are byte offsets into `source`.
pub fn parse(file_name: &str, source: &str) -> Result<ast::File, Diagnostics> {
    let _ = file_name;
    let mut recovered = Vec::new();
    let result = grammar::FileParser::new().parse(&mut recovered, Lexer::new(source));
    let mut errors: Vec<Diagnostic> = recovered
        .into_iter()
        .map(|r| syntax_error(source, r.error))
        .collect();
    match result {
        Ok(file) if errors.is_empty() => Ok(file),
        Ok(_) => Err(Diagnostics::new(errors)),
        Err(e) => {
            errors.push(syntax_error(source, e));
            Err(Diagnostics::new(errors))
        }
    }
}

/// Parses, lowers and validates `source`, binding size symbols from `size` declarations
/// overridden by `defines` (`-D NAME=VALUE`). Warnings (a `-D` for a symbol the program
/// never mentions) are printed to stderr, each once per process, so that every command
/// shows them; [`compile_source_with_warnings`] returns them instead.
pub fn compile_source(
    file_name: &str,
    source: &str,
    defines: &[(String, u64)],
) -> Result<Cascade, Diagnostics> {
    let (cascade, warnings) = compile_source_with_warnings(file_name, source, defines)?;
    print_warnings_once(file_name, source, &warnings);
    Ok(cascade)
}

/// Prints each warning to stderr unless this process printed the same text before: a
/// command may compile one file several times (the linear kernels confirm their reading
/// on a small instance), and should say each thing once.
fn print_warnings_once(file_name: &str, source: &str, warnings: &Diagnostics) {
    use std::collections::HashSet;
    use std::sync::{Mutex, OnceLock};
    static SHOWN: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    for d in warnings.iter() {
        let mut d = d.clone();
        if d.span.is_none() {
            // Nothing in the text to point at (a `-D` is on the command line): say which
            // file it is about.
            d.message = format!("{file_name}: {}", d.message);
        }
        let text = Diagnostics::new(vec![d]).render(file_name, source);
        let text = text.trim_end().to_string();
        let shown = SHOWN.get_or_init(|| Mutex::new(HashSet::new()));
        // A poisoned lock only means another thread panicked while printing: print anyway.
        let first = shown
            .lock()
            .map_or(true, |mut set| set.insert(text.clone()));
        if first {
            eprintln!("{text}");
        }
    }
}

/// Like [`compile_source`], but also returns the warnings of a successful compilation
/// (a `-D` for a size symbol the program does not have), for the caller to show.
pub fn compile_source_with_warnings(
    file_name: &str,
    source: &str,
    defines: &[(String, u64)],
) -> Result<(Cascade, Diagnostics), Diagnostics> {
    let file = parse(file_name, source)?;
    lower::lower(&file, defines)
        .map(|l| (l.cascade, Diagnostics::new(l.warnings)))
        .map_err(Diagnostics::new)
}

/// Lowers and validates an already parsed file.
pub fn compile_ast(file: &ast::File, defines: &[(String, u64)]) -> Result<Cascade, Diagnostics> {
    lower::lower(file, defines)
        .map(|l| l.cascade)
        .map_err(Diagnostics::new)
}

/// Parses a `-D` argument `NAME=VALUE`.
pub fn parse_define(text: &str) -> Result<(String, u64), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| format!("`{text}`: expected NAME=VALUE"))?;
    let name = name.trim();
    let valid_name = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid_name {
        return Err(format!("`{text}`: `{name}` is not a valid size name"));
    }
    let value = value
        .trim()
        .parse::<u64>()
        .map_err(|_| format!("`{text}`: `{}` is not a non-negative integer", value.trim()))?;
    Ok((name.to_string(), value))
}

/// Turns the terminal names of the grammar into a readable list: `]`, `,`, a name.
fn describe_expected(expected: &[String]) -> String {
    let mut items: Vec<String> = Vec::new();
    let names: Vec<&str> = expected.iter().map(|e| e.trim_matches('"')).collect();
    // Everything that can start an expression collapses into one word.
    let starts_expression = ["name", "integer", "number", "(", "-", "inf"];
    let is_expression = starts_expression.iter().all(|s| names.contains(s));
    for name in &names {
        if is_expression && starts_expression.contains(name) {
            continue;
        }
        items.push(match *name {
            "name" => "a name".to_string(),
            "integer" => "an integer".to_string(),
            "number" => "a number".to_string(),
            "end of statement" => "end of statement".to_string(),
            other => format!("`{other}`"),
        });
    }
    if is_expression {
        items.insert(0, "an expression".to_string());
    }
    match items.len() {
        0 => String::new(),
        1 => items.remove(0),
        n if n <= 8 => {
            let last = items.pop().unwrap_or_default();
            format!("{} or {last}", items.join(", "))
        }
        _ => format!("{}, ...", items[..8].join(", ")),
    }
}

fn syntax_error(source: &str, error: ParseError<usize, Token<'_>, LexError>) -> Diagnostic {
    use einattn_ir::validate::DiagnosticKind::Syntax;
    let unexpected = |start: usize, end: usize, token: &Token<'_>, expected: &[String]| {
        let at_end = start >= source.len();
        let what = match token {
            Token::Terminator if at_end => "end of file".to_string(),
            Token::Terminator if source[start.min(source.len())..].starts_with(';') => {
                "`;`".to_string()
            }
            Token::Terminator => "end of line".to_string(),
            other => other.describe(),
        };
        let expected = describe_expected(expected);
        let mut d = Diagnostic::error(
            Syntax,
            format!("unexpected {what}"),
            Span::new(start, end.max(start)),
        );
        if !expected.is_empty() {
            d = d.with_label(format!("expected {expected}"));
        }
        if matches!(token, Token::Terminator) && expected.contains("`]`") | expected.contains("`)`")
        {
            d = d.with_help("a bracket is not closed");
        }
        d
    };
    match error {
        ParseError::UnrecognizedToken {
            token: (start, token, end),
            expected,
        } => unexpected(start, end, &token, &expected),
        ParseError::ExtraToken {
            token: (start, token, end),
        } => unexpected(start, end, &token, &[]),
        ParseError::UnrecognizedEof { location, expected } => {
            let mut d = Diagnostic::error(
                Syntax,
                "unexpected end of file",
                Span::new(location, location),
            );
            let expected = describe_expected(&expected);
            if !expected.is_empty() {
                d = d.with_label(format!("expected {expected}"));
            }
            d
        }
        ParseError::InvalidToken { location } => {
            Diagnostic::error(Syntax, "invalid token", Span::new(location, location + 1))
        }
        ParseError::User { error } => {
            let message = error.to_string();
            let mut d = Diagnostic::error(Syntax, message, error.span);
            d = match error.kind {
                LexErrorKind::InvalidCharacter(_) => d.with_label("no token starts with this"),
                LexErrorKind::IntegerTooLarge => d.with_label("does not fit in 64 bits"),
                LexErrorKind::InvalidNumber => d.with_label("not a finite number"),
                LexErrorKind::StatementTooLong => {
                    d.with_help("split the computation into several Einsums")
                }
            };
            d
        }
    }
}
