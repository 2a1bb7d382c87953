//! The forward cascade as the backward sees it: stabilizers and states read only at their
//! final step become *final views* (`RM_final[p]`, a tensor without the step dimension),
//! and the reads of a stabilizer at any step read its final value instead (the outputs do
//! not depend on it, so any value may stand in; the final maximum keeps every exponential
//! at most 1). After that, `exp(RM_final - RM_final)` folds to 1, and tensors that are a
//! constant are inlined.

use super::simplify::simplify;
use einattn_ir::{Access, Cascade, Einsum, Expr, Handle, IndexExpr, Tensor, TensorKind};
use std::collections::HashMap;

/// A state read through its final step.
pub struct FinalView {
    pub state: Handle<Tensor>,
    pub view: Handle<Tensor>,
    pub stabilizer: bool,
}

pub struct View {
    pub cascade: Cascade,
    pub finals: Vec<FinalView>,
    /// Non-recurrent stabilizers (a max reduction): saved as they are.
    pub stabilizers: Vec<Handle<Tensor>>,
}

impl View {
    pub fn final_of(&self, state: Handle<Tensor>) -> Option<&FinalView> {
        self.finals.iter().find(|f| f.state == state)
    }
}

fn is_final_read(cascade: &Cascade, a: &Access, dim: usize) -> bool {
    let t = &cascade.tensors[a.tensor];
    let extent = cascade.ranks[t.ranks[dim]].extent as i64;
    a.indices
        .get(dim)
        .is_some_and(|i| i.terms.is_empty() && i.constant == extent)
}

fn rewrite_reads(e: &mut Expr, f: &mut impl FnMut(&Access) -> Option<Access>) {
    match e {
        Expr::Literal(_) | Expr::Index(_) => {}
        Expr::Access(a) => {
            if let Some(b) = f(a) {
                *a = b;
            }
        }
        Expr::Unary(_, a) => rewrite_reads(a, f),
        Expr::Binary(_, a, b) => {
            rewrite_reads(a, f);
            rewrite_reads(b, f);
        }
    }
}

fn rewrite_einsum(e: &mut Einsum, f: &mut impl FnMut(&Access) -> Option<Access>) {
    rewrite_reads(&mut e.expr, f);
    for c in &mut e.value_mask {
        rewrite_reads(&mut c.lhs, f);
        rewrite_reads(&mut c.rhs, f);
    }
    if let Some(r) = &mut e.recurrence {
        rewrite_reads(&mut r.init, f);
    }
}

fn inline_constants(e: &mut Expr, constants: &HashMap<Handle<Tensor>, f64>) {
    match e {
        Expr::Literal(_) | Expr::Index(_) => {}
        Expr::Access(a) => {
            if let Some(v) = constants.get(&a.tensor) {
                *e = Expr::Literal(*v);
            }
        }
        Expr::Unary(_, a) => inline_constants(a, constants),
        Expr::Binary(_, a, b) => {
            inline_constants(a, constants);
            inline_constants(b, constants);
        }
    }
}

pub fn build(forward: &Cascade, stabilizers: &[Handle<Tensor>]) -> View {
    let mut cascade = forward.clone();
    let mut finals = Vec::new();
    let states: Vec<(Handle<Einsum>, Handle<Tensor>, usize)> = forward
        .einsums
        .iter()
        .filter(|(_, e)| e.recurrence.is_some())
        .filter_map(|(h, e)| {
            let t = e.output.tensor;
            forward.tensors[t].iterative.map(|d| (h, t, d))
        })
        .collect();
    for (producer, state, dim) in states {
        let stabilizer = stabilizers.contains(&state);
        let mut only_final = true;
        for (h, e) in forward.einsums.iter() {
            if h == producer {
                continue;
            }
            e.visit_reads(&mut |a| {
                if a.tensor == state && !is_final_read(forward, a, dim) {
                    only_final = false;
                }
            });
        }
        if !stabilizer && !only_final {
            continue;
        }
        let t = &forward.tensors[state];
        let mut ranks = t.ranks.clone();
        ranks.remove(dim);
        let view = cascade.tensors.append(Tensor {
            name: format!("{}_final", t.name),
            ranks,
            kind: TensorKind::Temp,
            dtype: None,
            iterative: None,
            default: None,
            span: t.span,
        });
        for h in forward.einsums.handles() {
            if h == producer {
                continue;
            }
            rewrite_einsum(&mut cascade.einsums[h], &mut |a| {
                (a.tensor == state).then(|| {
                    let mut indices: Vec<IndexExpr> = a.indices.clone();
                    indices.remove(dim);
                    Access {
                        tensor: view,
                        indices,
                        span: a.span,
                    }
                })
            });
        }
        finals.push(FinalView {
            state,
            view,
            stabilizer,
        });
    }
    // Fold: exp(x - x) = 1, x * 1 = x; inline tensors that became constants.
    for _ in 0..4 {
        let mut constants = HashMap::new();
        for h in forward.einsums.handles() {
            let e = &mut cascade.einsums[h];
            e.expr = simplify(&e.expr);
        }
        for (_, e) in cascade.einsums.iter() {
            if let Expr::Literal(v) = e.expr {
                if e.recurrence.is_none()
                    && e.mask.is_empty()
                    && e.value_mask.is_empty()
                    && e.reductions.is_empty()
                    && cascade.tensors[e.output.tensor].kind == TensorKind::Temp
                {
                    constants.insert(e.output.tensor, v);
                }
            }
        }
        if constants.is_empty() {
            break;
        }
        let mut changed = false;
        for h in forward.einsums.handles() {
            let e = &mut cascade.einsums[h];
            let before = e.expr.clone();
            inline_constants(&mut e.expr, &constants);
            changed |= before != e.expr;
        }
        if !changed {
            break;
        }
    }
    let plain = stabilizers
        .iter()
        .copied()
        .filter(|s| forward.tensors[*s].iterative.is_none())
        .collect();
    View {
        cascade,
        finals,
        stabilizers: plain,
    }
}
