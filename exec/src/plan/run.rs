//! `einattn check --sp P`, `einattn run-plan DIR` and `einattn bench --sp P`: a lowered
//! plan run by the executor on the GPUs of this host (or one per process under a
//! launcher), timed, and compared with the single-GPU kernels on the whole problem and the
//! f64 reference where the host can compute one.

use super::PlanExec;
use crate::check::{output_name, prepared_inputs, reference, INTERPRETER_MAC_LIMIT, TOLERANCE};
use crate::given::Given;
use crate::ranks::{time_plan, time_plan_reps, RankMode, Ranks};
use crate::whole::{KernelText, Whole};
use crate::{ExecError, ReportFormat, Result};
use einattn_backends::abi::KernelSet;
use einattn_backends::family::Rate;
use einattn_backends::plan::{Plan, Step};
use einattn_backends::Compiled;
use einattn_ir::cascade::Cascade;
use serde_json::json;
use std::fmt::Write as _;

/// A rate printer for plan and single-GPU times, from the family's measure.
fn rate_of(rate: Rate) -> Box<dyn Fn(f64) -> String> {
    match rate {
        Rate::Flops { flops, .. } => {
            Box::new(move |ms: f64| format!("{:.1} TFLOP/s", flops / (ms * 1e-3) / 1e12))
        }
        Rate::Tokens { tokens, .. } => {
            Box::new(move |ms: f64| format!("{:.1} Mtok/s", tokens / (ms * 1e-3) / 1e6))
        }
        Rate::Roofline { flops, .. } => {
            Box::new(move |ms: f64| format!("{:.2} TFLOP/s", flops / (ms * 1e-3) / 1e12))
        }
    }
}

/// What rank 0 runs, as `count x step` by kernel or operation.
fn steps_summary(plan: &Plan) -> String {
    let mut steps: std::collections::BTreeMap<String, usize> = Default::default();
    if let Some(r0) = plan.ranks.first() {
        for st in &r0.steps {
            let key = match st {
                Step::Kernel(k) => k.kernel.clone(),
                other => other.op_name().to_string(),
            };
            *steps.entry(key).or_default() += 1;
        }
    }
    format!(
        "rank 0 runs {}",
        steps
            .iter()
            .map(|(k, n)| format!("{n} x {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Runs a lowered plan (validated against `kernels`) on the GPUs, times it, runs the
/// single-GPU kernels of `compiled` on the whole problem, and compares both with the
/// reference: the report (rank 0's) and whether it passes.
pub fn check_plan(
    plan: &Plan,
    kernels: &KernelSet,
    compiled: &dyn Compiled,
    seed: u64,
    given: &Given,
    mapping: RankMode,
) -> Result<(String, bool)> {
    let cascade = compiled.cascade();
    let ranks = Ranks::open(plan.world_size as usize, mapping)?;
    // Every process draws the same inputs: rank 0's seed.
    let seed = ranks.shared_seed(seed)?;
    let manifest = compiled.manifest();
    let inputs = prepared_inputs(cascade, &manifest, seed, given)?;
    let device = ranks.first().name()?;
    let mut exec = PlanExec::new(plan, kernels, &ranks, cascade, &inputs)?;
    exec.run()?;
    let plan_ms = ranks.time(&mut || exec.run())?;
    let single_kernels: Vec<KernelText> = compiled
        .modules()
        .iter()
        .map(|m| (&m.contract, m.ptx.text.as_str()))
        .collect();
    let whole = Whole::load(ranks.ordinal, &single_kernels, cascade, &inputs)?;
    whole.run()?;
    let out_name = output_name(&manifest)?;
    let single = whole.output(&out_name)?;
    let single_ms = time_plan(&[&whole.gpu], &mut || whole.run(), 20)?;
    // The f64 reference where the problem is small enough to compute one on the host.
    let reference = reference(compiled, &inputs, 64 * INTERPRETER_MAC_LIMIT)?
        .and_then(|(mut values, name)| values.remove(&out_name).map(|v| (v, name)));
    let compare = |want: &[f64]| exec.compare(&out_name, want);
    let summary = SpRun {
        scheme: plan.scheme.clone(),
        devices: plan.world_size as usize,
        device,
        launcher: ranks.launcher(),
        plan_ms,
        predicted_ms: Some(plan.predicted_ms),
        rate: rate_of(compiled.rate()),
        what: steps_summary(plan),
    };
    summary.report(&ranks, &compare, (single, single_ms), reference)
}

/// `einattn bench FILE --sp P`: times a lowered plan on the GPUs (median of `reps`)
/// without a reference, so sizes past one GPU's or one host's memory run: every rank
/// draws its own slices of the sequence inputs and only the parameters come from the
/// host. Prints the cost model's prediction next to the measurement.
pub fn bench_plan(
    plan: &Plan,
    kernels: &KernelSet,
    compiled: &dyn Compiled,
    reps: usize,
    format: ReportFormat,
    given: &Given,
    mapping: RankMode,
) -> Result<String> {
    let cascade: &Cascade = compiled.cascade();
    if !given.files.is_empty() {
        return Err(ExecError::Usage(
            "`bench --sp` draws each rank's slices of the sequence on its GPU; `--input` is for `check --sp` and `bench` on one GPU".into(),
        ));
    }
    let ranks = Ranks::open(plan.world_size as usize, mapping)?;
    let mut params = einattn_ir::interp::random_inputs_of(cascade, 0, |t| {
        t.kind == einattn_ir::cascade::TensorKind::Param
    });
    given.apply(cascade, &mut params)?;
    let device = ranks.first().name()?;
    let mut exec = PlanExec::new(plan, kernels, &ranks, cascade, &params)?;
    exec.run()?;
    let ms = time_plan_reps(&ranks, &mut || exec.run(), reps)?;
    let (rate, unit) = match compiled.rate() {
        Rate::Tokens { tokens, .. } => (tokens / (ms * 1e-3) / 1e6, "Mtok/s"),
        Rate::Flops { flops, .. } | Rate::Roofline { flops, .. } => {
            (flops / (ms * 1e-3) / 1e12, "TFLOP/s")
        }
    };
    if !ranks.leader() {
        return Ok(String::new());
    }
    let value = json!({
        "device": device, "devices": plan.world_size, "launcher": ranks.launcher(),
        "cascade": cascade.name, "scheme": plan.scheme, "tokens": plan.sequence.tokens,
        "median_ms": ms, "reps": reps, "rate": rate, "rate_unit": unit,
        "predicted_ms": plan.predicted_ms, "measured_over_predicted": ms / plan.predicted_ms,
    });
    Ok(match format {
        ReportFormat::Json => {
            serde_json::to_string_pretty(&value).map_err(|e| ExecError::Input(e.to_string()))?
                + "\n"
        }
        ReportFormat::Text => format!(
            "devices: {} x {device} ({})\nplan: {} over {} tokens\nmedian {ms:.4} ms over {reps} runs ({rate:.1} {unit})\ncost model: predicted {:.4} ms; measured / predicted = {:.3}\n",
            plan.world_size,
            ranks.launcher(),
            plan.scheme,
            plan.sequence.tokens,
            plan.predicted_ms,
            ms / plan.predicted_ms
        ),
    })
}

/// The error parts (see [`error_parts`]) of this process's outputs against a reference.
type ErrorParts<'a> = dyn Fn(&[f64]) -> crate::Result<[f64; 2]> + 'a;

/// What an SP check measured, printed the same way for every scheme.
struct SpRun<F: Fn(f64) -> String> {
    scheme: String,
    devices: usize,
    device: String,
    launcher: &'static str,
    plan_ms: f64,
    predicted_ms: Option<f64>,
    rate: F,
    what: String,
}

impl<F: Fn(f64) -> String> SpRun<F> {
    /// The report (printed by rank 0 only) and whether it passes: against the f64
    /// `reference` when the problem is small enough to compute one, else against the
    /// single-GPU kernel's output (whose own checks against f64 run at the sizes the
    /// reference reaches). `compare` gives the error parts of this process's rows.
    fn report(
        &self,
        ranks: &Ranks,
        compare: &ErrorParts,
        (single, single_ms): (Vec<f64>, f64),
        reference: Option<(Vec<f64>, String)>,
    ) -> Result<(String, bool)> {
        let mut parts = compare(&single)?.to_vec();
        if let Some((want, _)) = &reference {
            parts.extend(compare(want)?);
        }
        let parts = ranks.sum(&parts)?;
        let rel = |num: f64, den: f64| (num / den).sqrt();
        let vs_single = rel(parts[0], parts[1]);
        let (err, name) = match &reference {
            Some((_, name)) => (rel(parts[2], parts[3]), name.as_str()),
            None => (vs_single, "the single-GPU kernel on the whole problem"),
        };
        let pass = err < TOLERANCE;
        if !ranks.leader() {
            return Ok((String::new(), pass));
        }
        let mut s = String::new();
        let _ = writeln!(
            s,
            "devices: {} x {} ({})",
            self.devices, self.device, self.launcher
        );
        let _ = writeln!(s, "plan: {} ({})", self.scheme, self.what);
        let _ = writeln!(
            s,
            "plan time: median {:.4} ms over 20 runs ({})",
            self.plan_ms,
            (self.rate)(self.plan_ms)
        );
        let _ = writeln!(
            s,
            "one GPU, whole problem: median {single_ms:.4} ms ({}); speed-up {:.3}x",
            (self.rate)(single_ms),
            single_ms / self.plan_ms
        );
        if let Some(p) = self.predicted_ms {
            let _ = writeln!(
                s,
                "cost model: predicted {p:.4} ms; measured / predicted = {:.3}",
                self.plan_ms / p
            );
        }
        if reference.is_some() {
            let _ = writeln!(s, "||out - single GPU|| / ||single GPU|| = {vs_single:.3e}");
        }
        let _ = writeln!(
            s,
            "{}: ||out - ref|| / ||ref|| = {err:.3e} against {name} (tolerance 2e-2)",
            if pass { "PASS" } else { "FAIL" }
        );
        let _ = writeln!(
            s,
            "json: {}",
            json!({"scheme": self.scheme, "devices": self.devices, "device": self.device,
                   "launcher": self.launcher, "plan_ms": self.plan_ms, "single_gpu_ms": single_ms,
                   "speedup": single_ms / self.plan_ms, "predicted_ms": self.predicted_ms,
                   "relative_error": err, "reference": name, "pass": pass})
        );
        Ok((s, pass))
    }
}
