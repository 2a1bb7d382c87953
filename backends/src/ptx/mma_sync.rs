//! Per-warp contractions (`mma.sync.m16n8k16`): `ldmatrix` fragments of shared tiles and
//! the MMAs over them, including the scaled transposed contraction of linear attention.

use super::*;

impl Printer<'_> {
    /// Offset register (base + lane row * 128 + swizzle) for an ldmatrix of pattern `pat`
    /// on a tile whose 64-column blocks are `block_bytes` apart, for the chunk pair starting
    /// at chunk `e` of row `block_row`; returns `(register, immediate)`.
    pub(super) fn ldm_addr(
        &mut self,
        base: &str,
        pat: &str,
        block_bytes: u32,
        block_row: u32,
        e: u32,
    ) -> (String, u32) {
        let a = self.r();
        self.ins(format!(
            "mad.lo.u32 {a}, %lm{pat}_row, {ROW_BYTES}, {base};"
        ));
        self.ins(format!("add.u32 {a}, {a}, %lm{pat}_sw{};", (e & 7) / 2));
        (a, block_row * ROW_BYTES + (e / 8) * block_bytes)
    }
    // ---- statements --------------------------------------------------------------------

    pub(super) fn emit_contract(
        &mut self,
        acc: RegId,
        a: AOperand,
        b: SharedId,
        layout: BLayout,
    ) -> Result<(), TileError> {
        let prog = self.prog;
        if prog.schedule.mma == MmaUnit::Warpgroup {
            return self.emit_contract_wgmma(acc, a, b, layout);
        }
        let acc_t = &prog.regs[acc.index()];
        let bt = &prog.shared[b.index()];
        let ty = Self::mma_type(bt.elem)?;
        let n_cols = acc_t.cols;
        let k_len = match layout {
            BLayout::RowsAreN => bt.cols,
            BLayout::RowsAreK => bt.rows,
        };
        let b_block = bt.rows * ROW_BYTES;
        let bbase = self.smem_base[b.index()].clone();
        self.comment(format!("contract {} += . {}", acc_t.name, bt.name));
        // A from shared: warp's base.
        let a_wbase = match a {
            AOperand::Shared(id) => {
                let t = &prog.shared[id.index()];
                let wbase = self.r();
                let sb = self.smem_base[id.index()].clone();
                self.ins(format!(
                    "mad.lo.u32 {wbase}, %warp, {}, {sb};",
                    prog.rows_per_warp() * ROW_BYTES
                ));
                Some((wbase, t.rows * ROW_BYTES))
            }
            AOperand::Reg(_) => None,
        };
        for ks in 0..k_len / 16 {
            // A fragments of each m-tile for this k-step.
            let mut afr: Vec<Vec<String>> = Vec::new();
            for mt in 0..self.mtiles {
                match a {
                    AOperand::Reg(id) => {
                        afr.push((0..4).map(|i| self.afrag_reg(id, mt, ks, i)).collect())
                    }
                    AOperand::Shared(_) => {
                        let (wbase, rb) = a_wbase
                            .clone()
                            .ok_or_else(|| TileError::Invalid("no A base".into()))?;
                        let (addr, imm) = self.ldm_addr(&wbase, "A", rb, mt * 16, 2 * ks);
                        let regs: Vec<String> = (0..4).map(|_| self.r()).collect();
                        self.ins(format!(
                            "ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{{}}}, [{addr}+{imm}];",
                            regs.join(", ")
                        ));
                        afr.push(regs);
                    }
                }
            }
            self.emit_b_fragments_and_mma(acc, &afr, &bbase, b_block, layout, ks, n_cols, ty);
        }
        Ok(())
    }

    /// One k-step of a contraction: for every 16 output columns, the B fragments of
    /// k-step `ks` (`ldmatrix`, transposed for `RowsAreK`), then an MMA per m-tile of `afr`
    /// and per 8-column half.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn emit_b_fragments_and_mma(
        &mut self,
        acc: RegId,
        afr: &[Vec<String>],
        bbase: &str,
        b_block: u32,
        layout: BLayout,
        ks: u32,
        n_cols: u32,
        ty: &str,
    ) {
        for nj in 0..n_cols / 16 {
            let bregs: Vec<String> = (0..4).map(|_| self.r()).collect();
            match layout {
                BLayout::RowsAreN => {
                    // Rows n0..n0+15 of the tile, chunk pair 2ks: r0,r1 = b of n-tile 2nj, r2,r3 of 2nj+1.
                    let (addr, imm) = self.ldm_addr(bbase, "N", b_block, nj * 16, 2 * ks);
                    self.ins(format!(
                        "ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{{}}}, [{addr}+{imm}];",
                        bregs.join(", ")
                    ));
                }
                BLayout::RowsAreK => {
                    // Rows k0..k0+15, chunk pair 2nj, transposed: r0,r1 = b of n-tile 2nj, r2,r3 of 2nj+1.
                    let (addr, imm) = self.ldm_addr(bbase, "A", b_block, ks * 16, 2 * nj);
                    self.ins(format!(
                        "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {{{}}}, [{addr}+{imm}];",
                        bregs.join(", ")
                    ));
                }
            }
            for (mt, af) in afr.iter().enumerate() {
                for half in 0..2u32 {
                    let nt = 2 * nj + half;
                    let c: Vec<String> = (0..4)
                        .map(|e| self.acc_reg(acc, mt as u32, nt, e))
                        .collect();
                    let b0 = &bregs[(2 * half) as usize];
                    let b1 = &bregs[(2 * half + 1) as usize];
                    self.ins(format!(
                        "mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32 {{{c}}}, {{{a}}}, {{{b0}, {b1}}}, {{{c}}};",
                        c = c.join(", "),
                        a = af.join(", ")
                    ));
                }
            }
        }
    }

    /// `acc += (scale * a)^T . b`: A fragments from `a` (stored `[k][m]`) by
    /// `ldmatrix.trans` with the B-operand lane pattern, each k scaled in f32 and rounded
    /// back to 16 bits, then the same MMAs as a `RowsAreK` contraction.
    pub(super) fn emit_contract_t(
        &mut self,
        acc: RegId,
        a: SharedId,
        scale: &ScalarExpr,
        b: SharedId,
    ) -> Result<(), TileError> {
        let prog = self.prog;
        let acc_t = &prog.regs[acc.index()];
        let at = &prog.shared[a.index()];
        let bt = &prog.shared[b.index()];
        let ty = Self::mma_type(at.elem)?;
        let a_block = at.rows * ROW_BYTES;
        let b_block = bt.rows * ROW_BYTES;
        let abase = self.smem_base[a.index()].clone();
        let bbase = self.smem_base[b.index()].clone();
        self.comment(format!(
            "contract {} += ({} scaled)^T . {}",
            acc_t.name, at.name, bt.name
        ));
        // Per m-tile: lane row and swizzled chunk of its 8x8 matrix (columns of `a` are the
        // accumulator rows, which depend on the warp).
        let bit = self.r();
        self.ins(format!("bfe.u32 {bit}, %lane, 3, 1;"));
        let l7 = self.r();
        self.ins(format!("and.b32 {l7}, %lane, 7;"));
        let mut offs = Vec::new();
        for mt in 0..self.mtiles {
            let chunk = self.r();
            self.ins(format!(
                "mad.lo.u32 {chunk}, %warp, {}, {};",
                prog.rows_per_warp() / 8,
                mt * 2
            ));
            self.ins(format!("or.b32 {chunk}, {chunk}, {bit};"));
            // Column block chunk / 8, swizzled chunk (chunk % 8) ^ row.
            let blk = self.r();
            self.ins(format!("shr.u32 {blk}, {chunk}, 3;"));
            self.ins(format!("and.b32 {chunk}, {chunk}, 7;"));
            self.ins(format!("xor.b32 {chunk}, {chunk}, {l7};"));
            let off = self.r();
            self.ins(format!("mad.lo.u32 {off}, %lmN_row, {ROW_BYTES}, {abase};"));
            self.ins(format!("mad.lo.u32 {off}, {blk}, {a_block}, {off};"));
            self.ins(format!("mad.lo.u32 {off}, {chunk}, 16, {off};"));
            offs.push(off);
        }
        let conv = match at.elem {
            Elem::Bf16 => "bf16",
            _ => "f16",
        };
        let wgmma = prog.schedule.mma == MmaUnit::Warpgroup;
        let mut wg_a: Vec<String> = Vec::new();
        for ks in 0..at.rows / 16 {
            // Scale factors of this thread's four k values: nt 2ks and 2ks+1, lo 0 and 1.
            let mut fac = Vec::new();
            for nt in [2 * ks, 2 * ks + 1] {
                for lo in 0..2 {
                    let ctx = ElemCtx {
                        mt: 0,
                        half: 0,
                        col: Some((nt, lo)),
                    };
                    fac.push(self.emit_expr(scale, &ctx)?);
                }
            }
            let unit = matches!(scale, ScalarExpr::Lit(x) if *x == 1.0);
            let mut afr: Vec<Vec<String>> = Vec::new();
            for off in offs.clone() {
                let regs: Vec<String> = (0..4).map(|_| self.r()).collect();
                self.ins(format!(
                    "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {{{}}}, [{off}+{}];",
                    regs.join(", "),
                    ks * 16 * ROW_BYTES
                ));
                if !unit {
                    for (i, r) in regs.iter().enumerate() {
                        // a0, a1 hold k = 2tig (+1); a2, a3 hold k = 8 + 2tig (+1).
                        let (f_lo, f_hi) = if i < 2 {
                            (&fac[0], &fac[1])
                        } else {
                            (&fac[2], &fac[3])
                        };
                        let (x_lo, x_hi) = (self.f(), self.f());
                        match at.elem {
                            Elem::Bf16 => {
                                let (t_lo, t_hi) = (self.r(), self.r());
                                self.ins(format!("shl.b32 {t_lo}, {r}, 16;"));
                                self.ins(format!("and.b32 {t_hi}, {r}, -65536;"));
                                self.ins(format!("mov.b32 {x_lo}, {t_lo};"));
                                self.ins(format!("mov.b32 {x_hi}, {t_hi};"));
                            }
                            _ => {
                                let (h_lo, h_hi) = (self.h16(), self.h16());
                                self.ins(format!("mov.b32 {{{h_lo}, {h_hi}}}, {r};"));
                                self.ins(format!("cvt.f32.f16 {x_lo}, {h_lo};"));
                                self.ins(format!("cvt.f32.f16 {x_hi}, {h_hi};"));
                            }
                        }
                        self.ins(format!("mul.f32 {x_lo}, {x_lo}, {f_lo};"));
                        self.ins(format!("mul.f32 {x_hi}, {x_hi}, {f_hi};"));
                        self.ins(format!("cvt.rn.{conv}x2.f32 {r}, {x_hi}, {x_lo};"));
                    }
                }
                afr.push(regs);
            }
            if wgmma {
                wg_a.push(format!("{{{}}}", afr[0].join(", ")));
            } else {
                self.emit_b_fragments_and_mma(
                    acc,
                    &afr,
                    &bbase,
                    b_block,
                    BLayout::RowsAreK,
                    ks,
                    acc_t.cols,
                    ty,
                );
            }
        }
        if wgmma {
            let bdesc = self.wgmma_desc(&bbase, b_block, true);
            let group = WgmmaGroup {
                regs: vec![acc],
                shared: vec![b],
                pinned: false,
            };
            self.emit_wgmma(
                acc,
                group,
                &wg_a,
                &bdesc,
                |ks| ks * 16 * ROW_BYTES,
                true,
                b_block,
                ty,
            );
        }
        Ok(())
    }
}
