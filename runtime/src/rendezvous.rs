//! One process per GPU, across hosts, started by a torchrun-style launcher.
//!
//! The launcher describes the job in environment variables ([`LaunchEnv`]); the processes then
//! meet once over TCP ([`share_bytes`]) so that every rank learns the NCCL unique id that rank 0
//! drew. Nothing here touches a GPU, so all of it is testable on a CPU-only machine.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::{Result, RuntimeError};

/// Where this process sits in a multi-process job, as the launcher describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchEnv {
    /// `RANK`: this process's index among all processes of the job.
    pub rank: usize,
    /// `WORLD_SIZE`: the number of processes in the job.
    pub world_size: usize,
    /// `LOCAL_RANK`: this process's index on its host (the GPU ordinal it should use).
    pub local_rank: usize,
    /// `MASTER_ADDR`: the host rank 0 runs on (name or IP address, without brackets).
    pub master_addr: String,
    /// `MASTER_PORT`: the TCP port rank 0 listens on for the rendezvous.
    pub master_port: u16,
}

/// The variables a launcher must set once it sets `WORLD_SIZE`.
pub const LAUNCH_VARIABLES: [&str; 5] = [
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
];

/// Bytes [`share_bytes`] carries: the size of an NCCL unique id.
pub const PAYLOAD_BYTES: usize = 128;

/// How long ranks wait for each other by default. Launchers start processes on different hosts
/// at different times, and rank 0 may be the last to come up.
pub const DEFAULT_RENDEZVOUS_WAIT: Duration = Duration::from_secs(60);

/// Pause between connection attempts to rank 0.
const RETRY_SLEEP: Duration = Duration::from_millis(100);
/// One connection attempt's limit; an unreachable host would otherwise stall a try for minutes.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A peer sends its hello right after connecting, so a silent connection is not one of ours.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Rank 0 answers only once every rank has joined, which can take up to the whole wait; peers
/// wait that long plus this.
const REPLY_MARGIN: Duration = Duration::from_secs(10);

impl LaunchEnv {
    /// Reads the launch variables of this process; `Ok(None)` when `WORLD_SIZE` is unset
    /// (a single-process run).
    pub fn from_env() -> Result<Option<LaunchEnv>> {
        // A non-UTF-8 value is passed on lossily so that it fails to parse with its name.
        Self::from_lookup(|name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned()))
    }

    /// [`LaunchEnv::from_env`] over any source of variables, so parsing is testable without
    /// changing the process environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Option<LaunchEnv>> {
        let Some(world_size) = lookup("WORLD_SIZE") else {
            return Ok(None);
        };
        let world_size: usize = parse_number("WORLD_SIZE", &world_size)?;
        let get = |name: &str| {
            lookup(name).ok_or_else(|| {
                RuntimeError::InvalidArgument(format!(
                    "launch variable {name} is not set; WORLD_SIZE is, so the launcher must also \
                     set {}",
                    LAUNCH_VARIABLES.join(", ")
                ))
            })
        };
        let rank: usize = parse_number("RANK", &get("RANK")?)?;
        let local_rank: usize = parse_number("LOCAL_RANK", &get("LOCAL_RANK")?)?;
        let master_addr = parse_host(&get("MASTER_ADDR")?)?;
        let master_port: u16 = parse_number("MASTER_PORT", &get("MASTER_PORT")?)?;
        let env = LaunchEnv {
            rank,
            world_size,
            local_rank,
            master_addr,
            master_port,
        };
        env.validate()?;
        Ok(Some(env))
    }

    /// Checks what parsing checks, for values built by hand (the fields are public).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(RuntimeError::InvalidArgument(m));
        if self.world_size == 0 {
            return bad("launch variable WORLD_SIZE=0: a job needs at least one process".into());
        }
        // NCCL counts ranks in a C int; cudarc panics beyond that.
        if i32::try_from(self.world_size).is_err() {
            return bad(format!(
                "launch variable WORLD_SIZE={} exceeds NCCL's limit of {} ranks",
                self.world_size,
                i32::MAX
            ));
        }
        if self.rank >= self.world_size {
            return bad(format!(
                "launch variable RANK={} must be below WORLD_SIZE={}",
                self.rank, self.world_size
            ));
        }
        if self.master_port == 0 {
            return bad("launch variable MASTER_PORT=0: rank 0 needs a fixed port".into());
        }
        if self.master_addr.is_empty() {
            return bad("launch variable MASTER_ADDR is empty".into());
        }
        Ok(())
    }

    /// `MASTER_ADDR:MASTER_PORT` as it appears in messages (IPv6 literals in brackets).
    pub fn master(&self) -> String {
        if self.master_addr.parse::<Ipv6Addr>().is_ok() {
            format!("[{}]:{}", self.master_addr, self.master_port)
        } else {
            format!("{}:{}", self.master_addr, self.master_port)
        }
    }
}

fn parse_number<T: std::str::FromStr>(name: &str, raw: &str) -> Result<T> {
    raw.trim().parse().map_err(|_| {
        RuntimeError::InvalidArgument(format!(
            "launch variable {name}=`{raw}` is not a valid number (expected a non-negative integer \
             in range)"
        ))
    })
}

fn parse_host(raw: &str) -> Result<String> {
    let t = raw.trim();
    // Accept the bracketed IPv6 form people copy from URLs.
    let t = t
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(t);
    if t.is_empty() || t.contains(char::is_whitespace) {
        return Err(RuntimeError::InvalidArgument(format!(
            "launch variable MASTER_ADDR=`{raw}` is not a host name or IP address"
        )));
    }
    Ok(t.to_string())
}

fn rendezvous_err(message: String) -> RuntimeError {
    RuntimeError::Rendezvous(message)
}

// Wire format, little-endian. A peer sends HELLO = magic, world_size, rank; rank 0 answers
// REPLY = magic, its world_size, status, payload. Both sides carry world_size so that processes
// from two different launches sharing a port fail on both ends instead of hanging in NCCL.
const MAGIC: [u8; 8] = *b"EINRDV01";
const HELLO_BYTES: usize = 16;
const REPLY_BYTES: usize = 16 + PAYLOAD_BYTES;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok = 0,
    WorldSizeMismatch = 1,
    DuplicateRank = 2,
    BadRank = 3,
}

impl Status {
    fn from_u32(v: u32) -> Option<Status> {
        [
            Status::Ok,
            Status::WorldSizeMismatch,
            Status::DuplicateRank,
            Status::BadRank,
        ]
        .into_iter()
        .find(|s| *s as u32 == v)
    }
}

fn encode_hello(world_size: u32, rank: u32) -> [u8; HELLO_BYTES] {
    let mut b = [0u8; HELLO_BYTES];
    b[..8].copy_from_slice(&MAGIC);
    b[8..12].copy_from_slice(&world_size.to_le_bytes());
    b[12..16].copy_from_slice(&rank.to_le_bytes());
    b
}

fn encode_reply(
    world_size: u32,
    status: Status,
    payload: &[u8; PAYLOAD_BYTES],
) -> [u8; REPLY_BYTES] {
    let mut b = [0u8; REPLY_BYTES];
    b[..8].copy_from_slice(&MAGIC);
    b[8..12].copy_from_slice(&world_size.to_le_bytes());
    b[12..16].copy_from_slice(&(status as u32).to_le_bytes());
    b[16..].copy_from_slice(payload);
    b
}

/// The two u32 fields after the magic, or `None` when the magic is wrong.
fn decode_header(b: &[u8]) -> Option<(u32, u32)> {
    if b.len() < 16 || b[..8] != MAGIC {
        return None;
    }
    let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    Some((word(8), word(12)))
}

/// Gives every rank of the job the 128 bytes rank 0 holds (the NCCL unique id).
///
/// Rank 0 listens on `MASTER_PORT` (all interfaces), waits until all `world_size - 1` other
/// ranks have connected, then answers each of them; the other ranks connect to
/// `MASTER_ADDR:MASTER_PORT`, retrying while rank 0 is not up yet. Every side gives up after
/// [`DEFAULT_RENDEZVOUS_WAIT`]. `payload_if_rank0` must be `Some` on rank 0 and is ignored
/// elsewhere.
pub fn share_bytes(
    env: &LaunchEnv,
    payload_if_rank0: Option<[u8; PAYLOAD_BYTES]>,
) -> Result<[u8; PAYLOAD_BYTES]> {
    share_bytes_within(env, payload_if_rank0, DEFAULT_RENDEZVOUS_WAIT)
}

/// [`share_bytes`] with another limit on how long ranks wait for each other.
pub fn share_bytes_within(
    env: &LaunchEnv,
    payload_if_rank0: Option<[u8; PAYLOAD_BYTES]>,
    wait: Duration,
) -> Result<[u8; PAYLOAD_BYTES]> {
    env.validate()?;
    if env.rank == 0 {
        let payload = payload_if_rank0.ok_or_else(|| {
            RuntimeError::InvalidArgument("rank 0 must supply the bytes to share".into())
        })?;
        if env.world_size > 1 {
            serve(env, &payload, wait)?;
        }
        Ok(payload)
    } else {
        join(env, wait)
    }
}

/// Rank 0: collect every other rank's connection first and answer only then, so that a bad
/// launch stops everyone here instead of leaving some ranks blocked in `ncclCommInitRank`.
fn serve(env: &LaunchEnv, payload: &[u8; PAYLOAD_BYTES], wait: Duration) -> Result<()> {
    // Listen on every interface: MASTER_ADDR names this host as the others reach it, which
    // need not be an address this process can bind (NAT, service names).
    let any: SocketAddr = if env.master_addr.parse::<Ipv6Addr>().is_ok() {
        (Ipv6Addr::UNSPECIFIED, env.master_port).into()
    } else {
        ([0, 0, 0, 0], env.master_port).into()
    };
    let listener = TcpListener::bind(any).map_err(|e| {
        rendezvous_err(format!(
            "rank 0 could not listen on {any} (MASTER_PORT={}): {e}; is another job or an \
             earlier run still using the port?",
            env.master_port
        ))
    })?;
    // Non-blocking accept so that the wait has a deadline.
    listener.set_nonblocking(true).map_err(|e| {
        rendezvous_err(format!(
            "rank 0 could not configure its listener on {any}: {e}"
        ))
    })?;
    let deadline = Instant::now() + wait;
    let world = env.world_size;
    let mut peers: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
    let mut joined = 0;
    while joined < world - 1 {
        match listener.accept() {
            Ok((stream, from)) => {
                let rank = admit(env, &stream, from, &peers)?;
                peers[rank] = Some(stream);
                joined += 1;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> = (1..world)
                        .filter(|&r| peers[r].is_none())
                        .map(|r| r.to_string())
                        .collect();
                    return Err(rendezvous_err(format!(
                        "rank 0 listening on {any} heard from {joined} of {} ranks within {:.1} s; \
                         still missing rank(s) {}",
                        world - 1,
                        wait.as_secs_f64(),
                        missing.join(", ")
                    )));
                }
                sleep(Duration::from_millis(10));
            }
            // A client that gave up between SYN and accept: not fatal for the others.
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::Interrupted | ErrorKind::ConnectionAborted
                ) => {}
            Err(e) => {
                return Err(rendezvous_err(format!(
                    "rank 0 could not accept a connection on {any}: {e}"
                )))
            }
        }
    }
    let reply = encode_reply(world as u32, Status::Ok, payload);
    for (rank, stream) in peers.iter_mut().enumerate() {
        if let Some(stream) = stream {
            stream.write_all(&reply).map_err(|e| {
                rendezvous_err(format!(
                    "rank 0 could not send the id to rank {rank} ({}): {e}",
                    peer_name(stream)
                ))
            })?;
        }
    }
    Ok(())
}

fn peer_name(stream: &TcpStream) -> String {
    stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "unknown address".into())
}

/// Reads one peer's hello and returns its rank; a peer from another launch is told why it is
/// turned away before rank 0 fails.
fn admit(
    env: &LaunchEnv,
    stream: &TcpStream,
    from: SocketAddr,
    peers: &[Option<TcpStream>],
) -> Result<usize> {
    let setup = |e: std::io::Error| {
        rendezvous_err(format!(
            "rank 0 could not set up the connection from {from}: {e}"
        ))
    };
    // Accepted sockets may inherit the listener's non-blocking mode on some platforms.
    stream.set_nonblocking(false).map_err(setup)?;
    stream
        .set_read_timeout(Some(HELLO_TIMEOUT))
        .map_err(setup)?;
    stream
        .set_write_timeout(Some(HELLO_TIMEOUT))
        .map_err(setup)?;
    let mut hello = [0u8; HELLO_BYTES];
    (&*stream).read_exact(&mut hello).map_err(|e| {
        rendezvous_err(format!(
            "rank 0 got no rendezvous hello from {from} on MASTER_PORT={}: {e}",
            env.master_port
        ))
    })?;
    let Some((their_world, their_rank)) = decode_header(&hello) else {
        return Err(rendezvous_err(format!(
            "a connection from {from} to MASTER_PORT={} did not speak the einattn rendezvous \
             protocol (bad magic)",
            env.master_port
        )));
    };
    let world = env.world_size as u32;
    let refuse = |status: Status, message: String| {
        // Best effort: the peer learns why; rank 0's own error is what matters.
        let _ = (&*stream).write_all(&encode_reply(world, status, &[0; PAYLOAD_BYTES]));
        Err(rendezvous_err(message))
    };
    if their_world != world {
        return refuse(
            Status::WorldSizeMismatch,
            format!(
                "rank {their_rank} connecting from {from} has WORLD_SIZE={their_world} but rank 0 \
                 has WORLD_SIZE={world}; all ranks must come from the same launch"
            ),
        );
    }
    let rank = their_rank as usize;
    if rank == 0 || rank >= env.world_size {
        return refuse(
            Status::BadRank,
            format!(
                "a process connecting from {from} claims RANK={rank}, which no peer of rank 0 \
                 can have with WORLD_SIZE={world}"
            ),
        );
    }
    if peers[rank].is_some() {
        return refuse(
            Status::DuplicateRank,
            format!(
                "two processes claim RANK={rank} (the second from {from}); check the launcher's \
                 RANK assignment"
            ),
        );
    }
    Ok(rank)
}

/// Any other rank: connect to rank 0 (retrying while it is not up), introduce itself, and read
/// the payload.
fn join(env: &LaunchEnv, wait: Duration) -> Result<[u8; PAYLOAD_BYTES]> {
    let target = env.master();
    let deadline = Instant::now() + wait;
    let stream = loop {
        match connect_once(&env.master_addr, env.master_port) {
            Ok(s) => break s,
            Err(e) => {
                if Instant::now() >= deadline {
                    return Err(rendezvous_err(format!(
                        "rank {} could not reach rank 0 at {target} (MASTER_ADDR:MASTER_PORT) \
                         within {:.1} s; last error: {e}",
                        env.rank,
                        wait.as_secs_f64()
                    )));
                }
                sleep(RETRY_SLEEP);
            }
        }
    };
    let io = |what: &str, e: std::io::Error| {
        rendezvous_err(format!("rank {} {what} rank 0 at {target}: {e}", env.rank))
    };
    stream
        .set_read_timeout(Some(wait + REPLY_MARGIN))
        .map_err(|e| io("could not set up its connection to", e))?;
    (&stream)
        .write_all(&encode_hello(env.world_size as u32, env.rank as u32))
        .map_err(|e| io("could not introduce itself to", e))?;
    let mut reply = [0u8; REPLY_BYTES];
    (&stream)
        .read_exact(&mut reply)
        .map_err(|e| match e.kind() {
            ErrorKind::UnexpectedEof => rendezvous_err(format!(
                "rank 0 at {target} closed the connection before sending the id to rank {}; rank \
             0's own error says why",
                env.rank
            )),
            ErrorKind::WouldBlock | ErrorKind::TimedOut => rendezvous_err(format!(
                "rank {} connected to rank 0 at {target} but got no id within {:.1} s; some other \
             rank never joined",
                env.rank,
                (wait + REPLY_MARGIN).as_secs_f64()
            )),
            _ => io("could not read the id from", e),
        })?;
    let Some((their_world, status)) = decode_header(&reply) else {
        return Err(rendezvous_err(format!(
            "{target} answered rank {} but is not an einattn rendezvous (bad magic); is another \
             service using MASTER_PORT?",
            env.rank
        )));
    };
    if their_world as usize != env.world_size {
        return Err(rendezvous_err(format!(
            "WORLD_SIZE mismatch: rank {} has WORLD_SIZE={} but rank 0 at {target} has \
             WORLD_SIZE={their_world}; all ranks must come from the same launch",
            env.rank, env.world_size
        )));
    }
    match Status::from_u32(status) {
        Some(Status::Ok) => {
            let mut payload = [0u8; PAYLOAD_BYTES];
            payload.copy_from_slice(&reply[16..]);
            Ok(payload)
        }
        Some(Status::DuplicateRank) => Err(rendezvous_err(format!(
            "rank 0 at {target} turned rank {} away: another process already joined with \
             RANK={}",
            env.rank, env.rank
        ))),
        other => Err(rendezvous_err(format!(
            "rank 0 at {target} turned rank {} away (status {status}{})",
            env.rank,
            if other.is_none() {
                ", unknown to this version"
            } else {
                ""
            }
        ))),
    }
}

fn connect_once(host: &str, port: u16) -> std::io::Result<TcpStream> {
    // Resolved on every try: the master's DNS name may appear only once its pod is up.
    let mut last = std::io::Error::new(ErrorKind::NotFound, "the host resolved to no address");
    for addr in (host, port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn full() -> HashMap<&'static str, String> {
        [
            ("RANK", "2"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "0"),
            ("MASTER_ADDR", "node-a.cluster"),
            ("MASTER_PORT", "29500"),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.to_string()))
        .collect()
    }

    fn parse(vars: &HashMap<&'static str, String>) -> Result<Option<LaunchEnv>> {
        LaunchEnv::from_lookup(|k| vars.get(k).cloned())
    }

    fn error_of(vars: &HashMap<&'static str, String>) -> String {
        match parse(vars) {
            Err(RuntimeError::InvalidArgument(m)) => m,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn no_world_size_means_single_process() {
        let mut vars = full();
        vars.remove("WORLD_SIZE");
        assert_eq!(parse(&vars).expect("parses"), None);
        assert_eq!(parse(&HashMap::new()).expect("parses"), None);
    }

    #[test]
    fn full_environment_parses() {
        let env = parse(&full()).expect("parses").expect("some");
        assert_eq!(
            env,
            LaunchEnv {
                rank: 2,
                world_size: 4,
                local_rank: 0,
                master_addr: "node-a.cluster".into(),
                master_port: 29500,
            }
        );
        assert_eq!(env.master(), "node-a.cluster:29500");
    }

    #[test]
    fn each_missing_variable_is_named() {
        for name in ["RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"] {
            let mut vars = full();
            vars.remove(name);
            let m = error_of(&vars);
            assert!(m.contains(name) && m.contains("not set"), "{name}: {m}");
        }
    }

    #[test]
    fn each_malformed_variable_is_named_with_its_value() {
        for (name, value) in [
            ("WORLD_SIZE", "four"),
            ("WORLD_SIZE", ""),
            ("WORLD_SIZE", "-1"),
            ("RANK", "1.5"),
            ("LOCAL_RANK", "x"),
            ("MASTER_PORT", "70000"),
            ("MASTER_PORT", "http"),
            ("MASTER_ADDR", ""),
            ("MASTER_ADDR", "two words"),
        ] {
            let mut vars = full();
            vars.insert(name, value.to_string());
            let m = error_of(&vars);
            assert!(
                m.contains(&format!("{name}=`{value}`")),
                "{name}={value}: {m}"
            );
        }
    }

    #[test]
    fn rank_must_be_below_world_size() {
        let mut vars = full();
        vars.insert("RANK", "4".into());
        let m = error_of(&vars);
        assert!(m.contains("RANK=4") && m.contains("WORLD_SIZE=4"), "{m}");
        vars.insert("RANK", "3".into());
        assert_eq!(parse(&vars).expect("parses").expect("some").rank, 3);
    }

    #[test]
    fn zero_world_size_and_port_are_refused() {
        let mut vars = full();
        vars.insert("WORLD_SIZE", "0".into());
        assert!(error_of(&vars).contains("WORLD_SIZE=0"));
        let mut vars = full();
        vars.insert("MASTER_PORT", "0".into());
        assert!(error_of(&vars).contains("MASTER_PORT=0"));
    }

    #[test]
    fn whitespace_and_ipv6_brackets_are_tolerated() {
        let mut vars = full();
        vars.insert("RANK", " 1\n".into());
        vars.insert("MASTER_ADDR", "[::1]".into());
        let env = parse(&vars).expect("parses").expect("some");
        assert_eq!(env.rank, 1);
        assert_eq!(env.master_addr, "::1");
        assert_eq!(env.master(), "[::1]:29500");
    }

    #[test]
    fn wire_headers_round_trip_and_reject_foreign_bytes() {
        let h = encode_hello(7, 3);
        assert_eq!(decode_header(&h), Some((7, 3)));
        let r = encode_reply(7, Status::DuplicateRank, &[9; PAYLOAD_BYTES]);
        assert_eq!(decode_header(&r), Some((7, Status::DuplicateRank as u32)));
        assert_eq!(&r[16..], &[9; PAYLOAD_BYTES][..]);
        assert_eq!(decode_header(b"GET / HTTP/1.1\r\n"), None);
        assert_eq!(decode_header(&MAGIC), None);
        for s in [
            Status::Ok,
            Status::WorldSizeMismatch,
            Status::DuplicateRank,
            Status::BadRank,
        ] {
            assert_eq!(Status::from_u32(s as u32), Some(s));
        }
        assert_eq!(Status::from_u32(99), None);
    }
}
