//! FuseMax-style analysis of a cascade (docs/analysis.md).
//!
//! [`analyze`] answers, for a bound cascade:
//! - how many passes each reduced or iterated rank needs, and why each new pass starts;
//! - which buffers the pass structure keeps live (recurrence states, fibers held across
//!   passes or recomputed, on-chip tiles, reduction accumulators), per parallel point;
//! - FLOPs per Einsum (tensor-core contraction vs. scalar, transcendental counted apart),
//!   with masked points counted exactly;
//! - the minimum bytes moved, arithmetic intensity and a roofline lower bound on a GPU;
//! - fusion groups: the Einsums one kernel runs per pass over the key rank.
//!
//! The result is a [`Report`]: serializable to JSON (`einattn analyze --emit report`) and
//! renderable as text that explains every decision ([`Report::render_text`]).

mod buffers;
mod cost;
mod fusion;
mod gpu;
mod normalize;
mod pass_count;
pub mod points;
mod render;

pub use gpu::GpuModel;

use einattn_ir::{Cascade, Handle, Rank, TensorKind};
use normalize::LeafCascade;
use serde::Serialize;
use std::collections::BTreeMap;

/// Knobs of the analysis.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AnalysisOptions {
    /// The machine the roofline and the on-chip decisions are for.
    pub gpu: GpuModel,
    /// How many points of a sequence-like parallel rank (the query rank) one CTA owns when
    /// judging whether buffers fit on chip. Other parallel ranks (batch, head) count one.
    pub row_block: u64,
}

impl Default for AnalysisOptions {
    fn default() -> Self {
        AnalysisOptions {
            gpu: GpuModel::h100(),
            row_block: 64,
        }
    }
}

/// Everything the analysis found. Field meanings: docs/analysis.md.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub kernel: String,
    /// Size symbols as bound for this analysis.
    pub sizes: BTreeMap<String, u64>,
    /// Ranks every Einsum iterates and none reduces (batch, head, query).
    pub parallel_ranks: Vec<String>,
    /// Product of the parallel ranks' extents: buffers are sized per one of these points.
    pub parallel_points: u64,
    /// Parallel points one CTA owns when judging what fits on chip.
    pub points_per_cta: u64,
    /// The rank whose passes define the fusion groups (the key / iterative rank), under
    /// its report name.
    pub key_rank: Option<String>,
    /// Passes per reduced or iterated rank; a split's outer rank under its parent's name.
    pub passes: BTreeMap<String, u32>,
    /// The same, with each Einsum's pass and the reason for every new pass.
    pub pass_detail: Vec<RankPassReport>,
    /// Total FLOPs: contraction plus scalar.
    pub flops: u64,
    pub flops_by_class: FlopBreakdown,
    pub einsums: Vec<EinsumReport>,
    /// Every input and parameter read once, every output written once, at its dtype.
    pub bytes_min: u64,
    pub tensor_bytes: Vec<TensorBytes>,
    /// Bytes the fusion groups below move: each group reads its inputs, and tensors that
    /// cross groups are written once and read by each later group (f32).
    pub bytes_fused: u64,
    /// FLOPs per byte of `bytes_min`.
    pub arithmetic_intensity: f64,
    pub roofline: Roofline,
    pub buffers: Vec<Buffer>,
    pub fusion_groups: Vec<FusionGroup>,
    /// Problems that did not stop the analysis (the validator should reject them).
    pub warnings: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RankPassReport {
    /// The report name: the parent's name for the outer rank of a split.
    pub name: String,
    /// The rank actually traversed (`m1` for `m`).
    pub rank: String,
    /// `outer` (split outer rank), `tile` (split tile rank) or `plain`.
    pub role: RankRole,
    pub extent: u64,
    pub passes: u32,
    /// Einsums that iterate the rank, in dependency order, with their pass.
    pub einsums: Vec<EinsumPass>,
    /// One sentence per pass after the first: where it starts and what it waits for.
    pub reasons: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RankRole {
    Plain,
    Outer,
    Tile,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EinsumPass {
    pub einsum: String,
    pub pass: u32,
    /// Set when a full dependency pushed the Einsum into a later pass.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct FlopBreakdown {
    /// Tensor-core FLOPs (2 per multiply-add).
    pub contraction: u64,
    /// CUDA-core FLOPs: maps, reduction combines, constant factors of contractions;
    /// includes the transcendental ops.
    pub scalar: u64,
    /// exp, log, tanh, sqrt: also counted in `scalar`.
    pub transcendental: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EinsumReport {
    /// Named by its output tensor.
    pub einsum: String,
    /// The iteration space over leaf ranks.
    pub ranks: Vec<String>,
    pub reductions: Vec<ReductionReport>,
    /// The conditions the point count used (own and inherited), as `form <= 0` etc.
    pub mask: Vec<String>,
    /// Whether some conditions come from inputs (absence propagates through maps).
    pub mask_inherited: bool,
    /// Data-dependent masks the point counts cannot see, in words: own value conditions
    /// (`data-dependent mask \`SEG[b, p] == SEG[b, m]\``) and inherited ones (`S's
    /// data-dependent mask`). With any, the counts are upper bounds.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub value_mask: Vec<String>,
    /// Points of the iteration space without any mask.
    pub points_dense: u64,
    /// Points that are computed.
    pub points: u64,
    /// Output points that are present.
    pub output_points: u64,
    /// `contraction` or `scalar`.
    pub class: OpClass,
    /// The summed ranks of a contraction.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub contracted: Vec<String>,
    /// Map operators per point (per output point for a contraction's constant factors).
    pub map_ops_per_point: u64,
    pub reduction_combines: u64,
    pub contraction_flops: u64,
    pub scalar_flops: u64,
    pub transcendental_ops: u64,
    pub flops: u64,
    /// The Einsum's pass over each analyzed rank it iterates.
    pub passes: BTreeMap<String, u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReductionReport {
    pub rank: String,
    pub op: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OpClass {
    Contraction,
    Scalar,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TensorBytes {
    pub tensor: String,
    pub kind: TensorKind,
    pub dtype: String,
    pub elements: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Roofline {
    pub gpu: GpuModel,
    pub contraction_s: f64,
    pub scalar_s: f64,
    pub transcendental_s: f64,
    /// `bytes_min` over the memory bandwidth.
    pub memory_s: f64,
    /// The largest of the four: no schedule on this GPU runs faster.
    pub time_lower_bound_s: f64,
    /// Which term sets the bound: `contraction`, `scalar`, `transcendental` or `memory`.
    pub bound: String,
    /// `bytes_fused` over the memory bandwidth: the memory time of the fusion groups.
    pub memory_fused_s: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BufferKind {
    /// A recurrence state, carried from one step of its iterative rank to the next.
    State,
    /// A tensor produced in one pass over a rank and read in a later one.
    Fiber,
    /// An intermediate of one step of a split's outer rank: lives on chip.
    Tile,
    /// The result of a reduction over the key rank, live for the rest of the kernel.
    Accumulator,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    OnChip,
    Memory,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FiberStrategy {
    /// Keep the whole fiber (O(|r|) per parallel point) from the producing pass to the
    /// consuming one.
    Hold,
    /// Recompute it in the consuming pass from tensors that pass has anyway.
    Recompute,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Buffer {
    pub tensor: String,
    pub kind: BufferKind,
    /// The rank that makes it a buffer: the recurrence rank, the traversed rank of a
    /// fiber, the outer rank of a tile, the reduced rank of an accumulator.
    pub rank: String,
    /// The ranks the buffer spans per parallel point.
    pub ranks: Vec<String>,
    pub elements_per_point: u64,
    /// At f32 (accumulation precision).
    pub bytes_per_point: u64,
    /// Over all parallel points.
    pub bytes_total: u64,
    pub placement: Placement,
    /// Fibers only: hold or recompute.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strategy: Option<FiberStrategy>,
    /// Fibers only: what holding costs (bytes written and read back through memory).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold_bytes: Option<u64>,
    /// Fibers only: what recomputing costs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recompute: Option<RecomputeCost>,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RecomputeCost {
    /// Einsums rerun in the consuming pass, in dependency order.
    pub einsums: Vec<String>,
    pub flops: u64,
    /// Input bytes re-read to rerun them.
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FusionGroup {
    pub id: u32,
    /// The pass over the key rank this group runs.
    pub pass: u32,
    pub einsums: Vec<GroupMember>,
    /// On-chip bytes of the buffers live in the group, for one CTA's parallel points.
    pub on_chip_bytes_per_cta: u64,
    pub fits_on_chip: bool,
    /// Tensors read from memory.
    pub reads: Vec<String>,
    /// Tensors written to memory.
    pub writes: Vec<String>,
    pub bytes_moved: u64,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GroupMember {
    pub einsum: String,
    pub role: MemberRole,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberRole {
    /// Iterates the key rank in this pass.
    Pass,
    /// Outside the key rank, before the pass (needs nothing the pass produces).
    Prologue,
    /// Outside the key rank, after the pass (needs a full result of it).
    Epilogue,
    /// Rerun here to rebuild a fiber instead of holding it.
    Recompute,
}

/// What the pass counting found for one analyzed leaf rank.
pub(crate) struct AnalyzedRank {
    pub report_name: String,
    pub role: RankRole,
    pub passes: pass_count::RankPasses,
}

/// Analyzes a bound cascade. Never panics on a cascade the validator accepts; on one it
/// would reject, it reports what it can and lists the problems in `warnings`.
pub fn analyze(cascade: &Cascade, options: &AnalysisOptions) -> Report {
    if let Err(problem) = normalize::check_handles(cascade) {
        return Report::malformed(cascade, options, problem);
    }
    let lc = LeafCascade::new(cascade);
    let analyzed = analyzed_ranks(&lc);
    let key = key_rank(&lc, &analyzed);

    let mut counter = cost::PointCounter::default();
    let costs = cost::cost_einsums(&lc, &mut counter);

    let parallel_points: u64 = lc
        .parallel
        .iter()
        .map(|&r| lc.extent(r))
        .fold(1u64, |a, b| a.saturating_mul(b));
    let points_per_cta = points_per_cta(&lc, key.map(|k| analyzed[k].passes.rank), options);

    let buffers = buffers::find_buffers(
        &lc,
        &analyzed,
        key,
        &costs,
        options,
        parallel_points,
        points_per_cta,
    );
    let groups = fusion::fusion_groups(&lc, &analyzed, key, &buffers, options, points_per_cta);

    let mut flops_by_class = FlopBreakdown::default();
    for c in &costs {
        flops_by_class.contraction = flops_by_class
            .contraction
            .saturating_add(c.contraction_flops);
        flops_by_class.scalar = flops_by_class.scalar.saturating_add(c.scalar_flops);
        flops_by_class.transcendental = flops_by_class
            .transcendental
            .saturating_add(c.transcendental_ops);
    }
    let flops = flops_by_class
        .contraction
        .saturating_add(flops_by_class.scalar);

    let tensor_bytes: Vec<TensorBytes> = cascade
        .tensors
        .iter()
        .filter(|(_, t)| t.kind != TensorKind::Temp)
        .map(|(h, t)| TensorBytes {
            tensor: t.name.clone(),
            kind: t.kind,
            dtype: t.dtype.map(|d| d.name()).unwrap_or("f32").to_string(),
            elements: cascade.tensor_elements(h),
            bytes: cost::tensor_bytes(&lc, h),
        })
        .collect();
    let bytes_min = tensor_bytes
        .iter()
        .map(|t| t.bytes)
        .fold(0u64, u64::saturating_add);
    let bytes_fused = groups
        .iter()
        .map(|g| g.bytes_moved)
        .fold(0u64, u64::saturating_add);

    let roofline = roofline(&options.gpu, &flops_by_class, bytes_min, bytes_fused);
    let arithmetic_intensity = if bytes_min == 0 {
        0.0
    } else {
        flops as f64 / bytes_min as f64
    };

    let passes: BTreeMap<String, u32> = analyzed
        .iter()
        .map(|a| (a.report_name.clone(), a.passes.passes))
        .collect();
    let pass_detail = analyzed
        .iter()
        .map(|a| RankPassReport {
            name: a.report_name.clone(),
            rank: lc.rank_name(a.passes.rank).to_string(),
            role: a.role,
            extent: lc.extent(a.passes.rank),
            passes: a.passes.passes,
            einsums: lc
                .order
                .iter()
                .filter_map(|&h| {
                    a.passes.einsum_pass[h.index()].map(|pass| EinsumPass {
                        einsum: lc.einsum(h).name.clone(),
                        pass,
                        cause: a.passes.einsum_cause[h.index()].clone(),
                    })
                })
                .collect(),
            reasons: a.passes.reasons.clone(),
        })
        .collect();

    let einsums = lc
        .order
        .iter()
        .map(|&h| {
            let e = lc.einsum(h);
            let c = &costs[h.index()];
            EinsumReport {
                einsum: e.name.clone(),
                ranks: e
                    .space
                    .iter()
                    .map(|&r| lc.rank_name(r).to_string())
                    .collect(),
                reductions: e
                    .reductions
                    .iter()
                    .map(|&(r, op)| ReductionReport {
                        rank: lc.rank_name(r).to_string(),
                        op: op.name().to_string(),
                    })
                    .collect(),
                mask: c
                    .effective_mask
                    .iter()
                    .map(|m| render::format_condition(&lc, m))
                    .collect(),
                mask_inherited: c.inherits_mask,
                value_mask: c.data_dependent.clone(),
                points_dense: c.points_dense,
                points: c.points,
                output_points: c.output_points,
                class: if c.is_contraction {
                    OpClass::Contraction
                } else {
                    OpClass::Scalar
                },
                contracted: c
                    .contracted
                    .iter()
                    .map(|&r| lc.rank_name(r).to_string())
                    .collect(),
                map_ops_per_point: c.map_ops_per_point,
                reduction_combines: c.reduction_combines,
                contraction_flops: c.contraction_flops,
                scalar_flops: c.scalar_flops,
                transcendental_ops: c.transcendental_ops,
                flops: c.flops(),
                passes: analyzed
                    .iter()
                    .filter_map(|a| {
                        a.passes.einsum_pass[h.index()].map(|p| (a.report_name.clone(), p))
                    })
                    .collect(),
            }
        })
        .collect();

    let mut report = Report {
        kernel: cascade.name.clone(),
        sizes: cascade.sizes.iter().cloned().collect(),
        parallel_ranks: lc
            .parallel
            .iter()
            .map(|&r| lc.rank_name(r).to_string())
            .collect(),
        parallel_points,
        points_per_cta,
        key_rank: key.map(|k| analyzed[k].report_name.clone()),
        passes,
        pass_detail,
        flops,
        flops_by_class,
        einsums,
        bytes_min,
        tensor_bytes,
        bytes_fused,
        arithmetic_intensity,
        roofline,
        buffers,
        fusion_groups: groups,
        warnings: lc.warnings.clone(),
    };
    report.warnings.extend(counter.notes);
    report.warnings.extend(saturated_totals(&report));
    report
}

/// Totals that reached `u64::MAX`: the arithmetic saturates there rather than wrap, and
/// the report says so instead of printing 18446744073709551615 as if it were a count.
fn saturated_totals(r: &Report) -> Vec<String> {
    let checks: [(&str, u64); 6] = [
        ("total FLOPs", r.flops),
        ("contraction FLOPs", r.flops_by_class.contraction),
        ("scalar FLOPs", r.flops_by_class.scalar),
        ("bytes moved (minimum)", r.bytes_min),
        ("bytes moved (fused)", r.bytes_fused),
        ("parallel points", r.parallel_points),
    ];
    let mut out: Vec<String> = checks
        .iter()
        .filter(|(_, v)| *v == u64::MAX)
        .map(|(what, _)| {
            format!(
                "{what} exceed 2^64 - 1 and are shown saturated at {}",
                u64::MAX
            )
        })
        .collect();
    for t in r.tensor_bytes.iter().filter(|t| t.bytes == u64::MAX) {
        out.push(format!(
            "the bytes of `{}` exceed 2^64 - 1 and are shown saturated at {}",
            t.tensor,
            u64::MAX
        ));
    }
    out
}

impl Report {
    /// The report of a cascade whose handles do not resolve: nothing but the problem.
    fn malformed(cascade: &Cascade, options: &AnalysisOptions, problem: String) -> Report {
        Report {
            kernel: cascade.name.clone(),
            sizes: cascade.sizes.iter().cloned().collect(),
            parallel_ranks: Vec::new(),
            parallel_points: 0,
            points_per_cta: 0,
            key_rank: None,
            passes: BTreeMap::new(),
            pass_detail: Vec::new(),
            flops: 0,
            flops_by_class: FlopBreakdown::default(),
            einsums: Vec::new(),
            bytes_min: 0,
            tensor_bytes: Vec::new(),
            bytes_fused: 0,
            arithmetic_intensity: 0.0,
            roofline: roofline(&options.gpu, &FlopBreakdown::default(), 0, 0),
            buffers: Vec::new(),
            fusion_groups: Vec::new(),
            warnings: vec![format!("malformed cascade, not analyzed: {problem}")],
        }
    }

    /// The report as pretty JSON (the schema is docs/analysis.md).
    pub fn to_json(&self) -> String {
        // Serializing these plain structs cannot fail: no maps with non-string keys.
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    /// A plain-text explanation of the report: passes and why, buffers and why, FLOPs,
    /// bytes, roofline and fusion groups.
    pub fn render_text(&self) -> String {
        render::render_text(self)
    }
}

/// The leaf ranks to count passes over: every reduced or iterative rank, and both children
/// of a split when either is one; in rank declaration order.
fn analyzed_ranks(lc: &LeafCascade) -> Vec<AnalyzedRank> {
    let mut wanted: Vec<Handle<Rank>> = Vec::new();
    for e in &lc.einsums {
        let ranks = e
            .reductions
            .iter()
            .map(|&(r, _)| r)
            .chain(e.recurrence_rank);
        for r in ranks {
            let family: Vec<Handle<Rank>> = match lc.parent(r) {
                Some(p) => normalize::leaf_ranks(lc.cascade, p),
                None => vec![r],
            };
            for f in family {
                if !wanted.contains(&f) {
                    wanted.push(f);
                }
            }
        }
    }
    wanted.sort();
    wanted
        .into_iter()
        .map(|r| {
            let (report_name, role) = if lc.is_outer_child(r) {
                let parent = lc.parent(r).map(|p| lc.rank_name(p)).unwrap_or("?");
                (parent.to_string(), RankRole::Outer)
            } else if lc.is_tile_child(r) {
                (lc.rank_name(r).to_string(), RankRole::Tile)
            } else {
                (lc.rank_name(r).to_string(), RankRole::Plain)
            };
            let passes = pass_count::count_passes(lc, r, &report_name);
            AnalyzedRank {
                report_name,
                role,
                passes,
            }
        })
        .collect()
}

/// The rank whose passes structure the kernel: a recurrence's iterative rank if there is
/// one, else the reduced rank over the longest sequence; ties go to the outer rank of a
/// split, then to more passes, then to the earlier declaration.
fn key_rank(lc: &LeafCascade, analyzed: &[AnalyzedRank]) -> Option<usize> {
    let is_recurrence = |r: Handle<Rank>| lc.einsums.iter().any(|e| e.recurrence_rank == Some(r));
    analyzed
        .iter()
        .enumerate()
        .max_by_key(|(i, a)| {
            let r = a.passes.rank;
            (
                is_recurrence(r),
                lc.top_extent(r),
                a.role != RankRole::Tile,
                a.passes.passes,
                std::cmp::Reverse(*i),
            )
        })
        .map(|(i, _)| i)
}

/// One CTA owns a block of `row_block` points of each parallel rank that ranges over the
/// key rank's sequence (the query rank against the key rank), and one point of every
/// other parallel rank (batch, head).
fn points_per_cta(lc: &LeafCascade, key: Option<Handle<Rank>>, options: &AnalysisOptions) -> u64 {
    let Some(key) = key else {
        return 1;
    };
    let key_symbol = sequence_symbol(lc, key);
    let key_extent = lc.top_extent(key);
    lc.parallel
        .iter()
        .map(|&r| {
            let same_sequence = match (&key_symbol, sequence_symbol(lc, r)) {
                (Some(a), Some(b)) => *a == b,
                (None, None) => lc.top_extent(r) == key_extent,
                _ => false,
            };
            if same_sequence {
                options.row_block.min(lc.extent(r)).max(1)
            } else {
                1
            }
        })
        .fold(1u64, |a, b| a.saturating_mul(b))
}

/// The size symbol a rank's topmost parent was declared with, if any.
fn sequence_symbol(lc: &LeafCascade, rank: Handle<Rank>) -> Option<String> {
    let mut r = rank;
    for _ in 0..16 {
        match lc.parent(r) {
            Some(p) => r = p,
            None => break,
        }
    }
    match &lc.cascade.ranks[r].source {
        einattn_ir::ExtentSource::Symbol(s) => Some(s.clone()),
        _ => None,
    }
}

fn roofline(gpu: &GpuModel, flops: &FlopBreakdown, bytes_min: u64, bytes_fused: u64) -> Roofline {
    let per = |work: u64, rate: f64| if rate > 0.0 { work as f64 / rate } else { 0.0 };
    let contraction_s = per(flops.contraction, gpu.contraction_flops);
    let scalar_s = per(flops.scalar, gpu.scalar_flops);
    let transcendental_s = per(flops.transcendental, gpu.transcendental_ops);
    let memory_s = per(bytes_min, gpu.memory_bandwidth);
    let terms = [
        ("contraction", contraction_s),
        ("scalar", scalar_s),
        ("transcendental", transcendental_s),
        ("memory", memory_s),
    ];
    let (bound, time) =
        terms.iter().copied().fold(
            ("memory", 0.0f64),
            |best, t| if t.1 > best.1 { t } else { best },
        );
    Roofline {
        gpu: gpu.clone(),
        contraction_s,
        scalar_s,
        transcendental_s,
        memory_s,
        time_lower_bound_s: time,
        bound: bound.to_string(),
        memory_fused_s: per(bytes_fused, gpu.memory_bandwidth),
    }
}

#[cfg(test)]
mod tests;
