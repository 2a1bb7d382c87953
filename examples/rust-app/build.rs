//! Compiles the app's attention kernels into PTX and typed launchers in `OUT_DIR`
//! (`einattn_kernels.rs`, included by `src/main.rs`). A broken `.ein` fails the build with
//! the compiler's located diagnostics.

use einattn_build::{Builder, Kernel, Target};

fn main() {
    Builder::new()
        // sm_80 PTX runs on Ampere and Hopper alike (the driver compiles it for the GPU).
        .target(Target::Sm80)
        // Causal softmax attention, head dimension 128; small enough for the interpreter.
        .add_kernel(
            Kernel::new("../attention_causal.ein")
                .define("D", 128)
                .define("N", 256),
        )
        // Lightning attention as two kernels: per-chunk states, then outputs.
        .add_kernel(
            Kernel::new("../lightning.ein")
                .name("LightningChunked")
                .define("N", 1024)
                .strategy("chunked")
                .chunk_tokens(256),
        )
        // Lightning attention as one kernel with a decoupled look-back, whose flags must
        // be zeroed before every launch.
        .add_kernel(
            Kernel::new("../lightning.ein")
                .name("LightningLookback")
                .define("N", 1024)
                .strategy("lookback"),
        )
        .compile_or_exit();
}
