//! A tile program as text (`einattn compile --emit tile`).

use super::*;
use std::fmt;

impl fmt::Display for TileProgram {
    /// A readable listing (for `--emit tile`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.schedule;
        writeln!(
            f,
            "tile_program {} (block_m={}, warps={}, stages={}, skip_unit_rescale={})",
            self.name, s.block_m, s.warps, s.stages, s.skip_unit_rescale
        )?;
        if s.loads != Loads::Cooperative {
            writeln!(
                f,
                "  loads: {} (a producer warpgroup copies the tiles)",
                s.loads.name()
            )?;
        }
        if s.store_tma {
            writeln!(
                f,
                "  store: the copy engine (each consumer warpgroup's output rows through its rows of the query tile)"
            )?;
        }
        if self.reverse {
            writeln!(
                f,
                "  reverse: the loop walks the tiles from the last to the first"
            )?;
        }
        if let Some(ctas) = s.persistent {
            writeln!(
                f,
                "  persistent: at most {ctas} CTAs loop over the (query tile, batch, head) tiles"
            )?;
        }
        if self.key_splits > 1 {
            writeln!(
                f,
                "  key_splits: {} CTAs per query tile split the key loop (grid z); row outputs at [split, B, H, N_q]",
                self.key_splits
            )?;
        }
        for t in &self.tensors {
            writeln!(
                f,
                "  {} {}: {}[B, N_{}, H, {}]",
                if t.is_output { "out" } else { "in " },
                t.name,
                t.elem.name(),
                if t.rows == SeqRank::Query { "q" } else { "k" },
                t.head_dim
            )?;
        }
        for r in &self.row_outputs {
            writeln!(f, "  out {}: f32[B, H, N_q]", r.name)?;
        }
        for r in &self.row_inputs {
            writeln!(f, "  in  {}: f32[{}, B, H, N_q]", r.name, r.splits)?;
        }
        for p in &self.scalars {
            writeln!(f, "  param {}: f32", p.name)?;
        }
        for p in &self.head_params {
            writeln!(f, "  param {}: f32[H]", p.name)?;
        }
        for t in &self.tokens {
            writeln!(f, "  in  {}: f32[B, N, H] (per token)", t.name)?;
        }
        let side = |(t, at): (TokenId, TokenAt)| {
            let pos = if at == TokenAt::Row { "p" } else { "m" };
            format!("{}[{pos}]", self.tokens[t.index()].name)
        };
        for m in &self.value_masks {
            writeln!(
                f,
                "  value mask: keep {} {:?} {} (with the band masks)",
                side(m.lhs),
                m.op,
                side(m.rhs)
            )?;
        }
        if let Some(tm) = self.key_narrowing {
            writeln!(
                f,
                "  key narrowing: the loop walks the keys from the first to the last whose {} lies within the query rows' {} values",
                side((tm.key, TokenAt::Col)),
                side((tm.query, TokenAt::Row))
            )?;
        }
        for t in &self.shared {
            writeln!(
                f,
                "  shared {}: {}[{} x {}]",
                t.name,
                t.elem.name(),
                t.rows,
                t.cols
            )?;
        }
        for t in &self.regs {
            let kind = match t.kind {
                RegKind::Accumulator => "f32".to_string(),
                RegKind::AOperand(e) => format!("{}-afrag", e.name()),
            };
            writeln!(
                f,
                "  reg {}: {}[{} x {} {:?}]",
                t.name, kind, s.block_m, t.cols, t.col_rank
            )?;
        }
        for r in &self.rows {
            writeln!(f, "  row {}: f32[{}]", r.name, s.block_m)?;
        }
        self.fmt_block(f, &self.body, 1)
    }
}

impl TileProgram {
    fn fmt_expr(&self, e: &ScalarExpr) -> String {
        match e {
            ScalarExpr::Lit(x) => format!("{x}"),
            ScalarExpr::Scalar(id) => self.scalars[id.index()].name.clone(),
            ScalarExpr::Head(id) => format!("{}[h]", self.head_params[id.index()].name),
            ScalarExpr::Index(SeqRank::Query) => "p".into(),
            ScalarExpr::Index(SeqRank::Key) => "m".into(),
            ScalarExpr::Token(id, at) => {
                format!("{}[{at:?}]", self.tokens[id.index()].name.to_lowercase())
            }
            ScalarExpr::Elem(id) => self.regs[id.index()].name.clone(),
            ScalarExpr::Row(id) => self.rows[id.index()].name.clone(),
            ScalarExpr::Unary(op, a) => {
                format!("{}({})", format!("{op:?}").to_lowercase(), self.fmt_expr(a))
            }
            ScalarExpr::Binary(op, a, b) => {
                let sym = match op {
                    BinaryOp::Add => "+",
                    BinaryOp::Sub => "-",
                    BinaryOp::Mul => "*",
                    BinaryOp::Div => "/",
                    BinaryOp::Max => {
                        return format!("max({}, {})", self.fmt_expr(a), self.fmt_expr(b))
                    }
                    BinaryOp::Min => {
                        return format!("min({}, {})", self.fmt_expr(a), self.fmt_expr(b))
                    }
                };
                format!("({} {sym} {})", self.fmt_expr(a), self.fmt_expr(b))
            }
            ScalarExpr::Select {
                op,
                lhs,
                rhs,
                then,
                otherwise,
            } => format!(
                "({} {:?} {} ? {} : {})",
                self.fmt_expr(lhs),
                op,
                self.fmt_expr(rhs),
                self.fmt_expr(then),
                self.fmt_expr(otherwise)
            ),
        }
    }

    fn fmt_block(&self, f: &mut fmt::Formatter<'_>, body: &[Stmt], depth: usize) -> fmt::Result {
        let pad = "  ".repeat(depth);
        for st in body {
            match st {
                Stmt::LoadTile { dst, src } => writeln!(
                    f,
                    "{pad}load {} <- {}",
                    self.shared[dst.index()].name,
                    self.tensors[src.index()].name
                )?,
                Stmt::Fill { dst, value } => {
                    writeln!(f, "{pad}{} = {value}", self.regs[dst.index()].name)?
                }
                Stmt::FillRow { dst, value } => {
                    writeln!(f, "{pad}{} = {value}", self.rows[dst.index()].name)?
                }
                Stmt::Fragments { dst, src } => writeln!(
                    f,
                    "{pad}{} = fragments({})",
                    self.regs[dst.index()].name,
                    self.shared[src.index()].name
                )?,
                Stmt::Contract {
                    acc,
                    a,
                    b,
                    b_layout,
                } => {
                    let a = match a {
                        AOperand::Shared(id) => self.shared[id.index()].name.clone(),
                        AOperand::Reg(id) => self.regs[id.index()].name.clone(),
                    };
                    let t = if *b_layout == BLayout::RowsAreN {
                        "^T"
                    } else {
                        ""
                    };
                    writeln!(
                        f,
                        "{pad}{} += {a} . {}{t}",
                        self.regs[acc.index()].name,
                        self.shared[b.index()].name
                    )?
                }
                Stmt::ContractStream {
                    acc,
                    a,
                    b,
                    a_tile,
                    b_tile,
                } => writeln!(
                    f,
                    "{pad}{} += {} . {}^T  (streamed over {} in slices of {} via {}, {})",
                    self.regs[acc.index()].name,
                    self.tensors[a.index()].name,
                    self.tensors[b.index()].name,
                    self.tensors[a.index()].head_dim,
                    self.shared[a_tile.index()].cols,
                    self.shared[a_tile.index()].name,
                    self.shared[b_tile.index()].name
                )?,
                Stmt::Map { dst, expr } => writeln!(
                    f,
                    "{pad}{} = map {}",
                    self.regs[dst.index()].name,
                    self.fmt_expr(expr)
                )?,
                Stmt::Mask { dst, fill } => {
                    writeln!(f, "{pad}mask {} fill {fill}", self.regs[dst.index()].name)?
                }
                Stmt::RowReduce { dst, src, op } => writeln!(
                    f,
                    "{pad}{} = row_{:?}({})",
                    self.rows[dst.index()].name,
                    op,
                    self.regs[src.index()].name
                )?,
                Stmt::RowReduceMap {
                    dst,
                    op,
                    expr,
                    mask_fill,
                    ..
                } => {
                    write!(
                        f,
                        "{pad}{} = row_{:?}(map {})",
                        self.rows[dst.index()].name,
                        op,
                        self.fmt_expr(expr)
                    )?;
                    match mask_fill {
                        Some(fill) => writeln!(f, " masked fill {fill}")?,
                        None => writeln!(f)?,
                    }
                }
                Stmt::RowDot { dst, a, b } => writeln!(
                    f,
                    "{pad}{} = row_dot({}, {})",
                    self.rows[dst.index()].name,
                    self.regs[a.index()].name,
                    self.regs[b.index()].name
                )?,
                Stmt::RowMap { dst, expr } => writeln!(
                    f,
                    "{pad}{} = rows {}",
                    self.rows[dst.index()].name,
                    self.fmt_expr(expr)
                )?,
                Stmt::Convert { dst, src } => writeln!(
                    f,
                    "{pad}{} = convert({})",
                    self.regs[dst.index()].name,
                    self.regs[src.index()].name
                )?,
                Stmt::KeyLoop {
                    block_n,
                    masks,
                    body,
                } => {
                    writeln!(f, "{pad}for key tile of {block_n} (masks {masks:?}) {{")?;
                    self.fmt_block(f, body, depth + 1)?;
                    writeln!(f, "{pad}}}")?
                }
                Stmt::Store { src, dst } => writeln!(
                    f,
                    "{pad}store {} -> {}",
                    self.regs[src.index()].name,
                    self.tensors[dst.index()].name
                )?,
                Stmt::AccumulatePartial {
                    acc,
                    src,
                    split,
                    weight,
                } => writeln!(
                    f,
                    "{pad}{} += {} * load {}[{split}]",
                    self.regs[acc.index()].name,
                    self.rows[weight.index()].name,
                    self.tensors[src.index()].name
                )?,
                Stmt::StoreRow { src, dst } => writeln!(
                    f,
                    "{pad}store {} -> {}",
                    self.rows[src.index()].name,
                    self.row_outputs[dst.index()].name
                )?,
                Stmt::LoadRow { dst, src, split } => writeln!(
                    f,
                    "{pad}{} = load {}[{split}]",
                    self.rows[dst.index()].name,
                    self.row_inputs[src.index()].name
                )?,
                Stmt::ContractT { acc, a, scale, b } => writeln!(
                    f,
                    "{pad}{} += ({} * {})^T . {}",
                    self.regs[acc.index()].name,
                    self.shared[a.index()].name,
                    self.fmt_expr(scale),
                    self.shared[b.index()].name
                )?,
                Stmt::StoreState { src, dst } => writeln!(
                    f,
                    "{pad}{}[chunk] = {}",
                    self.states[dst.index()].name,
                    self.regs[src.index()].name
                )?,
                Stmt::LoadStatePrefix { dst, src, decay } => writeln!(
                    f,
                    "{pad}{} = sum over c < chunk of ({})^(chunk - 1 - c) * {}[c]",
                    self.regs[dst.index()].name,
                    self.fmt_expr(decay),
                    self.states[src.index()].name
                )?,
                Stmt::StoreShared { src, dst } => writeln!(
                    f,
                    "{pad}{} = round({})",
                    self.shared[dst.index()].name,
                    self.regs[src.index()].name
                )?,
                Stmt::LookBack {
                    state,
                    prefix,
                    aggregates,
                    inclusive,
                    decay,
                } => writeln!(
                    f,
                    "{pad}look back: {ag}[chunk] = {st}; {pre} = sum over c < chunk of ({d})^(chunk - 1 - c) * state_c (from {ag}/{inc}); {inc}[chunk] = ({d}) * {pre} + {st}; {st} = {pre}",
                    ag = self.states[aggregates.index()].name,
                    inc = self.states[inclusive.index()].name,
                    st = self.regs[state.index()].name,
                    pre = self.regs[prefix.index()].name,
                    d = self.fmt_expr(decay),
                )?,
            }
        }
        Ok(())
    }
}
