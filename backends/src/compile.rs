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
    let backend_error = |e: crate::TileError| {
        Diagnostic::error(DiagnosticKind::NotMappable, e.to_string(), Span::UNKNOWN)
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
                let kind = match p.kind {
                    AbiKind::Ptr => "ptr",
                    AbiKind::U32 => "u32",
                    AbiKind::U64 => "u64",
                    AbiKind::F32 => "f32",
                };
                let source = match &p.role {
                    AbiRole::TensorPtr(t) => json!({"tensor": tensor_name(t.index())}),
                    AbiRole::RowOutputPtr(_) => json!({"row_output": p.name}),
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
        json!({
            "cascade": cascade.name,
            "kernel": self.ptx.entry,
            "ptx": ptx_file,
            "target": self.ptx.target.name(),
            "block": [self.ptx.threads, 1, 1],
            "grid_formula": format!("[ceil(n_q / {}), batch * heads, 1]", self.ptx.block_m),
            "grid": self.ptx.grid(m.batch as u32, m.heads as u32, m.n_q as u32),
            "dynamic_shared_bytes": self.ptx.dynamic_smem_bytes,
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
        })
    }
}
