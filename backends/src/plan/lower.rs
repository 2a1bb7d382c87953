//! A plan with the kernels it launches: each kernel step gets the modules of the compiled
//! family that compute it (its `launch`), and the plan's manifest collects them with the
//! element-wise helpers. This is what `compile --sp P -o DIR` writes next to `plan.json`
//! and what `run-plan DIR` runs, without compiling anything again.

use super::{Plan, Step};
use crate::abi::{KernelSet, Manifest, MANIFEST_FORMAT};
use crate::family::{elementwise, Compiled};
use crate::plan::validate::validate;
use einattn_passes::analysis::GpuModel;
use std::collections::BTreeMap;

/// A plan whose kernel steps name their kernels, and those kernels.
#[derive(Debug, Clone)]
pub struct LoweredPlan {
    pub plan: Plan,
    pub kernels: KernelSet,
}

/// Why a plan cannot run on GPUs: the scheme needs steps that have no GPU lowering.
fn unsupported(plan: &Plan, what: &str) -> String {
    use einattn_passes::sp::schemes::{GpuSupport, SchemeKind};
    let runs: Vec<&str> = [
        ("lasp2", SchemeKind::Lasp2),
        ("lasp1", SchemeKind::Lasp1),
        ("allgather_kv[_zigzag]", SchemeKind::AllGatherKv),
        ("ring[_zigzag]", SchemeKind::Ring),
        ("tokenring[_zigzag]", SchemeKind::TokenRing),
        ("ulysses", SchemeKind::Ulysses),
    ]
    .into_iter()
    .filter(|(_, k)| k.gpu_support() != GpuSupport::None)
    .map(|(n, _)| n)
    .collect();
    format!(
        "plan: scheme `{}` needs {what}, which the GPU executor does not lower yet \
         (it runs {}; choose one with --scheme)",
        plan.scheme,
        match runs.as_slice() {
            [] => "none".to_string(),
            [one] => one.to_string(),
            [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
        }
    )
}

/// Refuses a plan with steps that have no GPU lowering (reductions, statistics merges the
/// merge kernel cannot read, rearranges that keep too many dims apart), saying which
/// scheme needs them.
pub fn check_steps(plan: &Plan) -> Result<(), String> {
    for step in plan.ranks.iter().flat_map(|r| &r.steps) {
        let what = match step {
            Step::Rearrange { shape, perm, .. } => elementwise::plan_rearrange(shape, perm)
                .is_none()
                .then(|| format!("a rearrange of {shape:?} by {perm:?} (too many dims apart)")),
            Step::AllReduce { .. } | Step::ReduceScatter { .. } => Some("reductions".into()),
            Step::LseMerge {
                into, from, stats, ..
            } => super::stats::merge_launches(into, from, stats)
                .err()
                .map(|e| format!("a merge of softmax statistics ({e})")),
            _ => None,
        };
        if let Some(what) = what {
            return Err(unsupported(plan, &what));
        }
    }
    Ok(())
}

/// Assigns `compiled`'s modules to the kernel steps of `plan` (windows chunked for `gpu`)
/// and collects every kernel the plan launches; the result passes [`validate`].
pub fn lower(plan: &Plan, compiled: &dyn Compiled, gpu: &GpuModel) -> Result<LoweredPlan, String> {
    check_steps(plan)?;
    let mut lowered = plan.clone();
    let family = compiled
        .plan_modules(&mut lowered, gpu)
        .map_err(|what| unsupported(plan, &what))?;
    let target = compiled
        .modules()
        .first()
        .map(|m| m.ptx.target)
        .unwrap_or_default();
    let any = |f: fn(&Step) -> bool| plan.ranks.iter().flat_map(|r| &r.steps).any(f);
    let rearrange = any(|s| matches!(s, Step::Rearrange { .. }));
    let merge = any(|s| matches!(s, Step::LseMerge { .. }));
    let mut ptx = BTreeMap::new();
    let mut contracts = Vec::new();
    for m in &family.modules {
        ptx.insert(m.ptx.entry.clone(), m.ptx.text.clone());
        contracts.push(m.contract.clone());
    }
    for (text, contract) in family
        .ptx
        .into_iter()
        .chain(elementwise::helpers(target, rearrange, merge))
    {
        ptx.insert(contract.kernel.clone(), text);
        contracts.push(contract);
    }
    let kernels = KernelSet {
        manifest: Manifest {
            format: MANIFEST_FORMAT.to_string(),
            cascade: compiled.cascade().name.clone(),
            family: compiled.family().to_string(),
            launch: Vec::new(),
            kernels: contracts,
        },
        ptx,
    };
    validate(&lowered, &kernels).map_err(|e| format!("plan: the lowered plan is invalid: {e}"))?;
    Ok(LoweredPlan {
        plan: lowered,
        kernels,
    })
}
