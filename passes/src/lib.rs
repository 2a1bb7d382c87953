//! einattn's passes over the Cascade IR.
//!
//! - [`analysis`]: the FuseMax-style analysis: passes over each reduced or iterated rank,
//!   live buffers, FLOPs, bytes, a roofline bound and fusion groups (`einattn analyze`).

pub mod analysis;
pub mod grad;
pub mod rewrite;
pub mod sp;
