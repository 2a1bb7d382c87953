//! einattn backends.
//!
//! * [`tile`]: the Tile IR (a structured per-CTA program over shared-memory and register
//!   tiles), its CPU interpreter, and the attention program builder.
//! * [`ptx`]: the PTX printer (`sm_80` instructions: `mma.sync`, `ldmatrix`, `cp.async`;
//!   the same text assembles for `sm_90a`), plus a `ptxas` driver for validation.
//! * [`schedule`]: reads a cascade as softmax attention (any pass structure) and picks the
//!   kernel shape by a cost model; [`compile`] runs the whole pipeline to PTX.
//! * [`reference`]: naive f64 attention used by tests and GPU checks.
//!
//! See `backends/README.md` for the Tile IR, the fragment layouts and what each lowering
//! assumes.

pub mod compile;
pub mod plan;
pub mod ptx;
pub mod reference;
pub mod schedule;
pub mod tile;

pub use ptx::{print_ptx, PtxKernel, Target};
pub use tile::attention::{flash_attention, AttentionSchedule, AttentionSpec};
pub use tile::{TileError, TileProgram};
