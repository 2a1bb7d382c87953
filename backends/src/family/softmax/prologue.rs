//! The per-token Einsums before the score as pre-kernels. QK-norm (`examples/qk_norm.ein`)
//! and rotary embeddings compute Q and K from the inputs with row statistics and tables
//! before `Q . K`: those Einsums become a cascade of their own, run by the general
//! lowering into scratch, and the attention kernel reads their results as its Q and K.

use super::recognize::flatten_product;
use crate::family::subcascade::{extract, inputs_by_name};
use einattn_ir::arena::Handle;
use einattn_ir::cascade::{Cascade, DType, Einsum, Expr, ReduceOp, Tensor, TensorKind};
use einattn_ir::interp::{evaluate_in_order, TensorData};
use einattn_ir::validate::topological_order;
use std::collections::{BTreeSet, HashMap};

/// The pre-kernels of a cascade split at its score.
#[derive(Debug, Clone)]
pub struct Prologue {
    /// The Einsums that compute the score's operands from the inputs; the operands are
    /// its outputs, in the kernel's 16-bit type.
    pub cascade: Cascade,
    /// The operands' names (the same in the core cascade, where they are inputs).
    pub written: Vec<String>,
}

impl Prologue {
    /// The core cascade's inputs from the whole cascade's (`inputs`, by handle of
    /// `whole`): the operands computed by the prologue (f64, as the interpreter computes
    /// them), everything else as given. Matched by name.
    pub fn core_inputs(
        &self,
        whole: &Cascade,
        core: &Cascade,
        inputs: &HashMap<Handle<Tensor>, TensorData>,
    ) -> Result<HashMap<Handle<Tensor>, TensorData>, String> {
        let given = inputs_by_name(whole, &self.cascade, inputs);
        let values = evaluate_in_order(&self.cascade, &given, &topological_order(&self.cascade))
            .map_err(|e| format!("the pre-kernels' cascade failed: {e}"))?;
        let mut out = inputs_by_name(whole, core, inputs);
        for name in &self.written {
            let (Some(mine), Some(theirs)) =
                (self.cascade.tensor_by_name(name), core.tensor_by_name(name))
            else {
                return Err(format!("`{name}` is not in both cascades"));
            };
            let data = values
                .get(mine)
                .ok_or_else(|| format!("the pre-kernels did not compute `{name}`"))?;
            out.insert(theirs, data.clone());
        }
        Ok(out)
    }
}

/// Splits `c` at its score `S = f * A . B` (one sum over a rank both operands have, each
/// with a rank of its own): when `A` or `B` is computed by the cascade, the Einsums that
/// compute them, and nothing else, form the prologue, and the rest is the core cascade,
/// which reads them as inputs of the cascade's 16-bit input type. `None` when the score
/// reads inputs alone, or when a split does not apply (an operand computed by a
/// recurrence or a masked Einsum, an intermediate of the prologue read after the score).
pub fn split_at_score(c: &Cascade) -> Option<(Cascade, Prologue)> {
    let (_, operands) = score_operands(c)?;
    let computed: Vec<Handle<Tensor>> = operands
        .into_iter()
        .filter(|&t| c.tensors[t].kind == TensorKind::Temp)
        .collect();
    if computed.is_empty() {
        return None;
    }
    let writer: HashMap<Handle<Tensor>, Handle<Einsum>> = c
        .einsums
        .iter()
        .map(|(h, e)| (e.output.tensor, h))
        .collect();
    // The Einsums the operands need, back to the inputs.
    let mut prologue: BTreeSet<Handle<Einsum>> = BTreeSet::new();
    let mut stack = computed.clone();
    while let Some(t) = stack.pop() {
        let e = *writer.get(&t)?;
        let einsum = &c.einsums[e];
        if einsum.recurrence.is_some() || !einsum.mask.is_empty() || !einsum.value_mask.is_empty() {
            return None;
        }
        if prologue.insert(e) {
            einsum.visit_reads(&mut |a| {
                if c.tensors[a.tensor].kind == TensorKind::Temp {
                    stack.push(a.tensor);
                }
            });
        }
    }
    let written_by_prologue: BTreeSet<Handle<Tensor>> = prologue
        .iter()
        .map(|&e| c.einsums[e].output.tensor)
        .collect();
    // Only the operands leave the prologue.
    for (h, e) in c.einsums.iter() {
        if prologue.contains(&h) {
            continue;
        }
        let mut leaks = false;
        e.visit_reads(&mut |a| {
            leaks |= written_by_prologue.contains(&a.tensor) && !computed.contains(&a.tensor)
        });
        if leaks {
            return None;
        }
    }
    let elem = c
        .tensors_of(TensorKind::Input)
        .filter_map(|t| c.tensors[t].dtype)
        .find(|d| matches!(d, DType::Bf16 | DType::F16))?;
    let order = topological_order(c);
    let pick = |inside: bool| -> Vec<Einsum> {
        order
            .iter()
            .filter(|e| prologue.contains(e) == inside)
            .map(|&e| c.einsums[e].clone())
            .collect()
    };
    let mut pre_kinds = HashMap::new();
    let mut core_kinds = HashMap::new();
    for (h, t) in c.tensors.iter() {
        let as_is = (t.kind, t.dtype);
        if computed.contains(&h) {
            pre_kinds.insert(h, (TensorKind::Output, Some(elem)));
            core_kinds.insert(h, (TensorKind::Input, Some(elem)));
        } else if written_by_prologue.contains(&h) {
            pre_kinds.insert(h, as_is);
        } else {
            pre_kinds.insert(h, as_is);
            core_kinds.insert(h, as_is);
        }
    }
    let pre = extract(c, &format!("{}_pre", c.name), &pick(true), &pre_kinds).ok()?;
    let core = extract(c, &c.name, &pick(false), &core_kinds).ok()?;
    let written = computed
        .iter()
        .map(|&t| c.tensors[t].name.clone())
        .collect();
    Some((
        core,
        Prologue {
            cascade: pre,
            written,
        },
    ))
}

/// The one Einsum of the form `f * A[.., e] * B[.., e]` summed over `e`, where `A` and `B`
/// are different tensors each with a rank the other lacks (a query and a key rank), and
/// its two operands.
fn score_operands(c: &Cascade) -> Option<(Handle<Einsum>, [Handle<Tensor>; 2])> {
    let mut found = None;
    for (h, e) in c.einsums.iter() {
        let [red] = &e.reductions[..] else {
            continue;
        };
        if red.op != ReduceOp::Sum {
            continue;
        }
        let mut factors = Vec::new();
        flatten_product(&e.expr, &mut factors);
        let contracted: Vec<Handle<Tensor>> = factors
            .iter()
            .filter_map(|f| match f {
                Expr::Access(a) if c.tensors[a.tensor].ranks.contains(&red.rank) => Some(a.tensor),
                _ => None,
            })
            .collect();
        let [a, b] = contracted[..] else {
            continue;
        };
        let own = |x: Handle<Tensor>, y: Handle<Tensor>| {
            c.tensors[x]
                .ranks
                .iter()
                .any(|r| !c.tensors[y].ranks.contains(r))
        };
        if a != b && own(a, b) && own(b, a) {
            if found.is_some() {
                return None;
            }
            found = Some((h, [a, b]));
        }
    }
    found
}
