//! The text rendering of a report: what was found, and why, in sentences.

use super::normalize::{LeafCascade, LeafCondition, Relation};
use super::{BufferKind, OpClass, Report};
use einattn_ir::IndexExpr;
use std::fmt::Write;

/// `64*m1 + m0 <= p`: positive terms on the left, negated negative terms on the right,
/// the constant on whichever side keeps it positive.
pub(crate) fn format_condition(lc: &LeafCascade, c: &LeafCondition) -> String {
    let mut lhs = IndexExpr::constant(c.constant.max(0));
    let mut rhs = IndexExpr::constant((-c.constant).max(0));
    for &(coef, rank) in &c.terms {
        if coef > 0 {
            lhs.terms.push((coef, rank));
        } else {
            rhs.terms.push((-coef, rank));
        }
    }
    let rel = match c.relation {
        Relation::AtMostZero => "<=",
        Relation::Zero => "==",
        Relation::NonZero => "!=",
    };
    format!("{} {rel} {}", lc.format_index(&lhs), lc.format_index(&rhs))
}

/// Engineering notation for counts: 1.07 G, 65.5 k.
fn si(n: f64) -> String {
    let (value, unit) = if n >= 1e15 {
        (n / 1e15, "P")
    } else if n >= 1e12 {
        (n / 1e12, "T")
    } else if n >= 1e9 {
        (n / 1e9, "G")
    } else if n >= 1e6 {
        (n / 1e6, "M")
    } else if n >= 1e3 {
        (n / 1e3, "k")
    } else {
        return format!("{n}");
    };
    format!("{value:.3} {unit}")
}

/// "1 element", "64 elements".
fn plural(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

fn seconds(s: f64) -> String {
    if s >= 1e-3 {
        format!("{:.3} ms", s * 1e3)
    } else {
        format!("{:.3} us", s * 1e6)
    }
}

pub(crate) fn render_text(r: &Report) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; the results are ignored on purpose.
    let _ = writeln!(out, "kernel {}", r.kernel);
    if !r.sizes.is_empty() {
        let sizes: Vec<String> = r.sizes.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(out, "sizes: {}", sizes.join(" "));
    }
    let _ = writeln!(
        out,
        "parallel ranks: {} ({} points; a CTA owns {})",
        if r.parallel_ranks.is_empty() {
            "none".to_string()
        } else {
            r.parallel_ranks.join(", ")
        },
        r.parallel_points,
        r.points_per_cta
    );

    let _ = writeln!(out, "\n== passes");
    if r.pass_detail.is_empty() {
        let _ = writeln!(out, "no rank is reduced or iterated: nothing to traverse.");
    }
    for p in &r.pass_detail {
        let traversal = match p.role {
            super::RankRole::Outer => format!(" (traversed as its outer rank {})", p.rank),
            super::RankRole::Tile => " (a tile rank: its passes stay on chip)".to_string(),
            super::RankRole::Plain => String::new(),
        };
        let key = if r.key_rank.as_deref() == Some(p.name.as_str()) {
            " [key rank]"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "{}: {} pass{}{traversal}{key}",
            p.name,
            p.passes,
            if p.passes == 1 { "" } else { "es" }
        );
        let members: Vec<String> = p
            .einsums
            .iter()
            .map(|e| format!("{} {}", e.einsum, e.pass))
            .collect();
        let _ = writeln!(out, "  Einsums by pass: {}", members.join(", "));
        for reason in &p.reasons {
            let _ = writeln!(out, "  {reason}");
        }
        if p.passes == 1 {
            let _ = writeln!(
                out,
                "  one pass: no Einsum over {} needs a result that is complete only after a whole traversal of it",
                p.name
            );
        }
    }

    let _ = writeln!(out, "\n== buffers (per parallel point, f32)");
    if r.buffers.is_empty() {
        let _ = writeln!(out, "none: every intermediate streams point by point.");
    }
    for b in &r.buffers {
        let kind = match b.kind {
            BufferKind::State => "state",
            BufferKind::Fiber => "fiber",
            BufferKind::Tile => "tile",
            BufferKind::Accumulator => "accumulator",
        };
        let _ = writeln!(
            out,
            "{} [{kind}] {} = {} B per point, {} B in total: {}",
            b.tensor,
            plural(b.elements_per_point, "element"),
            b.bytes_per_point,
            b.bytes_total,
            b.reason
        );
    }

    let _ = writeln!(out, "\n== work");
    for e in &r.einsums {
        let class = match e.class {
            OpClass::Contraction => format!("contraction over {}", e.contracted.join(", ")),
            OpClass::Scalar => "scalar".to_string(),
        };
        let masked = if e.points == e.points_dense {
            String::new()
        } else {
            format!(
                " of {} ({:.1}% survive the mask{})",
                e.points_dense,
                100.0 * e.points as f64 / e.points_dense.max(1) as f64,
                if e.mask_inherited {
                    ", partly inherited from inputs"
                } else {
                    ""
                }
            )
        };
        let masked = if e.value_mask.is_empty() {
            masked
        } else {
            format!("{masked} (at most: {})", e.value_mask.join(", "))
        };
        let _ = writeln!(
            out,
            "{}: {class}; {} points{masked}; {} FLOP ({} tensor-core, {} scalar, {} transcendental)",
            e.einsum,
            e.points,
            si(e.flops as f64),
            si(e.contraction_flops as f64),
            si(e.scalar_flops as f64),
            si(e.transcendental_ops as f64),
        );
    }
    let _ = writeln!(
        out,
        "total: {} FLOP = {} tensor-core + {} scalar (of which {} transcendental)",
        si(r.flops as f64),
        si(r.flops_by_class.contraction as f64),
        si(r.flops_by_class.scalar as f64),
        si(r.flops_by_class.transcendental as f64)
    );

    let _ = writeln!(out, "\n== bytes");
    for t in &r.tensor_bytes {
        let kind = match t.kind {
            einattn_ir::TensorKind::Input => "input",
            einattn_ir::TensorKind::Param => "param",
            einattn_ir::TensorKind::Output => "output",
            einattn_ir::TensorKind::Temp => "temp",
        };
        let _ = writeln!(
            out,
            "{} ({kind}, {}): {}, {} B",
            t.tensor,
            t.dtype,
            plural(t.elements, "element"),
            t.bytes
        );
    }
    let _ = writeln!(
        out,
        "minimum: {} B (each input read once, each output written once); fused groups move {} B",
        r.bytes_min, r.bytes_fused
    );
    let _ = writeln!(
        out,
        "arithmetic intensity: {:.1} FLOP/B",
        r.arithmetic_intensity
    );

    let rf = &r.roofline;
    let _ = writeln!(out, "\n== roofline ({})", rf.gpu.name);
    let _ = writeln!(
        out,
        "tensor cores {} | scalar {} | SFU {} | memory {} -> at least {}, {}-bound",
        seconds(rf.contraction_s),
        seconds(rf.scalar_s),
        seconds(rf.transcendental_s),
        seconds(rf.memory_s),
        seconds(rf.time_lower_bound_s),
        rf.bound
    );
    let _ = writeln!(
        out,
        "memory time of the fusion groups below: {}",
        seconds(rf.memory_fused_s)
    );

    let _ = writeln!(out, "\n== fusion groups");
    for g in &r.fusion_groups {
        let members: Vec<String> = g
            .einsums
            .iter()
            .map(|m| match m.role {
                super::MemberRole::Pass => m.einsum.clone(),
                super::MemberRole::Prologue => format!("{} (prologue)", m.einsum),
                super::MemberRole::Epilogue => format!("{} (epilogue)", m.einsum),
                super::MemberRole::Recompute => format!("{} (recompute)", m.einsum),
            })
            .collect();
        let _ = writeln!(out, "group {}: {}", g.id, members.join(", "));
        let _ = writeln!(out, "  {}", g.reason);
        let _ = writeln!(
            out,
            "  reads {}; writes {}; {} B",
            if g.reads.is_empty() {
                "nothing".to_string()
            } else {
                g.reads.join(", ")
            },
            if g.writes.is_empty() {
                "nothing".to_string()
            } else {
                g.writes.join(", ")
            },
            g.bytes_moved
        );
    }

    if !r.warnings.is_empty() {
        let _ = writeln!(out, "\n== warnings");
        for w in &r.warnings {
            let _ = writeln!(out, "{w}");
        }
    }
    out
}
