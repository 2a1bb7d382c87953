//! PTX printer: Tile IR -> PTX text (ISA 8.7) using `sm_80` instructions, which also run on
//! Hopper (`ptxas -arch=sm_90a` accepts the same text).
//!
//! # Lowering
//!
//! * **Threads.** A CTA has `32 * warps` threads. Warp `w` owns query rows
//!   `[w * rpw, (w + 1) * rpw)` with `rpw = block_m / warps`, i.e. `rpw / 16` mma m-tiles.
//!   Lane `l` has `g = l / 4` (its row within an 8-row group) and `tig = l % 4`.
//! * **f32 accumulator tiles** (`block_m x C`) use the `mma.m16n8k16` C/D layout: for m-tile
//!   `mt` and n-tile `nt` (8 columns) a thread holds 4 registers `e = 0..3` at
//!   `row = w*rpw + mt*16 + g + 8*(e / 2)`, `col = nt*8 + 2*tig + (e % 2)`, named
//!   `%t<id>_<(mt*C/8 + nt)*4 + e>`.
//! * **16-bit A-operand tiles** use the `m16n8k16` A layout: for m-tile `mt` and k-step `ks`
//!   (16 columns) 4 `.b32` registers, each two elements: `a0 = (g, 2tig..+1)`,
//!   `a1 = (g+8, 2tig..)`, `a2 = (g, 8+2tig..)`, `a3 = (g+8, 8+2tig..)`, named
//!   `%a<id>_<(mt*C/16 + ks)*4 + i>`. Converting scores to this layout needs no data
//!   movement: `a0..a3` of k-step `ks` are the C registers of n-tiles `2ks, 2ks+1`
//!   packed pairwise (`cvt.rn.bf16x2.f32`), the FlashAttention-2 register trick.
//! * **Row vectors**: a thread holds rows `g` and `g + 8` of each of its m-tiles:
//!   `%w<id>_<mt*2 + half>`. Row reductions fold the thread's columns, then two
//!   `shfl.sync.bfly` (xor 1, 2) combine the 4 threads of a quad that share a row.
//! * **Shared tiles** are stored as `cols / 64` column blocks of `rows x 64` elements, one
//!   after the other; a block's rows are 128 bytes, cut into 16-byte chunks, and chunk `c`
//!   of row `r` is stored at chunk `c ^ (r % 8)` (XOR swizzle). The 8 row addresses of one
//!   `ldmatrix` 8x8 matrix hit 8 different bank groups, `cp.async` 16-byte writes stay
//!   conflict-free, and a block is exactly the canonical 128-byte-swizzled layout that
//!   `wgmma` reads through a matrix descriptor (tiles start on 1024-byte boundaries).
//!   Requires `cols >= 64`.
//! * **Loads** (`LoadTile`): each thread copies 16-byte chunks with
//!   `cp.async.cg.shared.global ... 16, src_size`; rows past the sequence end get
//!   `src_size = 0` (zero fill) and a clamped address. Requires `threads % chunks_per_row
//!   == 0` and `(threads / chunks_per_row) % 8 == 0`, so a thread's swizzle is the same for
//!   all its rows.
//! * **Contractions**: A from registers or `ldmatrix.x4` (query tile), B via `ldmatrix.x4`
//!   (`RowsAreN`: rows are output columns, e.g. K for `Q K^T`) or `ldmatrix.x4.trans`
//!   (`RowsAreK`, e.g. V for `P V`), then `mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}`.
//! * **Warpgroup contractions** ([`MmaUnit::Warpgroup`], sm_90a): warpgroup `w / 4` owns
//!   rows `[64 (w / 4), +64)`, and the `m64nNk16` accumulator layout of each of its warps is
//!   the `m16n8k16` C layout above, so register tiles are unchanged. Per k-step one
//!   `wgmma.mma_async` reads B (and a shared A) through a descriptor: K-major for
//!   `RowsAreN` (a 16-column step is +32 bytes inside a 128-byte row), N-major for `RowsAreK`
//!   (+16 rows); register A operands (`P`, the scaled `K^T` of `ContractT`) use the
//!   `m16n8k16` A layout. Shared data written by `cp.async` or `st.shared` is published to
//!   the async proxy (`fence.proxy.async`) before the barrier that precedes its reads; each
//!   contraction is `wgmma.fence`, its k-steps, `commit_group`, and a wait before the next
//!   statement touches its accumulator.
//! * **Key loop**: tiles `[t_begin, t_end)` from the band masks (tile skipping, see
//!   [`crate::tile::key_tile_range`]); `stages`-deep ring for the streamed tiles: the prologue
//!   issues `stages - 1` tiles, each iteration waits (`cp.async.wait_group stages-2`),
//!   `bar.sync`s, issues tile `it + stages - 1` into the slot freed by the previous
//!   iteration, then computes. `Mask` runs under a uniform branch taken only on boundary
//!   tiles.
//! * **Scalars**: expressions of literals and parameters only are computed once at kernel
//!   start; `exp2`, `log2`, `tanh` use the `.approx` SFU instructions (`ex2.approx.ftz`
//!   maps `-inf` to 0); `mul`/`add` are left unrounded so `ptxas` fuses them into FMA.
//! * **Stores**: each thread writes its 2 adjacent output elements as one 32-bit store,
//!   rows `>= N_q` predicated off; the row output (LSE) is written by `tig == 0` lanes.

pub mod ptxas;

use std::collections::HashMap;
use std::fmt::Write as _;

use crate::tile::*;

/// Code-generation target. Programs scheduled for `mma.sync` print the same instructions
/// for both; `wgmma` (see [`MmaUnit`]) needs `Sm90a`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Target {
    #[default]
    Sm80,
    Sm90a,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Sm80 => "sm_80",
            Target::Sm90a => "sm_90a",
        }
    }
}

/// The PTX version written in the header.
pub const PTX_VERSION: &str = "8.7";

/// A printed kernel and what is needed to launch it.
#[derive(Debug, Clone, PartialEq)]
pub struct PtxKernel {
    pub entry: String,
    pub text: String,
    pub target: Target,
    pub threads: u32,
    pub block_m: u32,
    pub dynamic_smem_bytes: u32,
    pub abi: Vec<AbiParam>,
    /// For a sequential program: its column blocks (grid x); `None` for query-tiled ones.
    pub col_blocks: Option<u32>,
    /// For a chunked program: tiles per chunk (grid z is the chunk count).
    pub chunk_tiles: Option<u32>,
}

impl PtxKernel {
    /// Grid `(query tiles, batch * heads, 1)`, or `(column blocks, batch * heads, 1)` for a
    /// sequential program.
    pub fn grid(&self, batch: u32, heads: u32, n_q: u32) -> (u32, u32, u32) {
        let chunks = self
            .chunk_tiles
            .map_or(1, |ct| n_q.div_ceil(self.block_m).div_ceil(ct).max(1));
        match self.col_blocks {
            Some(cb) => (cb, batch * heads, chunks),
            None => (n_q.div_ceil(self.block_m), batch * heads, 1),
        }
    }
}

fn unsupported<T>(msg: impl Into<String>) -> Result<T, TileError> {
    Err(TileError::Unsupported(msg.into()))
}

/// Prints `prog` as a PTX module with one `.entry` named after the program.
pub fn print_ptx(prog: &TileProgram, target: Target) -> Result<PtxKernel, TileError> {
    prog.validate()?;
    if prog.schedule.mma == MmaUnit::Warpgroup && target != Target::Sm90a {
        return unsupported("wgmma needs the sm_90a target");
    }
    let mut p = Printer::new(prog)?;
    p.emit_setup()?;
    p.emit_block(&prog.body, None)?;
    p.wait_wgmma(0);
    let text = p.finish(target);
    Ok(PtxKernel {
        entry: prog.name.clone(),
        text,
        target,
        threads: prog.threads(),
        block_m: prog.schedule.block_m,
        dynamic_smem_bytes: p.smem_total,
        abi: prog.abi(),
        col_blocks: prog.sequential.then_some(prog.col_blocks),
        chunk_tiles: prog.chunked().then_some(prog.chunk_tiles),
    })
}

/// f32 literal in PTX hex form (exact, handles infinities).
fn f32_lit(x: f64) -> String {
    format!("0f{:08X}", (x as f32).to_bits())
}

struct LoopState {
    masks: Vec<BandMask>,
    block_n: u32,
}

struct Printer<'a> {
    prog: &'a TileProgram,
    body: String,
    hoisted: String,
    decls: Vec<String>,
    n_r: usize,
    n_rd: usize,
    n_f: usize,
    n_p: usize,
    n_h: usize,
    n_label: usize,
    uniform_cache: HashMap<String, String>,
    /// Byte offset of each shared tile in the dynamic shared-memory block.
    smem_offset: Vec<u32>,
    smem_total: u32,
    /// Register holding each shared tile's current base address (streamed: current stage).
    smem_base: Vec<String>,
    /// For a tile written inside the key loop (a carried state): the copy this iteration
    /// writes, while `smem_base` is the copy it reads. Double buffering lets the write skip
    /// the barrier that would otherwise wait for every warp's last read.
    store_base: Vec<Option<String>>,
    mtiles: u32,
    /// Register holding key index in the current key loop iteration (`key_origin + 2 tig`).
    in_loop: bool,
    /// Committed `wgmma` groups not yet waited for, oldest first.
    wgmma_pending: Vec<WgmmaGroup>,
    /// A look-back program's word of shared memory that broadcasts thread 0's ticket and
    /// the flags it reads.
    lb_smem: u32,
    /// Loop-invariant per-element values computed once at kernel start (see
    /// [`Printer::invariant_key`]), by expression and position class.
    invariant_cache: HashMap<(String, (u8, i32)), String>,
}

/// What one committed `wgmma` group may still be reading or writing.
#[derive(Debug, Clone, Default)]
struct WgmmaGroup {
    /// Register tiles: the accumulator and a register A operand.
    regs: Vec<RegId>,
    /// Shared tiles it reads.
    shared: Vec<SharedId>,
}

impl<'a> Printer<'a> {
    fn new(prog: &'a TileProgram) -> Result<Self, TileError> {
        let streamed = prog.streamed_tiles();
        let double = prog.loop_written_tiles();
        let mut smem_offset = Vec::new();
        let mut off = 0u32;
        for (i, t) in prog.shared.iter().enumerate() {
            if t.cols < 64 || !t.cols.is_power_of_two() {
                return unsupported(format!(
                    "shared tile {} needs a power-of-two width >= 64 elements for the swizzle",
                    t.name
                ));
            }
            smem_offset.push(off);
            let copies = if streamed.contains(&SharedId(i as u32)) {
                prog.schedule.stages
            } else if double.contains(&SharedId(i as u32)) {
                2
            } else {
                1
            };
            off += (t.rows * t.cols * t.elem.bytes() * copies).div_ceil(SMEM_ALIGN) * SMEM_ALIGN;
        }
        Ok(Printer {
            prog,
            body: String::new(),
            hoisted: String::new(),
            decls: Vec::new(),
            n_r: 0,
            n_rd: 0,
            n_f: 0,
            n_p: 0,
            n_h: 0,
            n_label: 0,
            uniform_cache: HashMap::new(),
            smem_offset,
            lb_smem: off,
            smem_total: off + if prog.look_back { 16 } else { 0 },
            smem_base: vec![String::new(); prog.shared.len()],
            store_base: vec![None; prog.shared.len()],
            mtiles: prog.rows_per_warp() / 16,
            in_loop: false,
            wgmma_pending: Vec::new(),
            invariant_cache: HashMap::new(),
        })
    }

    // ---- register allocation -------------------------------------------------------
    fn r(&mut self) -> String {
        self.n_r += 1;
        format!("%r{}", self.n_r - 1)
    }
    fn rd(&mut self) -> String {
        self.n_rd += 1;
        format!("%rd{}", self.n_rd - 1)
    }
    fn f(&mut self) -> String {
        self.n_f += 1;
        format!("%f{}", self.n_f - 1)
    }
    fn h16(&mut self) -> String {
        self.n_h += 1;
        format!("%h{}", self.n_h - 1)
    }
    fn pred(&mut self) -> String {
        self.n_p += 1;
        format!("%p{}", self.n_p - 1)
    }
    fn label(&mut self, what: &str) -> String {
        self.n_label += 1;
        format!("$L_{what}_{}", self.n_label - 1)
    }
    fn named(&mut self, ty: &str, name: &str) -> String {
        self.decls.push(format!("\t.reg {ty} %{name};"));
        format!("%{name}")
    }
    /// A named register shared by every key loop of the program (each loop re-initializes it).
    fn named_once(&mut self, ty: &str, name: &str) -> String {
        let decl = format!("\t.reg {ty} %{name};");
        if !self.decls.contains(&decl) {
            self.decls.push(decl);
        }
        format!("%{name}")
    }
    fn ins(&mut self, s: impl AsRef<str>) {
        self.body.push('\t');
        self.body.push_str(s.as_ref());
        self.body.push('\n');
    }
    fn comment(&mut self, s: impl AsRef<str>) {
        let _ = writeln!(self.body, "\t// {}", s.as_ref());
    }

    // ---- tile register names ---------------------------------------------------------
    fn acc_reg(&self, id: RegId, mt: u32, nt: u32, e: u32) -> String {
        let cols = self.prog.regs[id.index()].cols;
        format!("%t{}_{}", id.0, (mt * (cols / 8) + nt) * 4 + e)
    }
    /// Every register of an accumulator tile, in register order.
    fn acc_regs(&self, id: RegId) -> Vec<String> {
        let cols = self.prog.regs[id.index()].cols;
        (0..self.mtiles * cols / 8 * 4)
            .map(|i| format!("%t{}_{i}", id.0))
            .collect()
    }
    fn afrag_reg(&self, id: RegId, mt: u32, ks: u32, i: u32) -> String {
        let cols = self.prog.regs[id.index()].cols;
        format!("%a{}_{}", id.0, (mt * (cols / 16) + ks) * 4 + i)
    }
    fn row_reg(&self, id: RowId, mt: u32, half: u32) -> String {
        format!("%w{}_{}", id.0, mt * 2 + half)
    }

    fn mma_type(elem: Elem) -> Result<&'static str, TileError> {
        match elem {
            Elem::Bf16 => Ok("bf16"),
            Elem::F16 => Ok("f16"),
            Elem::F32 => unsupported("mma operands must be 16-bit"),
        }
    }

    // ---- setup -------------------------------------------------------------------------
    fn emit_setup(&mut self) -> Result<(), TileError> {
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
        // Query tile: with masks the heaviest tiles (the last ones) go first.
        let has_masks = prog
            .body
            .iter()
            .any(|s| matches!(s, Stmt::KeyLoop { masks, .. } if !masks.is_empty()));
        let qtile = self.named(".b32", "qtile");
        let colb = self.named(".b32", "colb");
        // The CTA's grid cell: its block index, or, in a look-back program, its ticket in
        // chunk-major order, so that every CTA of an earlier chunk has started before it.
        let (cell_x, cell_y, cell_z) = if prog.look_back {
            let ticket = self.named(".b32", "ticket");
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
            let local = self.named(".b32", "lchunk");
            self.ins(format!("mov.u32 {local}, {cell_z};"));
            let chunk = self.named(".b32", "chunk");
            self.ins(format!("add.u32 {chunk}, %cbase, {local};"));
            let nbh = self.named(".b32", "nbh");
            self.ins(format!("mov.u32 {nbh}, %nctaid.y;"));
        }
        if prog.sequential {
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
        let p0 = self.named(".b32", "qrow0");
        self.ins(format!(
            "mul.lo.u32 {p0}, {qtile}, {};",
            prog.schedule.block_m
        ));
        let bh = self.named(".b32", "bhidx");
        self.ins(format!("mov.u32 {bh}, {cell_y};"));
        let b = self.named(".b32", "bidx");
        let h = self.named(".b32", "hidx");
        let hk = self.named(".b32", "hkidx");
        self.ins(format!("div.u32 {b}, {bh}, %heads;"));
        self.ins(format!("rem.u32 {h}, {bh}, %heads;"));
        self.ins(format!("div.u32 {hk}, {h}, %kvg;"));
        // p_last = min(p0 + block_m, n_q) - 1
        let plast = self.named(".b32", "plast");
        self.ins(format!("add.s32 {plast}, {p0}, {};", prog.schedule.block_m));
        self.ins(format!("min.s32 {plast}, {plast}, %nq;"));
        self.ins(format!("sub.s32 {plast}, {plast}, 1;"));
        // This thread's first row: p0 + warp * rpw + g.
        let prow = self.named(".b32", "prow0");
        self.ins(format!(
            "mad.lo.u32 {prow}, {warp}, {}, {p0};",
            prog.rows_per_warp()
        ));
        self.ins(format!("add.u32 {prow}, {prow}, {g};"));
        // Head parameters for this head.
        for i in 0..prog.head_params.len() {
            let v = self.named(".f32", &format!("hp{i}"));
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
            let base = self.named(".b64", &format!("base{i}"));
            self.ins(format!("add.u64 {base}, %gptr{i}, {off};"));
            let rs = self.named(".b64", &format!("rsb{i}"));
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
            let base = self.named(".b64", &format!("tkbase{i}"));
            self.ins(format!("add.u64 {base}, %tkp{i}, {off};"));
            let st = self.named(".b64", &format!("tkrs{i}"));
            self.ins(format!("shl.b64 {st}, %tksn{i}, 2;"));
        }
        // Query positions (masks, `Index(Query)`): memory rows plus the program's offset.
        let qoff = if prog.query_offset { "%qoff" } else { "0" };
        let qpos0 = self.named(".b32", "qpos0");
        self.ins(format!("add.s32 {qpos0}, %qrow0, {qoff};"));
        let plastpos = self.named(".b32", "plastpos");
        self.ins(format!("add.s32 {plastpos}, %plast, {qoff};"));
        let prowpos = self.named(".b32", "prowpos0");
        self.ins(format!("add.s32 {prowpos}, %prow0, {qoff};"));
        // Float query index of each of this thread's rows.
        for mt in 0..self.mtiles {
            for half in 0..2 {
                let pi = self.r();
                self.ins(format!("add.s32 {pi}, %prowpos0, {};", mt * 16 + half * 8));
                let pf = self.named(".f32", &format!("pf_{mt}_{half}"));
                self.ins(format!("cvt.rn.f32.s32 {pf}, {pi};"));
            }
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
        }
        self.body.push_str(SETUP_END);
        Ok(())
    }

    /// Offset register (base + lane row * 128 + swizzle) for an ldmatrix of pattern `pat`
    /// on a tile whose 64-column blocks are `block_bytes` apart, for the chunk pair starting
    /// at chunk `e` of row `block_row`; returns `(register, immediate)`.
    fn ldm_addr(
        &mut self,
        base: &str,
        pat: &str,
        block_bytes: u32,
        block_row: u32,
        e: u32,
    ) -> (String, u32) {
        let a = self.r();
        self.ins(format!(
            "mad.lo.u32 {a}, %lm{pat}_row, {ROW_BYTES}, {base};"
        ));
        self.ins(format!("add.u32 {a}, {a}, %lm{pat}_sw{};", (e & 7) / 2));
        (a, block_row * ROW_BYTES + (e / 8) * block_bytes)
    }

    // ---- statements --------------------------------------------------------------------
    fn emit_block(&mut self, body: &[Stmt], lp: Option<&LoopState>) -> Result<(), TileError> {
        for st in body {
            self.wait_for_conflicting_wgmma(st);
            self.emit_stmt(st, lp)?;
        }
        Ok(())
    }

    /// `wgmma` runs asynchronously: a statement that touches a register tile of a pending
    /// group, or writes a shared tile one reads, first waits until that group (and every
    /// older one) is done; later groups stay in flight.
    fn wait_for_conflicting_wgmma(&mut self, st: &Stmt) {
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
    fn wait_wgmma(&mut self, keep: usize) {
        if self.wgmma_pending.len() > keep {
            self.ins(format!("wgmma.wait_group.sync.aligned {keep};"));
            let done = self.wgmma_pending.len() - keep;
            self.wgmma_pending.drain(..done);
        }
    }

    /// Register tiles a statement reads or writes, shared tiles it writes, and whether it
    /// must see every pending group finished (loops, loads, anything not itemized).
    fn stmt_footprint(&self, st: &Stmt) -> (Vec<RegId>, Vec<SharedId>, bool) {
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
            Stmt::RowMap { expr, .. } => {
                expr_regs(expr, &mut regs);
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
            Stmt::FillRow { .. } | Stmt::StoreRow { .. } => false,
            Stmt::LoadTile { .. } | Stmt::KeyLoop { .. } | Stmt::LookBack { .. } => true,
        };
        (regs, writes, all)
    }

    fn emit_stmt(&mut self, st: &Stmt, lp: Option<&LoopState>) -> Result<(), TileError> {
        let prog = self.prog;
        match st {
            Stmt::LoadTile { dst, src } => {
                if self.in_loop {
                    // Streamed tiles are issued by the key loop's ring.
                    return Ok(());
                }
                self.comment(format!(
                    "load {} <- {}",
                    prog.shared[dst.index()].name,
                    prog.tensors[src.index()].name
                ));
                let base = self.smem_base[dst.index()].clone();
                self.emit_load_issue(*dst, *src, "%qrow0", &base)?;
                self.ins("cp.async.commit_group;");
                // Simple and safe: the tile is complete and visible before anything follows.
                self.ins("cp.async.wait_group 0;");
                self.emit_async_proxy_fence();
                self.ins("bar.sync 0;");
            }
            Stmt::Fill { dst, value } => {
                for r in self.acc_regs(*dst) {
                    self.ins(format!("mov.f32 {r}, {};", f32_lit(*value)));
                }
            }
            Stmt::FillRow { dst, value } => {
                for mt in 0..self.mtiles {
                    for half in 0..2 {
                        let r = self.row_reg(*dst, mt, half);
                        self.ins(format!("mov.f32 {r}, {};", f32_lit(*value)));
                    }
                }
            }
            Stmt::Fragments { dst, src } => {
                self.comment(format!("fragments {}", prog.regs[dst.index()].name));
                let t = &prog.shared[src.index()];
                let block_bytes = t.rows * ROW_BYTES;
                let wbase = self.r();
                let sb = self.smem_base[src.index()].clone();
                self.ins(format!(
                    "mad.lo.u32 {wbase}, %warp, {}, {sb};",
                    prog.rows_per_warp() * ROW_BYTES
                ));
                for mt in 0..self.mtiles {
                    for ks in 0..t.cols / 16 {
                        let (a, imm) = self.ldm_addr(&wbase, "A", block_bytes, mt * 16, 2 * ks);
                        let regs: Vec<String> =
                            (0..4).map(|i| self.afrag_reg(*dst, mt, ks, i)).collect();
                        self.ins(format!(
                            "ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{{}}}, [{a}+{imm}];",
                            regs.join(", ")
                        ));
                    }
                }
            }
            Stmt::Contract {
                acc,
                a,
                b,
                b_layout,
            } => self.emit_contract(*acc, *a, *b, *b_layout)?,
            Stmt::Map { dst, expr } => {
                let cols = prog.regs[dst.index()].cols;
                // `dst = dst * row` (the online-softmax rescale) is skipped when every row
                // factor of the warp is exactly 1, which is most key tiles once the running
                // max settles; the product is unchanged either way.
                let skip = match expr {
                    _ if !prog.schedule.skip_unit_rescale => None,
                    ScalarExpr::Binary(BinaryOp::Mul, a, b) => match (a.as_ref(), b.as_ref()) {
                        (ScalarExpr::Elem(e), ScalarExpr::Row(r)) if e == dst => Some(*r),
                        _ => None,
                    },
                    _ => None,
                };
                let skip_label = match skip {
                    Some(r) => {
                        let all_one = self.pred();
                        let first = self.row_reg(r, 0, 0);
                        self.ins(format!("setp.eq.f32 {all_one}, {first}, 0f3F800000;"));
                        for mt in 0..self.mtiles {
                            for half in 0..2 {
                                if mt + half == 0 {
                                    continue;
                                }
                                let rr = self.row_reg(r, mt, half);
                                self.ins(format!(
                                    "setp.eq.and.f32 {all_one}, {rr}, 0f3F800000, {all_one};"
                                ));
                            }
                        }
                        self.ins(format!("vote.sync.all.pred {all_one}, {all_one}, -1;"));
                        let l = self.label("norescale");
                        self.ins(format!("@{all_one} bra.uni {l};"));
                        Some(l)
                    }
                    None => None,
                };
                for mt in 0..self.mtiles {
                    for nt in 0..cols / 8 {
                        for e in 0..4 {
                            let ctx = ElemCtx {
                                mt,
                                half: e / 2,
                                col: Some((nt, e % 2)),
                            };
                            let v = self.emit_expr(expr, &ctx)?;
                            let r = self.acc_reg(*dst, mt, nt, e);
                            self.ins(format!("mov.f32 {r}, {v};"));
                        }
                    }
                }
                if let Some(l) = skip_label {
                    self.body.push_str(&format!("{l}:\n"));
                }
            }
            Stmt::Mask { dst, fill } => {
                let lp =
                    lp.ok_or_else(|| TileError::Invalid("Mask outside the key loop".into()))?;
                let skip = self.label("nomask");
                self.ins(format!("@!%needmask bra.uni {skip};"));
                let cols = prog.regs[dst.index()].cols;
                let masks = lp.masks.clone();
                for mt in 0..self.mtiles {
                    for half in 0..2 {
                        // Per-row limits: key > p + bound (KeyMinusQuery) or key < p - bound.
                        let pi = self.r();
                        self.ins(format!("add.s32 {pi}, %prowpos0, {};", mt * 16 + half * 8));
                        let mut lims = Vec::new();
                        for m in &masks {
                            let l = self.r();
                            match m.direction {
                                BandDirection::KeyMinusQuery => {
                                    self.ins(format!("add.s32 {l}, {pi}, {};", m.bound));
                                    lims.push(("gt", l));
                                }
                                BandDirection::QueryMinusKey => {
                                    self.ins(format!("sub.s32 {l}, {pi}, {};", m.bound));
                                    lims.push(("lt", l));
                                }
                            }
                        }
                        for nt in 0..cols / 8 {
                            for lo in 0..2 {
                                let key = self.r();
                                self.ins(format!("add.s32 {key}, %kcol, {};", nt * 8 + lo));
                                let pr = self.pred();
                                self.ins(format!("setp.ge.s32 {pr}, {key}, %nk;"));
                                for (cmp, l) in &lims {
                                    self.ins(format!("setp.{cmp}.or.s32 {pr}, {key}, {l}, {pr};"));
                                }
                                let r = self.acc_reg(*dst, mt, nt, half * 2 + lo);
                                self.ins(format!("selp.f32 {r}, {}, {r}, {pr};", f32_lit(*fill)));
                            }
                        }
                    }
                }
                let _ = lp.block_n;
                self.body.push_str(&format!("{skip}:\n"));
            }
            Stmt::RowReduce { dst, src, op } => {
                let cols = prog.regs[src.index()].cols;
                let opn = match op {
                    ReduceOp::Max => "max.f32",
                    ReduceOp::Sum => "add.f32",
                };
                for mt in 0..self.mtiles {
                    for half in 0..2 {
                        let mut vals: Vec<String> = Vec::new();
                        for nt in 0..cols / 8 {
                            for lo in 0..2 {
                                vals.push(self.acc_reg(*src, mt, nt, half * 2 + lo));
                            }
                        }
                        // Pairwise tree: shorter dependency chains than a linear fold.
                        while vals.len() > 1 {
                            let mut next = Vec::new();
                            for pair in vals.chunks(2) {
                                if pair.len() == 2 {
                                    let t = self.f();
                                    self.ins(format!("{opn} {t}, {}, {};", pair[0], pair[1]));
                                    next.push(t);
                                } else {
                                    next.push(pair[0].clone());
                                }
                            }
                            vals = next;
                        }
                        let mut v = vals.pop().unwrap_or_else(|| f32_lit(0.0));
                        for x in [1, 2] {
                            let s = self.f();
                            self.ins(format!("shfl.sync.bfly.b32 {s}, {v}, {x}, 31, -1;"));
                            let t = self.f();
                            self.ins(format!("{opn} {t}, {v}, {s};"));
                            v = t;
                        }
                        let r = self.row_reg(*dst, mt, half);
                        self.ins(format!("mov.f32 {r}, {v};"));
                    }
                }
            }
            Stmt::RowMap { dst, expr } => {
                for mt in 0..self.mtiles {
                    for half in 0..2 {
                        let ctx = ElemCtx {
                            mt,
                            half,
                            col: None,
                        };
                        let v = self.emit_expr(expr, &ctx)?;
                        let r = self.row_reg(*dst, mt, half);
                        self.ins(format!("mov.f32 {r}, {v};"));
                    }
                }
            }
            Stmt::Convert { dst, src } => {
                let elem = match prog.regs[dst.index()].kind {
                    RegKind::AOperand(e) => e,
                    RegKind::Accumulator => return unsupported("Convert into f32"),
                };
                let ty = Self::mma_type(elem)?;
                let cols = prog.regs[src.index()].cols;
                for mt in 0..self.mtiles {
                    for ks in 0..cols / 16 {
                        for i in 0..4 {
                            // a0: n-tile 2ks rows g; a1: 2ks rows g+8; a2: 2ks+1 rows g; a3: 2ks+1 rows g+8
                            let nt = 2 * ks + i / 2;
                            let e0 = (i % 2) * 2;
                            let lo = self.acc_reg(*src, mt, nt, e0);
                            let hi = self.acc_reg(*src, mt, nt, e0 + 1);
                            let d = self.afrag_reg(*dst, mt, ks, i);
                            self.ins(format!("cvt.rn.{ty}x2.f32 {d}, {hi}, {lo};"));
                        }
                    }
                }
            }
            Stmt::KeyLoop {
                block_n,
                masks,
                body,
            } => self.emit_key_loop(*block_n, masks, body)?,
            Stmt::Store { src, dst } => {
                let t = &prog.tensors[dst.index()];
                let ty = Self::mma_type(t.elem)?;
                let cols = prog.regs[src.index()].cols;
                self.comment(format!("store {}", t.name));
                let sequential = prog.sequential;
                let col_block = cols < t.head_dim;
                for mt in 0..self.mtiles {
                    for half in 0..2 {
                        let pi = self.r();
                        self.ins(format!("add.s32 {pi}, %prow0, {};", mt * 16 + half * 8));
                        if sequential {
                            self.ins(format!("add.s32 {pi}, {pi}, %korg;"));
                        }
                        let ok = self.pred();
                        self.ins(format!("setp.lt.s32 {ok}, {pi}, %nq;"));
                        let addr = self.rd();
                        self.ins(format!("cvt.u64.u32 {addr}, {pi};"));
                        self.ins(format!("mul.lo.u64 {addr}, {addr}, %rsb{};", dst.0));
                        self.ins(format!("add.u64 {addr}, {addr}, %base{};", dst.0));
                        if col_block {
                            let cb = self.rd();
                            self.ins(format!(
                                "mul.wide.u32 {cb}, %colb, {};",
                                cols * t.elem.bytes()
                            ));
                            self.ins(format!("add.u64 {addr}, {addr}, {cb};"));
                        }
                        let cb = self.rd();
                        self.ins(format!("mul.wide.u32 {cb}, %tig, {};", 2 * t.elem.bytes()));
                        self.ins(format!("add.u64 {addr}, {addr}, {cb};"));
                        for nt in 0..cols / 8 {
                            let lo = self.acc_reg(*src, mt, nt, half * 2);
                            let hi = self.acc_reg(*src, mt, nt, half * 2 + 1);
                            let pk = self.r();
                            self.ins(format!("cvt.rn.{ty}x2.f32 {pk}, {hi}, {lo};"));
                            self.ins(format!(
                                "@{ok} st.global.b32 [{addr}+{}], {pk};",
                                nt * 8 * t.elem.bytes()
                            ));
                        }
                    }
                }
            }
            Stmt::ContractT { acc, a, scale, b } => self.emit_contract_t(*acc, *a, scale, *b)?,
            Stmt::StoreShared { src, dst } => self.emit_store_shared(*src, *dst)?,
            Stmt::LookBack {
                state,
                prefix,
                aggregates,
                inclusive,
                decay,
            } => self.emit_look_back(*state, *prefix, *aggregates, *inclusive, decay)?,
            Stmt::StoreState { src, dst } => self.emit_store_state(*src, *dst)?,
            Stmt::LoadStatePrefix { dst, src, decay } => {
                self.emit_load_state_prefix(*dst, *src, decay)?
            }
            Stmt::StoreRow { src, dst } => {
                for mt in 0..self.mtiles {
                    for half in 0..2 {
                        let pi = self.r();
                        self.ins(format!("add.s32 {pi}, %prow0, {};", mt * 16 + half * 8));
                        let ok = self.pred();
                        self.ins(format!("setp.lt.s32 {ok}, {pi}, %nq;"));
                        self.ins(format!("setp.eq.and.u32 {ok}, %tig, 0, {ok};"));
                        let idx = self.r();
                        self.ins(format!("mad.lo.u32 {idx}, %bidx, %heads, %hidx;"));
                        self.ins(format!("mad.lo.u32 {idx}, {idx}, %nq, {pi};"));
                        let addr = self.rd();
                        self.ins(format!("mul.wide.u32 {addr}, {idx}, 4;"));
                        self.ins(format!("add.u64 {addr}, {addr}, %ro{};", dst.0));
                        let r = self.row_reg(*src, mt, half);
                        self.ins(format!("@{ok} st.global.f32 [{addr}], {r};"));
                    }
                }
            }
        }
        Ok(())
    }

    /// Issues the cp.async copies of one tile (no commit). `origin` holds the first row.
    /// Each thread copies one 16-byte chunk `thr % 8` of a 128-byte block row per step; the
    /// steps walk the first column block's rows, then the next block's, so the shared
    /// address is the same affine function of the step for every tile width.
    fn emit_load_issue(
        &mut self,
        dst: SharedId,
        src: TensorId,
        origin: &str,
        smem: &str,
    ) -> Result<(), TileError> {
        let prog = self.prog;
        let t = &prog.shared[dst.index()];
        let threads = prog.threads();
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
        self.ins(format!("shr.u32 {trow}, %thr, 3;"));
        self.ins(format!("and.b32 {tch}, %thr, 7;"));
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
        if t.cols < prog.tensors[src.index()].head_dim {
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

    /// Makes this thread's earlier generic-proxy writes to shared memory (`cp.async`,
    /// `st.shared`) visible to `wgmma` reads that follow the next barrier.
    fn emit_async_proxy_fence(&mut self) {
        if self.prog.schedule.mma == MmaUnit::Warpgroup {
            self.ins("fence.proxy.async.shared::cta;");
        }
    }

    /// A 64-bit `wgmma` descriptor for a tile stored as described in the module docs,
    /// starting at shared address `addr`: 128-byte swizzle, 8-row groups 1024 bytes apart
    /// (the stride byte offset), and, for N-major operands, 64-column blocks
    /// `block_bytes` apart (the leading byte offset; unused for K-major).
    fn wgmma_desc(&mut self, addr: &str, block_bytes: u32, n_major: bool) -> String {
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
    fn emit_wgmma(
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
                self.ins(format!(
                    "wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{ty}.{ty} {{{}}}, {a}, {bd}, %wgacc, 1, 1, {tail};",
                    c.join(", ")
                ));
                n0 += n;
            }
        }
        self.ins("wgmma.commit_group.sync.aligned;");
        self.wgmma_pending.push(group);
    }

    fn emit_contract(
        &mut self,
        acc: RegId,
        a: AOperand,
        b: SharedId,
        layout: BLayout,
    ) -> Result<(), TileError> {
        let prog = self.prog;
        if prog.schedule.mma == MmaUnit::Warpgroup {
            return self.emit_contract_wgmma(acc, a, b, layout);
        }
        let acc_t = &prog.regs[acc.index()];
        let bt = &prog.shared[b.index()];
        let ty = Self::mma_type(bt.elem)?;
        let n_cols = acc_t.cols;
        let k_len = match layout {
            BLayout::RowsAreN => bt.cols,
            BLayout::RowsAreK => bt.rows,
        };
        let b_block = bt.rows * ROW_BYTES;
        let bbase = self.smem_base[b.index()].clone();
        self.comment(format!("contract {} += . {}", acc_t.name, bt.name));
        // A from shared: warp's base.
        let a_wbase = match a {
            AOperand::Shared(id) => {
                let t = &prog.shared[id.index()];
                let wbase = self.r();
                let sb = self.smem_base[id.index()].clone();
                self.ins(format!(
                    "mad.lo.u32 {wbase}, %warp, {}, {sb};",
                    prog.rows_per_warp() * ROW_BYTES
                ));
                Some((wbase, t.rows * ROW_BYTES))
            }
            AOperand::Reg(_) => None,
        };
        for ks in 0..k_len / 16 {
            // A fragments of each m-tile for this k-step.
            let mut afr: Vec<Vec<String>> = Vec::new();
            for mt in 0..self.mtiles {
                match a {
                    AOperand::Reg(id) => {
                        afr.push((0..4).map(|i| self.afrag_reg(id, mt, ks, i)).collect())
                    }
                    AOperand::Shared(_) => {
                        let (wbase, rb) = a_wbase
                            .clone()
                            .ok_or_else(|| TileError::Invalid("no A base".into()))?;
                        let (addr, imm) = self.ldm_addr(&wbase, "A", rb, mt * 16, 2 * ks);
                        let regs: Vec<String> = (0..4).map(|_| self.r()).collect();
                        self.ins(format!(
                            "ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{{}}}, [{addr}+{imm}];",
                            regs.join(", ")
                        ));
                        afr.push(regs);
                    }
                }
            }
            self.emit_b_fragments_and_mma(acc, &afr, &bbase, b_block, layout, ks, n_cols, ty);
        }
        Ok(())
    }

    fn emit_contract_wgmma(
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
                let wg = self.r();
                self.ins(format!("shr.u32 {wg}, %warp, 2;"));
                let base = self.r();
                self.ins(format!(
                    "mad.lo.u32 {base}, {wg}, {}, {sb};",
                    64 * ROW_BYTES
                ));
                let adesc = self.wgmma_desc(&base, a_block, false);
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
        };
        match a {
            AOperand::Reg(id) => group.regs.push(id),
            AOperand::Shared(id) => group.shared.push(id),
        }
        self.emit_wgmma(acc, group, &a_ops, &bdesc, b_step, n_major, b_block, ty);
        Ok(())
    }

    /// One k-step of a contraction: for every 16 output columns, the B fragments of
    /// k-step `ks` (`ldmatrix`, transposed for `RowsAreK`), then an MMA per m-tile of `afr`
    /// and per 8-column half.
    #[allow(clippy::too_many_arguments)]
    fn emit_b_fragments_and_mma(
        &mut self,
        acc: RegId,
        afr: &[Vec<String>],
        bbase: &str,
        b_block: u32,
        layout: BLayout,
        ks: u32,
        n_cols: u32,
        ty: &str,
    ) {
        for nj in 0..n_cols / 16 {
            let bregs: Vec<String> = (0..4).map(|_| self.r()).collect();
            match layout {
                BLayout::RowsAreN => {
                    // Rows n0..n0+15 of the tile, chunk pair 2ks: r0,r1 = b of n-tile 2nj, r2,r3 of 2nj+1.
                    let (addr, imm) = self.ldm_addr(bbase, "N", b_block, nj * 16, 2 * ks);
                    self.ins(format!(
                        "ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{{}}}, [{addr}+{imm}];",
                        bregs.join(", ")
                    ));
                }
                BLayout::RowsAreK => {
                    // Rows k0..k0+15, chunk pair 2nj, transposed: r0,r1 = b of n-tile 2nj, r2,r3 of 2nj+1.
                    let (addr, imm) = self.ldm_addr(bbase, "A", b_block, ks * 16, 2 * nj);
                    self.ins(format!(
                        "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {{{}}}, [{addr}+{imm}];",
                        bregs.join(", ")
                    ));
                }
            }
            for (mt, af) in afr.iter().enumerate() {
                for half in 0..2u32 {
                    let nt = 2 * nj + half;
                    let c: Vec<String> = (0..4)
                        .map(|e| self.acc_reg(acc, mt as u32, nt, e))
                        .collect();
                    let b0 = &bregs[(2 * half) as usize];
                    let b1 = &bregs[(2 * half + 1) as usize];
                    self.ins(format!(
                        "mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32 {{{c}}}, {{{a}}}, {{{b0}, {b1}}}, {{{c}}};",
                        c = c.join(", "),
                        a = af.join(", ")
                    ));
                }
            }
        }
    }

    /// `acc += (scale * a)^T . b`: A fragments from `a` (stored `[k][m]`) by
    /// `ldmatrix.trans` with the B-operand lane pattern, each k scaled in f32 and rounded
    /// back to 16 bits, then the same MMAs as a `RowsAreK` contraction.
    fn emit_contract_t(
        &mut self,
        acc: RegId,
        a: SharedId,
        scale: &ScalarExpr,
        b: SharedId,
    ) -> Result<(), TileError> {
        let prog = self.prog;
        let acc_t = &prog.regs[acc.index()];
        let at = &prog.shared[a.index()];
        let bt = &prog.shared[b.index()];
        let ty = Self::mma_type(at.elem)?;
        let a_block = at.rows * ROW_BYTES;
        let b_block = bt.rows * ROW_BYTES;
        let abase = self.smem_base[a.index()].clone();
        let bbase = self.smem_base[b.index()].clone();
        self.comment(format!(
            "contract {} += ({} scaled)^T . {}",
            acc_t.name, at.name, bt.name
        ));
        // Per m-tile: lane row and swizzled chunk of its 8x8 matrix (columns of `a` are the
        // accumulator rows, which depend on the warp).
        let bit = self.r();
        self.ins(format!("bfe.u32 {bit}, %lane, 3, 1;"));
        let l7 = self.r();
        self.ins(format!("and.b32 {l7}, %lane, 7;"));
        let mut offs = Vec::new();
        for mt in 0..self.mtiles {
            let chunk = self.r();
            self.ins(format!(
                "mad.lo.u32 {chunk}, %warp, {}, {};",
                prog.rows_per_warp() / 8,
                mt * 2
            ));
            self.ins(format!("or.b32 {chunk}, {chunk}, {bit};"));
            // Column block chunk / 8, swizzled chunk (chunk % 8) ^ row.
            let blk = self.r();
            self.ins(format!("shr.u32 {blk}, {chunk}, 3;"));
            self.ins(format!("and.b32 {chunk}, {chunk}, 7;"));
            self.ins(format!("xor.b32 {chunk}, {chunk}, {l7};"));
            let off = self.r();
            self.ins(format!("mad.lo.u32 {off}, %lmN_row, {ROW_BYTES}, {abase};"));
            self.ins(format!("mad.lo.u32 {off}, {blk}, {a_block}, {off};"));
            self.ins(format!("mad.lo.u32 {off}, {chunk}, 16, {off};"));
            offs.push(off);
        }
        let conv = match at.elem {
            Elem::Bf16 => "bf16",
            _ => "f16",
        };
        let wgmma = prog.schedule.mma == MmaUnit::Warpgroup;
        let mut wg_a: Vec<String> = Vec::new();
        for ks in 0..at.rows / 16 {
            // Scale factors of this thread's four k values: nt 2ks and 2ks+1, lo 0 and 1.
            let mut fac = Vec::new();
            for nt in [2 * ks, 2 * ks + 1] {
                for lo in 0..2 {
                    let ctx = ElemCtx {
                        mt: 0,
                        half: 0,
                        col: Some((nt, lo)),
                    };
                    fac.push(self.emit_expr(scale, &ctx)?);
                }
            }
            let unit = matches!(scale, ScalarExpr::Lit(x) if *x == 1.0);
            let mut afr: Vec<Vec<String>> = Vec::new();
            for off in offs.clone() {
                let regs: Vec<String> = (0..4).map(|_| self.r()).collect();
                self.ins(format!(
                    "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {{{}}}, [{off}+{}];",
                    regs.join(", "),
                    ks * 16 * ROW_BYTES
                ));
                if !unit {
                    for (i, r) in regs.iter().enumerate() {
                        // a0, a1 hold k = 2tig (+1); a2, a3 hold k = 8 + 2tig (+1).
                        let (f_lo, f_hi) = if i < 2 {
                            (&fac[0], &fac[1])
                        } else {
                            (&fac[2], &fac[3])
                        };
                        let (x_lo, x_hi) = (self.f(), self.f());
                        match at.elem {
                            Elem::Bf16 => {
                                let (t_lo, t_hi) = (self.r(), self.r());
                                self.ins(format!("shl.b32 {t_lo}, {r}, 16;"));
                                self.ins(format!("and.b32 {t_hi}, {r}, -65536;"));
                                self.ins(format!("mov.b32 {x_lo}, {t_lo};"));
                                self.ins(format!("mov.b32 {x_hi}, {t_hi};"));
                            }
                            _ => {
                                let (h_lo, h_hi) = (self.h16(), self.h16());
                                self.ins(format!("mov.b32 {{{h_lo}, {h_hi}}}, {r};"));
                                self.ins(format!("cvt.f32.f16 {x_lo}, {h_lo};"));
                                self.ins(format!("cvt.f32.f16 {x_hi}, {h_hi};"));
                            }
                        }
                        self.ins(format!("mul.f32 {x_lo}, {x_lo}, {f_lo};"));
                        self.ins(format!("mul.f32 {x_hi}, {x_hi}, {f_hi};"));
                        self.ins(format!("cvt.rn.{conv}x2.f32 {r}, {x_hi}, {x_lo};"));
                    }
                }
                afr.push(regs);
            }
            if wgmma {
                wg_a.push(format!("{{{}}}", afr[0].join(", ")));
            } else {
                self.emit_b_fragments_and_mma(
                    acc,
                    &afr,
                    &bbase,
                    b_block,
                    BLayout::RowsAreK,
                    ks,
                    acc_t.cols,
                    ty,
                );
            }
        }
        if wgmma {
            let bdesc = self.wgmma_desc(&bbase, b_block, true);
            let group = WgmmaGroup {
                regs: vec![acc],
                shared: vec![b],
            };
            self.emit_wgmma(
                acc,
                group,
                &wg_a,
                &bdesc,
                |ks| ks * 16 * ROW_BYTES,
                true,
                b_block,
                ty,
            );
        }
        Ok(())
    }

    /// Address of this thread's first element of chunk `chunk_reg` in state `id`:
    /// row `warp * rpw + g`, columns `colb * cols + 2 tig`.
    fn state_addr(&mut self, id: StateId, cols: u32, chunk_reg: &str) -> String {
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
    fn state_pairs(&self, id: RegId, total: u32) -> Vec<(String, String, u32)> {
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
    fn emit_store_state(&mut self, src: RegId, dst: StateId) -> Result<(), TileError> {
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
    fn emit_load_state_prefix(
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
    fn lb_smem_addr(&mut self) -> String {
        let a = self.r();
        self.ins(format!("mov.u32 {a}, einattn_smem;"));
        self.ins(format!("add.u32 {a}, {a}, {};", self.lb_smem));
        a
    }

    /// Address of this CTA's (or chunk `chunk`'s) flag word: after the ticket counter,
    /// `(chunk * B*H + bh) * col_blocks + colb`.
    fn lb_flag_addr(&mut self, chunk: &str) -> String {
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
    fn emit_publish(&mut self, src: RegId, dst: StateId, flag: u32) -> Result<(), TileError> {
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
    fn emit_look_back(
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

    /// Rounds an accumulator into a shared tile (swizzled like loaded tiles), after a
    /// barrier so no warp still reads the previous contents.
    fn emit_store_shared(&mut self, src: RegId, dst: SharedId) -> Result<(), TileError> {
        let prog = self.prog;
        let t = &prog.shared[dst.index()];
        let cols = prog.regs[src.index()].cols;
        let ty = Self::mma_type(t.elem)?;
        let block_bytes = t.rows * ROW_BYTES;
        self.comment(format!(
            "{} = round({})",
            t.name,
            prog.regs[src.index()].name
        ));
        let base = match self.store_base[dst.index()].clone() {
            // The other copy: its last reader finished before this iteration's barrier.
            Some(write) => write,
            None => {
                self.ins("bar.sync 0;");
                self.smem_base[dst.index()].clone()
            }
        };
        // Row warp * rpw + g; chunk nt lands in column block nt / 8 at chunk (nt % 8) ^ g.
        let row = self.r();
        self.ins(format!(
            "mad.lo.u32 {row}, %warp, {}, %g;",
            prog.rows_per_warp()
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
        if self.store_base[dst.index()].is_none() && !self.in_loop {
            // Outside a loop nothing else orders these writes before the reads that follow.
            self.emit_async_proxy_fence();
            self.ins("bar.sync 0;");
        }
        Ok(())
    }

    fn emit_key_loop(
        &mut self,
        block_n: u32,
        masks: &[BandMask],
        body: &[Stmt],
    ) -> Result<(), TileError> {
        let prog = self.prog;
        let stages = prog.schedule.stages;
        self.comment(format!("key loop: tiles of {block_n}, {stages} stages"));
        // Key range from the band masks (signed arithmetic).
        let kstart = self.named_once(".b32", "kstart");
        let kend = self.named_once(".b32", "kend");
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

        // Issue tile `tile_reg` into stage `stage_reg` for every stream, if `tile < tend`.
        let issue = |p: &mut Printer, it_reg: &str, stage_reg: &str| -> Result<(), TileError> {
            let skip = p.label("noissue");
            let ok = p.pred();
            p.ins(format!("setp.ge.s32 {ok}, {it_reg}, %niter;"));
            p.ins(format!("@{ok} bra.uni {skip};"));
            let origin = p.r();
            p.ins(format!("add.s32 {origin}, %tbegin, {it_reg};"));
            p.ins(format!("mul.lo.s32 {origin}, {origin}, {block_n};"));
            for (i, (dst, src)) in streams.iter().enumerate() {
                let sb = p.r();
                p.ins(format!(
                    "mad.lo.u32 {sb}, {stage_reg}, {}, {};",
                    stage_bytes[i], ring_base[i]
                ));
                p.emit_load_issue(*dst, *src, &origin, &sb)?;
            }
            p.body.push_str(&format!("{skip}:\n"));
            p.ins("cp.async.commit_group;");
            Ok(())
        };
        // Prologue: tiles 0 .. stages-2 into stages 0 .. stages-2.
        for s in 0..stages - 1 {
            let it = self.r();
            self.ins(format!("mov.u32 {it}, {s};"));
            issue(self, &it, &it)?;
        }
        let it = self.named_once(".b32", "it");
        let cur = self.named_once(".b32", "stage_cur");
        let nxt = self.named_once(".b32", "stage_next");
        self.ins(format!("mov.u32 {it}, 0;"));
        self.ins(format!("mov.u32 {cur}, 0;"));
        self.ins(format!("mov.u32 {nxt}, {};", stages - 1));
        let needmask = self.named_once(".pred", "needmask");
        let kcol = self.named_once(".b32", "kcol");
        let kf = self.named_once(".f32", "kf");
        let top = self.label("ktop");
        let end = self.label("kend");
        self.body.push_str(&format!("{top}:\n"));
        let done = self.pred();
        self.ins(format!("setp.ge.s32 {done}, {it}, %niter;"));
        self.ins(format!("@{done} bra.uni {end};"));
        self.ins(format!("cp.async.wait_group {};", stages - 2));
        self.emit_async_proxy_fence();
        self.ins("bar.sync 0;");
        let it_next = self.r();
        self.ins(format!("add.s32 {it_next}, {it}, {};", stages - 1));
        issue(self, &it_next, &nxt)?;
        // Current tile.
        let korg = self.named_once(".b32", "korg");
        self.ins(format!("add.s32 {korg}, %tbegin, {it};"));
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
        if prog.sequential {
            // Positions inside a sequential program's tile are tile-relative.
            self.ins(format!("shl.b32 {kcol}, %tig, 1;"));
        } else {
            self.ins(format!("mad.lo.s32 {kcol}, %tig, 2, {korg};"));
        }
        self.ins(format!("cvt.rn.f32.s32 {kf}, {kcol};"));
        let st = LoopState {
            masks: masks.to_vec(),
            block_n,
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
    fn emit_expr(&mut self, e: &ScalarExpr, ctx: &ElemCtx) -> Result<String, TileError> {
        match e {
            ScalarExpr::Lit(x) => return Ok(f32_lit(*x)),
            ScalarExpr::Scalar(id) => return Ok(format!("%sc{}", id.0)),
            ScalarExpr::Head(id) => return Ok(format!("%hp{}", id.0)),
            _ => {}
        }
        if let Some(class) = self.invariant_key(e, ctx) {
            let key = (format!("{e:?}"), class);
            if let Some(r) = self.invariant_cache.get(&key) {
                return Ok(r.clone());
            }
            let saved = std::mem::take(&mut self.body);
            let v = self.emit_expr_inner(e, ctx)?;
            let code = std::mem::replace(&mut self.body, saved);
            self.hoisted.push_str(&code);
            self.invariant_cache.insert(key, v.clone());
            return Ok(v);
        }
        if e.is_uniform() {
            let key = format!("{e:?}");
            if let Some(r) = self.uniform_cache.get(&key) {
                return Ok(r.clone());
            }
            // Compute once, in the hoisted section that runs before the body.
            let saved = std::mem::take(&mut self.body);
            let v = self.emit_expr_inner(e, ctx)?;
            let code = std::mem::replace(&mut self.body, saved);
            self.hoisted.push_str(&code);
            self.uniform_cache.insert(key, v.clone());
            return Ok(v);
        }
        self.emit_expr_inner(e, ctx)
    }

    /// In a sequential program positions are tile-relative, so an expensive expression of
    /// positions alone (a decay factor) has the same value in every iteration: it is
    /// computed once at kernel start. Elements share a register when the expression has the
    /// same value for them: same row (query only), same column (key only), or same `i - j`
    /// relative to the thread's first row and column (a difference); other expressions are
    /// left in the loop (one register per element would be too many).
    fn invariant_key(&self, e: &ScalarExpr, ctx: &ElemCtx) -> Option<(u8, i32)> {
        // (A look-back program's loop runs once: nothing to gain, registers to lose.)
        if !self.in_loop || !self.prog.sequential || self.prog.look_back || !e.has_transcendental()
        {
            return None;
        }
        let row = (ctx.mt * 16 + ctx.half * 8) as i32;
        let col = ctx.col.map(|(nt, lo)| (nt * 8 + lo) as i32);
        match (e.position_dependence()?, col) {
            (PositionDependence::Query, _) => Some((0, row)),
            (PositionDependence::Key, Some(c)) => Some((1, c)),
            (PositionDependence::Difference, Some(c)) => Some((2, row - c)),
            _ => None,
        }
    }

    fn emit_expr_inner(&mut self, e: &ScalarExpr, ctx: &ElemCtx) -> Result<String, TileError> {
        Ok(match e {
            ScalarExpr::Lit(_) | ScalarExpr::Scalar(_) | ScalarExpr::Head(_) => {
                self.emit_expr(e, ctx)?
            }
            ScalarExpr::Index(SeqRank::Query) => format!("%pf_{}_{}", ctx.mt, ctx.half),
            ScalarExpr::Index(SeqRank::Key) => {
                let (nt, lo) = ctx
                    .col
                    .ok_or_else(|| TileError::Invalid("key index in a row expression".into()))?;
                if !self.in_loop {
                    return Err(TileError::Invalid("key index outside the key loop".into()));
                }
                let t = self.f();
                self.ins(format!(
                    "add.f32 {t}, %kf, {};",
                    f32_lit((nt * 8 + lo) as f64)
                ));
                t
            }
            ScalarExpr::Elem(id) => {
                let (nt, lo) = ctx
                    .col
                    .ok_or_else(|| TileError::Invalid("Elem in a row expression".into()))?;
                self.acc_reg(*id, ctx.mt, nt, ctx.half * 2 + lo)
            }
            ScalarExpr::Row(id) => self.row_reg(*id, ctx.mt, ctx.half),
            ScalarExpr::Token(id, at) => {
                if !self.in_loop {
                    return Err(TileError::Invalid("token input outside the loop".into()));
                }
                let pos = self.r();
                match at {
                    TokenAt::Row => {
                        self.ins(format!(
                            "add.s32 {pos}, %prow0, {};",
                            ctx.mt * 16 + ctx.half * 8
                        ));
                        self.ins(format!("add.s32 {pos}, {pos}, %korg;"));
                    }
                    TokenAt::Col => {
                        let (nt, lo) = ctx.col.ok_or_else(|| {
                            TileError::Invalid("column token in a row expression".into())
                        })?;
                        self.ins(format!("add.s32 {pos}, %kcol, {};", nt * 8 + lo));
                        self.ins(format!("add.s32 {pos}, {pos}, %korg;"));
                    }
                    TokenAt::Last => {
                        self.ins(format!(
                            "add.s32 {pos}, %korg, {};",
                            self.prog.schedule.block_m
                        ));
                        self.ins(format!("min.s32 {pos}, {pos}, %nk;"));
                        self.ins(format!("sub.s32 {pos}, {pos}, 1;"));
                    }
                    TokenAt::Before => {
                        self.ins(format!("sub.s32 {pos}, %korg, 1;"));
                    }
                }
                // Past the end: the last token (those elements are masked); before the
                // start: 0.
                let last = self.r();
                self.ins(format!("sub.s32 {last}, %nk, 1;"));
                self.ins(format!("min.s32 {pos}, {pos}, {last};"));
                let neg = self.pred();
                self.ins(format!("setp.lt.s32 {neg}, {pos}, 0;"));
                self.ins(format!("max.s32 {pos}, {pos}, 0;"));
                let addr = self.rd();
                self.ins(format!("cvt.u64.u32 {addr}, {pos};"));
                self.ins(format!("mul.lo.u64 {addr}, {addr}, %tkrs{};", id.0));
                self.ins(format!("add.u64 {addr}, {addr}, %tkbase{};", id.0));
                let v = self.f();
                self.ins(format!("ld.global.nc.f32 {v}, [{addr}];"));
                self.ins(format!("selp.f32 {v}, 0f00000000, {v}, {neg};"));
                v
            }
            ScalarExpr::Unary(op, a) => {
                let a = self.emit_expr(a, ctx)?;
                let t = self.f();
                match op {
                    UnaryOp::Neg => self.ins(format!("neg.f32 {t}, {a};")),
                    UnaryOp::Exp => {
                        let s = self.f();
                        self.ins(format!(
                            "mul.f32 {s}, {a}, {};",
                            f32_lit(std::f64::consts::LOG2_E)
                        ));
                        self.ins(format!("ex2.approx.ftz.f32 {t}, {s};"));
                    }
                    UnaryOp::Exp2 => self.ins(format!("ex2.approx.ftz.f32 {t}, {a};")),
                    UnaryOp::Log => {
                        let s = self.f();
                        self.ins(format!("lg2.approx.ftz.f32 {s}, {a};"));
                        self.ins(format!(
                            "mul.f32 {t}, {s}, {};",
                            f32_lit(std::f64::consts::LN_2)
                        ));
                    }
                    UnaryOp::Log2 => self.ins(format!("lg2.approx.ftz.f32 {t}, {a};")),
                    UnaryOp::Sqrt => self.ins(format!("sqrt.rn.f32 {t}, {a};")),
                    UnaryOp::Tanh => self.ins(format!("tanh.approx.f32 {t}, {a};")),
                    UnaryOp::Recip => self.ins(format!("rcp.rn.f32 {t}, {a};")),
                }
                t
            }
            ScalarExpr::Binary(op, a, b) => {
                let a = self.emit_expr(a, ctx)?;
                let b = self.emit_expr(b, ctx)?;
                let t = self.f();
                let opn = match op {
                    BinaryOp::Add => "add.f32",
                    BinaryOp::Sub => "sub.f32",
                    BinaryOp::Mul => "mul.f32",
                    BinaryOp::Div => "div.rn.f32",
                    BinaryOp::Max => "max.f32",
                    BinaryOp::Min => "min.f32",
                };
                self.ins(format!("{opn} {t}, {a}, {b};"));
                t
            }
            ScalarExpr::Select {
                op,
                lhs,
                rhs,
                then,
                otherwise,
            } => {
                let l = self.emit_expr(lhs, ctx)?;
                let r = self.emit_expr(rhs, ctx)?;
                let a = self.emit_expr(then, ctx)?;
                let b = self.emit_expr(otherwise, ctx)?;
                let pr = self.pred();
                let cmp = match op {
                    CmpOp::Lt => "lt",
                    CmpOp::Le => "le",
                    CmpOp::Gt => "gt",
                    CmpOp::Ge => "ge",
                    CmpOp::Eq => "eq",
                    CmpOp::Ne => "ne",
                };
                self.ins(format!("setp.{cmp}.f32 {pr}, {l}, {r};"));
                let t = self.f();
                self.ins(format!("selp.f32 {t}, {a}, {b}, {pr};"));
                t
            }
        })
    }

    fn finish(&mut self, target: Target) -> String {
        let prog = self.prog;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "// Generated by einattn-backends from tile program `{}`.",
            prog.name
        );
        let _ = writeln!(
            s,
            "// block_m={} warps={} stages={} dynamic smem={} bytes",
            prog.schedule.block_m, prog.schedule.warps, prog.schedule.stages, self.smem_total
        );
        let _ = writeln!(s, ".version {PTX_VERSION}");
        let _ = writeln!(s, ".target {}", target.name());
        let _ = writeln!(s, ".address_size 64\n");
        let _ = writeln!(s, ".extern .shared .align 1024 .b8 einattn_smem[];\n");
        let _ = writeln!(s, ".visible .entry {}(", prog.name);
        let abi = prog.abi();
        for (i, a) in abi.iter().enumerate() {
            let ty = match a.kind {
                AbiKind::Ptr | AbiKind::U64 => ".u64",
                AbiKind::U32 => ".u32",
                AbiKind::F32 => ".f32",
            };
            let sep = if i + 1 == abi.len() { "" } else { "," };
            let _ = writeln!(s, "\t.param {ty} {}{sep}", a.name);
        }
        let _ = writeln!(s, ")");
        let _ = writeln!(s, ".maxntid {}, 1, 1", prog.threads());
        let _ = writeln!(s, "{{");
        for d in &self.decls {
            let _ = writeln!(s, "{d}");
        }
        let _ = writeln!(s, "\t.reg .b32 %r<{}>;", self.n_r.max(1));
        let _ = writeln!(s, "\t.reg .b64 %rd<{}>;", self.n_rd.max(1));
        let _ = writeln!(s, "\t.reg .f32 %f<{}>;", self.n_f.max(1));
        let _ = writeln!(s, "\t.reg .pred %p<{}>;", self.n_p.max(1));
        if self.n_h > 0 {
            let _ = writeln!(s, "\t.reg .b16 %h<{}>;", self.n_h);
        }
        for (i, t) in prog.regs.iter().enumerate() {
            match t.kind {
                RegKind::Accumulator => {
                    let _ = writeln!(s, "\t.reg .f32 %t{i}_<{}>;", self.mtiles * t.cols / 8 * 4);
                }
                RegKind::AOperand(_) => {
                    let _ = writeln!(s, "\t.reg .b32 %a{i}_<{}>;", self.mtiles * t.cols / 16 * 4);
                }
            }
        }
        for i in 0..prog.rows.len() {
            let _ = writeln!(s, "\t.reg .f32 %w{i}_<{}>;", self.mtiles * 2);
        }
        // The setup section ends where the body begins; hoisted uniform values need the
        // parameters, so they go right after the setup. The setup is the prefix of `body`
        // up to the first statement, which we marked by position when printing began.
        s.push_str(&self.body_with_hoisted());
        let _ = writeln!(s, "\tret;");
        let _ = writeln!(s, "}}");
        s
    }

    fn body_with_hoisted(&self) -> String {
        // Hoisted code uses only parameters and literals: insert it at the start of the body
        // after the setup marker.
        match self.body.find(SETUP_END) {
            Some(pos) => {
                let mut out = String::with_capacity(self.body.len() + self.hoisted.len());
                out.push_str(&self.body[..pos]);
                out.push_str(&self.hoisted);
                out.push_str(&self.body[pos..]);
                out
            }
            None => format!("{}{}", self.hoisted, self.body),
        }
    }
}

const SETUP_END: &str = "\t// end of setup\n";

/// Bytes of one row of a shared tile's 64-column block.
const ROW_BYTES: u32 = 128;

/// Alignment of every shared tile (and ring stage): the 128-byte swizzle repeats every
/// 8 rows of 128 bytes, and `wgmma` descriptors assume it starts on such a boundary.
const SMEM_ALIGN: u32 = 1024;

/// Where an expression is evaluated: this thread's m-tile, row half, and (for element maps)
/// n-tile and low/high column of the pair.
struct ElemCtx {
    mt: u32,
    half: u32,
    col: Option<(u32, u32)>,
}
