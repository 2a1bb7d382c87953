//! Prints a Cascade as `.ein` text that parses back to the same IR (spans aside; see
//! [`without_spans`]). Sizes appear as their bound values: an extent or a tile prints as
//! the integer it was bound to, except a rank's own extent written as a size symbol.
//!
//! The printer mirrors the front end's lowering rules so the round trip is exact:
//! - a maximal affine subexpression that mentions a rank lowers to one `Expr::Index`, so
//!   an integer literal next to `+ - *` prints as `2.0` (a float is never affine) lest
//!   it merge with a neighbouring rank value on the way back;
//! - `-` directly on a literal or a rank value would fold into it, so `Neg` of those
//!   prints as the call `neg(...)`;
//! - implicit sums are innermost, in order of first mention, so leading sums print
//!   implicitly when that order reproduces them and as `sum[r]` prefixes otherwise.

use crate::arena::Handle;
use crate::cascade::*;
use std::fmt::Write;

/// The whole cascade as `.ein` source.
pub fn print(cascade: &Cascade) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "kernel {}", cascade.name);
    if !cascade.sizes.is_empty() {
        out.push('\n');
        for (name, value) in &cascade.sizes {
            let fixed = if cascade.fixed_sizes.contains(name) {
                " fixed"
            } else {
                ""
            };
            let _ = writeln!(out, "size {name} = {value}{fixed}");
        }
    }
    if !cascade.ranks.is_empty() {
        out.push('\n');
    }
    for (_, rank) in cascade.ranks.iter() {
        match rank.parent.and_then(|p| cascade.ranks.get(p)) {
            None => {
                let extent = match &rank.source {
                    ExtentSource::Symbol(s) => s.clone(),
                    _ => rank.extent.to_string(),
                };
                let _ = writeln!(out, "rank {}: {extent}", rank.name);
            }
            Some(parent) => {
                // Both children come from one `split`; print it at the outer child.
                let Some(split) = &parent.split else { continue };
                if cascade.ranks.get(split.outer).map(|r| &r.name) != Some(&rank.name) {
                    continue;
                }
                let inner = cascade.ranks.get(split.inner);
                let _ = writeln!(
                    out,
                    "split {} -> {}, {}: {}",
                    parent.name,
                    rank.name,
                    inner.map_or("?", |r| r.name.as_str()),
                    inner.map_or(0, |r| r.extent)
                );
            }
        }
    }
    let declared: Vec<&Tensor> = cascade
        .tensors
        .iter()
        .map(|(_, t)| t)
        .filter(|t| t.kind != TensorKind::Temp)
        .collect();
    if !declared.is_empty() {
        out.push('\n');
    }
    for t in declared {
        let keyword = match t.kind {
            TensorKind::Input => "input",
            TensorKind::Param => "param",
            TensorKind::Output | TensorKind::Temp => "output",
        };
        let _ = write!(out, "{keyword} {}", t.name);
        if !t.ranks.is_empty() {
            let names: Vec<&str> = t.ranks.iter().map(|&r| rank_name(cascade, r)).collect();
            let _ = write!(out, "[{}]", names.join(", "));
        }
        let _ = write!(out, ": {}", t.dtype.map_or("f32", DType::name));
        if let Some(v) = t.default {
            let _ = write!(out, " = {}", number(v));
        }
        out.push('\n');
    }
    if !cascade.einsums.is_empty() {
        out.push('\n');
    }
    for (h, _) in cascade.einsums.iter() {
        out.push_str(&einsum_to_string(cascade, h));
    }
    out
}

/// One Einsum as a statement (plus its `init` statement for a recurrence), each ending in
/// a newline.
pub fn einsum_to_string(cascade: &Cascade, einsum: Handle<Einsum>) -> String {
    let e = &cascade.einsums[einsum];
    let mentioned = e.mentioned_ranks();
    let mut out = String::new();
    out.push_str(&output_to_string(cascade, &e.output, &mentioned, None));
    out.push_str(" = ");
    let explicit = explicit_reductions(e);
    let body = expr_to_string(cascade, &e.expr);
    for red in explicit.iter().rev() {
        let _ = write!(out, "{}[{}] ", red.op.name(), rank_name(cascade, red.rank));
    }
    if !explicit.is_empty() && body.starts_with('-') {
        // After a prefix the expression may not start with unary minus (see the grammar).
        let _ = write!(out, "({body})");
    } else {
        out.push_str(&body);
    }
    for (i, c) in e.mask.iter().enumerate() {
        out.push_str(if i == 0 { " where " } else { " and " });
        let _ = write!(
            out,
            "{} {} {}",
            index_to_string(cascade, &c.lhs),
            c.op.symbol(),
            index_to_string(cascade, &c.rhs)
        );
    }
    // Value conditions after the affine ones: the front end sorts them the same way.
    for (i, c) in e.value_mask.iter().enumerate() {
        out.push_str(if i == 0 && e.mask.is_empty() {
            " where "
        } else {
            " and "
        });
        let mut lhs = String::new();
        let mut rhs = String::new();
        write_expr(cascade, &c.lhs, SUM, false, &mut lhs);
        write_expr(cascade, &c.rhs, SUM, false, &mut rhs);
        let _ = write!(out, "{lhs} {} {rhs}", c.op.symbol());
    }
    out.push('\n');
    if let Some(rec) = &e.recurrence {
        let tensor = cascade.tensors.get(e.output.tensor);
        let init = tensor.and_then(|t| t.iterative).map(|d| {
            let extent = cascade.ranks.get(rec.rank).map_or(0, |r| r.extent);
            let step = IndexExpr::constant(rec.init_step(extent));
            // The last step of a reverse state by its extent name where that reads back.
            let text = final_step_name(cascade, tensor, d, &step)
                .or_else(|| symbol_extent(cascade, rec.rank).filter(|_| rec.reverse))
                .unwrap_or_else(|| step.constant.to_string());
            (d, text)
        });
        let _ = writeln!(
            out,
            "init {} = {}",
            output_to_string(cascade, &e.output, &mentioned, init),
            expr_to_string(cascade, &rec.init)
        );
    }
    out
}

fn rank_name(cascade: &Cascade, rank: Handle<Rank>) -> &str {
    cascade.ranks.get(rank).map_or("?", |r| r.name.as_str())
}

/// What the front end turns the name of `rank` into inside an Einsum that mentions
/// `mentioned`: the rank itself, or for a split parent with a mentioned descendant,
/// `outer * INNER + inner` (recursively).
pub fn split_expansion(
    cascade: &Cascade,
    rank: Handle<Rank>,
    mentioned: &[Handle<Rank>],
) -> IndexExpr {
    fn go(
        cascade: &Cascade,
        rank: Handle<Rank>,
        mentioned: &[Handle<Rank>],
        depth: usize,
    ) -> IndexExpr {
        let Some(r) = cascade.ranks.get(rank) else {
            return IndexExpr::rank(rank);
        };
        match &r.split {
            Some(s) if depth < 64 && has_mentioned_descendant(cascade, rank, mentioned) => {
                let outer = go(cascade, s.outer, mentioned, depth + 1);
                let inner = go(cascade, s.inner, mentioned, depth + 1);
                let tile = cascade.ranks.get(s.inner).map_or(1, |r| r.extent) as i64;
                // Saturating: only absurd extents could overflow, and validation rejects those.
                let mut e = IndexExpr::constant(
                    outer
                        .constant
                        .saturating_mul(tile)
                        .saturating_add(inner.constant),
                );
                for (c, r) in &outer.terms {
                    e.add_term(c.saturating_mul(tile), *r);
                }
                for (c, r) in &inner.terms {
                    e.add_term(*c, *r);
                }
                e
            }
            _ => IndexExpr::rank(rank),
        }
    }
    go(cascade, rank, mentioned, 0)
}

/// Whether a split descendant of `rank` (not `rank` itself) is in `mentioned`.
pub fn has_mentioned_descendant(
    cascade: &Cascade,
    rank: Handle<Rank>,
    mentioned: &[Handle<Rank>],
) -> bool {
    let mut stack = vec![(rank, 0usize)];
    while let Some((r, depth)) = stack.pop() {
        let Some(split) = cascade.ranks.get(r).and_then(|r| r.split.as_ref()) else {
            continue;
        };
        for child in [split.outer, split.inner] {
            if mentioned.contains(&child) {
                return true;
            }
            if depth < 64 {
                stack.push((child, depth + 1));
            }
        }
    }
    false
}

/// An output access: each index as the dimension's rank name where it is that rank (or
/// its split composition), `r + 1` for a recurrence's next step, and at `init`'s
/// dimension its text (`0`, or the last step of a reverse state).
fn output_to_string(
    cascade: &Cascade,
    access: &Access,
    mentioned: &[Handle<Rank>],
    init: Option<(usize, String)>,
) -> String {
    let tensor = cascade.tensors.get(access.tensor);
    let name = tensor.map_or("?", |t| t.name.as_str());
    if access.indices.is_empty() {
        return name.to_string();
    }
    let parts: Vec<String> = access
        .indices
        .iter()
        .enumerate()
        .map(|(d, index)| {
            if let Some((dim, text)) = &init {
                if *dim == d {
                    return text.clone();
                }
            }
            if let Some(&dim_rank) = tensor.and_then(|t| t.ranks.get(d)) {
                if *index == split_expansion(cascade, dim_rank, mentioned) {
                    return rank_name(cascade, dim_rank).to_string();
                }
            }
            index_to_string(cascade, index)
        })
        .collect();
    format!("{name}[{}]", parts.join(", "))
}

/// Which reductions must be written as prefixes (innermost first): all but the leading
/// sums that the implicit rule (first mention order) reproduces.
fn explicit_reductions(e: &Einsum) -> &[Reduction] {
    let mut output_ranks: Vec<Handle<Rank>> = Vec::new();
    for i in &e.output.indices {
        output_ranks.extend(i.ranks());
    }
    let mut first_mentions: Vec<Handle<Rank>> = Vec::new();
    let mut add = |i: &IndexExpr| {
        for r in i.ranks() {
            if !first_mentions.contains(&r) && !output_ranks.contains(&r) {
                first_mentions.push(r);
            }
        }
    };
    e.expr.visit_indices(&mut add);
    for c in &e.mask {
        add(&c.lhs);
        add(&c.rhs);
    }
    for c in &e.value_mask {
        c.visit_indices(&mut add);
    }
    let reductions = e.reductions.as_slice();
    for k in (0..=reductions.len()).rev() {
        let (implicit, explicit) = reductions.split_at(k);
        if implicit.iter().any(|r| r.op != ReduceOp::Sum) {
            continue;
        }
        let expected: Vec<Handle<Rank>> = first_mentions
            .iter()
            .copied()
            .filter(|r| !explicit.iter().any(|x| x.rank == *r))
            .collect();
        if expected.len() == implicit.len()
            && expected.iter().zip(implicit).all(|(a, b)| *a == b.rank)
        {
            return explicit;
        }
    }
    reductions
}

/// A number as the lexer reads it back: integers without a fraction, very large or small
/// magnitudes in exponent form, the rest in the shortest decimal that round-trips.
pub fn number(v: f64) -> String {
    if v.is_infinite() {
        return if v > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if v.is_nan() {
        return "nan".into();
    }
    let a = v.abs();
    if v.fract() == 0.0 && a < 1e15 {
        format!("{}", v as i64)
    } else if !(1e-4..1e15).contains(&a) {
        format!("{v:e}")
    } else {
        format!("{v}")
    }
}

/// Like [`number`], but always a float token (`2.0`, `1e30`), so it cannot be read as an
/// integer in an affine index expression.
fn float_number(v: f64) -> String {
    let s = number(v);
    if v.is_finite() && !s.contains(['.', 'e']) {
        format!("{s}.0")
    } else {
        s
    }
}

/// An affine index: `64*m1 + m0`, `p - m`, `-j + 63`, `0`.
pub fn index_to_string(cascade: &Cascade, index: &IndexExpr) -> String {
    let mut out = String::new();
    for (coef, rank) in &index.terms {
        let name = rank_name(cascade, *rank);
        let magnitude = coef.unsigned_abs();
        if out.is_empty() {
            if *coef < 0 {
                out.push('-');
            }
        } else {
            out.push_str(if *coef < 0 { " - " } else { " + " });
        }
        if magnitude == 1 {
            out.push_str(name);
        } else {
            let _ = write!(out, "{magnitude}*{name}");
        }
    }
    let k = index.constant;
    if out.is_empty() {
        let _ = write!(out, "{k}");
    } else if k != 0 {
        let _ = write!(
            out,
            " {} {}",
            if k < 0 { '-' } else { '+' },
            k.unsigned_abs()
        );
    }
    out
}

// Precedence levels, loosest first, as in the grammar.
const CMP: u8 = 1;
const SUM: u8 = 2;
const PRODUCT: u8 = 3;
const UNARY: u8 = 4;
const ATOM: u8 = 5;

/// An expression as `.ein` text.
pub fn expr_to_string(cascade: &Cascade, expr: &Expr) -> String {
    let mut out = String::new();
    write_expr(cascade, expr, 0, false, &mut out);
    out
}

/// Writes `expr`, parenthesized if its precedence is below `min`. `arith_operand` marks an
/// operand of `+ - *`, where an integral literal must print as a float.
fn write_expr(cascade: &Cascade, expr: &Expr, min: u8, arith_operand: bool, out: &mut String) {
    let (level, text) = match expr {
        Expr::Literal(v) => {
            let text = if arith_operand {
                float_number(*v)
            } else {
                number(*v)
            };
            (if *v < 0.0 { UNARY } else { ATOM }, text)
        }
        Expr::Access(a) => (ATOM, access_to_string(cascade, a)),
        Expr::Index(i) => {
            if i.as_rank().is_some() {
                (ATOM, index_to_string(cascade, i))
            } else {
                (ATOM, format!("({})", index_to_string(cascade, i)))
            }
        }
        Expr::Unary(UnaryOp::Neg, a) if !matches!(**a, Expr::Literal(_) | Expr::Index(_)) => {
            let mut s = String::from("-");
            write_expr(cascade, a, UNARY, false, &mut s);
            (UNARY, s)
        }
        Expr::Unary(op, a) => (
            ATOM,
            format!("{}({})", op.name(), expr_to_string(cascade, a)),
        ),
        Expr::Binary(op, a, b) => match op.infix() {
            None => (
                ATOM,
                format!(
                    "{}({}, {})",
                    op.name(),
                    expr_to_string(cascade, a),
                    expr_to_string(cascade, b)
                ),
            ),
            Some(symbol) => {
                let (level, left_min, right_min) = match op {
                    BinaryOp::Add | BinaryOp::Sub => (SUM, SUM, PRODUCT),
                    BinaryOp::Mul | BinaryOp::Div => (PRODUCT, PRODUCT, UNARY),
                    _ => (CMP, SUM, SUM),
                };
                let arith = matches!(op, BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul);
                let mut s = String::new();
                write_expr(cascade, a, left_min, arith, &mut s);
                let _ = write!(s, " {symbol} ");
                write_expr(cascade, b, right_min, arith, &mut s);
                (level, s)
            }
        },
    };
    if level < min {
        let _ = write!(out, "({text})");
    } else {
        out.push_str(&text);
    }
}

fn access_to_string(cascade: &Cascade, access: &Access) -> String {
    let tensor = cascade.tensors.get(access.tensor);
    let name = tensor.map_or("?", |t| t.name.as_str());
    if access.indices.is_empty() {
        return name.to_string();
    }
    let parts: Vec<String> = access
        .indices
        .iter()
        .enumerate()
        .map(|(d, i)| match final_step_name(cascade, tensor, d, i) {
            Some(extent) => extent,
            None => index_to_string(cascade, i),
        })
        .collect();
    format!("{name}[{}]", parts.join(", "))
}

/// The extent name `R` for a read of a state's final step (`RNV[M1, ...]`), so the printed
/// text reads the final step at any size; `None` for any other index, or when `R` would
/// not read back as that extent (a size symbol or another rank with the same name).
fn final_step_name(
    cascade: &Cascade,
    tensor: Option<&Tensor>,
    dim: usize,
    index: &IndexExpr,
) -> Option<String> {
    let t = tensor?;
    if t.iterative != Some(dim) || !index.terms.is_empty() {
        return None;
    }
    let rank = cascade.ranks.get(*t.ranks.get(dim)?)?;
    if index.constant != i64::try_from(rank.extent).ok()? {
        return None;
    }
    let upper = rank.name.to_uppercase();
    let unique = cascade
        .ranks
        .iter()
        .filter(|(_, r)| r.name.to_uppercase() == upper)
        .count()
        == 1;
    let shadowed = cascade.sizes.iter().any(|(s, _)| *s == upper);
    (unique && !shadowed).then_some(upper)
}

/// The size symbol a rank's extent is written as, when it is exactly one symbol
/// (`rank t: T`): that name reads back as the extent at any size.
fn symbol_extent(cascade: &Cascade, rank: Handle<Rank>) -> Option<String> {
    match &cascade.ranks.get(rank)?.source {
        ExtentSource::Symbol(s) if cascade.sizes.iter().any(|(n, _)| n == s) => Some(s.clone()),
        _ => None,
    }
}

/// A copy with every span set to `Span::UNKNOWN`, to compare cascades parsed from
/// different text.
pub fn without_spans(cascade: &Cascade) -> Cascade {
    fn clear_expr(e: &mut Expr) {
        match e {
            Expr::Literal(_) | Expr::Index(_) => {}
            Expr::Access(a) => a.span = Span::UNKNOWN,
            Expr::Unary(_, a) => clear_expr(a),
            Expr::Binary(_, a, b) => {
                clear_expr(a);
                clear_expr(b);
            }
        }
    }
    let mut c = cascade.clone();
    for h in c.ranks.handles() {
        c.ranks[h].span = Span::UNKNOWN;
    }
    for h in c.tensors.handles() {
        c.tensors[h].span = Span::UNKNOWN;
    }
    for h in c.einsums.handles() {
        let e = &mut c.einsums[h];
        e.span = Span::UNKNOWN;
        e.output.span = Span::UNKNOWN;
        clear_expr(&mut e.expr);
        for m in &mut e.mask {
            m.span = Span::UNKNOWN;
        }
        for v in &mut e.value_mask {
            v.span = Span::UNKNOWN;
            clear_expr(&mut v.lhs);
            clear_expr(&mut v.rhs);
        }
        if let Some(rec) = &mut e.recurrence {
            rec.init_span = Span::UNKNOWN;
            clear_expr(&mut rec.init);
        }
    }
    c
}
