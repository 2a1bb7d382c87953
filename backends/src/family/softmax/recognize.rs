//! Recognizes softmax attention in a cascade, whatever its pass structure.
//!
//! The recognizer reads every Einsum symbolically: each tensor gets a meaning ([`Sym`]) in
//! terms of the score `s(p, m)`, its maxima over key ranges, the exponentials taken against
//! those maxima, and sums of them (weighted by `V` or not). The rules are the identities
//! FuseMax's cascades rely on (`max(max(A), max(B)) = max(A u B)`,
//! `sum_A exp(s - M) * exp(M - M') = sum_A exp(s - M')`, ...), so the 3-pass, 2-pass and
//! 1-pass (online) forms, and the split-key decoding form, all read as
//! `O = sum_m exp(s - M) V / sum_m exp(s - M)`. A cascade is accepted only when its output
//! reads as exactly that, so a kernel built from the match computes what the cascade says
//! (tests confirm it numerically against the reference interpreter).

// A failed compile builds one diagnostic; boxing it would only add noise to every `?`.
#![allow(clippy::result_large_err)]

use super::program::{AttentionSpec, Normalization, Score, DOT};
use crate::family::Layout;
use crate::tile::{
    ex, BandDirection, BandMask, Elem, HeadParamId, ScalarExpr, ScalarId, SeqRank, TokenAt,
    TokenId, TokenParam, ValueMask,
};
use einattn_ir::arena::Handle;
use einattn_ir::cascade::{
    self as ir, Access, Cascade, Condition, DType, Einsum, Expr, IndexExpr, Rank, ReduceOp, Span,
    Tensor, TensorKind,
};
use einattn_ir::validate::{topological_order, Diagnostic, DiagnosticKind};
use std::collections::HashMap;

/// What each rank of the cascade is to the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roles {
    pub batch: Option<Handle<Rank>>,
    pub head: Option<Handle<Rank>>,
    /// Absent in decoding cascades (one query per head).
    pub query: Option<Handle<Rank>>,
    pub key: Handle<Rank>,
    /// `(outer, inner, tile)` when the key rank is split.
    pub key_split: Option<(Handle<Rank>, Handle<Rank>, u64)>,
    pub head_dim: Handle<Rank>,
    pub value_dim: Handle<Rank>,
    /// `(g, r, group)` in grouped-query attention: the query head rank `head` splits as
    /// `h = g * group + r`, and K and V are indexed by the K/V head rank `g` alone.
    pub kv_split: Option<(Handle<Rank>, Handle<Rank>, u64)>,
}

/// A cascade read as softmax attention.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionMatch {
    /// The kernel's computation; `elem` is the cascade's storage type.
    pub spec: AttentionSpec,
    pub roles: Roles,
    pub q: Layout,
    pub k: Layout,
    pub v: Layout,
    pub o: Layout,
    /// Where each of `spec.tokens` (value masks' per-token inputs) lives.
    pub tokens: Vec<Layout>,
    /// The cascade parameter behind each of `spec.score.scalars`.
    pub scalar_params: Vec<Handle<Tensor>>,
    /// The cascade parameter behind each of `spec.score.head_params`.
    pub head_params: Vec<Handle<Tensor>>,
    pub batch: u64,
    /// Query heads.
    pub heads: u64,
    /// Query heads per K/V head (1 unless grouped-query attention; `heads` for MQA).
    pub kv_group: u64,
    pub n_q: u64,
    pub n_k: u64,
    /// One line per Einsum: its name and what it was read as.
    pub reading: Vec<(String, String)>,
    /// The recurrences that carry the running max and the running denominator (in the
    /// online forms): at their last step they hold the row max `M` and `sum exp(s - M)`,
    /// from which a backward recomputes the probabilities.
    pub running: Vec<(Handle<Tensor>, Running)>,
}

/// What a softmax recurrence carries from one key tile to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Running {
    Max,
    /// `sum exp(s - M)` against the running max.
    Sum,
}

impl AttentionMatch {
    /// The whole problem's sizes, as the Tile interpreter and the references take them.
    pub fn problem(&self) -> crate::tile::interp::Problem {
        crate::tile::interp::Problem {
            batch: self.batch as usize,
            heads: self.heads as usize,
            kv_group: self.kv_group as usize,
            n_q: self.n_q as usize,
            n_k: self.n_k as usize,
        }
    }

    /// The recognized computation by the direct f64 attention formula on `inputs` (the
    /// cascade's storage of every input and parameter), in O's layout: the reference where
    /// the cascade interpreter would take too long.
    pub fn reference_output(
        &self,
        inputs: &HashMap<Handle<Tensor>, einattn_ir::interp::TensorData>,
    ) -> Vec<f64> {
        let host = |l: &Layout| l.host(inputs[&l.tensor].stored().into_owned());
        let (q, k, v) = (host(&self.q), host(&self.k), host(&self.v));
        let tokens: Vec<_> = self.tokens.iter().map(host).collect();
        let scalars: Vec<f64> = self
            .scalar_params
            .iter()
            .map(|t| inputs[t].stored()[0])
            .collect();
        let head_params: Vec<Vec<f64>> = self
            .head_params
            .iter()
            .map(|t| inputs[t].stored().into_owned())
            .collect();
        let prob = self.problem();
        let x = crate::reference::AttentionInputs {
            q: &q,
            k: &k,
            v: &v,
            scalars: &scalars,
            head_params: &head_params,
            q_offset: 0,
            tokens: &tokens,
        };
        let (bnhd, _) = crate::reference::attention(&self.spec, prob, &x);
        self.o.from_bnhd(
            &bnhd,
            prob.batch,
            prob.n_q,
            prob.heads,
            self.spec.value_dim as usize,
        )
    }
}

/// A key range, relative to the key tile `m1` an Einsum is at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Range {
    /// The keys of tile `m1`.
    Tile,
    /// Tiles before `m1` (a state at step `m1`).
    Before,
    /// Tiles up to and including `m1` (a state at step `m1 + 1`).
    Through,
    All,
    /// The sink: one extra logit per row, uniform along it (a per-head parameter, or 0 for
    /// the `+1` of softmax1), that joins the max and the denominator but has no value.
    Sink,
    /// Every key and the sink.
    AllSink,
    /// Tiles before `m1` and the sink (a running max that starts at the sink's logit).
    BeforeSink,
    /// Tiles up to and including `m1` and the sink.
    ThroughSink,
}

impl Range {
    /// The range with the sink joined to it (for states that start at the sink).
    fn with_sink(self) -> Range {
        match self {
            Range::Before => Range::BeforeSink,
            Range::Through => Range::ThroughSink,
            Range::All => Range::AllSink,
            other => other,
        }
    }
}

/// What a tensor (or subexpression) holds, per (batch, head, query) point.
#[derive(Debug, Clone, PartialEq)]
enum Sym {
    /// A scalar function of the dot product, positions and parameters (the score chain), or
    /// a uniform value when it has no dot product.
    Val(ScalarExpr),
    Max(Range),
    /// `s - max over the range`, per key.
    Centered(Range),
    /// `sink - max over the range`.
    SinkCentered(Range),
    /// `max over a - max over b`.
    MaxDiff(Range, Range),
    /// `exp(s - max over the range)`, per key.
    Exp(Range),
    /// `Exp * V`, per key and value column.
    ExpV(Range),
    /// `exp(max over a - max over b)`.
    Rescale(Range, Range),
    /// `sum over `over` of exp(s - max over r)` (times `V` when `v`).
    Sum {
        r: Range,
        over: Range,
        v: bool,
    },
    /// Softmax weights, per key (and times `V` when `v`); `sink`: the denominator has the
    /// sink's term.
    Norm {
        v: bool,
        sink: bool,
    },
    V,
    /// The attention output (`sink`: normalized with the sink's term).
    Out {
        sink: bool,
    },
    /// `w(s) * V` per key: an element-wise map of the score weighting V with no
    /// normalization (sigmoid attention).
    WeightV(ScalarExpr),
    /// `sum over the range of w(s) V`; over all keys, the unnormalized attention output.
    Weighted(Range),
}

impl Sym {
    fn describe(&self) -> String {
        let r = |r: &Range| match r {
            Range::Tile => "tile m1",
            Range::Before => "tiles < m1",
            Range::Through => "tiles <= m1",
            Range::All => "all keys",
            Range::Sink => "the sink",
            Range::AllSink => "all keys and the sink",
            Range::BeforeSink => "tiles < m1 and the sink",
            Range::ThroughSink => "tiles <= m1 and the sink",
        };
        match self {
            Sym::Val(e) if has_dot(e) => "score s(p, m)".into(),
            Sym::Val(_) => "uniform value".into(),
            Sym::Max(a) => format!("max of s over {}", r(a)),
            Sym::Centered(a) => format!("s - max over {}", r(a)),
            Sym::SinkCentered(a) => format!("sink - max over {}", r(a)),
            Sym::MaxDiff(a, b) => format!("max over {} - max over {}", r(a), r(b)),
            Sym::Exp(a) => format!("exp(s - max over {})", r(a)),
            Sym::ExpV(a) => format!("exp(s - max over {}) * V", r(a)),
            Sym::Rescale(a, b) => format!("exp(max over {} - max over {})", r(a), r(b)),
            Sym::Sum { r: rr, over, v } => format!(
                "sum over {} of exp(s - max over {}){}",
                r(over),
                r(rr),
                if *v { " * V" } else { "" }
            ),
            Sym::Norm { v, sink } => format!(
                "softmax weights{}{}",
                if *sink { " (with the sink)" } else { "" },
                if *v { " * V" } else { "" }
            ),
            Sym::V => "V".into(),
            Sym::Out { sink: false } => "softmax(s) V (the attention output)".into(),
            Sym::Out { sink: true } => {
                "softmax(s, sink) V (the attention output, with a sink logit)".into()
            }
            Sym::WeightV(_) => "w(s) * V (weights by an element-wise map of s)".into(),
            Sym::Weighted(Range::All) => {
                "sum over all keys of w(s) V (the attention output, unnormalized)".into()
            }
            Sym::Weighted(a) => format!("sum over {} of w(s) V", r(a)),
        }
    }
}

/// How a recurrence's state reads at each step. `sink`: the running max starts at the
/// sink's logit (gpt-oss writes the online form so), so every state's max includes the
/// sink, and a running sum without values starts at the sink's own term, 1.
#[derive(Debug, Clone, Copy, PartialEq)]
enum StateKind {
    Max { sink: bool },
    Sum { v: bool, sink: bool },
}

impl StateKind {
    fn at(self, r: Range) -> Sym {
        match self {
            StateKind::Max { sink: false } => Sym::Max(r),
            StateKind::Max { sink: true } => Sym::Max(r.with_sink()),
            StateKind::Sum { v, sink: false } => Sym::Sum { r, over: r, v },
            // The sink has no value: a sum with values runs over the keys alone.
            StateKind::Sum { v, sink: true } => Sym::Sum {
                r: r.with_sink(),
                over: if v { r } else { r.with_sink() },
                v,
            },
        }
    }
}

#[derive(Debug, Clone)]
enum Meaning {
    Plain(Sym),
    State(StateKind),
}

fn not_mappable(message: impl Into<String>, span: Span) -> Diagnostic {
    Diagnostic::error(DiagnosticKind::NotMappable, message, span)
}

fn has_dot(e: &ScalarExpr) -> bool {
    let mut found = false;
    e.visit(&mut |x| found |= matches!(x, ScalarExpr::Elem(DOT)));
    found
}

/// Reads `cascade` as softmax attention, or says which Einsum does not fit and why.
pub fn recognize(cascade: &Cascade) -> Result<AttentionMatch, Diagnostic> {
    let read = || {
        let score_einsum = find_score_einsum(cascade)?;
        let mut r = Reader::new(cascade, score_einsum)?;
        for e in topological_order(cascade) {
            r.read_einsum(e)?;
        }
        r.finish()
    };
    read().map_err(|mut d| {
        d.message = format!("`{}` does not map to the attention kernel: {}", cascade.name, d.message);
        if d.help.is_none() {
            d.help = Some(
                "the GPU backend maps softmax attention: O = softmax(s(Q . K)) V in 1-, 2- or 3-pass form, with band masks and score modifiers".into(),
            );
        }
        d
    })
}

/// The Einsum that contracts two inputs over a rank with a sum: `Q . K`.
fn find_score_einsum(c: &Cascade) -> Result<Handle<Einsum>, Diagnostic> {
    let mut found = None;
    for (h, e) in c.einsums.iter() {
        let mut inputs = 0;
        e.expr.visit_accesses(&mut |a| {
            if c.tensors[a.tensor].kind == TensorKind::Input {
                inputs += 1;
            }
        });
        if inputs == 2 && e.reductions.iter().any(|r| r.op == ReduceOp::Sum) {
            if found.is_some() {
                return Err(not_mappable(
                    "two Einsums contract two inputs; softmax attention has one `Q . K`",
                    e.span,
                ));
            }
            found = Some(h);
        }
    }
    found.ok_or_else(|| {
        not_mappable(
            "no Einsum contracts two inputs (`Q[p, e] * K[m, e]` summed over `e`)".to_string(),
            Span::UNKNOWN,
        )
        .with_help("the GPU backend maps softmax attention (1-, 2- and 3-pass forms, masks, score modifiers)")
    })
}

struct Reader<'c> {
    c: &'c Cascade,
    score_einsum: Handle<Einsum>,
    roles: Roles,
    q: Handle<Tensor>,
    k: Handle<Tensor>,
    v: Handle<Tensor>,
    meanings: HashMap<Handle<Tensor>, Meaning>,
    score: Option<ScalarExpr>,
    /// The sink logit (uniform along a row), fixed where it is first read.
    sink: Option<ScalarExpr>,
    /// The weight `w(s)` of an unnormalized output, fixed where it is first summed.
    weight: Option<ScalarExpr>,
    masks: Vec<BandMask>,
    /// Inputs read only by value masks, the ones the masks read so far (the kernel's token
    /// inputs, in order) and the masks.
    mask_inputs: Vec<Handle<Tensor>>,
    /// With each, its extent when it is read at a distance (a table over `p - m`).
    tokens: Vec<(Handle<Tensor>, Option<u32>)>,
    /// Inputs besides Q, K and V that the score may read at a position (per-query or
    /// per-key values): they have no rank of their own beside Q's and K's.
    operand_inputs: Vec<Handle<Tensor>>,
    value_masks: Vec<ValueMask>,
    scalar_params: Vec<Handle<Tensor>>,
    head_params: Vec<Handle<Tensor>>,
    reading: Vec<(String, String)>,
    /// The key position of the Einsum being read: `m`, or `tile * m1 + m0`.
    key_here: Option<IndexExpr>,
    span: Span,
    /// Where a running max starts at exactly -inf (the recurrence's span).
    max_starts_at_neg_inf: Option<Span>,
    /// A running max starts at the sink's logit.
    max_starts_at_sink: bool,
}

impl<'c> Reader<'c> {
    fn new(c: &'c Cascade, score_einsum: Handle<Einsum>) -> Result<Self, Diagnostic> {
        let e = &c.einsums[score_einsum];
        let mut accesses = Vec::new();
        e.expr.visit_accesses(&mut |a| {
            if c.tensors[a.tensor].kind == TensorKind::Input {
                accesses.push(a.tensor)
            }
        });
        let inputs: Vec<Handle<Tensor>> = c.tensors_of(TensorKind::Input).collect();
        // Inputs read only by value masks (a document's ids) are per-token values, not
        // one of Q, K and V.
        let mut in_exprs = Vec::new();
        let mut in_masks = Vec::new();
        for (_, e) in c.einsums.iter() {
            e.expr.visit_accesses(&mut |a| in_exprs.push(a.tensor));
            for v in &e.value_mask {
                v.visit_accesses(&mut |a| in_masks.push(a.tensor));
            }
        }
        let mask_inputs: Vec<Handle<Tensor>> = inputs
            .iter()
            .copied()
            .filter(|t| in_masks.contains(t) && !in_exprs.contains(t))
            .collect();
        let others: Vec<Handle<Tensor>> = inputs
            .iter()
            .copied()
            .filter(|t| !accesses.contains(t) && !mask_inputs.contains(t))
            .collect();
        // V has a rank of its own (the value dim), in neither Q nor K; other inputs with no
        // such rank are per-token operands of the score (a per-key bias).
        let in_qk = |r: &Handle<Rank>| accesses.iter().any(|&t| c.tensors[t].ranks.contains(r));
        let (vs, operand_inputs): (Vec<Handle<Tensor>>, Vec<Handle<Tensor>>) = others
            .iter()
            .partition(|&&t| c.tensors[t].ranks.iter().any(|r| !in_qk(r)));
        let [v] = vs[..] else {
            return Err(not_mappable(
                format!(
                    "softmax attention reads three inputs (Q, K, V); `{}` has {}",
                    c.name,
                    inputs.len() - mask_inputs.len() - operand_inputs.len()
                ),
                e.span,
            ));
        };
        let ranks = |t: Handle<Tensor>| c.tensors[t].ranks.clone();
        let (a, b) = (accesses[0], accesses[1]);
        let shares_private = |x: Handle<Tensor>, y: Handle<Tensor>| {
            ranks(x)
                .iter()
                .any(|r| ranks(v).contains(r) && !ranks(y).contains(r))
        };
        let (q, k) = match (shares_private(a, b), shares_private(b, a)) {
            (false, true) => (a, b),
            (true, false) => (b, a),
            _ => {
                return Err(not_mappable(
                    "cannot tell Q from K: exactly one of the contracted inputs must share its sequence rank with V",
                    e.span,
                ))
            }
        };
        let (qr, kr, vr) = (ranks(q), ranks(k), ranks(v));
        let only = |set: Vec<Handle<Rank>>, what: &str| -> Result<Handle<Rank>, Diagnostic> {
            match set[..] {
                [r] => Ok(r),
                _ => Err(not_mappable(
                    format!("expected exactly one {what}, found {}", set.len()),
                    e.span,
                )),
            }
        };
        // Grouped-query attention: Q's head rank `h` is split `h -> g, r` and K and V are
        // indexed by the outer half `g` (the K/V head) alone, so the `r` query heads of a
        // group read the same K and V.
        let kv_only: Vec<Handle<Rank>> = kr
            .iter()
            .copied()
            .filter(|r| vr.contains(r) && !qr.contains(r))
            .collect();
        let half_of_q_rank = |r: Handle<Rank>| {
            let parent = c.ranks[r].parent?;
            let s = c.ranks[parent].split.as_ref()?;
            qr.contains(&parent).then_some((parent, s.outer, s.inner))
        };
        for &r in kr.iter().chain(&vr) {
            if let Some((parent, outer, inner)) = half_of_q_rank(r) {
                if r != outer {
                    return Err(not_mappable(
                        format!(
                            "K and V may be indexed by the K/V head rank `{}` (the outer half of `split {} -> {}, {}`) only, not by `{}`",
                            c.ranks[outer].name,
                            c.ranks[parent].name,
                            c.ranks[outer].name,
                            c.ranks[inner].name,
                            c.ranks[r].name
                        ),
                        e.span,
                    ));
                }
            }
        }
        let grouped: Option<(Handle<Rank>, Handle<Rank>, Handle<Rank>)> = kv_only
            .iter()
            .find_map(|&r| half_of_q_rank(r).filter(|&(_, outer, _)| outer == r));
        if let Some((parent, outer, _)) = grouped {
            if !kr.contains(&outer)
                || !vr.contains(&outer)
                || kr.contains(&parent)
                || vr.contains(&parent)
            {
                return Err(not_mappable(
                    format!(
                        "with grouped heads both K and V are indexed by the K/V head rank `{}` and not by `{}`",
                        c.ranks[outer].name, c.ranks[parent].name
                    ),
                    e.span,
                ));
            }
        }
        let key = only(
            kv_only
                .iter()
                .copied()
                .filter(|&r| grouped.is_none_or(|(_, g, _)| g != r))
                .collect(),
            "key rank (in K and V, not in Q)",
        )?;
        let head_dim = only(
            e.reductions
                .iter()
                .map(|r| r.rank)
                .filter(|r| qr.contains(r) && kr.contains(r))
                .collect(),
            "contracted head-dimension rank",
        )?;
        let value_dim = only(
            vr.iter().copied().filter(|r| !kr.contains(r)).collect(),
            "value rank (in V, not in K)",
        )?;
        let query_ranks: Vec<Handle<Rank>> = qr
            .iter()
            .copied()
            .filter(|&r| {
                !kr.contains(&r) && r != head_dim && grouped.is_none_or(|(h, _, _)| h != r)
            })
            .collect();
        for &r in &query_ranks {
            // Q over both halves of a head split (`Q[.., g, r, ..]`): the kernel indexes Q and
            // O by one query head rank.
            let Some(parent) = c.ranks[r].parent else {
                continue;
            };
            if let Some(split) = &c.ranks[parent].split {
                if split.inner == r && qr.contains(&split.outer) {
                    return Err(not_mappable(
                        format!(
                            "grouped heads: declare Q and O over the query head rank `{}` (not over `{}, {}`) and K and V over `{}`",
                            c.ranks[parent].name,
                            c.ranks[split.outer].name,
                            c.ranks[r].name,
                            c.ranks[split.outer].name
                        ),
                        e.span,
                    ));
                }
            }
        }
        if query_ranks.len() > 1 {
            return Err(not_mappable(
                "Q has more than one rank of its own; the kernel maps one query rank",
                e.span,
            ));
        }
        let shared: Vec<Handle<Rank>> = qr
            .iter()
            .copied()
            .filter(|r| kr.contains(r) && vr.contains(r) && *r != head_dim)
            .collect();
        // The K/V head rank of grouped heads is K's and V's own (Q has `h` instead).
        let own = usize::from(grouped.is_some());
        let max_shared = 2 - own;
        if shared.len() > max_shared
            || kr.len() != shared.len() + 2 + own
            || vr.len() != shared.len() + 2 + own
        {
            return Err(not_mappable(
                "Q, K and V may share at most two ranks (batch and head) besides their sequence and head-dimension ranks",
                e.span,
            ));
        }
        // With two shared ranks the first in Q's storage order is the batch; a lone one is
        // the head (per-head parameters index it). With grouped heads the head is Q's split
        // rank and a lone shared rank is the batch.
        let (batch, head) = match (grouped, &shared[..]) {
            (None, []) => (None, None),
            (None, &[h]) => (None, Some(h)),
            (None, &[b, h]) => (Some(b), Some(h)),
            (Some((h, _, _)), []) => (None, Some(h)),
            (Some((h, _, _)), &[b]) => (Some(b), Some(h)),
            _ => unreachable!("checked above"),
        };
        let kv_split = grouped.map(|(_, g, r)| (g, r, c.ranks[r].extent));
        let key_split = c.ranks[key]
            .split
            .as_ref()
            .map(|s| (s.outer, s.inner, c.ranks[s.inner].extent));
        let roles = Roles {
            batch,
            head,
            query: query_ranks.first().copied(),
            key,
            key_split,
            head_dim,
            value_dim,
            kv_split,
        };
        Ok(Reader {
            c,
            score_einsum,
            roles,
            q,
            k,
            v,
            meanings: HashMap::new(),
            score: None,
            sink: None,
            weight: None,
            masks: Vec::new(),
            mask_inputs,
            tokens: Vec::new(),
            operand_inputs,
            value_masks: Vec::new(),
            scalar_params: Vec::new(),
            head_params: Vec::new(),
            reading: Vec::new(),
            key_here: None,
            span: Span::UNKNOWN,
            max_starts_at_neg_inf: None,
            max_starts_at_sink: false,
        })
    }

    fn err<T>(&self, message: impl Into<String>) -> Result<T, Diagnostic> {
        Err(not_mappable(message, self.span))
    }

    fn name(&self, t: Handle<Tensor>) -> &str {
        &self.c.tensors[t].name
    }

    /// Whether `idx` reads rank `rank` at the Einsum's own position: the rank itself, or,
    /// for the split query head rank of grouped heads, its expansion `group * g + r`.
    fn at_rank(&self, idx: &IndexExpr, rank: Handle<Rank>) -> bool {
        if idx.as_rank() == Some(rank) {
            return true;
        }
        match self.roles.kv_split {
            Some((g, r, group)) if Some(rank) == self.roles.head => {
                let mut x = IndexExpr::rank(r);
                // The group size is a rank extent, which validation bounds far below i64.
                x.add_term(i64::try_from(group).unwrap_or(i64::MAX), g);
                same_affine(&x, idx)
            }
            _ => false,
        }
    }

    fn key_ranks(&self) -> Vec<Handle<Rank>> {
        let mut v = vec![self.roles.key];
        if let Some((o, i, _)) = self.roles.key_split {
            v.extend([o, i]);
        }
        v
    }

    fn read_einsum(&mut self, h: Handle<Einsum>) -> Result<(), Diagnostic> {
        let c = self.c;
        let e = &c.einsums[h];
        self.span = e.span;
        let ranks = c.iteration_ranks(h);
        if let (Some((g, r, _)), Some(head)) = (self.roles.kv_split, self.roles.head) {
            // The kernel's query head is `group * g + r`: an Einsum iterates both halves or
            // neither, and never `h` itself beside them.
            if ranks.contains(&head) || ranks.contains(&g) != ranks.contains(&r) {
                return self.err(format!(
                    "with grouped heads an Einsum iterates both `{}` and `{}` (the split of `{}`), not `{}` itself",
                    c.ranks[g].name, c.ranks[r].name, c.ranks[head].name, c.ranks[head].name
                ));
            }
        }
        self.key_here = if ranks.contains(&self.roles.key) {
            Some(IndexExpr::rank(self.roles.key))
        } else {
            match self.roles.key_split {
                Some((o, i, tile)) if ranks.contains(&i) => {
                    if !ranks.contains(&o) {
                        return self.err(
                            "an Einsum over the key tile rank must also iterate the tile index",
                        );
                    }
                    let mut x = IndexExpr::rank(i);
                    x.add_term(tile as i64, o);
                    Some(x)
                }
                _ => None,
            }
        };
        let out = e.output.tensor;
        let meaning = if h == self.score_einsum {
            Meaning::Plain(self.read_score(e)?)
        } else if let Some(rec) = &e.recurrence {
            self.read_recurrence(e, rec)?
        } else {
            let mut sym = self.read_expr(&e.expr)?;
            for red in &e.reductions {
                sym = self.reduce(sym, red.rank, red.op)?;
            }
            Meaning::Plain(sym)
        };
        self.check_output_access(&e.output)?;
        let is_chain = matches!(&meaning, Meaning::Plain(Sym::Val(x)) if has_dot(x));
        if !e.mask.is_empty() {
            if !is_chain {
                return self.err("masks are supported on the score Einsums (those computing s from Q . K); move the `where` there");
            }
            for cond in &e.mask {
                let mask = self.band_mask(cond)?;
                if !self.masks.contains(&mask) {
                    self.masks.push(mask);
                }
            }
        }
        if !e.value_mask.is_empty() {
            if !is_chain {
                return self.err("masks are supported on the score Einsums (those computing s from Q . K); move the `where` there");
            }
            for cond in &e.value_mask {
                self.span = cond.span;
                let mask = ValueMask {
                    lhs: self.read_token(&cond.lhs)?,
                    op: tile_cmp(cond.op),
                    rhs: self.read_token(&cond.rhs)?,
                };
                if !self.value_masks.contains(&mask) {
                    self.value_masks.push(mask);
                }
            }
            self.span = e.span;
        }
        let text = match &meaning {
            Meaning::Plain(s) => s.describe(),
            Meaning::State(k) => format!("state: {} at step m1", k.at(Range::Before).describe()),
        };
        self.reading.push((self.name(out).to_string(), text));
        self.meanings.insert(out, meaning);
        Ok(())
    }

    /// `f * Q[.., e] * K[.., e]` summed over `e`, with `f` free of `e`.
    fn read_score(&mut self, e: &Einsum) -> Result<Sym, Diagnostic> {
        if e.reductions.len() != 1 || e.reductions[0].rank != self.roles.head_dim {
            return self
                .err("the Q . K Einsum must reduce exactly the head dimension (with a sum)");
        }
        if self.key_here.is_none() {
            return self.err("the Q . K Einsum must iterate the key rank");
        }
        let mut factors = Vec::new();
        flatten_product(&e.expr, &mut factors);
        let mut seen_q = false;
        let mut seen_k = false;
        let mut rest = Vec::new();
        for f in factors {
            match f {
                Expr::Access(a) if a.tensor == self.q && !seen_q => {
                    self.check_input_access(a, true)?;
                    seen_q = true;
                }
                Expr::Access(a) if a.tensor == self.k && !seen_k => {
                    self.check_input_access(a, false)?;
                    seen_k = true;
                }
                other => {
                    let mut mentions_e = false;
                    other.visit_indices(&mut |i| mentions_e |= i.mentions(self.roles.head_dim));
                    if mentions_e {
                        return self
                            .err("only Q and K may depend on the contracted head dimension");
                    }
                    match self.read_expr(other)? {
                        Sym::Val(x) => rest.push(x),
                        s => {
                            return self.err(format!(
                                "a factor of the score reads as {}, not a scalar",
                                s.describe()
                            ))
                        }
                    }
                }
            }
        }
        if !(seen_q && seen_k) {
            return self.err("the score must be a product `Q * K` (times scalars)");
        }
        let product = rest
            .into_iter()
            .fold(ex::elem(DOT), |acc, f| ex::mul(f, acc));
        Ok(Sym::Val(product))
    }

    fn read_recurrence(&mut self, e: &Einsum, rec: &ir::Recurrence) -> Result<Meaning, Diagnostic> {
        let outer = self.roles.key_split.map(|s| s.0);
        if Some(rec.rank) != outer {
            return self.err("only recurrences over the key tile index are mapped");
        }
        let t = &self.c.tensors[e.output.tensor];
        let v = t.ranks.contains(&self.roles.value_dim);
        let sink = self.max_starts_at_sink;
        let kind = match eval_literal(&rec.init) {
            Some(x) if x == f64::NEG_INFINITY => {
                self.max_starts_at_neg_inf = Some(rec.init_span);
                StateKind::Max { sink: false }
            }
            // A very negative finite start acts as -inf for every row that sees a key.
            Some(x) if x <= -1e30 => StateKind::Max { sink: false },
            // With the max at the sink, a sum of weights starts at the sink's own term,
            // exp(sink - sink) = 1, and a sum of values at 0 (the sink has no value).
            Some(0.0) if sink && !v => {
                return self.err(
                    "with the running max starting at the sink's logit, the running sum starts at 1 (the sink's own term exp(sink - max))",
                )
            }
            Some(0.0) => StateKind::Sum { v, sink },
            Some(1.0) if sink && !v => StateKind::Sum { v, sink },
            // A running max that starts at a uniform value: the sink logit.
            _ if !v => match self.read_expr(&rec.init)? {
                Sym::Val(u) if !has_dot(&u) => {
                    self.fix_sink(&u)?;
                    self.max_starts_at_sink = true;
                    StateKind::Max { sink: true }
                }
                _ => return self.err(
                    "a recurrence must start at -inf (a running max), at a sink logit, or at 0 (a running sum)",
                ),
            },
            _ => {
                return self.err(
                    "a recurrence must start at -inf (a running max), at a sink logit, or at 0 (a running sum)",
                )
            }
        };
        self.meanings.insert(e.output.tensor, Meaning::State(kind));
        let mut sym = self.read_expr(&e.expr)?;
        for red in &e.reductions {
            sym = self.reduce(sym, red.rank, red.op)?;
        }
        let want = kind.at(Range::Through);
        if sym != want {
            return self.err(format!(
                "the recurrence of `{}` computes {} where {} was expected",
                t.name,
                sym.describe(),
                want.describe()
            ));
        }
        Ok(Meaning::State(kind))
    }

    /// The output access must name each declared rank in place (the iterative one as `m1 + 1`).
    fn check_output_access(&self, a: &Access) -> Result<(), Diagnostic> {
        let t = &self.c.tensors[a.tensor];
        for (d, (idx, &rank)) in a.indices.iter().zip(&t.ranks).enumerate() {
            let ok = if t.iterative == Some(d) {
                let mut next = IndexExpr::rank(rank);
                next.constant = 1;
                *idx == next
            } else {
                self.at_rank(idx, rank)
            };
            if !ok {
                return self.err(format!(
                    "`{}` must be written at its declared ranks",
                    t.name
                ));
            }
        }
        Ok(())
    }

    fn check_input_access(&self, a: &Access, query_side: bool) -> Result<(), Diagnostic> {
        let t = &self.c.tensors[a.tensor];
        for (idx, &rank) in a.indices.iter().zip(&t.ranks) {
            let ok = if rank == self.roles.key && !query_side {
                self.key_here.as_ref().is_some_and(|k| same_affine(k, idx))
            } else {
                self.at_rank(idx, rank)
            };
            if !ok {
                return self.err(format!(
                    "`{}` must be read at the Einsum's own positions (no shifted or transposed indices)",
                    t.name
                ));
            }
        }
        Ok(())
    }

    fn read_access(&mut self, a: &Access) -> Result<Sym, Diagnostic> {
        let c = self.c;
        let t = &c.tensors[a.tensor];
        match t.kind {
            TensorKind::Param => {
                if t.ranks.is_empty() {
                    let i = match self.scalar_params.iter().position(|&p| p == a.tensor) {
                        Some(i) => i,
                        None => {
                            self.scalar_params.push(a.tensor);
                            self.scalar_params.len() - 1
                        }
                    };
                    Ok(Sym::Val(ex::scalar(ScalarId(i as u32))))
                } else if t.ranks.len() == 1
                    && Some(t.ranks[0]) == self.roles.head
                    && self.at_rank(&a.indices[0], t.ranks[0])
                {
                    let i = match self.head_params.iter().position(|&p| p == a.tensor) {
                        Some(i) => i,
                        None => {
                            self.head_params.push(a.tensor);
                            self.head_params.len() - 1
                        }
                    };
                    Ok(Sym::Val(ex::head(HeadParamId(i as u32))))
                } else {
                    self.read_operand(a).map_err(|mut d| {
                        d.message = format!(
                            "parameter `{}` must be a scalar, indexed by the head rank alone, or a score operand: {}",
                            t.name, d.message
                        );
                        d
                    })
                }
            }
            TensorKind::Input if a.tensor == self.v => {
                if self.key_here.is_none() {
                    return self.err("V must be read where the key rank is iterated");
                }
                self.check_input_access(a, false)?;
                Ok(Sym::V)
            }
            TensorKind::Input if self.operand_inputs.contains(&a.tensor) => self.read_operand(a),
            TensorKind::Input => {
                self.err(format!("`{}` may only be read by the Q . K Einsum", t.name))
            }
            TensorKind::Output => self.err(format!("the output `{}` may not be read", t.name)),
            TensorKind::Temp => {
                let meaning = self.meanings.get(&a.tensor).cloned().ok_or_else(|| {
                    not_mappable(
                        format!("`{}` is read before it is known", t.name),
                        self.span,
                    )
                })?;
                let mut step = None;
                for (d, (idx, &rank)) in a.indices.iter().zip(&t.ranks).enumerate() {
                    if t.iterative == Some(d) {
                        let extent = c.ranks[rank].extent as i64;
                        step = Some(if idx.as_rank() == Some(rank) {
                            Range::Before
                        } else if idx.terms == [(1, rank)] && idx.constant == 1 {
                            Range::Through
                        } else if idx.terms.is_empty() && idx.constant == extent {
                            Range::All
                        } else {
                            return self.err(format!(
                                "state `{}` must be read at m1, m1 + 1 or its final step",
                                t.name
                            ));
                        });
                    } else if !self.at_rank(idx, rank) {
                        return self.err(format!(
                            "`{}` must be read at its declared ranks (no shifted or transposed indices)",
                            t.name
                        ));
                    }
                }
                Ok(match (meaning, step) {
                    (Meaning::Plain(s), None) => s,
                    (Meaning::State(k), Some(r)) => k.at(r),
                    _ => return self.err(format!("`{}` is read inconsistently", t.name)),
                })
            }
        }
    }

    /// One side of a value mask: a per-token f32 input read at the query position or at
    /// the key position (its other indices at the batch and head ranks).
    fn read_token(&mut self, e: &Expr) -> Result<(TokenId, TokenAt), Diagnostic> {
        let c = self.c;
        let Expr::Access(a) = e else {
            return self.err("a value mask compares two per-token inputs, each read at the query or the key position (`SEG[b, p] == SEG[b, m]`)");
        };
        let t = &c.tensors[a.tensor];
        if !self.mask_inputs.contains(&a.tensor) {
            return self.err(format!(
                "`{}` is read by a value mask and elsewhere; a value mask reads inputs of its own",
                t.name
            ));
        }
        if t.dtype != Some(DType::F32) {
            return self.err(format!(
                "`{}` must be f32 (the kernel reads per-token values as f32)",
                t.name
            ));
        }
        let (at, _) = self.token_position(a, false)?.ok_or_else(|| {
            not_mappable(
                format!(
                    "`{}` has no sequence rank: a value mask compares per-token values",
                    t.name
                ),
                self.span,
            )
        })?;
        Ok((self.token_id(a.tensor, None)?, at))
    }

    /// The kernel's token input for `t` (`extent`: read at a distance).
    fn token_id(&mut self, t: Handle<Tensor>, extent: Option<u32>) -> Result<TokenId, Diagnostic> {
        let id = match self.tokens.iter().position(|&(x, _)| x == t) {
            Some(i) if self.tokens[i].1 == extent => i,
            Some(_) => {
                return self.err(format!(
                    "`{}` is read both at a distance (as a table) and at a position",
                    self.name(t)
                ))
            }
            None => {
                self.tokens.push((t, extent));
                self.tokens.len() - 1
            }
        };
        Ok(TokenId(id as u32))
    }

    /// Where a per-token input is read: at the query position, at the key position, or (with
    /// `distance`) at `±(p - m) + c` with the extent of the rank it is read along; its other
    /// indices must be the batch and head ranks as declared. `None`: no sequence rank.
    fn token_position(
        &self,
        a: &Access,
        distance: bool,
    ) -> Result<Option<(TokenAt, Option<u32>)>, Diagnostic> {
        let c = self.c;
        let t = &c.tensors[a.tensor];
        let anywhere = if distance {
            "at the query position, the key position or their distance (`p - m + c`)"
        } else {
            "at the query position or at the key position"
        };
        let mut read = None;
        for (idx, &rank) in a.indices.iter().zip(&t.ranks) {
            if Some(rank) == self.roles.batch || Some(rank) == self.roles.head {
                if !self.at_rank(idx, rank) {
                    return self.err(format!(
                        "`{}` must be read at its batch and head ranks as declared",
                        t.name
                    ));
                }
                continue;
            }
            let at = if self.roles.query.is_some_and(|q| self.at_rank(idx, q)) {
                (TokenAt::Row, None)
            } else if self.key_here.as_ref().is_some_and(|k| same_affine(k, idx)) {
                (TokenAt::Col, None)
            } else {
                let (cq, ck, k) = match (distance, self.read_index(idx)) {
                    (true, Ok(Sym::Val(value))) => linear_coefficients(&value),
                    _ => (0, 0, 0),
                };
                // The kernel adds the offset as a 32-bit immediate.
                let extent = u32::try_from(c.ranks[rank].extent)
                    .ok()
                    .filter(|_| i32::try_from(k).is_ok());
                match (cq, ck, extent) {
                    (1, -1, Some(e)) => (TokenAt::QueryMinusKey(k), Some(e)),
                    (-1, 1, Some(e)) => (TokenAt::KeyMinusQuery(k), Some(e)),
                    _ => return self.err(format!("`{}` must be read {anywhere}", t.name)),
                }
            };
            if read.replace(at).is_some() {
                return self.err(format!(
                    "`{}` has more than one rank besides batch and head",
                    t.name
                ));
            }
        }
        Ok(read)
    }

    /// A score operand: a per-query or per-key value (`B[b, h, m]`), or a table over the
    /// distance (`TB[h, p - m + c]`, a relative-position bias), indexed otherwise by the
    /// batch and head ranks as declared; f32, read as a token input.
    fn read_operand(&mut self, a: &Access) -> Result<Sym, Diagnostic> {
        let c = self.c;
        let t = &c.tensors[a.tensor];
        if t.dtype.is_some_and(|d| d != DType::F32) {
            return self.err(format!(
                "`{}` must be f32 (the kernel reads per-token values as f32)",
                t.name
            ));
        }
        if self.key_here.is_none() {
            return self.err(format!(
                "`{}` must be read where the key rank is iterated (in the score)",
                t.name
            ));
        }
        let Some((at, extent)) = self.token_position(a, true)? else {
            // Indexed by batch and head alone: uniform along the row, a per-head value.
            return self.err(format!(
                "`{}` has no sequence rank: per-head values are parameters indexed by the head rank alone",
                t.name
            ));
        };
        let id = self.token_id(a.tensor, extent)?;
        Ok(Sym::Val(ScalarExpr::Token(id, at)))
    }

    /// A rank index used as a value: a combination of the query and key positions.
    fn read_index(&self, i: &IndexExpr) -> Result<Sym, Diagnostic> {
        let mut key_coef = 0i64;
        let mut query_coef = 0i64;
        let mut outer_coef = 0i64;
        for &(coef, r) in &i.terms {
            if Some(r) == self.roles.query {
                query_coef += coef;
            } else if r == self.roles.key || self.roles.key_split.is_some_and(|s| s.1 == r) {
                key_coef += coef;
            } else if self.roles.key_split.is_some_and(|s| s.0 == r) {
                outer_coef += coef;
            } else {
                return self.err("rank values may use the query and key positions only");
            }
        }
        if let Some((_, _, tile)) = self.roles.key_split {
            if outer_coef != key_coef * tile as i64 {
                return self
                    .err("a key tile index used as a value must appear as `tile * m1 + m0`");
            }
        }
        let mut x = ex::lit(i.constant as f64);
        for (coef, rank) in [(query_coef, SeqRank::Query), (key_coef, SeqRank::Key)] {
            if coef != 0 {
                x = ex::add(ex::mul(ex::lit(coef as f64), ex::index(rank)), x);
            }
        }
        Ok(Sym::Val(x))
    }

    fn read_expr(&mut self, e: &Expr) -> Result<Sym, Diagnostic> {
        use ir::BinaryOp as B;
        Ok(match e {
            Expr::Literal(x) => Sym::Val(ex::lit(*x)),
            Expr::Access(a) => self.read_access(a)?,
            Expr::Index(i) => self.read_index(i)?,
            Expr::Unary(op, a) => {
                let a = self.read_expr(a)?;
                match (op, a) {
                    (ir::UnaryOp::Exp, Sym::Centered(r)) => Sym::Exp(r),
                    (ir::UnaryOp::Exp, Sym::MaxDiff(a, b)) => Sym::Rescale(a, b),
                    // The sink's term of the denominator: a sum over the sink alone.
                    (ir::UnaryOp::Exp, Sym::SinkCentered(r)) => Sym::Sum {
                        r,
                        over: Range::Sink,
                        v: false,
                    },
                    // `exp(-M)`: the `+1` of softmax1, a sink logit of 0.
                    (ir::UnaryOp::Neg, Sym::Max(r)) => {
                        self.fix_sink(&ex::lit(0.0))?;
                        Sym::SinkCentered(r)
                    }
                    (op, Sym::Val(x)) => Sym::Val(ex::un(tile_unary(*op), x)),
                    (op, s) => {
                        return self.err(format!(
                            "cannot apply `{}` to {}",
                            op.name(),
                            s.describe()
                        ))
                    }
                }
            }
            Expr::Binary(op, a, b) => {
                let a = self.read_expr(a)?;
                let b = self.read_expr(b)?;
                if let (Sym::Val(x), Sym::Val(y)) = (&a, &b) {
                    return Ok(Sym::Val(tile_binary(*op, x.clone(), y.clone())));
                }
                let combined = match (op, &a, &b) {
                    (B::Sub, Sym::Val(x), Sym::Max(r)) if has_dot(x) => {
                        self.fix_score(x)?;
                        Some(Sym::Centered(*r))
                    }
                    (B::Sub, Sym::Val(u), Sym::Max(r)) => {
                        self.fix_sink(u)?;
                        Some(Sym::SinkCentered(*r))
                    }
                    (B::Sub, Sym::Max(x), Sym::Max(y)) => Some(Sym::MaxDiff(*x, *y)),
                    (B::Max, Sym::Max(x), Sym::Max(y)) => union(*x, *y).map(Sym::Max),
                    // A uniform value in a max of the scores is the sink logit.
                    (B::Max, Sym::Max(x), Sym::Val(u)) | (B::Max, Sym::Val(u), Sym::Max(x)) => {
                        self.fix_sink(u)?;
                        union(*x, Range::Sink).map(Sym::Max)
                    }
                    (
                        B::Add,
                        Sym::Sum { r, over, v },
                        Sym::Sum {
                            r: r2,
                            over: o2,
                            v: v2,
                        },
                    ) if r == r2 && v == v2 => {
                        union(*over, *o2).map(|over| Sym::Sum { r: *r, over, v: *v })
                    }
                    (B::Mul, x, y) => product(x, y).or_else(|| product(y, x)),
                    (
                        B::Div,
                        Sym::Exp(_) | Sym::ExpV(_),
                        Sym::Sum {
                            over: over @ (Range::All | Range::AllSink),
                            v: false,
                            ..
                        },
                    ) => self.same_ref(&a, &b).then_some(Sym::Norm {
                        v: matches!(a, Sym::ExpV(_)),
                        sink: *over == Range::AllSink,
                    }),
                    (
                        B::Div,
                        Sym::Sum {
                            r,
                            over: Range::All,
                            v: true,
                        },
                        Sym::Sum {
                            r: r2,
                            over: over @ (Range::All | Range::AllSink),
                            v: false,
                        },
                    ) if r == r2 => Some(Sym::Out {
                        sink: *over == Range::AllSink,
                    }),
                    _ => None,
                };
                match combined {
                    Some(s) => s,
                    None => {
                        return self.err(format!(
                            "no softmax identity combines {} with {} by `{}`",
                            a.describe(),
                            b.describe(),
                            op.name()
                        ))
                    }
                }
            }
        })
    }

    fn same_ref(&self, a: &Sym, b: &Sym) -> bool {
        let r = |s: &Sym| match s {
            Sym::Exp(r) | Sym::ExpV(r) | Sym::Sum { r, .. } => Some(*r),
            _ => None,
        };
        r(a).is_some() && r(a) == r(b)
    }

    /// The first place a sink logit is read fixes it; later ones must agree. It is uniform
    /// along a row: literals, scalars and per-head parameters.
    fn fix_sink(&mut self, x: &ScalarExpr) -> Result<(), Diagnostic> {
        let mut uniform = true;
        x.visit(&mut |e| {
            uniform &= matches!(
                e,
                ScalarExpr::Lit(_)
                    | ScalarExpr::Scalar(_)
                    | ScalarExpr::Head(_)
                    | ScalarExpr::Unary(..)
                    | ScalarExpr::Binary(..)
            )
        });
        if !uniform {
            return self.err(
                "a value beside the scores' max (a sink logit) must be uniform along a row: literals, scalars and per-head parameters",
            );
        }
        if fix(&mut self.sink, x) {
            Ok(())
        } else {
            self.err("the max and the denominator must use the same sink logit")
        }
    }

    /// The first sum of `w(s) V` fixes the weight; later ones must agree.
    fn fix_weight(&mut self, w: &ScalarExpr) -> Result<(), Diagnostic> {
        if fix(&mut self.weight, w) {
            Ok(())
        } else {
            self.err("every sum of weights times V must use the same weights")
        }
    }

    /// The first place the score is consumed (max or exp) fixes it; later ones must agree.
    fn fix_score(&mut self, x: &ScalarExpr) -> Result<(), Diagnostic> {
        if fix(&mut self.score, x) {
            Ok(())
        } else {
            self.err("the max and the exponent must use the same score")
        }
    }

    fn reduce(&mut self, sym: Sym, rank: Handle<Rank>, op: ReduceOp) -> Result<Sym, Diagnostic> {
        if !self.key_ranks().contains(&rank) {
            return self.err(format!(
                "only key ranks may be reduced after the score (found `{}`)",
                self.c.ranks[rank].name
            ));
        }
        let split = self.roles.key_split;
        let is_inner = split.is_some_and(|s| s.1 == rank);
        let is_outer = split.is_some_and(|s| s.0 == rank);
        let over = if is_inner { Range::Tile } else { Range::All };
        let out = match (op, &sym) {
            (ReduceOp::Max, Sym::Val(x)) if has_dot(x) && !is_outer => {
                self.fix_score(x)?;
                Some(Sym::Max(over))
            }
            (ReduceOp::Max, Sym::Max(Range::Tile)) if is_outer => Some(Sym::Max(Range::All)),
            (ReduceOp::Sum, Sym::Exp(r)) if !is_outer => Some(Sym::Sum {
                r: *r,
                over,
                v: false,
            }),
            (ReduceOp::Sum, Sym::ExpV(r)) if !is_outer => Some(Sym::Sum {
                r: *r,
                over,
                v: true,
            }),
            (ReduceOp::Sum, Sym::Norm { v: true, sink }) if !is_outer && !is_inner => {
                Some(Sym::Out { sink: *sink })
            }
            (ReduceOp::Sum, Sym::WeightV(w)) if !is_outer => {
                self.fix_weight(w)?;
                Some(Sym::Weighted(over))
            }
            (ReduceOp::Sum, Sym::Weighted(Range::Tile)) if is_outer => {
                Some(Sym::Weighted(Range::All))
            }
            (
                ReduceOp::Sum,
                Sym::Sum {
                    r: r @ (Range::All | Range::AllSink),
                    over: Range::Tile,
                    v,
                },
            ) if is_outer => Some(Sym::Sum {
                r: *r,
                over: Range::All,
                v: *v,
            }),
            _ => None,
        };
        out.map_or_else(
            || {
                self.err(format!(
                    "a `{}` reduction over `{}` of {} has no softmax meaning",
                    op.name(),
                    self.c.ranks[rank].name,
                    sym.describe()
                ))
            },
            Ok,
        )
    }

    /// `lhs op rhs` as a band `±(m - p) <= bound`.
    fn band_mask(&self, cond: &Condition) -> Result<BandMask, Diagnostic> {
        let span = cond.span;
        let bad = |msg: &str| Err(not_mappable(msg.to_string(), span));
        let mut diff = cond.lhs.clone();
        for &(coef, r) in &cond.rhs.terms {
            diff.add_term(-coef, r);
        }
        diff.constant -= cond.rhs.constant;
        let Sym::Val(value) = self.read_index(&diff).map_err(|mut d| {
            d.span = Some(span);
            d
        })?
        else {
            return bad("mask conditions must be affine in the query and key positions");
        };
        // read_index gives `c_q * p + c_k * m + c`; recover the coefficients.
        let (cq, ck, c) = linear_coefficients(&value);
        let op = cond.op;
        use ir::CmpOp as C;
        let (alpha, k) = match (ck, cq) {
            (1, -1) => (1, -c),
            (-1, 1) => (-1, -c),
            _ => return bad("mask conditions must compare `m - p` (or `p - m`) with a constant"),
        };
        // alpha * (m - p) op k
        let (dir, bound) = match (alpha, op) {
            (1, C::Le) => (BandDirection::KeyMinusQuery, k),
            (1, C::Lt) => (BandDirection::KeyMinusQuery, k - 1),
            (1, C::Ge) => (BandDirection::QueryMinusKey, -k),
            (1, C::Gt) => (BandDirection::QueryMinusKey, -k - 1),
            (-1, C::Le) => (BandDirection::QueryMinusKey, k),
            (-1, C::Lt) => (BandDirection::QueryMinusKey, k - 1),
            (-1, C::Ge) => (BandDirection::KeyMinusQuery, -k),
            (-1, C::Gt) => (BandDirection::KeyMinusQuery, -k - 1),
            _ => return bad("`==` and `!=` masks are not bands; use <, <=, > or >="),
        };
        Ok(BandMask {
            direction: dir,
            bound,
        })
    }

    fn layout(
        &self,
        t: Handle<Tensor>,
        seq: Option<Handle<Rank>>,
        last: Handle<Rank>,
    ) -> Result<Layout, Diagnostic> {
        let c = self.c;
        let tensor = &c.tensors[t];
        if tensor.ranks.last() != Some(&last) {
            return Err(not_mappable(
                format!(
                    "`{}` must store its head dimension `{}` last (contiguous)",
                    tensor.name, c.ranks[last].name
                ),
                tensor.span,
            ));
        }
        // K and V of grouped heads are indexed by the K/V head `g`: the kernel reads head
        // `h / group` of them, with `g`'s stride.
        let head = match self.roles.kv_split {
            Some((g, _, _)) if seq == Some(self.roles.key) => Some(g),
            _ => self.roles.head,
        };
        Ok(Layout::of(c, t, self.roles.batch, seq, head))
    }

    fn finish(self) -> Result<AttentionMatch, Diagnostic> {
        let c = self.c;
        let outputs: Vec<Handle<Tensor>> = c.tensors_of(TensorKind::Output).collect();
        let [o] = outputs[..] else {
            return Err(not_mappable(
                "softmax attention has one output (the log-sum-exp is not mapped yet)",
                Span::UNKNOWN,
            ));
        };
        let ot = &c.tensors[o];
        // `Some(sink)` for a softmax output, `None` for an unnormalized one.
        let with_sink = match self.meanings.get(&o) {
            Some(Meaning::Plain(Sym::Out { sink })) => Some(*sink),
            Some(Meaning::Plain(Sym::Weighted(Range::All))) => None,
            other => {
                let what = match other {
                    Some(Meaning::Plain(s)) => s.describe(),
                    _ => "a state".into(),
                };
                return Err(not_mappable(
                    format!("the output `{}` computes {what}, not softmax(s) V", ot.name),
                    ot.span,
                ));
            }
        };
        let mut expected: Vec<Handle<Rank>> = [self.roles.batch, self.roles.head, self.roles.query]
            .into_iter()
            .flatten()
            .collect();
        expected.push(self.roles.value_dim);
        if ot.ranks.len() != expected.len() || !expected.iter().all(|r| ot.ranks.contains(r)) {
            return Err(not_mappable(
                format!(
                    "the output `{}` must have exactly the batch, head, query and value ranks",
                    ot.name
                ),
                ot.span,
            ));
        }
        let dtype = |t: Handle<Tensor>| c.tensors[t].dtype;
        let elem = match dtype(self.q) {
            Some(DType::Bf16) => Elem::Bf16,
            Some(DType::F16) => Elem::F16,
            _ => {
                return Err(not_mappable(
                    "Q, K and V must be bf16 or f16 (the kernel runs 16-bit tensor-core MMAs)",
                    c.tensors[self.q].span,
                ))
            }
        };
        for t in [self.k, self.v, o] {
            if dtype(t) != dtype(self.q) {
                return Err(not_mappable(
                    format!("`{}` must have the same type as Q", c.tensors[t].name),
                    c.tensors[t].span,
                ));
            }
        }
        let score = match with_sink {
            Some(_) => self.score.clone().ok_or_else(|| {
                not_mappable("the score is never reduced by a max", Span::UNKNOWN)
            })?,
            None => self
                .weight
                .clone()
                .ok_or_else(|| not_mappable("the output sums no weights times V", Span::UNKNOWN))?,
        };
        let width = |rank: Handle<Rank>, what: &str| {
            let d = c.ranks[rank].extent;
            u32::try_from(d).ok().filter(|&d| d <= 256).ok_or_else(|| {
                Diagnostic::error(
                    DiagnosticKind::UnsupportedShape,
                    format!("the softmax kernel maps {what}s up to 256 (got {d})"),
                    c.ranks[rank].span,
                )
            })
        };
        let mut spec = AttentionSpec::new(width(self.roles.head_dim, "head dim")?, elem);
        spec.value_dim = width(self.roles.value_dim, "value dim")?;
        for m in &self.masks {
            let window = u32::try_from(m.bound).ok().and_then(|b| b.checked_add(1));
            match (m.direction, window) {
                (BandDirection::KeyMinusQuery, _) if m.bound == 0 && !spec.causal => {
                    spec.causal = true
                }
                (BandDirection::QueryMinusKey, Some(w)) if spec.window.is_none() => {
                    spec.window = Some(w)
                }
                _ => spec.extra_masks.push(*m),
            }
        }
        let hides_leading_keys = !self.value_masks.is_empty()
            || self
                .masks
                .iter()
                .any(|m| m.direction == BandDirection::QueryMinusKey);
        if let (true, Some(span)) = (hides_leading_keys, self.max_starts_at_neg_inf) {
            // The kernel guards this case; the cascade as written does not, so they would
            // disagree on exactly the rows the window cuts.
            return Err(not_mappable(
                "with a mask that hides a query's first keys, a running max that starts at -inf gives exp(-inf - -inf) = NaN in the cascade for those rows",
                span,
            )
            .with_help("start the running max at a finite -1e30, as examples/attention_sliding_window.ein does"));
        }
        if self.roles.query.is_none() && !(self.masks.is_empty() && self.value_masks.is_empty()) {
            return Err(not_mappable("masks need a query rank", Span::UNKNOWN));
        }
        spec.tokens = self
            .tokens
            .iter()
            .map(|&(t, extent)| TokenParam {
                name: self.name(t).to_string(),
                extent,
            })
            .collect();
        spec.value_masks = self.value_masks.clone();
        // A sink only in the max changes nothing: the kernel normalizes with it only when
        // the output's denominator has its term.
        spec.sink = if with_sink == Some(true) {
            self.sink.clone()
        } else {
            None
        };
        if with_sink.is_none() {
            spec.normalization = Normalization::None;
        }
        let tokens = self
            .tokens
            .iter()
            .map(|&(t, _)| {
                let seq = c.tensors[t]
                    .ranks
                    .iter()
                    .copied()
                    .find(|&r| Some(r) != self.roles.batch && Some(r) != self.roles.head);
                Layout::of(c, t, self.roles.batch, seq, self.roles.head)
            })
            .collect();
        spec.score = Score {
            expr: score,
            scalars: self
                .scalar_params
                .iter()
                .map(|&t| self.name(t).to_string())
                .collect(),
            head_params: self
                .head_params
                .iter()
                .map(|&t| self.name(t).to_string())
                .collect(),
        };
        let extent = |r: Option<Handle<Rank>>| r.map_or(1, |r| c.ranks[r].extent);
        let key = Some(self.roles.key);
        let mut running: Vec<(Handle<Tensor>, Running)> = self
            .meanings
            .iter()
            .filter_map(|(&t, meaning)| match meaning {
                Meaning::State(StateKind::Max { .. }) => Some((t, Running::Max)),
                Meaning::State(StateKind::Sum { v: false, .. }) => Some((t, Running::Sum)),
                _ => None,
            })
            .collect();
        running.sort_by_key(|(t, _)| t.index());
        Ok(AttentionMatch {
            running,
            q: self.layout(self.q, self.roles.query, self.roles.head_dim)?,
            k: self.layout(self.k, key, self.roles.head_dim)?,
            v: self.layout(self.v, key, self.roles.value_dim)?,
            o: self.layout(o, self.roles.query, self.roles.value_dim)?,
            tokens,
            spec,
            batch: extent(self.roles.batch),
            heads: extent(self.roles.head),
            kv_group: self.roles.kv_split.map_or(1, |(_, _, group)| group),
            n_q: extent(self.roles.query),
            n_k: extent(key),
            roles: self.roles,
            scalar_params: self.scalar_params,
            head_params: self.head_params,
            reading: self.reading,
        })
    }
}

/// Fixes `slot` to `x` where it is first read; false when a later read disagrees.
fn fix(slot: &mut Option<ScalarExpr>, x: &ScalarExpr) -> bool {
    match slot {
        None => {
            *slot = Some(x.clone());
            true
        }
        Some(s) => s == x,
    }
}

/// `a * b` under the softmax identities (one orientation; the caller tries both).
fn product(a: &Sym, b: &Sym) -> Option<Sym> {
    match (a, b) {
        (Sym::Exp(r), Sym::V) => Some(Sym::ExpV(*r)),
        (Sym::Val(w), Sym::V) if has_dot(w) => Some(Sym::WeightV(w.clone())),
        (Sym::Norm { v: false, sink }, Sym::V) => Some(Sym::Norm {
            v: true,
            sink: *sink,
        }),
        (Sym::Sum { r, over, v }, Sym::Rescale(from, to)) if r == from => Some(Sym::Sum {
            r: *to,
            over: *over,
            v: *v,
        }),
        _ => None,
    }
}

/// Equality of affine indices up to the order of their terms.
fn same_affine(a: &IndexExpr, b: &IndexExpr) -> bool {
    let norm = |x: &IndexExpr| {
        let mut t: Vec<(i64, usize)> = x
            .terms
            .iter()
            .filter(|(c, _)| *c != 0)
            .map(|(c, r)| (*c, r.index()))
            .collect();
        t.sort_by_key(|&(_, r)| r);
        (t, x.constant)
    };
    norm(a) == norm(b)
}

/// Two adjacent disjoint key ranges as one.
fn union(a: Range, b: Range) -> Option<Range> {
    match (a, b) {
        (Range::Before, Range::Tile) | (Range::Tile, Range::Before) => Some(Range::Through),
        (Range::All, Range::Sink) | (Range::Sink, Range::All) => Some(Range::AllSink),
        (Range::BeforeSink, Range::Tile) | (Range::Tile, Range::BeforeSink) => {
            Some(Range::ThroughSink)
        }
        _ => None,
    }
}

pub(super) fn flatten_product<'e>(e: &'e Expr, out: &mut Vec<&'e Expr>) {
    match e {
        Expr::Binary(ir::BinaryOp::Mul, a, b) => {
            flatten_product(a, out);
            flatten_product(b, out);
        }
        other => out.push(other),
    }
}

fn eval_literal(e: &Expr) -> Option<f64> {
    match e {
        Expr::Literal(x) => Some(*x),
        Expr::Unary(op, a) => Some(op.apply(eval_literal(a)?)),
        Expr::Binary(op, a, b) => Some(op.apply(eval_literal(a)?, eval_literal(b)?)),
        _ => None,
    }
}

/// Coefficients `(c_q, c_k, c)` of an expression built by `read_index`.
fn linear_coefficients(x: &ScalarExpr) -> (i64, i64, i64) {
    fn go(x: &ScalarExpr, acc: &mut (i64, i64, i64), sign: i64) {
        match x {
            ScalarExpr::Lit(v) => acc.2 += sign * *v as i64,
            ScalarExpr::Binary(crate::tile::BinaryOp::Add, a, b) => {
                go(a, acc, sign);
                go(b, acc, sign);
            }
            ScalarExpr::Binary(crate::tile::BinaryOp::Mul, a, b) => {
                if let (ScalarExpr::Lit(c), ScalarExpr::Index(r)) = (&**a, &**b) {
                    match r {
                        SeqRank::Query => acc.0 += sign * *c as i64,
                        SeqRank::Key => acc.1 += sign * *c as i64,
                    }
                }
            }
            _ => {}
        }
    }
    let mut acc = (0, 0, 0);
    go(x, &mut acc, 1);
    acc
}

fn tile_cmp(op: ir::CmpOp) -> crate::tile::CmpOp {
    use crate::tile::CmpOp as T;
    match op {
        ir::CmpOp::Lt => T::Lt,
        ir::CmpOp::Le => T::Le,
        ir::CmpOp::Gt => T::Gt,
        ir::CmpOp::Ge => T::Ge,
        ir::CmpOp::Eq => T::Eq,
        ir::CmpOp::Ne => T::Ne,
    }
}

fn tile_unary(op: ir::UnaryOp) -> crate::tile::UnaryOp {
    use crate::tile::UnaryOp as T;
    match op {
        ir::UnaryOp::Neg => T::Neg,
        ir::UnaryOp::Exp => T::Exp,
        ir::UnaryOp::Log => T::Log,
        ir::UnaryOp::Sqrt => T::Sqrt,
        ir::UnaryOp::Tanh => T::Tanh,
    }
}

fn tile_binary(op: ir::BinaryOp, a: ScalarExpr, b: ScalarExpr) -> ScalarExpr {
    use crate::tile::{BinaryOp as T, CmpOp};
    let cmp = |op| ex::select(op, a.clone(), b.clone(), ex::lit(1.0), ex::lit(0.0));
    match op {
        ir::BinaryOp::Add => ex::bin(T::Add, a, b),
        ir::BinaryOp::Sub => ex::bin(T::Sub, a, b),
        ir::BinaryOp::Mul => ex::bin(T::Mul, a, b),
        ir::BinaryOp::Div => ex::bin(T::Div, a, b),
        ir::BinaryOp::Max => ex::bin(T::Max, a, b),
        ir::BinaryOp::Min => ex::bin(T::Min, a, b),
        ir::BinaryOp::Lt => cmp(CmpOp::Lt),
        ir::BinaryOp::Le => cmp(CmpOp::Le),
        ir::BinaryOp::Gt => cmp(CmpOp::Gt),
        ir::BinaryOp::Ge => cmp(CmpOp::Ge),
        ir::BinaryOp::Eq => cmp(CmpOp::Eq),
        ir::BinaryOp::Ne => cmp(CmpOp::Ne),
    }
}
