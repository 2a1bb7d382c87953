//! Loop-carried states of sequential programs: chunk states in global memory, the
//! decayed prefix of earlier chunks, the decoupled look-back, and the 16-bit shared copy
//! a state's next MMA reads.

use super::*;

impl Printer<'_> {
    /// Address of this thread's first element of chunk `chunk_reg` in state `id`:
    /// row `warp * rpw + g`, columns `colb * cols + 2 tig`.
    pub(super) fn state_addr(&mut self, id: StateId, cols: u32, chunk_reg: &str) -> String {
        let prog = self.prog;
        let total = prog.states[id.index()].cols;
        let bm = prog.schedule.block_m;
        let row = self.r();
        self.ins(format!("mad.lo.u32 {row}, %bidx, %heads, %hidx;"));
        self.ins(format!("mad.lo.u32 {row}, {chunk_reg}, %nbh, {row};"));
        self.ins(format!("mul.lo.u32 {row}, {row}, {bm};"));
        self.ins(format!(
            "mad.lo.u32 {row}, %warp, {}, {row};",
            prog.rows_per_warp()
        ));
        self.ins(format!("add.u32 {row}, {row}, %g;"));
        let addr = self.rd();
        self.ins(format!("mul.wide.u32 {addr}, {row}, {};", total * 4));
        let col = self.r();
        self.ins(format!("mul.lo.u32 {col}, %colb, {cols};"));
        self.ins(format!("mad.lo.u32 {col}, %tig, 2, {col};"));
        let c64 = self.rd();
        self.ins(format!("mul.wide.u32 {c64}, {col}, 4;"));
        self.ins(format!("add.u64 {addr}, {addr}, {c64};"));
        self.ins(format!("add.u64 {addr}, {addr}, %stp{};", id.0));
        addr
    }

    /// This thread's adjacent column pairs of accumulator `id` and their byte offsets from
    /// [`Printer::state_addr`] in a state array `total` columns wide.
    pub(super) fn state_pairs(&self, id: RegId, total: u32) -> Vec<(String, String, u32)> {
        let cols = self.prog.regs[id.index()].cols;
        let mut out = Vec::new();
        for mt in 0..self.mtiles {
            for half in 0..2 {
                for nt in 0..cols / 8 {
                    out.push((
                        self.acc_reg(id, mt, nt, half * 2),
                        self.acc_reg(id, mt, nt, half * 2 + 1),
                        ((mt * 16 + half * 8) * total + nt * 8) * 4,
                    ));
                }
            }
        }
        out
    }

    /// Writes this CTA's chunk of a state array (f32, two adjacent columns per store).
    pub(super) fn emit_store_state(&mut self, src: RegId, dst: StateId) -> Result<(), TileError> {
        let prog = self.prog;
        let cols = prog.regs[src.index()].cols;
        let total = prog.states[dst.index()].cols;
        self.comment(format!(
            "{}[chunk] = {}",
            prog.states[dst.index()].name,
            prog.regs[src.index()].name
        ));
        let addr = self.state_addr(dst, cols, "%chunk");
        for (lo, hi, imm) in self.state_pairs(src, total) {
            self.ins(format!("st.global.v2.f32 [{addr}+{imm}], {{{lo}, {hi}}};"));
        }
        Ok(())
    }

    /// `dst = sum over c < chunk of decay^(chunk - 1 - c) * src[c]` by Horner's rule.
    pub(super) fn emit_load_state_prefix(
        &mut self,
        dst: RegId,
        src: StateId,
        decay: &ScalarExpr,
    ) -> Result<(), TileError> {
        let prog = self.prog;
        let cols = prog.regs[dst.index()].cols;
        let total = prog.states[src.index()].cols;
        self.comment(format!(
            "{} = prefix of {}",
            prog.regs[dst.index()].name,
            prog.states[src.index()].name
        ));
        let ctx = ElemCtx {
            mt: 0,
            half: 0,
            col: None,
        };
        let f = self.emit_expr(decay, &ctx)?;
        for r in self.acc_regs(dst) {
            self.ins(format!("mov.f32 {r}, 0f00000000;"));
        }
        let c = self.r();
        self.ins(format!("mov.u32 {c}, 0;"));
        let top = self.label("prefix");
        let end = self.label("prefix_end");
        self.body.push_str(&format!("{top}:\n"));
        let done = self.pred();
        self.ins(format!("setp.ge.u32 {done}, {c}, %chunk;"));
        self.ins(format!("@{done} bra.uni {end};"));
        let addr = self.state_addr(src, cols, &c);
        for (lo, hi, imm) in self.state_pairs(dst, total) {
            let (x, y) = (self.f(), self.f());
            self.ins(format!("ld.global.v2.f32 {{{x}, {y}}}, [{addr}+{imm}];"));
            self.ins(format!("fma.rn.f32 {lo}, {lo}, {f}, {x};"));
            self.ins(format!("fma.rn.f32 {hi}, {hi}, {f}, {y};"));
        }
        self.ins(format!("add.u32 {c}, {c}, 1;"));
        self.ins(format!("bra.uni {top};"));
        self.body.push_str(&format!("{end}:\n"));
        Ok(())
    }

    /// The look-back word's shared address, from the symbol itself: the ticket is taken
    /// before the setup names `%smem`.
    pub(super) fn lb_smem_addr(&mut self) -> String {
        let a = self.r();
        self.ins(format!("mov.u32 {a}, einattn_smem;"));
        self.ins(format!("add.u32 {a}, {a}, {};", self.lb_smem));
        a
    }

    /// Address of this CTA's (or chunk `chunk`'s) flag word: after the ticket counter,
    /// `(chunk * B*H + bh) * col_blocks + colb`.
    pub(super) fn lb_flag_addr(&mut self, chunk: &str) -> String {
        let slot = self.r();
        self.ins(format!("mad.lo.u32 {slot}, {chunk}, %nbh, %bhidx;"));
        let ncb = self.r();
        self.ins(format!("mov.u32 {ncb}, %nctaid.x;"));
        self.ins(format!("mad.lo.u32 {slot}, {slot}, {ncb}, %colb;"));
        self.ins(format!("add.u32 {slot}, {slot}, 1;"));
        let a = self.rd();
        self.ins(format!("mul.wide.u32 {a}, {slot}, 4;"));
        self.ins(format!("add.u64 {a}, {a}, %lbflags;"));
        a
    }

    /// Publishes this CTA's part of a state array and then, from thread 0, the flag value
    /// `flag`: every thread's stores are made visible at GPU scope first.
    pub(super) fn emit_publish(
        &mut self,
        src: RegId,
        dst: StateId,
        flag: u32,
    ) -> Result<(), TileError> {
        self.emit_store_state(src, dst)?;
        self.ins("fence.acq_rel.gpu;");
        self.ins("bar.sync 0;");
        let addr = self.lb_flag_addr("%chunk");
        let first = self.pred();
        self.ins(format!("setp.eq.u32 {first}, %thr, 0;"));
        self.ins(format!(
            "@{first} st.release.gpu.global.u32 [{addr}], {flag};"
        ));
        Ok(())
    }

    /// See [`Stmt::LookBack`]. Flags: 0 nothing yet, 1 aggregate, 2 inclusive prefix.
    pub(super) fn emit_look_back(
        &mut self,
        state: RegId,
        prefix: RegId,
        aggregates: StateId,
        inclusive: StateId,
        decay: &ScalarExpr,
    ) -> Result<(), TileError> {
        let prog = self.prog;
        let cols = prog.regs[state.index()].cols;
        let total = prog.states[aggregates.index()].cols;
        self.comment(format!(
            "look back: {} from the earlier chunks",
            prog.regs[prefix.index()].name
        ));
        let ctx = ElemCtx {
            mt: 0,
            half: 0,
            col: None,
        };
        let f = self.emit_expr(decay, &ctx)?;
        self.emit_publish(state, aggregates, 1)?;
        for r in self.acc_regs(prefix) {
            self.ins(format!("mov.f32 {r}, 0f00000000;"));
        }
        let scale = self.f();
        self.ins(format!("mov.f32 {scale}, 0f3F800000;"));
        let p = self.r();
        self.ins(format!("mov.u32 {p}, %chunk;"));
        let top = self.label("lookback");
        let end = self.label("lookback_end");
        self.body.push_str(&format!("{top}:\n"));
        let done = self.pred();
        self.ins(format!("setp.eq.u32 {done}, {p}, 0;"));
        self.ins(format!("@{done} bra.uni {end};"));
        self.ins(format!("sub.u32 {p}, {p}, 1;"));
        // Thread 0 waits for chunk p's flag and hands it to the CTA.
        let flag_addr = self.lb_flag_addr(&p);
        let slot = self.lb_smem_addr();
        let first = self.pred();
        self.ins(format!("setp.eq.u32 {first}, %thr, 0;"));
        let skip = self.label("lb_notfirst");
        let spin = self.label("lb_spin");
        self.ins(format!("@!{first} bra {skip};"));
        let fl = self.r();
        self.body.push_str(&format!("{spin}:\n"));
        self.ins(format!("ld.acquire.gpu.global.u32 {fl}, [{flag_addr}];"));
        let zero = self.pred();
        self.ins(format!("setp.eq.u32 {zero}, {fl}, 0;"));
        self.ins(format!("@{zero} nanosleep.u32 32;"));
        self.ins(format!("@{zero} bra {spin};"));
        self.ins(format!("st.shared.u32 [{slot}], {fl};"));
        self.body.push_str(&format!("{skip}:\n"));
        // Warp 0 arrives diverged (thread 0 spun): the non-aligned barrier.
        self.ins("barrier.sync 0;");
        let flag = self.r();
        self.ins(format!("ld.shared.u32 {flag}, [{slot}];"));
        self.ins("fence.acq_rel.gpu;");
        let incl = self.pred();
        self.ins(format!("setp.eq.u32 {incl}, {flag}, 2;"));
        let agg = self.state_addr(aggregates, cols, &p);
        let inc = self.state_addr(inclusive, cols, &p);
        let addr = self.rd();
        self.ins(format!("selp.b64 {addr}, {inc}, {agg}, {incl};"));
        for (lo, hi, imm) in self.state_pairs(prefix, total) {
            let (x, y) = (self.f(), self.f());
            self.ins(format!("ld.global.cg.v2.f32 {{{x}, {y}}}, [{addr}+{imm}];"));
            self.ins(format!("fma.rn.f32 {lo}, {x}, {scale}, {lo};"));
            self.ins(format!("fma.rn.f32 {hi}, {y}, {scale}, {hi};"));
        }
        // Every thread has read the flag before thread 0 may overwrite the slot.
        self.ins("bar.sync 0;");
        self.ins(format!("@{incl} bra.uni {end};"));
        self.ins(format!("mul.f32 {scale}, {scale}, {f};"));
        self.ins(format!("bra.uni {top};"));
        self.body.push_str(&format!("{end}:\n"));
        // inclusive = decay * prefix + own state, published; then state = prefix.
        let pairs: Vec<(String, String)> = self
            .acc_regs(state)
            .into_iter()
            .zip(self.acc_regs(prefix))
            .collect();
        for (s, pr) in &pairs {
            self.ins(format!("fma.rn.f32 {s}, {pr}, {f}, {s};"));
        }
        self.emit_publish(state, inclusive, 2)?;
        for (s, pr) in &pairs {
            self.ins(format!("mov.f32 {s}, {pr};"));
        }
        Ok(())
    }

    /// Each thread writes its accumulator elements of `src`, rounded to `ty`, into a shared
    /// tile at `base` laid out like loaded tiles: its warp's rows (`warp * rows_per_warp +
    /// g`), 64-column blocks `block_bytes` apart, chunk `nt` of a 128-byte row at chunk
    /// `(nt % 8) ^ (row % 8)`.
    pub(super) fn write_rows_swizzled(
        &mut self,
        src: RegId,
        base: &str,
        block_bytes: u32,
        ty: &str,
    ) {
        let cols = self.prog.regs[src.index()].cols;
        let row = self.r();
        self.ins(format!(
            "mad.lo.u32 {row}, %warp, {}, %g;",
            self.prog.rows_per_warp()
        ));
        self.ins(format!("mad.lo.u32 {row}, {row}, {ROW_BYTES}, {base};"));
        self.ins(format!("mad.lo.u32 {row}, %tig, 4, {row};"));
        let mut sw = Vec::new();
        for j in 0..8u32.min(cols / 8) {
            let x = self.r();
            self.ins(format!("xor.b32 {x}, %g, {j};"));
            self.ins(format!("mad.lo.u32 {x}, {x}, 16, {row};"));
            sw.push(x);
        }
        for mt in 0..self.mtiles {
            for half in 0..2 {
                for nt in 0..cols / 8 {
                    let lo = self.acc_reg(src, mt, nt, half * 2);
                    let hi = self.acc_reg(src, mt, nt, half * 2 + 1);
                    let pk = self.r();
                    self.ins(format!("cvt.rn.{ty}x2.f32 {pk}, {hi}, {lo};"));
                    let imm = (mt * 16 + half * 8) * ROW_BYTES + (nt / 8) * block_bytes;
                    self.ins(format!(
                        "st.shared.b32 [{}+{imm}], {pk};",
                        sw[(nt & 7) as usize]
                    ));
                }
            }
        }
    }

    /// Rounds an accumulator into a shared tile (swizzled like loaded tiles), after a
    /// barrier so no warp still reads the previous contents; a row-private tile without one
    /// (see [`Stmt::StoreShared`]).
    pub(super) fn emit_store_shared(&mut self, src: RegId, dst: SharedId) -> Result<(), TileError> {
        let prog = self.prog;
        let t = &prog.shared[dst.index()];
        let ty = Self::mma_type(t.elem)?;
        let block_bytes = t.rows * ROW_BYTES;
        self.comment(format!(
            "{} = round({})",
            t.name,
            prog.regs[src.index()].name
        ));
        if prog.row_private_tiles().contains(&dst) {
            return self.emit_store_own_rows(src, dst, ty);
        }
        let base = match self.store_base[dst.index()].clone() {
            // The other copy: its last reader finished before this iteration's barrier.
            Some(write) => write,
            None => {
                self.ins("bar.sync 0;");
                self.smem_base[dst.index()].clone()
            }
        };
        self.write_rows_swizzled(src, &base, block_bytes, ty);
        if self.store_base[dst.index()].is_none() && !self.in_loop {
            // Outside a loop nothing else orders these writes before the reads that follow.
            self.emit_async_proxy_fence();
            self.ins("bar.sync 0;");
        }
        Ok(())
    }

    /// Rounds an accumulator into the rows of a row-private shared tile that this warp
    /// owns, for its own contraction to read them back as the A operand. The previous
    /// contents' reader is this warp's (warpgroup's) own `wgmma`, which the caller has
    /// waited for (the statement writes a tile a pending group reads). With `wgmma` the
    /// warpgroup's four warps each write 16 of the 64 rows one instruction reads: the writes
    /// go to the async proxy and the warpgroup meets at its named barrier. With `mma.sync`
    /// the warp reads its rows back by `ldmatrix`: its lanes meet.
    fn emit_store_own_rows(
        &mut self,
        src: RegId,
        dst: SharedId,
        ty: &str,
    ) -> Result<(), TileError> {
        let prog = self.prog;
        let block_bytes = prog.shared[dst.index()].rows * ROW_BYTES;
        let base = self.smem_base[dst.index()].clone();
        if prog.schedule.mma != MmaUnit::Warpgroup {
            self.write_rows_swizzled(src, &base, block_bytes, ty);
            self.ins("bar.warp.sync -1;");
            return Ok(());
        }
        // `stmatrix` (sm_90) stores four 8 x 8 matrices of the m16n8k16 A layout per
        // instruction, the lanes' addresses those of `ldmatrix` of the same fragments: a
        // quarter of the stores one 32-bit store per element pair takes.
        let cols = prog.regs[src.index()].cols;
        // The four swizzled row addresses (a k-step's chunk pair cycles through four per
        // 64-column block) never change: computed once, outside the key loop.
        let mut addrs = Vec::new();
        for j in 0..4u32 {
            addrs.push(self.hoist(format!("stmatrix {base} {j}"), |p| {
                let wbase = p.r();
                p.ins(format!(
                    "mad.lo.u32 {wbase}, %warp, {}, {base};",
                    prog.rows_per_warp() * ROW_BYTES
                ));
                let (addr, _) = p.ldm_addr(&wbase, "A", block_bytes, 0, 2 * j);
                Ok::<_, TileError>(addr)
            })?);
        }
        for mt in 0..self.mtiles {
            for ks in 0..cols / 16 {
                let regs: Vec<String> = (0..4)
                    .map(|i| {
                        let pk = self.r();
                        self.emit_pack_a(src, mt, ks, i, &pk, ty);
                        pk
                    })
                    .collect();
                // As `ldm_addr` of chunk pair 2 ks: the address of (2 ks) % 8, the block
                // and the m-tile's rows as the immediate.
                let imm = mt * 16 * ROW_BYTES + (2 * ks / 8) * block_bytes;
                self.ins(format!(
                    "stmatrix.sync.aligned.m8n8.x4.shared.b16 [{}+{imm}], {{{}}};",
                    addrs[(ks % 4) as usize],
                    regs.join(", ")
                ));
            }
        }
        self.ins("fence.proxy.async.shared::cta;");
        self.emit_warpgroup_barrier();
        Ok(())
    }

    /// `dst` = register `i` of k-step `ks` of m-tile `mt` in the 16-bit A layout, packed
    /// from the f32 accumulator `src` (columns along the k rank): a0 is n-tile `2 ks` rows
    /// `g`, a1 its rows `g + 8`, a2 and a3 the same of n-tile `2 ks + 1` (no data moves
    /// between threads: FlashAttention-2's register trick).
    pub(super) fn emit_pack_a(
        &mut self,
        src: RegId,
        mt: u32,
        ks: u32,
        i: u32,
        dst: &str,
        ty: &str,
    ) {
        let nt = 2 * ks + i / 2;
        let e0 = (i % 2) * 2;
        let lo = self.acc_reg(src, mt, nt, e0);
        let hi = self.acc_reg(src, mt, nt, e0 + 1);
        self.ins(format!("cvt.rn.{ty}x2.f32 {dst}, {hi}, {lo};"));
    }

    /// The four warps of this thread's warpgroup meet (named barrier
    /// [`WARPGROUP_BARRIER`] + warpgroup, 128 threads); the other warpgroups go on.
    /// Returns the register holding the warpgroup's index.
    pub(super) fn emit_warpgroup_barrier(&mut self) -> String {
        let wg = self.r();
        self.ins(format!("shr.u32 {wg}, %warp, 2;"));
        let id = self.r();
        self.ins(format!("add.u32 {id}, {wg}, {WARPGROUP_BARRIER};"));
        self.ins(format!("bar.sync {id}, 128;"));
        wg
    }
}
