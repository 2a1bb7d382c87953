//! The structural rules of a tile program that every lowering (the PTX printer, the
//! interpreter) relies on.

use super::*;

impl TileProgram {
    /// Checks the structural rules every lowering relies on.
    pub fn validate(&self) -> Result<(), TileError> {
        let s = self.schedule;
        if s.warps == 0 || s.block_m == 0 || !s.block_m.is_multiple_of(16 * s.warps) {
            return invalid(format!(
                "block_m {} must be a positive multiple of 16 x warps ({})",
                s.block_m, s.warps
            ));
        }
        if s.stages < 2 {
            return invalid("stages must be at least 2");
        }
        if s.mma == MmaUnit::Warpgroup && (self.rows_per_warp() != 16 || !s.warps.is_multiple_of(4))
        {
            return invalid(format!(
                "wgmma needs whole warpgroups of 16-row warps (block_m {}, warps {})",
                s.block_m, s.warps
            ));
        }
        if s.loads.specialized() {
            self.validate_specialized()?;
        }
        if let Some(ctas) = s.persistent {
            self.validate_persistent(ctas)?;
        }
        if s.store_tma {
            self.validate_store_tma()?;
        }
        if self.shared_bytes() > MAX_SHARED_BYTES {
            return invalid(format!(
                "{} B of shared memory exceed the {MAX_SHARED_BYTES} B a CTA may use",
                self.shared_bytes()
            ));
        }
        if !self.value_masks.is_empty() && self.sequential {
            return invalid("value masks apply to query-tiled programs");
        }
        if self.value_masks.iter().any(|m| {
            [m.lhs.0, m.rhs.0]
                .iter()
                .any(|t| t.index() >= self.tokens.len())
        }) {
            return invalid("a value mask names a token input the program lacks");
        }
        if let Some(tm) = self.key_narrowing {
            if self.sequential || self.key_splits > 1 {
                return invalid(
                    "key narrowing applies to query-tiled programs with one key loop per CTA",
                );
            }
            if [tm.query, tm.key]
                .iter()
                .any(|t| t.index() >= self.tokens.len())
            {
                return invalid("key narrowing names a token input the program lacks");
            }
        }
        if self.chunked() && !self.sequential {
            return invalid("only sequential programs are chunked");
        }
        if self.look_back && (self.chunk_tiles != 1 || self.states.len() != 2) {
            return invalid(
                "a look-back program has chunks of one tile and two state arrays (aggregates, inclusive prefixes)",
            );
        }
        if self.reverse && (!self.sequential || self.chunked() || self.look_back) {
            return invalid(
                "only a sequential program that walks the whole sequence runs in reverse",
            );
        }
        if self.key_splits == 0 || (self.sequential && self.key_splits != 1) {
            return invalid("key_splits must be 1, or positive in a query-tiled program");
        }
        if self.col_blocks == 0 || (!self.sequential && self.col_blocks != 1) {
            return invalid("col_blocks must be 1, or positive in a sequential program");
        }
        if self.sequential {
            for st in &self.body {
                if let Stmt::KeyLoop { block_n, masks, .. } = st {
                    if *block_n != s.block_m || !masks.is_empty() {
                        return invalid(
                            "a sequential program's loop walks block_m tiles without masks",
                        );
                    }
                }
            }
        }
        let loops = self
            .body
            .iter()
            .filter(|s| matches!(s, Stmt::KeyLoop { .. }))
            .count();
        if loops > 1 && !self.sequential {
            return invalid("at most one key loop (several only in a sequential program)");
        }
        for t in &self.shared {
            if t.elem == Elem::F32 {
                return invalid(format!("shared tile {} must be 16-bit", t.name));
            }
            if t.cols % 16 != 0 || t.rows % 16 != 0 {
                return invalid(format!(
                    "shared tile {} needs rows, cols multiple of 16",
                    t.name
                ));
            }
        }
        for r in &self.regs {
            if r.cols % 16 != 0 {
                return invalid(format!(
                    "register tile {} needs cols multiple of 16",
                    r.name
                ));
            }
        }
        let block_n = self.block_n();
        for r in &self.regs {
            if r.col_rank == ColRank::Key && Some(r.cols) != block_n {
                return invalid(format!(
                    "key-indexed register tile {} must have block_n columns",
                    r.name
                ));
            }
        }
        self.check_block(&self.body, false)
    }

    fn shared_tile(&self, id: SharedId) -> Result<&SharedTile, TileError> {
        self.shared
            .get(id.index())
            .map_or_else(|| invalid(format!("unknown shared tile {id:?}")), Ok)
    }
    fn reg(&self, id: RegId) -> Result<&RegTile, TileError> {
        self.regs
            .get(id.index())
            .map_or_else(|| invalid(format!("unknown register tile {id:?}")), Ok)
    }
    fn tensor(&self, id: TensorId) -> Result<&TensorParam, TileError> {
        self.tensors
            .get(id.index())
            .map_or_else(|| invalid(format!("unknown tensor {id:?}")), Ok)
    }

    /// A per-element expression over tiles of `shape`'s shape (a `Map`, a `RowReduceMap`):
    /// key indices exist only inside the key loop.
    fn check_element_expr(
        &self,
        e: &ScalarExpr,
        shape: &RegTile,
        in_loop: bool,
    ) -> Result<(), TileError> {
        if shape.col_rank == ColRank::Key && !in_loop {
            let mut uses_key = false;
            e.visit(&mut |n| uses_key |= *n == ScalarExpr::Index(SeqRank::Key));
            if uses_key {
                return invalid("key index used outside the key loop");
            }
        }
        self.check_expr(e, Some(shape))
    }

    fn check_expr(&self, e: &ScalarExpr, dst: Option<&RegTile>) -> Result<(), TileError> {
        let mut err = None;
        e.visit(&mut |n| {
            let problem = match n {
                ScalarExpr::Scalar(id) if id.index() >= self.scalars.len() => {
                    Some(format!("unknown scalar {id:?}"))
                }
                ScalarExpr::Head(id) if id.index() >= self.head_params.len() => {
                    Some(format!("unknown head param {id:?}"))
                }
                ScalarExpr::Row(id) if id.index() >= self.rows.len() => {
                    Some(format!("unknown row vector {id:?}"))
                }
                ScalarExpr::Elem(id) => match (self.regs.get(id.index()), dst) {
                    (None, _) => Some(format!("unknown register tile {id:?}")),
                    (Some(_), None) => Some("Elem used in a row expression".into()),
                    (Some(t), Some(d)) => {
                        if t.kind != RegKind::Accumulator || t.cols != d.cols {
                            Some(format!(
                                "Elem({}) must be an f32 tile shaped like {}",
                                t.name, d.name
                            ))
                        } else {
                            None
                        }
                    }
                },
                ScalarExpr::Index(SeqRank::Key) => match dst {
                    Some(d) if d.col_rank == ColRank::Key => None,
                    _ => {
                        Some("the key index is only defined in maps over key-indexed tiles".into())
                    }
                },
                ScalarExpr::Token(id, at) => match (self.tokens.get(id.index()), at.distance(0, 0))
                {
                    (None, _) => Some(format!("unknown token input {id:?}")),
                    (Some(t), Some(_)) => match dst {
                        _ if self.sequential => {
                            Some("distance reads of tokens are for query-tiled programs".into())
                        }
                        Some(d) if d.col_rank == ColRank::Key && t.extent.is_some() => None,
                        _ => Some(format!(
                            "token {} is read at a distance: it needs an extent and a map over key-indexed tiles",
                            t.name
                        )),
                    },
                    (Some(t), None) if t.extent.is_some() => Some(format!(
                        "token {} has an extent (a table over the distance) but is read at a position",
                        t.name
                    )),
                    _ => None,
                },
                _ => None,
            };
            if err.is_none() {
                err = problem;
            }
        });
        match err {
            Some(m) => invalid(m),
            None => Ok(()),
        }
    }

    fn check_block(&self, body: &[Stmt], in_loop: bool) -> Result<(), TileError> {
        for st in body {
            match st {
                Stmt::LoadTile { dst, src } => {
                    let t = self.shared_tile(*dst)?;
                    let g = self.tensor(*src)?;
                    let cols_ok = g.head_dim == t.cols
                        || (self.sequential && g.head_dim == t.cols * self.col_blocks);
                    if g.is_output || g.elem != t.elem || !cols_ok || g.rows != t.rank {
                        return invalid(format!(
                            "LoadTile {} <- {}: mismatched tile",
                            t.name, g.name
                        ));
                    }
                    let want_rows = match t.rank {
                        SeqRank::Query => self.schedule.block_m,
                        SeqRank::Key => self.block_n().unwrap_or(0),
                    };
                    let placed = if self.sequential {
                        in_loop && t.rows == self.schedule.block_m
                    } else {
                        t.rows == want_rows && (t.rank == SeqRank::Key) == in_loop
                    };
                    if !placed {
                        return invalid(format!(
                            "LoadTile {}: query tiles load outside the key loop with block_m rows, key tiles inside with block_n rows",
                            t.name
                        ));
                    }
                }
                Stmt::Fill { dst, .. } => {
                    if self.reg(*dst)?.kind != RegKind::Accumulator {
                        return invalid("Fill needs an f32 tile");
                    }
                }
                Stmt::FillRow { dst, .. } => {
                    if dst.index() >= self.rows.len() {
                        return invalid("unknown row vector");
                    }
                }
                Stmt::Fragments { dst, src } => {
                    let d = self.reg(*dst)?;
                    let s = self.shared_tile(*src)?;
                    if d.kind != RegKind::AOperand(s.elem)
                        || d.cols != s.cols
                        || s.rank != SeqRank::Query
                    {
                        return invalid(format!("Fragments {} <- {}: mismatched", d.name, s.name));
                    }
                }
                Stmt::Contract {
                    acc,
                    a,
                    b,
                    b_layout,
                } => {
                    let acc_t = self.reg(*acc)?;
                    let b_t = self.shared_tile(*b)?;
                    if acc_t.kind != RegKind::Accumulator {
                        return invalid("Contract accumulator must be f32");
                    }
                    let (a_elem, a_k) = match a {
                        AOperand::Shared(id) => {
                            let t = self.shared_tile(*id)?;
                            if t.rank != SeqRank::Query && !self.sequential {
                                return invalid("A operand from shared must be a query tile");
                            }
                            (t.elem, t.cols)
                        }
                        AOperand::Reg(id) => match self.reg(*id)?.kind {
                            RegKind::AOperand(e) => (e, self.reg(*id)?.cols),
                            RegKind::Accumulator => {
                                return invalid(
                                    "A operand register tile must be 16-bit (Convert first)",
                                )
                            }
                        },
                    };
                    let (b_k, b_n) = match b_layout {
                        BLayout::RowsAreN => (b_t.cols, b_t.rows),
                        BLayout::RowsAreK => (b_t.rows, b_t.cols),
                    };
                    if a_elem != b_t.elem || a_k != b_k || acc_t.cols != b_n {
                        return invalid(format!(
                            "Contract {}: shapes or types disagree (A k={a_k}, B k={b_k} n={b_n}, acc n={})",
                            acc_t.name, acc_t.cols
                        ));
                    }
                    if !in_loop && self.streamed_tiles().contains(b) {
                        return invalid("a key tile is only live inside the key loop");
                    }
                }
                Stmt::ContractT { acc, a, scale, b } => {
                    let acc_t = self.reg(*acc)?;
                    let a_t = self.shared_tile(*a)?;
                    let b_t = self.shared_tile(*b)?;
                    if !self.sequential || !in_loop {
                        return invalid("ContractT is for the loop of a sequential program");
                    }
                    if acc_t.kind != RegKind::Accumulator
                        || a_t.cols != self.schedule.block_m
                        || a_t.rows != b_t.rows
                        || b_t.cols != acc_t.cols
                        || a_t.elem != b_t.elem
                    {
                        return invalid(format!(
                            "ContractT {}: A^T must be block_m x k, B k x n, acc n wide",
                            acc_t.name
                        ));
                    }
                    let mut bad = false;
                    scale.visit(&mut |n| {
                        bad |= matches!(
                            n,
                            ScalarExpr::Index(SeqRank::Query)
                                | ScalarExpr::Elem(_)
                                | ScalarExpr::Row(_)
                                | ScalarExpr::Token(_, TokenAt::Row)
                        )
                    });
                    if bad {
                        return invalid(
                            "ContractT scale may use the key index and uniform values only",
                        );
                    }
                }
                Stmt::StoreState { src, dst }
                | Stmt::LoadStatePrefix {
                    dst: src, src: dst, ..
                } => {
                    let r = self.reg(*src)?;
                    let sp = self
                        .states
                        .get(dst.index())
                        .map_or_else(|| invalid(format!("unknown state {dst:?}")), Ok)?;
                    if !self.chunked()
                        || in_loop
                        || r.kind != RegKind::Accumulator
                        || !(r.cols == sp.cols || r.cols * self.col_blocks == sp.cols)
                    {
                        return invalid(format!(
                            "state {} <-> {}: a chunked program's f32 tile outside the loop",
                            sp.name, r.name
                        ));
                    }
                    if let Stmt::LoadStatePrefix { decay, .. } = st {
                        if !decay.is_uniform() {
                            return invalid("the chunk decay of LoadStatePrefix must be uniform");
                        }
                    }
                }
                Stmt::StoreShared { src, dst } => {
                    let s_t = self.reg(*src)?;
                    let d_t = self.shared_tile(*dst)?;
                    if s_t.kind != RegKind::Accumulator
                        || d_t.rows != self.schedule.block_m
                        || d_t.cols != s_t.cols
                        || self.streamed_tiles().contains(dst)
                    {
                        return invalid(format!(
                            "StoreShared {} -> {}: a block_m x cols f32 tile into an unstreamed tile of that shape",
                            s_t.name, d_t.name
                        ));
                    }
                }
                Stmt::LookBack {
                    state,
                    prefix,
                    aggregates,
                    inclusive,
                    decay,
                } => {
                    let (s_t, p_t) = (self.reg(*state)?, self.reg(*prefix)?);
                    let known = |id: &StateId| self.states.get(id.index()).map(|s| s.cols);
                    let fits = |c: Option<u32>| {
                        c.is_some_and(|c| c == s_t.cols || c == s_t.cols * self.col_blocks)
                    };
                    if !self.look_back
                        || in_loop
                        || s_t.kind != RegKind::Accumulator
                        || p_t.kind != RegKind::Accumulator
                        || s_t.cols != p_t.cols
                        || state == prefix
                        || aggregates == inclusive
                        || !fits(known(aggregates))
                        || !fits(known(inclusive))
                        || !decay.is_uniform()
                    {
                        return invalid(
                            "LookBack: two distinct f32 tiles of one shape, two state arrays, a uniform decay, outside the loop of a look-back program",
                        );
                    }
                }
                Stmt::Map { dst, expr } => {
                    let d = self.reg(*dst)?;
                    if d.kind != RegKind::Accumulator {
                        return invalid("Map needs an f32 tile");
                    }
                    self.check_element_expr(expr, d, in_loop)?;
                }
                Stmt::Mask { dst, .. } => {
                    let d = self.reg(*dst)?;
                    if !in_loop || d.col_rank != ColRank::Key || d.kind != RegKind::Accumulator {
                        return invalid(
                            "Mask applies to key-indexed f32 tiles inside the key loop",
                        );
                    }
                }
                Stmt::RowReduce { dst, src, .. } => {
                    if dst.index() >= self.rows.len()
                        || self.reg(*src)?.kind != RegKind::Accumulator
                    {
                        return invalid("RowReduce needs a row vector and an f32 tile");
                    }
                }
                Stmt::RowReduceMap {
                    dst,
                    expr,
                    shape,
                    mask_fill,
                    ..
                } => {
                    let d = self.reg(*shape)?;
                    if dst.index() >= self.rows.len() || d.kind != RegKind::Accumulator {
                        return invalid("RowReduceMap needs a row vector and an f32 tile's shape");
                    }
                    if mask_fill.is_some() && (!in_loop || d.col_rank != ColRank::Key) {
                        return invalid(
                            "RowReduceMap masks key-indexed elements inside the key loop only",
                        );
                    }
                    self.check_element_expr(expr, d, in_loop)?;
                }
                Stmt::RowMap { dst, expr } => {
                    if dst.index() >= self.rows.len() {
                        return invalid("unknown row vector");
                    }
                    self.check_expr(expr, None)?;
                }
                Stmt::RowDot { dst, a, b } => {
                    let (x, y) = (self.reg(*a)?, self.reg(*b)?);
                    if dst.index() >= self.rows.len()
                        || !matches!(x.kind, RegKind::AOperand(_))
                        || x.kind != y.kind
                        || x.cols != y.cols
                    {
                        return invalid("RowDot: a row vector from two same-shape 16-bit tiles");
                    }
                }
                Stmt::Convert { dst, src } => {
                    let d = self.reg(*dst)?;
                    let s = self.reg(*src)?;
                    if !matches!(d.kind, RegKind::AOperand(_))
                        || s.kind != RegKind::Accumulator
                        || d.cols != s.cols
                    {
                        return invalid("Convert: f32 tile into a same-shape 16-bit A tile");
                    }
                }
                Stmt::ContractStream {
                    acc,
                    a,
                    b,
                    a_tile,
                    b_tile,
                } => self.check_contract_stream(*acc, *a, *b, *a_tile, *b_tile, in_loop)?,
                Stmt::KeyLoop { block_n, body, .. } => {
                    if in_loop {
                        return invalid("nested key loops");
                    }
                    if *block_n == 0 || block_n % 16 != 0 {
                        return invalid("block_n must be a positive multiple of 16");
                    }
                    // Streamed loads must come first so the stage ring can issue them early.
                    let mut seen_other = false;
                    for b in body {
                        match b {
                            Stmt::LoadTile { .. } if seen_other => {
                                return invalid(
                                    "LoadTile inside the key loop must precede other statements",
                                )
                            }
                            Stmt::LoadTile { .. } => {}
                            _ => seen_other = true,
                        }
                    }
                    self.check_block(body, true)?;
                }
                Stmt::Store { src, dst } => {
                    let s = self.reg(*src)?;
                    let d = self.tensor(*dst)?;
                    // A sequential program stores the current tile: inside the loop, or after
                    // it in a look-back program, whose one tile stays current.
                    let shape_ok = if self.sequential {
                        (in_loop || self.look_back)
                            && (s.cols == d.head_dim || s.cols * self.col_blocks == d.head_dim)
                    } else {
                        d.rows == SeqRank::Query && s.cols == d.head_dim
                    };
                    if !d.is_output || !shape_ok || s.kind != RegKind::Accumulator {
                        return invalid(format!("Store {} -> {}: mismatched", s.name, d.name));
                    }
                    if self.key_splits > 1 && d.elem != Elem::F32 {
                        return invalid(format!(
                            "Store {} -> {}: a split key loop stores f32 partials, one copy per split",
                            s.name, d.name
                        ));
                    }
                }
                Stmt::AccumulatePartial {
                    acc, src, weight, ..
                } => {
                    let r = self.reg(*acc)?;
                    let t = self.tensor(*src)?;
                    if weight.index() >= self.rows.len() {
                        return invalid("AccumulatePartial: unknown weight row");
                    }
                    if in_loop
                        || self.sequential
                        || t.elem != Elem::F32
                        || t.rows != SeqRank::Query
                        || t.is_output
                        || r.kind != RegKind::Accumulator
                        || r.cols != t.head_dim
                    {
                        return invalid(format!(
                            "AccumulatePartial {} += {}: an f32 tile of the query-rank f32 input's head dim, outside any loop",
                            r.name, t.name
                        ));
                    }
                }
                Stmt::StoreRow { src, dst } => {
                    if src.index() >= self.rows.len() || dst.index() >= self.row_outputs.len() {
                        return invalid("StoreRow: unknown operands");
                    }
                }
                Stmt::LoadRow { dst, src, split } => {
                    let Some(input) = self.row_inputs.get(src.index()) else {
                        return invalid("LoadRow: unknown row input");
                    };
                    if dst.index() >= self.rows.len() || *split >= input.splits {
                        return invalid(format!(
                            "LoadRow: split {split} of {} (which has {}), or unknown row",
                            input.name, input.splits
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The rules of [`Stmt::ContractStream`]: query rows of `a` times key rows of `b`
    /// over their common `head_dim`, sliced into whole slices of the tiles' width.
    fn check_contract_stream(
        &self,
        acc: RegId,
        a: TensorId,
        b: TensorId,
        a_tile: SharedId,
        b_tile: SharedId,
        in_loop: bool,
    ) -> Result<(), TileError> {
        let (acc_t, at, bt) = (
            self.reg(acc)?,
            self.shared_tile(a_tile)?,
            self.shared_tile(b_tile)?,
        );
        let (ag, bg) = (self.tensor(a)?, self.tensor(b)?);
        if !in_loop || self.sequential {
            return invalid("ContractStream runs inside the key loop of a query-tiled program");
        }
        if ag.rows != SeqRank::Query || bg.rows != SeqRank::Key || ag.is_output || bg.is_output {
            return invalid("ContractStream reads a query-rank and a key-rank input tensor");
        }
        if at.rank != SeqRank::Query
            || bt.rank != SeqRank::Key
            || at.rows != self.schedule.block_m
            || Some(bt.rows) != self.block_n()
        {
            return invalid("ContractStream slices: block_m query rows and block_n key rows");
        }
        let slice = at.cols;
        if bt.cols != slice
            || ag.head_dim != bg.head_dim
            || slice == 0
            || !ag.head_dim.is_multiple_of(slice)
        {
            return invalid(format!(
                "ContractStream: the contracted length {} must be whole slices of {slice}",
                ag.head_dim
            ));
        }
        if at.elem != ag.elem || bt.elem != bg.elem || at.elem != bt.elem {
            return invalid("ContractStream: tiles and tensors must share one 16-bit type");
        }
        if acc_t.kind != RegKind::Accumulator || acc_t.cols != bt.rows {
            return invalid("ContractStream accumulator: f32, block_n columns");
        }
        Ok(())
    }
}

impl TileProgram {
    /// What the persistent lowering handles: warp-specialized query tiles, one key loop
    /// per work tile (not split), whose setup needs no barrier of the whole CTA (a key
    /// narrowing's scan has one).
    fn validate_persistent(&self, ctas: u32) -> Result<(), TileError> {
        if ctas == 0 {
            return invalid("a persistent grid needs at least one CTA");
        }
        if !self.schedule.loads.specialized() {
            return invalid("a persistent grid needs a producer warpgroup");
        }
        if self.key_splits > 1 {
            return invalid("a persistent grid walks whole key loops, not splits of them");
        }
        if self.key_narrowing.is_some() {
            return invalid(
                "a persistent grid's tiles cannot narrow their key loop (its scan needs a barrier of the whole CTA)",
            );
        }
        Ok(())
    }

    /// What storing the output by the copy engine needs ([`TileSchedule::store_tma`]): the
    /// copy-engine producer (tensor maps), one work tile per CTA (a persistent producer
    /// refills the query tile the output would pass through), warpgroups of 64 rows, one
    /// whole 16-bit output stored once, and a query tile loaded before the key loop at
    /// least as wide.
    fn validate_store_tma(&self) -> Result<(), TileError> {
        let s = &self.schedule;
        if !s.loads.tma() || s.persistent.is_some() {
            return invalid(
                "the copy engine stores the output only for the copy-engine producer with one CTA per work tile",
            );
        }
        if self.query_offset || self.key_splits > 1 {
            return invalid("the copy engine stores whole output tiles of one key loop");
        }
        let stores: Vec<TensorId> = self
            .body
            .iter()
            .filter_map(|st| match st {
                Stmt::Store { dst, .. } => Some(*dst),
                _ => None,
            })
            .collect();
        let [o] = stores[..] else {
            return invalid("the copy engine stores one output, once, after the key loop");
        };
        let o = &self.tensors[o.index()];
        let staging = self.query_staging_tile().map(|t| &self.shared[t.index()]);
        match staging {
            Some(q) if o.elem != Elem::F32
                && q.rows == s.block_m
                && q.cols >= o.head_dim
                && q.elem == o.elem => Ok(()),
            _ => invalid(format!(
                "the copy engine stores `{}` through the query tile's shared memory, which must be loaded before the key loop, of its rows, type and at least its width",
                o.name
            )),
        }
    }

    /// What the warp-specialized lowering handles: query tiles whose loads come before the
    /// key loop or at the top of its body, contractions by `wgmma`, and no statement that
    /// needs a barrier across all the consumer warps or another copy engine (carried
    /// shared states, streamed contractions, look-backs).
    fn validate_specialized(&self) -> Result<(), TileError> {
        if self.schedule.mma != MmaUnit::Warpgroup {
            return invalid("a producer warpgroup needs wgmma");
        }
        if self.sequential || self.chunked() || self.look_back {
            return invalid("a producer warpgroup serves query-tiled programs only");
        }
        // One consumer warpgroup would start with the whole register file (256 threads at
        // launch): `setmaxnreg.inc` could not raise it.
        if self.schedule.warps < 8 {
            return invalid(format!(
                "a producer warpgroup serves two or more consumer warpgroups (warps {})",
                self.schedule.warps
            ));
        }
        if self.launch_threads() > 1024 {
            return invalid(format!(
                "{} consumer threads and a producer warpgroup exceed 1024 threads",
                self.threads()
            ));
        }
        let mut seen_loop = false;
        // Probabilities through shared memory are the consumers' own rows: no CTA barrier.
        let private = self.row_private_tiles();
        for s in &self.body {
            match s {
                Stmt::LoadTile { .. } if seen_loop => {
                    return invalid("with a producer warpgroup, tiles load before the key loop");
                }
                Stmt::KeyLoop { body, .. } => {
                    if seen_loop {
                        return invalid("a producer warpgroup serves one key loop");
                    }
                    seen_loop = true;
                    for b in body {
                        let state =
                            matches!(b, Stmt::StoreShared { dst, .. } if !private.contains(dst));
                        if state
                            || matches!(
                                b,
                                Stmt::ContractStream { .. }
                                    | Stmt::LookBack { .. }
                                    | Stmt::KeyLoop { .. }
                            )
                        {
                            return invalid(
                                "a producer warpgroup's key loop has no streamed contraction, shared state or look-back",
                            );
                        }
                    }
                }
                Stmt::StoreShared { .. } | Stmt::LookBack { .. } => {
                    return invalid("a producer warpgroup's program writes no shared tile");
                }
                _ => {}
            }
        }
        if self.schedule.loads.tma() {
            // The copy engine moves boxes of at most 256 rows, 128 bytes wide.
            for (tensor, rows) in self.tensor_maps() {
                let t = &self.tensors[tensor.index()];
                if rows > 256 || !(t.head_dim * t.elem.bytes()).is_multiple_of(TMA_BOX_BYTES) {
                    return invalid(format!(
                        "the copy engine loads `{}` in boxes of at most 256 rows and 128 bytes; its tiles have {rows} rows of {} elements",
                        t.name, t.head_dim
                    ));
                }
            }
        }
        Ok(())
    }
}
