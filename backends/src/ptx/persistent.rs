//! Persistent grids ([`TileSchedule::persistent`]): each CTA of a warp-specialized program
//! loops over work tiles instead of computing one.
//!
//! * **Work tiles.** There are `%ntiles = ceil(N_q / block_m) * B * H`; in round `r` the
//!   CTAs take tiles `r * nctaid.x` to `(r + 1) * nctaid.x - 1` (a static schedule: both
//!   roles walk the same list without talking; `tests::work_tile_index` models it). Without masks,
//!   consecutive tiles are the query tiles of one head, so CTAs running side by side read
//!   the same K and V from L2, and CTA `c` takes tile `c` of each round. With masks, the
//!   query tiles with the most key tiles come first (longest first: the last rounds are the
//!   short tiles), and the rounds alternate direction (CTA `c` takes tile `c`, then tile
//!   `nctaid.x - 1 - c`, ...): in plain round-robin the CTAs with low indices take the
//!   longer tile of every round, 3-6% more work than the average for causal masks at the
//!   benchmark's shapes, where the alternation leaves 0.2%.
//! * **Setup per work tile.** Everything the grid cell used to say (query tile, batch and
//!   head, tensor bases, query positions, head parameters) is set at the top of each work
//!   tile, by each role; the values hoisted out of the statements too, by the consumers
//!   (the producer evaluates no expression).
//! * **Barriers across work tiles.** The key loop's rings run on: the producer and the
//!   consumers advance stage and phase by the same key tiles, so their counts agree without
//!   a reset. A tile loaded before the key loop (Q) completes phase `n` of its `full`
//!   barrier in work tile `n` (`%ws_tphase` is `n & 1`) and gets an `empty` barrier, which
//!   the consumer warps arrive on as soon as no statement left in the work tile reads it
//!   (after the key loop): the producer then copies the next tile's Q while the consumers
//!   finish the last P V, normalize and store O.

use super::producer::{shared_reads, TOP_PHASE};
use super::*;

/// A role's loop over its work tiles.
pub(super) struct WorkLoop {
    top: String,
    exit: String,
}

/// How many work tiles this CTA has finished.
const WORK_COUNT: &str = "%ws_work";

impl Printer<'_> {
    /// In the setup: query tiles per (batch, head) in `%nqt`, `B * H` in `%nwbh`, work tiles
    /// in `%ntiles`.
    pub(super) fn emit_work_tile_count(&mut self) {
        let bm = self.prog.schedule.block_m;
        let nqt = self.named(".b32", "nqt");
        self.ins(format!("add.u32 {nqt}, %nq, {};", bm - 1));
        self.ins(format!("div.u32 {nqt}, {nqt}, {bm};"));
        let nbh = self.named(".b32", "nwbh");
        self.ins(format!("mul.lo.u32 {nbh}, %nbatch, %heads;"));
        let n = self.named(".b32", "ntiles");
        self.ins(format!("mul.lo.u32 {n}, {nqt}, {nbh};"));
    }

    /// The head of a role's loop over work tiles: the rings and counters start, then each
    /// iteration picks its work tile (leaving when there is none) and sets up its registers.
    pub(super) fn emit_work_loop_head(&mut self, name: &str) -> Result<WorkLoop, TileError> {
        self.emit_ring_zero();
        let tphase = self.named_once(".b32", &TOP_PHASE[1..]);
        let count = self.named_once(".b32", &WORK_COUNT[1..]);
        self.ins(format!("mov.u32 {tphase}, 0;"));
        self.ins(format!("mov.u32 {count}, 0;"));
        let work = WorkLoop {
            top: self.label(name),
            exit: self.label(&format!("{name}_end")),
        };
        self.body.push_str(&format!("{}:\n", work.top));
        let (t, stride) = (self.r(), self.r());
        self.ins(format!("mov.u32 {stride}, %nctaid.x;"));
        self.ins(format!("mov.u32 {t}, %ctaid.x;"));
        if self.prog.has_band_masks() {
            self.comment("odd rounds run the other way (tiles of unequal length)");
            let (mirror, odd) = (self.r(), self.pred());
            self.ins(format!("sub.u32 {mirror}, {stride}, {t};"));
            self.ins(format!("sub.u32 {mirror}, {mirror}, 1;"));
            let bit = self.r();
            self.ins(format!("and.b32 {bit}, {count}, 1;"));
            self.ins(format!("setp.ne.u32 {odd}, {bit}, 0;"));
            self.ins(format!("selp.u32 {t}, {mirror}, {t}, {odd};"));
        }
        self.ins(format!("mad.lo.u32 {t}, {count}, {stride}, {t};"));
        let done = self.pred();
        self.ins(format!("setp.ge.u32 {done}, {t}, %ntiles;"));
        self.ins(format!("@{done} bra.uni {};", work.exit));
        let (qtile, bh) = (self.r(), self.r());
        if self.prog.has_band_masks() {
            self.comment("work tile: longest first (the last query tiles of every head)");
            self.ins(format!("div.u32 {qtile}, {t}, %nwbh;"));
            self.ins(format!("rem.u32 {bh}, {t}, %nwbh;"));
            self.ins(format!("sub.u32 {qtile}, %nqt, {qtile};"));
            self.ins(format!("sub.u32 {qtile}, {qtile}, 1;"));
        } else {
            self.comment("work tile: the query tiles of one (batch, head) side by side");
            self.ins(format!("rem.u32 {qtile}, {t}, %nqt;"));
            self.ins(format!("div.u32 {bh}, {t}, %nqt;"));
        }
        self.emit_tile_setup(Some((&qtile, &bh)))?;
        Ok(work)
    }

    /// The end of a work tile: the next one's parity and count, and the loop's exit.
    pub(super) fn emit_work_loop_tail(&mut self, work: &WorkLoop) {
        self.ins(format!("xor.b32 {TOP_PHASE}, {TOP_PHASE}, 1;"));
        self.ins(format!("add.u32 {WORK_COUNT}, {WORK_COUNT}, 1;"));
        self.ins(format!("bra.uni {};", work.top));
        self.body.push_str(&format!("{}:\n", work.exit));
    }

    /// The consumers of a persistent program: the program's statements once per work
    /// tile, the tiles loaded before the key loop handed back as soon as nothing reads them.
    pub(super) fn emit_persistent_consumers(&mut self) -> Result<(), TileError> {
        let body = &self.prog.body;
        let work = self.emit_work_loop_head("work")?;
        // Values hoisted out of the statements depend on the work tile: they go here.
        self.body.push_str(SETUP_END);
        let top: Vec<SharedId> = self.layout().top.iter().map(|(d, _)| *d).collect();
        let reads_top = |s: &Stmt| {
            let inner: Vec<SharedId> = match s {
                Stmt::KeyLoop { body, .. } => body.iter().flat_map(shared_reads).collect(),
                _ => shared_reads(s),
            };
            inner.iter().any(|t| top.contains(t))
        };
        let split = body
            .iter()
            .rposition(reads_top)
            .map_or(body.len(), |i| i + 1);
        self.emit_block(&body[..split], None)?;
        self.emit_release_top_tiles();
        self.emit_block(&body[split..], None)?;
        // Nothing of this work tile may still run when the next one starts.
        self.wait_wgmma(0);
        self.emit_work_loop_tail(&work);
        Ok(())
    }

    /// Each consumer warp tells the producer it is done with the tiles loaded before the
    /// loop, once no `wgmma` group still reads them.
    fn emit_release_top_tiles(&mut self) {
        self.wait_wgmma(0);
        let layout = self.layout().clone();
        let lane0 = self.pred();
        self.ins(format!("setp.eq.u32 {lane0}, %lane, 0;"));
        for (t, _) in &layout.top {
            self.comment(format!(
                "this warp is done with {} for this work tile",
                self.prog.shared[t.index()].name
            ));
            let off = layout
                .top_empty(*t)
                .expect("a persistent program's top tiles have empty barriers");
            let a = self.barrier_addr(off, None);
            self.ins(format!(
                "@{lane0} mbarrier.arrive.shared::cta.b64 _, [{a}];"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    /// The work tile a persistent CTA takes in a round (what the printed loop head computes):
    /// round `round` covers tiles `round * grid ..`, CTA `cta` taking the `cta`-th of them, or
    /// with `alternate` (masked programs, longest tiles first) the `cta`-th from the end in odd
    /// rounds. Past `%ntiles`, the CTA is done.
    pub fn work_tile_index(round: u64, cta: u64, grid: u64, alternate: bool) -> u64 {
        let within = if alternate && round % 2 == 1 {
            grid - 1 - cta
        } else {
            cta
        };
        round * grid + within
    }

    /// Each CTA's rounds until its tile index passes `ntiles`, as the loop runs them.
    fn tiles_of(cta: u64, grid: u64, ntiles: u64, alternate: bool) -> Vec<u64> {
        (0..)
            .map(|r| work_tile_index(r, cta, grid, alternate))
            .take_while(|&t| t < ntiles)
            .collect()
    }

    #[test]
    fn every_work_tile_is_taken_once() {
        for grid in [1u64, 2, 7, 132] {
            for ntiles in [0u64, 1, 5, 131, 132, 133, 264, 1000, 2048] {
                for alternate in [false, true] {
                    let mut seen = vec![0u32; ntiles as usize];
                    for cta in 0..grid {
                        for t in tiles_of(cta, grid, ntiles, alternate) {
                            seen[t as usize] += 1;
                        }
                    }
                    assert!(
                        seen.iter().all(|&n| n == 1),
                        "grid {grid} ntiles {ntiles} alternate {alternate}"
                    );
                }
            }
        }
    }

    #[test]
    fn alternating_rounds_balance_causal_tiles() {
        // Causal work tiles longest first (query tile q of 32 has q + 1 key tiles, plus one
        // tile's worth of prologue and epilogue), B * H = 64 heads, 132 CTAs: the busiest
        // CTA's work over the mean.
        let (nqt, heads, grid) = (32u64, 64u64, 132u64);
        let length = |t: u64| nqt - t / heads + 1;
        let ntiles = nqt * heads;
        let imbalance = |alternate: bool| {
            let work: Vec<u64> = (0..grid)
                .map(|c| {
                    tiles_of(c, grid, ntiles, alternate)
                        .into_iter()
                        .map(length)
                        .sum()
                })
                .collect();
            let mean = work.iter().sum::<u64>() as f64 / grid as f64;
            *work.iter().max().unwrap_or(&0) as f64 / mean
        };
        let (plain, alternating) = (imbalance(false), imbalance(true));
        assert!(plain > 1.05, "round-robin {plain}");
        assert!(alternating < 1.01, "alternating {alternating}");
    }
}
