//! Point kernels as PTX: one module per kernel, one `.u64` pointer parameter per slot it
//! touches (in slot order). Values are computed in f32 (`ex2`/`lg2` for `exp`/`log`,
//! `div.rn`, `sqrt.rn`, `tanh.approx`); rank indices and offsets in 64-bit integers. Every
//! size is a constant of the module: a point kernel is compiled for one problem.
//!
//! Threads: a parallel kernel's threads stride over all its points, grid-wide; a recurrent
//! kernel's CTA owns one instance point (`ctaid.x`, decoded over the instance ranks) and
//! its threads stride over each member's points, with `bar.sync` after the inits and
//! after every member of every step (the barrier orders the global writes of the CTA).

use super::program::*;
use crate::abi::Dtype;
use crate::ptx::{Target, PTX_VERSION};
use einattn_ir::cascade::{BinaryOp, CmpOp, IndexExpr, ReduceOp, UnaryOp};
use std::fmt::Write as _;

/// Threads per CTA of every point kernel.
pub const POINT_THREADS: u32 = 256;

/// CTAs a parallel kernel launches at most (its threads then stride over the rest).
pub const MAX_PARALLEL_CTAS: u64 = 1 << 16;

fn lit(x: f64) -> String {
    format!("0f{:08X}", (x as f32).to_bits())
}

struct Emitter<'p> {
    program: &'p PointProgram,
    strides: Vec<Vec<u64>>,
    /// The `.u64` register holding each slot's global address, by slot.
    base: Vec<Option<String>>,
    /// The `.s64` register holding each rank's current index, by rank.
    index: Vec<String>,
    body: String,
    n_p: usize,
    n_r: usize,
    n_rd: usize,
    n_f: usize,
    n_label: usize,
}

impl Emitter<'_> {
    fn p(&mut self) -> String {
        self.n_p += 1;
        format!("%p{}", self.n_p)
    }
    fn r(&mut self) -> String {
        self.n_r += 1;
        format!("%r{}", self.n_r)
    }
    fn rd(&mut self) -> String {
        self.n_rd += 1;
        format!("%rd{}", self.n_rd)
    }
    fn f(&mut self) -> String {
        self.n_f += 1;
        format!("%f{}", self.n_f)
    }
    fn label(&mut self, what: &str) -> String {
        self.n_label += 1;
        format!("{what}_{}", self.n_label)
    }
    fn ins(&mut self, s: impl AsRef<str>) {
        self.body.push('\t');
        self.body.push_str(s.as_ref());
        self.body.push('\n');
    }
    fn at(&mut self, label: &str) {
        self.body.push_str(label);
        self.body.push_str(":\n");
    }

    /// An affine index as an `.s64` register.
    fn index_value(&mut self, i: &IndexExpr) -> String {
        let v = self.rd();
        self.ins(format!("mov.s64 {v}, {};", i.constant));
        for (coef, r) in &i.terms {
            let idx = self.index[r.index()].clone();
            self.ins(format!("mad.lo.s64 {v}, {idx}, {coef}, {v};"));
        }
        v
    }

    /// The byte address of an access.
    fn address(&mut self, a: &Access) -> String {
        let strides = self.strides[a.slot].clone();
        let mut base: i64 = 0;
        let mut coefs: Vec<(usize, i64)> = Vec::new();
        for (d, i) in a.indices.iter().enumerate() {
            let s = strides.get(d).copied().unwrap_or(0) as i64;
            base += i.constant * s;
            for (c, r) in &i.terms {
                match coefs.iter_mut().find(|(x, _)| *x == r.index()) {
                    Some(e) => e.1 += c * s,
                    None => coefs.push((r.index(), c * s)),
                }
            }
        }
        let off = self.rd();
        self.ins(format!("mov.s64 {off}, {base};"));
        for (r, c) in coefs.into_iter().filter(|(_, c)| *c != 0) {
            let idx = self.index[r].clone();
            self.ins(format!("mad.lo.s64 {off}, {idx}, {c}, {off};"));
        }
        let bytes = self.program.slots[a.slot].dtype.bytes();
        let addr = self.rd();
        let slot_base = self.base[a.slot].clone().unwrap_or_default();
        self.ins(format!("mad.lo.s64 {addr}, {off}, {bytes}, {slot_base};"));
        addr
    }

    /// A value and, when it may be absent, the predicate that says it is present.
    fn expr(&mut self, e: &Expr) -> (String, Option<String>) {
        match e {
            Expr::Literal(x) => {
                let f = self.f();
                self.ins(format!("mov.f32 {f}, {};", lit(*x)));
                (f, None)
            }
            Expr::Index(i) => {
                let v = self.index_value(i);
                let f = self.f();
                self.ins(format!("cvt.rn.f32.s64 {f}, {v};"));
                (f, None)
            }
            Expr::Load(a) => self.load(a),
            Expr::Unary(op, a) => {
                let (x, present) = self.expr(a);
                let f = self.f();
                match op {
                    UnaryOp::Neg => self.ins(format!("neg.f32 {f}, {x};")),
                    UnaryOp::Exp => {
                        let t = self.f();
                        self.ins(format!(
                            "mul.f32 {t}, {x}, {};",
                            lit(std::f64::consts::LOG2_E)
                        ));
                        self.ins(format!("ex2.approx.f32 {f}, {t};"));
                    }
                    UnaryOp::Log => {
                        let t = self.f();
                        self.ins(format!("lg2.approx.f32 {t}, {x};"));
                        self.ins(format!(
                            "mul.f32 {f}, {t}, {};",
                            lit(std::f64::consts::LN_2)
                        ));
                    }
                    UnaryOp::Sqrt => self.ins(format!("sqrt.rn.f32 {f}, {x};")),
                    UnaryOp::Tanh => self.ins(format!("tanh.approx.f32 {f}, {x};")),
                }
                (f, present)
            }
            Expr::Binary(op, a, b) => {
                let (x, pa) = self.expr(a);
                let (y, pb) = self.expr(b);
                let f = self.f();
                let arith = |name: &str| format!("{name}.f32 {f}, {x}, {y};");
                match op {
                    BinaryOp::Add => self.ins(arith("add.rn")),
                    BinaryOp::Sub => self.ins(arith("sub.rn")),
                    BinaryOp::Mul => self.ins(arith("mul.rn")),
                    BinaryOp::Div => self.ins(arith("div.rn")),
                    BinaryOp::Max => self.ins(arith("max")),
                    BinaryOp::Min => self.ins(arith("min")),
                    cmp => {
                        let q = self.p();
                        self.ins(format!(
                            "setp.{}.f32 {q}, {x}, {y};",
                            cmp_name(binary_cmp(*cmp))
                        ));
                        self.ins(format!("selp.f32 {f}, {}, {}, {q};", lit(1.0), lit(0.0)));
                    }
                }
                (f, self.both(pa, pb))
            }
        }
    }

    fn both(&mut self, a: Option<String>, b: Option<String>) -> Option<String> {
        match (a, b) {
            (Some(a), Some(b)) => {
                let q = self.p();
                self.ins(format!("and.pred {q}, {a}, {b};"));
                Some(q)
            }
            (a, b) => a.or(b),
        }
    }

    fn load(&mut self, a: &Access) -> (String, Option<String>) {
        let addr = self.address(a);
        let slot = &self.program.slots[a.slot];
        let (kind, dtype) = (slot.kind, slot.dtype);
        let f = self.f();
        match dtype {
            Dtype::Bf16 => {
                // bf16 is the top half of an f32: widening is a shift.
                let r = self.r();
                self.ins(format!("ld.global.u16 {r}, [{addr}];"));
                self.ins(format!("shl.b32 {r}, {r}, 16;"));
                self.ins(format!("mov.b32 {f}, {r};"));
            }
            Dtype::F16 => {
                let r = self.r();
                self.ins(format!("ld.global.u16 {r}, [{addr}];"));
                self.ins(format!(
                    "{{ .reg .b16 %hv; cvt.u16.u32 %hv, {r}; cvt.f32.f16 {f}, %hv; }}"
                ));
            }
            Dtype::F32 | Dtype::U32 => {
                let r = self.r();
                self.ins(format!("ld.global.b32 {r}, [{addr}];"));
                self.ins(format!("mov.b32 {f}, {r};"));
                if kind == SlotKind::Scratch {
                    let q = self.p();
                    self.ins(format!("setp.ne.b32 {q}, {r}, {ABSENT_BITS};"));
                    return (f, Some(q));
                }
            }
        }
        (f, None)
    }

    /// Branches to `fail` unless every check holds.
    fn checks(&mut self, c: &Checks, fail: &str) {
        for k in &c.affine {
            let (a, b) = (self.index_value(&k.lhs), self.index_value(&k.rhs));
            let q = self.p();
            self.ins(format!("setp.{}.s64 {q}, {a}, {b};", int_cmp_name(k.op)));
            self.ins(format!("@!{q} bra {fail};"));
        }
        for v in &c.values {
            let (a, pa) = self.expr(&v.lhs);
            let (b, pb) = self.expr(&v.rhs);
            let q = self.p();
            self.ins(format!("setp.{}.f32 {q}, {a}, {b};", cmp_name(v.op)));
            let present = self.both(pa, pb);
            let all = self.both(Some(q), present).unwrap_or_default();
            self.ins(format!("@!{all} bra {fail};"));
        }
    }

    /// The value of levels `level..` (always present once a level reduces).
    fn levels(&mut self, c: &Compute, level: usize) -> (String, Option<String>) {
        let Some(l) = c.levels.get(level) else {
            return self.expr(&c.value);
        };
        let acc = self.f();
        self.ins(format!("mov.f32 {acc}, {};", lit(l.op.identity())));
        let idx = self.index[l.rank].clone();
        let (top, next, end) = (self.label("L"), self.label("N"), self.label("E"));
        self.ins(format!("mov.s64 {idx}, 0;"));
        self.at(&top);
        let q = self.p();
        self.ins(format!("setp.ge.s64 {q}, {idx}, {};", l.extent));
        self.ins(format!("@{q} bra {end};"));
        self.checks(&l.checks, &next);
        let (v, present) = self.levels(c, level + 1);
        let guard = present.map(|p| format!("@{p} ")).unwrap_or_default();
        let combine = match l.op {
            ReduceOp::Sum => format!("add.rn.f32 {acc}, {acc}, {v};"),
            ReduceOp::Prod => format!("mul.rn.f32 {acc}, {acc}, {v};"),
            ReduceOp::Max => format!("max.f32 {acc}, {acc}, {v};"),
            ReduceOp::Min => format!("min.f32 {acc}, {acc}, {v};"),
        };
        self.ins(format!("{guard}{combine}"));
        self.at(&next);
        self.ins(format!("add.s64 {idx}, {idx}, 1;"));
        self.ins(format!("bra {top};"));
        self.at(&end);
        (acc, None)
    }

    fn store(&mut self, out: &Access, v: &str, present: Option<String>) {
        let addr = self.address(out);
        let slot = &self.program.slots[out.slot];
        let (kind, dtype) = (slot.kind, slot.dtype);
        if kind == SlotKind::Scratch {
            let r = self.r();
            self.ins(format!("mov.b32 {r}, {v};"));
            if let Some(p) = present {
                self.ins(format!("selp.b32 {r}, {r}, {ABSENT_BITS}, {p};"));
            }
            self.ins(format!("st.global.b32 [{addr}], {r};"));
            return;
        }
        // An output stores an absent point as 0.
        let value = match present {
            Some(p) => {
                let f = self.f();
                self.ins(format!("selp.f32 {f}, {v}, {}, {p};", lit(0.0)));
                f
            }
            None => v.to_string(),
        };
        self.store_value(&addr, &value, dtype);
    }

    /// An absent point: the mark in scratch, 0 in an output.
    fn store_absent(&mut self, out: &Access) {
        let addr = self.address(out);
        let slot = &self.program.slots[out.slot];
        let (kind, dtype) = (slot.kind, slot.dtype);
        if kind == SlotKind::Scratch {
            self.ins(format!("st.global.b32 [{addr}], {ABSENT_BITS};"));
        } else {
            let zero = self.f();
            self.ins(format!("mov.f32 {zero}, {};", lit(0.0)));
            self.store_value(&addr, &zero, dtype);
        }
    }

    fn store_value(&mut self, addr: &str, value: &str, dtype: Dtype) {
        match dtype {
            Dtype::Bf16 | Dtype::F16 => {
                let ty = if dtype == Dtype::Bf16 { "bf16" } else { "f16" };
                self.ins(format!(
                    "{{ .reg .b16 %hs; cvt.rn.{ty}.f32 %hs, {value}; st.global.b16 [{addr}], %hs; }}"
                ));
            }
            Dtype::F32 | Dtype::U32 => self.ins(format!("st.global.f32 [{addr}], {value};")),
        }
    }

    /// One point of `c` (its point ranks already decoded).
    fn point(&mut self, c: &Compute) {
        let done = self.label("D");
        if !c.outer.is_empty() {
            let (pass, fail) = (self.label("P"), self.label("F"));
            self.checks(&c.outer, &fail);
            self.ins(format!("bra {pass};"));
            self.at(&fail);
            self.store_absent(&c.out);
            self.ins(format!("bra {done};"));
            self.at(&pass);
        }
        let (v, present) = self.levels(c, 0);
        self.store(&c.out, &v, present);
        self.at(&done);
    }

    /// Decodes `linear` (row-major over `ranks`) into their index registers.
    fn decode(&mut self, ranks: &[RankId], linear: &str) {
        let rest = self.rd();
        self.ins(format!("mov.u64 {rest}, {linear};"));
        for (k, &r) in ranks.iter().enumerate().rev() {
            let extent = self.program.ranks[r].1;
            let idx = self.index[r].clone();
            if k == 0 {
                self.ins(format!("mov.u64 {idx}, {rest};"));
            } else {
                self.ins(format!("rem.u64 {idx}, {rest}, {extent};"));
                self.ins(format!("div.u64 {rest}, {rest}, {extent};"));
            }
        }
    }

    /// Every point of `c`, `first` then every `stride`-th.
    fn point_loop(&mut self, c: &Compute, first: &str, stride: &str) {
        let total: u64 = c.points.iter().map(|&r| self.program.ranks[r].1).product();
        let pt = self.rd();
        let (top, end) = (self.label("T"), self.label("X"));
        self.ins(format!("// {}", c.einsum));
        self.ins(format!("mov.u64 {pt}, {first};"));
        self.at(&top);
        let q = self.p();
        self.ins(format!("setp.ge.u64 {q}, {pt}, {total};"));
        self.ins(format!("@{q} bra {end};"));
        self.decode(&c.points.clone(), &pt);
        self.point(c);
        self.ins(format!("add.u64 {pt}, {pt}, {stride};"));
        self.ins(format!("bra {top};"));
        self.at(&end);
    }
}

fn binary_cmp(op: BinaryOp) -> CmpOp {
    match op {
        BinaryOp::Lt => CmpOp::Lt,
        BinaryOp::Le => CmpOp::Le,
        BinaryOp::Gt => CmpOp::Gt,
        BinaryOp::Ge => CmpOp::Ge,
        BinaryOp::Eq => CmpOp::Eq,
        _ => CmpOp::Ne,
    }
}

/// Float comparisons as Rust's: ordered, except `!=`, which a NaN makes true.
fn cmp_name(op: CmpOp) -> &'static str {
    match op {
        CmpOp::Lt => "lt",
        CmpOp::Le => "le",
        CmpOp::Gt => "gt",
        CmpOp::Ge => "ge",
        CmpOp::Eq => "eq",
        CmpOp::Ne => "neu",
    }
}

fn int_cmp_name(op: CmpOp) -> &'static str {
    match op {
        CmpOp::Lt => "lt",
        CmpOp::Le => "le",
        CmpOp::Gt => "gt",
        CmpOp::Ge => "ge",
        CmpOp::Eq => "eq",
        CmpOp::Ne => "ne",
    }
}

/// A printed point kernel and its launch shape.
#[derive(Debug, Clone, PartialEq)]
pub struct PointPtx {
    pub entry: String,
    pub text: String,
    /// The slots of its pointer parameters, in order.
    pub slots: Vec<usize>,
    pub grid: u64,
    pub threads: u32,
}

/// The CTAs a kernel launches.
pub fn grid(program: &PointProgram, k: &PointKernel) -> u64 {
    let points = |c: &Compute| -> u64 { c.points.iter().map(|&r| program.ranks[r].1).product() };
    match k {
        PointKernel::Parallel { compute, .. } => points(compute)
            .div_ceil(u64::from(POINT_THREADS))
            .clamp(1, MAX_PARALLEL_CTAS),
        PointKernel::Recurrent { instance, .. } => instance
            .iter()
            .map(|&r| program.ranks[r].1)
            .product::<u64>()
            .max(1),
        PointKernel::Copy { from, .. } => program.slots[*from]
            .elements()
            .div_ceil(u64::from(POINT_THREADS))
            .clamp(1, MAX_PARALLEL_CTAS),
    }
}

/// Prints kernel `k` of `program` as a PTX module.
pub fn print(program: &PointProgram, k: &PointKernel, target: Target) -> PointPtx {
    let slots = k.slots();
    let mut e = Emitter {
        program,
        strides: program.slots.iter().map(Slot::strides).collect(),
        base: vec![None; program.slots.len()],
        index: (0..program.ranks.len())
            .map(|r| format!("%ix{r}"))
            .collect(),
        body: String::new(),
        n_p: 0,
        n_r: 0,
        n_rd: 0,
        n_f: 0,
        n_label: 0,
    };
    for &s in &slots {
        let reg = e.rd();
        e.ins(format!("ld.param.u64 {reg}, [p_{s}];"));
        e.ins(format!("cvta.to.global.u64 {reg}, {reg};"));
        e.base[s] = Some(reg);
    }
    let (cta, ntid, tid, nctaid) = (e.r(), e.r(), e.r(), e.r());
    e.ins(format!("mov.u32 {cta}, %ctaid.x;"));
    e.ins(format!("mov.u32 {ntid}, %ntid.x;"));
    e.ins(format!("mov.u32 {tid}, %tid.x;"));
    e.ins(format!("mov.u32 {nctaid}, %nctaid.x;"));
    match k {
        PointKernel::Parallel { compute, .. } => {
            let (first, stride, t) = (e.rd(), e.rd(), e.rd());
            e.ins(format!("mul.wide.u32 {first}, {cta}, {ntid};"));
            e.ins(format!("cvt.u64.u32 {t}, {tid};"));
            e.ins(format!("add.u64 {first}, {first}, {t};"));
            e.ins(format!("mul.wide.u32 {stride}, {nctaid}, {ntid};"));
            e.point_loop(compute, &first, &stride);
        }
        PointKernel::Recurrent {
            instance,
            rank,
            steps,
            reverse,
            inits,
            body,
            ..
        } => {
            let (inst, first, stride) = (e.rd(), e.rd(), e.rd());
            e.ins(format!("cvt.u64.u32 {inst}, {cta};"));
            e.decode(instance, &inst);
            e.ins(format!("cvt.u64.u32 {first}, {tid};"));
            e.ins(format!("cvt.u64.u32 {stride}, {ntid};"));
            for c in inits {
                e.point_loop(c, &first, &stride);
            }
            e.ins("bar.sync 0;");
            let step = e.index[*rank].clone();
            let (top, end) = (e.label("S"), e.label("Z"));
            // A reverse recurrence counts down from the last step and stops below 0.
            if *reverse {
                e.ins(format!("mov.s64 {step}, {};", steps.saturating_sub(1)));
            } else {
                e.ins(format!("mov.s64 {step}, 0;"));
            }
            e.at(&top);
            let q = e.p();
            if *reverse {
                e.ins(format!("setp.lt.s64 {q}, {step}, 0;"));
            } else {
                e.ins(format!("setp.ge.s64 {q}, {step}, {steps};"));
            }
            e.ins(format!("@{q} bra {end};"));
            for c in body {
                e.point_loop(c, &first, &stride);
                e.ins("bar.sync 0;");
            }
            if *reverse {
                e.ins(format!("sub.s64 {step}, {step}, 1;"));
            } else {
                e.ins(format!("add.s64 {step}, {step}, 1;"));
            }
            e.ins(format!("bra {top};"));
            e.at(&end);
        }
        PointKernel::Copy { from, to, .. } => {
            let (first, stride, t) = (e.rd(), e.rd(), e.rd());
            e.ins(format!("mul.wide.u32 {first}, {cta}, {ntid};"));
            e.ins(format!("cvt.u64.u32 {t}, {tid};"));
            e.ins(format!("add.u64 {first}, {first}, {t};"));
            e.ins(format!("mul.wide.u32 {stride}, {nctaid}, {ntid};"));
            let total = program.slots[*from].elements();
            let (top, end) = (e.label("T"), e.label("X"));
            e.at(&top);
            let q = e.p();
            e.ins(format!("setp.ge.u64 {q}, {first}, {total};"));
            e.ins(format!("@{q} bra {end};"));
            let (src, dst) = (e.rd(), e.rd());
            let (fb, tb) = (
                e.base[*from].clone().unwrap_or_default(),
                e.base[*to].clone().unwrap_or_default(),
            );
            e.ins(format!("mad.lo.s64 {src}, {first}, 4, {fb};"));
            let bytes = program.slots[*to].dtype.bytes();
            e.ins(format!("mad.lo.s64 {dst}, {first}, {bytes}, {tb};"));
            let (r, f, present) = (e.r(), e.f(), e.p());
            e.ins(format!("ld.global.b32 {r}, [{src}];"));
            e.ins(format!("setp.ne.b32 {present}, {r}, {ABSENT_BITS};"));
            e.ins(format!("mov.b32 {f}, {r};"));
            e.ins(format!("selp.f32 {f}, {f}, {}, {present};", lit(0.0)));
            e.store_value(&dst, &f, program.slots[*to].dtype);
            e.ins(format!("add.u64 {first}, {first}, {stride};"));
            e.ins(format!("bra {top};"));
            e.at(&end);
        }
    }
    e.ins("ret;");
    let mut text = String::new();
    let _ = writeln!(
        text,
        "// Generated by einattn-backends (general lowering) for `{}`.",
        program.name
    );
    let _ = writeln!(
        text,
        ".version {PTX_VERSION}\n.target {}\n.address_size 64\n",
        target.name()
    );
    let params: Vec<String> = slots
        .iter()
        .map(|s| format!("\t.param .u64 p_{s}"))
        .collect();
    let _ = writeln!(
        text,
        ".visible .entry {}(\n{}\n)\n{{",
        k.name(),
        params.join(",\n")
    );
    let _ = writeln!(text, "\t.reg .pred %p<{}>;", e.n_p + 1);
    let _ = writeln!(text, "\t.reg .b32 %r<{}>;", e.n_r + 1);
    let _ = writeln!(text, "\t.reg .b64 %rd<{}>;", e.n_rd + 1);
    let _ = writeln!(text, "\t.reg .f32 %f<{}>;", e.n_f + 1);
    let _ = writeln!(text, "\t.reg .b64 %ix<{}>;", program.ranks.len().max(1));
    text.push_str(&e.body);
    text.push_str("}\n");
    PointPtx {
        entry: k.name().to_string(),
        text,
        slots,
        grid: grid(program, k),
        threads: POINT_THREADS,
    }
}
