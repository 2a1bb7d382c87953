//! Reverse-mode differentiation of cascades: `einattn grad`.
//!
//! [`grad`] turns a forward cascade into a *backward cascade* in the same language: its
//! inputs are the forward's inputs and parameters, one output gradient `d<O>` per forward
//! output, and the forward values it chooses to read as saved inputs; its outputs are
//! `d<X>` for every tensor differentiated. The jobs, one file each:
//!
//! - [`stabilizer`]: which maxima only stabilize an exponential (no gradient flows there);
//! - [`view`]: the forward as the backward reads it (final views of states, stabilizers
//!   replaced by their final value, constants folded);
//! - [`rules`]: the derivative of every element-wise operator;
//! - [`adjoint`]: the reverse sweep that emits contribution Einsums and sums them;
//! - this file: options, what is saved and what is recomputed, assembling the cascade.
//!
//! Saved versus recomputed: the backward reads the forward *outputs* (saved: the caller has
//! them), the *stabilizers* (a max reduction, or the final value of a running max: one
//! number per row, as FlashAttention-2 saves its log-sum-exp statistics) and the *final
//! steps* of states that are only read there (`RD_final`); it recomputes every other
//! forward tensor it reads (the score tiles), so it never stores a quadratic tensor.

mod adjoint;
mod rules;
mod simplify;
mod stabilizer;
mod view;

use einattn_ir::interp::{TensorData, Values};
use einattn_ir::validate::{self, Diagnostic, DiagnosticKind};
use einattn_ir::{Access, Cascade, DType, Einsum, Expr, Handle, Tensor, TensorKind};
use std::collections::{HashMap, HashSet};

/// What to differentiate.
#[derive(Clone, Debug, Default)]
pub struct GradOptions {
    /// Names of the inputs and parameters to differentiate; `None`: every input.
    pub wrt: Option<Vec<String>>,
}

/// Where a backward input's value comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A forward input or parameter, or a saved forward tensor (an output, a stabilizer).
    Forward(Handle<Tensor>),
    /// The final step of a forward state (`RD[M1, p]` as `RD_final[p]`).
    FinalStep(Handle<Tensor>),
    /// The gradient of a forward output: the caller's `d<O>`.
    OutputGrad(Handle<Tensor>),
}

/// A backward cascade and how it relates to its forward.
#[derive(Clone, Debug)]
pub struct Grad {
    pub cascade: Cascade,
    /// Every input and parameter of the backward with its source (forward handles).
    pub inputs: Vec<(Handle<Tensor>, Source)>,
    /// Backward output `d<X>` -> forward tensor `X`.
    pub grads: Vec<(Handle<Tensor>, Handle<Tensor>)>,
    /// Names of the forward tensors read as saved inputs (outputs, stabilizers, final steps).
    pub saved: Vec<String>,
    /// Names of the forward tensors the backward recomputes.
    pub recomputed: Vec<String>,
    /// Names of the maxima recognized as stabilizers (no gradient flows through them).
    pub stabilizers: Vec<String>,
}

impl Grad {
    /// The backward cascade as `.ein` text, headed by comments that say where it came from,
    /// what it reads from the forward and what it recomputes.
    pub fn to_text(&self, source_name: &str) -> String {
        let list = |names: &[String]| {
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        };
        let mut text = format!(
            "# backward of {source_name} (einattn grad)\n# saved from the forward: {}\n# recomputed: {}\n",
            list(&self.saved),
            list(&self.recomputed),
        );
        if !self.stabilizers.is_empty() {
            text.push_str(&format!(
                "# stabilizers (no gradient flows through them): {}\n",
                self.stabilizers.join(", ")
            ));
        }
        text.push_str(&einattn_ir::print::print(&self.cascade));
        text
    }
}

fn usage(message: String) -> Diagnostic {
    Diagnostic::error(
        DiagnosticKind::UnknownName,
        message,
        einattn_ir::Span::UNKNOWN,
    )
}

/// The tensors to differentiate, from `--wrt` names.
fn resolve_wrt(
    cascade: &Cascade,
    options: &GradOptions,
) -> Result<Vec<Handle<Tensor>>, Vec<Diagnostic>> {
    let Some(names) = &options.wrt else {
        return Ok(cascade.tensors_of(TensorKind::Input).collect());
    };
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for name in names {
        match cascade.tensor_by_name(name) {
            Some(h)
                if matches!(
                    cascade.tensors[h].kind,
                    TensorKind::Input | TensorKind::Param
                ) =>
            {
                if !out.contains(&h) {
                    out.push(h);
                }
            }
            Some(h) => errors.push(
                usage(format!(
                    "`--wrt {name}`: `{name}` is not an input or parameter"
                ))
                .with_related(cascade.tensors[h].span, "computed here"),
            ),
            None => {
                let known: Vec<&str> = cascade
                    .inputs()
                    .map(|h| cascade.tensors[h].name.as_str())
                    .collect();
                let mut d = usage(format!("`--wrt {name}`: no input or parameter `{name}`"));
                if let Some(m) = validate::closest_name(name, known.iter().copied()) {
                    d = d.with_help(format!("did you mean `{m}`?"));
                }
                errors.push(d);
            }
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

fn remap(e: &mut Expr, map: &HashMap<Handle<Tensor>, Handle<Tensor>>) {
    match e {
        Expr::Literal(_) | Expr::Index(_) => {}
        Expr::Access(a) => {
            if let Some(&t) = map.get(&a.tensor) {
                a.tensor = t;
            }
        }
        Expr::Unary(_, a) => remap(a, map),
        Expr::Binary(_, a, b) => {
            remap(a, map);
            remap(b, map);
        }
    }
}

fn remap_einsum(e: &mut Einsum, map: &HashMap<Handle<Tensor>, Handle<Tensor>>) {
    if let Some(&t) = map.get(&e.output.tensor) {
        e.output.tensor = t;
    }
    remap(&mut e.expr, map);
    for c in &mut e.value_mask {
        remap(&mut c.lhs, map);
        remap(&mut c.rhs, map);
    }
    if let Some(r) = &mut e.recurrence {
        remap(&mut r.init, map);
    }
}

fn reads(e: &Einsum) -> Vec<Handle<Tensor>> {
    let mut out = Vec::new();
    e.visit_reads(&mut |a: &Access| out.push(a.tensor));
    out
}

/// Differentiates `forward`. Refusals come back as located diagnostics.
pub fn grad(forward: &Cascade, options: &GradOptions) -> Result<Grad, Vec<Diagnostic>> {
    let wrt = resolve_wrt(forward, options)?;
    if let Some((_, e)) = forward
        .einsums
        .iter()
        .find(|(_, e)| e.recurrence.as_ref().is_some_and(|r| r.reverse))
    {
        return Err(vec![Diagnostic::error(
            DiagnosticKind::NotMappable,
            "cannot differentiate a reverse recurrence (a backward cascade's adjoint state)",
            e.span,
        )
        .with_label("this recurrence runs down its rank")
        .with_help("differentiate the forward cascade instead")]);
    }
    let order = validate::topological_order(forward);
    let stabs = stabilizer::stabilizers(forward, &order);
    let view = view::build(forward, &stabs);
    let finals: Vec<(Handle<Tensor>, Handle<Tensor>)> =
        view.finals.iter().map(|f| (f.view, f.state)).collect();
    let plain_stabs = view.stabilizers.clone();
    let bodies = validate::step_bodies(forward);
    let sweep = adjoint::sweep(view, &wrt, &order, &bodies)?;
    let w = &sweep.cascade;

    // What the backward reads: saved, or recomputed (with what those read in turn).
    let producer: HashMap<Handle<Tensor>, Handle<Einsum>> = w
        .einsums
        .iter()
        .map(|(h, e)| (e.output.tensor, h))
        .collect();
    let mut needed: Vec<Handle<Tensor>> = sweep.einsums.iter().flat_map(reads).collect();
    let mut seen: HashSet<Handle<Tensor>> = HashSet::new();
    let mut recompute: HashSet<Handle<Einsum>> = HashSet::new();
    let mut saved: Vec<(Handle<Tensor>, Source)> = Vec::new();
    let mut forward_inputs: HashSet<Handle<Tensor>> = HashSet::new();
    while let Some(t) = needed.pop() {
        if !seen.insert(t) || sweep.created.contains(&t) {
            continue;
        }
        let kind = w.tensors[t].kind;
        if let Some(&(_, state)) = finals.iter().find(|(v, _)| *v == t) {
            saved.push((t, Source::FinalStep(state)));
        } else if matches!(kind, TensorKind::Input | TensorKind::Param) {
            forward_inputs.insert(t);
        } else if kind == TensorKind::Output || plain_stabs.contains(&t) {
            saved.push((t, Source::Forward(t)));
        } else if let Some(&p) = producer.get(&t) {
            if recompute.insert(p) {
                needed.extend(reads(&w.einsums[p]));
            }
        }
    }
    // The wrt tensors are inputs of the backward even when their gradient is 0.
    forward_inputs.extend(wrt.iter().copied());

    // Assemble: declarations in order (forward inputs, saved, output gradients, gradient
    // outputs), then the recomputed forward Einsums in forward order, then the backward.
    let mut out = Cascade {
        name: format!("{}_grad", forward.name),
        ranks: w.ranks.clone(),
        tensors: Default::default(),
        einsums: Default::default(),
        sizes: w.sizes.clone(),
        fixed_sizes: w.fixed_sizes.clone(),
    };
    let mut map: HashMap<Handle<Tensor>, Handle<Tensor>> = HashMap::new();
    let mut inputs = Vec::new();
    let add = |out: &mut Cascade, map: &mut HashMap<_, _>, h: Handle<Tensor>, t: Tensor| {
        let n = out.tensors.append(t);
        map.insert(h, n);
        n
    };
    for (h, t) in w.tensors.iter() {
        if forward_inputs.contains(&h) {
            let n = add(&mut out, &mut map, h, t.clone());
            inputs.push((n, Source::Forward(h)));
        }
    }
    let mut saved_names = Vec::new();
    for &(h, source) in &saved {
        let mut t = w.tensors[h].clone();
        t.kind = TensorKind::Input;
        t.dtype = Some(t.dtype.unwrap_or(DType::F32));
        t.iterative = None;
        t.default = None;
        saved_names.push(t.name.clone());
        let n = add(&mut out, &mut map, h, t);
        inputs.push((n, source));
    }
    for &(o, d) in &sweep.output_grads {
        let n = add(&mut out, &mut map, d, w.tensors[d].clone());
        inputs.push((n, Source::OutputGrad(o)));
    }
    let mut grads = Vec::new();
    for &(x, d) in &sweep.grads {
        let n = add(&mut out, &mut map, d, w.tensors[d].clone());
        grads.push((n, x));
    }
    let mut recomputed = Vec::new();
    let mut body: Vec<Einsum> = Vec::new();
    for &h in &order {
        if recompute.contains(&h) {
            let e = w.einsums[h].clone();
            let t = e.output.tensor;
            if !map.contains_key(&t) {
                let mut tensor = w.tensors[t].clone();
                tensor.kind = TensorKind::Temp;
                tensor.dtype = None;
                recomputed.push(tensor.name.clone());
                add(&mut out, &mut map, t, tensor);
            }
            body.push(e);
        }
    }
    for e in &sweep.einsums {
        let t = e.output.tensor;
        if !map.contains_key(&t) {
            add(&mut out, &mut map, t, w.tensors[t].clone());
        }
        body.push(e.clone());
    }
    for mut e in body {
        remap_einsum(&mut e, &map);
        out.einsums.append(e);
    }
    let stabilizers = stabs
        .iter()
        .map(|&s| forward.tensors[s].name.clone())
        .collect();
    Ok(Grad {
        cascade: out,
        inputs,
        grads,
        saved: saved_names,
        recomputed,
        stabilizers,
    })
}

/// The values of a backward cascade's inputs: the forward's inputs and saved tensors from
/// a forward evaluation (`values`), and the output gradients from `output_grads` (keyed by
/// forward output).
pub fn backward_inputs(
    forward: &Cascade,
    grad: &Grad,
    values: &Values,
    output_grads: &HashMap<Handle<Tensor>, TensorData>,
) -> Result<HashMap<Handle<Tensor>, TensorData>, String> {
    let mut out = HashMap::new();
    for &(b, source) in &grad.inputs {
        let missing = |h: Handle<Tensor>| format!("no value for `{}`", forward.tensors[h].name);
        let data = match source {
            Source::Forward(f) => values.get(f).cloned().ok_or_else(|| missing(f))?,
            Source::OutputGrad(f) => output_grads.get(&f).cloned().ok_or_else(|| missing(f))?,
            Source::FinalStep(f) => {
                let data = values.get(f).ok_or_else(|| missing(f))?;
                let dim = forward.tensors[f].iterative.ok_or_else(|| missing(f))?;
                final_step(data, dim)
            }
        };
        out.insert(b, data);
    }
    Ok(out)
}

/// The last position of dimension `dim` of `data`, that dimension removed.
pub fn final_step(data: &TensorData, dim: usize) -> TensorData {
    let shape = &data.shape;
    let outer: usize = shape[..dim].iter().product();
    let inner: usize = shape[dim + 1..].iter().product();
    let steps = shape[dim];
    let mut values = Vec::with_capacity(outer * inner);
    for o in 0..outer {
        let base = (o * steps + steps - 1) * inner;
        for i in 0..inner {
            values.push(data.get(base + i).unwrap_or(0.0));
        }
    }
    let mut s = shape.clone();
    s.remove(dim);
    TensorData::new(s, values)
}
