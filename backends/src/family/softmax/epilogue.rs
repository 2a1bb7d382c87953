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

/// The post-kernels of a cascade split after its attention output.
#[derive(Debug, Clone)]
pub struct Epilogue {
    /// The Einsums after the attention output; it is their input, in the kernel's 16-bit
    /// type, and the cascade's output is theirs.
    pub cascade: Cascade,
    /// The attention output's name (the core's output, the epilogue's input).
    pub attention: String,
}

impl Epilogue {
    /// The cascade's output from the attention output `attention` (f64, in its storage
    /// order) and the whole cascade's inputs (by handle of `whole`): the epilogue run by
    /// the interpreter. Matched by name.
    pub fn output(
        &self,
        whole: &Cascade,
        attention: Vec<f64>,
        inputs: &HashMap<Handle<Tensor>, TensorData>,
    ) -> Result<Vec<f64>, String> {
        let mut given = inputs_by_name(whole, &self.cascade, inputs);
        let a = self
            .cascade
            .tensor_by_name(&self.attention)
            .ok_or("the post-kernels' cascade does not read the attention output")?;
        let shape = self.cascade.tensors[a]
            .ranks
            .iter()
            .map(|&r| self.cascade.ranks[r].extent as usize)
            .collect();
        given.insert(a, TensorData::new(shape, attention));
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
    // Later tensors first: the attention output is the last tensor the core computes.
    for &e in order.iter().rev() {
        let a = c.einsums[e].output.tensor;
        if c.tensors[a].kind != TensorKind::Temp {
            continue;
        }
        let mut core: BTreeSet<Handle<Einsum>> = BTreeSet::new();
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
        let written_by_core: BTreeSet<Handle<Tensor>> =
            core.iter().map(|&w| c.einsums[w].output.tensor).collect();
        let mut leaks = false;
        for (h, einsum) in c.einsums.iter() {
            if !core.contains(&h) {
                einsum.visit_reads(&mut |x| {
                    leaks |= written_by_core.contains(&x.tensor) && x.tensor != a
                });
            }
        }
        if leaks {
            continue;
        }
        let pick = |inside: bool| -> Vec<Einsum> {
            order
                .iter()
                .filter(|e| core.contains(e) == inside)
                .map(|&e| c.einsums[e].clone())
                .collect()
        };
        let mut core_kinds = HashMap::new();
        let mut post_kinds = HashMap::new();
        for (h, t) in c.tensors.iter() {
            let as_is = (t.kind, t.dtype);
            if h == a {
                core_kinds.insert(h, (TensorKind::Output, Some(elem)));
                post_kinds.insert(h, (TensorKind::Input, Some(elem)));
            } else if written_by_core.contains(&h) {
                core_kinds.insert(h, as_is);
            } else {
                core_kinds.insert(h, as_is);
                post_kinds.insert(h, as_is);
            }
        }
        let Ok(core_cascade) = extract(c, &c.name, &pick(true), &core_kinds) else {
            continue;
        };
        if !recognizes(&core_cascade) {
            continue;
        }
        let post = extract(c, &format!("{}_post", c.name), &pick(false), &post_kinds).ok()?;
        return Some((
            core_cascade,
            Epilogue {
                cascade: post,
                attention: c.tensors[a].name.clone(),
            },
        ));
    }
    None
}
