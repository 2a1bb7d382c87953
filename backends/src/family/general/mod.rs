//! The general lowering: every valid cascade as point kernels (see [`program`]), one per
//! Einsum, recurrence or step body, in the reference interpreter's evaluation order, with
//! a launch contract each. It is the last family tried, so `compile` refuses no valid
//! cascade; the softmax and linear families remain the choice where they apply.
//!
//! - [`lower`]: the cascade as a [`program::PointProgram`];
//! - [`interp`]: its CPU interpreter (tests compare it with the cascade interpreter);
//! - [`ptx`]: each kernel as a PTX module.

pub mod interp;
pub mod lower;
pub mod program;
pub mod ptx;
pub mod random;

use super::{
    interpreter_formula, CompileError, Compiled, FamilyError, Inputs, KernelFamily, KernelOptions,
    KernelProgram, Module, Rate, Request,
};
use crate::abi::{
    self, ContractParam, ContractTensor, Dtype, GridAxis, LaunchContract, ParamType, Source,
    TensorRole,
};
use crate::plan::Plan;
use einattn_ir::cascade::{Cascade, Span};
use einattn_ir::validate::{Diagnostic, DiagnosticKind};
use einattn_passes::analysis::GpuModel;
use program::{PointKernel, PointProgram, SlotKind};
use serde_json::json;
use std::fmt::Write as _;

/// Scratch the general lowering may ask for (every intermediate is materialized in f32).
pub const MAX_SCRATCH_BYTES: u64 = 32 << 30;

/// The general family.
pub struct General;

impl KernelFamily for General {
    fn name(&self) -> &'static str {
        "general"
    }

    fn reads_as(&self) -> &'static str {
        "point kernels"
    }

    fn compile(&self, request: &Request) -> Result<Box<dyn Compiled>, FamilyError> {
        compile_general(request.cascade, request.options)
            .map(|k| Box::new(k) as Box<dyn Compiled>)
            .map_err(FamilyError::Failed)
    }
}

fn refuse(message: String) -> CompileError {
    refuse_at(Span::UNKNOWN, message)
}

fn refuse_at(span: Span, message: String) -> CompileError {
    CompileError::Refused(Box::new(Diagnostic::error(
        DiagnosticKind::UnsupportedShape,
        message,
        span,
    )))
}

/// Lowers `cascade` to point kernels and prints them.
pub fn compile_general(
    cascade: &Cascade,
    options: &KernelOptions,
) -> Result<GeneralKernels, CompileError> {
    let elem = options.elem.map(super::dtype);
    let prefix = format!("einattn_g_{}", cascade.name);
    let program = lower::lower(cascade, elem, &prefix);
    let scratch: u64 = program
        .slots
        .iter()
        .filter(|s| s.kind == SlotKind::Scratch)
        .map(|s| s.elements().saturating_mul(4))
        .fold(0, u64::saturating_add);
    if scratch > MAX_SCRATCH_BYTES {
        // Point at the Einsum that writes the largest intermediate: that is the one to shrink.
        let largest = program
            .slots
            .iter()
            .filter(|s| s.kind == SlotKind::Scratch)
            .max_by_key(|s| s.elements())
            .and_then(|s| cascade.tensor_by_name(&s.name));
        let span = cascade
            .einsums
            .iter()
            .find(|(_, e)| Some(e.output.tensor) == largest)
            .map_or(Span::UNKNOWN, |(_, e)| e.span);
        return Err(refuse_at(span, format!(
            "the general lowering keeps every intermediate of `{}` in memory: {:.1} GiB, over its {} GiB limit (smaller sizes, or a form the softmax or linear kernels read)",
            cascade.name,
            scratch as f64 / (1u64 << 30) as f64,
            MAX_SCRATCH_BYTES >> 30
        )));
    }
    let report = einattn_passes::analysis::analyze(
        cascade,
        &einattn_passes::analysis::AnalysisOptions::default(),
    );
    let mut modules = Vec::new();
    for k in &program.kernels {
        let printed = ptx::print(&program, k, options.target);
        let contract = contract(&program, k, &printed, options.target)?;
        modules.push(Module {
            program: KernelProgram::Points(Box::new(program.clone())),
            ptx: crate::PtxKernel {
                entry: printed.entry,
                text: printed.text,
                target: options.target,
                threads: printed.threads,
                block_m: 0,
                dynamic_smem_bytes: 0,
                abi: Vec::new(),
                col_blocks: None,
                chunk_tiles: None,
                key_splits: 1,
                persistent_ctas: None,
            },
            contract,
        });
    }
    Ok(GeneralKernels {
        cascade: cascade.clone(),
        passed_over: Vec::new(),
        program,
        modules,
        flops: report.flops as f64,
        bytes: report.bytes_min as f64,
        bound_ms: report.roofline.time_lower_bound_s * 1e3,
    })
}

/// The launch contract of one point kernel: its slots as pointers, a fixed grid.
fn contract(
    program: &PointProgram,
    k: &PointKernel,
    printed: &ptx::PointPtx,
    target: crate::Target,
) -> Result<LaunchContract, CompileError> {
    let grid = u32::try_from(printed.grid)
        .ok()
        .filter(|&g| g <= u32::MAX >> 1)
        .ok_or_else(|| {
            refuse(format!(
                "kernel `{}` needs {} CTAs, past one launch's grid",
                k.name(),
                printed.grid
            ))
        })?;
    let mut tensors = Vec::new();
    let mut scratch = Vec::new();
    let mut params = Vec::new();
    for &s in &printed.slots {
        let slot = &program.slots[s];
        let role = match slot.kind {
            SlotKind::Input => Some(TensorRole::Input),
            SlotKind::Param => Some(TensorRole::Param),
            SlotKind::Output => Some(TensorRole::Output),
            SlotKind::Scratch => None,
        };
        let from = match role {
            Some(role) => {
                tensors.push(ContractTensor {
                    name: slot.name.clone(),
                    role,
                    dtype: slot.dtype,
                    shape: slot.shape.clone(),
                    strides: None,
                });
                Source::Tensor {
                    tensor: slot.name.clone(),
                }
            }
            None => {
                scratch.push(abi::Scratch {
                    name: slot.name.clone(),
                    dtype: Dtype::F32,
                    elements: slot.elements(),
                    zero_before_launch: false,
                    what: "an intermediate of the general lowering, f32, absent points marked"
                        .into(),
                });
                Source::Scratch {
                    scratch: slot.name.clone(),
                }
            }
        };
        params.push(ContractParam {
            name: format!("p_{s}"),
            ty: ParamType::Ptr,
            from,
        });
    }
    let kind = match k {
        PointKernel::Parallel { .. } => "parallel",
        PointKernel::Recurrent { .. } => "recurrent",
        PointKernel::Copy { .. } => "copy",
    };
    let c = LaunchContract {
        kernel: printed.entry.clone(),
        ptx: format!("{}.ptx", printed.entry),
        target: target.name().to_string(),
        block: [printed.threads, 1, 1],
        grid: [grid, 1, 1],
        grid_formula: [
            GridAxis::fixed(u64::from(grid)),
            GridAxis::fixed(1),
            GridAxis::fixed(1),
        ],
        dynamic_shared_bytes: 0,
        sizes: Default::default(),
        tensors,
        scratch,
        params,
        requires: Vec::new(),
        family: json!({
            "problem": program.ranks.iter().map(|(n, e)| (n.clone(), json!(e))).collect::<serde_json::Map<_, _>>(),
            "schedule": {"lowering": "general", "kernel": kind},
        }),
    };
    c.check().map_err(refuse)?;
    Ok(c)
}

/// A cascade compiled by the general lowering.
pub struct GeneralKernels {
    cascade: Cascade,
    /// Why the faster families did not take the cascade.
    passed_over: Vec<String>,
    pub program: PointProgram,
    modules: Vec<Module>,
    flops: f64,
    bytes: f64,
    bound_ms: f64,
}

impl Compiled for GeneralKernels {
    fn family(&self) -> &'static str {
        "general"
    }

    fn cascade(&self) -> &Cascade {
        &self.cascade
    }

    fn modules(&self) -> &[Module] {
        &self.modules
    }

    fn explain(&self) -> String {
        let p = &self.program;
        let mut out = String::new();
        let _ = writeln!(out, "lowering: general, {} point kernels", p.kernels.len());
        for reason in &self.passed_over {
            let _ = writeln!(out, "not {reason}");
        }
        let rank = |r: usize| p.ranks.get(r).map_or("?", |(n, _)| n.as_str());
        for (k, m) in p.kernels.iter().zip(&self.modules) {
            let grid = match m.contract.grid[0] {
                1 => "1 CTA".to_string(),
                n => format!("{n} CTAs"),
            };
            let line = match k {
                PointKernel::Parallel { compute, .. } => {
                    let points: Vec<&str> = compute.points.iter().map(|&r| rank(r)).collect();
                    let reduced: Vec<&str> = compute.levels.iter().map(|l| rank(l.rank)).collect();
                    format!(
                        "{}: one thread per point of ({}){}, {grid}",
                        compute.einsum,
                        points.join(", "),
                        if reduced.is_empty() {
                            String::new()
                        } else {
                            format!(", reducing ({}) in the thread", reduced.join(", "))
                        }
                    )
                }
                PointKernel::Recurrent {
                    instance,
                    rank: step,
                    steps,
                    reverse,
                    body,
                    ..
                } => {
                    let inst: Vec<&str> = instance.iter().map(|&r| rank(r)).collect();
                    let members: Vec<&str> = body.iter().map(|c| c.einsum.as_str()).collect();
                    format!(
                        "{}: the {}recurrence over {} ({steps} steps) in one CTA per point of ({}) ({grid}): no member reads another point of them; a barrier after every member",
                        members.join(", "),
                        if *reverse { "reverse " } else { "" },
                        rank(*step),
                        inst.join(", ")
                    )
                }
                PointKernel::Copy { to, .. } => format!(
                    "store {}: later Einsums read it, so it was computed in scratch",
                    p.slots[*to].name
                ),
            };
            let _ = writeln!(out, "  {line}");
        }
        let _ = writeln!(
            out,
            "why: every Einsum's points are independent, so a thread computes each whole point as the interpreter does (reductions in the thread, masks at their loop level, absent points marked); intermediates cross kernels through f32 scratch"
        );
        let _ = writeln!(
            out,
            "analysis: {:.3e} FLOPs, {:.3e} bytes at least, roofline {:.3e} ms",
            self.flops, self.bytes, self.bound_ms
        );
        out
    }

    fn formula(&self, inputs: &Inputs) -> (Vec<f64>, &'static str) {
        // No faster formula than the cascade itself.
        interpreter_formula(self, inputs)
    }

    fn interpreter_work(&self) -> u64 {
        // Every point of every Einsum, each reduced point once.
        self.flops.min(u64::MAX as f64) as u64
    }

    fn formula_work(&self) -> Option<u64> {
        None
    }

    fn rate(&self) -> Rate {
        Rate::Roofline {
            flops: self.flops,
            bytes: self.bytes,
            bound_ms: self.bound_ms,
        }
    }

    fn passed_over(&mut self, reasons: &[(&'static str, Vec<Diagnostic>)]) {
        self.passed_over = super::reasons_in_words(reasons);
    }

    fn plan_modules(
        &self,
        _plan: &mut Plan,
        _gpu: &GpuModel,
    ) -> Result<super::PlanKernels, String> {
        Err("kernels of the general lowering (it has no sequence-parallel form yet)".into())
    }
}
