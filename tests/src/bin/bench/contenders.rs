//! ebpf-proxy against what operators run instead, side by side in one run: no proxy, kube-proxy's
//! iptables layout, its nftables layout, ebpf-proxy with socket-level load balancing and with the tc
//! path only.
//!
//! Each datapath gets a node namespace of its own, with the same ten nginx pods (pod-0 also runs an
//! iperf3 server) and its own client pods, so all of them stay programmed at once and every measure is
//! taken in interleaved rounds (the machine's drift falls on all alike). Clients connect to the `HIT`
//! Services spread over the table (no proxy: to the pods themselves).

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use plotters::style::RGBColor;
use serde_json::Value;
use tests::testbed::{Node, Proc, run, wait_for};

use crate::{
    kube_proxy,
    load::{self, Mode, Outcome},
    plot::{self, Series},
    table::{HTTP_PORT, IPERF_PORT, MapView, Table},
};

/// How much of everything to run.
pub struct Plan {
    pub sizes: Vec<usize>,
    pub rounds: usize,
    pub connect_secs: f64,
    pub keepalive_secs: f64,
    pub iperf_secs: u32,
    pub changes: usize,
    /// Largest table loaded with `nft -f` (its load time grows with the square of the table here).
    pub nft_max: usize,
    pub workers: usize,
}

impl Plan {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                sizes: vec![100, 1_000],
                rounds: 1,
                connect_secs: 1.0,
                keepalive_secs: 0.5,
                iperf_secs: 1,
                changes: 3,
                nft_max: 1_000,
                workers: 2,
            }
        } else {
            Self {
                sizes: vec![100, 1_000, 10_000, 30_000],
                rounds: 3,
                connect_secs: 2.0,
                keepalive_secs: 1.0,
                iperf_secs: 2,
                changes: 5,
                nft_max: 10_000,
                workers: 2,
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    NoProxy,
    Iptables,
    Nftables,
    EbpfSocket,
    EbpfTc,
}

pub const KINDS: [Kind; 5] = [Kind::NoProxy, Kind::Iptables, Kind::Nftables, Kind::EbpfSocket, Kind::EbpfTc];

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::NoProxy => "no proxy",
            Kind::Iptables => "kube-proxy iptables",
            Kind::Nftables => "kube-proxy nftables",
            Kind::EbpfSocket => "ebpf-proxy socket LB",
            Kind::EbpfTc => "ebpf-proxy tc only",
        }
    }

    fn color(self) -> RGBColor {
        match self {
            Kind::NoProxy => RGBColor(0, 0, 0),
            Kind::Iptables => RGBColor(214, 39, 40),
            Kind::Nftables => RGBColor(255, 127, 14),
            Kind::EbpfSocket => RGBColor(31, 119, 180),
            Kind::EbpfTc => RGBColor(44, 160, 44),
        }
    }

    /// The node it runs on (index into the beds), the client pod at table size `n`, and whether that
    /// pod is in the node's cgroup (socket-level load balancing).
    fn client(self, n: usize) -> (usize, String, bool) {
        match self {
            Kind::NoProxy => (0, format!("client-{n}"), false),
            Kind::Iptables => (1, format!("client-{n}"), false),
            Kind::Nftables => (2, format!("client-{n}"), false),
            Kind::EbpfSocket => (3, format!("client-{n}"), true),
            Kind::EbpfTc => (3, format!("client-tc-{n}"), false),
        }
    }
}

const LIVE_PODS: usize = 10;

/// A node with ten nginx pods (pod-0 with an iperf3 server as well) and client pods (new ones for
/// each table size: the backends keep the last size's connections in TIME_WAIT for a minute, and
/// ebpf-proxy, restarted with its maps removed, could not know which client ports they hold).
struct Bed {
    node: Node,
    _iperf: Proc,
}

impl Bed {
    fn new() -> Result<Self> {
        let mut node = Node::new(LIVE_PODS)?;
        for pod in &mut node.pods {
            pod.start_nginx()?;
        }
        let pod = &node.pods[0];
        let mut cmd = pod.ns.command("iperf3");
        cmd.args(["-s", "-p", &IPERF_PORT.to_string()]).stdout(Stdio::null()).stderr(Stdio::null());
        let iperf = Proc::spawn(cmd, "iperf3 server")?;
        let listening = format!("sport = :{IPERF_PORT}");
        wait_for(Duration::from_secs(5), || {
            run(pod.ns.command("ss").args(["-Hltn", &listening])).is_ok_and(|o| !o.trim().is_empty())
        })
        .context("iperf3 server did not start")?;
        Ok(Self { node, _iperf: iperf })
    }

    fn live(&self) -> Vec<Ipv4Addr> {
        self.node.pods[..LIVE_PODS].iter().map(|p| p.ip).collect()
    }
}

#[derive(Default)]
pub struct Measures {
    pub connect: Outcome,
    pub keepalive: Outcome,
    pub gbps: Vec<f64>,
}

/// Everything measured at one table size.
pub struct SizeResult {
    pub services: usize,
    pub measures: Vec<(Kind, Measures)>,
    pub iptables_load: Duration,
    pub nft_load: Option<Duration>,
    /// ebpf-proxy: the first sync (snapshot → maps written), and process start → ready.
    pub ebpf_sync: Option<Duration>,
    pub ebpf_sync_phases: String,
    pub ebpf_ready: Duration,
    pub iptables_change: Vec<Duration>,
    pub nft_change: Vec<Duration>,
    pub ebpf_change: Vec<Duration>,
    pub rss_mib: f64,
    pub map_mib: f64,
}

impl SizeResult {
    pub fn measure(&self, kind: Kind) -> Option<&Measures> {
        self.measures.iter().find(|(k, _)| *k == kind).map(|(_, m)| m)
    }
}

pub fn percentile_us(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    f64::from(sorted[((sorted.len() as f64 - 1.0) * p).round() as usize])
}

fn median(d: &[Duration]) -> Option<Duration> {
    let mut d = d.to_vec();
    d.sort();
    d.get(d.len() / 2).copied()
}

fn iperf_gbps(bed: &Bed, pod: &str, in_cgroup: bool, to: SocketAddrV4, secs: u32) -> Result<f64> {
    let (ip, port, t) = (to.ip().to_string(), to.port().to_string(), secs.to_string());
    let args = ["-c", &ip, "-p", &port, "-t", &t, "-J", "--connect-timeout", "2000"];
    let out = run(&mut bed.node.pod_command(pod, in_cgroup, "iperf3", &args))?;
    let v: Value = serde_json::from_str(&out)?;
    let bps = v["end"]["sum_received"]["bits_per_second"].as_f64().context("iperf3 gave no bits_per_second")?;
    Ok(bps / 1e9)
}

/// Measures every contender at every size; writes the tables and plots.
pub fn run_all(binary: &Path, plan: &Plan) -> Result<Vec<SizeResult>> {
    eprintln!("contenders: starting four nodes with {LIVE_PODS} nginx pods each …");
    let mut beds = [Bed::new()?, Bed::new()?, Bed::new()?, Bed::new()?];
    let live = beds[0].live();
    let mut results = Vec::new();
    for &n in &plan.sizes {
        results.push(one_size(binary, plan, &mut beds, &live, n)?);
    }
    Ok(results)
}

fn one_size(binary: &Path, plan: &Plan, beds: &mut [Bed; 4], live: &[Ipv4Addr], n: usize) -> Result<SizeResult> {
    let mut table = Table::new(n, live);
    for kind in KINDS {
        let (bed, pod, _) = kind.client(n);
        if !beds[bed].node.pods.iter().any(|p| p.name == pod) {
            beds[bed].node.add_pod(&pod)?;
        }
    }
    eprintln!("contenders: {n} Services × {} endpoints: programming …", crate::table::ENDPOINTS);
    kube_proxy::clear_iptables(&beds[1].node.ns)?;
    let iptables_load =
        kube_proxy::load(&beds[1].node.ns, "iptables-legacy-restore", &[], &kube_proxy::iptables_full(&table))?;
    eprintln!("  iptables-legacy-restore: {iptables_load:.2?}");
    kube_proxy::clear_nft(&beds[2].node.ns)?;
    let nft_load = if n <= plan.nft_max {
        let t = kube_proxy::load(&beds[2].node.ns, "nft", &["-f", "-"], &kube_proxy::nft_full(&table))?;
        eprintln!("  nft -f: {t:.2?}");
        Some(t)
    } else {
        None
    };
    let (api, ebpf_ready) = crate::start_on_api_server(&mut beds[3].node, binary, &table.services)?;
    let ebpf_sync_phases = crate::initial_sync(&beds[3].node);
    let ebpf_sync = crate::sync_total(&ebpf_sync_phases);
    eprintln!("  ebpf-proxy: ready in {ebpf_ready:.2?}, sync {ebpf_sync_phases}");
    let pid = beds[3].node.proxy_pid().context("proxy pid")?;
    let rss_mib = crate::rss_kib(pid)? as f64 / 1024.0;
    let map_mib = crate::map_memory_bytes(&beds[3].node.bpffs.path)? as f64 / (1024.0 * 1024.0);

    let kinds: Vec<Kind> = KINDS.into_iter().filter(|&k| k != Kind::Nftables || nft_load.is_some()).collect();
    let mut measures: Vec<(Kind, Measures)> = kinds.iter().map(|&k| (k, Measures::default())).collect();
    let targets = |k: Kind| -> Vec<SocketAddrV4> {
        if k == Kind::NoProxy {
            live.iter().map(|&a| SocketAddrV4::new(a, HTTP_PORT)).collect()
        } else {
            table.hit_frontends()
        }
    };
    let iperf_target = |k: Kind| {
        if k == Kind::NoProxy { SocketAddrV4::new(live[0], IPERF_PORT) } else { table.services[table.iperf].frontend() }
    };
    // Interleaved rounds, the order rotated each round.
    for (mode, secs) in [(Mode::Connect, plan.connect_secs), (Mode::KeepAlive, plan.keepalive_secs)] {
        for r in 0..plan.rounds {
            for k in 0..measures.len() {
                let (kind, m) = &mut measures[(k + r) % kinds.len()];
                let (bed, pod, in_cgroup) = kind.client(n);
                let o = load::run_in(&beds[bed].node, &pod, in_cgroup, mode, secs, plan.workers, &targets(*kind))?;
                match mode {
                    Mode::Connect => m.connect.merge(o),
                    Mode::KeepAlive => m.keepalive.merge(o),
                }
            }
        }
    }
    for r in 0..plan.rounds {
        for k in 0..measures.len() {
            let (kind, m) = &mut measures[(k + r) % kinds.len()];
            let (bed, pod, in_cgroup) = kind.client(n);
            m.gbps.push(iperf_gbps(&beds[bed], &pod, in_cgroup, iperf_target(*kind), plan.iperf_secs)?);
        }
    }
    // What the datapath counted, for whoever reads the log.
    let stats = beds[3].node.stats()?;
    let counted: Vec<String> = (0..proxy_common::STAT_MAX)
        .filter(|&i| stats[i as usize] > 0)
        .map(|i| format!("{}={}", proxy_common::stat_name(i).unwrap_or("?"), stats[i as usize]))
        .collect();
    eprintln!("  ebpf-proxy counters: {}", counted.join(" "));
    for (_, m) in &mut measures {
        m.connect.latencies_us.sort_unstable();
        m.connect.connect_us.sort_unstable();
        m.keepalive.latencies_us.sort_unstable();
        m.gbps.sort_by(f64::total_cmp);
    }

    // One endpoint change at a time, applied to every contender: a Service that is not hit gets a
    // new address for endpoint 0.
    let view = MapView::open(&beds[3].node.bpffs.path)?;
    let (mut iptables_change, mut nft_change, mut ebpf_change) = (Vec::new(), Vec::new(), Vec::new());
    for k in 0..plan.changes {
        let i = (0..n).map(|d| (k * 7919 + 1 + d) % n).find(|i| !table.hit.contains(i) && *i != table.iperf);
        let i = i.context("no Service to change")?;
        let before = table.services[i].clone();
        let mut changed = before.clone();
        let new = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 250, 0, 0)) + k as u32);
        changed.endpoints[0].set_ip(new);
        iptables_change.push(kube_proxy::load(
            &beds[1].node.ns,
            "iptables-legacy-restore",
            &["--noflush"],
            &kube_proxy::iptables_change(&table, &changed, &before),
        )?);
        if nft_load.is_some() {
            nft_change.push(kube_proxy::load(
                &beds[2].node.ns,
                "nft",
                &["-f", "-"],
                &kube_proxy::nft_change(&changed, &before),
            )?);
        }
        let t0 = Instant::now();
        api.apply_object(changed.slice_json())?;
        ebpf_change.push(view.wait_for_backend(changed.frontend(), new, t0)?);
        table.services[i] = changed;
    }
    // The changes reached the kernel: the iptables and nftables rules now name the new endpoint.
    let iptables_now = run(beds[1].node.ns.command("iptables-legacy-save").args(["-t", "nat"]))?;
    ensure!(iptables_now.contains("10.250.0.0:80"), "the iptables change is not in the ruleset");
    beds[3].node.stop_proxy()?;
    drop(api);
    Ok(SizeResult {
        services: n,
        measures,
        iptables_load,
        nft_load,
        ebpf_sync,
        ebpf_sync_phases,
        ebpf_ready,
        iptables_change,
        nft_change,
        ebpf_change,
        rss_mib,
        map_mib,
    })
}

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms >= 100.0 { format!("{ms:.0} ms") } else { format!("{ms:.1} ms") }
}

fn us(v: f64) -> String {
    if v >= 1000.0 { format!("{:.2} ms", v / 1e3) } else { format!("{v:.0} µs") }
}

/// The Markdown section and the plots (written beside `out`, in `benchmarks/`).
pub fn section(results: &[SizeResult], plan: &Plan, out: &Path, machine: &str, quick: bool) -> Result<String> {
    let mut b = String::new();
    writeln!(b, "## ebpf-proxy against kube-proxy and no proxy\n")?;
    writeln!(
        b,
        "One run, one machine ({machine}). Each datapath has its own node namespace with the same {LIVE_PODS} nginx \
         pods (nginx-light; pod-0 also runs `iperf3 -s`) and its own client pods, so all stay programmed and \
         every measure is taken in {rounds} interleaved round(s), the order rotated each round. Services: N ClusterIP \
         Services × 10 endpoints; {hit} of them, spread evenly over the table, send to the live pods, one in the \
         middle to the iperf3 server (one endpoint, so that iperf3's two connections meet the same server), the \
         rest to addresses nobody has. Contenders:\n\n\
         - **no proxy**: the client connects to the pods' addresses (the physical limit);\n\
         - **kube-proxy iptables**: the rules kube-proxy's `pkg/proxy/iptables/proxier.go` writes (KUBE-SERVICES → \
           KUBE-SVC-* `statistic random` → KUBE-SEP-* DNAT, KUBE-MARK-MASQ, KUBE-POSTROUTING, KUBE-NODEPORTS last; \
           per-endpoint comments dropped above 1,000 endpoints as kube-proxy does), loaded with \
           `iptables-legacy-restore`;\n\
         - **kube-proxy nftables**: the table `pkg/proxy/nftables/proxier.go` writes (`service-ips` verdict map, \
           `numgen random mod 10`, endpoint chains, `masquerading`, the filter checks), loaded with `nft -f`;\n\
         - **ebpf-proxy socket LB**: `ebpf-proxy run` (release) watching the test API server, client in the \
           node's cgroup (connect() goes straight to a backend);\n\
         - **ebpf-proxy tc only**: the same proxy, client outside the cgroup (every packet through the tc \
           programs' conntrack and NAT).\n\n\
         The generators are in `tests/src/bin/bench/kube_proxy.rs`, with the kube-proxy source each follows. \
         Reproduce: `cargo xtask bench{q}`.\n",
        rounds = plan.rounds,
        hit = crate::table::HIT,
        q = if quick { " --quick" } else { "" }
    )?;
    if let Some(max) = plan.sizes.iter().find(|&&n| n > plan.nft_max) {
        writeln!(
            b,
            "nftables is not measured above {} Services: `nft -f` of kube-proxy's table grows with the square of \
             the table on this kernel (every jump into an endpoint chain makes the kernel's loop check walk every \
             anonymous verdict map in the table), so {max} Services would take far longer than this whole \
             benchmark — see the load times below, and kubernetes/kubernetes#139513 and #135639 for the same in \
             real clusters. Its datapath is one hash lookup per new connection, flat in N.\n",
            plan.nft_max
        )?;
    }

    let no_proxy = |r: &SizeResult, f: &dyn Fn(&Measures) -> f64| r.measure(Kind::NoProxy).map_or(f64::NAN, f);
    writeln!(
        b,
        "### New connections\n\n{w} client threads, each opening a connection per request (`Connection: close`), \
         {s} s per round. connect: the time connect() took — the handshake, where every proxy does its \
         per-connection work (socket LB: the connect hook; tc: DNAT of the SYN, reverse NAT of the SYN-ACK; \
         netfilter: the nat chains on the SYN); request: connect + request + answer, which adds nginx's own \
         time. Rate = successful requests per second.\n",
        w = plan.workers,
        s = plan.connect_secs
    )?;
    writeln!(
        b,
        "| Services | contender | conn/s | connect p50 | connect p99 | ÷ no proxy | request p50 | request p99 | ÷ no proxy | errors |"
    )?;
    writeln!(b, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    let p99 = |o: &Outcome| percentile_us(&o.latencies_us, 0.99);
    let p50 = |o: &Outcome| percentile_us(&o.latencies_us, 0.5);
    let rate = |o: &Outcome| o.latencies_us.len() as f64 / o.seconds;
    let c99 = |o: &Outcome| percentile_us(&o.connect_us, 0.99);
    for r in results {
        for (k, m) in &r.measures {
            writeln!(
                b,
                "| {} | {} | {:.0} | {} | {} | {:.2} | {} | {} | {:.2} | {} |",
                r.services,
                k.name(),
                rate(&m.connect),
                us(percentile_us(&m.connect.connect_us, 0.5)),
                us(c99(&m.connect)),
                c99(&m.connect) / no_proxy(r, &|m| c99(&m.connect)),
                us(p50(&m.connect)),
                us(p99(&m.connect)),
                p99(&m.connect) / no_proxy(r, &|m| p99(&m.connect)),
                m.connect.errors
            )?;
        }
    }
    writeln!(
        b,
        "\n### Requests on kept-alive connections\n\n{w} client threads, each with one open connection per target, \
         {s} s per round.\n",
        w = plan.workers,
        s = plan.keepalive_secs
    )?;
    writeln!(b, "| Services | contender | req/s | p50 | p99 | p99 ÷ no proxy | errors |")?;
    writeln!(b, "|---:|---|---:|---:|---:|---:|---:|")?;
    for r in results {
        for (k, m) in &r.measures {
            writeln!(
                b,
                "| {} | {} | {:.0} | {} | {} | {:.2} | {} |",
                r.services,
                k.name(),
                rate(&m.keepalive),
                us(p50(&m.keepalive)),
                us(p99(&m.keepalive)),
                p99(&m.keepalive) / no_proxy(r, &|m| p99(&m.keepalive)),
                m.keepalive.errors
            )?;
        }
    }
    let gbps = |m: &Measures| m.gbps.get(m.gbps.len() / 2).copied().unwrap_or(f64::NAN);
    writeln!(
        b,
        "\n### Bulk TCP throughput\n\n`iperf3 -c <ClusterIP> -t {}` (no proxy: the pod's address), median of the rounds.\n",
        plan.iperf_secs
    )?;
    writeln!(b, "| Services | contender | Gbit/s | ÷ no proxy |")?;
    writeln!(b, "|---:|---|---:|---:|")?;
    for r in results {
        for (k, m) in &r.measures {
            writeln!(b, "| {} | {} | {:.2} | {:.2} |", r.services, k.name(), gbps(m), gbps(m) / no_proxy(r, &gbps))?;
        }
    }
    writeln!(
        b,
        "\n### Control plane\n\nProgramming N Services from nothing: `iptables-legacy-restore` and `nft -f` of the \
         whole layout (the text already generated), against ebpf-proxy's first sync (snapshot of the watched \
         objects → model → translation → maps written; in brackets, process start → ready, which adds loading and \
         attaching the programs and listing everything from the API server). One endpoint change: the partial \
         restore / nft transaction kube-proxy sends, against ebpf-proxy from the EndpointSlice update at the API \
         server to the new backend read back from the pinned maps; median of {} changes.\n",
        plan.changes
    )?;
    writeln!(
        b,
        "| Services | iptables-restore | nft -f | ebpf-proxy sync (start → ready) | change: iptables | change: nftables | change: ebpf-proxy | ebpf-proxy RSS | BPF maps |"
    )?;
    writeln!(b, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    let opt = |d: Option<Duration>| d.map_or_else(|| "—".to_owned(), ms);
    for r in results {
        writeln!(
            b,
            "| {} | {} | {} | {} ({}) | {} | {} | {} | {:.0} MiB | {:.0} MiB |",
            r.services,
            ms(r.iptables_load),
            opt(r.nft_load),
            opt(r.ebpf_sync),
            ms(r.ebpf_ready),
            opt(median(&r.iptables_change)),
            opt(median(&r.nft_change)),
            opt(median(&r.ebpf_change)),
            r.rss_mib,
            r.map_mib
        )?;
    }
    writeln!(b, "\nebpf-proxy's first sync by phase:\n")?;
    for r in results {
        writeln!(b, "- {} Services: {}", r.services, r.ebpf_sync_phases)?;
    }
    b += "\n";
    b += &plots(results, out)?;
    Ok(b)
}

/// One SVG per measure, against N; returns the Markdown that shows them.
fn plots(results: &[SizeResult], out: &Path) -> Result<String> {
    let dir = out.parent().unwrap_or(Path::new(".")).join("benchmarks");
    std::fs::create_dir_all(&dir)?;
    let series = |f: &dyn Fn(&SizeResult, &Measures) -> f64| -> Vec<Series> {
        KINDS
            .iter()
            .map(|&k| Series {
                name: k.name(),
                color: k.color(),
                points: results
                    .iter()
                    .filter_map(|r| r.measure(k).map(|m| (r.services as f64, f(r, m))))
                    .filter(|(_, y)| y.is_finite())
                    .collect(),
            })
            .filter(|s| !s.points.is_empty())
            .collect()
    };
    let charts: Vec<(&str, &str, &str, bool, Vec<Series>)> = vec![
        (
            "new-connection-p99.svg",
            "New connection: connect() p99",
            "µs",
            true,
            series(&|_, m| percentile_us(&m.connect.connect_us, 0.99)),
        ),
        (
            "new-connection-request-p99.svg",
            "New connection: whole request p99",
            "µs",
            true,
            series(&|_, m| percentile_us(&m.connect.latencies_us, 0.99)),
        ),
        (
            "new-connection-rate.svg",
            "New connections per second",
            "connections / s",
            false,
            series(&|_, m| m.connect.latencies_us.len() as f64 / m.connect.seconds),
        ),
        (
            "keepalive-p99.svg",
            "Kept-alive request latency, p99",
            "µs",
            false,
            series(&|_, m| percentile_us(&m.keepalive.latencies_us, 0.99)),
        ),
        (
            "throughput.svg",
            "Bulk TCP throughput (iperf3)",
            "Gbit/s",
            false,
            series(&|_, m| m.gbps.get(m.gbps.len() / 2).copied().unwrap_or(f64::NAN)),
        ),
    ];
    let mut md = String::from("### Plots\n\n");
    for (file, title, unit, log_y, s) in charts {
        plot::chart(&dir.join(file), title, unit, log_y, &s)?;
        writeln!(md, "![{title}](benchmarks/{file})")?;
    }
    // One line of a per-size figure (skipped where it was not measured).
    let line = |name: &'static str, color: RGBColor, f: &dyn Fn(&SizeResult) -> Option<f64>| Series {
        name,
        color,
        points: results.iter().filter_map(|r| f(r).map(|y| (r.services as f64, y))).collect(),
    };
    let in_ms = |d: Duration| d.as_secs_f64() * 1e3;
    let file = "program-time.svg";
    plot::chart(
        &dir.join(file),
        "Programming N Services from nothing",
        "ms",
        true,
        &[
            line(Kind::Iptables.name(), Kind::Iptables.color(), &|r| Some(in_ms(r.iptables_load))),
            line(Kind::Nftables.name(), Kind::Nftables.color(), &|r| r.nft_load.map(in_ms)),
            line("ebpf-proxy", Kind::EbpfSocket.color(), &|r| r.ebpf_sync.map(in_ms)),
        ],
    )?;
    writeln!(md, "![Programming N Services](benchmarks/{file})")?;
    let file = "change-time.svg";
    plot::chart(
        &dir.join(file),
        "One endpoint change in force",
        "ms",
        true,
        &[
            line(Kind::Iptables.name(), Kind::Iptables.color(), &|r| median(&r.iptables_change).map(in_ms)),
            line(Kind::Nftables.name(), Kind::Nftables.color(), &|r| median(&r.nft_change).map(in_ms)),
            line("ebpf-proxy", Kind::EbpfSocket.color(), &|r| median(&r.ebpf_change).map(in_ms)),
        ],
    )?;
    writeln!(md, "![One endpoint change](benchmarks/{file})")?;
    let file = "memory.svg";
    plot::chart(
        &dir.join(file),
        "ebpf-proxy memory",
        "MiB",
        false,
        &[
            line("proxy RSS", Kind::EbpfSocket.color(), &|r| Some(r.rss_mib)),
            line("BPF maps", Kind::EbpfTc.color(), &|r| Some(r.map_mib)),
        ],
    )?;
    writeln!(md, "![ebpf-proxy memory](benchmarks/{file})\n")?;
    Ok(md)
}
