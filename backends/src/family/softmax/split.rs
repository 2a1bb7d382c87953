//! Decoding: the key loop split across CTAs, then merged.
//!
//! When the query tiles of every (batch, head) are too few to fill the GPU (one query per
//! head over a long key/value cache), one CTA per query tile would stream the whole cache
//! alone while most SMs idle. The key loop is then split across `splits` CTAs per query
//! tile ([`TileProgram::key_splits`], grid z), the form `optimize` derives as
//! flash-decoding: each CTA runs the partial program over its run of key tiles and stores
//! its running max (natural-log units), its sum of `exp(logit - max)` and its unnormalized
//! f32 numerator, one copy per split; a small merge program combines them by log-sum-exp,
//! `M = max_j M_j`, `w_j = exp(M_j - M)` (0 for a split that saw no key),
//! `O = sum_j w_j num_j / sum_j w_j l_j`, and writes the 16-bit output.

use super::program::{flash_attention, AttentionBindings, AttentionSchedule, AttentionSpec};
use super::{module_of, Schedule};
use crate::abi::{ContractTensor, Dtype, Scratch, Source, Strides, TensorRole};
use crate::family::{
    backend_error, contract, contract_tensor, dtype, tensors_to_scratch, CompileError,
    ContractNames, ContractParts, KernelProgram, Module,
};
use crate::print_ptx;
use crate::tile::ex::*;
use crate::tile::*;
use einattn_ir::cascade::Cascade;
use serde_json::json;

/// The most CTAs one query tile's key loop is split across: the merge unrolls its loads
/// per split.
pub const MAX_SPLITS: u64 = 32;

/// The most splits when the value head dim is over 128: the merge's accumulator then takes
/// 128 registers per thread, and ptxas keeps several splits' numerator loads in flight
/// beside it (ptxas 13.0: 8 splits fit in 255 registers at d = 256 on sm_80 and sm_90a,
/// 16 spill on sm_80).
pub const MAX_SPLITS_WIDE: u64 = 8;

/// Keys each split walks at least: its prologue (the query tile's load, the ring's fill)
/// and its share of the merge (an f32 numerator row written and read back) stay small
/// beside its loop, and short sequences keep their one kernel.
const MIN_KEYS_PER_SPLIT: u64 = 2048;

/// CTAs per query tile: 1 when the (query tile, batch, head) CTAs already fill half the
/// GPU (`resident` CTAs at once: SMs times CTAs per SM); otherwise as many as bring the
/// grid closest to one wave without going past it, each over at least
/// [`MIN_KEYS_PER_SPLIT`] of the `keys` a CTA walks (one query per head, 32 heads, 131072
/// keys, 132 resident CTAs: 4 splits); at most [`MAX_SPLITS`], or [`MAX_SPLITS_WIDE`] for a
/// `value_dim` over 128.
pub fn split_count(ctas: u64, keys: u64, resident: u64, value_dim: u32) -> u32 {
    if ctas == 0 || ctas * 2 > resident {
        return 1;
    }
    let most = if value_dim > 128 {
        MAX_SPLITS_WIDE
    } else {
        MAX_SPLITS
    };
    let splits = (resident / ctas)
        .min(keys / MIN_KEYS_PER_SPLIT)
        .clamp(1, most);
    u32::try_from(splits).unwrap_or(1)
}

/// The split program (the partial program with `splits` CTAs per query tile) and its merge.
pub fn split_attention(
    spec: &AttentionSpec,
    sched: &AttentionSchedule,
    splits: u32,
) -> Result<(TileProgram, TileProgram, AttentionBindings), TileError> {
    if splits == 0 {
        return Err(TileError::Invalid(
            "a split key loop needs at least one split".into(),
        ));
    }
    if spec.write_lse {
        return Err(TileError::Unsupported(
            "a split key loop writes the output only (not the log-sum-exp)".into(),
        ));
    }
    let mut partial = spec.clone();
    partial.partial = true;
    // Each split would count a sink's term: the merge counts it once instead.
    partial.sink = None;
    let (mut main, bind) = flash_attention(&partial, sched)?;
    main.key_splits = splits;
    main.name = format!("{}_split", spec.kernel_name());
    main.validate()?;
    let merge = merge_program(spec, splits, format!("{}_merge", spec.kernel_name()))?;
    Ok((main, merge, bind))
}

/// The merge of `splits` partials: reads the numerator `num` (f32, one copy per split) and
/// the row inputs `max` and `sum`, writes `o` in the spec's element type.
pub fn merge_program(
    spec: &AttentionSpec,
    splits: u32,
    name: String,
) -> Result<TileProgram, TileError> {
    if splits == 0 {
        return Err(TileError::Invalid("a merge of no splits".into()));
    }
    let d = spec.value_dim;
    // One warp per 16 query rows: decoding has few rows, and the merge is light.
    let mut p = TileProgram {
        row_inputs: ["max", "sum"]
            .into_iter()
            .map(|n| RowInput {
                name: n.into(),
                splits,
            })
            .collect(),
        tensors: vec![
            TensorParam {
                name: "num".into(),
                elem: Elem::F32,
                rows: SeqRank::Query,
                head_dim: d,
                is_output: false,
            },
            TensorParam {
                name: "o".into(),
                elem: spec.elem,
                rows: SeqRank::Query,
                head_dim: d,
                is_output: true,
            },
        ],
        regs: vec![RegTile {
            name: "acc".into(),
            cols: d,
            col_rank: ColRank::HeadDim,
            kind: RegKind::Accumulator,
        }],
        ..TileProgram::new(
            name,
            TileSchedule {
                block_m: 16,
                warps: 1,
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
    if spec.sink.is_some() {
        // The sink logit is an expression of the score's parameters (and, in packed
        // grouped-query decoding, a token read per row).
        p.tokens = spec.tokens.clone();
        spec.declare_params(&mut p);
    }
    let (num, o) = (TensorId(0), TensorId(1));
    let acc = RegId(0);
    let new_row = |p: &mut TileProgram, n: &str| {
        p.rows.push(RowVec { name: n.into() });
        RowId(p.rows.len() as u32 - 1)
    };
    // One pass over the splits, as an online softmax over their maxima: each split's
    // statistics and numerator are used as they are read and rescaled as the running
    // maximum grows, so the registers held do not grow with the split count (reading the
    // maxima twice let ptxas keep all of them live, and spill).
    let (m, l) = (new_row(&mut p, "split_max"), new_row(&mut p, "split_sum"));
    let big = new_row(&mut p, "max");
    let grown = new_row(&mut p, "new_max");
    let scale = new_row(&mut p, "rescale");
    let weight = new_row(&mut p, "weight");
    let total = new_row(&mut p, "sum");
    let inv = new_row(&mut p, "inv_sum");
    // exp(x - anchor), or 0 where x is -inf (a split that saw no key; a running max that
    // has seen none): no -inf - -inf makes a NaN.
    let exp_from = |x: RowId, anchor: RowId| {
        select(
            CmpOp::Eq,
            row(x),
            lit(f64::NEG_INFINITY),
            lit(0.0),
            un(UnaryOp::Exp, sub(row(x), row(anchor))),
        )
    };
    // Folds one more split (its max in row `m`, its sum `sum`) into the running max `big`,
    // sum `total` and output `acc`, leaving the split's weight `exp(m - max)` in `weight`.
    let fold = |body: &mut Vec<Stmt>, sum: ScalarExpr| {
        let steps = [
            (grown, max(row(big), row(m))),
            (scale, exp_from(big, grown)),
            (weight, exp_from(m, grown)),
            (big, row(grown)),
            (
                total,
                add(mul(row(total), row(scale)), mul(sum, row(weight))),
            ),
        ];
        body.extend(
            steps
                .into_iter()
                .map(|(dst, expr)| Stmt::RowMap { dst, expr }),
        );
        body.push(Stmt::Map {
            dst: acc,
            expr: mul(elem(acc), row(scale)),
        });
    };
    let mut body = vec![
        Stmt::Fill {
            dst: acc,
            value: 0.0,
        },
        Stmt::RowMap {
            dst: total,
            expr: lit(0.0),
        },
        // Nothing seen yet: the first split's rescale is exp_from(-inf, ..) = 0.
        Stmt::RowMap {
            dst: big,
            expr: lit(f64::NEG_INFINITY),
        },
    ];
    for j in 0..splits {
        for (dst, src) in [(m, RowInputId(0)), (l, RowInputId(1))] {
            body.push(Stmt::LoadRow { dst, src, split: j });
        }
        fold(&mut body, row(l));
        body.push(Stmt::AccumulatePartial {
            acc,
            src: num,
            split: j,
            weight,
        });
    }
    if let Some(sink) = &spec.sink {
        // The sink is one more split whose maximum is its logit, whose sum is 1 and whose
        // numerator is 0 (it has no value).
        body.push(Stmt::RowMap {
            dst: m,
            expr: sink.clone(),
        });
        fold(&mut body, lit(1.0));
    }
    // Rows that saw no key (sum 0) output zeros rather than NaN, as the unsplit kernel.
    body.push(Stmt::RowMap {
        dst: inv,
        expr: select(CmpOp::Eq, row(total), lit(0.0), lit(0.0), recip(row(total))),
    });
    body.push(Stmt::Map {
        dst: acc,
        expr: mul(elem(acc), row(inv)),
    });
    body.push(Stmt::Store { src: acc, dst: o });
    p.body = body;
    p.validate()?;
    Ok(p)
}

/// The split kernel and its merge as modules: the output of the cascade's attention comes
/// from the merge; the numerator, maxima and sums of the splits are scratch the launcher
/// allocates (`<O>_split_numerator` f32 `[splits B, H, N_q, d]`, `<O>_split_max` and
/// `<O>_split_sum` f32 `[splits, B, H, N_q]`).
pub(super) fn split_modules(
    cascade: &Cascade,
    schedule: &Schedule,
    splits: u32,
) -> Result<Vec<Module>, CompileError> {
    let spec = schedule.spec().clone();
    let (main, merge, _) =
        split_attention(&spec, &schedule.kernel, splits).map_err(backend_error)?;
    let m = &schedule.matched;
    let o_name = cascade.tensors[m.o.tensor].name.clone();
    let num = format!("{o_name}_split_numerator");
    let max_name = format!("{o_name}_split_max");
    let sum_name = format!("{o_name}_split_sum");
    let d = u64::from(spec.value_dim);
    let s = u64::from(splits);
    let rows = m.batch * m.heads * m.n_q;
    let numerator = ContractTensor {
        name: num.clone(),
        role: TensorRole::Output,
        dtype: Dtype::F32,
        shape: vec![s * m.batch, m.heads, m.n_q, d],
        strides: Some(Strides {
            batch: m.heads * m.n_q * d,
            seq: d,
            head: m.n_q * d,
        }),
    };
    let stats = |what: &str| -> Vec<Scratch> {
        [
            (&max_name, "max of each split's logits (natural log units)"),
            (&sum_name, "sum of exp(logit - max) of each split"),
        ]
        .into_iter()
        .map(|(n, w)| Scratch {
            name: n.clone(),
            dtype: Dtype::F32,
            elements: s * rows,
            zero_before_launch: false,
            what: format!("[{splits} splits, B, H, N_q] {w}, {what}"),
        })
        .collect()
    };
    let what_num = |_: &str| {
        format!("[{splits} splits x B, H, N_q, {d}] f32 numerator of each split of the key loop")
    };

    let mut first = module_of(cascade, schedule, &spec, main)?;
    let c = &mut first.contract;
    let Some(o) = c.tensors.iter_mut().find(|t| t.role == TensorRole::Output) else {
        return Err(CompileError::Input("the split kernel has no output".into()));
    };
    *o = numerator.clone();
    for p in &mut c.params {
        match &mut p.from {
            Source::Tensor { tensor } | Source::Stride { tensor, .. } if *tensor == o_name => {
                *tensor = num.clone()
            }
            Source::Scratch { scratch } if scratch == "max" => *scratch = max_name.clone(),
            Source::Scratch { scratch } if scratch == "sum" => *scratch = sum_name.clone(),
            _ => {}
        }
    }
    c.scratch.extend(stats("written by the split kernel"));
    if let serde_json::Value::Object(f) = &mut c.family {
        f.insert("splits".into(), json!(splits));
    }
    tensors_to_scratch(c, std::slice::from_ref(&num), &what_num)?;

    let ptx = print_ptx(&merge, schedule.target).map_err(backend_error)?;
    let mut inputs = numerator;
    inputs.role = TensorRole::Input;
    // A sink's parameters, which only its merge reads.
    let (head_params, scalar_params, tokens) = if spec.sink.is_some() {
        (&m.head_params[..], &m.scalar_params[..], &m.tokens[..])
    } else {
        (&[][..], &[][..], &[][..])
    };
    let name =
        |t: einattn_ir::arena::Handle<einattn_ir::cascade::Tensor>| cascade.tensors[t].name.clone();
    let names = ContractNames {
        tensors: vec![num.clone(), o_name],
        head_params: head_params.iter().map(|&t| name(t)).collect(),
        scalars: scalar_params
            .iter()
            .map(|&t| (name(t), cascade.tensors[t].default))
            .collect(),
        tokens: tokens.iter().map(|l| name(l.tensor)).collect(),
        states: vec![],
        row_outputs: vec![],
        row_inputs: vec![max_name.clone(), sum_name.clone()],
    };
    let sizes: std::collections::BTreeMap<String, u64> = [
        ("batch", m.batch),
        ("heads", m.heads),
        ("n_q", m.n_q),
        ("n_k", m.n_k),
        ("kv_group", m.kv_group),
        ("head_dim", u64::from(spec.head_dim)),
        ("value_dim", d),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut second = contract(
        &ptx,
        ContractParts {
            sizes,
            tensors: [
                inputs,
                contract_tensor(
                    cascade,
                    m.o.tensor,
                    TensorRole::Output,
                    dtype(spec.elem),
                    Some(&m.o),
                ),
            ]
            .into_iter()
            .chain(
                head_params
                    .iter()
                    .map(|&t| contract_tensor(cascade, t, TensorRole::Param, Dtype::F32, None)),
            )
            .chain(tokens.iter().map(|l| {
                contract_tensor(cascade, l.tensor, TensorRole::Input, Dtype::F32, Some(l))
            }))
            .collect(),
            scratch: stats("read by the merge"),
            names,
            requires: vec![],
            family: json!({"merge_of_splits": splits, "value_dim": d, "elem": spec.elem.name()}),
        },
    )?;
    tensors_to_scratch(&mut second, &[num], &what_num)?;
    Ok(vec![
        first,
        Module {
            program: KernelProgram::Tile(Box::new(merge)),
            ptx,
            contract: second,
        },
    ])
}
