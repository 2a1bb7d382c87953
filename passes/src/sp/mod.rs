//! Sequence parallelism: split the sequence rank across `P` devices, find what crosses
//! the split, enumerate the schemes that apply, cost them and pick one (docs/architecture.md
//! section 8; docs/sp.md).
//!
//! - [`seq`]: which ranks are the sequence (queries and keys);
//! - [`classify`]: what each dependency across the split is (a linear recurrence over a
//!   fixed-size state, a running max, a sum rescaled by the running max, a reduction over
//!   all keys) and which Einsums form the epilogue;
//! - [`schemes`]: LASP-2, LASP-1, all-gather of K/V (LASP-2H), Ring, TokenRing, Ulysses,
//!   zigzag layouts, and which (query chunk, key chunk) pairs a causal mask leaves;
//! - [`cost`]: bytes, collectives, steps and time per scheme from the analysis' FLOPs and
//!   a link model;
//! - [`local`]: per-device cascades (a window of the sequence, states from inputs), which
//!   the CPU plan interpreter in `einattn-backends` evaluates.
//!
//! The plan format and its emitter live in `einattn_backends::plan`.

pub mod classify;
pub mod cost;
pub mod expr;
pub mod local;
pub mod schemes;
pub mod seq;

pub use classify::{classify, CarriedState, Classification, StateRole};
pub use cost::{CostParams, Estimate, LinkModel};
pub use schemes::{GpuSupport, PairMask, Scheme, SchemeKind, TokenRange};
pub use seq::SequenceRanks;

use crate::analysis::AnalysisOptions;
use einattn_ir::Cascade;
use serde::Serialize;
use std::fmt::Write as _;

#[derive(Clone, Debug, PartialEq)]
pub enum SpError {
    /// The sequence ranks are missing or inconsistent.
    Sequence(String),
    /// A per-device window cannot be formed.
    Window(String),
    /// The reference interpreter failed on a per-device cascade.
    Evaluation(String),
    /// The requested scheme does not apply.
    Scheme(String),
    /// More devices than the planner compares pairs for ([`MAX_DEVICES`]).
    Devices(String),
}

impl std::error::Error for SpError {}

impl std::fmt::Display for SpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpError::Sequence(m) => write!(f, "sequence: {m}"),
            SpError::Window(m) => write!(f, "per-device cascade: {m}"),
            SpError::Evaluation(m) => write!(f, "evaluation: {m}"),
            SpError::Scheme(m) => write!(f, "scheme: {m}"),
            SpError::Devices(m) => write!(f, "devices: {m}"),
        }
    }
}

/// What the planner is asked.
#[derive(Clone, Debug)]
pub struct SpOptions {
    /// Devices the sequence is split across.
    pub devices: u64,
    /// `(query rank, key rank)` by declared name; `None` detects them.
    pub sequence: Option<(String, String)>,
    /// Force a scheme by name (`lasp2`, `ring_zigzag`, ...) instead of the cheapest.
    pub scheme: Option<String>,
    pub cost: CostParams,
    /// Used to count each device's FLOPs and bytes.
    pub analysis: AnalysisOptions,
}

impl SpOptions {
    pub fn new(devices: u64) -> SpOptions {
        SpOptions {
            devices,
            sequence: None,
            scheme: None,
            cost: CostParams::default(),
            analysis: AnalysisOptions::default(),
        }
    }
}

/// The planner's answer: the comparison and the chosen scheme.
#[derive(Clone, Debug)]
pub struct SpDecision {
    pub classification: Classification,
    pub chosen: Scheme,
    pub report: SpReport,
}

/// The comparison of every scheme, serializable and printable.
#[derive(Clone, Debug, Serialize)]
pub struct SpReport {
    pub kernel: String,
    pub devices: u64,
    pub sequence: String,
    pub tokens: u64,
    pub dependencies: Vec<classify::DependencyNote>,
    /// Every scheme considered, cheapest applicable first.
    pub estimates: Vec<Estimate>,
    pub chosen: String,
    pub cost_params: CostParams,
    /// What the per-device analyses warned about (saturated counts): the times above
    /// rest on them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// The schemes the planner considers, in the order the table lists ties.
pub fn candidate_schemes(cls: &Classification) -> Vec<Scheme> {
    let head_rank = cls.head_ranks.first().copied();
    let mk = |kind, zigzag| Scheme {
        kind,
        zigzag,
        head_rank: if kind == SchemeKind::Ulysses {
            head_rank
        } else {
            None
        },
    };
    vec![
        mk(SchemeKind::Lasp2, false),
        mk(SchemeKind::Lasp1, false),
        mk(SchemeKind::AllGatherKv, false),
        mk(SchemeKind::AllGatherKv, true),
        mk(SchemeKind::Ring, false),
        mk(SchemeKind::Ring, true),
        mk(SchemeKind::TokenRing, false),
        mk(SchemeKind::TokenRing, true),
        mk(SchemeKind::Ulysses, false),
    ]
}

/// The most devices the planner splits a sequence over. Costing the key-splitting schemes
/// visits every (query chunk, key chunk) pair of every device, `P^2` of them (`4 P^2`
/// zigzag): at 1024 devices that is about 3 s for causal attention; beyond, refuse rather
/// than run for minutes (docs/sp.md).
pub const MAX_DEVICES: u64 = 1024;

/// Classifies the cascade's dependencies across the split, costs every scheme and picks
/// the cheapest applicable one (or the one `options.scheme` names).
pub fn plan_sequence_parallel(
    cascade: &Cascade,
    options: &SpOptions,
) -> Result<SpDecision, SpError> {
    if options.devices > MAX_DEVICES {
        return Err(SpError::Devices(format!(
            "{} devices requested; the planner handles at most {MAX_DEVICES} (it costs every pair of sequence chunks, P^2 of them)",
            options.devices
        )));
    }
    // The per-device windows rename indices and affine masks; a condition on values, or
    // Einsums that advance together step by step, are not rewritten there yet.
    if cascade
        .einsums
        .iter()
        .any(|(_, e)| !e.value_mask.is_empty())
    {
        return Err(SpError::Window(
            "a data-dependent mask (a `where` on values) is not split across devices".into(),
        ));
    }
    if !einattn_ir::validate::step_bodies(cascade).is_empty() {
        return Err(SpError::Window(
            "Einsums that advance together along a recurrence (a step body) are not split across devices"
                .into(),
        ));
    }
    let seq = match &options.sequence {
        Some((q, k)) => SequenceRanks::by_names(cascade, q, k)?,
        None => SequenceRanks::detect(cascade)?,
    };
    let cls = classify(cascade, seq);
    let mut analyzer = schemes::PairAnalyzer::new(cascade, &cls, options.analysis.clone());
    let mut scored: Vec<(Scheme, Estimate)> = Vec::new();
    for scheme in candidate_schemes(&cls) {
        let est = cost::estimate(&mut analyzer, &scheme, options.devices, &options.cost)?;
        scored.push((scheme, est));
    }
    // Cheapest applicable first; the rest keep their listing order.
    scored.sort_by(|a, b| {
        let key = |e: &Estimate| (e.not_applicable.is_some(), e.total_s);
        let (ka, kb) = (key(&a.1), key(&b.1));
        ka.0.cmp(&kb.0)
            .then(ka.1.partial_cmp(&kb.1).unwrap_or(std::cmp::Ordering::Equal))
    });
    let chosen = match &options.scheme {
        Some(name) => {
            let wanted = Scheme::parse(name)
                .ok_or_else(|| SpError::Scheme(format!("no scheme named `{name}`")))?;
            let (s, e) = scored
                .iter()
                .find(|(s, _)| s.kind == wanted.kind && s.zigzag == wanted.zigzag)
                .ok_or_else(|| SpError::Scheme(format!("`{name}` was not considered")))?;
            if let Some(why) = &e.not_applicable {
                return Err(SpError::Scheme(format!("`{name}` does not apply: {why}")));
            }
            *s
        }
        // The cheapest scheme the GPU executor has run; the cheapest of all if none has.
        None => match scored
            .iter()
            .find(|(_, e)| e.not_applicable.is_none() && e.gpu == GpuSupport::Validated)
            .or_else(|| scored.first())
        {
            Some((s, e)) if e.not_applicable.is_none() => *s,
            _ => {
                let why: Vec<String> = scored
                    .iter()
                    .filter_map(|(s, e)| {
                        e.not_applicable
                            .as_ref()
                            .map(|w| format!("{}: {w}", s.name()))
                    })
                    .collect();
                return Err(SpError::Scheme(format!(
                    "no scheme applies:\n  {}",
                    why.join("\n  ")
                )));
            }
        },
    };
    let report = SpReport {
        kernel: cascade.name.clone(),
        devices: options.devices,
        sequence: cls.seq.describe(cascade),
        tokens: cls.seq.tokens,
        dependencies: cls.notes.clone(),
        estimates: scored.into_iter().map(|(_, e)| e).collect(),
        chosen: chosen.name(),
        cost_params: options.cost.clone(),
        warnings: analyzer.warnings(),
    };
    Ok(SpDecision {
        classification: cls,
        chosen,
        report,
    })
}

impl SpReport {
    pub fn to_json(&self) -> String {
        // Plain structs with string keys and finite-or-null floats: cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    /// The comparison table `einattn analyze FILE --sp P` prints.
    pub fn render_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "sequence parallelism: kernel {}, {} devices, sequence {}",
            self.kernel, self.devices, self.sequence
        );
        let _ = writeln!(s, "\ndependencies across the split:");
        if self.dependencies.is_empty() {
            let _ = writeln!(s, "  (none found)");
        }
        for d in &self.dependencies {
            let _ = writeln!(s, "  {:<8} {}: {}", d.tensor, d.kind, d.detail);
        }
        let _ = writeln!(
            s,
            "\nschemes on {} (links: all-gather {:.0} GB/s + {:.0} us, p2p {:.0} GB/s + {:.0} us):",
            self.cost_params.gpu_name,
            self.cost_params.all_gather.bandwidth / 1e9,
            self.cost_params.all_gather.latency_s * 1e6,
            self.cost_params.p2p.bandwidth / 1e9,
            self.cost_params.p2p.latency_s * 1e6
        );
        let _ = writeln!(
            s,
            "  {:<20} {:>12} {:>5} {:>5} {:>10} {:>10} {:>10} {:>10}",
            "scheme",
            "MiB/device",
            "calls",
            "steps",
            "compute ms",
            "comm ms",
            "overlap ms",
            "total ms"
        );
        for e in &self.estimates {
            let mark = if e.scheme == self.chosen { "*" } else { " " };
            match &e.not_applicable {
                None => {
                    let _ = writeln!(
                        s,
                        "{mark} {:<20} {:>12.3} {:>5} {:>5} {:>10.3} {:>10.3} {:>10.3} {:>10.3}{}",
                        e.scheme,
                        e.bytes_per_device as f64 / (1024.0 * 1024.0),
                        e.collectives,
                        e.steps,
                        e.compute_s * 1e3,
                        e.comm_s * 1e3,
                        e.overlap_s * 1e3,
                        e.total_s * 1e3,
                        match e.gpu {
                            GpuSupport::Validated => "",
                            GpuSupport::Lowered => "  (GPU lowering not picked by default)",
                            GpuSupport::None => "  (no GPU lowering)",
                        }
                    );
                }
                Some(why) => {
                    let _ = writeln!(s, "  {:<20} not applicable: {why}", e.scheme);
                }
            }
        }
        let _ = writeln!(
            s,
            "\nchosen: {} (the cheapest scheme the GPU executor has run)",
            self.chosen
        );
        if let Some(e) = self.estimates.iter().find(|e| e.scheme == self.chosen) {
            let _ = writeln!(s, "  {}", e.formula);
        }
        if !self.warnings.is_empty() {
            let _ = writeln!(s, "\nwarnings (per-device analyses):");
            for w in &self.warnings {
                let _ = writeln!(s, "  {w}");
            }
        }
        s
    }
}
