//! einattn's Cascade IR: the bound program of extended Einsums that every later stage
//! (analysis, rewrites, scheduling, code generation) reads, plus its validator, its
//! printer and the f64 reference interpreter that is the ground truth for every test.

pub mod arena;
pub mod cascade;
pub mod interp;
pub mod print;
pub mod validate;

pub use arena::{Arena, Handle};
pub use cascade::*;
