//! The key loop: `cp.async` tile loads into the multi-stage shared-memory ring, tile
//! skipping from the band masks, and the boundary-tile masking.

use super::*;

impl Printer<'_> {
    /// Issues the cp.async copies of one tile (no commit). `origin` holds the first row;
    /// `col`, when given, a register with the byte offset of the tile's first column in a
    /// wider tensor (a slice of a streamed contraction). Each thread copies one 16-byte chunk `thr % 8` of a 128-byte block row per step; the
    /// steps walk the first column block's rows, then the next block's, so the shared
    /// address is the same affine function of the step for every tile width.
    pub(super) fn emit_load_issue(
        &mut self,
        dst: SharedId,
        src: TensorId,
        origin: &str,
        smem: &str,
        col: Option<&str>,
    ) -> Result<(), TileError> {
        let prog = self.prog;
        let t = &prog.shared[dst.index()];
        let (thr, threads) = self.load_thread.clone();
        let rows_per_iter = threads / 8;
        if !t.rows.is_multiple_of(rows_per_iter) {
            return unsupported(format!(
                "tile {}: {threads} threads copy {rows_per_iter} rows per step, which must divide its {} rows",
                t.name, t.rows
            ));
        }
        let blocks = t.cols * t.elem.bytes() / ROW_BYTES;
        let iters = t.rows * blocks / rows_per_iter;
        // Bytes of a row in global memory.
        let row_bytes = t.cols * t.elem.bytes();
        let n = if t.rank == SeqRank::Query {
            "%nq"
        } else {
            "%nk"
        };
        // Thread's row within a step and its chunk.
        let trow = self.r();
        let tch = self.r();
        self.ins(format!("shr.u32 {trow}, {thr}, 3;"));
        self.ins(format!("and.b32 {tch}, {thr}, 7;"));
        // Shared: row * 128 + ((chunk ^ (row % 8)) * 16); steps add whole 8-row groups.
        let s = self.r();
        let x = self.r();
        self.ins(format!("and.b32 {x}, {trow}, 7;"));
        self.ins(format!("xor.b32 {x}, {x}, {tch};"));
        self.ins(format!("shl.b32 {x}, {x}, 4;"));
        self.ins(format!("mad.lo.u32 {s}, {trow}, {ROW_BYTES}, {smem};"));
        self.ins(format!("add.u32 {s}, {s}, {x};"));
        // Global: base + (origin + row) * row_stride + chunk * 16.
        let row0 = self.r();
        self.ins(format!("add.s32 {row0}, {origin}, {trow};"));
        let gaddr = self.rd();
        let tmp = self.rd();
        self.ins(format!("cvt.u64.u32 {gaddr}, {row0};"));
        self.ins(format!("mul.lo.u64 {gaddr}, {gaddr}, %rsb{};", src.0));
        self.ins(format!("add.u64 {gaddr}, {gaddr}, %base{};", src.0));
        self.ins(format!("mul.wide.u32 {tmp}, {tch}, 16;"));
        self.ins(format!("add.u64 {gaddr}, {gaddr}, {tmp};"));
        if let Some(col) = col {
            let cb = self.rd();
            self.ins(format!("cvt.u64.u32 {cb}, {col};"));
            self.ins(format!("add.u64 {gaddr}, {gaddr}, {cb};"));
        } else if t.cols < prog.tensors[src.index()].head_dim {
            // A column block of a wider tensor.
            let cb = self.rd();
            self.ins(format!("mul.wide.u32 {cb}, %colb, {row_bytes};"));
            self.ins(format!("add.u64 {gaddr}, {gaddr}, {cb};"));
        }
        for i in 0..iters {
            // Step i covers rows (i * rpi) % rows + [0, rpi) of column block (i * rpi) / rows.
            let row_off = (i * rows_per_iter) % t.rows;
            let block = (i * rows_per_iter) / t.rows;
            let row = self.r();
            self.ins(format!("add.s32 {row}, {row0}, {row_off};"));
            let ok = self.pred();
            self.ins(format!("setp.lt.s32 {ok}, {row}, {n};"));
            let sz = self.r();
            self.ins(format!("selp.u32 {sz}, 16, 0, {ok};"));
            let ga = self.rd();
            if row_off == 0 {
                self.ins(format!("mov.u64 {ga}, {gaddr};"));
            } else {
                self.ins(format!(
                    "mad.lo.u64 {ga}, %rsb{}, {row_off}, {gaddr};",
                    src.0
                ));
            }
            // Out-of-range rows read nothing (src_size 0); keep the address inside the tensor.
            self.ins(format!("selp.b64 {ga}, {ga}, %base{}, {ok};", src.0));
            self.ins(format!(
                "cp.async.cg.shared.global [{s}+{}], [{ga}+{}], 16, {sz};",
                i * rows_per_iter * ROW_BYTES,
                block * ROW_BYTES
            ));
        }
        Ok(())
    }

    /// The key tiles this CTA walks, from the band masks (tile skipping), its chunk and its
    /// split of the key loop: `%tbegin`, `%niter` and, in a reverse program, `%tlast`.
    pub(super) fn emit_key_range(&mut self, block_n: u32, masks: &[BandMask]) {
        let prog = self.prog;
        let kstart = self.named_once(".b32", "kstart");
        let kend = self.named_once(".b32", "kend");
        self.emit_band_keys(&kstart, &kend, masks);
        if prog.key_narrowing.is_some() {
            // The keys a value mask can keep (found in the setup).
            self.ins(format!("max.s32 {kstart}, {kstart}, %nkstart;"));
            self.ins(format!("min.s32 {kend}, {kend}, %nkend;"));
        }
        if prog.chunked() {
            // This chunk's tiles only.
            let span_keys = prog.chunk_tiles * block_n;
            self.ins(format!("mul.lo.u32 {kstart}, %lchunk, {span_keys};"));
            let span = self.r();
            self.ins(format!("add.s32 {span}, {kstart}, {span_keys};"));
            self.ins(format!("min.s32 {kend}, {kend}, {span};"));
        }
        let tbegin = self.named_once(".b32", "tbegin");
        let niter = self.named_once(".b32", "niter");
        self.ins(format!("div.s32 {tbegin}, {kstart}, {block_n};"));
        let tend = self.r();
        self.ins(format!("add.s32 {tend}, {kend}, {};", block_n - 1));
        self.ins(format!("div.s32 {tend}, {tend}, {block_n};"));
        self.ins(format!("sub.s32 {niter}, {tend}, {tbegin};"));
        let empty = self.pred();
        self.ins(format!("setp.le.s32 {empty}, {kend}, {kstart};"));
        self.ins(format!("selp.s32 {niter}, 0, {niter}, {empty};"));
        if prog.key_splits > 1 {
            // This CTA's run of a split loop (grid z): runs of ceil(tiles / splits) tiles.
            let splits = prog.key_splits;
            let (per, skip, rest) = (self.r(), self.r(), self.r());
            self.ins(format!("add.s32 {per}, {niter}, {};", splits - 1));
            self.ins(format!("div.s32 {per}, {per}, {splits};"));
            self.ins(format!("mov.u32 {skip}, %ctaid.z;"));
            self.ins(format!("mul.lo.s32 {skip}, {skip}, {per};"));
            self.ins(format!("add.s32 {tbegin}, {tbegin}, {skip};"));
            self.ins(format!("sub.s32 {rest}, {niter}, {skip};"));
            self.ins(format!("max.s32 {rest}, {rest}, 0;"));
            self.ins(format!("min.s32 {niter}, {rest}, {per};"));
        }
        // Iteration `it` walks tile `tbegin + it`, or `tlast - it` in a reverse program.
        let reverse = prog.reverse;
        if reverse {
            let tlast = self.named_once(".b32", "tlast");
            self.ins(format!("add.s32 {tlast}, {tbegin}, {niter};"));
            self.ins(format!("sub.s32 {tlast}, {tlast}, 1;"));
        }
    }

    /// `[kstart, kend)`: the keys the band masks leave this CTA's query rows (signed
    /// arithmetic).
    pub(super) fn emit_band_keys(&mut self, kstart: &str, kend: &str, masks: &[BandMask]) {
        self.ins(format!("mov.u32 {kstart}, 0;"));
        self.ins(format!("mov.u32 {kend}, %nk;"));
        for m in masks {
            let t = self.r();
            match m.direction {
                BandDirection::KeyMinusQuery => {
                    self.ins(format!("add.s32 {t}, %plastpos, {};", m.bound + 1));
                    self.ins(format!("min.s32 {kend}, {kend}, {t};"));
                }
                BandDirection::QueryMinusKey => {
                    self.ins(format!("sub.s32 {t}, %qpos0, {};", m.bound));
                    self.ins(format!("max.s32 {kstart}, {kstart}, {t};"));
                }
            }
        }
    }

    /// `dst` = the key tile of iteration `it`: `tbegin + it`, or `tlast - it` in a reverse
    /// program.
    pub(super) fn tile_of(&self, dst: &str, it: &str) -> String {
        if self.prog.reverse {
            format!("sub.s32 {dst}, %tlast, {it};")
        } else {
            format!("add.s32 {dst}, %tbegin, {it};")
        }
    }

    /// Per key tile: `%needmask` (a boundary tile: the key tail, or a band edge crossing
    /// it), this thread's first key column `%kcol` and its float `%kf`, from `%korg`.
    pub(super) fn emit_tile_position(&mut self, block_n: u32, masks: &[BandMask]) {
        let prog = self.prog;
        let korg = "%korg";
        let needmask = self.named_once(".pred", "needmask");
        let kcol = self.named_once(".b32", "kcol");
        let kf = self.named_once(".f32", "kf");
        // Boundary tile? key tail, or a band edge crossing the tile.
        let t = self.r();
        self.ins(format!("add.s32 {t}, {korg}, {block_n};"));
        self.ins(format!("setp.gt.s32 {needmask}, {t}, %nk;"));
        for m in masks {
            let x = self.r();
            match m.direction {
                BandDirection::KeyMinusQuery => {
                    // korg + block_n - 1 - p0 > bound
                    self.ins(format!("sub.s32 {x}, {korg}, %qpos0;"));
                    self.ins(format!(
                        "setp.gt.or.s32 {needmask}, {x}, {}, {needmask};",
                        m.bound - block_n as i64 + 1
                    ));
                }
                BandDirection::QueryMinusKey => {
                    // p_last - korg > bound
                    self.ins(format!("sub.s32 {x}, %plastpos, {korg};"));
                    self.ins(format!(
                        "setp.gt.or.s32 {needmask}, {x}, {}, {needmask};",
                        m.bound
                    ));
                }
            }
        }
        if !prog.value_masks.is_empty() {
            // `%needvmask`: the value masks too (a tile may need the bands alone).
            let needv = self.named_once(".pred", "needvmask");
            if prog.value_masks_are_the_narrowing() {
                // Inside the keys that all hold the rows' value, the value mask keeps all.
                let x = self.r();
                self.ins(format!("add.s32 {x}, {korg}, {block_n};"));
                self.ins(format!("setp.gt.s32 {needv}, {x}, %nvhi;"));
                self.ins(format!("setp.lt.or.s32 {needv}, {korg}, %nvlo, {needv};"));
            } else {
                self.ins(format!("setp.eq.u32 {needv}, 0, 0;"));
            }
            self.ins(format!("or.pred {needmask}, {needmask}, {needv};"));
        }
        if prog.sequential {
            // Positions inside a sequential program's tile are tile-relative.
            self.ins(format!("shl.b32 {kcol}, %tig, 1;"));
        } else {
            self.ins(format!("mad.lo.s32 {kcol}, %tig, 2, {korg};"));
        }
        self.ins(format!("cvt.rn.f32.s32 {kf}, {kcol};"));
    }

    /// The head of a loop over the key tiles: its top label, and the exit to its end label
    /// once `it` reaches `%niter`. Returns both labels.
    pub(super) fn emit_loop_head(&mut self, it: &str, top: &str, end: &str) -> (String, String) {
        let top = self.label(top);
        let end = self.label(end);
        self.body.push_str(&format!("{top}:\n"));
        let done = self.pred();
        self.ins(format!("setp.ge.s32 {done}, {it}, %niter;"));
        self.ins(format!("@{done} bra.uni {end};"));
        (top, end)
    }

    pub(super) fn emit_key_loop(
        &mut self,
        block_n: u32,
        masks: &[BandMask],
        body: &[Stmt],
    ) -> Result<(), TileError> {
        let prog = self.prog;
        let stages = prog.schedule.stages;
        self.comment(format!("key loop: tiles of {block_n}, {stages} stages"));
        if self.barriers.is_some() {
            return self.emit_specialized_key_loop(block_n, masks, body);
        }
        self.emit_key_range(block_n, masks);

        let streams: Vec<(SharedId, TensorId)> = body
            .iter()
            .filter_map(|s| match s {
                Stmt::LoadTile { dst, src } => Some((*dst, *src)),
                _ => None,
            })
            .collect();
        let ring_base: Vec<String> = streams
            .iter()
            .map(|(d, _)| self.smem_base[d.index()].clone())
            .collect();
        let stage_bytes: Vec<u32> = streams
            .iter()
            .map(|(d, _)| {
                let t = &prog.shared[d.index()];
                (t.rows * t.cols * t.elem.bytes()).div_ceil(SMEM_ALIGN) * SMEM_ALIGN
            })
            .collect();

        // A loop whose only streamed operands are a ContractStream's runs that statement's
        // ring alone: empty groups of this one would upset its `wait_group` counts.
        let own_ring = !(streams.is_empty() && body.iter().any(is_stream));
        // Issue tile `tile_reg` into stage `stage_reg` for every stream, if `tile < tend`.
        let issue = |p: &mut Printer, it_reg: &str, stage_reg: &str| -> Result<(), TileError> {
            let skip = p.label("noissue");
            let ok = p.pred();
            p.ins(format!("setp.ge.s32 {ok}, {it_reg}, %niter;"));
            p.ins(format!("@{ok} bra.uni {skip};"));
            let origin = p.r();
            p.ins(p.tile_of(&origin, it_reg));
            p.ins(format!("mul.lo.s32 {origin}, {origin}, {block_n};"));
            for (i, (dst, src)) in streams.iter().enumerate() {
                let sb = p.r();
                p.ins(format!(
                    "mad.lo.u32 {sb}, {stage_reg}, {}, {};",
                    stage_bytes[i], ring_base[i]
                ));
                p.emit_load_issue(*dst, *src, &origin, &sb, None)?;
            }
            p.body.push_str(&format!("{skip}:\n"));
            p.ins("cp.async.commit_group;");
            Ok(())
        };
        if !own_ring {
            self.emit_stream_prologue(body, block_n)?;
        }
        // Prologue: tiles 0 .. stages-2 into stages 0 .. stages-2.
        for s in (0..stages - 1).filter(|_| own_ring) {
            let it = self.r();
            self.ins(format!("mov.u32 {it}, {s};"));
            issue(self, &it, &it)?;
        }
        let it = self.named_once(".b32", "it");
        self.ins(format!("mov.u32 {it}, 0;"));
        let cur = self.named_once(".b32", "stage_cur");
        let nxt = self.named_once(".b32", "stage_next");
        self.ins(format!("mov.u32 {cur}, 0;"));
        self.ins(format!("mov.u32 {nxt}, {};", stages - 1));
        // Declared here so the printed register declarations keep their order.
        self.named_once(".pred", "needmask");
        self.named_once(".b32", "kcol");
        self.named_once(".f32", "kf");
        let (top, end) = self.emit_loop_head(&it, "ktop", "kend");
        if own_ring {
            self.ins(format!("cp.async.wait_group {};", stages - 2));
            self.emit_async_proxy_fence();
            self.ins("bar.sync 0;");
            let it_next = self.r();
            self.ins(format!("add.s32 {it_next}, {it}, {};", stages - 1));
            issue(self, &it_next, &nxt)?;
        }
        // Current tile.
        let korg = self.named_once(".b32", "korg");
        self.ins(self.tile_of(&korg, &it));
        self.ins(format!("mul.lo.s32 {korg}, {korg}, {block_n};"));
        let saved: Vec<String> = streams
            .iter()
            .map(|(d, _)| self.smem_base[d.index()].clone())
            .collect();
        for (i, (dst, _)) in streams.iter().enumerate() {
            let sb = self.r();
            self.ins(format!(
                "mad.lo.u32 {sb}, {cur}, {}, {};",
                stage_bytes[i], ring_base[i]
            ));
            self.smem_base[dst.index()] = sb;
        }
        let doubled = prog.loop_written_tiles();
        let saved_doubled: Vec<String> = doubled
            .iter()
            .map(|d| self.smem_base[d.index()].clone())
            .collect();
        for d in &doubled {
            let t = &prog.shared[d.index()];
            let bytes = (t.rows * t.cols * t.elem.bytes()).div_ceil(SMEM_ALIGN) * SMEM_ALIGN;
            let parity = self.r();
            self.ins(format!("and.b32 {parity}, {it}, 1;"));
            let base = self.smem_base[d.index()].clone();
            let read = self.r();
            self.ins(format!("mad.lo.u32 {read}, {parity}, {bytes}, {base};"));
            let write = self.r();
            self.ins(format!("xor.b32 {parity}, {parity}, 1;"));
            self.ins(format!("mad.lo.u32 {write}, {parity}, {bytes}, {base};"));
            self.smem_base[d.index()] = read;
            self.store_base[d.index()] = Some(write);
        }
        self.emit_tile_position(block_n, masks);
        let st = LoopState {
            masks: masks.to_vec(),
        };
        self.in_loop = true;
        self.emit_block(body, Some(&st))?;
        // The next iteration's loads overwrite the tiles this one's groups read.
        self.wait_wgmma(0);
        self.in_loop = false;
        for (i, (dst, _)) in streams.iter().enumerate() {
            self.smem_base[dst.index()] = saved[i].clone();
        }
        for (d, base) in doubled.iter().zip(saved_doubled) {
            self.smem_base[d.index()] = base;
            self.store_base[d.index()] = None;
        }
        // Advance the ring.
        self.ins(format!("add.s32 {it}, {it}, 1;"));
        for r in [&cur, &nxt] {
            self.ins(format!("add.u32 {r}, {r}, 1;"));
            let w = self.pred();
            self.ins(format!("setp.eq.u32 {w}, {r}, {stages};"));
            self.ins(format!("selp.u32 {r}, 0, {r}, {w};"));
        }
        self.ins(format!("bra.uni {top};"));
        self.body.push_str(&format!("{end}:\n"));
        self.ins("cp.async.wait_group 0;");
        Ok(())
    }
    // ---- expressions -------------------------------------------------------------------
}

fn is_stream(s: &Stmt) -> bool {
    matches!(s, Stmt::ContractStream { .. })
}
