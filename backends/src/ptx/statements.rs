//! Statements of the Tile IR as PTX, one at a time (each kind of statement delegates to
//! the file of its job).

use super::*;

/// Independent running chains of a row reduction over mapped values: enough to hide the
/// add's latency, few enough to keep registers for the accumulator tile.
const REDUCE_CHAINS: usize = 4;

/// The f32 instruction of a reduction.
fn reduce_instruction(op: ReduceOp) -> &'static str {
    match op {
        ReduceOp::Max => "max.f32",
        ReduceOp::Sum => "add.f32",
    }
}

impl Printer<'_> {
    pub(super) fn emit_block(
        &mut self,
        body: &[Stmt],
        lp: Option<&LoopState>,
    ) -> Result<(), TileError> {
        for (i, st) in body.iter().enumerate() {
            self.wait_for_conflicting_wgmma(st);
            if self.fold_zero_fill(st, body.get(i + 1)) {
                continue;
            }
            self.emit_stmt(st, lp)?;
        }
        Ok(())
    }

    /// `Mask` column by column with `value_masks` beside the bands, so a key's tokens are
    /// read once for all its rows (a row's are read once per kernel).
    fn emit_masked_columns(
        &mut self,
        dst: RegId,
        fill: f64,
        lp: &LoopState,
        value_masks: &[ValueMask],
    ) -> Result<(), TileError> {
        let cols = self.prog.regs[dst.index()].cols;
        let rows: Vec<(u32, u32)> = (0..self.mtiles).flat_map(|mt| [(mt, 0), (mt, 1)]).collect();
        let limits: Vec<_> = rows
            .iter()
            .map(|&(mt, half)| self.mask_limits(lp, mt, half))
            .collect();
        for nt in 0..cols / 8 {
            for lo in 0..2 {
                self.column_values = Some(HashMap::new());
                for (&(mt, half), limits) in rows.iter().zip(&limits) {
                    let pr = self.mask_hides(limits, nt, lo);
                    let ctx = ElemCtx {
                        mt,
                        half,
                        col: Some((nt, lo)),
                    };
                    for vm in value_masks {
                        let a = self.emit_expr(&ScalarExpr::Token(vm.lhs.0, vm.lhs.1), &ctx)?;
                        let b = self.emit_expr(&ScalarExpr::Token(vm.rhs.0, vm.rhs.1), &ctx)?;
                        self.ins(format!(
                            "setp.{}.or.f32 {pr}, {a}, {b}, {pr};",
                            fails(vm.op)
                        ));
                    }
                    let r = self.acc_reg(dst, mt, nt, half * 2 + lo);
                    self.ins(format!("selp.f32 {r}, {}, {r}, {pr};", f32_lit(fill)));
                }
                self.column_values = None;
            }
        }
        Ok(())
    }

    /// Per-row limits of the key loop's band masks for row `mt * 16 + half * 8` of this
    /// thread: keys past a limit are hidden (`gt`: key > p + bound; `lt`: key < p - bound).
    fn mask_limits(&mut self, lp: &LoopState, mt: u32, half: u32) -> Vec<(&'static str, String)> {
        let pi = self.r();
        self.ins(format!("add.s32 {pi}, %prowpos0, {};", mt * 16 + half * 8));
        let mut limits = Vec::new();
        for m in &lp.masks {
            let l = self.r();
            match m.direction {
                BandDirection::KeyMinusQuery => {
                    self.ins(format!("add.s32 {l}, {pi}, {};", m.bound));
                    limits.push(("gt", l));
                }
                BandDirection::QueryMinusKey => {
                    self.ins(format!("sub.s32 {l}, {pi}, {};", m.bound));
                    limits.push(("lt", l));
                }
            }
        }
        limits
    }

    /// A predicate: this thread's element (`nt`, `lo`) of a row is past `N_k` or outside a
    /// band mask.
    fn mask_hides(&mut self, limits: &[(&'static str, String)], nt: u32, lo: u32) -> String {
        let key = self.r();
        self.ins(format!("add.s32 {key}, %kcol, {};", nt * 8 + lo));
        let pr = self.pred();
        self.ins(format!("setp.ge.s32 {pr}, {key}, %nk;"));
        for (cmp, l) in limits {
            self.ins(format!("setp.{cmp}.or.s32 {pr}, {key}, {l}, {pr};"));
        }
        pr
    }

    /// One row's reduction over this thread's values, then across the row's four threads.
    fn reduce_row(&mut self, mut vals: Vec<String>, op: ReduceOp) -> String {
        let opn = reduce_instruction(op);
        // Pairwise tree: shorter dependency chains than a linear fold.
        while vals.len() > 1 {
            let mut next = Vec::new();
            for pair in vals.chunks(2) {
                if pair.len() == 2 {
                    let t = self.f();
                    self.ins(format!("{opn} {t}, {}, {};", pair[0], pair[1]));
                    next.push(t);
                } else {
                    next.push(pair[0].clone());
                }
            }
            vals = next;
        }
        let mut v = vals.pop().unwrap_or_else(|| f32_lit(0.0));
        for x in [1, 2] {
            let s = self.f();
            self.ins(format!("shfl.sync.bfly.b32 {s}, {v}, {x}, 31, -1;"));
            let t = self.f();
            self.ins(format!("{opn} {t}, {v}, {s};"));
            v = t;
        }
        v
    }

    /// [`Stmt::RowReduceMap`] with the masks applied (`hide`) or not.
    fn emit_row_reduce_map(
        &mut self,
        dst: RowId,
        op: ReduceOp,
        expr: &ScalarExpr,
        cols: u32,
        hide: Option<(f64, &LoopState)>,
    ) -> Result<(), TileError> {
        for mt in 0..self.mtiles {
            for half in 0..2 {
                let limits = match hide {
                    Some((_, lp)) => self.mask_limits(lp, mt, half),
                    None => Vec::new(),
                };
                // Each value joins one of a few running chains as soon as it exists, so
                // only the chains and the values in flight hold registers: a tree over
                // every value first would keep the whole mapped row live.
                let mut chains: Vec<String> = Vec::new();
                let mut k = 0;
                for nt in 0..cols / 8 {
                    for lo in 0..2 {
                        let ctx = ElemCtx {
                            mt,
                            half,
                            col: Some((nt, lo)),
                        };
                        let v = self.emit_expr(expr, &ctx)?;
                        let v = match hide {
                            Some((fill, _)) => {
                                let pr = self.mask_hides(&limits, nt, lo);
                                let h = self.f();
                                self.ins(format!("selp.f32 {h}, {}, {v}, {pr};", f32_lit(fill)));
                                h
                            }
                            None => v,
                        };
                        if chains.len() < REDUCE_CHAINS {
                            let c = self.f();
                            self.ins(format!("mov.f32 {c}, {v};"));
                            chains.push(c);
                        } else {
                            let c = &chains[k % REDUCE_CHAINS];
                            self.ins(format!("{} {c}, {c}, {v};", reduce_instruction(op)));
                        }
                        k += 1;
                    }
                }
                let vals = chains;
                let v = self.reduce_row(vals, op);
                let r = self.row_reg(dst, mt, half);
                self.ins(format!("mov.f32 {r}, {v};"));
            }
        }
        Ok(())
    }

    pub(super) fn emit_stmt(&mut self, st: &Stmt, lp: Option<&LoopState>) -> Result<(), TileError> {
        let prog = self.prog;
        match st {
            Stmt::LoadTile { dst, src } => {
                if self.in_loop {
                    // Streamed tiles are issued by the key loop's ring.
                    return Ok(());
                }
                if self.barriers.is_some() {
                    return self.emit_top_load_wait(*dst);
                }
                self.comment(format!(
                    "load {} <- {}",
                    prog.shared[dst.index()].name,
                    prog.tensors[src.index()].name
                ));
                let base = self.smem_base[dst.index()].clone();
                self.emit_load_issue(*dst, *src, "%qrow0", &base, None)?;
                self.ins("cp.async.commit_group;");
                // Simple and safe: the tile is complete and visible before anything follows.
                self.ins("cp.async.wait_group 0;");
                self.emit_async_proxy_fence();
                self.ins("bar.sync 0;");
            }
            Stmt::Fill { dst, value } => {
                for r in self.acc_regs(*dst) {
                    self.ins(format!("mov.f32 {r}, {};", f32_lit(*value)));
                }
            }
            Stmt::FillRow { dst, value } => {
                for mt in 0..self.mtiles {
                    for half in 0..2 {
                        let r = self.row_reg(*dst, mt, half);
                        self.ins(format!("mov.f32 {r}, {};", f32_lit(*value)));
                    }
                }
            }
            Stmt::Fragments { dst, src } => {
                self.comment(format!("fragments {}", prog.regs[dst.index()].name));
                let t = &prog.shared[src.index()];
                let block_bytes = t.rows * ROW_BYTES;
                let wbase = self.r();
                let sb = self.smem_base[src.index()].clone();
                self.ins(format!(
                    "mad.lo.u32 {wbase}, %warp, {}, {sb};",
                    prog.rows_per_warp() * ROW_BYTES
                ));
                for mt in 0..self.mtiles {
                    for ks in 0..t.cols / 16 {
                        let (a, imm) = self.ldm_addr(&wbase, "A", block_bytes, mt * 16, 2 * ks);
                        let regs: Vec<String> =
                            (0..4).map(|i| self.afrag_reg(*dst, mt, ks, i)).collect();
                        self.ins(format!(
                            "ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{{}}}, [{a}+{imm}];",
                            regs.join(", ")
                        ));
                    }
                }
            }
            Stmt::Contract {
                acc,
                a,
                b,
                b_layout,
            } => self.emit_contract(*acc, *a, *b, *b_layout)?,
            Stmt::Map { dst, expr } => {
                let cols = prog.regs[dst.index()].cols;
                // `dst = dst * row` (the online-softmax rescale) is skipped when every row
                // factor of the warp is exactly 1, which is most key tiles once the running
                // max settles; the product is unchanged either way.
                let skip = match expr {
                    _ if !prog.schedule.skip_unit_rescale => None,
                    ScalarExpr::Binary(BinaryOp::Mul, a, b) => match (a.as_ref(), b.as_ref()) {
                        (ScalarExpr::Elem(e), ScalarExpr::Row(r)) if e == dst => Some(*r),
                        _ => None,
                    },
                    _ => None,
                };
                let skip_label = match skip {
                    Some(r) => {
                        let all_one = self.pred();
                        let first = self.row_reg(r, 0, 0);
                        self.ins(format!("setp.eq.f32 {all_one}, {first}, 0f3F800000;"));
                        for mt in 0..self.mtiles {
                            for half in 0..2 {
                                if mt + half == 0 {
                                    continue;
                                }
                                let rr = self.row_reg(r, mt, half);
                                self.ins(format!(
                                    "setp.eq.and.f32 {all_one}, {rr}, 0f3F800000, {all_one};"
                                ));
                            }
                        }
                        self.ins(format!("vote.sync.all.pred {all_one}, {all_one}, -1;"));
                        let l = self.label("norescale");
                        self.ins(format!("@{all_one} bra.uni {l};"));
                        Some(l)
                    }
                    None => None,
                };
                // Straight-line code: a column's key-only terms (an ALiBi bias) are reused
                // by its rows, which then come one after the other (element order 0, 2, 1,
                // 3: one column value live at a time).
                // Query-tiled programs only: the linear-attention (sequential) kernels
                // were measured with their maps in element order, and reordering their
                // gate reads has not been.
                let mut per_column = false;
                expr.visit(&mut |x| {
                    per_column |=
                        !matches!(x, ScalarExpr::Index(_)) && expr::varies_by_column_only(x)
                });
                per_column &= !prog.sequential;
                let order = if per_column {
                    [0, 2, 1, 3]
                } else {
                    [0, 1, 2, 3]
                };
                self.key_tile_bases = per_column.then(HashMap::new);
                for mt in 0..self.mtiles {
                    for nt in 0..cols / 8 {
                        self.column_values = per_column.then(HashMap::new);
                        for e in order {
                            let ctx = ElemCtx {
                                mt,
                                half: e / 2,
                                col: Some((nt, e % 2)),
                            };
                            let v = self.emit_expr(expr, &ctx)?;
                            let r = self.acc_reg(*dst, mt, nt, e);
                            self.ins(format!("mov.f32 {r}, {v};"));
                        }
                        self.column_values = None;
                    }
                }
                self.key_tile_bases = None;
                if let Some(l) = skip_label {
                    self.body.push_str(&format!("{l}:\n"));
                }
            }
            Stmt::Mask { dst, fill } => {
                let lp =
                    lp.ok_or_else(|| TileError::Invalid("Mask outside the key loop".into()))?;
                let skip = self.label("nomask");
                self.ins(format!("@!%needmask bra.uni {skip};"));
                let cols = prog.regs[dst.index()].cols;
                if prog.value_masks.is_empty() {
                    for mt in 0..self.mtiles {
                        for half in 0..2 {
                            let limits = self.mask_limits(lp, mt, half);
                            for nt in 0..cols / 8 {
                                for lo in 0..2 {
                                    let pr = self.mask_hides(&limits, nt, lo);
                                    let r = self.acc_reg(*dst, mt, nt, half * 2 + lo);
                                    self.ins(format!(
                                        "selp.f32 {r}, {}, {r}, {pr};",
                                        f32_lit(*fill)
                                    ));
                                }
                            }
                        }
                    }
                } else {
                    // Tiles inside a key range that holds the rows' one value need the
                    // bands alone.
                    let band_only = self.label("bandmask");
                    self.ins(format!("@!%needvmask bra.uni {band_only};"));
                    self.emit_masked_columns(*dst, *fill, lp, &prog.value_masks)?;
                    self.ins(format!("bra.uni {skip};"));
                    self.body.push_str(&format!("{band_only}:\n"));
                    self.emit_masked_columns(*dst, *fill, lp, &[])?;
                }
                self.body.push_str(&format!("{skip}:\n"));
            }
            Stmt::RowReduce { dst, src, op } => {
                let cols = prog.regs[src.index()].cols;
                for mt in 0..self.mtiles {
                    for half in 0..2 {
                        let mut vals: Vec<String> = Vec::new();
                        for nt in 0..cols / 8 {
                            for lo in 0..2 {
                                vals.push(self.acc_reg(*src, mt, nt, half * 2 + lo));
                            }
                        }
                        let v = self.reduce_row(vals, *op);
                        let r = self.row_reg(*dst, mt, half);
                        self.ins(format!("mov.f32 {r}, {v};"));
                    }
                }
            }
            Stmt::RowReduceMap {
                dst,
                op,
                expr,
                shape,
                mask_fill,
            } => {
                let cols = prog.regs[shape.index()].cols;
                if mask_fill.is_some() && !prog.value_masks.is_empty() {
                    return Err(TileError::Unsupported(
                        "a masked row reduction with value masks (apply them with `Mask`)".into(),
                    ));
                }
                match (mask_fill, lp) {
                    (Some(fill), Some(lp)) => {
                        // Two copies, masked and not, so that no element outlives its
                        // branch: only the row's result crosses the join.
                        let masked = self.label("masked");
                        let join = self.label("reduced");
                        self.ins(format!("@%needmask bra.uni {masked};"));
                        self.emit_row_reduce_map(*dst, *op, expr, cols, None)?;
                        self.ins(format!("bra.uni {join};"));
                        self.body.push_str(&format!("{masked}:\n"));
                        self.emit_row_reduce_map(*dst, *op, expr, cols, Some((*fill, lp)))?;
                        self.body.push_str(&format!("{join}:\n"));
                    }
                    (Some(_), None) => {
                        return Err(TileError::Invalid(
                            "RowReduceMap masked outside the key loop".into(),
                        ))
                    }
                    (None, _) => self.emit_row_reduce_map(*dst, *op, expr, cols, None)?,
                }
            }
            Stmt::RowDot { dst, a, b } => {
                let ty = match prog.regs[a.index()].kind {
                    RegKind::AOperand(e) => Self::mma_type(e)?,
                    RegKind::Accumulator => return unsupported("RowDot of f32 tiles"),
                };
                let cols = prog.regs[a.index()].cols;
                for mt in 0..self.mtiles {
                    for half in 0..2 {
                        // Fragment registers `half` and `half + 2` of each k-step hold this
                        // thread's two column pairs of row `g + 8 half`.
                        let mut sum = f32_lit(0.0);
                        for ks in 0..cols / 16 {
                            for i in [half, half + 2] {
                                let (x, y) =
                                    (self.afrag_reg(*a, mt, ks, i), self.afrag_reg(*b, mt, ks, i));
                                let xs = [
                                    self.named_once(".b16", "rdx0"),
                                    self.named_once(".b16", "rdx1"),
                                ];
                                let ys = [
                                    self.named_once(".b16", "rdy0"),
                                    self.named_once(".b16", "rdy1"),
                                ];
                                self.ins(format!("mov.b32 {{{}, {}}}, {x};", xs[0], xs[1]));
                                self.ins(format!("mov.b32 {{{}, {}}}, {y};", ys[0], ys[1]));
                                for j in 0..2 {
                                    let (fx, fy) = (self.f(), self.f());
                                    self.ins(format!("cvt.f32.{ty} {fx}, {};", xs[j]));
                                    self.ins(format!("cvt.f32.{ty} {fy}, {};", ys[j]));
                                    let t = self.f();
                                    self.ins(format!("fma.rn.f32 {t}, {fx}, {fy}, {sum};"));
                                    sum = t;
                                }
                            }
                        }
                        for x in [1, 2] {
                            let s = self.f();
                            self.ins(format!("shfl.sync.bfly.b32 {s}, {sum}, {x}, 31, -1;"));
                            let t = self.f();
                            self.ins(format!("add.f32 {t}, {sum}, {s};"));
                            sum = t;
                        }
                        let r = self.row_reg(*dst, mt, half);
                        self.ins(format!("mov.f32 {r}, {sum};"));
                    }
                }
            }
            Stmt::RowMap { dst, expr } => {
                for mt in 0..self.mtiles {
                    for half in 0..2 {
                        let ctx = ElemCtx {
                            mt,
                            half,
                            col: None,
                        };
                        let v = self.emit_expr(expr, &ctx)?;
                        let r = self.row_reg(*dst, mt, half);
                        self.ins(format!("mov.f32 {r}, {v};"));
                    }
                }
            }
            Stmt::Convert { dst, src } => {
                let elem = match prog.regs[dst.index()].kind {
                    RegKind::AOperand(e) => e,
                    RegKind::Accumulator => return unsupported("Convert into f32"),
                };
                let ty = Self::mma_type(elem)?;
                let cols = prog.regs[src.index()].cols;
                for mt in 0..self.mtiles {
                    for ks in 0..cols / 16 {
                        for i in 0..4 {
                            let d = self.afrag_reg(*dst, mt, ks, i);
                            self.emit_pack_a(*src, mt, ks, i, &d, ty);
                        }
                    }
                }
            }
            Stmt::KeyLoop {
                block_n,
                masks,
                body,
            } => self.emit_key_loop(*block_n, masks, body)?,
            Stmt::ContractStream {
                acc,
                a_tile,
                b_tile,
                ..
            } => self.emit_contract_stream(*acc, *a_tile, *b_tile)?,
            Stmt::Store { src, dst } if prog.schedule.store_tma => {
                self.emit_tma_store(*src, *dst)?
            }
            Stmt::Store { src, dst } => {
                let t = &prog.tensors[dst.index()];
                // An f32 tensor (a partial's numerator) takes the accumulator as it is.
                let ty = match t.elem {
                    Elem::F32 => None,
                    e => Some(Self::mma_type(e)?),
                };
                let cols = prog.regs[src.index()].cols;
                self.comment(format!("store {}", t.name));
                let sequential = prog.sequential;
                let col_block = cols < t.head_dim;
                // A split program's CTA writes its own copy of the f32 partial.
                let base = if prog.key_splits > 1 {
                    self.copy_base(*dst, "%ctaid.z")
                } else {
                    format!("%base{}", dst.0)
                };
                for mt in 0..self.mtiles {
                    for half in 0..2 {
                        let pi = self.r();
                        self.ins(format!("add.s32 {pi}, %prow0, {};", mt * 16 + half * 8));
                        if sequential {
                            self.ins(format!("add.s32 {pi}, {pi}, %korg;"));
                        }
                        let ok = self.pred();
                        self.ins(format!("setp.lt.s32 {ok}, {pi}, %nq;"));
                        let addr = self.rd();
                        self.ins(format!("cvt.u64.u32 {addr}, {pi};"));
                        self.ins(format!("mul.lo.u64 {addr}, {addr}, %rsb{};", dst.0));
                        self.ins(format!("add.u64 {addr}, {addr}, {base};"));
                        if col_block {
                            let cb = self.rd();
                            self.ins(format!(
                                "mul.wide.u32 {cb}, %colb, {};",
                                cols * t.elem.bytes()
                            ));
                            self.ins(format!("add.u64 {addr}, {addr}, {cb};"));
                        }
                        let cb = self.rd();
                        self.ins(format!("mul.wide.u32 {cb}, %tig, {};", 2 * t.elem.bytes()));
                        self.ins(format!("add.u64 {addr}, {addr}, {cb};"));
                        for nt in 0..cols / 8 {
                            let lo = self.acc_reg(*src, mt, nt, half * 2);
                            let hi = self.acc_reg(*src, mt, nt, half * 2 + 1);
                            let at = nt * 8 * t.elem.bytes();
                            match ty {
                                Some(ty) => {
                                    let pk = self.r();
                                    self.ins(format!("cvt.rn.{ty}x2.f32 {pk}, {hi}, {lo};"));
                                    self.ins(format!("@{ok} st.global.b32 [{addr}+{at}], {pk};"));
                                }
                                None => self.ins(format!(
                                    "@{ok} st.global.v2.f32 [{addr}+{at}], {{{lo}, {hi}}};"
                                )),
                            }
                        }
                    }
                }
            }
            Stmt::AccumulatePartial {
                acc,
                src,
                split,
                weight,
            } => {
                let t = &prog.tensors[src.index()];
                let cols = prog.regs[acc.index()].cols;
                self.comment(format!("accumulate {}[{split}]", t.name));
                let base = self.copy_base(*src, &split.to_string());
                for mt in 0..self.mtiles {
                    for half in 0..2 {
                        let pi = self.r();
                        self.ins(format!("add.s32 {pi}, %prow0, {};", mt * 16 + half * 8));
                        let ok = self.pred();
                        self.ins(format!("setp.lt.s32 {ok}, {pi}, %nq;"));
                        let addr = self.rd();
                        self.ins(format!("cvt.u64.u32 {addr}, {pi};"));
                        self.ins(format!("mul.lo.u64 {addr}, {addr}, %rsb{};", src.0));
                        self.ins(format!("add.u64 {addr}, {addr}, {base};"));
                        let cb = self.rd();
                        self.ins(format!("mul.wide.u32 {cb}, %tig, 8;"));
                        self.ins(format!("add.u64 {addr}, {addr}, {cb};"));
                        let w = self.row_reg(*weight, mt, half);
                        for nt in 0..cols / 8 {
                            // Two registers at a time: the copy is added as it arrives.
                            let (x0, x1) = (self.f(), self.f());
                            self.ins(format!("mov.f32 {x0}, 0f00000000;"));
                            self.ins(format!("mov.f32 {x1}, 0f00000000;"));
                            self.ins(format!(
                                "@{ok} ld.global.v2.f32 {{{x0}, {x1}}}, [{addr}+{}];",
                                nt * 32
                            ));
                            for (e, x) in [(0, &x0), (1, &x1)] {
                                let a = self.acc_reg(*acc, mt, nt, half * 2 + e);
                                self.ins(format!("fma.rn.f32 {a}, {x}, {w}, {a};"));
                            }
                        }
                    }
                }
            }
            Stmt::ContractT { acc, a, scale, b } => self.emit_contract_t(*acc, *a, scale, *b)?,
            Stmt::StoreShared { src, dst } => self.emit_store_shared(*src, *dst)?,
            Stmt::LookBack {
                state,
                prefix,
                aggregates,
                inclusive,
                decay,
            } => self.emit_look_back(*state, *prefix, *aggregates, *inclusive, decay)?,
            Stmt::StoreState { src, dst } => self.emit_store_state(*src, *dst)?,
            Stmt::LoadStatePrefix { dst, src, decay } => {
                self.emit_load_state_prefix(*dst, *src, decay)?
            }
            Stmt::StoreRow { src, dst } => {
                // A split key loop's CTA stores at [split, B, H, N_q]: grid y is B * H.
                let split = (self.prog.key_splits > 1).then_some("%ctaid.z");
                for mt in 0..self.mtiles {
                    for half in 0..2 {
                        // One thread of the row's quad stores it.
                        let (ok, addr) =
                            self.row_address(mt, half, split, true, &format!("%ro{}", dst.0));
                        let r = self.row_reg(*src, mt, half);
                        self.ins(format!("@{ok} st.global.f32 [{addr}], {r};"));
                    }
                }
            }
            Stmt::LoadRow { dst, src, split } => {
                let s = self.r();
                self.ins(format!("mov.u32 {s}, {split};"));
                for mt in 0..self.mtiles {
                    for half in 0..2 {
                        let (ok, addr) =
                            self.row_address(mt, half, Some(&s), false, &format!("%ri{}", src.0));
                        let r = self.row_reg(*dst, mt, half);
                        self.ins(format!("mov.f32 {r}, 0f00000000;"));
                        self.ins(format!("@{ok} ld.global.f32 {r}, [{addr}];"));
                    }
                }
            }
        }
        Ok(())
    }

    /// Row `mt * 16 + half * 8` of this thread's rows in a `[.., B, H, N_q]` f32 row array
    /// at `base` (split `split`'s slice when given): whether the row is `< N_q` (and, with
    /// `quad_leader`, this thread is the first of the row's quad), and its address.
    /// The base of copy `copy` (a register or literal) of a split partial: the tensor's
    /// (batch, head) base moved by `copy * B` batches (B = grid y / heads).
    fn copy_base(&mut self, t: TensorId, copy: &str) -> String {
        let batches = self.r();
        self.ins(format!("mov.u32 {batches}, %nctaid.y;"));
        self.ins(format!("div.u32 {batches}, {batches}, %heads;"));
        let c = self.r();
        self.ins(format!("mov.u32 {c}, {copy};"));
        self.ins(format!("mul.lo.u32 {batches}, {batches}, {c};"));
        let off = self.rd();
        self.ins(format!("cvt.u64.u32 {off}, {batches};"));
        self.ins(format!("mul.lo.u64 {off}, {off}, %sb{};", t.0));
        self.ins(format!(
            "shl.b64 {off}, {off}, {};",
            self.prog.tensors[t.index()].elem.bytes().trailing_zeros()
        ));
        let base = self.rd();
        self.ins(format!("add.u64 {base}, %base{}, {off};", t.0));
        base
    }

    fn row_address(
        &mut self,
        mt: u32,
        half: u32,
        split: Option<&str>,
        quad_leader: bool,
        base: &str,
    ) -> (String, String) {
        let pi = self.r();
        self.ins(format!("add.s32 {pi}, %prow0, {};", mt * 16 + half * 8));
        let ok = self.pred();
        self.ins(format!("setp.lt.s32 {ok}, {pi}, %nq;"));
        if quad_leader {
            self.ins(format!("setp.eq.and.u32 {ok}, %tig, 0, {ok};"));
        }
        let idx = self.r();
        self.ins(format!("mad.lo.u32 {idx}, %bidx, %heads, %hidx;"));
        if let Some(split) = split {
            let (s, bh) = (self.r(), self.r());
            self.ins(format!("mov.u32 {s}, {split};"));
            self.ins(format!("mov.u32 {bh}, %nctaid.y;"));
            self.ins(format!("mad.lo.u32 {idx}, {s}, {bh}, {idx};"));
        }
        self.ins(format!("mad.lo.u32 {idx}, {idx}, %nq, {pi};"));
        let addr = self.rd();
        self.ins(format!("mul.wide.u32 {addr}, {idx}, 4;"));
        self.ins(format!("add.u64 {addr}, {addr}, {base};"));
        (ok, addr)
    }
}

/// The comparison that holds where `op` fails, NaN included (a value mask keeps `a op b`;
/// an unordered comparison hides the element).
fn fails(op: CmpOp) -> &'static str {
    match op {
        CmpOp::Lt => "geu",
        CmpOp::Le => "gtu",
        CmpOp::Gt => "leu",
        CmpOp::Ge => "ltu",
        CmpOp::Eq => "neu",
        // `a != b` holds for NaN: it fails only where they are equal.
        CmpOp::Ne => "eq",
    }
}
