//! Diagnostics as the user sees them: `error: ...`, `--> file:line:col`, the source line
//! with a caret under the offending text, and `= help: ...`. Rendered as plain ASCII with
//! no color, so output is stable in snapshots and logs.

use codespan_reporting::diagnostic as cs;
use codespan_reporting::files::SimpleFile;
use codespan_reporting::term::{self, Chars, Config};
pub use einattn_ir::validate::{Diagnostic, DiagnosticKind, Severity};
use einattn_ir::Span;
use std::fmt;

/// One or more diagnostics from compiling a source file.
#[derive(Clone, Debug, PartialEq)]
pub struct Diagnostics {
    items: Vec<Diagnostic>,
}

/// A 1-based line and column (the column counts characters, not bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LineCol {
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for LineCol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// The largest char boundary at or below `offset`, clamped to the source.
fn floor_boundary(source: &str, offset: usize) -> usize {
    let mut i = offset.min(source.len());
    while !source.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// A span clamped to `source` and to char boundaries, so rendering never fails on
/// spans from elsewhere (an IR built from other text, a bug).
fn clamp(source: &str, span: Span) -> std::ops::Range<usize> {
    let start = floor_boundary(source, span.start as usize);
    let end = floor_boundary(source, span.end as usize).max(start);
    start..end
}

/// The line and column of a byte offset in `source`. Lines end at `\n`, `\r\n` or a lone
/// `\r`, as the lexer reads them.
pub fn line_col(source: &str, offset: usize) -> LineCol {
    let offset = floor_boundary(source, offset);
    let normalized = normalize_line_endings(&source[..offset]);
    let before = normalized.as_ref();
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    LineCol {
        line: before.matches('\n').count() + 1,
        column: before[line_start..].chars().count() + 1,
    }
}

/// `source` with every lone `\r` replaced by `\n`: same length, so byte offsets into one
/// are offsets into the other, and line-based tools see the lines the lexer sees.
pub fn normalize_line_endings(source: &str) -> std::borrow::Cow<'_, str> {
    if !source.contains('\r') {
        return std::borrow::Cow::Borrowed(source);
    }
    let bytes = source.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'\r' && bytes.get(i + 1) != Some(&b'\n') {
            out.push(b'\n');
        } else {
            out.push(b);
        }
    }
    // Replacing one ASCII byte by another keeps the text valid UTF-8.
    std::borrow::Cow::Owned(String::from_utf8(out).unwrap_or_else(|_| source.to_string()))
}

impl Diagnostics {
    pub fn new(items: Vec<Diagnostic>) -> Self {
        Diagnostics { items }
    }

    pub fn items(&self) -> &[Diagnostic] {
        &self.items
    }

    pub fn iter(&self) -> impl Iterator<Item = &Diagnostic> {
        self.items.iter()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn first(&self) -> Option<&Diagnostic> {
        self.items.first()
    }

    pub fn has_errors(&self) -> bool {
        self.items.iter().any(Diagnostic::is_error)
    }

    /// Where each diagnostic points (`None` for one about no source text, like a bad `-D`).
    pub fn locations(&self, source: &str) -> Vec<Option<LineCol>> {
        self.items
            .iter()
            .map(|d| d.span.map(|s| line_col(source, s.start as usize)))
            .collect()
    }

    /// Where the first diagnostic points.
    pub fn first_location(&self, source: &str) -> Option<LineCol> {
        self.locations(source).into_iter().next().flatten()
    }

    /// Every diagnostic, rendered against the source it is about, separated by blank lines.
    pub fn render(&self, file_name: &str, source: &str) -> String {
        let normalized = normalize_line_endings(source);
        let source = normalized.as_ref();
        let file = SimpleFile::new(file_name, source);
        let config = Config {
            chars: Chars::ascii(),
            ..Config::default()
        };
        let mut out = String::new();
        for d in &self.items {
            let severity = match d.severity {
                Severity::Error => cs::Severity::Error,
                Severity::Warning => cs::Severity::Warning,
            };
            let mut labels = Vec::new();
            if let Some(span) = d.span {
                labels.push(cs::Label::primary((), clamp(source, span)).with_message(&d.label));
            }
            for (span, message) in &d.related {
                labels.push(cs::Label::secondary((), clamp(source, *span)).with_message(message));
            }
            let mut notes = Vec::new();
            if d.span.is_none() && !d.label.is_empty() {
                notes.push(d.label.clone());
            }
            if let Some(help) = &d.help {
                notes.push(format!("help: {help}"));
            }
            let rendered = cs::Diagnostic::new(severity)
                .with_message(&d.message)
                .with_labels(labels)
                .with_notes(notes);
            if term::emit_to_string(&mut out, &config, &file, &rendered).is_err() {
                // Only reachable with spans outside the file, which `clamp` prevents;
                // still, never lose the message.
                out.push_str(&format!("error: {}\n", d.message));
            }
        }
        out
    }
}

impl fmt::Display for Diagnostics {
    /// Messages only, one per line; use [`Diagnostics::render`] to show source lines.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.items {
            let severity = if d.is_error() { "error" } else { "warning" };
            writeln!(f, "{severity}: {}", d.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

impl From<Vec<Diagnostic>> for Diagnostics {
    fn from(items: Vec<Diagnostic>) -> Self {
        Diagnostics::new(items)
    }
}
