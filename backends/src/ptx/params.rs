//! The kernel's setup: parameters loaded into registers, the grid cell's indices, shared
//! memory carved into tiles, uniform values hoisted, and the tiles loaded before the loop.

use super::*;

impl Printer<'_> {
    pub(super) fn emit_setup(&mut self) -> Result<(), TileError> {
        let prog = self.prog;
        let abi = prog.abi();
        // Parameters.
        for a in &abi {
            match a.role {
                AbiRole::TensorPtr(id) => {
                    let raw = self.named(".b64", &format!("praw{}", id.0));
                    self.ins(format!("ld.param.u64 {raw}, [{}];", a.name));
                    let g = self.named(".b64", &format!("gptr{}", id.0));
                    self.ins(format!("cvta.to.global.u64 {g}, {raw};"));
                }
                AbiRole::RowOutputPtr(id) => {
                    let raw = self.named(".b64", &format!("roraw{}", id.0));
                    self.ins(format!("ld.param.u64 {raw}, [{}];", a.name));
                    let g = self.named(".b64", &format!("ro{}", id.0));
                    self.ins(format!("cvta.to.global.u64 {g}, {raw};"));
                }
                AbiRole::RowInputPtr(id) => {
                    let raw = self.named(".b64", &format!("riraw{}", id.0));
                    self.ins(format!("ld.param.u64 {raw}, [{}];", a.name));
                    let g = self.named(".b64", &format!("ri{}", id.0));
                    self.ins(format!("cvta.to.global.u64 {g}, {raw};"));
                }
                AbiRole::HeadParamPtr(id) => {
                    let raw = self.named(".b64", &format!("hpraw{}", id.0));
                    self.ins(format!("ld.param.u64 {raw}, [{}];", a.name));
                    let g = self.named(".b64", &format!("hpp{}", id.0));
                    self.ins(format!("cvta.to.global.u64 {g}, {raw};"));
                }
                AbiRole::ChunkBase => {
                    let r = self.named(".b32", "cbase");
                    self.ins(format!("ld.param.u32 {r}, [{}];", a.name));
                }
                AbiRole::QueryOffset => {
                    let r = self.named(".b32", "qoff");
                    self.ins(format!("ld.param.u32 {r}, [{}];", a.name));
                }
                AbiRole::ChunkTotal => {
                    let r = self.named(".b32", "nchunks");
                    self.ins(format!("ld.param.u32 {r}, [{}];", a.name));
                }
                AbiRole::TokenPtr(id) => {
                    let raw = self.named(".b64", &format!("tkraw{}", id.0));
                    self.ins(format!("ld.param.u64 {raw}, [{}];", a.name));
                    let g = self.named(".b64", &format!("tkp{}", id.0));
                    self.ins(format!("cvta.to.global.u64 {g}, {raw};"));
                }
                AbiRole::TokenStrideBatch(id) => {
                    let r = self.named(".b64", &format!("tksb{}", id.0));
                    self.ins(format!("ld.param.u64 {r}, [{}];", a.name));
                }
                AbiRole::TokenStrideSeq(id) => {
                    let r = self.named(".b64", &format!("tksn{}", id.0));
                    self.ins(format!("ld.param.u64 {r}, [{}];", a.name));
                }
                AbiRole::TokenStrideHead(id) => {
                    let r = self.named(".b64", &format!("tksh{}", id.0));
                    self.ins(format!("ld.param.u64 {r}, [{}];", a.name));
                }
                AbiRole::LookBackFlags => {
                    let raw = self.named(".b64", "lbraw");
                    self.ins(format!("ld.param.u64 {raw}, [{}];", a.name));
                    let g = self.named(".b64", "lbflags");
                    self.ins(format!("cvta.to.global.u64 {g}, {raw};"));
                }
                AbiRole::StatePtr(id) => {
                    let raw = self.named(".b64", &format!("straw{}", id.0));
                    self.ins(format!("ld.param.u64 {raw}, [{}];", a.name));
                    let g = self.named(".b64", &format!("stp{}", id.0));
                    self.ins(format!("cvta.to.global.u64 {g}, {raw};"));
                }
                AbiRole::QueryLen => {
                    let r = self.named(".b32", "nq");
                    self.ins(format!("ld.param.u32 {r}, [{}];", a.name));
                }
                AbiRole::KeyLen => {
                    let r = self.named(".b32", "nk");
                    self.ins(format!("ld.param.u32 {r}, [{}];", a.name));
                }
                AbiRole::Heads => {
                    let r = self.named(".b32", "heads");
                    self.ins(format!("ld.param.u32 {r}, [{}];", a.name));
                }
                AbiRole::KvGroup => {
                    let r = self.named(".b32", "kvg");
                    self.ins(format!("ld.param.u32 {r}, [{}];", a.name));
                }
                AbiRole::Batch => {
                    let r = self.named(".b32", "nbatch");
                    self.ins(format!("ld.param.u32 {r}, [{}];", a.name));
                }
                AbiRole::StrideBatch(id) => {
                    let r = self.named(".b64", &format!("sb{}", id.0));
                    self.ins(format!("ld.param.u64 {r}, [{}];", a.name));
                }
                AbiRole::StrideSeq(id) => {
                    let r = self.named(".b64", &format!("sn{}", id.0));
                    self.ins(format!("ld.param.u64 {r}, [{}];", a.name));
                }
                AbiRole::StrideHead(id) => {
                    let r = self.named(".b64", &format!("sh{}", id.0));
                    self.ins(format!("ld.param.u64 {r}, [{}];", a.name));
                }
                AbiRole::Scalar(id) => {
                    let r = self.named(".f32", &format!("sc{}", id.0));
                    self.ins(format!("ld.param.f32 {r}, [{}];", a.name));
                }
                AbiRole::TensorMap { tensor, .. } => {
                    // The copy engine takes the map's generic address.
                    let r = self.named(".b64", &format!("tmap{}", tensor.0));
                    self.ins(format!("mov.u64 {r}, {};", a.name));
                    self.ins(format!("cvta.param.u64 {r}, {r};"));
                }
            }
        }
        // Thread coordinates.
        let tid = self.named(".b32", "thr");
        self.ins(format!("mov.u32 {tid}, %tid.x;"));
        let warp = self.named(".b32", "warp");
        self.ins(format!("shr.u32 {warp}, {tid}, 5;"));
        let lane = self.named(".b32", "lane");
        self.ins(format!("and.b32 {lane}, {tid}, 31;"));
        let g = self.named(".b32", "g");
        self.ins(format!("shr.u32 {g}, {lane}, 2;"));
        let tig = self.named(".b32", "tig");
        self.ins(format!("and.b32 {tig}, {lane}, 3;"));
        if prog.schedule.persistent.is_some() {
            self.emit_work_tile_count();
        } else {
            self.emit_tile_setup(None)?;
        }
        // Shared memory bases.
        let smem = self.named(".b32", "smem");
        self.ins(format!("mov.u32 {smem}, einattn_smem;"));
        for i in 0..prog.shared.len() {
            let base = self.named(".b32", &format!("sbase{i}"));
            self.ins(format!("add.u32 {base}, {smem}, {};", self.smem_offset[i]));
            self.smem_base[i] = base;
        }
        // ldmatrix lane patterns. Pattern A (A operand, and B with .trans): lane row
        // `lane & 15`, chunk bit `lane >> 4`. Pattern N (B without .trans): lane row
        // `(lane & 7) | ((lane >> 4) << 3)`, chunk bit `(lane >> 3) & 1`. For a chunk pair
        // starting at even chunk `e`, the swizzled chunk is `(e & ~7) + ((e & 7) ^ x)` with
        // `x = chunk_bit ^ (lane & 7)`: precompute `((2j) ^ x) * 16` for j = 0..3.
        let l7 = self.r();
        self.ins(format!("and.b32 {l7}, {lane}, 7;"));
        for (pat, row_expr) in [("A", 0), ("N", 1)] {
            let row = self.named(".b32", &format!("lm{pat}_row"));
            let bit = self.r();
            if row_expr == 0 {
                self.ins(format!("and.b32 {row}, {lane}, 15;"));
                self.ins(format!("shr.u32 {bit}, {lane}, 4;"));
            } else {
                let t = self.r();
                self.ins(format!("shr.u32 {t}, {lane}, 4;"));
                self.ins(format!("shl.b32 {t}, {t}, 3;"));
                self.ins(format!("or.b32 {row}, {l7}, {t};"));
                self.ins(format!("bfe.u32 {bit}, {lane}, 3, 1;"));
            }
            let x = self.r();
            self.ins(format!("xor.b32 {x}, {bit}, {l7};"));
            for j in 0..4u32 {
                let sw = self.named(".b32", &format!("lm{pat}_sw{j}"));
                self.ins(format!("xor.b32 {sw}, {x}, {};", 2 * j));
                self.ins(format!("shl.b32 {sw}, {sw}, 4;"));
            }
        }
        if prog.sequential {
            // Key positions are tile-relative: the thread's first key column never changes,
            // so values hoisted out of the loop may use it.
            let kcol = self.named_once(".b32", "kcol");
            let kf = self.named_once(".f32", "kf");
            self.ins(format!("shl.b32 {kcol}, {tig}, 1;"));
            self.ins(format!("cvt.rn.f32.s32 {kf}, {kcol};"));
        }
        if prog.schedule.mma == MmaUnit::Warpgroup {
            // wgmma's scale-d operand: always accumulate into D.
            let p = self.named(".pred", "wgacc");
            self.ins(format!("setp.eq.u32 {p}, {tid}, {tid};"));
            // ... and its opposite: a first k-step that overwrites D (a folded zero fill).
            let z = self.named(".pred", "wgzero");
            self.ins(format!("setp.ne.u32 {z}, {tid}, {tid};"));
        }
        if let Some(tm) = prog.key_narrowing {
            self.emit_key_narrowing(tm)?;
        }
        if prog.schedule.persistent.is_none() {
            // (A persistent program's setup ends in each work tile: see `persistent.rs`.)
            self.body.push_str(SETUP_END);
        }
        Ok(())
    }

    /// The registers that say which work tile the CTA computes: its query tile and rows,
    /// batch and head indices, tensor and token bases, query positions and head parameters.
    /// `tile` is a persistent program's work tile (query tile and `batch * heads + head`
    /// registers); otherwise the grid cell says it.
    pub(super) fn emit_tile_setup(&mut self, tile: Option<(&str, &str)>) -> Result<(), TileError> {
        let prog = self.prog;
        let tid = "%thr";
        let warp = "%warp";
        let g = "%g";
        // Query tile: with masks the heaviest tiles (the last ones) go first.
        let has_masks = prog.has_band_masks();
        let qtile = self.named_once(".b32", "qtile");
        let colb = self.named_once(".b32", "colb");
        // The CTA's grid cell: its block index, or, in a look-back program, its ticket in
        // chunk-major order, so that every CTA of an earlier chunk has started before it.
        let (cell_x, cell_y, cell_z) = if prog.look_back {
            let ticket = self.named_once(".b32", "ticket");
            let first = self.pred();
            self.ins(format!("setp.eq.u32 {first}, {tid}, 0;"));
            self.ins(format!(
                "@{first} atom.global.add.u32 {ticket}, [%lbflags], 1;"
            ));
            let slot = self.lb_smem_addr();
            self.ins(format!("@{first} st.shared.u32 [{slot}], {ticket};"));
            self.ins("bar.sync 0;");
            self.ins(format!("ld.shared.u32 {ticket}, [{slot}];"));
            let cells = self.r();
            self.ins(format!("mov.u32 {cells}, %nctaid.x;"));
            let ny = self.r();
            self.ins(format!("mov.u32 {ny}, %nctaid.y;"));
            self.ins(format!("mul.lo.u32 {cells}, {cells}, {ny};"));
            let (x, y, z, rest) = (self.r(), self.r(), self.r(), self.r());
            self.ins(format!("div.u32 {z}, {ticket}, {cells};"));
            self.ins(format!("rem.u32 {rest}, {ticket}, {cells};"));
            let nx = self.r();
            self.ins(format!("mov.u32 {nx}, %nctaid.x;"));
            self.ins(format!("div.u32 {y}, {rest}, {nx};"));
            self.ins(format!("rem.u32 {x}, {rest}, {nx};"));
            (x, y, z)
        } else {
            (
                "%ctaid.x".to_string(),
                "%ctaid.y".to_string(),
                "%ctaid.z".to_string(),
            )
        };
        if prog.chunked() {
            // Tiles come from the launch's own chunk; the state slot from the global one.
            let local = self.named_once(".b32", "lchunk");
            self.ins(format!("mov.u32 {local}, {cell_z};"));
            let chunk = self.named_once(".b32", "chunk");
            self.ins(format!("add.u32 {chunk}, %cbase, {local};"));
            let nbh = self.named_once(".b32", "nbh");
            self.ins(format!("mov.u32 {nbh}, %nctaid.y;"));
        }
        if let Some((qt, _)) = tile {
            self.ins(format!("mov.u32 {qtile}, {qt};"));
        } else if prog.sequential {
            // The CTA walks the whole sequence; grid x is its value-column block.
            self.ins(format!("mov.u32 {qtile}, 0;"));
            self.ins(format!("mov.u32 {colb}, {cell_x};"));
        } else if has_masks {
            let n = self.r();
            let c = self.r();
            self.ins(format!("mov.u32 {n}, %nctaid.x;"));
            self.ins(format!("mov.u32 {c}, %ctaid.x;"));
            self.ins(format!("sub.u32 {qtile}, {n}, {c};"));
            self.ins(format!("sub.u32 {qtile}, {qtile}, 1;"));
        } else {
            self.ins(format!("mov.u32 {qtile}, %ctaid.x;"));
        }
        if !prog.sequential {
            self.ins(format!("mov.u32 {colb}, 0;"));
        }
        let p0 = self.named_once(".b32", "qrow0");
        self.ins(format!(
            "mul.lo.u32 {p0}, {qtile}, {};",
            prog.schedule.block_m
        ));
        let bh = self.named_once(".b32", "bhidx");
        match tile {
            Some((_, work_bh)) => self.ins(format!("mov.u32 {bh}, {work_bh};")),
            None => self.ins(format!("mov.u32 {bh}, {cell_y};")),
        }
        let b = self.named_once(".b32", "bidx");
        let h = self.named_once(".b32", "hidx");
        let hk = self.named_once(".b32", "hkidx");
        self.ins(format!("div.u32 {b}, {bh}, %heads;"));
        self.ins(format!("rem.u32 {h}, {bh}, %heads;"));
        self.ins(format!("div.u32 {hk}, {h}, %kvg;"));
        // p_last = min(p0 + block_m, n_q) - 1
        let plast = self.named_once(".b32", "plast");
        self.ins(format!("add.s32 {plast}, {p0}, {};", prog.schedule.block_m));
        self.ins(format!("min.s32 {plast}, {plast}, %nq;"));
        self.ins(format!("sub.s32 {plast}, {plast}, 1;"));
        // This thread's first row: p0 + warp * rpw + g.
        let prow = self.named_once(".b32", "prow0");
        self.ins(format!(
            "mad.lo.u32 {prow}, {warp}, {}, {p0};",
            prog.rows_per_warp()
        ));
        self.ins(format!("add.u32 {prow}, {prow}, {g};"));
        // Head parameters for this head.
        for i in 0..prog.head_params.len() {
            let v = self.named_once(".f32", &format!("hp{i}"));
            let a = self.rd();
            self.ins(format!("mul.wide.u32 {a}, {h}, 4;"));
            self.ins(format!("add.u64 {a}, {a}, %hpp{i};"));
            self.ins(format!("ld.global.nc.f32 {v}, [{a}];"));
        }
        // Tensor bases (batch, head applied) and row strides in bytes.
        for (i, t) in prog.tensors.iter().enumerate() {
            let eb = t.elem.bytes();
            let head = if t.rows == SeqRank::Query {
                "%hidx"
            } else {
                "%hkidx"
            };
            let bb = self.rd();
            let hh = self.rd();
            self.ins(format!("cvt.u64.u32 {bb}, %bidx;"));
            self.ins(format!("cvt.u64.u32 {hh}, {head};"));
            let off = self.rd();
            self.ins(format!("mul.lo.u64 {off}, {bb}, %sb{i};"));
            self.ins(format!("mad.lo.u64 {off}, {hh}, %sh{i}, {off};"));
            self.ins(format!("shl.b64 {off}, {off}, {};", eb.trailing_zeros()));
            let base = self.named_once(".b64", &format!("base{i}"));
            self.ins(format!("add.u64 {base}, %gptr{i}, {off};"));
            let rs = self.named_once(".b64", &format!("rsb{i}"));
            self.ins(format!("shl.b64 {rs}, %sn{i}, {};", eb.trailing_zeros()));
        }
        // Per-token inputs: base of this (batch, head) and the token stride, in bytes.
        for i in 0..prog.tokens.len() {
            let bb = self.rd();
            let hh = self.rd();
            self.ins(format!("cvt.u64.u32 {bb}, %bidx;"));
            self.ins(format!("cvt.u64.u32 {hh}, %hidx;"));
            let off = self.rd();
            self.ins(format!("mul.lo.u64 {off}, {bb}, %tksb{i};"));
            self.ins(format!("mad.lo.u64 {off}, {hh}, %tksh{i}, {off};"));
            self.ins(format!("shl.b64 {off}, {off}, 2;"));
            let base = self.named_once(".b64", &format!("tkbase{i}"));
            self.ins(format!("add.u64 {base}, %tkp{i}, {off};"));
            let st = self.named_once(".b64", &format!("tkrs{i}"));
            self.ins(format!("shl.b64 {st}, %tksn{i}, 2;"));
        }
        // Query positions (masks, `Index(Query)`): memory rows plus the program's offset.
        let qoff = if prog.query_offset { "%qoff" } else { "0" };
        let qpos0 = self.named_once(".b32", "qpos0");
        self.ins(format!("add.s32 {qpos0}, %qrow0, {qoff};"));
        let plastpos = self.named_once(".b32", "plastpos");
        self.ins(format!("add.s32 {plastpos}, %plast, {qoff};"));
        let prowpos = self.named_once(".b32", "prowpos0");
        self.ins(format!("add.s32 {prowpos}, %prow0, {qoff};"));
        // Float query index of each of this thread's rows.
        for mt in 0..self.mtiles {
            for half in 0..2 {
                let pi = self.r();
                self.ins(format!("add.s32 {pi}, %prowpos0, {};", mt * 16 + half * 8));
                let pf = self.named_once(".f32", &format!("pf_{mt}_{half}"));
                self.ins(format!("cvt.rn.f32.s32 {pf}, {pi};"));
            }
        }
        Ok(())
    }
}
