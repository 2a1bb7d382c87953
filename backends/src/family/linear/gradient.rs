//! The backward kernels of a forward this family reads: the programs of [`super::backward`],
//! bound to the tensors of `einattn grad`'s backward cascade.
//!
//! As for softmax attention (`family::softmax::gradient`), the backward cascade is the
//! specification (`check --grad` compares these kernels with its interpreter) and the
//! kernels come from the family's reading of the *forward*: the forward is compiled by the
//! family (its reading confirmed on a small instance, its schedule and strategy chosen),
//! and the backward reuses that schedule. It takes backward cascades that differentiate
//! exactly Q, K and V of a reading without feature maps, a computed decay rate or a gate
//! (their chain rule, and a gate's own gradient, stay with the general lowering). A
//! per-head decay rate is a parameter: the backward does not differentiate it.

use super::backward::{backward_programs, operands, Gradient, Operand};
use super::{compile_request, strategy_parts, LinearKernels, Strategy};
use crate::abi::{Dtype, TensorRole};
use crate::family::GradientKernels;
use crate::family::{
    backend_error, contract_tensor, dtype, CompileError, FamilyError, Layout, Module, Rate, Request,
};
use einattn_ir::arena::Handle;
use einattn_ir::cascade::{Cascade, Span, Tensor};
use einattn_ir::validate::{Diagnostic, DiagnosticKind};
use einattn_passes::grad::{Grad, Source as Origin};
use std::fmt::Write as _;

fn not_mine(message: impl Into<String>) -> FamilyError {
    FamilyError::NotMine(vec![Diagnostic::error(
        DiagnosticKind::NotMappable,
        message,
        Span::UNKNOWN,
    )])
}

/// The backward tensors the kernels bind, by role, with the forward layout each shares.
struct Bound {
    tensors: Vec<(Operand, Handle<Tensor>, Layout)>,
    decay: Option<Handle<Tensor>>,
}

impl Bound {
    fn get(&self, op: Operand) -> Result<(Handle<Tensor>, Layout), CompileError> {
        self.tensors
            .iter()
            .find(|(o, _, _)| *o == op)
            .map(|(_, h, l)| (*h, *l))
            .ok_or_else(|| CompileError::Input(format!("no tensor bound as {op:?}")))
    }
}

/// Finds each role of the forward reading among the backward's inputs and outputs.
fn bind(kernels: &LinearKernels, forward: &Cascade, grad: &Grad) -> Result<Bound, FamilyError> {
    let m = &kernels.matched;
    let core = &kernels.core;
    // The reading names tensors of the cascade it normalized; without maps they are the
    // forward's, found by name.
    let in_forward = |t: Handle<Tensor>| {
        forward
            .tensor_by_name(&core.tensors[t].name)
            .ok_or_else(|| {
                not_mine(format!(
                    "`{}` is not a forward tensor",
                    core.tensors[t].name
                ))
            })
    };
    let input = |want: Origin| {
        grad.inputs
            .iter()
            .find(|(_, s)| *s == want)
            .map(|(h, _)| *h)
    };
    let named = |what: &str, h: Option<Handle<Tensor>>| {
        h.ok_or_else(|| not_mine(format!("the backward does not read {what}")))
    };
    let grad_of = |x: Handle<Tensor>, what: &str| {
        grad.grads
            .iter()
            .find(|(_, f)| *f == x)
            .map(|(d, _)| *d)
            .ok_or_else(|| {
                not_mine(format!(
                    "the backward does not compute the gradient of {what}"
                ))
            })
    };
    if grad.grads.len() != 3 {
        return Err(not_mine(
            "the linear backward kernels compute the gradients of exactly Q, K and V",
        ));
    }
    let (q, k, v, o) = (
        in_forward(m.q.tensor)?,
        in_forward(m.k.tensor)?,
        in_forward(m.v.tensor)?,
        in_forward(m.o.tensor)?,
    );
    // A backward tensor has its forward tensor's ranks, so its storage strides.
    let like = |h: Handle<Tensor>, l: &Layout| Layout { tensor: h, ..*l };
    let tensors = vec![
        (Operand::Q, named("Q", input(Origin::Forward(q)))?, &m.q),
        (Operand::K, named("K", input(Origin::Forward(k)))?, &m.k),
        (Operand::V, named("V", input(Origin::Forward(v)))?, &m.v),
        (
            Operand::DO,
            named("the output's gradient", input(Origin::OutputGrad(o)))?,
            &m.o,
        ),
        (Operand::DQ, grad_of(q, "Q")?, &m.q),
        (Operand::DK, grad_of(k, "K")?, &m.k),
        (Operand::DV, grad_of(v, "V")?, &m.v),
    ]
    .into_iter()
    .map(|(op, h, l)| (op, h, like(h, l)))
    .collect::<Vec<_>>();
    for (_, h, l) in &tensors {
        let t = &grad.cascade.tensors[*h];
        let elements: u64 = t
            .ranks
            .iter()
            .map(|&r| grad.cascade.ranks[r].extent)
            .product();
        if elements != l.elements {
            return Err(not_mine(format!(
                "`{}` is not shaped as the forward tensor it differentiates",
                t.name
            )));
        }
    }
    let decay = match m.decay_param {
        Some(p) => Some(named(
            "the decay rate",
            input(Origin::Forward(in_forward(p)?)),
        )?),
        None => None,
    };
    Ok(Bound { tensors, decay })
}

/// The backward kernels of `forward` (read by this family) for `grad`'s backward cascade.
pub fn compile_gradient(forward: &Request, grad: &Grad) -> Result<GradientKernels, FamilyError> {
    let kernels = compile_request(forward)?;
    let m = &kernels.matched;
    if !m.maps.is_empty() || m.derived.is_some() || m.prologue.is_some() {
        return Err(not_mine(
            "the forward reads as linear attention after normalizing feature maps or a decay rate, whose chain rule the linear backward kernels do not carry",
        ));
    }
    if m.gate.is_some() {
        return Err(not_mine(
            "the linear backward kernels take no gate (the gate's gradient is the general lowering's)",
        ));
    }
    let bound = bind(&kernels, forward.cascade, grad)?;
    let backward = &grad.cascade;
    let elem = dtype(m.spec.elem);
    let decay = bound
        .decay
        .map(|p| contract_tensor(backward, p, TensorRole::Param, Dtype::F32, None));
    let parts = strategy_parts(kernels.schedule.strategy);
    let programs = backward_programs(&m.spec, &kernels.schedule, &parts).map_err(backend_error)?;
    let mut modules = Vec::new();
    for (g, program) in programs {
        let mut io = Vec::new();
        for op in operands(g) {
            let (h, layout) = bound.get(op)?;
            let role = match op {
                Operand::DQ | Operand::DK | Operand::DV => TensorRole::Output,
                _ => TensorRole::Input,
            };
            io.push(contract_tensor(backward, h, role, elem, Some(&layout)));
        }
        modules.push((g, kernels.module_of(program, io, decay.clone())?));
    }
    let explain = explain(&kernels, forward.cascade, &modules);
    let (b, h, n) = (m.batch, m.heads, m.n);
    let d = u64::from(m.spec.head_dim);
    Ok(GradientKernels {
        family: "linear",
        cascade: backward.clone(),
        modules: modules.into_iter().map(|(_, m)| m).collect(),
        explain,
        rate: Rate::Tokens {
            tokens: (b * n) as f64,
            // One pass over Q, K, V, dO and dQ, dK, dV.
            bytes: (b * n * h * d * 7 * u64::from(m.spec.elem.bytes())) as f64,
        },
        work: b * h * n * n * d * 4,
    })
}

/// `--emit schedule` of the backward.
fn explain(kernels: &LinearKernels, forward: &Cascade, modules: &[(Gradient, Module)]) -> String {
    let m = &kernels.matched;
    let s = &kernels.schedule;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "lowering: linear attention backward, {} kernels with {} (derived from the forward `{}`, read as linear attention: decay {:?}, {})",
        modules.len(),
        s.mma.name(),
        forward.name,
        m.spec.decay,
        if m.spec.causal { "causal" } else { "non-causal" }
    );
    let entries = |g: Gradient| {
        modules
            .iter()
            .filter(|(x, _)| *x == g)
            .map(|(_, m)| m.ptx.entry.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let strategy = match s.strategy {
        Strategy::SinglePass => "single pass".to_string(),
        Strategy::LookBack => "look-back".to_string(),
        Strategy::Chunked { chunk_tiles } => format!("chunked, {chunk_tiles} blocks per chunk"),
    };
    let walk = if m.spec.causal {
        "walks the blocks from the last to the first"
    } else {
        "non-causal"
    };
    let _ = writeln!(
        out,
        "  {}: dQ = (dO V^T * D) K, the forward's program ({strategy}) with q, k, v = dO, V, K: the state carries decayed V^T K over the earlier blocks",
        entries(Gradient::Dq)
    );
    let _ = writeln!(
        out,
        "  {}: dK = (V dO^T * D^T) Q, the program with q, k, v = V, dO, Q that {walk}, carrying decayed dO^T Q over the later blocks",
        entries(Gradient::Dk)
    );
    let _ = writeln!(
        out,
        "  {}: dV = (K Q^T * D^T) dO, the program with q, k, v = K, Q, dO that {walk}, carrying decayed Q^T dO over the later blocks",
        entries(Gradient::Dv)
    );
    let _ = writeln!(
        out,
        "why: each gradient is a linear attention of the forward's operands (the decay mask transposed for dK and dV), so each kernel keeps one d x {} state and one output tile in registers like the forward; blocks of {} tokens, {} warps, value blocks of {}",
        s.value_block, m.spec.head_dim, s.warps, s.value_block
    );
    out
}
