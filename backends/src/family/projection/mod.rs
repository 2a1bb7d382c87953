//! Row statistics of a projection: `Z[t, v] = A[t, d] * B[v, d]` over a long `d`, then
//! maps of `Z` and max/sum reductions over `v` into per-row outputs (the log-partition and
//! entropy of a language model's head, the log-sum-exp of a projection, a cross-entropy's
//! normalizer), as one kernel that never stores `Z`: a CTA owns a tile of rows, walks
//! the column rank in tiles, streams each logit tile's GEMM over `d` through shared memory
//! into tensor-core accumulators (`wgmma` on sm_90a, `mma.sync` on sm_80), and folds it
//! into running maxima and rescaled running sums (the online softmax).
//!
//! - [`recognize`]: reads the cascade (symbolic per-element values, sums factored into
//!   the running form);
//! - [`program`]: the Tile IR program.

pub mod program;
pub mod recognize;

pub use program::{merge_program, partial_names, projection_program, ProjectionSchedule};
pub use recognize::{recognize, Reading, Stat};

use super::{
    contract, contract_tensor, dtype, CompileError, Compiled, ContractNames, ContractParts,
    FamilyError, Inputs, KernelFamily, Module, PlanKernels, Rate, Request,
};
use crate::abi::{Scratch, Source, TensorRole};
use crate::plan::Plan;
use crate::print_ptx;
use crate::ptx::Target;
use crate::tile::{Elem, MmaUnit, ScalarExpr, TileProgram};
use einattn_ir::cascade::{Cascade, ReduceOp};
use einattn_ir::validate::{Diagnostic, DiagnosticKind};
use einattn_passes::analysis::GpuModel;
use serde_json::json;
use std::fmt::Write as _;

/// The family.
pub struct Projection;

impl KernelFamily for Projection {
    fn name(&self) -> &'static str {
        "projection"
    }

    fn reads_as(&self) -> &'static str {
        "row statistics of a projection"
    }

    fn compile(&self, request: &Request) -> Result<Box<dyn Compiled>, FamilyError> {
        compile_projection(request.cascade, request.options)
            .map(|k| Box::new(k) as Box<dyn Compiled>)
    }
}

fn refused(msg: String) -> FamilyError {
    FamilyError::Failed(CompileError::Refused(Box::new(Diagnostic::error(
        DiagnosticKind::UnsupportedShape,
        msg,
        einattn_ir::cascade::Span::UNKNOWN,
    ))))
}

/// The default shape and why, for a target and unit.
fn default_schedule(mma: MmaUnit) -> (ProjectionSchedule, &'static str) {
    match mma {
        // Two consumer warpgroups of 64 rows share each 192-column logit tile's B slices.
        // The GEMM is bound by the bandwidth from L2 to the SMs (measured on the H200:
        // about 6.7 TB/s at 128 and at 192 columns), so a wider tile, which loads fewer
        // bytes per FLOP, is faster, and so is a deeper ring: at T=8192 d=4096 V=32768,
        // 128 x 128 x 5 stages ran 4.46 ms, 128 x 192 x 4 stages 4.27 ms, 128 x 192 x 5
        // stages 3.77 ms (59% of the roofline). 256 columns do not fit 255 registers
        // without spills (128 accumulators per thread). 5 stages of 40 KB: 200 KB.
        MmaUnit::Warpgroup => (
            ProjectionSchedule { block_m: 128, block_n: 192, warps: 8, stages: 5, slice: 64, mma, splits: 1 },
            "wgmma: 2 warpgroups x 64 rows, m64n192k16 per 16 columns of d (the widest tile without spills: the loads from L2 bound the GEMM); 5 stages of 64-column slices (3 in flight past the one wgmma group kept pending)",
        ),
        MmaUnit::Sync => (
            ProjectionSchedule { block_m: 128, block_n: 128, warps: 8, stages: 4, slice: 64, mma, splits: 1 },
            "mma.sync: 8 warps x 16 rows, 4 stages of 64-column slices (3 in flight)",
        ),
    }
}

/// The most CTAs one row tile's column loop is split across: the merge kernel holds every
/// split's partial statistics of a row in registers.
const MAX_SPLITS: u64 = 8;

/// CTAs per row tile: 1 when the row tiles fill the GPU's SMs; otherwise as many as bring
/// the grid closest to one CTA per SM without going past it, each with at least two column
/// tiles (T = 8192 in 128-row tiles on 132 SMs: 64 row tiles, 2 splits).
fn split_count(row_tiles: u64, col_tiles: u64, sms: u32) -> u32 {
    let sms = u64::from(sms);
    if row_tiles == 0 || row_tiles >= sms {
        return 1;
    }
    let splits = (sms / row_tiles).min(col_tiles / 2).clamp(1, MAX_SPLITS);
    u32::try_from(splits).unwrap_or(1)
}

/// Reads `cascade` as row statistics of a projection and compiles its kernel.
pub fn compile_projection(
    cascade: &Cascade,
    options: &super::KernelOptions,
) -> Result<ProjectionKernels, FamilyError> {
    let reading = recognize(cascade).map_err(|d| FamilyError::NotMine(vec![d]))?;
    let mma = options.mma.unwrap_or(match options.target {
        Target::Sm90a => MmaUnit::Warpgroup,
        Target::Sm80 => MmaUnit::Sync,
    });
    let (mut s, why) = default_schedule(mma);
    let name = |r| cascade.ranks[r].name.clone();
    for (n, size) in &options.tiles {
        let size = u32::try_from(*size)
            .map_err(|_| CompileError::Usage(format!("error: tile size {size} is too large")))?;
        if *n == name(reading.col) {
            s.block_n = size;
        } else if *n == name(reading.row) {
            s.block_m = size;
        } else if *n == name(reading.inner) {
            s.slice = size;
        } else {
            return Err(CompileError::Usage(format!(
                "error: `--tile {n}=...`: `{n}` is none of the row rank `{}`, the column rank `{}`, the contracted rank `{}`",
                name(reading.row), name(reading.col), name(reading.inner)
            ))
            .into());
        }
    }
    if let Some(w) = options.warps {
        s.warps = w;
    }
    if let Some(st) = options.stages {
        s.stages = st;
    }
    s.splits = split_count(
        reading.n_rows.div_ceil(u64::from(s.block_m.max(1))),
        reading.n_cols.div_ceil(u64::from(s.block_n.max(1))),
        GpuModel::h100().sm_count,
    );
    if s.slice != 64 {
        return Err(CompileError::Usage(format!(
            "error: the contracted rank `{}` streams in slices of 64 columns (one 128-byte swizzle block), not {}",
            name(reading.inner),
            s.slice
        ))
        .into());
    }
    let elem = options
        .elem
        .unwrap_or(match cascade.tensors[reading.a].dtype {
            Some(einattn_ir::cascade::DType::F16) => Elem::F16,
            _ => Elem::Bf16,
        });
    let stat_names: Vec<String> = reading
        .stats
        .iter()
        .map(|(t, _)| cascade.tensors[*t].name.clone())
        .collect();
    let outputs: Vec<String> = reading
        .outputs
        .iter()
        .map(|(t, _)| cascade.tensors[*t].name.clone())
        .collect();
    let entry = format!(
        "einattn_proj_{}_{}_m{}n{}",
        cascade
            .name
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect::<String>(),
        elem.name(),
        s.block_m,
        s.block_n
    );
    // A shape the user asked for that the lowering cannot build is their flag's error.
    let mut overrides: Vec<String> = options
        .tiles
        .iter()
        .map(|(n, v)| format!("--tile {n}={v}"))
        .collect();
    overrides.extend(options.warps.map(|w| format!("--warps {w}")));
    overrides.extend(options.stages.map(|st| format!("--stages {st}")));
    let failed = |e: crate::tile::TileError| -> FamilyError {
        if overrides.is_empty() {
            refused(e.to_string())
        } else {
            CompileError::Usage(format!(
                "error: `{}`: {e}\n  = help: leave the shape to the scheduler, or see `--emit schedule` for the default",
                overrides.join(" ")
            ))
            .into()
        }
    };
    let report = einattn_passes::analysis::analyze(
        cascade,
        &einattn_passes::analysis::AnalysisOptions::default(),
    );
    let layout = |t, seq| super::Layout::of(cascade, t, None, Some(seq), None);
    let la = layout(reading.a, reading.row);
    let lb = layout(reading.b, reading.col);
    let inputs = vec![
        contract_tensor(
            cascade,
            reading.a,
            TensorRole::Input,
            dtype(elem),
            Some(&la),
        ),
        contract_tensor(
            cascade,
            reading.b,
            TensorRole::Input,
            dtype(elem),
            Some(&lb),
        ),
    ];
    let output_tensors: Vec<_> = reading
        .outputs
        .iter()
        .map(|(t, _)| {
            contract_tensor(
                cascade,
                *t,
                TensorRole::Output,
                crate::abi::Dtype::F32,
                None,
            )
        })
        .collect();
    let partials = partial_names(&reading, &stat_names);
    let scratch: Vec<Scratch> = if s.splits > 1 {
        partials
            .iter()
            .map(|n| Scratch {
                name: n.clone(),
                dtype: crate::abi::Dtype::F32,
                elements: u64::from(s.splits) * reading.n_rows,
                zero_before_launch: false,
                what: format!(
                    "[{} splits, rows] partial statistics of the split column loop, read by the merge kernel",
                    s.splits
                ),
            })
            .collect()
    } else {
        Vec::new()
    };
    let sizes: std::collections::BTreeMap<String, u64> = [
        ("batch", 1),
        ("heads", 1),
        ("n_q", reading.n_rows),
        ("n_k", reading.n_cols),
        ("kv_group", 1),
        ("head_dim", reading.depth),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let family = json!({
        "problem": {"rows": reading.n_rows, "cols": reading.n_cols,
                    "depth": reading.depth, "elem": elem.name()},
        "schedule": {"block_m": s.block_m, "block_n": s.block_n, "warps": s.warps,
                     "stages": s.stages, "slice": s.slice, "mma": s.mma.name(),
                     "splits": s.splits},
    });
    // One module: its program, printed, and its contract (row outputs that are the
    // cascade's outputs are those tensors, `[rows]` f32; the others are scratch).
    let module = |program: TileProgram,
                  tensors: Vec<crate::abi::ContractTensor>,
                  tensor_names: Vec<String>,
                  row_outputs: Vec<String>,
                  row_inputs: Vec<String>|
     -> Result<Module, FamilyError> {
        let ptx = print_ptx(&program, options.target).map_err(&failed)?;
        let names = ContractNames {
            tensors: tensor_names,
            head_params: vec![],
            scalars: vec![],
            tokens: vec![],
            states: vec![],
            row_outputs,
            row_inputs,
        };
        let mut c = contract(
            &ptx,
            ContractParts {
                sizes: sizes.clone(),
                tensors,
                scratch: scratch.clone(),
                names,
                requires: vec![],
                family: family.clone(),
            },
        )?;
        for p in &mut c.params {
            if let Source::Scratch { scratch } = &p.from {
                if outputs.contains(scratch) {
                    p.from = Source::Tensor {
                        tensor: scratch.clone(),
                    };
                }
            }
        }
        c.check().map_err(CompileError::Input)?;
        Ok(Module {
            program: super::KernelProgram::Tile(Box::new(program)),
            ptx,
            contract: c,
        })
    };
    let input_names = vec![
        cascade.tensors[reading.a].name.clone(),
        cascade.tensors[reading.b].name.clone(),
    ];
    let program = projection_program(&reading, elem, &s, entry.clone(), &stat_names, &outputs)
        .map_err(&failed)?;
    let mut modules = Vec::new();
    if s.splits > 1 {
        modules.push(module(
            program,
            inputs,
            input_names,
            partials.clone(),
            vec![],
        )?);
        let merge = merge_program(
            &reading,
            s.splits,
            format!("{entry}_merge"),
            &stat_names,
            &outputs,
        )
        .map_err(&failed)?;
        modules.push(module(
            merge,
            output_tensors,
            vec![],
            outputs.clone(),
            partials,
        )?);
    } else {
        let mut tensors = inputs;
        tensors.extend(output_tensors);
        modules.push(module(
            program,
            tensors,
            input_names,
            outputs.clone(),
            vec![],
        )?);
    }
    let flops = report.flops as f64;
    Ok(ProjectionKernels {
        cascade: cascade.clone(),
        reading,
        schedule: s,
        why,
        stat_names,
        passed_over: Vec::new(),
        modules,
        flops,
        bytes: report.bytes_min as f64,
        bound_ms: report.roofline.time_lower_bound_s * 1e3,
    })
}

/// A cascade compiled to the projection kernel.
pub struct ProjectionKernels {
    cascade: Cascade,
    pub reading: Reading,
    pub schedule: ProjectionSchedule,
    why: &'static str,
    stat_names: Vec<String>,
    passed_over: Vec<String>,
    modules: Vec<Module>,
    flops: f64,
    bytes: f64,
    bound_ms: f64,
}

impl ProjectionKernels {
    /// Every row statistic of every row by its definition (not the running form): the
    /// products `Z` in f64 from the inputs as given (rounded as the kernel reads them),
    /// then each reduction over the whole row. Rows are spread over the CPU's threads.
    pub fn reference(&self, inputs: &Inputs) -> Vec<Vec<f64>> {
        let r = &self.reading;
        let (rows, cols, depth) = (r.n_rows as usize, r.n_cols as usize, r.depth as usize);
        let elem = match self.modules[0].contract.tensors[0].dtype {
            crate::abi::Dtype::F16 => Elem::F16,
            _ => Elem::Bf16,
        };
        let get = |t| {
            inputs
                .get(&t)
                .map(|d| {
                    d.values
                        .iter()
                        .map(|&x| elem.round(x))
                        .collect::<Vec<f64>>()
                })
                .unwrap_or_default()
        };
        let (a, b) = (get(r.a), get(r.b));
        if a.len() < rows * depth || b.len() < cols * depth {
            return vec![Vec::new(); r.stats.len()];
        }
        let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
        let per = rows.div_ceil(threads).max(1);
        let mut out = vec![vec![0.0; rows]; r.stats.len()];
        let mut by_row = vec![Vec::new(); rows];
        std::thread::scope(|scope| {
            for (chunk, slot) in by_row.chunks_mut(per).enumerate() {
                let (a, b) = (&a, &b);
                scope.spawn(move || {
                    for (i, s) in slot.iter_mut().enumerate() {
                        let t = chunk * per + i;
                        let z: Vec<f64> = (0..cols)
                            .map(|v| {
                                (0..depth)
                                    .map(|d| a[t * depth + d] * b[v * depth + d])
                                    .sum()
                            })
                            .collect();
                        *s = self.row_stats(&z);
                    }
                });
            }
        });
        for (t, stats) in by_row.into_iter().enumerate() {
            for (k, v) in stats.into_iter().enumerate() {
                out[k][t] = v;
            }
        }
        out
    }

    /// The statistics of one row of logits, each from its definition.
    fn row_stats(&self, z: &[f64]) -> Vec<f64> {
        let mut vals: Vec<f64> = Vec::new();
        for (k, (_, st)) in self.reading.stats.iter().enumerate() {
            let eval = |e: &ScalarExpr, zv: f64, vals: &[f64]| {
                e.eval(&mut |leaf| {
                    Ok::<f64, ()>(match leaf {
                        ScalarExpr::Lit(x) => *x,
                        ScalarExpr::Row(id) => vals.get(id.index()).copied().unwrap_or(f64::NAN),
                        _ => zv,
                    })
                })
                .unwrap_or(f64::NAN)
            };
            let v = match (&self.reading.direct[k], st) {
                (Some((ReduceOp::Max, e)), _) => z
                    .iter()
                    .map(|&x| eval(e, x, &vals))
                    .fold(f64::NEG_INFINITY, f64::max),
                (Some((_, e)), _) => z.iter().map(|&x| eval(e, x, &vals)).sum(),
                (None, Stat::Row(e)) => eval(e, f64::NAN, &vals),
                (None, _) => f64::NAN,
            };
            vals.push(v);
        }
        vals
    }
}

impl Compiled for ProjectionKernels {
    fn family(&self) -> &'static str {
        "projection"
    }

    fn cascade(&self) -> &Cascade {
        &self.cascade
    }

    fn modules(&self) -> &[Module] {
        &self.modules
    }

    fn explain(&self) -> String {
        let r = &self.reading;
        let c = &self.cascade;
        let s = &self.schedule;
        let name = |x| c.ranks[x].name.clone();
        let mut o = String::new();
        let _ = writeln!(o, "family: row statistics of a projection");
        for p in &self.passed_over {
            let _ = writeln!(o, "  (not {p})");
        }
        let _ = writeln!(
            o,
            "projection: {}[{t}, {v}] = {}[{t}, {d}] * {}[{v}, {d}], {} x {} x {} (never stored)",
            c.tensors[r.z].name,
            c.tensors[r.a].name,
            c.tensors[r.b].name,
            r.n_rows,
            r.n_cols,
            r.depth,
            t = name(r.row),
            v = name(r.col),
            d = name(r.inner)
        );
        let _ = writeln!(o, "row statistics, one pass over `{}`:", name(r.col));
        for (k, (_, st)) in r.stats.iter().enumerate() {
            let what = match st {
                Stat::Max(_) => "running max".to_string(),
                Stat::Sum(parts) => {
                    let anchored = parts.iter().filter(|p| p.anchor.is_some()).count();
                    format!(
                        "{} running sum(s), {anchored} rescaled by exp(old max - new max)",
                        parts.len()
                    )
                }
                Stat::Row(_) => "row map after the loop".to_string(),
            };
            let _ = writeln!(o, "  {}: {what}", self.stat_names[k]);
        }
        let _ = writeln!(
            o,
            "schedule: block_m={} ({}) block_n={} ({}) warps={} stages={} slice={} ({}) mma={}",
            s.block_m,
            name(r.row),
            s.block_n,
            name(r.col),
            s.warps,
            s.stages,
            s.slice,
            name(r.inner),
            s.mma.name()
        );
        let _ = writeln!(o, "  why: {}", self.why);
        if s.splits > 1 {
            let _ = writeln!(
                o,
                "  split: {} CTAs per row tile, each over its run of the `{}` tiles: {} row tiles alone would leave SMs idle; a merge kernel combines their partial maxima and sums by log-sum-exp (`{}_merge`)",
                s.splits,
                name(r.col),
                r.n_rows.div_ceil(u64::from(s.block_m)),
                self.modules[0].ptx.entry
            );
        }
        let _ = writeln!(
            o,
            "  shared memory {} B; the slice ring runs on across column tiles, so the next tile's first slices load during the epilogue",
            self.modules[0].ptx.dynamic_smem_bytes
        );
        let _ = writeln!(
            o,
            "analysis: {:.3e} FLOPs, {:.3e} bytes at least, roofline {:.3e} ms",
            self.flops, self.bytes, self.bound_ms
        );
        o
    }

    fn formula(&self, inputs: &Inputs) -> (Vec<f64>, &'static str) {
        // The main output is the contract's first output tensor (the reading's first).
        let main = self.reading.outputs.first().map(|(t, _)| *t);
        let stats = self.reference(inputs);
        let k = self
            .reading
            .outputs
            .iter()
            .find(|(t, _)| Some(*t) == main)
            .map(|(_, k)| *k);
        (
            k.and_then(|k| stats.get(k).cloned()).unwrap_or_default(),
            "the row statistics by definition (f64, threaded)",
        )
    }

    fn interpreter_work(&self) -> u64 {
        let r = &self.reading;
        // The logits, and the maps and reductions over each of them.
        r.n_rows * r.n_cols * (r.depth + self.cascade.einsums.len() as u64)
    }

    fn formula_work(&self) -> Option<u64> {
        let r = &self.reading;
        Some(r.n_rows * r.n_cols * r.depth)
    }

    fn rate(&self) -> Rate {
        Rate::Roofline {
            flops: self.flops,
            bytes: self.bytes,
            bound_ms: self.bound_ms,
        }
    }

    fn passed_over(&mut self, reasons: &[(&'static str, Vec<Diagnostic>)]) {
        self.passed_over = reasons
            .iter()
            .map(|(what, ds)| {
                let why: Vec<&str> = ds.iter().map(|d| d.message.as_str()).collect();
                format!("{what}: {}", why.join("; "))
            })
            .collect();
    }

    fn plan_modules(&self, _plan: &mut Plan, _gpu: &GpuModel) -> Result<PlanKernels, String> {
        Err("kernels of the projection family (it has no sequence-parallel form yet)".into())
    }
}
