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
//!   stage of the ring, one `full` barrier per streamed tile and one `empty` barrier. The
//!   producer's 128 threads each copy their share of a tile, wait for their own copies,
//!   fence them into the async proxy (`wgmma` reads them next) and arrive on the tile's
//!   `full` barrier (count 128). Each consumer warp waits on a tile's `full` barrier just
//!   before its first statement that reads the tile (so `Q K^T` can start before V has
//!   landed), and, once the key tile's last `wgmma` is done, lane 0 arrives on the stage's
//!   `empty` barrier (count: consumer warps). The producer waits on `empty` before it
//!   overwrites a stage.
//! * **Phases.** Round `r` of a stage (iteration `it`, `r = it / stages`) completes phase
//!   `r` of its barriers. The consumers wait for parity `r & 1` of `full`; the producer for
//!   parity `(r & 1) ^ 1` of `empty`, which a fresh barrier reports complete, so the first
//!   round does not wait.

use super::*;

/// Register limits after the role split: the producer keeps few (addresses and counters),
/// the consumers take the rest of the register file (`setmaxnreg` wants multiples of 8).
pub(super) const PRODUCER_REGISTERS: u32 = 40;

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
        }
    }

    pub(super) fn count(&self) -> u32 {
        (self.top.len() + (self.streams.len() + 1) * self.stages as usize) as u32
    }

    pub(super) fn bytes(&self) -> u32 {
        8 * self.count()
    }

    /// Offset of the barrier of tile `t` loaded before the loop.
    fn top_full(&self, t: SharedId) -> Option<u32> {
        let i = self.top.iter().position(|(d, _)| *d == t)?;
        Some(self.base + 8 * i as u32)
    }

    /// Offset of stage 0's `full` barrier of stream `j` (stage `s` is `8 s` further).
    fn stream_full(&self, j: usize) -> u32 {
        self.base + 8 * (self.top.len() as u32 + j as u32 * self.stages)
    }

    /// Offset of stage 0's `empty` barrier.
    fn empty(&self) -> u32 {
        self.base + 8 * (self.top.len() as u32 + self.streams.len() as u32 * self.stages)
    }
}

/// Shared tiles a statement reads.
fn shared_reads(st: &Stmt) -> Vec<SharedId> {
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

pub(super) const WS_STAGE: &str = "%ws_stage";
const STAGE: &str = WS_STAGE;
const PHASE: &str = "%ws_phase";

impl Printer<'_> {
    fn layout(&self) -> &BarrierLayout {
        self.barriers
            .as_ref()
            .expect("a warp-specialized program has a barrier layout")
    }

    /// `addr` = the barrier at byte offset `off` plus `8 * stage` when a stage is given.
    fn barrier_addr(&mut self, off: u32, stage: Option<&str>) -> String {
        let a = self.r();
        match stage {
            Some(s) => self.ins(format!("mad.lo.u32 {a}, {s}, 8, %smem;")),
            None => self.ins(format!("mov.u32 {a}, %smem;")),
        }
        self.ins(format!("add.u32 {a}, {a}, {off};"));
        a
    }

    fn emit_barrier_wait(&mut self, addr: &str, parity: &str) {
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
        for i in 0..layout.count() {
            let off = layout.base + 8 * i;
            let count = if off >= layout.empty() {
                warps
            } else {
                PRODUCER_THREADS
            };
            let a = self.barrier_addr(off, None);
            self.ins(format!("mbarrier.init.shared::cta.b64 [{a}], {count};"));
        }
        self.ins("fence.mbarrier_init.release.cluster;");
        self.body.push_str(&format!("{skip}:\n"));
        self.ins("bar.sync 0;");
        let producer = self.label("producer");
        let is_producer = self.pred();
        self.ins(format!("setp.ge.u32 {is_producer}, %thr, {consumers};"));
        self.ins(format!("@{is_producer} bra.uni {producer};"));
        let consumer_regs = consumer_registers(consumers);
        self.ins(format!(
            "setmaxnreg.inc.sync.aligned.u32 {consumer_regs};"
        ));
        producer
    }

    /// A consumer's `LoadTile` before the key loop: wait until the producer's copy landed.
    pub(super) fn emit_top_load_wait(&mut self, dst: SharedId) -> Result<(), TileError> {
        let Some(off) = self.layout().top_full(dst) else {
            return unsupported("a tile loaded inside a nested statement of a warp-specialized program");
        };
        self.comment(format!(
            "wait for {} (producer)",
            self.prog.shared[dst.index()].name
        ));
        let a = self.barrier_addr(off, None);
        self.emit_barrier_wait(&a, "0");
        Ok(())
    }

    /// Consumer key loop, before the body: stage and phase counters.
    pub(super) fn emit_consumer_ring_start(&mut self) {
        self.named_once(".b32", &STAGE[1..]);
        self.named_once(".b32", &PHASE[1..]);
        self.ins(format!("mov.u32 {STAGE}, 0;"));
        self.ins(format!("mov.u32 {PHASE}, 0;"));
    }

    /// Consumer key loop, top of an iteration: the streamed tiles not yet waited for.
    pub(super) fn arm_stream_waits(&mut self) {
        self.stream_waits = self.layout().streams.iter().map(|(d, _)| *d).collect();
    }

    /// Before a consumer statement inside the key loop: wait for the streamed tiles it reads
    /// that have not been waited for in this iteration.
    pub(super) fn wait_streams_read_by(&mut self, st: &Stmt) {
        for t in shared_reads(st) {
            if let Some(i) = self.stream_waits.iter().position(|d| *d == t) {
                self.stream_waits.remove(i);
                let j = self
                    .layout()
                    .streams
                    .iter()
                    .position(|(d, _)| *d == t)
                    .expect("armed waits are streams");
                let off = self.layout().stream_full(j);
                self.comment(format!(
                    "wait for {} (producer)",
                    self.prog.shared[t.index()].name
                ));
                let a = self.barrier_addr(off, Some(STAGE));
                self.emit_barrier_wait(&a, PHASE);
            }
        }
    }

    /// Consumer key loop, end of an iteration (every `wgmma` done): release the stage and
    /// advance the counters.
    pub(super) fn emit_consumer_release(&mut self) {
        self.stream_waits.clear();
        let off = self.layout().empty();
        self.comment("this warp is done with the stage");
        let a = self.barrier_addr(off, Some(STAGE));
        let lane0 = self.pred();
        self.ins(format!("setp.eq.u32 {lane0}, %lane, 0;"));
        self.ins(format!("@{lane0} mbarrier.arrive.shared::cta.b64 _, [{a}];"));
        self.emit_ring_advance();
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
            "setmaxnreg.dec.sync.aligned.u32 {PRODUCER_REGISTERS};"
        ));
        let pthr = self.named(".b32", "pthr");
        self.ins(format!("sub.u32 {pthr}, %thr, {};", prog.threads()));
        self.load_thread = (pthr, PRODUCER_THREADS);
        for (dst, src) in &layout.top {
            self.comment(format!(
                "producer: load {} <- {}",
                prog.shared[dst.index()].name,
                prog.tensors[src.index()].name
            ));
            let base = self.smem_base[dst.index()].clone();
            self.emit_load_issue(*dst, *src, "%qrow0", &base, None)?;
            self.ins("cp.async.commit_group;");
            self.ins("cp.async.wait_group 0;");
            self.ins("fence.proxy.async.shared::cta;");
            let off = layout.top_full(*dst).expect("top tiles have barriers");
            let a = self.barrier_addr(off, None);
            self.ins(format!("mbarrier.arrive.shared::cta.b64 _, [{a}];"));
        }
        let Some((block_n, masks)) = prog.body.iter().find_map(|s| match s {
            Stmt::KeyLoop { block_n, masks, .. } => Some((*block_n, masks.clone())),
            _ => None,
        }) else {
            return Ok(());
        };
        self.comment("producer: the key loop's tiles");
        self.emit_key_range(block_n, &masks);
        self.emit_consumer_ring_start();
        let it = self.named_once(".b32", "pit");
        self.ins(format!("mov.u32 {it}, 0;"));
        let top = self.label("ptop");
        let end = self.label("pend");
        self.body.push_str(&format!("{top}:\n"));
        let done = self.pred();
        self.ins(format!("setp.ge.s32 {done}, {it}, %niter;"));
        self.ins(format!("@{done} bra.uni {end};"));
        // The consumers are done with this stage's previous round.
        let free = self.barrier_addr(layout.empty(), Some(STAGE));
        let parity = self.r();
        self.ins(format!("xor.b32 {parity}, {PHASE}, 1;"));
        self.emit_barrier_wait(&free, &parity);
        let origin = self.r();
        self.ins(self.tile_of(&origin, &it));
        self.ins(format!("mul.lo.s32 {origin}, {origin}, {block_n};"));
        for (dst, src) in &layout.streams {
            let t = &prog.shared[dst.index()];
            let stage_bytes = (t.rows * t.cols * t.elem.bytes()).div_ceil(SMEM_ALIGN) * SMEM_ALIGN;
            let sb = self.r();
            self.ins(format!(
                "mad.lo.u32 {sb}, {STAGE}, {stage_bytes}, {};",
                self.smem_base[dst.index()]
            ));
            self.emit_load_issue(*dst, *src, &origin, &sb, None)?;
            self.ins("cp.async.commit_group;");
        }
        // Publish each tile as soon as its own copies are in (K before V).
        let n = layout.streams.len();
        for j in 0..n {
            self.ins(format!("cp.async.wait_group {};", n - 1 - j));
            self.ins("fence.proxy.async.shared::cta;");
            let a = self.barrier_addr(layout.stream_full(j), Some(STAGE));
            self.ins(format!("mbarrier.arrive.shared::cta.b64 _, [{a}];"));
        }
        self.emit_ring_advance();
        self.ins(format!("add.s32 {it}, {it}, 1;"));
        self.ins(format!("bra.uni {top};"));
        self.body.push_str(&format!("{end}:\n"));
        Ok(())
    }
}

/// The consumers' register limit: what the register file holds once the producer has
/// lowered its own (64K registers per SM, one CTA per SM), in multiples of 8, at most 255.
pub(super) fn consumer_registers(consumers: u32) -> u32 {
    let left = 65536 - PRODUCER_THREADS * PRODUCER_REGISTERS;
    (left / consumers / 8 * 8).min(248)
}
