//! The softmax-attention backward programs (dQ kernel, then dK/dV kernel) run by the Tile
//! IR interpreter against the attention backward written as plain loops in f64, for masks,
//! score modifiers, ragged lengths and both 16-bit types.

use einattn_backends::family::softmax::backward::{
    dkdv_program, dq_program, score_derivative, BackwardSchedule, Statistics,
};
use einattn_backends::family::softmax::program::{AttentionSpec, Score, DOT};
use einattn_backends::reference::relative_error;
use einattn_backends::tile::interp::{run, Bindings, HostTensor, Problem};
use einattn_backends::tile::{Elem, ScalarExpr, SeqRank};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

struct Case {
    batch: usize,
    heads: usize,
    n: usize,
    d: usize,
    /// The value head dim (V, O, dO, dV).
    dv: usize,
    spec: AttentionSpec,
    scalars: Vec<f64>,
    head_params: Vec<Vec<f64>>,
}

/// `[B, N, H, d]` contiguous.
fn idx(c: &Case, b: usize, n: usize, h: usize, e: usize) -> usize {
    ((b * c.n + n) * c.heads + h) * c.d + e
}

/// As [`idx`], in a tensor of the value dim.
fn idxv(c: &Case, b: usize, n: usize, h: usize, e: usize) -> usize {
    ((b * c.n + n) * c.heads + h) * c.dv + e
}

fn eval(e: &ScalarExpr, dot: f64, p: f64, m: f64, c: &Case, h: usize) -> f64 {
    e.eval(&mut |leaf| {
        Ok::<f64, ()>(match leaf {
            ScalarExpr::Lit(v) => *v,
            ScalarExpr::Scalar(id) => c.scalars[id.index()],
            ScalarExpr::Head(id) => c.head_params[id.index()][h],
            ScalarExpr::Index(SeqRank::Query) => p,
            ScalarExpr::Index(SeqRank::Key) => m,
            ScalarExpr::Elem(DOT) => dot,
            other => panic!("unexpected leaf {other:?}"),
        })
    })
    .expect("evaluates")
}

/// (dQ, dK, dV, O, row max, row sum) by the definition, all `[B, N, H, d]` / `[B, H, N]`.
#[allow(clippy::type_complexity)]
fn naive(
    c: &Case,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    d_o: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let (n, d, dvd) = (c.n, c.d, c.dv);
    let size = c.batch * n * c.heads * d;
    let size_v = c.batch * n * c.heads * dvd;
    let (mut dq, mut dk, mut dv, mut o) = (
        vec![0.0; size],
        vec![0.0; size],
        vec![0.0; size_v],
        vec![0.0; size_v],
    );
    let mut row_max = vec![f64::NEG_INFINITY; c.batch * c.heads * n];
    let mut row_sum = vec![0.0; c.batch * c.heads * n];
    let slope = score_derivative(&c.spec.score.expr).expect("differentiable");
    let masks = c.spec.masks();
    for b in 0..c.batch {
        for h in 0..c.heads {
            let mut s = vec![vec![f64::NEG_INFINITY; n]; n];
            let mut dots = vec![vec![0.0; n]; n];
            for p in 0..n {
                for m in 0..n {
                    if !masks.iter().all(|mk| mk.allows(p as i64, m as i64)) {
                        continue;
                    }
                    let dot: f64 = (0..d)
                        .map(|e| q[idx(c, b, p, h, e)] * k[idx(c, b, m, h, e)])
                        .sum();
                    dots[p][m] = dot;
                    s[p][m] = eval(&c.spec.score.expr, dot, p as f64, m as f64, c, h);
                }
            }
            for p in 0..n {
                let r = (b * c.heads + h) * n + p;
                let mx = s[p].iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                row_max[r] = mx;
                let l: f64 = s[p].iter().map(|x| (x - mx).exp()).sum();
                row_sum[r] = l;
                let pr: Vec<f64> = s[p].iter().map(|x| (x - mx).exp() / l).collect();
                for e in 0..dvd {
                    o[idxv(c, b, p, h, e)] = (0..n).map(|m| pr[m] * v[idxv(c, b, m, h, e)]).sum();
                }
                let delta: f64 = (0..dvd)
                    .map(|e| d_o[idxv(c, b, p, h, e)] * o[idxv(c, b, p, h, e)])
                    .sum();
                for m in 0..n {
                    if pr[m] == 0.0 {
                        continue;
                    }
                    let dp: f64 = (0..dvd)
                        .map(|e| d_o[idxv(c, b, p, h, e)] * v[idxv(c, b, m, h, e)])
                        .sum();
                    let ds =
                        pr[m] * (dp - delta) * eval(&slope, dots[p][m], p as f64, m as f64, c, h);
                    for e in 0..d {
                        dq[idx(c, b, p, h, e)] += ds * k[idx(c, b, m, h, e)];
                        dk[idx(c, b, m, h, e)] += ds * q[idx(c, b, p, h, e)];
                    }
                    for e in 0..dvd {
                        dv[idxv(c, b, m, h, e)] += pr[m] * d_o[idxv(c, b, p, h, e)];
                    }
                }
            }
        }
    }
    (dq, dk, dv, o, row_max, row_sum)
}

/// Runs both programs on the CPU; returns the largest relative error of dQ, dK, dV.
fn run_case(c: &Case, sched: &BackwardSchedule, stats: Statistics, seed: u64) -> f64 {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let size = c.batch * c.n * c.heads * c.d;
    let size_v = c.batch * c.n * c.heads * c.dv;
    let elem = c.spec.elem;
    let mut draw = |size: usize| -> Vec<f64> {
        (0..size)
            .map(|_| elem.round(rng.random_range(-1.0..1.0)))
            .collect()
    };
    let (q, k, v, d_o) = (draw(size), draw(size), draw(size_v), draw(size_v));
    let (dq_want, dk_want, dv_want, o, row_max, row_sum) = naive(c, &q, &k, &v, &d_o);
    // The forward stored O in 16 bits; the backward reads that.
    let o: Vec<f64> = o.iter().map(|&x| elem.round(x)).collect();
    let host = |data: &[f64]| HostTensor::bnhd(data.to_vec(), c.n, c.heads, c.d);
    let host_v = |data: &[f64]| HostTensor::bnhd(data.to_vec(), c.n, c.heads, c.dv);
    let rows = c.batch * c.heads * c.n;
    let bhn = |data: &[f64]| (data.to_vec(), c.heads * c.n, 1, c.n);
    let prob = Problem {
        batch: c.batch,
        heads: c.heads,
        kv_group: 1,
        n_q: c.n,
        n_k: c.n,
    };
    let dq_prog = dq_program(&c.spec, sched, stats).expect("dq program");
    let lse_in: Vec<f64> = row_max
        .iter()
        .zip(&row_sum)
        .map(|(m, l)| m + l.ln())
        .collect();
    let (tokens, row_outputs) = match stats {
        Statistics::MaxAndSum => (
            vec![bhn(&row_max), bhn(&row_sum)],
            vec![vec![f64::NAN; rows]; 2],
        ),
        Statistics::LogSumExp => (vec![bhn(&lse_in)], vec![vec![f64::NAN; rows]]),
    };
    let mut io = Bindings {
        tensors: vec![
            host(&q),
            host(&k),
            host_v(&v),
            host_v(&o),
            host_v(&d_o),
            host(&vec![f64::NAN; size]),
        ],
        row_outputs,
        row_inputs: vec![],
        scalars: c.scalars.clone(),
        head_params: c.head_params.clone(),
        states: vec![],
        chunk_base: 0,
        chunk_total: 0,
        q_offset: 0,
        tokens,
    };
    run(&dq_prog, prob, &mut io).expect("dq runs");
    let dq = io.tensors[5].data.clone();
    let (lse, delta) = match stats {
        Statistics::MaxAndSum => (io.row_outputs[0].clone(), io.row_outputs[1].clone()),
        Statistics::LogSumExp => (lse_in, io.row_outputs[0].clone()),
    };
    let dkdv_prog = dkdv_program(&c.spec, sched).expect("dkdv program");
    let mut io = Bindings {
        tensors: vec![
            host(&k),
            host_v(&v),
            host(&q),
            host_v(&d_o),
            host(&vec![f64::NAN; size]),
            host_v(&vec![f64::NAN; size_v]),
        ],
        row_outputs: vec![],
        row_inputs: vec![],
        scalars: c.scalars.clone(),
        head_params: c.head_params.clone(),
        states: vec![],
        chunk_base: 0,
        chunk_total: 0,
        q_offset: 0,
        tokens: vec![bhn(&lse), bhn(&delta)],
    };
    run(&dkdv_prog, prob, &mut io).expect("dkdv runs");
    let (dk, dv) = (io.tensors[4].data.clone(), io.tensors[5].data.clone());
    [
        relative_error(&dq, &dq_want),
        relative_error(&dk, &dk_want),
        relative_error(&dv, &dv_want),
    ]
    .into_iter()
    .fold(
        0.0,
        |a: f64, e| if e.is_nan() { f64::INFINITY } else { a.max(e) },
    )
}

fn case(n: usize, d: usize, elem: Elem, spec: impl FnOnce(&mut AttentionSpec)) -> Case {
    let mut s = AttentionSpec::new(d as u32, elem);
    spec(&mut s);
    let scalars = s
        .score
        .scalars
        .iter()
        .map(|name| if name == "softcap" { 2.0 } else { 0.3 })
        .collect();
    let heads = 2;
    let head_params = s
        .score
        .head_params
        .iter()
        .map(|_| vec![0.05, 0.11])
        .collect();
    Case {
        batch: 1,
        heads,
        n,
        d,
        dv: s.value_dim as usize,
        spec: s,
        scalars,
        head_params,
    }
}

#[test]
fn backward_programs_match_the_attention_backward() {
    let cases: Vec<(&str, Case)> = vec![
        ("plain", case(96, 64, Elem::Bf16, |_| {})),
        (
            "causal ragged",
            case(100, 64, Elem::Bf16, |s| s.causal = true),
        ),
        ("causal f16", case(64, 64, Elem::F16, |s| s.causal = true)),
        (
            "sliding window",
            case(130, 64, Elem::Bf16, |s| {
                s.causal = true;
                s.window = Some(40)
            }),
        ),
        (
            "softcap",
            case(70, 64, Elem::Bf16, |s| {
                s.score = Score::scaled().with_softcap()
            }),
        ),
        (
            "alibi causal",
            case(80, 64, Elem::F16, |s| {
                s.causal = true;
                s.score = Score::scaled().with_alibi()
            }),
        ),
        ("d128", case(72, 128, Elem::Bf16, |s| s.causal = true)),
        (
            "value dim 64 under Q.K 128",
            case(72, 128, Elem::Bf16, |s| {
                s.causal = true;
                s.value_dim = 64
            }),
        ),
        (
            "value dim 128 under Q.K 192 (latent attention)",
            case(70, 192, Elem::F16, |s| s.value_dim = 128),
        ),
        (
            "value dim 128 over Q.K 64, soft-cap",
            case(66, 64, Elem::Bf16, |s| {
                s.value_dim = 128;
                s.score = Score::scaled().with_softcap()
            }),
        ),
    ];
    for (name, c) in cases {
        let sched = BackwardSchedule::default_for(&c.spec, einattn_backends::Target::Sm80);
        for stats in [Statistics::MaxAndSum, Statistics::LogSumExp] {
            let err = run_case(&c, &sched, stats, 11);
            assert!(err < 1e-2, "{name} {stats:?}: relative error {err}");
        }
    }
}

/// The derivative of the score chain against central differences.
#[test]
fn score_derivatives_match_finite_differences() {
    for score in [
        Score::scaled(),
        Score::scaled().with_softcap(),
        Score::scaled().with_alibi().with_softcap(),
    ] {
        let c = Case {
            batch: 1,
            heads: 1,
            n: 1,
            d: 1,
            dv: 1,
            scalars: vec![0.7, 3.0],
            head_params: vec![vec![0.25]],
            spec: AttentionSpec {
                score: score.clone(),
                ..AttentionSpec::new(64, Elem::Bf16)
            },
        };
        let slope = score_derivative(&score.expr).expect("differentiable");
        for dot in [-2.0, -0.3, 0.0, 0.9, 4.0] {
            let f = |x: f64| eval(&score.expr, x, 5.0, 2.0, &c, 0);
            let h = 1e-5;
            let fd = (f(dot + h) - f(dot - h)) / (2.0 * h);
            let exact = eval(&slope, dot, 5.0, 2.0, &c, 0);
            assert!(
                (fd - exact).abs() < 1e-6 * (1.0 + exact.abs()),
                "{score:?} at {dot}: {fd} vs {exact}"
            );
        }
    }
}

/// Both backward kernels assemble for sm_80 and sm_90a without spills, for every mask and
/// score modifier above, d = 64 and 128, both 16-bit types; and with value dims of their
/// own (192 / 128, 128 / 64, 64 / 128), plain and causal.
#[test]
fn backward_kernels_assemble_without_spills() {
    use einattn_backends::ptx::ptxas::{assemble, ptxas_for_test};
    use einattn_backends::{print_ptx, Target};
    let Some(ptxas) = ptxas_for_test("backward_kernels_assemble_without_spills") else {
        return;
    };
    let shapes = [
        (64u32, 64u32, 4),
        (128, 128, 4),
        (192, 128, 2),
        (128, 64, 2),
        (64, 128, 2),
    ];
    for (d, dv, variants) in shapes {
        for elem in [Elem::Bf16, Elem::F16] {
            for variant in 0..variants {
                let mut spec = AttentionSpec::new(d, elem);
                spec.value_dim = dv;
                match variant {
                    1 => spec.causal = true,
                    2 => spec.score = Score::scaled().with_softcap(),
                    3 => {
                        spec.causal = true;
                        spec.window = Some(256);
                        spec.score = Score::scaled().with_alibi();
                    }
                    _ => {}
                }
                let sync = BackwardSchedule::default_for(&spec, Target::Sm80);
                let wgmma = BackwardSchedule::default_for(&spec, Target::Sm90a);
                let programs = [
                    (
                        dq_program(&spec, &sync, Statistics::MaxAndSum),
                        Target::Sm80,
                        "sm_80",
                    ),
                    (dkdv_program(&spec, &sync), Target::Sm80, "sm_80"),
                    (
                        dq_program(&spec, &sync, Statistics::LogSumExp),
                        Target::Sm90a,
                        "sm_90a",
                    ),
                    (dkdv_program(&spec, &sync), Target::Sm90a, "sm_90a"),
                    (
                        dq_program(&spec, &wgmma, Statistics::MaxAndSum),
                        Target::Sm90a,
                        "sm_90a",
                    ),
                    (
                        dq_program(&spec, &wgmma, Statistics::LogSumExp),
                        Target::Sm90a,
                        "sm_90a",
                    ),
                    (dkdv_program(&spec, &wgmma), Target::Sm90a, "sm_90a"),
                ];
                for (prog, target, arch) in programs {
                    let prog = prog.expect("program");
                    {
                        let ptx = print_ptx(&prog, target).expect("prints");
                        let r = assemble(&ptxas, &ptx.text, arch)
                            .unwrap_or_else(|e| panic!("{} {arch}: {e}", prog.name));
                        assert!(!r.spills(), "{} {arch}: {r:?}", prog.name);
                        eprintln!(
                            "{} {:?} {arch}: {} registers",
                            prog.name, prog.schedule.mma, r.registers
                        );
                    }
                }
            }
        }
    }
}

/// Which backward cascades of the examples take the softmax backward kernels: every one
/// whose forward reads as softmax attention; those whose forward saves its output and
/// final row max and sum (the online forms) in two kernels, the others (2- and 3-pass
/// forms, which save only a max) with the forward kernel run again first.
#[test]
fn examples_with_saved_statistics_take_the_backward_kernels() {
    use einattn_backends::family::softmax::gradient::compile_gradient;
    use einattn_backends::family::{Compiled, FamilyError, KernelOptions};
    use einattn_passes::grad::{grad, GradOptions};
    let load = |name: &str| {
        let path = format!("{}/../examples/{name}.ein", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).expect("example");
        einattn_dsl::compile_source(&path, &text, &[]).expect("valid")
    };
    for (name, fast, kernels) in [
        ("attention_1pass", true, 2),
        ("attention_causal", true, 2),
        ("attention_mha", true, 2),
        ("attention_sliding_window", true, 2),
        ("attention_2pass", true, 3),
        ("attention_3pass", true, 3),
        ("attention_softcap", true, 3),
        ("attention_mla", true, 2),
        ("linear_causal", false, 0),
        ("sigmoid_attention", false, 0),
    ] {
        let forward = load(name);
        let g = grad(&forward, &GradOptions { wrt: None }).expect("differentiable");
        match compile_gradient(&forward, &g, &KernelOptions::default()) {
            Ok(k) => {
                assert!(fast, "{name} took the backward kernels");
                let entries: Vec<&str> = k.modules().iter().map(|m| m.ptx.entry.as_str()).collect();
                assert_eq!(entries.len(), kernels, "{name}: {entries:?}");
                if kernels == 3 {
                    assert!(entries[0].starts_with("einattn_fwd") && entries[0].ends_with("_lse"));
                }
                assert!(entries[kernels - 2].starts_with("einattn_bwd_dq"));
                assert!(entries[kernels - 1].starts_with("einattn_bwd_dkdv"));
                let outputs: Vec<String> = (&k as &dyn Compiled)
                    .manifest()
                    .kernels
                    .iter()
                    .flat_map(|c| {
                        c.tensors
                            .iter()
                            .filter(|t| t.role == einattn_backends::abi::TensorRole::Output)
                    })
                    .map(|t| t.name.clone())
                    .collect();
                let mut want: Vec<String> = g
                    .grads
                    .iter()
                    .map(|(d, _)| g.cascade.tensors[*d].name.clone())
                    .collect();
                let mut got = outputs.clone();
                want.sort();
                got.sort();
                assert_eq!(got, want, "{name}");
            }
            Err(FamilyError::NotMine(d)) => assert!(!fast, "{name}: {d:?}"),
            Err(FamilyError::Failed(e)) => panic!("{name}: {e}"),
        }
    }
}

/// The backward of grouped-query attention does not take the softmax backward kernels
/// (their dK/dV CTA owns one query head, while dK and dV of a K/V head sum over the group's
/// query heads): the softmax family refuses it with that reason, and the compile falls back
/// to the general lowering of the backward cascade, for GQA and for MQA, while the forward
/// takes the softmax kernel.
#[test]
fn grouped_query_attention_backward_falls_back_to_the_general_lowering() {
    use einattn_backends::family::softmax::gradient::compile_gradient;
    use einattn_backends::family::{self, CompileError, FamilyError, KernelOptions, Request};
    use einattn_passes::grad::{grad, GradOptions};
    let path = format!("{}/../examples/gqa.ein", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).expect("example");
    let build = |path: &str, text: &str, sizes: &[(String, u64)]| {
        einattn_dsl::compile_source(path, text, sizes)
            .map_err(|d| CompileError::Source(d.items().to_vec()))
    };
    let options = KernelOptions::default();
    for group in [4u64, 8] {
        let defines = vec![("GROUP".to_string(), group), ("N".to_string(), 64)];
        let forward = build(&path, &text, &defines).expect("the forward compiles");
        let instantiate_forward = |s: &[(String, u64)]| build(&path, &text, s);
        let forward_request = Request {
            cascade: &forward,
            options: &options,
            defines: &defines,
            instantiate: &instantiate_forward,
        };
        let fwd = family::compile(&forward_request).expect("the forward compiles");
        assert_eq!(fwd.family(), "softmax", "GROUP={group}");
        let g = grad(&forward, &GradOptions { wrt: None }).expect("differentiable");
        match compile_gradient(&forward, &g, &options) {
            Err(FamilyError::NotMine(d)) => {
                assert!(d[0].message.contains("grouped-query attention"), "{d:?}")
            }
            Err(FamilyError::Failed(e)) => panic!("GROUP={group}: {e}"),
            Ok(_) => panic!("GROUP={group}: took the softmax backward kernels"),
        }
        let backward_text = g.to_text(&path);
        let instantiate_backward = |s: &[(String, u64)]| build("backward.ein", &backward_text, s);
        let request = Request {
            cascade: &g.cascade,
            options: &options,
            defines: &[],
            instantiate: &instantiate_backward,
        };
        let compiled = family::compile_gradient(&forward_request, &g, &request)
            .unwrap_or_else(|e| panic!("GROUP={group}: {e}"));
        assert_eq!(compiled.family(), "general", "GROUP={group}");
        let explain = compiled.explain();
        assert!(
            explain.contains("grouped-query attention"),
            "GROUP={group}: the reason is shown\n{explain}"
        );
    }
}
