//! The reverse sweep: walks the (viewed) forward Einsums from the outputs back and emits,
//! for every access of an active tensor, a contribution Einsum (the output gradient times
//! the partial derivative, summed over every rank the access does not index, under the
//! forward's mask); a tensor read several times gets the sum of its contributions.

use super::rules::derivative;
use super::simplify::{mul, simplify};
use super::view::View;
use einattn_ir::validate::{Diagnostic, DiagnosticKind};
use einattn_ir::{
    Access, BinaryOp, Cascade, Einsum, Expr, Handle, IndexExpr, Rank, ReduceOp, Reduction, Span,
    Tensor, TensorKind,
};
use std::collections::{HashMap, HashSet};

/// One step of the forward as the sweep differentiates it: `out[oidx] = reduce expr`.
struct Node {
    out: Handle<Tensor>,
    oidx: Vec<IndexExpr>,
    expr: Expr,
    /// Access occurrences not to differentiate through (a recurrence's own state).
    frozen: Vec<usize>,
    reductions: Vec<Reduction>,
    mask: Vec<einattn_ir::Condition>,
    value_mask: Vec<einattn_ir::ValueCondition>,
    /// Whether `out[oidx]` is the value of `expr` at the point (a map): root rules reuse it.
    root_is_output: bool,
    name: String,
    span: Span,
}

/// Per tensor, its contribution tensors and the indices the reads used.
type Contributions = HashMap<Handle<Tensor>, Vec<(Handle<Tensor>, Vec<IndexExpr>)>>;

pub struct Sweep {
    /// The working cascade: the view plus every tensor the sweep created.
    pub cascade: Cascade,
    /// The Einsums of the backward, in order.
    pub einsums: Vec<Einsum>,
    /// Forward output -> its gradient input `dO`.
    pub output_grads: Vec<(Handle<Tensor>, Handle<Tensor>)>,
    /// Forward tensor -> its gradient output `dX`.
    pub grads: Vec<(Handle<Tensor>, Handle<Tensor>)>,
    /// Tensors the sweep created.
    pub created: HashSet<Handle<Tensor>>,
}

fn refuse(message: String, span: Span, label: &str) -> Diagnostic {
    Diagnostic::error(DiagnosticKind::NotMappable, message, span).with_label(label)
}

fn unique_name(cascade: &Cascade, base: &str) -> String {
    if cascade.tensor_by_name(base).is_none() {
        return base.to_string();
    }
    (2..)
        .map(|k| format!("{base}_{k}"))
        .find(|n| cascade.tensor_by_name(n).is_none())
        .unwrap_or_else(|| base.to_string())
}

fn access_positions(expr: &Expr) -> Vec<Access> {
    let mut out = Vec::new();
    expr.visit_accesses(&mut |a| out.push(a.clone()));
    out
}

/// The rank a written index stands for: a plain rank, or the parent of a split written
/// as `outer * INNER + inner`.
fn index_rank(cascade: &Cascade, index: &IndexExpr) -> Option<Handle<Rank>> {
    if let Some(r) = index.as_rank() {
        return Some(r);
    }
    if index.constant != 0 || index.terms.len() != 2 {
        return None;
    }
    let parent = cascade.ranks[index.terms[0].1].parent?;
    let split = cascade.ranks[parent].split.as_ref()?;
    let inner = cascade.ranks[split.inner].extent as i64;
    let want = IndexExpr {
        terms: vec![(inner, split.outer), (1, split.inner)],
        constant: 0,
    };
    let mut got = index.terms.clone();
    got.sort_by_key(|(c, _)| -c);
    (got == want.terms).then_some(parent)
}

/// Completes an Einsum: every rank it iterates that its output does not index is summed.
fn with_sums(mut e: Einsum) -> Einsum {
    let mut out_ranks = Vec::new();
    for i in &e.output.indices {
        out_ranks.extend(i.ranks());
    }
    e.reductions = e
        .mentioned_ranks()
        .into_iter()
        .filter(|r| !out_ranks.contains(r))
        .map(|rank| Reduction {
            rank,
            op: ReduceOp::Sum,
        })
        .collect();
    e
}

fn read(tensor: Handle<Tensor>, indices: Vec<IndexExpr>) -> Expr {
    Expr::Access(Access {
        tensor,
        indices,
        span: Span::UNKNOWN,
    })
}

fn plain(ranks: &[Handle<Rank>]) -> Vec<IndexExpr> {
    ranks.iter().map(|&r| IndexExpr::rank(r)).collect()
}

pub fn sweep(
    view: View,
    wrt: &[Handle<Tensor>],
    order: &[Handle<Einsum>],
) -> Result<Sweep, Vec<Diagnostic>> {
    let forward = view.cascade.clone();
    let mut cascade = view.cascade.clone();
    let mut errors = Vec::new();
    // Nodes in forward order.
    let mut nodes: Vec<Node> = Vec::new();
    for &h in order {
        let e = &forward.einsums[h];
        let out = e.output.tensor;
        let name = forward.tensors[out].name.clone();
        match &e.recurrence {
            None => nodes.push(Node {
                out,
                oidx: e.output.indices.clone(),
                expr: e.expr.clone(),
                frozen: Vec::new(),
                reductions: e.reductions.clone(),
                mask: e.mask.clone(),
                value_mask: e.value_mask.clone(),
                root_is_output: e.reductions.is_empty(),
                name,
                span: e.span,
            }),
            Some(rec) => {
                let Some(fv) = view.final_of(out) else {
                    // Read at other steps: its adjoint would run backwards along the rank.
                    let frozen = access_positions(&e.expr)
                        .iter()
                        .enumerate()
                        .filter(|(_, a)| a.tensor == out)
                        .map(|(k, _)| k)
                        .collect();
                    nodes.push(Node {
                        out,
                        oidx: Vec::new(),
                        expr: e.expr.clone(),
                        frozen,
                        reductions: Vec::new(),
                        mask: Vec::new(),
                        value_mask: Vec::new(),
                        root_is_output: false,
                        name: format!("#reverse:{name}"),
                        span: e.span,
                    });
                    continue;
                };
                if fv.stabilizer {
                    continue;
                }
                let dim = forward.tensors[out].iterative.unwrap_or(0);
                let mut oidx = e.output.indices.clone();
                oidx.remove(dim);
                let accesses = access_positions(&e.expr);
                let frozen: Vec<usize> = accesses
                    .iter()
                    .enumerate()
                    .filter(|(_, a)| a.tensor == out)
                    .map(|(k, _)| k)
                    .collect();
                nodes.push(Node {
                    out: fv.view,
                    oidx: oidx.clone(),
                    expr: e.expr.clone(),
                    frozen,
                    reductions: e.reductions.clone(),
                    mask: e.mask.clone(),
                    value_mask: e.value_mask.clone(),
                    root_is_output: false,
                    name: format!("#step:{name}"),
                    span: e.span,
                });
                nodes.push(Node {
                    out: fv.view,
                    oidx,
                    expr: rec.init.clone(),
                    frozen: Vec::new(),
                    reductions: Vec::new(),
                    mask: Vec::new(),
                    value_mask: Vec::new(),
                    root_is_output: false,
                    name: format!("#init:{name}"),
                    span: rec.init_span,
                });
            }
        }
    }
    // Active tensors: those the wrt tensors reach.
    let mut active: HashSet<Handle<Tensor>> = wrt.iter().copied().collect();
    for n in &nodes {
        // No gradient flows through a stabilizer.
        if view.stabilizers.contains(&n.out) {
            continue;
        }
        let mut reads_active = false;
        for (k, a) in access_positions(&n.expr).iter().enumerate() {
            if !n.frozen.contains(&k) && active.contains(&a.tensor) {
                reads_active = true;
            }
        }
        if reads_active {
            active.insert(n.out);
        }
    }
    let mut created = HashSet::new();
    let mut einsums: Vec<Einsum> = Vec::new();
    let mut contributions: Contributions = HashMap::new();
    let mut adjoint: HashMap<Handle<Tensor>, Handle<Tensor>> = HashMap::new();
    let mut output_grads = Vec::new();
    for (o, t) in forward.tensors.iter() {
        if t.kind == TensorKind::Output {
            let name = unique_name(&cascade, &format!("d{}", t.name));
            let d = cascade.tensors.append(Tensor {
                name,
                ranks: t.ranks.clone(),
                kind: TensorKind::Input,
                dtype: t.dtype,
                iterative: None,
                default: None,
                span: Span::UNKNOWN,
            });
            created.insert(d);
            // The caller's gradient is the first contribution; reads of the output by
            // other Einsums add theirs.
            contributions.insert(o, vec![(d, plain(&t.ranks))]);
            output_grads.push((o, d));
        }
    }
    // Sums a tensor's contributions into its adjoint `d<T>` (once, when first needed).
    let finish = |cascade: &mut Cascade,
                  einsums: &mut Vec<Einsum>,
                  created: &mut HashSet<Handle<Tensor>>,
                  adjoint: &mut HashMap<Handle<Tensor>, Handle<Tensor>>,
                  contributions: &mut Contributions,
                  t: Handle<Tensor>,
                  base: &str| {
        if let Some(&d) = adjoint.get(&t) {
            return Some(d);
        }
        let parts = contributions.remove(&t)?;
        let ranks = cascade.tensors[t].ranks.clone();
        if parts.len() == 1 && cascade.tensors[parts[0].0].ranks == ranks {
            let d = parts[0].0;
            if cascade.tensors[d].kind == TensorKind::Temp {
                cascade.tensors[d].name = unique_name(cascade, &format!("d{base}"));
            }
            adjoint.insert(t, d);
            return Some(d);
        }
        let mut sum: Option<Expr> = None;
        for (c, _) in &parts {
            let x = read(*c, plain(&ranks));
            sum = Some(match sum {
                None => x,
                Some(s) => Expr::binary(BinaryOp::Add, s, x),
            });
        }
        let name = unique_name(cascade, &format!("d{base}"));
        let d = cascade.tensors.append(Tensor {
            name,
            ranks: ranks.clone(),
            kind: TensorKind::Temp,
            dtype: None,
            iterative: None,
            default: None,
            span: Span::UNKNOWN,
        });
        created.insert(d);
        einsums.push(with_sums(Einsum {
            output: Access {
                tensor: d,
                indices: plain(&ranks),
                span: Span::UNKNOWN,
            },
            expr: sum.unwrap_or(Expr::Literal(0.0)),
            reductions: Vec::new(),
            mask: Vec::new(),
            value_mask: Vec::new(),
            recurrence: None,
            span: Span::UNKNOWN,
        }));
        adjoint.insert(t, d);
        Some(d)
    };
    let base_name = |cascade: &Cascade, t: Handle<Tensor>| -> String {
        let n = &cascade.tensors[t].name;
        n.strip_suffix("_final").unwrap_or(n).to_string()
    };
    for n in nodes.iter().rev() {
        if !active.contains(&n.out) {
            continue;
        }
        if let Some(state) = n.name.strip_prefix("#reverse:") {
            errors.push(refuse(
                format!(
                    "cannot differentiate the recurrence `{state}`: its state is read at every step, so its adjoint must run the recurrence backwards"
                ),
                n.span,
                "this recurrence",
            ).with_help("the language has no reverse iteration over a rank; an adjoint state read backwards through affine indices (`X[T - 1 - t]`) is not emitted yet"));
            continue;
        }
        let base = base_name(&cascade, n.out);
        let Some(d_out) = finish(
            &mut cascade,
            &mut einsums,
            &mut created,
            &mut adjoint,
            &mut contributions,
            n.out,
            &base,
        ) else {
            continue;
        };
        // The weight each point passes back: dOut, or for a max/min reduction dOut at the
        // selected points, split evenly among ties (as torch.amax).
        let ops: HashSet<ReduceOp> = n.reductions.iter().map(|r| r.op).collect();
        let select = match ops.len() {
            0 => false,
            1 if ops.contains(&ReduceOp::Sum) => false,
            1 if ops.contains(&ReduceOp::Max) || ops.contains(&ReduceOp::Min) => true,
            _ => {
                errors.push(refuse(
                    format!(
                        "cannot differentiate `{}`: its reductions are {}",
                        base,
                        n.reductions
                            .iter()
                            .map(|r| r.op.name())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    n.span,
                    "this Einsum",
                ).with_help("a product reduction, or max/min nested with sums, has no gradient rule yet; write the inner sum as its own Einsum"));
                continue;
            }
        };
        let mut weight = read(d_out, n.oidx.clone());
        if select {
            let hit = Expr::binary(BinaryOp::Eq, n.expr.clone(), read(n.out, n.oidx.clone()));
            let ties_name = unique_name(&cascade, &format!("{base}_ties"));
            let mut ranks = Vec::new();
            for i in &n.oidx {
                if let Some(r) = i.as_rank() {
                    ranks.push(r);
                }
            }
            if ranks.len() != n.oidx.len() {
                errors.push(refuse(
                    format!("cannot differentiate the reduction `{base}`: its output indices are not plain ranks"),
                    n.span,
                    "this Einsum",
                ));
                continue;
            }
            let ties = cascade.tensors.append(Tensor {
                name: ties_name,
                ranks,
                kind: TensorKind::Temp,
                dtype: None,
                iterative: None,
                default: None,
                span: Span::UNKNOWN,
            });
            created.insert(ties);
            einsums.push(with_sums(Einsum {
                output: Access {
                    tensor: ties,
                    indices: n.oidx.clone(),
                    span: Span::UNKNOWN,
                },
                expr: hit.clone(),
                reductions: Vec::new(),
                mask: n.mask.clone(),
                value_mask: n.value_mask.clone(),
                recurrence: None,
                span: Span::UNKNOWN,
            }));
            weight = Expr::binary(BinaryOp::Div, mul(weight, hit), read(ties, n.oidx.clone()));
        }
        let root = n.root_is_output.then(|| read(n.out, n.oidx.clone()));
        let accesses = access_positions(&n.expr);
        for (k, a) in accesses.iter().enumerate() {
            if n.frozen.contains(&k) || !active.contains(&a.tensor) {
                continue;
            }
            // Repeated reads of one element (`X[i] * X[i]`) are one contribution: the
            // derivative with respect to all of them, at the first.
            let same = |b: &Access| b.tensor == a.tensor && b.indices == a.indices;
            if accesses[..k].iter().any(same) {
                continue;
            }
            let group: Vec<usize> = accesses
                .iter()
                .enumerate()
                .filter(|(j, b)| !n.frozen.contains(j) && same(b))
                .map(|(j, _)| j)
                .collect();
            let Some(partial) = derivative(&n.expr, &group, root.as_ref()) else {
                continue;
            };
            let partial = simplify(&partial);
            // A partial that reads the state of the recurrence being differentiated
            // would need every step of it.
            let mut reads_state = false;
            partial.visit_accesses(&mut |x| {
                if n.frozen.iter().any(|&f| accesses[f].tensor == x.tensor) {
                    reads_state = true;
                }
            });
            if reads_state {
                errors.push(refuse(
                    format!("cannot differentiate the recurrence `{base}`: the gradient of `{}` needs the state at every step", forward.tensors[a.tensor].name),
                    a.span,
                    "read here",
                ).with_help("only recurrences whose state passes through unscaled (`X[t+1] = X[t] + ...`, after stabilizers fold) are differentiated yet"));
                continue;
            }
            let mut ranks = Vec::new();
            let mut ok = true;
            for i in &a.indices {
                match index_rank(&cascade, i) {
                    Some(r) if !ranks.contains(&r) => ranks.push(r),
                    _ => ok = false,
                }
            }
            if !ok {
                errors.push(refuse(
                    format!(
                        "cannot differentiate through this read of `{}`: its gradient would scatter to computed positions",
                        forward.tensors[a.tensor].name
                    ),
                    a.span,
                    "an index that computes a position (or repeats a rank)",
                ).with_help("the language writes an Einsum's output at plain ranks (or a split parent), so it cannot express a scatter to an affine index"));
                continue;
            }
            let reader = n.name.trim_start_matches('#');
            let reader = reader.split(':').next_back().unwrap_or(reader);
            let target = base_name(&cascade, a.tensor);
            let name = unique_name(&cascade, &format!("d{target}_{reader}"));
            let c = cascade.tensors.append(Tensor {
                name,
                ranks,
                kind: TensorKind::Temp,
                dtype: None,
                iterative: None,
                default: None,
                span: Span::UNKNOWN,
            });
            created.insert(c);
            einsums.push(with_sums(Einsum {
                output: Access {
                    tensor: c,
                    indices: a.indices.clone(),
                    span: Span::UNKNOWN,
                },
                expr: simplify(&mul(weight.clone(), partial)),
                reductions: Vec::new(),
                mask: n.mask.clone(),
                value_mask: n.value_mask.clone(),
                recurrence: None,
                span: Span::UNKNOWN,
            }));
            contributions
                .entry(a.tensor)
                .or_default()
                .push((c, a.indices.clone()));
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let mut grads = Vec::new();
    for &x in wrt {
        let base = forward.tensors[x].name.clone();
        let d = match finish(
            &mut cascade,
            &mut einsums,
            &mut created,
            &mut adjoint,
            &mut contributions,
            x,
            &base,
        ) {
            Some(d) => d,
            None => {
                // No path from `x` to an output: its gradient is 0.
                let ranks = forward.tensors[x].ranks.clone();
                let name = unique_name(&cascade, &format!("d{base}"));
                let d = cascade.tensors.append(Tensor {
                    name,
                    ranks: ranks.clone(),
                    kind: TensorKind::Temp,
                    dtype: None,
                    iterative: None,
                    default: None,
                    span: Span::UNKNOWN,
                });
                created.insert(d);
                einsums.push(Einsum {
                    output: Access {
                        tensor: d,
                        indices: plain(&ranks),
                        span: Span::UNKNOWN,
                    },
                    expr: Expr::Literal(0.0),
                    reductions: Vec::new(),
                    mask: Vec::new(),
                    value_mask: Vec::new(),
                    recurrence: None,
                    span: Span::UNKNOWN,
                });
                d
            }
        };
        let t = &mut cascade.tensors[d];
        t.kind = TensorKind::Output;
        t.dtype = Some(forward.tensors[x].dtype.unwrap_or(einattn_ir::DType::F32));
        grads.push((x, d));
    }
    Ok(Sweep {
        cascade,
        einsums,
        output_grads,
        grads,
        created,
    })
}
