//! How many new masqueraded connections a node opens to one backend per second, sustained: an
//! external client (wrk, `Connection: close`) through a NodePort with externalTrafficPolicy Cluster
//! to nginx on the other node, so every connection is masqueraded to the node's address. Side by
//! side in one run: no NAT at all (the client to the pod), netfilter's DNAT + MASQUERADE
//! --random-fully (what kube-proxy's iptables and nftables modes amount to on this path), and
//! ebpf-proxy. The source ports towards one backend and how soon a closed connection gives its port
//! back bound this rate.

use std::{fmt::Write as _, time::Duration};

use anyhow::{Context as _, Result, ensure};
use proxy_common::{STAT_DROP_SNAT_EXHAUSTED, STAT_SNAT, STAT_SNAT_REUSE_CLOSED, STAT_SNAT_REUSE_UNANSWERED};
use tests::{
    cluster::{Cluster, EXT_CLIENT, node_ip, node_name},
    k8s::{ready, service},
    testbed::{LbMode, run},
};

const NODE_PORT: u16 = 30_080;

/// One contender's wrk run.
pub struct Run {
    pub name: &'static str,
    pub requests: u64,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Socket errors (connect, read, write, timeout) and non-2xx answers.
    pub failed: u64,
    /// ebpf-proxy's counters on the translating node during the run (others: none).
    pub counters: Option<[u64; 4]>,
}

/// Milliseconds from wrk's latency notation (`512.00us`, `1.23ms`, `1.02s`).
fn wrk_ms(v: &str) -> Option<f64> {
    let split = v.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let n: f64 = v[..split].parse().ok()?;
    Some(match &v[split..] {
        "us" => n / 1e3,
        "ms" => n,
        "s" => n * 1e3,
        "m" => n * 60e3,
        _ => return None,
    })
}

/// The figures of a wrk `--latency` report.
fn parse_wrk(name: &'static str, text: &str) -> Result<Run> {
    let after = |prefix: &str| text.lines().map(str::trim).find_map(|l| l.strip_prefix(prefix)).map(str::trim);
    let per_second: f64 = after("Requests/sec:").context("no Requests/sec")?.parse()?;
    let requests: u64 = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .context("no request count")?
        .parse()?;
    let latency = |p: &str| after(p).and_then(wrk_ms).unwrap_or(f64::NAN);
    let mut failed = 0;
    if let Some(errors) = after("Socket errors:") {
        failed += errors.split(',').filter_map(|e| e.split_whitespace().last()?.parse::<u64>().ok()).sum::<u64>();
    }
    if let Some(non2xx) = after("Non-2xx or 3xx responses:") {
        failed += non2xx.parse::<u64>()?;
    }
    Ok(Run { name, requests, per_second, p50_ms: latency("50%"), p99_ms: latency("99%"), failed, counters: None })
}

/// wrk from the external client: 2 threads, 8 connections, a new connection per request.
fn wrk(c: &Cluster, name: &'static str, url: &str, seconds: u64) -> Result<Run> {
    let out = run(c.ext.command("wrk").args([
        "-t2",
        "-c8",
        &format!("-d{seconds}s"),
        "--timeout",
        "2s",
        "--latency",
        "-H",
        "Connection: close",
        url,
    ]))?;
    eprintln!("{name}: {out}");
    parse_wrk(name, &out)
}

const COUNTERS: [u32; 4] = [STAT_SNAT, STAT_SNAT_REUSE_CLOSED, STAT_SNAT_REUSE_UNANSWERED, STAT_DROP_SNAT_EXHAUSTED];

pub fn run_all(binary: &std::path::Path, quick: bool) -> Result<Vec<Run>> {
    let seconds = if quick { 15 } else { 120 };
    // Between NAT runs the backend's TIME_WAIT tuples of the previous one drain (60 s in Linux).
    let drain = Duration::from_secs(if quick { 0 } else { 65 });
    let mut c = Cluster::new(2, 1)?;
    c.nodes[1].pods[0].start_nginx()?;
    let backend = c.nodes[1].pods[0].ip;
    let objects = service(
        "web",
        &format!("  type: NodePort\n  clusterIP: 10.96.0.20\n  ports: [{{name: p, port: 80, nodePort: {NODE_PORT}}}]"),
        "",
        80,
        "TCP",
        &[ready(backend, &node_name(1))],
    );
    c.write_objects("svc.yaml", &objects)?;
    let node_port = format!("http://{}:{NODE_PORT}/", node_ip(0));
    let mut runs = Vec::new();

    // The reference needs no sustained run: half as long.
    eprintln!("masquerade: no NAT ({} s) …", seconds / 2);
    runs.push(wrk(&c, "no NAT (client to the pod)", &format!("http://{backend}/"), seconds / 2)?);

    eprintln!("masquerade: netfilter DNAT + MASQUERADE --random-fully ({seconds} s) …");
    let node_a = &c.nodes[0].ns;
    let rules = [
        format!(
            "-t nat -A PREROUTING -d {} -p tcp --dport {NODE_PORT} -j DNAT --to-destination {backend}:80",
            node_ip(0)
        ),
        format!("-t nat -A POSTROUTING -d {backend} -p tcp --dport 80 -j MASQUERADE --random-fully"),
    ];
    for r in &rules {
        run(node_a.command("iptables").args(r.split_whitespace()))?;
    }
    let netfilter = wrk(&c, "netfilter DNAT + MASQUERADE --random-fully", &node_port, seconds);
    for r in &rules {
        run(node_a.command("iptables").args(r.replacen("-A", "-D", 1).split_whitespace()))?;
    }
    runs.push(netfilter?);
    std::thread::sleep(drain);

    eprintln!("masquerade: ebpf-proxy ({seconds} s) …");
    c.start_proxies(binary, LbMode::Socket, &[])?;
    let before = c.nodes[0].stats()?;
    let mut ours = wrk(&c, "ebpf-proxy", &node_port, seconds)?;
    let after = c.nodes[0].stats()?;
    ours.counters = Some(COUNTERS.map(|i| after[i as usize] - before[i as usize]));
    ensure!(ours.counters.is_some_and(|k| k[0] > 0), "ebpf-proxy masqueraded nothing: is it attached?");
    runs.push(ours);
    Ok(runs)
}

pub fn section(runs: &[Run], machine: &str, quick: bool) -> Result<String> {
    let mut b = String::from("## Masqueraded connections to one backend\n\n");
    let seconds = if quick { 15 } else { 120 };
    writeln!(
        b,
        "An external client ({EXT_CLIENT}) runs `wrk -t2 -c8 -d{seconds}s --latency -H 'Connection: close'` through \
         node-a's NodePort (externalTrafficPolicy Cluster) to nginx on node-b: every connection is masqueraded \
         to node-a's address, and they all go to one backend address and port, so the source ports and how \
         soon a closed connection gives its port back bound the rate (nginx closes first, so the backend \
         holds each tuple in TIME_WAIT for 60 s). ebpf-proxy masquerades from `--snat-port-range` \
         (61000-65535, reserved from the node's own sockets) and lets a new connection take over the port of \
         one that is over (TIME_WAIT, reset) when no port is free; netfilter masquerades from 1024-65535 \
         with --random-fully. The three run one after the other in the same cluster (no NAT for half as \
         long: it is the reference), with 65 s between the NAT runs for the backend's TIME_WAIT tuples to \
         drain.\n"
    )?;
    writeln!(
        b,
        "Machine: {machine}. Reproduce: `cargo xtask bench --only masquerade{}`.\n",
        if quick { " --quick" } else { "" }
    )?;
    writeln!(b, "| path | connections/s | ÷ no NAT | requests | p50 | p99 | failed |")?;
    writeln!(b, "|---|---:|---:|---:|---:|---:|---:|")?;
    let base = runs.first().map_or(f64::NAN, |r| r.per_second);
    for r in runs {
        writeln!(
            b,
            "| {} | {:.0} | {:.2} | {} | {:.2} ms | {:.2} ms | {} |",
            r.name,
            r.per_second,
            r.per_second / base,
            r.requests,
            r.p50_ms,
            r.p99_ms,
            r.failed
        )?;
    }
    if let Some(k) = runs.iter().find_map(|r| r.counters) {
        writeln!(
            b,
            "\nebpf-proxy on node-a during its run: {} connections masqueraded, {} ports taken over from closed \
             connections, {} from unanswered ones, {} dropped for want of a port (`drop_snat_exhausted`).",
            k[0], k[1], k[2], k[3]
        )?;
    }
    let ours = runs.iter().find(|r| r.counters.is_some());
    let netfilter = runs.iter().find(|r| r.name.starts_with("netfilter"));
    if let (Some(o), Some(n)) = (ours, netfilter) {
        let met = o.per_second >= 1_000.0 && o.failed == 0 && o.per_second > n.per_second && !quick;
        writeln!(
            b,
            "\nTarget: ≥ 1,000 new masqueraded connections per second to one backend for 2 minutes, 0 failed, \
             ahead of netfilter — {:.0}/s with {} failed against netfilter's {:.0}/s with {} failed: **{}**.",
            o.per_second,
            o.failed,
            n.per_second,
            n.failed,
            if met {
                "met"
            } else if quick {
                "not judged (--quick)"
            } else {
                "missed"
            }
        )?;
    }
    b += "\n";
    Ok(b)
}

#[cfg(test)]
mod wrk_output {
    #[test]
    fn wrk_reports_are_read() {
        let text = "Running 2m test @ http://192.168.0.2:30080/\n  2 threads and 8 connections\n  Latency Distribution\n     50%    3.10ms\n     75%    4.00ms\n     90%    5.00ms\n     99%    1.02s\n  120000 requests in 2.00m, 20.00MB read\n  Socket errors: connect 1, read 2, write 0, timeout 3\n  Non-2xx or 3xx responses: 4\nRequests/sec:   1000.50\nTransfer/sec:    170.00KB\n";
        let r = super::parse_wrk("x", text).unwrap();
        assert_eq!((r.requests, r.failed), (120_000, 10));
        assert_eq!((r.p50_ms, r.p99_ms, r.per_second), (3.10, 1020.0, 1000.5));
    }
}
