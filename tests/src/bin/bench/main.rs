//! `cargo xtask bench`: measurements written to BENCHMARKS.md. Needs root (namespaces, BPF).
//!
//! Control plane at scale: ebpf-proxy (release build) watching the test API server
//! (tests/src/apiserver.rs) that holds N Services × 10 endpoints, in a node namespace of the testbed:
//! - initial sync: from process start to the maps programmed ("ready"), and the reconcile alone;
//! - one EndpointSlice change → the new backend in the maps, for changes spread over the table,
//!   detected by reading the pinned maps (p50 / p99 / max);
//! - memory: the proxy's RSS and the BPF maps' memory.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::programs::{TestRun as _, TestRunOptions};
use ebpf_proxy::{
    config::NodeArgs,
    datapath::{Datapath, MapMode, PROG_BASELINE, PROG_FROM_POD},
    model::{self, ModelOptions},
    objects::Objects,
    reconcile::Reconciler,
    translate::{self, Ids, NodeContext},
};
use serde_json::Value;
mod contenders;
mod kube_proxy;
mod load;
mod masquerade;
mod plot;
mod table;

use table::{BenchService, ENDPOINTS, MapView, endpoint_ip, service_ip};
use tests::{
    apiserver::ApiServer,
    packets,
    testbed::{LbMode, Node, run},
};

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS value")?.parse()?)
}

/// Memory of the pinned maps, as the kernel accounts it (bpftool's bytes_memlock).
fn map_memory_bytes(bpffs: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(bpffs)? {
        let path = entry?.path();
        if path.is_dir() {
            continue;
        }
        let out = run(std::process::Command::new("bpftool").args(["-j", "map", "show", "pinned"]).arg(&path))?;
        let v: Value = serde_json::from_str(&out)?;
        total += v["bytes_memlock"].as_u64().unwrap_or(0);
    }
    Ok(total)
}

/// "X (snapshot A, model B, translation C, maps D)" from a sync log line, durations rounded to ms.
fn sync_phases(line: &str) -> String {
    let tail = line.rsplit(" in ").next().unwrap_or(line);
    // Rust's Debug form of a Duration: a decimal number and a unit.
    let round = |d: &str| {
        let d = d.trim_matches(|c: char| c == '(' || c == ')' || c == ',');
        let split = d.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(d.len());
        let scale = match &d[split..] {
            "s" => 1e3,
            "ms" => 1.0,
            "µs" => 1e-3,
            "ns" => 1e-6,
            _ => return d.to_owned(),
        };
        d[..split].parse::<f64>().map_or_else(|_| d.to_owned(), |v| format!("{:.0} ms", v * scale))
    };
    let words: Vec<&str> = tail.split_whitespace().collect();
    match words.as_slice() {
        [total, "(snapshot", s, "model", m, "translation", t, "maps", p] => format!(
            "{} (snapshot {}, model {}, translation {}, maps {})",
            round(total),
            round(s),
            round(m),
            round(t),
            round(p)
        ),
        _ => tail.to_owned(),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

struct ControlPlane {
    services: usize,
    startup: Duration,
    reconcile: String,
    change_phases: String,
    changes: Vec<Duration>,
    rss_mib: f64,
    map_mib: f64,
}

/// Starts ebpf-proxy on `node` watching a new test API server that holds `services`; returns the
/// server and the time from process start to maps programmed and `ready`.
fn start_on_api_server(node: &mut Node, binary: &Path, services: &[BenchService]) -> Result<(ApiServer, Duration)> {
    let api = ApiServer::start(&node.ns.name)?;
    for s in services {
        api.apply_object(s.service_json())?;
        api.apply_object(s.slice_json())?;
    }
    let kubeconfig = node.work.0.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig())?;
    // The pipeline's own latency: no minimum period between syncs (kube-proxy's default of 1s would
    // dominate every figure).
    node.proxy_args =
        ["--kubeconfig", &kubeconfig.display().to_string(), "--min-sync-period", "0s"].map(String::from).to_vec();
    node.ready_timeout = Duration::from_secs(300);
    let started = Instant::now();
    node.start_proxy(binary, LbMode::Socket)?;
    Ok((api, started.elapsed()))
}

/// The first sync's phases, from the proxy's log.
fn initial_sync(node: &Node) -> String {
    node.proxy_log_text().lines().find(|l| l.contains("synced ")).map_or_else(|| "?".into(), sync_phases)
}

fn control_plane(binary: &Path, services: usize, changes: usize) -> Result<ControlPlane> {
    let mut node = Node::new(0)?;
    let table: Vec<BenchService> = (0..services).map(BenchService::entry).collect();
    let (api, startup) = start_on_api_server(&mut node, binary, &table)?;
    let reconcile = initial_sync(&node);
    let pid = node.proxy_pid().context("proxy pid")?;
    let rss_mib = rss_kib(pid)? as f64 / 1024.0;
    let map_mib = map_memory_bytes(&node.bpffs.path)? as f64 / (1024.0 * 1024.0);
    let view = MapView::open(&node.bpffs.path)?;
    let mut latencies = Vec::with_capacity(changes);
    for k in 0..changes {
        // Spread over the table (a prime stride), each change a new address for endpoint 0.
        let i = (k * 7919) % services;
        let new = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 250, 0, 0)) + k as u32);
        let mut changed = BenchService::entry(i);
        changed.endpoints[0].set_ip(new);
        let t0 = Instant::now();
        api.apply_object(changed.slice_json())?;
        latencies.push(view.wait_for_backend(changed.frontend(), new, t0)?);
        std::thread::sleep(Duration::from_millis(20));
    }
    // Where one change's sync spends its time (the last sync in the log).
    let log = node.proxy_log_text();
    let change_phases = log.lines().rev().find(|l| l.contains("synced ")).map_or_else(|| "?".into(), sync_phases);
    node.stop_proxy()?;
    Ok(ControlPlane { services, startup, reconcile, change_phases, changes: latencies, rss_mib, map_mib })
}

/// Kernel-measured run time of one packet through `program` (BPF_PROG_TEST_RUN, one run per call so
/// every run starts from the same packet — a repeated run would see its own rewrite).
fn run_ns(dp: &Datapath, program: &str, packet: &[u8]) -> Result<Duration> {
    let prog = dp.classifier(program)?;
    let mut out = vec![0u8; packet.len() + 64];
    let r = prog.test_run(TestRunOptions { data_in: Some(packet), data_out: Some(&mut out), ..Default::default() })?;
    Ok(r.duration)
}

fn median_ns(samples: &mut [Duration]) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_nanos() as f64
}

struct PacketCost {
    services: usize,
    baseline: f64,
    not_service: f64,
    established: f64,
    new_connection: f64,
}

/// One table size, programmed: private maps filled by the same translation as `run`.
struct PacketBed {
    services: usize,
    dp: Datapath,
    syn: Vec<u8>,
    to_pod: Vec<u8>,
    vip: SocketAddrV4,
    /// Runs so far of each kind (index into the samples; new connections take a new port from it).
    runs: usize,
    samples: [Vec<Duration>; 4],
}

fn client(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 9), port)
}

impl PacketBed {
    fn new(services: usize) -> Result<Self> {
        let mut objs = Objects::default();
        for i in 0..services {
            let s = BenchService::entry(i);
            objs.services.push(std::sync::Arc::new(serde_json::from_value(s.service_json())?));
            objs.slices.push(std::sync::Arc::new(serde_json::from_value(s.slice_json())?));
        }
        let model = model::build(&objs, &ModelOptions::default());
        let args = NodeArgs {
            node_name: "node-a".into(),
            node_ips: vec![Ipv4Addr::new(192, 168, 0, 2)],
            cluster_cidr: Some("10.244.0.0/16".parse()?),
            ..Default::default()
        };
        let (desired, _) = translate::translate(&model, &NodeContext::new(&args, &model), &mut Ids::default());
        let mut dp = Datapath::load(MapMode::PRIVATE)?;
        dp.load_baseline()?;
        let mut tables = dp.tables()?;
        Reconciler::new(&tables)?.sync(&desired, &mut tables)?;
        // A Service in the middle of the table, from a pod.
        let vip = SocketAddrV4::new(service_ip(services / 2), 80);
        let syn = packets::tcp(client(40_000), vip, true, false, &[]);
        let to_pod = packets::tcp(client(40_001), SocketAddrV4::new(endpoint_ip(0, 0), 80), true, false, &[]);
        Ok(Self { services, dp, syn, to_pod, vip, runs: 0, samples: Default::default() })
    }

    /// `n` runs of each kind; recorded unless `warmup`.
    fn run(&mut self, n: usize, warmup: bool) -> Result<()> {
        for _ in 0..n {
            // A new source port every time: conntrack miss, backend choice, both entries created.
            let new_conn = packets::tcp(client(1024 + (self.runs % 60_000) as u16), self.vip, true, false, &[]);
            let d = [
                run_ns(&self.dp, PROG_BASELINE, &self.syn)?,
                run_ns(&self.dp, PROG_FROM_POD, &self.to_pod)?,
                // The first run creates the connection; every later one finds it in conntrack.
                run_ns(&self.dp, PROG_FROM_POD, &self.syn)?,
                run_ns(&self.dp, PROG_FROM_POD, &new_conn)?,
            ];
            self.runs += 1;
            if !warmup {
                for (s, d) in self.samples.iter_mut().zip(d) {
                    s.push(d);
                }
            }
        }
        Ok(())
    }

    fn result(mut self) -> PacketCost {
        let [b, n, e, c] = &mut self.samples;
        PacketCost {
            services: self.services,
            baseline: median_ns(b),
            not_service: median_ns(n),
            established: median_ns(e),
            new_connection: median_ns(c),
        }
    }
}

/// The per-packet cost of `from_pod` at each size against `parse_only`: every size programmed first,
/// then measured in interleaved rounds so that the machine's drift falls on all sizes alike.
fn packet_costs(sizes: &[usize], samples: usize) -> Result<Vec<PacketCost>> {
    let mut beds = sizes
        .iter()
        .map(|&n| {
            eprintln!("per-packet cost: programming {n} Services × {ENDPOINTS} endpoints …");
            PacketBed::new(n)
        })
        .collect::<Result<Vec<_>>>()?;
    const ROUND: usize = 500;
    for bed in &mut beds {
        bed.run(ROUND, true)?;
    }
    for _ in 0..samples.div_ceil(ROUND) {
        for bed in &mut beds {
            bed.run(ROUND, false)?;
        }
    }
    Ok(beds.into_iter().map(PacketBed::result).collect())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let kernel = run(std::process::Command::new("uname").arg("-r")).unwrap_or_default();
    format!("{} CPUs ({cpu}), kernel {}", std::thread::available_parallelism().map_or(0, |n| n.get()), kernel.trim())
}

/// Replaces the text between `<!-- name:start -->` and `<!-- name:end -->` in `path` (appending the
/// section when it is not there yet).
fn write_section(path: &Path, name: &str, body: &str) -> Result<()> {
    let (start, end) = (format!("<!-- {name}:start -->"), format!("<!-- {name}:end -->"));
    let current = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n\n".into());
    let section = format!("{start}\n{body}{end}\n");
    let updated = match (current.find(&start), current.find(&end)) {
        (Some(a), Some(b)) if a < b => {
            format!("{}{section}{}", &current[..a], current[b + end.len()..].trim_start_matches('\n'))
        }
        _ => format!("{}\n{section}", current.trim_end()),
    };
    std::fs::write(path, updated)?;
    Ok(())
}

/// The total of a [`sync_phases`] summary ("585 ms (snapshot …)").
fn sync_total(phases: &str) -> Option<Duration> {
    let mut words = phases.split_whitespace();
    let value: f64 = words.next()?.parse().ok()?;
    (words.next()? == "ms").then(|| Duration::from_secs_f64(value / 1e3))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).is_some_and(|a| a == "client") {
        return load::client_main(&args[2..]);
    }
    let quick = args.iter().any(|a| a == "--quick");
    let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let binary = PathBuf::from(value("--proxy").context("--proxy PATH (the release ebpf-proxy)")?);
    let out = PathBuf::from(value("--out").unwrap_or_else(|| "BENCHMARKS.md".into()));
    // `--only control-plane|packet-cost|contenders|masquerade` runs one part (and leaves the targets
    // alone).
    let only = value("--only");
    let wants = |part: &str| only.as_deref().is_none_or(|o| o == part);
    let started = Instant::now();
    let mut targets = Targets::default();
    if wants("contenders") {
        let plan = contenders::Plan::new(quick);
        let results = contenders::run_all(&binary, &plan)?;
        write_section(&out, "contenders", &contenders::section(&results, &plan, &out, &machine(), quick)?)?;
        targets.contenders = Some(results);
    }
    if wants("control-plane") {
        control_plane_section(&binary, &out, quick)?;
    }
    if wants("packet-cost") {
        targets.packet_growth = Some(packet_cost_section(&out, quick)?);
    }
    if wants("masquerade") {
        let runs = masquerade::run_all(&binary, quick)?;
        write_section(&out, "masquerade", &masquerade::section(&runs, &machine(), quick)?)?;
        targets.masquerade = Some(runs);
    }
    if only.is_none() {
        write_section(&out, "targets", &targets.section(started.elapsed(), quick)?)?;
    }
    eprintln!("written to {} in {:.0?}", out.display(), started.elapsed());
    Ok(())
}

/// What the targets are judged on, gathered from the parts.
#[derive(Default)]
struct Targets {
    contenders: Option<Vec<contenders::SizeResult>>,
    /// The per-packet cost's growth from the smallest to the largest table (a ratio, 1.0 = flat).
    packet_growth: Option<(usize, usize, f64)>,
    masquerade: Option<Vec<masquerade::Run>>,
}

impl Targets {
    fn section(&self, took: Duration, quick: bool) -> Result<String> {
        use contenders::{Kind, percentile_us};
        let mut b = String::from(
            "## Targets

",
        );
        writeln!(
            b,
            "Judged on this run's figures (`cargo xtask bench{}`, {:.0} s in all).\n",
            if quick { " --quick" } else { "" },
            took.as_secs_f64()
        )?;
        writeln!(b, "| target | measured | met |")?;
        writeln!(b, "|---|---|---|")?;
        let yes = |ok: bool| if ok { "yes" } else { "**no**" };
        let results = self.contenders.as_deref().unwrap_or_default();
        // New-connection latency is judged on connect(), where the proxies differ; the whole request's
        // p99 is shown beside it.
        let p99 =
            |r: &contenders::SizeResult, k: Kind| r.measure(k).map(|m| percentile_us(&m.connect.connect_us, 0.99));
        let request_p99 =
            |r: &contenders::SizeResult, k: Kind| r.measure(k).map(|m| percentile_us(&m.connect.latencies_us, 0.99));
        let ours = [Kind::EbpfSocket, Kind::EbpfTc];
        match results.iter().find(|r| r.services == 10_000) {
            Some(r) => {
                let ipt = p99(r, Kind::Iptables).unwrap_or(f64::NAN);
                let ipt_request = request_p99(r, Kind::Iptables).unwrap_or(f64::NAN);
                for k in ours {
                    let v = p99(r, k).unwrap_or(f64::NAN);
                    let request = request_p99(r, k).unwrap_or(f64::NAN);
                    writeln!(
                        b,
                        "| new-connection p99 at 10,000 Services ≥ 2× better than iptables ({}) | connect {v:.0} µs vs \
                         {ipt:.0} µs: {:.2}× (whole request {request:.0} µs vs {ipt_request:.0} µs: {:.2}×) | {} |",
                        k.name(),
                        ipt / v,
                        ipt_request / request,
                        yes(ipt / v >= 2.0)
                    )?;
                }
            }
            None => writeln!(
                b,
                "| new-connection p99 at 10,000 Services ≥ 2× better than iptables | not measured in this run | — |"
            )?,
        }
        // The worst ratio of ours to another contender's p99 over the sizes where both ran.
        let worst = |k: Kind, other: Kind| {
            results
                .iter()
                .filter_map(|r| {
                    Some((r.services, p99(r, k)? / p99(r, other)?, request_p99(r, k)? / request_p99(r, other)?))
                })
                .max_by(|a, b| a.1.total_cmp(&b.1))
        };
        for (other, limit, what) in
            [(Kind::Nftables, 1.0, "no worse than nftables"), (Kind::NoProxy, 1.10, "within 10% of no proxy")]
        {
            for k in ours {
                match worst(k, other) {
                    Some((n, ratio, request)) => writeln!(
                        b,
                        "| new-connection p99 {what} at every N ({}) | worst at {n}: connect {ratio:.2}× {} \
                         (whole request {request:.2}×) | {} |",
                        k.name(),
                        other.name(),
                        yes(ratio <= limit)
                    )?,
                    None => writeln!(b, "| new-connection p99 {what} ({}) | not measured in this run | — |", k.name())?,
                }
            }
        }
        match self.packet_growth {
            Some((from, to, g)) => writeln!(
                b,
                "| per-packet cost ≤ 10% growth from {from} to {to} Services | {:+.1}% | {} |",
                (g - 1.0) * 100.0,
                yes(g <= 1.10)
            )?,
            None => writeln!(b, "| per-packet cost flat | not measured in this run | — |")?,
        }
        match results.iter().find(|r| r.services == 10_000).and_then(|r| r.ebpf_sync.map(|s| (s, r))) {
            Some((s, r)) => writeln!(
                b,
                "| 10,000 × 10 programmed in under 1 s | first sync {:.0} ms ({}); process start → ready {:.0} ms | {} |",
                s.as_secs_f64() * 1e3,
                r.ebpf_sync_phases,
                r.ebpf_ready.as_secs_f64() * 1e3,
                yes(s < Duration::from_secs(1))
            )?,
            None => writeln!(b, "| 10,000 × 10 programmed in under 1 s | not measured in this run | — |")?,
        }
        let masq = self.masquerade.as_deref().unwrap_or_default();
        match (masq.iter().find(|r| r.counters.is_some()), masq.iter().find(|r| r.name.starts_with("netfilter"))) {
            (Some(o), Some(n)) => writeln!(
                b,
                "| ≥ 1,000 new masqueraded connections/s to one backend for 2 min, 0 failed, ahead of netfilter | \
                 {:.0}/s, {} failed; netfilter {:.0}/s, {} failed | {} |",
                o.per_second,
                o.failed,
                n.per_second,
                n.failed,
                yes(o.per_second >= 1_000.0 && o.failed == 0 && o.per_second > n.per_second && !quick)
            )?,
            _ => {
                writeln!(b, "| ≥ 1,000 new masqueraded connections/s to one backend | not measured in this run | — |")?
            }
        }
        writeln!(
            b,
            "| full run ≤ 20 minutes{} | {:.1} min | {} |",
            if quick { " (this was --quick: ≈ 2 minutes)" } else { "" },
            took.as_secs_f64() / 60.0,
            yes(took < Duration::from_secs(if quick { 180 } else { 1200 }))
        )?;
        b += "\n";
        Ok(b)
    }
}

fn control_plane_section(binary: &Path, out: &Path, quick: bool) -> Result<()> {
    let sizes: &[usize] = if quick { &[1_000] } else { &[1_000, 10_000] };
    let changes = if quick { 50 } else { 100 };
    let mut rows = String::new();
    let mut phases = String::new();
    for &n in sizes {
        eprintln!("control plane: {n} Services × {ENDPOINTS} endpoints …");
        let mut r = control_plane(binary, n, changes)?;
        r.changes.sort();
        phases += &format!("| {} | {} | {} |\n", r.services, r.reconcile, r.change_phases);
        let line = format!(
            "| {} | {} | {} | {} | {} | {} | {:.0} MiB | {:.0} MiB |\n",
            r.services,
            r.services * ENDPOINTS,
            ms(r.startup),
            ms(percentile(&r.changes, 0.5)),
            ms(percentile(&r.changes, 0.99)),
            ms(*r.changes.last().unwrap()),
            r.rss_mib,
            r.map_mib
        );
        eprint!("{line}");
        rows += &line;
    }
    let mut body = String::new();
    writeln!(body, "## Control plane at scale\n")?;
    writeln!(
        body,
        "ebpf-proxy (release) watching the test API server (`tests/src/apiserver.rs`, real list/watch over \
         HTTP) in a testbed node namespace; `--min-sync-period 0s` so the figures are the pipeline's own. \
         Initial sync: process start → maps programmed and `ready` (list of every Service and slice, model, \
         translation, map writes). \
         Change → programmed: an EndpointSlice update applied to the API server until the new backend is \
         read back from the pinned maps, {changes} changes spread over the table (p50 / p99 / max). Memory: \
         the proxy's RSS after the initial sync, and the kernel's accounting of all pinned BPF maps.\n"
    )?;
    writeln!(body, "Machine: {}. Reproduce: `cargo xtask bench{}`.\n", machine(), if quick { " --quick" } else { "" })?;
    writeln!(body, "| Services | endpoints | initial sync | change p50 | change p99 | change max | RSS | BPF maps |")?;
    writeln!(body, "|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    body += &rows;
    writeln!(
        body,
        "\nWhere a sync spends its time (from the proxy's log): the initial one, and the one for the last change.\n"
    )?;
    writeln!(body, "| Services | initial sync | one change |")?;
    writeln!(body, "|---:|---|---|")?;
    body += &phases;
    body += "\n";
    write_section(out, "control-plane", &body)
}

/// Writes the per-packet section; returns the smallest and largest table and the growth of the
/// established-packet cost (as a ratio to the baseline) between them.
fn packet_cost_section(out: &Path, quick: bool) -> Result<(usize, usize, f64)> {
    // Per-packet cost, in a thread of its own in an empty network namespace (the programs' FIB
    // lookups then find nothing, on every machine alike).
    let packet_sizes: Vec<usize> = if quick { vec![100, 10_000] } else { vec![100, 1_000, 10_000, 30_000] };
    let samples = if quick { 5_000 } else { 20_000 };
    let costs = std::thread::spawn(move || -> Result<Vec<PacketCost>> {
        tests::isolate_thread_netns();
        packet_costs(&packet_sizes, samples)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("per-packet benchmark panicked"))??;
    let first = &costs[0];
    let growth = |now: f64, then: f64| format!("{:+.0}%", (now / then - 1.0) * 100.0);
    let mut body = String::new();
    writeln!(body, "## Per-packet cost of the tc program\n")?;
    writeln!(
        body,
        "`from_pod` run by BPF_PROG_TEST_RUN on a TCP SYN from a pod, one run per call (a repeated run \
         would see its own rewrite), median of {samples} runs, kernel-measured, the sizes measured in interleaved rounds of 500; `parse_only` is the \
         baseline — the same packet parsing, then pass. Services × {ENDPOINTS} endpoints programmed by the \
         same translation as `run`; the Service hit is in the middle of the table. \
         Established: conntrack hit and DNAT; new connection: a new source port each run (conntrack miss, \
         backend choice, both entries created); not a Service: a packet to a pod address.\n"
    )?;
    writeln!(body, "Machine: {}. Reproduce: `cargo xtask bench{}`.\n", machine(), if quick { " --quick" } else { "" })?;
    writeln!(
        body,
        "| Services | parse_only | not a Service | established | new connection | established ÷ parse_only | vs {} Services |",
        first.services
    )?;
    writeln!(body, "|---:|---:|---:|---:|---:|---:|---:|")?;
    // The ratio to the baseline measured in the same run is what to compare across sizes: this
    // machine's speed drifts between runs, and the baseline drifts with it.
    let ratio = |c: &PacketCost| c.established / c.baseline;
    for c in &costs {
        let line = format!(
            "| {} | {:.0} ns | {:.0} ns | {:.0} ns | {:.0} ns | {:.2} | {} |\n",
            c.services,
            c.baseline,
            c.not_service,
            c.established,
            c.new_connection,
            ratio(c),
            growth(ratio(c), ratio(first))
        );
        eprint!("{line}");
        body += &line;
    }
    let dir = out.parent().unwrap_or(Path::new(".")).join("benchmarks");
    std::fs::create_dir_all(&dir)?;
    let series = |name: &'static str, color: (u8, u8, u8), f: fn(&PacketCost) -> f64| plot::Series {
        name,
        color: plotters::style::RGBColor(color.0, color.1, color.2),
        points: costs.iter().map(|c| (c.services as f64, f(c))).collect(),
    };
    plot::chart(
        &dir.join("packet-cost.svg"),
        "Per-packet cost of from_pod (BPF_PROG_TEST_RUN)",
        "ns / packet",
        false,
        &[
            series("parse_only (baseline)", (0, 0, 0), |c| c.baseline),
            series("not a Service", (127, 127, 127), |c| c.not_service),
            series("established", (31, 119, 180), |c| c.established),
            series("new connection", (44, 160, 44), |c| c.new_connection),
        ],
    )?;
    body += "\n![Per-packet cost](benchmarks/packet-cost.svg)\n\n";
    write_section(out, "packet-cost", &body)?;
    let last = costs.last().context("no sizes")?;
    Ok((first.services, last.services, ratio(last) / ratio(first)))
}
