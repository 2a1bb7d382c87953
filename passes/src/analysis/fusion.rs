//! Fusion groups: the Einsums one kernel (or one loop of a kernel) runs together.
//!
//! The rule is deliberately simple; the scheduler refines it:
//! 1. Every Einsum that iterates the key rank joins the group of its pass over that rank.
//! 2. An Einsum that does not iterate the key rank joins the group of the latest pass its
//!    inputs come from: as an *epilogue* when it needs a full result of that pass (the final
//!    normalization `AV = RNV[M1] / RD[M1]`), else as a *prologue*.
//! 3. A fiber the buffer analysis chose to recompute brings its recompute set into every
//!    later group that reads it (role *recompute*).
//! 4. A group whose live on-chip buffers (states, tiles, accumulators it produces or reads,
//!    for one CTA's parallel points) exceed the GPU's on-chip storage is cut greedily, in
//!    dependency order, into groups that fit; tensors crossing a cut go through memory.
//!
//! Tensors crossing groups are written to memory once (f32 for temporaries) and read by
//! each group that needs them; every group reads the inputs it touches in full.

use super::cost::tensor_bytes;
use super::normalize::LeafCascade;
use super::{
    AnalysisOptions, AnalyzedRank, Buffer, BufferKind, FiberStrategy, FusionGroup, GroupMember,
    MemberRole,
};
use einattn_ir::{Einsum, Handle, Tensor, TensorKind};

struct DraftGroup {
    pass: u32,
    members: Vec<(Handle<Einsum>, MemberRole)>,
    split_note: Option<String>,
}

pub(crate) fn fusion_groups(
    lc: &LeafCascade,
    analyzed: &[AnalyzedRank],
    key: Option<usize>,
    buffers: &[Buffer],
    options: &AnalysisOptions,
    points_per_cta: u64,
) -> Vec<FusionGroup> {
    let budget = options.gpu.on_chip_bytes();
    let key_info = key.map(|k| &analyzed[k]);

    // 1-2: pass and role of every Einsum.
    let mut placed: Vec<(u32, Handle<Einsum>, MemberRole)> = Vec::new();
    for &h in &lc.order {
        let e = lc.einsum(h);
        let (pass, role) = match key_info {
            None => (1, MemberRole::Pass),
            Some(k) => match k.passes.einsum_pass[h.index()] {
                Some(p) => (p, MemberRole::Pass),
                None => {
                    let out = e.output_tensor.index();
                    let role = if k.passes.tensor_after_full[out] {
                        MemberRole::Epilogue
                    } else {
                        MemberRole::Prologue
                    };
                    (k.passes.tensor_pass[out], role)
                }
            },
        };
        placed.push((pass, h, role));
    }
    let mut passes: Vec<u32> = placed.iter().map(|&(p, _, _)| p).collect();
    passes.sort_unstable();
    passes.dedup();

    let mut drafts: Vec<DraftGroup> = passes
        .iter()
        .map(|&pass| DraftGroup {
            pass,
            members: placed
                .iter()
                .filter(|&&(p, _, _)| p == pass)
                .map(|&(_, h, role)| (h, role))
                .collect(),
            split_note: None,
        })
        .collect();

    // 3: recomputed fibers rerun in the groups that read them.
    for b in buffers
        .iter()
        .filter(|b| b.strategy == Some(FiberStrategy::Recompute))
    {
        let Some(t) = lc.cascade.tensor_by_name(&b.tensor) else {
            continue;
        };
        let Some(rank) = analyzed
            .iter()
            .map(|a| a.passes.rank)
            .find(|&r| lc.rank_name(r) == b.rank)
        else {
            continue;
        };
        let set = super::buffers::recompute_set(lc, rank, t);
        let Some(producer) = lc.producer[t.index()] else {
            continue;
        };
        for d in drafts.iter_mut() {
            let holds_producer = d.members.iter().any(|&(h, _)| h == producer);
            let reads = d.members.iter().any(|&(h, _)| {
                lc.einsum(h)
                    .accesses
                    .iter()
                    .any(|a| a.tensor == t && !a.self_read)
            });
            if reads && !holds_producer {
                for &s in &set {
                    if !d.members.iter().any(|&(h, _)| h == s) {
                        d.members.push((s, MemberRole::Recompute));
                    }
                }
            }
        }
    }
    for d in drafts.iter_mut() {
        d.members
            .sort_by_key(|&(h, _)| lc.order.iter().position(|&o| o == h));
    }

    // 4: cut groups that do not fit on chip.
    let live_bytes = |members: &[(Handle<Einsum>, MemberRole)]| -> u64 {
        group_buffers(lc, members, buffers)
            .iter()
            .map(|b| b.bytes_per_point.saturating_mul(points_per_cta))
            .fold(0u64, u64::saturating_add)
    };
    let mut cut: Vec<DraftGroup> = Vec::new();
    for d in drafts {
        let total = live_bytes(&d.members);
        if total <= budget || d.members.len() <= 1 {
            cut.push(d);
            continue;
        }
        let mut current: Vec<(Handle<Einsum>, MemberRole)> = Vec::new();
        let mut pieces: Vec<Vec<(Handle<Einsum>, MemberRole)>> = Vec::new();
        for m in d.members {
            let mut trial = current.clone();
            trial.push(m);
            if !current.is_empty() && live_bytes(&trial) > budget {
                pieces.push(std::mem::take(&mut current));
                current.push(m);
            } else {
                current = trial;
            }
        }
        if !current.is_empty() {
            pieces.push(current);
        }
        let count = pieces.len();
        for (i, members) in pieces.into_iter().enumerate() {
            cut.push(DraftGroup {
                pass: d.pass,
                members,
                split_note: Some(format!(
                    "part {} of {count} of pass {}: the whole pass needs {total} B on chip per CTA, \
                     more than the {budget} B available",
                    i + 1,
                    d.pass
                )),
            });
        }
    }

    // What each group reads from memory: inputs, and tensors made by another group
    // (a tensor the group recomputes is made here, so it is not read).
    let reads_of: Vec<Vec<Handle<Tensor>>> = cut
        .iter()
        .map(|d| {
            let produces = |t: Handle<Tensor>| {
                lc.producer[t.index()].is_some_and(|p| d.members.iter().any(|&(m, _)| m == p))
            };
            let mut reads: Vec<Handle<Tensor>> = Vec::new();
            for &(m, _) in &d.members {
                for a in lc.einsum(m).accesses.iter().filter(|a| !a.self_read) {
                    if !produces(a.tensor) && !reads.contains(&a.tensor) {
                        reads.push(a.tensor);
                    }
                }
            }
            reads
        })
        .collect();
    let key_name = key_info.map(|k| k.report_name.clone());

    cut.iter()
        .enumerate()
        .map(|(gi, d)| {
            let reads = &reads_of[gi];
            // Outputs, and whatever another group reads, leave the group through memory.
            let mut writes: Vec<Handle<Tensor>> = Vec::new();
            for &(m, role) in &d.members {
                let t = lc.einsum(m).output_tensor;
                let is_output = lc.cascade.tensors[t].kind == TensorKind::Output;
                let read_elsewhere = reads_of
                    .iter()
                    .enumerate()
                    .any(|(gj, r)| gj != gi && r.contains(&t));
                if role != MemberRole::Recompute
                    && (is_output || read_elsewhere)
                    && !writes.contains(&t)
                {
                    writes.push(t);
                }
            }
            let traffic = |t: &Handle<Tensor>| -> u64 {
                match lc.cascade.tensors[*t].kind {
                    TensorKind::Temp => lc.cascade.tensor_elements(*t).saturating_mul(4),
                    _ => tensor_bytes(lc, *t),
                }
            };
            let bytes_moved = reads
                .iter()
                .chain(&writes)
                .map(traffic)
                .fold(0u64, u64::saturating_add);
            let on_chip = live_bytes(&d.members);
            let fits = on_chip <= budget;
            let names = |role: MemberRole| -> Vec<String> {
                d.members
                    .iter()
                    .filter(|&&(_, r)| r == role)
                    .map(|&(m, _)| lc.einsum(m).name.clone())
                    .collect()
            };
            let mut words = Vec::new();
            match &key_name {
                Some(k) => {
                    let main = names(MemberRole::Pass);
                    if !main.is_empty() {
                        words.push(format!(
                            "pass {} over {k}: {} traverse {k}",
                            d.pass,
                            main.join(", ")
                        ));
                    } else {
                        words.push(format!("after pass {} over {k}", d.pass));
                    }
                }
                None => words.push("no reduced or iterated rank: one group".to_string()),
            }
            let pro = names(MemberRole::Prologue);
            if !pro.is_empty() {
                words.push(format!(
                    "before it, needing nothing the pass produces: {}",
                    pro.join(", ")
                ));
            }
            let epi = names(MemberRole::Epilogue);
            if !epi.is_empty() {
                words.push(format!(
                    "after it, needing its complete results: {}",
                    epi.join(", ")
                ));
            }
            let rec = names(MemberRole::Recompute);
            if !rec.is_empty() {
                words.push(format!(
                    "recomputed here instead of held: {}",
                    rec.join(", ")
                ));
            }
            words.push(format!(
                "{on_chip} B live on chip per CTA of {points_per_cta} parallel point{} ({})",
                if points_per_cta == 1 { "" } else { "s" },
                if fits { "fits" } else { "does not fit" }
            ));
            if let Some(note) = &d.split_note {
                words.push(note.clone());
            }
            FusionGroup {
                id: gi as u32 + 1,
                pass: d.pass,
                einsums: d
                    .members
                    .iter()
                    .map(|&(m, role)| GroupMember {
                        einsum: lc.einsum(m).name.clone(),
                        role,
                    })
                    .collect(),
                on_chip_bytes_per_cta: on_chip,
                fits_on_chip: fits,
                reads: reads
                    .iter()
                    .map(|&t| lc.tensor_name(t).to_string())
                    .collect(),
                writes: writes
                    .iter()
                    .map(|&t| lc.tensor_name(t).to_string())
                    .collect(),
                bytes_moved,
                reason: words.join("; "),
            }
        })
        .collect()
}

/// The on-chip buffers (states, tiles, accumulators) produced or read by `members`.
fn group_buffers<'b>(
    lc: &LeafCascade,
    members: &[(Handle<Einsum>, MemberRole)],
    buffers: &'b [Buffer],
) -> Vec<&'b Buffer> {
    let mut touched: Vec<Handle<Tensor>> = Vec::new();
    for &(m, _) in members {
        let e = lc.einsum(m);
        touched.push(e.output_tensor);
        touched.extend(e.accesses.iter().map(|a| a.tensor));
    }
    buffers
        .iter()
        .filter(|b| b.kind != BufferKind::Fiber)
        .filter(|b| {
            lc.cascade
                .tensor_by_name(&b.tensor)
                .is_some_and(|t| touched.contains(&t))
        })
        .collect()
}
