//! Linear attention (causal with a per-head decay or a per-token gate, or non-causal), as
//! Lightning-style kernels that carry the `d x e` state through the sequence.
//!
//! - [`recognize`]: forms a reading of the cascade and confirms it numerically on a small
//!   instance of the same source ([`LinearMatch`]);
//! - [`normalize`]: the normal forms it reads in (feature maps peeled into a pre-kernel,
//!   decays reduced to a per-head rate);
//! - [`program`]: the Tile IR programs of each strategy (single pass, chunked two-phase,
//!   decoupled look-back) and the cost model that picks one;
//! - [`backward`], [`gradient`]: the backward (dQ, dK, dV) as the same programs with
//!   other operands, two of them walking the sequence in reverse, bound to the tensors of
//!   `einattn grad`'s backward cascade.

pub mod backward;
pub mod gradient;
pub mod normalize;
pub mod program;
pub mod recognize;

pub use program::{LinearSchedule, LinearSpec, Part, Strategy};
pub use recognize::{
    first_reading, read_linear, recognize_linear, verify_linear, DecayReading, LinearMatch,
    Reading, READINGS,
};

use super::{
    backend_error, contract, contract_tensor, dtype, CompileError, Compiled, ContractNames,
    ContractParts, FamilyError, Inputs, KernelFamily, Module, PlanKernels, Rate, Request,
};
use crate::abi::{Dtype, Scratch, TensorRole};
use crate::plan::{Phase, Plan, Step};
use crate::print_ptx;
use crate::tile::MmaUnit;
use einattn_ir::cascade::{Cascade, Span};
use einattn_ir::validate::{Diagnostic, DiagnosticKind};
use einattn_passes::analysis::GpuModel;
use serde_json::json;
use std::fmt::Write as _;

/// The linear-attention family.
pub struct Linear;

impl KernelFamily for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn reads_as(&self) -> &'static str {
        "linear attention"
    }

    fn compile(&self, request: &Request) -> Result<Box<dyn Compiled>, FamilyError> {
        compile_request(request).map(|k| Box::new(k) as Box<dyn Compiled>)
    }
}

/// The linear-attention kernels of `request`'s cascade: its reading confirmed on a small
/// instance of the same source, the options applied.
pub fn compile_request(request: &Request) -> Result<LinearKernels, FamilyError> {
    let cascade = request.cascade;
    let options = request.options;
    let not_mine = |d: Diagnostic| {
        if d.kind == DiagnosticKind::NotMappable {
            FamilyError::NotMine(vec![d])
        } else {
            FamilyError::Failed(CompileError::Refused(Box::new(d)))
        }
    };
    // The same source at small sizes, for the interpreter to confirm the reading.
    let hypothesis = first_reading(cascade).map_err(not_mine)?;
    let mut small_defines = request.defines.to_vec();
    for (rank, small) in &hypothesis.shrinkable {
        if let einattn_ir::ExtentSource::Symbol(name) = &cascade.ranks[*rank].source {
            small_defines.retain(|(n, _)| n != name);
            small_defines.push((name.clone(), *small));
        }
    }
    let small = match (request.instantiate)(&small_defines) {
        Ok(small) => small,
        // The source does not build at small sizes: a reading this family cannot confirm.
        Err(CompileError::Source(ds)) => return Err(FamilyError::NotMine(ds)),
        Err(e) => return Err(FamilyError::Failed(e)),
    };
    let mut value_block = None;
    for (n, size) in &options.tiles {
        let value_rank = cascade.tensors[hypothesis.v.tensor].ranks.last().copied();
        if value_rank.is_none_or(|r| cascade.ranks[r].name != *n) {
            return Err(CompileError::Usage(format!(
                "error: `--tile {n}=...`: the linear kernel takes a tile of the value rank only"
            ))
            .into());
        }
        let e = u64::from(hypothesis.spec.value_dim);
        if *size == 0 || *size > e || e % size != 0 {
            return Err(CompileError::Usage(format!(
                "error: `--tile {n}={size}`: the value block must divide the value dimension ({e})"
            ))
            .into());
        }
        value_block = Some(*size as u32);
    }
    let d = u64::from(hypothesis.spec.head_dim);
    let strategy = match (options.strategy.as_deref(), options.chunk_tokens) {
        (None, None) => None,
        (Some("single"), None) => Some(Strategy::SinglePass),
        (Some("lookback"), None) => Some(Strategy::LookBack),
        (Some("single" | "lookback"), Some(_)) => {
            return Err(CompileError::Usage(
                "error: `--chunk-tokens` goes with `--strategy chunked`".into(),
            )
            .into())
        }
        (Some("chunked") | None, tokens) => {
            let tiles = hypothesis.n.div_ceil(d);
            let chunk_tiles = match tokens {
                Some(t) if t == 0 || t % d != 0 => {
                    return Err(CompileError::Usage(format!(
                        "error: `--chunk-tokens {t}` must be a positive multiple of the block ({d} tokens)"
                    ))
                    .into())
                }
                Some(t) => t / d,
                None => tiles.div_ceil(8).max(1),
            };
            let chunk_tiles = u32::try_from(chunk_tiles).map_err(|_| {
                CompileError::Usage(format!(
                    "error: {chunk_tiles} blocks per chunk is past the kernel's 32-bit chunk index"
                ))
            })?;
            Some(Strategy::Chunked { chunk_tiles })
        }
        (Some(other), _) => {
            return Err(CompileError::Usage(format!(
                "error: unknown strategy `{other}` (single, chunked, lookback)"
            ))
            .into())
        }
    };
    compile_linear(cascade, &small, options, value_block, strategy)
}

/// A cascade compiled to the linear-attention kernels.
#[derive(Debug, Clone)]
pub struct LinearKernels {
    cascade: Cascade,
    pub matched: LinearMatch,
    pub schedule: LinearSchedule,
    pub target: crate::Target,
    /// Relative difference between the interpreter and the recurrence on the small instance.
    pub verified_error: f64,
    /// The cascade the reading names tensors in (the cascade with hoisted maps).
    core: Cascade,
    /// The pre-kernels (feature maps, the decay rate) first, then the chunked strategy's
    /// chunk-state kernel, then the kernel that writes O.
    modules: Vec<Module>,
    /// How many of `modules` are pre-kernels.
    pre_kernels: usize,
}

/// Compiles causal linear attention: the hypothesis read from `cascade` must be confirmed
/// on `small` (the same source at small sizes) by the reference interpreter.
pub fn compile_linear(
    cascade: &Cascade,
    small: &Cascade,
    options: &super::KernelOptions,
    value_block: Option<u32>,
    strategy: Option<Strategy>,
) -> Result<LinearKernels, FamilyError> {
    let mut last_err = None;
    for reading in READINGS {
        let err = match verify_linear(small, reading, 7) {
            Ok(err) => err,
            Err(e) => {
                // The interface readings' reason is the one reported; a normalized reading
                // reports only what it verified and found different.
                if reading.decay == DecayReading::Interface
                    || e.message.contains("relative difference")
                {
                    last_err = Some(e);
                }
                continue;
            }
        };
        let (mut matched, core) =
            read_linear(cascade, reading).map_err(|d| FamilyError::NotMine(vec![d]))?;
        let (d, e) = (matched.spec.head_dim, matched.spec.value_dim);
        if d != e || !(d == 64 || d == 128) {
            return Err(CompileError::Refused(Box::new(Diagnostic::error(
                DiagnosticKind::UnsupportedShape,
                format!(
                    "the linear-attention kernel maps d = e in {{64, 128}} (got d = {d}, e = {e})"
                ),
                Span::UNKNOWN,
            )))
            .into());
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
            None => program::choose_strategy(
                &matched.spec,
                &schedule,
                matched.batch * matched.heads,
                matched.n,
            ),
        };
        let parts = strategy_parts(schedule.strategy);
        let mut kernels = LinearKernels {
            cascade: cascade.clone(),
            matched,
            schedule,
            target: options.target,
            verified_error: err,
            core,
            modules: Vec::new(),
            pre_kernels: 0,
        };
        kernels.modules = kernels.pre_modules()?;
        kernels.pre_kernels = kernels.modules.len();
        for part in parts {
            let module = kernels.module(part)?;
            kernels.modules.push(module);
        }
        return Ok(kernels);
    }
    Err(FamilyError::NotMine(vec![last_err.unwrap_or_else(|| {
        Diagnostic::error(
            DiagnosticKind::NotMappable,
            "not linear attention",
            Span::UNKNOWN,
        )
    })]))
}

/// The programs of a strategy, in launch order.
pub fn strategy_parts(strategy: Strategy) -> Vec<Part> {
    match strategy {
        Strategy::SinglePass => vec![Part::Whole],
        Strategy::LookBack => vec![Part::LookBack],
        Strategy::Chunked { chunk_tiles } => vec![
            Part::ChunkStates { chunk_tiles },
            Part::ChunkOutputs { chunk_tiles },
        ],
    }
}

/// What a pre-kernel writes into scratch, in words, by tensor name.
fn scratch_what(m: &LinearMatch, core: &Cascade, name: &str) -> String {
    if let Some(f) = m.maps.iter().find(|f| core.tensors[f.mapped].name == name) {
        return format!(
            "`{name}`, the feature map of `{}` ({}), laid out as `{}`: written by a pre-kernel, read by the linear kernel",
            core.tensors[f.source].name,
            m.spec.elem.name(),
            core.tensors[f.source].name
        );
    }
    match &m.derived {
        Some(d) => format!(
            "the per-head decay rate `{name}[h] = {}` (decay exp(-{name}[h] (i - j))), f32: written by a pre-kernel, read by the linear kernel",
            d.rate_text
        ),
        None => format!("`{name}`, written by a pre-kernel"),
    }
}

impl LinearKernels {
    /// The names of what the pre-kernels write (scratch arrays of every kernel).
    fn pre_written(&self) -> Vec<String> {
        let m = &self.matched;
        let mut out: Vec<String> = m
            .maps
            .iter()
            .map(|f| self.core.tensors[f.mapped].name.clone())
            .collect();
        out.extend(m.derived.iter().map(|d| d.name.clone()));
        out
    }

    /// The pre-kernels: the general lowering of the prologue cascade, its outputs in
    /// scratch.
    fn pre_modules(&self) -> Result<Vec<Module>, CompileError> {
        let Some(p) = &self.matched.prologue else {
            return Ok(Vec::new());
        };
        let options = super::KernelOptions {
            target: self.target,
            elem: Some(self.matched.spec.elem),
            ..super::KernelOptions::default()
        };
        let general = super::general::compile_general(&p.cascade, &options)?;
        let written = self.pre_written();
        let what = |n: &str| scratch_what(&self.matched, &self.core, n);
        general
            .modules()
            .iter()
            .map(|module| {
                let mut module = module.clone();
                super::tensors_to_scratch(&mut module.contract, &written, &what)?;
                Ok(module)
            })
            .collect()
    }

    /// The program of `part` printed, with its contract at the whole problem's sizes.
    fn module(&self, part: Part) -> Result<Module, CompileError> {
        let m = &self.matched;
        let (program, _) =
            program::lightning_part(&m.spec, &self.schedule, part).map_err(backend_error)?;
        let c = &self.core;
        let elem = dtype(m.spec.elem);
        let io = [
            (&m.q, TensorRole::Input),
            (&m.k, TensorRole::Input),
            (&m.v, TensorRole::Input),
            (&m.o, TensorRole::Output),
        ];
        let io = io
            .iter()
            .map(|(l, role)| contract_tensor(c, l.tensor, *role, elem, Some(l)))
            .collect();
        let decay = m
            .decay_param
            .map(|p| contract_tensor(c, p, TensorRole::Param, Dtype::F32, None));
        self.module_of(program, io, decay)
    }

    /// The module of a program of this reading: `io` the contract tensors of its q, k, v
    /// and o (in that order; the backward binds other tensors to them), `decay` the
    /// per-head rate parameter's.
    pub(crate) fn module_of(
        &self,
        program: crate::TileProgram,
        io: Vec<crate::abi::ContractTensor>,
        decay: Option<crate::abi::ContractTensor>,
    ) -> Result<Module, CompileError> {
        let m = &self.matched;
        let ptx = print_ptx(&program, self.target).map_err(backend_error)?;
        let c = &self.core;
        let io_names: Vec<String> = io.iter().map(|t| t.name.clone()).collect();
        let decay_name = decay.as_ref().map(|t| t.name.clone());
        let mut tensors = io;
        tensors.extend(decay);
        if let Some(g) = &m.gate {
            tensors.push(contract_tensor(
                c,
                g.tensor,
                TensorRole::Input,
                Dtype::F32,
                Some(g),
            ));
        }
        let name = |t| c.tensors[t].name.clone();
        let names = ContractNames {
            tensors: io_names,
            head_params: match &m.derived {
                Some(d) => vec![d.name.clone()],
                None => decay_name.into_iter().collect(),
            },
            scalars: Vec::new(),
            tokens: m.gate.iter().map(|g| name(g.tensor)).collect(),
            states: program.states.iter().map(|s| s.name.clone()).collect(),
            row_outputs: Vec::new(),
            row_inputs: vec![],
        };
        // Chunks of the whole problem: the grid's z.
        let chunks = match program.chunk_tiles {
            0 => 1,
            ct => {
                m.n.div_ceil(u64::from(program.schedule.block_m) * u64::from(ct))
                    .max(1)
            }
        };
        let (d, e) = (u64::from(m.spec.head_dim), u64::from(m.spec.value_dim));
        let cells = m.batch * m.heads * chunks;
        let mut scratch: Vec<Scratch> = program
            .states
            .iter()
            .map(|s| Scratch {
                name: s.name.clone(),
                dtype: Dtype::F32,
                elements: cells * d * e,
                zero_before_launch: false,
                what: "chunk states, f32 [chunks, B, H, d, e], chunk-major".into(),
            })
            .collect();
        if program.look_back {
            scratch.push(Scratch {
                name: "look_back_flags".into(),
                dtype: Dtype::U32,
                elements: 1 + cells * u64::from(program.col_blocks),
                what: "the ticket counter, then one flag per (chunk, batch, head, column block)"
                    .into(),
                zero_before_launch: true,
            });
        }
        let sizes = [
            ("batch", m.batch),
            ("heads", m.heads),
            ("n_q", m.n),
            ("n_k", m.n),
            ("kv_group", 1),
            ("chunk_base", 0),
            ("chunk_total", chunks),
            ("q_offset", 0),
            ("head_dim", d),
            ("value_dim", e),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let s = &self.schedule;
        let mut contract = contract(
            &ptx,
            ContractParts {
                sizes,
                tensors,
                scratch,
                names,
                requires: Vec::new(),
                family: json!({
                    "problem": {"batch": m.batch, "heads": m.heads, "n": m.n,
                                "head_dim": m.spec.head_dim, "value_dim": m.spec.value_dim,
                                "elem": m.spec.elem.name(), "decay": format!("{:?}", m.spec.decay)},
                    "schedule": {"value_block": s.value_block, "warps": s.warps, "stages": s.stages,
                                 "mma": s.mma.name(), "strategy": format!("{:?}", s.strategy),
                                 "target": self.target.name()},
                }),
            },
        )?;
        if m.prologue.is_some() {
            if let Some(d) = &m.derived {
                // The rate array is a tensor of the kernel's ABI until it becomes scratch.
                contract.tensors.push(crate::abi::ContractTensor {
                    name: d.name.clone(),
                    role: TensorRole::Param,
                    dtype: Dtype::F32,
                    shape: vec![m.heads],
                    strides: None,
                });
            }
            let what = |n: &str| scratch_what(m, c, n);
            super::tensors_to_scratch(&mut contract, &self.pre_written(), &what)?;
        }
        Ok(Module {
            program: super::KernelProgram::Tile(Box::new(program)),
            ptx,
            contract,
        })
    }
}

impl Compiled for LinearKernels {
    fn family(&self) -> &'static str {
        "linear"
    }

    fn cascade(&self) -> &Cascade {
        &self.cascade
    }

    fn modules(&self) -> &[Module] {
        &self.modules
    }

    fn explain(&self) -> String {
        let m = &self.matched;
        let s = &self.schedule;
        let mut out = String::new();
        let main = self.modules.last().map(|m| &m.ptx);
        let entry = main.map_or("", |p| p.entry.as_str());
        let _ = writeln!(out, "kernel: {entry} (target {})", self.target.name());
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
        self.explain_normal_forms(&mut out);
        if s.strategy == Strategy::LookBack {
            let _ = writeln!(
                out,
                "strategy: decoupled look-back, one CTA per (block of {} tokens, value block, batch, head), all in parallel: each reads its Q, K, V once, computes the intra-block outputs and its own d x {} state, publishes that state, walks back over the earlier blocks' published states (stopping at the first inclusive prefix), publishes its inclusive prefix and adds Q times the entering state; only states are re-read",
                m.spec.head_dim, s.value_block
            );
        } else if let Strategy::Chunked { chunk_tiles } = s.strategy {
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
        if let Some(main) = self.modules.last() {
            let g = main.contract.grid;
            let _ = writeln!(
                out,
                "grid: ({}, batch * heads, chunks) = ({}, {}, {}); {} threads, {}-stage cp.async ring, {} B shared",
                m.spec.value_dim / s.value_block,
                g[0],
                g[1],
                g[2],
                s.warps * 32,
                s.stages,
                main.ptx.dynamic_smem_bytes
            );
        }
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
            program::strategy_choice(&m.spec, &self.schedule, m.batch * m.heads, m.n);
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
                MmaUnit::Warpgroup => "each warpgroup issues m64nNk16 MMAs that read K, V, Q and the state copy from shared memory through descriptors, asynchronously, so the decay and mask work overlaps them (sm_90a)",
                MmaUnit::Sync => "per-warp m16n8k16 MMAs with ldmatrix fragments (the sm_80 instruction set; on sm_90a pass --target sm_90a for wgmma)",
            }
        );
        let _ = writeln!(
            out,
            "verified: the interpreter agrees with the recurrence on a small instance (relative difference {:.1e})",
            self.verified_error
        );
        out
    }

    fn formula(&self, inputs: &Inputs) -> (Vec<f64>, &'static str) {
        (self.matched.reference_output(inputs), "the f64 recurrence")
    }

    fn interpreter_work(&self) -> u64 {
        let m = &self.matched;
        m.batch * m.heads * m.n * m.n * u64::from(m.spec.head_dim)
    }

    fn formula_work(&self) -> Option<u64> {
        let m = &self.matched;
        Some(m.batch * m.heads * m.n * u64::from(m.spec.head_dim) * u64::from(m.spec.value_dim))
    }

    fn rate(&self) -> Rate {
        let m = &self.matched;
        let tokens = (m.batch * m.n) as f64;
        let bytes = tokens
            * m.heads as f64
            * (2.0 * f64::from(m.spec.head_dim) + 2.0 * f64::from(m.spec.value_dim))
            * f64::from(m.spec.elem.bytes());
        Rate::Tokens { tokens, bytes }
    }

    fn plan_modules(&self, plan: &mut Plan, gpu: &GpuModel) -> Result<PlanKernels, String> {
        if self.pre_kernels > 0 {
            return Err(format!(
                "the linear reading of `{}` needs {} pre-kernel(s) (feature maps or a computed decay rate) that sequence-parallel plans do not launch yet; compile it for one GPU",
                self.cascade.name, self.pre_kernels
            ));
        }
        let mut modules: Vec<Module> = Vec::new();
        let mut add = |module: Module| -> String {
            let entry = module.ptx.entry.clone();
            if !modules.iter().any(|m| m.ptx.entry == entry) {
                modules.push(module);
            }
            entry
        };
        for rank in &mut plan.ranks {
            for step in &mut rank.steps {
                let Step::Kernel(k) = step else { continue };
                match k.phase {
                    Phase::Full => {
                        // Ulysses: the single-pass kernel over this rank's heads.
                        let module = self.module(Part::Whole).map_err(|e| e.to_string())?;
                        k.launch = vec![add(module)];
                    }
                    Phase::StateOnly | Phase::OutputWithPrefix => {
                        let (chunks, chunk_tiles) = self.window_chunking(k.queries.len, gpu)?;
                        let states = self
                            .module(Part::ChunkStates { chunk_tiles })
                            .map_err(|e| e.to_string())?;
                        let outputs = self
                            .module(Part::ChunkOutputs { chunk_tiles })
                            .map_err(|e| e.to_string())?;
                        k.launch = vec![add(states), add(outputs)];
                        k.chunks = Some(chunks);
                    }
                    other => return Err(format!("a `{other:?}` kernel of this family")),
                }
            }
        }
        Ok(PlanKernels {
            modules,
            ptx: Vec::new(),
        })
    }
}

impl LinearKernels {
    /// `--emit schedule`: the feature maps peeled into pre-kernels and the decay read in
    /// normal form, when the cascade has them.
    fn explain_normal_forms(&self, out: &mut String) {
        let m = &self.matched;
        let c = &self.core;
        if m.decay_form.is_some() || !m.maps.is_empty() {
            let _ = writeln!(
                out,
                "lowering: linear attention (the Lightning-style state kernel), read after normalizing the cascade: {}",
                match (m.decay_form.is_some(), m.maps.is_empty()) {
                    (true, true) => "its decay to a per-head rate",
                    (true, false) => "its feature maps into pre-kernels and its decay to a per-head rate",
                    _ => "its feature maps into pre-kernels",
                }
            );
        }
        if let Some(form) = &m.decay_form {
            let rate = match (&m.derived, m.decay_param) {
                (Some(d), _) => format!(
                    "the rate r[h] = {} is computed per head by a pre-kernel into the f32 scratch `{}`, which the kernel reads in place of a per-head parameter",
                    d.rate_text, d.name
                ),
                (None, Some(p)) => format!(
                    "the rate is the per-head parameter `{}` itself, read directly",
                    c.tensors[p].name
                ),
                (None, None) => "no rate".into(),
            };
            let _ = writeln!(
                out,
                "decay: `{form}` normalized to exp(-r[h] (i - j)) (linear in the query-key distance, per head); {rate}"
            );
        }
        for f in &m.maps {
            let _ = writeln!(
                out,
                "feature map: `{}` is element-wise in `{}`: a pre-kernel writes `{}` into scratch ({}, laid out as `{}`) and the kernel reads it as its {}",
                f.written.trim(),
                c.tensors[f.source].name,
                c.tensors[f.mapped].name,
                m.spec.elem.name(),
                c.tensors[f.source].name,
                if f.mapped == m.q.tensor {
                    "queries"
                } else if f.mapped == m.k.tensor {
                    "keys"
                } else {
                    "values"
                }
            );
        }
        if self.pre_kernels > 0 {
            let entries: Vec<&str> = self.modules[..self.pre_kernels]
                .iter()
                .map(|m| m.ptx.entry.as_str())
                .collect();
            let _ = writeln!(
                out,
                "pre-kernels: {} (general lowering, one thread per element), launched before the linear kernel; the manifest's launch lists them first",
                entries.join(", ")
            );
        }
    }

    /// How a window of `len` tokens is cut: `(chunks, tiles per chunk)`. Enough chunks
    /// that the state pass has about two CTAs per SM to stream K and V; a count that
    /// divides the window's tiles, since the combine uses one decay for every chunk (so a
    /// window that ends inside a tile, whose last chunk would be shorter, stays one chunk).
    pub fn window_chunking(&self, len: u64, gpu: &GpuModel) -> Result<(u64, u32), String> {
        let m = &self.matched;
        let sms = u64::from(gpu.sm_count);
        let ctas = m.batch * m.heads * u64::from(m.spec.value_dim / self.schedule.value_block);
        let d = u64::from(m.spec.head_dim);
        let tiles = len.div_ceil(d).max(1);
        let too_long = |t: u64| {
            u32::try_from(t).map_err(|_| format!("a window of {len} tokens has {t} blocks per chunk, past the kernel's 32-bit index"))
        };
        if !len.is_multiple_of(d) {
            return Ok((1, too_long(tiles)?));
        }
        let mut sub = (2 * sms).div_ceil(ctas.max(1)).clamp(2, 16).min(tiles);
        while sub > 1 && !tiles.is_multiple_of(sub) {
            sub -= 1;
        }
        Ok((sub, too_long(tiles / sub)?))
    }
}
