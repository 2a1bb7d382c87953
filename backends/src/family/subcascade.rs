//! A part of a cascade as a cascade of its own: the pre-kernels of a family (element-wise
//! maps of the linear family's inputs, the per-token Einsums before a softmax score) and
//! the core a family's kernel computes once those are inputs.

use einattn_ir::arena::Handle;
use einattn_ir::cascade::{
    Access, Cascade, Condition, DType, Einsum, Expr, IndexExpr, Rank, Recurrence, Reduction, Split,
    Tensor, TensorKind, ValueCondition,
};
use einattn_ir::interp::TensorData;
use std::collections::{BTreeSet, HashMap};

/// The values of `part`'s tensors (a part of `whole`) from `whole`'s `inputs`, matched by
/// name.
pub fn inputs_by_name(
    whole: &Cascade,
    part: &Cascade,
    inputs: &HashMap<Handle<Tensor>, TensorData>,
) -> HashMap<Handle<Tensor>, TensorData> {
    part.tensors
        .iter()
        .filter_map(|(h, t)| {
            let d = inputs.get(&whole.tensor_by_name(&t.name)?)?;
            Some((h, d.clone()))
        })
        .collect()
}

/// Adds to `ranks` every rank a split relates to one of them: a split rank's parts, a
/// part's parent (and so its sibling), until nothing more comes.
pub(crate) fn with_split_relatives(c: &Cascade, ranks: &mut BTreeSet<Handle<Rank>>) {
    loop {
        let before = ranks.len();
        for r in ranks.clone() {
            let rank = &c.ranks[r];
            if let Some(s) = &rank.split {
                ranks.insert(s.outer);
                ranks.insert(s.inner);
            }
            if let Some(p) = rank.parent {
                ranks.insert(p);
            }
        }
        if ranks.len() == before {
            return;
        }
    }
}

/// A cascade of `einsums` alone, over the tensors they name (with the given kinds: an
/// Einsum's output may become an output, a tensor it reads an input) and the ranks those
/// need. Recurrences, masks and iterative ranks travel as they are.
pub(crate) fn extract(
    base: &Cascade,
    name: &str,
    einsums: &[Einsum],
    kinds: &HashMap<Handle<Tensor>, (TensorKind, Option<DType>)>,
) -> Result<Cascade, String> {
    let mut tensors: BTreeSet<Handle<Tensor>> = BTreeSet::new();
    let mut ranks: BTreeSet<Handle<Rank>> = BTreeSet::new();
    for e in einsums {
        tensors.insert(e.output.tensor);
        e.visit_reads(&mut |a| {
            tensors.insert(a.tensor);
        });
        ranks.extend(e.mentioned_ranks());
        // A rank may be reduced or iterated without an index naming it (`sum[n] X[b]`).
        ranks.extend(e.reductions.iter().map(|r| r.rank));
        ranks.extend(e.recurrence.iter().map(|r| r.rank));
    }
    for t in &tensors {
        if !kinds.contains_key(t) {
            return Err(format!(
                "`{name}` would read `{}`, which the cascade computes elsewhere",
                base.tensors[*t].name
            ));
        }
        ranks.extend(base.tensors[*t].ranks.iter().copied());
    }
    // Splits travel whole: a split rank brings its parts, a part its parent and sibling.
    with_split_relatives(base, &mut ranks);
    let mut out = Cascade {
        name: name.to_string(),
        sizes: base.sizes.clone(),
        fixed_sizes: base.fixed_sizes.clone(),
        ..Cascade::default()
    };
    let mut rank_map: HashMap<Handle<Rank>, Handle<Rank>> = HashMap::new();
    for (h, r) in base.ranks.iter() {
        if ranks.contains(&h) {
            rank_map.insert(h, out.ranks.append(r.clone()));
        }
    }
    let rr = |r: Handle<Rank>| rank_map[&r];
    for (_, new) in rank_map.iter() {
        let r = &mut out.ranks[*new];
        r.split = r.split.as_ref().map(|s| Split {
            outer: rr(s.outer),
            inner: rr(s.inner),
        });
        r.parent = r.parent.map(rr);
    }
    let mut tensor_map: HashMap<Handle<Tensor>, Handle<Tensor>> = HashMap::new();
    for (h, t) in base.tensors.iter() {
        if let (true, Some((kind, dtype))) = (tensors.contains(&h), kinds.get(&h)) {
            let mut t: Tensor = t.clone();
            t.ranks = t.ranks.iter().map(|&r| rr(r)).collect();
            t.kind = *kind;
            t.dtype = *dtype;
            tensor_map.insert(h, out.tensors.append(t));
        }
    }
    let index = |i: &IndexExpr| IndexExpr {
        terms: i.terms.iter().map(|(k, r)| (*k, rr(*r))).collect(),
        constant: i.constant,
    };
    let access = |a: &Access| Access {
        tensor: tensor_map[&a.tensor],
        indices: a.indices.iter().map(index).collect(),
        span: a.span,
    };
    fn expr(
        e: &Expr,
        access: &dyn Fn(&Access) -> Access,
        index: &dyn Fn(&IndexExpr) -> IndexExpr,
    ) -> Expr {
        match e {
            Expr::Literal(x) => Expr::Literal(*x),
            Expr::Access(a) => Expr::Access(access(a)),
            Expr::Index(i) => Expr::Index(index(i)),
            Expr::Unary(op, a) => Expr::unary(*op, expr(a, access, index)),
            Expr::Binary(op, a, b) => {
                Expr::binary(*op, expr(a, access, index), expr(b, access, index))
            }
        }
    }
    for e in einsums {
        out.einsums.append(Einsum {
            output: access(&e.output),
            expr: expr(&e.expr, &access, &index),
            reductions: e
                .reductions
                .iter()
                .map(|r| Reduction {
                    rank: rr(r.rank),
                    op: r.op,
                })
                .collect(),
            mask: e
                .mask
                .iter()
                .map(|c| Condition {
                    lhs: index(&c.lhs),
                    op: c.op,
                    rhs: index(&c.rhs),
                    span: c.span,
                })
                .collect(),
            value_mask: e
                .value_mask
                .iter()
                .map(|c| ValueCondition {
                    lhs: expr(&c.lhs, &access, &index),
                    op: c.op,
                    rhs: expr(&c.rhs, &access, &index),
                    span: c.span,
                })
                .collect(),
            recurrence: e.recurrence.as_ref().map(|r| Recurrence {
                rank: rr(r.rank),
                init: expr(&r.init, &access, &index),
                init_span: r.init_span,
                reverse: r.reverse,
            }),
            span: e.span,
        });
    }
    einattn_ir::validate::validate(&out).map_err(|ds| {
        let m: Vec<String> = ds.iter().map(|d| d.message.clone()).collect();
        format!("the cascade `{name}` is not valid: {}", m.join("; "))
    })?;
    Ok(out)
}
