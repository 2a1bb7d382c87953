//! Scheduling: from a cascade to one GPU kernel.
//!
//! [`recognize`] reads the cascade as softmax attention (any pass structure); [`schedule`]
//! then picks the kernel's shape (query rows per CTA, key tile, warps, pipeline stages) by a
//! cost model over the candidate shapes that fit the register file, lets the user override
//! any knob, and [`Schedule::explain`] says what was chosen and why.

// A failed compile builds one diagnostic; boxing it would only add noise to every `?`.
#![allow(clippy::result_large_err)]

use super::recognize::{recognize, AttentionMatch};

use super::program::{AttentionSchedule, AttentionSpec, Normalization, Score};
use super::split::split_count;
use crate::tile::{key_tile_range, Elem, Loads, MmaUnit, SeqRank};
use crate::Target;
use einattn_ir::cascade::{Cascade, Span};
use einattn_ir::validate::{Diagnostic, DiagnosticKind};
use einattn_passes::analysis::GpuModel;
use std::fmt::Write;

/// What the user asks of the scheduler; `None` leaves a knob to the cost model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleOptions {
    pub target: Target,
    /// Storage type of Q, K, V and O (default: the cascade's).
    pub elem: Option<Elem>,
    pub block_m: Option<u32>,
    pub block_n: Option<u32>,
    pub warps: Option<u32>,
    pub stages: Option<u32>,
    /// Tensor-core instructions (default: the kernel family's choice for the target).
    pub mma: Option<crate::tile::MmaUnit>,
    /// Who copies K and V (default: the cost model's choice).
    pub loads: Option<Loads>,
    /// A persistent grid, or one CTA per work tile (default: the scheduler's choice).
    pub persistent: Option<bool>,
    /// Lazy rescaling of the output (see [`AttentionSchedule::lazy_rescale`]; default: lazy
    /// with wgmma, eager with mma.sync).
    pub lazy_rescale: Option<bool>,
    /// The output stored by the copy engine (see [`AttentionSchedule::store_tma`];
    /// default: wherever it applies, from registers elsewhere).
    pub store_tma: Option<bool>,
    /// The probabilities of `P V` through shared memory (see
    /// [`AttentionSchedule::p_in_shared`]; default: in registers).
    pub p_in_shared: Option<bool>,
    /// The wait for the deferred `P V` pinned after the softmax (see
    /// [`AttentionSchedule::pin_deferred_wait`]; default: pinned in warp-specialized kernels).
    pub pin_deferred_wait: Option<bool>,
    /// Q and K are in scratch (pre-kernels write them): the launcher makes tensor maps of
    /// the cascade's tensors only, so the copy engine is not used.
    pub operands_in_scratch: bool,
    /// The output goes to scratch (post-kernels read it): no tensor map of it either.
    pub output_in_scratch: bool,
}

impl Default for ScheduleOptions {
    fn default() -> Self {
        ScheduleOptions {
            target: Target::Sm80,
            elem: None,
            block_m: None,
            block_n: None,
            warps: None,
            stages: None,
            mma: None,
            loads: None,
            persistent: None,
            lazy_rescale: None,
            store_tma: None,
            p_in_shared: None,
            pin_deferred_wait: None,
            operands_in_scratch: false,
            output_in_scratch: false,
        }
    }
}

/// The cost model's view of one candidate kernel shape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// f32 registers per thread the fragments need (accumulators, plus Q when register-resident).
    pub registers: u32,
    pub shared_bytes: u32,
    pub ctas_per_sm: u32,
    /// Predicted kernel time, seconds.
    pub seconds: f64,
    /// Which resource bounds a key tile's time: "tensor cores", "exp/ALU" or "L2 loads".
    pub bound: &'static str,
    /// CTAs per query tile, each walking its run of the key tiles (1: one kernel; more: a
    /// split key loop and a merge kernel, for grids too small to fill the GPU).
    pub splits: u32,
}

/// A scheduled kernel.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub matched: AttentionMatch,
    pub kernel: AttentionSchedule,
    pub target: Target,
    pub estimate: Estimate,
    /// The candidates the model weighed, best first (only when the model chose).
    pub candidates: Vec<(AttentionSchedule, Estimate)>,
    pub reasons: Vec<String>,
    /// Grouped-query decoding with the query heads of each K/V head as one CTA's rows
    /// ([`pack_query_heads`]): how many query heads share a K/V head.
    pub packed_group: Option<u64>,
    /// The store by the copy engine was asked for (`--store tma`), not the default: kernels
    /// it cannot serve (sequence-parallel plans') refuse rather than store directly.
    pub store_asked: bool,
}

impl Schedule {
    pub fn spec(&self) -> &AttentionSpec {
        &self.matched.spec
    }

    /// `--emit schedule`: the mapping, the chosen shape and the model's reasons.
    pub fn explain(&self) -> String {
        let m = &self.matched;
        let mut s = String::new();
        let spec = &m.spec;
        let _ = writeln!(
            s,
            "kernel: {} (target {})",
            spec.kernel_name(),
            self.target.name()
        );
        let _ = writeln!(
            s,
            "problem: batch {} x heads {} x queries {} x keys {}, head dim {}{}, {}",
            m.batch,
            m.heads,
            m.n_q,
            m.n_k,
            spec.head_dim,
            if spec.value_dim == spec.head_dim {
                String::new()
            } else {
                format!(" (value dim {})", spec.value_dim)
            },
            spec.elem.name()
        );
        if let Some(group) = self.packed_group {
            let _ = writeln!(
                s,
                "grouped-query decoding: the {group} query heads of each of the {} K/V heads are one CTA's rows (Q and O read with the head stride as the row stride), so K and V are read once per K/V head",
                m.heads
            );
        } else if m.roles.kv_split.is_some() {
            let kv_heads = m.heads / m.kv_group.max(1);
            let plural =
                |n: u64, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
            let _ = writeln!(
                s,
                "grouped-query attention{}: {}, {}, {} per K/V head; the CTA of query head h reads K/V head h / {}",
                if kv_heads == 1 { " (multi-query)" } else { "" },
                plural(m.heads, "query head"),
                plural(kv_heads, "K/V head"),
                plural(m.kv_group, "query head"),
                m.kv_group
            );
        }
        let _ = writeln!(
            s,
            "grid: (ceil(n_q / {}), batch * heads, {}) = ({}, {}, {}); {} threads",
            self.kernel.block_m,
            self.estimate.splits,
            m.n_q.div_ceil(self.kernel.block_m as u64),
            m.batch * m.heads,
            self.estimate.splits,
            self.kernel.warps * 32 + self.kernel.loads.producer_threads()
        );
        if self.estimate.splits > 1 {
            let _ = writeln!(
                s,
                "split key loop: {} CTAs per query tile, each over its run of the key tiles: {} CTAs of (query tile, batch, head) alone would leave SMs idle; a merge kernel combines their maxima, sums and f32 numerators by log-sum-exp (flash-decoding)",
                self.estimate.splits,
                m.n_q.div_ceil(self.kernel.block_m as u64) * m.batch * m.heads
            );
        }
        let mma = match self.kernel.mma {
            MmaUnit::Sync => "mma.sync m16n8k16 per warp".to_string(),
            MmaUnit::Warpgroup => format!(
                "wgmma m64n{}k16 per warpgroup of 64 rows ({} warpgroup(s))",
                self.kernel.block_n,
                self.kernel.warps / 4
            ),
        };
        let loads = match self.kernel.loads {
            Loads::Cooperative => "cp.async by every thread",
            Loads::ProducerWarpgroup { pingpong, tma } => &format!(
                "{} by a producer warpgroup (warp specialization: mbarriers per stage, setmaxnreg; P V deferred past the next Q K^T{})",
                if tma {
                    "the copy engine (cp.async.bulk.tensor, tensor maps)"
                } else {
                    "cp.async"
                },
                if pingpong {
                    "; warpgroups issue in turn, ping-pong"
                } else {
                    ""
                }
            ),
        };
        let _ = writeln!(
            s,
            "in-kernel loop: key tiles of {} over the iterative key rank, {}-stage ring filled with {loads}, {mma}",
            self.kernel.block_n, self.kernel.stages
        );
        let mut masks: Vec<String> = spec
            .masks()
            .iter()
            .map(|b| match b.direction {
                crate::tile::BandDirection::KeyMinusQuery => format!("m - p <= {}", b.bound),
                crate::tile::BandDirection::QueryMinusKey => format!("p - m <= {}", b.bound),
            })
            .collect();
        for vm in &spec.value_masks {
            let side = |(t, at): (crate::tile::TokenId, crate::tile::TokenAt)| {
                let pos = if at == crate::tile::TokenAt::Row {
                    "p"
                } else {
                    "m"
                };
                format!("{}[{pos}]", spec.tokens[t.index()].name)
            };
            let op = match vm.op {
                crate::tile::CmpOp::Lt => "<",
                crate::tile::CmpOp::Le => "<=",
                crate::tile::CmpOp::Gt => ">",
                crate::tile::CmpOp::Ge => ">=",
                crate::tile::CmpOp::Eq => "==",
                crate::tile::CmpOp::Ne => "!=",
            };
            masks.push(format!(
                "{} {op} {} (values, per element)",
                side(vm.lhs),
                side(vm.rhs)
            ));
        }
        let _ = writeln!(
            s,
            "masks: {}",
            if masks.is_empty() {
                "none".into()
            } else {
                masks.join(", ")
            }
        );
        match spec.normalization {
            Normalization::Softmax => {
                let _ = writeln!(s, "score: {}", spec.score.describe(&spec.tokens));
            }
            Normalization::None => {
                let _ = writeln!(
                    s,
                    "weights: {} (no normalization: no row max or sum; masked weights are 0)",
                    spec.score.describe(&spec.tokens)
                );
            }
        }
        if let Some(sink) = &spec.sink {
            let logit = Score {
                expr: sink.clone(),
                ..spec.score.clone()
            };
            let how = if self.estimate.splits > 1 {
                "the merge counts it once, as one more split with a sum of 1 and no numerator"
            } else {
                "the running max starts at it, the running sum at 1"
            };
            let _ = writeln!(
                s,
                "sink: logit {} in the normalization (no value): {how}",
                logit.describe(&spec.tokens)
            );
        }
        let _ = writeln!(
            s,
            "accumulators: f32 (scores and output){}",
            match spec.normalization {
                Normalization::Softmax => ", running max and sum per row",
                Normalization::None => "",
            }
        );
        let _ = writeln!(s, "cascade read as:");
        for (name, what) in &m.reading {
            let _ = writeln!(s, "  {name:<12} {what}");
        }
        let e = &self.estimate;
        let _ = writeln!(
            s,
            "estimate: {:.3} ms, {} registers/thread for fragments, {} B shared, {} CTA(s)/SM, key tile bound by {}",
            e.seconds * 1e3,
            e.registers,
            e.shared_bytes,
            e.ctas_per_sm,
            e.bound
        );
        if !self.candidates.is_empty() {
            let _ = writeln!(
                s,
                "candidates (block_m x block_n, warps, stages, loads: predicted ms):"
            );
            for (c, e) in self.candidates.iter().take(8) {
                let _ = writeln!(
                    s,
                    "  {:>3} x {:<3} w{} s{} {}: {:.3} ms ({} CTA/SM, {})",
                    c.block_m,
                    c.block_n,
                    c.warps,
                    c.stages,
                    c.loads.name(),
                    e.seconds * 1e3,
                    e.ctas_per_sm,
                    e.bound
                );
            }
        }
        for r in &self.reasons {
            let _ = writeln!(s, "why: {r}");
        }
        s
    }
}

/// Whether tensor maps (rank 4: head dim, sequence, heads, batch) can describe Q, K and V:
/// every stride of an axis longer than 1 a nonzero multiple of 16 bytes, the head dim a
/// whole number of 128-byte boxes.
fn tensor_maps_fit(m: &AttentionMatch) -> bool {
    let bytes = u64::from(m.spec.elem.bytes());
    let kv_heads = m.heads / m.kv_group.max(1);
    [m.spec.head_dim, m.spec.value_dim]
        .iter()
        .all(|&d| (u64::from(d) * bytes).is_multiple_of(u64::from(crate::tile::TMA_BOX_BYTES)))
        && tensor_map_fits(m, &m.q, m.heads)
        && tensor_map_fits(m, &m.k, kv_heads)
        && tensor_map_fits(m, &m.v, kv_heads)
}

/// Whether a tensor map can describe one tensor of the problem: every stride of an axis
/// longer than 1 a nonzero multiple of 16 bytes.
fn tensor_map_fits(m: &AttentionMatch, l: &crate::family::layout::Layout, heads: u64) -> bool {
    let bytes = u64::from(m.spec.elem.bytes());
    [
        (l.stride_seq, m.n_q.max(m.n_k)),
        (l.stride_head, heads),
        (l.stride_batch, m.batch),
    ]
    .iter()
    .all(|&(stride, extent)| extent <= 1 || (stride > 0 && (stride * bytes).is_multiple_of(16)))
}

/// Recognizes the cascade and picks the kernel shape.
pub fn schedule(cascade: &Cascade, options: &ScheduleOptions) -> Result<Schedule, Diagnostic> {
    let mut matched = recognize(cascade)?;
    if let Some(elem) = options.elem {
        if elem == Elem::F32 {
            return Err(Diagnostic::error(
                DiagnosticKind::UnsupportedShape,
                "the attention kernel stores bf16 or f16",
                Span::UNKNOWN,
            ));
        }
        matched.spec.elem = elem;
    }
    let packed_group = pack_query_heads(&mut matched);
    let spec = &matched.spec;
    let gpu = GpuModel::h100();
    let base = AttentionSchedule::default_for(spec);
    let mut reasons = Vec::new();
    let mma = options.mma.unwrap_or(default_mma(options.target));
    if mma == MmaUnit::Warpgroup && options.target != Target::Sm90a {
        return Err(Diagnostic::error(
            DiagnosticKind::UnsupportedShape,
            "wgmma needs the sm_90a target",
            Span::UNKNOWN,
        )
        .with_help("pass `--target sm_90a`, or leave out `--mma wgmma`"));
    }
    if options.p_in_shared == Some(true) && mma != MmaUnit::Warpgroup {
        return Err(Diagnostic::error(
            DiagnosticKind::UnsupportedShape,
            "probabilities through shared memory feed wgmma's shared-memory operand; mma.sync takes them from registers at no cost",
            Span::UNKNOWN,
        )
        .with_help("pass `--target sm_90a`, or leave out `--probs shared`"));
    }
    // With wgmma, both ways of loading compete (ping-pong where it measured faster, at
    // head dim 128: bench/results/softmax-ws_2026-12-04); the producer copies with the copy
    // engine wherever tensor maps can describe Q, K and V (bench/results/softmax-tma_2026-12-04).
    let tma = !options.operands_in_scratch && tensor_maps_fit(&matched);
    let producer = Loads::ProducerWarpgroup {
        pingpong: spec.head_dim >= 128,
        tma,
    };
    if options.loads.is_some_and(Loads::tma) && !tma {
        return Err(Diagnostic::error(
            DiagnosticKind::UnsupportedShape,
            "the copy engine cannot address Q, K or V: a tensor map needs every batch, sequence and head stride to be a nonzero multiple of 16 bytes",
            Span::UNKNOWN,
        )
        .with_help("pass `--loads producer` (cp.async) instead"));
    }
    let loads_options = match (options.loads, mma) {
        (Some(l), _) => vec![l],
        // A persistent grid and the copy engine's store of the output are a warp-specialized
        // kernel's.
        (None, MmaUnit::Warpgroup)
            if options.persistent == Some(true) || options.store_tma == Some(true) =>
        {
            vec![producer]
        }
        (None, MmaUnit::Warpgroup) => vec![Loads::Cooperative, producer],
        (None, MmaUnit::Sync) => vec![Loads::Cooperative],
    };
    let loads = loads_options[0];
    if loads.specialized() && mma != MmaUnit::Warpgroup {
        return Err(Diagnostic::error(
            DiagnosticKind::UnsupportedShape,
            "a producer warpgroup (warp specialization) needs wgmma",
            Span::UNKNOWN,
        )
        .with_help("pass `--target sm_90a`, or leave out `--loads producer`"));
    }
    let fixed = |o: Option<u32>| o.map(|v| vec![v]);
    // wgmma gives each warp 16 rows of a 64-row warpgroup tile; mma.sync warps own 16 or 32.
    // One-warp CTAs of 16 rows would waste the least MMA work when decoding, but their
    // kernels failed `check` on an H200 (2026-12-04, mma.sync, split key loop): not offered.
    let (default_ms, default_warps) = match mma {
        MmaUnit::Sync => (vec![64, 128], vec![4]),
        MmaUnit::Warpgroup => (vec![64, 128, 192], vec![4, 8, 12]),
    };
    let block_ms = fixed(options.block_m).unwrap_or(default_ms);
    let block_ns = fixed(options.block_n).unwrap_or_else(|| vec![32, 64, 128]);
    let warps = fixed(options.warps).unwrap_or(default_warps);
    let stages = fixed(options.stages).unwrap_or_else(|| vec![2, 3]);
    let mut candidates = Vec::new();
    for &bm in &block_ms {
        for &bn in &block_ns {
            for &w in &warps {
                for &st in &stages {
                    for &loads in &loads_options {
                        // The producer serves two or more consumer warpgroups (a lone one
                        // could not raise its registers), which overlap their softmax and
                        // matrix products; decoding's 64-row tiles stay cooperative, several
                        // CTAs per SM (measured faster on an H200, 2026-12-04: 1.01x against
                        // 0.99x of cuDNN at B=8 N=32768).
                        if loads.specialized() && w < 8 {
                            continue;
                        }
                        let k = AttentionSchedule {
                            block_m: bm,
                            block_n: bn,
                            warps: w,
                            stages: st,
                            mma,
                            loads,
                            p_in_shared: options.p_in_shared == Some(true),
                            ..base
                        };
                        if !shape_is_legal(spec, &k) {
                            continue;
                        }
                        if let Some(e) = estimate(&matched, &k, &gpu) {
                            candidates.push((k, e));
                        }
                    }
                }
            }
        }
    }
    if candidates.is_empty() {
        return Err(Diagnostic::error(
            DiagnosticKind::UnsupportedShape,
            "no kernel shape fits: the requested tile sizes exceed the register file or shared memory, or are not multiples of 16 rows per warp",
            Span::UNKNOWN,
        )
        .with_help("legal shapes: block_m = 16 * warps * {1, 2}, block_n in {16, 32, 64, 128} (with wgmma, a multiple of 16 up to 256; with cp.async, of the copying threads / 8 too; with --probs shared, of 64), stages 2-4; with --loads producer or pingpong, wgmma and 8 or more warps"));
    }
    candidates.sort_by(|a, b| a.1.seconds.total_cmp(&b.1.seconds));
    let (mut kernel, estimate) = candidates[0];
    let persistent = persistent_grid(&matched, &kernel, &estimate, options.persistent, &gpu)?;
    kernel.persistent = persistent.ctas;
    let lazy_reason = lazy_rescale(&mut kernel, spec, estimate.splits, options.lazy_rescale);
    let store_reason = store_by_copy_engine(&mut kernel, &matched, &estimate, options)?;
    let overridden = [
        options.block_m,
        options.block_n,
        options.warps,
        options.stages,
    ]
    .iter()
    .any(Option::is_some);
    if overridden {
        reasons.push("some knobs were set on the command line; the model chose the rest".into());
    }
    reasons.push(format!(
        "{} rows per CTA: each K/V tile read into shared memory feeds {} query rows, and {} CTA(s) fit per SM",
        kernel.block_m, kernel.block_m, estimate.ctas_per_sm
    ));
    let register_limit = register_limit(&kernel);
    reasons.push(format!(
        "key tile {}: the score and output accumulators take {} registers per thread (of {register_limit}), leaving room for the softmax temporaries",
        kernel.block_n, estimate.registers
    ));
    let rival = candidates
        .iter()
        .find(|(c, _)| c.loads.specialized() != kernel.loads.specialized());
    let rival = rival.map_or(String::new(), |(c, e)| {
        format!(
            " ({:.3} ms predicted against {:.3} ms for the best {} shape, {} x {})",
            estimate.seconds * 1e3,
            e.seconds * 1e3,
            c.loads.name(),
            c.block_m,
            c.block_n
        )
    });
    match kernel.loads {
        Loads::Cooperative => reasons.push(format!(
            "loads: every thread copies its share of K and V, one CTA-wide barrier per key tile{rival}"
        )),
        Loads::ProducerWarpgroup { pingpong, tma } => {
            reasons.push(format!(
                "loads: warp specialization{rival}: a producer warpgroup (setmaxnreg {} registers) fills the K and V rings{}, the {} consumer warpgroups (setmaxnreg {register_limit}) wait on per-stage mbarriers and defer each P V past the next Q K^T so the softmax overlaps it",
                crate::tile::producer_registers(kernel.loads),
                if tma {
                    " (one thread issues the copy engine's tile copies)"
                } else {
                    " (128 threads issue cp.async)"
                },
                kernel.warps / 4
            ));
            reasons.push(if pingpong {
                "ping-pong: the consumer warpgroups issue their matrix products in turn, one's softmax under the other's (measured faster at head dim 128 on an H200)".into()
            } else {
                "no ping-pong: the consumer warpgroups issue as they are ready (taking turns measured slower at head dim 64 on an H200)".into()
            });
        }
    }
    reasons.push(persistent.reason);
    reasons.extend(lazy_reason);
    reasons.extend(store_reason);
    // Pinned by default: -1% to +8% against free on an H100, faster in 15 of 16 cases (2026-12-05,
    // bench/results/softmax-pinned_2026-12-05).
    let pin = options.pin_deferred_wait;
    if pin != Some(false) && kernel.loads.specialized() {
        kernel.pin_deferred_wait = true;
        reasons.push(format!(
            "P V wait: pinned ({}): a fence keeps the wait for the previous tile's P V after this tile's softmax, which ptxas would otherwise serialize behind it",
            if pin == Some(true) { "asked" } else { "the default, measured faster on an H100" }
        ));
    } else if pin == Some(true) {
        reasons.push(
            "P V wait: nothing to pin (asked): without a producer warpgroup no P V is deferred"
                .into(),
        );
    }
    if kernel.p_in_shared {
        // (wgmma only: refused above with mma.sync.)
        reasons.push(format!(
            "probabilities: through shared memory (asked): each warpgroup writes its rows of P ({} x {}, {} B) and its wgmma reads them back through a descriptor, so no register holds them beside the next tile's scores",
            kernel.block_m,
            kernel.block_n,
            kernel.block_m * kernel.block_n * spec.elem.bytes(),
        ));
    }
    if kernel.skip_unit_rescale && !kernel.lazy_rescale {
        reasons.push("the rescale of the output is skipped when no row's max grew (saves registers under 255)".into());
    }
    if spec.score.scaled_dot().is_some() {
        reasons.push(
            "score is scale * q.k: the scale rides on the max and the exponent (one FMA), which needs scale > 0"
                .into(),
        );
    }
    Ok(Schedule {
        matched,
        kernel,
        target: options.target,
        estimate,
        candidates,
        reasons,
        packed_group,
        store_asked: options.store_tma == Some(true),
    })
}

/// The grid the scheduler chose, and why.
struct PersistentChoice {
    ctas: Option<u32>,
    reason: String,
}

/// A persistent grid (one CTA per SM looping over the work tiles) for a warp-specialized
/// kernel whose key loop is whole and not narrowed, when asked (`--grid persistent`); one
/// CTA per work tile otherwise: measured on an H200, the persistent grid was 1-3% faster
/// without masks but 4-10% slower causal (bench/results/softmax-persistent_2026-12-05).
fn persistent_grid(
    m: &AttentionMatch,
    k: &AttentionSchedule,
    e: &Estimate,
    asked: Option<bool>,
    gpu: &GpuModel,
) -> Result<PersistentChoice, Diagnostic> {
    let masked = !m.spec.masks().is_empty();
    let per_tile = PersistentChoice {
        ctas: None,
        reason: format!(
            "not persistent: one CTA per (query tile, batch, head){}",
            if masked {
                ", the query tiles with the most key tiles launched first"
            } else {
                ""
            }
        ),
    };
    let blocker = if !k.loads.specialized() {
        Some("a persistent grid needs a producer warpgroup (`--loads producer` on sm_90a)")
    } else if e.splits > 1 {
        Some("a persistent grid walks whole key loops, and this kernel splits its keys across CTAs")
    } else if m.spec.key_narrowing().is_some() {
        Some("a persistent grid cannot narrow a work tile's keys by a value mask (the scan needs a barrier of the whole CTA)")
    } else {
        None
    };
    match (asked, blocker) {
        (Some(true), Some(why)) => Err(Diagnostic::error(
            DiagnosticKind::UnsupportedShape,
            why,
            Span::UNKNOWN,
        )
        .with_help("leave out `--grid persistent`")),
        (Some(true), None) => Ok(PersistentChoice {
            ctas: Some(gpu.sm_count),
            reason: format!(
                "persistent (asked): at most {} CTAs, one per SM, loop over the (query tile, batch, head) tiles{}; the producer loads the next tile's Q while the consumers finish the current one",
                gpu.sm_count,
                if masked {
                    ", the query tiles with the most key tiles first"
                } else {
                    ""
                }
            ),
        }),
        _ => Ok(per_tile),
    }
}

/// Lazy rescaling (`--rescale lazy`; the default of wgmma kernels, eager elsewhere): the
/// kernel keeps each row's running max until a tile's scores exceed it by 2^8, and skips
/// the output's rescale when no row of a warp moved (the vote of `skip_unit_rescale`).
/// Measured on an H100 (2026-12-05, bench/results/softmax-pinned_2026-12-05) with the
/// pinned wait: -1.5% to +9% against eager, faster in 14 of 16 cases. mma.sync kernels stay eager unless asked (not
/// measured there). A partial kernel (split decoding, sequence-parallel blocks) stays
/// eager, since its max is read by a merge. Returns the reason to print, if any.
fn lazy_rescale(
    k: &mut AttentionSchedule,
    spec: &AttentionSpec,
    splits: u32,
    asked: Option<bool>,
) -> Option<String> {
    let want = asked.unwrap_or(k.mma == MmaUnit::Warpgroup);
    if !want || spec.normalization == Normalization::None {
        return None;
    }
    let how = if asked == Some(true) {
        "asked"
    } else {
        "the default with wgmma, measured faster on an H100"
    };
    if spec.partial || splits > 1 {
        return (asked == Some(true)).then(|| {
            "rescale: eager although lazy was asked: this kernel's max is a partial statistic a merge reads".into()
        });
    }
    k.lazy_rescale = true;
    k.skip_unit_rescale = true;
    Some(format!(
        "rescale: lazy ({how}): a row's running max moves only when a tile's scores exceed it by a factor of more than 2^{} (no probability exceeds that); a warp whose rows all kept theirs skips the rescale of the output",
        super::program::LAZY_RESCALE_LOG2
    ))
}

/// The output stored by the copy engine (`--store tma`): through the query tile's shared
/// memory, one box of 64 rows per consumer warpgroup. The default wherever it applies
/// (measured on an H100, 2026-12-05, bench/results/softmax-pinned_2026-12-05: with the
/// pinned wait and lazy rescaling, d = 128 N = 4096 non-causal 1.07x cuDNN against 1.03x
/// from registers, within 3% either way elsewhere); from registers where it does not, or
/// refused with the reason where it was asked.
fn store_by_copy_engine(
    k: &mut AttentionSchedule,
    m: &AttentionMatch,
    e: &Estimate,
    options: &ScheduleOptions,
) -> Result<Option<String>, Diagnostic> {
    if options.store_tma == Some(false) {
        return Ok(None);
    }
    let spec = &m.spec;
    let blocker = if options.output_in_scratch {
        Some("the attention output goes to scratch for the kernels after it, and a launcher makes tensor maps of the cascade's tensors only")
    } else if !tensor_maps_fit(m) {
        Some("the copy engine stores the output only where tensor maps describe Q, K and V: every batch, sequence and head stride a nonzero multiple of 16 bytes")
    } else if !k.loads.tma() {
        Some("the copy engine stores the output only in kernels whose producer copies with it (`--loads producer-tma` or `pingpong-tma`)")
    } else if k.persistent.is_some() {
        Some("a persistent producer refills the query tile the output would pass through")
    } else if e.splits > 1 || spec.partial || spec.query_offset {
        Some("the copy engine stores whole output tiles of one key loop")
    } else if spec.value_dim > spec.head_dim {
        Some("the output passes through the query tile, which is narrower than it")
    } else if !tensor_map_fits(m, &m.o, m.heads) {
        Some("a tensor map needs every batch, sequence and head stride of the output to be a nonzero multiple of 16 bytes")
    } else {
        None
    };
    match (blocker, options.store_tma) {
        (Some(why), Some(true)) => {
            Err(
                Diagnostic::error(DiagnosticKind::UnsupportedShape, why, Span::UNKNOWN)
                    .with_help("leave out `--store tma`"),
            )
        }
        (Some(_), _) => Ok(None),
        (None, asked) => {
            k.store_tma = true;
            Ok(Some(format!(
                "store: the copy engine ({}): each consumer warpgroup writes its 64 output rows into its rows of the query tile, one thread stores them by tensor map",
                if asked == Some(true) { "asked" } else { "the default where it applies, measured faster on an H100" }
            )))
        }
    }
}

/// Grouped-query decoding (one query per head, no masks, no per-token input; per-head
/// parameters become per-row tokens): the `group` query heads that share a K/V head become the rows of one query tile,
/// read with the head stride as the row stride, and the kernel's heads are the K/V heads.
/// Each K/V head is then read by one CTA (or one per split of its keys) rather than by
/// `group`: K and V, which dominate decoding's traffic, cross from memory once. Returns the
/// group when it packs.
pub fn pack_query_heads(m: &mut AttentionMatch) -> Option<u64> {
    use crate::tile::{ScalarExpr, TokenAt, TokenId, TokenParam};
    let group = m.kv_group;
    let spec = &m.spec;
    // Per-query-head parameters (ALiBi slopes, gpt-oss's sink logits) may stay: the packed
    // rows read them as tokens, one value per row (query head). Per-token inputs may not.
    if group <= 1
        || m.n_q != 1
        || !spec.masks().is_empty()
        || !spec.value_masks.is_empty()
        || !spec.tokens.is_empty()
        || spec.query_offset
        || m.head_params.len() != spec.score.head_params.len()
    {
        return None;
    }
    m.n_q = group;
    m.heads /= group;
    m.kv_group = 1;
    for l in [&mut m.q, &mut m.o] {
        l.stride_seq = l.stride_head;
        l.stride_head *= group;
    }
    // Each per-head array over query heads seen as [batch, row, K/V head]: row r of K/V
    // head g reads param[g * group + r].
    let mut tokens = Vec::new();
    for (tensor, name) in m
        .head_params
        .drain(..)
        .zip(m.spec.score.head_params.drain(..))
    {
        m.tokens.push(crate::family::Layout {
            tensor,
            stride_batch: 0,
            stride_seq: 1,
            stride_head: group,
            elements: group * m.heads,
        });
        m.spec.tokens.push(TokenParam { name, extent: None });
        tokens.push(TokenId(m.spec.tokens.len() as u32 - 1));
    }
    // The one query sits at position 0; the packed rows are heads, not positions.
    fn repack(e: &ScalarExpr, tokens: &[TokenId]) -> ScalarExpr {
        match e {
            ScalarExpr::Head(id) => ScalarExpr::Token(tokens[id.index()], TokenAt::Row),
            ScalarExpr::Index(SeqRank::Query) => ScalarExpr::Lit(0.0),
            other => other.map_children(&mut |c| repack(c, tokens)),
        }
    }
    m.spec.score.expr = repack(&m.spec.score.expr, &tokens);
    m.spec.sink = m.spec.sink.as_ref().map(|s| repack(s, &tokens));
    Some(group)
}

/// The tensor-core instructions a target's softmax kernels use unless told otherwise. On
/// sm_90a, wgmma: measured on an H200 (2026-12-03, bench/results/first-runs_2026-12-03) at
/// 0.75-0.85 of cuDNN with 128 x 128 tiles at d=128 and 0.84-0.90 at d=64, where mma.sync
/// reaches 0.60-0.62 and 0.74.
pub fn default_mma(target: Target) -> MmaUnit {
    match target {
        Target::Sm80 => MmaUnit::Sync,
        Target::Sm90a => MmaUnit::Warpgroup,
    }
}

/// Registers a thread of the kernel may use: what `setmaxnreg` gives a warp-specialized
/// kernel's consumers, else the architectural 255.
fn register_limit(k: &AttentionSchedule) -> u32 {
    if k.loads.specialized() {
        crate::tile::consumer_registers(k.warps * 32, k.loads)
    } else {
        255
    }
}

/// Shapes the Tile IR lowering accepts: whole m16 tiles per warp, at most two per warp
/// (mma.sync); exactly one per warp in whole warpgroups (wgmma). With wgmma the key tile is
/// any multiple of 16 up to 256: it is the N of Q K^T (multiples of 8 up to 256) and the K
/// of P V (k16 steps). mma.sync keeps 16, 32, 64 and 128, the widths its register model
/// was measured at (an 80-wide tile at d = 128 spilled where the model admitted it,
/// ptxas 2026-12-05). `cp.async` copies a tile in steps of
/// one 16-byte chunk per thread, eight threads per 128-byte row, so the copying threads
/// over 8 must divide the rows of Q's and K/V's tiles; the copy engine takes any rows
/// (a box of at most 256).
pub fn shape_is_legal(spec: &AttentionSpec, k: &AttentionSchedule) -> bool {
    let rows = k.block_m / k.warps.max(1);
    let (rows_ok, key_tile_ok) = match k.mma {
        MmaUnit::Sync => (
            rows.is_multiple_of(16) && (16..=32).contains(&rows),
            [16, 32, 64, 128].contains(&k.block_n),
        ),
        MmaUnit::Warpgroup => (
            rows == 16 && k.warps.is_multiple_of(4),
            k.block_n.is_multiple_of(16) && (16..=256).contains(&k.block_n),
        ),
    };
    let copy_rows = match k.loads {
        Loads::Cooperative => k.warps * 32 / 8,
        Loads::ProducerWarpgroup { tma: false, .. } => crate::tile::PRODUCER_THREADS / 8,
        Loads::ProducerWarpgroup { tma: true, .. } => 1,
    };
    // Probabilities through shared memory are a shared tile: whole 64-column blocks.
    let probs_ok = !k.p_in_shared || k.block_n.is_multiple_of(64);
    k.warps > 0
        && k.block_m.is_multiple_of(k.warps)
        && rows_ok
        && key_tile_ok
        && probs_ok
        && k.block_n.is_multiple_of(copy_rows)
        && k.block_m.is_multiple_of(copy_rows)
        && (2..=4).contains(&k.stages)
        && spec.head_dim.is_multiple_of(16)
        && spec.value_dim.is_multiple_of(16)
}

/// The register model: f32 registers per thread for the fragments (the estimate's
/// `registers`), and the rest a kernel of this shape needs beside them (addresses, loop
/// state, softmax temporaries, the probabilities' A fragments), from ptxas reports.
fn registers_needed(spec: &AttentionSpec, k: &AttentionSchedule) -> (u32, u32) {
    // Q . K runs over `d` columns, P V and the output over `dv`.
    let (d, dv) = (spec.head_dim as u64, spec.value_dim as u64);
    let rows16 = (k.block_m / k.warps / 16) as u64;
    // Fragments: scores (m16 x n8 tiles, 4 f32 each), output accumulator, and Q when it
    // stays in registers. P reuses the scores' registers after conversion.
    let score_regs = rows16 * (k.block_n as u64 / 8) * 4;
    let out_regs = rows16 * (dv / 8) * 4;
    let q_regs = if k.q_in_registers {
        rows16 * (d / 16) * 4
    } else {
        0
    };
    let registers = (score_regs + out_regs + q_regs) as u32;
    // Addresses, loop counters, row state and softmax temporaries take about 40 more with
    // mma.sync (B fragments pass through registers). With wgmma, about 16 plus the
    // probabilities' A fragments (block_n / 4 registers), which live beside the scores:
    // ptxas gave 111, 122 and 164 registers for 32-, 64- and 128-wide key tiles at d=128,
    // 78, 97 and 154 at d=64 (2026-12-03).
    // Few threads issue many cp.async per key tile, each with its own address: past 32
    // per thread (4 warps loading 128 x 128 K and V tiles) they take registers too (one
    // warp loading 128-key tiles at d=128 spilled, ptxas 2026-12-04).
    let loads_per_thread = (k.block_n as u64 * (d + dv) * spec.elem.bytes() as u64
        / 16
        / (32 * k.warps as u64)) as u32;
    // Probabilities through shared memory are packed and stored four registers at a time.
    let probs = if k.p_in_shared { 4 } else { k.block_n / 4 };
    let overhead = match k.mma {
        MmaUnit::Sync => 40 + loads_per_thread.saturating_sub(32),
        MmaUnit::Warpgroup => 16 + probs,
    } + if k.loads.specialized() {
        // Stage, phase and barrier addresses; P of the deferred P V beside the next scores.
        // The widest key tiles ptxas (CUDA 13.0, 2026-12-05) fits without spilling: 176 at
        // d = 128 and 208 at d = 64 with 224 registers (128 rows), 112 at d = 64 with 152
        // (192 rows); one step of 16 more spills each. 12 separates the two. A modified
        // score's hoisted constants and per-column terms take more: ALiBi kernels at those
        // widths spilled 20-32 bytes.
        12 + if spec.modifies_score() {
            k.block_n / 16
        } else {
            0
        }
    } else {
        0
    };
    (registers, overhead)
}

/// Whether the register model admits the shape: its fragments and overhead within what a
/// thread gets (255, or the consumers' `setmaxnreg`). A shape it admits must assemble
/// without spills (the ptxas tests hold it to that).
pub fn fits_registers(spec: &AttentionSpec, k: &AttentionSchedule) -> bool {
    let (registers, overhead) = registers_needed(spec, k);
    registers + overhead <= register_limit(k)
}

/// The cost model. A CTA walks its key tiles; each tile costs the larger of its tensor-core
/// time (mma.sync reaches about half of the dense peak, plus the fragment reads from shared
/// memory that feed it), its exponential and ALU time, and
/// its K/V load time from L2 (shared by the CTAs of an SM); CTAs on one SM overlap those
/// resources, so the SM's time is the bottleneck resource's total. Shapes whose fragments
/// need more than 255 registers per thread (spills) or whose shared memory exceeds the SM
/// are rejected.
pub fn estimate(m: &AttentionMatch, k: &AttentionSchedule, gpu: &GpuModel) -> Option<Estimate> {
    let spec = &m.spec;
    let (d, dv) = (spec.head_dim as u64, spec.value_dim as u64);
    let (registers, overhead) = registers_needed(spec, k);
    // A warp-specialized CTA runs alone on its SM, its consumers with the registers the
    // producer leaves (setmaxnreg).
    let specialized = k.loads.specialized();
    if registers + overhead > register_limit(k) {
        return None;
    }
    let elem_bytes = spec.elem.bytes() as u64;
    let probs = if k.p_in_shared {
        k.block_m as u64 * k.block_n as u64
    } else {
        0
    };
    let shared = ((k.block_m as u64 * d + k.stages as u64 * k.block_n as u64 * (d + dv) + probs)
        * elem_bytes) as u32;
    let smem_per_sm = gpu.shared_memory_per_sm as u32;
    if shared > smem_per_sm {
        return None;
    }
    let threads = k.warps * 32;
    let regs_alloc = (registers + overhead).div_ceil(8) * 8;
    let by_regs = (65536 / (regs_alloc.max(64) * threads)).max(1);
    let ctas_per_sm = if specialized {
        1
    } else {
        (smem_per_sm / (shared + 1024)).min(by_regs).clamp(1, 8)
    };
    let clock = 1.755e9;
    let sms = gpu.sm_count as f64;
    // Per-SM rates per clock.
    // mma.sync sustains about 500 TFLOP/s on Hopper: 0.65 of the 771 TFLOP/s this model was
    // calibrated against, 0.51 of the 989 TFLOP/s datasheet peak of the machine table.
    let mma_flops = gpu.contraction_flops * (0.65 * 771.0 / 989.0) / sms / clock;
    let sfu_ops = gpu.transcendental_ops / sms / clock;
    let alu_flops = gpu.scalar_flops / sms / clock;
    let l2_bytes = 5.5e12 / sms / clock;
    let bm = k.block_m as f64;
    let bn = k.block_n as f64;
    // Each warp reads the whole K and V tiles from shared memory as B fragments (ldmatrix,
    // 128 B/clock/SM), plus Q's A fragments when Q is not register-resident; within a warp
    // those reads only half overlap its MMAs.
    let smem_bytes = k.warps as f64 * bn * (d + dv) as f64 * elem_bytes as f64
        + if k.q_in_registers {
            0.0
        } else {
            bm * d as f64 * elem_bytes as f64
        };
    let tile_mma = match k.mma {
        MmaUnit::Sync => 2.0 * bm * bn * (d + dv) as f64 / mma_flops + 0.5 * smem_bytes / 128.0,
        // wgmma reads its operands from shared memory itself (no ldmatrix), at about 0.75
        // of the dense peak when the accumulators are large enough to hide its latency.
        // Each tile also pays two round trips through the asynchronous unit (the softmax
        // waits for S = QK^T, the next tile's QK^T for P V), about 150 clocks each; with
        // small key tiles that latency, not the arithmetic, sets the pace.
        MmaUnit::Warpgroup => {
            2.0 * bm * bn * (d + dv) as f64 / (mma_flops * 0.75 / (0.65 * 771.0 / 989.0)) + 300.0
        }
    };
    let extra_ops = if spec.modifies_score() { 6.0 } else { 0.0 };
    // Per tile, besides the per-score work: the output rescale (block_m x d multiplies),
    // the row max and sum shuffles, and the barrier and cp.async wait of the stage ring.
    let tile_softmax = bm * bn / sfu_ops
        + bm * bn * (10.0 + extra_ops) / alu_flops
        + bm * dv as f64 / alu_flops
        + 300.0;
    let tile_load = bn * (d + dv) as f64 * elem_bytes as f64 / l2_bytes;
    let (bound, _) = [
        ("tensor cores", tile_mma),
        ("exp/ALU", tile_softmax),
        ("L2 loads", tile_load),
    ]
    .into_iter()
    .fold(("", 0.0), |acc, x| if x.1 > acc.1 { x } else { acc });
    let masks = spec.masks();
    let q_tiles = m.n_q.div_ceil(k.block_m as u64);
    let mut key_tiles_total = 0u64;
    let mut key_tiles_max = 0u64;
    for t in 0..q_tiles {
        let p0 = (t * k.block_m as u64) as i64;
        let p_last = (p0 + k.block_m as i64 - 1).min(m.n_q as i64 - 1);
        let r = key_tile_range(&masks, p0, p_last, m.n_k as i64, k.block_n as i64);
        let n = (r.end - r.begin).max(0) as u64;
        key_tiles_total += n;
        key_tiles_max = key_tiles_max.max(n);
    }
    let mut ctas = q_tiles * m.batch * m.heads;
    // Too few CTAs for the GPU (decoding: one query per head over a long cache): split
    // each query tile's key loop across CTAs, merged by a second small kernel. A kernel
    // that writes its log-sum-exp keeps one CTA per tile.
    // Value masks stay unsplit too (their token reads assume one key loop per query tile).
    // Unnormalized attention too: its merge would be a sum, not a log-sum-exp.
    let splits = if spec.write_lse
        || !spec.value_masks.is_empty()
        || spec.normalization == Normalization::None
    {
        1
    } else {
        split_count(
            ctas,
            key_tiles_max * u64::from(k.block_n),
            u64::from(gpu.sm_count * ctas_per_sm),
            spec.value_dim,
        )
    };
    ctas *= u64::from(splits);
    let key_tiles_max = key_tiles_max.div_ceil(u64::from(splits));
    let slots = (gpu.sm_count * ctas_per_sm) as f64;
    // CTAs actually sharing an SM: a small grid leaves slots empty.
    let resident = (ctas.div_ceil(gpu.sm_count as u64) as u32).clamp(1, ctas_per_sm);
    // Clocks for one SM to run one key tile of each of its resident CTAs. One CTA alone
    // serializes MMA and softmax; co-resident CTAs overlap them, so the SM's time is its
    // busiest resource's.
    // Two warpgroups of one CTA overlap too, one's softmax under the other's wgmma, but only
    // in part: the stage ring's CTA-wide barrier realigns them every key tile (measured on an
    // H200, 2026-12-03: at d=64 one 8-warp CTA of 128 x 128 ran 0.77x as fast as three
    // 4-warp CTAs of 64 x 128 per SM).
    let busiest = tile_mma.max(tile_softmax + tile_load * 0.3).max(tile_load);
    let tile_clocks = if specialized {
        // The producer warpgroup takes the loads and the CTA-wide barrier off the
        // consumers; the deferred P V overlaps each warpgroup's softmax with its own matrix
        // products, and the warpgroups overlap each other's. What stays serial: the wait for
        // Q K^T before the softmax (measured on an H200, 2026-12-04: 128 x 128 tiles 7-13%
        // faster than the cooperative 128 x 64 default at d = 64 and 128).
        let softmax = tile_softmax - 200.0;
        tile_mma.max(softmax).max(tile_load) + 0.2 * tile_mma.min(softmax)
    } else if resident >= 2 {
        busiest * resident as f64
    } else if k.mma == MmaUnit::Warpgroup && k.warps >= 8 {
        busiest + 0.5 * tile_mma.min(tile_softmax + tile_load * 0.3)
    } else {
        tile_mma + tile_softmax + tile_load * 0.5
    } * if k.mma == MmaUnit::Warpgroup && !specialized {
        // The consumers' own copies and the CTA-wide barrier of every key tile: measured
        // against the producer form on an H200 (2026-12-04), about 9%.
        1.09
    } else {
        1.0
    };
    let total_tiles = (key_tiles_total * m.batch * m.heads) as f64;
    let waves = (ctas as f64 / slots).ceil().max(1.0);
    let busy = total_tiles / (gpu.sm_count * resident) as f64 * tile_clocks;
    let longest = key_tiles_max as f64 * tile_clocks;
    // A CTA's prologue (Q load) and epilogue (O store) cost about two tiles' loads.
    let fixed = waves * 2.0 * tile_load * resident as f64;
    // The merge: a launch, and every split's f32 numerator read once.
    let merge = if splits > 1 {
        let bytes = (m.batch * m.heads * m.n_q * dv * 4 * u64::from(splits)) as f64;
        5e-6 * clock + bytes / (l2_bytes * sms)
    } else {
        0.0
    };
    let clocks = busy.max(longest) + fixed + merge;
    Some(Estimate {
        registers,
        shared_bytes: shared,
        ctas_per_sm,
        seconds: clocks / clock,
        bound,
        splits,
    })
}
