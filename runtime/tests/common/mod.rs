//! Helpers shared by the multi-rank tests: ports, and re-running this test binary as one
//! child process per rank (the way a launcher would start the job).

#![allow(dead_code)]

use std::fs::File;
use std::net::TcpListener;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A port nobody listens on right now (the OS picks it; a race with other programs is
/// possible but unlikely within one test).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("the OS hands out an ephemeral port")
}

/// Set in a child so that its `child_test` runs instead of returning at once.
pub const CHILD_MARKER: &str = "EINATTN_TEST_CHILD";

/// What one child printed and how it ended.
pub struct ChildOutcome {
    pub rank: usize,
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Starts `world` copies of this test binary running only `child_test`, with the launch
/// variables of a torchrun job on 127.0.0.1, and waits for all of them (killing any still
/// running after `limit`, so a hang fails the test instead of stalling it).
pub fn run_ranks(child_test: &str, world: usize, limit: Duration) -> Vec<ChildOutcome> {
    let exe = std::env::current_exe().expect("the test binary knows its path");
    let port = free_port();
    // Output goes to files rather than pipes, which a chatty child (NCCL_DEBUG=INFO) could
    // fill and block on while nobody reads them.
    let log = |rank: usize, stream: &str| {
        std::env::temp_dir().join(format!(
            "einattn-{child_test}-{}-{port}-{rank}.{stream}",
            std::process::id()
        ))
    };
    let mut children: Vec<(usize, Child)> = (0..world)
        .map(|rank| {
            let stdout = File::create(log(rank, "out")).expect("a temporary file");
            let stderr = File::create(log(rank, "err")).expect("a temporary file");
            let child = Command::new(&exe)
                .args(["--exact", child_test, "--nocapture", "--test-threads=1"])
                .env(CHILD_MARKER, "1")
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .stdout(stdout)
                .stderr(stderr)
                .spawn()
                .expect("the test binary can start itself");
            (rank, child)
        })
        .collect();
    let deadline = Instant::now() + limit;
    loop {
        let all_done = children
            .iter_mut()
            .all(|(_, c)| matches!(c.try_wait(), Ok(Some(_))));
        if all_done || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    children
        .into_iter()
        .map(|(rank, mut child)| {
            if !matches!(child.try_wait(), Ok(Some(_))) {
                let _ = child.kill();
            }
            let status = child.wait().expect("the child ends once killed");
            let read = |stream: &str| {
                let path = log(rank, stream);
                let text = std::fs::read(&path).unwrap_or_default();
                let _ = std::fs::remove_file(&path);
                String::from_utf8_lossy(&text).into_owned()
            };
            ChildOutcome {
                rank,
                success: status.success(),
                stdout: read("out"),
                stderr: read("err"),
            }
        })
        .collect()
}
