//! The benchmark's HTTP client. It runs as a process of its own (`bench client …`) started in a pod's
//! namespace, and for socket-level load balancing inside the node's cgroup: cgroup membership is per
//! process, so the benchmark itself could not be a client with and without it.
//!
//! - `connect`: each worker makes a new connection per request (`Connection: close`), round robin
//!   over the targets; it records the time connect() took (the handshake, where a proxy does its
//!   per-connection work) and the whole request's (connect + request + answer).
//! - `keepalive`: each worker keeps one connection per target and sends requests over them in turn.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddrV4, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use tests::testbed::Node;

const TIMEOUT: Duration = Duration::from_secs(2);
const REQUEST_CLOSE: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";
const REQUEST_KEEPALIVE: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Connect,
    KeepAlive,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Connect => "connect",
            Mode::KeepAlive => "keepalive",
        }
    }
}

/// What a client run saw: each successful request's latency (and, for new connections, how long
/// connect() took), failures, and the run's length.
#[derive(Default, Serialize, Deserialize)]
pub struct Outcome {
    pub latencies_us: Vec<u32>,
    pub connect_us: Vec<u32>,
    pub errors: u64,
    pub seconds: f64,
}

impl Outcome {
    pub fn merge(&mut self, other: Outcome) {
        self.latencies_us.extend(other.latencies_us);
        self.connect_us.extend(other.connect_us);
        self.errors += other.errors;
        self.seconds += other.seconds;
    }
}

/// Runs the client in pod `pod` of `node` (in the node's cgroup when `in_cgroup`) and collects its
/// outcome.
pub fn run_in(
    node: &Node,
    pod: &str,
    in_cgroup: bool,
    mode: Mode,
    seconds: f64,
    workers: usize,
    targets: &[SocketAddrV4],
) -> Result<Outcome> {
    let exe = std::env::current_exe()?;
    let exe = exe.to_str().context("bench path")?;
    let mut args = vec!["client".to_owned(), mode.name().into(), seconds.to_string(), workers.to_string()];
    args.extend(targets.iter().map(ToString::to_string));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = node.pod_command(pod, in_cgroup, exe, &args).output()?;
    ensure!(out.status.success(), "client in {pod} failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// `bench client <connect|keepalive> <seconds> <workers> <addr:port>…`: prints an [`Outcome`] as JSON.
pub fn client_main(args: &[String]) -> Result<()> {
    let [mode, seconds, workers, targets @ ..] = args else {
        bail!("usage: bench client <connect|keepalive> <seconds> <workers> <addr:port>…")
    };
    let mode = match mode.as_str() {
        "connect" => Mode::Connect,
        "keepalive" => Mode::KeepAlive,
        other => bail!("unknown client mode {other}"),
    };
    let seconds: f64 = seconds.parse()?;
    let workers: usize = workers.parse()?;
    let targets: Vec<SocketAddrV4> = targets.iter().map(|t| t.parse()).collect::<Result<_, _>>()?;
    ensure!(!targets.is_empty(), "no targets");
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let targets = targets.clone();
            std::thread::spawn(move || match mode {
                Mode::Connect => connect_worker(&targets, w, deadline),
                Mode::KeepAlive => keepalive_worker(&targets, w, deadline),
            })
        })
        .collect();
    let mut outcome = Outcome::default();
    for h in handles {
        outcome.merge(h.join().map_err(|_| anyhow::anyhow!("client worker panicked"))?);
    }
    outcome.seconds = started.elapsed().as_secs_f64();
    println!("{}", serde_json::to_string(&outcome)?);
    Ok(())
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

fn connect_worker(targets: &[SocketAddrV4], worker: usize, deadline: Instant) -> Outcome {
    let mut out = Outcome::default();
    let mut k = worker;
    while Instant::now() < deadline {
        let to = targets[k % targets.len()];
        k += 1;
        let t0 = Instant::now();
        match request_new_connection(to, t0) {
            Ok(connected) => {
                out.latencies_us.push(micros(t0.elapsed()));
                out.connect_us.push(micros(connected));
            }
            Err(_) => out.errors += 1,
        }
    }
    out
}

/// One request on a new connection started at `t0`; how long connect() took.
fn request_new_connection(to: SocketAddrV4, t0: Instant) -> std::io::Result<Duration> {
    let mut s = TcpStream::connect_timeout(&to.into(), TIMEOUT)?;
    let connected = t0.elapsed();
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_nodelay(true)?;
    s.write_all(REQUEST_CLOSE)?;
    let mut answer = Vec::with_capacity(256);
    s.read_to_end(&mut answer)?;
    if !answer.starts_with(b"HTTP/1.1 200") {
        return Err(std::io::Error::other("not a 200 answer"));
    }
    Ok(connected)
}

fn keepalive_worker(targets: &[SocketAddrV4], worker: usize, deadline: Instant) -> Outcome {
    let mut out = Outcome::default();
    let mut conns: Vec<Option<BufReader<TcpStream>>> = targets.iter().map(|_| None).collect();
    // Connections are opened before the clock starts: only requests are timed.
    for (c, &to) in conns.iter_mut().zip(targets) {
        *c = open(to).ok();
    }
    let mut k = worker;
    while Instant::now() < deadline {
        let i = k % targets.len();
        k += 1;
        let t0 = Instant::now();
        let result = match conns[i].as_mut() {
            Some(c) => request_kept_alive(c),
            None => Err(std::io::Error::other("not connected")),
        };
        match result {
            Ok(()) => out.latencies_us.push(micros(t0.elapsed())),
            Err(_) => {
                out.errors += 1;
                conns[i] = open(targets[i]).ok();
            }
        }
    }
    out
}

fn open(to: SocketAddrV4) -> std::io::Result<BufReader<TcpStream>> {
    let s = TcpStream::connect_timeout(&to.into(), TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_nodelay(true)?;
    Ok(BufReader::new(s))
}

fn request_kept_alive(conn: &mut BufReader<TcpStream>) -> std::io::Result<()> {
    conn.get_mut().write_all(REQUEST_KEEPALIVE)?;
    let mut line = String::new();
    conn.read_line(&mut line)?;
    if !line.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other("not a 200 answer"));
    }
    let mut len = 0usize;
    loop {
        line.clear();
        if conn.read_line(&mut line)? == 0 {
            return Err(std::io::Error::other("connection closed"));
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().map_err(std::io::Error::other)?;
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body)
}
