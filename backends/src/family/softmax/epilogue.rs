//! The per-token Einsums after the attention output as post-kernels. Gated attention
//! (`examples/gated_attention.ein`: `O = A * sigmoid(G)`, an output gate per head and
//! channel) computes its output from the attention output `A` and other inputs: those
//! Einsums become a cascade of their own, run by the general lowering after the attention
//! kernel, which writes `A` into scratch.

use crate::family::subcascade::{extract, inputs_by_name};
use einattn_ir::arena::Handle;
use einattn_ir::cascade::{Cascade, DType, Einsum, Tensor, TensorKind};
use einattn_ir::interp::{evaluate_in_order, TensorData};
use einattn_ir::validate::topological_order;
use std::collections::{BTreeSet, HashMap};

/// The post-kernels of a cascade split after its attention output (or outputs).
#[derive(Debug, Clone)]
pub struct Epilogue {
    /// The Einsums after the attention outputs; those are its inputs, in the kernel's
    /// 16-bit type, and the cascade's output is theirs.
    pub cascade: Cascade,
    /// The attention outputs' names (the cores' outputs, the epilogue's inputs), in order.
    pub attentions: Vec<String>,
}

impl Epilogue {
    /// The cascade's output from the attention outputs (f64, in their storage order, one
    /// per name of `attentions`) and the whole cascade's inputs (by handle of `whole`):
    /// the epilogue run by the interpreter. Matched by name.
    pub fn output(
        &self,
        whole: &Cascade,
        attentions: Vec<Vec<f64>>,
        inputs: &HashMap<Handle<Tensor>, TensorData>,
    ) -> Result<Vec<f64>, String> {
        let mut given = inputs_by_name(whole, &self.cascade, inputs);
        for (name, values) in self.attentions.iter().zip(attentions) {
            let a = self
                .cascade
                .tensor_by_name(name)
                .ok_or_else(|| format!("the post-kernels' cascade does not read `{name}`"))?;
            let shape = self.cascade.tensors[a]
                .ranks
                .iter()
                .map(|&r| self.cascade.ranks[r].extent as usize)
                .collect();
            given.insert(a, TensorData::new(shape, values));
        }
        let values = evaluate_in_order(&self.cascade, &given, &topological_order(&self.cascade))
            .map_err(|e| format!("the post-kernels' cascade failed: {e}"))?;
        let out = self
            .cascade
            .tensors_of(TensorKind::Output)
            .next()
            .and_then(|o| values.get(o))
            .ok_or("the post-kernels' cascade computed no output")?;
        Ok(out.stored().into_owned())
    }
}

/// Splits `c` after a computed tensor `A` whose Einsums (everything `A` needs) read as
/// attention to `recognizes`: those are the core, with `A` its output, and the remaining
/// Einsums the epilogue, which reads `A` (and the inputs) and writes the cascade's one
/// output. `None` when no such tensor exists, or an intermediate of the core is read after
/// it.
pub fn split_after_attention(
    c: &Cascade,
    recognizes: impl Fn(&Cascade) -> bool,
) -> Option<(Cascade, Epilogue)> {
    // Later tensors first: the attention output is the last tensor the core computes.
    for &e in topological_order(c).iter().rev() {
        let a = c.einsums[e].output.tensor;
        if c.tensors[a].kind != TensorKind::Temp {
            continue;
        }
        let Some((mut cores, epilogue)) = split_off(c, &[a], std::slice::from_ref(&c.name)) else {
            continue;
        };
        match cores.pop() {
            Some(core) if recognizes(&core) => return Some((core, epilogue)),
            _ => continue,
        }
    }
    None
}

/// Splits `c` into cores, one per computed tensor of `attentions` (named `core_names`),
/// each the Einsums that tensor needs with it as the output, and an epilogue: the
/// remaining Einsums, which read those tensors (in the inputs' 16-bit type) and write the
/// cascade's one output. `None` when `c` has more than one output or no 16-bit input, an
/// intermediate of a core is read outside the cores, or a part is not a valid cascade.
pub(super) fn split_off(
    c: &Cascade,
    attentions: &[Handle<Tensor>],
    core_names: &[String],
) -> Option<(Vec<Cascade>, Epilogue)> {
    let mut outputs = c.tensors_of(TensorKind::Output);
    let (_, None) = (outputs.next()?, outputs.next()) else {
        return None;
    };
    let elem = c
        .tensors_of(TensorKind::Input)
        .filter_map(|t| c.tensors[t].dtype)
        .find(|d| matches!(d, DType::Bf16 | DType::F16))?;
    let writer: HashMap<Handle<Tensor>, Handle<Einsum>> = c
        .einsums
        .iter()
        .map(|(h, e)| (e.output.tensor, h))
        .collect();
    let order = topological_order(c);
    // Everything each attention output needs, back to the inputs.
    let closure = |a: Handle<Tensor>| -> BTreeSet<Handle<Einsum>> {
        let mut core = BTreeSet::new();
        let mut stack = vec![a];
        while let Some(t) = stack.pop() {
            let Some(&w) = writer.get(&t) else { continue };
            if core.insert(w) {
                c.einsums[w].visit_reads(&mut |x| {
                    if c.tensors[x.tensor].kind == TensorKind::Temp {
                        stack.push(x.tensor)
                    }
                });
            }
        }
        core
    };
    let cores: Vec<BTreeSet<Handle<Einsum>>> = attentions.iter().map(|&a| closure(a)).collect();
    let in_cores: BTreeSet<Handle<Einsum>> = cores.iter().flatten().copied().collect();
    let written_by_cores: BTreeSet<Handle<Tensor>> = in_cores
        .iter()
        .map(|&w| c.einsums[w].output.tensor)
        .collect();
    let mut leaks = false;
    for (h, einsum) in c.einsums.iter() {
        if !in_cores.contains(&h) {
            einsum.visit_reads(&mut |x| {
                leaks |= written_by_cores.contains(&x.tensor) && !attentions.contains(&x.tensor)
            });
        }
    }
    if leaks {
        return None;
    }
    let pick = |keep: &dyn Fn(&Handle<Einsum>) -> bool| -> Vec<Einsum> {
        order
            .iter()
            .filter(|e| keep(e))
            .map(|&e| c.einsums[e].clone())
            .collect()
    };
    let mut parts = Vec::new();
    for ((core, &a), name) in cores.iter().zip(attentions).zip(core_names) {
        let kinds: HashMap<_, _> = c
            .tensors
            .iter()
            .map(|(h, t)| {
                let kind = if h == a {
                    (TensorKind::Output, Some(elem))
                } else {
                    (t.kind, t.dtype)
                };
                (h, kind)
            })
            .collect();
        parts.push(extract(c, name, &pick(&|e| core.contains(e)), &kinds).ok()?);
    }
    let post_kinds: HashMap<_, _> = c
        .tensors
        .iter()
        .filter(|(h, _)| attentions.contains(h) || !written_by_cores.contains(h))
        .map(|(h, t)| {
            let kind = if attentions.contains(&h) {
                (TensorKind::Input, Some(elem))
            } else {
                (t.kind, t.dtype)
            };
            (h, kind)
        })
        .collect();
    let post = extract(
        c,
        &format!("{}_post", c.name),
        &pick(&|e| !in_cores.contains(e)),
        &post_kinds,
    )
    .ok()?;
    Some((
        parts,
        Epilogue {
            cascade: post,
            attentions: attentions
                .iter()
                .map(|&a| c.tensors[a].name.clone())
                .collect(),
        },
    ))
}
