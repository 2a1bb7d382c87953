//! Scalar expressions of `Map`/`RowMap` statements as PTX, with loop-invariant values
//! (decay factors of positions) computed once per kernel.

use super::*;

impl Printer<'_> {
    pub(super) fn emit_expr(&mut self, e: &ScalarExpr, ctx: &ElemCtx) -> Result<String, TileError> {
        match e {
            ScalarExpr::Lit(x) => return Ok(f32_lit(*x)),
            ScalarExpr::Scalar(id) => return Ok(format!("%sc{}", id.0)),
            ScalarExpr::Head(id) => return Ok(format!("%hp{}", id.0)),
            _ => {}
        }
        if let Some(class) = self.invariant_key(e, ctx) {
            let key = (format!("{e:?}"), class);
            if let Some(r) = self.invariant_cache.get(&key) {
                return Ok(r.clone());
            }
            let saved = std::mem::take(&mut self.body);
            let v = self.emit_expr_inner(e, ctx)?;
            let code = std::mem::replace(&mut self.body, saved);
            self.hoisted.push_str(&code);
            self.invariant_cache.insert(key, v.clone());
            return Ok(v);
        }
        if let (Some(values), Some((nt, lo))) = (&self.column_values, ctx.col) {
            if varies_by_column_only(e) {
                let key = (format!("{e:?}"), nt, lo);
                if let Some(r) = values.get(&key) {
                    return Ok(r.clone());
                }
                // With wgmma only: the base stays live through the statement, one register
                // that the 255-register mma.sync kernels do not have (a soft-capped, windowed
                // ALiBi kernel at d = 64 spilled 32 B on sm_80).
                let bases = self.key_tile_bases.is_some()
                    && self.in_loop
                    && self.prog.schedule.mma == MmaUnit::Warpgroup;
                let v = match (affine_in_key(e), bases) {
                    (Some((Some(a), b)), true) => {
                        self.emit_affine_in_key(e, &a, b.as_ref(), nt * 8 + lo, ctx)?
                    }
                    _ => self.emit_expr_inner(e, ctx)?,
                };
                if let Some(values) = &mut self.column_values {
                    values.insert(key, v.clone());
                }
                return Ok(v);
            }
        }
        if e.is_uniform() {
            // Compute once, in the hoisted section that runs before the body.
            return self.hoist(format!("{e:?}"), |p| p.emit_expr_inner(e, ctx));
        }
        self.emit_expr_inner(e, ctx)
    }

    /// `a * key + b` (uniform `a` and `b`) at column `col` of the thread's key tile: one FMA
    /// from the tile's base `a * kf + b` (computed once per statement) instead of the key's
    /// position and a product per column (ALiBi's column term: half the work per column).
    fn emit_affine_in_key(
        &mut self,
        e: &ScalarExpr,
        a: &ScalarExpr,
        b: Option<&ScalarExpr>,
        col: u32,
        ctx: &ElemCtx,
    ) -> Result<String, TileError> {
        let ar = self.emit_expr(a, ctx)?;
        let key = format!("{e:?}");
        let base = match self.key_tile_bases.as_ref().and_then(|m| m.get(&key)) {
            Some(r) => r.clone(),
            None => {
                let t = self.f();
                match b {
                    Some(b) => {
                        let br = self.emit_expr(b, ctx)?;
                        self.ins(format!("fma.rn.f32 {t}, {ar}, %kf, {br};"));
                    }
                    None => self.ins(format!("mul.rn.f32 {t}, {ar}, %kf;")),
                }
                if let Some(m) = &mut self.key_tile_bases {
                    m.insert(key, t.clone());
                }
                t
            }
        };
        if col == 0 {
            return Ok(base);
        }
        let v = self.f();
        self.ins(format!(
            "fma.rn.f32 {v}, {ar}, {}, {base};",
            f32_lit(col as f64)
        ));
        Ok(v)
    }

    /// A value that never changes in this thread (a uniform expression, an address of its
    /// own rows), computed once in the hoisted section by `emit` and shared by every
    /// statement that asks with `key`.
    pub(super) fn hoist<E>(
        &mut self,
        key: String,
        emit: impl FnOnce(&mut Self) -> Result<String, E>,
    ) -> Result<String, E> {
        if let Some(r) = self.uniform_cache.get(&key) {
            return Ok(r.clone());
        }
        let saved = std::mem::take(&mut self.body);
        let v = emit(self);
        let code = std::mem::replace(&mut self.body, saved);
        let v = v?;
        self.hoisted.push_str(&code);
        self.uniform_cache.insert(key, v.clone());
        Ok(v)
    }

    /// In a sequential program positions are tile-relative, so an expensive expression of
    /// positions alone (a decay factor) has the same value in every iteration: it is
    /// computed once at kernel start. Elements share a register when the expression has the
    /// same value for them: same row (query only), same column (key only), or same `i - j`
    /// relative to the thread's first row and column (a difference); other expressions are
    /// left in the loop (one register per element would be too many).
    pub(super) fn invariant_key(&self, e: &ScalarExpr, ctx: &ElemCtx) -> Option<(u8, i32)> {
        // Outside sequential programs a row's tokens are at its query position, the same in
        // every key tile: a memory read per row, once.
        if self.in_loop && !self.prog.sequential && reads_row_tokens_only(e) {
            return Some((0, (ctx.mt * 16 + ctx.half * 8) as i32));
        }
        // (A look-back program's loop runs once: nothing to gain, registers to lose.)
        if !self.in_loop || !self.prog.sequential || self.prog.look_back || !e.has_transcendental()
        {
            return None;
        }
        let row = (ctx.mt * 16 + ctx.half * 8) as i32;
        let col = ctx.col.map(|(nt, lo)| (nt * 8 + lo) as i32);
        match (e.position_dependence()?, col) {
            (PositionDependence::Query, _) => Some((0, row)),
            (PositionDependence::Key, Some(c)) => Some((1, c)),
            (PositionDependence::Difference, Some(c)) => Some((2, row - c)),
            _ => None,
        }
    }

    pub(super) fn emit_expr_inner(
        &mut self,
        e: &ScalarExpr,
        ctx: &ElemCtx,
    ) -> Result<String, TileError> {
        Ok(match e {
            ScalarExpr::Lit(_) | ScalarExpr::Scalar(_) | ScalarExpr::Head(_) => {
                self.emit_expr(e, ctx)?
            }
            ScalarExpr::Index(SeqRank::Query) => format!("%pf_{}_{}", ctx.mt, ctx.half),
            ScalarExpr::Index(SeqRank::Key) => {
                let (nt, lo) = ctx
                    .col
                    .ok_or_else(|| TileError::Invalid("key index in a row expression".into()))?;
                if !self.in_loop {
                    return Err(TileError::Invalid("key index outside the key loop".into()));
                }
                let t = self.f();
                self.ins(format!(
                    "add.f32 {t}, %kf, {};",
                    f32_lit((nt * 8 + lo) as f64)
                ));
                t
            }
            ScalarExpr::Elem(id) => {
                let (nt, lo) = ctx
                    .col
                    .ok_or_else(|| TileError::Invalid("Elem in a row expression".into()))?;
                self.acc_reg(*id, ctx.mt, nt, ctx.half * 2 + lo)
            }
            ScalarExpr::Row(id) => self.row_reg(*id, ctx.mt, ctx.half),
            ScalarExpr::Token(id, at) if at.distance(0, 0).is_some() => {
                // A table over the distance: `±(p - m) + c` for the element's absolute query
                // and key positions, clamped into the table (outside it the element is
                // masked).
                let extent = self.prog.tokens[id.index()].extent.ok_or_else(|| {
                    TileError::Invalid("a distance read of a token without an extent".into())
                })?;
                let (nt, lo) = ctx.col.ok_or_else(|| {
                    TileError::Invalid("a distance token in a row expression".into())
                })?;
                if !self.in_loop || self.prog.sequential {
                    return Err(TileError::Invalid(
                        "distance tokens are read in the key loop of a query-tiled program".into(),
                    ));
                }
                let (key, pos) = (self.r(), self.r());
                self.ins(format!("add.s32 {key}, %kcol, {};", nt * 8 + lo));
                self.ins(format!(
                    "add.s32 {pos}, %prowpos0, {};",
                    ctx.mt * 16 + ctx.half * 8
                ));
                let (minuend, subtrahend, c) = match at {
                    TokenAt::QueryMinusKey(c) => (&pos, &key, *c),
                    TokenAt::KeyMinusQuery(c) => (&key, &pos, *c),
                    _ => unreachable!("a distance read"),
                };
                let at = self.r();
                self.ins(format!("sub.s32 {at}, {minuend}, {subtrahend};"));
                self.ins(format!("add.s32 {at}, {at}, {c};"));
                self.ins(format!("max.s32 {at}, {at}, 0;"));
                self.ins(format!("min.s32 {at}, {at}, {};", extent.saturating_sub(1)));
                let addr = self.rd();
                self.ins(format!("cvt.u64.u32 {addr}, {at};"));
                self.ins(format!("mul.lo.u64 {addr}, {addr}, %tkrs{};", id.0));
                self.ins(format!("add.u64 {addr}, {addr}, %tkbase{};", id.0));
                let v = self.f();
                self.ins(format!("ld.global.nc.f32 {v}, [{addr}];"));
                v
            }
            ScalarExpr::Token(id, at) => {
                let sequential = self.prog.sequential;
                // Outside a sequential program a row reads at its query position (also
                // outside the loop), a column at its key position (`%kcol` is absolute).
                if !self.in_loop && (sequential || *at != TokenAt::Row) {
                    return Err(TileError::Invalid("token input outside the loop".into()));
                }
                let pos = self.r();
                let limit = if !sequential && *at == TokenAt::Row {
                    "%nq"
                } else {
                    "%nk"
                };
                match at {
                    TokenAt::Row if !sequential => {
                        self.ins(format!(
                            "add.s32 {pos}, %prow0, {};",
                            ctx.mt * 16 + ctx.half * 8
                        ));
                    }
                    TokenAt::Col if !sequential => {
                        let (nt, lo) = ctx.col.ok_or_else(|| {
                            TileError::Invalid("column token in a row expression".into())
                        })?;
                        self.ins(format!("add.s32 {pos}, %kcol, {};", nt * 8 + lo));
                    }
                    TokenAt::Last | TokenAt::Before if !sequential => {
                        return Err(TileError::Invalid(
                            "the tile's last or previous token exists in sequential programs only"
                                .into(),
                        ));
                    }
                    TokenAt::Row => {
                        self.ins(format!(
                            "add.s32 {pos}, %prow0, {};",
                            ctx.mt * 16 + ctx.half * 8
                        ));
                        self.ins(format!("add.s32 {pos}, {pos}, %korg;"));
                    }
                    TokenAt::Col => {
                        let (nt, lo) = ctx.col.ok_or_else(|| {
                            TileError::Invalid("column token in a row expression".into())
                        })?;
                        self.ins(format!("add.s32 {pos}, %kcol, {};", nt * 8 + lo));
                        self.ins(format!("add.s32 {pos}, {pos}, %korg;"));
                    }
                    TokenAt::Last => {
                        self.ins(format!(
                            "add.s32 {pos}, %korg, {};",
                            self.prog.schedule.block_m
                        ));
                        self.ins(format!("min.s32 {pos}, {pos}, %nk;"));
                        self.ins(format!("sub.s32 {pos}, {pos}, 1;"));
                    }
                    TokenAt::Before => {
                        self.ins(format!("sub.s32 {pos}, %korg, 1;"));
                    }
                    TokenAt::QueryMinusKey(_) | TokenAt::KeyMinusQuery(_) => {
                        unreachable!("distance reads are printed above")
                    }
                }
                // Past the end: the last token (those elements are masked); before the
                // start: 0.
                let last = self.r();
                self.ins(format!("sub.s32 {last}, {limit}, 1;"));
                self.ins(format!("min.s32 {pos}, {pos}, {last};"));
                let neg = self.pred();
                self.ins(format!("setp.lt.s32 {neg}, {pos}, 0;"));
                self.ins(format!("max.s32 {pos}, {pos}, 0;"));
                let addr = self.rd();
                self.ins(format!("cvt.u64.u32 {addr}, {pos};"));
                self.ins(format!("mul.lo.u64 {addr}, {addr}, %tkrs{};", id.0));
                self.ins(format!("add.u64 {addr}, {addr}, %tkbase{};", id.0));
                let v = self.f();
                self.ins(format!("ld.global.nc.f32 {v}, [{addr}];"));
                self.ins(format!("selp.f32 {v}, 0f00000000, {v}, {neg};"));
                v
            }
            ScalarExpr::Unary(op, a) => {
                let a = self.emit_expr(a, ctx)?;
                let t = self.f();
                match op {
                    UnaryOp::Neg => self.ins(format!("neg.f32 {t}, {a};")),
                    UnaryOp::Exp => {
                        let s = self.f();
                        self.ins(format!(
                            "mul.f32 {s}, {a}, {};",
                            f32_lit(std::f64::consts::LOG2_E)
                        ));
                        self.ins(format!("ex2.approx.ftz.f32 {t}, {s};"));
                    }
                    UnaryOp::Exp2 => self.ins(format!("ex2.approx.ftz.f32 {t}, {a};")),
                    UnaryOp::Log => {
                        let s = self.f();
                        self.ins(format!("lg2.approx.ftz.f32 {s}, {a};"));
                        self.ins(format!(
                            "mul.f32 {t}, {s}, {};",
                            f32_lit(std::f64::consts::LN_2)
                        ));
                    }
                    UnaryOp::Log2 => self.ins(format!("lg2.approx.ftz.f32 {t}, {a};")),
                    UnaryOp::Sqrt => self.ins(format!("sqrt.rn.f32 {t}, {a};")),
                    UnaryOp::Tanh => self.ins(format!("tanh.approx.f32 {t}, {a};")),
                    UnaryOp::Recip => self.ins(format!("rcp.rn.f32 {t}, {a};")),
                }
                t
            }
            ScalarExpr::Binary(op, a, b) => {
                let a = self.emit_expr(a, ctx)?;
                let b = self.emit_expr(b, ctx)?;
                let t = self.f();
                let opn = match op {
                    BinaryOp::Add => "add.f32",
                    BinaryOp::Sub => "sub.f32",
                    BinaryOp::Mul => "mul.f32",
                    BinaryOp::Div => "div.rn.f32",
                    BinaryOp::Max => "max.f32",
                    BinaryOp::Min => "min.f32",
                };
                self.ins(format!("{opn} {t}, {a}, {b};"));
                t
            }
            ScalarExpr::Select {
                op,
                lhs,
                rhs,
                then,
                otherwise,
            } => {
                let l = self.emit_expr(lhs, ctx)?;
                let r = self.emit_expr(rhs, ctx)?;
                let a = self.emit_expr(then, ctx)?;
                let b = self.emit_expr(otherwise, ctx)?;
                let pr = self.pred();
                let cmp = match op {
                    CmpOp::Lt => "lt",
                    CmpOp::Le => "le",
                    CmpOp::Gt => "gt",
                    CmpOp::Ge => "ge",
                    CmpOp::Eq => "eq",
                    CmpOp::Ne => "ne",
                };
                self.ins(format!("setp.{cmp}.f32 {pr}, {l}, {r};"));
                let t = self.f();
                self.ins(format!("selp.f32 {t}, {a}, {b}, {pr};"));
                t
            }
        })
    }
}

/// Whether `e` depends on the element's column (key position or key token) and on nothing
/// else that varies between elements: its value is shared by a column's rows.
pub(super) fn varies_by_column_only(e: &ScalarExpr) -> bool {
    let (mut column, mut other) = (false, false);
    e.visit(&mut |x| match x {
        ScalarExpr::Index(SeqRank::Key) | ScalarExpr::Token(_, TokenAt::Col) => column = true,
        ScalarExpr::Index(_) | ScalarExpr::Elem(_) | ScalarExpr::Row(_) | ScalarExpr::Token(..) => {
            other = true
        }
        _ => {}
    });
    column && !other
}

/// `e` as `a * Index(Key) + b` with uniform `a` and `b` (`None`: zero), when it is one:
/// sums, differences, negations and products by uniform factors of the key's position and
/// uniform values.
type Affine = (Option<ScalarExpr>, Option<ScalarExpr>);

pub(super) fn affine_in_key(e: &ScalarExpr) -> Option<Affine> {
    use crate::tile::ex;
    fn combine(
        x: Option<ScalarExpr>,
        y: Option<ScalarExpr>,
        f: fn(ScalarExpr, ScalarExpr) -> ScalarExpr,
        neg: bool,
    ) -> Option<ScalarExpr> {
        match (x, y) {
            (None, None) => None,
            (Some(x), None) => Some(x),
            (None, Some(y)) if neg => Some(ex::un(UnaryOp::Neg, y)),
            (None, Some(y)) => Some(y),
            (Some(x), Some(y)) => Some(f(x, y)),
        }
    }
    if e.is_uniform() {
        return Some((None, Some(e.clone())));
    }
    match e {
        ScalarExpr::Index(SeqRank::Key) => Some((Some(ex::lit(1.0)), None)),
        ScalarExpr::Unary(UnaryOp::Neg, x) => {
            let (a, b) = affine_in_key(x)?;
            let neg = |v: Option<ScalarExpr>| v.map(|v| ex::un(UnaryOp::Neg, v));
            Some((neg(a), neg(b)))
        }
        ScalarExpr::Binary(op @ (BinaryOp::Add | BinaryOp::Sub), x, y) => {
            let ((a1, b1), (a2, b2)) = (affine_in_key(x)?, affine_in_key(y)?);
            let (f, neg): (fn(ScalarExpr, ScalarExpr) -> ScalarExpr, bool) = if *op == BinaryOp::Add
            {
                (ex::add, false)
            } else {
                (ex::sub, true)
            };
            Some((combine(a1, a2, f, neg), combine(b1, b2, f, neg)))
        }
        ScalarExpr::Binary(BinaryOp::Mul, x, y) => {
            let (u, v) = if x.is_uniform() { (x, y) } else { (y, x) };
            if !u.is_uniform() {
                return None;
            }
            let (a, b) = affine_in_key(v)?;
            let scaled = |t: Option<ScalarExpr>| {
                t.map(|t| match t {
                    ScalarExpr::Lit(1.0) => (**u).clone(),
                    t => ex::mul((**u).clone(), t),
                })
            };
            Some((scaled(a), scaled(b)))
        }
        _ => None,
    }
}

/// Whether `e` reads a row's per-token input and otherwise only the row's query position
/// and uniform values.
fn reads_row_tokens_only(e: &ScalarExpr) -> bool {
    let (mut token, mut other) = (false, false);
    e.visit(&mut |x| match x {
        ScalarExpr::Token(_, TokenAt::Row) => token = true,
        ScalarExpr::Index(SeqRank::Query) => {}
        ScalarExpr::Index(_) | ScalarExpr::Elem(_) | ScalarExpr::Row(_) | ScalarExpr::Token(..) => {
            other = true
        }
        _ => {}
    });
    token && !other
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tile::{ex, ScalarId};
    use proptest::prelude::*;

    /// Expressions of the key's position, two scalars and literals under `+`, `-`, `*`
    /// (sometimes of two key-dependent factors, which is not affine) and negation.
    fn expr() -> impl Strategy<Value = ScalarExpr> {
        let leaf = prop_oneof![
            Just(ScalarExpr::Index(SeqRank::Key)),
            (0u32..2).prop_map(|i| ScalarExpr::Scalar(ScalarId(i))),
            (-4i32..5).prop_map(|x| ex::lit(f64::from(x) * 0.5)),
        ];
        leaf.prop_recursive(4, 24, 2, |inner| {
            prop_oneof![
                (inner.clone(), inner.clone()).prop_map(|(a, b)| ex::add(a, b)),
                (inner.clone(), inner.clone()).prop_map(|(a, b)| ex::sub(a, b)),
                (inner.clone(), inner.clone()).prop_map(|(a, b)| ex::mul(a, b)),
                inner.prop_map(|a| ex::un(UnaryOp::Neg, a)),
            ]
        })
    }

    fn eval(e: &ScalarExpr, key: f64, scalars: [f64; 2]) -> f64 {
        e.eval(&mut |leaf| match leaf {
            ScalarExpr::Lit(x) => Ok::<f64, ()>(*x),
            ScalarExpr::Scalar(id) => Ok(scalars[id.index()]),
            ScalarExpr::Index(SeqRank::Key) => Ok(key),
            _ => Err(()),
        })
        .expect("only keys, scalars and literals")
    }

    proptest! {
        /// Where `affine_in_key` splits an expression, `a * key + b` is the expression at
        /// every key (up to rounding); it splits every expression that is a sum of uniform
        /// multiples of the key and uniform values.
        #[test]
        fn affine_in_key_splits_exactly(
            e in expr(),
            s0 in -3.0f64..3.0,
            s1 in -3.0f64..3.0,
            keys in proptest::collection::vec(0u32..5000, 3),
        ) {
            let scalars = [s0, s1];
            let zero = || ex::lit(0.0);
            match affine_in_key(&e) {
                Some((a, b)) => {
                    let (a, b) = (a.unwrap_or_else(zero), b.unwrap_or_else(zero));
                    prop_assert!(a.is_uniform() && b.is_uniform(), "{e:?}");
                    for k in keys {
                        let k = f64::from(k);
                        let want = eval(&e, k, scalars);
                        let got = eval(&a, k, scalars) * k + eval(&b, k, scalars);
                        prop_assert!((want - got).abs() <= 1e-9 * (1.0 + want.abs()), "{e:?} at {k}: {want} vs {got}");
                    }
                }
                None => {
                    // Refused only where the key meets another key in a product.
                    let mut product_of_keys = false;
                    e.visit(&mut |x| {
                        if let ScalarExpr::Binary(BinaryOp::Mul, l, r) = x {
                            product_of_keys |= !l.is_uniform() && !r.is_uniform();
                        }
                    });
                    prop_assert!(product_of_keys, "{e:?} is affine in the key but was refused");
                }
            }
        }
    }
}
