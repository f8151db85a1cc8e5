//! `ebpf-proxy trace`: runs a synthetic packet through the real programs with BPF_PROG_TEST_RUN, on
//! private maps programmed by the same code as `run`, and reports what the datapath does with it.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{Array, HashMap, MapData};
use aya::programs::{TestRun as _, TestRunOptions};
use clap::{Args, ValueEnum};
use etherparse::{Icmpv4Type, NetSlice, PacketBuilder, SlicedPacket, TransportSlice, icmpv4::DestUnreachableHeader};
use proxy_common::{
    Affinity, AffinityKey, DEFAULT_SNAT_PORT_MAX, DEFAULT_SNAT_PORT_MIN, FrontendKey, REJECT_BURST, REJECT_PER_SEC,
    RejectBudget, STAT_SNAT, addr_to_map, port_to_map, stat_is_drop, stat_name,
};
use serde::Serialize;

use crate::{
    config::{NodeArgs, Origin},
    conntrack::{ConntrackMaps, monotonic_ns},
    datapath::{Datapath, MapMode, PRIVATE_CONNTRACK_MAX, PROG_FROM_NETDEV, PROG_FROM_NODE, PROG_FROM_POD},
    model::{self, Model, ModelOptions, Protocol},
    objects,
    reconcile::{Reconciler, Tables},
    translate::{self, DesiredMaps, Ids, NodeContext},
};

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum TraceProto {
    Tcp,
    Udp,
    Sctp,
}

#[derive(Args, Clone, Debug)]
pub struct TraceArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Kubernetes objects: a YAML file or a directory of them.
    #[arg(long)]
    pub objects: PathBuf,
    #[arg(long, value_enum, default_value = "tcp")]
    pub proto: TraceProto,
    /// Source address of the packet.
    #[arg(long)]
    pub src: Ipv4Addr,
    /// Destination address and port.
    #[arg(long)]
    pub dst: SocketAddrV4,
    /// Print exactly one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Forward,
    Drop,
    Reject,
    Pass,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct TraceBackend {
    pub addr: String,
    pub masquerade: bool,
}

/// The JSON contract of `trace --json`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct TraceReport {
    pub verdict: Verdict,
    pub backends: Vec<TraceBackend>,
    pub program: String,
    pub reason: Option<String>,
}

/// What one run of the program did to the packet.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Outcome {
    verdict: Verdict,
    dst: Option<SocketAddrV4>,
    masquerade: bool,
    reason: Option<String>,
}

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const FIRST_SPORT: u16 = 20_000;

/// Builds the test packet: Ethernet + IPv4 + a TCP SYN or a UDP datagram with a small payload.
pub fn build_packet(proto: TraceProto, src: Ipv4Addr, sport: u16, dst: SocketAddrV4) -> Result<Vec<u8>> {
    let builder =
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ipv4(src.octets(), dst.ip().octets(), 64);
    let payload: &[u8] = b"trace";
    let mut out = Vec::new();
    match proto {
        TraceProto::Tcp => {
            let b = builder.tcp(sport, dst.port(), 1, 64_240).syn();
            b.write(&mut out, &[])?;
        }
        TraceProto::Udp => builder.udp(sport, dst.port()).write(&mut out, payload)?,
        TraceProto::Sctp => {
            let sctp = sctp_init(sport, dst.port());
            let ip = etherparse::Ipv4Header::new(
                sctp.len() as u16,
                64,
                etherparse::IpNumber::SCTP,
                src.octets(),
                dst.ip().octets(),
            )?;
            let eth = etherparse::Ethernet2Header {
                source: [2, 0, 0, 0, 0, 1],
                destination: [2, 0, 0, 0, 0, 2],
                ether_type: etherparse::EtherType::IPV4,
            };
            eth.write(&mut out)?;
            ip.write(&mut out)?;
            out.extend_from_slice(&sctp);
        }
    }
    Ok(out)
}

/// CRC32c as SCTP uses it (RFC 9260 appendix A), bit by bit.
pub fn sctp_crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}

/// An SCTP packet with one INIT chunk, checksummed.
pub fn sctp_init(sport: u16, dport: u16) -> Vec<u8> {
    let mut p = Vec::with_capacity(32);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[0; 8]); // verification tag 0 (INIT), checksum
    p.extend_from_slice(&[1, 0, 0, 20]); // INIT, flags, length
    p.extend_from_slice(&0x1234_5678u32.to_be_bytes()); // initiate tag
    p.extend_from_slice(&65_535u32.to_be_bytes()); // a_rwnd
    p.extend_from_slice(&[0, 1, 0, 1]); // outbound / inbound streams
    p.extend_from_slice(&1u32.to_be_bytes()); // initial TSN
    let crc = sctp_crc32c(&p);
    p[8..12].copy_from_slice(&crc.to_le_bytes());
    p
}

/// Reads source, destination and their ports from a packet.
pub fn endpoints_of(packet: &[u8]) -> Result<(SocketAddrV4, SocketAddrV4)> {
    let sliced = SlicedPacket::from_ethernet(packet).context("parsing the output packet")?;
    let Some(NetSlice::Ipv4(ip)) = sliced.net else { bail!("output is not IPv4") };
    let (s, d) = (ip.header().source_addr(), ip.header().destination_addr());
    let (sp, dp) = match sliced.transport {
        Some(TransportSlice::Tcp(t)) => (t.source_port(), t.destination_port()),
        Some(TransportSlice::Udp(u)) => (u.source_port(), u.destination_port()),
        _ if ip.payload().ip_number == etherparse::IpNumber::SCTP && ip.payload().payload.len() >= 4 => {
            let p = ip.payload().payload;
            (u16::from_be_bytes([p[0], p[1]]), u16::from_be_bytes([p[2], p[3]]))
        }
        _ => bail!("output has no TCP/UDP/SCTP header"),
    };
    Ok((SocketAddrV4::new(s, sp), SocketAddrV4::new(d, dp)))
}

/// Whether `out` answers the packet `src -> dst` with a TCP RST or an ICMP port unreachable.
pub fn is_reject_answer(out: &[u8], src: SocketAddrV4, dst: SocketAddrV4) -> bool {
    let Ok(sliced) = SlicedPacket::from_ethernet(out) else { return false };
    let Some(NetSlice::Ipv4(ip)) = sliced.net else { return false };
    let (s, d) = (ip.header().source_addr(), ip.header().destination_addr());
    match sliced.transport {
        Some(TransportSlice::Tcp(t)) => {
            t.rst() && SocketAddrV4::new(s, t.source_port()) == dst && SocketAddrV4::new(d, t.destination_port()) == src
        }
        Some(TransportSlice::Icmpv4(i)) => {
            matches!(i.icmp_type(), Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port))
                && s == *dst.ip()
                && d == *src.ip()
        }
        _ => false,
    }
}

/// The tc program that handles a packet from this origin in the deployed datapath.
pub fn program_for(origin: Origin) -> &'static str {
    match origin {
        Origin::LocalPod => PROG_FROM_POD,
        // The node's own packets meet the datapath at egress (sock4_connect balances most of them
        // at connect() first; what it leaves, and everything with --socket-lb=false, is this).
        Origin::Node => PROG_FROM_NODE,
        Origin::External => PROG_FROM_NETDEV,
    }
}

/// Private datapath programmed from the objects, ready to run packets through.
pub struct TraceDatapath {
    pub dp: Datapath,
    pub model: Model,
    pub node: NodeContext,
    pub desired: DesiredMaps,
    pub affinity: HashMap<MapData, AffinityKey, Affinity>,
    pub conntrack: ConntrackMaps,
    reject_budget: Array<MapData, RejectBudget>,
    tables: Tables,
    reconciler: Reconciler,
    ids: Ids,
}

impl TraceDatapath {
    pub fn new(objects_path: &std::path::Path, node: &NodeArgs) -> Result<Self> {
        Self::with_snat_ports(objects_path, node, (DEFAULT_SNAT_PORT_MIN, DEFAULT_SNAT_PORT_MAX))
    }

    /// As [`Self::new`], with another SNAT port range (tests of port allocation use a small one).
    pub fn with_snat_ports(objects_path: &std::path::Path, node: &NodeArgs, snat_ports: (u16, u16)) -> Result<Self> {
        Self::with_options(objects_path, node, snat_ports, PRIVATE_CONNTRACK_MAX)
    }

    /// As [`Self::with_snat_ports`], with a connection table of `conntrack_max` connections.
    pub fn with_options(
        objects_path: &std::path::Path,
        node: &NodeArgs,
        snat_ports: (u16, u16),
        conntrack_max: u32,
    ) -> Result<Self> {
        let objects = objects::load(objects_path)?;
        let model = model::build(&objects, &ModelOptions::default());
        let mut node = NodeContext::new(node, &model);
        node.snat_ports = snat_ports;
        let mut ids = Ids::default();
        let (desired, _) = translate::translate(&model, &node, &mut ids);
        let mut dp = Datapath::load(MapMode::Private { conntrack_max })?;
        let mut tables = dp.tables()?;
        let mut reconciler = Reconciler::new(&tables)?;
        reconciler.sync(&desired, &mut tables)?;
        let affinity = HashMap::try_from(dp.take_map("AFFINITY")?)?;
        let conntrack = dp.conntrack()?;
        let reject_budget = Array::try_from(dp.take_map("REJECT_BUDGET")?)?;
        Ok(Self { dp, model, node, desired, affinity, conntrack, reject_budget, tables, reconciler, ids })
    }

    /// Programs the maps for other objects, as `run` does on a change: IDs kept, only what changed
    /// written, connections and affinity left as they are.
    pub fn reprogram(&mut self, objects_path: &std::path::Path) -> Result<()> {
        let objects = objects::load(objects_path)?;
        self.model = model::build(&objects, &ModelOptions::default());
        let (desired, _) = translate::translate(&self.model, &self.node, &mut self.ids);
        self.reconciler.sync(&desired, &mut self.tables)?;
        self.desired = desired;
        Ok(())
    }

    /// Forgets every client's affinity, so each run chooses afresh.
    fn clear_affinity(&mut self) -> Result<()> {
        let keys: Vec<AffinityKey> = self.affinity.keys().collect::<Result<_, _>>()?;
        for k in keys {
            let _ = self.affinity.remove(&k);
        }
        Ok(())
    }

    /// A full budget of REJECT answers: a trace runs a packet many times, and each run must be
    /// answered as the first would be.
    fn refill_reject_budget(&mut self) -> Result<()> {
        let full = RejectBudget { credit_ns: REJECT_BURST * 1_000_000_000 / REJECT_PER_SEC, last_ns: monotonic_ns() };
        self.reject_budget.set(0, &full, 0)?;
        Ok(())
    }

    /// Forgets every connection: a trace is about new connections, and one trace's clients must not
    /// find the ports an earlier trace used still paired with a backend.
    fn clear_conntrack(&mut self) -> Result<()> {
        self.conntrack.clear()
    }

    /// Runs one packet through `program` and interprets the result.
    fn run_once(&self, program: &str, packet: &[u8]) -> Result<Outcome> {
        let prog = self.dp.classifier(program)?;
        let before = self.dp.read_stats()?;
        let mut out = vec![0u8; packet.len() + 256];
        let res = prog
            .test_run(TestRunOptions { data_in: Some(packet), data_out: Some(&mut out), ..Default::default() })
            .context("BPF_PROG_TEST_RUN")?;
        out.truncate(res.data_size_out as usize);
        let after = self.dp.read_stats()?;
        let reason = (0..before.len())
            .find(|&i| after[i] > before[i] && stat_is_drop(i as u32))
            .and_then(|i| stat_name(i as u32));
        let (src_in, dst_in) = endpoints_of(packet)?;
        Ok(match res.return_value {
            TC_ACT_REDIRECT if is_reject_answer(&out, src_in, dst_in) => {
                Outcome { verdict: Verdict::Reject, dst: None, masquerade: false, reason: None }
            }
            // REDIRECT with a translated packet: masqueraded to a node address and forwarded by the
            // program itself (see proxy-ebpf's fib.rs).
            TC_ACT_OK | TC_ACT_REDIRECT => {
                let (_, dst_out) = endpoints_of(&out)?;
                if dst_out != dst_in {
                    // Every run is a new connection (each trace starts with an empty conntrack): the
                    // counter tells masquerade from a port changed only because the backend already
                    // paired the client's port with itself (see proxy-ebpf's service.rs).
                    let masquerade = after[STAT_SNAT as usize] > before[STAT_SNAT as usize];
                    Outcome { verdict: Verdict::Forward, dst: Some(dst_out), masquerade, reason: None }
                } else {
                    Outcome { verdict: Verdict::Pass, dst: None, masquerade: false, reason: None }
                }
            }
            TC_ACT_SHOT => {
                Outcome { verdict: Verdict::Drop, dst: None, masquerade: false, reason: reason.map(Into::into) }
            }
            other => bail!("{program} returned unexpected action {other}"),
        })
    }

    /// Runs the packet often enough to see every backend the program can choose.
    pub fn trace(&mut self, args: &TraceArgs) -> Result<TraceReport> {
        let origin = args.node.origin(args.src);
        let program = program_for(origin);
        let proto = match args.proto {
            TraceProto::Tcp => Protocol::Tcp,
            TraceProto::Udp => Protocol::Udp,
            TraceProto::Sctp => Protocol::Sctp,
        };
        let key = FrontendKey {
            addr: addr_to_map(args.dst.ip().octets()),
            port: port_to_map(args.dst.port()),
            proto: proto.number(),
            _pad: 0,
        };
        let count =
            self.desired.frontends.get(&key).map_or(1, |f| u32::from(f.backend_count.max(f.local_count)).max(1));
        // P(some backend never chosen) <= n·(1-1/n)^runs < 1e-9 for these run counts.
        let runs = (32 + 24 * count).min(40_000);
        let mut backends = BTreeMap::new();
        let mut verdicts = BTreeMap::new();
        self.clear_conntrack()?;
        for i in 0..runs {
            let sport = FIRST_SPORT.wrapping_add(i as u16);
            let packet = build_packet(args.proto, args.src, sport, args.dst)?;
            self.refill_reject_budget()?;
            let o = self.run_once(program, &packet)?;
            self.clear_affinity()?;
            if let Some(dst) = o.dst {
                backends.insert(dst, o.masquerade);
            }
            verdicts.entry(o.verdict).or_insert(o.reason);
        }
        if verdicts.len() > 1 {
            bail!("the program gave different verdicts for the same packet: {verdicts:?}");
        }
        let (verdict, reason) = verdicts.into_iter().next().context("no runs")?;
        let mut backends: Vec<_> = backends
            .into_iter()
            .map(|(addr, masquerade)| (addr, TraceBackend { addr: addr.to_string(), masquerade }))
            .collect();
        backends.sort_by_key(|(a, _)| (u32::from(*a.ip()), a.port()));
        Ok(TraceReport {
            verdict,
            backends: backends.into_iter().map(|(_, b)| b).collect(),
            program: program.into(),
            reason,
        })
    }

    /// The readable explanation: the matching Service port and why its endpoints are (not) eligible.
    pub fn explain(&self, args: &TraceArgs, report: &TraceReport) -> String {
        let mut s = String::new();
        let origin = args.node.origin(args.src);
        let proto = format!("{:?}", args.proto).to_uppercase();
        let _ = writeln!(s, "packet   {proto} {}:{} -> {}", args.src, FIRST_SPORT, args.dst);
        let _ = writeln!(s, "origin   {origin:?} (program {})", report.program);
        let found = self.model.ports.values().find_map(|sp| {
            let kind = translate::frontend_addresses(sp, &self.node)
                .into_iter()
                .find(|(ip, port, _)| *ip == *args.dst.ip() && *port == args.dst.port())?;
            (sp.name.protocol.to_string() == proto).then_some((sp, kind.2))
        });
        match found {
            Some((sp, flags)) => {
                let _ = writeln!(s, "service  {} ({})", sp.name, translate::describe_frontend(flags));
                let cat = sp.categorize(&self.node.name, self.node.zone.as_deref());
                if let Some(mode) = cat.topology {
                    let _ = writeln!(s, "topology {mode}: the cluster-wide set is limited to hinted endpoints");
                }
                for ep in &sp.endpoints {
                    let sets: Vec<&str> =
                        [("cluster-wide", cat.cluster.contains(&ep)), ("local", cat.local.contains(&ep))]
                            .into_iter()
                            .filter_map(|(n, inside)| inside.then_some(n))
                            .collect();
                    let state = match (ep.ready, ep.serving, ep.terminating) {
                        (true, _, _) => "ready",
                        (false, true, true) => "serving, terminating",
                        (false, _, true) => "terminating, not serving",
                        _ => "not ready",
                    };
                    let node = ep.node_name.as_deref().unwrap_or("?");
                    let sets = if sets.is_empty() {
                        "in no set".to_string()
                    } else {
                        format!("in the {} set", sets.join(" and "))
                    };
                    let _ = writeln!(s, "endpoint {}:{} on {node}: {state}; {sets}", ep.addr, ep.port);
                }
                if sp.endpoints.is_empty() {
                    let _ = writeln!(s, "endpoint (none)");
                }
                let _ = writeln!(s, "policy   {}", translate::describe_policy(sp, &cat));
            }
            None => {
                let _ = writeln!(s, "service  none: {} is not a Service port", args.dst);
            }
        }
        let verdict = format!("{:?}", report.verdict).to_lowercase();
        let _ = write!(s, "verdict  {verdict}");
        if let Some(r) = &report.reason {
            let _ = write!(s, " ({r})");
        }
        let _ = writeln!(s);
        for b in &report.backends {
            let _ = writeln!(s, "backend  {}{}", b.addr, if b.masquerade { " (source masqueraded)" } else { "" });
        }
        s
    }
}

pub fn trace(args: &TraceArgs) -> Result<()> {
    let mut tdp = TraceDatapath::new(&args.objects, &args.node)?;
    let report = tdp.trace(args)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", tdp.explain(args, &report));
    }
    Ok(())
}
