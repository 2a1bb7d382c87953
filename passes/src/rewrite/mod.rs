//! The rewrite engine (docs/rewrites.md): finds an equivalent cascade
//! with fewer passes over memory, fewer bytes and fewer FLOPs, and says how it got there.
//!
//! Two layers:
//! - [`algebra`]: expression-level identities (contraction associativity and
//!   commutativity, factoring out of sums, division delay, maps over sums, exponential
//!   and decay factoring, masks) on an e-graph over whole inlined Einsum terms
//!   ([`lang`], [`tree`]), extracted by FLOPs;
//! - structural rewrites that add Einsums, split ranks and introduce recurrences, driven by
//!   pattern matching on the IR: [`split`] (rank split), [`normalizer`] (online
//!   max-normalized sums and split-K with a log-sum-exp merge), [`chunk`] (causal linear
//!   forms into block-chunked recurrent form).
//!
//! [`optimize`] runs them and keeps a rewrite only when the analysis says the cascade got
//! cheaper: fewer passes over memory first, then fewer bytes, then fewer FLOPs
//! ([`CascadeCost`]). Split-K is the one exception: it is chosen, instead of the online
//! form, when so few output points exist that a sequential pass over the keys would leave
//! the GPU idle, something the pass count does not see.

pub mod algebra;
pub mod chunk;
pub mod extract;
pub mod ir_util;
pub mod lang;
pub mod normalizer;
pub mod split;
pub mod tree;

use crate::analysis::{analyze, AnalysisOptions, RankRole, Report};
use einattn_ir::Cascade;
use serde::Serialize;
use std::fmt;

/// Knobs of [`optimize`].
#[derive(Clone, Debug, PartialEq)]
pub struct OptimizeOptions {
    /// The analysis the cost comes from.
    pub analysis: AnalysisOptions,
    /// Tile of the rank split the online rewrite introduces (the largest divisor of the
    /// extent not above it is used).
    pub tile: u64,
    /// Block of the causal chunking (same rule).
    pub block: u64,
    /// Output points of a max-normalized reduction below which split-K replaces the online
    /// form: with fewer independent rows than this, one sequential pass over the keys per
    /// row cannot fill a GPU (H100: 132 SMs).
    pub split_k_below: u64,
    /// Independent work items split-K aims for: the number of key splits is about this
    /// divided by the output points.
    pub split_k_target: u64,
    /// Limits of each equality-saturation run.
    pub limits: algebra::SaturationLimits,
    /// Whether to name the e-graph rules behind each algebra step (egg explanations; a
    /// little slower).
    pub explain: bool,
}

impl Default for OptimizeOptions {
    fn default() -> Self {
        OptimizeOptions {
            analysis: AnalysisOptions::default(),
            tile: 64,
            block: 64,
            split_k_below: 256,
            split_k_target: 1024,
            limits: algebra::SaturationLimits::default(),
            explain: true,
        }
    }
}

/// What a cascade costs. Compared by an estimated time first, so passes, bytes and FLOPs
/// are weighed together: a rewrite that removes a pass over memory but moves more bytes or
/// does more work than the pass saved is not cheaper. Equal times (every group bound by a
/// term the step does not change) fall back to fewer passes over memory, then fewer bytes,
/// then fewer FLOPs.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct CascadeCost {
    /// The roofline time of each fusion group on the analysis's GPU, summed over the
    /// groups, seconds. A group (one pass, one kernel or loop) takes the largest of its
    /// tensor-core, scalar, special-function and memory times: its members' FLOPs
    /// (recomputed members included) and the bytes it moves. Groups run one after the
    /// other, so a pass saved is its whole time saved, and work added to a group counts
    /// as soon as it becomes that group's bound.
    pub time_s: f64,
    /// The most passes over any rank that is not an on-chip tile: trips through memory.
    pub memory_passes: u32,
    /// Bytes the fusion groups move (`bytes_fused`).
    pub bytes: u64,
    pub flops: u64,
}

impl CascadeCost {
    pub fn of(report: &Report) -> CascadeCost {
        let memory = report
            .pass_detail
            .iter()
            .filter(|r| r.role != RankRole::Tile);
        CascadeCost {
            time_s: group_time(report),
            memory_passes: memory.map(|r| r.passes).max().unwrap_or(0),
            bytes: report.bytes_fused,
            flops: report.flops,
        }
    }
}

/// The sum over fusion groups of each group's roofline time (see [`CascadeCost::time_s`]).
fn group_time(report: &Report) -> f64 {
    let gpu = &report.roofline.gpu;
    let per = |work: f64, rate: f64| if rate > 0.0 { work / rate } else { 0.0 };
    let by_name = |name: &str| report.einsums.iter().find(|e| e.einsum == name);
    report
        .fusion_groups
        .iter()
        .map(|g| {
            let (mut contraction, mut scalar, mut transcendental) = (0.0, 0.0, 0.0);
            for m in &g.einsums {
                if let Some(e) = by_name(&m.einsum) {
                    contraction += e.contraction_flops as f64;
                    scalar += e.scalar_flops as f64;
                    transcendental += e.transcendental_ops as f64;
                }
            }
            [
                per(contraction, gpu.contraction_flops),
                per(scalar, gpu.scalar_flops),
                per(transcendental, gpu.transcendental_ops),
                per(g.bytes_moved as f64, gpu.memory_bandwidth),
            ]
            .into_iter()
            .fold(0.0f64, f64::max)
        })
        .sum()
}

impl PartialEq for CascadeCost {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}

impl Eq for CascadeCost {}

impl PartialOrd for CascadeCost {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for CascadeCost {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.time_s
            .total_cmp(&other.time_s)
            .then(self.memory_passes.cmp(&other.memory_passes))
            .then(self.bytes.cmp(&other.bytes))
            .then(self.flops.cmp(&other.flops))
    }
}

impl fmt::Display for CascadeCost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:.3} us, {} pass(es) over memory, {} bytes, {} FLOPs",
            self.time_s * 1e6,
            self.memory_passes,
            self.bytes,
            self.flops
        )
    }
}

/// One rewrite the optimizer kept.
#[derive(Clone, Debug, Serialize)]
pub struct AppliedRule {
    /// The rewrite: `algebra`, `split-rank`, `online-normalizer`, `split-k`,
    /// `causal-chunk`.
    pub rule: String,
    /// For `algebra`: the e-graph rules on the path to the extracted terms, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<String>,
    /// What it did, in a sentence.
    pub detail: String,
    pub before: CascadeCost,
    pub after: CascadeCost,
}

/// A rewrite whose result the validator rejected: discarded, and said so in the log.
#[derive(Clone, Debug, Serialize)]
pub struct RejectedRule {
    pub rule: String,
    pub detail: String,
    /// The validator's first error.
    pub problem: String,
}

/// The result of [`optimize`].
#[derive(Clone, Debug)]
pub struct Optimized {
    pub cascade: Cascade,
    /// Kept rewrites, in the order applied.
    pub applied: Vec<AppliedRule>,
    /// Rewrites whose result was not a valid cascade (a defect of the rule): not applied.
    pub rejected: Vec<RejectedRule>,
    pub before: Report,
    pub after: Report,
    /// Rewrites that applied in form but were not tried, and why (a key rank whose extent
    /// has no tile of a useful size).
    pub notes: Vec<String>,
}

impl Optimized {
    /// The rewrites applied, in order, with the cost before and after each, as text for
    /// `einattn optimize` (the full analyses are `before` and `after`).
    pub fn render_log(&self) -> String {
        let mut out = format!("before: {}\n", CascadeCost::of(&self.before));
        if self.applied.is_empty() {
            out.push_str("no rewrite made the cascade cheaper\n");
        }
        for (k, a) in self.applied.iter().enumerate() {
            out.push_str(&format!("{}. {}: {}\n", k + 1, a.rule, a.detail));
            if !a.rules.is_empty() {
                out.push_str(&format!("   rules: {}\n", a.rules.join(", ")));
            }
            out.push_str(&format!("   {} -> {}\n", a.before, a.after));
        }
        for note in &self.notes {
            out.push_str(&format!("note: {note}\n"));
        }
        for r in &self.rejected {
            out.push_str(&format!(
                "not applied: {}: {}: its result is not a valid cascade ({})\n",
                r.rule, r.detail, r.problem
            ));
        }
        out.push_str(&format!("after: {}\n", CascadeCost::of(&self.after)));
        // The costs above can be saturated or counted coarsely: the analyses say so.
        let mut warnings: Vec<&String> = Vec::new();
        for w in self.before.warnings.iter().chain(&self.after.warnings) {
            if !warnings.contains(&w) {
                warnings.push(w);
            }
        }
        for w in warnings {
            out.push_str(&format!("warning: {w}\n"));
        }
        out
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OptimizeError {
    #[error("the cascade has {0} ranks; the rewrite engine handles at most 128")]
    TooManyRanks(usize),
}

struct State<'o> {
    cascade: Cascade,
    report: Report,
    cost: CascadeCost,
    applied: Vec<AppliedRule>,
    notes: Vec<String>,
    rejected: Vec<RejectedRule>,
    options: &'o OptimizeOptions,
}

/// The smallest tile worth splitting a rank into for a tile of `wanted`: a quarter of it.
/// Below that, the per-tile work (a rescale per tile, a running-state update) stops being
/// amortized: a tile of 1 adds about half the FLOPs of softmax attention.
fn smallest_tile(wanted: u64) -> u64 {
    (wanted / 4).max(2)
}

impl State<'_> {
    fn evaluate(&self, cascade: &Cascade) -> (Report, CascadeCost) {
        let report = analyze(cascade, &self.options.analysis);
        let cost = CascadeCost::of(&report);
        (report, cost)
    }

    /// Keeps `candidate` if it is cheaper (or `force`d), logging `rule`.
    fn offer(
        &mut self,
        candidate: Cascade,
        rule: &str,
        rules: Vec<String>,
        detail: String,
        force: bool,
    ) -> bool {
        // The analysis of a malformed cascade is empty, which would look cheapest of all.
        if let Err(problems) = einattn_ir::validate::validate(&candidate) {
            let problem = problems
                .iter()
                .find(|d| d.is_error())
                .map_or_else(|| "invalid".to_string(), |d| d.message.clone());
            self.rejected.push(RejectedRule {
                rule: rule.to_string(),
                detail,
                problem,
            });
            return false;
        }
        let (report, cost) = self.evaluate(&candidate);
        // A step whose analysis warns of something new (a term summed over a rank it lacks,
        // a count it cannot make) is not judged by that analysis. Counts saturated past
        // 2^64 are not new problems of the step: the cascade had them before, and the log
        // reports them.
        let new: Vec<&String> = report
            .warnings
            .iter()
            .filter(|w| !w.contains("2^64") && !self.report.warnings.contains(w))
            .collect();
        if !new.is_empty() {
            let new: Vec<&str> = new.iter().map(|w| w.as_str()).collect();
            self.note(format!(
                "a {rule} step was dropped: its analysis warns: {}",
                new.join("; ")
            ));
            return false;
        }
        if !(force || cost < self.cost) {
            return false;
        }
        self.applied.push(AppliedRule {
            rule: rule.to_string(),
            rules,
            detail,
            before: self.cost,
            after: cost,
        });
        self.cascade = candidate;
        self.report = report;
        self.cost = cost;
        true
    }

    fn note(&mut self, note: String) {
        if !self.notes.contains(&note) {
            self.notes.push(note);
        }
    }

    fn algebra(&mut self, why: &str) -> bool {
        let out = algebra::saturate(
            &self.cascade,
            &algebra::rules(),
            &self.options.limits,
            self.options.explain,
        );
        if !out.changed {
            return false;
        }
        let detail = format!(
            "{why}: equality saturation ({} iterations, {} e-nodes, {}), cheapest terms by FLOPs",
            out.iterations, out.egraph_nodes, out.stop_reason
        );
        self.offer(out.cascade, "algebra", out.rules_used, detail, false)
    }

    fn chunk(&mut self) -> bool {
        let Some(found) = chunk::find(&self.cascade) else {
            return false;
        };
        let n = self.cascade.ranks[found.query].extent;
        let block = split::tile_dividing(n, self.options.block);
        if block >= n {
            return false;
        }
        if block < smallest_tile(self.options.block) {
            let name = self.cascade.ranks[found.query].name.clone();
            self.note(format!(
                "causal chunking over `{name}` not tried: its extent {n} has no divisor between \
                 {} and {} to block it by (pad it to a multiple of {})",
                smallest_tile(self.options.block),
                self.options.block,
                self.options.block
            ));
            return false;
        }
        let Some(candidate) = chunk::chunk(&self.cascade, &found, block) else {
            return false;
        };
        let detail =
            format!(
            "`{}`: causal linear form over {} <= {} chunked into blocks of {block}{}; the keys of \
             earlier blocks fold into a recurrent state",
            self.cascade.tensors[self.cascade.einsums[found.einsum].output.tensor].name,
            self.cascade.ranks[found.key].name,
            self.cascade.ranks[found.query].name,
            if found.decay.is_some() { ", decay factored per block" } else { "" },
        );
        // The chunked intra-block term is one big product; the algebra reassociates it
        // (scores first, then the values) before the cost is judged.
        let polished = algebra::saturate(
            &candidate,
            &algebra::rules(),
            &self.options.limits,
            self.options.explain,
        );
        let (candidate, rules) = if polished.changed {
            let (_, raw) = self.evaluate(&candidate);
            let (_, better) = self.evaluate(&polished.cascade);
            if better < raw {
                (polished.cascade, polished.rules_used)
            } else {
                (candidate, Vec::new())
            }
        } else {
            (candidate, Vec::new())
        };
        self.offer(candidate, "causal-chunk", rules, detail, false)
    }

    fn normalizer(&mut self) -> bool {
        for (rank, points) in normalizer::max_reduced_ranks(&self.cascade) {
            let extent = self.cascade.ranks[rank].extent;
            let name = self.cascade.ranks[rank].name.clone();
            // Split-K needs at least two slices of at least two keys; otherwise the
            // online form is the fallback.
            let splits = split::tile_dividing(
                extent,
                self.options
                    .split_k_target
                    .div_ceil(points.max(1))
                    .min(extent / 2),
            );
            let decode = points < self.options.split_k_below && splits >= 2;
            let tile = if decode {
                extent / splits
            } else {
                split::tile_dividing(extent, self.options.tile)
            };
            if tile >= extent {
                continue;
            }
            if !decode && tile < smallest_tile(self.options.tile) {
                self.note(format!(
                    "the online rewrite over `{name}` was not tried: its extent {extent} has no \
                     divisor between {} and {} to tile it by (a tile of {tile} would cost more \
                     than the pass it saves; pad `{name}` to a multiple of {})",
                    smallest_tile(self.options.tile),
                    self.options.tile,
                    self.options.tile
                ));
                continue;
            }
            let mut candidate = self.cascade.clone();
            if split::split_rank(&mut candidate, rank, tile).is_err() {
                continue;
            }
            let Some(group) = normalizer::find_group(&candidate, rank) else {
                continue;
            };
            let g = candidate.tensors[candidate.einsums[group.max_einsum].output.tensor]
                .name
                .clone();
            let sums: Vec<String> = group
                .sums
                .iter()
                .map(|s| {
                    candidate.tensors[candidate.einsums[s.einsum].output.tensor]
                        .name
                        .clone()
                })
                .collect();
            let (rewritten, rule, detail) = if decode {
                (
                    normalizer::split_k(&candidate, &group),
                    "split-k",
                    format!(
                        "max `{g}` and sums {} over `{name}`: {} output points are too few for a \
                         sequential pass, so `{name}` splits into {} slices of {tile} reduced in \
                         parallel and merged by log-sum-exp",
                        sums.join(", "),
                        points,
                        extent / tile
                    ),
                )
            } else {
                (
                    normalizer::online(&candidate, &group),
                    "online-normalizer",
                    format!(
                        "max `{g}` and sums {} over `{name}` (tiles of {tile}): running max and \
                         rescaled running sums along the outer rank, one pass",
                        sums.join(", ")
                    ),
                )
            };
            if self.offer(rewritten, rule, Vec::new(), detail, decode) {
                return true;
            }
        }
        false
    }
}

/// Optimizes `cascade`: the algebra first, then structural rewrites until none applies.
/// Every kept step made the analysis cheaper (see the module documentation for split-K).
pub fn optimize(cascade: &Cascade, options: &OptimizeOptions) -> Result<Optimized, OptimizeError> {
    if cascade.ranks.len() > lang::MAX_RANKS / 2 {
        // Rewrites add ranks; keep room for them.
        return Err(OptimizeError::TooManyRanks(cascade.ranks.len()));
    }
    let before = analyze(cascade, &options.analysis);
    let cost = CascadeCost::of(&before);
    let mut state = State {
        cascade: cascade.clone(),
        report: before.clone(),
        cost,
        applied: Vec::new(),
        notes: Vec::new(),
        rejected: Vec::new(),
        options,
    };
    state.algebra("whole cascade");
    for _ in 0..8 {
        if !(state.chunk() || state.normalizer()) {
            break;
        }
    }
    Ok(Optimized {
        cascade: state.cascade,
        applied: state.applied,
        rejected: state.rejected,
        before,
        after: state.report,
        notes: state.notes,
    })
}
