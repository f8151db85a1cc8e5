//! The datapath fuzzer: generated and mutated packets through both tc programs with
//! BPF_PROG_TEST_RUN, against maps programmed from a Service table with every kind of frontend,
//! each outcome held to the datapath's invariants:
//! - the action is pass, drop or redirect (a REJECT or fragmentation-needed answer is a redirect);
//! - every drop is counted under exactly one reason (the drop counters grow by the number of drops,
//!   checked every `check_every` packets);
//! - a packet that is not Service traffic (addresses no Service, node, pod or client uses) passes
//!   byte for byte, or is dropped as malformed;
//! - a packet that was changed keeps its length (unless answered), and has valid IP and L4 (or ICMP)
//!   checksums when it arrived with valid ones;
//! - a translated TCP or UDP packet's reply is translated back to the original tuple.
//!
//! Packets: TCP (every flag combination, options), UDP, SCTP, to frontends and beside them; replies
//! to translated connections; ICMP errors quoting translated packets and restored replies; datagrams
//! in fragments (some lost or reordered); garbage; and mutations of any of them (bit flips,
//! truncation, padding, lengths, IP options, fragment bits, checksums). Deterministic for a seed: a
//! violation names the packet's index, and the same seed and count replay it.

use std::{
    collections::{BTreeMap, VecDeque},
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use ebpf_proxy::{
    datapath::{PROG_FROM_NETDEV, PROG_FROM_POD},
    trace::sctp_crc32c,
};
use etherparse::{Icmpv4Type, NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use proxy_common::{STAT_ALL, stat_is_drop, stat_name};

use crate::{
    packets::{self, IP_OFF, MAC_A, MAC_B, fix_ip_checksum, fragments},
    progbed::{NODE_IP, ProgBed, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT},
};

/// The Service table the fuzzer programs: ClusterIPs (TCP, UDP, SCTP; local and remote backends;
/// affinity; no endpoints), NodePorts (externalTrafficPolicy Cluster and Local), a LoadBalancer with
/// source ranges and an externalIP.
pub const OBJECTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports:
    - {name: http, port: 80, nodePort: 30080, protocol: TCP}
    - {name: dns, port: 53, nodePort: 30053, protocol: UDP}
    - {name: s, port: 99, nodePort: 30099, protocol: SCTP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}, {name: s, port: 99, protocol: SCTP}]
endpoints:
  - {addresses: [10.244.1.2], nodeName: node-a, conditions: {ready: true}}
  - {addresses: [10.244.1.3], nodeName: node-a, conditions: {ready: true}}
  - {addresses: [10.244.2.7], nodeName: node-b, conditions: {ready: true}}
---
apiVersion: v1
kind: Service
metadata: {name: local, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.11
  externalTrafficPolicy: Local
  externalIPs: [192.0.2.20]
  loadBalancerSourceRanges: [203.0.113.0/25]
  ports: [{name: http, port: 80, nodePort: 30081, protocol: TCP}, {name: dns, port: 53, nodePort: 30054, protocol: UDP}]
status:
  loadBalancer: {ingress: [{ip: 192.0.2.10}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: local-1, namespace: default, labels: {kubernetes.io/service-name: local}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]
endpoints:
  - {addresses: [10.244.1.4], nodeName: node-a, conditions: {ready: true}}
  - {addresses: [10.244.2.8], nodeName: node-b, conditions: {ready: true}}
---
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: default}
spec:
  clusterIP: 10.96.0.30
  sessionAffinity: ClientIP
  ports: [{name: http, port: 80, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: sticky-1, namespace: default, labels: {kubernetes.io/service-name: sticky}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
  - {addresses: [10.244.1.2], nodeName: node-a, conditions: {ready: true}}
  - {addresses: [10.244.2.7], nodeName: node-b, conditions: {ready: true}}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: default}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80, protocol: TCP}, {name: dns, port: 53, protocol: UDP}]
"#;

/// Frontends (address, port, protocol) of [`OBJECTS`], and addresses beside them.
const FRONTENDS: &[([u8; 4], u16, u8)] = &[
    ([10, 96, 0, 10], 80, TCP),
    ([10, 96, 0, 10], 53, UDP),
    ([10, 96, 0, 10], 99, SCTP),
    ([192, 168, 50, 2], 30080, TCP),
    ([192, 168, 50, 2], 30053, UDP),
    ([192, 168, 50, 2], 30099, SCTP),
    ([10, 96, 0, 11], 80, TCP),
    ([10, 96, 0, 11], 53, UDP),
    ([192, 0, 2, 10], 80, TCP),
    ([192, 0, 2, 20], 53, UDP),
    ([192, 168, 50, 2], 30081, TCP),
    ([192, 168, 50, 2], 30054, UDP),
    ([10, 96, 0, 30], 80, TCP),
    ([10, 96, 0, 20], 80, TCP),
    ([10, 96, 0, 20], 53, UDP),
];
const BACKENDS: &[[u8; 4]] = &[[10, 244, 1, 2], [10, 244, 1, 3], [10, 244, 1, 4], [10, 244, 2, 7], [10, 244, 2, 8]];

const TCP: u8 = 6;
const UDP: u8 = 17;
const SCTP: u8 = 132;
const ICMP: u8 = 1;
/// The SNAT range: small, so exhaustion and reuse are exercised too.
pub const SNAT_PORTS: (u16, u16) = (61_000, 61_063);
/// The shortest IPv4 frame BPF_PROG_TEST_RUN takes (Ethernet and a fixed IP header).
const MIN_IPV4_FRAME: usize = IP_OFF + 20;
/// Packets remembered for replies and ICMP quotes.
const RECENT: usize = 512;

pub struct Options {
    pub seed: u64,
    pub count: u64,
    /// Drop accounting is checked every this many packets (1: after each).
    pub check_every: u64,
    /// Every this many packets a day passes for the connection table (its entries aged a day, the
    /// collector run), so the table empties again and new connections keep coming.
    pub day_every: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self { seed: 1, count: 1_000_000, check_every: 1_000, day_every: 100_000 }
    }
}

/// What a run did.
#[derive(Debug, Default)]
pub struct Report {
    pub packets: u64,
    pub passed: u64,
    pub dropped: u64,
    pub redirected: u64,
    /// Packets changed by the datapath (translated or answered).
    pub changed: u64,
    /// Translations whose reply was run back and restored the original tuple.
    pub reversed: u64,
    /// Packets of no Service that passed untouched or were dropped as malformed.
    pub foreign: u64,
    pub mutated: u64,
    /// Connections the collector removed after the days passed.
    pub collected: u64,
    pub drops: BTreeMap<&'static str, u64>,
    pub elapsed: Duration,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rate = self.packets as f64 / self.elapsed.as_secs_f64().max(1e-9);
        writeln!(
            f,
            "{} packets in {:.1} s ({rate:.0}/s): {} passed, {} dropped, {} redirected; {} changed, {} reverse-checked, \
             {} foreign, {} mutated; {} connections collected",
            self.packets,
            self.elapsed.as_secs_f64(),
            self.passed,
            self.dropped,
            self.redirected,
            self.changed,
            self.reversed,
            self.foreign,
            self.mutated,
            self.collected
        )?;
        write!(f, "drops by reason:")?;
        for (reason, n) in &self.drops {
            write!(f, " {reason}={n}")?;
        }
        Ok(())
    }
}

/// splitmix64: small, fast, and the same sequence on every machine for a seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// One packet to run.
struct Case {
    frame: Vec<u8>,
    prog: &'static str,
    /// Of no Service: must pass untouched (or drop as malformed).
    foreign: bool,
    /// The frame's IP and L4 checksums were valid when it went in.
    valid: bool,
    mutated: bool,
}

/// A translated packet's tuple as it went in and as it came out.
#[derive(Clone, Copy)]
struct Translation {
    before: (SocketAddrV4, SocketAddrV4),
    after: (SocketAddrV4, SocketAddrV4),
    proto: u8,
}

struct Fuzzer {
    rng: Rng,
    translations: VecDeque<Translation>,
    /// Recent frames as they went in and came out (ICMP errors quote them).
    frames: VecDeque<Vec<u8>>,
    /// Fragments of a datagram still to send.
    pending: VecDeque<Vec<u8>>,
    ip_id: u16,
}

/// Runs the fuzzer; `Err` names the first violated invariant and the packet that did it.
pub fn run(opts: &Options) -> Result<Report, String> {
    let mut bed = ProgBed::new(OBJECTS, SNAT_PORTS);
    let mut f = Fuzzer {
        rng: Rng::new(opts.seed),
        translations: VecDeque::new(),
        frames: VecDeque::new(),
        pending: VecDeque::new(),
        ip_id: 1,
    };
    let mut report = Report::default();
    let started = Instant::now();
    let drops_of =
        |stats: &[u64]| -> u64 { STAT_ALL.iter().filter(|&&i| stat_is_drop(i)).map(|&i| stats[i as usize]).sum() };
    let mut drops_before = drops_of(&bed.stats());
    let mut shots = 0u64;
    let check_every = opts.check_every.max(1);
    for index in 0..opts.count {
        let case = f.generate();
        report.mutated += u64::from(case.mutated);
        let (action, out) = bed.run(case.prog, &case.frame);
        let fail = |what: String| format!("packet {index} (seed {}): {what}\n  in:  {:02x?}", opts.seed, case.frame);
        match action {
            TC_ACT_OK => report.passed += 1,
            TC_ACT_SHOT => {
                report.dropped += 1;
                shots += 1;
            }
            TC_ACT_REDIRECT => report.redirected += 1,
            other => return Err(fail(format!("action {other}"))),
        }
        report.packets += 1;
        if action != TC_ACT_SHOT {
            if case.foreign {
                if action != TC_ACT_OK || out != case.frame {
                    return Err(fail(format!(
                        "a packet of no Service was changed (action {action})\n  out: {out:02x?}"
                    )));
                }
                report.foreign += 1;
            } else if out != case.frame {
                report.changed += 1;
                f.check_changed(&case, action, &out).map_err(fail)?;
                if let Some(reply) = f.reverse_case(&case, action, &out) {
                    let (raction, rout) = bed.run(reply.prog, &reply.frame);
                    match raction {
                        TC_ACT_SHOT => {
                            return Err(fail(format!(
                                "the reply of a translation was dropped\n  reply: {:02x?}",
                                reply.frame
                            )));
                        }
                        _ => f.check_reversed(&case, &out, &rout).map_err(fail)?,
                    }
                    report.reversed += 1;
                }
                f.remember(&case.frame, &out);
            }
        } else if case.foreign {
            report.foreign += 1;
        }
        if (index + 1) % opts.day_every.max(1) == 0 {
            bed.age(86_401);
            report.collected +=
                bed.tdp.conntrack.collect(crate::progbed::now_ns()).map_err(|e| format!("collector: {e:#}"))?.dead
                    as u64;
        }
        if (index + 1) % check_every == 0 || index + 1 == opts.count {
            let drops_now = drops_of(&bed.stats());
            if drops_now - drops_before != shots {
                return Err(fail(format!(
                    "{shots} drops in the last {check_every} packets but {} counted under a reason",
                    drops_now - drops_before
                )));
            }
            drops_before = drops_now;
            shots = 0;
        }
    }
    report.elapsed = started.elapsed();
    let stats = bed.stats();
    report.drops = STAT_ALL
        .iter()
        .filter(|&&i| stat_is_drop(i) && stats[i as usize] > 0)
        .map(|&i| (stat_name(i).unwrap_or("?"), stats[i as usize]))
        .collect();
    Ok(report)
}

impl Fuzzer {
    fn generate(&mut self) -> Case {
        if let Some(frame) = self.pending.pop_front() {
            return self.finish(frame, PROG_FROM_POD, false);
        }
        let prog = if self.rng.chance(50) { PROG_FROM_POD } else { PROG_FROM_NETDEV };
        let roll = self.rng.below(100);
        let (frame, foreign) = match roll {
            0..10 => (self.foreign(), true),
            10..28 if !self.translations.is_empty() => (self.reply(), false),
            28..38 if !self.frames.is_empty() => (self.icmp_error(), false),
            38..42 => (self.icmp_other(), false),
            42..50 => {
                let mut frags = self.fragmented();
                // Lost or reordered fragments now and then.
                if self.rng.chance(10) {
                    let i = self.rng.below(frags.len() as u64) as usize;
                    frags.remove(i);
                }
                if self.rng.chance(10) && frags.len() > 1 {
                    frags.swap(0, 1);
                }
                let first = frags.remove(0);
                self.pending.extend(frags);
                (first, false)
            }
            50..55 => (self.garbage(), false),
            _ => (self.fresh(), false),
        };
        let mut case = self.finish(frame, prog, foreign);
        if self.rng.chance(20) {
            self.mutate(&mut case.frame);
            case.mutated = true;
            case.valid = checksums_valid(&case.frame);
        }
        case
    }

    fn finish(&mut self, frame: Vec<u8>, prog: &'static str, foreign: bool) -> Case {
        let valid = checksums_valid(&frame);
        Case { frame, prog, foreign, valid, mutated: false }
    }

    fn next_id(&mut self) -> u16 {
        self.ip_id = self.ip_id.wrapping_add(1);
        self.ip_id
    }

    fn client(&mut self) -> Ipv4Addr {
        match self.rng.below(10) {
            0..4 => Ipv4Addr::new(10, 244, 1, 100 + self.rng.below(20) as u8),
            4..5 => Ipv4Addr::new(10, 244, 3, 2 + self.rng.below(10) as u8),
            5..9 => Ipv4Addr::new(203, 0, 113, 1 + self.rng.below(250) as u8),
            _ => *self.rng.pick(&[NODE_IP, Ipv4Addr::LOCALHOST, Ipv4Addr::new(10, 244, 1, 2)]),
        }
    }

    fn port(&mut self) -> u16 {
        match self.rng.below(10) {
            0 => self.rng.below(1024) as u16,
            1 => 61_000 + self.rng.below(64) as u16,
            _ => 32_768 + self.rng.below(28_000) as u16,
        }
    }

    /// A packet to a frontend, or beside one (another port, another address in the service CIDR,
    /// a backend directly).
    fn fresh(&mut self) -> Vec<u8> {
        let &(addr, port, proto) = self.rng.pick(FRONTENDS);
        let (mut daddr, mut dport, mut proto) = (Ipv4Addr::from(addr), port, proto);
        match self.rng.below(10) {
            0 => dport = self.port(),
            1 => daddr = Ipv4Addr::new(10, 96, self.rng.below(2) as u8, self.rng.below(256) as u8),
            2 => daddr = Ipv4Addr::from(*self.rng.pick(BACKENDS)),
            3 => proto = *self.rng.pick(&[TCP, UDP, SCTP]),
            _ => {}
        }
        let src = SocketAddrV4::new(self.client(), self.port());
        let dst = SocketAddrV4::new(daddr, dport);
        self.l4(src, dst, proto)
    }

    fn l4(&mut self, src: SocketAddrV4, dst: SocketAddrV4, proto: u8) -> Vec<u8> {
        match proto {
            TCP => self.tcp(src, dst),
            UDP => {
                let len = self.rng.below(64) as usize;
                let payload = self.rng.bytes(len);
                packets::udp(src, dst, &payload)
            }
            _ => self.sctp(src, dst),
        }
    }

    fn tcp(&mut self, src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
        let flags = match self.rng.below(10) {
            0..4 => 0x02,                               // SYN
            4..7 => 0x10,                               // ACK
            7 => 0x11,                                  // FIN ACK
            8 => 0x04 | (self.rng.below(2) << 4) as u8, // RST (ACK)
            _ => self.rng.next_u64() as u8,             // anything
        };
        let mut tcp = etherparse::TcpHeader::new(src.port(), dst.port(), self.rng.next_u64() as u32, 64_240);
        tcp.acknowledgment_number = self.rng.next_u64() as u32;
        tcp.fin = flags & 0x01 != 0;
        tcp.syn = flags & 0x02 != 0;
        tcp.rst = flags & 0x04 != 0;
        tcp.psh = flags & 0x08 != 0;
        tcp.ack = flags & 0x10 != 0;
        tcp.urg = flags & 0x20 != 0;
        if self.rng.chance(50) {
            use etherparse::TcpOptionElement::{
                MaximumSegmentSize, Noop, SelectiveAcknowledgementPermitted, Timestamp,
            };
            let tsval = self.rng.next_u64() as u32;
            let _ = tcp.set_options(&[
                MaximumSegmentSize(1460),
                SelectiveAcknowledgementPermitted,
                Timestamp(tsval, 0),
                Noop,
            ]);
        }
        let len = if self.rng.chance(70) { 0 } else { self.rng.below(1400) as usize };
        let payload = self.rng.bytes(len);
        let mut out = Vec::new();
        PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4(src.ip().octets(), dst.ip().octets(), 64)
            .tcp_header(tcp)
            .write(&mut out, &payload)
            .expect("tcp");
        out
    }

    fn sctp(&mut self, src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
        let mut sctp = ebpf_proxy::trace::sctp_init(src.port(), dst.port());
        if self.rng.chance(50) {
            // Another chunk type, another verification tag (checksum recomputed).
            sctp[12] = self.rng.below(16) as u8;
            sctp[4..8].copy_from_slice(&self.rng.bytes(4));
            sctp[8..12].fill(0);
            let crc = sctp_crc32c(&sctp);
            sctp[8..12].copy_from_slice(&crc.to_le_bytes());
        }
        ip_frame(*src.ip(), *dst.ip(), SCTP, &sctp)
    }

    /// A reply to a recent translation (the backend answering), or the client's next packet.
    fn reply(&mut self) -> Vec<u8> {
        let t = *self.rng.pick(self.translations.make_contiguous());
        let (src, dst) = if self.rng.chance(70) { (t.after.1, t.after.0) } else { t.before };
        match t.proto {
            TCP => self.tcp(src, dst),
            UDP => {
                let len = self.rng.below(200) as usize;
                let payload = self.rng.bytes(len);
                packets::udp(src, dst, &payload)
            }
            _ => self.sctp(src, dst),
        }
    }

    /// An ICMP error quoting a recent packet (as it went in, or as it came out), maybe cut short.
    fn icmp_error(&mut self) -> Vec<u8> {
        let quoted = self.rng.pick(self.frames.make_contiguous()).clone();
        let ip = &quoted[IP_OFF.min(quoted.len())..];
        let cut = match self.rng.below(4) {
            0 => ip.len().min(28),
            1 => ip.len().min(20 + self.rng.below(12) as usize),
            _ => ip.len().min(548),
        };
        let kind = match self.rng.below(5) {
            0 => Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port),
            1 => Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                next_hop_mtu: 1280,
            }),
            2 => Icmpv4Type::TimeExceeded(etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit),
            3 => Icmpv4Type::ParameterProblem(etherparse::icmpv4::ParameterProblemHeader::PointerIndicatesError(4)),
            _ => Icmpv4Type::Unknown { type_u8: 4, code_u8: 0, bytes5to8: [0; 4] },
        };
        // From one of the quoted packet's ends, or a router.
        let qsrc = ip.get(12..16).map_or(NODE_IP, |b| Ipv4Addr::new(b[0], b[1], b[2], b[3]));
        let qdst = ip.get(16..20).map_or(NODE_IP, |b| Ipv4Addr::new(b[0], b[1], b[2], b[3]));
        let (src, dst) = match self.rng.below(3) {
            0 => (qdst, qsrc),
            1 => (Ipv4Addr::new(192, 168, 50, 1), qsrc),
            _ => (Ipv4Addr::new(198, 51, 100, 1), qsrc),
        };
        packets::icmp_error(src, dst, kind, &ip[..cut])
    }

    fn icmp_other(&mut self) -> Vec<u8> {
        let &(addr, _, _) = self.rng.pick(FRONTENDS);
        let kind = Icmpv4Type::EchoRequest(etherparse::IcmpEchoHeader { id: self.rng.next_u64() as u16, seq: 1 });
        let len = self.rng.below(64) as usize;
        packets::icmp_error(self.client(), Ipv4Addr::from(addr), kind, &self.rng.bytes(len))
    }

    /// A UDP datagram of 1,500 to 5,000 bytes to a frontend (or beside one), in fragments.
    fn fragmented(&mut self) -> Vec<Vec<u8>> {
        let &(addr, port, _) = self.rng.pick(FRONTENDS);
        let src = SocketAddrV4::new(self.client(), self.port());
        let dst = SocketAddrV4::new(Ipv4Addr::from(addr), if self.rng.chance(90) { port } else { self.port() });
        let len = 1_500 + self.rng.below(3_500) as usize;
        let payload = self.rng.bytes(len);
        let id = self.next_id();
        let datagram = if self.rng.chance(85) {
            packets::udp(src, dst, &payload)
        } else {
            let mut p = self.tcp(src, dst);
            p.extend_from_slice(&payload);
            let tot = (p.len() - IP_OFF) as u16;
            p[IP_OFF + 2..IP_OFF + 4].copy_from_slice(&tot.to_be_bytes());
            fix_ip_checksum(&mut p);
            p
        };
        fragments(&datagram, 1_480, id)
    }

    /// A packet of no Service: addresses nothing in the Service table, the node or its clients uses.
    fn foreign(&mut self) -> Vec<u8> {
        let a = Ipv4Addr::new(172, 31, self.rng.below(256) as u8, self.rng.below(256) as u8);
        let b = Ipv4Addr::new(198, 18, self.rng.below(256) as u8, self.rng.below(256) as u8);
        let (src, dst) = if self.rng.chance(50) { (a, b) } else { (b, a) };
        let (s, d) = (SocketAddrV4::new(src, self.port()), SocketAddrV4::new(dst, self.port()));
        match self.rng.below(5) {
            0 => {
                let kind = Icmpv4Type::EchoRequest(etherparse::IcmpEchoHeader { id: 7, seq: 1 });
                packets::icmp_error(src, dst, kind, b"ping")
            }
            1 => {
                let inner = self.tcp(d, s);
                packets::icmp_error(
                    src,
                    dst,
                    Icmpv4Type::TimeExceeded(etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit),
                    &inner[IP_OFF..],
                )
            }
            2 => {
                let mut frags = fragments(&packets::udp(s, d, &[7; 3000]), 1_480, self.next_id());
                frags.swap_remove(self.rng.below(frags.len() as u64) as usize)
            }
            _ => {
                let proto = *self.rng.pick(&[TCP, UDP, SCTP]);
                self.l4(s, d, proto)
            }
        }
    }

    /// Random bytes behind an Ethernet header, IPv4 or not.
    fn garbage(&mut self) -> Vec<u8> {
        let len = MIN_IPV4_FRAME + self.rng.below(120) as usize;
        let mut frame = self.rng.bytes(len);
        if self.rng.chance(80) {
            frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
            frame[IP_OFF] = 0x45;
        }
        frame
    }

    fn mutate(&mut self, frame: &mut Vec<u8>) {
        let ip_hlen = frame.get(IP_OFF).map_or(20, |b| usize::from(b & 0x0f) * 4);
        match self.rng.below(9) {
            0 | 1 => {
                // Bit flips in the headers.
                for _ in 0..1 + self.rng.below(3) {
                    let end = frame.len().min(IP_OFF + ip_hlen + 40);
                    if end > IP_OFF {
                        let i = IP_OFF + self.rng.below((end - IP_OFF) as u64) as usize;
                        frame[i] ^= 1 << self.rng.below(8);
                    }
                }
            }
            2 => {
                // Anywhere past the fixed IP header: BPF_PROG_TEST_RUN refuses a shorter IPv4 frame.
                let keep =
                    MIN_IPV4_FRAME + self.rng.below(frame.len().saturating_sub(MIN_IPV4_FRAME) as u64 + 1) as usize;
                frame.truncate(keep.min(frame.len()));
            }
            3 => {
                // Padding after the IP packet (a NIC's, or anything).
                let extra = 1 + self.rng.below(64) as usize;
                let pad = self.rng.bytes(extra);
                frame.extend_from_slice(&pad);
            }
            4 if frame.len() >= IP_OFF + 20 => {
                let len = self.rng.next_u64() as u16;
                frame[IP_OFF + 2..IP_OFF + 4].copy_from_slice(&len.to_be_bytes());
                fix_ip_checksum(frame);
            }
            5 if frame.len() >= IP_OFF + 20 => {
                // Fragment bits (MF, offsets, DF).
                let bits = self.rng.next_u64() as u16 & 0x7fff;
                frame[IP_OFF + 6..IP_OFF + 8].copy_from_slice(&bits.to_be_bytes());
                fix_ip_checksum(frame);
            }
            6 if frame.len() >= IP_OFF + 20 && ip_hlen == 20 => {
                // IP options (NOPs and an end of list), lengths kept right.
                let words = 1 + self.rng.below(10) as usize;
                let mut opts = vec![1u8; words * 4];
                opts[words * 4 - 1] = 0;
                frame.splice(IP_OFF + 20..IP_OFF + 20, opts);
                frame[IP_OFF] = 0x40 | (5 + words) as u8;
                let tot = u16::from_be_bytes([frame[IP_OFF + 2], frame[IP_OFF + 3]]).wrapping_add((words * 4) as u16);
                frame[IP_OFF + 2..IP_OFF + 4].copy_from_slice(&tot.to_be_bytes());
                fix_ip_checksum(frame);
            }
            7 if frame.len() >= IP_OFF + 20 => {
                frame[IP_OFF + 8] = self.rng.next_u64() as u8; // TTL
                frame[IP_OFF + 1] = self.rng.next_u64() as u8; // TOS
                fix_ip_checksum(frame);
            }
            _ => {
                // An L4 checksum (or any byte near it) spoiled.
                let at = IP_OFF + ip_hlen + self.rng.below(20) as usize;
                if at < frame.len() {
                    frame[at] = frame[at].wrapping_add(1 + self.rng.below(255) as u8);
                }
            }
        }
    }

    /// Invariants of a packet the datapath changed.
    fn check_changed(&self, case: &Case, action: u32, out: &[u8]) -> Result<(), String> {
        let answered = action == TC_ACT_REDIRECT && is_answer(&case.frame, out);
        if !answered && out.len() != case.frame.len() {
            return Err(format!("length changed from {} to {}\n  out: {out:02x?}", case.frame.len(), out.len()));
        }
        // An answer is built afresh: always valid. A translation keeps valid checksums valid.
        if (answered || case.valid) && !checksums_valid(out) {
            return Err(format!("invalid checksums after translation (answer: {answered})\n  out: {out:02x?}"));
        }
        Ok(())
    }

    /// The reply of a translated TCP or UDP packet (not an answer, not a fragment): from where it
    /// went to where it came from.
    fn reverse_case(&mut self, case: &Case, action: u32, out: &[u8]) -> Option<Case> {
        if action == TC_ACT_REDIRECT && is_answer(&case.frame, out) || !case.valid {
            return None;
        }
        let (proto, src, dst, frag) = tuple_of(out)?;
        if frag || !matches!(proto, TCP | UDP) {
            return None;
        }
        let frame =
            if proto == TCP { packets::tcp(dst, src, false, true, &[]) } else { packets::udp(dst, src, b"reply") };
        Some(Case { frame, prog: case.prog, foreign: false, valid: true, mutated: false })
    }

    fn check_reversed(&self, case: &Case, out: &[u8], reply_out: &[u8]) -> Result<(), String> {
        let (_, src, dst, _) = tuple_of(&case.frame).ok_or("the translated packet does not parse")?;
        let (_, rsrc, rdst, _) = tuple_of(reply_out).ok_or("the reply does not parse")?;
        if (rsrc, rdst) != (dst, src) {
            return Err(format!(
                "{src} -> {dst} became {:?}; its reply came back as {rsrc} -> {rdst}\n  out: {out:02x?}",
                tuple_of(out).map(|t| (t.1, t.2))
            ));
        }
        if !checksums_valid(reply_out) {
            return Err(format!("the restored reply has invalid checksums: {reply_out:02x?}"));
        }
        Ok(())
    }

    fn remember(&mut self, before: &[u8], after: &[u8]) {
        if let (Some((proto, s, d, false)), Some((_, s2, d2, _))) = (tuple_of(before), tuple_of(after))
            && proto != ICMP
        {
            self.translations.push_back(Translation { before: (s, d), after: (s2, d2), proto });
            if self.translations.len() > RECENT {
                self.translations.pop_front();
            }
        }
        for f in [before, after] {
            self.frames.push_back(f.to_vec());
        }
        while self.frames.len() > RECENT {
            self.frames.pop_front();
        }
    }
}

/// An Ethernet + IPv4 frame around `payload` of protocol `proto`.
fn ip_frame(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src.octets(), dst.octets(), 64)
        .write(&mut out, etherparse::IpNumber(proto), payload)
        .expect("ip frame");
    out
}

/// Whether `out` answers `input` (a REJECT or fragmentation needed: back to its source).
fn is_answer(input: &[u8], out: &[u8]) -> bool {
    input.len() >= IP_OFF + 20
        && out.len() >= IP_OFF + 20
        && out[IP_OFF + 12..IP_OFF + 16] == input[IP_OFF + 16..IP_OFF + 20]
        && out[IP_OFF + 16..IP_OFF + 20] == input[IP_OFF + 12..IP_OFF + 16]
}

/// (protocol, source, destination, is a fragment) of a frame; ports 0 for ICMP and later fragments.
fn tuple_of(frame: &[u8]) -> Option<(u8, SocketAddrV4, SocketAddrV4, bool)> {
    let sliced = SlicedPacket::from_ethernet(frame).ok()?;
    let Some(NetSlice::Ipv4(ip)) = &sliced.net else { return None };
    let h = ip.header();
    let frag = h.more_fragments() || h.fragments_offset().value() != 0;
    let (sp, dp) = match &sliced.transport {
        Some(TransportSlice::Tcp(t)) => (t.source_port(), t.destination_port()),
        Some(TransportSlice::Udp(u)) => (u.source_port(), u.destination_port()),
        _ if h.protocol().0 == SCTP && !frag => {
            let p = ip.payload().payload;
            (u16::from_be_bytes([*p.first()?, *p.get(1)?]), u16::from_be_bytes([*p.get(2)?, *p.get(3)?]))
        }
        _ => (0, 0),
    };
    Some((h.protocol().0, SocketAddrV4::new(h.source_addr(), sp), SocketAddrV4::new(h.destination_addr(), dp), frag))
}

/// Whether a frame is a well-formed IPv4 packet with a valid header checksum and, when whole, a
/// valid TCP, UDP (zero: none), SCTP or ICMP checksum.
pub fn checksums_valid(frame: &[u8]) -> bool {
    let Ok(sliced) = SlicedPacket::from_ethernet(frame) else { return false };
    let Some(NetSlice::Ipv4(ip)) = &sliced.net else { return false };
    let header = ip.header().to_header();
    if header.calc_header_checksum() != header.header_checksum {
        return false;
    }
    if header.more_fragments || header.fragment_offset.value() != 0 {
        return true;
    }
    match &sliced.transport {
        Some(TransportSlice::Tcp(t)) => {
            t.to_header().calc_checksum_ipv4(&header, t.payload()).is_ok_and(|c| c == t.checksum())
        }
        Some(TransportSlice::Udp(u)) => {
            u.checksum() == 0 || u.to_header().calc_checksum_ipv4(&header, u.payload()).is_ok_and(|c| c == u.checksum())
        }
        Some(TransportSlice::Icmpv4(i)) => i.icmp_type().calc_checksum(i.payload()) == i.checksum(),
        _ if header.protocol.0 == SCTP => {
            let mut p = ip.payload().payload.to_vec();
            if p.len() < 12 {
                return false;
            }
            let want = u32::from_le_bytes([p[8], p[9], p[10], p[11]]);
            p[8..12].fill(0);
            sctp_crc32c(&p) == want
        }
        _ => true,
    }
}
