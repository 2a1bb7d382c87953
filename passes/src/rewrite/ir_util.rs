//! Small operations on the Cascade IR shared by the rewrites: rank substitution, reading
//! a tensor's definition through map-only temporaries, naming, and tidying a cascade
//! after Einsums were added or dropped.

use einattn_ir::{
    Access, BinaryOp, Cascade, Einsum, Expr, Handle, IndexExpr, Rank, Tensor, TensorKind,
};
use std::collections::HashMap;

/// `index` with each rank in `rename` replaced by its expression (simultaneously).
pub fn substitute_index(index: &IndexExpr, rename: &HashMap<Handle<Rank>, IndexExpr>) -> IndexExpr {
    if rename.is_empty() {
        return index.clone();
    }
    let mut out = IndexExpr::constant(index.constant);
    for &(coef, rank) in &index.terms {
        match rename.get(&rank) {
            Some(with) => {
                out.constant += coef * with.constant;
                for &(c, r) in &with.terms {
                    out.add_term(coef * c, r);
                }
            }
            None => out.add_term(coef, rank),
        }
    }
    out
}

/// `expr` with every index expression (accesses and rank values) renamed.
pub fn substitute_expr(expr: &Expr, rename: &HashMap<Handle<Rank>, IndexExpr>) -> Expr {
    map_accesses(
        expr,
        &mut |a| {
            Expr::Access(Access {
                tensor: a.tensor,
                indices: a
                    .indices
                    .iter()
                    .map(|i| substitute_index(i, rename))
                    .collect(),
                span: a.span,
            })
        },
        rename,
    )
}

/// Rebuilds `expr`, replacing each access by `f(access)` and renaming rank values.
pub fn map_accesses(
    expr: &Expr,
    f: &mut dyn FnMut(&Access) -> Expr,
    rename: &HashMap<Handle<Rank>, IndexExpr>,
) -> Expr {
    match expr {
        Expr::Literal(v) => Expr::Literal(*v),
        Expr::Index(i) => Expr::Index(substitute_index(i, rename)),
        Expr::Access(a) => f(a),
        Expr::Unary(op, a) => Expr::unary(*op, map_accesses(a, f, rename)),
        Expr::Binary(op, a, b) => {
            let a = map_accesses(a, f, rename);
            let b = map_accesses(b, f, rename);
            Expr::binary(*op, a, b)
        }
    }
}

/// Whether `expr` reads `tensor`.
pub fn reads(expr: &Expr, tensor: Handle<Tensor>) -> bool {
    let mut found = false;
    expr.visit_accesses(&mut |a| found |= a.tensor == tensor);
    found
}

/// Per Einsum, whether the expression-level rewrites must leave it as it is: a
/// recurrence, a member of a step body (its steps interleave with the others'), or an
/// Einsum with a data-dependent mask (the e-graph's masks are affine conditions).
pub fn opaque_einsums(cascade: &Cascade) -> Vec<bool> {
    let mut opaque: Vec<bool> = cascade
        .einsums
        .iter()
        .map(|(_, e)| e.recurrence.is_some() || !e.value_mask.is_empty())
        .collect();
    for body in einattn_ir::validate::step_bodies(cascade) {
        for e in body.einsums {
            opaque[e.index()] = true;
        }
    }
    opaque
}

/// Whether some Einsum has a data-dependent mask (a `where` on values).
pub fn has_value_masks(cascade: &Cascade) -> bool {
    cascade
        .einsums
        .iter()
        .any(|(_, e)| !e.value_mask.is_empty())
}

/// Per tensor, whether some element may be absent: a mask over the producer's free ranks,
/// or a map (no reduction) over something that may be absent.
pub fn tensors_may_be_absent(cascade: &Cascade, order: &[Handle<Einsum>]) -> Vec<bool> {
    let mut absent = vec![false; cascade.tensors.len()];
    for &e in order {
        let einsum = &cascade.einsums[e];
        let outer_mask = einsum.mask.iter().any(|c| {
            !einsum
                .reductions
                .iter()
                .any(|r| c.lhs.mentions(r.rank) || c.rhs.mentions(r.rank))
        }) || einsum
            .value_mask
            .iter()
            .any(|v| !einsum.reductions.iter().any(|r| v.mentions(r.rank)));
        let mut reads_absent = false;
        einsum.visit_reads(&mut |a| reads_absent |= absent[a.tensor.index()]);
        absent[einsum.output.tensor.index()] =
            outer_mask || (einsum.reductions.is_empty() && reads_absent);
    }
    absent
}

/// The definition of a map-only temporary (no reduction, mask or recurrence, plain
/// output ranks), renamed to be read at `access`.
pub fn map_definition(cascade: &Cascade, access: &Access) -> Option<Expr> {
    let t = &cascade.tensors[access.tensor];
    if t.kind != TensorKind::Temp || t.iterative.is_some() {
        return None;
    }
    let e = &cascade.einsums[cascade.producer(access.tensor)?];
    if !e.reductions.is_empty()
        || !e.mask.is_empty()
        || !e.value_mask.is_empty()
        || e.recurrence.is_some()
    {
        return None;
    }
    let mut rename = HashMap::new();
    for (o, i) in e.output.indices.iter().zip(&access.indices) {
        rename.insert(o.as_rank()?, i.clone());
    }
    Some(substitute_expr(&e.expr, &rename))
}

/// `expr` with map-only temporaries replaced by their definitions, recursively: the form
/// the structural rewrites match on, whatever the user chose to name.
pub fn inline_maps(cascade: &Cascade, expr: &Expr) -> Expr {
    fn go(cascade: &Cascade, expr: &Expr, depth: usize) -> Expr {
        map_accesses(
            expr,
            &mut |a| match (depth < 64).then(|| map_definition(cascade, a)).flatten() {
                Some(def) => go(cascade, &def, depth + 1),
                None => Expr::Access(a.clone()),
            },
            &HashMap::new(),
        )
    }
    go(cascade, expr, 0)
}

/// The factors of a product, flattened (`a * (b * c)` gives `[a, b, c]`).
pub fn factors(expr: &Expr) -> Vec<Expr> {
    match expr {
        Expr::Binary(BinaryOp::Mul, a, b) => {
            let mut out = factors(a);
            out.extend(factors(b));
            out
        }
        other => vec![other.clone()],
    }
}

/// The product of `factors` (`1` when empty).
pub fn product(factors: impl IntoIterator<Item = Expr>) -> Expr {
    factors
        .into_iter()
        .reduce(|a, b| Expr::binary(BinaryOp::Mul, a, b))
        .unwrap_or(Expr::Literal(1.0))
}

/// Ranks mentioned anywhere in `expr`.
pub fn expr_ranks(expr: &Expr) -> Vec<Handle<Rank>> {
    let mut out = Vec::new();
    expr.visit_indices(&mut |i| {
        for r in i.ranks() {
            if !out.contains(&r) {
                out.push(r);
            }
        }
    });
    out
}

/// A name derived from the tensors an expression reads (`SN * V` gives `SNV`), as the
/// FuseMax cascades name their intermediates.
pub fn name_from_reads(cascade: &Cascade, expr: &Expr) -> String {
    let mut names: Vec<String> = Vec::new();
    expr.visit_accesses(&mut |a| {
        let n = &cascade.tensors[a.tensor].name;
        if !names.contains(n) {
            names.push(n.clone());
        }
    });
    let joined: String = names.iter().take(3).map(String::as_str).collect();
    if joined.is_empty() {
        "T".to_string()
    } else {
        joined
    }
}

/// `base`, or `base_2`, `base_3`, ...: the first not used by a tensor, rank or size.
pub fn fresh_name(cascade: &Cascade, base: &str) -> String {
    let taken = |n: &str| {
        cascade.tensors.iter().any(|(_, t)| t.name == n)
            || cascade.ranks.iter().any(|(_, r)| r.name == n)
            || cascade.sizes.iter().any(|(s, _)| s == n)
    };
    if !taken(base) {
        return base.to_string();
    }
    (2..)
        .map(|k| format!("{base}_{k}"))
        .find(|n| !taken(n))
        .unwrap_or_else(|| base.to_string())
}

/// A fresh rank name: `base`, else `base_2`, ...
pub fn fresh_rank_name(cascade: &Cascade, base: &str) -> String {
    fresh_name(cascade, base)
}

/// Puts Einsums in dependency order, drops Einsums whose temporary nobody reads (until
/// none is left), and removes temporaries no Einsum produces, renumbering handles.
pub fn tidy(cascade: &mut Cascade) {
    loop {
        let mut read = vec![false; cascade.tensors.len()];
        for (_, e) in cascade.einsums.iter() {
            e.expr.visit_accesses(&mut |a| {
                if a.tensor != e.output.tensor {
                    read[a.tensor.index()] = true;
                }
            });
            for v in &e.value_mask {
                v.visit_accesses(&mut |a| read[a.tensor.index()] = true);
            }
            if let Some(rec) = &e.recurrence {
                rec.init
                    .visit_accesses(&mut |a| read[a.tensor.index()] = true);
            }
        }
        let dead: Vec<Handle<Einsum>> = cascade
            .einsums
            .iter()
            .filter(|(_, e)| {
                cascade.tensors[e.output.tensor].kind == TensorKind::Temp
                    && !read[e.output.tensor.index()]
            })
            .map(|(h, _)| h)
            .collect();
        if dead.is_empty() {
            break;
        }
        let kept: Vec<Einsum> = cascade
            .einsums
            .iter()
            .filter(|(h, _)| !dead.contains(h))
            .map(|(_, e)| e.clone())
            .collect();
        cascade.einsums = Default::default();
        for e in kept {
            cascade.einsums.append(e);
        }
    }
    // Temporaries neither produced nor read go; every other handle is renumbered. (One
    // read but not produced stays, so validation names it instead of the read pointing at
    // whichever tensor takes its number.)
    let mut used = vec![false; cascade.tensors.len()];
    for (_, e) in cascade.einsums.iter() {
        used[e.output.tensor.index()] = true;
        e.visit_reads(&mut |a| {
            if let Some(u) = used.get_mut(a.tensor.index()) {
                *u = true;
            }
        });
    }
    let mut remap: Vec<Option<Handle<Tensor>>> = Vec::with_capacity(cascade.tensors.len());
    let mut tensors = einattn_ir::Arena::new();
    for (h, t) in cascade.tensors.iter() {
        if t.kind == TensorKind::Temp && !used[h.index()] {
            remap.push(None);
        } else {
            remap.push(Some(tensors.append(t.clone())));
        }
    }
    let fix = |a: &mut Access| {
        if let Some(Some(h)) = remap.get(a.tensor.index()) {
            a.tensor = *h;
        }
    };
    let order = einattn_ir::validate::topological_order(cascade);
    let mut einsums = einattn_ir::Arena::new();
    for h in order {
        let mut e = cascade.einsums[h].clone();
        fix(&mut e.output);
        e.expr = remap_expr(&e.expr, &fix);
        for v in e.value_mask.iter_mut() {
            v.lhs = remap_expr(&v.lhs, &fix);
            v.rhs = remap_expr(&v.rhs, &fix);
        }
        if let Some(rec) = e.recurrence.as_mut() {
            rec.init = remap_expr(&rec.init, &fix);
        }
        einsums.append(e);
    }
    cascade.tensors = tensors;
    cascade.einsums = einsums;
}

fn remap_expr(expr: &Expr, fix: &dyn Fn(&mut Access)) -> Expr {
    map_accesses(
        expr,
        &mut |a| {
            let mut a = a.clone();
            fix(&mut a);
            Expr::Access(a)
        },
        &HashMap::new(),
    )
}

/// Whether two expressions are the same computation (spans aside).
pub fn same_expr(a: &Expr, b: &Expr) -> bool {
    match (a, b) {
        (Expr::Literal(x), Expr::Literal(y)) => x.to_bits() == y.to_bits(),
        (Expr::Index(x), Expr::Index(y)) => {
            super::lang::canonical_index(x) == super::lang::canonical_index(y)
        }
        (Expr::Access(x), Expr::Access(y)) => {
            x.tensor == y.tensor
                && x.indices.len() == y.indices.len()
                && x.indices.iter().zip(&y.indices).all(|(i, j)| {
                    super::lang::canonical_index(i) == super::lang::canonical_index(j)
                })
        }
        (Expr::Unary(o1, x), Expr::Unary(o2, y)) => o1 == o2 && same_expr(x, y),
        (Expr::Binary(o1, x1, y1), Expr::Binary(o2, x2, y2)) => {
            o1 == o2 && same_expr(x1, x2) && same_expr(y1, y2)
        }
        _ => false,
    }
}
