//! The one-pass tile program of a [`Reading`]: a CTA owns `block_m` rows, walks the column
//! rank in tiles of `block_n`, computes each logit tile with a streamed contraction over
//! the inner rank, and folds it into running row statistics (a running max per max
//! statistic, a rescaled running sum per sum part), as the online softmax does; after the
//! loop the statistics and outputs are row maps of those.

use super::recognize::{Reading, Stat, Z_REG};
use crate::tile::ex::*;
use crate::tile::*;

/// The kernel shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProjectionSchedule {
    pub block_m: u32,
    pub block_n: u32,
    pub warps: u32,
    pub stages: u32,
    /// Columns of the inner rank per streamed slice (one 128-byte swizzle block).
    pub slice: u32,
    pub mma: MmaUnit,
}

/// Builds the program; `outputs` names the row outputs (the cascade's output tensors), in
/// the order of `r.outputs`.
pub fn projection_program(
    r: &Reading,
    elem: Elem,
    s: &ProjectionSchedule,
    name: String,
    stat_names: &[String],
    outputs: &[String],
) -> Result<TileProgram, TileError> {
    let depth =
        u32::try_from(r.depth).map_err(|_| TileError::Unsupported("inner rank too long".into()))?;
    if elem == Elem::F32 {
        return Err(TileError::Unsupported(
            "the projection's inputs must be bf16 or f16".into(),
        ));
    }
    if depth == 0 || !depth.is_multiple_of(s.slice) {
        return Err(TileError::Unsupported(format!(
            "the contracted rank's extent {depth} must be a positive multiple of the {}-column slice (a ragged inner tail is not supported)",
            s.slice
        )));
    }
    let mut p = TileProgram {
        name,
        schedule: TileSchedule {
            block_m: s.block_m,
            warps: s.warps,
            stages: s.stages,
            skip_unit_rescale: false,
            mma: s.mma,
        },
        sequential: false,
        reverse: false,
        col_blocks: 1,
        chunk_tiles: 0,
        states: vec![],
        tokens: vec![],
        query_offset: false,
        look_back: false,
        tensors: vec![],
        row_outputs: outputs
            .iter()
            .map(|n| RowOutput { name: n.clone() })
            .collect(),
        scalars: vec![],
        head_params: vec![],
        shared: vec![],
        regs: vec![],
        rows: vec![],
        body: vec![],
    };
    for (n, rows) in [("a", SeqRank::Query), ("b", SeqRank::Key)] {
        p.tensors.push(TensorParam {
            name: n.into(),
            elem,
            rows,
            head_dim: depth,
            is_output: false,
        });
    }
    let (a, b) = (TensorId(0), TensorId(1));
    for (n, rows, rank) in [
        ("a_s", s.block_m, SeqRank::Query),
        ("b_s", s.block_n, SeqRank::Key),
    ] {
        p.shared.push(SharedTile {
            name: n.into(),
            rows,
            cols: s.slice,
            elem,
            rank,
        });
    }
    let (a_s, b_s) = (SharedId(0), SharedId(1));
    for n in ["z", "t"] {
        p.regs.push(RegTile {
            name: n.into(),
            cols: s.block_n,
            col_rank: ColRank::Key,
            kind: RegKind::Accumulator,
        });
    }
    let (z, t) = (Z_REG, RegId(1));
    // Rows 0..stats: the statistics (a max statistic's row is its running max).
    for n in stat_names {
        p.rows.push(RowVec { name: n.clone() });
    }
    let new_row = |p: &mut TileProgram, n: String| {
        p.rows.push(RowVec { name: n });
        RowId(p.rows.len() as u32 - 1)
    };
    let tile = new_row(&mut p, "tile".into());
    // Per max statistic: the tile's new max, and the same with -inf replaced by 0 (the
    // exponent's anchor: no NaN from -inf - -inf while a row has seen nothing).
    let mut max_rows = std::collections::HashMap::new();
    for (k, (_, st)) in r.stats.iter().enumerate() {
        if matches!(st, Stat::Max(_)) {
            let n = new_row(&mut p, format!("{}_new", stat_names[k]));
            let u = new_row(&mut p, format!("{}_use", stat_names[k]));
            max_rows.insert(k, (n, u));
        }
    }
    let mut sums = Vec::new();
    for (k, (_, st)) in r.stats.iter().enumerate() {
        if let Stat::Sum(parts) = st {
            for (i, part) in parts.iter().enumerate() {
                let id = new_row(&mut p, format!("{}_run{i}", stat_names[k]));
                sums.push((k, part.clone(), id));
            }
        }
    }
    let stat = |k: usize| RowId(k as u32);

    let mut body = Vec::new();
    for (k, (_, st)) in r.stats.iter().enumerate() {
        if matches!(st, Stat::Max(_)) {
            body.push(Stmt::FillRow {
                dst: stat(k),
                value: f64::NEG_INFINITY,
            });
        }
    }
    for (_, _, id) in &sums {
        body.push(Stmt::FillRow {
            dst: *id,
            value: 0.0,
        });
    }
    let mut lp = vec![
        Stmt::Fill { dst: z, value: 0.0 },
        Stmt::ContractStream {
            acc: z,
            a,
            b,
            a_tile: a_s,
            b_tile: b_s,
        },
    ];
    // Columns past the end are masked to the reduction's identity on boundary tiles.
    for (k, (_, st)) in r.stats.iter().enumerate() {
        if let Stat::Max(arg) = st {
            let (n, u) = max_rows[&k];
            lp.push(Stmt::Map {
                dst: t,
                expr: arg.clone(),
            });
            lp.push(Stmt::Mask {
                dst: t,
                fill: f64::NEG_INFINITY,
            });
            lp.push(Stmt::RowReduce {
                dst: tile,
                src: t,
                op: ReduceOp::Max,
            });
            lp.push(Stmt::RowMap {
                dst: n,
                expr: max(row(stat(k)), row(tile)),
            });
            lp.push(Stmt::RowMap {
                dst: u,
                expr: select(CmpOp::Eq, row(n), lit(f64::NEG_INFINITY), lit(0.0), row(n)),
            });
        }
    }
    for (_, part, id) in &sums {
        let (term, rescale) = match &part.anchor {
            Some((m, uexpr)) => {
                let (_, used) = max_rows[m];
                (
                    mul(
                        un(UnaryOp::Exp, sub(uexpr.clone(), row(used))),
                        part.h.clone(),
                    ),
                    // exp(M_old - M_new) carries the sum so far to the new anchor.
                    Some(un(UnaryOp::Exp, sub(row(stat(*m)), row(used)))),
                )
            }
            None => (part.h.clone(), None),
        };
        lp.push(Stmt::Map { dst: t, expr: term });
        lp.push(Stmt::Mask { dst: t, fill: 0.0 });
        lp.push(Stmt::RowReduce {
            dst: tile,
            src: t,
            op: ReduceOp::Sum,
        });
        let carried = match rescale {
            Some(f) => mul(row(*id), f),
            None => row(*id),
        };
        lp.push(Stmt::RowMap {
            dst: *id,
            expr: add(carried, row(tile)),
        });
    }
    for (k, (n, _)) in max_rows
        .iter()
        .map(|(k, v)| (*k, *v))
        .collect::<std::collections::BTreeMap<_, _>>()
    {
        lp.push(Stmt::RowMap {
            dst: stat(k),
            expr: row(n),
        });
    }
    body.push(Stmt::KeyLoop {
        block_n: s.block_n,
        masks: vec![],
        body: lp,
    });
    for (k, (_, st)) in r.stats.iter().enumerate() {
        let expr = match st {
            Stat::Max(_) => continue,
            Stat::Row(e) => e.clone(),
            Stat::Sum(_) => sums
                .iter()
                .filter(|(kk, _, _)| *kk == k)
                .map(|(_, part, id)| mul(part.row.clone(), row(*id)))
                .reduce(add)
                .unwrap_or(lit(0.0)),
        };
        body.push(Stmt::RowMap { dst: stat(k), expr });
    }
    for (i, (_, k)) in r.outputs.iter().enumerate() {
        body.push(Stmt::StoreRow {
            src: stat(*k),
            dst: RowOutputId(i as u32),
        });
    }
    p.body = body;
    p.validate()?;
    Ok(p)
}
