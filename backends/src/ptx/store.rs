//! The output tile stored by the copy engine ([`TileSchedule::store_tma`]).
//!
//! After its key loop a consumer warpgroup no longer reads its 64 rows of the query tile,
//! which it alone read (the A operand of its `Q K^T`): it writes its output rows there,
//! laid out like every loaded tile (128-byte swizzle, 64-column blocks), makes the writes
//! visible to the copy engine (`fence.proxy.async`), meets its own four warps at a named
//! barrier, and one of its threads stores one box of 64 rows per 64-column block with
//! `cp.async.bulk.tensor` through the output's tensor map. The copy engine clips rows past
//! the sequence's end, so a ragged last query tile needs no predicate. That thread waits
//! until the copies have read shared memory (`cp.async.bulk.wait_group.read 0`) before the
//! CTA may exit and free it. The other warpgroups are not waited for: their rows are their
//! own.

use super::*;

impl Printer<'_> {
    pub(super) fn emit_tma_store(&mut self, src: RegId, dst: TensorId) -> Result<(), TileError> {
        let prog = self.prog;
        let t = &prog.tensors[dst.index()];
        let ty = Self::mma_type(t.elem)?;
        let Some(staging) = prog.query_staging_tile() else {
            return unsupported("the copy engine stores the output through the query tile");
        };
        let rows = prog.shared[staging.index()].rows;
        let block_bytes = rows * ROW_BYTES;
        let base = self.smem_base[staging.index()].clone();
        self.comment(format!(
            "store {} through {} by the copy engine",
            t.name,
            prog.shared[staging.index()].name
        ));
        // Nothing of this warpgroup still reads its query rows.
        self.wait_wgmma(0);
        self.write_rows_swizzled(src, &base, block_bytes, ty);
        self.ins("fence.proxy.async.shared::cta;");
        let wg = self.emit_warpgroup_barrier();
        let issuer = self.pred();
        let lane = self.r();
        self.ins(format!("and.b32 {lane}, %thr, 127;"));
        self.ins(format!("setp.eq.u32 {issuer}, {lane}, 0;"));
        let done = self.label("stored");
        self.ins(format!("@!{issuer} bra.uni {done};"));
        // The warpgroup's first row: in shared memory, and as a position.
        let (soff, row) = (self.r(), self.r());
        self.ins(format!(
            "mad.lo.u32 {soff}, {wg}, {}, {base};",
            STORE_BOX_ROWS * ROW_BYTES
        ));
        self.ins(format!("mad.lo.u32 {row}, {wg}, {STORE_BOX_ROWS}, %qrow0;"));
        let box_cols = TMA_BOX_BYTES / t.elem.bytes();
        for block in 0..t.head_dim / box_cols {
            let col = self.r();
            self.ins(format!("mov.u32 {col}, {};", block * box_cols));
            self.ins(format!(
                "cp.async.bulk.tensor.4d.global.shared::cta.tile.bulk_group [%tmap{}, {{{col}, {row}, %hidx, %bidx}}], [{soff}+{}];",
                dst.0,
                block * block_bytes
            ));
        }
        self.ins("cp.async.bulk.commit_group;");
        self.ins("cp.async.bulk.wait_group.read 0;");
        self.body.push_str(&format!("{done}:\n"));
        Ok(())
    }
}
