//! The reverse sweep: walks the (viewed) forward Einsums from the outputs back and emits,
//! for every access of an active tensor, a contribution Einsum (the output gradient times
//! the partial derivative, summed over every rank the access does not index, under the
//! forward's mask); a tensor read several times gets the sum of its contributions.
//!
//! **Recurrences.** A state read only at its final step whose step passes it through
//! unscaled has one adjoint for every step: the final view's (`view.rs`). Any other state
//! (read at every step, scaled by its step, or advanced with other Einsums in a step body)
//! forms a *group* with the Einsums of its step, and its adjoint runs the recurrence
//! backwards. For a state `S` advanced along `t` (`T` steps):
//!
//! - `dS_next[t] = dS[t + 1] + (reads of S[t + 1])`: the whole gradient of `S[t + 1]`,
//!   the output of step `t`;
//! - `dS[t] = (what step t passes back to S[t]) + (reads of S[t])`, a reverse recurrence
//!   with `init dS[T] = (reads of the final state S[T])`. It is the gradient of `S[t]`
//!   except the reads at `t + 1` of the step before, which `dS_next[t - 1]` adds;
//! - a member `M[t]` of a step body gets `dM[t]`, the sum of its reads' contributions.
//!
//! Each Einsum of the step passes its gradient (`dS_next[t]`, or `dM[t]`) to what it reads
//! by the ordinary rule. The contributions to the group's own tensors close a cycle
//! through `dS[t + 1]`, so they advance with `dS` as a step body running down `t`; the
//! contributions to anything else (keys, values, gates) are plain Einsums over every step
//! that read `dS_next` and `dM`. The partial derivatives read the forward states at every
//! step, which the backward recomputes (`mod.rs`).
//!
//! **Scatters through a split.** A read `K[b, t*I + j, h, d]` (a key position `j` inside
//! block `t`) sends its gradient to `dK[b, n, h, d]` with `n = t*I + i`: the contribution
//! Einsum swaps `j` and `i`, ranks over the same sequence. A read at a constant position
//! inside the block (`G[b, t*I + I - 1, h]`) is written at `n` times `(i == I - 1)`.

use super::rules::derivative;
use super::simplify::{add, mul, simplify};
use super::view::View;
use crate::rewrite::ir_util::{substitute_expr, substitute_index};
use einattn_ir::validate::{sequence_key, Diagnostic, DiagnosticKind, StepBody};
use einattn_ir::{
    Access, BinaryOp, Cascade, Einsum, Expr, Handle, IndexExpr, Rank, Recurrence, ReduceOp,
    Reduction, Span, Tensor, TensorKind,
};
use std::collections::{HashMap, HashSet};

/// Which adjoint a node's weight reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Weight {
    /// `d<out>`: the sum of the output's contributions (an ordinary Einsum, a final view).
    Output,
    /// `d<S>_next[t]`: the step of a state in a group.
    Next,
    /// `d<S>` at step 0: the init of a state in a group.
    Init,
    /// `d<M>[t]`: a member of a step body.
    Member,
}

/// One step of the forward as the sweep differentiates it: `out[oidx] = reduce expr`.
struct Node {
    out: Handle<Tensor>,
    oidx: Vec<IndexExpr>,
    expr: Expr,
    /// Access occurrences not to differentiate through (a final-view state's own step).
    frozen: Vec<usize>,
    reductions: Vec<Reduction>,
    mask: Vec<einattn_ir::Condition>,
    value_mask: Vec<einattn_ir::ValueCondition>,
    /// Whether `out[oidx]` is the value of `expr` at the point (a map): root rules reuse it.
    root_is_output: bool,
    name: String,
    span: Span,
    /// The recurrence group the node belongs to, if any.
    group: Option<usize>,
    weight: Weight,
}

/// A recurrence, or a step body, differentiated by a reverse recurrence along its rank.
struct Group {
    rank: Handle<Rank>,
    /// States: the tensor, its iterative dimension, and its final view when the forward's
    /// readers were redirected there.
    states: Vec<(Handle<Tensor>, usize, Option<Handle<Tensor>>)>,
    /// The other members of a step body.
    members: Vec<Handle<Tensor>>,
}

/// Where a contribution lands on the tensor it is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum At {
    /// The whole tensor, at its own ranks.
    Plain,
    /// A state at step `t + offset`, written over the state's ranks with `t` plain.
    Step(i64),
    /// A state's final step, written over the state's ranks without the iterative one.
    Final,
}

/// Per tensor, its contribution tensors and where they land.
type Contributions = HashMap<Handle<Tensor>, Vec<(Handle<Tensor>, At)>>;

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

/// A position inside a block of a split, `outer * INNER + x`: with `x` a rank, as
/// (inner, x); with `x` a constant, as (outer, inner, x).
enum InBlock {
    Rank(Handle<Rank>, Handle<Rank>),
    Constant(Handle<Rank>, Handle<Rank>, i64),
}

fn in_block(cascade: &Cascade, index: &IndexExpr) -> Option<InBlock> {
    let terms: Vec<(i64, Handle<Rank>)> = index
        .terms
        .iter()
        .copied()
        .filter(|(c, _)| *c != 0)
        .collect();
    let (k, outer, inner) = terms.iter().enumerate().find_map(|(k, &(c, r))| {
        let parent = cascade.ranks.get(r)?.parent?;
        let split = cascade.ranks[parent].split.as_ref()?;
        let tile = i64::try_from(cascade.ranks[split.inner].extent).ok()?;
        (split.outer == r && c == tile).then_some((k, r, split.inner))
    })?;
    let tile = i64::try_from(cascade.ranks[inner].extent).ok()?;
    let rest: Vec<(i64, Handle<Rank>)> = terms
        .iter()
        .enumerate()
        .filter(|(j, _)| *j != k)
        .map(|(_, t)| *t)
        .collect();
    match rest.as_slice() {
        [(1, x)] if index.constant == 0 => Some(InBlock::Rank(inner, *x)),
        [] if (0..tile).contains(&index.constant) => {
            Some(InBlock::Constant(outer, inner, index.constant))
        }
        _ => None,
    }
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

fn sum_of(parts: impl IntoIterator<Item = Expr>) -> Expr {
    parts
        .into_iter()
        .reduce(|s, x| Expr::binary(BinaryOp::Add, s, x))
        .unwrap_or(Expr::Literal(0.0))
}

fn temp(name: String, ranks: Vec<Handle<Rank>>, iterative: Option<usize>) -> Tensor {
    Tensor {
        name,
        ranks,
        kind: TensorKind::Temp,
        dtype: None,
        iterative,
        default: None,
        span: Span::UNKNOWN,
    }
}

fn einsum(output: Handle<Tensor>, indices: Vec<IndexExpr>, expr: Expr) -> Einsum {
    Einsum {
        output: Access {
            tensor: output,
            indices,
            span: Span::UNKNOWN,
        },
        expr,
        reductions: Vec::new(),
        mask: Vec::new(),
        value_mask: Vec::new(),
        recurrence: None,
        span: Span::UNKNOWN,
    }
}

/// Whether a final-view state's step passes the state through unscaled
/// (`X[t+1, o] = X[t, o] + b`): one read of the state, at the output's point, with
/// derivative 1, and no reduction or mask around it. Then every step has the final
/// step's adjoint.
fn passes_through(cascade: &Cascade, e: &Einsum) -> bool {
    let Some(rec) = &e.recurrence else {
        return false;
    };
    let Some(dim) = cascade.tensors[e.output.tensor].iterative else {
        return false;
    };
    let accesses = access_positions(&e.expr);
    let own: Vec<usize> = (0..accesses.len())
        .filter(|&k| accesses[k].tensor == e.output.tensor)
        .collect();
    let [k] = own[..] else { return false };
    let mut at_point = e.output.indices.clone();
    at_point[dim] = rec.current_index();
    accesses[k].indices == at_point
        && e.reductions.is_empty()
        && e.mask.is_empty()
        && e.value_mask.is_empty()
        && derivative(&e.expr, &own, None).map(|d| simplify(&d)) == Some(Expr::Literal(1.0))
}

struct Sweeper {
    forward: Cascade,
    cascade: Cascade,
    einsums: Vec<Einsum>,
    created: HashSet<Handle<Tensor>>,
    contributions: Contributions,
    adjoint: HashMap<Handle<Tensor>, Handle<Tensor>>,
    active: HashSet<Handle<Tensor>>,
    /// States of groups: the iterative dimension and the recurrence's rank.
    stepped: HashMap<Handle<Tensor>, (usize, Handle<Rank>)>,
    errors: Vec<Diagnostic>,
}

impl Sweeper {
    fn new_temp(
        &mut self,
        base: &str,
        ranks: Vec<Handle<Rank>>,
        iterative: Option<usize>,
    ) -> Handle<Tensor> {
        let name = unique_name(&self.cascade, base);
        let h = self.cascade.tensors.append(temp(name, ranks, iterative));
        self.created.insert(h);
        h
    }

    fn base_name(&self, t: Handle<Tensor>) -> String {
        let n = &self.cascade.tensors[t].name;
        n.strip_suffix("_final").unwrap_or(n).to_string()
    }

    /// Sums a tensor's contributions into its adjoint `d<T>` (once, when first needed).
    fn finish(&mut self, t: Handle<Tensor>, base: &str) -> Option<Handle<Tensor>> {
        if let Some(&d) = self.adjoint.get(&t) {
            return Some(d);
        }
        let parts = self.contributions.remove(&t)?;
        let ranks = self.cascade.tensors[t].ranks.clone();
        if parts.len() == 1 && self.cascade.tensors[parts[0].0].ranks == ranks {
            let d = parts[0].0;
            if self.cascade.tensors[d].kind == TensorKind::Temp {
                self.cascade.tensors[d].name = unique_name(&self.cascade, &format!("d{base}"));
            }
            self.adjoint.insert(t, d);
            return Some(d);
        }
        let sum = sum_of(parts.iter().map(|(c, _)| read(*c, plain(&ranks))));
        let d = self.new_temp(&format!("d{base}"), ranks.clone(), None);
        self.einsums.push(with_sums(einsum(d, plain(&ranks), sum)));
        self.adjoint.insert(t, d);
        Some(d)
    }

    /// Rewrites a contribution Einsum whose output index scatters inside a block of a
    /// split so that it writes the split parent instead; `false` when it cannot.
    fn unscatter(&self, e: &mut Einsum) -> bool {
        for d in 0..e.output.indices.len() {
            if index_rank(&self.cascade, &e.output.indices[d]).is_some() {
                continue;
            }
            match in_block(&self.cascade, &e.output.indices[d]) {
                Some(InBlock::Rank(inner, x)) => {
                    let same = sequence_key(&self.cascade, x).is_some()
                        && sequence_key(&self.cascade, x) == sequence_key(&self.cascade, inner);
                    if x == inner || !same {
                        return false;
                    }
                    // Swap `x` and the tile rank everywhere: the read position becomes
                    // the tile rank, so the output index is the split parent.
                    let rename: HashMap<Handle<Rank>, IndexExpr> =
                        [(x, IndexExpr::rank(inner)), (inner, IndexExpr::rank(x))]
                            .into_iter()
                            .collect();
                    for i in &mut e.output.indices {
                        *i = substitute_index(i, &rename);
                    }
                    e.expr = substitute_expr(&e.expr, &rename);
                    for c in &mut e.mask {
                        c.lhs = substitute_index(&c.lhs, &rename);
                        c.rhs = substitute_index(&c.rhs, &rename);
                    }
                    for c in &mut e.value_mask {
                        c.lhs = substitute_expr(&c.lhs, &rename);
                        c.rhs = substitute_expr(&c.rhs, &rename);
                    }
                }
                Some(InBlock::Constant(outer, inner, c)) => {
                    if e.mentioned_ranks().contains(&inner) {
                        return false;
                    }
                    let Ok(tile) = i64::try_from(self.cascade.ranks[inner].extent) else {
                        return false;
                    };
                    e.output.indices[d] = IndexExpr {
                        terms: vec![(tile, outer), (1, inner)],
                        constant: 0,
                    };
                    let pick = Expr::binary(
                        BinaryOp::Eq,
                        Expr::Index(IndexExpr::rank(inner)),
                        Expr::Literal(c as f64),
                    );
                    e.expr = mul(pick, e.expr.clone());
                }
                None => return false,
            }
        }
        true
    }

    /// Emits the contribution of node `n` to everything active it reads, with `weight`
    /// the gradient of its output at the point.
    fn emit(&mut self, n: &Node, weight: Expr) {
        let root = n.root_is_output.then(|| read(n.out, n.oidx.clone()));
        let accesses = access_positions(&n.expr);
        for (k, a) in accesses.iter().enumerate() {
            if n.frozen.contains(&k) || !self.active.contains(&a.tensor) {
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
            let base = self.base_name(n.out);
            // A partial that reads the state of a final view's step would need every
            // step of it.
            let mut reads_state = false;
            partial.visit_accesses(&mut |x| {
                if n.frozen.iter().any(|&f| accesses[f].tensor == x.tensor) {
                    reads_state = true;
                }
            });
            if reads_state {
                self.errors.push(refuse(
                    format!("cannot differentiate the recurrence `{base}`: the gradient of `{}` needs the state at every step", self.forward.tensors[a.tensor].name),
                    a.span,
                    "read here",
                ));
                continue;
            }
            let mut e = with_sums(Einsum {
                output: Access {
                    tensor: a.tensor,
                    indices: a.indices.clone(),
                    span: Span::UNKNOWN,
                },
                expr: simplify(&mul(weight.clone(), partial)),
                reductions: Vec::new(),
                mask: n.mask.clone(),
                value_mask: n.value_mask.clone(),
                recurrence: None,
                span: Span::UNKNOWN,
            });
            let target_name = self.forward.tensors[a.tensor].name.clone();
            let at = match self.stepped.get(&a.tensor).copied() {
                Some((dim, rank)) => {
                    let extent = self.cascade.ranks[rank].extent;
                    let index = &a.indices[dim];
                    let at = if index.terms.as_slice() == [(1, rank)]
                        && (0..=1).contains(&index.constant)
                    {
                        e.output.indices[dim] = IndexExpr::rank(rank);
                        Some(At::Step(index.constant))
                    } else if index.terms.is_empty()
                        && u64::try_from(index.constant).ok() == Some(extent)
                    {
                        e.output.indices.remove(dim);
                        Some(At::Final)
                    } else {
                        None
                    };
                    let Some(at) = at else {
                        self.errors.push(refuse(
                            format!("cannot differentiate through this read of the state `{target_name}`: only its current step, the next one or the final one has an adjoint"),
                            a.span,
                            "a step other than `t`, `t + 1` or the last",
                        ));
                        continue;
                    };
                    at
                }
                None => At::Plain,
            };
            let ok = self.unscatter(&mut e);
            let mut ranks = Vec::new();
            let mut distinct = true;
            for i in &e.output.indices {
                match index_rank(&self.cascade, i) {
                    Some(r) if !ranks.contains(&r) => ranks.push(r),
                    _ => distinct = false,
                }
            }
            if !ok || !distinct {
                self.errors.push(refuse(
                    format!("cannot differentiate through this read of `{target_name}`: its gradient would scatter to computed positions"),
                    a.span,
                    "an index that computes a position (or repeats a rank)",
                ).with_help("the language writes an Einsum's output at plain ranks (or a split parent); a position inside a block (`t*I + j`, `t*I + I - 1`) is written back through the split, other computed positions are not"));
                continue;
            }
            let reader = n.name.trim_start_matches('#');
            let reader = reader.split(':').next_back().unwrap_or(reader).to_string();
            let target = self.base_name(a.tensor);
            let c = self.new_temp(&format!("d{target}_{reader}"), ranks, None);
            e.output.tensor = c;
            // The swap of a scatter may have renamed the summed ranks.
            let e = with_sums(e);
            self.einsums.push(e);
            self.contributions
                .entry(a.tensor)
                .or_default()
                .push((c, at));
        }
    }

    /// The weight of a node: its output's gradient at the point, for a max/min reduction
    /// only at the selected points, split evenly among ties (as torch.amax).
    fn weight(&mut self, n: &Node, d_out: Handle<Tensor>) -> Option<Expr> {
        let base = self.base_name(n.out);
        let ops: HashSet<ReduceOp> = n.reductions.iter().map(|r| r.op).collect();
        let select = match ops.len() {
            0 => false,
            1 if ops.contains(&ReduceOp::Sum) => false,
            1 if (ops.contains(&ReduceOp::Max) || ops.contains(&ReduceOp::Min))
                && n.group.is_none() =>
            {
                true
            }
            _ => {
                self.errors.push(refuse(
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
                ).with_help("a product reduction, max/min nested with sums, or a max/min inside a recurrence's step, has no gradient rule yet; write the inner sum as its own Einsum"));
                return None;
            }
        };
        let mut weight = read(d_out, n.oidx.clone());
        if select {
            let hit = Expr::binary(BinaryOp::Eq, n.expr.clone(), read(n.out, n.oidx.clone()));
            let mut ranks = Vec::new();
            for i in &n.oidx {
                if let Some(r) = i.as_rank() {
                    ranks.push(r);
                }
            }
            if ranks.len() != n.oidx.len() {
                self.errors.push(refuse(
                    format!("cannot differentiate the reduction `{base}`: its output indices are not plain ranks"),
                    n.span,
                    "this Einsum",
                ));
                return None;
            }
            let ties = self.new_temp(&format!("{base}_ties"), ranks, None);
            self.einsums.push(with_sums(Einsum {
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
        Some(weight)
    }

    /// Differentiates a group: its adjoint tensors, every node's contributions, then the
    /// sums that close the reverse recurrence.
    fn group(&mut self, g: &Group, nodes: &[&Node]) {
        let mut next: HashMap<Handle<Tensor>, Handle<Tensor>> = HashMap::new();
        let mut state: HashMap<Handle<Tensor>, Handle<Tensor>> = HashMap::new();
        let mut member: HashMap<Handle<Tensor>, Handle<Tensor>> = HashMap::new();
        for &(s, dim, _) in &g.states {
            if !self.active.contains(&s) {
                continue;
            }
            let base = self.base_name(s);
            let ranks = self.cascade.tensors[s].ranks.clone();
            state.insert(
                s,
                self.new_temp(&format!("d{base}"), ranks.clone(), Some(dim)),
            );
            next.insert(s, self.new_temp(&format!("d{base}_next"), ranks, None));
        }
        for &m in &g.members {
            if self.active.contains(&m) {
                let base = self.base_name(m);
                let ranks = self.cascade.tensors[m].ranks.clone();
                member.insert(m, self.new_temp(&format!("d{base}"), ranks, None));
            }
        }
        for n in nodes.iter().rev() {
            let adjoint = match n.weight {
                Weight::Next => next.get(&n.out),
                Weight::Init => state.get(&n.out),
                Weight::Member | Weight::Output => member.get(&n.out),
            };
            let Some(&d) = adjoint else { continue };
            if let Some(w) = self.weight(n, d) {
                self.emit(n, w);
            }
        }
        for &m in &g.members {
            let Some(&d) = member.get(&m) else { continue };
            let parts = self.contributions.remove(&m).unwrap_or_default();
            let ranks = self.cascade.tensors[m].ranks.clone();
            let sum = sum_of(parts.iter().map(|(c, _)| read(*c, plain(&ranks))));
            self.einsums.push(with_sums(einsum(d, plain(&ranks), sum)));
            self.adjoint.insert(m, d);
        }
        for &(s, dim, view) in &g.states {
            let (Some(&ds), Some(&dn)) = (state.get(&s), next.get(&s)) else {
                continue;
            };
            let mut parts = self.contributions.remove(&s).unwrap_or_default();
            if let Some(v) = view {
                let finals = self.contributions.remove(&v).unwrap_or_default();
                parts.extend(finals.into_iter().map(|(c, _)| (c, At::Final)));
            }
            let ranks = self.cascade.tensors[s].ranks.clone();
            let mut outer = ranks.clone();
            outer.remove(dim);
            if parts.iter().any(|(_, at)| *at == At::Plain) {
                let name = self.forward.tensors[s].name.clone();
                self.errors.push(refuse(
                    format!("cannot differentiate the state `{name}`: it is an output, so its gradient would cover every step at once"),
                    self.forward.tensors[s].span,
                    "this state",
                ).with_help("write the steps the caller needs into an output with its own Einsum"));
                continue;
            }
            let reads_at = |at: At, idx: &[Handle<Rank>]| {
                sum_of(
                    parts
                        .iter()
                        .filter(|(_, a)| *a == at)
                        .map(|(c, _)| read(*c, plain(idx))),
                )
            };
            // dS_next[t] = dS[t + 1] + (reads of S[t + 1]).
            let mut after = plain(&ranks);
            after[dim] = IndexExpr {
                terms: vec![(1, g.rank)],
                constant: 1,
            };
            let step1: Vec<&(Handle<Tensor>, At)> =
                parts.iter().filter(|(_, a)| *a == At::Step(1)).collect();
            let mut next_value = read(ds, after);
            if !step1.is_empty() {
                next_value = add(next_value, reads_at(At::Step(1), &ranks));
            }
            self.einsums
                .push(with_sums(einsum(dn, plain(&ranks), next_value)));
            // dS[t] = (reads of S[t]), down from dS[T] = (reads of S[T]).
            let mut e = einsum(ds, plain(&ranks), reads_at(At::Step(0), &ranks));
            e.recurrence = Some(Recurrence {
                rank: g.rank,
                init: reads_at(At::Final, &outer),
                init_span: Span::UNKNOWN,
                reverse: true,
            });
            self.einsums.push(with_sums(e));
            self.adjoint.insert(s, ds);
        }
    }
}

pub fn sweep(
    view: View,
    wrt: &[Handle<Tensor>],
    order: &[Handle<Einsum>],
    bodies: &[StepBody],
) -> Result<Sweep, Vec<Diagnostic>> {
    let forward = view.cascade.clone();
    let mut nodes: Vec<Node> = Vec::new();
    let mut groups: Vec<Group> = Vec::new();
    let mut group_of_body: HashMap<usize, usize> = HashMap::new();
    let mut stepped: HashMap<Handle<Tensor>, (usize, Handle<Rank>)> = HashMap::new();
    // Nodes in forward order.
    for &h in order {
        let e = &forward.einsums[h];
        let out = e.output.tensor;
        let name = forward.tensors[out].name.clone();
        let body = bodies.iter().position(|b| b.einsums.contains(&h));
        let node = |oidx: Vec<IndexExpr>, name: String, group, weight| Node {
            out,
            oidx,
            expr: e.expr.clone(),
            frozen: Vec::new(),
            reductions: e.reductions.clone(),
            mask: e.mask.clone(),
            value_mask: e.value_mask.clone(),
            root_is_output: false,
            name,
            span: e.span,
            group,
            weight,
        };
        if body.is_none() {
            match &e.recurrence {
                None => {
                    let mut n = node(e.output.indices.clone(), name, None, Weight::Output);
                    n.root_is_output = e.reductions.is_empty();
                    nodes.push(n);
                    continue;
                }
                Some(rec) => {
                    if let Some(fv) = view.final_of(out) {
                        if fv.stabilizer {
                            continue;
                        }
                        if passes_through(&forward, e) {
                            // Every step has the final step's adjoint.
                            let dim = forward.tensors[out].iterative.unwrap_or(0);
                            let mut oidx = e.output.indices.clone();
                            oidx.remove(dim);
                            let frozen = access_positions(&e.expr)
                                .iter()
                                .enumerate()
                                .filter(|(_, a)| a.tensor == out)
                                .map(|(k, _)| k)
                                .collect();
                            let mut n =
                                node(oidx.clone(), format!("#step:{name}"), None, Weight::Output);
                            n.out = fv.view;
                            n.frozen = frozen;
                            nodes.push(n);
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
                                group: None,
                                weight: Weight::Output,
                            });
                            continue;
                        }
                    }
                }
            }
        }
        // A member of a group: a recurrence differentiated backwards, or a step body.
        let rank = match (body, &e.recurrence) {
            (Some(b), _) => bodies[b].rank,
            (None, Some(rec)) => rec.rank,
            (None, None) => continue,
        };
        let new_group = |groups: &mut Vec<Group>| {
            groups.push(Group {
                rank,
                states: Vec::new(),
                members: Vec::new(),
            });
            groups.len() - 1
        };
        let g = match body {
            Some(b) => match group_of_body.get(&b) {
                Some(&g) => g,
                None => {
                    let g = new_group(&mut groups);
                    group_of_body.insert(b, g);
                    g
                }
            },
            None => new_group(&mut groups),
        };
        match &e.recurrence {
            Some(rec) => {
                let dim = forward.tensors[out].iterative.unwrap_or(0);
                groups[g]
                    .states
                    .push((out, dim, view.final_of(out).map(|f| f.view)));
                stepped.insert(out, (dim, rec.rank));
                let mut oidx = e.output.indices.clone();
                oidx[dim] = IndexExpr::rank(rec.rank);
                nodes.push(node(oidx, format!("#step:{name}"), Some(g), Weight::Next));
                let mut iidx = e.output.indices.clone();
                iidx[dim] = IndexExpr::constant(0);
                nodes.push(Node {
                    out,
                    oidx: iidx,
                    expr: rec.init.clone(),
                    frozen: Vec::new(),
                    reductions: Vec::new(),
                    mask: Vec::new(),
                    value_mask: Vec::new(),
                    root_is_output: false,
                    name: format!("#init:{name}"),
                    span: rec.init_span,
                    group: Some(g),
                    weight: Weight::Init,
                });
            }
            None => {
                groups[g].members.push(out);
                nodes.push(node(
                    e.output.indices.clone(),
                    name,
                    Some(g),
                    Weight::Member,
                ));
            }
        }
    }
    // Active tensors: those the wrt tensors reach (a fixed point: step bodies are cycles).
    let mut active: HashSet<Handle<Tensor>> = wrt.iter().copied().collect();
    loop {
        let before = active.len();
        for n in &nodes {
            // No gradient flows through a stabilizer.
            if view.stabilizers.contains(&n.out) || active.contains(&n.out) {
                continue;
            }
            let reads_active = access_positions(&n.expr)
                .iter()
                .enumerate()
                .any(|(k, a)| !n.frozen.contains(&k) && active.contains(&a.tensor));
            if reads_active {
                active.insert(n.out);
            }
        }
        for g in &groups {
            for &(s, _, v) in &g.states {
                if let (true, Some(v)) = (active.contains(&s), v) {
                    active.insert(v);
                }
            }
        }
        if active.len() == before {
            break;
        }
    }
    let mut w = Sweeper {
        forward: forward.clone(),
        cascade: view.cascade.clone(),
        einsums: Vec::new(),
        created: HashSet::new(),
        contributions: HashMap::new(),
        adjoint: HashMap::new(),
        active,
        stepped,
        errors: Vec::new(),
    };
    let mut output_grads = Vec::new();
    for (o, t) in forward.tensors.iter() {
        if t.kind == TensorKind::Output {
            let name = unique_name(&w.cascade, &format!("d{}", t.name));
            let d = w.cascade.tensors.append(Tensor {
                name,
                ranks: t.ranks.clone(),
                kind: TensorKind::Input,
                dtype: t.dtype,
                iterative: None,
                default: None,
                span: Span::UNKNOWN,
            });
            w.created.insert(d);
            // The caller's gradient is the first contribution; reads of the output by
            // other Einsums add theirs.
            w.contributions.insert(o, vec![(d, At::Plain)]);
            output_grads.push((o, d));
        }
    }
    let mut done = vec![false; groups.len()];
    for n in nodes.iter().rev() {
        if let Some(g) = n.group {
            if !done[g] {
                done[g] = true;
                let members: Vec<&Node> = nodes.iter().filter(|m| m.group == Some(g)).collect();
                w.group(&groups[g], &members);
            }
            continue;
        }
        if !w.active.contains(&n.out) {
            continue;
        }
        let base = w.base_name(n.out);
        let Some(d_out) = w.finish(n.out, &base) else {
            continue;
        };
        if let Some(weight) = w.weight(n, d_out) {
            w.emit(n, weight);
        }
    }
    if !w.errors.is_empty() {
        return Err(w.errors);
    }
    let mut grads = Vec::new();
    for &x in wrt {
        let base = forward.tensors[x].name.clone();
        let d = match w.finish(x, &base) {
            Some(d) => d,
            None => {
                // No path from `x` to an output: its gradient is 0.
                let ranks = forward.tensors[x].ranks.clone();
                let d = w.new_temp(&format!("d{base}"), ranks.clone(), None);
                w.einsums.push(einsum(d, plain(&ranks), Expr::Literal(0.0)));
                d
            }
        };
        let t = &mut w.cascade.tensors[d];
        t.kind = TensorKind::Output;
        t.dtype = Some(forward.tensors[x].dtype.unwrap_or(einattn_ir::DType::F32));
        grads.push((x, d));
    }
    Ok(Sweep {
        cascade: w.cascade,
        einsums: w.einsums,
        output_grads,
        grads,
        created: w.created,
    })
}
