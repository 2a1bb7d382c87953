//! All-gather of K/V (LASP-2H), contiguous or zigzag: each rank gathers every key chunk
//! into whole-sequence key tensors, then runs one `full` kernel per query chunk it holds.

use super::*;

/// All-gather of K/V (LASP-2H), contiguous or zigzag: one all-gather of every device's key
/// chunks, placed into whole-sequence key tensors, then one `full` kernel per held query
/// chunk over every key (the masks, at global positions, skip what causality hides).
pub(super) fn emit_allgather_kv(
    ctx: &Ctx,
    b: &mut RankBuilder,
    analyzer: &mut PairAnalyzer,
    mine: &[TokenRange],
    kv: &Placed,
    kv_block: u64,
    kv_elems: u64,
) -> Result<(), PlanError> {
    let p = ctx.devices;
    let tokens = ctx.cls.seq.tokens;
    let dtype = kv_dtype(ctx);
    b.buffer("kv_all", &dtype, kv_elems * p, BufferInit::Uninit);
    let gathered = b.event();
    b.steps.push(Step::AllGather {
        send: region("kv", 0, kv_elems),
        recv: region("kv_all", 0, kv_elems * p),
        dtype: dtype.clone(),
        exec: RankBuilder::exec(COMM, Vec::new(), Some(gathered.clone())),
    });
    let pieces_per_rank = mine.len() as u64;
    let mut whole_keys = Vec::new();
    for (t, _, _) in kv {
        let name = format!("{}_seq", ctx.cascade.tensors[*t].name);
        let shape = ctx.local_shape(*t, tokens, tokens, None);
        b.buffer(&name, &dtype, Ctx::elements(&shape), BufferInit::Uninit);
        whole_keys.push((*t, name, shape));
    }
    let mut wait = vec![gathered];
    for owner in 0..p {
        for (j, c) in ctx.chunks(owner).iter().enumerate() {
            for ((t, chunk_shape, off), (_, name, shape)) in kv.iter().zip(&whole_keys) {
                b.steps.push(Step::Place {
                    src: region(
                        "kv_all",
                        (owner * pieces_per_rank + j as u64) * kv_block + off,
                        Ctx::elements(chunk_shape),
                    ),
                    dst: region(name, 0, Ctx::elements(shape)),
                    shape: shape.clone(),
                    slices: piece_slices(ctx, *t, *c, None),
                    dtype: dtype.clone(),
                    exec: RankBuilder::exec(COMPUTE, std::mem::take(&mut wait), None),
                });
            }
        }
    }
    let pairs = schemes::device_pairs(analyzer, p, ctx.zigzag, b.rank)?;
    let all_keys = TokenRange {
        start: 0,
        len: tokens,
    };
    let q_buffer = query_buffer(ctx);
    for (qi, q) in mine.iter().enumerate() {
        let seen: Vec<PairMask> = pairs
            .iter()
            .filter(|(pq, _, _)| pq == q)
            .map(|&(_, _, m)| m)
            .collect();
        if seen.is_empty() {
            return Err(PlanError::Unsupported(format!(
                "queries [{}, {}) see no key at all",
                q.start,
                q.end()
            )));
        }
        // Full only when every key chunk is seen unmasked.
        let mask = if seen.len() as u64 == 2u64.pow(ctx.zigzag as u32) * p
            && seen.iter().all(|&m| m == PairMask::Full)
        {
            PairMask::Full
        } else {
            PairMask::Partial
        };
        let mut args = query_args(
            ctx,
            &ctx.seq_inputs(Side::Query),
            q.len,
            tokens,
            (&q_buffer, qi as u64),
        );
        for (t, name, shape) in &whole_keys {
            args.push(KernelArg {
                tensor: ctx.cascade.tensors[*t].name.clone(),
                role: ArgRole::Input,
                key_chunk: Some(0),
                shape: shape.clone(),
                region: region(name, 0, Ctx::elements(shape)),
            });
        }
        args.extend(param_args(ctx));
        args.extend(output_args(ctx, *q, qi as u64));
        b.steps.push(Step::Kernel(KernelStep {
            kernel: kernel_name(ctx, Phase::Full),
            phase: Phase::Full,
            queries: *q,
            keys: vec![all_keys],
            masks: vec![mask],
            heads: None,
            args,
            grid: ctx.grid(*q, None),
            launch: Vec::new(),
            chunks: None,
            exec: RankBuilder::exec(COMPUTE, Vec::new(), None),
        }));
    }
    Ok(())
}
