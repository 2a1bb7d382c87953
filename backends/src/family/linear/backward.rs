//! The backward of linear attention as forward kernels with other operands.
//!
//! With `O_i = sum_{j <= i} decay(i - j) (q_i . k_j) v_j` (causal; `decay` 1 or
//! `lam^(i - j)`, `lam = exp(-s[h])`) and the output's gradient `dO`:
//!
//! | gradient | sum | kernel |
//! | --- | --- | --- |
//! | `dQ_i = sum_{j <= i} decay(i - j) (dO_i . v_j) k_j` | causal | the forward's program with `q, k, v = dO, V, K` |
//! | `dK_j = sum_{i >= j} decay(i - j) (v_j . dO_i) q_i` | anti-causal | [`lightning_reverse`] with `q, k, v = V, dO, Q` |
//! | `dV_j = sum_{i >= j} decay(i - j) (k_j . q_i) dO_i` | anti-causal | [`lightning_reverse`] with `q, k, v = K, Q, dO` |
//!
//! The dQ kernel is the forward's (chunked, single pass or look-back, as the forward's cost
//! model chose), carrying `S_t = sum decayed v^T k`; the dK and dV kernels walk the tiles
//! from the last to the first carrying `R_t = sum over later tokens of decayed dO^T q`
//! (`q^T dO` for dV): fla's `chunk_lightning_attn` backward, with its two reverse
//! products in two kernels so each keeps one `d x e` state and one output accumulator in
//! registers (the forward's register budget). Without the causal bound (`O = Q (K^T V)`)
//! all three are the non-causal forward. The operands need `d = e` (the forward's
//! kernels take only that).

use super::program::{lightning_part, lightning_reverse, LinearSchedule, LinearSpec, Part};
use crate::tile::{TileError, TileProgram};

/// Which gradient a program computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gradient {
    Dq,
    Dk,
    Dv,
}

impl Gradient {
    pub fn name(self) -> &'static str {
        match self {
            Gradient::Dq => "dq",
            Gradient::Dk => "dk",
            Gradient::Dv => "dv",
        }
    }
}

/// The forward operands a backward program reads as its `q`, `k`, `v` and writes as its
/// `o`, by role in the forward (`DO` the output's gradient).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operand {
    Q,
    K,
    V,
    DO,
    DQ,
    DK,
    DV,
}

/// `q, k, v, o` of the program computing `g`.
pub fn operands(g: Gradient) -> [Operand; 4] {
    match g {
        Gradient::Dq => [Operand::DO, Operand::V, Operand::K, Operand::DQ],
        Gradient::Dk => [Operand::V, Operand::DO, Operand::Q, Operand::DK],
        Gradient::Dv => [Operand::K, Operand::Q, Operand::DO, Operand::DV],
    }
}

/// The programs of the backward, in launch order, each with the gradient it writes: the
/// dQ kernels (the forward strategy's parts: a chunked dQ is a state kernel then an output
/// kernel), then dK and dV.
pub fn backward_programs(
    spec: &LinearSpec,
    sched: &LinearSchedule,
    dq_parts: &[Part],
) -> Result<Vec<(Gradient, TileProgram)>, TileError> {
    if spec.head_dim != spec.value_dim {
        return Err(TileError::Unsupported(format!(
            "the backward exchanges keys and values: d = e (got d = {}, e = {})",
            spec.head_dim, spec.value_dim
        )));
    }
    let renamed = |g: Gradient, mut p: TileProgram| {
        // The forward's name with `bwd_<gradient>` after the family prefix, so that a run
        // of the forward and the backward loads distinct entries.
        p.name = match p.name.strip_prefix("einattn_linear") {
            Some(rest) => format!("einattn_linear_bwd_{}{rest}", g.name()),
            None => format!("{}_bwd_{}", p.name, g.name()),
        };
        (g, p)
    };
    let mut out = Vec::new();
    for &part in dq_parts {
        out.push(renamed(Gradient::Dq, lightning_part(spec, sched, part)?.0));
    }
    for g in [Gradient::Dk, Gradient::Dv] {
        let (program, _) = if spec.causal {
            lightning_reverse(spec, sched)?
        } else {
            lightning_part(spec, sched, Part::Whole)?
        };
        out.push(renamed(g, program));
    }
    Ok(out)
}
