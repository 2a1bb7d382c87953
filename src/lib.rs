//! einattn: compile attention algorithms written as extended Einsum cascades.
//!
//! The library half of the CLI: loading `.ein` files with diagnostics, and the commands'
//! implementations, so that tests and build scripts call exactly what the CLI calls.

pub mod cli;

pub use einattn_dsl as dsl;
pub use einattn_ir as ir;
pub use einattn_passes as passes;
