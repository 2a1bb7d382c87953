//! Schemes that split the key rank of softmax attention (Ring Attention and TokenRing,
//! contiguous or zigzag): every (query chunk, key chunk) pair with a non-empty mask runs
//! a partial kernel into scratch statistics that a log-sum-exp merge folds into the query
//! chunk's accumulator; the epilogue finishes. The all-gather of K/V is the same
//! statistics layout with every key block gathered first ([`super::allgather_kv`]).

use super::*;

/// Layout of one query chunk's statistics: (state, shape, offset) and the merge rules.
pub(super) fn stats_layout(ctx: &Ctx, q_len: u64) -> (Placed, Vec<MergeStat>, u64) {
    let cascade = ctx.cascade;
    let mut layout = Vec::new();
    let mut merge = Vec::new();
    let mut offset = 0;
    for s in &ctx.cls.states {
        let shape = ctx.local_shape(s.state, q_len, q_len, None);
        let n = Ctx::elements(&shape);
        let (kind, max_stat, max_dims) = match &s.role {
            StateRole::Extremum { op } => (
                if *op == einattn_ir::ReduceOp::Min {
                    MergeKind::Min
                } else {
                    MergeKind::Max
                },
                None,
                Vec::new(),
            ),
            StateRole::Linear { .. } => (MergeKind::Sum, None, Vec::new()),
            StateRole::RescaledSum { max_state } => {
                let ranks_of = |t: Handle<Tensor>| -> Vec<Handle<Rank>> {
                    let tensor = &cascade.tensors[t];
                    tensor
                        .ranks
                        .iter()
                        .enumerate()
                        .filter(|(d, _)| Some(*d) != tensor.iterative)
                        .map(|(_, &r)| r)
                        .collect()
                };
                let mine = ranks_of(s.state);
                let dims = ranks_of(*max_state)
                    .iter()
                    .filter_map(|r| mine.iter().position(|x| x == r))
                    .collect();
                (
                    MergeKind::RescaledSum,
                    Some(cascade.tensors[*max_state].name.clone()),
                    dims,
                )
            }
        };
        merge.push(MergeStat {
            name: cascade.tensors[s.state].name.clone(),
            kind,
            offset,
            shape: shape.clone(),
            max_stat,
            max_dims,
        });
        layout.push((s.state, shape, offset));
        offset += n;
    }
    (layout, merge, offset)
}

/// Where a key chunk's K/V blocks are: (buffer, offset of the chunk's block).
pub(super) struct KeySource {
    buffer: String,
    offset: u64,
}

/// Key-side inputs in the `kv` layout: per tensor, (tensor, shape, offset within a block).
pub(super) fn kv_layout(ctx: &Ctx, k_len: u64) -> (Placed, u64) {
    let mut out = Vec::new();
    let mut offset = 0;
    for t in ctx.seq_inputs(Side::Key) {
        let shape = ctx.local_shape(t, k_len, k_len, None);
        let n = Ctx::elements(&shape);
        out.push((t, shape, offset));
        offset += n;
    }
    (out, offset)
}

pub(super) struct SoftmaxKernels<'a> {
    ctx: &'a Ctx<'a>,
    kv: Placed,
    stats: Placed,
    q_inputs: Vec<Handle<Tensor>>,
}

impl SoftmaxKernels<'_> {
    /// A partial over one key chunk: statistics to `stats_out` (resuming from `stats_in`).
    // Each argument is one coordinate of the launch (queries, keys, where each lives).
    #[allow(clippy::too_many_arguments)]
    fn partial(
        &self,
        q: TokenRange,
        q_source: (&str, u64),
        k: TokenRange,
        mask: PairMask,
        key: &KeySource,
        stats_in: Option<(&str, u64)>,
        stats_out: (&str, u64),
        exec: Exec,
    ) -> Step {
        let ctx = self.ctx;
        let mut args = query_args(ctx, &self.q_inputs, q.len, k.len, q_source);
        for (t, shape, off) in &self.kv {
            args.push(KernelArg {
                tensor: ctx.cascade.tensors[*t].name.clone(),
                role: ArgRole::Input,
                key_chunk: Some(0),
                shape: shape.clone(),
                region: region(&key.buffer, key.offset + off, Ctx::elements(shape)),
            });
        }
        args.extend(self.param_args());
        for (role, place) in [
            (ArgRole::StatsIn, stats_in),
            (ArgRole::StatsOut, Some(stats_out)),
        ] {
            let Some((buffer, base)) = place else {
                continue;
            };
            for (t, shape, off) in &self.stats {
                args.push(KernelArg {
                    tensor: ctx.cascade.tensors[*t].name.clone(),
                    role,
                    key_chunk: None,
                    shape: shape.clone(),
                    region: region(buffer, base + off, Ctx::elements(shape)),
                });
            }
        }
        Step::Kernel(KernelStep {
            kernel: kernel_name(ctx, Phase::Partial),
            phase: Phase::Partial,
            queries: q,
            keys: vec![k],
            masks: vec![mask],
            heads: None,
            args,
            grid: ctx.grid(q, None),
            launch: Vec::new(),
            chunks: None,
            exec,
        })
    }

    fn param_args(&self) -> Vec<KernelArg> {
        param_args(self.ctx)
    }

    fn epilogue(&self, q: TokenRange, block: u64, stats: (&str, u64), exec: Exec) -> Step {
        let ctx = self.ctx;
        let mut args = Vec::new();
        for (t, shape, off) in &self.stats {
            args.push(KernelArg {
                tensor: ctx.cascade.tensors[*t].name.clone(),
                role: ArgRole::StatsIn,
                key_chunk: None,
                shape: shape.clone(),
                region: region(stats.0, stats.1 + off, Ctx::elements(shape)),
            });
        }
        args.extend(self.param_args());
        args.extend(output_args(ctx, q, block));
        Step::Kernel(KernelStep {
            kernel: kernel_name(ctx, Phase::Epilogue),
            phase: Phase::Epilogue,
            queries: q,
            keys: Vec::new(),
            masks: Vec::new(),
            heads: None,
            args,
            grid: ctx.grid(q, None),
            launch: Vec::new(),
            chunks: None,
            exec,
        })
    }
}

/// All-gather of K/V, Ring and TokenRing, contiguous or zigzag: every (query chunk, key
/// chunk) pair with a non-empty mask runs a partial kernel into scratch statistics that
/// an LSE merge folds into the query chunk's accumulator; the epilogue finishes.
pub(super) fn emit_softmax(
    ctx: &Ctx,
    b: &mut RankBuilder,
    kind: SchemeKind,
    analyzer: &mut PairAnalyzer,
) -> Result<(), PlanError> {
    let cls = ctx.cls;
    if !cls.keys_any_order() {
        return Err(PlanError::Unsupported(
            "softmax schemes are emitted for statistics that merge in any order; this cascade needs keys in order".to_string(),
        ));
    }
    let r = b.rank;
    let p = ctx.devices;
    let mine = ctx.chunks(r);
    let c_len = mine[0].len;
    data_buffers(ctx, b, &mine, &[Side::Query], None);
    output_buffers(ctx, b, &mine);
    let (kv, kv_block) = kv_layout(ctx, c_len);
    let pieces_per_rank = mine.len() as u64;
    // The kv buffer: per held chunk, each key-side tensor's block.
    let mut pieces = Vec::new();
    for (i, c) in mine.iter().enumerate() {
        for (t, _, off) in &kv {
            pieces.push(Piece {
                tensor: ctx.cascade.tensors[*t].name.clone(),
                buffer: "kv".to_string(),
                offset: i as u64 * kv_block + off,
                slices: piece_slices(ctx, *t, *c, None),
            });
        }
    }
    let kv_elems = kv_block * pieces_per_rank;
    b.buffer(
        "kv",
        &kv_dtype(ctx),
        kv_elems,
        BufferInit::Pieces { pieces },
    );
    if kind == SchemeKind::AllGatherKv {
        return emit_allgather_kv(ctx, b, analyzer, &mine, &kv, kv_block, kv_elems);
    }
    let (stats, merge_stats, stats_elems) = stats_layout(ctx, c_len);
    for i in 0..mine.len() {
        b.buffer(&format!("stats{i}"), "f32", stats_elems, BufferInit::Uninit);
    }
    b.buffer("stats_part", "f32", stats_elems, BufferInit::Uninit);
    let kernels = SoftmaxKernels {
        ctx,
        kv,
        stats,
        q_inputs: ctx.seq_inputs(Side::Query),
    };
    let my_pairs = schemes::device_pairs(analyzer, p, ctx.zigzag, r)?;
    let chunk_index =
        |c: &TokenRange, list: &[TokenRange]| list.iter().position(|x| x == c).unwrap_or(0) as u64;
    // Per query chunk: whether its accumulator holds anything yet.
    let mut started = vec![false; mine.len()];

    // Runs the partial for (q, k) and folds it into q's accumulator.
    let run_pair = |b: &mut RankBuilder,
                    started: &mut Vec<bool>,
                    qi: usize,
                    q_source: (&str, u64),
                    q: TokenRange,
                    k: TokenRange,
                    mask: PairMask,
                    key: &KeySource,
                    acc: (&str, u64),
                    wait: Vec<String>,
                    record: Option<String>| {
        if !started[qi] {
            started[qi] = true;
            b.steps.push(kernels.partial(
                q,
                q_source,
                k,
                mask,
                key,
                None,
                acc,
                RankBuilder::exec(COMPUTE, wait, record),
            ));
        } else {
            b.steps.push(kernels.partial(
                q,
                q_source,
                k,
                mask,
                key,
                None,
                ("stats_part", 0),
                RankBuilder::exec(COMPUTE, wait, None),
            ));
            b.steps.push(Step::LseMerge {
                into: region(acc.0, acc.1, stats_elems),
                from: region("stats_part", 0, stats_elems),
                stats: merge_stats.clone(),
                exec: RankBuilder::exec(COMPUTE, Vec::new(), record),
            });
        }
    };

    match kind {
        SchemeKind::Ring => {
            // Double-buffered ring: at step s this rank holds the chunks of rank (r - s).
            b.buffer("kv_ring0", &kv_dtype(ctx), kv_elems, BufferInit::Uninit);
            b.buffer("kv_ring1", &kv_dtype(ctx), kv_elems, BufferInit::Uninit);
            let mut arrived: Option<String> = None;
            let mut computed_prev: Option<String> = None;
            for s in 0..p {
                let src = (r + p - s) % p;
                let holding = if s == 0 {
                    "kv".to_string()
                } else {
                    format!("kv_ring{}", (s - 1) % 2)
                };
                // Send what we hold on, receive the next; the target buffer was last read
                // by the compute of step s - 1.
                let next_arrival = if s + 1 < p {
                    let ev = b.event();
                    let mut wait = Vec::new();
                    if let Some(a) = &arrived {
                        wait.push(a.clone());
                    }
                    if let Some(c) = &computed_prev {
                        wait.push(c.clone());
                    }
                    b.steps.push(Step::SendRecv {
                        send: Some(PeerRegion {
                            peer: (r + 1) % p,
                            region: region(&holding, 0, kv_elems),
                        }),
                        recv: Some(PeerRegion {
                            peer: (r + p - 1) % p,
                            region: region(&format!("kv_ring{}", s % 2), 0, kv_elems),
                        }),
                        dtype: kv_dtype(ctx),
                        exec: RankBuilder::exec(COMM, wait, Some(ev.clone())),
                    });
                    Some(ev)
                } else {
                    None
                };
                let src_chunks = ctx.chunks(src);
                let step_pairs: Vec<_> = my_pairs
                    .iter()
                    .filter(|(_, k, _)| src_chunks.contains(k))
                    .collect();
                let done = b.event();
                let n = step_pairs.len();
                // An empty step keeps the last compute event: buffer reuse still waits for it.

                for (i, (q, k, mask)) in step_pairs.into_iter().enumerate() {
                    let qi = chunk_index(q, &mine) as usize;
                    let key = KeySource {
                        buffer: holding.clone(),
                        offset: chunk_index(k, &src_chunks) * kv_block,
                    };
                    let wait = if i == 0 {
                        arrived.iter().cloned().collect()
                    } else {
                        Vec::new()
                    };
                    let record = (i + 1 == n).then(|| done.clone());
                    run_pair(
                        b,
                        &mut started,
                        qi,
                        (&query_buffer(ctx), qi as u64),
                        *q,
                        *k,
                        *mask,
                        &key,
                        (&format!("stats{qi}"), 0),
                        wait,
                        record,
                    );
                    if i + 1 == n {
                        computed_prev = Some(done.clone());
                    }
                }
                arrived = next_arrival;
            }
        }
        SchemeKind::TokenRing => {
            // Step s: send our queries to rank r+s and compute rank r-s's queries against
            // our keys; partial statistics go back to their owner and merge there.
            let (q_elems_per_chunk, q_dtype) = query_block(ctx, c_len);
            // Pairs rank `owner`'s queries need from rank `holder`'s keys.
            let mut pairs_between =
                |owner: u64,
                 holder: u64|
                 -> Result<Vec<(TokenRange, TokenRange, PairMask)>, SpError> {
                    let held = ctx.chunks(holder);
                    Ok(schemes::device_pairs(analyzer, p, ctx.zigzag, owner)?
                        .into_iter()
                        .filter(|(_, k, _)| held.contains(k))
                        .collect())
                };
            // Local pairs.
            for (q, k, mask) in pairs_between(r, r)? {
                let qi = chunk_index(&q, &mine) as usize;
                let key = KeySource {
                    buffer: "kv".to_string(),
                    offset: chunk_index(&k, &mine) * kv_block,
                };
                run_pair(
                    b,
                    &mut started,
                    qi,
                    (&query_buffer(ctx), qi as u64),
                    q,
                    k,
                    mask,
                    &key,
                    (&format!("stats{qi}"), 0),
                    Vec::new(),
                    None,
                );
            }
            let q_total = q_elems_per_chunk * pieces_per_rank;
            let mut q_arrivals = Vec::new();
            // Queries out: all steps up front on the comm stream.
            for s in 1..p {
                let dst = (r + s) % p;
                let src = (r + p - s) % p;
                let send_needed = !pairs_between(r, dst)?.is_empty();
                let recv_needed = !pairs_between(src, r)?.is_empty();
                let recv_buf = format!("q_from{s}");
                if recv_needed {
                    b.buffer(&recv_buf, &q_dtype, q_total, BufferInit::Uninit);
                }
                if !send_needed && !recv_needed {
                    q_arrivals.push(None);
                    continue;
                }
                let ev = b.event();
                b.steps.push(Step::SendRecv {
                    send: send_needed.then(|| PeerRegion {
                        peer: dst,
                        region: region(&query_buffer(ctx), 0, q_total),
                    }),
                    recv: recv_needed.then(|| PeerRegion {
                        peer: src,
                        region: region(&recv_buf, 0, q_total),
                    }),
                    dtype: q_dtype.clone(),
                    exec: RankBuilder::exec(COMM, Vec::new(), Some(ev.clone())),
                });
                q_arrivals.push(recv_needed.then_some(ev));
            }
            for s in 1..p {
                let dst = (r + s) % p;
                let src = (r + p - s) % p;
                // Compute src's queries against our keys.
                let theirs = pairs_between(src, r)?;
                let src_chunks = ctx.chunks(src);
                let result_buf = format!("stats_for{s}");
                let mut computed = None;
                if !theirs.is_empty() {
                    b.buffer(
                        &result_buf,
                        "f32",
                        stats_elems * pieces_per_rank,
                        BufferInit::Uninit,
                    );
                    let mut their_started = vec![false; src_chunks.len()];
                    let done = b.event();
                    let n = theirs.len();
                    for (i, (q, k, mask)) in theirs.into_iter().enumerate() {
                        let qi = chunk_index(&q, &src_chunks) as usize;
                        let key = KeySource {
                            buffer: "kv".to_string(),
                            offset: chunk_index(&k, &mine) * kv_block,
                        };
                        let wait = if i == 0 {
                            q_arrivals[(s - 1) as usize].iter().cloned().collect()
                        } else {
                            Vec::new()
                        };
                        let record = (i + 1 == n).then(|| done.clone());
                        run_pair(
                            b,
                            &mut their_started,
                            qi,
                            (&format!("q_from{s}"), qi as u64),
                            q,
                            k,
                            mask,
                            &key,
                            (&result_buf, qi as u64 * stats_elems),
                            wait,
                            record,
                        );
                    }
                    computed = Some(done);
                    // A query chunk of src that none of our keys reach keeps no result:
                    // the owner does not expect one (the pair lists agree on both sides).
                }
                // Results back: ours to src, theirs (our queries) from dst.
                let ours_from_dst = pairs_between(r, dst)?;
                let recv_buf = format!("stats_from{s}");
                if !ours_from_dst.is_empty() {
                    b.buffer(
                        &recv_buf,
                        "f32",
                        stats_elems * pieces_per_rank,
                        BufferInit::Uninit,
                    );
                }
                if computed.is_none() && ours_from_dst.is_empty() {
                    continue;
                }
                let back = b.event();
                b.steps.push(Step::SendRecv {
                    send: computed.as_ref().map(|_| PeerRegion {
                        peer: src,
                        region: region(&result_buf, 0, stats_elems * pieces_per_rank),
                    }),
                    recv: (!ours_from_dst.is_empty()).then(|| PeerRegion {
                        peer: dst,
                        region: region(&recv_buf, 0, stats_elems * pieces_per_rank),
                    }),
                    dtype: "f32".to_string(),
                    exec: RankBuilder::exec(
                        COMM,
                        computed.iter().cloned().collect(),
                        Some(back.clone()),
                    ),
                });
                // Merge what came back, per query chunk that dst's keys reached.
                let mut merged_chunks: Vec<u64> = ours_from_dst
                    .iter()
                    .map(|(q, _, _)| chunk_index(q, &mine))
                    .collect();
                merged_chunks.sort();
                merged_chunks.dedup();
                for (i, qi) in merged_chunks.into_iter().enumerate() {
                    let wait = if i == 0 {
                        vec![back.clone()]
                    } else {
                        Vec::new()
                    };
                    if !started[qi as usize] {
                        // Every query chunk sees its own diagonal block under the masks
                        // TokenRing is planned for; an accumulator with nothing local
                        // would need an identity-initialized buffer.
                        return Err(PlanError::Unsupported(
                            "a query chunk with no local keys under TokenRing".to_string(),
                        ));
                    }
                    b.steps.push(Step::LseMerge {
                        into: region(&format!("stats{qi}"), 0, stats_elems),
                        from: region(&recv_buf, qi * stats_elems, stats_elems),
                        stats: merge_stats.clone(),
                        exec: RankBuilder::exec(COMPUTE, wait, None),
                    });
                }
            }
        }
        _ => unreachable_kind(kind)?,
    }
    for (qi, q) in mine.iter().enumerate() {
        if !started[qi] {
            return Err(PlanError::Unsupported(format!(
                "queries [{}, {}) see no key at all",
                q.start,
                q.end()
            )));
        }
        let exec = RankBuilder::exec(COMPUTE, Vec::new(), None);
        b.steps
            .push(kernels.epilogue(*q, qi as u64, (&format!("stats{qi}"), 0), exec));
    }
    Ok(())
}
