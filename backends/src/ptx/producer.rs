//! Warp specialization ([`Loads::ProducerWarpgroup`]): a producer warpgroup copies the
//! tiles, the consumer warps compute, and mbarriers in shared memory carry the hand-offs.
//!
//! * **Roles.** The consumers are threads `0 .. threads()` (so every statement prints as in
//!   a cooperative program); the producer is the warpgroup after them. After the barriers
//!   are initialized the CTA branches once on the role: the consumers raise their register
//!   limit with `setmaxnreg.inc` and run the statements, the producer lowers its own with
//!   `setmaxnreg.dec` (the kernel is launched with a register cap, `.maxntid` and
//!   `.minnctapersm 1`, which `setmaxnreg` needs) and only issues `cp.async` copies.
//! * **Barriers.** One per tile loaded before the key loop (`full`, phase 0 only); per
//!   streamed tile and stage of the ring, a `full` and an `empty` barrier, so K and V run
//!   as two rings that free their stages independently. The producer's 128 threads each
//!   copy their share of a tile and hand the arrival on the tile's `full` barrier (count
//!   128) to the copy unit (`cp.async.mbarrier.arrive.noinc`: it arrives when the thread's
//!   copies have landed), so the producer never waits for a copy and keeps every stage it
//!   may fill in flight. Consumers wait on a tile's `full` barrier just before the first
//!   statement that reads it, then fence the tile into the async proxy (`wgmma` reads it
//!   through descriptors, the copies wrote it through the generic proxy); lane 0 of each
//!   consumer warp arrives on its `empty` barrier (count: consumer warps) as soon as no
//!   statement left in the iteration reads the tile and no pending `wgmma` group does. The
//!   producer waits on `empty` before it overwrites a stage.
//! * **Phases.** Round `r` of a stage (iteration `it`, `r = it / stages`) completes phase
//!   `r` of its barriers. The consumers wait for parity `r & 1` of `full`; the producer for
//!   parity `(r & 1) ^ 1` of `empty`, which a fresh barrier reports complete, so the first
//!   round does not wait.
//! * **Rotation.** The body's trailing contraction (`acc += P V`), when nothing after it in
//!   the iteration touches its registers, is deferred to the next iteration (and after the
//!   loop for the last tile), reading the previous stage of its tile: it is issued right
//!   after `Q K^T` of tile `j`, so the softmax of tile `j`, which waits only for `Q K^T`,
//!   runs while `P V` of tile `j - 1` is still on the tensor cores (FlashAttention-3's
//!   intra-warpgroup overlap). The first key tile is peeled: it has no previous tile's.
//!   ptxas, left alone, schedules the wait for the deferred group (an instruction that reads
//!   no register) at the top of its basic block, before the softmax, which then runs after
//!   `P V` rather than under it; with [`TileSchedule::pin_deferred_wait`] a CTA-scope fence
//!   before the wait keeps it after the softmax.
//! * **Ping-pong** (`pingpong`). With several consumer warpgroups, each issues its
//!   contractions in turn: warpgroup `w` waits on named barrier `1 + w` before its first
//!   contraction of an iteration and arrives on the next warpgroup's after its `Q K^T` is
//!   issued, so one warpgroup's softmax runs while the tensor cores work for the other. The
//!   last warpgroup opens the first turn; its final arrive is left out so every barrier
//!   ends balanced.

use super::*;

/// Where the mbarriers of a warp-specialized program live and what each one guards.
#[derive(Debug, Clone)]
pub(super) struct BarrierLayout {
    /// Byte offset of the first barrier in dynamic shared memory.
    pub base: u32,
    /// Tiles loaded before the key loop, barrier `i` each.
    pub top: Vec<(SharedId, TensorId)>,
    /// Tiles streamed through the key loop's ring.
    pub streams: Vec<(SharedId, TensorId)>,
    pub stages: u32,
    /// A persistent program's tiles loaded before the loop are reloaded for every work
    /// tile: each has an `empty` barrier too, after the rings' barriers.
    pub persistent: bool,
}

impl BarrierLayout {
    pub(super) fn new(prog: &TileProgram, base: u32) -> BarrierLayout {
        let mut top = Vec::new();
        let mut streams = Vec::new();
        for s in &prog.body {
            match s {
                Stmt::LoadTile { dst, src } => top.push((*dst, *src)),
                Stmt::KeyLoop { body, .. } => {
                    for b in body {
                        if let Stmt::LoadTile { dst, src } = b {
                            streams.push((*dst, *src));
                        }
                    }
                }
                _ => {}
            }
        }
        BarrierLayout {
            base,
            top,
            streams,
            stages: prog.schedule.stages,
            persistent: prog.schedule.persistent.is_some(),
        }
    }

    pub(super) fn count(&self) -> u32 {
        let top_empty = if self.persistent { self.top.len() } else { 0 };
        (self.top.len() + 2 * self.streams.len() * self.stages as usize + top_empty) as u32
    }

    pub(super) fn bytes(&self) -> u32 {
        8 * self.count()
    }

    /// Offset of the barrier of tile `t` loaded before the loop.
    fn top_full(&self, t: SharedId) -> Option<u32> {
        let i = self.top.iter().position(|(d, _)| *d == t)?;
        Some(self.base + 8 * i as u32)
    }

    /// Offset of the `empty` barrier of tile `t` loaded before the loop (persistent
    /// programs), which the consumer warps arrive on once no statement of the work tile
    /// reads it any more.
    pub(super) fn top_empty(&self, t: SharedId) -> Option<u32> {
        if !self.persistent {
            return None;
        }
        let i = self.top.iter().position(|(d, _)| *d == t)?;
        let rings = 2 * self.streams.len() as u32 * self.stages;
        Some(self.base + 8 * (self.top.len() as u32 + rings + i as u32))
    }

    /// Offset of stage 0's `full` barrier of stream `j` (stage `s` is `8 s` further).
    fn stream_full(&self, j: usize) -> u32 {
        self.base + 8 * (self.top.len() as u32 + 2 * j as u32 * self.stages)
    }

    /// Offset of stage 0's `empty` barrier of stream `j`.
    fn stream_empty(&self, j: usize) -> u32 {
        self.stream_full(j) + 8 * self.stages
    }

    fn stream_index(&self, t: SharedId) -> Option<usize> {
        self.streams.iter().position(|(d, _)| *d == t)
    }
}

/// Shared tiles a statement reads.
pub(super) fn shared_reads(st: &Stmt) -> Vec<SharedId> {
    match st {
        Stmt::Contract { a, b, .. } => match a {
            AOperand::Shared(t) => vec![*t, *b],
            AOperand::Reg(_) => vec![*b],
        },
        Stmt::ContractT { a, b, .. } => vec![*a, *b],
        Stmt::Fragments { src, .. } => vec![*src],
        _ => vec![],
    }
}

/// Threads of a ping-pong named barrier: the warpgroup that waits for its turn and the one
/// that opens it.
const TURN_THREADS: u32 = 2 * 128;

const STAGE: &str = "%ws_stage";
const PHASE: &str = "%ws_phase";
/// A persistent program's parity of the current work tile (its count's lowest bit): the
/// phase of the barriers of the tiles loaded before the loop.
pub(super) const TOP_PHASE: &str = "%ws_tphase";

impl Printer<'_> {
    pub(super) fn layout(&self) -> &BarrierLayout {
        self.barriers
            .as_ref()
            .expect("a warp-specialized program has a barrier layout")
    }

    /// `addr` = the barrier at byte offset `off` plus `8 * stage` when a stage is given.
    pub(super) fn barrier_addr(&mut self, off: u32, stage: Option<&str>) -> String {
        let a = self.r();
        match stage {
            Some(s) => self.ins(format!("mad.lo.u32 {a}, {s}, 8, %smem;")),
            None => self.ins(format!("mov.u32 {a}, %smem;")),
        }
        self.ins(format!("add.u32 {a}, {a}, {off};"));
        a
    }

    pub(super) fn emit_barrier_wait(&mut self, addr: &str, parity: &str) {
        let top = self.label("mbwait");
        let done = self.pred();
        self.body.push_str(&format!("{top}:\n"));
        self.ins(format!(
            "mbarrier.try_wait.parity.shared::cta.b64 {done}, [{addr}], {parity};"
        ));
        self.ins(format!("@!{done} bra {top};"));
    }

    /// Thread 0 initializes every barrier; the whole CTA waits for it; then the roles part.
    /// Returns the label of the producer's code.
    pub(super) fn emit_role_split(&mut self) -> String {
        let layout = self.layout().clone();
        let consumers = self.prog.threads();
        let warps = self.prog.schedule.warps;
        self.comment(format!(
            "warp specialization: {} barriers; consumers are threads 0..{consumers}, the producer warpgroup follows",
            layout.count()
        ));
        let skip = self.label("mbinit_done");
        let first = self.pred();
        self.ins(format!("setp.ne.u32 {first}, %thr, 0;"));
        self.ins(format!("@{first} bra.uni {skip};"));
        // `full` barriers count the producer's threads (its one issuing thread with the copy
        // engine, whose arrival also expects the tile's bytes), `empty` ones the consumer
        // warps.
        let full = if self.prog.schedule.loads.tma() {
            1
        } else {
            PRODUCER_THREADS
        };
        let mut inits: Vec<(u32, u32)> = (0..layout.top.len() as u32)
            .map(|i| (layout.base + 8 * i, full))
            .collect();
        for j in 0..layout.streams.len() {
            for s in 0..layout.stages {
                inits.push((layout.stream_full(j) + 8 * s, full));
                inits.push((layout.stream_empty(j) + 8 * s, warps));
            }
        }
        for (t, _) in &layout.top {
            if let Some(off) = layout.top_empty(*t) {
                inits.push((off, warps));
            }
        }
        inits.sort_unstable();
        for (off, count) in inits {
            let a = self.barrier_addr(off, None);
            self.ins(format!("mbarrier.init.shared::cta.b64 [{a}], {count};"));
        }
        self.ins("fence.mbarrier_init.release.cluster;");
        self.body.push_str(&format!("{skip}:\n"));
        self.ins("bar.sync 0;");
        let producer = self.label("producer");
        // The warpgroup index, broadcast from lane 0 so that ptxas sees it is uniform across
        // the warp: a role test on `%tid` alone reads as divergent, and ptxas then serializes
        // every `wgmma` of the consumers (warning C7520).
        let wg = self.r();
        self.ins(format!("shr.u32 {wg}, %thr, 7;"));
        self.ins(format!("shfl.sync.idx.b32 {wg}, {wg}, 0, 31, -1;"));
        let is_producer = self.pred();
        self.ins(format!(
            "setp.ge.u32 {is_producer}, {wg}, {};",
            consumers / PRODUCER_THREADS
        ));
        self.ins(format!("@{is_producer} bra.uni {producer};"));
        let consumer_regs = consumer_registers(consumers, self.prog.schedule.loads);
        self.ins(format!("setmaxnreg.inc.sync.aligned.u32 {consumer_regs};"));
        producer
    }

    /// A consumer's `LoadTile` before the key loop: wait until the producer's copy landed.
    pub(super) fn emit_top_load_wait(&mut self, dst: SharedId) -> Result<(), TileError> {
        let Some(off) = self.layout().top_full(dst) else {
            return unsupported(
                "a tile loaded inside a nested statement of a warp-specialized program",
            );
        };
        self.comment(format!(
            "wait for {} (producer)",
            self.prog.shared[dst.index()].name
        ));
        let a = self.barrier_addr(off, None);
        // A persistent program's work tile `n` completes phase `n` of the barrier.
        let parity = if self.layout().persistent {
            TOP_PHASE
        } else {
            "0"
        };
        self.emit_barrier_wait(&a, parity);
        self.fence_copied_tile();
        Ok(())
    }

    /// After a consumer's wait: `cp.async` wrote the tile through the generic proxy, and
    /// `wgmma` reads it through the async one; the copy engine writes through the async
    /// proxy itself, and its completion on the barrier makes the tile visible to both.
    fn fence_copied_tile(&mut self) {
        if !self.prog.schedule.loads.tma() {
            self.ins("fence.proxy.async.shared::cta;");
        }
    }

    /// The producer copies tile `dst` of `src`, rows from `origin`, into shared memory at
    /// `smem` and has the barrier at `bar` count it landed: by the copy engine, or by the
    /// warpgroup's `cp.async` copies whose arrival the copy unit makes.
    fn emit_producer_copy(
        &mut self,
        dst: SharedId,
        src: TensorId,
        origin: &str,
        smem: &str,
        bar: &str,
    ) -> Result<(), TileError> {
        if self.prog.schedule.loads.tma() {
            self.emit_tma_load(dst, src, origin, smem, bar);
        } else {
            self.emit_load_issue(dst, src, origin, smem, None)?;
            self.ins(format!(
                "cp.async.mbarrier.arrive.noinc.shared::cta.b64 [{bar}];"
            ));
        }
        Ok(())
    }

    /// The copy engine copies tile `dst` of `src`, rows from `origin`, into shared memory at
    /// `smem`, completing on the barrier at `bar`: one box per 64-column block, the
    /// barrier told the tile's bytes first. Issued by one thread.
    fn emit_tma_load(&mut self, dst: SharedId, src: TensorId, origin: &str, smem: &str, bar: &str) {
        let prog = self.prog;
        let t = &prog.shared[dst.index()];
        let box_cols = TMA_BOX_BYTES / t.elem.bytes();
        let bytes = t.rows * t.cols * t.elem.bytes();
        let head = if prog.tensors[src.index()].rows == SeqRank::Query {
            "%hidx"
        } else {
            "%hkidx"
        };
        self.ins(format!(
            "mbarrier.arrive.expect_tx.shared::cta.b64 _, [{bar}], {bytes};"
        ));
        for block in 0..t.cols / box_cols {
            let col = self.r();
            self.ins(format!("mov.u32 {col}, {};", block * box_cols));
            self.ins(format!(
                "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [{smem}+{}], [%tmap{}, {{{col}, {origin}, {head}, %bidx}}], [{bar}];",
                block * t.rows * TMA_BOX_BYTES,
                src.0
            ));
        }
    }

    fn emit_ring_advance(&mut self) {
        let stages = self.prog.schedule.stages;
        self.ins(format!("add.u32 {STAGE}, {STAGE}, 1;"));
        let wrap = self.pred();
        self.ins(format!("setp.eq.u32 {wrap}, {STAGE}, {stages};"));
        self.ins(format!("selp.u32 {STAGE}, 0, {STAGE}, {wrap};"));
        self.ins(format!("@{wrap} xor.b32 {PHASE}, {PHASE}, 1;"));
    }

    /// The producer warpgroup's whole program: the tiles before the loop, then every key
    /// tile of the loop into the ring.
    pub(super) fn emit_producer(&mut self, label: &str) -> Result<(), TileError> {
        let prog = self.prog;
        let layout = self.layout().clone();
        self.body.push_str(&format!("{label}:\n"));
        self.ins(format!(
            "setmaxnreg.dec.sync.aligned.u32 {};",
            producer_registers(prog.schedule.loads)
        ));
        let pthr = self.named(".b32", "pthr");
        self.ins(format!("sub.u32 {pthr}, %thr, {};", prog.threads()));
        self.load_thread = (pthr.clone(), PRODUCER_THREADS);
        let tma = prog.schedule.loads.tma();
        let done = self.label("producer_done");
        if tma {
            // One thread issues every copy; the rest of the warpgroup has nothing to do.
            let idle = self.pred();
            self.ins(format!("setp.ne.u32 {idle}, {pthr}, 0;"));
            self.ins(format!("@{idle} bra {done};"));
            for (t, _) in prog.tensor_maps() {
                self.ins(format!("prefetch.tensormap [%tmap{}];", t.0));
            }
        }
        let work = if layout.persistent {
            Some(self.emit_work_loop_head("pwork")?)
        } else {
            None
        };
        for (dst, src) in &layout.top {
            self.comment(format!(
                "producer: load {} <- {}",
                prog.shared[dst.index()].name,
                prog.tensors[src.index()].name
            ));
            if let Some(off) = layout.top_empty(*dst) {
                // The consumers are done with the previous work tile's copy (a fresh
                // barrier reports the phase before the first complete).
                self.comment("producer: wait until the previous work tile's copy is free");
                let a = self.barrier_addr(off, None);
                let parity = self.r();
                self.ins(format!("xor.b32 {parity}, {TOP_PHASE}, 1;"));
                self.emit_barrier_wait(&a, &parity);
            }
            let base = self.smem_base[dst.index()].clone();
            let off = layout.top_full(*dst).expect("top tiles have barriers");
            let a = self.barrier_addr(off, None);
            self.emit_producer_copy(*dst, *src, "%qrow0", &base, &a)?;
        }
        if let Some((block_n, masks)) = prog.body.iter().find_map(|s| match s {
            Stmt::KeyLoop { block_n, masks, .. } => Some((*block_n, masks.clone())),
            _ => None,
        }) {
            self.emit_producer_loop(block_n, &masks)?;
        }
        if let Some(work) = work {
            self.emit_work_loop_tail(&work);
        }
        if !tma {
            // No copy outlives its thread.
            self.ins("cp.async.wait_all;");
        }
        // (The copy engine's copies complete on their barriers, which the consumers wait
        // for before they finish.)
        self.body.push_str(&format!("{done}:\n"));
        Ok(())
    }

    /// The producer's key loop: every key tile of the consumers' loop into the ring.
    fn emit_producer_loop(&mut self, block_n: u32, masks: &[BandMask]) -> Result<(), TileError> {
        let layout = self.layout().clone();
        self.comment("producer: the key loop's tiles");
        self.emit_key_range(block_n, masks);
        self.emit_ring_start();
        let it = self.named_once(".b32", "pit");
        self.ins(format!("mov.u32 {it}, 0;"));
        let (top, end) = self.emit_loop_head(&it, "ptop", "pend");
        let origin = self.r();
        self.ins(self.tile_of(&origin, &it));
        self.ins(format!("mul.lo.s32 {origin}, {origin}, {block_n};"));
        let parity = self.r();
        self.ins(format!("xor.b32 {parity}, {PHASE}, 1;"));
        // Each tile in turn (K before V): wait until the consumers are done with this
        // stage's previous round of it, copy, and publish it once its copies are in.
        for (j, (dst, src)) in layout.streams.iter().enumerate() {
            let free = self.barrier_addr(layout.stream_empty(j), Some(STAGE));
            self.emit_barrier_wait(&free, &parity);
            let sb = self.r();
            self.ins(format!(
                "mad.lo.u32 {sb}, {STAGE}, {}, {};",
                self.stage_bytes(*dst),
                self.smem_base[dst.index()]
            ));
            let a = self.barrier_addr(layout.stream_full(j), Some(STAGE));
            self.emit_producer_copy(*dst, *src, &origin, &sb, &a)?;
        }
        self.emit_ring_advance();
        self.ins(format!("add.s32 {it}, {it}, 1;"));
        self.ins(format!("bra.uni {top};"));
        self.body.push_str(&format!("{end}:\n"));
        Ok(())
    }

    fn stage_bytes(&self, t: SharedId) -> u32 {
        let t = &self.prog.shared[t.index()];
        (t.rows * t.cols * t.elem.bytes()).div_ceil(SMEM_ALIGN) * SMEM_ALIGN
    }

    /// The ring starts at stage 0, phase 0: at each key loop, or, in a persistent program,
    /// once before the first work tile (the rings run on across work tiles, the producer
    /// and the consumers advancing them by the same key tiles).
    fn emit_ring_start(&mut self) {
        if !self.layout().persistent {
            self.emit_ring_zero();
        }
    }

    pub(super) fn emit_ring_zero(&mut self) {
        self.named_once(".b32", &STAGE[1..]);
        self.named_once(".b32", &PHASE[1..]);
        self.ins(format!("mov.u32 {STAGE}, 0;"));
        self.ins(format!("mov.u32 {PHASE}, 0;"));
    }

    /// Points the streamed tiles at stage `stage` of their rings.
    fn select_stage(&mut self, tiles: &[SharedId], stage: &str, ring_base: &[String]) {
        for t in tiles {
            let j = self.layout().stream_index(*t).expect("streams have rings");
            let sb = self.r();
            self.ins(format!(
                "mad.lo.u32 {sb}, {stage}, {}, {};",
                self.stage_bytes(*t),
                ring_base[j]
            ));
            self.smem_base[t.index()] = sb;
        }
    }

    /// Waits for the streamed tiles `st` reads that this iteration has not waited for.
    fn wait_streams_read_by(&mut self, st: &Stmt) {
        for t in shared_reads(st) {
            if let Some(i) = self.stream_waits.iter().position(|d| *d == t) {
                self.stream_waits.remove(i);
                let j = self
                    .layout()
                    .stream_index(t)
                    .expect("armed waits are streams");
                let off = self.layout().stream_full(j);
                self.comment(format!(
                    "wait for {} (producer)",
                    self.prog.shared[t.index()].name
                ));
                let a = self.barrier_addr(off, Some(STAGE));
                self.emit_barrier_wait(&a, PHASE);
                self.fence_copied_tile();
            }
        }
    }

    /// Releases the stages in `releases` that no pending `wgmma` group reads any more
    /// (all of them when `force`, after waiting for every group).
    fn release_stages(&mut self, releases: &mut Vec<Release>, force: bool) {
        if force && !releases.is_empty() {
            self.wait_wgmma(0);
        }
        let mut i = 0;
        while i < releases.len() {
            let r = &releases[i];
            let busy = self
                .wgmma_pending
                .iter()
                .any(|g| g.shared.contains(&r.tile));
            if busy {
                i += 1;
                continue;
            }
            let r = releases.remove(i);
            let j = self
                .layout()
                .stream_index(r.tile)
                .expect("releases are streams");
            let off = self.layout().stream_empty(j);
            self.comment(format!(
                "this warp is done with {} at this stage",
                self.prog.shared[r.tile.index()].name
            ));
            let a = self.barrier_addr(off, Some(&r.stage));
            let lane0 = self.pred();
            self.ins(format!("setp.eq.u32 {lane0}, %lane, 0;"));
            self.ins(format!(
                "@{lane0} mbarrier.arrive.shared::cta.b64 _, [{a}];"
            ));
        }
    }

    /// The consumers' key loop of a warp-specialized program (see the module docs: waits,
    /// releases, rotation, ping-pong).
    pub(super) fn emit_specialized_key_loop(
        &mut self,
        block_n: u32,
        masks: &[BandMask],
        body: &[Stmt],
    ) -> Result<(), TileError> {
        let prog = self.prog;
        let layout = self.layout().clone();
        let tiles: Vec<SharedId> = layout.streams.iter().map(|(d, _)| *d).collect();
        let ring_base: Vec<String> = tiles
            .iter()
            .map(|d| self.smem_base[d.index()].clone())
            .collect();
        let first_contract = body.iter().position(|s| {
            matches!(s, Stmt::Contract { .. }) && shared_reads(s).iter().any(|t| tiles.contains(t))
        });
        let deferred = first_contract.and_then(|fc| deferred_contraction(self, body, fc));
        let deferred_tiles: Vec<SharedId> = deferred
            .map(|i| shared_reads(&body[i]))
            .unwrap_or_default()
            .into_iter()
            .filter(|t| tiles.contains(t))
            .collect();
        let groups = prog.schedule.warps / 4;
        let pingpong = matches!(
            prog.schedule.loads,
            Loads::ProducerWarpgroup { pingpong: true, .. }
        ) && groups >= 2
            && first_contract.is_some();
        self.comment(format!(
            "consumers' key loop: {}{}",
            if deferred.is_some() {
                "trailing contraction deferred to the next iteration, the first key tile peeled"
            } else {
                "no deferred contraction"
            },
            if pingpong {
                ", warpgroups issue their contractions in turn (ping-pong)"
            } else {
                ""
            }
        ));
        self.emit_key_range(block_n, masks);
        self.emit_ring_start();
        let wg = self.named_once(".b32", "wgidx");
        self.ins(format!("shr.u32 {wg}, %warp, 2;"));
        let turns = Turns {
            mine: self.named_once(".b32", "turn_mine"),
            next: self.named_once(".b32", "turn_next"),
            last_group: self.named_once(".pred", "last_wg"),
            on: pingpong,
        };
        if pingpong {
            // Named barriers 1..=groups: warpgroup w waits on 1 + w, then opens 1 + (w+1) % G.
            let (my_turn, next_turn, last_group) = (&turns.mine, &turns.next, &turns.last_group);
            self.ins(format!("add.u32 {my_turn}, {wg}, 1;"));
            self.ins(format!("add.u32 {next_turn}, {wg}, 1;"));
            let wrap = self.pred();
            self.ins(format!("setp.eq.u32 {wrap}, {next_turn}, {groups};"));
            self.ins(format!("selp.u32 {next_turn}, 0, {next_turn}, {wrap};"));
            self.ins(format!("add.u32 {next_turn}, {next_turn}, 1;"));
            self.ins(format!("setp.eq.u32 {last_group}, {wg}, {};", groups - 1));
            let open = self.pred();
            self.ins(format!("setp.gt.s32 {open}, %niter, 0;"));
            self.ins(format!("and.pred {open}, {open}, {last_group};"));
            self.ins(format!("@{open} bar.arrive 1, {TURN_THREADS};"));
        }
        let it = self.named_once(".b32", "it");
        self.ins(format!("mov.u32 {it}, 0;"));
        let lp = ConsumerLoop {
            block_n,
            masks,
            body,
            tiles,
            ring_base,
            first_contract,
            deferred,
            deferred_tiles,
            turns,
            it,
            prev: self.named_once(".b32", "ws_prev"),
        };
        let Some(d) = deferred else {
            let (top, end) = self.emit_loop_head(&lp.it, "ktop", "kend");
            self.emit_consumer_iteration(&lp, Peel::None)?;
            self.ins(format!("bra.uni {top};"));
            self.body.push_str(&format!("{end}:\n"));
            self.restore_ring_bases(&lp);
            return Ok(());
        };
        // The first key tile is peeled: it has no deferred contraction before it, so the
        // loop issues its own unconditionally. (A branch between a `wgmma` and an empty
        // group made ptxas inject a `warpgroup.arrive` (C7519), and inside a persistent
        // program's loop over work tiles serialize every `wgmma` (C7520).)
        let skip = self.label("nokeys");
        let none = self.pred();
        self.ins(format!("setp.le.s32 {none}, %niter, 0;"));
        self.ins(format!("@{none} bra.uni {skip};"));
        self.emit_consumer_iteration(&lp, Peel::First)?;
        let (top, end) = self.emit_loop_head(&lp.it, "ktop", "kend");
        self.emit_consumer_iteration(&lp, Peel::Rest)?;
        self.ins(format!("bra.uni {top};"));
        self.body.push_str(&format!("{end}:\n"));
        self.comment("the last key tile's deferred contraction");
        lp.turns.wait(self);
        // After the loop STAGE is one past the last tile's stage.
        self.emit_previous_stage(&lp.prev);
        self.select_stage(&lp.deferred_tiles, &lp.prev, &lp.ring_base);
        self.in_loop = true;
        self.emit_stmt(
            &body[d],
            Some(&LoopState {
                masks: masks.to_vec(),
            }),
        )?;
        self.in_loop = false;
        if pingpong {
            // The last warpgroup's final arrive would have no turn to open.
            self.ins(format!(
                "@!{} bar.arrive {}, {TURN_THREADS};",
                lp.turns.last_group, lp.turns.next
            ));
        }
        // Its stage goes back to the producer too: a persistent program's next work tile
        // fills it again.
        let mut releases: Vec<Release> = lp
            .deferred_tiles
            .iter()
            .map(|t| Release {
                tile: *t,
                stage: lp.prev.clone(),
            })
            .collect();
        self.release_stages(&mut releases, true);
        self.wait_wgmma(0);
        self.body.push_str(&format!("{skip}:\n"));
        self.restore_ring_bases(&lp);
        Ok(())
    }

    fn restore_ring_bases(&mut self, lp: &ConsumerLoop) {
        for (t, base) in lp.tiles.iter().zip(&lp.ring_base) {
            self.smem_base[t.index()] = base.clone();
        }
    }

    /// `prev` = the stage before `STAGE` (the ring's previous key tile).
    fn emit_previous_stage(&mut self, prev: &str) {
        let stages = self.prog.schedule.stages;
        self.ins(format!("add.u32 {prev}, {STAGE}, {};", stages - 1));
        let w = self.pred();
        self.ins(format!("setp.ge.u32 {w}, {prev}, {stages};"));
        self.ins(format!("@{w} sub.u32 {prev}, {prev}, {stages};"));
    }

    /// One key tile of the consumers' loop: its waits, statements, releases, and the
    /// ring's advance. `peel` says whether the previous tile's deferred contraction is
    /// issued after this tile's first one (`Rest`), not (`First`: there is none), or
    /// whether nothing is deferred (`None`).
    fn emit_consumer_iteration(&mut self, lp: &ConsumerLoop, peel: Peel) -> Result<(), TileError> {
        let (block_n, body) = (lp.block_n, lp.body);
        let korg = self.named_once(".b32", "korg");
        self.ins(self.tile_of(&korg, &lp.it));
        self.ins(format!("mul.lo.s32 {korg}, {korg}, {block_n};"));
        self.emit_tile_position(block_n, lp.masks);
        self.select_stage(&lp.tiles, STAGE, &lp.ring_base);
        self.stream_waits = lp.tiles.clone();
        if peel == Peel::Rest {
            // The previous iteration's stage, read by the deferred contraction.
            self.emit_previous_stage(&lp.prev);
        }
        let st = LoopState {
            masks: lp.masks.to_vec(),
        };
        self.in_loop = true;
        if let Some(fc) = lp.first_contract {
            self.wait_streams_read_by(&body[fc]);
        }
        lp.turns.wait(self);
        // The last statement (other than the deferred one) reading each streamed tile.
        let last_reader = |t: SharedId| {
            body.iter()
                .enumerate()
                .rfind(|(i, s)| Some(*i) != lp.deferred && shared_reads(s).contains(&t))
                .map(|(i, _)| i)
        };
        let mut releases: Vec<Release> = Vec::new();
        for (i, s) in body.iter().enumerate() {
            if Some(i) == lp.deferred || matches!(s, Stmt::LoadTile { .. }) {
                continue;
            }
            self.wait_for_conflicting_wgmma(s);
            self.release_stages(&mut releases, false);
            // The deferred contraction is not printed next: no fold into it.
            let next = body.get(i + 1).filter(|_| Some(i + 1) != lp.deferred);
            if self.fold_zero_fill(s, next) {
                continue;
            }
            self.wait_streams_read_by(s);
            self.emit_stmt(s, Some(&st))?;
            if Some(i) == lp.first_contract {
                if let (Some(d), Peel::Rest) = (lp.deferred, peel) {
                    // Issued after this tile's first contraction, so the statements that
                    // wait for that one leave the deferred group running.
                    self.comment("the previous key tile's deferred contraction");
                    self.select_stage(&lp.deferred_tiles, &lp.prev, &lp.ring_base);
                    self.emit_stmt(&body[d], Some(&st))?;
                    if let Some(g) = self.wgmma_pending.last_mut() {
                        g.pinned = self.prog.schedule.pin_deferred_wait;
                    }
                    self.select_stage(&lp.deferred_tiles, STAGE, &lp.ring_base);
                    for t in &lp.deferred_tiles {
                        releases.push(Release {
                            tile: *t,
                            stage: lp.prev.clone(),
                        });
                    }
                }
                if lp.turns.on {
                    self.ins(format!("bar.arrive {}, {TURN_THREADS};", lp.turns.next));
                }
            }
            for t in &lp.tiles {
                if last_reader(*t) == Some(i) && !lp.deferred_tiles.contains(t) {
                    releases.push(Release {
                        tile: *t,
                        stage: STAGE.to_string(),
                    });
                }
            }
            self.release_stages(&mut releases, false);
        }
        // The deferred contraction reads this tile next iteration: wait for it now.
        if let Some(d) = lp.deferred {
            self.wait_streams_read_by(&body[d]);
        }
        self.release_stages(&mut releases, true);
        self.in_loop = false;
        self.emit_ring_advance();
        self.ins(format!("add.s32 {}, {}, 1;", lp.it, lp.it));
        Ok(())
    }
}

/// Whether a key tile of the consumers' loop issues the previous tile's deferred
/// contraction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peel {
    /// Nothing is deferred.
    None,
    /// The peeled first key tile: no previous tile.
    First,
    /// Every later key tile.
    Rest,
}

/// The ping-pong turns of the consumer warpgroups (named barriers), when `on`.
struct Turns {
    mine: String,
    next: String,
    last_group: String,
    on: bool,
}

impl Turns {
    fn wait(&self, p: &mut Printer) {
        if self.on {
            p.ins(format!("bar.sync {}, {TURN_THREADS};", self.mine));
        }
    }
}

/// What every key tile of the consumers' loop shares.
struct ConsumerLoop<'b> {
    block_n: u32,
    masks: &'b [BandMask],
    body: &'b [Stmt],
    tiles: Vec<SharedId>,
    ring_base: Vec<String>,
    first_contract: Option<usize>,
    deferred: Option<usize>,
    deferred_tiles: Vec<SharedId>,
    turns: Turns,
    /// The key tile's index in the loop.
    it: String,
    /// The previous key tile's stage.
    prev: String,
}

/// A stage of a streamed tile to hand back to the producer once no `wgmma` group reads it.
struct Release {
    tile: SharedId,
    /// Register holding the stage.
    stage: String,
}

/// The body's trailing contraction that may run in the next iteration, right after that
/// iteration's first contraction `first` (see the module docs): the last `Contract`, when
/// it reads a streamed tile, comes after `first`, and moving it is invisible: no statement
/// after it in its own iteration, and none up to `first` in the next, touches its
/// registers (the loads, which touch only shared tiles, aside) or writes a shared tile it
/// reads (probabilities through shared memory are rewritten only after it).
fn deferred_contraction(p: &Printer, body: &[Stmt], first: usize) -> Option<usize> {
    let streamed = p.prog.streamed_tiles();
    let i = body
        .iter()
        .rposition(|s| matches!(s, Stmt::Contract { .. }))?;
    let Stmt::Contract { b, .. } = &body[i] else {
        return None;
    };
    if i <= first || !streamed.contains(b) {
        return None;
    }
    let (regs, _, _) = p.stmt_footprint(&body[i]);
    let reads = shared_reads(&body[i]);
    let untouched = |s: &Stmt| {
        if matches!(s, Stmt::LoadTile { .. }) {
            return true;
        }
        let (r, writes, all) = p.stmt_footprint(s);
        !all && !r.iter().any(|x| regs.contains(x)) && !writes.iter().any(|t| reads.contains(t))
    };
    body[i + 1..]
        .iter()
        .chain(&body[..=first])
        .all(untouched)
        .then_some(i)
}
