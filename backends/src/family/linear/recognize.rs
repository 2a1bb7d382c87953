//! Recognizes linear attention (causal with or without a per-head decay, or non-causal)
//! in a cascade.
//!
//! Linear attention has many equivalent cascades (quadratic masked, chunked with a state
//! recurrence, ...), so the recognizer forms a hypothesis from the cascade's interface
//! (which inputs are Q, K, V; which ranks are batch, head, sequence and the two feature
//! dimensions; whether a `where` mask makes it causal; which per-head parameter decays)
//! and [`verify_linear`] confirms it numerically: the reference interpreter runs a small
//! instance of the same cascade and must agree with the f64 recurrence of the hypothesis.

use super::program::{Decay, LinearSpec};
use crate::family::Layout;
use crate::reference::{linear_attention, relative_error};
use crate::tile::interp::Problem;
use crate::tile::Elem;
use einattn_ir::arena::Handle;
use einattn_ir::cascade::{Cascade, DType, Rank, Span, Tensor, TensorKind};
use einattn_ir::interp::{evaluate_in_order, random_inputs, TensorData};
use einattn_ir::validate::{topological_order, Diagnostic, DiagnosticKind};
use std::collections::HashMap;

/// A cascade read as causal linear attention.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearMatch {
    pub spec: LinearSpec,
    pub q: Layout,
    pub k: Layout,
    pub v: Layout,
    pub o: Layout,
    pub decay_param: Option<Handle<Tensor>>,
    /// The per-token gate input `G[b, n, h]` and its strides, when there is one.
    pub gate: Option<Layout>,
    pub batch: u64,
    pub heads: u64,
    pub n: u64,
    /// Ranks a small verification instance may shrink, with their small extents (the
    /// sequence stays a multiple of its split tile).
    pub shrinkable: Vec<(Handle<Rank>, u64)>,
}

fn not_mappable(c: &Cascade, message: impl Into<String>, span: Span) -> Diagnostic {
    Diagnostic::error(
        DiagnosticKind::NotMappable,
        format!(
            "`{}` does not map to the linear-attention kernel: {}",
            c.name,
            message.into()
        ),
        span,
    )
}

/// Forms the linear-attention hypothesis for `c` (not yet verified). The two contracted
/// inputs are symmetric in the Einsum, so `swap` says which is Q: verification tells.
pub fn recognize_linear(c: &Cascade, swap: bool) -> Result<LinearMatch, Diagnostic> {
    let inputs: Vec<Handle<Tensor>> = c
        .tensors
        .iter()
        .filter(|(_, t)| t.kind == TensorKind::Input)
        .map(|(h, _)| h)
        .collect();
    let outputs: Vec<Handle<Tensor>> = c
        .tensors
        .iter()
        .filter(|(_, t)| t.kind == TensorKind::Output)
        .map(|(h, _)| h)
        .collect();
    let params: Vec<Handle<Tensor>> = c
        .tensors
        .iter()
        .filter(|(_, t)| t.kind == TensorKind::Param)
        .map(|(h, _)| h)
        .collect();
    let [o] = outputs[..] else {
        return Err(not_mappable(c, "expected one output", Span::UNKNOWN));
    };
    let o = &o;
    // A per-token gate is an input without a feature rank: each of its ranks is a rank of
    // the output other than the output's feature rank (or a rank split from one).
    let out_ranks = c.tensors[*o].ranks.clone();
    let is_gate = |t: &Handle<Tensor>| {
        let r = &c.tensors[*t].ranks;
        r.len() + 1 == out_ranks.len()
            && r.iter()
                .all(|x| out_ranks[..out_ranks.len() - 1].contains(x))
    };
    let all_inputs = inputs.len();
    let (gates, inputs): (Vec<Handle<Tensor>>, Vec<Handle<Tensor>>) = inputs
        .iter()
        .copied()
        .partition(|t| all_inputs == 4 && is_gate(t));
    if inputs.len() != 3 || gates.len() > 1 {
        return Err(not_mappable(
            c,
            "expected inputs Q, K, V (and optionally a per-token gate G[b, n, h])",
            Span::UNKNOWN,
        ));
    }
    let gate_tensor = gates.first().copied();
    let o = *o;
    let span = c.tensors[o].span;
    let ranks = |t: Handle<Tensor>| c.tensors[t].ranks.clone();
    // V is the input that shares the output's feature rank; Q and K are the other two,
    // symmetric in `q . k`, so `swap` picks which is Q.
    let e_rank = ranks(o).last().copied();
    let (vs, qk): (Vec<Handle<Tensor>>, Vec<Handle<Tensor>>) = inputs
        .iter()
        .copied()
        .partition(|&t| ranks(t).last().copied() == e_rank);
    let ([v], [a, b]) = (&vs[..], &qk[..]) else {
        return Err(not_mappable(
            c,
            "exactly one input (V) must end with the output's feature rank",
            span,
        ));
    };
    let (q, k, v) = if swap { (*b, *a, *v) } else { (*a, *b, *v) };
    let (qr, kr, vr, or) = (ranks(q), ranks(k), ranks(v), ranks(o));
    let last = |r: &Vec<Handle<Rank>>| r.last().copied();
    let (Some(d), Some(e)) = (last(&qr), last(&vr)) else {
        return Err(not_mappable(c, "tensors need a feature rank", span));
    };
    if last(&kr) != Some(d) || last(&or) != Some(e) {
        return Err(not_mappable(
            c,
            "Q and K must store their feature rank last, V and O theirs",
            span,
        ));
    }
    // Sequence rank of each tensor: its rank that is not shared by all four and is not a
    // feature rank (`p` vs `n`), or the split rank when they share it (`n -> t, i`).
    let all_share =
        |r: &Handle<Rank>| qr.contains(r) && kr.contains(r) && vr.contains(r) && or.contains(r);
    let seq_of = |rs: &Vec<Handle<Rank>>| -> Option<Handle<Rank>> {
        let own: Vec<Handle<Rank>> = rs
            .iter()
            .copied()
            .filter(|r| *r != d && *r != e && !all_share(r))
            .collect();
        match own[..] {
            [r] => Some(r),
            [] => rs
                .iter()
                .copied()
                .find(|r| *r != d && *r != e && c.ranks[*r].split.is_some()),
            _ => None,
        }
    };
    let (Some(sq), Some(sk), Some(sv), Some(so)) =
        (seq_of(&qr), seq_of(&kr), seq_of(&vr), seq_of(&or))
    else {
        return Err(not_mappable(c, "cannot tell the sequence rank", span));
    };
    let n = c.ranks[sq].extent;
    if [sk, sv, so].iter().any(|r| c.ranks[*r].extent != n) {
        return Err(not_mappable(
            c,
            "queries and keys must have the same length",
            span,
        ));
    }
    let shared: Vec<Handle<Rank>> = qr
        .iter()
        .copied()
        .filter(|r| *r != d && *r != sq && kr.contains(r) && vr.contains(r) && or.contains(r))
        .collect();
    let head_of_param = params.iter().find_map(|p| match ranks(*p)[..] {
        [r] if shared.contains(&r) => Some(r),
        _ => None,
    });
    let (batch, head) = match shared[..] {
        [] => (None, None),
        [h] => (None, Some(h)),
        [x, y] if head_of_param == Some(x) => (Some(y), Some(x)),
        [x, y] => (Some(x), Some(y)),
        _ => {
            return Err(not_mappable(
                c,
                "at most batch and head ranks besides the sequence",
                span,
            ))
        }
    };
    if let Some(g) = gate_tensor {
        if c.tensors[g].dtype != Some(DType::F32) || !params.is_empty() {
            return Err(not_mappable(
                c,
                "the gate G must be f32, and a gate excludes a per-head decay",
                c.tensors[g].span,
            ));
        }
    }
    let decay_param = match params[..] {
        [] => None,
        [p] if ranks(p).len() == 1 && Some(ranks(p)[0]) == head => Some(p),
        _ => {
            return Err(not_mappable(
                c,
                "the only parameter may be a per-head decay `s[h]`",
                Span::UNKNOWN,
            ))
        }
    };
    let causal = c.einsums.iter().any(|(_, e)| !e.mask.is_empty());
    if !causal && (decay_param.is_some() || gate_tensor.is_some()) {
        return Err(not_mappable(
            c,
            "non-causal linear attention with a decay is not mapped",
            Span::UNKNOWN,
        ));
    }
    let elem = match c.tensors[q].dtype {
        Some(DType::Bf16) => Elem::Bf16,
        Some(DType::F16) => Elem::F16,
        _ => {
            return Err(not_mappable(
                c,
                "Q, K, V must be bf16 or f16",
                c.tensors[q].span,
            ))
        }
    };
    let dim = |r: Handle<Rank>| {
        u32::try_from(c.ranks[r].extent).map_err(|_| {
            not_mappable(
                c,
                format!("`{}` is past 32 bits", c.ranks[r].name),
                c.ranks[r].span,
            )
        })
    };
    let (dd, ee) = (dim(d)?, dim(e)?);
    let layout = |t: Handle<Tensor>, seq: Handle<Rank>| Layout::of(c, t, batch, Some(seq), head);
    let tile = |r: Handle<Rank>| {
        c.ranks[r]
            .split
            .as_ref()
            .map_or(1, |s| c.ranks[s.inner].extent)
    };
    let mut shrinkable: Vec<(Handle<Rank>, u64)> = [sq, sk, sv, so]
        .iter()
        .map(|&r| (r, if tile(r) > 1 { 3 * tile(r) } else { 24 }))
        .collect();
    shrinkable.extend(batch.map(|r| (r, 1)));
    shrinkable.extend(head.map(|r| (r, 2)));
    shrinkable.extend([(d, 16), (e, 16)]);
    let extent = |r: Option<Handle<Rank>>| r.map_or(1, |r| c.ranks[r].extent);
    Ok(LinearMatch {
        spec: LinearSpec {
            head_dim: dd,
            value_dim: ee,
            elem,
            decay: match (decay_param, gate_tensor) {
                (Some(p), _) => Decay::PerHead(c.tensors[p].name.clone()),
                (None, Some(g)) => Decay::Gate(c.tensors[g].name.clone()),
                (None, None) => Decay::None,
            },
            causal,
        },
        gate: match gate_tensor {
            Some(g) => {
                let seq = seq_of(&ranks(g))
                    .or_else(|| {
                        ranks(g)
                            .iter()
                            .copied()
                            .find(|r| Some(*r) != batch && Some(*r) != head)
                    })
                    .ok_or_else(|| not_mappable(c, "the gate has no sequence rank", span))?;
                Some(layout(g, seq))
            }
            None => None,
        },
        q: layout(q, sq),
        k: layout(k, sk),
        v: layout(v, sv),
        o: layout(o, so),
        decay_param,
        batch: extent(batch),
        heads: extent(head),
        n,
        shrinkable,
    })
}

impl LinearMatch {
    /// The whole problem's sizes, as the Tile interpreter and the references take them.
    pub fn problem(&self) -> Problem {
        Problem {
            batch: self.batch as usize,
            heads: self.heads as usize,
            kv_group: 1,
            n_q: self.n as usize,
            n_k: self.n as usize,
        }
    }

    /// The f64 recurrence of this reading on `inputs` (the cascade's storage of every
    /// input and parameter), in O's layout.
    pub fn reference_output(&self, inputs: &HashMap<Handle<Tensor>, TensorData>) -> Vec<f64> {
        let host = |l: &Layout| l.host(inputs[&l.tensor].stored().into_owned());
        let prob = self.problem();
        let decay = self.decay_param.map(|p| inputs[&p].stored());
        let gate = self.gate.as_ref().map(&host);
        let bnhd = linear_attention(
            &self.spec,
            prob,
            &host(&self.q),
            &host(&self.k),
            &host(&self.v),
            decay.as_deref(),
            gate.as_ref(),
        );
        self.o.from_bnhd(
            &bnhd,
            prob.batch,
            prob.n_q,
            prob.heads,
            self.spec.value_dim as usize,
        )
    }
}

/// Runs the reference interpreter on `small` (the same cascade at small sizes) and checks
/// that it computes the recurrence of its own linear-attention hypothesis.
pub fn verify_linear(small: &Cascade, swap: bool, seed: u64) -> Result<f64, Diagnostic> {
    let m = recognize_linear(small, swap)?;
    let inputs = random_inputs(small, seed);
    let values = evaluate_in_order(small, &inputs, &topological_order(small))
        .map_err(|e| not_mappable(small, format!("the interpreter failed: {e}"), Span::UNKNOWN))?;
    let got = values
        .get(m.o.tensor)
        .ok_or_else(|| not_mappable(small, "no output", Span::UNKNOWN))?
        .stored();
    let want = m.reference_output(&inputs);
    let err = relative_error(&got, &want);
    if err.is_nan() || err > 1e-9 {
        return Err(not_mappable(
            small,
            format!("the cascade is not causal linear attention with this decay (relative difference {err:.2e} on a small instance)"),
            Span::UNKNOWN,
        ));
    }
    Ok(err)
}
