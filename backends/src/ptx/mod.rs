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
//!   Requires `cols` a multiple of 64.
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
//!   tiles. A warp-specialized program ([`Loads::ProducerWarpgroup`]) has a producer
//!   warpgroup fill the ring instead, with mbarriers per stage (see `producer.rs`).
//! * **Scalars**: expressions of literals and parameters only are computed once at kernel
//!   start; `exp2`, `log2`, `tanh` use the `.approx` SFU instructions (`ex2.approx.ftz`
//!   maps `-inf` to 0); `mul`/`add` are left unrounded so `ptxas` fuses them into FMA.
//! * **Stores**: each thread writes its 2 adjacent output elements as one 32-bit store,
//!   rows `>= N_q` predicated off; the row output (LSE) is written by `tig == 0` lanes.
//!   With [`TileSchedule::store_tma`] the output goes through shared memory and the copy
//!   engine instead (see `store.rs`).

mod expr;
mod mma_sync;
mod narrow;
mod params;
mod persistent;
mod pipeline;
mod producer;
pub mod ptxas;
mod registers;
mod state;
mod statements;
mod store;
mod stream;
mod wgmma;

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
    /// For a query-tiled program with a split key loop: the splits (grid z).
    pub key_splits: u32,
    /// For a persistent program: the most CTAs its grid has (see
    /// [`TileSchedule::persistent`]).
    pub persistent_ctas: Option<u32>,
}

impl PtxKernel {
    /// Grid `(query tiles, batch * heads, 1)`, or `(column blocks, batch * heads, 1)` for a
    /// sequential program.
    pub fn grid(&self, batch: u32, heads: u32, n_q: u32) -> (u32, u32, u32) {
        if let Some(ctas) = self.persistent_ctas {
            let tiles = (u64::from(n_q) * u64::from(batch) * u64::from(heads))
                .div_ceil(u64::from(self.block_m));
            // At most `ctas`, so it fits.
            return (tiles.clamp(1, u64::from(ctas)) as u32, 1, 1);
        }
        let chunks = self
            .chunk_tiles
            .map_or(1, |ct| n_q.div_ceil(self.block_m).div_ceil(ct).max(1));
        match self.col_blocks {
            Some(cb) => (cb, batch * heads, chunks),
            None => (n_q.div_ceil(self.block_m), batch * heads, self.key_splits),
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
    if p.barriers.is_some() {
        let producer = p.emit_role_split();
        if prog.schedule.persistent.is_some() {
            p.emit_persistent_consumers()?;
        } else {
            p.emit_block(&prog.body, None)?;
        }
        p.wait_wgmma(0);
        let end = p.label("roles_done");
        p.ins(format!("bra.uni {end};"));
        p.emit_producer(&producer)?;
        p.body.push_str(&format!("{end}:\n"));
    } else {
        p.emit_block(&prog.body, None)?;
        p.wait_wgmma(0);
    }
    let text = p.finish(target);
    Ok(PtxKernel {
        entry: prog.name.clone(),
        text,
        target,
        threads: prog.launch_threads(),
        block_m: prog.schedule.block_m,
        dynamic_smem_bytes: p.smem_total,
        abi: prog.abi(),
        col_blocks: prog.sequential.then_some(prog.col_blocks),
        chunk_tiles: prog.chunked().then_some(prog.chunk_tiles),
        key_splits: prog.key_splits,
        persistent_ctas: prog.persistent_ctas(),
    })
}

/// f32 literal in PTX hex form (exact, handles infinities).
fn f32_lit(x: f64) -> String {
    format!("0f{:08X}", (x as f32).to_bits())
}

/// What the statements of the key loop's body see of the loop.
struct LoopState {
    masks: Vec<BandMask>,
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
    /// The threads that issue `LoadTile` copies: the register with their index, and how
    /// many they are.
    load_thread: (String, u32),
    /// A warp-specialized program's mbarriers (see `producer.rs`).
    barriers: Option<producer::BarrierLayout>,
    /// Inside a warp-specialized key loop: streamed tiles this iteration has not waited
    /// for yet.
    stream_waits: Vec<SharedId>,
    /// An accumulator whose zero fill was folded into the `wgmma` that follows it (its first
    /// k-step does not accumulate).
    zero_acc: Option<RegId>,
    /// A look-back program's word of shared memory that broadcasts thread 0's ticket and
    /// the flags it reads.
    lb_smem: u32,
    /// Loop-invariant per-element values computed once at kernel start (see
    /// [`Printer::invariant_key`]), by expression and position class.
    invariant_cache: HashMap<(String, (u8, i32)), String>,
    /// While a `Map` over a key-indexed tile is printed: the key-only subexpressions
    /// already computed for a column, by expression and column `(nt, lo)`. A thread holds
    /// every column for two (or more) rows, so a per-key term (an ALiBi bias) is computed
    /// once per column instead of once per element.
    column_values: Option<HashMap<(String, u32, u32), String>>,
    /// While a `Map` prints: the key tile's bases `a * kf + b` of the column values affine
    /// in the key's position (see `expr::affine_in_key`).
    key_tile_bases: Option<HashMap<String, String>>,
}

/// What one committed `wgmma` group may still be reading or writing.
#[derive(Debug, Clone, Default)]
struct WgmmaGroup {
    /// Register tiles: the accumulator and a register A operand.
    regs: Vec<RegId>,
    /// Shared tiles it reads.
    shared: Vec<SharedId>,
    /// The deferred contraction of a key loop whose wait is pinned
    /// ([`TileSchedule::pin_deferred_wait`]).
    pinned: bool,
}

impl<'a> Printer<'a> {
    fn new(prog: &'a TileProgram) -> Result<Self, TileError> {
        let streamed = prog.streamed_tiles();
        let double = prog.loop_written_tiles();
        let mut smem_offset = Vec::new();
        let mut off = 0u32;
        for (i, t) in prog.shared.iter().enumerate() {
            if t.cols == 0 || !t.cols.is_multiple_of(64) {
                return unsupported(format!(
                    "shared tile {} needs a width of whole 64-element column blocks for the swizzle",
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
        let barriers = prog
            .schedule
            .loads
            .specialized()
            .then(|| producer::BarrierLayout::new(prog, off));
        let smem_total = match &barriers {
            Some(b) => off + b.bytes(),
            None => off + if prog.look_back { 16 } else { 0 },
        };
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
            smem_total,
            smem_base: vec![String::new(); prog.shared.len()],
            store_base: vec![None; prog.shared.len()],
            mtiles: prog.rows_per_warp() / 16,
            in_loop: false,
            wgmma_pending: Vec::new(),
            load_thread: ("%thr".to_string(), prog.threads()),
            barriers,
            stream_waits: Vec::new(),
            zero_acc: None,
            invariant_cache: HashMap::new(),
            column_values: None,
            key_tile_bases: None,
        })
    }
    // ---- register allocation -------------------------------------------------------

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
                // By value, as `cp.async.bulk.tensor` reads it (a `__grid_constant__`).
                AbiKind::TensorMap => {
                    let sep = if i + 1 == abi.len() { "" } else { "," };
                    let _ = writeln!(s, "\t.param .align 64 .b8 {}[128]{sep}", a.name);
                    continue;
                }
            };
            let sep = if i + 1 == abi.len() { "" } else { "," };
            let _ = writeln!(s, "\t.param {ty} {}{sep}", a.name);
        }
        let _ = writeln!(s, ")");
        let _ = writeln!(s, ".maxntid {}, 1, 1", prog.launch_threads());
        if self.barriers.is_some() {
            // `setmaxnreg` needs a register cap at entry: one CTA per SM.
            let _ = writeln!(s, ".minnctapersm 1");
        }
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
        // Hoisted code uses only parameters, literals and the work tile's registers: insert
        // it where the setup ends (in a persistent program, at the top of the consumers'
        // work tile, so it sees that tile's values; the producer evaluates no expression).
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

/// The first named barrier of a warpgroup's own meetings (`bar.sync 4 + warpgroup, 128`:
/// the output stored by the copy engine, probabilities through shared memory); 0 is the
/// CTA's, 1 to 3 are ping-pong's turns.
const WARPGROUP_BARRIER: u32 = 4;

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
