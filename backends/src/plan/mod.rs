//! Sequence-parallel plans (docs/sp.md; the format is documented there).
//!
//! - [`format`]: the serde types of `plan.json`;
//! - [`emit`]: lowers the planner's chosen scheme (`einattn_passes::sp`) to a plan;
//! - [`lower`]: assigns a compiled kernel family's modules to the plan's kernel steps;
//! - [`bind`]: what a lowered kernel step binds (sizes, regions, local strides);
//! - [`validate`]: checks a plan and its kernels on the CPU before anything runs them;
//! - [`order`]: the order in which the ranks' steps run (collectives together, sends with
//!   their receives);
//! - [`races`]: whether a plan's streams and events order every conflicting access;
//! - [`stats`]: how the statistics steps of Ring and TokenRing lower (merge launches, a
//!   partial kernel's offset);
//! - [`cpu`]: runs a plan on the CPU with simulated collectives over the reference
//!   interpreter, which is how CI tests SP without GPUs.

pub mod bind;
pub mod cpu;
pub mod emit;
pub mod folder;
pub mod format;
pub mod lower;
pub mod order;
pub mod races;
pub mod stats;
pub mod validate;

pub use cpu::execute_plan;
pub use emit::{emit_plan, PlanError};
pub use format::*;

use einattn_ir::Cascade;
use einattn_passes::sp::{self, SpDecision, SpOptions};
use std::path::{Path, PathBuf};

/// Plans `cascade` for `options.devices` devices and emits the chosen scheme's plan.
pub fn plan_cascade(
    cascade: &Cascade,
    options: &SpOptions,
) -> Result<(SpDecision, Plan), PlanError> {
    let decision = sp::plan_sequence_parallel(cascade, options)?;
    let plan = emit_plan(cascade, &decision)?;
    Ok((decision, plan))
}

/// `einattn compile FILE --sp P -o DIR`: plans, emits and writes `DIR/plan.json`
/// (creating `DIR`); returns the decision (for the comparison table) and the path.
pub fn write_plan(
    cascade: &Cascade,
    options: &SpOptions,
    dir: &Path,
) -> Result<(SpDecision, PathBuf), PlanError> {
    let (decision, plan) = plan_cascade(cascade, options)?;
    let io = |e: std::io::Error| PlanError::Io(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    let path = dir.join("plan.json");
    std::fs::write(&path, plan.to_json() + "\n").map_err(io)?;
    Ok((decision, path))
}
