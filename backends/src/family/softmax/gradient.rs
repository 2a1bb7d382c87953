//! The backward kernels of a forward this family reads: the two programs of
//! [`super::backward`], bound to the tensors of `einattn grad`'s backward cascade.
//!
//! The backward cascade is the specification (`check --grad` compares these kernels with
//! its interpreter); the family derives the kernels from its reading of the *forward*
//! (score chain, masks, which recurrences carry the row max and denominator), since the
//! backward's Einsums are that reading differentiated. It takes backward cascades that
//! differentiate Q, K and V. Where the backward reads the forward's output and its final
//! row max and sum (the online form's saved values), the kernels start from those; where
//! it saves less (the 2- and 3-pass forms keep only a max), the forward kernel runs again
//! first with its log-sum-exp output, into scratch.

use super::backward::{dkdv_program, dq_program, names, BackwardSchedule, Statistics};
use super::{recognize, visible_flops, AttentionMatch, Normalization, Running};
use crate::abi::{Dtype, LaunchContract, Scratch, Source, TensorRole};
use crate::family::GradientKernels;
use crate::family::{
    backend_error, contract, contract_tensor, dtype, CompileError, ContractNames, ContractParts,
    FamilyError, KernelOptions, KernelProgram, Layout, Module, Rate,
};
use crate::print_ptx;
use einattn_ir::arena::Handle;
use einattn_ir::cascade::{Cascade, Span, Tensor};
use einattn_ir::validate::{Diagnostic, DiagnosticKind};
use einattn_passes::grad::{Grad, Source as Origin};
use serde_json::json;
use std::collections::BTreeMap;
use std::fmt::Write as _;

fn not_mine(message: impl Into<String>) -> FamilyError {
    FamilyError::NotMine(vec![Diagnostic::error(
        DiagnosticKind::NotMappable,
        message,
        Span::UNKNOWN,
    )])
}

/// The backward tensors the kernels bind, by role.
struct Bound {
    q: Handle<Tensor>,
    k: Handle<Tensor>,
    v: Handle<Tensor>,
    d_o: Handle<Tensor>,
    /// The forward's output and its final row max and sum, when the backward reads all
    /// three.
    saved: Option<Saved>,
    dq: Handle<Tensor>,
    dk: Handle<Tensor>,
    dv: Handle<Tensor>,
    scalars: Vec<Handle<Tensor>>,
    head_params: Vec<Handle<Tensor>>,
}

struct Saved {
    o: Handle<Tensor>,
    row_max: Handle<Tensor>,
    row_sum: Handle<Tensor>,
}

/// The forward's output, recomputed into scratch where the backward does not read it.
const O_FORWARD: &str = "o_forward";

/// Finds each role of the forward reading among the backward's inputs and outputs.
fn bind(m: &AttentionMatch, grad: &Grad) -> Result<Bound, FamilyError> {
    let input = |want: Origin| {
        grad.inputs
            .iter()
            .find(|(_, s)| *s == want)
            .map(|(h, _)| *h)
    };
    let named = |what: &str, h: Option<Handle<Tensor>>| {
        h.ok_or_else(|| not_mine(format!("the backward does not read {what}")))
    };
    let final_step = |kind: Running| {
        m.running
            .iter()
            .filter(|(_, r)| *r == kind)
            .find_map(|(t, _)| input(Origin::FinalStep(*t)))
    };
    let grad_of = |forward: Handle<Tensor>, what: &str| {
        grad.grads
            .iter()
            .find(|(_, x)| *x == forward)
            .map(|(d, _)| *d)
            .ok_or_else(|| {
                not_mine(format!(
                    "the backward does not compute the gradient of {what}"
                ))
            })
    };
    if grad.grads.len() != 3 {
        return Err(not_mine(
            "the backward kernels compute the gradients of exactly Q, K and V",
        ));
    }
    let forward_params = |ts: &[Handle<Tensor>]| -> Result<Vec<Handle<Tensor>>, FamilyError> {
        ts.iter()
            .map(|&t| named("a score parameter", input(Origin::Forward(t))))
            .collect()
    };
    Ok(Bound {
        q: named("Q", input(Origin::Forward(m.q.tensor)))?,
        k: named("K", input(Origin::Forward(m.k.tensor)))?,
        v: named("V", input(Origin::Forward(m.v.tensor)))?,
        d_o: named(
            "the output's gradient",
            input(Origin::OutputGrad(m.o.tensor)),
        )?,
        saved: match (
            input(Origin::Forward(m.o.tensor)),
            final_step(Running::Max),
            final_step(Running::Sum),
        ) {
            (Some(o), Some(row_max), Some(row_sum)) => Some(Saved {
                o,
                row_max,
                row_sum,
            }),
            _ => None,
        },
        dq: grad_of(m.q.tensor, "Q")?,
        dk: grad_of(m.k.tensor, "K")?,
        dv: grad_of(m.v.tensor, "V")?,
        scalars: forward_params(&m.scalar_params)?,
        head_params: forward_params(&m.head_params)?,
    })
}

/// The backward kernels of `forward` (read by this family) for `grad`'s backward cascade.
pub fn compile_gradient(
    forward: &Cascade,
    grad: &Grad,
    options: &KernelOptions,
) -> Result<GradientKernels, FamilyError> {
    let m = recognize(forward).map_err(|d| FamilyError::NotMine(vec![d]))?;
    if m.kv_group > 1 {
        // The dK/dV kernel's CTA owns one (batch, head) of K and V; with grouped heads the
        // gradient of a K/V head sums over its group's query heads, which it does not do.
        return Err(not_mine(format!(
            "the backward kernels do not map grouped-query attention ({} query heads per K/V head): dK and dV of a K/V head sum over its query heads",
            m.kv_group
        )));
    }
    if !m.spec.value_masks.is_empty() {
        // The backward programs recompute probabilities under band masks only.
        return Err(not_mine(
            "the backward kernels do not map masks that compare values (document masks)",
        ));
    }
    if m.spec.normalization == Normalization::None {
        // The backward programs differentiate the softmax.
        return Err(not_mine(
            "the backward kernels map softmax attention, not weights without normalization",
        ));
    }
    if m.spec.sink.is_some() {
        // The sink's own gradient (-sum over rows of P_sink * rowsum(dO * O)) is not one
        // of the kernels' outputs.
        return Err(not_mine(
            "the backward kernels do not map a sink logit in the normalization",
        ));
    }
    let bound = bind(&m, grad)?;
    let mut spec = m.spec.clone();
    if let Some(elem) = options.elem {
        spec.elem = elem;
    }
    let target = options.target;
    let sched = backward_schedule(forward, &m, &spec, options)?;
    let backward = &grad.cascade;
    // The backward keeps the forward's rank names: its layouts use the same roles.
    let rank = |r: Option<Handle<einattn_ir::cascade::Rank>>| {
        r.and_then(|r| backward.rank_by_name(&forward.ranks[r].name))
    };
    let (batch, head, query, key) = (
        rank(m.roles.batch),
        rank(m.roles.head),
        rank(m.roles.query),
        rank(Some(m.roles.key)),
    );
    let layout = |t: Handle<Tensor>, seq| Layout::of(backward, t, batch, seq, head);
    let elem = dtype(spec.elem);
    let io = |t: Handle<Tensor>, seq, role| {
        contract_tensor(backward, t, role, elem, Some(&layout(t, seq)))
    };
    let stats_tensor = |t: Handle<Tensor>| {
        contract_tensor(
            backward,
            t,
            TensorRole::Input,
            Dtype::F32,
            Some(&layout(t, query)),
        )
    };
    let name = |t: Handle<Tensor>| backward.tensors[t].name.clone();
    let scalars: Vec<(String, Option<f64>)> = bound
        .scalars
        .iter()
        .map(|&t| (name(t), backward.tensors[t].default))
        .collect();
    let head_params: Vec<String> = bound.head_params.iter().map(|&t| name(t)).collect();
    let params: Vec<_> = bound
        .head_params
        .iter()
        .map(|&t| contract_tensor(backward, t, TensorRole::Param, Dtype::F32, None))
        .collect();
    let rows = m.batch * m.heads * m.n_q;
    let scratch = vec![
        Scratch {
            name: names::LSE.into(),
            dtype: Dtype::F32,
            elements: rows,
            zero_before_launch: false,
            what: "the log-sum-exp of each query row [B, H, N_q], written by the dQ kernel, read by the dK/dV kernel".into(),
        },
        Scratch {
            name: names::DELTA.into(),
            dtype: Dtype::F32,
            elements: rows,
            zero_before_launch: false,
            what: "rowsum(dO * O) of each query row [B, H, N_q], written by the dQ kernel, read by the dK/dV kernel".into(),
        },
    ];
    let sizes = |n_q: u64, n_k: u64| -> BTreeMap<String, u64> {
        [
            ("batch", m.batch),
            ("heads", m.heads),
            ("n_q", n_q),
            ("n_k", n_k),
            ("kv_group", 1),
            ("head_dim", u64::from(spec.head_dim)),
        ]
        .into_iter()
        .chain(
            // Only a value dim of its own is recorded, so other contracts stay as they were.
            (spec.value_dim != spec.head_dim).then_some(("value_dim", u64::from(spec.value_dim))),
        )
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    };
    let family = |kernel: &str| {
        let mut record = json!({
            "problem": {"batch": m.batch, "heads": m.heads, "n_q": m.n_q, "n_k": m.n_k,
                        "head_dim": spec.head_dim, "elem": spec.elem.name(),
                        "causal": spec.causal, "window": spec.window},
            "schedule": {"block_m": sched.block_m, "block_n": sched.block_n,
                         "warps": sched.warps, "stages": sched.stages,
                         "mma": sched.mma.name()},
            "kernel": kernel,
            "score": spec.score.describe(&spec.tokens),
        });
        if spec.value_dim != spec.head_dim {
            record["problem"]["value_dim"] = json!(spec.value_dim);
        }
        record
    };
    let module = |program: crate::TileProgram,
                  tensors: Vec<crate::abi::ContractTensor>,
                  names: ContractNames,
                  sizes: BTreeMap<String, u64>,
                  what: &str|
     -> Result<Module, CompileError> {
        let ptx = print_ptx(&program, target).map_err(backend_error)?;
        let contract = contract(
            &ptx,
            ContractParts {
                sizes,
                tensors,
                scratch: scratch.clone(),
                names,
                requires: vec![],
                family: family(what),
            },
        )?;
        Ok(Module {
            program: KernelProgram::Tile(Box::new(program)),
            ptx,
            contract,
        })
    };

    let stats = if bound.saved.is_some() {
        Statistics::MaxAndSum
    } else {
        Statistics::LogSumExp
    };
    let dq_prog = dq_program(&spec, &sched, stats).map_err(backend_error)?;
    let mut dq_tensors = vec![
        io(bound.q, query, TensorRole::Input),
        io(bound.k, key, TensorRole::Input),
        io(bound.v, key, TensorRole::Input),
    ];
    let (o_name, tokens) = match &bound.saved {
        Some(saved) => {
            dq_tensors.push(io(saved.o, query, TensorRole::Input));
            (
                name(saved.o),
                vec![name(saved.row_max), name(saved.row_sum)],
            )
        }
        None => {
            let mut o = contract_tensor(forward, m.o.tensor, TensorRole::Input, elem, Some(&m.o));
            o.name = O_FORWARD.into();
            dq_tensors.push(o);
            (O_FORWARD.to_string(), vec![names::LSE.to_string()])
        }
    };
    dq_tensors.push(io(bound.d_o, query, TensorRole::Input));
    dq_tensors.push(io(bound.dq, query, TensorRole::Output));
    if let Some(saved) = &bound.saved {
        dq_tensors.push(stats_tensor(saved.row_max));
        dq_tensors.push(stats_tensor(saved.row_sum));
    }
    dq_tensors.extend(params.iter().cloned());
    let mut dq = module(
        dq_prog,
        dq_tensors,
        ContractNames {
            tensors: vec![
                name(bound.q),
                name(bound.k),
                name(bound.v),
                o_name,
                name(bound.d_o),
                name(bound.dq),
            ],
            head_params: head_params.clone(),
            scalars: scalars.clone(),
            tokens,
            states: vec![],
            row_outputs: dq_row_outputs(stats),
            row_inputs: vec![],
        },
        sizes(m.n_q, m.n_k),
        "dq",
    )?;
    let mut modules = Vec::new();
    if bound.saved.is_none() {
        read_row_scratch(&mut dq.contract, m.heads, m.n_q)?;
        super::super::tensors_to_scratch(&mut dq.contract, &[O_FORWARD.into()], &o_forward_what)?;
        modules.push(forward_again(forward, &m, &spec, options, &scratch)?);
    }

    let dkdv_prog = dkdv_program(&spec, &sched).map_err(backend_error)?;
    let mut dkdv_tensors = vec![
        io(bound.k, key, TensorRole::Input),
        io(bound.v, key, TensorRole::Input),
        io(bound.q, query, TensorRole::Input),
        io(bound.d_o, query, TensorRole::Input),
        io(bound.dk, key, TensorRole::Output),
        io(bound.dv, key, TensorRole::Output),
    ];
    dkdv_tensors.extend(params.iter().cloned());
    let mut dkdv = module(
        dkdv_prog,
        dkdv_tensors,
        ContractNames {
            tensors: [bound.k, bound.v, bound.q, bound.d_o, bound.dk, bound.dv]
                .map(name)
                .to_vec(),
            head_params,
            scalars,
            tokens: vec![names::LSE.into(), names::DELTA.into()],
            states: vec![],
            row_outputs: vec![],
            row_inputs: vec![],
        },
        // Its rows are keys and its loop walks queries.
        sizes(m.n_k, m.n_q),
        "dkdv",
    )?;
    read_row_scratch(&mut dkdv.contract, m.heads, m.n_q)?;

    let forward_line = match &bound.saved {
        Some(saved) => format!(
            "lse = M + ln L from the saved `{}` and `{}`",
            name(saved.row_max),
            name(saved.row_sum)
        ),
        None => {
            "lse and O from the forward kernel run again first (the backward does not read the forward's output with its final row max and sum)".to_string()
        }
    };
    modules.push(dq);
    modules.push(dkdv);
    let mut explain = String::new();
    let _ = writeln!(
        explain,
        "lowering: softmax attention backward, {} kernels with {} (derived from the forward `{}`, read as softmax attention)",
        modules.len(),
        sched.mma.name(),
        forward.name
    );
    if bound.saved.is_none() {
        let _ = writeln!(
            explain,
            "  {}: the forward kernel again, writing its output and log-sum-exp to scratch",
            modules[0].ptx.entry
        );
    }
    let _ = writeln!(
        explain,
        "  {}: one CTA per (query tile of {}, batch, head) over key tiles of {}: {forward_line}, delta = rowsum(dO * O), P = exp(s - lse), dP = dO V^T, dS = P (dP - delta) ds/d(q.k), dQ = dS K",
        modules[modules.len() - 2].ptx.entry,
        sched.block_m,
        sched.block_n
    );
    let _ = writeln!(
        explain,
        "  {}: one CTA per (key tile of {}, batch, head) over the query tiles that see it ({}): P^T, dV = P^T dO, dP^T = V dO^T, dS^T, dK = dS^T Q",
        modules[modules.len() - 1].ptx.entry,
        sched.block_m,
        sched.block_n
    );
    let _ = writeln!(
        explain,
        "why: the forward reads as softmax attention and the backward differentiates Q, K and V from its output and its final row max and sum, so P is recomputed tile by tile (FlashAttention's backward) instead of stored; dQ and dK/dV are separate kernels (7 MMAs per tile pair instead of 5, no atomics)"
    );
    // Tensor-core work: the forward's 2 products recomputed twice plus 3 gradient products.
    let flops = visible_flops(&m) * 3.5;
    Ok(GradientKernels {
        family: "softmax",
        cascade: backward.clone(),
        modules,
        explain,
        rate: Rate::Flops {
            flops,
            predicted_ms: 0.0,
            at_most: false,
        },
        // Q K^T, dQ and dK over the head dim; dP and dV over the value dim.
        work: m.batch * m.heads * m.n_q * m.n_k * u64::from(3 * spec.head_dim + 2 * spec.value_dim),
    })
}

/// The kernels' shape: the defaults, with the user's `--mma`, `--warps` (16 rows each)
/// and `--tile` (the forward's key rank for the loop tile, its query rank for the rows).
fn backward_schedule(
    forward: &Cascade,
    m: &AttentionMatch,
    spec: &super::AttentionSpec,
    options: &KernelOptions,
) -> Result<BackwardSchedule, FamilyError> {
    let mut sched = BackwardSchedule::default_for(spec, options.target);
    if let Some(mma) = options.mma {
        sched.mma = mma;
    }
    if let Some(w) = options.warps {
        sched.warps = w;
        sched.block_m = w.checked_mul(16).ok_or_else(|| {
            CompileError::Usage(format!("error: `--warps {w}` is too large (16 rows each)"))
        })?;
    }
    let name = |r| forward.ranks[r].name.clone();
    let mut key_names = vec![name(m.roles.key)];
    if let Some((_, inner, _)) = m.roles.key_split {
        key_names.push(name(inner));
    }
    let query_names: Vec<String> = m.roles.query.map(name).into_iter().collect();
    for (n, size) in &options.tiles {
        let size = u32::try_from(*size)
            .map_err(|_| CompileError::Usage(format!("error: tile size {size} is too large")))?;
        if key_names.contains(n) {
            sched.block_n = size;
        } else if query_names.contains(n) {
            sched.block_m = size;
        } else {
            return Err(CompileError::Usage(format!(
                "error: `--tile {n}=...`: the backward kernels tile the key rank ({}) and the query rank ({})",
                key_names.join(", "),
                query_names.join(", ")
            ))
            .into());
        }
    }
    Ok(sched)
}

/// The dQ kernel's row outputs: `lse` where it computes it, and `delta`.
fn dq_row_outputs(stats: Statistics) -> Vec<String> {
    match stats {
        Statistics::MaxAndSum => vec![names::LSE.into(), names::DELTA.into()],
        Statistics::LogSumExp => vec![names::DELTA.into()],
    }
}

fn o_forward_what(_: &str) -> String {
    "the forward's output, recomputed by the forward kernel for the backward's delta = rowsum(dO * O)".into()
}

/// The forward kernel again, writing its log-sum-exp to the `lse` scratch array and its
/// output to the `o_forward` scratch array, for a backward that saved neither.
fn forward_again(
    forward: &Cascade,
    m: &AttentionMatch,
    spec: &super::AttentionSpec,
    options: &KernelOptions,
    scratch: &[Scratch],
) -> Result<Module, FamilyError> {
    let fsched = super::schedule(
        forward,
        &super::ScheduleOptions {
            target: options.target,
            elem: Some(spec.elem),
            ..super::ScheduleOptions::default()
        },
    )
    .map_err(|d| FamilyError::NotMine(vec![d]))?;
    let mut fspec = fsched.spec().clone();
    fspec.write_lse = true;
    let mut module = super::build_module(forward, &fsched, fspec)?;
    let c = &mut module.contract;
    let o = forward.tensors[m.o.tensor].name.clone();
    for t in &mut c.tensors {
        if t.name == o {
            t.name = O_FORWARD.into();
        }
    }
    for p in &mut c.params {
        match &mut p.from {
            Source::Tensor { tensor } | Source::Stride { tensor, .. } if *tensor == o => {
                *tensor = O_FORWARD.into()
            }
            _ => {}
        }
    }
    c.scratch
        .extend(scratch.iter().filter(|s| s.name == names::LSE).cloned());
    super::super::tensors_to_scratch(c, &[O_FORWARD.into()], &o_forward_what)?;
    Ok(module)
}

/// Points the dK/dV kernel's token parameters (`lse`, `delta`) at the scratch arrays the
/// dQ kernel writes (`[B, H, N_q]` f32: strides `H N_q`, 1, `N_q`).
fn read_row_scratch(c: &mut LaunchContract, heads: u64, n_q: u64) -> Result<(), CompileError> {
    let strides = [
        (crate::abi::Axis::Batch, "batch", heads * n_q),
        (crate::abi::Axis::Seq, "seq", 1),
        (crate::abi::Axis::Head, "head", n_q),
    ];
    for name in [names::LSE, names::DELTA] {
        for p in &mut c.params {
            match &p.from {
                Source::Tensor { tensor } if tensor == name => {
                    p.from = Source::Scratch {
                        scratch: name.into(),
                    }
                }
                Source::Stride { tensor, axis } if tensor == name => {
                    let (_, axis_name, stride) = strides
                        .iter()
                        .find(|(a, _, _)| a == axis)
                        .copied()
                        .ok_or_else(|| CompileError::Input("unknown axis".into()))?;
                    let size = format!("{name}_stride_{axis_name}");
                    c.sizes.insert(size.clone(), stride);
                    p.from = Source::Size { size };
                }
                _ => {}
            }
        }
    }
    c.check().map_err(CompileError::Input)
}
