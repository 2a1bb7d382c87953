//! Sequence-parallel plans (design.md section 8; the format is documented in docs/sp.md).
//!
//! - [`format`]: the serde types of `plan.json`;
//! - [`emit`]: lowers the planner's chosen scheme (`einattn_passes::sp`) to a plan;
//! - [`cpu`]: runs a plan on the CPU with simulated collectives over the reference
//!   interpreter, which is how CI tests SP without GPUs.

pub mod cpu;
pub mod emit;
pub mod format;

pub use cpu::execute_plan;
pub use emit::{emit_plan, PlanError};
pub use format::*;

use einattn_ir::Cascade;
use einattn_passes::sp::{self, SpDecision, SpOptions};

/// Plans `cascade` for `options.devices` devices and emits the chosen scheme's plan.
pub fn plan_cascade(
    cascade: &Cascade,
    options: &SpOptions,
) -> Result<(SpDecision, Plan), PlanError> {
    let decision = sp::plan_sequence_parallel(cascade, options)?;
    let plan = emit_plan(cascade, &decision)?;
    Ok((decision, plan))
}
