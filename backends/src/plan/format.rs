//! The SP plan: a JSON document an executor runs step by step on each device (docs/sp.md).
//!
//! Everything an NCCL executor needs is explicit: every buffer with its dtype and element
//! count, where its initial contents come from (slices of the global inputs, zeros, a
//! constant), every step's buffer regions as (buffer, offset, count) in elements, the
//! peer of every send and receive, the stream each step runs on and the events that order
//! steps across streams. Collectives appear in the same order on every rank.

use einattn_passes::sp::{PairMask, TokenRange};
use serde::{Deserialize, Serialize};

pub const FORMAT: &str = "einattn.sp-plan/1";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Always [`FORMAT`].
    pub format: String,
    /// The cascade's kernel name.
    pub kernel: String,
    /// The scheme (`lasp2`, `ring_zigzag`, ...).
    pub scheme: String,
    pub world_size: u64,
    pub sequence: SequenceInfo,
    /// The global tensors the plan reads and writes.
    pub tensors: Vec<GlobalTensor>,
    /// The kernel phases the steps launch, with what each computes.
    pub kernels: Vec<KernelInfo>,
    /// Stream names; steps on one stream run in order.
    pub streams: Vec<String>,
    /// The cost model's prediction for the whole plan, milliseconds.
    pub predicted_ms: f64,
    pub ranks: Vec<RankPlan>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SequenceInfo {
    pub query_rank: String,
    pub key_rank: String,
    pub tokens: u64,
    pub zigzag: bool,
    /// For Ulysses: the rank the all-to-all redistributes over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_rank: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GlobalTensor {
    pub name: String,
    /// `input`, `param` or `output`.
    pub kind: String,
    pub dtype: String,
    /// Rank names, outermost first (row-major).
    pub dims: Vec<String>,
    pub shape: Vec<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KernelInfo {
    /// `<kernel>.<phase>`, e.g. `lightning.state_only`.
    pub name: String,
    pub phase: Phase,
    pub description: String,
}

/// What a kernel launch computes, over its query window and key chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The whole cascade from the original inits.
    Full,
    /// Only what the carried linear states need, from a zero state; writes each state's
    /// final value (`state_out`) and its cumulative decay (`decay_out`); no outputs.
    StateOnly,
    /// The whole cascade with the carried states starting from `state_in`; writes the
    /// outputs, and `state_out` when asked.
    OutputWithPrefix,
    /// Everything but the epilogue over one key range; writes the carried statistics'
    /// final values (`stats_out`); starts from `stats_in` when given (a resumed kernel).
    Partial,
    /// The epilogue (`O = RNV / RD`) from merged statistics (`stats_in`).
    Epilogue,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RankPlan {
    pub rank: u64,
    pub buffers: Vec<Buffer>,
    pub steps: Vec<Step>,
    /// Where this rank's results go in the global outputs.
    pub outputs: Vec<Piece>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Buffer {
    pub name: String,
    /// `bf16`, `f16` or `f32`.
    pub dtype: String,
    pub elements: u64,
    pub init: BufferInit,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BufferInit {
    /// Written by a step before it is read.
    Uninit,
    /// Every element set to `value`.
    Value { value: f64 },
    /// Copied from slices of global inputs.
    Pieces { pieces: Vec<Piece> },
}

/// A block of a global tensor: the sub-tensor `slices` select (other dimensions whole),
/// stored row-major and contiguous at `offset` in `buffer`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Piece {
    pub tensor: String,
    pub buffer: String,
    pub offset: u64,
    pub slices: Vec<DimSlice>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DimSlice {
    pub dim: usize,
    pub start: u64,
    pub len: u64,
}

/// `count` elements of `buffer` from `offset`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    pub buffer: String,
    pub offset: u64,
    pub count: u64,
}

/// Which stream a step runs on and the events that order it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exec {
    pub stream: String,
    /// Events (recorded earlier on this rank) this step waits for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wait: Vec<String>,
    /// An event recorded when this step completes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Step {
    Kernel(KernelStep),
    /// `recv[s * count .. (s + 1) * count] = send` of rank `s`, for every rank.
    AllGather {
        send: Region,
        recv: Region,
        dtype: String,
        #[serde(flatten)]
        exec: Exec,
    },
    /// Block `s` of `send` (each `count_per_peer` elements) goes to rank `s`; block `s`
    /// of `recv` comes from rank `s`.
    AllToAll {
        send: Region,
        recv: Region,
        count_per_peer: u64,
        dtype: String,
        #[serde(flatten)]
        exec: Exec,
    },
    /// Element-wise sum over ranks, into every rank's `recv`.
    AllReduce {
        send: Region,
        recv: Region,
        dtype: String,
        #[serde(flatten)]
        exec: Exec,
    },
    /// Element-wise sum over ranks; rank `r` keeps block `r` (`recv.count` elements).
    ReduceScatter {
        send: Region,
        recv: Region,
        dtype: String,
        #[serde(flatten)]
        exec: Exec,
    },
    /// A grouped NCCL send and receive (either may be absent); peers are ranks.
    SendRecv {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        send: Option<PeerRegion>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        recv: Option<PeerRegion>,
        dtype: String,
        #[serde(flatten)]
        exec: Exec,
    },
    /// `acc = init; for s in first..first+count: acc = decay_s * acc + state_s; out = acc`
    /// for every carried state (decay broadcast over the state's other dimensions).
    PrefixCombine {
        /// Slot `s` starts at `slots.offset + s * slot_elements`.
        slots: Region,
        slot_elements: u64,
        first: u64,
        count: u64,
        /// The starting prefix (a received state); `None` starts from `init_value`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        init: Option<Region>,
        init_value: f64,
        states: Vec<CombineState>,
        out: Region,
        #[serde(flatten)]
        exec: Exec,
    },
    /// Merges the statistics in `from` into `into` (log-sum-exp for rescaled sums).
    LseMerge {
        into: Region,
        from: Region,
        stats: Vec<MergeStat>,
        #[serde(flatten)]
        exec: Exec,
    },
    /// `dst = transpose(src viewed as shape, perm)`: `dst` has shape `shape[perm[i]]`.
    Rearrange {
        src: Region,
        dst: Region,
        shape: Vec<u64>,
        perm: Vec<usize>,
        #[serde(flatten)]
        exec: Exec,
    },
    /// `src` holds a packed sub-tensor (the `slices` of a tensor of `shape`, row-major);
    /// it is written to its place in `dst`, which holds the whole tensor.
    Place {
        src: Region,
        dst: Region,
        shape: Vec<u64>,
        slices: Vec<DimSlice>,
        dtype: String,
        #[serde(flatten)]
        exec: Exec,
    },
}

/// The contiguous runs a sub-tensor (`slices` of a row-major tensor of `shape`, other dims
/// whole) occupies: `(offset in the whole tensor, offset in the packed sub-tensor, length)`,
/// in order. Pieces, placements and their GPU copies all walk these.
pub fn piece_runs(shape: &[u64], slices: &[DimSlice]) -> Vec<(u64, u64, u64)> {
    let mut start = vec![0u64; shape.len()];
    let mut len = shape.to_vec();
    for s in slices {
        if s.dim < shape.len() {
            start[s.dim] = s.start;
            len[s.dim] = s.len;
        }
    }
    // Dims after the innermost sliced one are whole, so each run spans that dim's range.
    let Some(last) = slices
        .iter()
        .map(|s| s.dim)
        .filter(|&d| d < shape.len())
        .max()
    else {
        return vec![(0, 0, shape.iter().product())];
    };
    let inner: u64 = shape[last + 1..].iter().product();
    let run = len[last] * inner;
    let outer: u64 = len[..last].iter().product();
    let mut runs = Vec::with_capacity(outer as usize);
    for o in 0..outer {
        // Row-major index of `o` over the piece's outer dims, then its offset in the whole.
        let (mut rest, mut whole, mut stride) = (o, 0u64, shape[last..].iter().product::<u64>());
        for d in (0..last).rev() {
            let i = rest % len[d];
            rest /= len[d];
            whole += (start[d] + i) * stride;
            stride *= shape[d];
        }
        runs.push((whole + start[last] * inner, o * run, run));
    }
    runs
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRegion {
    pub peer: u64,
    #[serde(flatten)]
    pub region: Region,
}

/// One state inside a combine slot: `elements` values of shape `shape` at `offset`, and
/// its decay (`decay_elements` values at `decay_offset`, indexed by the state dimensions
/// `decay_dims`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CombineState {
    pub state: String,
    pub offset: u64,
    pub shape: Vec<u64>,
    pub decay_offset: u64,
    pub decay_dims: Vec<usize>,
    /// Where this state's combined value goes, relative to `out.offset`.
    pub out_offset: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MergeKind {
    Max,
    Min,
    Sum,
    /// `S = S_a exp(M_a - M) + S_b exp(M_b - M)` with `M` the merged `max_stat`.
    RescaledSum,
}

/// One statistic in a stats buffer: `shape` elements at `offset` (relative to the region).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeStat {
    pub name: String,
    pub kind: MergeKind,
    pub offset: u64,
    pub shape: Vec<u64>,
    /// For a rescaled sum: its running max, and which of this stat's dimensions index it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_stat: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub max_dims: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KernelStep {
    /// `<kernel>.<phase>`: an entry of [`Plan::kernels`].
    pub kernel: String,
    pub phase: Phase,
    /// Global token positions of the queries this launch computes.
    pub queries: TokenRange,
    /// Global token ranges of the keys, contiguous and ascending (one per key argument
    /// group); for one-rank cascades (Lightning) the same as `queries`.
    pub keys: Vec<TokenRange>,
    /// Per key range: whether the mask drops none, some of the scores.
    pub masks: Vec<PairMask>,
    /// For Ulysses: the heads this launch computes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heads: Option<TokenRange>,
    pub args: Vec<KernelArg>,
    /// CTAs: (query tiles, parallel points, 1); advisory for the executor.
    pub grid: [u64; 3],
    /// The kernels (entries of the plan's manifest) this step launches, in order: filled
    /// when the plan is lowered to a kernel family's modules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub launch: Vec<String>,
    /// For chunked state kernels: the chunks the window is cut into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<u64>,
    #[serde(flatten)]
    pub exec: Exec,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArgRole {
    Input,
    Param,
    Output,
    StateIn,
    StateOut,
    DecayOut,
    StatsIn,
    StatsOut,
}

/// A kernel argument: the cascade tensor it binds (states by their name), stored
/// row-major at `region` with the window's local shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KernelArg {
    pub tensor: String,
    pub role: ArgRole,
    /// For key-side inputs: which entry of `keys` this argument holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_chunk: Option<usize>,
    pub shape: Vec<u64>,
    pub region: Region,
}

impl Step {
    /// Every region the step reads or writes.
    pub fn regions(&self) -> Vec<&Region> {
        match self {
            Step::Kernel(k) => k.args.iter().map(|a| &a.region).collect(),
            Step::AllGather { send, recv, .. }
            | Step::AllToAll { send, recv, .. }
            | Step::AllReduce { send, recv, .. }
            | Step::ReduceScatter { send, recv, .. }
            | Step::Rearrange {
                src: send,
                dst: recv,
                ..
            }
            | Step::Place {
                src: send,
                dst: recv,
                ..
            } => vec![send, recv],
            Step::SendRecv { send, recv, .. } => {
                send.iter().chain(recv).map(|r| &r.region).collect()
            }
            Step::PrefixCombine {
                slots, init, out, ..
            } => [Some(slots), init.as_ref(), Some(out)]
                .into_iter()
                .flatten()
                .collect(),
            Step::LseMerge { into, from, .. } => vec![into, from],
        }
    }

    pub fn exec(&self) -> &Exec {
        match self {
            Step::Kernel(k) => &k.exec,
            Step::AllGather { exec, .. }
            | Step::AllToAll { exec, .. }
            | Step::AllReduce { exec, .. }
            | Step::ReduceScatter { exec, .. }
            | Step::SendRecv { exec, .. }
            | Step::PrefixCombine { exec, .. }
            | Step::LseMerge { exec, .. }
            | Step::Rearrange { exec, .. }
            | Step::Place { exec, .. } => exec,
        }
    }

    /// The step's `op` as the JSON names it.
    pub fn op_name(&self) -> &'static str {
        match self {
            Step::Kernel(_) => "kernel",
            Step::AllGather { .. } => "all_gather",
            Step::AllToAll { .. } => "all_to_all",
            Step::AllReduce { .. } => "all_reduce",
            Step::ReduceScatter { .. } => "reduce_scatter",
            Step::SendRecv { .. } => "send_recv",
            Step::PrefixCombine { .. } => "prefix_combine",
            Step::LseMerge { .. } => "lse_merge",
            Step::Rearrange { .. } => "rearrange",
            Step::Place { .. } => "place",
        }
    }

    /// Whether every rank must reach this step together (an NCCL collective).
    pub fn is_collective(&self) -> bool {
        matches!(
            self,
            Step::AllGather { .. }
                | Step::AllToAll { .. }
                | Step::AllReduce { .. }
                | Step::ReduceScatter { .. }
        )
    }
}

impl Plan {
    pub fn to_json(&self) -> String {
        // Plain structs, string keys, finite floats: serialization cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    pub fn from_json(text: &str) -> Result<Plan, serde_json::Error> {
        serde_json::from_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_names_are_the_json_tags() {
        let steps = [
            Step::PrefixCombine {
                slots: Region {
                    buffer: "s".into(),
                    offset: 0,
                    count: 1,
                },
                slot_elements: 1,
                first: 0,
                count: 1,
                init: None,
                init_value: 0.0,
                states: vec![],
                out: Region {
                    buffer: "o".into(),
                    offset: 0,
                    count: 1,
                },
                exec: Exec::default(),
            },
            Step::SendRecv {
                send: None,
                recv: None,
                dtype: "f32".into(),
                exec: Exec::default(),
            },
        ];
        for step in steps {
            let json = serde_json::to_value(&step).expect("serializes");
            assert_eq!(json["op"], step.op_name());
        }
    }

    #[test]
    fn piece_runs_cover_the_slice_in_order() {
        // [2, 5, 3] sliced to rows 1..4 of dim 1: two runs of 3 x 3.
        let runs = piece_runs(
            &[2, 5, 3],
            &[DimSlice {
                dim: 1,
                start: 1,
                len: 3,
            }],
        );
        assert_eq!(runs, vec![(3, 0, 9), (18, 9, 9)]);
        // Two sliced dims: runs along the inner one.
        let runs = piece_runs(
            &[4, 3, 2],
            &[
                DimSlice {
                    dim: 0,
                    start: 2,
                    len: 2,
                },
                DimSlice {
                    dim: 1,
                    start: 1,
                    len: 1,
                },
            ],
        );
        assert_eq!(runs, vec![(14, 0, 2), (20, 2, 2)]);
        assert_eq!(piece_runs(&[3, 4], &[]), vec![(0, 0, 12)]);
    }
}
