//! CPU interpreter of the Tile IR, in f64 (16-bit tiles are rounded to their type).
//!
//! It runs the program exactly as the GPU lowering structures it: one grid cell at a time,
//! the same key-tile range (tile skipping), masks applied only on boundary tiles, zero-filled
//! rows past the sequence ends. Tests compare it with a naive attention formula, so a wrong
//! skip or a missed boundary shows up on the CPU.

use super::*;

/// Sizes of one launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Problem {
    pub batch: usize,
    pub heads: usize,
    /// Query heads per KV head.
    pub kv_group: usize,
    pub n_q: usize,
    pub n_k: usize,
}

impl Problem {
    pub fn kv_heads(&self) -> usize {
        self.heads / self.kv_group.max(1)
    }
    pub fn seq_len(&self, rank: SeqRank) -> usize {
        match rank {
            SeqRank::Query => self.n_q,
            SeqRank::Key => self.n_k,
        }
    }
}

/// A `[B, N, H, d]` tensor in host memory with element strides (d contiguous).
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub data: Vec<f64>,
    pub stride_b: usize,
    pub stride_n: usize,
    pub stride_h: usize,
}

impl HostTensor {
    /// Contiguous BNHD.
    pub fn bnhd(data: Vec<f64>, n: usize, h: usize, d: usize) -> HostTensor {
        HostTensor {
            data,
            stride_b: n * h * d,
            stride_n: h * d,
            stride_h: d,
        }
    }
    /// Contiguous BHND.
    pub fn bhnd(data: Vec<f64>, n: usize, h: usize, d: usize) -> HostTensor {
        HostTensor {
            data,
            stride_b: h * n * d,
            stride_n: d,
            stride_h: n * d,
        }
    }
    pub fn offset(&self, b: usize, n: usize, h: usize) -> usize {
        b * self.stride_b + n * self.stride_n + h * self.stride_h
    }
}

/// Everything a program reads and writes, indexed like the program's declarations.
#[derive(Debug, Clone, PartialEq)]
pub struct Bindings {
    pub tensors: Vec<HostTensor>,
    /// `[B, H, N_q]` each (`[key_splits, B, H, N_q]` in a split program).
    pub row_outputs: Vec<Vec<f64>>,
    /// `[splits, B, H, N_q]` each (the row inputs' declared splits).
    pub row_inputs: Vec<Vec<f64>>,
    pub scalars: Vec<f64>,
    /// One value per head each.
    pub head_params: Vec<Vec<f64>>,
    /// The state arrays of a chunked program, `[chunks, B, H, rows, cols]` each.
    pub states: Vec<Vec<f64>>,
    /// The global index of this launch's first chunk (`chunk_base`; a device's rank under
    /// LASP-2), and the chunks in the state arrays (0: this launch's own).
    pub chunk_base: usize,
    pub chunk_total: usize,
    /// Position of query row 0 for a program with `query_offset` (0 otherwise).
    pub q_offset: usize,
    /// Per-token inputs: `(values, stride_b, stride_n, stride_h)`.
    pub tokens: Vec<(Vec<f64>, usize, usize, usize)>,
}

struct Cta<'a> {
    prog: &'a TileProgram,
    prob: Problem,
    b: usize,
    h: usize,
    p0: usize,
    /// The column block of a sequential program's CTA.
    col_block: usize,
    /// The chunk of a chunked program's CTA within its launch (its tiles), and its global
    /// index (its state slot).
    local_chunk: usize,
    chunk: usize,
    /// The split of a split key loop's CTA (grid z).
    split: usize,
    /// Position of query row 0 (tile-relative rows are `p0 + r` in memory).
    q_offset: usize,
    key_origin: usize,
    /// Keys `[lo, hi)` that all hold the one value of the CTA's query rows' narrowing
    /// token: their tiles need no value mask (see [`TileProgram::value_masks`]).
    value_free: (i64, i64),
    shared: Vec<Vec<f64>>,
    regs: Vec<Vec<f64>>,
    rows: Vec<Vec<f64>>,
}

/// Runs `prog` over the whole grid, writing the output tensors and row outputs in `io`.
pub fn run(prog: &TileProgram, prob: Problem, io: &mut Bindings) -> Result<(), TileError> {
    prog.validate()?;
    if io.tensors.len() != prog.tensors.len()
        || io.row_outputs.len() != prog.row_outputs.len()
        || io.row_inputs.len() != prog.row_inputs.len()
        || io.scalars.len() != prog.scalars.len()
        || io.head_params.len() != prog.head_params.len()
    {
        return invalid("bindings do not match the program's parameters");
    }
    if prob.kv_group == 0 || !prob.heads.is_multiple_of(prob.kv_group) {
        return invalid("heads must be a multiple of kv_group");
    }
    for hp in &io.head_params {
        if hp.len() < prob.heads {
            return invalid("a head parameter has fewer entries than heads");
        }
    }
    for (t, decl) in io.tensors.iter().zip(&prog.tensors) {
        let heads = match decl.rows {
            SeqRank::Query => prob.heads,
            SeqRank::Key => prob.kv_heads(),
        };
        let n = prob.seq_len(decl.rows);
        if prob.batch > 0 && n > 0 && heads > 0 {
            let last = t.offset(prob.batch - 1, n - 1, heads - 1) + decl.head_dim as usize;
            if last > t.data.len() {
                return invalid(format!("tensor {} is too small for its strides", decl.name));
            }
        }
    }
    let rows_total = prob.batch * prob.heads * prob.n_q;
    for r in &io.row_outputs {
        if r.len() < prog.key_splits as usize * rows_total {
            return invalid("row output too small");
        }
    }
    for (r, decl) in io.row_inputs.iter().zip(&prog.row_inputs) {
        if r.len() < decl.splits as usize * rows_total {
            return invalid(format!("row input {} too small", decl.name));
        }
    }
    let bm = prog.schedule.block_m as usize;
    if prog.sequential && prob.n_q != prob.n_k {
        return invalid("a sequential program needs N_q == N_k");
    }
    // A sequential CTA owns a column block; an attention CTA a query tile.
    let (x_cells, col_blocks) = if prog.sequential {
        (prog.col_blocks as usize, true)
    } else {
        (prob.n_q.div_ceil(bm), false)
    };
    let local_chunks = chunk_count(prog, prob);
    let chunks = if io.chunk_total == 0 {
        io.chunk_base + local_chunks
    } else {
        io.chunk_total
    };
    if io.states.len() != prog.states.len() {
        return invalid("bindings do not match the program's states");
    }
    for (st, decl) in io.states.iter().zip(&prog.states) {
        if st.len() < prob.batch * prob.heads * chunks * bm * decl.cols as usize {
            return invalid(format!("state {} is too small", decl.name));
        }
    }
    for b in 0..prob.batch {
        for h in 0..prob.heads {
            let cells = (0..x_cells).flat_map(|x| {
                (0..local_chunks)
                    .flat_map(move |c| (0..prog.key_splits as usize).map(move |s| (x, c, s)))
            });
            for (x, local, split) in cells {
                let mut cta = Cta {
                    prog,
                    prob,
                    b,
                    h,
                    p0: if col_blocks { 0 } else { x * bm },
                    col_block: if col_blocks { x } else { 0 },
                    local_chunk: local,
                    q_offset: if prog.query_offset { io.q_offset } else { 0 },
                    chunk: io.chunk_base + local,
                    split,
                    key_origin: 0,
                    value_free: (0, 0),
                    shared: prog
                        .shared
                        .iter()
                        .map(|t| vec![0.0; (t.rows * t.cols) as usize])
                        .collect(),
                    regs: prog
                        .regs
                        .iter()
                        .map(|t| vec![f64::NAN; bm * t.cols as usize])
                        .collect(),
                    rows: prog.rows.iter().map(|_| vec![f64::NAN; bm]).collect(),
                };
                cta.exec_block(&prog.body, io, None)?;
            }
        }
    }
    Ok(())
}

/// Chunks of a launch: 1 unless the program is chunked.
pub fn chunk_count(prog: &TileProgram, prob: Problem) -> usize {
    if prog.chunked() {
        let tiles = prob.n_k.div_ceil(prog.schedule.block_m as usize);
        tiles.div_ceil(prog.chunk_tiles as usize).max(1)
    } else {
        1
    }
}

struct LoopCtx<'a> {
    masks: &'a [BandMask],
    block_n: usize,
    needs_mask: bool,
}

impl Cta<'_> {
    /// Whether element (`r`, `c`) of the current key tile is past `N_k` or outside a band
    /// mask: what `Mask` fills and a masked `RowReduceMap` counts as its fill.
    fn hidden(&self, lp: &LoopCtx, r: usize, c: usize, io: &Bindings) -> bool {
        let p = (self.p0 + self.q_offset + r) as i64;
        let m = (self.key_origin + c) as i64;
        if m >= self.prob.n_k as i64 || !lp.masks.iter().all(|mk| mk.allows(p, m)) {
            return true;
        }
        // Value masks read tokens at memory rows (a query row never past N_q here: its
        // token clamps to the last, as the kernel's does).
        let token = |t: TokenId, at: TokenAt| {
            let (vals, sb, sn, sh) = &io.tokens[t.index()];
            let n = match at {
                TokenAt::Row => (self.p0 + r).min(self.prob.n_q - 1),
                _ => m as usize,
            };
            vals[self.b * sb + n * sn + self.h * sh]
        };
        !self.prog.value_masks.iter().all(|vm| vm.keeps(token))
    }

    fn head_of(&self, rank: SeqRank) -> usize {
        match rank {
            SeqRank::Query => self.h,
            SeqRank::Key => self.h / self.prob.kv_group,
        }
    }

    /// Writes this CTA's chunk of state array `dst` (rounded to f32, as the GPU stores it).
    fn write_state(&self, io: &mut Bindings, dst: StateId, vals: &[f64]) {
        let bm = self.prog.schedule.block_m as usize;
        let cols = vals.len() / bm;
        let total = self.prog.states[dst.index()].cols as usize;
        let col0 = self.col_offset(cols, total as u32);
        for r in 0..bm {
            let row = self.state_row(r, self.chunk, total);
            for c in 0..cols {
                io.states[dst.index()][row + col0 + c] = vals[r * cols + c] as f32 as f64;
            }
        }
    }

    /// `sum over c < chunk of f^(chunk - 1 - c) * src[c]` over `cols` columns (this CTA's
    /// block of them when the array is wider), by Horner's rule.
    fn state_prefix(&self, io: &Bindings, src: StateId, cols: usize, f: f64) -> Vec<f64> {
        let bm = self.prog.schedule.block_m as usize;
        let total = self.prog.states[src.index()].cols as usize;
        let col0 = self.col_offset(cols, total as u32);
        let mut acc = vec![0.0; bm * cols];
        for c_prev in 0..self.chunk {
            for r in 0..bm {
                let row = self.state_row(r, c_prev, total);
                for c in 0..cols {
                    acc[r * cols + c] =
                        acc[r * cols + c] * f + io.states[src.index()][row + col0 + c];
                }
            }
        }
        acc
    }

    /// Offset of row `r` of chunk `chunk` in a state array with `cols` columns.
    fn state_row(&self, r: usize, chunk: usize, cols: usize) -> usize {
        let bm = self.prog.schedule.block_m as usize;
        let bh = self.prob.batch * self.prob.heads;
        (((chunk * bh + self.b * self.prob.heads + self.h) * bm) + r) * cols
    }

    /// First column a tile of `cols` columns covers in a tensor of `tensor_cols`.
    fn col_offset(&self, cols: usize, tensor_cols: u32) -> usize {
        if cols < tensor_cols as usize {
            self.col_block * cols
        } else {
            0
        }
    }

    fn p_last(&self) -> usize {
        (self.p0 + self.prog.schedule.block_m as usize).min(self.prob.n_q) - 1
    }

    fn exec_block(
        &mut self,
        body: &[Stmt],
        io: &mut Bindings,
        lp: Option<&LoopCtx>,
    ) -> Result<(), TileError> {
        let bm = self.prog.schedule.block_m as usize;
        for st in body {
            match st {
                Stmt::LoadTile { dst, src } => {
                    let decl = &self.prog.shared[dst.index()];
                    let t = &io.tensors[src.index()];
                    let origin = match decl.rank {
                        _ if self.prog.sequential => self.key_origin,
                        SeqRank::Query => self.p0,
                        SeqRank::Key => self.key_origin,
                    };
                    let n = self.prob.seq_len(decl.rank);
                    let head = self.head_of(decl.rank);
                    let cols = decl.cols as usize;
                    let col0 = self.col_offset(cols, self.prog.tensors[src.index()].head_dim);
                    let tile = &mut self.shared[dst.index()];
                    for r in 0..decl.rows as usize {
                        for c in 0..cols {
                            tile[r * cols + c] = if origin + r < n {
                                decl.elem
                                    .round(t.data[t.offset(self.b, origin + r, head) + col0 + c])
                            } else {
                                0.0
                            };
                        }
                    }
                }
                Stmt::Fill { dst, value } => self.regs[dst.index()].fill(*value),
                Stmt::FillRow { dst, value } => self.rows[dst.index()].fill(*value),
                Stmt::Fragments { dst, src } => {
                    let elem = match self.prog.regs[dst.index()].kind {
                        RegKind::AOperand(e) => e,
                        RegKind::Accumulator => return invalid("Fragments into f32"),
                    };
                    let vals: Vec<f64> = self.shared[src.index()]
                        .iter()
                        .map(|&x| elem.round(x))
                        .collect();
                    self.regs[dst.index()] = vals;
                }
                Stmt::Contract {
                    acc,
                    a,
                    b,
                    b_layout,
                } => {
                    let n_cols = self.prog.regs[acc.index()].cols as usize;
                    let bt = &self.prog.shared[b.index()];
                    let (a_vals, k_len) = match a {
                        AOperand::Shared(id) => (
                            &self.shared[id.index()],
                            self.prog.shared[id.index()].cols as usize,
                        ),
                        AOperand::Reg(id) => (
                            &self.regs[id.index()],
                            self.prog.regs[id.index()].cols as usize,
                        ),
                    };
                    let b_vals = &self.shared[b.index()];
                    let b_cols = bt.cols as usize;
                    let mut out = self.regs[acc.index()].clone();
                    for r in 0..bm {
                        for n in 0..n_cols {
                            let mut sum = 0.0;
                            for kk in 0..k_len {
                                let bv = match b_layout {
                                    BLayout::RowsAreN => b_vals[n * b_cols + kk],
                                    BLayout::RowsAreK => b_vals[kk * b_cols + n],
                                };
                                sum += a_vals[r * k_len + kk] * bv;
                            }
                            out[r * n_cols + n] += sum;
                        }
                    }
                    self.regs[acc.index()] = out;
                }
                Stmt::ContractStream {
                    acc,
                    a,
                    b,
                    a_tile,
                    b_tile,
                } => self.contract_stream(io, *acc, [(*a, *a_tile), (*b, *b_tile)]),
                Stmt::Map { dst, expr } => {
                    let cols = self.prog.regs[dst.index()].cols as usize;
                    let mut out = vec![0.0; bm * cols];
                    for r in 0..bm {
                        for c in 0..cols {
                            out[r * cols + c] = self.eval(expr, io, r, Some(c))?;
                        }
                    }
                    self.regs[dst.index()] = out;
                }
                Stmt::Mask { dst, fill } => {
                    let lp =
                        lp.ok_or_else(|| TileError::Invalid("Mask outside the key loop".into()))?;
                    if lp.needs_mask {
                        let cols = lp.block_n;
                        for r in 0..bm {
                            for c in 0..cols {
                                if self.hidden(lp, r, c, io) {
                                    self.regs[dst.index()][r * cols + c] = *fill;
                                }
                            }
                        }
                    }
                }
                Stmt::RowReduce { dst, src, op } => {
                    let cols = self.prog.regs[src.index()].cols as usize;
                    for r in 0..bm {
                        let row = &self.regs[src.index()][r * cols..(r + 1) * cols];
                        self.rows[dst.index()][r] = reduce(*op, row.iter().copied());
                    }
                }
                Stmt::RowReduceMap {
                    dst,
                    op,
                    expr,
                    shape,
                    mask_fill,
                } => {
                    let cols = self.prog.regs[shape.index()].cols as usize;
                    let hide = match (mask_fill, lp) {
                        (Some(fill), Some(lp)) if lp.needs_mask => Some((*fill, lp)),
                        _ => None,
                    };
                    for r in 0..bm {
                        let mut row = Vec::with_capacity(cols);
                        for c in 0..cols {
                            let mut v = self.eval(expr, io, r, Some(c))?;
                            if let Some((fill, lp)) = hide {
                                if self.hidden(lp, r, c, io) {
                                    v = fill;
                                }
                            }
                            row.push(v);
                        }
                        self.rows[dst.index()][r] = reduce(*op, row.into_iter());
                    }
                }
                Stmt::RowDot { dst, a, b } => {
                    let cols = self.prog.regs[a.index()].cols as usize;
                    let (x, y) = (&self.regs[a.index()], &self.regs[b.index()]);
                    for r in 0..bm {
                        let span = r * cols..(r + 1) * cols;
                        self.rows[dst.index()][r] = x[span.clone()]
                            .iter()
                            .zip(&y[span])
                            .map(|(u, v)| u * v)
                            .sum();
                    }
                }
                Stmt::RowMap { dst, expr } => {
                    let mut out = vec![0.0; bm];
                    for (r, o) in out.iter_mut().enumerate() {
                        *o = self.eval(expr, io, r, None)?;
                    }
                    self.rows[dst.index()] = out;
                }
                Stmt::Convert { dst, src } => {
                    let elem = match self.prog.regs[dst.index()].kind {
                        RegKind::AOperand(e) => e,
                        RegKind::Accumulator => return invalid("Convert into f32"),
                    };
                    let vals: Vec<f64> = self.regs[src.index()]
                        .iter()
                        .map(|&x| elem.round(x))
                        .collect();
                    self.regs[dst.index()] = vals;
                }
                Stmt::KeyLoop {
                    block_n,
                    masks,
                    body,
                } => {
                    let bn = *block_n as i64;
                    let p0 = (self.p0 + self.q_offset) as i64;
                    let p_last = (self.p_last() + self.q_offset) as i64;
                    let n_k = self.prob.n_k as i64;
                    let range = if self.prog.sequential {
                        let tiles = n_k.div_euclid(bn) + i64::from(n_k % bn != 0);
                        if self.prog.chunked() {
                            let ct = self.prog.chunk_tiles as i64;
                            KeyTileRange {
                                begin: self.local_chunk as i64 * ct,
                                end: ((self.local_chunk as i64 + 1) * ct).min(tiles),
                            }
                        } else {
                            KeyTileRange {
                                begin: 0,
                                end: tiles,
                            }
                        }
                    } else {
                        let mut r = key_tile_range(masks, p0, p_last, n_k, bn);
                        if let Some(tm) = self.prog.key_narrowing {
                            r = self.narrowed(tm, r, bn, io);
                        }
                        // This CTA's run of a split loop: runs of ceil(tiles / splits).
                        let splits = i64::from(self.prog.key_splits);
                        let tiles = (r.end - r.begin).max(0);
                        let per = (tiles + splits - 1) / splits;
                        let skip = self.split as i64 * per;
                        KeyTileRange {
                            begin: r.begin + skip,
                            end: r.begin + skip + (tiles - skip).clamp(0, per),
                        }
                    };
                    // A reverse program walks its tiles from the last to the first.
                    let tiles: Vec<i64> = if self.prog.reverse {
                        (range.begin..range.end).rev().collect()
                    } else {
                        (range.begin..range.end).collect()
                    };
                    for t in tiles {
                        self.key_origin = (t * bn) as usize;
                        let ctx = LoopCtx {
                            masks,
                            block_n: *block_n as usize,
                            needs_mask: key_tile_needs_mask(masks, t, p0, p_last, n_k, bn)
                                || self.needs_value_mask(t, bn),
                        };
                        self.exec_block(body, io, Some(&ctx))?;
                    }
                }
                Stmt::Store { src, dst } => {
                    let cols = self.prog.regs[src.index()].cols as usize;
                    let head = self.head_of(SeqRank::Query);
                    let col0 = self.col_offset(cols, self.prog.tensors[dst.index()].head_dim);
                    let first = if self.prog.sequential {
                        self.key_origin
                    } else {
                        self.p0
                    };
                    for r in 0..bm {
                        let p = first + r;
                        if p >= self.prob.n_q {
                            continue;
                        }
                        // A split program's CTA writes its own copy (batch `split B + b`).
                        let batch = self.split * self.prob.batch + self.b;
                        let t = &mut io.tensors[dst.index()];
                        let off = t.offset(batch, p, head) + col0;
                        if off + cols > t.data.len() {
                            return invalid(format!(
                                "tensor {} is too small for split {}",
                                self.prog.tensors[dst.index()].name,
                                self.split
                            ));
                        }
                        for c in 0..cols {
                            t.data[off + c] = self.prog.tensors[dst.index()]
                                .elem
                                .round(self.regs[src.index()][r * cols + c]);
                        }
                    }
                }
                Stmt::ContractT { acc, a, scale, b } => {
                    let n_cols = self.prog.regs[acc.index()].cols as usize;
                    let at = &self.prog.shared[a.index()];
                    let (k_len, a_cols) = (at.rows as usize, at.cols as usize);
                    let b_cols = self.prog.shared[b.index()].cols as usize;
                    let mut scales = Vec::with_capacity(k_len);
                    for kk in 0..k_len {
                        scales.push(self.eval(scale, io, 0, Some(kk))?);
                    }
                    let a_vals = &self.shared[a.index()];
                    let b_vals = &self.shared[b.index()];
                    let mut out = self.regs[acc.index()].clone();
                    for r in 0..bm {
                        for n in 0..n_cols {
                            let mut sum = 0.0;
                            for (kk, sc) in scales.iter().enumerate() {
                                let av = at.elem.round(sc * a_vals[kk * a_cols + r]);
                                sum += av * b_vals[kk * b_cols + n];
                            }
                            out[r * n_cols + n] += sum;
                        }
                    }
                    self.regs[acc.index()] = out;
                }
                Stmt::StoreState { src, dst } => {
                    let vals = self.regs[src.index()].clone();
                    self.write_state(io, *dst, &vals);
                }
                Stmt::LoadStatePrefix { dst, src, decay } => {
                    let f = self.eval(decay, io, 0, None)?;
                    let cols = self.prog.regs[dst.index()].cols as usize;
                    self.regs[dst.index()] = self.state_prefix(io, *src, cols, f);
                }
                Stmt::LookBack {
                    state,
                    prefix,
                    aggregates,
                    inclusive,
                    decay,
                } => {
                    // CTAs run chunk by chunk here, so every earlier aggregate is published;
                    // summing them all is what any walk back computes.
                    let f = self.eval(decay, io, 0, None)?;
                    let own = self.regs[state.index()].clone();
                    self.write_state(io, *aggregates, &own);
                    let pre = self.state_prefix(io, *aggregates, own.len() / bm, f);
                    let inc: Vec<f64> = pre.iter().zip(&own).map(|(p, o)| f * p + o).collect();
                    self.write_state(io, *inclusive, &inc);
                    self.regs[prefix.index()] = pre.clone();
                    self.regs[state.index()] = pre;
                }
                Stmt::StoreShared { src, dst } => {
                    let elem = self.prog.shared[dst.index()].elem;
                    let vals: Vec<f64> = self.regs[src.index()]
                        .iter()
                        .map(|&x| elem.round(x))
                        .collect();
                    self.shared[dst.index()] = vals;
                }
                Stmt::StoreRow { src, dst } => {
                    for r in 0..bm {
                        let p = self.p0 + r;
                        if p >= self.prob.n_q {
                            continue;
                        }
                        let idx = ((self.split * self.prob.batch + self.b) * self.prob.heads
                            + self.h)
                            * self.prob.n_q
                            + p;
                        io.row_outputs[dst.index()][idx] = self.rows[src.index()][r] as f32 as f64;
                    }
                }
                Stmt::AccumulatePartial {
                    acc,
                    src,
                    split,
                    weight,
                } => {
                    let cols = self.prog.regs[acc.index()].cols as usize;
                    let head = self.head_of(SeqRank::Query);
                    let batch = *split as usize * self.prob.batch + self.b;
                    let t = &io.tensors[src.index()];
                    for r in 0..bm {
                        let p = self.p0 + r;
                        if p >= self.prob.n_q {
                            continue;
                        }
                        let off = t.offset(batch, p, head);
                        let Some(row) = t.data.get(off..off + cols) else {
                            return invalid(format!(
                                "tensor {} is too small for split {split}",
                                self.prog.tensors[src.index()].name
                            ));
                        };
                        let w = self.rows[weight.index()][r];
                        for (a, x) in self.regs[acc.index()][r * cols..(r + 1) * cols]
                            .iter_mut()
                            .zip(row)
                        {
                            *a += w * x;
                        }
                    }
                }
                Stmt::LoadRow { dst, src, split } => {
                    let input = &io.row_inputs[src.index()];
                    for r in 0..bm {
                        let p = self.p0 + r;
                        self.rows[dst.index()][r] = if p < self.prob.n_q {
                            let idx = ((*split as usize * self.prob.batch + self.b)
                                * self.prob.heads
                                + self.h)
                                * self.prob.n_q
                                + p;
                            input[idx]
                        } else {
                            0.0
                        };
                    }
                }
            }
        }
        Ok(())
    }

    /// [`Stmt::ContractStream`] as the lowering runs it: slice by slice, each slice of
    /// both operands copied into its shared tile (rounded, rows past the end zero), then
    /// `acc += a_slice . b_slice^T`.
    fn contract_stream(&mut self, io: &Bindings, acc: RegId, ops: [(TensorId, SharedId); 2]) {
        let bm = self.prog.schedule.block_m as usize;
        let width = self.prog.shared[ops[0].1.index()].cols as usize;
        let total = self.prog.tensors[ops[0].0.index()].head_dim as usize;
        let n_cols = self.prog.regs[acc.index()].cols as usize;
        let mut out = self.regs[acc.index()].clone();
        for c0 in (0..total).step_by(width.max(1)) {
            for (src, dst) in ops {
                let decl = &self.prog.shared[dst.index()];
                let origin = match decl.rank {
                    SeqRank::Query => self.p0,
                    SeqRank::Key => self.key_origin,
                };
                let n = self.prob.seq_len(decl.rank);
                let head = self.head_of(decl.rank);
                let t = &io.tensors[src.index()];
                let tile = &mut self.shared[dst.index()];
                for r in 0..decl.rows as usize {
                    for c in 0..width {
                        tile[r * width + c] = if origin + r < n {
                            decl.elem
                                .round(t.data[t.offset(self.b, origin + r, head) + c0 + c])
                        } else {
                            0.0
                        };
                    }
                }
            }
            let (a_vals, b_vals) = (
                &self.shared[ops[0].1.index()],
                &self.shared[ops[1].1.index()],
            );
            for r in 0..bm {
                for n in 0..n_cols {
                    let dot: f64 = (0..width)
                        .map(|k| a_vals[r * width + k] * b_vals[n * width + k])
                        .sum();
                    out[r * n_cols + n] += dot;
                }
            }
        }
        self.regs[acc.index()] = out;
    }

    fn eval(
        &self,
        e: &ScalarExpr,
        io: &Bindings,
        r: usize,
        c: Option<usize>,
    ) -> Result<f64, TileError> {
        e.eval(&mut |leaf| self.leaf(leaf, io, r, c))
    }

    fn leaf(
        &self,
        e: &ScalarExpr,
        io: &Bindings,
        r: usize,
        c: Option<usize>,
    ) -> Result<f64, TileError> {
        Ok(match e {
            ScalarExpr::Lit(x) => *x,
            ScalarExpr::Scalar(id) => io.scalars[id.index()],
            ScalarExpr::Head(id) => io.head_params[id.index()][self.h],
            ScalarExpr::Index(SeqRank::Query) if self.prog.sequential => r as f64,
            ScalarExpr::Index(SeqRank::Query) => (self.p0 + self.q_offset + r) as f64,
            ScalarExpr::Index(SeqRank::Key) => {
                let c =
                    c.ok_or_else(|| TileError::Invalid("key index in a row expression".into()))?;
                if self.prog.sequential {
                    c as f64
                } else {
                    (self.key_origin + c) as f64
                }
            }
            ScalarExpr::Elem(id) => {
                let c = c.ok_or_else(|| TileError::Invalid("Elem in a row expression".into()))?;
                let cols = self.prog.regs[id.index()].cols as usize;
                self.regs[id.index()][r * cols + c]
            }
            ScalarExpr::Row(id) => self.rows[id.index()][r],
            ScalarExpr::Token(id, at) => {
                let (vals, sb, sn, sh) = &io.tokens[id.index()];
                let bm = self.prog.schedule.block_m as usize;
                // Outside a sequential program, tokens are indexed by sequence position: a
                // row reads at its query position, a column at its key position.
                let n = if self.prog.sequential || *at != TokenAt::Row {
                    self.prob.n_k
                } else {
                    self.prob.n_q
                };
                if let Some(extent) = self.prog.tokens[id.index()].extent {
                    // A table over the distance, read at the clamped position.
                    let c = c.ok_or_else(|| {
                        TileError::Invalid("a distance token in a row expression".into())
                    })?;
                    let p = (self.p0 + self.q_offset + r) as i64;
                    let m = (self.key_origin + c) as i64;
                    let t = at
                        .distance(p, m)
                        .ok_or_else(|| TileError::Invalid("a table read at no distance".into()))?
                        .clamp(0, i64::from(extent) - 1) as usize;
                    return Ok(vals[self.b * sb + t * sn + self.h * sh]);
                }
                let pos = match at {
                    TokenAt::Row if !self.prog.sequential => Some(self.p0 + r),
                    TokenAt::Row => Some(self.key_origin + r),
                    TokenAt::Col => Some(
                        self.key_origin
                            + c.ok_or_else(|| {
                                TileError::Invalid("column token in a row expression".into())
                            })?,
                    ),
                    TokenAt::Last => Some((self.key_origin + bm).min(n) - 1),
                    TokenAt::Before => self.key_origin.checked_sub(1),
                    TokenAt::QueryMinusKey(_) | TokenAt::KeyMinusQuery(_) => {
                        return invalid("a distance read of a token without an extent")
                    }
                };
                match pos {
                    // Rows and columns past the end read the last token (they are masked).
                    Some(t) => vals[self.b * sb + t.min(n - 1) * sn + self.h * sh],
                    None => 0.0,
                }
            }
            ScalarExpr::Unary(..) | ScalarExpr::Binary(..) | ScalarExpr::Select { .. } => {
                return invalid("not a leaf")
            }
        })
    }
}

impl Cta<'_> {
    /// The key tiles of `r` from the first to the last key whose `key` token lies within
    /// the range of the query rows' `query` tokens ([`TileProgram::key_narrowing`]); empty
    /// when no key does.
    /// Whether key tile `t` needs the value masks: always, but for the tiles inside the
    /// CTA's one-valued key range when the narrowing's equality is the only one.
    fn needs_value_mask(&self, t: i64, bn: i64) -> bool {
        if self.prog.value_masks.is_empty() {
            return false;
        }
        let (lo, hi) = self.value_free;
        !(self.prog.value_masks_are_the_narrowing() && t * bn >= lo && (t + 1) * bn <= hi)
    }

    fn narrowed(
        &mut self,
        tm: TokenMatch,
        r: KeyTileRange,
        bn: i64,
        io: &Bindings,
    ) -> KeyTileRange {
        let value = |t: TokenId, n: usize| {
            let (vals, sb, sn, sh) = &io.tokens[t.index()];
            vals[self.b * sb + n * sn + self.h * sh]
        };
        let rows = self.p0..(self.p0 + self.prog.schedule.block_m as usize).min(self.prob.n_q);
        let (lo, hi) = rows
            .map(|p| value(tm.query, p))
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            });
        let keys = (r.begin * bn).max(0)..(r.end * bn).min(self.prob.n_k as i64);
        let hits: Vec<i64> = keys
            .filter(|&k| (lo..=hi).contains(&value(tm.key, k as usize)))
            .collect();
        self.value_free = (0, 0);
        match (hits.first(), hits.last()) {
            (Some(&first), Some(&last)) => {
                // One query value, and every key from the first to the last holds it.
                if lo == hi && hits.len() as i64 == last - first + 1 {
                    self.value_free = (first, last + 1);
                }
                KeyTileRange {
                    begin: r.begin.max(first.div_euclid(bn)),
                    end: r.end.min(last.div_euclid(bn) + 1),
                }
            }
            _ => KeyTileRange {
                begin: r.begin,
                end: r.begin,
            },
        }
    }
}

/// A row reduction in column order (`RowReduce` and `RowReduceMap` alike).
fn reduce(op: ReduceOp, values: impl Iterator<Item = f64>) -> f64 {
    match op {
        ReduceOp::Max => values.fold(f64::NEG_INFINITY, f64::max),
        ReduceOp::Sum => values.fold(0.0, |a, v| a + v),
    }
}
