//! The CPU interpreter of point programs, in f64: kernels in order, recurrent kernels one
//! instance (CTA) at a time, as the GPU runs them. Tests compare it with the cascade
//! interpreter, which checks the lowering (kernel order, instance ranks, inits, masks at
//! their levels, absent points) without a GPU.

use super::program::*;
use einattn_ir::cascade::{CmpOp, IndexExpr};
use einattn_ir::interp::TensorData;
use std::collections::HashMap;

/// The contents of every slot, absent elements as `None`.
pub struct Memory {
    pub slots: Vec<Vec<Option<f64>>>,
}

impl Memory {
    /// Slots filled from `inputs` by name (inputs and parameters), the rest absent.
    pub fn new(
        program: &PointProgram,
        inputs: &HashMap<String, TensorData>,
    ) -> Result<Memory, String> {
        let mut slots = Vec::new();
        for s in &program.slots {
            let n =
                usize::try_from(s.elements()).map_err(|_| format!("`{}` is too large", s.name))?;
            slots.push(match s.kind {
                SlotKind::Input | SlotKind::Param => {
                    let data = inputs
                        .get(&s.name)
                        .ok_or_else(|| format!("no values for `{}`", s.name))?;
                    if data.values.len() != n {
                        return Err(format!(
                            "`{}` has {} values, not {n}",
                            s.name,
                            data.values.len()
                        ));
                    }
                    data.values.iter().map(|&v| Some(v)).collect()
                }
                SlotKind::Output | SlotKind::Scratch => vec![None; n],
            });
        }
        Ok(Memory { slots })
    }

    /// A slot as stored: absent elements read as 0.
    pub fn stored(&self, slot: usize) -> Vec<f64> {
        self.slots[slot].iter().map(|v| v.unwrap_or(0.0)).collect()
    }
}

struct Machine<'p> {
    program: &'p PointProgram,
    strides: Vec<Vec<u64>>,
    mem: Memory,
}

fn eval_index(i: &IndexExpr, idx: &[i64]) -> i64 {
    i.eval(|r| idx[r.index()])
}

impl Machine<'_> {
    fn offset(&self, a: &Access, idx: &[i64]) -> Result<usize, String> {
        let shape = &self.program.slots[a.slot].shape;
        let mut off = 0u64;
        for (d, i) in a.indices.iter().enumerate() {
            let v = eval_index(i, idx);
            if v < 0 || v as u64 >= shape[d] {
                return Err(format!(
                    "`{}` read at {v} along a dimension of {}",
                    self.program.slots[a.slot].name, shape[d]
                ));
            }
            off += v as u64 * self.strides[a.slot][d];
        }
        Ok(off as usize)
    }

    fn eval(&self, e: &Expr, idx: &[i64]) -> Result<Option<f64>, String> {
        Ok(match e {
            Expr::Literal(x) => Some(*x),
            Expr::Index(i) => Some(eval_index(i, idx) as f64),
            Expr::Load(a) => self.mem.slots[a.slot][self.offset(a, idx)?],
            Expr::Unary(op, a) => self.eval(a, idx)?.map(|x| op.apply(x)),
            Expr::Binary(op, a, b) => match (self.eval(a, idx)?, self.eval(b, idx)?) {
                (Some(x), Some(y)) => Some(op.apply(x, y)),
                _ => None,
            },
        })
    }

    fn pass(&self, c: &Checks, idx: &[i64]) -> Result<bool, String> {
        if !c.affine.iter().all(|k| k.holds(|r| idx[r.index()])) {
            return Ok(false);
        }
        for v in &c.values {
            let holds = match (self.eval(&v.lhs, idx)?, self.eval(&v.rhs, idx)?) {
                (Some(a), Some(b)) => match v.op {
                    CmpOp::Lt => a < b,
                    CmpOp::Le => a <= b,
                    CmpOp::Gt => a > b,
                    CmpOp::Ge => a >= b,
                    CmpOp::Eq => a == b,
                    CmpOp::Ne => a != b,
                },
                _ => false,
            };
            if !holds {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn reduce(&self, c: &Compute, level: usize, idx: &mut [i64]) -> Result<Option<f64>, String> {
        let Some(l) = c.levels.get(level) else {
            return self.eval(&c.value, idx);
        };
        let mut acc = l.op.identity();
        for i in 0..l.extent as i64 {
            idx[l.rank] = i;
            if !self.pass(&l.checks, idx)? {
                continue;
            }
            if let Some(v) = self.reduce(c, level + 1, idx)? {
                acc = l.op.combine(acc, v);
            }
        }
        Ok(Some(acc))
    }

    /// Every point of `c` for the ranks already bound in `idx`.
    fn run_compute(&mut self, c: &Compute, idx: &mut [i64]) -> Result<(), String> {
        let extents: Vec<u64> = c.points.iter().map(|&r| self.program.ranks[r].1).collect();
        let total: u64 = extents.iter().product();
        let mut writes = Vec::new();
        for p in 0..total {
            let mut rest = p;
            for (k, &r) in c.points.iter().enumerate().rev() {
                idx[r] = (rest % extents[k]) as i64;
                rest /= extents[k];
            }
            let value = if self.pass(&c.outer, idx)? {
                self.reduce(c, 0, idx)?
            } else {
                None
            };
            writes.push((self.offset(&c.out, idx)?, value));
        }
        let output = self.program.slots[c.out.slot].kind == SlotKind::Output;
        for (off, v) in writes {
            // An output stores an absent point as 0; scratch keeps it absent.
            self.mem.slots[c.out.slot][off] = if output { Some(v.unwrap_or(0.0)) } else { v };
        }
        Ok(())
    }
}

/// Runs `program` on `memory`; returns the memory after the last kernel.
pub fn run(program: &PointProgram, memory: Memory) -> Result<Memory, String> {
    let mut m = Machine {
        program,
        strides: program.slots.iter().map(Slot::strides).collect(),
        mem: memory,
    };
    let mut idx = vec![0i64; program.ranks.len()];
    for k in &program.kernels {
        match k {
            PointKernel::Parallel { compute, .. } => m.run_compute(compute, &mut idx)?,
            PointKernel::Recurrent {
                instance,
                rank,
                steps,
                reverse,
                inits,
                body,
                ..
            } => {
                let extents: Vec<u64> = instance.iter().map(|&r| program.ranks[r].1).collect();
                let total: u64 = extents.iter().product();
                for p in 0..total {
                    let mut rest = p;
                    for (j, &r) in instance.iter().enumerate().rev() {
                        idx[r] = (rest % extents[j]) as i64;
                        rest /= extents[j];
                    }
                    for c in inits {
                        m.run_compute(c, &mut idx)?;
                    }
                    let n = *steps as i64;
                    for k in 0..n {
                        idx[*rank] = if *reverse { n - 1 - k } else { k };
                        for c in body {
                            m.run_compute(c, &mut idx)?;
                        }
                    }
                }
            }
            PointKernel::Copy { from, to, .. } => {
                let values = m.mem.stored(*from);
                m.mem.slots[*to] = values.into_iter().map(Some).collect();
            }
        }
    }
    Ok(m.mem)
}
