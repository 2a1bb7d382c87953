//! The projection family: cascades that are row statistics of a long GEMM compile to one
//! tiled kernel whose Tile IR program (run by the Tile interpreter, slice by slice and tile
//! by tile, ragged tails included) computes what the cascade interpreter computes; its PTX
//! assembles for sm_80 and sm_90a without spills at the full lm-head size.

use einattn_backends::family::projection::{compile_projection, ProjectionKernels};
use einattn_backends::family::{compile, Compiled, KernelOptions, Layout, Request};
use einattn_backends::ptx::ptxas::{assemble, ptxas_for_test};
use einattn_backends::reference::relative_error;
use einattn_backends::tile::interp::{run, Bindings, Problem};
use einattn_backends::tile::{Elem, MmaUnit};
use einattn_backends::Target;
use einattn_ir::cascade::Cascade;
use einattn_ir::interp::{evaluate_in_order, random_inputs};
use einattn_ir::validate::topological_order;

fn example(name: &str) -> String {
    let path = format!("{}/../examples/{name}.ein", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(path).expect("example exists")
}

fn build(src: &str, defines: &[(&str, u64)]) -> Cascade {
    let defines: Vec<(String, u64)> = defines.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    einattn_dsl::compile_source("test.ein", src, &defines)
        .unwrap_or_else(|d| panic!("{}", d.render("test.ein", src)))
}

/// The log-sum-exp of a projection (the cross-entropy normalizer), in f16.
const LSE: &str = "kernel lse_proj
size T = 64
size D = 128
size V = 200
rank t: T
rank d: D
rank v: V
input X[t, d]: f16
input W[v, d]: f16
output L[t]: f32
Z[t, v] = X[t, d] * W[v, d]
M[t] = max[v] Z[t, v]
S[t] = exp(Z[t, v] - M[t])
L[t] = M[t] + log(S[t])
";

/// Unanchored sums (mean logit and z-loss) beside a softmax statistic with a scaled
/// exponent and its anchor written in another order.
const STATS: &str = "kernel logit_stats
size T = 64
size D = 64
size V = 200
rank t: T
rank d: D
rank v: V
input X[t, d]: bf16
input W[v, d]: bf16
output MEAN[t]: f32
output SQ[t]: f32
output LSE2[t]: f32
Z[t, v] = X[t, d] * W[v, d]
Y[t, v] = 0.5 * Z[t, v]
MY[t] = max[v] Y[t, v]
SUMZ[t] = Z[t, v]
MEAN[t] = SUMZ[t] / 200
SQ[t] = Z[t, v] * Z[t, v] * 0.25
S[t] = exp(-MY[t] + 0.5 * Z[t, v]) * (1 + Z[t, v] * Z[t, v])
LSE2[t] = MY[t] + log(S[t])
";

fn options(target: Target) -> KernelOptions {
    KernelOptions {
        target,
        ..KernelOptions::default()
    }
}

/// Runs the compiled programs in the Tile interpreter on random inputs (a split column
/// loop's partial program, then its merge program) and compares every output with the
/// cascade interpreter (both f64, on the same 16-bit-rounded inputs; the row outputs are
/// stored as f32, hence errors near 1e-8).
fn tile_vs_interpreter(c: &Cascade, k: &ProjectionKernels, seed: u64) -> f64 {
    let r = &k.reading;
    let programs: Vec<_> = k
        .modules()
        .iter()
        .map(|m| m.program.tile().expect("a tile program").clone())
        .collect();
    let prog = &programs[0];
    let splits = prog.key_splits as usize;
    assert_eq!(
        programs.len(),
        if splits > 1 { 2 } else { 1 },
        "a merge program exactly when the loop is split"
    );
    let elem = prog.tensors[0].elem;
    let mut inputs = random_inputs(c, seed);
    for t in [r.a, r.b] {
        if let Some(d) = inputs.get_mut(&t) {
            d.values.iter_mut().for_each(|x| *x = elem.round(*x));
        }
    }
    let values = evaluate_in_order(c, &inputs, &topological_order(c)).expect("interpreter runs");
    let host =
        |t, seq| Layout::of(c, t, None, Some(seq), None).host(inputs[&t].stored().into_owned());
    let rows = r.n_rows as usize;
    let mut io = Bindings {
        tensors: vec![host(r.a, r.row), host(r.b, r.col)],
        row_outputs: vec![vec![f64::NAN; splits * rows]; prog.row_outputs.len()],
        row_inputs: vec![],
        scalars: vec![],
        head_params: vec![],
        states: vec![],
        chunk_base: 0,
        chunk_total: 0,
        q_offset: 0,
        tokens: vec![],
    };
    let prob = Problem {
        batch: 1,
        heads: 1,
        kv_group: 1,
        n_q: rows,
        n_k: r.n_cols as usize,
    };
    run(prog, prob, &mut io).expect("tile interpreter runs");
    if let Some(merge) = programs.get(1) {
        io = Bindings {
            tensors: vec![],
            row_inputs: std::mem::take(&mut io.row_outputs),
            row_outputs: vec![vec![f64::NAN; rows]; r.outputs.len()],
            ..io
        };
        run(merge, prob, &mut io).expect("tile interpreter runs the merge");
    }
    let mut worst = 0.0f64;
    for (i, (t, _)) in r.outputs.iter().enumerate() {
        let want = values
            .get(*t)
            .expect("output computed")
            .stored()
            .into_owned();
        let got = &io.row_outputs[i];
        assert!(
            got.iter().all(|x| x.is_finite()),
            "{}: non-finite output",
            c.name
        );
        worst = worst.max(relative_error(got, &want));
    }
    // The direct formula (by definition, not the running form) agrees as well.
    let (formula, _) = k.formula(&inputs);
    let main = values
        .get(r.outputs[0].0)
        .expect("main output")
        .stored()
        .into_owned();
    worst.max(relative_error(&formula, &main))
}

#[test]
fn lm_head_entropy_matches_the_interpreter_at_small_and_ragged_sizes() {
    let src = example("lm_head_entropy");
    // (T, D, VOCAB): whole tiles, ragged rows and columns, one column tile, a tail of 1.
    for (t, d, v) in [
        (128, 64, 256),
        (100, 128, 300),
        (257, 64, 129),
        (16, 192, 1),
        // Split column loops: 4 runs of 2 tiles, and 4 runs of 3 of 9 tiles (the last run
        // empty: its partial max is -inf and must add nothing).
        (100, 64, 1000),
        (64, 64, 1100),
        (200, 64, 2048),
    ] {
        let c = build(&src, &[("T", t), ("D", d), ("VOCAB", v)]);
        for target in [Target::Sm80, Target::Sm90a] {
            let k = compile_projection(&c, &options(target))
                .unwrap_or_else(|e| panic!("{}", e.message()));
            let row_tiles = t.div_ceil(128);
            assert_eq!(
                k.schedule.splits > 1,
                v > 512 && row_tiles < 132,
                "T={t} V={v}: {} splits",
                k.schedule.splits
            );
            let err = tile_vs_interpreter(&c, &k, t + v);
            assert!(
                err < 1e-6,
                "T={t} D={d} V={v} {target:?}: relative error {err:e}"
            );
        }
    }
}

#[test]
fn other_cascades_of_the_shape_take_the_family() {
    for (src, seed) in [(LSE, 7), (STATS, 11)] {
        let c = build(src, &[]);
        let k = compile_projection(&c, &options(Target::Sm90a))
            .unwrap_or_else(|e| panic!("{}", e.message()));
        let err = tile_vs_interpreter(&c, &k, seed);
        assert!(err < 1e-6, "{}: relative error {err:e}", c.name);
    }
    // Through the family order too: the projection family, not the general lowering.
    let c = build(LSE, &[]);
    let o = options(Target::Sm80);
    let instantiate = |_: &[(String, u64)]| Ok(c.clone());
    let compiled = compile(&Request {
        cascade: &c,
        options: &o,
        defines: &[],
        instantiate: &instantiate,
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(compiled.family(), "projection");
    let schedule = compiled.explain();
    assert!(schedule.contains("L: row map after the loop"), "{schedule}");
}

#[test]
fn a_ragged_contracted_rank_is_refused_clearly() {
    let c = build(
        &example("lm_head_entropy"),
        &[("T", 64), ("D", 96), ("VOCAB", 64)],
    );
    let e = match compile_projection(&c, &options(Target::Sm80)) {
        Ok(_) => panic!("D=96 compiled"),
        Err(e) => e.message(),
    };
    assert!(e.contains("multiple of the 64-column slice"), "{e}");
}

#[test]
fn a_cascade_mixing_logits_and_statistics_is_not_read() {
    // exp(Z * M) cannot be carried by a running max: not this family's.
    let src = LSE.replace("exp(Z[t, v] - M[t])", "exp(Z[t, v] * M[t])");
    let c = build(&src, &[]);
    let e = match compile_projection(&c, &options(Target::Sm80)) {
        Ok(_) => panic!("compiled"),
        Err(e) => e.message(),
    };
    assert!(e.contains("mixes the logit"), "{e}");
}

#[test]
fn kernel_shape_overrides_are_honoured_or_refused() {
    let c = build(
        &example("lm_head_entropy"),
        &[("T", 256), ("D", 128), ("VOCAB", 512)],
    );
    let mut o = options(Target::Sm90a);
    o.tiles = vec![("v".into(), 64), ("t".into(), 64)];
    o.warps = Some(4);
    o.stages = Some(4);
    let k = compile_projection(&c, &o).unwrap_or_else(|e| panic!("{}", e.message()));
    assert_eq!(
        (
            k.schedule.block_m,
            k.schedule.block_n,
            k.schedule.warps,
            k.schedule.stages
        ),
        (64, 64, 4, 4)
    );
    assert!(tile_vs_interpreter(&c, &k, 3) < 1e-6);
    o.tiles = vec![("d".into(), 128)];
    assert!(compile_projection(&c, &o).is_err());
    o.tiles = vec![("x".into(), 128)];
    assert!(compile_projection(&c, &o).is_err());
    // wgmma keeps one group in flight: 2 stages leave no slice to prefetch.
    o.tiles = vec![];
    o.warps = None;
    o.stages = Some(2);
    let e = match compile_projection(&c, &o) {
        Ok(_) => panic!("2 stages compiled"),
        Err(e) => e.message(),
    };
    assert!(e.contains("at least 3 stages"), "{e}");
}

#[test]
fn ptxas_accepts_the_full_size_kernel_without_spills() {
    let Some(ptxas) = ptxas_for_test("ptxas_accepts_the_full_size_kernel_without_spills") else {
        return;
    };
    let c = build(
        &example("lm_head_entropy"),
        &[("T", 8192), ("D", 4096), ("VOCAB", 32768)],
    );
    for (target, arch, mma) in [
        (Target::Sm80, "sm_80", MmaUnit::Sync),
        (Target::Sm90a, "sm_90a", MmaUnit::Warpgroup),
        (Target::Sm90a, "sm_90a", MmaUnit::Sync),
    ] {
        for elem in [Elem::Bf16, Elem::F16] {
            let mut o = options(target);
            o.mma = Some(mma);
            o.elem = Some(elem);
            let k = compile_projection(&c, &o).unwrap_or_else(|e| panic!("{}", e.message()));
            // 64 row tiles on 132 SMs: the vocabulary loop is split in two, then merged.
            assert_eq!(k.modules().len(), 2);
            assert_eq!(k.modules()[0].contract.grid, [64, 1, 2]);
            for m in k.modules() {
                let r = assemble(&ptxas, &m.ptx.text, arch)
                    .unwrap_or_else(|e| panic!("{}: {e}", m.ptx.entry));
                eprintln!(
                    "{} {arch} {}: {} registers, {} B stack",
                    m.ptx.entry,
                    mma.name(),
                    r.registers,
                    r.stack_frame
                );
                assert!(r.registers > 0, "no register report:\n{}", r.log);
                assert!(!r.spills(), "{} spills on {arch}:\n{}", m.ptx.entry, r.log);
            }
            let m = &k.modules()[0];
            if mma == MmaUnit::Warpgroup {
                assert!(m
                    .ptx
                    .text
                    .contains("wgmma.mma_async.sync.aligned.m64n192k16.f32"));
            }
        }
    }
}
