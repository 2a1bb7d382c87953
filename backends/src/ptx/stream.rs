//! The streamed contraction ([`Stmt::ContractStream`]): a GEMM whose contracted dimension
//! is too long for shared memory, walked slice by slice through its own `stages`-deep
//! `cp.async` ring. The ring runs on across key tiles: while one key tile's epilogue runs,
//! the first slices of the next tile are already in flight.
//!
//! Slice `g` (counted over the whole key loop: key tile `g / slices`, slice `g % slices`)
//! lives in stage `g % stages`. With `mma.sync` the ring issues `stages - 1` slices ahead
//! (the slice read last iteration is free after the barrier); with `wgmma` one group stays
//! in flight across the barrier, so it issues `stages - 2` ahead and waits until at most one
//! group is pending before the next barrier.

use super::*;

/// The ring's registers: slices to issue in all, the next slice's global index, its slice
/// within the key tile, its key tile's first row, its stage; the stage being consumed.
const TOTAL: &str = "%cs_total";
const NEXT: &str = "%cs_next";
const NEXT_SLICE: &str = "%cs_slice";
const NEXT_ROW: &str = "%cs_row";
const NEXT_STAGE: &str = "%cs_stage";
const CUR_STAGE: &str = "%cs_cur";

/// What the ring needs to know about a [`Stmt::ContractStream`].
struct Ring {
    a: TensorId,
    b: TensorId,
    a_tile: SharedId,
    b_tile: SharedId,
    /// Slices per key tile.
    slices: u32,
    /// Columns per slice.
    width: u32,
    /// Bytes of one stage of each tile.
    stage_bytes: [u32; 2],
    /// Ring bases (stage 0) of each tile.
    base: [String; 2],
    /// Slices issued ahead of the one consumed.
    lead: u32,
    block_n: u32,
}

impl Printer<'_> {
    fn ring(&self, a_tile: SharedId, b_tile: SharedId) -> Result<Ring, TileError> {
        let prog = self.prog;
        let Some(Stmt::ContractStream { a, b, .. }) = prog.contract_stream() else {
            return unsupported("ContractStream outside the key loop");
        };
        let (at, bt) = (&prog.shared[a_tile.index()], &prog.shared[b_tile.index()]);
        let bytes =
            |t: &SharedTile| (t.rows * t.cols * t.elem.bytes()).div_ceil(SMEM_ALIGN) * SMEM_ALIGN;
        let stages = prog.schedule.stages;
        // wgmma keeps the last slice's group in flight, so its stage is not free yet.
        let lead = match prog.schedule.mma {
            MmaUnit::Warpgroup => stages.saturating_sub(2),
            MmaUnit::Sync => stages - 1,
        };
        if lead == 0 {
            return unsupported(format!(
                "a streamed contraction with {} needs at least 3 stages",
                prog.schedule.mma.name()
            ));
        }
        Ok(Ring {
            a: *a,
            b: *b,
            a_tile,
            b_tile,
            slices: prog.tensors[a.index()].head_dim / at.cols,
            width: at.cols,
            stage_bytes: [bytes(at), bytes(bt)],
            base: [
                self.smem_base[a_tile.index()].clone(),
                self.smem_base[b_tile.index()].clone(),
            ],
            lead,
            block_n: bt.rows,
        })
    }

    /// Before the key loop: the ring's counters and its first `lead` slices.
    pub(super) fn emit_stream_prologue(
        &mut self,
        body: &[Stmt],
        block_n: u32,
    ) -> Result<(), TileError> {
        let Some((a_tile, b_tile)) = body.iter().find_map(|s| match s {
            Stmt::ContractStream { a_tile, b_tile, .. } => Some((*a_tile, *b_tile)),
            _ => None,
        }) else {
            return Ok(());
        };
        let ring = self.ring(a_tile, b_tile)?;
        self.comment(format!(
            "streamed contraction: {} slices of {} per key tile, {} ahead",
            ring.slices, ring.width, ring.lead
        ));
        for (name, ty) in [
            (TOTAL, ".b32"),
            (NEXT, ".b32"),
            (NEXT_SLICE, ".b32"),
            (NEXT_ROW, ".b32"),
            (NEXT_STAGE, ".b32"),
            (CUR_STAGE, ".b32"),
        ] {
            self.named_once(ty, &name[1..]);
        }
        self.ins(format!("mul.lo.s32 {TOTAL}, %niter, {};", ring.slices));
        self.ins(format!("mov.u32 {NEXT}, 0;"));
        self.ins(format!("mov.u32 {NEXT_SLICE}, 0;"));
        self.ins(format!("mul.lo.s32 {NEXT_ROW}, %tbegin, {block_n};"));
        self.ins(format!("mov.u32 {NEXT_STAGE}, 0;"));
        self.ins(format!("mov.u32 {CUR_STAGE}, 0;"));
        for _ in 0..ring.lead {
            self.emit_stream_issue(&ring)?;
        }
        Ok(())
    }

    /// Issues slice `NEXT` into stage `NEXT_STAGE` (nothing past the last one, but a group
    /// is committed either way so `wait_group` counts stay slice counts), then advances.
    fn emit_stream_issue(&mut self, ring: &Ring) -> Result<(), TileError> {
        let skip = self.label("nostream");
        let done = self.pred();
        self.ins(format!("setp.ge.s32 {done}, {NEXT}, {TOTAL};"));
        self.ins(format!("@{done} bra.uni {skip};"));
        let col = self.r();
        let elem_bytes = self.prog.shared[ring.a_tile.index()].elem.bytes();
        self.ins(format!(
            "mul.lo.u32 {col}, {NEXT_SLICE}, {};",
            ring.width * elem_bytes
        ));
        for (i, (tile, src, origin)) in [
            (ring.a_tile, ring.a, "%qrow0"),
            (ring.b_tile, ring.b, NEXT_ROW),
        ]
        .into_iter()
        .enumerate()
        {
            let sb = self.r();
            self.ins(format!(
                "mad.lo.u32 {sb}, {NEXT_STAGE}, {}, {};",
                ring.stage_bytes[i], ring.base[i]
            ));
            self.emit_load_issue(tile, src, origin, &sb, Some(&col))?;
        }
        self.body.push_str(&format!("{skip}:\n"));
        self.ins("cp.async.commit_group;");
        self.ins(format!("add.s32 {NEXT}, {NEXT}, 1;"));
        self.ins(format!("add.u32 {NEXT_SLICE}, {NEXT_SLICE}, 1;"));
        let wrap = self.pred();
        self.ins(format!(
            "setp.eq.u32 {wrap}, {NEXT_SLICE}, {};",
            ring.slices
        ));
        self.ins(format!("selp.u32 {NEXT_SLICE}, 0, {NEXT_SLICE}, {wrap};"));
        self.ins(format!(
            "@{wrap} add.s32 {NEXT_ROW}, {NEXT_ROW}, {};",
            ring.block_n
        ));
        self.emit_stage_advance(NEXT_STAGE);
        Ok(())
    }

    fn emit_stage_advance(&mut self, reg: &str) {
        let stages = self.prog.schedule.stages;
        self.ins(format!("add.u32 {reg}, {reg}, 1;"));
        let w = self.pred();
        self.ins(format!("setp.eq.u32 {w}, {reg}, {stages};"));
        self.ins(format!("selp.u32 {reg}, 0, {reg}, {w};"));
    }

    /// The statement: for each slice of the current key tile, wait for it, issue the
    /// slice `lead` ahead, contract.
    pub(super) fn emit_contract_stream(
        &mut self,
        acc: RegId,
        a_tile: SharedId,
        b_tile: SharedId,
    ) -> Result<(), TileError> {
        let ring = self.ring(a_tile, b_tile)?;
        let wgmma = self.prog.schedule.mma == MmaUnit::Warpgroup;
        self.comment(format!(
            "{} += streamed contraction, {} slices",
            self.prog.regs[acc.index()].name,
            ring.slices
        ));
        self.wait_wgmma(0);
        let c = self.r();
        self.ins(format!("mov.u32 {c}, 0;"));
        let top = self.label("slice");
        self.body.push_str(&format!("{top}:\n"));
        // Slice `c` has landed once at most `lead - 1` younger groups are pending.
        self.ins(format!("cp.async.wait_group {};", ring.lead - 1));
        self.emit_async_proxy_fence();
        // Every thread's part of the slice is in; every warp is done with the stage the
        // next issue overwrites (its last reader waited for it before this barrier).
        self.ins("bar.sync 0;");
        self.emit_stream_issue(&ring)?;
        for (i, tile) in [a_tile, b_tile].into_iter().enumerate() {
            let sb = self.r();
            self.ins(format!(
                "mad.lo.u32 {sb}, {CUR_STAGE}, {}, {};",
                ring.stage_bytes[i], ring.base[i]
            ));
            self.smem_base[tile.index()] = sb;
        }
        self.emit_contract(acc, AOperand::Shared(a_tile), b_tile, BLayout::RowsAreN)?;
        if wgmma {
            // The previous slice's group (an earlier iteration's, unseen by the printer's
            // static count) is done after this; the current one stays in flight.
            self.ins("wgmma.wait_group.sync.aligned 1;");
            let keep = self.wgmma_pending.len().saturating_sub(1);
            self.wgmma_pending.drain(..keep);
        }
        for (i, tile) in [a_tile, b_tile].into_iter().enumerate() {
            self.smem_base[tile.index()] = ring.base[i].clone();
        }
        self.emit_stage_advance(CUR_STAGE);
        self.ins(format!("add.u32 {c}, {c}, 1;"));
        let more = self.pred();
        self.ins(format!("setp.lt.u32 {more}, {c}, {};", ring.slices));
        self.ins(format!("@{more} bra.uni {top};"));
        Ok(())
    }
}
