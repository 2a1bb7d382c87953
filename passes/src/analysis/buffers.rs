//! Live buffers implied by the pass structure.
//!
//! Every temporary is classified once, first match wins:
//! 1. **state**: the output of a recurrence, sized without its iterative rank;
//! 2. **tile**: a temporary over the outer rank of a split, produced and consumed inside
//!    one step of it: sized without the outer rank (e.g. `BQK` is `m0` per query);
//! 3. **fiber**: a temporary over an analyzed rank `r`, produced in pass `k` over `r` and
//!    read in a later pass: the whole fiber (O(|r|) per parallel point) must be held from
//!    pass to pass, or recomputed in the later pass; the cheaper under the GPU model wins;
//! 4. **accumulator**: the result of a reduction over the key rank, live from its pass to
//!    its last reader;
//!
//! anything else streams point by point and needs no buffer. Sizes are per point of the
//! cascade's parallel ranks (batch, head, query), at f32 (accumulation precision).

use super::cost::{tensor_bytes, EinsumCost};
use super::normalize::LeafCascade;
use super::{
    AnalysisOptions, AnalyzedRank, Buffer, BufferKind, FiberStrategy, Placement, RecomputeCost,
};
use einattn_ir::{Einsum, Handle, Rank, Tensor, TensorKind};

const ACCUMULATOR_BYTES: u64 = 4;

pub(crate) fn find_buffers(
    lc: &LeafCascade,
    analyzed: &[AnalyzedRank],
    key: Option<usize>,
    costs: &[EinsumCost],
    options: &AnalysisOptions,
    parallel_points: u64,
    points_per_cta: u64,
) -> Vec<Buffer> {
    let mut out = Vec::new();
    let on_chip_budget = options.gpu.on_chip_bytes();
    let key_rank = key.map(|k| analyzed[k].passes.rank);
    for (t, tensor) in lc.cascade.tensors.iter() {
        let Some(p) = lc.producer[t.index()] else {
            continue;
        };
        let pe = lc.einsum(p);
        let is_state = pe.recurrence_rank.is_some();
        if matches!(tensor.kind, TensorKind::Input | TensorKind::Param)
            || (tensor.kind == TensorKind::Output && !is_state)
        {
            continue;
        }
        let make =
            |kind: BufferKind, rank: Handle<Rank>, exclude: &[Handle<Rank>], reason: String| {
                let ranks: Vec<Handle<Rank>> = lc
                    .tensor_leaf_ranks(t)
                    .into_iter()
                    .filter(|r| !lc.parallel.contains(r) && !exclude.contains(r))
                    .collect();
                let elements: u64 = ranks
                    .iter()
                    .map(|&r| lc.extent(r))
                    .fold(1u64, u64::saturating_mul);
                let bytes_per_point = elements.saturating_mul(ACCUMULATOR_BYTES);
                let fits = bytes_per_point.saturating_mul(points_per_cta) <= on_chip_budget;
                Buffer {
                    tensor: tensor.name.clone(),
                    kind,
                    rank: lc.rank_name(rank).to_string(),
                    ranks: ranks.iter().map(|&r| lc.rank_name(r).to_string()).collect(),
                    elements_per_point: elements,
                    bytes_per_point,
                    bytes_total: bytes_per_point.saturating_mul(parallel_points),
                    placement: if fits {
                        Placement::OnChip
                    } else {
                        Placement::Memory
                    },
                    strategy: None,
                    hold_bytes: None,
                    recompute: None,
                    reason,
                }
            };
        let per = parallel_words(lc);

        // 1. Recurrence states.
        if let Some(q) = pe.recurrence_rank {
            let mut b = make(BufferKind::State, q, &[q], String::new());
            b.reason = format!(
                "state of the recurrence over {q}: {shape} {per}, carried from each step of {q} to the next{where_}",
                q = lc.rank_name(q),
                shape = shape_words(&b.ranks, b.elements_per_point),
                where_ = placement_words(b.placement),
            );
            out.push(b);
            continue;
        }

        // 2. Tiles: one step of a split's outer rank at a time. Only the outer rank of a
        // split that is traversed (reduced or iterated somewhere) makes steps: the outer
        // rank of a split parallel rank (the K/V head group `g` of `split h -> g, r`) is
        // just part of the grid. The key rank's outer rank first.
        let traversed = |r: Handle<Rank>| {
            analyzed
                .iter()
                .any(|a| a.passes.rank == r && a.role == super::RankRole::Outer)
        };
        let candidates: Vec<Handle<Rank>> = lc
            .tensor_leaf_ranks(t)
            .into_iter()
            .filter(|&r| lc.is_outer_child(r) && pe.iterates(r) && traversed(r))
            .collect();
        let outer = candidates
            .iter()
            .copied()
            .find(|&r| Some(r) == key_rank)
            .or_else(|| candidates.first().copied());
        if let Some(q) = outer {
            let mut b = make(BufferKind::Tile, q, &[q], String::new());
            let crossing = analyzed
                .iter()
                .filter(|a| a.role == super::RankRole::Tile)
                .find_map(|a| {
                    later_pass(lc, a, t, p).map(|(k, later, reader)| (a, k, later, reader))
                });
            let held = match crossing {
                Some((a, k, later, reader)) => format!(
                    "; held on chip from pass {k} to pass {later} over {} ({} reads it)",
                    a.report_name,
                    lc.einsum(reader).name
                ),
                None => String::new(),
            };
            b.reason = format!(
                "intermediate of one step of {q}: {shape} {per}, produced and consumed inside the step{held}{where_}",
                q = lc.rank_name(q),
                shape = shape_words(&b.ranks, b.elements_per_point),
                where_ = placement_words(b.placement),
            );
            out.push(b);
            continue;
        }

        // 3. Fibers crossing passes over some analyzed rank.
        let fiber = analyzed
            .iter()
            .filter(|a| lc.tensor_has_rank(t, a.passes.rank))
            .find_map(|a| later_pass(lc, a, t, p).map(|(k, later, reader)| (a, k, later, reader)));
        if let Some((a, k, later, reader)) = fiber {
            let r = a.passes.rank;
            let mut b = make(BufferKind::Fiber, r, &[], String::new());
            let readers_passes = later_passes(lc, a, t, p);
            // Holding: written once at f32, read back once per later pass that reads it.
            let hold_bytes = b
                .bytes_total
                .saturating_mul(1 + readers_passes.len() as u64);
            let recompute = recompute_cost(lc, r, t, costs, &options.gpu);
            let gpu = &options.gpu;
            let hold_s = hold_bytes as f64 / gpu.memory_bandwidth;
            let recompute_s = recompute.time_s * readers_passes.len() as f64;
            let strategy = if b.placement == Placement::OnChip && a.role == super::RankRole::Tile {
                FiberStrategy::Hold
            } else if recompute_s <= hold_s {
                FiberStrategy::Recompute
            } else {
                FiberStrategy::Hold
            };
            b.placement = match strategy {
                FiberStrategy::Recompute => Placement::OnChip,
                FiberStrategy::Hold if a.role == super::RankRole::Tile => b.placement,
                FiberStrategy::Hold => Placement::Memory,
            };
            let decision = match strategy {
                FiberStrategy::Recompute => format!(
                    "recompute it ({} in pass {later}: {:.3} us) rather than hold it ({} B through memory: {:.3} us)",
                    recompute.einsums.join(", "),
                    recompute_s * 1e6,
                    hold_bytes,
                    hold_s * 1e6
                ),
                FiberStrategy::Hold => format!(
                    "hold it ({} B through memory: {:.3} us) rather than recompute it ({}: {:.3} us)",
                    hold_bytes,
                    hold_s * 1e6,
                    recompute.einsums.join(", "),
                    recompute_s * 1e6
                ),
            };
            b.reason = format!(
                "produced in pass {k} over {name} by {prod} and read in pass {later} by {reader}: \
                 the whole fiber of {rn} ({shape} {per}) must be held or recomputed; {decision}",
                name = a.report_name,
                prod = lc.einsum(p).name,
                reader = lc.einsum(reader).name,
                rn = lc.rank_name(r),
                shape = shape_words(&b.ranks, b.elements_per_point),
            );
            b.strategy = Some(strategy);
            b.hold_bytes = Some(hold_bytes);
            b.recompute = Some(RecomputeCost {
                einsums: recompute.einsums,
                flops: recompute.flops,
                bytes: recompute.bytes,
            });
            out.push(b);
            continue;
        }

        // 4. Accumulators of a reduction over the key rank.
        if let Some(kr) = key_rank.filter(|&kr| pe.reduces(kr)) {
            let readers: Vec<String> = lc.consumers[t.index()]
                .iter()
                .map(|&c| lc.einsum(c).name.clone())
                .collect();
            let mut b = make(BufferKind::Accumulator, kr, &[], String::new());
            let op = pe.reduction_op(kr).map(|o| o.name()).unwrap_or("reduction");
            b.reason = format!(
                "running {op} over {r}: {shape} {per}, accumulated through the whole pass and read after it by {readers}{where_}",
                r = lc.rank_name(kr),
                shape = shape_words(&b.ranks, b.elements_per_point),
                readers = if readers.is_empty() {
                    "nothing".to_string()
                } else {
                    readers.join(", ")
                },
                where_ = placement_words(b.placement),
            );
            out.push(b);
        }
    }
    out
}

/// Per parallel point, in words: "per (b, h, p)".
fn parallel_words(lc: &LeafCascade) -> String {
    if lc.parallel.is_empty() {
        return "in total".to_string();
    }
    let names: Vec<&str> = lc.parallel.iter().map(|&r| lc.rank_name(r)).collect();
    if names.len() == 1 {
        format!("per {}", names[0])
    } else {
        format!("per ({})", names.join(", "))
    }
}

/// "d x e = 4096 elements", "1 element".
fn shape_words(ranks: &[String], elements: u64) -> String {
    if ranks.is_empty() {
        return "1 element".to_string();
    }
    format!(
        "{} = {} element{}",
        ranks.join(" x "),
        elements,
        if elements == 1 { "" } else { "s" }
    )
}

fn placement_words(placement: Placement) -> &'static str {
    match placement {
        Placement::OnChip => "; fits on chip",
        Placement::Memory => "; too large for one CTA's on-chip storage: spills to memory",
    }
}

/// The first reader of `t` (produced by `p`) that iterates the rank in a later pass than
/// `p`'s: (producer pass, reader pass, reader).
fn later_pass(
    lc: &LeafCascade,
    a: &AnalyzedRank,
    t: Handle<Tensor>,
    p: Handle<Einsum>,
) -> Option<(u32, u32, Handle<Einsum>)> {
    let k = a.passes.einsum_pass[p.index()]?;
    lc.consumers[t.index()].iter().find_map(|&c| {
        a.passes.einsum_pass[c.index()]
            .filter(|&later| later > k)
            .map(|later| (k, later, c))
    })
}

/// The distinct later passes that read `t`.
fn later_passes(
    lc: &LeafCascade,
    a: &AnalyzedRank,
    t: Handle<Tensor>,
    p: Handle<Einsum>,
) -> Vec<u32> {
    let Some(k) = a.passes.einsum_pass[p.index()] else {
        return Vec::new();
    };
    let mut passes: Vec<u32> = lc.consumers[t.index()]
        .iter()
        .filter_map(|&c| a.passes.einsum_pass[c.index()])
        .filter(|&later| later > k)
        .collect();
    passes.sort_unstable();
    passes.dedup();
    passes
}

pub(crate) struct Recompute {
    pub einsums: Vec<String>,
    pub flops: u64,
    pub bytes: u64,
    pub time_s: f64,
}

/// What rebuilding `t` in a later pass over `r` costs: rerun its producer and, recursively,
/// the producers of the other fibers over `r` it reads; re-read the inputs over `r` they
/// read. Tensors without `r` (accumulators like a row max) are available in the later pass.
pub(crate) fn recompute_set(
    lc: &LeafCascade,
    r: Handle<Rank>,
    t: Handle<Tensor>,
) -> Vec<Handle<Einsum>> {
    let mut set: Vec<Handle<Einsum>> = Vec::new();
    let mut stack = vec![t];
    while let Some(u) = stack.pop() {
        let Some(p) = lc.producer[u.index()] else {
            continue;
        };
        let kind = lc.cascade.tensors[u].kind;
        if set.contains(&p) || matches!(kind, TensorKind::Input | TensorKind::Param) {
            continue;
        }
        set.push(p);
        for a in lc.einsum(p).accesses.iter().filter(|a| !a.self_read) {
            // States are not rebuilt: a recurrence cannot be rerun out of order.
            let is_temp_fiber = lc.producer[a.tensor.index()]
                .is_some_and(|q| lc.einsum(q).recurrence_rank.is_none())
                && lc.tensor_has_rank(a.tensor, r);
            if is_temp_fiber {
                stack.push(a.tensor);
            }
        }
    }
    // Dependency order.
    lc.order
        .iter()
        .copied()
        .filter(|h| set.contains(h))
        .collect()
}

fn recompute_cost(
    lc: &LeafCascade,
    r: Handle<Rank>,
    t: Handle<Tensor>,
    costs: &[EinsumCost],
    gpu: &super::GpuModel,
) -> Recompute {
    let handles = recompute_set(lc, r, t);
    let (mut contraction, mut scalar, mut trans) = (0u64, 0u64, 0u64);
    let mut inputs: Vec<Handle<Tensor>> = Vec::new();
    for &h in &handles {
        let c = &costs[h.index()];
        contraction = contraction.saturating_add(c.contraction_flops);
        scalar = scalar.saturating_add(c.scalar_flops);
        trans = trans.saturating_add(c.transcendental_ops);
        for a in &lc.einsum(h).accesses {
            let kind = lc.cascade.tensors[a.tensor].kind;
            if matches!(kind, TensorKind::Input | TensorKind::Param)
                && lc.tensor_has_rank(a.tensor, r)
                && !inputs.contains(&a.tensor)
            {
                inputs.push(a.tensor);
            }
        }
    }
    let bytes = inputs
        .iter()
        .map(|&i| tensor_bytes(lc, i))
        .fold(0u64, u64::saturating_add);
    // Conservative: the units are not assumed to overlap for the rerun work.
    let time_s = contraction as f64 / gpu.contraction_flops
        + scalar as f64 / gpu.scalar_flops
        + trans as f64 / gpu.transcendental_ops
        + bytes as f64 / gpu.memory_bandwidth;
    Recompute {
        einsums: handles.iter().map(|&h| lc.einsum(h).name.clone()).collect(),
        flops: contraction.saturating_add(scalar),
        bytes,
        time_s,
    }
}
