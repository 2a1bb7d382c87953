//! The one-pass tile program of a [`Reading`]: a CTA owns `block_m` rows, walks the column
//! rank in tiles of `block_n`, computes each logit tile with a streamed contraction over
//! the inner rank, and folds it into running row statistics (a running max per max
//! statistic, a rescaled running sum per sum part), as the online softmax does; after the
//! loop the statistics and outputs are row maps of those.
//!
//! When the row tiles alone are too few to fill the GPU, the column loop is split across
//! `splits` CTAs per row tile ([`TileProgram::key_splits`]): each stores its partial
//! statistics (its running maxima and the running sums anchored at them), and a small merge
//! program combines them by log-sum-exp (`S = sum_j S_j exp(M_j - M)`) and evaluates the
//! outputs.

use super::recognize::{Reading, Stat, SumPart, Z_REG};
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
    /// CTAs per row tile, each walking its run of the column tiles (1: one kernel).
    pub splits: u32,
}

/// The partial statistics a split program stores and its merge program reads, in order:
/// each max statistic's running max, then each running sum part.
pub fn partial_names(r: &Reading, stat_names: &[String]) -> Vec<String> {
    let mut v = Vec::new();
    for (k, (_, st)) in r.stats.iter().enumerate() {
        if matches!(st, Stat::Max(_)) {
            v.push(format!("{}_partial_max", stat_names[k]));
        }
    }
    for (k, (_, st)) in r.stats.iter().enumerate() {
        if let Stat::Sum(parts) = st {
            for i in 0..parts.len() {
                v.push(format!("{}_partial_sum{i}", stat_names[k]));
            }
        }
    }
    v
}

/// Builds the program; `outputs` names the row outputs (the cascade's output tensors), in
/// the order of `r.outputs`. With `s.splits > 1` the program is the split pass: its row
/// outputs are [`partial_names`], and [`merge_program`] finishes the statistics.
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
        key_splits: s.splits,
        row_outputs: if s.splits > 1 {
            partial_names(r, stat_names)
        } else {
            outputs.to_vec()
        }
        .into_iter()
        .map(|name| RowOutput { name })
        .collect(),
        ..TileProgram::new(
            name,
            TileSchedule {
                block_m: s.block_m,
                warps: s.warps,
                stages: s.stages,
                skip_unit_rescale: false,
                persistent: None,
                store_tma: false,
                pin_deferred_wait: false,
                mma: s.mma,
                loads: crate::tile::Loads::Cooperative,
            },
        )
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
    // The logits tile is the only register tile: each statistic reduces a map of it
    // without materializing the map (`RowReduceMap`), so a wide tile costs one tile of
    // registers, not two.
    p.regs.push(RegTile {
        name: "z".into(),
        cols: s.block_n,
        col_rank: ColRank::Key,
        kind: RegKind::Accumulator,
    });
    let z = Z_REG;
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
            lp.push(Stmt::RowReduceMap {
                dst: tile,
                op: ReduceOp::Max,
                expr: arg.clone(),
                shape: z,
                mask_fill: Some(f64::NEG_INFINITY),
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
        lp.push(Stmt::RowReduceMap {
            dst: tile,
            op: ReduceOp::Sum,
            expr: term,
            shape: z,
            mask_fill: Some(0.0),
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
    if s.splits > 1 {
        // The partials, in the order of `partial_names`.
        let maxima = r
            .stats
            .iter()
            .enumerate()
            .filter(|(_, (_, st))| matches!(st, Stat::Max(_)))
            .map(|(k, _)| stat(k));
        for (i, src) in maxima.chain(sums.iter().map(|(_, _, id)| *id)).enumerate() {
            body.push(Stmt::StoreRow {
                src,
                dst: RowOutputId(i as u32),
            });
        }
    } else {
        let runs: Vec<_> = sums.iter().map(|(k, part, id)| (*k, part, *id)).collect();
        finish_statistics(&mut body, r, &runs);
    }
    p.body = body;
    p.validate()?;
    Ok(p)
}

/// After the column loop: every statistic that is not a running max, from the running sums
/// `(statistic, part, its row)` and earlier statistics (rows `0..stats`), then the stores
/// of the outputs.
fn finish_statistics(body: &mut Vec<Stmt>, r: &Reading, runs: &[(usize, &SumPart, RowId)]) {
    let stat = |k: usize| RowId(k as u32);
    for (k, (_, st)) in r.stats.iter().enumerate() {
        let expr = match st {
            Stat::Max(_) => continue,
            Stat::Row(e) => e.clone(),
            Stat::Sum(_) => runs
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
}

/// The merge of a split projection: per row, the running maxima of the `splits` partial
/// programs give the row's max `M = max_j M_j`; each running sum is `sum_j S_j exp(M_j - M)`
/// (a split that saw no column, `M_j = -inf`, adds nothing); then the statistics and outputs
/// as the one-kernel program evaluates them. No loop, no tensors: one thread quad per row.
pub fn merge_program(
    r: &Reading,
    splits: u32,
    name: String,
    stat_names: &[String],
    outputs: &[String],
) -> Result<TileProgram, TileError> {
    let partials = partial_names(r, stat_names);
    let mut p = TileProgram {
        row_inputs: partials
            .iter()
            .map(|n| RowInput {
                name: n.clone(),
                splits,
            })
            .collect(),
        row_outputs: outputs
            .iter()
            .map(|n| RowOutput { name: n.clone() })
            .collect(),
        rows: stat_names
            .iter()
            .map(|n| RowVec { name: n.clone() })
            .collect(),
        ..TileProgram::new(
            name,
            TileSchedule {
                block_m: 64,
                warps: 4,
                stages: 2,
                skip_unit_rescale: false,
                persistent: None,
                store_tma: false,
                pin_deferred_wait: false,
                mma: MmaUnit::Sync,
                loads: crate::tile::Loads::Cooperative,
            },
        )
    };
    let stat = |k: usize| RowId(k as u32);
    let new_row = |p: &mut TileProgram, n: String| {
        p.rows.push(RowVec { name: n });
        RowId(p.rows.len() as u32 - 1)
    };
    // Every split's value of every partial, loaded.
    let mut loaded = Vec::new();
    let mut body = Vec::new();
    for (i, n) in partials.iter().enumerate() {
        let mut per_split = Vec::new();
        for j in 0..splits {
            let id = new_row(&mut p, format!("{n}_{j}"));
            body.push(Stmt::LoadRow {
                dst: id,
                src: RowInputId(i as u32),
                split: j,
            });
            per_split.push(id);
        }
        loaded.push(per_split);
    }
    let mut input = loaded.into_iter();
    // The maxima, and each one's anchor (-inf replaced by 0, as in the split programs).
    let mut maxima = std::collections::HashMap::new();
    let mut anchors = std::collections::HashMap::new();
    for (k, (_, st)) in r.stats.iter().enumerate() {
        if matches!(st, Stat::Max(_)) {
            let parts = input.next().unwrap_or_default();
            let expr = parts
                .iter()
                .map(|&id| row(id))
                .reduce(max)
                .unwrap_or(lit(f64::NEG_INFINITY));
            body.push(Stmt::RowMap { dst: stat(k), expr });
            let used = new_row(&mut p, format!("{}_use", stat_names[k]));
            body.push(Stmt::RowMap {
                dst: used,
                expr: select(
                    CmpOp::Eq,
                    row(stat(k)),
                    lit(f64::NEG_INFINITY),
                    lit(0.0),
                    row(stat(k)),
                ),
            });
            maxima.insert(k, parts);
            anchors.insert(k, used);
        }
    }
    let mut runs = Vec::new();
    for (k, (_, st)) in r.stats.iter().enumerate() {
        let Stat::Sum(parts) = st else { continue };
        for (i, part) in parts.iter().enumerate() {
            let values = input.next().unwrap_or_default();
            let terms = values.iter().enumerate().map(|(j, &v)| match &part.anchor {
                Some((m, _)) => {
                    let mj = maxima.get(m).and_then(|ms| ms.get(j)).copied();
                    let used = anchors.get(m).copied();
                    match (mj, used) {
                        // exp(M_j - M) carries split j's sum to the row's anchor; a split
                        // that saw nothing (M_j = -inf) holds 0 and contributes 0.
                        (Some(mj), Some(used)) => select(
                            CmpOp::Eq,
                            row(mj),
                            lit(f64::NEG_INFINITY),
                            lit(0.0),
                            mul(row(v), un(UnaryOp::Exp, sub(row(mj), row(used)))),
                        ),
                        _ => lit(f64::NAN),
                    }
                }
                None => row(v),
            });
            let merged = new_row(&mut p, format!("{}_run{i}", stat_names[k]));
            body.push(Stmt::RowMap {
                dst: merged,
                expr: terms.reduce(add).unwrap_or(lit(0.0)),
            });
            runs.push((k, part, merged));
        }
    }
    finish_statistics(&mut body, r, &runs);
    p.body = body;
    p.validate()?;
    Ok(p)
}
