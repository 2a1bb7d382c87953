//! Unit tests on cascades built by hand, so the analysis is tested without the parser.
//! The golden reports of the examples (through the parser) are in `passes/tests/`.

use super::*;
use einattn_ir::{
    Access, BinaryOp, CmpOp, Condition, DType, Einsum, Expr, ExtentSource, IndexExpr, Recurrence,
    ReduceOp, Reduction, Span, Split, Tensor, UnaryOp,
};

/// A small builder for cascades in tests.
struct Build {
    c: Cascade,
}

impl Build {
    fn new(name: &str) -> Build {
        Build {
            c: Cascade {
                name: name.to_string(),
                ..Cascade::default()
            },
        }
    }

    fn size(&mut self, name: &str, value: u64) {
        self.c.sizes.push((name.to_string(), value));
    }

    fn rank(&mut self, name: &str, extent: u64, symbol: Option<&str>) -> Handle<Rank> {
        self.c.ranks.append(Rank {
            name: name.to_string(),
            extent,
            source: symbol
                .map(|s| ExtentSource::Symbol(s.to_string()))
                .unwrap_or(ExtentSource::Literal),
            split: None,
            parent: None,
            span: Span::UNKNOWN,
        })
    }

    fn split(
        &mut self,
        parent: Handle<Rank>,
        outer: &str,
        inner: &str,
        tile: u64,
    ) -> (Handle<Rank>, Handle<Rank>) {
        let extent = self.c.ranks[parent].extent;
        let o = self.c.ranks.append(Rank {
            name: outer.to_string(),
            extent: extent / tile,
            source: ExtentSource::SplitOuter,
            split: None,
            parent: Some(parent),
            span: Span::UNKNOWN,
        });
        let i = self.c.ranks.append(Rank {
            name: inner.to_string(),
            extent: tile,
            source: ExtentSource::SplitTile,
            split: None,
            parent: Some(parent),
            span: Span::UNKNOWN,
        });
        self.c.ranks[parent].split = Some(Split { outer: o, inner: i });
        (o, i)
    }

    fn tensor(&mut self, name: &str, ranks: &[Handle<Rank>], kind: TensorKind) -> Handle<Tensor> {
        let dtype = match kind {
            TensorKind::Input | TensorKind::Output => Some(DType::Bf16),
            TensorKind::Param => Some(DType::F32),
            TensorKind::Temp => None,
        };
        self.c.tensors.append(Tensor {
            name: name.to_string(),
            ranks: ranks.to_vec(),
            kind,
            dtype,
            iterative: None,
            default: None,
            span: Span::UNKNOWN,
        })
    }

    fn state(&mut self, name: &str, ranks: &[Handle<Rank>], iterative: usize) -> Handle<Tensor> {
        let t = self.tensor(name, ranks, TensorKind::Temp);
        self.c.tensors[t].iterative = Some(iterative);
        t
    }

    fn einsum(
        &mut self,
        out: Access,
        expr: Expr,
        reductions: &[(Handle<Rank>, ReduceOp)],
        mask: Vec<Condition>,
        recurrence: Option<(Handle<Rank>, Expr)>,
    ) {
        self.c.einsums.append(Einsum {
            output: out,
            expr,
            reductions: reductions
                .iter()
                .map(|&(rank, op)| Reduction { rank, op })
                .collect(),
            mask,
            value_mask: Vec::new(),
            recurrence: recurrence.map(|(rank, init)| Recurrence {
                rank,
                init,
                init_span: Span::UNKNOWN,
                reverse: false,
            }),
            span: Span::UNKNOWN,
        });
    }
}

fn ix(r: Handle<Rank>) -> IndexExpr {
    IndexExpr::rank(r)
}

fn ix_plus(r: Handle<Rank>, k: i64) -> IndexExpr {
    IndexExpr {
        terms: vec![(1, r)],
        constant: k,
    }
}

fn acc(t: Handle<Tensor>, idx: Vec<IndexExpr>) -> Access {
    Access {
        tensor: t,
        indices: idx,
        span: Span::UNKNOWN,
    }
}

fn a(t: Handle<Tensor>, idx: Vec<IndexExpr>) -> Expr {
    Expr::Access(acc(t, idx))
}

fn bin(op: BinaryOp, x: Expr, y: Expr) -> Expr {
    Expr::binary(op, x, y)
}

fn exp(x: Expr) -> Expr {
    Expr::unary(UnaryOp::Exp, x)
}

fn le(l: IndexExpr, r: IndexExpr) -> Condition {
    Condition {
        lhs: l,
        op: CmpOp::Le,
        rhs: r,
        span: Span::UNKNOWN,
    }
}

/// The FuseMax 3-pass (or, with `two_pass`, 2-pass) cascade of docs/algorithms.md section 2.
fn softmax_multi_pass(m_size: u64, d: u64, two_pass: bool, causal: bool) -> Cascade {
    let mut b = Build::new(if two_pass {
        "attention_2pass"
    } else {
        "attention_3pass"
    });
    b.size("M", m_size);
    b.size("D", d);
    let e = b.rank("e", d, Some("D"));
    let f = b.rank("f", d, Some("D"));
    let m = b.rank("m", m_size, Some("M"));
    let p = b.rank("p", m_size, Some("M"));
    let q = b.tensor("Q", &[p, e], TensorKind::Input);
    let k = b.tensor("K", &[m, e], TensorKind::Input);
    let v = b.tensor("V", &[m, f], TensorKind::Input);
    let scale = b.tensor("scale", &[], TensorKind::Param);
    let av = b.tensor("AV", &[p, f], TensorKind::Output);
    let qk = b.tensor("QK", &[m, p], TensorKind::Temp);
    let gm = b.tensor("GM", &[p], TensorKind::Temp);
    let sn = b.tensor("SN", &[m, p], TensorKind::Temp);
    let sd = b.tensor("SD", &[p], TensorKind::Temp);
    let mask = if causal {
        vec![le(ix(m), ix(p))]
    } else {
        vec![]
    };
    b.einsum(
        acc(qk, vec![ix(m), ix(p)]),
        bin(
            BinaryOp::Mul,
            bin(BinaryOp::Mul, a(scale, vec![]), a(q, vec![ix(p), ix(e)])),
            a(k, vec![ix(m), ix(e)]),
        ),
        &[(e, ReduceOp::Sum)],
        mask,
        None,
    );
    b.einsum(
        acc(gm, vec![ix(p)]),
        a(qk, vec![ix(m), ix(p)]),
        &[(m, ReduceOp::Max)],
        vec![],
        None,
    );
    b.einsum(
        acc(sn, vec![ix(m), ix(p)]),
        exp(bin(
            BinaryOp::Sub,
            a(qk, vec![ix(m), ix(p)]),
            a(gm, vec![ix(p)]),
        )),
        &[],
        vec![],
        None,
    );
    b.einsum(
        acc(sd, vec![ix(p)]),
        a(sn, vec![ix(m), ix(p)]),
        &[(m, ReduceOp::Sum)],
        vec![],
        None,
    );
    if two_pass {
        let snv = b.tensor("SNV", &[p, f], TensorKind::Temp);
        b.einsum(
            acc(snv, vec![ix(p), ix(f)]),
            bin(
                BinaryOp::Mul,
                a(sn, vec![ix(m), ix(p)]),
                a(v, vec![ix(m), ix(f)]),
            ),
            &[(m, ReduceOp::Sum)],
            vec![],
            None,
        );
        b.einsum(
            acc(av, vec![ix(p), ix(f)]),
            bin(
                BinaryOp::Div,
                a(snv, vec![ix(p), ix(f)]),
                a(sd, vec![ix(p)]),
            ),
            &[],
            vec![],
            None,
        );
    } else {
        let at = b.tensor("A", &[m, p], TensorKind::Temp);
        b.einsum(
            acc(at, vec![ix(m), ix(p)]),
            bin(BinaryOp::Div, a(sn, vec![ix(m), ix(p)]), a(sd, vec![ix(p)])),
            &[],
            vec![],
            None,
        );
        b.einsum(
            acc(av, vec![ix(p), ix(f)]),
            bin(
                BinaryOp::Mul,
                a(at, vec![ix(m), ix(p)]),
                a(v, vec![ix(m), ix(f)]),
            ),
            &[(m, ReduceOp::Sum)],
            vec![],
            None,
        );
    }
    b.c
}

/// The 1-pass cascade (attention_1pass.ein), optionally causal (attention_causal.ein
/// without batch and head).
fn softmax_one_pass(m_size: u64, d: u64, tile: u64, causal: bool) -> Cascade {
    let mut b = Build::new("attention_1pass");
    b.size("M", m_size);
    b.size("D", d);
    let e = b.rank("e", d, Some("D"));
    let f = b.rank("f", d, Some("D"));
    let m = b.rank("m", m_size, Some("M"));
    let p = b.rank("p", m_size, Some("M"));
    let (m1, m0) = b.split(m, "m1", "m0", tile);
    let q = b.tensor("Q", &[p, e], TensorKind::Input);
    let k = b.tensor("K", &[m, e], TensorKind::Input);
    let v = b.tensor("V", &[m, f], TensorKind::Input);
    let scale = b.tensor("scale", &[], TensorKind::Param);
    let av = b.tensor("AV", &[p, f], TensorKind::Output);
    let bqk = b.tensor("BQK", &[m1, m0, p], TensorKind::Temp);
    let lm = b.tensor("LM", &[m1, p], TensorKind::Temp);
    let rm = b.state("RM", &[m1, p], 0);
    let sln = b.tensor("SLN", &[m1, m0, p], TensorKind::Temp);
    let sld = b.tensor("SLD", &[m1, p], TensorKind::Temp);
    let slnv = b.tensor("SLNV", &[m1, p, f], TensorKind::Temp);
    let prm = b.tensor("PRM", &[m1, p], TensorKind::Temp);
    let rd = b.state("RD", &[m1, p], 0);
    let rnv = b.state("RNV", &[m1, p, f], 0);
    let m1_extent = (m_size / tile) as i64;
    // `m` inside an Einsum over m1 and m0 is the parent: the front end may keep it.
    let mask = if causal {
        vec![le(ix(m), ix(p))]
    } else {
        vec![]
    };
    b.einsum(
        acc(bqk, vec![ix(m1), ix(m0), ix(p)]),
        bin(
            BinaryOp::Mul,
            bin(BinaryOp::Mul, a(scale, vec![]), a(q, vec![ix(p), ix(e)])),
            a(k, vec![ix(m), ix(e)]),
        ),
        &[(e, ReduceOp::Sum)],
        mask,
        None,
    );
    b.einsum(
        acc(lm, vec![ix(m1), ix(p)]),
        a(bqk, vec![ix(m1), ix(m0), ix(p)]),
        &[(m0, ReduceOp::Max)],
        vec![],
        None,
    );
    b.einsum(
        acc(rm, vec![ix_plus(m1, 1), ix(p)]),
        bin(
            BinaryOp::Max,
            a(rm, vec![ix(m1), ix(p)]),
            a(lm, vec![ix(m1), ix(p)]),
        ),
        &[],
        vec![],
        Some((m1, Expr::Literal(f64::NEG_INFINITY))),
    );
    b.einsum(
        acc(sln, vec![ix(m1), ix(m0), ix(p)]),
        exp(bin(
            BinaryOp::Sub,
            a(bqk, vec![ix(m1), ix(m0), ix(p)]),
            a(rm, vec![ix_plus(m1, 1), ix(p)]),
        )),
        &[],
        vec![],
        None,
    );
    b.einsum(
        acc(sld, vec![ix(m1), ix(p)]),
        a(sln, vec![ix(m1), ix(m0), ix(p)]),
        &[(m0, ReduceOp::Sum)],
        vec![],
        None,
    );
    b.einsum(
        acc(slnv, vec![ix(m1), ix(p), ix(f)]),
        bin(
            BinaryOp::Mul,
            a(sln, vec![ix(m1), ix(m0), ix(p)]),
            a(v, vec![ix(m), ix(f)]),
        ),
        &[(m0, ReduceOp::Sum)],
        vec![],
        None,
    );
    b.einsum(
        acc(prm, vec![ix(m1), ix(p)]),
        exp(bin(
            BinaryOp::Sub,
            a(rm, vec![ix(m1), ix(p)]),
            a(rm, vec![ix_plus(m1, 1), ix(p)]),
        )),
        &[],
        vec![],
        None,
    );
    b.einsum(
        acc(rd, vec![ix_plus(m1, 1), ix(p)]),
        bin(
            BinaryOp::Add,
            a(sld, vec![ix(m1), ix(p)]),
            bin(
                BinaryOp::Mul,
                a(rd, vec![ix(m1), ix(p)]),
                a(prm, vec![ix(m1), ix(p)]),
            ),
        ),
        &[],
        vec![],
        Some((m1, Expr::Literal(0.0))),
    );
    b.einsum(
        acc(rnv, vec![ix_plus(m1, 1), ix(p), ix(f)]),
        bin(
            BinaryOp::Add,
            a(slnv, vec![ix(m1), ix(p), ix(f)]),
            bin(
                BinaryOp::Mul,
                a(rnv, vec![ix(m1), ix(p), ix(f)]),
                a(prm, vec![ix(m1), ix(p)]),
            ),
        ),
        &[],
        vec![],
        Some((m1, Expr::Literal(0.0))),
    );
    b.einsum(
        acc(av, vec![ix(p), ix(f)]),
        bin(
            BinaryOp::Div,
            a(rnv, vec![IndexExpr::constant(m1_extent), ix(p), ix(f)]),
            a(rd, vec![IndexExpr::constant(m1_extent), ix(p)]),
        ),
        &[],
        vec![],
        None,
    );
    b.c
}

/// linear_attention.ein: KV = K^T V over n, then O = Q KV.
fn linear_attention(n: u64, d: u64) -> Cascade {
    let mut b = Build::new("linear_attention");
    let bb = b.rank("b", 1, Some("B"));
    let h = b.rank("h", 2, Some("H"));
    let dd = b.rank("d", d, Some("D"));
    let e = b.rank("e", d, Some("D"));
    let nn = b.rank("n", n, Some("N"));
    let p = b.rank("p", n, Some("N"));
    let q = b.tensor("Q", &[bb, p, h, dd], TensorKind::Input);
    let k = b.tensor("K", &[bb, nn, h, dd], TensorKind::Input);
    let v = b.tensor("V", &[bb, nn, h, e], TensorKind::Input);
    let o = b.tensor("O", &[bb, p, h, e], TensorKind::Output);
    let kv = b.tensor("KV", &[bb, h, dd, e], TensorKind::Temp);
    b.einsum(
        acc(kv, vec![ix(bb), ix(h), ix(dd), ix(e)]),
        bin(
            BinaryOp::Mul,
            a(k, vec![ix(bb), ix(nn), ix(h), ix(dd)]),
            a(v, vec![ix(bb), ix(nn), ix(h), ix(e)]),
        ),
        &[(nn, ReduceOp::Sum)],
        vec![],
        None,
    );
    b.einsum(
        acc(o, vec![ix(bb), ix(p), ix(h), ix(e)]),
        bin(
            BinaryOp::Mul,
            a(q, vec![ix(bb), ix(p), ix(h), ix(dd)]),
            a(kv, vec![ix(bb), ix(h), ix(dd), ix(e)]),
        ),
        &[(dd, ReduceOp::Sum)],
        vec![],
        None,
    );
    b.c
}

fn neg(x: Expr) -> Expr {
    Expr::unary(UnaryOp::Neg, x)
}

fn affine(terms: &[(i64, Handle<Rank>)], constant: i64) -> IndexExpr {
    IndexExpr {
        terms: terms.to_vec(),
        constant,
    }
}

/// lightning.ein: Lightning Attention-2 with blocks of `block` tokens.
fn lightning(n_size: u64, d_size: u64, block: u64) -> Cascade {
    let mut b = Build::new("lightning");
    let bb = b.rank("b", 1, Some("B"));
    let h = b.rank("h", 2, Some("H"));
    let d = b.rank("d", d_size, Some("D"));
    let e = b.rank("e", d_size, Some("D"));
    let n = b.rank("n", n_size, Some("N"));
    let (t, i) = b.split(n, "t", "i", block);
    let j = b.rank("j", block, Some("I"));
    let q = b.tensor("Q", &[bb, n, h, d], TensorKind::Input);
    let k = b.tensor("K", &[bb, n, h, d], TensorKind::Input);
    let v = b.tensor("V", &[bb, n, h, e], TensorKind::Input);
    let s_param = b.tensor("s", &[h], TensorKind::Param);
    let o = b.tensor("O", &[bb, n, h, e], TensorKind::Output);
    let st = b.tensor("S", &[bb, h, t, i, j], TensorKind::Temp);
    let sd = b.tensor("SD", &[bb, h, t, i, j], TensorKind::Temp);
    let oi = b.tensor("OI", &[bb, h, t, i, e], TensorKind::Temp);
    let qkv = b.tensor("QKV", &[bb, h, t, i, e], TensorKind::Temp);
    let kd = b.tensor("KD", &[bb, h, t, j, d], TensorKind::Temp);
    let kvu = b.tensor("KVU", &[bb, h, t, d, e], TensorKind::Temp);
    let kv = b.state("KV", &[bb, h, t, d, e], 2);
    let blk = block as i64;
    let key_pos = affine(&[(blk, t), (1, j)], 0);
    let decay = |x: Expr| exp(bin(BinaryOp::Mul, neg(a(s_param, vec![ix(h)])), x));
    let b_h_t = |x: Vec<IndexExpr>| [vec![ix(bb), ix(h), ix(t)], x].concat();
    b.einsum(
        acc(st, b_h_t(vec![ix(i), ix(j)])),
        bin(
            BinaryOp::Mul,
            a(q, vec![ix(bb), ix(n), ix(h), ix(d)]),
            a(k, vec![ix(bb), key_pos.clone(), ix(h), ix(d)]),
        ),
        &[(d, ReduceOp::Sum)],
        vec![le(ix(j), ix(i))],
        None,
    );
    b.einsum(
        acc(sd, b_h_t(vec![ix(i), ix(j)])),
        bin(
            BinaryOp::Mul,
            a(st, b_h_t(vec![ix(i), ix(j)])),
            decay(Expr::Index(affine(&[(1, i), (-1, j)], 0))),
        ),
        &[],
        vec![],
        None,
    );
    b.einsum(
        acc(oi, b_h_t(vec![ix(i), ix(e)])),
        bin(
            BinaryOp::Mul,
            a(sd, b_h_t(vec![ix(i), ix(j)])),
            a(v, vec![ix(bb), key_pos.clone(), ix(h), ix(e)]),
        ),
        &[(j, ReduceOp::Sum)],
        vec![],
        None,
    );
    b.einsum(
        acc(qkv, b_h_t(vec![ix(i), ix(e)])),
        bin(
            BinaryOp::Mul,
            a(q, vec![ix(bb), ix(n), ix(h), ix(d)]),
            a(kv, b_h_t(vec![ix(d), ix(e)])),
        ),
        &[(d, ReduceOp::Sum)],
        vec![],
        None,
    );
    b.einsum(
        acc(o, vec![ix(bb), ix(n), ix(h), ix(e)]),
        bin(
            BinaryOp::Add,
            a(oi, b_h_t(vec![ix(i), ix(e)])),
            bin(
                BinaryOp::Mul,
                decay(Expr::Index(affine(&[(1, i)], 1))),
                a(qkv, b_h_t(vec![ix(i), ix(e)])),
            ),
        ),
        &[],
        vec![],
        None,
    );
    b.einsum(
        acc(kd, b_h_t(vec![ix(j), ix(d)])),
        bin(
            BinaryOp::Mul,
            a(k, vec![ix(bb), key_pos.clone(), ix(h), ix(d)]),
            decay(Expr::Index(affine(&[(-1, j)], blk - 1))),
        ),
        &[],
        vec![],
        None,
    );
    b.einsum(
        acc(kvu, b_h_t(vec![ix(d), ix(e)])),
        bin(
            BinaryOp::Mul,
            a(kd, b_h_t(vec![ix(j), ix(d)])),
            a(v, vec![ix(bb), key_pos, ix(h), ix(e)]),
        ),
        &[(j, ReduceOp::Sum)],
        vec![],
        None,
    );
    b.einsum(
        acc(kv, vec![ix(bb), ix(h), ix_plus(t, 1), ix(d), ix(e)]),
        bin(
            BinaryOp::Add,
            bin(
                BinaryOp::Mul,
                decay(Expr::Index(IndexExpr::constant(blk))),
                a(kv, b_h_t(vec![ix(d), ix(e)])),
            ),
            a(kvu, b_h_t(vec![ix(d), ix(e)])),
        ),
        &[],
        vec![],
        Some((t, Expr::Literal(0.0))),
    );
    b.c
}

fn opts() -> AnalysisOptions {
    AnalysisOptions::default()
}

fn einsum<'r>(r: &'r Report, name: &str) -> &'r EinsumReport {
    r.einsums
        .iter()
        .find(|e| e.einsum == name)
        .unwrap_or_else(|| panic!("no Einsum {name}"))
}

#[test]
fn three_pass_needs_three_passes_over_m() {
    let r = analyze(&softmax_multi_pass(1024, 64, false, false), &opts());
    assert_eq!(r.passes["m"], 3, "{}", r.render_text());
    assert_eq!(r.passes["e"], 1);
    let m = r.pass_detail.iter().find(|p| p.name == "m").unwrap();
    assert_eq!(
        m.reasons,
        vec![
            "pass 2 over m starts at SN: it needs GM, a max over all of m".to_string(),
            "pass 3 over m starts at A: it needs SD, a sum over all of m".to_string(),
        ]
    );
    assert_eq!(r.key_rank.as_deref(), Some("m"));
}

#[test]
fn two_pass_needs_two_passes_over_m() {
    let r = analyze(&softmax_multi_pass(1024, 64, true, false), &opts());
    assert_eq!(r.passes["m"], 2, "{}", r.render_text());
}

#[test]
fn one_pass_needs_one_pass_over_m_and_two_over_the_tile() {
    let r = analyze(&softmax_one_pass(1024, 64, 64, false), &opts());
    assert_eq!(r.passes["m"], 1, "{}", r.render_text());
    assert_eq!(r.passes["m0"], 2, "{}", r.render_text());
    let m0 = r.pass_detail.iter().find(|p| p.name == "m0").unwrap();
    assert_eq!(m0.reasons.len(), 1);
    assert!(
        m0.reasons[0].starts_with("pass 2 over m0 starts at SLN: it needs RM"),
        "{}",
        m0.reasons[0]
    );
    assert!(
        m0.reasons[0].contains("LM, a max over all of m0"),
        "{}",
        m0.reasons[0]
    );
}

#[test]
fn one_pass_buffers_are_states_and_tiles() {
    let r = analyze(&softmax_one_pass(1024, 64, 64, false), &opts());
    let buf = |n: &str| r.buffers.iter().find(|b| b.tensor == n).unwrap();
    assert_eq!(buf("RNV").kind, BufferKind::State);
    assert_eq!(buf("RNV").elements_per_point, 64, "f per query");
    assert_eq!(buf("RM").elements_per_point, 1);
    assert_eq!(buf("RD").elements_per_point, 1);
    assert_eq!(buf("BQK").kind, BufferKind::Tile);
    assert_eq!(buf("BQK").elements_per_point, 64, "m0 per query");
    assert!(r.buffers.iter().all(|b| b.kind != BufferKind::Fiber));
    assert_eq!(r.fusion_groups.len(), 1);
    let g = &r.fusion_groups[0];
    assert_eq!(g.reads, vec!["scale", "Q", "K", "V"]);
    assert_eq!(g.writes, vec!["AV"]);
    assert_eq!(g.bytes_moved, r.bytes_min);
}

#[test]
fn three_pass_fibers_are_recomputed_at_long_sequences() {
    let r = analyze(&softmax_multi_pass(16384, 64, false, false), &opts());
    let qk = r.buffers.iter().find(|b| b.tensor == "QK").unwrap();
    assert_eq!(qk.kind, BufferKind::Fiber);
    assert_eq!(qk.elements_per_point, 16384);
    assert_eq!(qk.strategy, Some(FiberStrategy::Recompute), "{}", qk.reason);
    let gm = r.buffers.iter().find(|b| b.tensor == "GM").unwrap();
    assert_eq!(gm.kind, BufferKind::Accumulator);
    assert_eq!(gm.elements_per_point, 1);
    assert_eq!(r.fusion_groups.len(), 3, "{}", r.render_text());
}

#[test]
fn contraction_flops_match_the_formula() {
    let (m, d) = (1024u64, 64u64);
    let r = analyze(&softmax_multi_pass(m, d, false, false), &opts());
    let qk = einsum(&r, "QK");
    assert_eq!(qk.class, OpClass::Contraction);
    assert_eq!(qk.contraction_flops, 2 * m * m * d);
    // The scale is applied once per score.
    assert_eq!(qk.scalar_flops, m * m);
    let av = einsum(&r, "AV");
    assert_eq!(av.contraction_flops, 2 * m * m * d);
    let sn = einsum(&r, "SN");
    assert_eq!(sn.class, OpClass::Scalar);
    assert_eq!(sn.scalar_flops, 2 * m * m);
    assert_eq!(sn.transcendental_ops, m * m);
    let gm = einsum(&r, "GM");
    assert_eq!(gm.scalar_flops, m * m, "one combine per reduced point");
}

#[test]
fn causal_mask_counts_the_triangle_exactly() {
    let (m, d) = (1000u64, 64u64);
    let r = analyze(&softmax_multi_pass(m, d, false, true), &opts());
    let qk = einsum(&r, "QK");
    assert_eq!(qk.points, d * m * (m + 1) / 2);
    assert_eq!(qk.contraction_flops, 2 * d * m * (m + 1) / 2);
    // Absence propagates: the max and the exponential skip masked scores too.
    assert_eq!(einsum(&r, "GM").points, m * (m + 1) / 2);
    assert_eq!(einsum(&r, "SN").points, m * (m + 1) / 2);
    assert!(einsum(&r, "SN").mask_inherited);
}

#[test]
fn causal_split_mask_counts_through_the_parent_index() {
    let (m, d, tile) = (1024u64, 64u64, 64u64);
    let r = analyze(&softmax_one_pass(m, d, tile, true), &opts());
    assert_eq!(einsum(&r, "BQK").points, d * m * (m + 1) / 2);
    assert_eq!(einsum(&r, "SLN").points, m * (m + 1) / 2);
    // SLNV contracts over m0 only where SLN is present.
    assert_eq!(
        einsum(&r, "SLNV").contraction_flops,
        2 * d * m * (m + 1) / 2
    );
    // LM is over (m1, p): every (tile, query) pair has an output, even fully masked ones
    // (the max of nothing is -inf, which is present).
    assert_eq!(einsum(&r, "LM").output_points, (m / tile) * m);
}

#[test]
fn linear_attention_is_one_pass_with_a_d_by_e_accumulator() {
    let r = analyze(&linear_attention(1024, 64), &opts());
    assert_eq!(r.passes["n"], 1, "{}", r.render_text());
    assert_eq!(r.key_rank.as_deref(), Some("n"));
    let kv = r.buffers.iter().find(|b| b.tensor == "KV").unwrap();
    assert_eq!(kv.kind, BufferKind::Accumulator);
    // e is parallel here (every Einsum iterates it, none reduces it), so the d x e state
    // per (b, h) is d per (b, h, e): a kernel may split e across CTAs, as LA-2's does.
    assert_eq!(r.parallel_ranks, vec!["b", "h", "e"]);
    assert_eq!(kv.ranks, vec!["d"]);
    assert_eq!(kv.elements_per_point, 64);
    assert_eq!(r.fusion_groups.len(), 1);
    assert_eq!(r.fusion_groups[0].einsums[1].role, MemberRole::Epilogue);
}

#[test]
fn bytes_min_counts_inputs_and_outputs_once() {
    let (m, d) = (1024u64, 64u64);
    let r = analyze(&softmax_multi_pass(m, d, false, false), &opts());
    // Q, K, V and AV in bf16, the scale in f32.
    assert_eq!(r.bytes_min, 4 * m * d * 2 + 4);
    assert!(r.arithmetic_intensity > 100.0);
}

#[test]
fn roofline_picks_the_largest_term() {
    let r = analyze(&softmax_multi_pass(16384, 64, false, false), &opts());
    let rf = &r.roofline;
    let max = rf
        .contraction_s
        .max(rf.scalar_s)
        .max(rf.transcendental_s)
        .max(rf.memory_s);
    assert_eq!(rf.time_lower_bound_s, max);
    assert_ne!(rf.bound, "memory", "attention at 16k is compute-bound");
}

#[test]
fn text_rendering_explains_passes() {
    let r = analyze(&softmax_multi_pass(1024, 64, false, false), &opts());
    let text = r.render_text();
    assert!(text.contains("m: 3 passes"), "{text}");
    assert!(text.contains("pass 2 over m starts at SN"), "{text}");
}

#[test]
fn analysis_is_fast_at_64k() {
    // Never enumerate N^2: a causal 64k cascade must count its masks in milliseconds even
    // in a debug build (the release figure is in bench/results).
    let c = softmax_one_pass(65536, 128, 64, true);
    let start = std::time::Instant::now();
    let r = analyze(&c, &opts());
    let elapsed = start.elapsed();
    assert_eq!(einsum(&r, "BQK").points, 128 * 65536 * 65537 / 2);
    assert!(elapsed.as_millis() < 500, "took {elapsed:?}");
}

#[test]
fn lightning_is_one_pass_over_the_blocks_with_a_d_by_e_state() {
    let (n, d, block) = (1024u64, 64u64, 64u64);
    let r = analyze(&lightning(n, d, block), &opts());
    let text = r.render_text();
    // The block rank t is the outer rank of n: reported under n.
    assert_eq!(r.passes["n"], 1, "{text}");
    assert_eq!(r.passes["i"], 1, "{text}");
    assert_eq!(r.passes["j"], 1, "{text}");
    assert_eq!(r.passes["d"], 1, "{text}");
    assert_eq!(r.key_rank.as_deref(), Some("n"));
    assert_eq!(r.parallel_ranks, vec!["b", "h"]);
    let kv = r.buffers.iter().find(|b| b.tensor == "KV").unwrap();
    assert_eq!(kv.kind, BufferKind::State);
    assert_eq!(kv.ranks, vec!["d", "e"]);
    assert_eq!(kv.elements_per_point, d * d);
    // Intra-block scores: a causal triangle per block, contracted over d.
    let blocks = n / block;
    let triangle = block * (block + 1) / 2;
    assert_eq!(
        einsum(&r, "S").contraction_flops,
        2 * 2 * blocks * triangle * d
    );
    assert_eq!(
        einsum(&r, "OI").contraction_flops,
        2 * 2 * blocks * triangle * d
    );
    assert_eq!(
        einsum(&r, "KVU").contraction_flops,
        2 * 2 * blocks * block * d * d
    );
    assert_eq!(r.fusion_groups.len(), 1, "{text}");
    assert!(r.fusion_groups[0].fits_on_chip);
}

#[test]
fn a_malformed_cascade_is_reported_not_panicked_on() {
    let mut c = linear_attention(16, 4);
    // A dangling rank handle, as a buggy pass might leave.
    c.tensors[Handle::new(0)].ranks.push(Handle::new(99));
    let r = analyze(&c, &opts());
    assert_eq!(r.warnings.len(), 1);
    assert!(
        r.warnings[0].starts_with("malformed cascade"),
        "{:?}",
        r.warnings
    );
    assert!(r.passes.is_empty());
}

#[test]
fn a_reduction_of_absent_points_is_present() {
    // X is absent for p >= 2; G = max over m of X is the identity there, which is present,
    // so Y = G + 1 computes at every p. Z = X + 1 (a map) is absent where X is.
    let mut b = Build::new("absence");
    let m = b.rank("m", 4, None);
    let p = b.rank("p", 5, None);
    let input = b.tensor("A", &[m, p], TensorKind::Input);
    let x = b.tensor("X", &[m, p], TensorKind::Temp);
    let g = b.tensor("G", &[p], TensorKind::Temp);
    let y = b.tensor("Y", &[p], TensorKind::Output);
    let z = b.tensor("Z", &[m, p], TensorKind::Output);
    let lt2 = Condition {
        lhs: ix(p),
        op: CmpOp::Lt,
        rhs: IndexExpr::constant(2),
        span: Span::UNKNOWN,
    };
    b.einsum(
        acc(x, vec![ix(m), ix(p)]),
        a(input, vec![ix(m), ix(p)]),
        &[],
        vec![lt2],
        None,
    );
    b.einsum(
        acc(g, vec![ix(p)]),
        a(x, vec![ix(m), ix(p)]),
        &[(m, ReduceOp::Max)],
        vec![],
        None,
    );
    let plus_one = |t: Expr| bin(BinaryOp::Add, t, Expr::Literal(1.0));
    b.einsum(
        acc(y, vec![ix(p)]),
        plus_one(a(g, vec![ix(p)])),
        &[],
        vec![],
        None,
    );
    b.einsum(
        acc(z, vec![ix(m), ix(p)]),
        plus_one(a(x, vec![ix(m), ix(p)])),
        &[],
        vec![],
        None,
    );
    let r = analyze(&b.c, &opts());
    assert_eq!(einsum(&r, "X").points, 8);
    assert_eq!(
        einsum(&r, "G").points,
        8,
        "the max combines only present points"
    );
    assert_eq!(
        einsum(&r, "Y").points,
        5,
        "but its result exists at every p"
    );
    assert_eq!(
        einsum(&r, "Z").points,
        8,
        "a map is absent where its operand is"
    );
}

#[test]
#[ignore = "prints reports for eyeballing: cargo test -- --ignored --nocapture"]
fn print_reports() {
    for c in [
        softmax_multi_pass(1024, 64, false, false),
        softmax_multi_pass(1024, 64, true, false),
        softmax_one_pass(1024, 64, 64, true),
        linear_attention(1024, 64),
        lightning(1024, 64, 64),
    ] {
        println!("{}", analyze(&c, &opts()).render_text());
    }
}

mod masked_points_through_the_ir {
    //! The point count of an Einsum with a random mask (every comparison, affine sides over
    //! up to three ranks, one of them split) equals enumeration with the IR's own
    //! `Condition::holds`: checks the strict-to-non-strict and split-parent rewrites too.
    use super::*;
    use proptest::prelude::*;

    fn cmp_op() -> impl Strategy<Value = CmpOp> {
        prop_oneof![
            Just(CmpOp::Lt),
            Just(CmpOp::Le),
            Just(CmpOp::Gt),
            Just(CmpOp::Ge),
            Just(CmpOp::Eq),
            Just(CmpOp::Ne),
        ]
    }

    /// Coefficients for ranks (x, y, parent of the split), constant.
    fn side() -> impl Strategy<Value = ([i64; 3], i64)> {
        ([-2i64..=2, -2i64..=2, -2i64..=2], -6i64..=6)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn einsum_points_equal_enumeration(
            x_ext in 1u64..=5,
            y_ext in 1u64..=5,
            outer in 1u64..=3,
            tile in 1u64..=3,
            conds in prop::collection::vec((side(), cmp_op(), side()), 0..=3),
        ) {
            let mut b = Build::new("random_mask");
            let x = b.rank("x", x_ext, None);
            let y = b.rank("y", y_ext, None);
            let z = b.rank("z", outer * tile, None);
            let (z1, z0) = b.split(z, "z1", "z0", tile);
            let input = b.tensor("A", &[x, y, z], TensorKind::Input);
            let out = b.tensor("B", &[x, y, z1, z0], TensorKind::Output);
            let to_index = |(coefs, constant): ([i64; 3], i64)| {
                let mut e = IndexExpr::constant(constant);
                for (c, r) in coefs.iter().zip([x, y, z]) {
                    e.add_term(*c, r);
                }
                e
            };
            let mask: Vec<Condition> = conds
                .iter()
                .map(|&(l, op, r)| Condition {
                    lhs: to_index(l),
                    op,
                    rhs: to_index(r),
                    span: Span::UNKNOWN,
                })
                .collect();
            b.einsum(
                acc(out, vec![ix(x), ix(y), ix(z1), ix(z0)]),
                a(input, vec![ix(x), ix(y), ix(z)]),
                &[],
                mask.clone(),
                None,
            );
            let r = analyze(&b.c, &opts());
            let mut expected = 0u64;
            for xv in 0..x_ext as i64 {
                for yv in 0..y_ext as i64 {
                    for zv in 0..(outer * tile) as i64 {
                        let value = |rank: Handle<Rank>| {
                            if rank == x { xv } else if rank == y { yv } else { zv }
                        };
                        if mask.iter().all(|c| c.holds(value)) {
                            expected += 1;
                        }
                    }
                }
            }
            prop_assert_eq!(r.einsums[0].points, expected);
        }
    }
}
