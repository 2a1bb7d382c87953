//! einattn backends: from a cascade to GPU kernels and sequence-parallel plans.
//!
//! * [`family`]: the kernel families (softmax attention, linear attention, the element-wise
//!   helpers), each reading a cascade as Tile IR programs and launch contracts;
//! * [`tile`]: the Tile IR (a structured per-CTA program over shared-memory and register
//!   tiles), its validator, printer and CPU interpreter;
//! * [`ptx`]: the PTX printer (`sm_80` `mma.sync`, `sm_90a` `wgmma`), plus a `ptxas`
//!   driver for validation;
//! * [`abi`]: the launch contract of a kernel and the one binder of its parameters;
//! * [`plan`]: SP plans: emission per scheme, the kernels a plan launches, a CPU executor;
//! * [`reference`]: direct f64 formulas of the families' computations.
//!
//! See `backends/README.md` for the Tile IR, the fragment layouts and what each lowering
//! assumes, and `docs/architecture.md` for where this crate sits.

pub mod abi;
pub mod family;
pub mod plan;
pub mod ptx;
pub mod reference;
pub mod tile;

pub use family::{compile, CompileError, Compiled, KernelFamily, KernelOptions, Module};
pub use ptx::{print_ptx, PtxKernel, Target};
pub use tile::{TileError, TileProgram};
