//! The rewrite engine (design.md section 6; docs/rewrites.md).

pub mod algebra;
pub mod ir_util;
pub mod lang;
pub mod tree;
