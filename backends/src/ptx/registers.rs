//! Register names: fresh virtual registers of each class, the named registers of
//! accumulator, A-fragment and row-vector tiles (the fragment layouts of the module docs),
//! and the instruction and comment writers.

use super::*;

impl Printer<'_> {
    pub(super) fn r(&mut self) -> String {
        self.n_r += 1;
        format!("%r{}", self.n_r - 1)
    }

    pub(super) fn rd(&mut self) -> String {
        self.n_rd += 1;
        format!("%rd{}", self.n_rd - 1)
    }

    pub(super) fn f(&mut self) -> String {
        self.n_f += 1;
        format!("%f{}", self.n_f - 1)
    }

    pub(super) fn h16(&mut self) -> String {
        self.n_h += 1;
        format!("%h{}", self.n_h - 1)
    }

    pub(super) fn pred(&mut self) -> String {
        self.n_p += 1;
        format!("%p{}", self.n_p - 1)
    }

    pub(super) fn label(&mut self, what: &str) -> String {
        self.n_label += 1;
        format!("$L_{what}_{}", self.n_label - 1)
    }

    pub(super) fn named(&mut self, ty: &str, name: &str) -> String {
        self.decls.push(format!("\t.reg {ty} %{name};"));
        format!("%{name}")
    }

    /// A named register shared by every key loop of the program (each loop re-initializes it).
    pub(super) fn named_once(&mut self, ty: &str, name: &str) -> String {
        let decl = format!("\t.reg {ty} %{name};");
        if !self.decls.contains(&decl) {
            self.decls.push(decl);
        }
        format!("%{name}")
    }

    pub(super) fn ins(&mut self, s: impl AsRef<str>) {
        self.body.push('\t');
        self.body.push_str(s.as_ref());
        self.body.push('\n');
    }

    pub(super) fn comment(&mut self, s: impl AsRef<str>) {
        let _ = writeln!(self.body, "\t// {}", s.as_ref());
    }
    // ---- tile register names ---------------------------------------------------------

    pub(super) fn acc_reg(&self, id: RegId, mt: u32, nt: u32, e: u32) -> String {
        let cols = self.prog.regs[id.index()].cols;
        format!("%t{}_{}", id.0, (mt * (cols / 8) + nt) * 4 + e)
    }

    /// Every register of an accumulator tile, in register order.
    pub(super) fn acc_regs(&self, id: RegId) -> Vec<String> {
        let cols = self.prog.regs[id.index()].cols;
        (0..self.mtiles * cols / 8 * 4)
            .map(|i| format!("%t{}_{i}", id.0))
            .collect()
    }

    pub(super) fn afrag_reg(&self, id: RegId, mt: u32, ks: u32, i: u32) -> String {
        let cols = self.prog.regs[id.index()].cols;
        format!("%a{}_{}", id.0, (mt * (cols / 16) + ks) * 4 + i)
    }

    pub(super) fn row_reg(&self, id: RowId, mt: u32, half: u32) -> String {
        format!("%w{}_{}", id.0, mt * 2 + half)
    }

    pub(super) fn mma_type(elem: Elem) -> Result<&'static str, TileError> {
        match elem {
            Elem::Bf16 => Ok("bf16"),
            Elem::F16 => Ok("f16"),
            Elem::F32 => unsupported("mma operands must be 16-bit"),
        }
    }
    // ---- setup -------------------------------------------------------------------------
}
