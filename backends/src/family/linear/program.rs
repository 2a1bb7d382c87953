//! Causal linear attention (Lightning Attention-2) as a sequential tile program.
//!
//! One CTA per (value-column block, batch, head) walks the sequence in blocks of `d`
//! tokens, carrying the `d x e` state `S` (f32 in registers, and a 16-bit copy in shared
//! memory that feeds the next block's MMA). For block `t` with rows `i` and keys `j`:
//!
//! | Lightning Attention-2 | statement |
//! | --- | --- |
//! | intra: `(Q K^T * M) V`, `M[i][j] = lam^(i - j)` for `j <= i` | `s = Q . K^T; s = select(j <= i, s * lam^(i-j), 0); o += round(s) . V` |
//! | inter: `lam^(i + 1) Q S_t` | `o = Q . S; o = o * lam^(i + 1)` |
//! | state: `S_{t+1} = lam^B S_t + sum_j lam^(B-1-j) K_j^T V_j` | `st = st * lam^B; st += (K * lam^(B-1-j))^T . V; S = round(st)` |
//!
//! with `lam = exp(-s[h])` (no decay: `lam = 1`). Positions are relative to the block, so
//! the factors never grow with the sequence. Non-causal linear attention (`O = Q (K^T V)`)
//! takes two loops: the whole state first, then the outputs.

use crate::family::softmax::program::LOG2_E;
use crate::tile::ex::*;
use crate::tile::*;

/// How the contribution of key `j` to query `i >= j` decays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decay {
    /// Plain causal linear attention.
    None,
    /// `exp(-s[h] * (i - j))` with `s` the named per-head parameter (Lightning, RetNet).
    PerHead(String),
    /// `exp(G[i] - G[j])` with `G` the named per-token input `[B, N, H]` (f32): the
    /// cumulative log of a data-dependent scalar gate (gated linear attention, Mamba-2).
    Gate(String),
}

/// What to compute: `O_i = sum_{j <= i} decay(i - j) (q_i . k_j) v_j`, or without the
/// `j <= i` bound (and without decay) when not `causal`: `O = Q (K^T V)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearSpec {
    pub head_dim: u32,
    pub value_dim: u32,
    pub elem: Elem,
    pub decay: Decay,
    pub causal: bool,
}

impl LinearSpec {
    pub fn kernel_name(&self, value_block: u32) -> String {
        let mut s = format!(
            "einattn_linear_d{}_e{}_{}",
            self.head_dim,
            self.value_dim,
            self.elem.name()
        );
        match self.decay {
            Decay::None => {}
            Decay::PerHead(_) => s.push_str("_decay"),
            Decay::Gate(_) => s.push_str("_gate"),
        }
        if !self.causal {
            s.push_str("_noncausal");
        }
        if value_block < self.value_dim {
            s.push_str(&format!("_eb{value_block}"));
        }
        s
    }
}

/// How the sequence is walked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// One CTA per (value block, batch, head) carries the state through the whole sequence:
    /// Q, K, V and O cross HBM once.
    SinglePass,
    /// The sequence is cut into chunks of `chunk_tiles` blocks that run in parallel: a
    /// first kernel writes each chunk's state, a second starts each chunk from the earlier
    /// ones. K and V are read twice; worth it when batch x heads leaves SMs idle.
    Chunked { chunk_tiles: u32 },
    /// One CTA per block of the sequence, all in parallel: each computes its block's
    /// intra-block outputs and local state from one read of Q, K and V, obtains the state
    /// entering the block by a decoupled look-back over the earlier blocks' published
    /// states, and adds the inter-block part. Only states are re-read.
    LookBack,
}

/// The cost model's choice: single pass while its grid fills the GPU (or the sequence is
/// short), else chunks sized so that chunks x CTAs covers the SMs about twice; when the
/// chunk count is capped so low that chunks x CTAs would not cover half the SMs, one CTA
/// per block with the look-back. The look-back moves about twice the bytes of the single
/// pass (a block's published and read states weigh as much as its Q, K, V and O), the
/// chunked form about 1.5x, so each is worth it only for the parallelism it adds (H200,
/// d = 128: B=1 H=2 N=64K chunked 234, look-back 210, single pass 40 Mtok/s).
pub fn choose_strategy(
    spec: &LinearSpec,
    sched: &LinearSchedule,
    batch_heads: u64,
    n: u64,
) -> Strategy {
    strategy_choice(spec, sched, batch_heads, n).0
}

/// [`choose_strategy`] with the reason, for `--emit schedule`.
pub fn strategy_choice(
    spec: &LinearSpec,
    sched: &LinearSchedule,
    batch_heads: u64,
    n: u64,
) -> (Strategy, String) {
    const SMS: u64 = 132;
    let ctas = batch_heads * (spec.value_dim / sched.value_block) as u64;
    let tiles = n.div_ceil(spec.head_dim as u64);
    let gated = matches!(spec.decay, Decay::Gate(_));
    if !spec.causal || gated {
        return (
            Strategy::SinglePass,
            "single pass: the chunked and look-back forms need causal attention without a gate"
                .into(),
        );
    }
    if ctas * 2 >= SMS || tiles < 8 {
        return (
            Strategy::SinglePass,
            format!(
                "single pass: {ctas} CTAs (batch x heads x value blocks) {}; only Q, K, V and O cross HBM once (chunked reads K and V twice; the look-back publishes and re-reads states as large as a block's Q, K, V and O)",
                if tiles < 8 {
                    format!("and {tiles} blocks: too short to split")
                } else {
                    format!("keep the {SMS} SMs busy")
                }
            ),
        );
    }
    // Each chunk's CTA reads every earlier chunk's state: cap the chunks so that quadratic
    // prologue stays small next to the chunk's own blocks.
    let chunks = (2 * SMS).div_ceil(ctas).min(tiles / 4).clamp(2, 32);
    if 2 * ctas * chunks < SMS {
        return (
            Strategy::LookBack,
            format!(
                "look-back: {ctas} CTAs leave the {SMS} SMs idle and chunking is capped at {chunks} chunks ({} CTAs, under half the SMs); one CTA per block gives {}",
                ctas * chunks,
                ctas * tiles
            ),
        );
    }
    let Ok(chunk_tiles) = u32::try_from(tiles.div_ceil(chunks)) else {
        return (
            Strategy::LookBack,
            format!("look-back: {tiles} blocks in {chunks} chunks is past the chunk kernel's 32-bit index"),
        );
    };
    (
        Strategy::Chunked { chunk_tiles },
        format!(
            "chunked: {ctas} CTAs leave the {SMS} SMs idle; {chunks} chunks give {} (K and V are read twice, cheaper than the look-back's per-block states)",
            ctas * chunks
        ),
    )
}

/// Schedule knobs: the token block is `head_dim` (the state's rows share the CTA's rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearSchedule {
    pub strategy: Strategy,
    /// Value columns per CTA (`value_dim` or a divisor: more CTAs, fewer registers).
    pub value_block: u32,
    pub warps: u32,
    pub stages: u32,
    pub mma: MmaUnit,
}

impl LinearSchedule {
    /// `wgmma` where the target has it: the contractions then read K, V, Q and the state
    /// from shared memory directly, which frees the registers and issue slots that
    /// `ldmatrix` B fragments take under `mma.sync`.
    /// (It needs 16-row warps in whole warpgroups; the block is `d` rows.)
    pub fn default_mma(&self, head_dim: u32, target: crate::Target) -> MmaUnit {
        let warpgroups = self.warps.is_multiple_of(4) && head_dim == 16 * self.warps;
        match target {
            crate::Target::Sm90a if warpgroups => MmaUnit::Warpgroup,
            _ => MmaUnit::Sync,
        }
    }

    pub fn default_for(spec: &LinearSpec) -> LinearSchedule {
        // d = 128 needs 8 warps (16 rows each) so the score, output and state accumulators
        // fit in registers; splitting e in two also doubles the CTAs along the grid.
        if spec.head_dim >= 128 {
            LinearSchedule {
                strategy: Strategy::SinglePass,
                value_block: (spec.value_dim / 2).max(64).min(spec.value_dim),
                warps: 8,
                stages: 2,
                mma: MmaUnit::Sync,
            }
        } else {
            LinearSchedule {
                strategy: Strategy::SinglePass,
                value_block: spec.value_dim,
                warps: 4,
                stages: 2,
                mma: MmaUnit::Sync,
            }
        }
    }
}

/// Handles a launcher binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearBindings {
    pub q: TensorId,
    pub k: TensorId,
    pub v: TensorId,
    pub o: TensorId,
    /// The decay parameter, when there is one.
    pub decay: Option<HeadParamId>,
    /// The per-token gate input, when there is one.
    pub gate: Option<TokenId>,
}

/// Which program of a strategy to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The single-pass kernel: one CTA walks the whole sequence.
    Whole,
    /// Chunked, first kernel: each chunk of `chunk_tiles` blocks writes its local state.
    ChunkStates { chunk_tiles: u32 },
    /// Chunked, second kernel: each chunk starts from the decayed sum of the earlier
    /// chunks' states and writes its outputs.
    ChunkOutputs { chunk_tiles: u32 },
    /// The look-back kernel ([`Strategy::LookBack`]).
    LookBack,
}

/// The single-pass program ([`Part::Whole`]).
pub fn lightning(
    spec: &LinearSpec,
    sched: &LinearSchedule,
) -> Result<(TileProgram, LinearBindings), TileError> {
    lightning_part(spec, sched, Part::Whole)
}

pub fn lightning_part(
    spec: &LinearSpec,
    sched: &LinearSchedule,
    part: Part,
) -> Result<(TileProgram, LinearBindings), TileError> {
    lightning_walk(spec, sched, part, false)
}

/// The single-pass program walking the sequence backwards: `O_j = sum_{i >= j}
/// decay(i - j) (q_j . k_i) v_i`, the anti-causal form the backward's dK and dV take
/// (`family::linear::backward`). Tile `t`'s rows `j` and keys `i` (tile-relative, `B` the
/// tile) see
///
/// | part | statement |
/// | --- | --- |
/// | intra: `i >= j`, `lam^(i - j)` | `s = select(j <= i, s * lam^(i - j), 0)` (`j` the row) |
/// | inter: `lam^(B - j) Q R_t` | `o = Q . R; o = o * lam^(B - j)` |
/// | state: `R_{t-1} = lam^B R_t + sum_i lam^i K_i^T V_i` | `st = st * lam^B; st += (K * lam^i)^T . V` |
///
/// where `R_t` sums the tiles after `t`, each key decayed to the start of tile `t + 1`.
/// No gate (its reverse form would read the token after the tile).
pub fn lightning_reverse(
    spec: &LinearSpec,
    sched: &LinearSchedule,
) -> Result<(TileProgram, LinearBindings), TileError> {
    if !spec.causal || matches!(spec.decay, Decay::Gate(_)) {
        return Err(TileError::Unsupported(
            "the reverse walk is for causal attention without a gate".into(),
        ));
    }
    lightning_walk(spec, sched, Part::Whole, true)
}

fn lightning_walk(
    spec: &LinearSpec,
    sched: &LinearSchedule,
    part: Part,
    reverse: bool,
) -> Result<(TileProgram, LinearBindings), TileError> {
    let (d, e, eb) = (spec.head_dim, spec.value_dim, sched.value_block);
    let chunk_tiles = match part {
        Part::Whole => 0,
        Part::ChunkStates { chunk_tiles } | Part::ChunkOutputs { chunk_tiles } => chunk_tiles,
        Part::LookBack => 1,
    };
    if part != Part::Whole
        && (chunk_tiles == 0 || !spec.causal || matches!(spec.decay, Decay::Gate(_)))
    {
        return Err(TileError::Unsupported(
            "the chunked and look-back strategies need causal attention without a gate (and at least one block per chunk); use `--strategy single`".into(),
        ));
    }
    if spec.elem == Elem::F32 {
        return Err(TileError::Unsupported("inputs must be bf16 or f16".into()));
    }
    if eb == 0 || !e.is_multiple_of(eb) || !eb.is_multiple_of(16) || !d.is_multiple_of(16) {
        return Err(TileError::Unsupported(format!(
            "value block {eb} must divide e = {e}; d and the block must be multiples of 16"
        )));
    }
    if !spec.causal && spec.decay != Decay::None {
        return Err(TileError::Unsupported(
            "non-causal linear attention with decay".into(),
        ));
    }
    let block = d;
    let suffix = match part {
        Part::Whole if reverse => "_reverse".into(),
        Part::Whole => String::new(),
        Part::ChunkStates { chunk_tiles } => format!("_states_c{chunk_tiles}"),
        Part::ChunkOutputs { chunk_tiles } => format!("_outputs_c{chunk_tiles}"),
        Part::LookBack => "_lookback".into(),
    };
    let mut p = TileProgram {
        sequential: true,
        col_blocks: e / eb,
        look_back: part == Part::LookBack,
        reverse,
        chunk_tiles,
        states: match part {
            Part::Whole => vec![],
            Part::ChunkStates { .. } | Part::ChunkOutputs { .. } => vec![StateParam {
                name: "chunk_states".into(),
                cols: e,
            }],
            Part::LookBack => ["chunk_states", "chunk_inclusive"]
                .iter()
                .map(|name| StateParam {
                    name: (*name).into(),
                    cols: e,
                })
                .collect(),
        },
        ..TileProgram::new(
            spec.kernel_name(eb) + &suffix,
            TileSchedule {
                block_m: block,
                warps: sched.warps,
                stages: sched.stages,
                skip_unit_rescale: false,
                persistent: None,
                store_tma: false,
                pin_deferred_wait: false,
                mma: sched.mma,
                loads: crate::tile::Loads::Cooperative,
            },
        )
    };
    let mut tensor = |name: &str, rows, cols, is_output| {
        p.tensors.push(TensorParam {
            name: name.into(),
            elem: spec.elem,
            rows,
            head_dim: cols,
            is_output,
        });
        TensorId(p.tensors.len() as u32 - 1)
    };
    let q = tensor("q", SeqRank::Query, d, false);
    let k = tensor("k", SeqRank::Key, d, false);
    let v = tensor("v", SeqRank::Key, e, false);
    let o = tensor("o", SeqRank::Query, e, true);
    let decay = match &spec.decay {
        Decay::None | Decay::Gate(_) => None,
        Decay::PerHead(name) => {
            p.head_params.push(HeadParam { name: name.clone() });
            Some(HeadParamId(0))
        }
    };
    let gate = match &spec.decay {
        Decay::Gate(name) => {
            p.tokens.push(TokenParam {
                name: name.clone(),
                extent: None,
            });
            Some(TokenId(0))
        }
        _ => None,
    };
    // exp(G[a] - G[b]) between two tokens of the tile.
    let gate_between = |a: TokenAt, b: TokenAt| {
        gate.map(|g| {
            un(
                UnaryOp::Exp,
                sub(ScalarExpr::Token(g, a), ScalarExpr::Token(g, b)),
            )
        })
    };
    let mut shared = |name: &str, rows, cols, rank| {
        p.shared.push(SharedTile {
            name: name.into(),
            rows,
            cols,
            elem: spec.elem,
            rank,
        });
        SharedId(p.shared.len() as u32 - 1)
    };
    // K and V first: the state kernel keeps only those two (see `Part::ChunkStates`).
    let k_s = shared("k_s", block, d, SeqRank::Key);
    let v_s = shared("v_s", block, eb, SeqRank::Key);
    let q_s = shared("q_s", block, d, SeqRank::Query);
    let state_s = shared("state_s", d, eb, SeqRank::Key);
    let mut reg = |name: &str, cols, col_rank, kind| {
        p.regs.push(RegTile {
            name: name.into(),
            cols,
            col_rank,
            kind,
        });
        RegId(p.regs.len() as u32 - 1)
    };
    let s = reg("s", block, ColRank::Key, RegKind::Accumulator);
    let pf = reg("p", block, ColRank::Key, RegKind::AOperand(spec.elem));
    let acc = reg("o", eb, ColRank::HeadDim, RegKind::Accumulator);
    let st = reg("state", eb, ColRank::HeadDim, RegKind::Accumulator);

    // lam^x = exp2(-s[h] log2(e) x); the factor is uniform and hoisted.
    let decay_pow = |x: ScalarExpr| decay.map(|hp| exp2(mul(mul(head(hp), lit(-LOG2_E)), x)));
    if !spec.causal {
        // Two passes over the sequence: the whole state, then every output from it.
        p.body = vec![
            Stmt::Fill {
                dst: st,
                value: 0.0,
            },
            Stmt::KeyLoop {
                block_n: block,
                masks: vec![],
                body: vec![
                    Stmt::LoadTile { dst: k_s, src: k },
                    Stmt::LoadTile { dst: v_s, src: v },
                    Stmt::ContractT {
                        acc: st,
                        a: k_s,
                        scale: lit(1.0),
                        b: v_s,
                    },
                ],
            },
            Stmt::StoreShared {
                src: st,
                dst: state_s,
            },
            Stmt::KeyLoop {
                block_n: block,
                masks: vec![],
                body: vec![
                    Stmt::LoadTile { dst: q_s, src: q },
                    Stmt::Fill {
                        dst: acc,
                        value: 0.0,
                    },
                    Stmt::Contract {
                        acc,
                        a: AOperand::Shared(q_s),
                        b: state_s,
                        b_layout: BLayout::RowsAreK,
                    },
                    Stmt::Store { src: acc, dst: o },
                ],
            },
        ];
        let _ = pf;
        p.validate()?;
        return Ok((
            p,
            LinearBindings {
                q,
                k,
                v,
                o,
                decay,
                gate,
            },
        ));
    }
    let (i, j) = (index(SeqRank::Query), index(SeqRank::Key));
    // Reversed, the key comes at or after the row: lam^(key - row), written through
    // `row - key` so that the PTX lowering computes it once per kernel (a difference).
    let intra_decay = if reverse {
        decay.map(|hp| exp2(mul(mul(head(hp), lit(LOG2_E)), sub(i.clone(), j.clone()))))
    } else {
        decay_pow(sub(i.clone(), j.clone()))
    };
    let intra = match intra_decay.or_else(|| gate_between(TokenAt::Row, TokenAt::Col)) {
        Some(f) => mul(elem(s), f),
        None => elem(s),
    };
    let states = StateId(0);
    let state_update = |lp: &mut Vec<Stmt>| {
        if let Some(f) =
            decay_pow(lit(block as f64)).or_else(|| gate_between(TokenAt::Last, TokenAt::Before))
        {
            lp.push(Stmt::Map {
                dst: st,
                expr: mul(elem(st), f),
            });
        }
        // A key's decay to the tile's end (forward) or to its start (reverse).
        let to_edge = if reverse {
            index(SeqRank::Key)
        } else {
            sub(lit(block as f64 - 1.0), index(SeqRank::Key))
        };
        lp.push(Stmt::ContractT {
            acc: st,
            a: k_s,
            scale: decay_pow(to_edge)
                .or_else(|| gate_between(TokenAt::Last, TokenAt::Col))
                .unwrap_or(lit(1.0)),
            b: v_s,
        });
    };
    // The update writes the registers `st`; `state_s` keeps the previous state until the
    // end of the iteration, where the inter-block product has read it.
    let qk = vec![
        Stmt::Fill { dst: s, value: 0.0 },
        Stmt::Contract {
            acc: s,
            a: AOperand::Shared(q_s),
            b: k_s,
            b_layout: BLayout::RowsAreN,
        },
    ];
    let qs = vec![
        Stmt::Fill {
            dst: acc,
            value: 0.0,
        },
        Stmt::Contract {
            acc,
            a: AOperand::Shared(q_s),
            b: state_s,
            b_layout: BLayout::RowsAreK,
        },
    ];
    let mut upd = Vec::new();
    state_update(&mut upd);
    let visible = if reverse { CmpOp::Ge } else { CmpOp::Le };
    let maps = vec![Stmt::Map {
        dst: s,
        expr: select(visible, j.clone(), i.clone(), intra, lit(0.0)),
    }];
    let mut dec = Vec::new();
    // The row's decay from the state's edge: the start of the tile (forward, the state
    // holds keys up to the token before it) or the start of the next one (reverse).
    let from_edge = if reverse {
        sub(lit(block as f64), i)
    } else {
        add(i, lit(1.0))
    };
    let inter_decay = decay_pow(from_edge).or_else(|| gate_between(TokenAt::Row, TokenAt::Before));
    if let Some(f) = inter_decay.clone() {
        dec.push(Stmt::Map {
            dst: acc,
            expr: mul(elem(acc), f),
        });
    }
    let conv = vec![Stmt::Convert { dst: pf, src: s }];
    let pv = vec![Stmt::Contract {
        acc,
        a: AOperand::Reg(pf),
        b: v_s,
        b_layout: BLayout::RowsAreK,
    }];
    let store = vec![Stmt::Store { src: acc, dst: o }];
    let ss = vec![Stmt::StoreShared {
        src: st,
        dst: state_s,
    }];
    let _ = j;
    // Statement order decides what the asynchronous MMAs (wgmma) overlap. Measured on an
    // H200 (B=4 H=16 d=e=128 N=65536, bench/results/linear_2026-12-01): scores first and
    // their element-wise work while nothing else is queued, then the inter-block product,
    // P V, and the state update, whose operand scaling overlaps P V and whose MMAs overlap
    // the output store (159 Mtok/s; the five orders tried ran 139-159). With a gate the
    // element-wise work reads per-token inputs from memory, and queueing the inter-block
    // product before it hides that latency better (115 vs 105 Mtok/s).
    let seq: Vec<&Vec<Stmt>> = if gate.is_some() {
        vec![&qk, &qs, &maps, &dec, &conv, &pv, &upd, &store, &ss]
    } else {
        vec![&qk, &maps, &qs, &dec, &conv, &pv, &upd, &store, &ss]
    };
    let mut lp = vec![
        Stmt::LoadTile { dst: q_s, src: q },
        Stmt::LoadTile { dst: k_s, src: k },
        Stmt::LoadTile { dst: v_s, src: v },
    ];
    for part in seq {
        lp.extend(part.iter().cloned());
    }
    p.body = match part {
        Part::Whole => vec![
            Stmt::Fill {
                dst: st,
                value: 0.0,
            },
            Stmt::StoreShared {
                src: st,
                dst: state_s,
            },
            Stmt::KeyLoop {
                block_n: block,
                masks: vec![],
                body: lp,
            },
        ],
        Part::ChunkStates { .. } => {
            // Q and the shared copy of the state are never touched here; dropping them
            // halves the shared memory, so two CTAs fit on an SM.
            p.shared.truncate(2);
            let mut only_state = vec![
                Stmt::LoadTile { dst: k_s, src: k },
                Stmt::LoadTile { dst: v_s, src: v },
            ];
            state_update(&mut only_state);
            vec![
                Stmt::Fill {
                    dst: st,
                    value: 0.0,
                },
                Stmt::KeyLoop {
                    block_n: block,
                    masks: vec![],
                    body: only_state,
                },
                Stmt::StoreState {
                    src: st,
                    dst: states,
                },
            ]
        }
        Part::LookBack => {
            // One block: its intra-block outputs and its own state from a single read of
            // Q, K and V; the entering state by look-back; then the inter-block outputs
            // from Q, still in shared memory.
            let prefix = reg("prefix", eb, ColRank::HeadDim, RegKind::Accumulator);
            let inter = reg("inter", eb, ColRank::HeadDim, RegKind::Accumulator);
            let mut body = vec![
                Stmt::LoadTile { dst: q_s, src: q },
                Stmt::LoadTile { dst: k_s, src: k },
                Stmt::LoadTile { dst: v_s, src: v },
            ];
            for part in [&qk, &maps, &conv, &pv, &upd] {
                body.extend(part.iter().cloned());
            }
            let mut out = vec![
                Stmt::Fill {
                    dst: st,
                    value: 0.0,
                },
                Stmt::Fill {
                    dst: acc,
                    value: 0.0,
                },
                Stmt::KeyLoop {
                    block_n: block,
                    masks: vec![],
                    body,
                },
                Stmt::LookBack {
                    state: st,
                    prefix,
                    aggregates: StateId(0),
                    inclusive: StateId(1),
                    decay: decay_pow(lit(block as f64)).unwrap_or(lit(1.0)),
                },
                Stmt::StoreShared {
                    src: st,
                    dst: state_s,
                },
                Stmt::Fill {
                    dst: inter,
                    value: 0.0,
                },
                Stmt::Contract {
                    acc: inter,
                    a: AOperand::Shared(q_s),
                    b: state_s,
                    b_layout: BLayout::RowsAreK,
                },
            ];
            out.push(Stmt::Map {
                dst: acc,
                expr: match inter_decay.clone() {
                    Some(f) => add(elem(acc), mul(elem(inter), f)),
                    None => add(elem(acc), elem(inter)),
                },
            });
            out.push(Stmt::Store { src: acc, dst: o });
            out
        }
        Part::ChunkOutputs { chunk_tiles } => vec![
            Stmt::LoadStatePrefix {
                dst: st,
                src: states,
                decay: decay_pow(lit((block * chunk_tiles) as f64)).unwrap_or(lit(1.0)),
            },
            Stmt::StoreShared {
                src: st,
                dst: state_s,
            },
            Stmt::KeyLoop {
                block_n: block,
                masks: vec![],
                body: lp,
            },
        ],
    };
    p.validate()?;
    Ok((
        p,
        LinearBindings {
            q,
            k,
            v,
            o,
            decay,
            gate,
        },
    ))
}
