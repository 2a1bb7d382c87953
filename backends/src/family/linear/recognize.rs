//! Recognizes linear attention (causal with or without a per-head decay, or non-causal)
//! in a cascade.
//!
//! Linear attention has many equivalent cascades (quadratic masked, chunked with a state
//! recurrence, ...), so the recognizer forms a hypothesis from the cascade's interface
//! (which inputs are Q, K, V; which ranks are batch, head, sequence and the two feature
//! dimensions; whether a `where` mask makes it causal; which per-head parameter decays)
//! and [`verify_linear`] confirms it numerically: the reference interpreter runs a small
//! instance of the same cascade and must agree with the f64 recurrence of the hypothesis.

use super::normalize::{
    derive_decay, hoist_inline_maps, peel_maps, prologue_cascade, rate_param, DerivedDecay,
    FeatureMap,
};
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

/// How the recognizer reads the decay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecayReading {
    /// From the interface: the only parameter, per head, is the rate `s[h]` of
    /// `exp(-s[h] (i - j))`.
    Interface,
    /// From the cascade's decay factor, normalized ([`derive_decay`]); `flip` when the
    /// factor's positive position is the key's.
    Derived { flip: bool },
}

/// One hypothesis: which contracted input is Q (`swap`) and how the decay reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    pub swap: bool,
    pub decay: DecayReading,
}

/// The hypotheses, in the order they are tried (the interface reading first, so the
/// cascades it reads keep their kernels).
pub const READINGS: [Reading; 6] = [
    Reading {
        swap: false,
        decay: DecayReading::Interface,
    },
    Reading {
        swap: true,
        decay: DecayReading::Interface,
    },
    Reading {
        swap: false,
        decay: DecayReading::Derived { flip: false },
    },
    Reading {
        swap: true,
        decay: DecayReading::Derived { flip: false },
    },
    Reading {
        swap: false,
        decay: DecayReading::Derived { flip: true },
    },
    Reading {
        swap: true,
        decay: DecayReading::Derived { flip: true },
    },
];

/// The pre-kernels' cascade: feature maps and the decay rate, written into scratch.
#[derive(Debug, Clone, PartialEq)]
pub struct Prologue {
    pub cascade: Cascade,
    /// Its inputs and parameters: (its tensor, the recognized cascade's tensor).
    pub reads: Vec<(Handle<Tensor>, Handle<Tensor>)>,
    /// Its outputs: (its tensor, the mapped tensor of the recognized cascade, or `None`
    /// for the decay rate).
    pub writes: Vec<(Handle<Tensor>, Option<Handle<Tensor>>)>,
}

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
    pub head_rank: Option<Handle<Rank>>,
    /// Element-wise maps peeled off inputs (their mapped tensors are what the kernel reads).
    pub maps: Vec<FeatureMap>,
    /// A decay normalized to a rate the pre-kernel computes.
    pub derived: Option<DerivedDecay>,
    /// The decay factor as written, when the decay was read by normalizing it.
    pub decay_form: Option<String>,
    /// The pre-kernels, when there are maps or a derived decay.
    pub prologue: Option<Prologue>,
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

/// Forms the linear-attention hypothesis for `c` (not yet verified), reading the decay
/// from the interface. The two contracted inputs are symmetric in the Einsum, so `swap`
/// says which is Q: verification tells.
pub fn recognize_linear(c: &Cascade, swap: bool) -> Result<LinearMatch, Diagnostic> {
    read_linear(
        c,
        Reading {
            swap,
            decay: DecayReading::Interface,
        },
    )
    .map(|(m, _)| m)
}

/// The first reading of `c` that forms a hypothesis (not yet verified), or the interface
/// reading's reason.
pub fn first_reading(c: &Cascade) -> Result<LinearMatch, Diagnostic> {
    let mut first = None;
    for reading in READINGS {
        match read_linear(c, reading) {
            Ok((m, _)) => return Ok(m),
            Err(e) => {
                first.get_or_insert(e);
            }
        }
    }
    Err(first.unwrap_or_else(|| not_mappable(c, "no reading", Span::UNKNOWN)))
}

/// Forms the hypothesis of `reading` for `c` after peeling its feature maps; returns it
/// with the cascade it names tensors in (`c` with the maps' tensors added).
pub fn read_linear(c: &Cascade, reading: Reading) -> Result<(LinearMatch, Cascade), Diagnostic> {
    let hoisted = hoist_inline_maps(c);
    let (core, maps) = peel_maps(&hoisted);
    let mut m = recognize_core(&core, reading)?;
    let elem = match m.spec.elem {
        Elem::F16 => DType::F16,
        _ => DType::Bf16,
    };
    if !maps.is_empty() || m.derived.is_some() {
        let p = prologue_cascade(&core, &maps, m.derived.as_ref(), m.head_rank, elem)
            .map_err(|e| not_mappable(c, e, Span::UNKNOWN))?;
        let by_name = |n: &str| {
            core.tensor_by_name(n)
                .ok_or_else(|| not_mappable(c, format!("no tensor `{n}`"), Span::UNKNOWN))
        };
        let mut reads = Vec::new();
        let mut writes = Vec::new();
        for (h, t) in p.tensors.iter() {
            match t.kind {
                TensorKind::Input | TensorKind::Param => reads.push((h, by_name(&t.name)?)),
                TensorKind::Output => writes.push((
                    h,
                    maps.iter()
                        .find(|f| core.tensors[f.mapped].name == t.name)
                        .map(|f| f.mapped),
                )),
                TensorKind::Temp => {}
            }
        }
        m.prologue = Some(Prologue {
            cascade: p,
            reads,
            writes,
        });
    }
    m.maps = maps;
    Ok((m, core))
}

fn recognize_core(c: &Cascade, reading: Reading) -> Result<LinearMatch, Diagnostic> {
    let swap = reading.swap;
    let inputs: Vec<Handle<Tensor>> = c.tensors_of(TensorKind::Input).collect();
    let outputs: Vec<Handle<Tensor>> = c.tensors_of(TensorKind::Output).collect();
    let params: Vec<Handle<Tensor>> = c.tensors_of(TensorKind::Param).collect();
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
    if inputs.len() == 4 {
        // Three inputs with the feature rank of Q and K: one is a gate per key dimension.
        let out_feature = out_ranks.last().copied();
        let keyed: Vec<&str> = inputs
            .iter()
            .filter(|&&t| {
                let r = &c.tensors[t].ranks;
                r.len() == out_ranks.len() && r.last().copied() != out_feature
            })
            .map(|&t| c.tensors[t].name.as_str())
            .collect();
        if keyed.len() == 3 {
            return Err(not_mappable(
                c,
                format!(
                    "`{}` all end with the key feature rank: one is a gate per key dimension (GLA), and the linear kernels decay per head or per token, not per (token, key dimension)",
                    keyed.join("`, `")
                ),
                Span::UNKNOWN,
            ));
        }
    }
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
    let mut decay_form = None;
    let (decay_param, derived) = match reading.decay {
        DecayReading::Interface => match params[..] {
            [] => (None, None),
            [p] if ranks(p).len() == 1 && Some(ranks(p)[0]) == head => (Some(p), None),
            _ => {
                return Err(not_mappable(
                    c,
                    "the only parameter may be a per-head decay `s[h]`",
                    Span::UNKNOWN,
                ))
            }
        },
        DecayReading::Derived { .. } if gate_tensor.is_some() => {
            return Err(not_mappable(c, "a gate excludes a decay", Span::UNKNOWN))
        }
        DecayReading::Derived { flip } => match derive_decay(c, head, batch, flip) {
            Err(e) => return Err(not_mappable(c, e, Span::UNKNOWN)),
            Ok(None) => {
                return Err(not_mappable(
                    c,
                    "no decay factor `exp(c * (i - j))` to normalize",
                    Span::UNKNOWN,
                ))
            }
            Ok(Some(d)) => {
                decay_form = Some(d.written.clone());
                match rate_param(&d.rate, head) {
                    Some(p) => (Some(p), None),
                    None => (None, Some(d)),
                }
            }
        },
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
            decay: match (decay_param, gate_tensor, &derived) {
                (Some(p), _, _) => Decay::PerHead(c.tensors[p].name.clone()),
                (None, _, Some(d)) => Decay::PerHead(d.name.clone()),
                (None, Some(g), None) => Decay::Gate(c.tensors[g].name.clone()),
                (None, None, None) => Decay::None,
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
        head_rank: head,
        maps: Vec::new(),
        derived,
        decay_form,
        prologue: None,
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
        let (mapped, rate) = match self.run_prologue(inputs) {
            Ok(v) => v,
            Err(_) => return vec![f64::NAN; self.o.elements as usize],
        };
        let host = |l: &Layout| match mapped.get(&l.tensor) {
            Some(v) => l.host(v.clone()),
            None => l.host(inputs[&l.tensor].stored().into_owned()),
        };
        let prob = self.problem();
        let decay = rate.or_else(|| self.decay_param.map(|p| inputs[&p].stored().into_owned()));
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

impl LinearMatch {
    /// The pre-kernels' values on `inputs` (the cascade interpreter on their cascade): the
    /// mapped tensors by the recognized cascade's handle, and the decay rate per head.
    #[allow(clippy::type_complexity)]
    pub fn run_prologue(
        &self,
        inputs: &HashMap<Handle<Tensor>, TensorData>,
    ) -> Result<(HashMap<Handle<Tensor>, Vec<f64>>, Option<Vec<f64>>), String> {
        let mut mapped = HashMap::new();
        let Some(p) = &self.prologue else {
            return Ok((mapped, None));
        };
        let mut given = HashMap::new();
        for (mine, theirs) in &p.reads {
            if let Some(d) = inputs.get(theirs) {
                given.insert(*mine, d.clone());
            }
        }
        let values = evaluate_in_order(&p.cascade, &given, &topological_order(&p.cascade))
            .map_err(|e| e.to_string())?;
        let mut rate = None;
        for (mine, theirs) in &p.writes {
            let v = values
                .get(*mine)
                .ok_or("a pre-kernel output was not computed")?
                .stored()
                .into_owned();
            match theirs {
                Some(t) => {
                    mapped.insert(*t, v);
                }
                None => rate = Some(v),
            }
        }
        Ok((mapped, rate))
    }
}

/// Runs the reference interpreter on `small` (the same cascade at small sizes) and checks
/// that it computes the recurrence of its own linear-attention hypothesis (after the
/// pre-kernels, when the reading has any).
pub fn verify_linear(small: &Cascade, reading: Reading, seed: u64) -> Result<f64, Diagnostic> {
    let (m, _) = read_linear(small, reading)?;
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
