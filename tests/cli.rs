//! The `einattn` binary end to end: reports, exit codes, diagnostics, `.npy` output.

use std::process::Command;

/// The binary under test: `$EINATTN` when set (a test binary carried to a GPU machine),
/// else the one cargo built.
fn binary() -> String {
    std::env::var("EINATTN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_einattn").to_string())
}

fn einattn(args: &[&str]) -> std::process::Output {
    Command::new(binary())
        .args(args)
        .output()
        .expect("the binary runs")
}

fn json_passes(example: &str) -> serde_json::Value {
    let out = einattn(&["analyze", example, "--format", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    report["passes"].clone()
}

#[test]
fn analyze_reports_three_two_and_one_pass_over_m() {
    assert_eq!(json_passes("examples/attention_3pass.ein")["m"], 3);
    assert_eq!(json_passes("examples/attention_2pass.ein")["m"], 2);
    assert_eq!(json_passes("examples/attention_1pass.ein")["m"], 1);
}

#[test]
fn lightning_is_one_pass_over_its_block_rank_with_a_d_by_e_state() {
    let out = einattn(&[
        "analyze",
        "examples/lightning.ein",
        "-D",
        "D=32",
        "--format",
        "json",
    ]);
    assert!(out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(report["passes"]["n"], 1);
    let kv = report["buffers"]
        .as_array()
        .expect("buffers")
        .iter()
        .find(|b| b["tensor"] == "KV")
        .expect("a KV buffer");
    assert_eq!(kv["kind"], "state");
    assert_eq!(kv["elements_per_point"], 32 * 32);
}

#[test]
fn bad_input_exits_1_with_file_line_column_and_caret() {
    let dir = std::env::temp_dir().join(format!("einattn-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("bad.ein");
    std::fs::write(
        &file,
        "kernel bad\nrank m: 8\ninput X[m]: bf16\noutput Y[m]: f32\nY[m] = Z[m]\n",
    )
    .expect("write");
    let out = einattn(&["analyze", file.to_str().expect("utf-8 path")]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.ein:5:8"), "{stderr}");
    assert!(stderr.contains('^'), "{stderr}");
}

#[test]
fn bad_usage_exits_2() {
    let out = einattn(&["analyze", "examples/lightning.ein", "-D", "N"]);
    assert_eq!(out.status.code(), Some(2));
    let out = einattn(&["run", "examples/lightning.ein", "--input", "Nope=x.npy"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn run_writes_inputs_and_outputs_that_read_back() {
    let dir = std::env::temp_dir().join(format!("einattn-run-{}", std::process::id()));
    let out = einattn(&[
        "run",
        "examples/linear_attention.ein",
        "-D",
        "N=16",
        "-D",
        "D=4",
        "--seed",
        "3",
        "--out",
        dir.to_str().expect("utf-8 path"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let o = einattn_exec::npy::read(&dir.join("O.npy")).expect("O.npy");
    assert_eq!(o.shape, vec![1, 16, 2, 4]);
    // Feeding the written inputs back gives the same output.
    let again = dir.join("again");
    let args: Vec<String> = ["Q", "K", "V"]
        .iter()
        .map(|n| format!("{n}={}", dir.join(format!("{n}.npy")).display()))
        .collect();
    let mut cmd = vec![
        "run",
        "examples/linear_attention.ein",
        "-D",
        "N=16",
        "-D",
        "D=4",
        "--seed",
        "99",
    ];
    for a in &args {
        cmd.push("--input");
        cmd.push(a);
    }
    cmd.push("--out");
    let again_str = again.to_str().expect("utf-8 path").to_string();
    cmd.push(&again_str);
    let out = einattn(&cmd);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let o2 = einattn_exec::npy::read(&again.join("O.npy")).expect("O.npy");
    assert_eq!(o.values, o2.values);
}

#[test]
fn compile_writes_ptx_and_a_manifest_that_agree() {
    let dir = std::env::temp_dir().join(format!("einattn-cli-compile-{}", std::process::id()));
    let out = einattn(&[
        "compile",
        "examples/attention_causal.ein",
        "-D",
        "D=128",
        "--target",
        "sm_90a",
        "-o",
        dir.to_str().expect("utf-8 path"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("manifest.json")).expect("manifest written"),
    )
    .expect("manifest is JSON");
    assert_eq!(manifest["launch"].as_array().map(Vec::len), Some(1));
    let kernel = &manifest["kernels"][0];
    let ptx_name = kernel["ptx"].as_str().expect("ptx file named");
    let ptx = std::fs::read_to_string(dir.join(ptx_name)).expect("ptx written");
    let entry = kernel["kernel"].as_str().expect("kernel named");
    assert_eq!(manifest["launch"][0], entry);
    assert!(ptx.contains(&format!(".entry {entry}(")));
    assert!(ptx.contains(".target sm_90a"));
    assert_eq!(kernel["family"]["problem"]["causal"], true);
    assert_eq!(kernel["sizes"]["head_dim"], 128);
    // Every .param of the entry is described, in order.
    let params = kernel["params"].as_array().expect("params");
    let declared = ptx.matches(".param .").count();
    assert_eq!(params.len(), declared);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn emit_schedule_explains_the_mapping_and_overrides_apply() {
    let out = einattn(&[
        "compile",
        "examples/attention_3pass.ein",
        "--emit",
        "schedule",
        "--tile",
        "m=32,p=64",
        "--stages",
        "3",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("key tiles of 32"), "{text}");
    assert!(text.contains("3-stage"), "{text}");
    assert!(
        text.contains("softmax(s) V (the attention output)"),
        "{text}"
    );
    let bad = einattn(&[
        "compile",
        "examples/attention_3pass.ein",
        "--emit",
        "ptx",
        "--tile",
        "q=8",
    ]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("neither the key rank"));
}

#[test]
fn a_cascade_no_kernel_family_reads_compiles_through_the_general_lowering() {
    // GLA's per-(token, key-dimension) gate is read by no kernel family.
    let out = einattn(&["compile", "examples/gla.ein", "--emit", "schedule"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("lowering: general"), "{text}");
    assert!(text.contains("not linear attention"), "why not: {text}");
    assert!(
        text.contains("  S: the recurrence"),
        "one line per kernel: {text}"
    );
    // Writing it somewhere it cannot is an input error, not a panic.
    let bad = einattn(&["compile", "examples/gla.ein", "-o", "/proc/nope"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).starts_with("error: "));
}

#[test]
fn lm_head_entropy_compiles_as_row_statistics_of_a_projection() {
    let out = einattn(&[
        "compile",
        "examples/lm_head_entropy.ein",
        "--emit",
        "schedule",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.starts_with("family: row statistics of a projection"),
        "{text}"
    );
    assert!(text.contains("ZM: running max"), "{text}");
    // A hidden size the d-slices do not divide falls to the general lowering.
    let out = einattn(&[
        "compile",
        "examples/lm_head_entropy.ein",
        "-D",
        "D=96",
        "--emit",
        "schedule",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("lowering: general"), "{text}");
}

#[test]
fn check_and_bench_need_a_gpu_or_run_on_it() {
    for cmd in ["check", "bench"] {
        let out = einattn(&[
            cmd,
            "examples/attention_1pass.ein",
            "-D",
            "M=128",
            "-D",
            "TILE=64",
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        match out.status.code() {
            // No GPU here: a clear message and its own exit code.
            Some(3) => assert!(stderr.contains("no GPU"), "{stderr}"),
            Some(0) if cmd == "check" => assert!(stdout.contains("PASS"), "{stdout}"),
            Some(0) => assert!(stdout.contains("TFLOP/s"), "{stdout}"),
            other => panic!("{cmd}: exit {other:?}\n{stdout}\n{stderr}"),
        }
    }
}

/// The relative 2-norm difference of two equally long arrays.
fn relative_difference(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let norm: f64 = b.iter().map(|y| y * y).sum();
    (diff / norm).sqrt()
}

#[test]
fn run_takes_given_parameters_and_inputs() {
    let dir = std::env::temp_dir().join(format!("einattn-given-run-{}", std::process::id()));
    let drawn = dir.join("drawn");
    let sizes = ["-D", "M=128", "-D", "TILE=64"];
    let mut args = vec!["run", "examples/attention_1pass.ein"];
    args.extend(sizes);
    let drawn_arg = drawn.display().to_string();
    args.extend(["--seed", "3", "--out", &drawn_arg]);
    let out = einattn(&args);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    // With scale 0 every score is equal: each query's output is the mean of V's rows.
    let v_path = drawn.join("V.npy");
    let v = einattn_exec::npy::read(&v_path).expect("V.npy");
    let given = dir.join("given");
    let (given_arg, v_arg) = (
        given.display().to_string(),
        format!("V={}", v_path.display()),
    );
    let mut args = vec!["run", "examples/attention_1pass.ein"];
    args.extend(sizes);
    args.extend(["--seed", "4", "--param", "scale=0", "--input", &v_arg]);
    args.extend(["--out", &given_arg]);
    let out = einattn(&args);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let av = einattn_exec::npy::read(&given.join("AV.npy")).expect("AV.npy");
    let (rows, cols) = (v.shape[0], v.shape[1]);
    let mean: Vec<f64> = (0..cols)
        .map(|f| (0..rows).map(|m| v.values[m * cols + f]).sum::<f64>() / rows as f64)
        .collect();
    let want: Vec<f64> = (0..av.shape[0]).flat_map(|_| mean.clone()).collect();
    let err = relative_difference(&av.values, &want);
    assert!(err < 1e-2, "relative difference {err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `check --input ... --save-outputs DIR`: the GPU's outputs on the user's tensors, beside
/// the interpreter's on the same tensors (what a user compares with their own model).
#[test]
fn check_runs_on_given_values_and_saves_its_outputs() {
    let dir = std::env::temp_dir().join(format!("einattn-given-check-{}", std::process::id()));
    let (reference, gpu) = (dir.join("reference"), dir.join("gpu"));
    let sizes = ["-D", "M=256", "-D", "TILE=64"];
    let reference_arg = reference.display().to_string();
    let mut args = vec!["run", "examples/attention_1pass.ein"];
    args.extend(sizes);
    args.extend(["--seed", "9", "--param", "scale=0.2"]);
    args.extend(["--out", &reference_arg]);
    let out = einattn(&args);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let inputs: Vec<String> = ["Q", "K", "V"]
        .iter()
        .map(|n| format!("{n}={}", reference.join(format!("{n}.npy")).display()))
        .collect();
    let gpu_arg = gpu.display().to_string();
    let mut args = vec!["check", "examples/attention_1pass.ein"];
    args.extend(sizes);
    args.extend(["--param", "scale=0.2", "--save-outputs", &gpu_arg]);
    for i in &inputs {
        args.extend(["--input", i]);
    }
    let out = einattn(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    match out.status.code() {
        Some(3) => {
            println!("no GPU here: only the refusal is checked");
            assert!(String::from_utf8_lossy(&out.stderr).contains("no GPU"));
        }
        Some(0) => {
            assert!(stdout.contains("PASS"), "{stdout}");
            assert!(stdout.contains("given: scale = 0.2, Q from"), "{stdout}");
            let want = einattn_exec::npy::read(&reference.join("AV.npy")).expect("reference");
            let got = einattn_exec::npy::read(&gpu.join("AV.npy")).expect("saved");
            assert_eq!(got.shape, want.shape);
            let err = relative_difference(&got.values, &want.values);
            assert!(err < 2e-2, "relative difference {err}");
        }
        other => panic!("exit {other:?}\n{stdout}\n{out:?}"),
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `check --grad`: the backward kernels of `grad`'s cascade on the values a forward pass
/// leaves; a cascade `grad` refuses is refused at its line before any GPU lookup.
#[test]
fn check_grad_runs_the_backward_kernels_or_says_why_not() {
    let out = einattn(&[
        "check",
        "examples/attention_1pass.ein",
        "-D",
        "M=128",
        "--grad",
        "--seed",
        "1",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(3) => assert!(stderr.contains("no GPU"), "{stderr}"),
        Some(0) => {
            assert!(
                stdout.starts_with("backward of `attention_1pass`"),
                "{stdout}"
            );
            // The forward's saved values and the output gradient, not drawn ones.
            let given = stdout.lines().find(|l| l.starts_with("given: "));
            let given = given.unwrap_or_else(|| panic!("{stdout}"));
            for name in ["AV", "RD_final", "RM_final", "dAV"] {
                assert!(given.contains(name), "{given}");
            }
            assert!(stdout.contains("PASS"), "{stdout}");
        }
        other => panic!("exit {other:?}\n{stdout}\n{stderr}"),
    }
    // A cascade grad refuses: its located reason, before any GPU lookup.
    let out = einattn(&[
        "check",
        "tests/filetests/grad/refused_scatter.ein",
        "--grad",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("tests/filetests/grad/refused_scatter.ein:"),
        "{stderr}"
    );
    // Lightning's backward (its state's adjoint a reverse recurrence) runs, or no GPU.
    let out = einattn(&[
        "check",
        "examples/lightning.ein",
        "-D",
        "N=128",
        "-D",
        "D=16",
        "--grad",
        "--seed",
        "1",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(3) => assert!(stderr.contains("no GPU"), "{stderr}"),
        Some(0) => assert!(stdout.contains("PASS"), "{stdout}"),
        other => panic!("exit {other:?}\n{stdout}\n{stderr}"),
    }
}

#[test]
fn linear_attention_compiles_to_its_kernels_and_strategies_are_selectable() {
    let dir = std::env::temp_dir().join(format!("einattn-cli-linear-{}", std::process::id()));
    let d = dir.to_str().expect("utf-8 path");
    let out = einattn(&[
        "compile",
        "examples/lightning.ein",
        "-D",
        "N=4096",
        "--strategy",
        "chunked",
        "--chunk-tokens",
        "512",
        "-o",
        d,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("manifest.json")).expect("manifest written"),
    )
    .expect("manifest is JSON");
    // Two kernels: the chunk states first, then the outputs.
    let launch = manifest["launch"].as_array().expect("launch order");
    assert_eq!(launch.len(), 2);
    assert!(launch[0].as_str().is_some_and(|e| e.contains("_states_")));
    assert!(launch[1].as_str().is_some_and(|e| e.contains("_outputs_")));
    for k in manifest["kernels"].as_array().expect("kernels") {
        assert!(dir.join(k["ptx"].as_str().expect("ptx")).is_file());
        assert!(k["family"]["schedule"]["strategy"]
            .as_str()
            .expect("strategy")
            .contains("Chunked"));
    }
    let _ = std::fs::remove_dir_all(&dir);

    let single = einattn(&[
        "compile",
        "examples/lightning.ein",
        "--strategy",
        "single",
        "--emit",
        "schedule",
    ]);
    assert!(single.status.success());
    assert!(String::from_utf8_lossy(&single.stdout).contains("single pass"));
    // The look-back strategy: one kernel, one CTA per block, a flags array to zero.
    let lb_dir = dir.with_extension("lookback");
    let lb = einattn(&[
        "compile",
        "examples/lightning.ein",
        "-D",
        "N=4096",
        "--strategy",
        "lookback",
        "-o",
        lb_dir.to_str().expect("utf-8 path"),
    ]);
    assert!(
        lb.status.success(),
        "{}",
        String::from_utf8_lossy(&lb.stderr)
    );
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(lb_dir.join("manifest.json")).expect("manifest written"),
    )
    .expect("manifest is JSON");
    assert_eq!(manifest["launch"].as_array().map(Vec::len), Some(1));
    let kernel = &manifest["kernels"][0];
    assert_eq!(kernel["family"]["schedule"]["strategy"], "LookBack");
    let d = kernel["sizes"]["head_dim"].as_u64().expect("head_dim");
    assert_eq!(kernel["grid"][2].as_u64(), Some(4096u64.div_ceil(d)));
    let flags = kernel["params"]
        .as_array()
        .expect("params")
        .iter()
        .find(|p| p["name"] == "look_back_flags")
        .expect("a flags parameter");
    assert_eq!(flags["from"]["scratch"]["scratch"], "look_back_flags");
    let scratch = kernel["scratch"]
        .as_array()
        .expect("scratch")
        .iter()
        .find(|s| s["name"] == "look_back_flags")
        .expect("the flags are scratch");
    assert_eq!(scratch["zero_before_launch"], true);
    let _ = std::fs::remove_dir_all(&lb_dir);
    let bad = einattn(&[
        "compile",
        "examples/lightning.ein",
        "--chunk-tokens",
        "100",
        "--emit",
        "ptx",
    ]);
    assert_eq!(
        bad.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

#[test]
fn check_sp_needs_gpus_or_runs_lasp2() {
    let out = einattn(&["check", "examples/lightning.ein", "--sp", "2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(3) => assert!(
            stderr.contains("no GPU") || stderr.contains("NCCL"),
            "{stderr}"
        ),
        Some(0) => assert!(String::from_utf8_lossy(&out.stdout).contains("PASS")),
        other => panic!("exit {other:?}: {stderr}"),
    }
    // Softmax attention: the all-gather-K/V zigzag plan, which needs N divisible by 2P.
    let softmax = einattn(&["check", "examples/attention_causal.ein", "--sp", "2"]);
    assert!(
        matches!(softmax.status.code(), Some(0 | 3)),
        "{}",
        String::from_utf8_lossy(&softmax.stderr)
    );
    let ragged = einattn(&[
        "check",
        "examples/attention_causal.ein",
        "-D",
        "N=1000",
        "-D",
        "TILE=8",
        "--sp",
        "3",
    ]);
    // 1000 tokens do not cut into 6 zigzag chunks of whole tiles: no scheme applies, and
    // the planner says why for each.
    assert_eq!(
        ragged.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&ragged.stderr)
    );
    assert!(String::from_utf8_lossy(&ragged.stderr).contains("no scheme applies"));
    let one = einattn(&["check", "examples/lightning.ein", "--sp", "1"]);
    assert_eq!(one.status.code(), Some(2));
}

#[test]
fn option_errors_of_a_recognized_kernel_stand_alone() {
    // Lightning is read as linear attention; a bad stage count is that kernel's error, not
    // a reason to report that it is not softmax attention.
    let out = einattn(&[
        "compile",
        "examples/lightning.ein",
        "--stages",
        "1",
        "--emit",
        "ptx",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stages"), "{err}");
    assert!(!err.contains("softmax"), "{err}");
    let out = einattn(&[
        "compile",
        "examples/attention_1pass.ein",
        "--tile",
        "m0=48",
        "--emit",
        "ptx",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no kernel shape fits"), "{err}");
    assert!(!err.contains("linear attention"), "{err}");
}

#[test]
fn compile_sp_writes_a_runnable_plan_directory() {
    let dir = std::env::temp_dir().join(format!("einattn-plan-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let dir_s = dir.to_string_lossy().to_string();
    let out = einattn(&[
        "compile",
        "examples/lightning.ein",
        "-D",
        "N=2048",
        "--sp",
        "2",
        "-o",
        &dir_s,
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("plan.json")).expect("plan.json"))
            .expect("plan.json parses");
    assert_eq!(plan["scheme"], "lasp2");
    assert_eq!(plan["world_size"], 2);
    // The executor's kernels: the chunk-state and chunk-output kernels and the element-wise
    // ones, each a PTX module with its entry.
    let mut entries = Vec::new();
    for e in std::fs::read_dir(&dir).expect("dir") {
        let p = e.expect("entry").path();
        if p.extension().is_some_and(|x| x == "ptx") {
            let text = std::fs::read_to_string(&p).expect("ptx");
            let stem = p.file_stem().expect("stem").to_string_lossy().to_string();
            assert!(text.contains(&format!(".entry {stem}(")), "{stem}");
            entries.push(stem);
        }
    }
    entries.sort();
    assert!(
        entries.iter().any(|e| e.contains("_states_c")),
        "{entries:?}"
    );
    assert!(
        entries.iter().any(|e| e.contains("_outputs_c")),
        "{entries:?}"
    );
    assert!(entries.contains(&"einattn_prefix_combine".to_string()));
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("build.json")).expect("build"))
            .expect("build.json parses");
    assert_eq!(record["defines"][0][0], "N");
    assert!(dir.join("source.ein").is_file());
    // Without GPUs run-plan stops at the device (3); with them it runs and checks.
    let run = einattn(&["run-plan", &dir_s]);
    match run.status.code() {
        Some(3) => {}
        Some(0) => assert!(String::from_utf8_lossy(&run.stdout).contains("PASS")),
        other => panic!("exit {other:?}: {}", String::from_utf8_lossy(&run.stderr)),
    }
    // A ring plan carries its partial, epilogue and merge kernels; run-plan stops at the
    // device without GPUs, and `--cpu` runs it on the CPU executor.
    let ring_dir = dir.join("ring");
    let ring_s = ring_dir.to_string_lossy().to_string();
    let out = einattn(&[
        "compile",
        "examples/attention_causal.ein",
        "--sp",
        "2",
        "--scheme",
        "ring",
        "-o",
        &ring_s,
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest = std::fs::read_to_string(ring_dir.join("manifest.json")).expect("manifest");
    for entry in ["_partial", "einattn_lse_merge", "einattn_lse_epilogue_bf16"] {
        assert!(
            manifest.contains(entry),
            "{entry} missing from the manifest"
        );
    }
    let run = einattn(&["run-plan", &ring_s]);
    match run.status.code() {
        Some(3) => {}
        Some(0) => assert!(String::from_utf8_lossy(&run.stdout).contains("PASS")),
        other => panic!("exit {other:?}: {}", String::from_utf8_lossy(&run.stderr)),
    }
    let cpu = einattn(&["run-plan", &ring_s, "--cpu", "--seed", "5"]);
    assert_eq!(
        cpu.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&cpu.stderr)
    );
    assert!(String::from_utf8_lossy(&cpu.stdout).contains("PASS"));
    // bench --sp times the plan without a reference: exit 3 without GPUs.
    let bench = einattn(&[
        "bench",
        "examples/lightning.ein",
        "-D",
        "N=2048",
        "--sp",
        "2",
    ]);
    match bench.status.code() {
        Some(3) => {}
        Some(0) => assert!(String::from_utf8_lossy(&bench.stdout).contains("predicted")),
        other => panic!("exit {other:?}: {}", String::from_utf8_lossy(&bench.stderr)),
    }
    let missing = einattn(&["run-plan", &dir.join("nothing").to_string_lossy()]);
    assert_eq!(missing.status.code(), Some(1));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `run-plan DIR` launches the PTX found in DIR: the plan passes with the modules `compile`
/// wrote and fails once its output kernel is edited to return at once (the output stays
/// NaN). Runs every rank on one GPU (`--one-gpu`); skips where there is none.
#[test]
fn run_plan_launches_the_ptx_found_in_its_folder() {
    let dir = std::env::temp_dir().join(format!("einattn-cli-edit-{}", std::process::id()));
    let d = dir.to_string_lossy().to_string();
    let out = einattn(&[
        "compile",
        "examples/lightning.ein",
        "-D",
        "N=2048",
        "--sp",
        "2",
        "-o",
        &d,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = einattn(&["run-plan", &d, "--one-gpu", "--seed", "1"]);
    if run.status.code() == Some(3) {
        eprintln!("SKIPPED: {}", String::from_utf8_lossy(&run.stderr).trim());
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    let stdout = String::from_utf8_lossy(&run.stdout).to_string();
    assert_eq!(
        run.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("PASS"), "{stdout}");
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("manifest.json")).expect("manifest written"),
    )
    .expect("manifest is JSON");
    let outputs = manifest["kernels"]
        .as_array()
        .expect("kernels")
        .iter()
        .find(|k| {
            k["kernel"]
                .as_str()
                .is_some_and(|e| e.contains("_outputs_"))
        })
        .expect("an output kernel");
    let path = dir.join(outputs["ptx"].as_str().expect("its module"));
    let ptx = std::fs::read_to_string(&path).expect("module");
    let body = ptx
        .find(".entry")
        .and_then(|e| ptx[e..].find("\n{\n").map(|b| e + b + 3));
    let at = body.expect("an entry body");
    std::fs::write(&path, format!("{}\tret;\n{}", &ptx[..at], &ptx[at..])).expect("edit");
    let edited = einattn(&["run-plan", &d, "--one-gpu", "--seed", "1"]);
    let stdout = String::from_utf8_lossy(&edited.stdout);
    assert_eq!(
        edited.status.code(),
        Some(1),
        "{stdout}{}",
        String::from_utf8_lossy(&edited.stderr)
    );
    assert!(stdout.contains("FAIL"), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A small deterministic generator for the corruption test (no dependency needed).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Paths (as JSON pointers) of every value under `v` whose key is in `keys` (array items
/// of such a key included).
fn pointers(v: &serde_json::Value, at: String, keys: &[&str], out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                let p = format!("{at}/{k}");
                if keys.contains(&k.as_str()) {
                    out.push(p.clone());
                    if let serde_json::Value::Array(items) = x {
                        for i in 0..items.len() {
                            out.push(format!("{p}/{i}"));
                        }
                    }
                }
                pointers(x, p, keys, out);
            }
        }
        serde_json::Value::Array(items) => {
            for (i, x) in items.iter().enumerate() {
                pointers(x, format!("{at}/{i}"), keys, out);
            }
        }
        _ => {}
    }
}

/// 200 plan folders corrupted at random (the numbers, names and keys that say what runs
/// where, the kernels' contracts and modules, or the file cut short) are refused by
/// run-plan's validation on the CPU: exit 1 with a message, never a GPU lookup (exit 3),
/// never a panic.
#[test]
fn corrupted_plans_are_refused_before_any_gpu_lookup() {
    let base = std::env::temp_dir().join(format!("einattn-cli-corrupt-{}", std::process::id()));
    let mut folders = Vec::new();
    for (file, scheme) in [
        ("examples/lightning.ein", "lasp2"),
        ("examples/attention_causal.ein", "ulysses"),
    ] {
        let dir = base.join(scheme);
        let out = einattn(&[
            "compile",
            file,
            "-D",
            "N=2048",
            "--sp",
            "2",
            "--scheme",
            scheme,
            "-o",
            &dir.to_string_lossy(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        folders.push(dir);
    }
    const NUMBERS: &[&str] = &[
        "world_size",
        "rank",
        "elements",
        "offset",
        "count",
        "start",
        "len",
        "shape",
        "peer",
        "chunks",
        "count_per_peer",
        "slot_elements",
        "first",
        "dim",
        "perm",
        "out_offset",
        "decay_offset",
    ];
    const NAMES: &[&str] = &["buffer", "tensor", "dtype", "launch", "format"];
    let mut rng = Lcg(20261203);
    for case in 0..200 {
        let src = &folders[case % folders.len()];
        let dir = base.join(format!("case{case}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("case folder");
        for entry in std::fs::read_dir(src).expect("plan folder").flatten() {
            std::fs::copy(entry.path(), dir.join(entry.file_name())).expect("copy");
        }
        let target = if rng.below(4) == 0 {
            "manifest.json"
        } else {
            "plan.json"
        };
        let path = dir.join(target);
        let text = std::fs::read_to_string(&path).expect("json");
        let mut value: serde_json::Value = serde_json::from_str(&text).expect("parses");
        let what = match rng.below(5) {
            0 => {
                let cut = rng.below(text.len());
                std::fs::write(&path, &text[..cut]).expect("write");
                format!("{target} cut at byte {cut}")
            }
            1 | 2 => {
                let mut at = Vec::new();
                let keys: &[&str] = if target == "plan.json" {
                    NUMBERS
                } else {
                    &["grid", "block", "dynamic_shared_bytes", "sizes"]
                };
                pointers(&value, String::new(), keys, &mut at);
                let p = at[rng.below(at.len())].clone();
                let wild = [u64::MAX, 1 << 40, (1 << 32) + 7][rng.below(3)];
                if let Some(v) = value.pointer_mut(&p) {
                    *v = if v.is_object() {
                        serde_json::json!({"n_q": wild})
                    } else {
                        serde_json::json!(wild)
                    };
                }
                std::fs::write(&path, value.to_string()).expect("write");
                format!("{target}{p} = {wild}")
            }
            3 => {
                let mut at = Vec::new();
                let keys: &[&str] = if target == "plan.json" {
                    NAMES
                } else {
                    &["kernel", "ptx", "tensor", "scratch"]
                };
                pointers(&value, String::new(), keys, &mut at);
                let p = at[rng.below(at.len())].clone();
                if let Some(v) = value.pointer_mut(&p) {
                    *v = if v.is_array() {
                        serde_json::json!(["q9z"])
                    } else if v.is_object() {
                        serde_json::json!({"scratch": "q9z"})
                    } else {
                        serde_json::json!("q9z")
                    };
                }
                std::fs::write(&path, value.to_string()).expect("write");
                format!("{target}{p} = q9z")
            }
            _ => {
                // A module of the plan deleted.
                let modules: Vec<_> = std::fs::read_dir(&dir)
                    .expect("case")
                    .flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "ptx"))
                    .collect();
                let m = &modules[rng.below(modules.len())];
                std::fs::remove_file(m.path()).expect("remove");
                format!("{} deleted", m.file_name().to_string_lossy())
            }
        };
        let run = einattn(&["run-plan", &dir.to_string_lossy(), "--seed", "1"]);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(1), "case {case} ({what}): {stderr}");
        assert!(
            stderr.starts_with("error: "),
            "case {case} ({what}): {stderr}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn compile_optimize_compiles_every_example_that_compile_compiles() {
    let dir = std::env::temp_dir().join(format!("einattn-cli-optimize-{}", std::process::id()));
    let dir_s = dir.display().to_string();
    let mut examples: Vec<std::path::PathBuf> = std::fs::read_dir("examples")
        .expect("examples/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "ein"))
        .collect();
    examples.sort();
    let mut compiled = 0;
    for path in &examples {
        let file = path.display().to_string();
        if !einattn(&["compile", &file, "-o", &dir_s]).status.success() {
            continue;
        }
        compiled += 1;
        let out = einattn(&["compile", "--optimize", &file, "-o", &dir_s]);
        assert!(
            out.status.success(),
            "{file}: compile accepts it, compile --optimize does not:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(compiled >= 13, "{compiled} examples compiled");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn run_warns_about_the_nan_of_a_running_max_started_at_minus_inf() {
    let dir = std::env::temp_dir().join(format!("einattn-cli-nan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    // The sliding-window example with its running max started at -inf: rows whose first
    // key tiles are all outside the window compute exp(-inf - -inf).
    let source = std::fs::read_to_string("examples/attention_sliding_window.ein")
        .expect("example")
        .replace(
            "init RM[b, h, 0, p]   = -1e30",
            "init RM[b, h, 0, p]   = -inf",
        );
    assert!(source.contains("= -inf"));
    let file = dir.join("window.ein");
    std::fs::write(&file, source).expect("write");
    let out = einattn(&[
        "run",
        &file.display().to_string(),
        "-D",
        "N=32",
        "-D",
        "W=8",
        "-D",
        "TILE=8",
        "-D",
        "D=4",
        "--out",
        &dir.join("out").display().to_string(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("warning: `C` computes NaN at"), "{stderr}");
    assert!(stderr.contains("-inf - -inf"), "{stderr}");
    assert!(
        stderr.contains("running max `RM` starts at -inf"),
        "{stderr}"
    );
    // The example as shipped (finite start) runs clean.
    let clean = einattn(&[
        "run",
        "examples/attention_sliding_window.ein",
        "-D",
        "N=32",
        "-D",
        "W=8",
        "-D",
        "TILE=8",
        "-D",
        "D=4",
        "--out",
        &dir.join("clean").display().to_string(),
    ]);
    assert!(clean.status.success());
    assert!(
        !String::from_utf8_lossy(&clean.stderr).contains("NaN"),
        "{}",
        String::from_utf8_lossy(&clean.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_term_summed_over_a_rank_it_lacks_is_reported_on_stderr() {
    let dir = std::env::temp_dir().join(format!("einattn-cli-summed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("bias.ein");
    std::fs::write(
        &file,
        "kernel bias\nsize N = 8\nrank e: 4\nrank m: N\nrank p: N\ninput Q[p, e]: f32\n\
         input K[m, e]: f32\ninput bias[p]: f32\noutput S[m, p]: f32\n\
         S[m, p] = 0.5 * Q[p, e] * K[m, e] + bias[p]\n",
    )
    .expect("write");
    let out = einattn(&["analyze", &file.display().to_string()]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: this term does not depend on `e`") && stderr.contains(":10:"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
