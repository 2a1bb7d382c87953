//! `einattn bench`: the median time of the kernels of a compile on the whole problem, and
//! its rate against the device's peak from the machine model.

use crate::check::prepared_inputs;
use crate::given::Given;
use crate::whole::{describe_launches, KernelText, Whole};
use crate::{device, ExecError, ReportFormat, Result};
use einattn_backends::abi::{LaunchContract, Source};
use einattn_backends::family::Rate;
use einattn_backends::Compiled;
use serde_json::json;
use std::fmt::Write as _;

/// `median (min, max, reps)` as the reports print it.
pub fn timing_line(t: &einattn_runtime::Timing) -> String {
    format!(
        "median {:.4} ms (min {:.4}, max {:.4}, {} reps)",
        t.median_ms, t.min_ms, t.max_ms, t.reps
    )
}

/// The forward's kernels as a backward's benchmark launches them before its own: their
/// scratch arrays renamed (`forward.NAME`), so that none is shared with a backward kernel's
/// array of the same name and another size.
fn forward_contracts(forward: &dyn Compiled) -> Vec<(LaunchContract, String)> {
    let renamed = |n: &str| format!("forward.{n}");
    forward
        .modules()
        .iter()
        .map(|m| {
            let mut c = m.contract.clone();
            for s in &mut c.scratch {
                s.name = renamed(&s.name);
            }
            for p in &mut c.params {
                if let Source::Scratch { scratch } = &mut p.from {
                    *scratch = renamed(scratch);
                }
            }
            (c, m.ptx.text.clone())
        })
        .collect()
}

/// `einattn bench`: times `reps` runs (after a quarter as many warm-ups). With `forward`
/// (`bench --grad`: the forward's kernels, or why they did not compile), `compiled` is a
/// backward: it is timed alone and after the forward's kernels (forward + backward, the
/// attention of a training step), on the backward's drawn inputs (the forward's output,
/// where the backward reads it, is the forward kernels' own).
pub fn bench(
    compiled: &dyn Compiled,
    forward: Option<std::result::Result<&dyn Compiled, &str>>,
    reps: usize,
    format: ReportFormat,
    given: &Given,
) -> Result<String> {
    let manifest = compiled.manifest();
    let cascade = compiled.cascade();
    let inputs = prepared_inputs(cascade, &manifest, 0, given)?;
    let kernels: Vec<KernelText> = compiled
        .modules()
        .iter()
        .map(|m| (&m.contract, m.ptx.text.as_str()))
        .collect();
    let main = kernels
        .last()
        .ok_or_else(|| ExecError::Input("no kernels".into()))?
        .0;
    let owned_forward = match forward {
        Some(Ok(f)) => Ok(forward_contracts(f)),
        Some(Err(why)) => Err(format!("the forward did not compile: {why}")),
        None => Err(String::new()),
    };
    // The forward's kernels first, then the backward's; a forward that cannot be bound to
    // the backward's inputs leaves the backward timed alone.
    let (whole, n_forward, forward_note) = match &owned_forward {
        Ok(f) => {
            let mut all: Vec<KernelText> = f.iter().map(|(c, t)| (c, t.as_str())).collect();
            all.extend(kernels.iter().copied());
            match Whole::load(0, &all, cascade, &inputs) {
                Ok(w) => (w, f.len(), None),
                Err(e) => (
                    Whole::load(0, &kernels, cascade, &inputs)?,
                    0,
                    Some(format!(
                        "the forward's kernels cannot run on the backward's inputs: {e}"
                    )),
                ),
            }
        }
        Err(why) => (
            Whole::load(0, &kernels, cascade, &inputs)?,
            0,
            (!why.is_empty()).then(|| why.clone()),
        ),
    };
    let model = device::model_of(&whole.gpu, &whole.device);
    let runtime_error =
        |e: ExecError| einattn_runtime::RuntimeError::InvalidArgument(e.to_string());
    let all = 0..n_forward + kernels.len();
    let timed = |range: std::ops::Range<usize>| {
        whole.gpu.time(reps.div_ceil(4).max(3), reps, || {
            whole.run_launches(range.clone()).map_err(runtime_error)
        })
    };
    // The forward once first, so that a backward reading its output reads real values.
    whole.run_launches(0..n_forward)?;
    let t = timed(n_forward..all.end)?;
    let with_forward = if n_forward > 0 {
        Some((timed(0..n_forward)?, timed(all)?))
    } else {
        None
    };
    let launched = whole.resources()?;
    // The kernel that limits occupancy most speaks for the set.
    let registers = launched
        .iter()
        .map(|l| l.resources.registers)
        .max()
        .unwrap_or(0);
    let local_bytes = launched
        .iter()
        .map(|l| l.resources.local_bytes)
        .max()
        .unwrap_or(0);
    let family = &main.family;
    let mut value = json!({
        "device": whole.device,
        "kernel": main.kernel,
        "cascade": cascade.name,
        "problem": family.get("problem"),
        "schedule": family.get("schedule"),
        "kernels": launched.iter().map(|l| json!({
            "entry": l.entry,
            "registers": l.resources.registers,
            "local_bytes": l.resources.local_bytes,
            "dynamic_shared_bytes": l.dynamic_shared_bytes,
        })).collect::<Vec<_>>(),
        "registers": registers,
        "local_bytes": local_bytes,
        "median_ms": t.median_ms,
        "min_ms": t.min_ms,
        "max_ms": t.max_ms,
        "reps": t.reps,
    });
    let mut timing = timing_line(&t);
    // `bench --grad`: the backward's line is labelled, and forward + backward follows it.
    let (label, fb_line) = if forward.is_some() {
        let line = match &with_forward {
            Some((f, fb)) => {
                extend(
                    &mut value,
                    json!({
                        "forward_kernels": owned_forward
                            .as_ref()
                            .map(|f| f.iter().map(|(c, _)| c.kernel.clone()).collect::<Vec<_>>())
                            .unwrap_or_default(),
                        "forward_median_ms": f.median_ms,
                        "forward_backward_median_ms": fb.median_ms,
                        "forward_backward_min_ms": fb.min_ms,
                        "forward_backward_max_ms": fb.max_ms,
                    }),
                );
                format!(
                    "forward + backward: {} (forward alone median {:.4} ms)\n",
                    timing_line(fb),
                    f.median_ms
                )
            }
            None => {
                let why = forward_note.clone().unwrap_or_default();
                extend(&mut value, json!({ "forward_backward_note": why }));
                format!("forward + backward: not timed: {why}\n")
            }
        };
        // The rate stays the backward's.
        ("backward: ", line)
    } else {
        ("", String::new())
    };
    let rate = match compiled.rate() {
        Rate::Flops {
            flops,
            predicted_ms,
            at_most,
        } => {
            let tflops = flops / (t.median_ms * 1e-3) / 1e12;
            // Masks on values hide an input-dependent share of the counted work: the rate
            // is of the band masks' work, more than the kernel did.
            let peak = model
                .as_ref()
                .map(|m| m.contraction_flops)
                .filter(|_| !at_most);
            extend(
                &mut value,
                json!({
                    "flops": flops,
                    "tflops": tflops,
                    "peak_tflops": peak.map(|p| p / 1e12),
                    "percent_of_peak": peak.map(|p| 100.0 * tflops * 1e12 / p),
                    "predicted_ms": predicted_ms,
                    "flops_counted": if at_most { "band masks only (value masks hide more)" } else { "visible" },
                }),
            );
            let _ = write!(timing, "; predicted {predicted_ms:.4} ms");
            let mut rate = format!("{tflops:.1} TFLOP/s");
            if at_most {
                rate.push_str(
                    " of the band masks' work (the value masks hide an input-dependent share of it)",
                );
            }
            if let Some(p) = peak {
                let _ = write!(
                    rate,
                    " = {:.1}% of the {:.0} TFLOP/s tensor-core peak",
                    100.0 * tflops * 1e12 / p,
                    p / 1e12
                );
            }
            rate
        }
        Rate::Roofline {
            flops,
            bytes,
            bound_ms,
        } => {
            let secs = t.median_ms * 1e-3;
            extend(
                &mut value,
                json!({
                    "flops": flops,
                    "tflops": flops / secs / 1e12,
                    "bytes": bytes,
                    "gb_per_s": bytes / secs / 1e9,
                    "roofline_ms": bound_ms,
                    "percent_of_roofline": 100.0 * bound_ms / t.median_ms,
                }),
            );
            format!(
                "{:.2} TFLOP/s, {:.1} GB/s = {:.1}% of the analysis's roofline ({bound_ms:.4} ms)",
                flops / secs / 1e12,
                bytes / secs / 1e9,
                100.0 * bound_ms / t.median_ms
            )
        }
        Rate::Tokens { tokens, bytes } => {
            let mtok = tokens / (t.median_ms * 1e-3) / 1e6;
            let floor = model
                .as_ref()
                .map(|m| tokens / (bytes / m.memory_bandwidth) / 1e6);
            extend(
                &mut value,
                json!({
                    "mtok_per_s": mtok,
                    "ns_per_token": t.median_ms * 1e6 / tokens,
                    "memory_floor_mtok_per_s": floor,
                    "percent_of_memory_floor": floor.map(|f| 100.0 * mtok / f),
                }),
            );
            let mut rate = format!("{mtok:.1} Mtok/s");
            if let Some(f) = floor {
                let _ = write!(
                    rate,
                    " = {:.1}% of the {f:.0} Mtok/s memory floor",
                    100.0 * mtok / f
                );
            }
            rate
        }
    };
    Ok(match format {
        ReportFormat::Json => {
            serde_json::to_string_pretty(&value).map_err(|e| ExecError::Input(e.to_string()))?
        }
        ReportFormat::Text => format!(
            "device: {}\nkernel: {}\n{label}{timing}\n{fb_line}{rate}\n",
            whole.device,
            describe_launches(&launched)
        ),
    })
}

/// Adds the fields of `more` to the object `value`.
fn extend(value: &mut serde_json::Value, more: serde_json::Value) {
    if let (Some(v), serde_json::Value::Object(m)) = (value.as_object_mut(), more) {
        v.extend(m);
    }
}
