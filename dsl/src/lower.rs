//! Lowering: AST -> Cascade IR. Binds sizes (`size` defaults, `-D` overrides), resolves
//! names, composes split parents, turns index expressions into affine form, makes implicit
//! sums explicit, attaches `init`s to their recurrences, then runs the IR validator.
//!
//! Lowering reports every problem it can find in one go; it never panics and never
//! indexes with anything the user wrote without checking it first. When lowering itself
//! found errors, the validator is not run: its findings on a half-built cascade would
//! mostly be echoes of the first errors.

use crate::ast::{self, BinOp, ExprKind, StatementKind};
use einattn_ir::print::split_expansion;
use einattn_ir::validate::{self, did_you_mean, Diagnostic, DiagnosticKind};
use einattn_ir::*;
use std::collections::{HashMap, HashSet};

/// Scalar map functions: name -> arity.
const FUNCTIONS: [(&str, usize); 7] = [
    ("exp", 1),
    ("log", 1),
    ("sqrt", 1),
    ("tanh", 1),
    ("neg", 1),
    ("max", 2),
    ("min", 2),
];

const REDUCTIONS: [&str; 4] = ["sum", "prod", "max", "min"];

/// The largest extent or tile accepted. Far beyond any real sequence, and small enough
/// that element counts and index arithmetic downstream cannot overflow.
pub const MAX_EXTENT: u64 = 1 << 40;

/// The lowered cascade, plus the span of every index of every access (keyed by the
/// access's span), so diagnostics about one index can point at it.
pub struct Lowered {
    pub cascade: Cascade,
    pub index_spans: HashMap<Span, Vec<Span>>,
    /// Problems that do not stop compilation (a `-D` for a symbol the program lacks).
    pub warnings: Vec<Diagnostic>,
}

/// Lowers and validates. On failure, every diagnostic found, sorted by position.
pub fn lower(file: &ast::File, defines: &[(String, u64)]) -> Result<Lowered, Vec<Diagnostic>> {
    let mut l = Lowerer::new(defines);
    l.lower_file(file);
    if !l.errors.iter().any(Diagnostic::is_error) {
        if let Err(found) = validate::validate(&l.cascade) {
            l.errors.extend(found);
        }
    }
    let mut errors = l.errors;
    for d in &mut errors {
        narrow_to_index(d, &l.index_spans);
    }
    if errors.iter().any(Diagnostic::is_error) {
        errors.sort_by_key(|d| d.span.map_or((0, 0), |s| (1, s.start)));
        return Err(errors);
    }
    Ok(Lowered {
        cascade: l.cascade,
        index_spans: l.index_spans,
        warnings: errors,
    })
}

/// Points a diagnostic about one index of an access at that index's text.
fn narrow_to_index(d: &mut Diagnostic, index_spans: &HashMap<Span, Vec<Span>>) {
    let (Some(span), Some(position)) = (d.span, d.index_position) else {
        return;
    };
    if let Some(&narrow) = index_spans.get(&span).and_then(|v| v.get(position)) {
        d.span = Some(narrow);
    }
}

/// A size symbol's binding.
struct SizeBinding {
    value: u64,
    /// Where it was declared; `None` for a symbol given only by `-D`.
    declared: Option<Span>,
}

/// What a rank's extent or a split's tile resolved to.
struct ResolvedExtent {
    value: u64,
    source: ExtentSource,
}

struct Lowerer {
    cascade: Cascade,
    errors: Vec<Diagnostic>,
    defines: Vec<(String, u64)>,
    sizes: HashMap<String, SizeBinding>,
    ranks: HashMap<String, Handle<Rank>>,
    tensors: HashMap<String, Handle<Tensor>>,
    index_spans: HashMap<Span, Vec<Span>>,
    /// Per Einsum: the ranks its statement names, which decide split composition.
    mentioned: Vec<Vec<Handle<Rank>>>,
    /// Per Einsum: the recurrence rank, and whether an init has been attached.
    recurrences: Vec<Option<(Handle<Rank>, bool)>>,
    /// States of reverse recurrences (their `init` gives the last step): the tensor and
    /// the position of its iterative dimension.
    reverse_states: HashMap<Handle<Tensor>, usize>,
    /// Size symbols declared `fixed`.
    declared_fixed: Vec<String>,
    /// Per split parent: the size symbols its tile was written with.
    tile_symbols: HashMap<Handle<Rank>, Vec<String>>,
}

/// Every name the statement mentions, in order (tensors, ranks, sizes and function names
/// alike: callers filter).
fn collect_names<'a>(expr: &'a ast::Expr, out: &mut Vec<&'a ast::Ident>) {
    let mut stack = vec![expr];
    while let Some(e) = stack.pop() {
        match &e.kind {
            ExprKind::Int(_) | ExprKind::Float(_) | ExprKind::Inf => {}
            ExprKind::Name(id) => out.push(id),
            ExprKind::Access { name, indices } => {
                out.push(name);
                stack.extend(indices.iter().rev());
            }
            ExprKind::Call { args, .. } => stack.extend(args.iter().rev()),
            ExprKind::Neg(a) => stack.push(a),
            ExprKind::Binary(_, a, b) => {
                stack.push(b);
                stack.push(a);
            }
        }
    }
}

fn statement_names(kind: &StatementKind) -> Vec<&ast::Ident> {
    let mut names = Vec::new();
    match kind {
        StatementKind::Einsum(e) => {
            for i in e.target.indices.iter().flatten() {
                collect_names(i, &mut names);
            }
            for p in &e.reductions {
                for r in &p.ranks {
                    collect_names(r, &mut names);
                }
            }
            collect_names(&e.value, &mut names);
            for c in &e.mask {
                collect_names(&c.lhs, &mut names);
                collect_names(&c.rhs, &mut names);
            }
        }
        StatementKind::Init { target, value } => {
            for i in target.indices.iter().flatten() {
                collect_names(i, &mut names);
            }
            collect_names(value, &mut names);
        }
        _ => {}
    }
    names
}

/// The rank `r` of an output index written `r + 1`.
fn next_step_rank(expr: &ast::Expr) -> Option<&ast::Ident> {
    match &expr.kind {
        ExprKind::Binary(BinOp::Add, a, b) => match (&a.kind, &b.kind) {
            (ExprKind::Name(id), ExprKind::Int(1)) => Some(id),
            _ => None,
        },
        _ => None,
    }
}

fn cmp_op(op: ast::CmpOp) -> CmpOp {
    match op {
        ast::CmpOp::Lt => CmpOp::Lt,
        ast::CmpOp::Le => CmpOp::Le,
        ast::CmpOp::Gt => CmpOp::Gt,
        ast::CmpOp::Ge => CmpOp::Ge,
        ast::CmpOp::Eq => CmpOp::Eq,
        ast::CmpOp::Ne => CmpOp::Ne,
    }
}

/// An extent expression as text the front end reads back (`2*N - 1`).
fn extent_text(e: &ast::Expr) -> String {
    fn go(e: &ast::Expr, min: u8) -> String {
        let (level, text) = match &e.kind {
            ExprKind::Int(v) => (3, v.to_string()),
            ExprKind::Name(id) => (3, id.name.clone()),
            ExprKind::Neg(a) => (2, format!("-{}", go(a, 2))),
            ExprKind::Binary(BinOp::Add, a, b) => (0, format!("{} + {}", go(a, 0), go(b, 1))),
            ExprKind::Binary(BinOp::Sub, a, b) => (0, format!("{} - {}", go(a, 0), go(b, 1))),
            ExprKind::Binary(BinOp::Mul, a, b) => (1, format!("{}*{}", go(a, 1), go(b, 2))),
            // Rejected before the text is taken.
            _ => (3, "?".to_string()),
        };
        if level < min {
            format!("({text})")
        } else {
            text
        }
    }
    go(e, 0)
}

/// Divisors of `n` nearest to `tile`, for the hint of a split that does not divide.
fn nearby_divisors(n: u64, tile: u64) -> Vec<u64> {
    if n == 0 {
        return Vec::new();
    }
    let below = (1..=tile.min(n)).rev().find(|d| n.is_multiple_of(*d));
    let above = (tile.max(1)..=n)
        .take(1 << 20)
        .find(|d| n.is_multiple_of(*d));
    let mut v: Vec<u64> = below.into_iter().chain(above).collect();
    v.dedup();
    v
}

fn scale(e: &IndexExpr, k: i64) -> Option<IndexExpr> {
    let mut out = IndexExpr::constant(e.constant.checked_mul(k)?);
    for (c, r) in &e.terms {
        out.add_term(c.checked_mul(k)?, *r);
    }
    Some(out)
}

fn add(a: &IndexExpr, b: &IndexExpr, sign: i64) -> Option<IndexExpr> {
    let mut out = a.clone();
    out.constant = out.constant.checked_add(b.constant.checked_mul(sign)?)?;
    for (c, r) in &b.terms {
        // add_term merges terms; bound the magnitude first so the merge cannot overflow.
        let c = c.checked_mul(sign)?;
        if let Some(existing) = out.terms.iter().find(|(_, x)| x == r) {
            existing.0.checked_add(c)?;
        }
        out.add_term(c, *r);
    }
    Some(out)
}

/// Why an expression is not an affine index.
enum NotAffine {
    /// Silently not affine (a value context keeps it as an arithmetic expression).
    No,
    /// An error already worth reporting in an index context.
    Because(Box<Diagnostic>),
}

impl Lowerer {
    fn new(defines: &[(String, u64)]) -> Self {
        Lowerer {
            cascade: Cascade::default(),
            errors: Vec::new(),
            defines: defines.to_vec(),
            sizes: HashMap::new(),
            ranks: HashMap::new(),
            tensors: HashMap::new(),
            index_spans: HashMap::new(),
            mentioned: Vec::new(),
            recurrences: Vec::new(),
            reverse_states: HashMap::new(),
            declared_fixed: Vec::new(),
            tile_symbols: HashMap::new(),
        }
    }

    fn error(&mut self, d: Diagnostic) {
        self.errors.push(d);
    }

    fn define(&self, name: &str) -> Option<u64> {
        self.defines
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
    }

    fn lower_file(&mut self, file: &ast::File) {
        self.kernel(file);
        self.sizes(file);
        for s in &file.statements {
            match &s.kind {
                StatementKind::Rank { name, extent } => self.rank(name, extent),
                StatementKind::Split {
                    parent,
                    outer,
                    inner,
                    tile,
                } => self.split(parent, outer, inner, tile),
                _ => {}
            }
        }
        for s in &file.statements {
            if let StatementKind::Tensor(decl) = &s.kind {
                self.tensor_decl(decl, s.span);
            }
        }
        // Temporaries first, so an Einsum may read a tensor assigned further down.
        for s in &file.statements {
            if let StatementKind::Einsum(e) = &s.kind {
                self.declare_temp(&e.target);
            }
        }
        for s in &file.statements {
            if let StatementKind::Init { target, .. } = &s.kind {
                self.reverse_state(target);
            }
        }
        for s in &file.statements {
            if let StatementKind::Einsum(e) = &s.kind {
                self.einsum(e, &s.kind, s.span);
            }
        }
        for s in &file.statements {
            if let StatementKind::Init { target, value } = &s.kind {
                self.init(target, value, &s.kind, s.span);
            }
        }
        self.missing_inits();
        self.cascade.fixed_sizes = self.frozen_sizes(file);
    }

    /// The size symbols the cascade holds as plain integers, which a printed copy must pin
    /// (`Cascade::fixed_sizes`): declared `fixed`, the tile of a split, and every size or
    /// extent used in a value or index, except the final step `R` of a state read at its
    /// iterative dimension (the printer writes that one back as `R`).
    fn frozen_sizes(&self, file: &ast::File) -> Vec<String> {
        let mut frozen: Vec<String> = self.declared_fixed.clone();
        let add = |frozen: &mut Vec<String>, names: Vec<String>| {
            for n in names {
                if self.sizes.contains_key(&n) && !frozen.contains(&n) {
                    frozen.push(n);
                }
            }
        };
        for names in self.tile_symbols.values() {
            add(&mut frozen, self.symbols_of_names(names));
        }
        let mut uses: Vec<&ast::Ident> = Vec::new();
        for s in &file.statements {
            match &s.kind {
                StatementKind::Einsum(e) => {
                    for i in e.target.indices.iter().flatten() {
                        self.size_uses(i, &mut uses);
                    }
                    self.size_uses(&e.value, &mut uses);
                    for c in &e.mask {
                        self.size_uses(&c.lhs, &mut uses);
                        self.size_uses(&c.rhs, &mut uses);
                    }
                }
                StatementKind::Init { target, value } => {
                    // The last step of a reverse state is its extent, not a built-in size.
                    let last_step = self
                        .tensors
                        .get(&target.name.name)
                        .and_then(|t| self.reverse_states.get(t))
                        .copied();
                    for (d, i) in target.indices.iter().flatten().enumerate() {
                        if Some(d) != last_step {
                            self.size_uses(i, &mut uses);
                        }
                    }
                    self.size_uses(value, &mut uses);
                }
                _ => {}
            }
        }
        let names: Vec<String> = uses.iter().map(|id| id.name.clone()).collect();
        add(&mut frozen, self.symbols_of_names(&names));
        frozen.sort();
        frozen
    }

    /// Names in `expr` that resolve to a size symbol or an extent, skipping a bare extent
    /// at the iterative dimension of a state (its final step).
    fn size_uses<'a>(&self, expr: &'a ast::Expr, out: &mut Vec<&'a ast::Ident>) {
        match &expr.kind {
            ExprKind::Int(_) | ExprKind::Float(_) | ExprKind::Inf => {}
            ExprKind::Name(id) => {
                if !self.tensors.contains_key(&id.name) && !self.ranks.contains_key(&id.name) {
                    out.push(id);
                }
            }
            ExprKind::Access { name, indices } => {
                let state = self.tensors.get(&name.name).and_then(|&t| {
                    let t = &self.cascade.tensors[t];
                    t.iterative.and_then(|d| t.ranks.get(d).map(|&r| (d, r)))
                });
                for (d, i) in indices.iter().enumerate() {
                    let final_step = match (state, &i.kind) {
                        (Some((sd, r)), ExprKind::Name(id)) => {
                            sd == d && id.name == self.cascade.ranks[r].name.to_uppercase()
                        }
                        _ => false,
                    };
                    if !final_step {
                        self.size_uses(i, out);
                    }
                }
            }
            ExprKind::Call { args, .. } => {
                for a in args {
                    self.size_uses(a, out);
                }
            }
            ExprKind::Neg(a) => self.size_uses(a, out),
            ExprKind::Binary(_, a, b) => {
                self.size_uses(a, out);
                self.size_uses(b, out);
            }
        }
    }

    /// The size symbols behind names: a size symbol is itself; an extent name stands for
    /// the symbols its rank's extent was built from (a split's parent and tile included).
    fn symbols_of_names(&self, names: &[String]) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let mut pending: Vec<String> = names.to_vec();
        let mut seen: HashSet<String> = HashSet::new();
        while let Some(n) = pending.pop() {
            if !seen.insert(n.clone()) {
                continue;
            }
            if self.sizes.contains_key(&n) {
                out.push(n);
                continue;
            }
            let Some(r) = self.rank_with_extent_name(&n) else {
                continue;
            };
            let rank = &self.cascade.ranks[r];
            match &rank.source {
                ExtentSource::Symbol(text) => pending.extend(
                    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .filter(|w| !w.is_empty())
                        .map(str::to_string),
                ),
                // The outer rank's extent is the parent's over the tile; the tile's is the
                // tile alone.
                ExtentSource::SplitOuter | ExtentSource::SplitTile => {
                    if let Some(p) = rank.parent {
                        if rank.source == ExtentSource::SplitOuter {
                            pending.push(self.cascade.ranks[p].name.to_uppercase());
                        }
                        if let Some(t) = self.tile_symbols.get(&p) {
                            pending.extend(t.iter().cloned());
                        }
                    }
                }
                ExtentSource::Literal => {}
            }
        }
        out
    }

    fn kernel(&mut self, file: &ast::File) {
        let mut kernels = file.statements.iter().filter_map(|s| match &s.kind {
            StatementKind::Kernel(name) => Some((name, s.span)),
            _ => None,
        });
        match (file.statements.first(), kernels.next()) {
            (None, _) => self.error(
                Diagnostic::error(
                    DiagnosticKind::Syntax,
                    "empty program: expected `kernel NAME`",
                    Span::new(0, 0),
                )
                .with_label("a `.ein` file starts with `kernel NAME`"),
            ),
            (Some(first), found) => {
                if let Some((name, _)) = found {
                    self.cascade.name = name.name.clone();
                }
                if !matches!(first.kind, StatementKind::Kernel(_)) {
                    self.error(
                        Diagnostic::error(
                            DiagnosticKind::Syntax,
                            "the first statement must be `kernel NAME`",
                            first.span,
                        )
                        .with_label("expected `kernel NAME` before this")
                        .with_help("start the file with `kernel my_kernel`"),
                    );
                }
            }
        }
        let first_span = file.statements.iter().find_map(|s| match &s.kind {
            StatementKind::Kernel(_) => Some(s.span),
            _ => None,
        });
        for (_, span) in kernels {
            let mut d = Diagnostic::error(
                DiagnosticKind::Duplicate,
                "a second `kernel` statement",
                span,
            )
            .with_label("a file declares one kernel");
            if let Some(first) = first_span {
                d = d.with_related(first, "the kernel is named here");
            }
            self.error(d);
        }
    }

    fn sizes(&mut self, file: &ast::File) {
        let mut order: Vec<String> = Vec::new();
        for s in &file.statements {
            let StatementKind::Size {
                name,
                value,
                value_span,
                fixed,
            } = &s.kind
            else {
                continue;
            };
            if let Some(word) = fixed {
                if word.name != "fixed" {
                    self.error(
                        Diagnostic::error(
                            DiagnosticKind::Syntax,
                            format!("unexpected `{}` after the size", word.name),
                            word.span,
                        )
                        .with_label("expected `fixed` or the end of the statement"),
                    );
                } else {
                    self.declared_fixed.push(name.name.clone());
                    if let Some(v) = self.define(&name.name).filter(|v| v != value) {
                        self.error(
                            Diagnostic::error(
                                DiagnosticKind::Invalid,
                                format!(
                                    "`-D {}={v}`: size `{}` is fixed at {value} in this program",
                                    name.name, name.name
                                ),
                                *value_span,
                            )
                            .with_label("its value is built into the cascade")
                            .with_help(
                                "this text was printed from a cascade derived at this size (by \
                                 `einattn optimize`, say); derive it again from the original \
                                 program with the `-D` you want",
                            ),
                        );
                    }
                }
            }
            if let Some(prev) = self.sizes.get(&name.name) {
                let d = Diagnostic::error(
                    DiagnosticKind::Duplicate,
                    format!("size `{}` is declared twice", name.name),
                    name.span,
                )
                .with_label("second declaration")
                .with_related(
                    prev.declared.unwrap_or(Span::UNKNOWN),
                    "first declared here",
                );
                self.error(d);
                continue;
            }
            let value = self.define(&name.name).unwrap_or(*value);
            self.sizes.insert(
                name.name.clone(),
                SizeBinding {
                    value,
                    declared: Some(name.span),
                },
            );
            order.push(name.name.clone());
        }
        // A `-D` for a symbol the file never declares is allowed when the file uses it;
        // one the file never mentions is an error (likely a typo that would silently not
        // apply).
        let mut mentioned: HashSet<&str> = HashSet::new();
        for s in &file.statements {
            match &s.kind {
                StatementKind::Rank {
                    extent: ast::Extent::Name(id),
                    ..
                } => {
                    mentioned.insert(&id.name);
                }
                StatementKind::Split {
                    tile: ast::Extent::Name(id),
                    ..
                } => {
                    mentioned.insert(&id.name);
                }
                StatementKind::Rank {
                    extent: ast::Extent::Expr(e),
                    ..
                }
                | StatementKind::Split {
                    tile: ast::Extent::Expr(e),
                    ..
                } => {
                    let mut names = Vec::new();
                    collect_names(e, &mut names);
                    for id in names {
                        mentioned.insert(&id.name);
                    }
                }
                kind => {
                    for id in statement_names(kind) {
                        mentioned.insert(&id.name);
                    }
                }
            }
        }
        let declared: Vec<String> = order.clone();
        let defines = self.defines.clone();
        for (name, value) in &defines {
            if self.sizes.contains_key(name) {
                continue;
            }
            if mentioned.contains(name.as_str()) {
                self.sizes.insert(
                    name.clone(),
                    SizeBinding {
                        value: *value,
                        declared: None,
                    },
                );
                order.push(name.clone());
            } else {
                let candidates = declared
                    .iter()
                    .map(String::as_str)
                    .chain(mentioned.iter().copied());
                // A warning, not an error: one set of `-D`s is often given to several
                // programs, and a symbol one of them lacks changes nothing in it.
                let mut d = Diagnostic::error(
                    DiagnosticKind::UnknownDefine,
                    format!("`-D {name}={value}` names no size symbol of this program"),
                    Span::UNKNOWN,
                );
                d.severity = validate::Severity::Warning;
                d.help = Some(match did_you_mean(name, candidates) {
                    Some(hint) => hint,
                    None if declared.is_empty() => {
                        "this program declares no size symbols".to_string()
                    }
                    None => format!("its size symbols are {}", declared.join(", ")),
                });
                self.error(d);
            }
        }
        self.cascade.sizes = order
            .iter()
            .filter_map(|n| self.sizes.get(n).map(|b| (n.clone(), b.value)))
            .collect();
    }

    /// The rank whose extent is written `name` (the rank's name in upper case).
    fn rank_with_extent_name(&self, name: &str) -> Option<Handle<Rank>> {
        self.cascade
            .ranks
            .iter()
            .find(|(_, r)| r.name.to_uppercase() == name)
            .map(|(h, _)| h)
    }

    /// A size symbol or a rank's extent, by name.
    fn size_value(&self, name: &str) -> Option<u64> {
        if let Some(b) = self.sizes.get(name) {
            return Some(b.value);
        }
        self.rank_with_extent_name(name)
            .map(|r| self.cascade.ranks[r].extent)
    }

    fn size_candidates(&self) -> Vec<String> {
        let mut names: Vec<String> = self.sizes.keys().cloned().collect();
        names.extend(
            self.cascade
                .ranks
                .iter()
                .map(|(_, r)| r.name.to_uppercase()),
        );
        names.sort();
        names
    }

    fn undefined_size(&self, id: &ast::Ident) -> Diagnostic {
        let candidates = self.size_candidates();
        let mut help = format!(
            "declare it with `size {} = ...` or pass `-D {}=...`",
            id.name, id.name
        );
        if let Some(hint) = did_you_mean(&id.name, candidates.iter().map(String::as_str)) {
            help = format!("{hint} Otherwise {help}");
        }
        Diagnostic::error(
            DiagnosticKind::UndefinedSize,
            format!("size symbol `{}` is not defined", id.name),
            id.span,
        )
        .with_label("neither declared with `size` nor given with `-D`")
        .with_help(help)
    }

    fn resolve_extent(&mut self, extent: &ast::Extent) -> Option<ResolvedExtent> {
        let resolved = self.resolve_extent_unchecked(extent)?;
        if resolved.value > MAX_EXTENT {
            self.error(
                Diagnostic::error(
                    DiagnosticKind::Invalid,
                    format!("extent {} is too large", resolved.value),
                    extent.span(),
                )
                .with_label(format!("the largest extent is 2^40 = {MAX_EXTENT}")),
            );
            return None;
        }
        Some(resolved)
    }

    fn resolve_extent_unchecked(&mut self, extent: &ast::Extent) -> Option<ResolvedExtent> {
        match extent {
            ast::Extent::Literal { value, .. } => Some(ResolvedExtent {
                value: *value,
                source: ExtentSource::Literal,
            }),
            ast::Extent::Expr(e) => {
                // Affine in size symbols and extents; no ranks (they have no value here).
                let value = match self.affine(e, &[]) {
                    Ok(ix) if ix.terms.is_empty() => ix.constant,
                    Ok(_) => {
                        self.error(
                            Diagnostic::error(
                                DiagnosticKind::Invalid,
                                "an extent is computed from integers and size symbols only",
                                e.span,
                            )
                            .with_label("this names a rank"),
                        );
                        return None;
                    }
                    Err(NotAffine::Because(d)) => {
                        self.error(*d);
                        return None;
                    }
                    Err(NotAffine::No) => {
                        self.error(
                            Diagnostic::error(
                                DiagnosticKind::Invalid,
                                "an extent is an affine expression of integers and size symbols",
                                e.span,
                            )
                            .with_label("not affine"),
                        );
                        return None;
                    }
                };
                if value < 1 {
                    self.error(
                        Diagnostic::error(
                            DiagnosticKind::Invalid,
                            format!("this extent is {value}"),
                            e.span,
                        )
                        .with_label("an extent is at least 1"),
                    );
                    return None;
                }
                Some(ResolvedExtent {
                    value: value as u64,
                    // Kept as written, so printing keeps it symbolic.
                    source: ExtentSource::Symbol(extent_text(e)),
                })
            }
            ast::Extent::Name(id) => match self.size_value(&id.name) {
                Some(value) => Some(ResolvedExtent {
                    value,
                    source: ExtentSource::Symbol(id.name.clone()),
                }),
                None => {
                    let d = self.undefined_size(id);
                    self.error(d);
                    None
                }
            },
        }
    }

    fn new_rank_name(&mut self, id: &ast::Ident) -> bool {
        if let Some(&prev) = self.ranks.get(&id.name) {
            let prev_span = self.cascade.ranks[prev].span;
            self.error(
                Diagnostic::error(
                    DiagnosticKind::Duplicate,
                    format!("rank `{}` is declared twice", id.name),
                    id.span,
                )
                .with_label("second declaration")
                .with_related(prev_span, "first declared here"),
            );
            return false;
        }
        true
    }

    fn rank(&mut self, name: &ast::Ident, extent: &ast::Extent) {
        if !self.new_rank_name(name) {
            return;
        }
        let resolved = self.resolve_extent(extent).unwrap_or(ResolvedExtent {
            value: 1,
            source: ExtentSource::Literal,
        });
        let h = self.cascade.ranks.append(Rank {
            name: name.name.clone(),
            extent: resolved.value,
            source: resolved.source,
            split: None,
            parent: None,
            span: name.span,
        });
        self.ranks.insert(name.name.clone(), h);
    }

    fn unknown_rank(&self, id: &ast::Ident) -> Diagnostic {
        let mut d = Diagnostic::error(
            DiagnosticKind::UnknownName,
            format!("unknown rank `{}`", id.name),
            id.span,
        )
        .with_label("not declared");
        d.help = did_you_mean(&id.name, self.ranks.keys().map(String::as_str))
            .or_else(|| Some(format!("declare it with `rank {}: EXTENT`", id.name)));
        d
    }

    fn split(
        &mut self,
        parent: &ast::Ident,
        outer: &ast::Ident,
        inner: &ast::Ident,
        tile: &ast::Extent,
    ) {
        let Some(&parent_h) = self.ranks.get(&parent.name) else {
            let d = self.unknown_rank(parent);
            self.error(d);
            return;
        };
        if let Some(s) = &self.cascade.ranks[parent_h].split {
            let prev = self.cascade.ranks[s.outer].span;
            self.error(
                Diagnostic::error(
                    DiagnosticKind::Duplicate,
                    format!("rank `{}` is split twice", parent.name),
                    parent.span,
                )
                .with_related(prev, "already split here"),
            );
            return;
        }
        if outer.name == inner.name {
            self.error(Diagnostic::error(
                DiagnosticKind::Duplicate,
                format!("both halves of the split are named `{}`", inner.name),
                inner.span,
            ));
            return;
        }
        // Check both names, so both duplicates are reported.
        let outer_ok = self.new_rank_name(outer);
        let inner_ok = self.new_rank_name(inner);
        if !outer_ok || !inner_ok {
            return;
        }
        let parent_extent = self.cascade.ranks[parent_h].extent;
        let Some(tile_value) = self.resolve_extent(tile).map(|r| r.value) else {
            return;
        };
        if tile_value == 0 || !parent_extent.is_multiple_of(tile_value) {
            let divisors = nearby_divisors(parent_extent, tile_value);
            let mut d = Diagnostic::error(
                DiagnosticKind::SplitDoesNotDivide,
                format!(
                    "split tile {tile_value} does not divide the extent of `{}` ({parent_extent})",
                    parent.name
                ),
                tile.span(),
            )
            .with_label(format!("{parent_extent} is not a multiple of {tile_value}"))
            .with_related(
                self.cascade.ranks[parent_h].span,
                format!("`{}` has extent {parent_extent}", parent.name),
            );
            if !divisors.is_empty() {
                let list: Vec<String> = divisors.iter().map(u64::to_string).collect();
                d = d.with_help(format!(
                    "choose a tile that divides {parent_extent}, such as {}",
                    list.join(" or ")
                ));
            }
            self.error(d);
            // The two ranks are still declared (with the floor of the quotient), so the
            // Einsums that use them lower without a cascade of `unknown rank` errors.
        }
        let outer_h = self.cascade.ranks.append(Rank {
            name: outer.name.clone(),
            extent: (parent_extent / tile_value.max(1)).max(1),
            source: ExtentSource::SplitOuter,
            split: None,
            parent: Some(parent_h),
            span: outer.span,
        });
        let inner_h = self.cascade.ranks.append(Rank {
            name: inner.name.clone(),
            extent: tile_value.max(1),
            source: ExtentSource::SplitTile,
            split: None,
            parent: Some(parent_h),
            span: inner.span,
        });
        let mut names = Vec::new();
        match tile {
            ast::Extent::Name(id) => names.push(id.name.clone()),
            ast::Extent::Expr(e) => {
                let mut ids = Vec::new();
                collect_names(e, &mut ids);
                names.extend(ids.into_iter().map(|id| id.name.clone()));
            }
            ast::Extent::Literal { .. } => {}
        }
        self.tile_symbols.insert(parent_h, names);
        self.cascade.ranks[parent_h].split = Some(Split {
            outer: outer_h,
            inner: inner_h,
        });
        self.ranks.insert(outer.name.clone(), outer_h);
        self.ranks.insert(inner.name.clone(), inner_h);
    }

    fn duplicate_tensor(&mut self, id: &ast::Ident) -> bool {
        if let Some(&prev) = self.tensors.get(&id.name) {
            let prev_span = self.cascade.tensors[prev].span;
            self.error(
                Diagnostic::error(
                    DiagnosticKind::Duplicate,
                    format!("tensor `{}` is declared twice", id.name),
                    id.span,
                )
                .with_label("second declaration")
                .with_related(prev_span, "first declared here"),
            );
            return true;
        }
        false
    }

    fn tensor_decl(&mut self, decl: &ast::TensorDecl, span: Span) {
        if self.duplicate_tensor(&decl.name) {
            return;
        }
        let mut ranks = Vec::new();
        for id in decl.ranks.iter().flatten() {
            match self.ranks.get(&id.name) {
                Some(&r) if ranks.contains(&r) => self.error(
                    Diagnostic::error(
                        DiagnosticKind::Duplicate,
                        format!("rank `{}` appears twice in `{}`", id.name, decl.name.name),
                        id.span,
                    )
                    .with_label("each dimension needs its own rank"),
                ),
                Some(&r) => ranks.push(r),
                None => {
                    let d = self.unknown_rank(id);
                    self.error(d);
                }
            }
        }
        let dtype = match DType::from_name(&decl.dtype.name) {
            Some(t) => t,
            None => {
                let mut d = Diagnostic::error(
                    DiagnosticKind::UnknownName,
                    format!("unknown element type `{}`", decl.dtype.name),
                    decl.dtype.span,
                )
                .with_label("expected `bf16`, `f16` or `f32`");
                d.help = did_you_mean(&decl.dtype.name, ["bf16", "f16", "f32"]);
                self.error(d);
                DType::F32
            }
        };
        let kind = match decl.kind {
            ast::DeclKind::Input => TensorKind::Input,
            ast::DeclKind::Output => TensorKind::Output,
            ast::DeclKind::Param => TensorKind::Param,
        };
        if let (Some((_, value_span)), false) = (decl.default, kind == TensorKind::Param) {
            self.error(
                Diagnostic::error(
                    DiagnosticKind::Invalid,
                    format!(
                        "only a `param` may have a default value; `{}` is an {}",
                        decl.name.name,
                        decl.kind.keyword()
                    ),
                    value_span,
                )
                .with_label("remove this default"),
            );
        }
        let h = self.cascade.tensors.append(Tensor {
            name: decl.name.name.clone(),
            ranks,
            kind,
            dtype: Some(dtype),
            iterative: None,
            default: decl.default.map(|(v, _)| v),
            span,
        });
        self.tensors.insert(decl.name.name.clone(), h);
    }

    /// Creates the temporary an Einsum assigns, when its name is new.
    fn declare_temp(&mut self, target: &ast::Access) {
        if self.tensors.contains_key(&target.name.name) {
            return;
        }
        let mut ranks = Vec::new();
        let mut iterative = None;
        for (d, index) in target.indices.iter().flatten().enumerate() {
            let id = match &index.kind {
                ExprKind::Name(id) => id,
                _ => match next_step_rank(index) {
                    Some(id) => {
                        iterative = Some(d);
                        id
                    }
                    // Reported when the Einsum is lowered.
                    None => return,
                },
            };
            match self.ranks.get(&id.name) {
                Some(&r) => ranks.push(r),
                None => return,
            }
        }
        let h = self.cascade.tensors.append(Tensor {
            name: target.name.name.clone(),
            ranks,
            kind: TensorKind::Temp,
            dtype: None,
            iterative,
            default: None,
            span: target.span,
        });
        self.tensors.insert(target.name.name.clone(), h);
    }

    /// Marks a temporary as the state of a reverse recurrence when its `init` gives the
    /// last step: one index is the extent of the rank at that position (`init dS[T, d] =
    /// ...` for `dS[t, d]`) and every other index is the position's rank. Anything else is
    /// left to [`Self::init`] to report.
    fn reverse_state(&mut self, target: &ast::Access) {
        let Some(&tensor) = self.tensors.get(&target.name.name) else {
            return;
        };
        let t = &self.cascade.tensors[tensor];
        if t.kind != TensorKind::Temp || t.iterative.is_some() {
            return;
        }
        let indices: Vec<&ast::Expr> = target.indices.iter().flatten().collect();
        if indices.len() != t.ranks.len() {
            return;
        }
        let mut last_step = Vec::new();
        for (d, (index, &r)) in indices.iter().zip(&t.ranks).enumerate() {
            let rank = &self.cascade.ranks[r];
            if matches!(&index.kind, ExprKind::Name(id) if id.name == rank.name) {
                continue;
            }
            match self.affine(index, &[]) {
                Ok(i)
                    if i.terms.is_empty()
                        && i.constant > 0
                        && u64::try_from(i.constant).ok() == Some(rank.extent) =>
                {
                    last_step.push(d)
                }
                _ => return,
            }
        }
        if let [d] = last_step[..] {
            self.cascade.tensors[tensor].iterative = Some(d);
            self.reverse_states.insert(tensor, d);
        }
    }

    fn mentioned_ranks(&self, kind: &StatementKind) -> Vec<Handle<Rank>> {
        let mut out = Vec::new();
        for id in statement_names(kind) {
            if let Some(&r) = self.ranks.get(&id.name) {
                if !out.contains(&r) {
                    out.push(r);
                }
            }
        }
        out
    }

    fn expand(&self, rank: Handle<Rank>, mentioned: &[Handle<Rank>]) -> IndexExpr {
        split_expansion(&self.cascade, rank, mentioned)
    }

    fn bad_output_index(&self, span: Span) -> Diagnostic {
        Diagnostic::error(DiagnosticKind::BadIndex, "invalid output index", span)
            .with_label("expected a rank, or `r + 1` for the next step of a recurrence over `r`")
    }

    fn einsum(&mut self, e: &ast::EinsumStatement, kind: &StatementKind, span: Span) {
        let mentioned = self.mentioned_ranks(kind);
        let Some(&tensor) = self.tensors.get(&e.target.name.name) else {
            // The temp could not be declared: its indices are at fault. Report them.
            for index in e.target.indices.iter().flatten() {
                let id = match &index.kind {
                    ExprKind::Name(id) => id,
                    _ => match next_step_rank(index) {
                        Some(id) => id,
                        None => {
                            let d = self.bad_output_index(index.span);
                            self.error(d);
                            continue;
                        }
                    },
                };
                if !self.ranks.contains_key(&id.name) {
                    let d = self.unknown_rank(id);
                    self.error(d);
                }
            }
            return;
        };

        // The output access.
        let declared_ranks = self.cascade.tensors[tensor].ranks.clone();
        let is_temp = self.cascade.tensors[tensor].kind == TensorKind::Temp;
        let mut output = Access {
            tensor,
            indices: Vec::new(),
            span: e.target.span,
        };
        let mut recurrence_rank: Option<(Handle<Rank>, usize)> = None;
        let mut index_spans = Vec::new();
        for (d, index) in e.target.indices.iter().flatten().enumerate() {
            index_spans.push(index.span);
            let (id, next) = match &index.kind {
                ExprKind::Name(id) => (id, false),
                _ => match next_step_rank(index) {
                    Some(id) => (id, true),
                    None => {
                        let d = self.bad_output_index(index.span);
                        self.error(d);
                        continue;
                    }
                },
            };
            let Some(&r) = self.ranks.get(&id.name) else {
                let d = self.unknown_rank(id);
                self.error(d);
                continue;
            };
            if let Some(&expected) = declared_ranks.get(d) {
                if expected != r && !is_temp {
                    let t = &self.cascade.tensors[tensor];
                    let names: Vec<&str> = t
                        .ranks
                        .iter()
                        .map(|&x| self.cascade.ranks[x].name.as_str())
                        .collect();
                    let d = Diagnostic::error(
                        DiagnosticKind::RankMismatch,
                        format!(
                            "index {} of `{}` must be `{}`",
                            d + 1,
                            t.name,
                            self.cascade.ranks[expected].name
                        ),
                        index.span,
                    )
                    .with_label(format!(
                        "`{}` is declared `{}[{}]`",
                        t.name,
                        t.name,
                        names.join(", ")
                    ))
                    .with_related(t.span, "declared here");
                    self.error(d);
                    continue;
                }
            }
            if next {
                if let Some((prev, _)) = recurrence_rank {
                    let prev = self.cascade.ranks[prev].name.clone();
                    self.error(
                        Diagnostic::error(
                            DiagnosticKind::Recurrence,
                            "a recurrence advances along one rank",
                            index.span,
                        )
                        .with_label(format!("already advancing along `{prev}`")),
                    );
                    continue;
                }
                if self.expand(r, &mentioned).as_rank() != Some(r) {
                    self.error(
                        Diagnostic::error(
                            DiagnosticKind::Recurrence,
                            format!(
                                "a recurrence cannot advance along the split rank `{}`",
                                id.name
                            ),
                            index.span,
                        )
                        .with_label("this Einsum iterates its split children")
                        .with_help(
                            "advance along the outer rank of the split instead, e.g. `m1 + 1`",
                        ),
                    );
                    continue;
                }
                recurrence_rank = Some((r, d));
                output.indices.push(IndexExpr {
                    terms: vec![(1, r)],
                    constant: 1,
                });
            } else {
                output.indices.push(self.expand(r, &mentioned));
            }
        }
        let reverse = match self.reverse_states.get(&tensor) {
            Some(&d) if recurrence_rank.is_none() => {
                let span = index_spans.get(d).copied().unwrap_or(e.target.span);
                match output.indices.get(d).and_then(IndexExpr::as_rank) {
                    Some(r) if self.expand(r, &mentioned).as_rank() == Some(r) => {
                        recurrence_rank = Some((r, d));
                        true
                    }
                    _ => {
                        self.error(
                            Diagnostic::error(
                                DiagnosticKind::Recurrence,
                                "a reverse recurrence advances along one plain rank",
                                span,
                            )
                            .with_label("its init gives the last step here, so this index must be the rank it runs down")
                            .with_help("write `X[.., r, ..] = f(X[.., r + 1, ..])` with `init X[.., R, ..] = ...`"),
                        );
                        false
                    }
                }
            }
            _ => false,
        };
        self.index_spans.insert(e.target.span, index_spans);
        if let Some((_, d)) = recurrence_rank {
            let t = &mut self.cascade.tensors[tensor];
            match t.iterative {
                None => t.iterative = Some(d),
                Some(prev) if prev == d => {}
                Some(_) => {
                    let name = t.name.clone();
                    self.error(Diagnostic::error(
                        DiagnosticKind::Recurrence,
                        format!("`{name}` advances along a different dimension here than where it was first assigned"),
                        e.target.span,
                    ));
                }
            }
        }

        // Reduction prefixes, outermost first as written.
        let mut prefixes: Vec<Reduction> = Vec::new();
        for p in &e.reductions {
            let op = ReduceOp::from_name(&p.op.name);
            if op.is_none() {
                let mut d = Diagnostic::error(
                    DiagnosticKind::NoIdentity,
                    format!("`{}` is not a reduction operator", p.op.name),
                    p.op.span,
                )
                .with_label("a reduction needs an identity (its value over no points)");
                d.help = Some(match did_you_mean(&p.op.name, REDUCTIONS) {
                    Some(hint) => {
                        format!("{hint} The reductions are `sum`, `prod`, `max` and `min`")
                    }
                    None => "the reductions are `sum`, `prod`, `max` and `min`".to_string(),
                });
                self.error(d);
            }
            let [rank_expr] = p.ranks.as_slice() else {
                self.error(
                    Diagnostic::error(
                        DiagnosticKind::BadIndex,
                        "a reduction prefix names exactly one rank",
                        p.span,
                    )
                    .with_help(format!(
                        "reduce several ranks with several prefixes: `{0}[a] {0}[b] ...`",
                        p.op.name
                    )),
                );
                continue;
            };
            let ExprKind::Name(id) = &rank_expr.kind else {
                self.error(
                    Diagnostic::error(
                        DiagnosticKind::BadIndex,
                        "expected a rank name",
                        rank_expr.span,
                    )
                    .with_label("a reduction prefix names the rank it reduces"),
                );
                continue;
            };
            let Some(&r) = self.ranks.get(&id.name) else {
                let d = self.unknown_rank(id);
                self.error(d);
                continue;
            };
            // A split parent iterated through its children reduces both, inner first.
            let expansion = self.expand(r, &mentioned);
            let mut group: Vec<Reduction> = expansion
                .terms
                .iter()
                .rev()
                .map(|(_, leaf)| Reduction {
                    rank: *leaf,
                    op: op.unwrap_or(ReduceOp::Sum),
                })
                .collect();
            // Stored outermost-first for now; reversed below.
            group.reverse();
            prefixes.extend(group);
        }

        let expr = self.value(&e.value, &mentioned);
        let mut mask = Vec::new();
        let mut value_mask = Vec::new();
        for c in &e.mask {
            // A condition that reads a tensor or compares with a non-integer compares
            // values: a data-dependent mask. Otherwise both sides must be affine indices.
            if self.is_value_side(&c.lhs) || self.is_value_side(&c.rhs) {
                let lhs = self.value(&c.lhs, &mentioned);
                let rhs = self.value(&c.rhs, &mentioned);
                value_mask.push(ValueCondition {
                    lhs,
                    op: cmp_op(c.op),
                    rhs,
                    span: c.span,
                });
                continue;
            }
            let lhs = self.index(&c.lhs, &mentioned);
            let rhs = self.index(&c.rhs, &mentioned);
            if let (Some(lhs), Some(rhs)) = (lhs, rhs) {
                mask.push(Condition {
                    lhs,
                    op: cmp_op(c.op),
                    rhs,
                    span: c.span,
                });
            }
        }

        // Implicit sums: ranks the body or mask iterates that the output does not index and
        // no prefix names, innermost first in order of first mention; then the prefixes,
        // the one nearest the expression innermost.
        let mut output_ranks: Vec<Handle<Rank>> = Vec::new();
        for i in &output.indices {
            output_ranks.extend(i.ranks());
        }
        let mut implicit: Vec<Handle<Rank>> = Vec::new();
        let mut note = |i: &IndexExpr| {
            for r in i.ranks() {
                if !implicit.contains(&r)
                    && !output_ranks.contains(&r)
                    && !prefixes.iter().any(|p| p.rank == r)
                {
                    implicit.push(r);
                }
            }
        };
        expr.visit_indices(&mut note);
        for c in &mask {
            note(&c.lhs);
            note(&c.rhs);
        }
        for c in &value_mask {
            c.visit_indices(&mut note);
        }
        let mut reductions: Vec<Reduction> = implicit
            .into_iter()
            .map(|rank| Reduction {
                rank,
                op: ReduceOp::Sum,
            })
            .collect();
        reductions.extend(prefixes.into_iter().rev());

        self.summed_constant_terms(&e.value, &reductions, &mentioned);

        let recurrence = recurrence_rank.map(|(rank, _)| Recurrence {
            rank,
            init: Expr::Literal(0.0),
            init_span: Span::UNKNOWN,
            reverse,
        });
        self.cascade.einsums.append(Einsum {
            output,
            expr,
            reductions,
            mask,
            value_mask,
            recurrence,
            span,
        });
        self.mentioned.push(mentioned);
        self.recurrences
            .push(recurrence_rank.map(|(r, _)| (r, false)));
    }

    /// Warns about a term of a sum that does not depend on a rank the Einsum sums over
    /// (`scale * Q[p, e] * K[m, e] + bias[p]`, summed over `e`): it is added once per point
    /// of the rank, which is almost never meant. A whole expression constant along the
    /// rank is a deliberate count or scale and passes.
    fn summed_constant_terms(
        &mut self,
        value: &ast::Expr,
        reductions: &[Reduction],
        mentioned: &[Handle<Rank>],
    ) {
        fn terms<'a>(e: &'a ast::Expr, out: &mut Vec<&'a ast::Expr>) {
            match &e.kind {
                ExprKind::Binary(BinOp::Add | BinOp::Sub, a, b) => {
                    terms(a, out);
                    terms(b, out);
                }
                ExprKind::Neg(a) => terms(a, out),
                _ => out.push(e),
            }
        }
        let mut parts = Vec::new();
        terms(value, &mut parts);
        if parts.len() < 2 {
            return;
        }
        let ranks_of = |e: &ast::Expr| -> Vec<Handle<Rank>> {
            let mut names = Vec::new();
            collect_names(e, &mut names);
            let mut out = Vec::new();
            for id in names {
                if self.tensors.contains_key(&id.name) {
                    continue;
                }
                if let Some(&r) = self.ranks.get(&id.name) {
                    out.extend(self.expand(r, mentioned).ranks());
                }
            }
            out
        };
        let part_ranks: Vec<Vec<Handle<Rank>>> = parts.iter().map(|p| ranks_of(p)).collect();
        let mut warned: Vec<Span> = Vec::new();
        for red in reductions.iter().filter(|r| r.op == ReduceOp::Sum) {
            if !part_ranks.iter().any(|rs| rs.contains(&red.rank)) {
                continue;
            }
            for (part, rs) in parts.iter().zip(&part_ranks) {
                let constant = matches!(part.kind, ExprKind::Int(0))
                    || matches!(part.kind, ExprKind::Float(v) if v == 0.0);
                if rs.contains(&red.rank) || constant || warned.contains(&part.span) {
                    continue;
                }
                warned.push(part.span);
                let rank = &self.cascade.ranks[red.rank];
                let mut d = Diagnostic::error(
                    DiagnosticKind::SummedConstant,
                    format!(
                        "this term does not depend on `{}`, which the Einsum sums over",
                        rank.name
                    ),
                    part.span,
                )
                .with_label(format!(
                    "added {} times, once per `{}`",
                    rank.extent, rank.name
                ))
                .with_help(
                    "a sum reduces the whole expression; compute the sum in its own Einsum and \
                     add this term to its result",
                );
                d.severity = validate::Severity::Warning;
                self.error(d);
            }
        }
    }

    fn init(&mut self, target: &ast::Access, value: &ast::Expr, kind: &StatementKind, span: Span) {
        let Some(&tensor) = self.tensors.get(&target.name.name) else {
            let mut d = Diagnostic::error(
                DiagnosticKind::Recurrence,
                format!(
                    "init of `{}`, which no recurrence advances",
                    target.name.name
                ),
                target.name.span,
            )
            .with_label("unknown tensor");
            d.help = did_you_mean(&target.name.name, self.tensors.keys().map(String::as_str));
            self.error(d);
            return;
        };
        let t = &self.cascade.tensors[tensor];
        let tname = t.name.clone();
        let found = self
            .cascade
            .einsums
            .iter()
            .find(|(h, e)| {
                e.output.tensor == tensor
                    && self.recurrences.get(h.index()).is_some_and(Option::is_some)
            })
            .map(|(h, _)| h);
        let Some(einsum) = found else {
            if self.reverse_states.contains_key(&tensor) {
                // Its Einsum was refused as a reverse recurrence, with the reason.
                return;
            }
            let help = match t.ranks.first() {
                Some(_) => format!(
                    "an init gives step 0 of a state advanced by a recurrence `{tname}[.., r + 1, ..] = ...`"
                ),
                None => "an init gives step 0 of a state advanced by a recurrence".to_string(),
            };
            self.error(
                Diagnostic::error(
                    DiagnosticKind::Recurrence,
                    format!("init of `{tname}`, which no recurrence advances"),
                    span,
                )
                .with_label(format!("`{tname}` is not assigned at a next step `r + 1`"))
                .with_help(help),
            );
            return;
        };
        let Some(&Some((rec_rank, has_init))) = self.recurrences.get(einsum.index()) else {
            return;
        };
        if has_init {
            let prev = self.cascade.einsums[einsum]
                .recurrence
                .as_ref()
                .map_or(Span::UNKNOWN, |r| r.init_span);
            self.error(
                Diagnostic::error(
                    DiagnosticKind::Duplicate,
                    format!("`{tname}` has a second init"),
                    span,
                )
                .with_related(prev, "first init"),
            );
            return;
        }
        let mut mentioned = self
            .mentioned
            .get(einsum.index())
            .cloned()
            .unwrap_or_default();
        for r in self.mentioned_ranks(kind) {
            if !mentioned.contains(&r) {
                mentioned.push(r);
            }
        }
        let state_dim = self.cascade.tensors[tensor].iterative;
        let rec_output = self.cascade.einsums[einsum].output.indices.clone();
        let indices: Vec<&ast::Expr> = target.indices.iter().flatten().collect();
        if indices.len() != rec_output.len() {
            self.error(
                Diagnostic::error(
                    DiagnosticKind::RankMismatch,
                    format!(
                        "`{tname}` has {} ranks but its init has {} indices",
                        rec_output.len(),
                        indices.len()
                    ),
                    target.span,
                )
                .with_related(self.cascade.einsums[einsum].output.span, "the recurrence"),
            );
            return;
        }
        let mut state_ranks: Vec<Handle<Rank>> = Vec::new();
        let reverse = self.cascade.einsums[einsum]
            .recurrence
            .as_ref()
            .is_some_and(|r| r.reverse);
        for (d, (index, expected)) in indices.iter().zip(&rec_output).enumerate() {
            if Some(d) == state_dim && reverse {
                // `reverse_state` found the last step here.
                continue;
            }
            if Some(d) == state_dim {
                if !matches!(index.kind, ExprKind::Int(0)) {
                    self.error(
                        Diagnostic::error(
                            DiagnosticKind::Recurrence,
                            "an init assigns step 0",
                            index.span,
                        )
                        .with_label(format!(
                            "expected `0` here, where the recurrence has `{} + 1`",
                            self.cascade.ranks[rec_rank].name
                        )),
                    );
                }
                continue;
            }
            let lowered = match &index.kind {
                ExprKind::Name(id) => match self.ranks.get(&id.name) {
                    Some(&r) => Some(self.expand(r, &mentioned)),
                    None => {
                        let d = self.unknown_rank(id);
                        self.error(d);
                        continue;
                    }
                },
                _ => None,
            };
            if lowered.as_ref() != Some(expected) {
                let expected_text = match self.cascade.tensors[tensor].ranks.get(d) {
                    Some(&r) => self.cascade.ranks[r].name.clone(),
                    None => "?".into(),
                };
                self.error(
                    Diagnostic::error(
                        DiagnosticKind::Recurrence,
                        format!(
                            "index {} of the init of `{tname}` must match its recurrence",
                            d + 1
                        ),
                        index.span,
                    )
                    .with_label(format!("expected `{expected_text}`"))
                    .with_related(self.cascade.einsums[einsum].output.span, "the recurrence"),
                );
            }
            state_ranks.extend(expected.ranks());
        }
        let init = self.value(value, &mentioned);
        let mut stray: Vec<Handle<Rank>> = Vec::new();
        init.visit_indices(&mut |i| {
            for r in i.ranks() {
                if !state_ranks.contains(&r) && !stray.contains(&r) {
                    stray.push(r);
                }
            }
        });
        for r in stray {
            let name = self.cascade.ranks[r].name.clone();
            let label = if r == rec_rank {
                "the init is step 0: it cannot depend on the step".to_string()
            } else {
                format!("`{name}` does not index `{tname}`")
            };
            self.error(
                Diagnostic::error(
                    DiagnosticKind::Recurrence,
                    format!("the init of `{tname}` uses rank `{name}`"),
                    value.span,
                )
                .with_label(label),
            );
        }
        if let Some(Some(entry)) = self.recurrences.get_mut(einsum.index()) {
            entry.1 = true;
        }
        if let Some(rec) = self.cascade.einsums[einsum].recurrence.as_mut() {
            rec.init = init;
            rec.init_span = span;
        }
    }

    fn missing_inits(&mut self) {
        for (i, entry) in self.recurrences.clone().into_iter().enumerate() {
            let Some((rank, false)) = entry else { continue };
            let e = &self.cascade.einsums[Handle::<Einsum>::new(i)];
            let t = &self.cascade.tensors[e.output.tensor];
            let state_dim = t.iterative;
            let reverse = e.recurrence.as_ref().is_some_and(|r| r.reverse);
            let parts: Vec<String> = t
                .ranks
                .iter()
                .enumerate()
                .map(|(d, &r)| {
                    if Some(d) == state_dim && reverse {
                        self.cascade.ranks[r].name.to_uppercase()
                    } else if Some(d) == state_dim {
                        "0".into()
                    } else {
                        self.cascade.ranks[r].name.clone()
                    }
                })
                .collect();
            let d = Diagnostic::error(
                DiagnosticKind::Recurrence,
                format!("recurrence `{}` has no init", t.name),
                e.output.span,
            )
            .with_label(format!(
                "advances `{}` along `{}` but step 0 is never given",
                t.name, self.cascade.ranks[rank].name
            ))
            .with_help(format!(
                "add `init {}[{}] = VALUE`",
                t.name,
                parts.join(", ")
            ));
            self.error(d);
        }
    }

    // ---- expressions ----

    /// The value of a bare name, when it is not part of an affine rank expression: a
    /// scalar tensor, a size or an extent.
    fn name_value(&mut self, id: &ast::Ident, span: Span) -> Expr {
        if let Some(&t) = self.tensors.get(&id.name) {
            let tensor = &self.cascade.tensors[t];
            if tensor.ranks.is_empty() {
                return Expr::Access(Access {
                    tensor: t,
                    indices: Vec::new(),
                    span,
                });
            }
            let names: Vec<&str> = tensor
                .ranks
                .iter()
                .map(|&r| self.cascade.ranks[r].name.as_str())
                .collect();
            let d = Diagnostic::error(
                DiagnosticKind::RankMismatch,
                format!("`{}` has {} ranks and needs indices", id.name, names.len()),
                span,
            )
            .with_label(format!("write `{}[{}]`", id.name, names.join(", ")));
            self.error(d);
            return Expr::Literal(0.0);
        }
        if let Some(v) = self.size_value(&id.name) {
            return Expr::Literal(v as f64);
        }
        let mut candidates: Vec<String> = self.tensors.keys().cloned().collect();
        candidates.extend(self.ranks.keys().cloned());
        candidates.extend(self.size_candidates());
        let mut d = Diagnostic::error(
            DiagnosticKind::UnknownName,
            format!("unknown name `{}`", id.name),
            span,
        )
        .with_label("not a tensor, rank, extent or size symbol");
        d.help = did_you_mean(&id.name, candidates.iter().map(String::as_str));
        self.error(d);
        Expr::Literal(0.0)
    }

    /// Lowers a value expression. A maximal affine subexpression that mentions a rank
    /// becomes one `Expr::Index`.
    fn value(&mut self, expr: &ast::Expr, mentioned: &[Handle<Rank>]) -> Expr {
        if let Ok(index) = self.affine(expr, mentioned) {
            if !index.terms.is_empty() {
                return Expr::Index(index);
            }
        }
        match &expr.kind {
            ExprKind::Int(v) => Expr::Literal(*v as f64),
            ExprKind::Float(v) => Expr::Literal(*v),
            ExprKind::Inf => Expr::Literal(f64::INFINITY),
            ExprKind::Name(id) => match self.ranks.get(&id.name) {
                // Only reached when the rank's index does not fit (overflow).
                Some(_) if !self.tensors.contains_key(&id.name) => {
                    let d = Diagnostic::error(
                        DiagnosticKind::BadIndex,
                        "index arithmetic overflows",
                        expr.span,
                    );
                    self.error(d);
                    Expr::Literal(0.0)
                }
                _ => self.name_value(id, expr.span),
            },
            ExprKind::Access { name, indices } => self.access(name, indices, expr.span, mentioned),
            ExprKind::Call { func, args } => self.call(func, args, expr.span, mentioned),
            ExprKind::Neg(a) => match &a.kind {
                ExprKind::Int(v) => Expr::Literal(-(*v as f64)),
                ExprKind::Float(v) => Expr::Literal(-*v),
                ExprKind::Inf => Expr::Literal(f64::NEG_INFINITY),
                _ => Expr::unary(UnaryOp::Neg, self.value(a, mentioned)),
            },
            ExprKind::Binary(op, a, b) => {
                let op = match op {
                    BinOp::Pow => {
                        // `a ^ b = exp(b * log(a))` (a > 0): decays written as powers read
                        // as the exponentials the kernels and the interpreter know.
                        let a = self.value(a, mentioned);
                        let b = self.value(b, mentioned);
                        return Expr::unary(
                            UnaryOp::Exp,
                            Expr::binary(BinaryOp::Mul, b, Expr::unary(UnaryOp::Log, a)),
                        );
                    }
                    BinOp::Add => BinaryOp::Add,
                    BinOp::Sub => BinaryOp::Sub,
                    BinOp::Mul => BinaryOp::Mul,
                    BinOp::Div => BinaryOp::Div,
                    BinOp::Cmp(c) => match c {
                        ast::CmpOp::Lt => BinaryOp::Lt,
                        ast::CmpOp::Le => BinaryOp::Le,
                        ast::CmpOp::Gt => BinaryOp::Gt,
                        ast::CmpOp::Ge => BinaryOp::Ge,
                        ast::CmpOp::Eq => BinaryOp::Eq,
                        ast::CmpOp::Ne => BinaryOp::Ne,
                    },
                };
                let a = self.value(a, mentioned);
                let b = self.value(b, mentioned);
                Expr::binary(op, a, b)
            }
        }
    }

    fn access(
        &mut self,
        name: &ast::Ident,
        indices: &[ast::Expr],
        span: Span,
        mentioned: &[Handle<Rank>],
    ) -> Expr {
        let Some(&tensor) = self.tensors.get(&name.name) else {
            let mut d = Diagnostic::error(
                DiagnosticKind::UnknownName,
                format!("unknown tensor `{}`", name.name),
                name.span,
            )
            .with_label("not declared, and no Einsum assigns it");
            d.help = if REDUCTIONS.contains(&name.name.as_str()) {
                Some(format!(
                    "`{0}[...]` followed by `-` reads as a tensor minus something; for a reduction, \
                     wrap the expression after the prefix in parentheses: `{0}[r] (-X)`",
                    name.name
                ))
            } else if self.ranks.contains_key(&name.name) {
                Some(format!("`{}` is a rank, not a tensor", name.name))
            } else {
                did_you_mean(&name.name, self.tensors.keys().map(String::as_str))
            };
            self.error(d);
            // Still check the indices, for their own errors.
            for i in indices {
                self.index(i, mentioned);
            }
            return Expr::Literal(0.0);
        };
        let mut lowered = Vec::new();
        for i in indices {
            match self.index(i, mentioned) {
                Some(ix) => lowered.push(ix),
                None => return Expr::Literal(0.0),
            }
        }
        self.index_spans
            .insert(span, indices.iter().map(|i| i.span).collect());
        Expr::Access(Access {
            tensor,
            indices: lowered,
            span,
        })
    }

    fn call(
        &mut self,
        func: &ast::Ident,
        args: &[ast::Expr],
        span: Span,
        mentioned: &[Handle<Rank>],
    ) -> Expr {
        let lowered: Vec<Expr> = args.iter().map(|a| self.value(a, mentioned)).collect();
        let Some(&(_, arity)) = FUNCTIONS.iter().find(|(n, _)| *n == func.name) else {
            let mut d = Diagnostic::error(
                DiagnosticKind::UnknownName,
                format!("unknown function `{}`", func.name),
                func.span,
            )
            .with_label("not a map function");
            d.help = if self.tensors.contains_key(&func.name) {
                Some(format!(
                    "index a tensor with brackets: `{}[...]`",
                    func.name
                ))
            } else {
                Some(
                    match did_you_mean(&func.name, FUNCTIONS.iter().map(|(n, _)| *n)) {
                        Some(hint) => hint,
                        None => {
                            "the functions are exp, log, sqrt, tanh, neg, max and min".to_string()
                        }
                    },
                )
            };
            self.error(d);
            return Expr::Literal(0.0);
        };
        if lowered.len() != arity {
            self.error(
                Diagnostic::error(
                    DiagnosticKind::Invalid,
                    format!(
                        "`{}` takes {arity} argument{} but is given {}",
                        func.name,
                        if arity == 1 { "" } else { "s" },
                        lowered.len()
                    ),
                    span,
                )
                .with_label(format!("wrong number of arguments to `{}`", func.name)),
            );
            return Expr::Literal(0.0);
        }
        let mut it = lowered.into_iter();
        let (Some(a), b) = (it.next(), it.next()) else {
            return Expr::Literal(0.0);
        };
        match (func.name.as_str(), b) {
            ("exp", _) => Expr::unary(UnaryOp::Exp, a),
            ("log", _) => Expr::unary(UnaryOp::Log, a),
            ("sqrt", _) => Expr::unary(UnaryOp::Sqrt, a),
            ("tanh", _) => Expr::unary(UnaryOp::Tanh, a),
            ("neg", _) => Expr::unary(UnaryOp::Neg, a),
            ("max", Some(b)) => Expr::binary(BinaryOp::Max, a, b),
            ("min", Some(b)) => Expr::binary(BinaryOp::Min, a, b),
            _ => Expr::Literal(0.0),
        }
    }

    /// Whether one side of a `where` condition is a value rather than an index: it reads
    /// a tensor (a scalar parameter included), calls a function or has a non-integer
    /// literal.
    fn is_value_side(&self, expr: &ast::Expr) -> bool {
        let mut stack = vec![expr];
        while let Some(e) = stack.pop() {
            match &e.kind {
                ExprKind::Float(_) | ExprKind::Inf => return true,
                ExprKind::Access { .. } | ExprKind::Call { .. } => return true,
                ExprKind::Name(id) => {
                    if self.tensors.contains_key(&id.name) && !self.ranks.contains_key(&id.name) {
                        return true;
                    }
                }
                ExprKind::Int(_) => {}
                ExprKind::Neg(a) => stack.push(a),
                ExprKind::Binary(_, a, b) => {
                    stack.push(a);
                    stack.push(b);
                }
            }
        }
        false
    }

    /// Lowers an index expression, reporting why when it is not affine.
    fn index(&mut self, expr: &ast::Expr, mentioned: &[Handle<Rank>]) -> Option<IndexExpr> {
        match self.affine(expr, mentioned) {
            Ok(ix) => Some(ix),
            Err(NotAffine::Because(d)) => {
                self.error(*d);
                None
            }
            Err(NotAffine::No) => {
                self.error(
                    Diagnostic::error(
                        DiagnosticKind::BadIndex,
                        "an index must be an affine integer expression",
                        expr.span,
                    )
                    .with_label("not affine")
                    .with_help(
                        "combine ranks, integers and extents with `+`, `-`, and `*` by a constant",
                    ),
                );
                None
            }
        }
    }

    /// The affine form of an expression, or why it has none. Pure: reports nothing.
    fn affine(&self, expr: &ast::Expr, mentioned: &[Handle<Rank>]) -> Result<IndexExpr, NotAffine> {
        let overflow = || {
            NotAffine::Because(Box::new(Diagnostic::error(
                DiagnosticKind::BadIndex,
                "index arithmetic overflows",
                expr.span,
            )))
        };
        let not_affine = |label: &str| {
            NotAffine::Because(Box::new(
                Diagnostic::error(
                    DiagnosticKind::BadIndex,
                    "an index must be an affine integer expression",
                    expr.span,
                )
                .with_label(label.to_string())
                .with_help(
                    "combine ranks, integers and extents with `+`, `-`, and `*` by a constant",
                ),
            ))
        };
        match &expr.kind {
            ExprKind::Int(v) => i64::try_from(*v)
                .map(IndexExpr::constant)
                .map_err(|_| overflow()),
            ExprKind::Float(_) | ExprKind::Inf => Err(not_affine("an index is an integer")),
            ExprKind::Name(id) => {
                if self.tensors.contains_key(&id.name) {
                    return Err(NotAffine::No);
                }
                if let Some(&r) = self.ranks.get(&id.name) {
                    return Ok(self.expand(r, mentioned));
                }
                if let Some(v) = self.size_value(&id.name) {
                    return i64::try_from(v)
                        .map(IndexExpr::constant)
                        .map_err(|_| overflow());
                }
                let mut candidates: Vec<String> = self.ranks.keys().cloned().collect();
                candidates.extend(self.size_candidates());
                let mut d = Diagnostic::error(
                    DiagnosticKind::UnknownName,
                    format!("unknown rank or size `{}`", id.name),
                    id.span,
                )
                .with_label("not a rank, an extent or a size symbol");
                d.help = did_you_mean(&id.name, candidates.iter().map(String::as_str));
                Err(NotAffine::Because(Box::new(d)))
            }
            ExprKind::Access { .. } | ExprKind::Call { .. } => Err(NotAffine::No),
            ExprKind::Neg(a) => {
                let a = self.affine(a, mentioned)?;
                scale(&a, -1).ok_or_else(overflow)
            }
            ExprKind::Binary(op, a, b) => {
                let (a, b) = match (self.affine(a, mentioned), self.affine(b, mentioned)) {
                    (Ok(a), Ok(b)) => (a, b),
                    (Err(NotAffine::Because(d)), _) | (_, Err(NotAffine::Because(d))) => {
                        return Err(NotAffine::Because(d))
                    }
                    _ => return Err(NotAffine::No),
                };
                match op {
                    BinOp::Add => add(&a, &b, 1).ok_or_else(overflow),
                    BinOp::Sub => add(&a, &b, -1).ok_or_else(overflow),
                    BinOp::Mul if a.terms.is_empty() => scale(&b, a.constant).ok_or_else(overflow),
                    BinOp::Mul if b.terms.is_empty() => scale(&a, b.constant).ok_or_else(overflow),
                    BinOp::Mul => Err(not_affine("a product of two ranks is not affine")),
                    BinOp::Div => Err(not_affine("division is not affine")),
                    BinOp::Pow => Err(not_affine("a power is not affine")),
                    BinOp::Cmp(_) => Err(not_affine("a comparison is not an index")),
                }
            }
        }
    }
}
