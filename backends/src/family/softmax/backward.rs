//! The backward of softmax attention as two tile programs, FlashAttention's backward with
//! dQ and dK/dV computed by separate kernels (so no atomics and no f32 dQ accumulator):
//!
//! | kernel | CTA rows | loop | computes |
//! | --- | --- | --- | --- |
//! | [`dq_program`] | a query tile | key tiles | `lse`, `delta = rowsum(dO * O)` (stored for the next kernel), `P`, `dP = dO V^T`, `dS`, `dQ = dS K` |
//! | [`dkdv_program`] | a key tile | query tiles | `P^T`, `dV = P^T dO`, `dP^T = V dO^T`, `dS^T`, `dK = dS^T Q` |
//!
//! with `P = exp(s - lse)` recomputed from the saved log-sum-exp and
//! `dS = P * (dP - delta) * ds/d(q.k)`, the derivative of the score chain (a scale, or a
//! soft-cap's `1 - tanh^2`) taken symbolically by [`score_derivative`]. The key-tiled
//! kernel is the forward's program with the roles of the two sequence ranks exchanged:
//! its rows are keys, its loop walks query tiles, masks are mirrored and the per-query
//! `lse` and `delta` are read as column tokens.
//!
//! The log-sum-exp comes from what the forward saved, its running max `M` and sum `L` at
//! the last step (`lse = M + ln L`, read as row tokens by the query-tiled kernel), or from
//! a forward kernel run again with its log-sum-exp output ([`Statistics`]).

use super::program::{simplify, AttentionSpec, LOG2_E};
use crate::tile::ex::*;
use crate::tile::*;

/// Tile shapes of the two backward kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackwardSchedule {
    pub block_m: u32,
    pub block_n: u32,
    pub warps: u32,
    pub stages: u32,
    pub mma: MmaUnit,
}

impl BackwardSchedule {
    /// 64-row tiles over 4 warps (one warpgroup). On sm_90a the contractions are `wgmma`
    /// with shared-memory B operands, which leaves room for 64-wide loop tiles at d = 128;
    /// with `mma.sync` the key-tiled kernel holds dK and dV accumulators (2 x d/2
    /// registers per thread) plus B fragments, so its loop tile shrinks to 32 at d = 128
    /// (past 64 in either the head or the value dim). With wgmma too when dK and dV together
    /// are wider than 256 columns (192 / 128: 160 accumulator registers a thread).
    /// Measured on an H200 (bench/results/grad_2026-12-03): wgmma with 64-wide loop tiles
    /// was the fastest of six shapes at N = 4096 and 16384, causal or not.
    /// A score chain whose slope varies per element (a soft-cap) keeps the raw scores and
    /// the probabilities in separate tiles: 32-wide loop tiles at d = 128 there too.
    pub fn default_for(spec: &AttentionSpec, target: crate::Target) -> BackwardSchedule {
        let hopper = target == crate::Target::Sm90a;
        let uniform_slope = score_derivative(&spec.score.expr).is_ok_and(|s| s.is_uniform());
        BackwardSchedule {
            block_m: 64,
            block_n: if spec.head_dim.max(spec.value_dim) <= 64
                || (hopper && uniform_slope && spec.head_dim + spec.value_dim <= 256)
            {
                64
            } else {
                32
            },
            warps: 4,
            stages: 2,
            mma: if hopper {
                MmaUnit::Warpgroup
            } else {
                MmaUnit::Sync
            },
        }
    }
}

/// Where the query-tiled kernel finds each row's log-sum-exp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Statistics {
    /// The forward's final running max and sum (tokens `row_max`, `row_sum`): it computes
    /// `lse = M + ln L` and stores it for the key-tiled kernel.
    MaxAndSum,
    /// The log-sum-exp itself (token `lse`, already where the key-tiled kernel reads it).
    LogSumExp,
}

/// `d score / d dot` of a score chain ([`super::program::Score::expr`], with
/// `Elem(DOT)` for the dot product), as an expression of the same leaves.
pub fn score_derivative(e: &ScalarExpr) -> Result<ScalarExpr, TileError> {
    use super::program::DOT;
    let d = |x: &ScalarExpr| score_derivative(x);
    Ok(match e {
        ScalarExpr::Elem(DOT) => lit(1.0),
        ScalarExpr::Lit(_)
        | ScalarExpr::Scalar(_)
        | ScalarExpr::Head(_)
        | ScalarExpr::Index(_)
        | ScalarExpr::Token(..) => lit(0.0),
        ScalarExpr::Unary(op, a) => {
            let inner = d(a)?;
            let outer = match op {
                UnaryOp::Neg => lit(-1.0),
                UnaryOp::Exp => un(UnaryOp::Exp, (**a).clone()),
                UnaryOp::Exp2 => mul(lit(std::f64::consts::LN_2), exp2((**a).clone())),
                UnaryOp::Log => recip((**a).clone()),
                UnaryOp::Log2 => recip(mul(lit(std::f64::consts::LN_2), (**a).clone())),
                UnaryOp::Sqrt => recip(mul(lit(2.0), un(UnaryOp::Sqrt, (**a).clone()))),
                UnaryOp::Tanh => {
                    let t = tanh((**a).clone());
                    sub(lit(1.0), mul(t.clone(), t))
                }
                UnaryOp::Recip => {
                    let r = recip((**a).clone());
                    un(UnaryOp::Neg, mul(r.clone(), r))
                }
            };
            product(outer, inner)
        }
        ScalarExpr::Binary(op, a, b) => {
            let (da, db) = (d(a)?, d(b)?);
            let (a, b) = ((**a).clone(), (**b).clone());
            match op {
                BinaryOp::Add => sum(da, db),
                BinaryOp::Sub => sum(da, product(lit(-1.0), db)),
                BinaryOp::Mul => sum(product(da, b), product(a, db)),
                BinaryOp::Div => {
                    // (a' b - a b') / b^2
                    let num = sum(product(da, b.clone()), product(lit(-1.0), product(a, db)));
                    product(num, recip(mul(b.clone(), b)))
                }
                BinaryOp::Max | BinaryOp::Min => {
                    return Err(TileError::Unsupported(
                        "the derivative of a max or min in the score chain".into(),
                    ))
                }
            }
        }
        ScalarExpr::Select {
            op,
            lhs,
            rhs,
            then,
            otherwise,
        } => select(
            *op,
            (**lhs).clone(),
            (**rhs).clone(),
            d(then)?,
            d(otherwise)?,
        ),
        ScalarExpr::Elem(_) | ScalarExpr::Row(_) => {
            return Err(TileError::Unsupported(
                "a score chain reads only the dot product".into(),
            ))
        }
    })
}

/// `a * b` with the zeros and ones of a derivative folded away.
fn product(a: ScalarExpr, b: ScalarExpr) -> ScalarExpr {
    match (&a, &b) {
        (ScalarExpr::Lit(x), _) if *x == 0.0 => lit(0.0),
        (_, ScalarExpr::Lit(y)) if *y == 0.0 => lit(0.0),
        (ScalarExpr::Lit(x), _) if *x == 1.0 => b,
        (_, ScalarExpr::Lit(y)) if *y == 1.0 => a,
        _ => mul(a, b),
    }
}

/// `a + b` with zeros folded away.
fn sum(a: ScalarExpr, b: ScalarExpr) -> ScalarExpr {
    match (&a, &b) {
        (ScalarExpr::Lit(x), _) if *x == 0.0 => b,
        (_, ScalarExpr::Lit(y)) if *y == 0.0 => a,
        _ => add(a, b),
    }
}

/// Replaces the dot product of a score chain with tile `s`, and, when `mirrored`, reads the
/// query position as the column index and the key position as the row index (the
/// key-tiled kernel, whose rows are keys).
fn at_tile(e: &ScalarExpr, s: RegId, mirrored: bool) -> ScalarExpr {
    use super::program::DOT;
    match e {
        ScalarExpr::Elem(DOT) => elem(s),
        ScalarExpr::Index(r) if mirrored => index(match r {
            SeqRank::Query => SeqRank::Key,
            SeqRank::Key => SeqRank::Query,
        }),
        other => other.map_children(&mut |x| at_tile(x, s, mirrored)),
    }
}

/// A band mask seen from the key-tiled kernel, whose rows are keys and columns queries.
fn mirrored(m: BandMask) -> BandMask {
    BandMask {
        direction: match m.direction {
            BandDirection::KeyMinusQuery => BandDirection::QueryMinusKey,
            BandDirection::QueryMinusKey => BandDirection::KeyMinusQuery,
        },
        bound: m.bound,
    }
}

/// `lse` with a row that saw no key (`-inf`) read as 0, so `exp(-inf - lse)` stays 0
/// instead of NaN.
fn finite(lse: ScalarExpr) -> ScalarExpr {
    select(
        CmpOp::Eq,
        lse.clone(),
        lit(f64::NEG_INFINITY),
        lit(0.0),
        lse,
    )
}

/// The tensors, tokens and row outputs of the backward programs, in ABI order.
pub mod names {
    pub const Q: &str = "q";
    pub const K: &str = "k";
    pub const V: &str = "v";
    pub const O: &str = "o";
    pub const DO: &str = "do";
    pub const DQ: &str = "dq";
    pub const DK: &str = "dk";
    pub const DV: &str = "dv";
    /// The forward's running max and sum at the last step (query-tiled kernel tokens).
    pub const MAX: &str = "row_max";
    pub const SUM: &str = "row_sum";
    /// Per query row, written by the query-tiled kernel, read by the key-tiled one.
    pub const LSE: &str = "lse";
    pub const DELTA: &str = "delta";
}

struct Builder {
    p: TileProgram,
    elem: Elem,
}

impl Builder {
    fn new(name: String, spec: &AttentionSpec, sched: &BackwardSchedule) -> Builder {
        let mut p = TileProgram::new(
            name,
            TileSchedule {
                block_m: sched.block_m,
                warps: sched.warps,
                stages: sched.stages,
                skip_unit_rescale: false,
                persistent: None,
                store_tma: false,
                pin_deferred_wait: false,
                mma: sched.mma,
                loads: crate::tile::Loads::Cooperative,
            },
        );
        spec.declare_params(&mut p);
        Builder { p, elem: spec.elem }
    }
    /// A tensor `width` columns wide: the head dim (Q, K and their gradients) or the value
    /// dim (V, O, dO, dV).
    fn tensor(&mut self, name: &str, rows: SeqRank, is_output: bool, width: u32) -> TensorId {
        self.p.tensors.push(TensorParam {
            name: name.into(),
            elem: self.elem,
            rows,
            head_dim: width,
            is_output,
        });
        TensorId(self.p.tensors.len() as u32 - 1)
    }
    fn token(&mut self, name: &str) -> TokenId {
        self.p.tokens.push(TokenParam {
            name: name.into(),
            extent: None,
        });
        TokenId(self.p.tokens.len() as u32 - 1)
    }
    fn shared(&mut self, name: &str, rows: u32, rank: SeqRank, width: u32) -> SharedId {
        self.p.shared.push(SharedTile {
            name: name.into(),
            rows,
            cols: width,
            elem: self.elem,
            rank,
        });
        SharedId(self.p.shared.len() as u32 - 1)
    }
    fn reg(&mut self, name: &str, cols: u32, col_rank: ColRank, kind: RegKind) -> RegId {
        self.p.regs.push(RegTile {
            name: name.into(),
            cols,
            col_rank,
            kind,
        });
        RegId(self.p.regs.len() as u32 - 1)
    }
    fn row(&mut self, name: &str) -> RowId {
        self.p.rows.push(RowVec { name: name.into() });
        RowId(self.p.rows.len() as u32 - 1)
    }
    fn finish(mut self, body: Vec<Stmt>) -> Result<TileProgram, TileError> {
        self.p.body = body;
        self.p.validate()?;
        Ok(self.p)
    }
}

/// `einattn_bwd_<part>` and the forward kernel's name without its prefix; `_wg` when the
/// contractions are warpgroup MMAs.
fn kernel_name(part: &str, spec: &AttentionSpec, sched: &BackwardSchedule) -> String {
    let forward = spec.kernel_name();
    let shape = forward.strip_prefix("einattn_fwd").unwrap_or(&forward);
    let unit = if sched.mma == MmaUnit::Warpgroup {
        "_wg"
    } else {
        ""
    };
    format!("einattn_bwd_{part}{shape}{unit}")
}

fn check_spec(spec: &AttentionSpec, sched: &BackwardSchedule) -> Result<(), TileError> {
    if spec.elem == Elem::F32 {
        return Err(TileError::Unsupported("16-bit inputs only".into()));
    }
    for dim in [spec.head_dim, spec.value_dim] {
        if dim == 0 || !dim.is_multiple_of(64) {
            return Err(TileError::Unsupported(
                "the backward kernels take head dims that are multiples of 64".into(),
            ));
        }
    }
    if spec.query_offset || spec.write_lse {
        return Err(TileError::Unsupported(
            "the backward kernels run on the whole sequence".into(),
        ));
    }
    if sched.block_m != 16 * sched.warps {
        return Err(TileError::Unsupported(
            "the backward kernels give each warp 16 rows".into(),
        ));
    }
    Ok(())
}

/// The per-element `dS` of a score tile `s` (raw dot products) given `P` in `p` and
/// `dP` in `dp`, in place in `dp`: `P * (dP - delta) * ds/d(q.k)`.
fn ds_map(
    spec: &AttentionSpec,
    s: RegId,
    p: RegId,
    dp: RegId,
    delta: ScalarExpr,
    mirror: bool,
) -> Result<Stmt, TileError> {
    let slope = at_tile(&score_derivative(&spec.score.expr)?, s, mirror);
    Ok(Stmt::Map {
        dst: dp,
        expr: simplify(&product(mul(elem(p), sub(elem(dp), delta)), slope)),
    })
}

/// `P = exp(score(s) - lse)` in place in `dst` (from raw dot products in `s`), masked.
fn probabilities(
    spec: &AttentionSpec,
    s: RegId,
    dst: RegId,
    lse: ScalarExpr,
    mirror: bool,
) -> Vec<Stmt> {
    let logit = at_tile(&spec.score.expr, s, mirror);
    vec![
        Stmt::Map {
            dst,
            expr: simplify(&mul(logit, lit(LOG2_E))),
        },
        Stmt::Mask {
            dst,
            fill: f64::NEG_INFINITY,
        },
        Stmt::Map {
            dst,
            expr: exp2(sub(elem(dst), mul(finite(lse), lit(LOG2_E)))),
        },
    ]
}

/// The query-tiled kernel: per query tile, `lse` and `delta` (stored as row outputs for
/// [`dkdv_program`]), then over key tiles `dQ += dS K`.
pub fn dq_program(
    spec: &AttentionSpec,
    sched: &BackwardSchedule,
    stats: Statistics,
) -> Result<TileProgram, TileError> {
    check_spec(spec, sched)?;
    let name = kernel_name("dq", spec, sched);
    let mut b = Builder::new(name, spec, sched);
    let (d, dv) = (spec.head_dim, spec.value_dim);
    let q = b.tensor(names::Q, SeqRank::Query, false, d);
    let k = b.tensor(names::K, SeqRank::Key, false, d);
    let v = b.tensor(names::V, SeqRank::Key, false, dv);
    let o = b.tensor(names::O, SeqRank::Query, false, dv);
    let d_o = b.tensor(names::DO, SeqRank::Query, false, dv);
    let dq = b.tensor(names::DQ, SeqRank::Query, true, d);
    let tokens: Vec<TokenId> = match stats {
        Statistics::MaxAndSum => vec![b.token(names::MAX), b.token(names::SUM)],
        Statistics::LogSumExp => vec![b.token(names::LSE)],
    };
    if stats == Statistics::MaxAndSum {
        b.p.row_outputs.push(RowOutput {
            name: names::LSE.into(),
        });
    }
    b.p.row_outputs.push(RowOutput {
        name: names::DELTA.into(),
    });
    let delta_out = RowOutputId(b.p.row_outputs.len() as u32 - 1);
    let (bm, bn) = (sched.block_m, sched.block_n);
    let q_s = b.shared("q_s", bm, SeqRank::Query, d);
    let o_s = b.shared("o_s", bm, SeqRank::Query, dv);
    let do_s = b.shared("do_s", bm, SeqRank::Query, dv);
    let k_s = b.shared("k_s", bn, SeqRank::Key, d);
    let v_s = b.shared("v_s", bn, SeqRank::Key, dv);
    let a16 = RegKind::AOperand(spec.elem);
    let o_frag = b.reg("o_frag", dv, ColRank::HeadDim, a16);
    let do_frag = b.reg("do_frag", dv, ColRank::HeadDim, a16);
    let s = b.reg("s", bn, ColRank::Key, RegKind::Accumulator);
    let pr = b.reg("p", bn, ColRank::Key, RegKind::Accumulator);
    let dp = b.reg("dp", bn, ColRank::Key, RegKind::Accumulator);
    let ds = b.reg("ds", bn, ColRank::Key, a16);
    let acc = b.reg("dq_acc", d, ColRank::HeadDim, RegKind::Accumulator);
    let lse = b.row("lse");
    let delta = b.row("delta");
    let mut body = vec![
        Stmt::LoadTile { dst: q_s, src: q },
        Stmt::LoadTile { dst: o_s, src: o },
        Stmt::LoadTile {
            dst: do_s,
            src: d_o,
        },
        Stmt::Fragments {
            dst: o_frag,
            src: o_s,
        },
        Stmt::Fragments {
            dst: do_frag,
            src: do_s,
        },
        Stmt::RowDot {
            dst: delta,
            a: o_frag,
            b: do_frag,
        },
        Stmt::RowMap {
            dst: lse,
            expr: match stats {
                Statistics::MaxAndSum => add(
                    ScalarExpr::Token(tokens[0], TokenAt::Row),
                    un(UnaryOp::Log, ScalarExpr::Token(tokens[1], TokenAt::Row)),
                ),
                Statistics::LogSumExp => ScalarExpr::Token(tokens[0], TokenAt::Row),
            },
        },
        Stmt::StoreRow {
            src: delta,
            dst: delta_out,
        },
        Stmt::Fill {
            dst: acc,
            value: 0.0,
        },
    ];
    if stats == Statistics::MaxAndSum {
        body.push(Stmt::StoreRow {
            src: lse,
            dst: RowOutputId(0),
        });
    }
    let mut lp = vec![
        Stmt::LoadTile { dst: k_s, src: k },
        Stmt::LoadTile { dst: v_s, src: v },
        Stmt::Fill { dst: s, value: 0.0 },
        Stmt::Contract {
            acc: s,
            a: AOperand::Shared(q_s),
            b: k_s,
            b_layout: BLayout::RowsAreN,
        },
    ];
    lp.extend(probabilities(spec, s, pr, row(lse), false));
    lp.push(Stmt::Fill {
        dst: dp,
        value: 0.0,
    });
    lp.push(Stmt::Contract {
        acc: dp,
        a: AOperand::Reg(do_frag),
        b: v_s,
        b_layout: BLayout::RowsAreN,
    });
    lp.push(ds_map(spec, s, pr, dp, row(delta), false)?);
    lp.push(Stmt::Convert { dst: ds, src: dp });
    lp.push(Stmt::Contract {
        acc,
        a: AOperand::Reg(ds),
        b: k_s,
        b_layout: BLayout::RowsAreK,
    });
    body.push(Stmt::KeyLoop {
        block_n: bn,
        masks: spec.masks(),
        body: lp,
    });
    body.push(Stmt::Store { src: acc, dst: dq });
    b.finish(body)
}

/// The key-tiled kernel: per key tile, over the query tiles that see it,
/// `dV += P^T dO` and `dK += dS^T Q`. Its "query" rank (rows) is the key rank of the
/// attention and its loop walks queries; `lse` and `delta` are column tokens.
pub fn dkdv_program(
    spec: &AttentionSpec,
    sched: &BackwardSchedule,
) -> Result<TileProgram, TileError> {
    check_spec(spec, sched)?;
    let name = kernel_name("dkdv", spec, sched);
    let mut b = Builder::new(name, spec, sched);
    // Rows along the program's query rank are the attention's keys, and vice versa.
    let (d, dv_dim) = (spec.head_dim, spec.value_dim);
    let k = b.tensor(names::K, SeqRank::Query, false, d);
    let v = b.tensor(names::V, SeqRank::Query, false, dv_dim);
    let q = b.tensor(names::Q, SeqRank::Key, false, d);
    let d_o = b.tensor(names::DO, SeqRank::Key, false, dv_dim);
    let dk = b.tensor(names::DK, SeqRank::Query, true, d);
    let dv = b.tensor(names::DV, SeqRank::Query, true, dv_dim);
    let lse = b.token(names::LSE);
    let delta = b.token(names::DELTA);
    let (bm, bn) = (sched.block_m, sched.block_n);
    let k_s = b.shared("k_s", bm, SeqRank::Query, d);
    let v_s = b.shared("v_s", bm, SeqRank::Query, dv_dim);
    let q_s = b.shared("q_s", bn, SeqRank::Key, d);
    let do_s = b.shared("do_s", bn, SeqRank::Key, dv_dim);
    let a16 = RegKind::AOperand(spec.elem);
    let s = b.reg("st", bn, ColRank::Key, RegKind::Accumulator);
    let pr = b.reg("pt", bn, ColRank::Key, RegKind::Accumulator);
    let dp = b.reg("dpt", bn, ColRank::Key, RegKind::Accumulator);
    let p16 = b.reg("pt16", bn, ColRank::Key, a16);
    let dk_acc = b.reg("dk_acc", d, ColRank::HeadDim, RegKind::Accumulator);
    let dv_acc = b.reg("dv_acc", dv_dim, ColRank::HeadDim, RegKind::Accumulator);
    let mut body = vec![
        Stmt::LoadTile { dst: k_s, src: k },
        Stmt::LoadTile { dst: v_s, src: v },
        Stmt::Fill {
            dst: dk_acc,
            value: 0.0,
        },
        Stmt::Fill {
            dst: dv_acc,
            value: 0.0,
        },
    ];
    let mut lp = vec![
        Stmt::LoadTile { dst: q_s, src: q },
        Stmt::LoadTile {
            dst: do_s,
            src: d_o,
        },
        Stmt::Fill { dst: s, value: 0.0 },
        Stmt::Contract {
            acc: s,
            a: AOperand::Shared(k_s),
            b: q_s,
            b_layout: BLayout::RowsAreN,
        },
    ];
    lp.extend(probabilities(
        spec,
        s,
        pr,
        ScalarExpr::Token(lse, TokenAt::Col),
        true,
    ));
    lp.push(Stmt::Convert { dst: p16, src: pr });
    lp.push(Stmt::Contract {
        acc: dv_acc,
        a: AOperand::Reg(p16),
        b: do_s,
        b_layout: BLayout::RowsAreK,
    });
    lp.push(Stmt::Fill {
        dst: dp,
        value: 0.0,
    });
    lp.push(Stmt::Contract {
        acc: dp,
        a: AOperand::Shared(v_s),
        b: do_s,
        b_layout: BLayout::RowsAreN,
    });
    lp.push(ds_map(
        spec,
        s,
        pr,
        dp,
        ScalarExpr::Token(delta, TokenAt::Col),
        true,
    )?);
    lp.push(Stmt::Convert { dst: p16, src: dp });
    lp.push(Stmt::Contract {
        acc: dk_acc,
        a: AOperand::Reg(p16),
        b: q_s,
        b_layout: BLayout::RowsAreK,
    });
    body.push(Stmt::KeyLoop {
        block_n: bn,
        masks: spec.masks().into_iter().map(mirrored).collect(),
        body: lp,
    });
    body.push(Stmt::Store {
        src: dk_acc,
        dst: dk,
    });
    body.push(Stmt::Store {
        src: dv_acc,
        dst: dv,
    });
    b.finish(body)
}
