//! Softmax attention as a tile program: FuseMax's 1-pass cascade (the FlashAttention-2
//! forward), with score modifiers (scale, ALiBi, tanh soft-cap), band masks (causal,
//! sliding window) and masks on per-token values (documents, which narrow the key loop).
//!
//! Scores are kept in log2 units (`x = logit * log2(e)`) so the exponentials are `ex2`; the
//! factor is folded into the scale, which the printer hoists as a uniform value. The
//! cascade of `docs/algorithms.md` section 2 maps onto the statements as
//!
//! | cascade | statement |
//! | --- | --- |
//! | `BQK = Q . BK` | `S = 0; S += Q . K^T` |
//! | score modifiers, `where` masks | `S = map ...; mask S` |
//! | `LM = max over m0`, `RM' = max(RM, LM)` | `tile_max = row_max(S); m_new = max(m, tile_max)` |
//! | `SLN = exp(BQK - RM')`, `SLD = sum SLN` | `S = exp2(S - m_new)`, `tile_sum = row_sum(S)` |
//! | `PRM = exp(RM - RM')` | `alpha = exp2(m - m_new)` |
//! | `RD' = SLD + RD * PRM` | `l = l * alpha + tile_sum` |
//! | `RNV' = SLNV + RNV * PRM` | `O = O * alpha; P = convert(S); O += P . V` |
//! | `AV = RNV / RD` | `O = O * (1 / l); store O` |

use crate::tile::ex::*;
use crate::tile::*;

/// ln 2 and log2(e), the unit changes between natural and base-2 logits.
pub const LN_2: f64 = std::f64::consts::LN_2;
pub const LOG2_E: f64 = std::f64::consts::LOG2_E;

/// The logit of one (query, key) pair as a function of the raw dot product `q.k`, in
/// natural-log units. In [`Score::expr`], `ScalarExpr::Elem(_)` stands for the dot product,
/// `Index(Query)`/`Index(Key)` for the positions `p`/`m`, `Scalar(i)` for the kernel scalar
/// named `scalars[i]` and `Head(j)` for the per-head array named `head_params[j]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    pub expr: ScalarExpr,
    pub scalars: Vec<String>,
    pub head_params: Vec<String>,
}

/// The placeholder register that stands for the dot product in [`Score::expr`].
pub const DOT: RegId = RegId(u32::MAX);

impl Score {
    /// `scale * q.k`.
    pub fn scaled() -> Score {
        Score {
            expr: mul(scalar(ScalarId(0)), elem(DOT)),
            scalars: vec!["scale".into()],
            head_params: vec![],
        }
    }

    /// `cap * tanh(x / cap)` around the current logit, with `cap` a new scalar `softcap`.
    pub fn with_softcap(mut self) -> Score {
        self.scalars.push("softcap".into());
        let cap = scalar(ScalarId(self.scalars.len() as u32 - 1));
        self.expr = mul(cap.clone(), tanh(div(self.expr, cap)));
        self
    }

    /// Adds the ALiBi bias `slope[h] * (m - p)`, with `slope` a new head array `alibi_slopes`.
    pub fn with_alibi(mut self) -> Score {
        self.head_params.push("alibi_slopes".into());
        let slope = head(HeadParamId(self.head_params.len() as u32 - 1));
        self.expr = add(
            self.expr,
            mul(slope, sub(index(SeqRank::Key), index(SeqRank::Query))),
        );
        self
    }

    /// True for `scale * q.k` with the scale a kernel scalar: the kernel then keeps raw
    /// scores and folds the scale into the max and the exponent, which needs `scale > 0`.
    pub fn scaled_dot(&self) -> Option<ScalarId> {
        match &self.expr {
            ScalarExpr::Binary(BinaryOp::Mul, a, b) => match (&**a, &**b) {
                (ScalarExpr::Scalar(s), ScalarExpr::Elem(DOT))
                | (ScalarExpr::Elem(DOT), ScalarExpr::Scalar(s)) => Some(*s),
                _ => None,
            },
            _ => None,
        }
    }

    /// Evaluates the logit in f64 (the reference formula's path); `token` gives the value of
    /// a token input read at a position ([`AttentionSpec::tokens`]).
    pub fn eval(
        &self,
        dot: f64,
        (p, m): (f64, f64),
        scalars: &[f64],
        head_params: &[f64],
        token: &dyn Fn(TokenId, TokenAt) -> f64,
    ) -> f64 {
        let value = self.expr.eval(&mut |leaf| {
            Ok::<f64, std::convert::Infallible>(match leaf {
                ScalarExpr::Lit(v) => *v,
                ScalarExpr::Scalar(id) => scalars[id.index()],
                ScalarExpr::Head(id) => head_params[id.index()],
                ScalarExpr::Index(SeqRank::Query) => p,
                ScalarExpr::Index(SeqRank::Key) => m,
                ScalarExpr::Token(id, at) => token(*id, *at),
                // The dot product placeholder (scores have no other tiles or rows).
                _ => dot,
            })
        });
        match value {
            Ok(v) => v,
            Err(never) => match never {},
        }
    }

    /// The logit as `--emit schedule` prints it: `q.k` for the dot product, the scalars'
    /// and head arrays' names, `p` and `m` for the query and key positions, token inputs
    /// (named by `tokens`) at theirs.
    pub fn describe(&self, tokens: &[TokenParam]) -> String {
        fn offset(c: i64) -> String {
            match c {
                0 => String::new(),
                c if c < 0 => format!(" - {}", -c),
                c => format!(" + {c}"),
            }
        }
        fn show_expr(s: &Score, tokens: &[TokenParam], e: &ScalarExpr) -> String {
            let show = |e: &ScalarExpr| show_expr(s, tokens, e);
            match e {
                ScalarExpr::Lit(x) => format!("{x}"),
                ScalarExpr::Scalar(id) => s.scalars[id.index()].clone(),
                ScalarExpr::Head(id) => format!("{}[h]", s.head_params[id.index()]),
                ScalarExpr::Index(SeqRank::Query) => "p".into(),
                ScalarExpr::Index(SeqRank::Key) => "m".into(),
                ScalarExpr::Unary(op, a) => {
                    format!("{}({})", format!("{op:?}").to_lowercase(), show(a))
                }
                // Unit factors and zero terms (from affine indices) say nothing.
                ScalarExpr::Binary(BinaryOp::Mul, x, y) if matches!(**x, ScalarExpr::Lit(v) if v == 1.0) => {
                    show(y)
                }
                ScalarExpr::Binary(BinaryOp::Mul, x, y) if matches!(**x, ScalarExpr::Lit(v) if v == -1.0) =>
                {
                    format!("-{}", show(y))
                }
                ScalarExpr::Binary(BinaryOp::Add, x, y) if matches!(**y, ScalarExpr::Lit(v) if v == 0.0) => {
                    show(x)
                }
                ScalarExpr::Binary(op, a, b) => {
                    let sym = match op {
                        BinaryOp::Add => "+",
                        BinaryOp::Sub => "-",
                        BinaryOp::Mul => "*",
                        BinaryOp::Div => "/",
                        BinaryOp::Max => return format!("max({}, {})", show(a), show(b)),
                        BinaryOp::Min => return format!("min({}, {})", show(a), show(b)),
                    };
                    format!("({} {sym} {})", show(a), show(b))
                }
                ScalarExpr::Select {
                    op,
                    lhs,
                    rhs,
                    then,
                    otherwise,
                } => format!(
                    "({} {op:?} {} ? {} : {})",
                    show(lhs),
                    show(rhs),
                    show(then),
                    show(otherwise)
                ),
                ScalarExpr::Elem(_) => "q.k".into(),
                ScalarExpr::Token(id, at) => {
                    let name = tokens.get(id.index()).map_or("?", |t| t.name.as_str());
                    match at {
                        TokenAt::Row => format!("{name}[p]"),
                        TokenAt::Col => format!("{name}[m]"),
                        TokenAt::QueryMinusKey(c) => format!("{name}[p - m{}]", offset(*c)),
                        TokenAt::KeyMinusQuery(c) => format!("{name}[m - p{}]", offset(*c)),
                        TokenAt::Last | TokenAt::Before => format!("{name}[?]"),
                    }
                }
                // Scores read no rows.
                ScalarExpr::Row(_) => "?".into(),
            }
        }
        let text = show_expr(self, tokens, &self.expr);
        // The outermost parentheses say nothing.
        match text.strip_prefix('(').and_then(|t| t.strip_suffix(')')) {
            Some(inner) if matches!(self.expr, ScalarExpr::Binary(..)) => inner.to_string(),
            _ => text,
        }
    }

    /// A short stable tag of the expression for kernel names.
    fn tag(&self) -> String {
        if self.scaled_dot().is_some() {
            return String::new();
        }
        if *self == Score::scaled().with_alibi() {
            return "_alibi".into();
        }
        if *self == Score::scaled().with_softcap() {
            return "_softcap".into();
        }
        if *self == Score::scaled().with_softcap().with_alibi() {
            return "_softcap_alibi".into();
        }
        format!("_s{:08x}", fnv1a(&format!("{:?}", self.expr)))
    }
}

/// The tag of a sink logit in kernel names: `_sink` for a head array or a scalar, `_plus1`
/// for softmax1's 0, else a hash of the expression.
fn sink_tag(sink: &ScalarExpr) -> String {
    match sink {
        ScalarExpr::Head(_) | ScalarExpr::Scalar(_) => "_sink".into(),
        ScalarExpr::Lit(x) if *x == 0.0 => "_plus1".into(),
        other => format!("_sink{:08x}", fnv1a(&format!("{other:?}"))),
    }
}

/// FNV-1a of a printed expression: different expressions get different entry points.
fn fnv1a(text: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in text.bytes() {
        h = (h ^ b as u32).wrapping_mul(0x0100_0193);
    }
    h
}

/// The tag of a value mask in kernel names.
fn value_mask_tag(m: &ValueMask) -> String {
    let side = |(t, at): (TokenId, TokenAt)| {
        format!("{}{}", t.0, if at == TokenAt::Row { "q" } else { "k" })
    };
    format!(
        "_vm{}{}{}",
        side(m.lhs),
        format!("{:?}", m.op).to_lowercase(),
        side(m.rhs)
    )
}

/// How the scores become the weights of V.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Normalization {
    /// `softmax(s)`: the score is a logit.
    Softmax,
    /// None: the score is the weight itself, an element-wise map of `q.k` (sigmoid
    /// attention's `sigmoid(scale * q.k + bias)`), and `O = sum_m w_m V_m`.
    None,
}

/// What to compute: logits `s = score(q.k, p, m)`; masked keys are excluded;
/// `O = softmax(s) V`, optionally `LSE = log sum exp s` (or `O = sum_m s V` without
/// normalization).
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionSpec {
    /// The width of Q and K (the contracted dimension).
    pub head_dim: u32,
    /// The width of V and O (192 / 128 in DeepSeek's multi-head latent attention).
    pub value_dim: u32,
    pub elem: Elem,
    /// `m <= p` (top-left aligned, as PyTorch's `is_causal`).
    pub causal: bool,
    /// Keep keys with `p - m < window` (combine with `causal` for the usual sliding window).
    pub window: Option<u32>,
    /// Band masks beyond the causal and window forms (`m - p <= c` and friends).
    pub extra_masks: Vec<BandMask>,
    /// The per-token f32 inputs that value masks and the score read (a table over the
    /// distance with its extent).
    pub tokens: Vec<TokenParam>,
    /// Masks that compare per-token values (checked per element after the band masks).
    pub value_masks: Vec<ValueMask>,
    pub score: Score,
    /// Also write the log-sum-exp (natural log) per query row.
    pub write_lse: bool,
    /// Query rows sit at a launch-given position offset (a sequence slice under SP).
    pub query_offset: bool,
    /// A partial over one key block (Ring Attention, TokenRing): instead of `O`, write the
    /// unnormalized `f32` numerator `sum_m exp(s - max) v_m` in `o` and the per-row max
    /// (natural-log units, `-inf` for a row that saw no key) and sum `sum_m exp(s - max)`
    /// as row outputs `max` and `sum`: the statistics a log-sum-exp merge combines.
    pub partial: bool,
    /// A sink logit (natural-log units; uniform along a row: literals, and the scalars and
    /// head arrays of [`AttentionSpec::score`] by its ids) that joins the softmax
    /// normalization without a value: `O = sum_m exp(s_m) V_m / (exp(sink) + sum_m
    /// exp(s_m))`. A per-head learned sink (gpt-oss), or 0 for softmax1's `+1`.
    pub sink: Option<ScalarExpr>,
    pub normalization: Normalization,
}

impl AttentionSpec {
    pub fn new(head_dim: u32, elem: Elem) -> AttentionSpec {
        AttentionSpec {
            head_dim,
            value_dim: head_dim,
            elem,
            causal: false,
            window: None,
            extra_masks: vec![],
            tokens: vec![],
            value_masks: vec![],
            score: Score::scaled(),
            write_lse: false,
            query_offset: false,
            partial: false,
            sink: None,
            normalization: Normalization::Softmax,
        }
    }
    pub fn masks(&self) -> Vec<BandMask> {
        let mut v = Vec::new();
        if self.causal {
            v.push(BandMask::causal());
        }
        if let Some(w) = self.window {
            v.push(BandMask::window(w));
        }
        v.extend(self.extra_masks.iter().copied());
        v
    }
    /// Declares the score chain's scalars and per-head arrays in `p`, in the spec's order:
    /// every program that reads the score (or the sink) binds them alike.
    pub fn declare_params(&self, p: &mut TileProgram) {
        for name in &self.score.scalars {
            p.scalars.push(ScalarParam { name: name.clone() });
        }
        for name in &self.score.head_params {
            p.head_params.push(HeadParam { name: name.clone() });
        }
    }
    /// An equality of a query token and a key token (a document mask), which bounds the
    /// keys a query tile can see: the key loop is narrowed to them.
    pub fn key_narrowing(&self) -> Option<TokenMatch> {
        self.value_masks
            .iter()
            .find_map(|m| match (m.lhs, m.op, m.rhs) {
                ((q, TokenAt::Row), CmpOp::Eq, (k, TokenAt::Col))
                | ((k, TokenAt::Col), CmpOp::Eq, (q, TokenAt::Row)) => {
                    Some(TokenMatch { query: q, key: k })
                }
                _ => None,
            })
    }
    /// A short name used for kernel entry points.
    pub fn kernel_name(&self) -> String {
        let mut s = format!("einattn_fwd_d{}", self.head_dim);
        if self.value_dim != self.head_dim {
            s.push_str(&format!("v{}", self.value_dim));
        }
        s.push('_');
        s.push_str(self.elem.name());
        if self.causal {
            s.push_str("_causal");
        }
        if let Some(w) = self.window {
            s.push_str(&format!("_win{w}"));
        }
        for m in &self.extra_masks {
            let dir = match m.direction {
                BandDirection::KeyMinusQuery => "kq",
                BandDirection::QueryMinusKey => "qk",
            };
            s.push_str(&format!("_band{dir}{}", m.bound).replace('-', "n"));
        }
        for m in &self.value_masks {
            s.push_str(&value_mask_tag(m));
        }
        s.push_str(&self.score.tag());
        if let Some(sink) = &self.sink {
            s.push_str(&sink_tag(sink));
        }
        if self.normalization == Normalization::None {
            s.push_str("_unnormalized");
        }
        if self.write_lse {
            s.push_str("_lse");
        }
        if self.query_offset {
            s.push_str("_qoff");
        }
        if self.partial {
            s.push_str("_partial");
        }
        s
    }
    /// The sink logit of a row of head `head_values` belongs to, in f64 (the reference's);
    /// `row_token` reads a token input at the row (a per-query-head sink of packed
    /// grouped-query decoding, whose rows are query heads).
    pub fn sink_logit(
        &self,
        scalars: &[f64],
        head_values: &[f64],
        row_token: &dyn Fn(TokenId) -> f64,
    ) -> Option<f64> {
        let sink = self.sink.as_ref()?;
        let score = Score {
            expr: sink.clone(),
            ..self.score.clone()
        };
        // Uniform along the row: no dot product, position, or token at the key.
        let token = |id: TokenId, at: TokenAt| match at {
            TokenAt::Row => row_token(id),
            _ => f64::NAN,
        };
        Some(score.eval(0.0, (0.0, 0.0), scalars, head_values, &token))
    }

    /// True when the score is anything but `scale * q.k`.
    pub fn modifies_score(&self) -> bool {
        self.score.scaled_dot().is_none()
    }
}

/// Schedule knobs of the attention lowering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionSchedule {
    pub block_m: u32,
    pub block_n: u32,
    pub warps: u32,
    pub stages: u32,
    /// Keep Q's A fragments in registers for the whole key loop (else re-read from shared
    /// memory at every key tile).
    pub q_in_registers: bool,
    /// See [`TileSchedule::skip_unit_rescale`].
    pub skip_unit_rescale: bool,
    /// Lazy rescaling: a row keeps its running max until a key tile's scores exceed it by
    /// more than [`LAZY_RESCALE_LOG2`] (in log2 units), so most tiles leave the output and
    /// the sum unscaled (the warp's vote then skips the multiply). Exact: numerator and
    /// denominator share the stale max; each probability is at most 2^8 (FlashAttention-4
    /// does the same). Not in partial kernels, whose max a merge or check reads.
    pub lazy_rescale: bool,
    /// See [`TileSchedule::store_tma`].
    pub store_tma: bool,
    /// The probabilities reach `P V` through shared memory (`StoreShared` into a tile of
    /// `block_m x block_n`, read as the contraction's shared A operand) instead of as
    /// 16-bit A fragments in registers: FlashAttention-3's `MmaPV_is_RS = false`. With the
    /// deferred `P V` of a warp-specialized loop, registers no longer hold one tile's
    /// probabilities beside the next tile's scores, which is what admits 192-key tiles with
    /// three consumer warpgroups at head dim 64 (FA3's non-causal shape there).
    pub p_in_shared: bool,
    /// See [`TileSchedule::pin_deferred_wait`].
    pub pin_deferred_wait: bool,
    /// Tensor-core instructions: `wgmma` needs 16 rows per warp and whole warpgroups.
    pub mma: MmaUnit,
    /// Who copies K and V: every thread, or a producer warpgroup (needs `wgmma`).
    pub loads: Loads,
    /// See [`TileSchedule::persistent`].
    pub persistent: Option<u32>,
}

impl AttentionSchedule {
    /// Defaults chosen from the ptxas register report and H100 measurements
    /// (see `bench/NOTES-softmax.md`).
    pub fn default_for(spec: &AttentionSpec) -> AttentionSchedule {
        // FlashAttention-2's shape: 4 warps, each owning 32 query rows (two m16 tiles), so
        // every K/V fragment read from shared memory feeds two MMAs; Q is re-read from
        // shared memory (registers are full). 255 registers x 128 threads and <= 98 KB of
        // shared memory leave room for 2 CTAs per SM. Measured on H100 (bench/NOTES-softmax.md).
        let block_n = if spec.head_dim <= 64 { 128 } else { 64 };
        // The vote-skip of the rescale costs up to 5% (d=64) where registers suffice, but
        // at 255 registers it is what keeps ptxas from spilling: plain d<=64 kernels fit
        // without it; d=128 and score-modified, windowed or value-masked kernels need it.
        let plain = !spec.modifies_score() && spec.window.is_none() && spec.value_masks.is_empty();
        AttentionSchedule {
            block_m: 128,
            block_n,
            warps: 4,
            stages: 2,
            q_in_registers: false,
            skip_unit_rescale: !(spec.head_dim <= 64 && plain),
            lazy_rescale: false,
            store_tma: false,
            p_in_shared: false,
            pin_deferred_wait: false,
            persistent: None,
            mma: MmaUnit::Sync,
            loads: Loads::Cooperative,
        }
    }
}

/// Handles of the pieces of an attention program a launcher needs to bind. The program's
/// scalars and head parameters are those of [`Score`], in its order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionBindings {
    pub q: TensorId,
    pub k: TensorId,
    pub v: TensorId,
    pub o: TensorId,
    pub lse: Option<RowOutputId>,
    /// The row outputs `max` and `sum` of a partial program.
    pub stats: Option<(RowOutputId, RowOutputId)>,
}

/// How far (in log2 units of the logit) a row's scores may exceed its running max before a
/// lazily rescaled kernel moves the max: probabilities stay at most 2^8, far inside bf16's
/// and f16's range.
pub const LAZY_RESCALE_LOG2: f64 = 8.0;

/// Builds the 1-pass softmax attention tile program.
pub fn flash_attention(
    spec: &AttentionSpec,
    sched: &AttentionSchedule,
) -> Result<(TileProgram, AttentionBindings), TileError> {
    if spec.elem == Elem::F32 {
        return Err(TileError::Unsupported(
            "attention inputs must be bf16 or f16".into(),
        ));
    }
    if spec.partial && spec.write_lse {
        return Err(TileError::Unsupported(
            "a partial kernel writes its max and sum, not the log-sum-exp".into(),
        ));
    }
    if spec.normalization == Normalization::None && (spec.partial || spec.write_lse) {
        return Err(TileError::Unsupported(
            "attention without normalization has no log-sum-exp or partial statistics".into(),
        ));
    }
    if spec.normalization == Normalization::None && spec.sink.is_some() {
        return Err(TileError::Unsupported(
            "a sink logit needs the softmax normalization".into(),
        ));
    }
    if spec.partial && spec.sink.is_some() {
        // Every partial would count the sink's term once: the merge would count it P times.
        return Err(TileError::Unsupported(
            "a partial kernel of attention with a sink logit".into(),
        ));
    }
    for (what, dim) in [("head_dim", spec.head_dim), ("value_dim", spec.value_dim)] {
        if !dim.is_multiple_of(16) || dim == 0 {
            return Err(TileError::Unsupported(format!(
                "{what} must be a multiple of 16"
            )));
        }
    }
    let (d, dv) = (spec.head_dim, spec.value_dim);
    let mut p = TileProgram {
        query_offset: spec.query_offset,
        ..TileProgram::new(
            spec.kernel_name(),
            TileSchedule {
                block_m: sched.block_m,
                warps: sched.warps,
                stages: sched.stages,
                skip_unit_rescale: sched.skip_unit_rescale,
                persistent: sched.persistent,
                store_tma: sched.store_tma,
                pin_deferred_wait: sched.pin_deferred_wait,
                mma: sched.mma,
                loads: sched.loads,
            },
        )
    };
    let tensor = |p: &mut TileProgram, name: &str, rows, head_dim, is_output| {
        p.tensors.push(TensorParam {
            name: name.into(),
            elem: spec.elem,
            rows,
            head_dim,
            is_output,
        });
        TensorId(p.tensors.len() as u32 - 1)
    };
    let q = tensor(&mut p, "q", SeqRank::Query, d, false);
    let k = tensor(&mut p, "k", SeqRank::Key, d, false);
    let v = tensor(&mut p, "v", SeqRank::Key, dv, false);
    let o = if spec.partial {
        // The numerator stays in f32: a merge rescales it before anything rounds it.
        p.tensors.push(TensorParam {
            name: "o".into(),
            elem: Elem::F32,
            rows: SeqRank::Query,
            head_dim: dv,
            is_output: true,
        });
        TensorId(p.tensors.len() as u32 - 1)
    } else {
        tensor(&mut p, "o", SeqRank::Query, dv, true)
    };
    let lse = spec.write_lse.then(|| {
        p.row_outputs.push(RowOutput { name: "lse".into() });
        RowOutputId(0)
    });
    let stats = spec.partial.then(|| {
        p.row_outputs.push(RowOutput { name: "max".into() });
        p.row_outputs.push(RowOutput { name: "sum".into() });
        (RowOutputId(0), RowOutputId(1))
    });
    // The program with its body, checked, and what a launcher binds.
    let finish = |mut p: TileProgram, body: Vec<Stmt>| {
        p.body = body;
        p.validate()?;
        Ok((
            p,
            AttentionBindings {
                q,
                k,
                v,
                o,
                lse,
                stats,
            },
        ))
    };
    spec.declare_params(&mut p);
    p.tokens.extend(spec.tokens.iter().cloned());
    p.key_narrowing = spec.key_narrowing();
    p.value_masks = spec.value_masks.clone();

    let shared = |p: &mut TileProgram, name: &str, rows, cols, rank| {
        p.shared.push(SharedTile {
            name: name.into(),
            rows,
            cols,
            elem: spec.elem,
            rank,
        });
        SharedId(p.shared.len() as u32 - 1)
    };
    let q_s = shared(&mut p, "q_s", sched.block_m, d, SeqRank::Query);
    let k_s = shared(&mut p, "k_s", sched.block_n, d, SeqRank::Key);
    let v_s = shared(&mut p, "v_s", sched.block_n, dv, SeqRank::Key);
    let reg = |p: &mut TileProgram, name: &str, cols, col_rank, kind| {
        p.regs.push(RegTile {
            name: name.into(),
            cols,
            col_rank,
            kind,
        });
        RegId(p.regs.len() as u32 - 1)
    };
    let s = reg(
        &mut p,
        "s",
        sched.block_n,
        ColRank::Key,
        RegKind::Accumulator,
    );
    // The probabilities of P V: 16-bit A fragments, or a shared tile of the query rows.
    let probs = if sched.p_in_shared {
        AOperand::Shared(shared(
            &mut p,
            "p_s",
            sched.block_m,
            sched.block_n,
            SeqRank::Query,
        ))
    } else {
        AOperand::Reg(reg(
            &mut p,
            "p",
            sched.block_n,
            ColRank::Key,
            RegKind::AOperand(spec.elem),
        ))
    };
    // `P V`: round the weights in `s` into the probabilities, then accumulate.
    let weighted_values = |acc| {
        let round = match probs {
            AOperand::Reg(pf) => Stmt::Convert { dst: pf, src: s },
            AOperand::Shared(p_s) => Stmt::StoreShared { src: s, dst: p_s },
        };
        [
            round,
            Stmt::Contract {
                acc,
                a: probs,
                b: v_s,
                b_layout: BLayout::RowsAreK,
            },
        ]
    };
    let acc = reg(&mut p, "acc", dv, ColRank::HeadDim, RegKind::Accumulator);
    let q_frag = sched.q_in_registers.then(|| {
        reg(
            &mut p,
            "q_frag",
            d,
            ColRank::HeadDim,
            RegKind::AOperand(spec.elem),
        )
    });
    // Q's tile (and fragments), the output accumulator at zero.
    let mut body = vec![Stmt::LoadTile { dst: q_s, src: q }];
    let a_op = match q_frag {
        Some(f) => {
            body.push(Stmt::Fragments { dst: f, src: q_s });
            AOperand::Reg(f)
        }
        None => AOperand::Shared(q_s),
    };
    body.push(Stmt::Fill {
        dst: acc,
        value: 0.0,
    });
    // Each key tile: K and V in, S = Q K^T.
    let scores = vec![
        Stmt::LoadTile { dst: k_s, src: k },
        Stmt::LoadTile { dst: v_s, src: v },
        Stmt::Fill { dst: s, value: 0.0 },
        Stmt::Contract {
            acc: s,
            a: a_op,
            b: k_s,
            b_layout: BLayout::RowsAreN,
        },
    ];
    if spec.normalization == Normalization::None {
        // The weights need no row statistics: map the scores, zero what the masks hide,
        // and accumulate P V; the output is the sum itself.
        let weight = sigmoids_by_tanh(&substitute_dot(&spec.score.expr, s));
        body.push(Stmt::KeyLoop {
            block_n: sched.block_n,
            masks: spec.masks(),
            body: [
                scores,
                vec![
                    Stmt::Map {
                        dst: s,
                        expr: weight,
                    },
                    Stmt::Mask { dst: s, fill: 0.0 },
                ],
                weighted_values(acc).to_vec(),
            ]
            .concat(),
        });
        body.push(Stmt::Store { src: acc, dst: o });
        return finish(p, body);
    }
    let new_row = |p: &mut TileProgram, name: &str| {
        p.rows.push(RowVec { name: name.into() });
        RowId(p.rows.len() as u32 - 1)
    };
    let m_run = new_row(&mut p, "m");
    let l_run = new_row(&mut p, "l");
    let tile_max = new_row(&mut p, "tile_max");
    let m_new = new_row(&mut p, "m_new");
    let m_use = new_row(&mut p, "m_use");
    let alpha = new_row(&mut p, "alpha");
    let tile_sum = new_row(&mut p, "tile_sum");

    let plain_scale = spec.score.scaled_dot();
    let plain = plain_scale.is_some();
    // Uniform factor: scale * log2(e), hoisted by the printer.
    let scale_log2 = mul(scalar(plain_scale.unwrap_or(ScalarId(0))), lit(LOG2_E));

    // The logit in log2 units, less its terms constant along a row (softmax does not see
    // them; the log-sum-exp and the partial max add them back).
    let (kept_logit, row_logit) = split_row_terms(&mul(spec.score.expr.clone(), lit(LOG2_E)));
    let with_row_terms = |x: ScalarExpr| {
        row_logit.iter().fold(x, |acc, (n, t)| {
            if *n {
                sub(acc, t.clone())
            } else {
                add(acc, t.clone())
            }
        })
    };

    match &spec.sink {
        // The sink is a key seen before the first: the running max starts at its logit (in
        // the kept terms' log2 units) and the sum at its exp(sink - max) = 1.
        Some(sink) => {
            let in_log2 = mul(sink.clone(), lit(LOG2_E));
            let kept = row_logit.iter().fold(in_log2, |acc, (n, t)| {
                if *n {
                    add(acc, t.clone())
                } else {
                    sub(acc, t.clone())
                }
            });
            body.push(Stmt::RowMap {
                dst: m_run,
                expr: kept,
            });
            body.push(Stmt::FillRow {
                dst: l_run,
                value: 1.0,
            });
        }
        None => {
            body.push(Stmt::FillRow {
                dst: m_run,
                value: f64::NEG_INFINITY,
            });
            body.push(Stmt::FillRow {
                dst: l_run,
                value: 0.0,
            });
        }
    }

    let mut lp = scores;
    if plain {
        // Keep raw scores; the scale rides on the max and on the exponent (one FFMA each),
        // as FlashAttention does. Valid because scale > 0 keeps the max where it is.
        lp.push(Stmt::Mask {
            dst: s,
            fill: f64::NEG_INFINITY,
        });
        lp.push(Stmt::RowReduce {
            dst: tile_max,
            src: s,
            op: ReduceOp::Max,
        });
        lp.push(Stmt::RowMap {
            dst: m_new,
            expr: max(row(m_run), mul(row(tile_max), scale_log2.clone())),
        });
    } else {
        lp.push(Stmt::Map {
            dst: s,
            expr: substitute_dot(&kept_logit, s),
        });
        lp.push(Stmt::Mask {
            dst: s,
            fill: f64::NEG_INFINITY,
        });
        lp.push(Stmt::RowReduce {
            dst: tile_max,
            src: s,
            op: ReduceOp::Max,
        });
        lp.push(Stmt::RowMap {
            dst: m_new,
            expr: max(row(m_run), row(tile_max)),
        });
    }
    if sched.lazy_rescale && !spec.partial {
        // Keep the running max unless the tile's exceeds it by more than the threshold
        // (-inf + t is -inf: a row's first unmasked tile always moves it).
        lp.push(Stmt::RowMap {
            dst: m_new,
            expr: select(
                CmpOp::Gt,
                row(m_new),
                add(row(m_run), lit(LAZY_RESCALE_LOG2)),
                row(m_new),
                row(m_run),
            ),
        });
    }
    // A row that has seen only masked keys keeps max -inf; subtract 0 instead so that
    // exp2(-inf - -inf) never makes a NaN.
    lp.push(Stmt::RowMap {
        dst: m_use,
        expr: select(
            CmpOp::Eq,
            row(m_new),
            lit(f64::NEG_INFINITY),
            lit(0.0),
            row(m_new),
        ),
    });
    lp.push(Stmt::RowMap {
        dst: alpha,
        expr: exp2(sub(row(m_run), row(m_use))),
    });
    let exponent = if plain {
        sub(mul(elem(s), scale_log2.clone()), row(m_use))
    } else {
        sub(elem(s), row(m_use))
    };
    lp.push(Stmt::Map {
        dst: s,
        expr: exp2(exponent),
    });
    lp.push(Stmt::RowReduce {
        dst: tile_sum,
        src: s,
        op: ReduceOp::Sum,
    });
    lp.push(Stmt::RowMap {
        dst: l_run,
        expr: add(mul(row(l_run), row(alpha)), row(tile_sum)),
    });
    lp.push(Stmt::Map {
        dst: acc,
        expr: mul(elem(acc), row(alpha)),
    });
    lp.extend(weighted_values(acc));
    lp.push(Stmt::RowMap {
        dst: m_run,
        expr: row(m_new),
    });
    body.push(Stmt::KeyLoop {
        block_n: sched.block_n,
        masks: spec.masks(),
        body: lp,
    });
    if let Some((max_out, sum_out)) = stats {
        // The running max is in log2 units of the logit: times ln 2 it is the cascade's
        // max (-inf stays -inf); the sum and the numerator are the same in either unit.
        let max_row = new_row(&mut p, "max_nat");
        body.push(Stmt::RowMap {
            dst: max_row,
            expr: mul(with_row_terms(row(m_run)), lit(LN_2)),
        });
        body.push(Stmt::StoreRow {
            src: max_row,
            dst: max_out,
        });
        body.push(Stmt::StoreRow {
            src: l_run,
            dst: sum_out,
        });
        body.push(Stmt::Store { src: acc, dst: o });
        return finish(p, body);
    }
    // Rows that saw no key (l = 0) output zeros rather than NaN.
    let inv_l = new_row(&mut p, "inv_l");
    body.push(Stmt::RowMap {
        dst: inv_l,
        expr: select(CmpOp::Eq, row(l_run), lit(0.0), lit(0.0), recip(row(l_run))),
    });
    body.push(Stmt::Map {
        dst: acc,
        expr: mul(elem(acc), row(inv_l)),
    });
    body.push(Stmt::Store { src: acc, dst: o });
    if let Some(lse) = lse {
        let lse_row = new_row(&mut p, "lse");
        // m is in log2 units: lse = (m + log2 l) * ln 2; -inf when no key was seen.
        body.push(Stmt::RowMap {
            dst: lse_row,
            expr: mul(with_row_terms(add(row(m_run), log2(row(l_run)))), lit(LN_2)),
        });
        body.push(Stmt::StoreRow {
            src: lse_row,
            dst: lse,
        });
    }
    finish(p, body)
}

/// Splits a logit into the terms that vary along a row (with the dot product or the key
/// position) and those constant along it (uniform or query-position-only terms such as
/// ALiBi's `-slope * p`): `kept + sum of row` is the logit, each row term with its sign
/// (`true`: subtracted). Sums, differences, negations and products or quotients by uniform
/// factors are expanded; anything else is one term. Every term's uniform factors are
/// gathered into one hoisted constant, so `log2(e) * (scale * s + slope * (m - p))` becomes
/// `c0 * s + c1 * m` and `- c1 * p`: one FMA per element and one product per column. Signs
/// stay out of the constants so that a term and its negation share one.
pub fn split_row_terms(e: &ScalarExpr) -> (ScalarExpr, Vec<(bool, ScalarExpr)>) {
    fn terms(e: &ScalarExpr, neg: bool, factor: &ScalarExpr, out: &mut Vec<(bool, ScalarExpr)>) {
        match e {
            ScalarExpr::Binary(BinaryOp::Add, a, b) => {
                terms(a, neg, factor, out);
                terms(b, neg, factor, out);
            }
            ScalarExpr::Binary(BinaryOp::Sub, a, b) => {
                terms(a, neg, factor, out);
                terms(b, !neg, factor, out);
            }
            ScalarExpr::Unary(UnaryOp::Neg, a) => terms(a, !neg, factor, out),
            ScalarExpr::Binary(BinaryOp::Mul, a, b) if a.is_uniform() => {
                terms(b, neg, &mul(factor.clone(), (**a).clone()), out)
            }
            ScalarExpr::Binary(BinaryOp::Mul, a, b) if b.is_uniform() => {
                terms(a, neg, &mul(factor.clone(), (**b).clone()), out)
            }
            ScalarExpr::Binary(BinaryOp::Div, a, b) if b.is_uniform() => {
                terms(a, neg, &mul(factor.clone(), recip((**b).clone())), out)
            }
            leaf => out.push((neg, simplify(&mul(fold_literals(factor), leaf.clone())))),
        }
    }
    let mut all = Vec::new();
    terms(e, false, &lit(1.0), &mut all);
    let along_row = |(_, t): &(bool, ScalarExpr)| {
        t.is_uniform() || t.position_dependence() == Some(PositionDependence::Query)
    };
    let (row, kept): (Vec<_>, Vec<_>) = all.into_iter().partition(along_row);
    let mut kept = kept.into_iter();
    match kept.next() {
        Some((first_neg, first)) => {
            let first = if first_neg {
                un(UnaryOp::Neg, first)
            } else {
                first
            };
            let sum = kept.fold(
                first,
                |acc, (n, t)| if n { sub(acc, t) } else { add(acc, t) },
            );
            (sum, row)
        }
        // Nothing varies along the row (no dot product): keep the logit whole.
        None => (simplify(e), vec![]),
    }
}

/// A product of factors with its literals multiplied out (`-1 * 1 * x` is `-1 * x`), so
/// hoisted constants stay one multiplication.
fn fold_literals(factor: &ScalarExpr) -> ScalarExpr {
    let mut factors = Vec::new();
    flatten_product(factor, &mut factors);
    let mut constant = 1.0;
    let mut rest = Vec::new();
    for f in factors {
        match f {
            ScalarExpr::Lit(x) => constant *= x,
            other => rest.push(other),
        }
    }
    let rest = rest.into_iter().reduce(mul);
    match rest {
        Some(r) if constant == 1.0 => r,
        Some(r) => mul(lit(constant), r),
        None => lit(constant),
    }
}

/// Replaces the dot-product placeholder of a [`Score`] with the score register.
/// `1 / (1 + exp(-y))` as `0.5 + 0.5 * tanh(y / 2)` wherever it appears: the same value,
/// but one `tanh.approx` and two FMAs on the GPU rather than an exponential and an IEEE
/// division per score (sigmoid attention's weights).
fn sigmoids_by_tanh(e: &ScalarExpr) -> ScalarExpr {
    let sigmoid_of = |denominator: &ScalarExpr| -> Option<ScalarExpr> {
        let ScalarExpr::Binary(BinaryOp::Add, a, b) = denominator else {
            return None;
        };
        let exp = match (&**a, &**b) {
            (ScalarExpr::Lit(one), x) | (x, ScalarExpr::Lit(one)) if *one == 1.0 => x,
            _ => return None,
        };
        match exp {
            ScalarExpr::Unary(UnaryOp::Exp, arg) => match &**arg {
                ScalarExpr::Unary(UnaryOp::Neg, y) => Some((**y).clone()),
                _ => None,
            },
            _ => None,
        }
    };
    let by_tanh = |y: ScalarExpr| add(lit(0.5), mul(lit(0.5), tanh(mul(lit(0.5), y))));
    let sigmoid = match e {
        ScalarExpr::Binary(BinaryOp::Div, n, d) if matches!(**n, ScalarExpr::Lit(x) if x == 1.0) => {
            sigmoid_of(d)
        }
        ScalarExpr::Unary(UnaryOp::Recip, d) => sigmoid_of(d),
        _ => None,
    };
    match sigmoid {
        Some(y) => by_tanh(sigmoids_by_tanh(&y)),
        None => e.map_children(&mut sigmoids_by_tanh),
    }
}

fn substitute_dot(e: &ScalarExpr, s: RegId) -> ScalarExpr {
    match e {
        ScalarExpr::Elem(DOT) => elem(s),
        other => other.map_children(&mut |c| substitute_dot(c, s)),
    }
}

/// Rewrites an element-wise expression so that per-element work is minimal: division by a
/// uniform value becomes multiplication by its (hoisted) reciprocal, and the uniform factors
/// of a product are gathered into one hoisted constant.
pub fn simplify(e: &ScalarExpr) -> ScalarExpr {
    match e {
        ScalarExpr::Binary(BinaryOp::Div, a, b) if b.is_uniform() && !a.is_uniform() => {
            simplify(&mul((**a).clone(), recip((**b).clone())))
        }
        ScalarExpr::Binary(BinaryOp::Mul, _, _) => {
            let mut factors = Vec::new();
            flatten_product(e, &mut factors);
            let (uniform, varying): (Vec<_>, Vec<_>) =
                factors.into_iter().partition(|f| f.is_uniform());
            let product = |fs: Vec<ScalarExpr>| fs.into_iter().reduce(mul);
            match (
                product(uniform),
                product(varying.iter().map(simplify).collect()),
            ) {
                (Some(u), Some(v)) => mul(u, v),
                (Some(u), None) => u,
                (None, Some(v)) => v,
                (None, None) => lit(1.0),
            }
        }
        other => other.map_children(&mut simplify),
    }
}

fn flatten_product(e: &ScalarExpr, out: &mut Vec<ScalarExpr>) {
    match e {
        ScalarExpr::Binary(BinaryOp::Mul, a, b) => {
            flatten_product(a, out);
            flatten_product(b, out);
        }
        ScalarExpr::Binary(BinaryOp::Div, a, b) if b.is_uniform() => {
            flatten_product(a, out);
            out.push(recip((**b).clone()));
        }
        other => out.push(other.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(e: &ScalarExpr, dot: f64, p: f64, m: f64) -> f64 {
        let score = Score {
            expr: e.clone(),
            scalars: vec!["scale".into(), "softcap".into()],
            head_params: vec!["alibi_slopes".into()],
        };
        score.eval(dot, (p, m), &[0.125, 30.0], &[0.37], &|_, _| f64::NAN)
    }

    fn rebuilt(kept: ScalarExpr, row: &[(bool, ScalarExpr)]) -> ScalarExpr {
        row.iter().fold(kept, |acc, (n, t)| {
            if *n {
                sub(acc, t.clone())
            } else {
                add(acc, t.clone())
            }
        })
    }

    #[test]
    fn row_terms_leave_the_logit_and_add_back_to_it() {
        let exprs = [
            Score::scaled().with_alibi().expr,
            Score::scaled().with_softcap().with_alibi().expr,
            // The example's spelling: scale * q.k - slope * (p - m), plus a constant.
            add(
                sub(
                    mul(scalar(ScalarId(0)), elem(DOT)),
                    mul(
                        head(HeadParamId(0)),
                        sub(index(SeqRank::Query), index(SeqRank::Key)),
                    ),
                ),
                lit(2.5),
            ),
        ];
        for e in exprs {
            let logit = mul(e.clone(), lit(LOG2_E));
            let (kept, row) = split_row_terms(&logit);
            assert!(!row.is_empty(), "{e:?} has a query-only term");
            // What stays varies with the key, never with the query alone.
            let mut reads_query = false;
            kept.visit(&mut |x| reads_query |= matches!(x, ScalarExpr::Index(SeqRank::Query)));
            assert!(!reads_query, "{kept:?}");
            let whole = rebuilt(kept, &row);
            for (dot, p, m) in [(1.5, 700.0, 3.0), (-4.0, 12.0, 12.0), (0.25, 0.0, 9000.0)] {
                let (a, b) = (eval(&logit, dot, p, m), eval(&whole, dot, p, m));
                assert!((a - b).abs() <= 1e-9 * a.abs().max(1.0), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn a_logit_without_row_terms_stays_as_it_was() {
        let logit = mul(Score::scaled().with_softcap().expr, lit(LOG2_E));
        let (kept, row) = split_row_terms(&logit);
        assert!(row.is_empty());
        let (a, b) = (eval(&kept, 3.0, 5.0, 1.0), eval(&logit, 3.0, 5.0, 1.0));
        assert!((a - b).abs() <= 1e-12, "{a} vs {b}");
    }
}
