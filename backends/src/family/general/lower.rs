//! A cascade as point kernels: one kernel per Einsum, per recurrence or per step body, in
//! the interpreter's evaluation order, with the mask of each Einsum checked at the loop
//! level where the interpreter checks it.

use super::program::*;
use crate::abi::Dtype;
use einattn_ir::cascade::{
    Access as IrAccess, Cascade, DType, Einsum, Expr as IrExpr, IndexExpr, Rank, Tensor, TensorKind,
};
use einattn_ir::validate::{step_bodies, topological_order};
use einattn_ir::Handle;
use std::collections::HashMap;

/// The storage type a tensor's slot gets: `elem` replaces the 16-bit types of inputs and
/// outputs when given; parameters and scratch are f32.
fn storage(t: &Tensor, elem: Option<Dtype>) -> Dtype {
    let declared = match t.dtype {
        Some(DType::Bf16) => Dtype::Bf16,
        Some(DType::F16) => Dtype::F16,
        _ => Dtype::F32,
    };
    match (t.kind, elem) {
        (TensorKind::Param | TensorKind::Temp, _) => Dtype::F32,
        (_, Some(e)) if declared != Dtype::F32 => e,
        _ => declared,
    }
}

struct Lowering<'c> {
    cascade: &'c Cascade,
    /// The slot each tensor is written to and read from.
    slot_of: HashMap<Handle<Tensor>, usize>,
    slots: Vec<Slot>,
}

impl Lowering<'_> {
    fn shape(&self, t: Handle<Tensor>) -> Vec<u64> {
        (0..self.cascade.tensors[t].ranks.len())
            .map(|d| self.cascade.dim_extent(t, d))
            .collect()
    }

    fn access(&self, a: &IrAccess) -> Access {
        Access {
            slot: self.slot_of[&a.tensor],
            indices: a.indices.clone(),
        }
    }

    fn expr(&self, e: &IrExpr) -> Expr {
        match e {
            IrExpr::Literal(x) => Expr::Literal(*x),
            IrExpr::Access(a) => Expr::Load(self.access(a)),
            IrExpr::Index(i) => Expr::Index(i.clone()),
            IrExpr::Unary(op, a) => Expr::Unary(*op, Box::new(self.expr(a))),
            IrExpr::Binary(op, a, b) => {
                Expr::Binary(*op, Box::new(self.expr(a)), Box::new(self.expr(b)))
            }
        }
    }

    /// The free ranks of an Einsum in the order of its output's dimensions (consecutive
    /// threads then write consecutive elements), then any others.
    fn free_ranks(&self, h: Handle<Einsum>) -> Vec<Handle<Rank>> {
        let e = &self.cascade.einsums[h];
        let free: Vec<Handle<Rank>> = self
            .cascade
            .iteration_ranks(h)
            .into_iter()
            .filter(|&r| !e.is_reduced(r))
            .collect();
        let mut ordered: Vec<Handle<Rank>> = e
            .output
            .indices
            .iter()
            .filter_map(IndexExpr::as_rank)
            .filter(|r| free.contains(r))
            .collect();
        for r in free {
            if !ordered.contains(&r) {
                ordered.push(r);
            }
        }
        ordered
    }

    /// An Einsum's points minus `bound` (ranks a CTA or the step loop fixes).
    fn compute(&self, h: Handle<Einsum>, bound: &[Handle<Rank>]) -> Compute {
        let e = &self.cascade.einsums[h];
        // Outermost reduction first; a condition is checked at the first level where all of
        // its ranks are bound, so a masked outer point skips its whole inner reduction.
        let order: Vec<_> = e.reductions.iter().rev().collect();
        let level_of = |ranks: &mut dyn Iterator<Item = Handle<Rank>>| -> Option<usize> {
            let mut level = None;
            for r in ranks {
                if let Some(pos) = order.iter().position(|red| red.rank == r) {
                    level = Some(level.map_or(pos, |l: usize| l.max(pos)));
                }
            }
            level
        };
        let mut levels: Vec<Level> = order
            .iter()
            .map(|red| Level {
                rank: red.rank.index(),
                extent: self.cascade.ranks[red.rank].extent,
                op: red.op,
                checks: Checks::default(),
            })
            .collect();
        let mut outer = Checks::default();
        for c in &e.mask {
            match level_of(&mut c.lhs.ranks().chain(c.rhs.ranks())) {
                Some(l) => levels[l].checks.affine.push(c.clone()),
                None => outer.affine.push(c.clone()),
            }
        }
        for c in &e.value_mask {
            let mut ranks = Vec::new();
            c.visit_indices(&mut |i| ranks.extend(i.ranks()));
            let check = ValueCheck {
                lhs: self.expr(&c.lhs),
                op: c.op,
                rhs: self.expr(&c.rhs),
            };
            match level_of(&mut ranks.into_iter()) {
                Some(l) => levels[l].checks.values.push(check),
                None => outer.values.push(check),
            }
        }
        Compute {
            einsum: self.cascade.tensors[e.output.tensor].name.clone(),
            out: self.access(&e.output),
            points: self
                .free_ranks(h)
                .into_iter()
                .filter(|r| !bound.contains(r))
                .map(|r| r.index())
                .collect(),
            outer,
            levels,
            value: self.expr(&e.expr),
        }
    }

    /// A state's first step: its init at the iterative dimension's index 0 (the last
    /// index for a reverse recurrence).
    fn init(&self, h: Handle<Einsum>, bound: &[Handle<Rank>]) -> Option<Compute> {
        let e = &self.cascade.einsums[h];
        let rec = e.recurrence.as_ref()?;
        let mut out = self.access(&e.output);
        if let Some(d) = self.cascade.tensors[e.output.tensor].iterative {
            if let Some(i) = out.indices.get_mut(d) {
                *i = IndexExpr::constant(rec.init_step(self.cascade.ranks[rec.rank].extent));
            }
        }
        Some(Compute {
            einsum: format!("init {}", self.cascade.tensors[e.output.tensor].name),
            out,
            points: self
                .free_ranks(h)
                .into_iter()
                .filter(|r| *r != rec.rank && !bound.contains(r))
                .map(|r| r.index())
                .collect(),
            outer: Checks::default(),
            levels: Vec::new(),
            value: self.expr(&rec.init),
        })
    }

    /// Ranks on which no member of a recurrent group reads another point of the group's
    /// tensors: free in every member, a plain index of every member's output, and read
    /// at that same plain index wherever a member reads a group tensor. One CTA per point.
    fn instance_ranks(&self, members: &[Handle<Einsum>], step: Handle<Rank>) -> Vec<Handle<Rank>> {
        let c = self.cascade;
        let produced: Vec<Handle<Tensor>> = members
            .iter()
            .map(|&m| c.einsums[m].output.tensor)
            .collect();
        let dim_of = |t: Handle<Tensor>, r: Handle<Rank>| -> Option<usize> {
            let producer = members.iter().find(|&&m| c.einsums[m].output.tensor == t)?;
            c.einsums[*producer]
                .output
                .indices
                .iter()
                .position(|i| i.as_rank() == Some(r))
        };
        let Some(&first) = members.first() else {
            return Vec::new();
        };
        self.free_ranks(first)
            .into_iter()
            .filter(|&r| r != step)
            .filter(|&r| {
                members.iter().all(|&m| {
                    let e = &c.einsums[m];
                    if e.is_reduced(r) || dim_of(e.output.tensor, r).is_none() {
                        return false;
                    }
                    let mut ok = true;
                    e.visit_reads(&mut |a| {
                        if produced.contains(&a.tensor) {
                            ok &= dim_of(a.tensor, r)
                                .and_then(|d| a.indices.get(d))
                                .is_some_and(|i| i.as_rank() == Some(r));
                        }
                    });
                    ok
                })
            })
            .collect()
    }
}

/// Lowers `cascade` to point kernels (`elem`: the storage type of its 16-bit inputs and
/// outputs, when overridden). Kernel names start with `prefix`.
pub fn lower(cascade: &Cascade, elem: Option<Dtype>, prefix: &str) -> PointProgram {
    let mut reads: HashMap<Handle<Tensor>, usize> = HashMap::new();
    for (_, e) in cascade.einsums.iter() {
        e.visit_reads(&mut |a| *reads.entry(a.tensor).or_default() += 1);
    }
    let mut low = Lowering {
        cascade,
        slot_of: HashMap::new(),
        slots: Vec::new(),
    };
    // An output that later Einsums read is computed in scratch (absent points stay
    // absent for them) and copied out at the end.
    let mut copies: Vec<(usize, usize)> = Vec::new();
    for (h, t) in cascade.tensors.iter() {
        let shape = low.shape(h);
        let kind = match t.kind {
            TensorKind::Input => SlotKind::Input,
            TensorKind::Param => SlotKind::Param,
            TensorKind::Output => SlotKind::Output,
            TensorKind::Temp => SlotKind::Scratch,
        };
        let slot = low.slots.len();
        low.slots.push(Slot {
            name: t.name.clone(),
            kind,
            dtype: storage(t, elem),
            shape: shape.clone(),
        });
        low.slot_of.insert(h, slot);
        if kind == SlotKind::Output && reads.contains_key(&h) {
            let scratch = low.slots.len();
            low.slots.push(Slot {
                name: format!("{}__value", t.name),
                kind: SlotKind::Scratch,
                dtype: Dtype::F32,
                shape,
            });
            low.slot_of.insert(h, scratch);
            copies.push((scratch, slot));
        }
    }
    let bodies = step_bodies(cascade);
    let mut done = vec![false; cascade.einsums.len()];
    let mut kernels = Vec::new();
    let name = |k: usize, what: &str| format!("{prefix}_{k}_{what}");
    for e in topological_order(cascade) {
        if done[e.index()] {
            continue;
        }
        let einsum = &cascade.einsums[e];
        let group: Option<(Vec<Handle<Einsum>>, Handle<Rank>)> =
            match bodies.iter().find(|b| b.einsums.contains(&e)) {
                Some(b) => Some((b.einsums.clone(), b.rank)),
                None => einsum.recurrence.as_ref().map(|r| (vec![e], r.rank)),
            };
        match group {
            Some((members, rank)) => {
                // Every state of a step body runs the same way (validation checks it).
                let reverse = members.iter().any(|&m| {
                    cascade.einsums[m]
                        .recurrence
                        .as_ref()
                        .is_some_and(|r| r.reverse)
                });
                let instance = low.instance_ranks(&members, rank);
                let mut bound = instance.clone();
                bound.push(rank);
                let inits = members
                    .iter()
                    .filter_map(|&m| low.init(m, &instance))
                    .collect();
                let body = members.iter().map(|&m| low.compute(m, &bound)).collect();
                let what = cascade.tensors[cascade.einsums[members[0]].output.tensor]
                    .name
                    .clone();
                kernels.push(PointKernel::Recurrent {
                    name: name(kernels.len(), &what),
                    instance: instance.iter().map(|r| r.index()).collect(),
                    rank: rank.index(),
                    steps: cascade.ranks[rank].extent,
                    reverse,
                    inits,
                    body,
                });
                for m in members {
                    done[m.index()] = true;
                }
            }
            None => {
                let what = cascade.tensors[einsum.output.tensor].name.clone();
                kernels.push(PointKernel::Parallel {
                    name: name(kernels.len(), &what),
                    compute: low.compute(e, &[]),
                });
                done[e.index()] = true;
            }
        }
    }
    for (from, to) in copies {
        let what = format!("store_{}", low.slots[to].name);
        kernels.push(PointKernel::Copy {
            name: name(kernels.len(), &what),
            from,
            to,
        });
    }
    PointProgram {
        name: cascade.name.clone(),
        ranks: cascade
            .ranks
            .iter()
            .map(|(_, r)| (r.name.clone(), r.extent))
            .collect(),
        slots: low.slots,
        kernels,
    }
}
