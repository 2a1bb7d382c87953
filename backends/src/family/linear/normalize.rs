//! Normal forms the linear recognizer reads a cascade in, so that what researchers write
//! maps without one pattern per spelling:
//!
//! - **feature maps**: an element-wise function of one 16-bit input (`FQ[...] =
//!   max(Q[...], 0) + exp(min(Q[...], 0))`, or the same written inline in the contraction)
//!   is peeled off: the mapped tensor becomes the kernel's input, and a pre-kernel (the
//!   general lowering of the map Einsums) writes it into scratch in the 16-bit type the
//!   kernel reads, laid out as the source tensor;
//! - **decays**: every `exp(A)` whose exponent is linear in a difference of positions,
//!   `A = c * (x - y)` with `c` free of positions, is read as the canonical per-head decay
//!   `exp(-r[h] (i - j))` with the rate `r[h] = -c` (or `c`) an expression of per-head or
//!   scalar parameters, the head index and constants. `gamma[h]^(p-m)` (written as
//!   `exp(log(gamma[h]) * (p - m))`), `exp(-(p-m) * s[h])`, an ALiBi-like slope of `h`, a
//!   scalar parameter all reduce to one rate expression. A rate that is a per-head
//!   parameter itself is read directly; any other is computed by a pre-kernel into a
//!   per-head f32 array the kernel reads in place of the parameter.
//!
//! Every reading is still only a hypothesis: the recognizer confirms it by running the
//! pre-kernels' cascade and the linear recurrence against the interpreter on a small
//! instance ([`super::verify_linear`]).

use einattn_ir::arena::{Arena, Handle};
use einattn_ir::cascade::{
    Access, BinaryOp, Cascade, DType, Einsum, Expr, IndexExpr, Rank, Tensor, TensorKind, UnaryOp,
};
use std::collections::{BTreeSet, HashMap};

/// An element-wise map peeled off an input: `mapped = map(source)`.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureMap {
    /// The tensor the kernel reads (a temporary of the cascade).
    pub mapped: Handle<Tensor>,
    /// The input it is computed from, and that input's storage type.
    pub source: Handle<Tensor>,
    pub source_dtype: Option<DType>,
    /// The Einsum that computes it (handles of the normalized cascade).
    pub einsum: Einsum,
    /// The Einsum as the user wrote it (or as hoisted), for `--emit schedule`.
    pub written: String,
}

/// A decay read in canonical form: `exp(-rate[h] (i - j))`.
#[derive(Debug, Clone, PartialEq)]
pub struct DerivedDecay {
    /// The per-head f32 array the pre-kernel writes and the kernel reads.
    pub name: String,
    /// The rate as an expression of parameters, the head index and constants.
    pub rate: Expr,
    /// The rate printed.
    pub rate_text: String,
    /// The factor as written in the cascade.
    pub written: String,
}

/// Whether `e` uses a rank index as a value.
fn has_index_value(e: &Expr) -> bool {
    match e {
        Expr::Index(_) => true,
        Expr::Literal(_) | Expr::Access(_) => false,
        Expr::Unary(_, a) => has_index_value(a),
        Expr::Binary(_, a, b) => has_index_value(a) || has_index_value(b),
    }
}

fn plain(ranks: &[Handle<Rank>]) -> Vec<IndexExpr> {
    ranks.iter().map(|&r| IndexExpr::rank(r)).collect()
}

/// `e` with every access of `tensor` reading `indices`.
fn reindex(e: &Expr, tensor: Handle<Tensor>, indices: &[IndexExpr]) -> Expr {
    match e {
        Expr::Access(a) if a.tensor == tensor => Expr::Access(Access {
            tensor,
            indices: indices.to_vec(),
            span: a.span,
        }),
        Expr::Literal(_) | Expr::Index(_) | Expr::Access(_) => e.clone(),
        Expr::Unary(op, a) => Expr::unary(*op, reindex(a, tensor, indices)),
        Expr::Binary(op, a, b) => Expr::binary(
            *op,
            reindex(a, tensor, indices),
            reindex(b, tensor, indices),
        ),
    }
}

fn fresh_name(c: &Cascade, base: &str) -> String {
    let mut name = base.to_string();
    let mut k = 1;
    while c.tensor_by_name(&name).is_some() {
        name = format!("{base}{k}");
        k += 1;
    }
    name
}

fn is_16bit(t: &Tensor) -> bool {
    matches!(t.dtype, Some(DType::Bf16 | DType::F16))
}

/// Moves maps written inline in a contraction (`S = phi(Q[..]) * phi(K[..])`) into their
/// own element-wise Einsums over the input's ranks, so that they peel like written ones.
/// A factor moves when it reads exactly one 16-bit input (at any indices), nothing else
/// and no rank values.
pub fn hoist_inline_maps(c: &Cascade) -> Cascade {
    let mut out = c.clone();
    let handles: Vec<Handle<Einsum>> = out.einsums.handles().collect();
    let mut made: Vec<(Handle<Tensor>, Expr, Handle<Tensor>)> = Vec::new();
    for h in handles {
        if out.einsums[h].reductions.is_empty() || out.einsums[h].recurrence.is_some() {
            continue;
        }
        let expr = out.einsums[h].expr.clone();
        let span = out.einsums[h].span;
        let new = hoist_in(&mut out, &expr, span, &mut made);
        out.einsums[h].expr = new;
    }
    out
}

fn hoist_in(
    c: &mut Cascade,
    e: &Expr,
    span: einattn_ir::cascade::Span,
    made: &mut Vec<(Handle<Tensor>, Expr, Handle<Tensor>)>,
) -> Expr {
    if let Expr::Binary(BinaryOp::Mul, a, b) = e {
        return Expr::binary(
            BinaryOp::Mul,
            hoist_in(c, a, span, made),
            hoist_in(c, b, span, made),
        );
    }
    if matches!(e, Expr::Access(_) | Expr::Literal(_) | Expr::Index(_)) || has_index_value(e) {
        return e.clone();
    }
    let mut reads: Vec<&Access> = Vec::new();
    e.visit_accesses(&mut |a| reads.push(a));
    let Some(first) = reads.first() else {
        return e.clone();
    };
    let (x, at) = (first.tensor, first.indices.clone());
    let one_site = reads.iter().all(|a| a.tensor == x && a.indices == at);
    let input = &c.tensors[x];
    if !one_site || input.kind != TensorKind::Input || !is_16bit(input) {
        return e.clone();
    }
    let ranks = input.ranks.clone();
    let canon = reindex(e, x, &plain(&ranks));
    let phi = match made.iter().find(|(s, m, _)| *s == x && *m == canon) {
        Some((_, _, phi)) => *phi,
        None => {
            let name = fresh_name(c, &format!("phi_{}", input.name));
            let tspan = input.span;
            let phi = c.tensors.append(Tensor {
                name,
                ranks: ranks.clone(),
                kind: TensorKind::Temp,
                dtype: None,
                iterative: None,
                default: None,
                span: tspan,
            });
            c.einsums.append(Einsum {
                output: Access {
                    tensor: phi,
                    indices: plain(&ranks),
                    span,
                },
                expr: canon.clone(),
                reductions: Vec::new(),
                mask: Vec::new(),
                value_mask: Vec::new(),
                recurrence: None,
                span,
            });
            made.push((x, canon, phi));
            phi
        }
    };
    Expr::Access(Access {
        tensor: phi,
        indices: at,
        span: first.span,
    })
}

/// The cascade the recognizer reads after peeling feature maps (`hoisted` with the map
/// Einsums removed, each mapped tensor an input of its source's type, each source and
/// each parameter only the maps read no longer part of the interface), and the maps.
pub fn peel_maps(hoisted: &Cascade) -> (Cascade, Vec<FeatureMap>) {
    let c = hoisted;
    let mut maps: Vec<(Handle<Einsum>, FeatureMap)> = Vec::new();
    for (h, e) in c.einsums.iter() {
        let t = &c.tensors[e.output.tensor];
        if !e.reductions.is_empty()
            || !e.mask.is_empty()
            || !e.value_mask.is_empty()
            || e.recurrence.is_some()
            || t.kind != TensorKind::Temp
            || e.output.indices != plain(&t.ranks)
        {
            continue;
        }
        let mut sources = BTreeSet::new();
        let mut ok = true;
        e.expr.visit_accesses(&mut |a| {
            let r = &c.tensors[a.tensor];
            match r.kind {
                TensorKind::Param => {}
                TensorKind::Input if a.indices == plain(&t.ranks) && r.ranks == t.ranks => {
                    sources.insert(a.tensor);
                }
                _ => ok = false,
            }
        });
        let [x] = sources.into_iter().collect::<Vec<_>>()[..] else {
            continue;
        };
        if !ok || !is_16bit(&c.tensors[x]) {
            continue;
        }
        maps.push((
            h,
            FeatureMap {
                mapped: e.output.tensor,
                source: x,
                source_dtype: c.tensors[x].dtype,
                einsum: e.clone(),
                written: einattn_ir::print::einsum_to_string(c, h),
            },
        ));
    }
    // A source also read outside its maps stays: the cascade needs it as written.
    let mut outside: BTreeSet<Handle<Tensor>> = BTreeSet::new();
    for (h, e) in c.einsums.iter() {
        if maps.iter().any(|(m, _)| *m == h) {
            continue;
        }
        e.visit_reads(&mut |a| {
            outside.insert(a.tensor);
        });
    }
    maps.retain(|(_, m)| !outside.contains(&m.source));
    let mut core = c.clone();
    core.einsums = Arena::new();
    for (h, e) in c.einsums.iter() {
        if !maps.iter().any(|(m, _)| *m == h) {
            core.einsums.append(e.clone());
        }
    }
    for (_, m) in &maps {
        core.tensors[m.mapped].kind = TensorKind::Input;
        core.tensors[m.mapped].dtype = m.source_dtype;
        core.tensors[m.source].kind = TensorKind::Temp;
        m.einsum.expr.visit_accesses(&mut |a| {
            if c.tensors[a.tensor].kind == TensorKind::Param && !outside.contains(&a.tensor) {
                core.tensors[a.tensor].kind = TensorKind::Temp;
            }
        });
    }
    (core, maps.into_iter().map(|(_, m)| m).collect())
}

fn is_one(e: &Expr) -> bool {
    matches!(e, Expr::Literal(x) if *x == 1.0)
}

fn mul(a: Expr, b: Expr) -> Expr {
    match (is_one(&a), is_one(&b)) {
        (true, _) => b,
        (_, true) => a,
        _ => Expr::binary(BinaryOp::Mul, a, b),
    }
}

fn neg(a: Expr) -> Expr {
    match a {
        Expr::Unary(UnaryOp::Neg, x) => *x,
        Expr::Literal(x) => Expr::Literal(-x),
        other => Expr::unary(UnaryOp::Neg, other),
    }
}

/// `e` as `coef * L` with `coef` free of positions (`positional` tells the ranks that
/// are positions) and `L` an affine expression of positions; `None` when it is not linear
/// in them.
fn linear_form(e: &Expr, positional: &dyn Fn(Handle<Rank>) -> bool) -> Option<(Expr, IndexExpr)> {
    let free = |x: &Expr| {
        let mut f = true;
        x.visit_indices(&mut |i| f &= !i.ranks().any(positional));
        f
    };
    if free(e) {
        return Some((e.clone(), IndexExpr::constant(1)));
    }
    match e {
        Expr::Index(i) => Some((Expr::Literal(1.0), i.clone())),
        Expr::Unary(UnaryOp::Neg, a) => linear_form(a, positional).map(|(c, l)| (neg(c), l)),
        Expr::Binary(BinaryOp::Mul, a, b) if free(a) => {
            linear_form(b, positional).map(|(c, l)| (mul(a.as_ref().clone(), c), l))
        }
        Expr::Binary(BinaryOp::Mul, a, b) if free(b) => {
            linear_form(a, positional).map(|(c, l)| (mul(c, b.as_ref().clone()), l))
        }
        Expr::Binary(BinaryOp::Div, a, b) if free(b) => linear_form(a, positional)
            .map(|(c, l)| (Expr::binary(BinaryOp::Div, c, b.as_ref().clone()), l)),
        _ => None,
    }
}

/// The first decay factor of `c`: an `exp(c * k (x - y))` with `x`, `y` two positions.
/// Returns the factor as written and `(coef * k, x - y)` with `k > 0`.
fn decay_factor(
    c: &Cascade,
    positional: &dyn Fn(Handle<Rank>) -> bool,
) -> Option<(String, Expr, IndexExpr)> {
    fn walk<'a>(e: &'a Expr, out: &mut Vec<&'a Expr>) {
        match e {
            Expr::Unary(UnaryOp::Exp, a) => {
                out.push(e);
                walk(a, out);
            }
            Expr::Unary(_, a) => walk(a, out),
            Expr::Binary(_, a, b) => {
                walk(a, out);
                walk(b, out);
            }
            _ => {}
        }
    }
    for (_, einsum) in c.einsums.iter() {
        let mut exps = Vec::new();
        walk(&einsum.expr, &mut exps);
        for f in exps {
            let Expr::Unary(UnaryOp::Exp, a) = f else {
                continue;
            };
            let Some((coef, l)) = linear_form(a, positional) else {
                continue;
            };
            let terms: Vec<(i64, Handle<Rank>)> =
                l.terms.iter().copied().filter(|(k, _)| *k != 0).collect();
            let [(k1, x), (k2, y)] = terms[..] else {
                continue;
            };
            if k1 != -k2 || k1 == 0 {
                continue;
            }
            let (k, x, y) = if k1 > 0 { (k1, x, y) } else { (k2, y, x) };
            let mut diff = IndexExpr::rank(x);
            diff.add_term(-1, y);
            let coef = mul(coef, Expr::Literal(k as f64));
            return Some((einattn_ir::print::expr_to_string(c, f), coef, diff));
        }
    }
    None
}

/// The canonical decay of `c`: the rate `r[h]` with the decay `exp(-r[h] (x - y))`
/// (`flip`: `exp(r[h] (x - y))`, for cascades whose query position is `y`). Every
/// parameter of the cascade must be read by the rate and be scalar or per head; the head
/// index may appear as a value. `Ok(None)`: no decay factor.
pub fn derive_decay(
    c: &Cascade,
    head: Option<Handle<Rank>>,
    batch: Option<Handle<Rank>>,
    flip: bool,
) -> Result<Option<DerivedDecay>, String> {
    let positional = |r: Handle<Rank>| Some(r) != head && Some(r) != batch;
    let Some((written, coef, _)) = decay_factor(c, &positional) else {
        return Ok(None);
    };
    let rate = if flip { coef } else { neg(coef) };
    let mut read = BTreeSet::new();
    let mut bad = None;
    rate.visit_accesses(&mut |a| {
        let t = &c.tensors[a.tensor];
        let per_head = a.indices.len() == 1 && head.is_some() && a.indices[0].as_rank() == head;
        if t.kind != TensorKind::Param || !(a.indices.is_empty() || per_head) {
            bad = Some(t.name.clone());
        }
        read.insert(a.tensor);
    });
    if let Some(name) = bad {
        return Err(format!(
            "the decay `{written}` reads `{name}`, which is not a scalar or per-head parameter"
        ));
    }
    for (h, t) in c.tensors.iter() {
        if t.kind == TensorKind::Param && !read.contains(&h) {
            return Err(format!(
                "the parameter `{}` is not part of the decay `{written}`",
                t.name
            ));
        }
    }
    let rate_text = einattn_ir::print::expr_to_string(c, &rate);
    Ok(Some(DerivedDecay {
        name: fresh_name(c, "decay_rate"),
        rate,
        rate_text,
        written,
    }))
}

/// The per-head parameter a rate is, when it is one (`s[h]`): read directly.
pub fn rate_param(rate: &Expr, head: Option<Handle<Rank>>) -> Option<Handle<Tensor>> {
    match rate {
        Expr::Access(a) if a.indices.len() == 1 && a.indices[0].as_rank() == head => Some(a.tensor),
        _ => None,
    }
}

/// The cascade of the pre-kernels: the maps' Einsums, each writing its mapped tensor as an
/// output of the kernel's 16-bit type `elem`, and the rate Einsum `rate[h] = ...` (f32).
/// `base` holds every tensor and rank the Einsums name.
pub fn prologue_cascade(
    base: &Cascade,
    maps: &[FeatureMap],
    decay: Option<&DerivedDecay>,
    head: Option<Handle<Rank>>,
    elem: DType,
) -> Result<Cascade, String> {
    let mut base = base.clone();
    let mut kinds: HashMap<Handle<Tensor>, (TensorKind, Option<DType>)> = HashMap::new();
    let mut einsums: Vec<Einsum> = Vec::new();
    for m in maps {
        kinds.insert(m.mapped, (TensorKind::Output, Some(elem)));
        kinds.insert(m.source, (TensorKind::Input, m.source_dtype));
        einsums.push(m.einsum.clone());
    }
    if let Some(d) = decay {
        let ranks: Vec<Handle<Rank>> = head.into_iter().collect();
        let span = einattn_ir::cascade::Span::UNKNOWN;
        let t = base.tensors.append(Tensor {
            name: d.name.clone(),
            ranks: ranks.clone(),
            kind: TensorKind::Output,
            dtype: Some(DType::F32),
            iterative: None,
            default: None,
            span,
        });
        kinds.insert(t, (TensorKind::Output, Some(DType::F32)));
        einsums.push(Einsum {
            output: Access {
                tensor: t,
                indices: plain(&ranks),
                span,
            },
            expr: d.rate.clone(),
            reductions: Vec::new(),
            mask: Vec::new(),
            value_mask: Vec::new(),
            recurrence: None,
            span,
        });
    }
    // Parameters a peeled map reads were taken off the recognizer's interface: they are
    // parameters again here (their kind in the cascade as written).
    for e in &einsums {
        e.expr.visit_accesses(&mut |a| {
            kinds
                .entry(a.tensor)
                .or_insert((TensorKind::Param, base.tensors[a.tensor].dtype));
        });
    }
    crate::family::subcascade::extract(&base, &format!("{}_pre", base.name), &einsums, &kinds)
}
