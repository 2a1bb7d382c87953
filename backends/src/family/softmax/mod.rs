//! Softmax attention: any pass structure of `O = softmax(s(Q.K)) V` with band masks and
//! score modifiers, as one FlashAttention-2-style kernel.
//!
//! - [`recognize`]: reads the cascade as softmax attention ([`AttentionMatch`]);
//! - [`schedule`]: the cost model that picks the kernel shape;
//! - [`program`]: the Tile IR program of the 1-pass (online softmax) kernel;
//! - [`plan`]: the kernels of SP plans (query-offset, partial and epilogue kernels).

pub mod backward;
pub mod combination;
pub mod epilogue;
pub mod gradient;
pub mod plan;
pub mod program;
pub mod prologue;
pub mod recognize;
pub mod schedule;
pub mod split;

pub use program::{flash_attention, AttentionSchedule, AttentionSpec, Normalization};
pub use recognize::{recognize, AttentionMatch, Roles, Running};
pub use schedule::{schedule, Schedule, ScheduleOptions};

use super::{
    backend_error, contract, contract_tensor, dtype, CompileError, Compiled, ContractNames,
    ContractParts, FamilyError, Inputs, KernelFamily, Module, PlanKernels, Rate, Request,
};
use crate::abi::{Dtype, TensorRole};
use crate::plan::Plan;
use crate::print_ptx;
use crate::tile::BandDirection;
use einattn_ir::cascade::Cascade;
use einattn_ir::validate::{Diagnostic, DiagnosticKind};
use einattn_passes::analysis::GpuModel;
use epilogue::Epilogue;
use prologue::Prologue;
use serde_json::json;

/// The softmax-attention family.
pub struct Softmax;

impl KernelFamily for Softmax {
    fn name(&self) -> &'static str {
        "softmax"
    }

    fn reads_as(&self) -> &'static str {
        "softmax attention"
    }

    fn compile(&self, request: &Request) -> Result<Box<dyn Compiled>, FamilyError> {
        match compile_softmax(request.cascade, request.options) {
            Ok(k) => Ok(Box::new(k)),
            // Weights that combine attention maps (differential attention): one kernel per
            // term, then their combination.
            Err(FamilyError::NotMine(reasons)) => {
                match combination::compile_combination(request.cascade, request.options) {
                    Some(combined) => combined.map(|k| Box::new(k) as Box<dyn Compiled>),
                    None => Err(FamilyError::NotMine(reasons)),
                }
            }
            Err(e) => Err(e),
        }
    }
}

/// Reads `cascade` as softmax attention and compiles its kernel.
pub fn compile_softmax(
    cascade: &Cascade,
    options: &super::KernelOptions,
) -> Result<SoftmaxKernels, FamilyError> {
    {
        let mut cascade = cascade.clone();
        if options.optimize {
            cascade = einattn_passes::rewrite::optimize(
                &cascade,
                &einattn_passes::rewrite::OptimizeOptions::default(),
            )
            .map_err(|e| CompileError::Input(e.to_string()))?
            .cascade;
        }
        let refuse = |mut d: einattn_ir::validate::Diagnostic| {
            if options.optimize {
                // Spans of rewritten Einsums point nowhere useful in the original text.
                d.span = None;
            }
            if d.kind == DiagnosticKind::NotMappable {
                FamilyError::NotMine(vec![d])
            } else {
                FamilyError::Failed(CompileError::Refused(Box::new(d)))
            }
        };
        // A score whose Q and K the cascade computes per token (QK-norm): those Einsums run
        // first, as pre-kernels, and the kernel reads their results. An output computed from
        // the attention output per token (an output gate): those Einsums run after, as
        // post-kernels reading it.
        let (core, prologue, epilogue) = match recognize(&cascade) {
            Ok(_) => (cascade.clone(), None, None),
            Err(d) => {
                let pre =
                    prologue::split_at_score(&cascade).filter(|(core, _)| recognize(core).is_ok());
                match pre {
                    Some((core, p)) => (core, Some(p), None),
                    None => {
                        match epilogue::split_after_attention(&cascade, |c| recognize(c).is_ok()) {
                            Some((core, e)) => (core, None, Some(e)),
                            None => return Err(refuse(d)),
                        }
                    }
                }
            }
        };
        let mut sched = ScheduleOptions {
            target: options.target,
            elem: options.elem,
            warps: options.warps,
            stages: options.stages,
            mma: options.mma,
            loads: options.loads,
            persistent: options.persistent,
            lazy_rescale: options.lazy_rescale,
            store_tma: options.store_tma,
            p_in_shared: options.p_in_shared,
            pin_deferred_wait: options.pin_deferred_wait,
            operands_in_scratch: prologue.is_some(),
            output_in_scratch: epilogue.is_some(),
            ..ScheduleOptions::default()
        };
        if !options.tiles.is_empty() {
            let m = recognize(&core).map_err(refuse)?;
            let name = |r| core.ranks[r].name.clone();
            let mut key_names = vec![name(m.roles.key)];
            if let Some((_, inner, _)) = m.roles.key_split {
                key_names.push(name(inner));
            }
            key_names.push(format!("{}0", name(m.roles.key)));
            key_names.dedup();
            let query_names: Vec<String> = m
                .roles
                .query
                .map(|q| vec![name(q), format!("{}0", name(q))])
                .unwrap_or_default();
            for (n, size) in &options.tiles {
                let size = u32::try_from(*size).map_err(|_| {
                    CompileError::Usage(format!("error: tile size {size} is too large"))
                })?;
                if key_names.contains(n) {
                    sched.block_n = Some(size);
                } else if query_names.contains(n) {
                    sched.block_m = Some(size);
                } else {
                    return Err(CompileError::Usage(format!(
                        "error: `--tile {n}=...`: `{n}` is neither the key rank ({}) nor the query rank ({})",
                        key_names.join(", "),
                        if query_names.is_empty() { "none".to_string() } else { query_names.join(", ") }
                    ))
                    .into());
                }
            }
        }
        let schedule = schedule(&core, &sched).map_err(refuse)?;
        let mut modules = if schedule.estimate.splits > 1 {
            split::split_modules(&core, &schedule, schedule.estimate.splits)?
        } else {
            vec![build_module(&core, &schedule, schedule.spec().clone())?]
        };
        let attention_kernels = modules.len();
        let elem = schedule.spec().elem;
        if let Some(p) = &prologue {
            let what = |n: &str| {
                format!(
                    "`{n}`, computed per token by the pre-kernels ({}) and read by the attention kernel as an operand of the score",
                    p.cascade.name
                )
            };
            modules =
                with_general_kernels(&p.cascade, &p.written, &what, true, elem, options, modules)?;
        }
        let pre_kernels = modules.len() - attention_kernels;
        if let Some(e) = &epilogue {
            let what = |n: &str| {
                format!(
                    "`{n}`, the attention output, written by the attention kernel and read by the post-kernels ({})",
                    e.cascade.name
                )
            };
            modules = with_general_kernels(
                &e.cascade,
                &e.attentions,
                &what,
                false,
                elem,
                options,
                modules,
            )?;
        }
        Ok(SoftmaxKernels {
            post_kernels: modules.len() - attention_kernels - pre_kernels,
            cascade,
            core,
            prologue,
            epilogue,
            pre_kernels,
            schedule,
            modules,
            passed_over: Vec::new(),
        })
    }
}

/// What a part's Einsums write, in order (for `--emit schedule`).
fn written_by(c: &Cascade) -> String {
    let names: Vec<&str> = c
        .einsums
        .iter()
        .map(|(_, e)| c.tensors[e.output.tensor].name.as_str())
        .collect();
    names.join(", ")
}

/// The general lowering of `part` (a prologue's or an epilogue's cascade) beside the
/// attention `kernels`, before them or after: the tensors `through` pass between the two in
/// scratch (`what` says what each is, in the manifest).
fn with_general_kernels(
    part: &Cascade,
    through: &[String],
    what: &dyn Fn(&str) -> String,
    before: bool,
    elem: crate::tile::Elem,
    options: &super::KernelOptions,
    kernels: Vec<Module>,
) -> Result<Vec<Module>, CompileError> {
    let general = super::general::compile_general(
        part,
        &super::KernelOptions {
            target: options.target,
            elem: Some(elem),
            ..super::KernelOptions::default()
        },
    )?;
    let general = general.modules().iter().cloned();
    let ordered: Vec<Module> = if before {
        general.chain(kernels).collect()
    } else {
        kernels.into_iter().chain(general).collect()
    };
    ordered
        .into_iter()
        .map(|mut module| {
            super::tensors_to_scratch(&mut module.contract, through, what)?;
            Ok(module)
        })
        .collect()
}

/// The kernel of `spec` (the schedule's, or its query-offset variant) with its contract.
fn build_module(
    cascade: &Cascade,
    schedule: &Schedule,
    spec: AttentionSpec,
) -> Result<Module, CompileError> {
    let (program, _) = flash_attention(&spec, &schedule.kernel).map_err(backend_error)?;
    module_of(cascade, schedule, &spec, program)
}

/// The module of an attention program of `spec` (Q, K, V in, O out) with its contract.
pub(super) fn module_of(
    cascade: &Cascade,
    schedule: &Schedule,
    spec: &AttentionSpec,
    program: crate::tile::TileProgram,
) -> Result<Module, CompileError> {
    let ptx = print_ptx(&program, schedule.target).map_err(backend_error)?;
    let m = &schedule.matched;
    let elem = dtype(spec.elem);
    let io = [
        (&m.q, TensorRole::Input),
        (&m.k, TensorRole::Input),
        (&m.v, TensorRole::Input),
        (&m.o, TensorRole::Output),
    ];
    let mut tensors: Vec<_> = io
        .iter()
        .map(|(l, role)| contract_tensor(cascade, l.tensor, *role, elem, Some(l)))
        .collect();
    for &t in &m.head_params {
        tensors.push(contract_tensor(
            cascade,
            t,
            TensorRole::Param,
            Dtype::F32,
            None,
        ));
    }
    for l in &m.tokens {
        tensors.push(contract_tensor(
            cascade,
            l.tensor,
            TensorRole::Input,
            Dtype::F32,
            Some(l),
        ));
    }
    let name = |t| cascade.tensors[t].name.clone();
    let names = ContractNames {
        tensors: io.iter().map(|(l, _)| name(l.tensor)).collect(),
        head_params: m.head_params.iter().map(|&t| name(t)).collect(),
        scalars: m
            .scalar_params
            .iter()
            .map(|&t| (name(t), cascade.tensors[t].default))
            .collect(),
        tokens: m.tokens.iter().map(|l| name(l.tensor)).collect(),
        states: Vec::new(),
        row_outputs: program.row_outputs.iter().map(|r| r.name.clone()).collect(),
        row_inputs: vec![],
    };
    let mut sizes: std::collections::BTreeMap<String, u64> = [
        ("batch", m.batch),
        ("heads", m.heads),
        ("n_q", m.n_q),
        ("n_k", m.n_k),
        ("kv_group", m.kv_group),
        ("head_dim", u64::from(spec.head_dim)),
        ("value_dim", u64::from(spec.value_dim)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if spec.query_offset {
        sizes.insert("q_offset".into(), 0);
    }
    let k = &schedule.kernel;
    let mut family = json!({
        "problem": {"batch": m.batch, "heads": m.heads, "n_q": m.n_q, "n_k": m.n_k,
                    "head_dim": spec.head_dim, "value_dim": spec.value_dim,
                    "elem": spec.elem.name(), "causal": spec.causal, "window": spec.window},
        "schedule": {"block_m": k.block_m, "block_n": k.block_n, "warps": k.warps,
                     "stages": k.stages, "q_in_registers": k.q_in_registers,
                     "skip_unit_rescale": k.skip_unit_rescale},
        "score": spec.score.describe(&spec.tokens),
        "estimate_ms": schedule.estimate.seconds * 1e3,
    });
    if m.roles.kv_split.is_some() {
        // Only grouped heads record it, so the contracts of other kernels stay as they were.
        family["problem"]["kv_group"] = json!(m.kv_group);
    }
    let contract = contract(
        &ptx,
        ContractParts {
            sizes,
            tensors,
            scratch: Vec::new(),
            names,
            requires: if spec.score.scaled_dot().is_some() {
                vec!["scale > 0".into()]
            } else {
                vec![]
            },
            family,
        },
    )?;
    Ok(Module {
        program: super::KernelProgram::Tile(Box::new(program)),
        ptx,
        contract,
    })
}

/// A cascade compiled to the softmax-attention kernel.
pub struct SoftmaxKernels {
    /// The cascade as written (its inputs are the check's).
    cascade: Cascade,
    /// What the attention kernel computes: the cascade less its prologue.
    core: Cascade,
    /// The per-token Einsums before the score, when Q and K are computed.
    prologue: Option<Prologue>,
    /// How many of `modules` are the prologue's (they come first).
    pre_kernels: usize,
    /// The per-token Einsums after the attention output (an output gate).
    epilogue: Option<Epilogue>,
    /// How many of `modules` are the epilogue's (they come last).
    post_kernels: usize,
    pub schedule: Schedule,
    modules: Vec<Module>,
    /// Why the families before this one did not take the cascade, one line each.
    passed_over: Vec<String>,
}

impl SoftmaxKernels {
    /// The cascade the attention kernel computes, and the prologue before it (if any).
    pub fn core(&self) -> (&Cascade, Option<&Prologue>) {
        (&self.core, self.prologue.as_ref())
    }

    /// The epilogue after the attention kernel, if any.
    pub fn epilogue(&self) -> Option<&Epilogue> {
        self.epilogue.as_ref()
    }
}

impl Compiled for SoftmaxKernels {
    fn family(&self) -> &'static str {
        "softmax"
    }

    fn cascade(&self) -> &Cascade {
        &self.cascade
    }

    fn modules(&self) -> &[Module] {
        &self.modules
    }

    fn explain(&self) -> String {
        let mut text = String::new();
        if let Some(p) = &self.prologue {
            text.push_str(&format!(
                "pre-kernels: {} (the general lowering of `{}`: {}) write {} into scratch, in {}; the attention kernel reads them as its Q and K\n",
                self.pre_kernels,
                p.cascade.name,
                written_by(&p.cascade),
                p.written.join(" and "),
                self.schedule.spec().elem.name()
            ));
        }
        text.push_str(&self.schedule.explain());
        if let Some(e) = &self.epilogue {
            text.push_str(&format!(
                "post-kernels: {} (the general lowering of `{}`: {}) read the attention output {} from scratch, in {}\n",
                self.post_kernels,
                e.cascade.name,
                written_by(&e.cascade),
                e.attentions.join(", "),
                self.schedule.spec().elem.name()
            ));
        }
        // Weights without normalization include linear attention, which the linear family
        // computes in O(N): say why it did not take this cascade.
        if self.schedule.spec().normalization == Normalization::None {
            for line in &self.passed_over {
                text.push_str(&format!("not {line}\n"));
            }
        }
        text
    }

    fn passed_over(&mut self, reasons: &[(&'static str, Vec<Diagnostic>)]) {
        self.passed_over = super::reasons_in_words(reasons);
    }

    fn formula(&self, inputs: &Inputs) -> (Vec<f64>, &'static str) {
        let m = &self.schedule.matched;
        // A reference that fails compares as NaN, which never passes.
        let failed = |what| (vec![f64::NAN], what);
        match (&self.prologue, &self.epilogue) {
            (Some(p), _) => match p.core_inputs(&self.cascade, &self.core, inputs) {
                Ok(core) => (
                    m.reference_output(&core),
                    "the f64 attention formula after the pre-kernels' cascade",
                ),
                Err(_) => failed("the pre-kernels' cascade (failed)"),
            },
            (None, Some(e)) => {
                let core = super::subcascade::inputs_by_name(&self.cascade, &self.core, inputs);
                match e.output(&self.cascade, vec![m.reference_output(&core)], inputs) {
                    Ok(out) => (
                        out,
                        "the f64 attention formula, then the post-kernels' cascade",
                    ),
                    Err(_) => failed("the post-kernels' cascade (failed)"),
                }
            }
            (None, None) => (m.reference_output(inputs), "the f64 attention formula"),
        }
    }

    fn interpreter_work(&self) -> u64 {
        let m = &self.schedule.matched;
        m.batch * m.heads * m.n_q * m.n_k * u64::from(m.spec.head_dim + m.spec.value_dim)
    }

    fn formula_work(&self) -> Option<u64> {
        // The same multiply-adds as the interpreter, but spread over every core.
        Some(self.interpreter_work())
    }

    fn rate(&self) -> Rate {
        let m = &self.schedule.matched;
        Rate::Flops {
            flops: visible_flops(m),
            predicted_ms: self.schedule.estimate.seconds * 1e3,
            at_most: !m.spec.value_masks.is_empty(),
        }
    }

    fn plan_modules(&self, plan: &mut Plan, _gpu: &GpuModel) -> Result<PlanKernels, String> {
        if self.prologue.is_some() || self.epilogue.is_some() {
            return Err(
                "plan kernels of this family with pre- or post-kernels (QK-norm, an output gate)"
                    .into(),
            );
        }
        plan::plan_kernels(&self.cascade, &self.schedule, plan)
    }
}

/// FLOPs of the attention the band masks leave: 2 per visible (query, key) pair and column
/// of Q . K, 2 per pair and column of P V (value masks leave fewer, depending on the inputs).
pub fn visible_flops(m: &AttentionMatch) -> f64 {
    let masks = m.spec.masks();
    let n = m.n_k as i64;
    let visible: f64 = (0..m.n_q as i64)
        .map(|p| {
            // Visible keys of row p form one interval under band masks.
            let (mut lo, mut hi) = (0i64, n - 1);
            for b in &masks {
                match b.direction {
                    BandDirection::KeyMinusQuery => hi = hi.min(p + b.bound),
                    BandDirection::QueryMinusKey => lo = lo.max(p - b.bound),
                }
            }
            (hi - lo + 1).max(0) as f64
        })
        .sum();
    2.0 * (m.batch * m.heads) as f64 * visible * f64::from(m.spec.head_dim + m.spec.value_dim)
}
