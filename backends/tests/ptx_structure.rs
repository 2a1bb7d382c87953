//! Structure of the printed PTX: the instructions each lowering promises, the ABI order,
//! and typed errors for what the printer does not support.

use einattn_backends::family::softmax::{flash_attention, AttentionSchedule, AttentionSpec};
use einattn_backends::tile::{Elem, TileError};
use einattn_backends::{print_ptx, Target};

fn ptx_for(spec: &AttentionSpec) -> einattn_backends::PtxKernel {
    let sched = AttentionSchedule::default_for(spec);
    let (prog, _) = flash_attention(spec, &sched).expect("builds");
    print_ptx(&prog, Target::Sm80).expect("prints")
}

fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

#[test]
fn d128_bf16_has_the_promised_instructions() {
    let spec = AttentionSpec::new(128, Elem::Bf16);
    let k = ptx_for(&spec);
    let t = &k.text;
    assert!(t.contains(".version 8.7"));
    assert!(t.contains(".target sm_80"));
    // Per key tile: S = Q K^T is (d/16) k-steps x (bn/8) n-tiles x m-tiles MMAs, and
    // O += P V is (bn/16) x (d/8) x m-tiles; with bm=128, 4 warps (2 m-tiles), bn=64, d=128:
    // 8*8*2 + 4*16*2 = 256.
    let sched = AttentionSchedule::default_for(&spec);
    let mt = sched.block_m / sched.warps / 16;
    let expect = (128 / 16) * (sched.block_n / 8) * mt + (sched.block_n / 16) * (128 / 8) * mt;
    assert_eq!(
        count(t, "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") as u32,
        expect
    );
    assert!(
        count(t, "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16") > 0,
        "V via ldmatrix.trans"
    );
    assert!(count(t, "cp.async.cg.shared.global") > 0);
    assert!(t.contains("cp.async.wait_group 0;"));
    assert!(count(t, "ex2.approx.ftz.f32") > 0);
    assert!(count(t, "shfl.sync.bfly.b32") > 0);
    assert!(t.contains("cvt.rn.bf16x2.f32"));
    // Boundary tiles only pay for the mask.
    assert!(t.contains("@!%needmask bra.uni"));
    assert!(!t.contains(".local"), "no local memory in generated code");
}

#[test]
fn f16_uses_f16_mma_and_conversions() {
    let t = ptx_for(&AttentionSpec::new(64, Elem::F16)).text;
    assert!(t.contains("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"));
    assert!(t.contains("cvt.rn.f16x2.f32"));
    assert!(!t.contains("bf16"));
}

#[test]
fn masks_reverse_the_grid_and_skip_tiles() {
    let mut spec = AttentionSpec::new(128, Elem::Bf16);
    let plain = ptx_for(&spec).text;
    assert!(!plain.contains("%nctaid.x"));
    spec.causal = true;
    spec.window = Some(256);
    let t = ptx_for(&spec).text;
    assert!(t.contains("%nctaid.x"), "heaviest query tiles first");
    // Key range clipped by both bands: min for causal, max for the window.
    assert!(t.contains("min.s32 %kend"));
    assert!(t.contains("max.s32 %kstart"));
}

#[test]
fn score_modifiers_lower_to_sfu_and_head_loads() {
    let mut spec = AttentionSpec::new(64, Elem::Bf16);
    spec.score = spec.score.with_softcap().with_alibi();
    spec.write_lse = true;
    let k = ptx_for(&spec);
    assert!(k.text.contains("tanh.approx.f32"));
    assert!(k.text.contains("ld.global.nc.f32 %hp0"));
    assert!(k.text.contains("lg2.approx.ftz.f32"));
    assert!(k.text.contains("st.global.f32"));
}

#[test]
fn alibis_column_term_is_one_fma_per_column_from_the_tiles_base() {
    // ALiBi's kept logit is `c0 * s + c1 * m`: per key tile one base `c1 * kf`, then per
    // column the thread holds one FMA with the column's offset, not the key's position
    // and a product (wgmma kernels; mma.sync ones at 255 registers keep the two ops).
    let mut spec = AttentionSpec::new(128, Elem::Bf16);
    spec.score = spec.score.with_alibi();
    spec.causal = true;
    let sched = AttentionSchedule {
        mma: einattn_backends::tile::MmaUnit::Warpgroup,
        warps: 8,
        block_n: 128,
        ..AttentionSchedule::default_for(&spec)
    };
    let (prog, _) = flash_attention(&spec, &sched).expect("builds");
    let k = print_ptx(&prog, Target::Sm90a).expect("prints");
    let body = &k.text[k.text.find("$L_ktop").expect("a key loop")..];
    assert_eq!(count(body, ", %kf;"), 1, "one base per key tile");
    assert_eq!(count(body, "%kf, 0f"), 0, "no key position per column");
    let columns = sched.block_n / 8 * 2;
    let fmas = body
        .lines()
        .filter(|l| l.contains("fma.rn.f32") && l.contains(", 0f") && !l.contains("%kf"))
        .count() as u32;
    // (Each m-tile of a warp's rows computes its columns again: the values are not kept
    // across m-tiles, where they would hold a register per column.)
    let mtiles = sched.block_m / sched.warps / 16;
    assert_eq!(fmas, mtiles * (columns - 1), "{}", k.entry);
}

#[test]
fn entry_parameters_follow_the_abi() {
    let mut spec = AttentionSpec::new(128, Elem::Bf16);
    spec.score = spec.score.with_alibi();
    spec.write_lse = true;
    let k = ptx_for(&spec);
    let start = k.text.find(".visible .entry").expect("entry");
    let params: Vec<&str> = k.text[start..]
        .lines()
        .skip(1)
        .take_while(|l| l.trim_start().starts_with(".param"))
        .map(|l| {
            l.trim()
                .trim_end_matches(',')
                .rsplit(' ')
                .next()
                .unwrap_or("")
        })
        .collect();
    let abi: Vec<&str> = k.abi.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(params, abi);
    assert_eq!(
        &abi[..7],
        &["q", "k", "v", "o", "lse", "alibi_slopes", "n_q"]
    );
    assert_eq!(abi.last().copied(), Some("scale"));
}

#[test]
fn launch_shape_matches_the_schedule() {
    let spec = AttentionSpec::new(128, Elem::Bf16);
    let k = ptx_for(&spec);
    let sched = AttentionSchedule::default_for(&spec);
    assert_eq!(k.threads, sched.warps * 32);
    assert_eq!(
        k.grid(2, 16, 1000),
        (1000u32.div_ceil(sched.block_m), 32, 1)
    );
    // Q once, K and V once per stage.
    assert_eq!(
        k.dynamic_smem_bytes,
        (sched.block_m + 2 * sched.stages * sched.block_n) * 128 * 2
    );
}

#[test]
fn unsupported_and_invalid_inputs_are_typed_errors() {
    let spec = AttentionSpec::new(128, Elem::Bf16);
    let mut bad = AttentionSchedule::default_for(&spec);
    bad.block_m = 40;
    assert!(matches!(
        flash_attention(&spec, &bad),
        Err(TileError::Invalid(_))
    ));
    let mut bad = AttentionSchedule::default_for(&spec);
    bad.stages = 1;
    assert!(matches!(
        flash_attention(&spec, &bad),
        Err(TileError::Invalid(_))
    ));
    // The interpreter accepts d=32, the printer's swizzle needs >= 64 columns.
    let small = AttentionSpec::new(32, Elem::Bf16);
    let (prog, _) =
        flash_attention(&small, &AttentionSchedule::default_for(&small)).expect("valid program");
    assert!(matches!(
        print_ptx(&prog, Target::Sm80),
        Err(TileError::Unsupported(_))
    ));
    assert!(matches!(
        flash_attention(&AttentionSpec::new(128, Elem::F32), &bad),
        Err(TileError::Unsupported(_))
    ));
}

#[test]
fn a_warp_specialized_program_hands_every_stage_back() {
    use einattn_backends::tile::{Loads, MmaUnit};
    for (pingpong, causal) in [(false, false), (true, true)] {
        let mut spec = AttentionSpec::new(128, Elem::Bf16);
        spec.causal = causal;
        let sched = AttentionSchedule {
            block_m: 128,
            block_n: 128,
            warps: 8,
            stages: 2,
            mma: MmaUnit::Warpgroup,
            loads: Loads::ProducerWarpgroup {
                pingpong,
                tma: false,
            },
            ..AttentionSchedule::default_for(&spec)
        };
        let (prog, _) = flash_attention(&spec, &sched).expect("builds");
        let k = print_ptx(&prog, Target::Sm90a).expect("prints");
        let t = &k.text;
        // Barriers: Q's, then a full and an empty barrier per stage for K and for V.
        assert_eq!(count(t, "mbarrier.init.shared::cta.b64"), 1 + 2 * 2 * 2);
        // The producer hands each tile's arrival to the copy unit: Q, K and V.
        assert_eq!(count(t, "cp.async.mbarrier.arrive.noinc"), 3);
        // The first key tile is peeled: Q K^T is printed for it and for the loop; P V in
        // the loop (the previous tile's, deferred) and after it for the last tile. No
        // branch chooses between a P V and an empty group.
        assert_eq!(count(t, "contract acc += . v_s"), 2);
        assert_eq!(count(t, "contract s += . k_s"), 2);
        assert!(!t.contains("$L_nodeferred"));
        assert_eq!(
            count(t, "$L_nokeys"),
            2,
            "one branch around the keys, one label"
        );
        // The consumers hand K back in the peeled tile and in the loop, V of the previous
        // tile in the loop and of the last after it: every stage they waited for.
        assert_eq!(count(t, "mbarrier.arrive.shared::cta.b64 _"), 4);
        // Ping-pong: the last warpgroup opens the first turn and skips its final arrive.
        assert_eq!(count(t, "bar.arrive 1, 256"), usize::from(pingpong));
        assert_eq!(count(t, "@!%last_wg bar.arrive"), usize::from(pingpong));
        // Persistent: Q gets an `empty` barrier, which each consumer warp arrives on once
        // per work tile; both roles loop over the work tiles, Q's phase flipping per tile.
        let persistent = AttentionSchedule {
            persistent: Some(132),
            ..sched
        };
        let (prog, _) = flash_attention(&spec, &persistent).expect("builds");
        let k = print_ptx(&prog, Target::Sm90a).expect("prints");
        let p = &k.text;
        assert_eq!(count(p, "mbarrier.init.shared::cta.b64"), 1 + 2 * 2 * 2 + 1);
        assert_eq!(count(p, "mbarrier.arrive.shared::cta.b64 _"), 4 + 1);
        assert_eq!(count(p, "cp.async.mbarrier.arrive.noinc"), 3);
        assert_eq!(count(p, "xor.b32 %ws_tphase, %ws_tphase, 1;"), 2);
        // Each role leaves its loop when its next work tile is past the last.
        assert_eq!(count(p, "%ntiles;\n\t@%p"), 2);
        assert!(p.contains("$L_work_end") && p.contains("$L_pwork_end"));
        assert!(p.contains(".param .u32 batch"));
        assert_eq!(k.grid(2, 16, 4096), (132, 1, 1));
        assert_eq!(k.grid(1, 2, 1000), (16, 1, 1));
        // A cooperative form of the same shape has none of it.
        let coop = AttentionSchedule {
            loads: Loads::Cooperative,
            ..sched
        };
        let (prog, _) = flash_attention(&spec, &coop).expect("builds");
        let k = print_ptx(&prog, Target::Sm90a).expect("prints");
        assert_eq!(count(&k.text, "mbarrier"), 0);
        assert_eq!(k.threads, 256);
    }
}

/// 128 query rows in two consumer warpgroups (wgmma) beside a producer that copies
/// `block_n`-key tiles with the copy engine, two stages, no ping-pong.
fn copy_engine_schedule(spec: &AttentionSpec, block_n: u32) -> AttentionSchedule {
    use einattn_backends::tile::{Loads, MmaUnit};
    AttentionSchedule {
        block_m: 128,
        block_n,
        warps: 8,
        stages: 2,
        mma: MmaUnit::Warpgroup,
        loads: Loads::ProducerWarpgroup {
            pingpong: false,
            tma: true,
        },
        ..AttentionSchedule::default_for(spec)
    }
}

#[test]
fn the_copy_engine_loads_each_tile_from_one_thread_through_its_tensor_map() {
    use einattn_backends::tile::{AbiKind, AbiRole, SeqRank};
    for (d, causal) in [(128u32, false), (64, true)] {
        let mut spec = AttentionSpec::new(d, Elem::Bf16);
        spec.causal = causal;
        let sched = copy_engine_schedule(&spec, 128);
        let (prog, _) = flash_attention(&spec, &sched).expect("builds");
        // One by-value map per loaded tensor (Q, K, V), boxes of a tile's rows and 64
        // columns, K and V along the key rank; the output is stored, not mapped.
        let maps: Vec<_> = prog
            .abi()
            .into_iter()
            .filter(|p| p.kind == AbiKind::TensorMap)
            .collect();
        assert_eq!(maps.len(), 3);
        for (p, rank) in maps
            .iter()
            .zip([SeqRank::Query, SeqRank::Key, SeqRank::Key])
        {
            match &p.role {
                AbiRole::TensorMap {
                    rows,
                    cols,
                    rank: r,
                    ..
                } => {
                    assert_eq!((*rows, *cols, *r), (128, 64, rank), "{}", p.name);
                }
                other => panic!("{}: {other:?}", p.name),
            }
        }
        let k = print_ptx(&prog, Target::Sm90a).expect("prints");
        let t = &k.text;
        assert_eq!(count(t, ".param .align 64 .b8"), 3);
        // Full barriers count one arrival (the issuing thread's, with the bytes to expect).
        assert_eq!(count(t, "mbarrier.init.shared::cta.b64"), 1 + 2 * 2 * 2);
        assert_eq!(count(t, "mbarrier.arrive.expect_tx"), 3);
        // One copy per 64-column block: Q before the loop, K and V in it.
        let blocks = (d / 64) as usize;
        assert_eq!(count(t, "cp.async.bulk.tensor.4d"), 3 * blocks);
        // K and V are addressed by their K/V head, Q by its query head.
        assert_eq!(count(t, "%hkidx, %bidx}"), 2 * blocks);
        assert_eq!(count(t, "%hidx, %bidx}"), blocks);
        // The copy engine writes through the async proxy: no fence after the waits, no
        // cp.async anywhere.
        assert_eq!(count(t, "fence.proxy.async"), 0);
        assert_eq!(count(t, "cp.async.cg"), 0);
        assert_eq!(count(t, "cp.async.mbarrier"), 0);
    }
}

#[test]
fn a_producer_warpgroup_needs_wgmma_and_two_consumer_warpgroups() {
    use einattn_backends::tile::{Loads, MmaUnit};
    let spec = AttentionSpec::new(64, Elem::Bf16);
    let sched = AttentionSchedule {
        mma: MmaUnit::Sync,
        loads: Loads::ProducerWarpgroup {
            pingpong: false,
            tma: true,
        },
        ..AttentionSchedule::default_for(&spec)
    };
    match flash_attention(&spec, &sched) {
        Err(TileError::Invalid(m)) => assert!(m.contains("wgmma"), "{m}"),
        other => panic!("expected a validation error, got {other:?}"),
    }
    // ... and two consumer warpgroups: one would hold every register before the split.
    let one_group = AttentionSchedule {
        block_m: 64,
        warps: 4,
        mma: MmaUnit::Warpgroup,
        ..sched
    };
    match flash_attention(&spec, &one_group) {
        Err(TileError::Invalid(m)) => assert!(m.contains("two or more"), "{m}"),
        other => panic!("expected a validation error, got {other:?}"),
    }
}

#[test]
fn p_v_is_deferred_only_when_moving_it_is_invisible() {
    use einattn_backends::tile::{ex, Stmt};
    let spec = AttentionSpec::new(64, Elem::Bf16);
    let sched = copy_engine_schedule(&spec, 64);
    let (prog, _) = flash_attention(&spec, &sched).expect("builds");
    let deferred = "trailing contraction deferred to the next iteration";
    let k = print_ptx(&prog, Target::Sm90a).expect("prints");
    assert!(k.text.contains(deferred));
    // A statement ahead of the key tile's first contraction that touches the output
    // accumulator would run before a deferred P V of the previous tile: no deferral then.
    let mut touched = prog.clone();
    let acc = touched
        .regs
        .iter()
        .position(|r| r.name == "acc")
        .map(|i| einattn_backends::tile::RegId(i as u32))
        .expect("the program has an output accumulator");
    for s in &mut touched.body {
        if let Stmt::KeyLoop { body, .. } = s {
            let first_contract = body
                .iter()
                .position(|s| matches!(s, Stmt::Contract { .. }))
                .expect("the loop contracts");
            body.insert(
                first_contract,
                Stmt::Map {
                    dst: acc,
                    expr: ex::mul(ex::elem(acc), ex::lit(2.0)),
                },
            );
        }
    }
    let k = print_ptx(&touched, Target::Sm90a).expect("prints");
    assert!(k.text.contains("no deferred contraction"), "{}", k.entry);
    assert!(!k.text.contains(deferred));
    assert_eq!(count(&k.text, "contract acc += . v_s"), 1);
}

#[test]
fn shared_a_operands_have_their_descriptors_computed_once_before_the_key_loop() {
    // Q's tile and the probabilities' (with `p_in_shared`) sit at one address for the whole
    // kernel: each warpgroup's descriptor of its 64 rows is computed once, with the
    // warpgroup index broadcast from lane 0 (uniform for ptxas), before the key loop; a
    // persistent program recomputes it at the top of each work tile, still outside the loop.
    let mut spec = AttentionSpec::new(64, Elem::Bf16);
    spec.causal = true;
    for (p_in_shared, persistent) in [(false, None), (true, None), (true, Some(132))] {
        let sched = AttentionSchedule {
            p_in_shared,
            persistent,
            ..copy_engine_schedule(&spec, 128)
        };
        let (prog, _) = flash_attention(&spec, &sched).expect("builds");
        let k = print_ptx(&prog, Target::Sm90a).expect("prints");
        let t = &k.text;
        let setup_end = t.find("// end of setup").expect("a setup");
        let loop_top = t.find("$L_ktop").expect("a key loop");
        // One descriptor base per shared A operand (q_s is tile 0, p_s tile 3), each 64
        // rows of 128 bytes further per warpgroup.
        for (tile, used) in [(0, true), (3, p_in_shared)] {
            let needle = format!("8192, %sbase{tile};");
            assert_eq!(count(t, &needle), used as usize, "{}: {needle}", k.entry);
            if used {
                let at = t.find(&needle).unwrap();
                let hoisted = if persistent.is_some() {
                    at < loop_top && !t[at..loop_top].contains("$L_ktop")
                } else {
                    at < setup_end
                };
                assert!(
                    hoisted,
                    "{}: the descriptor of tile {tile} is computed in the loop",
                    k.entry
                );
            }
        }
        assert_eq!(
            count(t, "shfl.sync.idx.b32"),
            // The role test's, and one per hoisted descriptor.
            1 + 1 + p_in_shared as usize,
            "{}",
            k.entry
        );
    }
}
