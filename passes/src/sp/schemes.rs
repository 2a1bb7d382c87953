//! The SP schemes, which of them a classification allows, and the chunk layouts they use.

use super::classify::Classification;
use super::local::{self, LocalSpec, Window};
use super::SpError;
use crate::analysis::{self, AnalysisOptions};
use einattn_ir::{Cascade, Handle, Rank, TensorKind};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum SchemeKind {
    /// One all-gather of per-device linear states, then a local prefix combine.
    Lasp2,
    /// The prefix state travels device to device (P - 1 sequential hops).
    Lasp1,
    /// All-gather K and V; each device runs its queries against the keys it needs.
    AllGatherKv,
    /// K/V blocks travel a ring; partial statistics merge by log-sum-exp.
    Ring,
    /// Queries travel out, partial results come back (both link directions busy).
    TokenRing,
    /// All-to-all from sequence-split to head-split and back.
    Ulysses,
}

/// A scheme with its layout choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Scheme {
    pub kind: SchemeKind,
    /// Zigzag causal balance: device `r` holds chunks `r` and `2P-1-r` of `2P`.
    pub zigzag: bool,
    /// The rank Ulysses redistributes over.
    pub head_rank: Option<Handle<Rank>>,
}

/// What the GPU executor does with a scheme's plans ([`SchemeKind::gpu_support`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GpuSupport {
    /// No lowering: the executor refuses the plan.
    None,
    /// Lowered: runs when asked for (`--scheme`) but is not picked by default (not proven
    /// on GPUs, or slower there than the model says).
    Lowered,
    /// Run on GPUs and checked against one GPU: the planner picks the cheapest of these.
    Validated,
}

impl SchemeKind {
    /// How far the GPU executor supports this scheme's plans. Validated: LASP-2, LASP-1
    /// (state-only and prefix-start linear kernels, an element-wise combine, an all-gather or
    /// sends) and the all-gather of K/V (the attention kernel with a query offset) have run
    /// on GPUs, matched one GPU, and run about as fast as the model says. Lowered: Ulysses
    /// (a permutation kernel, all-to-all, the whole-sequence kernels on a rank's heads) ran
    /// and matched one GPU, but its first permutation kernel was far slower than the
    /// memory-bound packing the model assumes; its run-copy replacement has not run on GPUs
    /// yet, so Ulysses is not picked by default. Ring and TokenRing are lowered (partial
    /// kernels that write merge statistics, a merge kernel, an epilogue) and checked on the
    /// CPU, but have not run on GPUs yet.
    pub fn gpu_support(self) -> GpuSupport {
        match self {
            SchemeKind::Lasp2 | SchemeKind::Lasp1 | SchemeKind::AllGatherKv => {
                GpuSupport::Validated
            }
            SchemeKind::Ulysses | SchemeKind::Ring | SchemeKind::TokenRing => GpuSupport::Lowered,
        }
    }
}

impl Scheme {
    pub fn name(&self) -> String {
        let base = match self.kind {
            SchemeKind::Lasp2 => "lasp2",
            SchemeKind::Lasp1 => "lasp1",
            SchemeKind::AllGatherKv => "allgather_kv",
            SchemeKind::Ring => "ring",
            SchemeKind::TokenRing => "tokenring",
            SchemeKind::Ulysses => "ulysses",
        };
        if self.zigzag {
            format!("{base}_zigzag")
        } else {
            base.to_string()
        }
    }

    /// Parses a name as [`Scheme::name`] prints it (the head rank is filled in by the planner).
    pub fn parse(name: &str) -> Option<Scheme> {
        let (base, zigzag) = match name.strip_suffix("_zigzag") {
            Some(b) => (b, true),
            None => (name, false),
        };
        let kind = match base {
            "lasp2" => SchemeKind::Lasp2,
            "lasp1" => SchemeKind::Lasp1,
            "allgather_kv" | "lasp2h" => SchemeKind::AllGatherKv,
            "ring" => SchemeKind::Ring,
            "tokenring" => SchemeKind::TokenRing,
            "ulysses" => SchemeKind::Ulysses,
            _ => return None,
        };
        Some(Scheme {
            kind,
            zigzag,
            head_rank: None,
        })
    }
}

/// A contiguous range of token positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
pub struct TokenRange {
    pub start: u64,
    pub len: u64,
}

impl TokenRange {
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// The chunks device `rank` holds (queries and keys alike), in token order.
pub fn device_chunks(tokens: u64, devices: u64, zigzag: bool, rank: u64) -> Vec<TokenRange> {
    if zigzag {
        let c = tokens / (2 * devices);
        vec![
            TokenRange {
                start: rank * c,
                len: c,
            },
            TokenRange {
                start: (2 * devices - 1 - rank) * c,
                len: c,
            },
        ]
    } else {
        let c = tokens / devices;
        vec![TokenRange {
            start: rank * c,
            len: c,
        }]
    }
}

/// Whether a (query chunk, key chunk) pair has any, some or all of its scores present.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PairMask {
    /// No score survives the mask: the pair is skipped.
    Empty,
    /// Some scores are masked (the diagonal block of a causal mask).
    Partial,
    /// The mask holds everywhere: a kernel may skip evaluating it.
    Full,
}

/// Why a scheme does not apply (shown in the comparison table).
pub fn applicability(
    cls: &Classification,
    cascade: &Cascade,
    scheme: &Scheme,
    devices: u64,
) -> Result<(), String> {
    let seq = &cls.seq;
    let chunks = if scheme.zigzag { 2 * devices } else { devices };
    if devices < 2 {
        return Err("needs at least 2 devices".to_string());
    }
    let granule = seq.granule();
    if scheme.kind != SchemeKind::Ulysses
        && (!seq.tokens.is_multiple_of(chunks) || !(seq.tokens / chunks).is_multiple_of(granule))
    {
        return Err(format!(
            "{} tokens do not split into {chunks} chunks of whole tiles of {granule}",
            seq.tokens
        ));
    }
    match scheme.kind {
        SchemeKind::Lasp2 | SchemeKind::Lasp1 => {
            if scheme.zigzag {
                return Err("zigzag applies to softmax schemes".to_string());
            }
            if !cls.linear_fixed_size() {
                return Err(if !seq.single_rank() {
                    "needs one sequence rank carrying a linear recurrence (queries and keys are separate ranks here)".to_string()
                } else {
                    "needs every dependency across the split to be a linear recurrence over a fixed-size state".to_string()
                });
            }
            Ok(())
        }
        SchemeKind::AllGatherKv => {
            if !cls.keys_in_order() {
                return Err(reason_keys(cls));
            }
            if scheme.zigzag && !cls.keys_any_order() && !cls.global_reductions.is_empty() {
                return Err("zigzag needs partial results that merge".to_string());
            }
            Ok(())
        }
        SchemeKind::Ring | SchemeKind::TokenRing => {
            if !cls.keys_any_order() {
                return Err(if cls.keys_in_order() {
                    "needs partial results that merge in any order (online-softmax statistics)"
                        .to_string()
                } else {
                    reason_keys(cls)
                });
            }
            Ok(())
        }
        SchemeKind::Ulysses => {
            if scheme.zigzag {
                return Err("zigzag applies to sequence-split schemes".to_string());
            }
            let Some(h) = scheme.head_rank.or_else(|| cls.head_ranks.first().copied()) else {
                return Err("no head rank that every sequence tensor carries".to_string());
            };
            let extent = cascade.ranks[h].extent;
            if !extent.is_multiple_of(devices) {
                return Err(format!(
                    "`{}` has {extent} heads, not divisible by {devices}",
                    cascade.ranks[h].name
                ));
            }
            if !seq.tokens.is_multiple_of(devices) {
                return Err(format!(
                    "{} tokens do not split into {devices} chunks",
                    seq.tokens
                ));
            }
            Ok(())
        }
    }
}

fn reason_keys(cls: &Classification) -> String {
    if cls.seq.single_rank() {
        "needs separate query and key ranks".to_string()
    } else if let Some(r) = cls.cross_chunk_reads.first() {
        r.clone()
    } else if let Some(r) = cls.unsupported_states.first() {
        r.clone()
    } else {
        "keys cannot be split".to_string()
    }
}

/// The windows a (query chunk, key chunk) pair evaluates under.
pub fn pair_windows(cls: &Classification, queries: TokenRange, keys: TokenRange) -> Vec<Window> {
    let mut w = vec![Window {
        rank: cls.seq.query.declared,
        start: queries.start,
        len: queries.len,
    }];
    if !cls.seq.single_rank() {
        w.push(Window {
            rank: cls.seq.key.declared,
            start: keys.start,
            len: keys.len,
        });
    }
    w
}

/// What the analysis of a per-device cascade depends on: per window its rank and length,
/// and the constant the window offsets add to each shifted index (masks and rank values
/// see global positions; a condition counts by the difference of its sides). Two window
/// sets with the same key give the same analysis, so the planner analyzes each distinct
/// one once: a cascade without masks has one for all `P^2` (query chunk, key chunk) pairs,
/// a causal one one per distance between chunks.
type WindowKey = (Vec<(usize, u64)>, Vec<i128>);

/// A (query chunk, key chunk) pair up to what its analysis depends on: pairs of one class
/// have the same per-device analysis, mask and time. Computed in a few operations, so the
/// planner's `P^2` pairs cost a hash lookup each rather than an analysis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PairClass {
    query_len: u64,
    key_len: u64,
    /// The token distance `query start - key start` when every shifted index depends on
    /// the two starts only through it (a causal or banded mask); else the query start.
    first: i128,
    /// `0` in the distance case; else the key start.
    second: i128,
}

/// A multiply-rotate hasher for [`PairClass`] maps: the planner looks classes up `O(P^2)`
/// times, and SipHash (built to resist adversarial keys these are not) was most of that.
#[derive(Default, Clone, Copy)]
pub struct PairHasher(u64);

impl std::hash::Hasher for PairHasher {
    fn finish(&self) -> u64 {
        // The splitmix64 finalizer: every input bit reaches the low (bucket) and high
        // (tag) bits the table uses.
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_i128(&mut self, n: i128) {
        self.write_u64(n as u64);
        self.write_u64((n >> 64) as u64);
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

/// A map keyed by [`PairClass`].
pub type PairMap<V> = HashMap<PairClass, V, std::hash::BuildHasherDefault<PairHasher>>;

/// How the per-device analyses depend on the starts of a pair's windows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StartDependence {
    /// Not at all (no mask or rank value mentions a sequence rank).
    None,
    /// Through the distance between the query and the key start only.
    Distance,
    /// Through both starts.
    Both,
}

/// Memoized analyses of per-device cascades (the planner asks about the same pairs often).
pub struct PairAnalyzer<'a> {
    pub cascade: &'a Cascade,
    pub cls: &'a Classification,
    pub options: AnalysisOptions,
    cache: HashMap<WindowKey, analysis::Report>,
    masks: PairMap<PairMask>,
    /// The terms of every index `localize` shifts to global positions, over leaf ranks.
    shifted: Vec<Vec<(i64, Handle<Rank>)>>,
    /// Einsums (by output name) that read a key-carrying input: they judge a pair's mask.
    readers: Vec<String>,
    dependence: StartDependence,
}

impl<'a> PairAnalyzer<'a> {
    pub fn new(cascade: &'a Cascade, cls: &'a Classification, options: AnalysisOptions) -> Self {
        let key_rank = cls.seq.key.declared;
        let key_inputs: Vec<String> = cascade
            .tensors
            .iter()
            .filter(|(_, t)| t.kind == TensorKind::Input && t.ranks.contains(&key_rank))
            .map(|(_, t)| t.name.clone())
            .collect();
        let readers: Vec<String> = cascade
            .einsums
            .iter()
            .filter(|(_, e)| {
                let mut reads = false;
                e.expr.visit_accesses(&mut |a| {
                    reads |= key_inputs.contains(&cascade.tensors[a.tensor].name)
                });
                reads
            })
            .map(|(_, e)| cascade.tensors[e.output.tensor].name.clone())
            .collect();
        let shifted = local::shifted_indices(cascade);
        // Per shifted index, its coefficient on the query window's leaf and on the key
        // window's (a window on a split rank offsets its outer leaf, in tiles).
        let leaf_coef = |terms: &[(i64, Handle<Rank>)], leaf: Handle<Rank>| -> i128 {
            terms
                .iter()
                .filter(|&&(_, r)| r == leaf)
                .map(|&(c, _)| i128::from(c))
                .sum()
        };
        let (q, k) = (cls.seq.query, cls.seq.key);
        let two_windows = !cls.seq.single_rank();
        let mut any = false;
        let mut distance = two_windows;
        for terms in &shifted {
            let a = leaf_coef(terms, q.outer);
            let b = if two_windows {
                leaf_coef(terms, k.outer)
            } else {
                0
            };
            any |= a != 0 || b != 0;
            // a * (qs / tq) + b * (ks / tk) depends on qs - ks alone iff a / tq = -b / tk.
            distance &= a * i128::from(k.tile) == -b * i128::from(q.tile);
        }
        let dependence = if !any {
            StartDependence::None
        } else if distance {
            StartDependence::Distance
        } else {
            StartDependence::Both
        };
        PairAnalyzer {
            cascade,
            cls,
            options,
            cache: HashMap::new(),
            masks: PairMap::default(),
            shifted,
            readers,
            dependence,
        }
    }

    /// The warnings of every per-device analysis made so far (masks counted as their box,
    /// counts saturated at 2^64 - 1), each once, sorted.
    pub fn warnings(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .cache
            .values()
            .flat_map(|r| r.warnings.iter().cloned())
            .collect();
        all.sort();
        all.dedup();
        all
    }

    /// The class of a pair, or `None` when its windows do not fit the sequence (then the
    /// analysis says why).
    pub fn pair_class(&self, queries: TokenRange, keys: TokenRange) -> Option<PairClass> {
        let seq = &self.cls.seq;
        let fits = |r: &TokenRange, tile: u64| {
            r.len > 0
                && r.start.checked_add(r.len).is_some_and(|e| e <= seq.tokens)
                && r.start.is_multiple_of(tile)
                && r.len.is_multiple_of(tile)
        };
        let keys = if seq.single_rank() {
            // One window: the key chunk does not enter the per-device cascade.
            TokenRange { start: 0, len: 0 }
        } else {
            if !fits(&keys, seq.key.tile) {
                return None;
            }
            keys
        };
        if !fits(&queries, seq.query.tile) {
            return None;
        }
        let (first, second) = match self.dependence {
            StartDependence::None => (0, 0),
            StartDependence::Distance => (i128::from(queries.start) - i128::from(keys.start), 0),
            StartDependence::Both => (i128::from(queries.start), i128::from(keys.start)),
        };
        Some(PairClass {
            query_len: queries.len,
            key_len: keys.len,
            first,
            second,
        })
    }

    /// The cache key of `windows`, or `None` when `localize` would refuse them (then it is
    /// called to say why).
    fn key(&self, windows: &[Window]) -> Option<WindowKey> {
        let mut offsets: Vec<(Handle<Rank>, i128)> = Vec::new();
        let mut ranks = Vec::new();
        for w in windows {
            let rank = self.cascade.ranks.get(w.rank)?;
            if w.len == 0 || w.start.checked_add(w.len)? > rank.extent {
                return None;
            }
            ranks.push((w.rank.index(), w.len));
            match &rank.split {
                Some(split) => {
                    let tile = self.cascade.ranks.get(split.inner)?.extent.max(1);
                    if w.start % tile != 0 || w.len % tile != 0 {
                        return None;
                    }
                    offsets.push((split.outer, i128::from(w.start / tile)));
                }
                None => offsets.push((w.rank, i128::from(w.start))),
            }
        }
        let shifts = self
            .shifted
            .iter()
            .map(|terms| {
                terms
                    .iter()
                    .filter_map(|&(coef, r)| {
                        // The last window of a rank wins, as in `localize`.
                        offsets
                            .iter()
                            .rev()
                            .find(|(o, _)| *o == r)
                            .map(|&(_, o)| i128::from(coef) * o)
                    })
                    .sum()
            })
            .collect();
        Some((ranks, shifts))
    }

    /// The analysis of the cascade restricted to `windows`.
    pub fn report(&mut self, windows: &[Window]) -> Result<&analysis::Report, SpError> {
        let spec = || LocalSpec {
            windows: windows.to_vec(),
            ..LocalSpec::default()
        };
        let Some(cache_key) = self.key(windows) else {
            // `localize` names what is wrong with the windows.
            local::localize(self.cascade, &spec())?;
            return Err(SpError::Window("windows out of range".to_string()));
        };
        if !self.cache.contains_key(&cache_key) {
            let local = local::localize(self.cascade, &spec())?;
            let report = analysis::analyze(&local.cascade, &self.options);
            self.cache.insert(cache_key.clone(), report);
        }
        self.cache
            .get(&cache_key)
            .ok_or_else(|| SpError::Evaluation("analysis cache".to_string()))
    }

    /// Whether the pair's scores are all, some or none present: judged on the Einsums that
    /// read a key-carrying input (the scores and the value contraction).
    pub fn pair_mask(
        &mut self,
        queries: TokenRange,
        keys: TokenRange,
    ) -> Result<PairMask, SpError> {
        let class = self.pair_class(queries, keys);
        if let Some(mask) = class.and_then(|c| self.masks.get(&c)) {
            return Ok(*mask);
        }
        let windows = pair_windows(self.cls, queries, keys);
        let readers = std::mem::take(&mut self.readers);
        let report = self.report(&windows);
        let mask = report.map(|report| {
            let rows: Vec<&analysis::EinsumReport> = report
                .einsums
                .iter()
                .filter(|e| readers.contains(&e.einsum))
                .collect();
            if rows.iter().all(|e| e.points == 0) {
                PairMask::Empty
            } else if rows.iter().all(|e| e.points == e.points_dense) {
                PairMask::Full
            } else {
                PairMask::Partial
            }
        });
        self.readers = readers;
        let mask = mask?;
        if let Some(c) = class {
            self.masks.insert(c, mask);
        }
        Ok(mask)
    }
}

/// Every (query chunk, key chunk) pair a device computes in a key-splitting scheme, with
/// its mask; empty pairs are left out. Ordered by key chunk start within each query chunk.
pub fn device_pairs(
    analyzer: &mut PairAnalyzer,
    devices: u64,
    zigzag: bool,
    rank: u64,
) -> Result<Vec<(TokenRange, TokenRange, PairMask)>, SpError> {
    let tokens = analyzer.cls.seq.tokens;
    let mine = device_chunks(tokens, devices, zigzag, rank);
    // The devices' chunks tile the sequence in equal lengths: in start order they are
    // chunk 0, 1, ... of that length (built directly; this runs once per device).
    let chunks = if zigzag { 2 * devices } else { devices };
    let len = tokens / chunks.max(1);
    let mut out = Vec::new();
    for q in &mine {
        for k in (0..chunks).map(|i| TokenRange {
            start: i * len,
            len,
        }) {
            let k = &k;
            let mask = analyzer.pair_mask(*q, *k)?;
            if mask != PairMask::Empty {
                out.push((*q, *k, mask));
            }
        }
    }
    Ok(out)
}

/// Which device holds the key chunk starting at `start`.
pub fn owner_of(tokens: u64, devices: u64, zigzag: bool, chunk: TokenRange) -> u64 {
    (0..devices)
        .find(|&r| device_chunks(tokens, devices, zigzag, r).contains(&chunk))
        .unwrap_or(0)
}
