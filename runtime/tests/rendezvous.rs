//! The rendezvous that hands rank 0's NCCL id to every rank, on the CPU: ranks are threads (or
//! child processes) talking over 127.0.0.1.

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::thread::{sleep, spawn, JoinHandle};
use std::time::Duration;

use common::{free_port, run_ranks, CHILD_MARKER};
use einattn_runtime::rendezvous::{share_bytes_within, PAYLOAD_BYTES};
use einattn_runtime::{share_bytes, LaunchEnv, RuntimeError};

/// Long enough never to trip in a healthy test, short enough that a broken one fails fast.
const WAIT: Duration = Duration::from_secs(20);

fn env(rank: usize, world_size: usize, port: u16) -> LaunchEnv {
    LaunchEnv {
        rank,
        world_size,
        local_rank: rank,
        master_addr: "127.0.0.1".into(),
        master_port: port,
    }
}

/// Bytes no zero-filled or constant buffer matches.
fn pattern() -> [u8; PAYLOAD_BYTES] {
    std::array::from_fn(|i| (i as u8).wrapping_mul(37) ^ 0x5a)
}

type Outcome = Result<[u8; PAYLOAD_BYTES], RuntimeError>;

fn start(e: LaunchEnv, wait: Duration) -> JoinHandle<Outcome> {
    let payload = (e.rank == 0).then(pattern);
    spawn(move || share_bytes_within(&e, payload, wait))
}

fn message(r: Outcome) -> String {
    match r {
        Err(RuntimeError::Rendezvous(m)) => m,
        other => panic!("expected a rendezvous error, got {other:?}"),
    }
}

#[test]
fn three_ranks_get_rank_0s_bytes() {
    let port = free_port();
    let ranks: Vec<_> = (0..3).map(|r| start(env(r, 3, port), WAIT)).collect();
    for (r, h) in ranks.into_iter().enumerate() {
        let got = h.join().expect("no panic").expect("rendezvous succeeds");
        assert_eq!(got, pattern(), "rank {r}");
    }
}

#[test]
fn rank_0_starting_last_still_works() {
    let port = free_port();
    let peers: Vec<_> = (1..4).map(|r| start(env(r, 4, port), WAIT)).collect();
    // Long enough for several refused connection attempts.
    sleep(Duration::from_millis(600));
    assert!(
        peers.iter().all(|h| !h.is_finished()),
        "peers must keep retrying until rank 0 is up"
    );
    let rank0 = start(env(0, 4, port), WAIT);
    assert_eq!(rank0.join().expect("no panic").expect("rank 0"), pattern());
    for h in peers {
        assert_eq!(h.join().expect("no panic").expect("peer"), pattern());
    }
}

#[test]
fn world_size_mismatch_fails_on_both_sides() {
    let port = free_port();
    let rank0 = start(env(0, 3, port), WAIT);
    let stray = start(env(1, 2, port), WAIT);
    let m0 = message(rank0.join().expect("no panic"));
    assert!(
        m0.contains("WORLD_SIZE=2") && m0.contains("WORLD_SIZE=3"),
        "{m0}"
    );
    let m1 = message(stray.join().expect("no panic"));
    assert!(m1.contains("WORLD_SIZE mismatch"), "{m1}");
    assert!(m1.contains(&format!("127.0.0.1:{port}")), "{m1}");
}

#[test]
fn a_rank_that_never_comes_is_named_by_rank_0_and_the_others_fail_too() {
    let port = free_port();
    let wait = Duration::from_millis(800);
    let rank0 = start(env(0, 3, port), wait);
    let rank1 = start(env(1, 3, port), wait);
    let m0 = message(rank0.join().expect("no panic"));
    assert!(
        m0.contains("1 of 2") && m0.contains("missing rank(s) 2"),
        "{m0}"
    );
    let m1 = message(rank1.join().expect("no panic"));
    assert!(m1.contains("closed the connection"), "{m1}");
}

#[test]
fn unreachable_rank_0_is_reported_with_its_address() {
    let port = free_port();
    let m = message(
        start(env(2, 3, port), Duration::from_millis(300))
            .join()
            .expect("no panic"),
    );
    assert!(
        m.contains("could not reach rank 0") && m.contains(&format!("127.0.0.1:{port}")),
        "{m}"
    );
}

#[test]
fn two_processes_claiming_one_rank_are_refused() {
    let port = free_port();
    let rank0 = start(env(0, 3, port), WAIT);
    let a = start(env(1, 3, port), WAIT);
    let b = start(env(1, 3, port), WAIT);
    let m0 = message(rank0.join().expect("no panic"));
    assert!(m0.contains("two processes claim RANK=1"), "{m0}");
    let peers = [
        message(a.join().expect("no panic")),
        message(b.join().expect("no panic")),
    ];
    assert!(
        peers.iter().any(|m| m.contains("already joined")),
        "{peers:?}"
    );
}

#[test]
fn a_foreign_service_on_the_port_is_recognized() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = listener.local_addr().expect("address").port();
    let service = spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let _ = s.write_all(&[b'x'; 200]);
        }
    });
    let m = message(start(env(1, 2, port), WAIT).join().expect("no panic"));
    assert!(m.contains("not an einattn rendezvous"), "{m}");
    service.join().expect("no panic");
}

#[test]
fn rank_0_reports_a_port_in_use() {
    let taken = TcpListener::bind("0.0.0.0:0").expect("listen");
    let port = taken.local_addr().expect("address").port();
    let m = message(start(env(0, 2, port), WAIT).join().expect("no panic"));
    assert!(
        m.contains("could not listen") && m.contains(&format!("MASTER_PORT={port}")),
        "{m}"
    );
}

#[test]
fn rank_0_needs_the_payload_and_a_single_rank_needs_no_network() {
    match share_bytes(&env(0, 2, free_port()), None) {
        Err(RuntimeError::InvalidArgument(m)) => assert!(m.contains("rank 0"), "{m}"),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    // Nobody listens on this port: a lone rank must not try to meet anyone.
    assert_eq!(
        share_bytes(&env(0, 1, free_port()), Some(pattern())).expect("alone"),
        pattern()
    );
}

#[test]
fn hand_built_env_is_validated() {
    match share_bytes(&env(3, 3, free_port()), None) {
        Err(RuntimeError::InvalidArgument(m)) => assert!(m.contains("RANK=3"), "{m}"),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

/// One rank of `separate_processes_read_their_environment_and_meet`; does nothing unless
/// started by it.
#[test]
fn child_rendezvous_rank() {
    if std::env::var_os(CHILD_MARKER).is_none() {
        return;
    }
    let env = LaunchEnv::from_env()
        .expect("launch variables parse")
        .expect("WORLD_SIZE is set");
    let got = share_bytes(&env, (env.rank == 0).then(pattern)).expect("rendezvous");
    let hex: String = got.iter().map(|b| format!("{b:02x}")).collect();
    println!("RANK {} PAYLOAD {hex}", env.rank);
}

#[test]
fn separate_processes_read_their_environment_and_meet() {
    let expected: String = pattern().iter().map(|b| format!("{b:02x}")).collect();
    for child in run_ranks("child_rendezvous_rank", 3, Duration::from_secs(60)) {
        assert!(
            child.success,
            "rank {} failed:\n{}\n{}",
            child.rank, child.stdout, child.stderr
        );
        let line = format!("RANK {} PAYLOAD {expected}", child.rank);
        assert!(
            child.stdout.contains(&line),
            "rank {} printed:\n{}",
            child.rank,
            child.stdout
        );
    }
}
