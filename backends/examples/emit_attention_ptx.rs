//! Prints the tile program and/or PTX of one attention configuration, and (with `--ptxas`)
//! the ptxas register/spill report for sm_80 and sm_90a.
//!
//! `cargo run -p einattn-backends --example emit_attention_ptx -- d=128 bf16 causal bm=128 bn=64 warps=8 stages=2 --ptxas`

use einattn_backends::ptx::ptxas;
use einattn_backends::tile::Elem;
use einattn_backends::{flash_attention, print_ptx, AttentionSchedule, AttentionSpec, Target};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut spec = AttentionSpec::new(128, Elem::Bf16);
    let mut emit_tile = false;
    let mut emit_ptx = false;
    let mut run_ptxas = false;
    let num = |a: &str| a.split('=').nth(1).and_then(|v| v.parse::<u32>().ok());
    for a in &args {
        if a.starts_with("d=") {
            spec.head_dim = num(a).unwrap_or(128);
        }
    }
    let mut sched = AttentionSchedule::default_for(&spec);
    for a in &args {
        match a.as_str() {
            "bf16" => spec.elem = Elem::Bf16,
            "f16" => spec.elem = Elem::F16,
            "causal" => spec.causal = true,
            "alibi" => spec.alibi = true,
            "softcap" => spec.softcap = true,
            "lse" => spec.write_lse = true,
            "--tile" => emit_tile = true,
            "--ptx" => emit_ptx = true,
            "--ptxas" => run_ptxas = true,
            "qsmem" => sched.q_in_registers = false,
            "qreg" => sched.q_in_registers = true,
            "noskip" => sched.skip_unit_rescale = false,
            s if s.starts_with("win=") => spec.window = num(s),
            s if s.starts_with("bm=") => sched.block_m = num(s).unwrap_or(sched.block_m),
            s if s.starts_with("bn=") => sched.block_n = num(s).unwrap_or(sched.block_n),
            s if s.starts_with("warps=") => sched.warps = num(s).unwrap_or(sched.warps),
            s if s.starts_with("stages=") => sched.stages = num(s).unwrap_or(sched.stages),
            _ => {}
        }
    }
    let (prog, _) = match flash_attention(&spec, &sched) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    if emit_tile {
        println!("{prog}");
    }
    let k = match print_ptx(&prog, Target::Sm80) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    if emit_ptx {
        println!("{}", k.text);
    }
    if run_ptxas {
        let Some(bin) = ptxas::find_ptxas() else {
            eprintln!("ptxas not found");
            std::process::exit(2);
        };
        for arch in ["sm_80", "sm_90a"] {
            match ptxas::assemble(&bin, &k.text, arch) {
                Ok(r) => println!(
                    "{} {arch}: {} regs, spill st {} ld {}, stack {}, smem {} (dyn {}) {:?}",
                    k.entry,
                    r.registers,
                    r.spill_stores,
                    r.spill_loads,
                    r.stack_frame,
                    r.shared_bytes,
                    k.dynamic_smem_bytes,
                    sched
                ),
                Err(e) => {
                    eprintln!("{e}");
                    std::process::exit(1);
                }
            }
        }
    }
}
