//! ptxas accepts the generated PTX for sm_80 and sm_90a, and default schedules do not
//! spill to local memory. Skipped (with a message) where ptxas is not installed.

use einattn_backends::family::softmax::{flash_attention, AttentionSchedule, AttentionSpec};
use einattn_backends::ptx::ptxas::{assemble, ptxas_for_test};
use einattn_backends::tile::Elem;
use einattn_backends::tile::Loads;
use einattn_backends::tile::MmaUnit;
use einattn_backends::{print_ptx, Target};

fn specs() -> Vec<AttentionSpec> {
    let mut v = Vec::new();
    for d in [64u32, 128] {
        for elem in [Elem::Bf16, Elem::F16] {
            for variant in 0..5 {
                let mut s = AttentionSpec::new(d, elem);
                match variant {
                    0 => {}
                    1 => s.causal = true,
                    2 => {
                        s.causal = true;
                        s.window = Some(256);
                    }
                    3 => {
                        s.score = s.score.with_alibi();
                        s.write_lse = true;
                    }
                    _ => {
                        s.score = s.score.with_softcap().with_alibi();
                        s.causal = true;
                        s.window = Some(100);
                        s.write_lse = true;
                    }
                }
                v.push(s);
            }
        }
    }
    v
}

#[test]
fn ptxas_accepts_default_schedules_without_spills() {
    let Some(ptxas) = ptxas_for_test("ptxas_accepts_default_schedules_without_spills") else {
        return;
    };
    for spec in specs() {
        let sched = AttentionSchedule::default_for(&spec);
        let (prog, _) = flash_attention(&spec, &sched).expect("builds");
        for (target, arch) in [(Target::Sm80, "sm_80"), (Target::Sm90a, "sm_90a")] {
            let k = print_ptx(&prog, target).expect("prints");
            let r = assemble(&ptxas, &k.text, arch).unwrap_or_else(|e| panic!("{}: {e}", k.entry));
            eprintln!(
                "{} {arch}: {} registers, {} B stack",
                k.entry, r.registers, r.stack_frame
            );
            assert!(
                r.registers > 0,
                "no register report for {}:\n{}",
                k.entry,
                r.log
            );
            assert!(!r.spills(), "{} spills on {arch}:\n{}", k.entry, r.log);
        }
    }
}

#[test]
fn ptxas_accepts_other_schedules() {
    let Some(ptxas) = ptxas_for_test("ptxas_accepts_other_schedules") else {
        return;
    };
    // Knob combinations the scheduler may pick: they must assemble (spills allowed).
    let spec = AttentionSpec::new(128, Elem::Bf16);
    for (bm, bn, warps, stages, qreg) in [
        (128, 64, 8, 2, true),
        (64, 64, 4, 3, true),
        (128, 32, 4, 2, false),
        (256, 32, 8, 2, false),
    ] {
        let sched = AttentionSchedule {
            block_m: bm,
            block_n: bn,
            warps,
            stages,
            q_in_registers: qreg,
            skip_unit_rescale: false,
            lazy_rescale: false,
            store_tma: false,
            p_in_shared: false,
            pin_deferred_wait: false,
            persistent: None,
            mma: MmaUnit::Sync,
            loads: Loads::Cooperative,
        };
        let (prog, _) = flash_attention(&spec, &sched).expect("builds");
        let k = print_ptx(&prog, Target::Sm90a).expect("prints");
        assemble(&ptxas, &k.text, "sm_90a").unwrap_or_else(|e| panic!("{sched:?}: {e}"));
    }
    // Probabilities through shared memory with mma.sync (the sm_80 form): each warp writes
    // its rows, meets its own lanes, and reads them back by ldmatrix; no CTA barrier.
    for spec in specs() {
        let sched = AttentionSchedule {
            p_in_shared: true,
            ..AttentionSchedule::default_for(&spec)
        };
        let (prog, _) = flash_attention(&spec, &sched).expect("builds");
        let k = print_ptx(&prog, Target::Sm80).expect("prints");
        assert!(k.text.contains("bar.warp.sync -1;"), "{}", k.entry);
        assert!(!k.text.contains("stmatrix"), "{}", k.entry);
        let r = assemble(&ptxas, &k.text, "sm_80").unwrap_or_else(|e| panic!("{}: {e}", k.entry));
        eprintln!(
            "{} P in shared, sm_80: {} B spilled",
            k.entry, r.spill_stores
        );
    }
    // A sequence slice at a query offset (sequence parallelism), causal with a window.
    let mut sliced = AttentionSpec::new(128, Elem::Bf16);
    sliced.causal = true;
    sliced.window = Some(512);
    sliced.query_offset = true;
    let sched = AttentionSchedule::default_for(&sliced);
    let (prog, _) = flash_attention(&sliced, &sched).expect("builds");
    for (target, arch) in [(Target::Sm80, "sm_80"), (Target::Sm90a, "sm_90a")] {
        let k = print_ptx(&prog, target).expect("prints");
        assert!(k.abi.iter().any(|p| p.name == "q_offset"));
        let r = assemble(&ptxas, &k.text, arch).unwrap_or_else(|e| panic!("{}: {e}", k.entry));
        assert!(!r.spills(), "{} spills on {arch}:\n{}", k.entry, r.log);
    }
}

#[test]
fn wgmma_forward_assembles_without_spills() {
    let Some(ptxas) = ptxas_for_test("wgmma_forward_assembles_without_spills") else {
        return;
    };
    // Every variant of `specs` under the warpgroup shapes the scheduler weighs: one and two
    // warpgroups, key tiles of 64 and 128.
    for spec in specs() {
        for (bm, bn, warps, stages) in [(64, 64, 4, 3), (64, 128, 4, 2), (128, 128, 8, 2)] {
            let sched = AttentionSchedule {
                block_m: bm,
                block_n: bn,
                warps,
                stages,
                mma: MmaUnit::Warpgroup,
                loads: Loads::Cooperative,
                ..AttentionSchedule::default_for(&spec)
            };
            let (prog, _) = flash_attention(&spec, &sched).expect("builds");
            assert!(
                print_ptx(&prog, Target::Sm80).is_err(),
                "wgmma needs sm_90a"
            );
            let k = print_ptx(&prog, Target::Sm90a).expect("prints");
            assert!(k.text.contains("wgmma.mma_async"), "{}", k.entry);
            assert!(!k.text.contains("mma.sync"), "{}", k.entry);
            let r = assemble(&ptxas, &k.text, "sm_90a")
                .unwrap_or_else(|e| panic!("{} {sched:?}: {e}", k.entry));
            assert!(!r.spills(), "{} {sched:?} spills:\n{}", k.entry, r.log);
        }
    }
}

#[test]
fn warp_specialized_forward_assembles_without_spills_or_serialized_wgmma() {
    let Some(ptxas) =
        ptxas_for_test("warp_specialized_forward_assembles_without_spills_or_serialized_wgmma")
    else {
        return;
    };
    // The producer shapes the scheduler weighs: two and three consumer warpgroups, with and
    // without ping-pong, every variant of `specs`. Each must assemble without spills, and
    // without ptxas serializing the consumers' wgmma (info C7520, which a role test that
    // ptxas reads as divergent causes: 20% slower on an H200).
    for spec in specs() {
        for ((bm, bn, warps, stages, pingpong), tma, persistent, store_tma, p_in_shared) in [
            (128, 128, 8, 2, true),
            (128, 128, 8, 3, false),
            (128, 64, 8, 2, true),
            (192, 64, 12, 3, false),
        ]
        .into_iter()
        .flat_map(|shape| {
            [
                (shape, false, None, false, false),
                (shape, true, None, false, false),
                (shape, true, None, true, false),
                (shape, true, Some(132), false, false),
                // P through shared memory, with the store and with a persistent grid.
                (shape, true, None, true, true),
                (shape, false, Some(132), false, true),
            ]
        }) {
            if spec.head_dim == 64 && bm == 192 {
                continue;
            }
            let sched = AttentionSchedule {
                block_m: bm,
                block_n: bn,
                warps,
                stages,
                mma: MmaUnit::Warpgroup,
                loads: Loads::ProducerWarpgroup { pingpong, tma },
                persistent,
                // Lazy rescaling rides along with the persistent variant (its threshold
                // test and vote are a few more row registers).
                lazy_rescale: persistent.is_some(),
                skip_unit_rescale: persistent.is_some()
                    || AttentionSchedule::default_for(&spec).skip_unit_rescale,
                store_tma,
                p_in_shared,
                // The pinned wait rides along with P through shared memory.
                pin_deferred_wait: p_in_shared,
                ..AttentionSchedule::default_for(&spec)
            };
            let prog = match flash_attention(&spec, &sched) {
                Ok((prog, _)) => prog,
                // P's tile beside three stages of 128-key tiles at d = 128.
                Err(e) if p_in_shared && e.to_string().contains("shared memory") => continue,
                Err(e) => panic!("{sched:?}: {e}"),
            };
            let k = print_ptx(&prog, Target::Sm90a).expect("prints");
            assert_eq!(k.threads, warps * 32 + 128, "{}", k.entry);
            // P leaves the registers by stmatrix, reaches the async proxy, and its
            // warpgroup meets before the deferred P V reads it by descriptor; no CTA-wide
            // barrier inside the consumers' loop either way.
            for needle in ["stmatrix.sync.aligned.m8n8.x4.shared.b16", "p_s = round(s)"] {
                assert_eq!(k.text.contains(needle), p_in_shared, "{} {needle}", k.entry);
            }
            assert_eq!(k.text.matches("bar.sync 0;").count(), 1, "{}", k.entry);
            assert_eq!(
                k.text.matches("fence.acq_rel.cta;").count(),
                p_in_shared as usize,
                "{}",
                k.entry
            );
            // A persistent kernel loops over its work tiles in both roles, Q's barriers
            // phased by the work tile and handed back by the consumers.
            for needle in ["%ntiles", "%ws_tphase", "done with q_s for this work tile"] {
                assert_eq!(
                    k.text.contains(needle),
                    persistent.is_some(),
                    "{} {needle}",
                    k.entry
                );
            }
            assert_eq!(k.persistent_ctas, persistent, "{}", k.entry);
            // Work tiles of unequal length (band masks): rounds alternate direction.
            assert_eq!(
                k.text.contains("odd rounds run the other way"),
                persistent.is_some() && !spec.masks().is_empty(),
                "{}",
                k.entry
            );
            // The producer copies with the copy engine, or with cp.async, never both.
            assert_eq!(k.text.contains("cp.async.bulk.tensor"), tma, "{}", k.entry);
            // The output leaves by the copy engine (a map of its own, boxes of 64 rows, the
            // copies read before the CTA exits) or from registers.
            assert_eq!(
                k.text
                    .contains(".global.shared::cta.tile.bulk_group [%tmap"),
                store_tma,
                "{}",
                k.entry
            );
            assert_eq!(
                k.text.contains("cp.async.bulk.wait_group.read 0;"),
                store_tma,
                "{}",
                k.entry
            );
            assert_eq!(k.text.contains("o_tmap"), store_tma, "{}", k.entry);
            assert_eq!(
                k.text.contains("st.global"),
                !store_tma || spec.write_lse,
                "{}",
                k.entry
            );
            assert_eq!(k.text.contains("cp.async.cg"), !tma, "{}", k.entry);
            for needle in [
                "setmaxnreg.inc",
                "setmaxnreg.dec",
                "mbarrier.try_wait.parity",
            ] {
                assert!(k.text.contains(needle), "{} lacks {needle}", k.entry);
            }
            assert_eq!(
                k.text.contains("bar.sync %turn_mine"),
                pingpong,
                "{}",
                k.entry
            );
            let r = assemble(&ptxas, &k.text, "sm_90a")
                .unwrap_or_else(|e| panic!("{} {sched:?}: {e}", k.entry));
            assert!(!r.spills(), "{} {sched:?} spills:\n{}", k.entry, r.log);
            assert!(
                !r.log.contains("C7520"),
                "{} {sched:?}:\n{}",
                k.entry,
                r.log
            );
            assert!(
                !r.log.contains("C7508"),
                "{} {sched:?}:\n{}",
                k.entry,
                r.log
            );
        }
    }
}

#[test]
fn wide_key_tiles_the_register_model_admits_assemble_without_spills() {
    let Some(ptxas) =
        ptxas_for_test("wide_key_tiles_the_register_model_admits_assemble_without_spills")
    else {
        return;
    };
    use einattn_backends::family::softmax::schedule::{fits_registers, shape_is_legal};
    // Key tiles past 128 (FlashAttention-3 takes 176 at d = 128): the model must not admit
    // a shape ptxas spills, for any variant of `specs`, two or three consumer warpgroups
    // fed by the copy engine, or eight warps copying their own tiles.
    let mut admitted = Vec::new();
    let mut failed = Vec::new();
    for spec in specs() {
        let producer = Loads::ProducerWarpgroup {
            pingpong: spec.head_dim >= 128,
            tma: true,
        };
        for (bm, warps, loads) in [
            (128u32, 8u32, producer),
            (192, 12, producer),
            (128, 8, Loads::Cooperative),
        ] {
            let widths = [96u32, 112, 128, 144, 160, 176, 192, 208, 224, 256];
            // Probabilities through shared memory take whole 64-column blocks.
            for (bn, p_in_shared) in
                widths
                    .iter()
                    .map(|&bn| (bn, false))
                    .chain([(128, true), (192, true), (256, true)])
            {
                let sched = AttentionSchedule {
                    block_m: bm,
                    block_n: bn,
                    warps,
                    stages: 2,
                    mma: MmaUnit::Warpgroup,
                    loads,
                    p_in_shared,
                    ..AttentionSchedule::default_for(&spec)
                };
                if !shape_is_legal(&spec, &sched) || !fits_registers(&spec, &sched) {
                    continue;
                }
                // Too wide for shared memory: refused when the program is built.
                let prog = match flash_attention(&spec, &sched) {
                    Ok((prog, _)) => prog,
                    Err(e) if e.to_string().contains("shared memory") => continue,
                    Err(e) => panic!("{sched:?}: {e}"),
                };
                let k = print_ptx(&prog, Target::Sm90a).expect("prints");
                assert!(
                    k.text
                        .contains(&format!("wgmma.mma_async.sync.aligned.m64n{bn}k16.f32")),
                    "{}: no m64n{bn} Q K^T",
                    k.entry
                );
                let r = assemble(&ptxas, &k.text, "sm_90a")
                    .unwrap_or_else(|e| panic!("{} {sched:?}: {e}", k.entry));
                if r.spills()
                    || ["C7512", "C7520", "C7508"]
                        .iter()
                        .any(|i| r.log.contains(i))
                {
                    failed.push(format!(
                        "{} {bm}x{bn} {}: {} B spilled",
                        k.entry,
                        loads.name(),
                        r.spill_stores
                    ));
                }
                admitted.push((spec.head_dim, bm, bn, p_in_shared));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "admitted, but ptxas spills or serializes:\n{}",
        failed.join("\n")
    );
    // Not vacuous: FlashAttention-3's shapes are among those admitted (192 x 128 at d = 64
    // with three consumer warpgroups fits the 160 registers a copy-engine producer leaves;
    // 192 x 192 there with P through shared memory).
    for shape in [
        (128, 128, 176, false),
        (64, 128, 192, false),
        (64, 192, 128, false),
        (64, 192, 192, true),
    ] {
        assert!(admitted.contains(&shape), "{shape:?} not admitted");
    }
    // ... and P in registers does not fit 192 x 192 there.
    assert!(!admitted.contains(&(64, 192, 192, false)));
}

/// The instructions of a kernel's key loop in `cuobjdump -sass` text: the longest backward
/// branch before the first `EXIT` (the consumers' loop; the producer's and the mbarrier
/// retry stubs come after it).
fn key_loop_sass(sass: &str) -> Vec<String> {
    let parse = |l: &str| -> Option<(u64, String)> {
        let l = l.trim_start();
        let rest = l.strip_prefix("/*")?;
        let (addr, ins) = rest.split_once("*/")?;
        let addr = u64::from_str_radix(addr, 16).ok()?;
        let ins = ins.split(';').next()?.trim().to_string();
        Some((addr, ins))
    };
    let code: Vec<(u64, String)> = sass.lines().filter_map(parse).collect();
    let first_exit = code
        .iter()
        .find(|(_, i)| i.contains("EXIT"))
        .map_or(u64::MAX, |(a, _)| *a);
    let target = |i: &str| {
        let t = i.split("BRA ").nth(1)?.trim();
        u64::from_str_radix(t.strip_prefix("0x")?, 16).ok()
    };
    let (top, bottom) = code
        .iter()
        .filter(|(a, _)| *a < first_exit)
        .filter_map(|(a, i)| target(i).filter(|t| t < a).map(|t| (t, *a)))
        .max_by_key(|(t, a)| a - t)
        .expect("a key loop");
    code.into_iter()
        .filter(|(a, _)| (top..=bottom).contains(a))
        .map(|(_, i)| i)
        .collect()
}

#[test]
fn a_pinned_deferred_wait_stays_after_the_softmax_it_overlaps() {
    use einattn_backends::ptx::ptxas::{assemble_cubin, disassemble, find_cuobjdump};
    let Some(ptxas) = ptxas_for_test("a_pinned_deferred_wait_stays_after_the_softmax_it_overlaps")
    else {
        return;
    };
    let Some(cuobjdump) = find_cuobjdump() else {
        assert!(
            std::env::var_os("EINATTN_REQUIRE_PTXAS").is_none(),
            "cuobjdump not found and EINATTN_REQUIRE_PTXAS is set"
        );
        eprintln!("SKIPPED a_pinned_deferred_wait_stays_after_the_softmax_it_overlaps: cuobjdump not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)");
        return;
    };
    // In the key loop, `wgmma.wait_group 0` waits for the previous tile's deferred P V.
    // Left free, ptxas schedules that wait (which reads no register) at the top of its
    // basic block, before this tile's softmax: the softmax then runs after P V instead of
    // under it. Pinned by a fence, it stays after the exponentials.
    for (d, block_m, warps, pingpong) in [(64u32, 192u32, 12u32, false), (128, 128, 8, true)] {
        let mut spec = AttentionSpec::new(d, Elem::Bf16);
        spec.causal = d == 128;
        for pinned in [false, true] {
            let sched = AttentionSchedule {
                block_m,
                block_n: 128,
                warps,
                stages: 2,
                mma: MmaUnit::Warpgroup,
                loads: Loads::ProducerWarpgroup {
                    pingpong,
                    tma: true,
                },
                pin_deferred_wait: pinned,
                ..AttentionSchedule::default_for(&spec)
            };
            let (prog, _) = flash_attention(&spec, &sched).expect("builds");
            let k = print_ptx(&prog, Target::Sm90a).expect("prints");
            assert_eq!(
                k.text.matches("fence.acq_rel.cta;").count(),
                pinned as usize,
                "{}",
                k.entry
            );
            let (_, cubin) = assemble_cubin(&ptxas, &k.text, "sm_90a")
                .unwrap_or_else(|e| panic!("{}: {e}", k.entry));
            let sass = disassemble(&cuobjdump, &cubin).expect("disassembles");
            let body = key_loop_sass(&sass);
            let at = |what: &str| body.iter().position(|i| i.contains(what));
            let wait = at("WARPGROUP.DEPBAR.LE gsb0, 0x0").expect("the deferred group's wait");
            let first_exp = at("MUFU.EX2").expect("exponentials");
            let last_exp = body.iter().rposition(|i| i.contains("MUFU.EX2")).unwrap();
            if pinned {
                assert!(
                    wait > last_exp,
                    "{} pinned: the wait at {wait}, the last exponential at {last_exp}",
                    k.entry
                );
            } else {
                // What the pin is for: if a later ptxas stops hoisting the wait, the
                // knob (`--pv-wait pinned`) is no longer needed.
                assert!(
                    wait < first_exp,
                    "{} free: ptxas left the wait at {wait}, after the first exponential at {first_exp}",
                    k.entry
                );
            }
        }
    }
}
