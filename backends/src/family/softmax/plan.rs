//! The softmax family's kernels for SP plans: the attention kernel with a query offset
//! (`full` steps over every key), the partial kernel that writes merge statistics for one
//! (query block, key block) pair (`partial` steps of Ring Attention and TokenRing), and the
//! epilogue that turns merged statistics into the output (`epilogue` steps).
//!
//! A plan's statistics are the cascade's carried states at their local shapes (docs/sp.md):
//! the running max, the rescaled sum and the rescaled numerator of the 1-pass form. The
//! partial kernel writes them as its row outputs and its f32 output, so their storage must
//! be what the kernel writes: rows `[B, H, N_q]` and the numerator `[B, H, N_q, F]`
//! (missing batch or head ranks dropped). The epilogue must be `O = num / den`.

use super::program::{Normalization, Score};
use super::{build_module, AttentionSpec, Schedule};
use crate::abi::{
    Axis, ContractParam, ContractTensor, Dtype, GridAxis, LaunchContract, ParamType, Scratch,
    Source, Strides, TensorRole,
};
use crate::family::elementwise::{
    lse_epilogue, lse_epilogue_entry, lse_epilogue_params, ELEMENTWISE_THREADS,
};
use crate::family::{contract_tensor, dtype, Module, PlanKernels};
use crate::plan::{ArgRole, Phase, Plan, Step};
use crate::tile::ScalarExpr;
use einattn_ir::arena::Handle;
use einattn_ir::cascade::{Cascade, Expr, Rank, Tensor};
use serde_json::json;
use std::collections::BTreeMap;

/// The statistics of the 1-pass form, by the cascade's tensor names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatNames {
    pub max: String,
    pub sum: String,
    pub num: String,
}

/// One stat's storage as the kernels see it: its shape at the compiled sizes and the
/// strides of its batch, query and head ranks.
struct StatStorage {
    shape: Vec<u64>,
    strides: Strides,
}

/// Assigns the kernels of `schedule`'s family to every kernel step of `plan` and returns
/// them.
pub fn plan_kernels(
    cascade: &Cascade,
    schedule: &Schedule,
    plan: &mut Plan,
) -> Result<PlanKernels, String> {
    let phases: Vec<Phase> = plan
        .ranks
        .iter()
        .flat_map(|r| &r.steps)
        .filter_map(|s| match s {
            Step::Kernel(k) => Some(k.phase),
            _ => None,
        })
        .collect();
    if let Some(p) = phases
        .iter()
        .find(|p| !matches!(p, Phase::Full | Phase::Partial | Phase::Epilogue))
    {
        return Err(format!("a `{p:?}` kernel of this family"));
    }
    let spec = &schedule.matched.spec;
    if schedule.packed_group.is_some() {
        // The packed rows are query heads, not positions of the split sequence.
        return Err("plan kernels of this family for grouped-query decoding".into());
    }
    if !spec.tokens.is_empty() {
        // A rank's kernels would read the per-token values of its own slice only.
        return Err("plan kernels of this family for scores or masks that read tensors".into());
    }
    if spec.normalization == Normalization::None {
        // The partials and the epilogue merge by log-sum-exp.
        return Err("plan kernels of this family for attention without normalization".into());
    }
    if spec.sink.is_some() {
        // Each rank's partial would count the sink's term once.
        return Err("plan kernels of this family for a sink logit".into());
    }
    if spec.value_dim != spec.head_dim {
        // The epilogue's merge and the transfers of the partial numerators are as wide as Q.
        return Err("plan kernels of this family for a value dim other than the head dim".into());
    }
    // A rank's kernels write slices at a query offset, or partials in f32: the copy engine
    // stores whole output tiles of one key loop. Where it is the default, they store
    // directly; where it was asked, the plan is refused.
    let direct;
    let schedule = if schedule.kernel.store_tma {
        if schedule.store_asked {
            return Err("plan kernels of this family that store their output by the copy engine (`--store tma`)".into());
        }
        direct = Schedule {
            kernel: super::AttentionSchedule {
                store_tma: false,
                ..schedule.kernel
            },
            ..schedule.clone()
        };
        &direct
    } else {
        schedule
    };
    if schedule.matched.kv_group > 1 {
        // The plans' partial and epilogue kernels and their K/V transfers are per head.
        return Err("plan kernels of this family for grouped-query attention (K/V heads shared by several query heads)".into());
    }
    let mut out = PlanKernels::default();
    let mut entries: Vec<(Phase, String)> = Vec::new();
    if phases.contains(&Phase::Full) {
        // Every full step runs the whole key range of a query slice: the kernel with a query
        // offset, so masks see global positions while memory stays local.
        let mut spec = schedule.spec().clone();
        spec.query_offset = true;
        let module = build_module(cascade, schedule, spec).map_err(|e| e.to_string())?;
        entries.push((Phase::Full, module.ptx.entry.clone()));
        out.modules.push(module);
    }
    if phases.contains(&Phase::Partial) || phases.contains(&Phase::Epilogue) {
        let names = stat_names(cascade, schedule)?;
        if phases.contains(&Phase::Partial) {
            let module = partial_module(cascade, schedule, &names)?;
            entries.push((Phase::Partial, module.ptx.entry.clone()));
            out.modules.push(module);
        }
        if phases.contains(&Phase::Epilogue) {
            let (text, contract) = epilogue_kernel(cascade, schedule, &names)?;
            entries.push((Phase::Epilogue, contract.kernel.clone()));
            out.ptx.push((text, contract));
        }
    }
    for rank in &mut plan.ranks {
        for step in &mut rank.steps {
            if let Step::Kernel(k) = step {
                if k.phase == Phase::Partial && k.args.iter().any(|a| a.role == ArgRole::StatsIn) {
                    // The emitter never resumes a partial; the kernel starts from no keys.
                    return Err("a partial kernel resumed from given statistics".into());
                }
                if let Some((_, e)) = entries.iter().find(|(p, _)| *p == k.phase) {
                    k.launch = vec![e.clone()];
                }
            }
        }
    }
    Ok(out)
}

/// Reads the epilogue `O = num / den` and the carried max: the statistics a partial kernel
/// writes. Anything else (a sink term in the denominator, a normalization by something
/// other than the rescaled sum) has no partial kernel.
pub fn stat_names(cascade: &Cascade, schedule: &Schedule) -> Result<StatNames, String> {
    let m = &schedule.matched;
    let o = m.o.tensor;
    let epilogue = cascade
        .einsums
        .iter()
        .find(|(_, e)| e.output.tensor == o)
        .map(|(_, e)| e)
        .ok_or("no Einsum writes the output")?;
    let access = |e: &Expr| match e {
        Expr::Access(a) => Some(a.tensor),
        _ => None,
    };
    let (num, den) = match &epilogue.expr {
        Expr::Binary(einattn_ir::cascade::BinaryOp::Div, a, b) => match (access(a), access(b)) {
            (Some(n), Some(d)) => (n, d),
            _ => return Err(not_a_ratio(cascade, o)),
        },
        _ => return Err(not_a_ratio(cascade, o)),
    };
    if !epilogue.reductions.is_empty() || !epilogue.mask.is_empty() {
        return Err(not_a_ratio(cascade, o));
    }
    let state = |t: Handle<Tensor>| cascade.tensors[t].iterative.is_some();
    if !state(num) || !state(den) {
        return Err(not_a_ratio(cascade, o));
    }
    // The max: the other state of the 1-pass form, read by the denominator's recurrence.
    let mut maxes = Vec::new();
    for (_, e) in cascade.einsums.iter() {
        let t = e.output.tensor;
        if t != num && t != den && state(t) && e.recurrence.is_some() {
            maxes.push(t);
        }
    }
    let [max] = maxes.as_slice() else {
        return Err(format!(
            "a partial kernel carries a max, a sum and a numerator; this cascade carries {} states",
            maxes.len() + 2
        ));
    };
    let name = |t: Handle<Tensor>| cascade.tensors[t].name.clone();
    Ok(StatNames {
        max: name(*max),
        sum: name(den),
        num: name(num),
    })
}

fn not_a_ratio(cascade: &Cascade, o: Handle<Tensor>) -> String {
    format!(
        "the epilogue of `{}` is not a ratio of two carried states (a partial kernel's merge \
         statistics finish as `num / den`)",
        cascade.tensors[o].name
    )
}

/// The storage of state `name` (its ranks but the iterative one) at the compiled sizes,
/// checked to be `[batch?, head?, query, rest]` with `rest` the value dim or nothing.
fn stat_storage(
    cascade: &Cascade,
    schedule: &Schedule,
    name: &str,
    with_value: bool,
) -> Result<StatStorage, String> {
    let roles = &schedule.matched.roles;
    let t = cascade
        .tensor_by_name(name)
        .ok_or_else(|| format!("no tensor `{name}`"))?;
    let tensor = &cascade.tensors[t];
    let ranks: Vec<Handle<Rank>> = tensor
        .ranks
        .iter()
        .enumerate()
        .filter(|(d, _)| Some(*d) != tensor.iterative)
        .map(|(_, &r)| r)
        .collect();
    let query = roles
        .query
        .ok_or("a partial kernel needs a query rank (decoding has one query per head)")?;
    let mut want: Vec<Handle<Rank>> = [roles.batch, roles.head, Some(query)]
        .into_iter()
        .flatten()
        .collect();
    if with_value {
        want.push(roles.value_dim);
    }
    if ranks != want {
        let names = |rs: &[Handle<Rank>]| {
            rs.iter()
                .map(|&r| cascade.ranks[r].name.clone())
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(format!(
            "statistic `{name}` is stored as [{}]; the partial kernel writes [{}]",
            names(&ranks),
            names(&want)
        ));
    }
    let shape: Vec<u64> = ranks.iter().map(|&r| cascade.ranks[r].extent).collect();
    let stride_of = |r: Option<Handle<Rank>>| {
        r.and_then(|r| ranks.iter().position(|&x| x == r))
            .map_or(0, |d| shape[d + 1..].iter().product())
    };
    Ok(StatStorage {
        strides: Strides {
            batch: stride_of(roles.batch),
            seq: stride_of(Some(query)),
            head: stride_of(roles.head),
        },
        shape,
    })
}

/// Whether the score depends on positions only through `m - p` (ALiBi, a relative bias):
/// a partial kernel sees positions relative to its key block, so shifting both by the
/// block's start must not change a logit. The score is an expression of a few leaves, and
/// one that is not shift-invariant differs at almost every point; it is evaluated at
/// fixed pseudo-random points and shifts.
pub fn shift_invariant(score: &Score) -> bool {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        // SplitMix64: a fixed sequence, no dependency.
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..32).all(|_| {
        let dot = 6.0 * next() - 3.0;
        let (p, m, t) = (
            (4096.0 * next()).floor(),
            (4096.0 * next()).floor(),
            (1.0 + 4096.0 * next()).floor(),
        );
        let scalars: Vec<f64> = score.scalars.iter().map(|_| 0.1 + 2.0 * next()).collect();
        let heads: Vec<f64> = score
            .head_params
            .iter()
            .map(|_| 0.1 + 2.0 * next())
            .collect();
        // Scores that read tensors are refused before (`plan_kernels`).
        let no_tokens = |_, _| f64::NAN;
        let a = score.eval(dot, (p, m), &scalars, &heads, &no_tokens);
        let b = score.eval(dot, (p + t, m + t), &scalars, &heads, &no_tokens);
        (a - b).abs() <= 1e-9 * (1.0 + a.abs())
    })
}

/// Whether the partial kernel's result depends on where its blocks sit (masks or a
/// position-reading score): a plan may then only pair it with keys that start at or before
/// its queries (the offset is a 32-bit unsigned launch size).
pub fn positions_matter(spec: &AttentionSpec) -> bool {
    !spec.masks().is_empty() || contains_index(&spec.score.expr)
}

fn contains_index(e: &ScalarExpr) -> bool {
    match e {
        ScalarExpr::Index(_) => true,
        ScalarExpr::Unary(_, a) => contains_index(a),
        ScalarExpr::Binary(_, a, b) => contains_index(a) || contains_index(b),
        ScalarExpr::Select {
            lhs,
            rhs,
            then,
            otherwise,
            ..
        } => [lhs, rhs, then, otherwise]
            .iter()
            .any(|x| contains_index(x)),
        _ => false,
    }
}

/// The partial kernel: the attention kernel with a query offset (relative to the key
/// block) writing the max and sum rows and the f32 numerator of `names`.
fn partial_module(
    cascade: &Cascade,
    schedule: &Schedule,
    names: &StatNames,
) -> Result<Module, String> {
    let mut spec = schedule.spec().clone();
    if !shift_invariant(&spec.score) {
        return Err(
            "a partial kernel of a score that reads absolute positions (it sees positions \
             relative to its key block)"
                .into(),
        );
    }
    spec.query_offset = true;
    spec.partial = true;
    let positions = positions_matter(&spec);
    let mut module = build_module(cascade, schedule, spec).map_err(|e| e.to_string())?;
    let num = stat_storage(cascade, schedule, &names.num, true)?;
    let rows = stat_storage(cascade, schedule, &names.max, false)?;
    let den = stat_storage(cascade, schedule, &names.sum, false)?;
    if den.shape != rows.shape {
        return Err(format!(
            "`{}` and `{}` have different shapes",
            names.max, names.sum
        ));
    }
    let c = &mut module.contract;
    // The output tensor of the partial is the numerator statistic, in f32.
    let Some(o) = c.tensors.iter_mut().find(|t| t.role == TensorRole::Output) else {
        return Err("the partial kernel has no output".into());
    };
    let o_name = o.name.clone();
    *o = ContractTensor {
        name: names.num.clone(),
        role: TensorRole::Output,
        dtype: Dtype::F32,
        shape: num.shape.clone(),
        strides: Some(num.strides),
    };
    for p in &mut c.params {
        match &mut p.from {
            Source::Tensor { tensor } | Source::Stride { tensor, .. } if *tensor == o_name => {
                *tensor = names.num.clone()
            }
            Source::Scratch { scratch } if scratch == "max" => *scratch = names.max.clone(),
            Source::Scratch { scratch } if scratch == "sum" => *scratch = names.sum.clone(),
            _ => {}
        }
    }
    let elements: u64 = rows.shape.iter().product();
    for (name, what) in [
        (
            &names.max,
            "per-row max of the block's logits (natural log units), [B, H, N_q] f32",
        ),
        (
            &names.sum,
            "per-row sum of exp(logit - max), [B, H, N_q] f32",
        ),
    ] {
        c.scratch.push(Scratch {
            name: name.clone(),
            dtype: Dtype::F32,
            elements,
            zero_before_launch: false,
            what: what.into(),
        });
    }
    if let serde_json::Value::Object(f) = &mut c.family {
        f.insert("partial".into(), json!(true));
        f.insert("positions".into(), json!(positions));
    }
    c.check()?;
    Ok(module)
}

/// The epilogue: `einattn_lse_epilogue_<elem>` with a contract that binds the numerator,
/// the denominator and the output by name (their strides from each one's storage).
fn epilogue_kernel(
    cascade: &Cascade,
    schedule: &Schedule,
    names: &StatNames,
) -> Result<(String, LaunchContract), String> {
    let m = &schedule.matched;
    let elem = schedule.spec().elem;
    let num = stat_storage(cascade, schedule, &names.num, true)?;
    let den = stat_storage(cascade, schedule, &names.sum, false)?;
    let out = &cascade.tensors[m.o.tensor];
    if out.ranks.last() != Some(&m.roles.value_dim) {
        return Err(format!(
            "the output `{}` keeps its value dim innermost for the epilogue kernel",
            out.name
        ));
    }
    let o = contract_tensor(
        cascade,
        m.o.tensor,
        TensorRole::Output,
        dtype(elem),
        Some(&m.o),
    );
    let target = schedule.target;
    let text = lse_epilogue(target, elem)?;
    let entry = lse_epilogue_entry(elem);
    let tensors = vec![
        ContractTensor {
            name: names.num.clone(),
            role: TensorRole::Input,
            dtype: Dtype::F32,
            shape: num.shape,
            strides: Some(num.strides),
        },
        ContractTensor {
            name: names.sum.clone(),
            role: TensorRole::Input,
            dtype: Dtype::F32,
            shape: den.shape,
            strides: Some(den.strides),
        },
        o,
    ];
    let tensor_of = ["num", "den", "out"];
    let params = lse_epilogue_params()
        .into_iter()
        .map(|(ty, name, _)| {
            let name = name.trim_start_matches("p_").to_string();
            let size = |s: &str| Source::Size { size: s.into() };
            let from = match name.as_str() {
                "batch" => size("batch"),
                "seq" => size("n_q"),
                "heads" => size("heads"),
                "width" => size("value_dim"),
                other => {
                    let (t, axis) = other.split_once('_').unwrap_or((other, ""));
                    let i = tensor_of.iter().position(|x| *x == t).unwrap_or(0);
                    let tensor = tensors[i].name.clone();
                    match axis {
                        "sb" => Source::Stride {
                            tensor,
                            axis: Axis::Batch,
                        },
                        "sn" => Source::Stride {
                            tensor,
                            axis: Axis::Seq,
                        },
                        "sh" => Source::Stride {
                            tensor,
                            axis: Axis::Head,
                        },
                        _ => Source::Tensor { tensor },
                    }
                }
            };
            ContractParam {
                name,
                ty: if ty == "ptr" {
                    ParamType::Ptr
                } else {
                    ParamType::U64
                },
                from,
            }
        })
        .collect();
    let sizes: BTreeMap<String, u64> = [
        ("batch", m.batch),
        ("heads", m.heads),
        ("n_q", m.n_q),
        ("value_dim", cascade.ranks[m.roles.value_dim].extent),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut contract = LaunchContract {
        kernel: entry.clone(),
        ptx: format!("{entry}.ptx"),
        target: target.name().to_string(),
        block: [ELEMENTWISE_THREADS, 1, 1],
        grid: [0; 3],
        grid_formula: [
            GridAxis {
                sizes: ["batch", "n_q", "heads", "value_dim"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                divide_by: u64::from(ELEMENTWISE_THREADS),
                at_least: 1,
                at_most: Some(4096),
                times: 1,
            },
            GridAxis::fixed(1),
            GridAxis::fixed(1),
        ],
        dynamic_shared_bytes: 0,
        sizes,
        tensors,
        scratch: Vec::new(),
        params,
        requires: Vec::new(),
        family: json!({"helper": entry, "epilogue": format!("{} = {} / {}", out.name, names.num, names.sum)}),
    };
    contract.grid = contract.compiled_grid().map_err(|e| e.to_string())?;
    contract.check()?;
    Ok((text, contract))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tile::ex::*;
    use crate::tile::SeqRank;

    #[test]
    fn relative_biases_are_shift_invariant_and_absolute_positions_are_not() {
        assert!(shift_invariant(&Score::scaled()));
        assert!(shift_invariant(&Score::scaled().with_alibi()));
        assert!(shift_invariant(
            &Score::scaled().with_softcap().with_alibi()
        ));
        // The recognizer's linear form of `slope * (p - m)`.
        let mut relative = Score::scaled();
        relative.head_params.push("slope".into());
        relative.expr = sub(
            relative.expr,
            mul(
                head(crate::tile::HeadParamId(0)),
                add(
                    mul(lit(-1.0), index(SeqRank::Key)),
                    add(mul(lit(1.0), index(SeqRank::Query)), lit(0.0)),
                ),
            ),
        );
        assert!(shift_invariant(&relative));
        // A bias growing with the query's absolute position is not.
        let mut absolute = Score::scaled();
        absolute.expr = add(absolute.expr, mul(lit(0.01), index(SeqRank::Query)));
        assert!(!shift_invariant(&absolute));
        let mut key_only = Score::scaled();
        key_only.expr = sub(key_only.expr, index(SeqRank::Key));
        assert!(!shift_invariant(&key_only));
    }
}
