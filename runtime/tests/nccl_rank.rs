//! On a machine with GPUs and NCCL: one process per GPU joins through [`NcclRank`] and the
//! collectives move the right data. Elsewhere the test prints why it skipped (CI has no GPU).

mod common;

use std::time::Duration;

use common::{run_ranks, CHILD_MARKER};
use einattn_runtime::nccl::nccl_present;
use einattn_runtime::{Gpu, LaunchEnv, NcclRank, RuntimeError};

/// The GPUs this machine has (ranks of the test job), or why none can be used.
fn gpu_count() -> Result<usize, String> {
    match Gpu::open(0) {
        Ok(_) => {}
        Err(RuntimeError::GpuUnavailable { reason }) => return Err(reason),
        Err(e) => panic!("{e}"),
    }
    if !nccl_present() {
        return Err("libnccl.so.2 not found".into());
    }
    Ok((0..8).take_while(|&i| Gpu::open(i).is_ok()).count())
}

const COUNT: usize = 5;

fn slot_value(rank: usize, j: usize) -> f32 {
    (rank * 100 + j) as f32
}

/// One rank of `nccl_rank_collectives_across_processes`; does nothing unless started by it.
#[test]
fn child_nccl_rank() {
    if std::env::var_os(CHILD_MARKER).is_none() {
        return;
    }
    let env = LaunchEnv::from_env()
        .expect("launch variables parse")
        .expect("WORLD_SIZE is set");
    let gpu = Gpu::open(env.local_rank).expect("this rank's GPU");
    let rank = NcclRank::new(&gpu, &env).expect("joins the job");
    let (r, p) = (env.rank, env.world_size);
    assert_eq!((rank.rank(), rank.world_size()), (r, p));

    // Only this rank's slot holds data; a poisoned rest shows any slot taken from the wrong
    // place.
    let mut host = vec![-1.0f32; p * COUNT];
    for j in 0..COUNT {
        host[r * COUNT + j] = slot_value(r, j);
    }
    let send = gpu.upload(&host).expect("upload");
    let mut recv = gpu.filled(p * COUNT, f32::NAN).expect("alloc");
    rank.all_gather_region((&send, r * COUNT, &mut recv, 0), COUNT)
        .expect("all-gather slots");
    let got = gpu.download(&recv).expect("download");
    for q in 0..p {
        for j in 0..COUNT {
            assert_eq!(got[q * COUNT + j], slot_value(q, j), "slot {q} element {j}");
        }
    }

    let bits: Vec<u16> = (0..COUNT).map(|j| (r * 1000 + j) as u16).collect();
    let send16 = gpu.upload(&bits).expect("upload");
    let mut recv16 = gpu.filled(p * COUNT, 0xffffu16).expect("alloc");
    rank.all_gather_region((&send16, 0, &mut recv16, 0), COUNT)
        .expect("all-gather u16");
    let got16 = gpu.download(&recv16).expect("download");
    for q in 0..p {
        for j in 0..COUNT {
            assert_eq!(got16[q * COUNT + j], (q * 1000 + j) as u16);
        }
    }

    let sums = rank
        .all_reduce_sum_f64_host(&gpu, &[r as f64 + 0.25, 1e-300, 1.0])
        .expect("all-reduce");
    let ranks_total = (p * (p - 1) / 2) as f64;
    assert_eq!(sums.len(), 3);
    assert_eq!(sums[0], ranks_total + 0.25 * p as f64);
    // Below f32's range: survives only if the reduction runs in f64.
    assert!(
        (sums[1] / (1e-300 * p as f64) - 1.0).abs() < 1e-12,
        "{}",
        sums[1]
    );
    assert_eq!(sums[2], p as f64);

    // A short receive buffer is refused on every rank before anything reaches NCCL, so
    // the ranks stay in step.
    let mut short = gpu.filled(p * COUNT - 1, 0.0f32).expect("alloc");
    match rank.all_gather_region((&send, r * COUNT, &mut short, 0), COUNT) {
        Err(RuntimeError::InvalidArgument(_)) => {}
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    println!("RANK {r} OK");
}

#[test]
fn nccl_rank_collectives_across_processes() {
    let world = match gpu_count() {
        Ok(n) => n,
        Err(reason) => {
            eprintln!("SKIPPED: {reason}");
            return;
        }
    };
    eprintln!("running {world} ranks, one process per GPU");
    for child in run_ranks("child_nccl_rank", world, Duration::from_secs(180)) {
        assert!(
            child.success && child.stdout.contains(&format!("RANK {} OK", child.rank)),
            "rank {} failed:\n{}\n{}",
            child.rank,
            child.stdout,
            child.stderr
        );
    }
}
