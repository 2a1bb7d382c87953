//! How the cascade depends on the sequence across a device boundary.
//!
//! Splitting the key rank's outer leaf (`t` for Lightning, `m1` for one-pass attention)
//! across devices cuts every recurrence along it: each device can only run its own steps.
//! What a cut recurrence needs from the devices before it decides the scheme:
//! - **linear** `S[k+1] = A * S[k] + B` with `A`, `B` independent of every state along
//!   `k`: a device's steps map a start state `S0` to `Dec * S0 + Loc`, where `Loc` is the
//!   result from a zero start and `Dec` the product of the `A`s. Such maps compose
//!   associatively, so a prefix over devices (LASP-2: one all-gather, then a local scan;
//!   LASP-1: a ring) gives every device its start state. A state whose ranks exclude the
//!   sequence is fixed-size (the `d x e` KV state), which is what makes LASP cheap.
//! - **running extremum** `S[k+1] = max(S[k], X)`: merges by `max`, in any order.
//! - **rescaled sum** `S[k+1] = B + S[k] * exp(M[k] - M[k+1])` with `M` a running max:
//!   the online-softmax numerator and denominator, kept relative to `M`; two partial
//!   results merge by log-sum-exp: `S = S_a exp(M_a - M) + S_b exp(M_b - M)`,
//!   `M = max(M_a, M_b)`, in any order.
//!
//! The Einsums that read a state's final step without iterating the key rank (`O = RNV /
//! RD`) form the *epilogue*: a device can run it once its states are complete.
//! A reduction over the whole split key rank (the 3-pass max, `sum[m]`) cannot be cut
//! into per-device steps here: only schemes that bring every key to the queries apply.

use super::expr::{self, LinearForm};
use super::seq::SequenceRanks;
use einattn_ir::{
    BinaryOp, Cascade, Einsum, Expr, Handle, IndexExpr, Rank, ReduceOp, Tensor, TensorKind,
};
use serde::Serialize;

#[derive(Clone, Debug, PartialEq)]
pub enum StateRole {
    Linear {
        /// `A` in `S[k+1] = A * S[k] + B`, as written in the recurrence.
        coefficient: Expr,
        /// `A == 1`: a plain running sum, which merges in any order.
        unit: bool,
    },
    Extremum {
        op: ReduceOp,
    },
    RescaledSum {
        max_state: Handle<Tensor>,
    },
}

impl StateRole {
    pub fn name(&self) -> &'static str {
        match self {
            StateRole::Linear { unit: true, .. } => "running sum",
            StateRole::Linear { .. } => "linear recurrence with decay",
            StateRole::Extremum { op: ReduceOp::Min } => "running min",
            StateRole::Extremum { .. } => "running max",
            StateRole::RescaledSum { .. } => "sum rescaled by the running max",
        }
    }

    /// Whether partial results merge in any order (a ring may deliver them out of order).
    pub fn commutative(&self) -> bool {
        !matches!(self, StateRole::Linear { unit: false, .. })
    }
}

/// A recurrence along the split key rank: what crosses a device boundary.
#[derive(Clone, Debug, PartialEq)]
pub struct CarriedState {
    pub state: Handle<Tensor>,
    pub einsum: Handle<Einsum>,
    pub role: StateRole,
    /// Whether the state has one value per query (softmax statistics) rather than a
    /// fixed size (the KV state).
    pub per_query: bool,
    /// Elements of one step of the state (its ranks without the iterative one), full size.
    pub elements: u64,
}

/// What the classifier found, in words, for reports.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DependencyNote {
    pub tensor: String,
    pub kind: String,
    pub detail: String,
}

#[derive(Clone, Debug)]
pub struct Classification {
    pub seq: SequenceRanks,
    pub states: Vec<CarriedState>,
    /// Einsums reducing the whole split key rank (not through a tile + recurrence).
    pub global_reductions: Vec<Handle<Einsum>>,
    /// Reads that reach across a chunk boundary other than through a state; they rule
    /// out every scheme that splits the keys.
    pub cross_chunk_reads: Vec<String>,
    /// Recurrences along the key rank that are none of the supported kinds.
    pub unsupported_states: Vec<String>,
    /// Einsums that iterate the key rank or feed ones that do.
    pub partial: Vec<Handle<Einsum>>,
    /// Einsums after the states are final (read a final step, iterate no key leaf).
    pub epilogue: Vec<Handle<Einsum>>,
    /// Parallel ranks other than the sequence that every sequence-carrying input and
    /// output carries (heads, batch): candidates for Ulysses' all-to-all. Best first.
    pub head_ranks: Vec<Handle<Rank>>,
    pub notes: Vec<DependencyNote>,
}

impl Classification {
    /// Every carried state is linear with a fixed size: LASP-1 and LASP-2 apply.
    pub fn linear_fixed_size(&self) -> bool {
        self.seq.single_rank()
            && !self.states.is_empty()
            && self.unsupported_states.is_empty()
            && self.global_reductions.is_empty()
            && self.cross_chunk_reads.is_empty()
            && self
                .states
                .iter()
                .all(|s| matches!(s.role, StateRole::Linear { .. }) && !s.per_query)
    }

    /// Queries and keys are separate ranks, and each device can compute its queries
    /// against a contiguous prefix of keys given in order (all-gather of K and V).
    pub fn keys_in_order(&self) -> bool {
        !self.seq.single_rank()
            && self.cross_chunk_reads.is_empty()
            && self.unsupported_states.is_empty()
    }

    /// Partial results over key chunks merge in any order (ring, TokenRing, zigzag).
    pub fn keys_any_order(&self) -> bool {
        self.keys_in_order()
            && self.global_reductions.is_empty()
            && !self.states.is_empty()
            && self.states.iter().all(|s| s.role.commutative())
    }

    pub fn state(&self, tensor: Handle<Tensor>) -> Option<&CarriedState> {
        self.states.iter().find(|s| s.state == tensor)
    }
}

/// Tensors the expression reads, and everything they are computed from, stopping at
/// recurrence states (which are returned but not expanded).
fn upstream_states(
    cascade: &Cascade,
    expr: &Expr,
    states: &[Handle<Tensor>],
) -> Vec<Handle<Tensor>> {
    let mut seen: Vec<Handle<Tensor>> = Vec::new();
    let mut found = Vec::new();
    let mut stack = expr::tensors_read(expr);
    while let Some(t) = stack.pop() {
        if seen.contains(&t) {
            continue;
        }
        seen.push(t);
        if states.contains(&t) {
            found.push(t);
            continue;
        }
        if let Some(p) = cascade.producer(t) {
            stack.extend(expr::tensors_read(&cascade.einsums[p].expr));
        }
    }
    found
}

pub fn classify(cascade: &Cascade, seq: SequenceRanks) -> Classification {
    let key_outer = seq.key.outer;
    let mut notes = Vec::new();
    let name = |t: Handle<Tensor>| cascade.tensors[t].name.clone();

    let recurrences: Vec<(Handle<Einsum>, Handle<Tensor>)> = cascade
        .einsums
        .iter()
        .filter(|(_, e)| e.recurrence.as_ref().is_some_and(|r| r.rank == key_outer))
        .map(|(h, e)| (h, e.output.tensor))
        .collect();
    let state_tensors: Vec<Handle<Tensor>> = recurrences.iter().map(|&(_, t)| t).collect();

    let mut states = Vec::new();
    let mut unsupported_states = Vec::new();
    for &(h, state) in &recurrences {
        let e = &cascade.einsums[h];
        let t = &cascade.tensors[state];
        let per_query = t
            .ranks
            .iter()
            .enumerate()
            .any(|(d, &r)| Some(d) != t.iterative && seq.is_sequence_leaf(r));
        let elements: u64 = (0..t.ranks.len())
            .filter(|&d| Some(d) != t.iterative)
            .map(|d| cascade.dim_extent(state, d))
            .fold(1u64, u64::saturating_mul);
        let others: Vec<Handle<Tensor>> = state_tensors
            .iter()
            .copied()
            .filter(|&s| s != state)
            .collect();
        // A reverse recurrence carries its state from later devices to earlier ones, which
        // no scheme plans.
        let reverse = e.recurrence.as_ref().is_some_and(|r| r.reverse);
        let role = if !e.reductions.is_empty() || !e.mask.is_empty() || reverse {
            None
        } else if let Some(op) = expr::running_extremum(cascade, &e.expr, state, key_outer) {
            let independent = upstream_states(cascade, &e.expr, &others).is_empty();
            independent.then_some(StateRole::Extremum {
                op: if op == BinaryOp::Max {
                    ReduceOp::Max
                } else {
                    ReduceOp::Min
                },
            })
        } else if let Some(LinearForm {
            coefficient: Some(coefficient),
            offset,
        }) = expr::linear_form(cascade, &e.expr, state, key_outer)
        {
            let inlined = expr::inline_maps(cascade, &coefficient, 0);
            let offset_states = offset
                .as_ref()
                .map(|o| upstream_states(cascade, o, &others))
                .unwrap_or_default();
            let max_state = others.iter().copied().find(|&m| {
                expr::is_rescale_factor(cascade, &inlined, m, key_outer)
                    && recurrences.iter().any(|&(mh, mt)| {
                        mt == m
                            && expr::running_extremum(
                                cascade,
                                &cascade.einsums[mh].expr,
                                m,
                                key_outer,
                            ) == Some(BinaryOp::Max)
                    })
            });
            match max_state {
                Some(m) if offset_states.iter().all(|&s| s == m) => {
                    Some(StateRole::RescaledSum { max_state: m })
                }
                Some(_) => None,
                None => {
                    let coefficient_states = upstream_states(cascade, &coefficient, &others);
                    (coefficient_states.is_empty() && offset_states.is_empty()).then(|| {
                        StateRole::Linear {
                            unit: expr::is_one(&inlined),
                            coefficient,
                        }
                    })
                }
            }
        } else {
            None
        };
        match role {
            Some(role) => {
                notes.push(DependencyNote {
                    tensor: name(state),
                    kind: role.name().to_string(),
                    detail: format!(
                        "recurrence along `{}`; {} elements per step ({})",
                        cascade.ranks[key_outer].name,
                        elements,
                        if per_query { "one per query" } else { "fixed size" }
                    ),
                });
                states.push(CarriedState {
                    state,
                    einsum: h,
                    role,
                    per_query,
                    elements,
                });
            }
            None => unsupported_states.push(format!(
                "`{}`: a recurrence along `{}` that is neither linear in its previous step, a running max/min, nor a sum rescaled by a running max",
                name(state),
                cascade.ranks[key_outer].name
            )),
        }
    }

    // Reductions over the whole key rank: an unsplit key rank, or the outer leaf itself.
    let global_reductions: Vec<Handle<Einsum>> = cascade
        .einsums
        .iter()
        .filter(|(_, e)| {
            e.reductions
                .iter()
                .any(|r| r.rank == key_outer || r.rank == seq.key.declared)
        })
        .map(|(h, _)| h)
        .collect();
    for &g in &global_reductions {
        notes.push(DependencyNote {
            tensor: name(cascade.einsums[g].output.tensor),
            kind: "reduction over the whole key rank".to_string(),
            detail: "needs every key before its result exists: keys are brought to the queries"
                .to_string(),
        });
    }

    let cross_chunk_reads = cross_chunk_reads(cascade, &seq);

    // Epilogue: iterates no key leaf and reads a final state or another epilogue tensor.
    let iterates_key = |h: Handle<Einsum>| {
        cascade
            .iteration_ranks(h)
            .iter()
            .any(|&r| seq.key.has_leaf(r))
    };
    let mut epilogue: Vec<Handle<Einsum>> = Vec::new();
    let mut changed = true;
    while changed {
        changed = false;
        for (h, e) in cascade.einsums.iter() {
            if epilogue.contains(&h) || iterates_key(h) || seq.single_rank() {
                continue;
            }
            let mut reads_final = false;
            e.expr.visit_accesses(&mut |a| {
                let is_state_final = state_tensors.contains(&a.tensor)
                    && cascade.tensors[a.tensor]
                        .iterative
                        .and_then(|d| a.indices.get(d))
                        .is_some_and(|i| i.terms.is_empty() && i.constant != 0);
                let from_epilogue = cascade
                    .producer(a.tensor)
                    .is_some_and(|p| epilogue.contains(&p));
                reads_final |= is_state_final || from_epilogue;
            });
            if reads_final {
                epilogue.push(h);
                changed = true;
            }
        }
    }
    let partial: Vec<Handle<Einsum>> = cascade
        .einsums
        .handles()
        .filter(|h| !epilogue.contains(h))
        .collect();

    let head_ranks = head_ranks(cascade, &seq);

    Classification {
        seq,
        states,
        global_reductions,
        cross_chunk_reads,
        unsupported_states,
        partial,
        epilogue,
        head_ranks,
        notes,
    }
}

/// Accesses whose index along a sequence dimension is not chunk-local: on a dimension
/// declared over a sequence rank, the index must be `tile * outer + x` with `x` inside one
/// tile; on a leaf dimension, the leaf itself (or `k + 1` / a first or last step on a
/// state's iterative dimension).
fn cross_chunk_reads(cascade: &Cascade, seq: &SequenceRanks) -> Vec<String> {
    let mut problems = Vec::new();
    for (_, e) in cascade.einsums.iter() {
        let mut check = |a: &einattn_ir::Access| {
            let t = &cascade.tensors[a.tensor];
            for (d, &rank) in t.ranks.iter().enumerate() {
                let Some(index) = a.indices.get(d) else {
                    continue;
                };
                let index = super::local::expand_index(cascade, index);
                let side = if seq.query.declared == rank || seq.query.has_leaf(rank) {
                    Some(seq.query)
                } else if seq.key.declared == rank || seq.key.has_leaf(rank) {
                    Some(seq.key)
                } else {
                    None
                };
                let Some(side) = side else { continue };
                let ok = if rank == side.declared && side.inner.is_some() {
                    chunk_local(cascade, &index, side.outer, side.tile)
                } else if t.iterative == Some(d) {
                    index.terms.is_empty()
                        || index.as_rank() == Some(rank)
                        || index
                            == IndexExpr {
                                terms: vec![(1, rank)],
                                constant: 1,
                            }
                } else {
                    index.as_rank() == Some(rank)
                        || (rank == side.declared && index.as_rank() == Some(side.outer))
                };
                if !ok {
                    problems.push(format!(
                        "`{}` is read along `{}` at an index that reaches into another chunk",
                        t.name, cascade.ranks[rank].name
                    ));
                }
            }
        };
        e.expr.visit_accesses(&mut |a| check(a));
        check(&e.output);
    }
    problems.sort();
    problems.dedup();
    problems
}

fn chunk_local(cascade: &Cascade, index: &IndexExpr, outer: Handle<Rank>, tile: u64) -> bool {
    if index.constant != 0 {
        return false;
    }
    let mut saw_outer = false;
    let mut inner_ok = false;
    for &(c, r) in &index.terms {
        if r == outer && c == tile as i64 {
            saw_outer = true;
        } else if c == 1 && cascade.ranks[r].extent <= tile && !inner_ok {
            inner_ok = true;
        } else {
            return false;
        }
    }
    saw_outer && inner_ok
}

fn head_ranks(cascade: &Cascade, seq: &SequenceRanks) -> Vec<Handle<Rank>> {
    let seq_tensors: Vec<&einattn_ir::Tensor> = cascade
        .tensors
        .iter()
        .filter(|(_, t)| {
            matches!(t.kind, TensorKind::Input | TensorKind::Output)
                && t.ranks
                    .iter()
                    .any(|&r| r == seq.query.declared || r == seq.key.declared)
        })
        .map(|(_, t)| t)
        .collect();
    let mut candidates: Vec<((bool, u64), Handle<Rank>)> = cascade
        .parallel_ranks()
        .into_iter()
        .filter(|&r| !seq.is_sequence_leaf(r) && cascade.ranks[r].parent.is_none())
        .filter(|&r| seq_tensors.iter().all(|t| t.ranks.contains(&r)))
        .map(|r| {
            // A rank a parameter varies over (a per-head decay, an ALiBi slope) is a
            // head rank rather than a batch rank.
            let has_param = cascade
                .tensors
                .iter()
                .any(|(_, t)| t.kind == TensorKind::Param && t.ranks.contains(&r));
            ((has_param, cascade.ranks[r].extent), r)
        })
        .collect();
    candidates.sort_by_key(|c| std::cmp::Reverse(c.0));
    candidates.into_iter().map(|(_, r)| r).collect()
}
