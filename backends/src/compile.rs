//! The whole pipeline from a cascade to a launchable PTX kernel, and the JSON manifest
//! that tells a launcher how to call it.

// A failed compile builds one diagnostic; boxing it would only add noise to every `?`.
#![allow(clippy::result_large_err)]

use crate::ptx::{print_ptx, PtxKernel};
use crate::schedule::{schedule, Schedule, ScheduleOptions};
use crate::tile::attention::{flash_attention, AttentionBindings};
use crate::tile::{AbiKind, AbiRole, TileProgram};
use einattn_ir::cascade::{Cascade, Span};
use einattn_ir::validate::{Diagnostic, DiagnosticKind};
use serde_json::{json, Value};

/// A cascade compiled to one kernel.
#[derive(Debug, Clone)]
pub struct CompiledKernel {
    pub schedule: Schedule,
    pub program: TileProgram,
    pub bindings: AttentionBindings,
    pub ptx: PtxKernel,
}

/// Recognize, schedule, build the tile program and print PTX.
pub fn compile_kernel(
    cascade: &Cascade,
    options: &ScheduleOptions,
) -> Result<CompiledKernel, Diagnostic> {
    let schedule = schedule(cascade, options)?;
    if options.mma == Some(crate::tile::MmaUnit::Warpgroup) {
        return Err(Diagnostic::error(
            DiagnosticKind::UnsupportedShape,
            "the wgmma lowering is built for the linear-attention kernels; softmax attention uses mma.sync",
            Span::UNKNOWN,
        ));
    }
    let backend_error = |e: crate::TileError| {
        Diagnostic::error(
            DiagnosticKind::UnsupportedShape,
            e.to_string(),
            Span::UNKNOWN,
        )
    };
    let (program, bindings) =
        flash_attention(schedule.spec(), &schedule.kernel).map_err(backend_error)?;
    let ptx = print_ptx(&program, schedule.target).map_err(backend_error)?;
    Ok(CompiledKernel {
        schedule,
        program,
        bindings,
        ptx,
    })
}

impl CompiledKernel {
    /// The launch contract: entry point, block and grid, shared memory, and every
    /// parameter with where its value comes from.
    pub fn manifest(&self, cascade: &Cascade, ptx_file: &str) -> Value {
        let m = &self.schedule.matched;
        let spec = &m.spec;
        let tensor_name = |i: usize| {
            let layout = [&m.q, &m.k, &m.v, &m.o][i];
            cascade.tensors[layout.tensor].name.clone()
        };
        let layouts = [&m.q, &m.k, &m.v, &m.o];
        let params: Vec<Value> = self
            .ptx
            .abi
            .iter()
            .map(|p| {
                let kind = abi_kind_name(p.kind);
                let source = match &p.role {
                    AbiRole::TensorPtr(t) => json!({"tensor": tensor_name(t.index())}),
                    AbiRole::RowOutputPtr(_) => json!({"row_output": p.name}),
                    AbiRole::StatePtr(_)
                    | AbiRole::LookBackFlags
                    | AbiRole::QueryOffset
                    | AbiRole::ChunkBase
                    | AbiRole::ChunkTotal
                    | AbiRole::TokenPtr(_)
                    | AbiRole::TokenStrideBatch(_)
                    | AbiRole::TokenStrideSeq(_)
                    | AbiRole::TokenStrideHead(_) => json!(null),
                    AbiRole::HeadParamPtr(h) => {
                        json!({"param": cascade.tensors[m.head_params[h.index()]].name})
                    }
                    AbiRole::QueryLen => json!({"value": m.n_q}),
                    AbiRole::KeyLen => json!({"value": m.n_k}),
                    AbiRole::Heads => json!({"value": m.heads}),
                    AbiRole::KvGroup => json!({"value": 1}),
                    AbiRole::StrideBatch(t) => json!({"value": layouts[t.index()].stride_batch}),
                    AbiRole::StrideSeq(t) => json!({"value": layouts[t.index()].stride_seq}),
                    AbiRole::StrideHead(t) => json!({"value": layouts[t.index()].stride_head}),
                    AbiRole::Scalar(s) => {
                        let t = &cascade.tensors[m.scalar_params[s.index()]];
                        json!({"param": t.name, "default": t.default})
                    }
                };
                json!({"name": p.name, "type": kind, "from": source})
            })
            .collect();
        let k = &self.schedule.kernel;
        let mut manifest = manifest_head(
            cascade,
            &self.ptx,
            ptx_file,
            format!("[ceil(n_q / {}), batch * heads, 1]", self.ptx.block_m),
            self.ptx.grid(m.batch as u32, m.heads as u32, m.n_q as u32),
        );
        manifest.extend(json_object(json!({
            "problem": {"batch": m.batch, "heads": m.heads, "n_q": m.n_q, "n_k": m.n_k,
                        "head_dim": spec.head_dim, "elem": spec.elem.name()},
            "schedule": {"block_m": k.block_m, "block_n": k.block_n, "warps": k.warps,
                         "stages": k.stages, "q_in_registers": k.q_in_registers,
                         "skip_unit_rescale": k.skip_unit_rescale},
            "causal": spec.causal,
            "window": spec.window,
            "score": format!("{:?}", spec.score.expr),
            "requires": if spec.score.scaled_dot().is_some() { vec!["scale > 0"] } else { vec![] },
            "params": params,
            "estimate_ms": self.schedule.estimate.seconds * 1e3,
        })));
        serde_json::Value::Object(manifest)
    }
}

/// A cascade compiled to the linear-attention kernel.
#[derive(Debug, Clone)]
pub struct CompiledLinear {
    pub matched: crate::schedule::LinearMatch,
    pub schedule: crate::tile::linear::LinearSchedule,
    pub program: TileProgram,
    pub bindings: crate::tile::linear::LinearBindings,
    pub ptx: PtxKernel,
    /// The chunked strategy's first kernel (chunk states), launched before `ptx`.
    pub pre: Option<(TileProgram, PtxKernel)>,
    pub target: crate::Target,
    /// Relative difference between the interpreter and the recurrence on the small instance.
    pub verified_error: f64,
}

/// Compiles causal linear attention: the hypothesis read from `cascade` must be confirmed
/// on `small` (the same source at small sizes) by the reference interpreter.
pub fn compile_linear(
    cascade: &Cascade,
    small: &Cascade,
    options: &ScheduleOptions,
    value_block: Option<u32>,
    strategy: Option<crate::tile::linear::Strategy>,
) -> Result<CompiledLinear, Diagnostic> {
    use crate::schedule::{recognize_linear, verify_linear};
    use crate::tile::linear::{lightning_part, LinearSchedule, Part, Strategy};
    let mut last_err = None;
    for swap in [false, true] {
        match verify_linear(small, swap, 7) {
            Ok(err) => {
                let mut matched = recognize_linear(cascade, swap)?;
                let (d, e) = (matched.spec.head_dim, matched.spec.value_dim);
                if d != e || !(d == 64 || d == 128) {
                    return Err(Diagnostic::error(
                        DiagnosticKind::UnsupportedShape,
                        format!("the linear-attention kernel maps d = e in {{64, 128}} (got d = {d}, e = {e})"),
                        Span::UNKNOWN,
                    ));
                }
                if let Some(elem) = options.elem {
                    matched.spec.elem = elem;
                }
                let mut schedule = LinearSchedule::default_for(&matched.spec);
                if let Some(v) = value_block {
                    schedule.value_block = v;
                }
                if let Some(w) = options.warps {
                    schedule.warps = w;
                }
                if let Some(s) = options.stages {
                    schedule.stages = s;
                }
                schedule.mma = options
                    .mma
                    .unwrap_or_else(|| schedule.default_mma(matched.spec.head_dim, options.target));
                schedule.strategy = match strategy {
                    Some(s) => s,
                    None => crate::tile::linear::choose_strategy(
                        &matched.spec,
                        &schedule,
                        matched.batch * matched.heads,
                        matched.n,
                    ),
                };
                let backend_error = |e: crate::TileError| {
                    Diagnostic::error(
                        DiagnosticKind::UnsupportedShape,
                        e.to_string(),
                        Span::UNKNOWN,
                    )
                };
                let (main_part, pre_part) = match schedule.strategy {
                    Strategy::SinglePass => (Part::Whole, None),
                    Strategy::LookBack => (Part::LookBack, None),
                    Strategy::Chunked { chunk_tiles } => (
                        Part::ChunkOutputs { chunk_tiles },
                        Some(Part::ChunkStates { chunk_tiles }),
                    ),
                };
                let (program, bindings) =
                    lightning_part(&matched.spec, &schedule, main_part).map_err(backend_error)?;
                let ptx = print_ptx(&program, options.target).map_err(backend_error)?;
                let pre = match pre_part {
                    Some(part) => {
                        let (p, _) = lightning_part(&matched.spec, &schedule, part)
                            .map_err(backend_error)?;
                        let k = print_ptx(&p, options.target).map_err(backend_error)?;
                        Some((p, k))
                    }
                    None => None,
                };
                return Ok(CompiledLinear {
                    matched,
                    schedule,
                    program,
                    bindings,
                    ptx,
                    pre,
                    target: options.target,
                    verified_error: err,
                });
            }
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.unwrap_or_else(|| {
        Diagnostic::error(
            DiagnosticKind::NotMappable,
            "not linear attention",
            Span::UNKNOWN,
        )
    }))
}

impl CompiledLinear {
    /// `--emit schedule` for the linear kernel.
    pub fn explain(&self) -> String {
        let m = &self.matched;
        let s = &self.schedule;
        let mut out = String::new();
        use std::fmt::Write as _;
        let _ = writeln!(
            out,
            "kernel: {} (target {})",
            self.ptx.entry,
            self.target.name()
        );
        let _ = writeln!(
            out,
            "problem: batch {} x heads {} x tokens {}, d {}, e {}, {}, decay {:?}",
            m.batch,
            m.heads,
            m.n,
            m.spec.head_dim,
            m.spec.value_dim,
            m.spec.elem.name(),
            m.spec.decay
        );
        if s.strategy == crate::tile::linear::Strategy::LookBack {
            let _ = writeln!(
                out,
                "strategy: decoupled look-back, one CTA per (block of {} tokens, value block, batch, head), all in parallel: each reads its Q, K, V once, computes the intra-block outputs and its own d x {} state, publishes that state, walks back over the earlier blocks' published states (stopping at the first inclusive prefix), publishes its inclusive prefix and adds Q times the entering state; only states are re-read",
                m.spec.head_dim, s.value_block
            );
        } else if let crate::tile::linear::Strategy::Chunked { chunk_tiles } = s.strategy {
            let _ = writeln!(
                out,
                "strategy: chunked two-phase, chunks of {} tokens: kernel 1 writes each chunk's d x {} state (f32), kernel 2 starts each chunk from the decayed sum of the earlier chunks' states; grid z = chunks",
                chunk_tiles * m.spec.head_dim,
                s.value_block
            );
        } else if m.spec.causal {
            let _ = writeln!(
                out,
                "strategy: single pass, one CTA per (value block, batch, head) walks the sequence in blocks of {} tokens carrying the d x {} state (f32 registers + 16-bit shared copy)",
                m.spec.head_dim, s.value_block
            );
        } else {
            let _ = writeln!(
                out,
                "strategy: non-causal, two loops per (value block, batch, head): the whole d x {} state from K and V, then every output as Q S",
                s.value_block
            );
        }
        let _ = writeln!(
            out,
            "grid: ({}, batch * heads, chunks) = {:?}; {} threads, {}-stage cp.async ring, {} B shared",
            m.spec.value_dim / s.value_block,
            self.ptx.grid(m.batch as u32, m.heads as u32, m.n as u32),
            s.warps * 32,
            s.stages,
            self.ptx.dynamic_smem_bytes
        );
        let _ = writeln!(
            out,
            "why: the block equals d so the state's rows are the CTA's rows; {}",
            if s.value_block < m.spec.value_dim {
                "splitting e in two keeps the score, output and state accumulators under 255 registers and doubles the CTAs"
            } else {
                "the whole e fits in registers"
            }
        );
        let (model, why) =
            crate::tile::linear::strategy_choice(&m.spec, &self.schedule, m.batch * m.heads, m.n);
        let _ = writeln!(out, "why: {why}");
        if model != s.strategy {
            let _ = writeln!(
                out,
                "note: --strategy overrides the cost model's choice ({model:?})"
            );
        }
        let _ = writeln!(
            out,
            "tensor cores: {}; {}",
            s.mma.name(),
            match s.mma {
                crate::tile::MmaUnit::Warpgroup => "each warpgroup issues m64nNk16 MMAs that read K, V, Q and the state copy from shared memory through descriptors, asynchronously, so the decay and mask work overlaps them (sm_90a)",
                crate::tile::MmaUnit::Sync => "per-warp m16n8k16 MMAs with ldmatrix fragments (the sm_80 instruction set; on sm_90a pass --target sm_90a for wgmma)",
            }
        );
        let _ = writeln!(
            out,
            "verified: the interpreter agrees with the recurrence on a small instance (relative difference {:.1e})",
            self.verified_error
        );
        out
    }
}

impl CompiledLinear {
    /// The launch contract of the linear kernel (see [`CompiledKernel::manifest`]).
    pub fn manifest(&self, cascade: &Cascade, ptx_file: &str) -> Value {
        let m = &self.matched;
        let layouts = [&m.q, &m.k, &m.v, &m.o];
        let params: Vec<Value> = self
            .ptx
            .abi
            .iter()
            .map(|p| {
                let kind = abi_kind_name(p.kind);
                let source = match &p.role {
                    AbiRole::TensorPtr(t) => {
                        json!({"tensor": cascade.tensors[layouts[t.index()].tensor].name})
                    }
                    AbiRole::HeadParamPtr(_) => {
                        json!({"param": m.decay_param.map(|t| cascade.tensors[t].name.clone())})
                    }
                    AbiRole::QueryLen | AbiRole::KeyLen => json!({"value": m.n}),
                    AbiRole::Heads => json!({"value": m.heads}),
                    AbiRole::KvGroup => json!({"value": 1}),
                    AbiRole::StrideBatch(t) => json!({"value": layouts[t.index()].stride_batch}),
                    AbiRole::StrideSeq(t) => json!({"value": layouts[t.index()].stride_seq}),
                    AbiRole::StrideHead(t) => json!({"value": layouts[t.index()].stride_head}),
                    AbiRole::StatePtr(_) => {
                        json!({"scratch": "chunk states, f32 [chunks, B, H, d, e]"})
                    }
                    AbiRole::LookBackFlags => json!({
                        "scratch": "u32 [1 + chunks * B * H * col_blocks], zeroed before every launch"
                    }),
                    AbiRole::ChunkBase | AbiRole::QueryOffset => json!({"value": 0}),
                    AbiRole::ChunkTotal => json!({
                        "value": self.ptx.grid(m.batch as u32, m.heads as u32, m.n as u32).2
                    }),
                    AbiRole::TokenPtr(_) => {
                        json!({"param": m.gate.map(|t| cascade.tensors[t.tensor].name.clone())})
                    }
                    AbiRole::TokenStrideBatch(_) => {
                        json!({"value": m.gate.map(|g| g.stride_batch)})
                    }
                    AbiRole::TokenStrideSeq(_) => json!({"value": m.gate.map(|g| g.stride_seq)}),
                    AbiRole::TokenStrideHead(_) => json!({"value": m.gate.map(|g| g.stride_head)}),
                    AbiRole::RowOutputPtr(_) | AbiRole::Scalar(_) => json!(null),
                };
                json!({"name": p.name, "type": kind, "from": source})
            })
            .collect();
        let mut manifest = manifest_head(
            cascade,
            &self.ptx,
            ptx_file,
            if self.program.chunked() {
                format!(
                    "[{}, batch * heads, ceil(n / {})]",
                    self.program.col_blocks,
                    self.program.chunk_tiles * self.program.schedule.block_m
                )
            } else {
                format!("[{}, batch * heads, 1]", self.program.col_blocks)
            },
            self.ptx.grid(m.batch as u32, m.heads as u32, m.n as u32),
        );
        manifest.extend(json_object(json!({
            "problem": {"batch": m.batch, "heads": m.heads, "n": m.n,
                        "head_dim": m.spec.head_dim, "value_dim": m.spec.value_dim,
                        "elem": m.spec.elem.name()},
            "schedule": {"value_block": self.schedule.value_block, "warps": self.schedule.warps,
                         "stages": self.schedule.stages},
            "decay": format!("{:?}", m.spec.decay),
            "strategy": format!("{:?}", self.schedule.strategy),
            "launch_first": self.pre.as_ref().map(|(_, k)| json!({
                "kernel": k.entry, "ptx": format!("{}.ptx", k.entry),
                "note": "same parameters and grid; chunk_states is f32 [chunks, B, H, d, e] scratch",
            })),
            "params": params,
        })));
        serde_json::Value::Object(manifest)
    }
}

/// The manifest fields every kernel has: where it comes from, its PTX and how to launch it.
fn manifest_head(
    cascade: &Cascade,
    ptx: &PtxKernel,
    ptx_file: &str,
    grid_formula: String,
    grid: (u32, u32, u32),
) -> serde_json::Map<String, serde_json::Value> {
    json_object(json!({
        "cascade": cascade.name,
        "kernel": ptx.entry,
        "ptx": ptx_file,
        "target": ptx.target.name(),
        "block": [ptx.threads, 1, 1],
        "grid_formula": grid_formula,
        "grid": grid,
        "dynamic_shared_bytes": ptx.dynamic_smem_bytes,
    }))
}

fn json_object(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    match v {
        serde_json::Value::Object(m) => m,
        _ => serde_json::Map::new(),
    }
}

/// A kernel parameter's type as the manifest spells it.
fn abi_kind_name(kind: AbiKind) -> &'static str {
    match kind {
        AbiKind::Ptr => "ptr",
        AbiKind::U32 => "u32",
        AbiKind::U64 => "u64",
        AbiKind::F32 => "f32",
    }
}
