//! Per-device cascades: the original cascade restricted to a window of the sequence (and,
//! for Ulysses, of the heads), with recurrence states that start from a supplied value
//! and final states that come from outside.
//!
//! A device's share of the work is the same cascade over fewer positions, so rather than
//! write a second evaluator, the SP code derives a cascade per device and phase and runs
//! the reference interpreter on it. The derivation:
//! 1. every index is rewritten over leaf ranks (a split parent `n` becomes `t*I + i`);
//! 2. each windowed rank gets the window's length as its extent (its split's outer child
//!    `len / tile`), and every input carrying it is sliced by the caller;
//! 3. masks and rank indices used as values see *global* positions: a leaf with window
//!    offset `o` contributes `coef * o` to the constant, so `m <= p` stays causal across
//!    devices and `exp(-lam * n)` keeps its absolute position;
//! 4. reads of a state's final step (`RNV[.., M1, ..]`) follow the new extent, or read an
//!    input holding the merged final state (the epilogue after a log-sum-exp merge);
//! 5. a state's `init` may become 0 or an input tensor `<state>__init` (the prefix a
//!    device receives); a linear state can also track its cumulative decay in a generated
//!    recurrence `<state>__decay[.., k+1] = coefficient * <state>__decay[.., k]`, init 1,
//!    which is what a prefix combine multiplies earlier states by.
//!
//! Handles of the original cascade stay valid in the derived one: new tensors and Einsums
//! are appended.

use super::expr::linear_form;
use super::SpError;
use einattn_ir::interp::{self, TensorData, Values};
use einattn_ir::{
    Access, Cascade, DType, Einsum, Expr, Handle, IndexExpr, Rank, Recurrence, Span, Tensor,
    TensorKind,
};
use std::collections::HashMap;

/// A contiguous range of a declared rank (token positions for the sequence, head indices
/// for Ulysses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub rank: Handle<Rank>,
    pub start: u64,
    pub len: u64,
}

/// Where a recurrence state starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitSource {
    /// The cascade's own `init`.
    Original,
    /// Zero: a linear state's local contribution, to be combined with a prefix later.
    Zero,
    /// An input tensor `<state>__init` over the state's other ranks.
    Input,
}

#[derive(Clone, Debug, Default)]
pub struct LocalSpec {
    pub windows: Vec<Window>,
    /// States whose `init` changes; the others keep theirs.
    pub inits: Vec<(Handle<Tensor>, InitSource)>,
    /// States whose final step is read from an input `<state>__final` instead.
    pub finals_from_input: Vec<Handle<Tensor>>,
    /// Linear states whose cumulative decay over the window is tracked.
    pub track_decay: Vec<Handle<Tensor>>,
}

#[derive(Clone, Debug)]
pub struct LocalCascade {
    pub cascade: Cascade,
    /// (state, its `__init` input).
    pub init_inputs: Vec<(Handle<Tensor>, Handle<Tensor>)>,
    /// (state, its `__final` input).
    pub final_inputs: Vec<(Handle<Tensor>, Handle<Tensor>)>,
    /// (state, its `__decay` state, the Einsum advancing it).
    pub decays: Vec<(Handle<Tensor>, Handle<Tensor>, Handle<Einsum>)>,
}

/// Rewrites an index over leaf ranks: a split rank `r` becomes `outer * extent(inner) + inner`.
pub fn expand_index(cascade: &Cascade, index: &IndexExpr) -> IndexExpr {
    fn go(cascade: &Cascade, index: &IndexExpr, depth: usize, out: &mut IndexExpr, scale: i64) {
        out.constant += scale * index.constant;
        for &(coef, rank) in &index.terms {
            match (&cascade.ranks[rank].split, depth < 16) {
                (Some(split), true) => {
                    let tile = cascade.ranks[split.inner].extent as i64;
                    let combined = IndexExpr {
                        terms: vec![(tile, split.outer), (1, split.inner)],
                        constant: 0,
                    };
                    go(cascade, &combined, depth + 1, out, scale * coef);
                }
                _ => out.add_term(scale * coef, rank),
            }
        }
    }
    let mut out = IndexExpr::constant(0);
    go(cascade, index, 0, &mut out, 1);
    out
}

fn map_expr_indices(expr: &mut Expr, f: &mut impl FnMut(&mut IndexExpr)) {
    match expr {
        Expr::Literal(_) => {}
        Expr::Index(i) => f(i),
        Expr::Access(a) => a.indices.iter_mut().for_each(&mut *f),
        Expr::Unary(_, a) => map_expr_indices(a, f),
        Expr::Binary(_, a, b) => {
            map_expr_indices(a, f);
            map_expr_indices(b, f);
        }
    }
}

/// Rank indices used as values (not access indices): these see global positions.
fn map_value_indices(expr: &mut Expr, f: &mut impl FnMut(&mut IndexExpr)) {
    match expr {
        Expr::Literal(_) | Expr::Access(_) => {}
        Expr::Index(i) => f(i),
        Expr::Unary(_, a) => map_value_indices(a, f),
        Expr::Binary(_, a, b) => {
            map_value_indices(a, f);
            map_value_indices(b, f);
        }
    }
}

fn map_accesses(
    expr: &mut Expr,
    f: &mut impl FnMut(&mut Expr) -> Result<(), SpError>,
) -> Result<(), SpError> {
    match expr {
        Expr::Access(_) => f(expr),
        Expr::Literal(_) | Expr::Index(_) => Ok(()),
        Expr::Unary(_, a) => map_accesses(a, f),
        Expr::Binary(_, a, b) => {
            map_accesses(a, f)?;
            map_accesses(b, f)
        }
    }
}

/// The cascade with every index over leaf ranks.
pub fn expand_to_leaves(cascade: &Cascade) -> Cascade {
    let mut out = cascade.clone();
    let handles: Vec<Handle<Einsum>> = out.einsums.handles().collect();
    for h in handles {
        let e = &mut out.einsums[h];
        for i in e.output.indices.iter_mut() {
            *i = expand_index(cascade, i);
        }
        map_expr_indices(&mut e.expr, &mut |i| *i = expand_index(cascade, i));
        for c in e.mask.iter_mut() {
            c.lhs = expand_index(cascade, &c.lhs);
            c.rhs = expand_index(cascade, &c.rhs);
        }
        if let Some(rec) = e.recurrence.as_mut() {
            map_expr_indices(&mut rec.init, &mut |i| *i = expand_index(cascade, i));
        }
    }
    out
}

/// The terms, over leaf ranks, of every index [`localize`] shifts to global positions (a
/// condition's `lhs - rhs`, rank values), in Einsum order: the analysis of a per-device
/// cascade depends on its windows' starts only through `sum(coef * offset)` over each of
/// these (a condition only through the difference of its sides).
pub fn shifted_indices(cascade: &Cascade) -> Vec<Vec<(i64, Handle<Rank>)>> {
    let leaves = expand_to_leaves(cascade);
    let mut out = Vec::new();
    for (_, e) in leaves.einsums.iter() {
        for cond in &e.mask {
            let mut diff = cond.lhs.terms.clone();
            diff.extend(cond.rhs.terms.iter().map(|&(c, r)| (-c, r)));
            out.push(diff);
        }
        let mut expr = e.expr.clone();
        map_value_indices(&mut expr, &mut |i| out.push(i.terms.clone()));
        if let Some(rec) = &e.recurrence {
            let mut init = rec.init.clone();
            map_value_indices(&mut init, &mut |i| out.push(i.terms.clone()));
        }
    }
    out
}

/// Adds `coef * offset` of every windowed leaf to the constant: global positions.
fn shift_to_global(index: &mut IndexExpr, offsets: &HashMap<Handle<Rank>, i64>) {
    for &(coef, rank) in &index.terms {
        if let Some(o) = offsets.get(&rank) {
            index.constant += coef * o;
        }
    }
}

/// Derives the per-device cascade described by `spec`.
pub fn localize(original: &Cascade, spec: &LocalSpec) -> Result<LocalCascade, SpError> {
    let mut c = expand_to_leaves(original);

    // Leaf offsets and new extents.
    let mut offsets: HashMap<Handle<Rank>, i64> = HashMap::new();
    let mut new_extent: HashMap<Handle<Rank>, u64> = HashMap::new();
    for w in &spec.windows {
        let rank = &original.ranks[w.rank];
        if w.start + w.len > rank.extent || w.len == 0 {
            return Err(SpError::Window(format!(
                "window [{}, {}) does not fit rank `{}` of extent {}",
                w.start,
                w.start + w.len,
                rank.name,
                rank.extent
            )));
        }
        new_extent.insert(w.rank, w.len);
        match &rank.split {
            Some(split) => {
                let tile = original.ranks[split.inner].extent.max(1);
                if w.start % tile != 0 || w.len % tile != 0 {
                    return Err(SpError::Window(format!(
                        "window [{}, {}) of `{}` does not fall on its tiles of {}",
                        w.start,
                        w.start + w.len,
                        rank.name,
                        tile
                    )));
                }
                offsets.insert(split.outer, (w.start / tile) as i64);
                new_extent.insert(split.outer, w.len / tile);
            }
            None => {
                offsets.insert(w.rank, w.start as i64);
            }
        }
    }

    // Final-step reads: constant indices along a windowed iterative dimension.
    let final_of = |t: Handle<Tensor>| -> Option<(usize, u64, u64)> {
        let tensor = &original.tensors[t];
        let d = tensor.iterative?;
        let rank = tensor.ranks[d];
        let new = *new_extent.get(&rank)?;
        Some((d, original.ranks[rank].extent, new))
    };

    let mut final_inputs: Vec<(Handle<Tensor>, Handle<Tensor>)> = Vec::new();
    for &state in &spec.finals_from_input {
        let t = &original.tensors[state];
        let Some(d) = t.iterative else {
            return Err(SpError::Window(format!(
                "`{}` is not a recurrence state",
                t.name
            )));
        };
        let mut ranks = t.ranks.clone();
        ranks.remove(d);
        let input = c.tensors.append(Tensor {
            name: format!("{}__final", t.name),
            ranks,
            kind: TensorKind::Input,
            dtype: Some(DType::F32),
            iterative: None,
            default: None,
            span: Span::UNKNOWN,
        });
        final_inputs.push((state, input));
    }

    let handles: Vec<Handle<Einsum>> = c.einsums.handles().collect();
    for h in handles.iter().copied() {
        let mut e = c.einsums[h].clone();
        for cond in e.mask.iter_mut() {
            shift_to_global(&mut cond.lhs, &offsets);
            shift_to_global(&mut cond.rhs, &offsets);
        }
        map_value_indices(&mut e.expr, &mut |i| shift_to_global(i, &offsets));
        let mut fix = |x: &mut Expr| -> Result<(), SpError> {
            let Expr::Access(a) = x else { return Ok(()) };
            let Some((d, old, new)) = final_of(a.tensor) else {
                return Ok(());
            };
            let Some(index) = a.indices.get(d) else {
                return Ok(());
            };
            if !index.terms.is_empty() {
                return Ok(());
            }
            let name = &original.tensors[a.tensor].name;
            if index.constant == 0 {
                Ok(())
            } else if index.constant as u64 == old {
                if let Some(&(_, input)) = final_inputs.iter().find(|(s, _)| *s == a.tensor) {
                    let mut indices = a.indices.clone();
                    indices.remove(d);
                    *x = Expr::Access(Access {
                        tensor: input,
                        indices,
                        span: a.span,
                    });
                } else {
                    a.indices[d] = IndexExpr::constant(new as i64);
                }
                Ok(())
            } else {
                Err(SpError::Window(format!(
                    "`{name}` is read at step {} of {old}: only the first and the last step of a state can follow a split",
                    index.constant
                )))
            }
        };
        map_accesses(&mut e.expr, &mut fix)?;
        if let Some(rec) = e.recurrence.as_mut() {
            map_value_indices(&mut rec.init, &mut |i| shift_to_global(i, &offsets));
        }
        c.einsums[h] = e;
    }

    for (&rank, &extent) in &new_extent {
        c.ranks[rank].extent = extent;
    }

    // Inits.
    let mut init_inputs = Vec::new();
    for &(state, source) in &spec.inits {
        let Some(producer) = c.producer(state) else {
            return Err(SpError::Window(format!(
                "`{}` has no Einsum",
                original.tensors[state].name
            )));
        };
        let t = original.tensors[state].clone();
        let Some(d) = t.iterative else {
            return Err(SpError::Window(format!(
                "`{}` is not a recurrence state",
                t.name
            )));
        };
        let init = match source {
            InitSource::Original => continue,
            InitSource::Zero => Expr::Literal(0.0),
            InitSource::Input => {
                let mut ranks = t.ranks.clone();
                ranks.remove(d);
                let input = c.tensors.append(Tensor {
                    name: format!("{}__init", t.name),
                    ranks,
                    kind: TensorKind::Input,
                    dtype: Some(DType::F32),
                    iterative: None,
                    default: None,
                    span: Span::UNKNOWN,
                });
                init_inputs.push((state, input));
                let mut indices = c.einsums[producer].output.indices.clone();
                indices.remove(d);
                Expr::Access(Access {
                    tensor: input,
                    indices,
                    span: Span::UNKNOWN,
                })
            }
        };
        if let Some(rec) = c.einsums[producer].recurrence.as_mut() {
            rec.init = init;
        }
    }

    // Decay tracking.
    let mut decays = Vec::new();
    for &state in &spec.track_decay {
        let producer = c.producer(state).ok_or_else(|| {
            SpError::Window(format!("`{}` has no Einsum", original.tensors[state].name))
        })?;
        let e = c.einsums[producer].clone();
        let Some(rec) = e.recurrence.as_ref() else {
            return Err(SpError::Window(format!(
                "`{}` is not a recurrence state",
                original.tensors[state].name
            )));
        };
        let form = linear_form(&c, &e.expr, state, rec.rank).ok_or_else(|| {
            SpError::Window(format!(
                "`{}` is not linear in its previous step",
                original.tensors[state].name
            ))
        })?;
        let coefficient = form.coefficient.unwrap_or(Expr::Literal(0.0));
        // The decay varies over the ranks its coefficient mentions (a per-head decay is
        // one number per head), plus the iterative rank.
        let mut mentioned: Vec<Handle<Rank>> = Vec::new();
        coefficient.visit_indices(&mut |i| {
            for r in i.ranks() {
                if !mentioned.contains(&r) {
                    mentioned.push(r);
                }
            }
        });
        let state_ranks = &original.tensors[state].ranks;
        let mut ranks: Vec<Handle<Rank>> = state_ranks
            .iter()
            .copied()
            .filter(|&r| r != rec.rank && mentioned.contains(&r))
            .collect();
        if let Some(extra) = mentioned
            .iter()
            .find(|r| **r != rec.rank && !state_ranks.contains(r))
        {
            return Err(SpError::Window(format!(
                "the decay of `{}` varies over rank `{}`, which the state does not carry",
                original.tensors[state].name, c.ranks[*extra].name
            )));
        }
        ranks.push(rec.rank);
        let iterative_dim = ranks.len() - 1;
        let decay = c.tensors.append(Tensor {
            name: format!("{}__decay", original.tensors[state].name),
            ranks: ranks.clone(),
            kind: TensorKind::Temp,
            dtype: None,
            iterative: Some(iterative_dim),
            default: None,
            span: Span::UNKNOWN,
        });
        let step = |k: i64| -> Vec<IndexExpr> {
            ranks
                .iter()
                .map(|&r| {
                    if r == rec.rank {
                        IndexExpr {
                            terms: vec![(1, r)],
                            constant: k,
                        }
                    } else {
                        IndexExpr::rank(r)
                    }
                })
                .collect()
        };
        let next = step(1);
        let current = step(0);
        let einsum = c.einsums.append(Einsum {
            output: Access {
                tensor: decay,
                indices: next,
                span: Span::UNKNOWN,
            },
            expr: Expr::binary(
                einattn_ir::BinaryOp::Mul,
                coefficient,
                Expr::Access(Access {
                    tensor: decay,
                    indices: current,
                    span: Span::UNKNOWN,
                }),
            ),
            reductions: Vec::new(),
            mask: Vec::new(),
            value_mask: Vec::new(),
            recurrence: Some(Recurrence {
                rank: rec.rank,
                init: Expr::Literal(1.0),
                init_span: Span::UNKNOWN,
                reverse: false,
            }),
            span: Span::UNKNOWN,
        });
        decays.push((state, decay, einsum));
    }

    Ok(LocalCascade {
        cascade: c,
        init_inputs,
        final_inputs,
        decays,
    })
}

/// Einsums that produce tensors `wanted` reads, transitively, in dependency order
/// (a recurrence's read of its own state is not a dependency). `wanted` itself included.
pub fn dependency_order(cascade: &Cascade, wanted: &[Handle<Einsum>]) -> Vec<Handle<Einsum>> {
    let mut needed = vec![false; cascade.einsums.len()];
    let mut stack: Vec<Handle<Einsum>> = wanted.to_vec();
    while let Some(h) = stack.pop() {
        if needed[h.index()] {
            continue;
        }
        needed[h.index()] = true;
        for t in reads_of(cascade, h) {
            if let Some(p) = cascade.producer(t) {
                if p != h && !needed[p.index()] {
                    stack.push(p);
                }
            }
        }
    }
    let mut order = Vec::new();
    let mut done = vec![false; cascade.einsums.len()];
    let mut progress = true;
    while progress {
        progress = false;
        for h in cascade.einsums.handles() {
            if !needed[h.index()] || done[h.index()] {
                continue;
            }
            let ready = reads_of(cascade, h)
                .iter()
                .all(|&t| match cascade.producer(t) {
                    Some(p) => p == h || done[p.index()],
                    None => true,
                });
            if ready {
                done[h.index()] = true;
                order.push(h);
                progress = true;
            }
        }
    }
    order
}

fn reads_of(cascade: &Cascade, einsum: Handle<Einsum>) -> Vec<Handle<Tensor>> {
    let e = &cascade.einsums[einsum];
    let mut out = super::expr::tensors_read(&e.expr);
    if let Some(rec) = &e.recurrence {
        for t in super::expr::tensors_read(&rec.init) {
            if !out.contains(&t) {
                out.push(t);
            }
        }
    }
    out
}

/// Slices `data` along `dim` to `[start, start + len)`.
pub fn slice_dim(data: &TensorData, dim: usize, start: usize, len: usize) -> TensorData {
    let outer: usize = data.shape[..dim].iter().product();
    let extent = data.shape[dim];
    let inner: usize = data.shape[dim + 1..].iter().product();
    let mut values = Vec::with_capacity(outer * len * inner);
    for o in 0..outer {
        let base = o * extent * inner;
        values.extend_from_slice(&data.values[base + start * inner..base + (start + len) * inner]);
    }
    let mut shape = data.shape.clone();
    shape[dim] = len;
    TensorData::new(shape, values)
}

/// Concatenates tensors along `dim` (the inverse of slicing a dimension into pieces).
pub fn concat_dim(parts: &[TensorData], dim: usize) -> Option<TensorData> {
    let first = parts.first()?;
    let outer: usize = first.shape[..dim].iter().product();
    let inner: usize = first.shape[dim + 1..].iter().product();
    let total: usize = parts.iter().map(|p| p.shape[dim]).sum();
    let mut values = Vec::with_capacity(outer * total * inner);
    for o in 0..outer {
        for p in parts {
            let len = p.shape[dim];
            let stored = p.stored();
            values.extend_from_slice(&stored[o * len * inner..(o + 1) * len * inner]);
        }
    }
    let mut shape = first.shape.clone();
    shape[dim] = total;
    Some(TensorData::new(shape, values))
}

/// The inputs of the original cascade restricted to `windows`: every dimension whose
/// declared rank is windowed is sliced.
pub fn slice_inputs(
    original: &Cascade,
    inputs: &HashMap<Handle<Tensor>, TensorData>,
    windows: &[Window],
) -> HashMap<Handle<Tensor>, TensorData> {
    inputs
        .iter()
        .map(|(&h, data)| {
            let mut data = data.clone();
            for (dim, rank) in original.tensors[h].ranks.iter().enumerate() {
                if let Some(w) = windows.iter().find(|w| w.rank == *rank) {
                    data = slice_dim(&data, dim, w.start as usize, w.len as usize);
                }
            }
            (h, data)
        })
        .collect()
}

/// The state's last step, without its iterative dimension.
pub fn final_step(
    cascade: &Cascade,
    state: Handle<Tensor>,
    data: &TensorData,
) -> Option<TensorData> {
    let d = cascade.tensors[state].iterative?;
    let last = data.shape[d].checked_sub(1)?;
    let mut sliced = slice_dim(
        &TensorData {
            values: data.stored().into_owned(),
            shape: data.shape.clone(),
            present: None,
        },
        d,
        last,
        1,
    );
    sliced.shape.remove(d);
    Some(sliced)
}

/// Evaluates `wanted` (and what it depends on) with the reference interpreter.
pub fn evaluate(
    cascade: &Cascade,
    inputs: &HashMap<Handle<Tensor>, TensorData>,
    wanted: &[Handle<Einsum>],
) -> Result<Values, SpError> {
    let order = dependency_order(cascade, wanted);
    interp::evaluate_in_order(cascade, inputs, &order)
        .map_err(|e| SpError::Evaluation(e.to_string()))
}
