//! Warpgroup contractions (`wgmma.mma_async`, sm_90a): matrix descriptors of the
//! 128-byte-swizzled shared tiles, the async-proxy fences, and deferred waits (a
//! committed group is waited for only when a statement touches what it reads or writes).

use super::*;

impl Printer<'_> {
    /// `acc = 0` right before `acc += A . B` by `wgmma`: the fill is left out and the
    /// contraction's first k-step overwrites instead of accumulating (scale-d false), which
    /// saves a register move per accumulator element and key tile. Returns whether `st` was
    /// folded (the caller skips it).
    pub(super) fn fold_zero_fill(&mut self, st: &Stmt, next: Option<&Stmt>) -> bool {
        if self.prog.schedule.mma != MmaUnit::Warpgroup {
            return false;
        }
        let (Stmt::Fill { dst, value }, Some(Stmt::Contract { acc, .. })) = (st, next) else {
            return false;
        };
        if *value != 0.0 || dst != acc {
            return false;
        }
        self.zero_acc = Some(*dst);
        true
    }

    /// `wgmma` runs asynchronously: a statement that touches a register tile of a pending
    /// group, or writes a shared tile one reads, first waits until that group (and every
    /// older one) is done; later groups stay in flight.
    pub(super) fn wait_for_conflicting_wgmma(&mut self, st: &Stmt) {
        if self.wgmma_pending.is_empty() {
            return;
        }
        let (regs, writes, all) = self.stmt_footprint(st);
        let conflict = self.wgmma_pending.iter().rposition(|g| {
            all || g.regs.iter().any(|r| regs.contains(r))
                || g.shared.iter().any(|t| writes.contains(t))
        });
        if let Some(i) = conflict {
            self.wait_wgmma(self.wgmma_pending.len() - 1 - i);
        }
    }

    /// Waits until at most `keep` committed groups are pending.
    pub(super) fn wait_wgmma(&mut self, keep: usize) {
        if self.wgmma_pending.len() > keep {
            let done = self.wgmma_pending.len() - keep;
            if self.wgmma_pending[..done].iter().any(|g| g.pinned) {
                // ptxas schedules a wait, which reads no register, as early as its basic
                // block allows; an instruction it may not move past keeps it here.
                self.ins("fence.acq_rel.cta;");
            }
            self.ins(format!("wgmma.wait_group.sync.aligned {keep};"));
            self.wgmma_pending.drain(..done);
        }
    }

    /// Register tiles a statement reads or writes, shared tiles it writes, and whether it
    /// must see every pending group finished (loops, loads, anything not itemized).
    pub(super) fn stmt_footprint(&self, st: &Stmt) -> (Vec<RegId>, Vec<SharedId>, bool) {
        let expr_regs = |e: &ScalarExpr, out: &mut Vec<RegId>| {
            e.visit(&mut |x| {
                if let ScalarExpr::Elem(id) = x {
                    out.push(*id);
                }
            })
        };
        let mut regs = Vec::new();
        let mut writes = Vec::new();
        let all = match st {
            Stmt::Fill { dst, .. } | Stmt::Mask { dst, .. } | Stmt::Fragments { dst, .. } => {
                regs.push(*dst);
                false
            }
            Stmt::Map { dst, expr } => {
                regs.push(*dst);
                expr_regs(expr, &mut regs);
                false
            }
            Stmt::Convert { dst, src } => {
                regs.extend([*dst, *src]);
                false
            }
            Stmt::ContractStream { .. } => true,
            Stmt::Contract { acc, a, .. } => {
                regs.push(*acc);
                if let AOperand::Reg(id) = a {
                    regs.push(*id);
                }
                false
            }
            Stmt::ContractT { acc, scale, .. } => {
                regs.push(*acc);
                expr_regs(scale, &mut regs);
                false
            }
            Stmt::Store { src, .. } | Stmt::StoreState { src, .. } => {
                regs.push(*src);
                false
            }
            Stmt::RowReduce { src, .. } => {
                regs.push(*src);
                false
            }
            Stmt::RowReduceMap { expr, shape, .. } => {
                regs.push(*shape);
                expr_regs(expr, &mut regs);
                false
            }
            Stmt::RowMap { expr, .. } => {
                expr_regs(expr, &mut regs);
                false
            }
            Stmt::RowDot { a, b, .. } => {
                regs.push(*a);
                regs.push(*b);
                false
            }
            Stmt::AccumulatePartial { acc, .. } => {
                regs.push(*acc);
                false
            }
            Stmt::LoadStatePrefix { dst, .. } => {
                regs.push(*dst);
                false
            }
            Stmt::StoreShared { src, dst } => {
                regs.push(*src);
                // A double-buffered state is written to the copy nobody reads this iteration.
                if self.store_base[dst.index()].is_none() {
                    writes.push(*dst);
                }
                false
            }
            Stmt::FillRow { .. } | Stmt::StoreRow { .. } | Stmt::LoadRow { .. } => false,
            Stmt::LoadTile { .. } | Stmt::KeyLoop { .. } | Stmt::LookBack { .. } => true,
        };
        (regs, writes, all)
    }

    /// Makes this thread's earlier generic-proxy writes to shared memory (`cp.async`,
    /// `st.shared`) visible to `wgmma` reads that follow the next barrier.
    pub(super) fn emit_async_proxy_fence(&mut self) {
        if self.prog.schedule.mma == MmaUnit::Warpgroup {
            self.ins("fence.proxy.async.shared::cta;");
        }
    }

    /// A 64-bit `wgmma` descriptor for a tile stored as described in the module docs,
    /// starting at shared address `addr`: 128-byte swizzle, 8-row groups 1024 bytes apart
    /// (the stride byte offset), and, for N-major operands, 64-column blocks
    /// `block_bytes` apart (the leading byte offset; unused for K-major).
    pub(super) fn wgmma_desc(&mut self, addr: &str, block_bytes: u32, n_major: bool) -> String {
        let lbo: u64 = if n_major {
            (block_bytes >> 4) as u64
        } else {
            1
        };
        let sbo: u64 = ((8 * ROW_BYTES) >> 4) as u64;
        let fixed = (lbo << 16) | (sbo << 32) | (1u64 << 62);
        let d = self.rd();
        self.ins(format!("cvt.u64.u32 {d}, {addr};"));
        self.ins(format!("shr.u64 {d}, {d}, 4;"));
        self.ins(format!("and.b64 {d}, {d}, 16383;"));
        self.ins(format!("or.b64 {d}, {d}, {fixed};"));
        d
    }

    /// `acc += A . B` with `wgmma.mma_async`, one instruction per k-step (and per 256
    /// accumulator columns), then a commit; the group joins the pending ones. `a_ops[ks]` is
    /// the A operand of k-step `ks` (`{four registers}` or a descriptor); `b_step(ks)` the
    /// byte offset of its B rows from `bdesc`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn emit_wgmma(
        &mut self,
        acc: RegId,
        group: WgmmaGroup,
        a_ops: &[String],
        bdesc: &str,
        b_step: impl Fn(u32) -> u32,
        b_n_major: bool,
        n_block_bytes: u32,
        ty: &str,
    ) {
        let cols = self.prog.regs[acc.index()].cols;
        let overwrite = self.zero_acc.take() == Some(acc);
        self.ins("wgmma.fence.sync.aligned;");
        for (ks, a) in a_ops.iter().enumerate() {
            let mut n0 = 0;
            while n0 < cols {
                let n = (cols - n0).min(256);
                let c: Vec<String> = (n0 / 8..(n0 + n) / 8)
                    .flat_map(|nt| (0..4).map(move |e| (nt, e)))
                    .map(|(nt, e)| self.acc_reg(acc, 0, nt, e))
                    .collect();
                // The B columns n0.. : K-major rows n0.. (128 bytes each); N-major column
                // block n0 / 64.
                let col_off = if b_n_major {
                    (n0 / 64) * n_block_bytes
                } else {
                    n0 * ROW_BYTES
                };
                let bd = self.rd();
                self.ins(format!(
                    "add.s64 {bd}, {bdesc}, {};",
                    (b_step(ks as u32) + col_off) >> 4
                ));
                let tail = if a.starts_with('{') {
                    format!("{}", b_n_major as u32)
                } else {
                    format!("0, {}", b_n_major as u32)
                };
                let scale_d = if overwrite && ks == 0 {
                    "%wgzero"
                } else {
                    "%wgacc"
                };
                self.ins(format!(
                    "wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{ty}.{ty} {{{}}}, {a}, {bd}, {scale_d}, 1, 1, {tail};",
                    c.join(", ")
                ));
                n0 += n;
            }
        }
        self.ins("wgmma.commit_group.sync.aligned;");
        self.wgmma_pending.push(group);
    }

    pub(super) fn emit_contract_wgmma(
        &mut self,
        acc: RegId,
        a: AOperand,
        b: SharedId,
        layout: BLayout,
    ) -> Result<(), TileError> {
        let prog = self.prog;
        let acc_t = &prog.regs[acc.index()];
        let bt = &prog.shared[b.index()];
        let ty = Self::mma_type(bt.elem)?;
        let b_block = bt.rows * ROW_BYTES;
        self.comment(format!("contract {} += . {} (wgmma)", acc_t.name, bt.name));
        let (k_len, n_major) = match layout {
            BLayout::RowsAreN => (bt.cols, false),
            BLayout::RowsAreK => (bt.rows, true),
        };
        let bbase = self.smem_base[b.index()].clone();
        let bdesc = self.wgmma_desc(&bbase, b_block, n_major);
        let a_ops: Vec<String> = match a {
            AOperand::Reg(id) => (0..k_len / 16)
                .map(|ks| {
                    let r: Vec<String> = (0..4).map(|i| self.afrag_reg(id, 0, ks, i)).collect();
                    format!("{{{}}}", r.join(", "))
                })
                .collect(),
            AOperand::Shared(id) => {
                // K-major A: the warpgroup's 64 rows of the tile.
                let at = &prog.shared[id.index()];
                let a_block = at.rows * ROW_BYTES;
                let sb = self.smem_base[id.index()].clone();
                let desc_of = move |p: &mut Self, uniform: bool| {
                    let wg = p.r();
                    p.ins(format!("shr.u32 {wg}, %warp, 2;"));
                    if uniform {
                        // Lane 0's, so that ptxas sees a value uniform across the warp and
                        // keeps the descriptors in uniform registers (one R2UR, not two per
                        // k-step and key tile).
                        p.ins(format!("shfl.sync.idx.b32 {wg}, {wg}, 0, 31, -1;"));
                    }
                    let base = p.r();
                    p.ins(format!(
                        "mad.lo.u32 {base}, {wg}, {}, {sb};",
                        64 * ROW_BYTES
                    ));
                    p.wgmma_desc(&base, a_block, false)
                };
                // Inside the key loop, a tile at its fixed address (not a stage of a ring,
                // not a double-buffered state: Q, the probabilities) has one descriptor for
                // every key tile: computed once, before the loop.
                let fixed = self.smem_base[id.index()] == format!("%sbase{}", id.0);
                let adesc = if fixed && self.in_loop {
                    self.hoist(format!("wgmma A {}", id.0), |p| {
                        Ok::<_, TileError>(desc_of(p, true))
                    })?
                } else {
                    desc_of(self, false)
                };
                (0..k_len / 16)
                    .map(|ks| {
                        let d = self.rd();
                        let off = (ks / 4) * a_block + (ks % 4) * 32;
                        self.ins(format!("add.s64 {d}, {adesc}, {};", off >> 4));
                        d
                    })
                    .collect()
            }
        };
        let b_step = move |ks: u32| {
            if n_major {
                ks * 16 * ROW_BYTES
            } else {
                (ks / 4) * b_block + (ks % 4) * 32
            }
        };
        let mut group = WgmmaGroup {
            regs: vec![acc],
            shared: vec![b],
            pinned: false,
        };
        match a {
            AOperand::Reg(id) => group.regs.push(id),
            AOperand::Shared(id) => group.shared.push(id),
        }
        self.emit_wgmma(acc, group, &a_ops, &bdesc, b_step, n_major, b_block, ty);
        Ok(())
    }
}
