//! The key loop's narrowing by an equality of per-token values (a document mask,
//! [`TileProgram::key_narrowing`]): at the end of the setup every thread of the CTA takes
//! part in finding the range of the query rows' tokens, then the first and the last key
//! (within the band masks) whose token lies in it. `%nkstart`/`%nkend` bound the keys every
//! loop of the program walks, so a producer and its consumers skip the same tiles;
//! `%nvlo`/`%nvhi` bound the keys that need no value mask (all of them hold the rows' one
//! value).

use super::*;

/// Keys each thread reads per round of the scan (independent loads in flight).
const SCAN_UNROLL: u32 = 4;

impl Printer<'_> {
    pub(super) fn emit_key_narrowing(&mut self, tm: TokenMatch) -> Result<(), TileError> {
        let prog = self.prog;
        let threads = prog.launch_threads();
        let warps = threads / 32;
        // Scratch: two words per warp for the query range and three for the keys, in the
        // first shared tile, which nothing has written yet (the body loads it after the
        // last barrier).
        let scratch_bytes = warps * 20;
        let first_tile = prog
            .shared
            .first()
            .map_or(0, |t| t.rows * t.cols * t.elem.bytes());
        if first_tile < scratch_bytes {
            return Err(TileError::Unsupported(
                "key narrowing needs a shared tile to hold its reduction".into(),
            ));
        }
        let (q, k) = (tm.query.0, tm.key.0);
        self.ins("// key narrowing: the query rows' token range, then the keys within it");
        let lo = self.named(".f32", "nqlo");
        let hi = self.named(".f32", "nqhi");
        self.ins(format!("mov.f32 {lo}, 0f7F800000;"));
        self.ins(format!("mov.f32 {hi}, 0fFF800000;"));
        let qend = self.r();
        self.ins(format!(
            "add.s32 {qend}, %qrow0, {};",
            prog.schedule.block_m
        ));
        self.ins(format!("min.s32 {qend}, {qend}, %nq;"));
        for i in 0..prog.schedule.block_m.div_ceil(threads) {
            let (row, ok, addr, v) = (self.r(), self.pred(), self.rd(), self.f());
            self.ins(format!("add.s32 {row}, %qrow0, %thr;"));
            if i > 0 {
                self.ins(format!("add.s32 {row}, {row}, {};", i * threads));
            }
            self.ins(format!("setp.lt.s32 {ok}, {row}, {qend};"));
            self.token_address(&addr, &row, q);
            self.ins(format!("@{ok} ld.global.nc.f32 {v}, [{addr}];"));
            self.ins(format!("@{ok} min.f32 {lo}, {lo}, {v};"));
            self.ins(format!("@{ok} max.f32 {hi}, {hi}, {v};"));
        }
        for (reg, op) in [(&lo, "min"), (&hi, "max")] {
            for off in [16, 8, 4, 2, 1] {
                let t = self.f();
                self.ins(format!("shfl.sync.bfly.b32 {t}, {reg}, {off}, 31, -1;"));
                self.ins(format!("{op}.f32 {reg}, {reg}, {t};"));
            }
        }
        let slot = self.r();
        self.ins(format!("mad.lo.u32 {slot}, %warp, 8, %smem;"));
        let lane0 = self.pred();
        self.ins(format!("setp.eq.u32 {lane0}, %lane, 0;"));
        self.ins(format!("@{lane0} st.shared.f32 [{slot}], {lo};"));
        self.ins(format!("@{lane0} st.shared.f32 [{slot}+4], {hi};"));
        self.ins("bar.sync 0;");
        for w in 0..warps {
            let (a, b) = (self.f(), self.f());
            self.ins(format!("ld.shared.f32 {a}, [%smem+{}];", w * 8));
            self.ins(format!("ld.shared.f32 {b}, [%smem+{}];", w * 8 + 4));
            self.ins(format!("min.f32 {lo}, {lo}, {a};"));
            self.ins(format!("max.f32 {hi}, {hi}, {b};"));
        }
        // The keys the band masks leave (the loops narrow the same way).
        let (kstart, kend) = (self.r(), self.r());
        let masks = prog
            .body
            .iter()
            .find_map(|s| match s {
                Stmt::KeyLoop { masks, .. } => Some(masks.clone()),
                _ => None,
            })
            .unwrap_or_default();
        self.emit_band_keys(&kstart, &kend, &masks);
        let first = self.named(".b32", "nkstart");
        let last = self.named(".b32", "nkend");
        self.ins(format!("mov.s32 {first}, 2147483647;"));
        self.ins(format!("mov.s32 {last}, -1;"));
        let hits = self.r();
        self.ins(format!("mov.s32 {hits}, 0;"));
        let key = self.r();
        self.ins(format!("add.s32 {key}, {kstart}, %thr;"));
        let (top, done) = (self.label("narrow_scan"), self.label("narrow_done"));
        self.body.push_str(&format!("{top}:\n"));
        let past = self.pred();
        self.ins(format!("setp.ge.s32 {past}, {key}, {kend};"));
        self.ins(format!("@{past} bra {done};"));
        let mut loaded = Vec::new();
        for u in 0..SCAN_UNROLL {
            let (ku, ok, addr, v) = (self.r(), self.pred(), self.rd(), self.f());
            self.ins(format!("add.s32 {ku}, {key}, {};", u * threads));
            self.ins(format!("setp.lt.s32 {ok}, {ku}, {kend};"));
            self.token_address(&addr, &ku, k);
            self.ins(format!("@{ok} ld.global.nc.f32 {v}, [{addr}];"));
            loaded.push((ku, ok, v));
        }
        for (ku, ok, v) in loaded {
            let hit = self.pred();
            self.ins(format!("setp.ge.and.f32 {hit}, {v}, {lo}, {ok};"));
            self.ins(format!("setp.le.and.f32 {hit}, {v}, {hi}, {hit};"));
            self.ins(format!("@{hit} min.s32 {first}, {first}, {ku};"));
            self.ins(format!("@{hit} max.s32 {last}, {last}, {ku};"));
            self.ins(format!("@{hit} add.s32 {hits}, {hits}, 1;"));
        }
        self.ins(format!("add.s32 {key}, {key}, {};", SCAN_UNROLL * threads));
        self.ins(format!("bra {top};"));
        self.body.push_str(&format!("{done}:\n"));
        self.ins(format!("redux.sync.min.s32 {first}, {first}, -1;"));
        self.ins(format!("redux.sync.max.s32 {last}, {last}, -1;"));
        self.ins(format!("redux.sync.add.s32 {hits}, {hits}, -1;"));
        let slot = self.r();
        self.ins(format!("mad.lo.u32 {slot}, %warp, 12, %smem;"));
        let base = warps * 8;
        self.ins(format!("@{lane0} st.shared.s32 [{slot}+{base}], {first};"));
        self.ins(format!(
            "@{lane0} st.shared.s32 [{slot}+{}], {last};",
            base + 4
        ));
        self.ins(format!(
            "@{lane0} st.shared.s32 [{slot}+{}], {hits};",
            base + 8
        ));
        self.ins("bar.sync 0;");
        self.ins(format!("mov.s32 {hits}, 0;"));
        for w in 0..warps {
            let (a, b, c) = (self.r(), self.r(), self.r());
            self.ins(format!("ld.shared.s32 {a}, [%smem+{}];", base + w * 12));
            self.ins(format!("ld.shared.s32 {b}, [%smem+{}];", base + w * 12 + 4));
            self.ins(format!("ld.shared.s32 {c}, [%smem+{}];", base + w * 12 + 8));
            self.ins(format!("min.s32 {first}, {first}, {a};"));
            self.ins(format!("max.s32 {last}, {last}, {b};"));
            self.ins(format!("add.s32 {hits}, {hits}, {c};"));
        }
        // Every thread has read the scratch before the body fills the tile (the copy
        // engine writes through the async proxy: order the reads before it).
        self.ins("bar.sync 0;");
        if prog.schedule.loads.tma() {
            self.ins("fence.proxy.async.shared::cta;");
        }
        // No key within the range: an empty loop.
        let none = self.pred();
        self.ins(format!("setp.gt.s32 {none}, {first}, {last};"));
        self.ins(format!("selp.s32 {first}, 0, {first}, {none};"));
        self.ins(format!("selp.s32 {last}, -1, {last}, {none};"));
        self.ins(format!("add.s32 {last}, {last}, 1;"));
        // Keys `[%nvlo, %nvhi)` all hold the query rows' one value (else empty): their
        // tiles need no value mask.
        let (vlo, vhi) = (self.named(".b32", "nvlo"), self.named(".b32", "nvhi"));
        let pure = self.pred();
        let span = self.r();
        self.ins(format!("sub.s32 {span}, {last}, {first};"));
        self.ins(format!("setp.eq.s32 {pure}, {span}, {hits};"));
        self.ins(format!("setp.eq.and.f32 {pure}, {lo}, {hi}, {pure};"));
        self.ins(format!("selp.s32 {vlo}, {first}, 0, {pure};"));
        self.ins(format!("selp.s32 {vhi}, {last}, 0, {pure};"));
        Ok(())
    }

    /// `addr` = the address of token input `t` at sequence position `pos` (this CTA's
    /// batch and head).
    fn token_address(&mut self, addr: &str, pos: &str, t: u32) {
        self.ins(format!("cvt.u64.u32 {addr}, {pos};"));
        self.ins(format!("mul.lo.u64 {addr}, {addr}, %tkrs{t};"));
        self.ins(format!("add.u64 {addr}, {addr}, %tkbase{t};"));
    }
}
