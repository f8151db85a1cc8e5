//! BPF_PROG_TEST_RUN tests of the NAT pieces: REJECT answers (TCP RST, ICMP port unreachable) with
//! valid checksums, SNAT source-port allocation under collisions, reverse SNAT, expiry of SNAT ports
//! and of session affinity, SCTP checksum after a port rewrite. Needs root.

use std::net::{Ipv4Addr, SocketAddrV4};

use ebpf_proxy::{
    datapath::{PROG_FROM_NETDEV, PROG_FROM_POD},
    trace::{sctp_crc32c, sctp_init},
};
use etherparse::{Icmpv4Type, NetSlice, SlicedPacket, TransportSlice, icmpv4::DestUnreachableHeader};
use proxy_common::{
    Affinity, AffinityKey, CT_F_ASSURED, CT_F_SEEN_REPLY, CT_F_SNAT, CT_STATE_CLOSE, CT_STATE_ESTABLISHED,
    CT_STATE_TIME_WAIT, CtEntry, CtKey, PROTO_TCP, STAT_AFFINITY_HIT, STAT_CT_NEW, STAT_CT_REOPEN,
    STAT_DROP_NO_LOCAL_ENDPOINTS, STAT_DROP_REJECT_RATE_LIMITED, STAT_DROP_SNAT_EXHAUSTED,
    STAT_DROP_UNALLOCATED_SERVICE_IP, STAT_FORWARD_DNAT, STAT_REJECT, STAT_REVERSE_NAT, STAT_SNAT, STAT_SNAT_COLLISION,
    STAT_SNAT_REUSE_CLOSED, STAT_SOURCE_PORT_REMAP, addr_to_map, port_to_map,
};
use tests::{
    packets::{self, MAC_A, MAC_B, inspect},
    progbed::{NODE_IP, ProgBed, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, now_ns},
};
const POD: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 5), 40_000);
const EXTERNAL: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 2), 50_000);
const REMOTE_BACKEND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 7), 8080);
const NODE_PORT: u16 = 30_080;
const SNAT_PORTS: (u16, u16) = (61_000, 61_003);

const OBJECTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: remote, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, nodePort: 30080, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: remote-1, namespace: default, labels: {kubernetes.io/service-name: remote}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints: [{addresses: [10.244.2.7], nodeName: node-b, conditions: {ready: true}}]
---
apiVersion: v1
kind: Service
metadata: {name: same-backend, namespace: default}
spec:
  clusterIP: 10.96.0.11
  ports: [{name: http, port: 80, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: same-backend-1, namespace: default, labels: {kubernetes.io/service-name: same-backend}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints: [{addresses: [10.244.2.7], nodeName: node-b, conditions: {ready: true}}]
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: default}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80, protocol: TCP}, {name: dns, port: 53, protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: default}
spec:
  clusterIP: 10.96.0.30
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 10}}
  ports: [{name: http, port: 80, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: sticky-1, namespace: default, labels: {kubernetes.io/service-name: sticky}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
  - {addresses: [10.244.1.2], nodeName: node-a, conditions: {ready: true}}
  - {addresses: [10.244.1.3], nodeName: node-a, conditions: {ready: true}}
  - {addresses: [10.244.1.4], nodeName: node-a, conditions: {ready: true}}
---
apiVersion: v1
kind: Service
metadata: {name: local-only, namespace: default}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  clusterIP: 10.96.0.40
  ports: [{name: http, port: 80, nodePort: 30040, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: local-only-1, namespace: default, labels: {kubernetes.io/service-name: local-only}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints: [{addresses: [10.244.2.8], nodeName: node-b, conditions: {ready: true}}]
---
apiVersion: v1
kind: Service
metadata: {name: sctp, namespace: default}
spec:
  clusterIP: 10.96.0.50
  ports: [{name: s, port: 53, protocol: SCTP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: sctp-1, namespace: default, labels: {kubernetes.io/service-name: sctp}}
addressType: IPv4
ports: [{name: s, port: 5353, protocol: SCTP}]
endpoints: [{addresses: [10.244.1.2], nodeName: node-a, conditions: {ready: true}}]
"#;

fn sa(ip: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(ip), port)
}

struct Bed(ProgBed);

impl std::ops::Deref for Bed {
    type Target = ProgBed;
    fn deref(&self) -> &ProgBed {
        &self.0
    }
}

impl std::ops::DerefMut for Bed {
    fn deref_mut(&mut self) -> &mut ProgBed {
        &mut self.0
    }
}

impl Bed {
    fn new() -> Self {
        Self(ProgBed::new(OBJECTS, SNAT_PORTS))
    }

    /// A connection from another external client (port `port`) through the NodePort, masqueraded
    /// to SNAT port `port` towards `backend`, in `state`, last active at `last_seen_ns`.
    fn occupy(&mut self, backend: SocketAddrV4, port: u16, state: u8, last_seen_ns: u64) -> CtKey {
        let orig =
            ct_key(SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 99), port), SocketAddrV4::new(NODE_IP, NODE_PORT));
        let entry = CtEntry {
            created_ns: last_seen_ns,
            last_seen_ns,
            nat_addr: addr_to_map(backend.ip().octets()),
            nat_port: port_to_map(backend.port()),
            snat_addr: addr_to_map(NODE_IP.octets()),
            snat_port: port_to_map(port),
            state,
            flags: CT_F_SNAT | CT_F_ASSURED | CT_F_SEEN_REPLY,
            ..Default::default()
        };
        self.0.tdp.conntrack.insert(&orig, &entry).unwrap();
        orig
    }
}

fn ct_key(s: SocketAddrV4, d: SocketAddrV4) -> CtKey {
    CtKey::new(
        addr_to_map(s.ip().octets()),
        addr_to_map(d.ip().octets()),
        port_to_map(s.port()),
        port_to_map(d.port()),
        PROTO_TCP,
    )
}

fn tcp_header(frame: &[u8]) -> etherparse::TcpHeader {
    match SlicedPacket::from_ethernet(frame).unwrap().transport {
        Some(TransportSlice::Tcp(t)) => t.to_header(),
        other => panic!("not TCP: {other:?}"),
    }
}

#[test]
fn syn_to_a_service_without_endpoints_is_answered_with_a_valid_rst() {
    let bed = Bed::new();
    let vip = sa([10, 96, 0, 20], 80);
    let syn = packets::tcp(POD, vip, true, false, b"hello");
    let out = bed.expect(PROG_FROM_POD, &syn, TC_ACT_REDIRECT, &[(STAT_REJECT, 1)]);
    let seen = inspect(&out);
    assert_eq!((seen.src, seen.dst), (vip, POD), "RST goes back to the client from the Service address");
    assert!(seen.ip_checksum_ok && seen.l4_checksum_ok == Some(true), "{seen:?}");
    assert_eq!((&out[0..6], &out[6..12]), (&MAC_A[..], &MAC_B[..]), "Ethernet addresses swapped");
    let tcp = tcp_header(&out);
    assert!(tcp.rst && tcp.ack && !tcp.syn, "{tcp:?}");
    // packets::tcp uses sequence number 1000; SYN and 5 data bytes are acknowledged.
    assert_eq!((tcp.sequence_number, tcp.acknowledgment_number), (0, 1000 + 1 + 5));
    assert_eq!(out.len(), 14 + 20 + 20, "no payload in the RST");

    // Mid-stream (ACK set, no conntrack entry): RST with the peer's ACK as sequence number, no ACK.
    let ack = packets::tcp(POD, vip, false, true, b"x");
    let tcp = tcp_header(&bed.expect(PROG_FROM_POD, &ack, TC_ACT_REDIRECT, &[(STAT_REJECT, 1)]));
    assert!(tcp.rst && !tcp.ack, "{tcp:?}");
    assert_eq!(tcp.sequence_number, 1, "packets::tcp acknowledges 1");
}

#[test]
fn udp_to_a_service_without_endpoints_gets_icmp_port_unreachable() {
    let bed = Bed::new();
    let vip = sa([10, 96, 0, 20], 53);
    let dgram = packets::udp(POD, vip, b"query");
    let out = bed.expect(PROG_FROM_POD, &dgram, TC_ACT_REDIRECT, &[(STAT_REJECT, 1)]);
    let sliced = SlicedPacket::from_ethernet(&out).unwrap();
    let Some(NetSlice::Ipv4(ip)) = &sliced.net else { panic!("not IPv4") };
    let h = ip.header().to_header();
    assert_eq!(h.calc_header_checksum(), h.header_checksum, "IP checksum");
    assert_eq!((Ipv4Addr::from(h.source), Ipv4Addr::from(h.destination)), (*vip.ip(), *POD.ip()));
    let Some(TransportSlice::Icmpv4(icmp)) = sliced.transport else { panic!("not ICMP") };
    assert!(matches!(icmp.icmp_type(), Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port)));
    let header = icmp.header();
    assert_eq!(header.checksum, header.icmp_type.calc_checksum(icmp.payload()), "ICMP checksum");
    // The quote: the original IP header and the first 8 bytes of UDP.
    assert_eq!(icmp.payload(), &dgram[14..14 + 28]);
}

#[test]
fn wrong_port_on_a_cluster_ip_is_rejected_and_unallocated_service_addresses_dropped() {
    let bed = Bed::new();
    let wrong_port = packets::tcp(POD, sa([10, 96, 0, 10], 81), true, false, &[]);
    bed.expect(PROG_FROM_POD, &wrong_port, TC_ACT_REDIRECT, &[(STAT_REJECT, 1)]);
    let unallocated = packets::tcp(POD, sa([10, 96, 7, 7], 80), true, false, &[]);
    bed.expect(PROG_FROM_POD, &unallocated, TC_ACT_SHOT, &[(STAT_DROP_UNALLOCATED_SERVICE_IP, 1)]);
}

#[test]
fn external_to_a_remote_backend_is_masqueraded_and_replies_reverse_translated() {
    let bed = Bed::new();
    let node_port = SocketAddrV4::new(NODE_IP, NODE_PORT);
    let syn = packets::tcp(EXTERNAL, node_port, true, false, &[]);
    let out =
        bed.expect(PROG_FROM_NETDEV, &syn, TC_ACT_OK, &[(STAT_FORWARD_DNAT, 1), (STAT_CT_NEW, 1), (STAT_SNAT, 1)]);
    let seen = inspect(&out);
    assert_eq!(seen.dst, REMOTE_BACKEND);
    assert_eq!(*seen.src.ip(), NODE_IP, "source masqueraded to the node");
    assert!((SNAT_PORTS.0..=SNAT_PORTS.1).contains(&seen.src.port()), "{seen:?}");
    assert!(seen.ip_checksum_ok && seen.l4_checksum_ok == Some(true), "{seen:?}");

    // The backend's reply comes back to the node: client and NodePort restored.
    let reply = packets::tcp(REMOTE_BACKEND, seen.src, true, true, b"ok");
    let back = inspect(&bed.expect(PROG_FROM_NETDEV, &reply, TC_ACT_OK, &[(STAT_REVERSE_NAT, 1)]));
    assert_eq!((back.src, back.dst), (node_port, EXTERNAL));
    assert!(back.ip_checksum_ok && back.l4_checksum_ok == Some(true), "{back:?}");

    // The same client port again is the same connection: same translation, no new SNAT.
    let again = inspect(&bed.expect(PROG_FROM_NETDEV, &syn, TC_ACT_OK, &[(STAT_FORWARD_DNAT, 1)]));
    assert_eq!(again.src, seen.src);

    // A pod on this node keeps its source (the reply returns through this node anyway).
    let from_pod = inspect(&bed.expect(
        PROG_FROM_POD,
        &packets::tcp(POD, node_port, true, false, &[]),
        TC_ACT_OK,
        &[(STAT_FORWARD_DNAT, 1), (STAT_CT_NEW, 1)],
    ));
    assert_eq!((from_pod.src, from_pod.dst), (POD, REMOTE_BACKEND));
}

#[test]
fn a_client_port_the_backend_already_pairs_with_another_service_is_remapped() {
    let mut bed = Bed::new();
    let (first, second) = (sa([10, 96, 0, 10], 80), sa([10, 96, 0, 11], 80));
    // Two Services with the same backend. The pod's kernel picks its source port per destination
    // address, so it may use one port for both; the backend sees one tuple for two connections.
    let out = bed.expect(
        PROG_FROM_POD,
        &packets::tcp(POD, first, true, false, &[]),
        TC_ACT_OK,
        &[(STAT_FORWARD_DNAT, 1), (STAT_CT_NEW, 1)],
    );
    assert_eq!((inspect(&out).src, inspect(&out).dst), (POD, REMOTE_BACKEND));

    let out = bed.expect(
        PROG_FROM_POD,
        &packets::tcp(POD, second, true, false, &[]),
        TC_ACT_OK,
        &[(STAT_FORWARD_DNAT, 1), (STAT_CT_NEW, 1), (STAT_SOURCE_PORT_REMAP, 1)],
    );
    let seen = inspect(&out);
    assert_eq!(seen.dst, REMOTE_BACKEND);
    assert_eq!(*seen.src.ip(), *POD.ip(), "the pod keeps its address");
    assert!((SNAT_PORTS.0..=SNAT_PORTS.1).contains(&seen.src.port()), "a free port: {seen:?}");
    assert!(seen.ip_checksum_ok && seen.l4_checksum_ok == Some(true), "{seen:?}");

    // The backend's answer on the remapped port reaches the pod's own port, from the second Service.
    let reply = packets::tcp(REMOTE_BACKEND, seen.src, true, true, &[]);
    let back = inspect(&bed.expect(PROG_FROM_NETDEV, &reply, TC_ACT_OK, &[(STAT_REVERSE_NAT, 1)]));
    assert_eq!((back.src, back.dst), (second, POD));
    assert!(back.ip_checksum_ok && back.l4_checksum_ok == Some(true), "{back:?}");

    // A new connection to the first Service from the same port, once the first one closed, is the
    // same pairing at the backend as before: no remap.
    let key = ct_key(POD, first);
    let mut e = bed.tdp.conntrack.get(&key).unwrap();
    e.state = CT_STATE_TIME_WAIT;
    bed.tdp.conntrack.insert(&key, &e).unwrap();
    let out = bed.expect(
        PROG_FROM_POD,
        &packets::tcp(POD, first, true, false, &[]),
        TC_ACT_OK,
        &[(STAT_FORWARD_DNAT, 1), (STAT_CT_NEW, 1), (STAT_CT_REOPEN, 1)],
    );
    assert_eq!(inspect(&out).src, POD);
}

#[test]
fn snat_ports_in_use_are_skipped_closed_ones_reused_and_exhaustion_is_a_counted_drop() {
    let mut bed = Bed::new();
    let now = now_ns();
    // Three of the four ports are held by live connections to the same backend.
    let mut held: Vec<CtKey> =
        (SNAT_PORTS.0..SNAT_PORTS.1).map(|p| bed.occupy(REMOTE_BACKEND, p, CT_STATE_ESTABLISHED, now)).collect();
    let node_port = SocketAddrV4::new(NODE_IP, NODE_PORT);
    let before = bed.tdp.dp.read_stats().unwrap()[STAT_SNAT_COLLISION as usize];
    let out = bed.run(PROG_FROM_NETDEV, &packets::tcp(EXTERNAL, node_port, true, false, &[]));
    assert_eq!(out.0, TC_ACT_OK);
    assert_eq!(inspect(&out.1).src, SocketAddrV4::new(NODE_IP, SNAT_PORTS.1), "the one free port");
    let collisions = bed.tdp.dp.read_stats().unwrap()[STAT_SNAT_COLLISION as usize] - before;
    assert!(collisions <= 3, "at most the three taken ports collide ({collisions})");
    held.push(ct_key(EXTERNAL, node_port));

    // Now all four are live: a new client is dropped, counted, after trying every port.
    let other = SocketAddrV4::new(*EXTERNAL.ip(), 50_001);
    bed.expect(
        PROG_FROM_NETDEV,
        &packets::tcp(other, node_port, true, false, &[]),
        TC_ACT_SHOT,
        &[(STAT_SNAT_COLLISION, u64::from(proxy_common::SNAT_RETRIES)), (STAT_DROP_SNAT_EXHAUSTED, 1)],
    );

    // Connections that are over (TIME_WAIT) still hold their ports, but a new connection with no
    // other port left takes the longest idle one over, as netfilter reuses TIME_WAIT tuples.
    for (i, orig) in held.iter().enumerate() {
        let mut e = bed.tdp.conntrack.get(orig).unwrap();
        e.state = CT_STATE_TIME_WAIT;
        e.last_seen_ns = now - 1_000_000_000 * (i as u64 + 1);
        bed.tdp.conntrack.insert(orig, &e).unwrap();
    }
    let out = bed.expect(
        PROG_FROM_NETDEV,
        &packets::tcp(other, node_port, true, false, &[]),
        TC_ACT_OK,
        &[(STAT_FORWARD_DNAT, 1), (STAT_CT_NEW, 1), (STAT_SNAT, 1), (STAT_SNAT_REUSE_CLOSED, 1)],
    );
    let oldest = bed.tdp.conntrack.get(held.last().unwrap());
    assert!(oldest.is_none(), "the longest idle closed connection was replaced");
    assert_eq!(inspect(&out).src.port(), SNAT_PORTS.1, "its port, held by the last of them, is reused");

    // Dead connections (past their lifetime: a reset one lives 10 s) hold nothing at all.
    assert!(now > 11_000_000_000, "needs an uptime over 11 s to fake old entries");
    for orig in &held[..3] {
        let mut e = bed.tdp.conntrack.get(orig).unwrap();
        e.state = CT_STATE_CLOSE;
        e.last_seen_ns = now - 11_000_000_000;
        bed.tdp.conntrack.insert(orig, &e).unwrap();
    }
    let third = SocketAddrV4::new(*EXTERNAL.ip(), 50_002);
    let (ret, out) = bed.run(PROG_FROM_NETDEV, &packets::tcp(third, node_port, true, false, &[]));
    assert_eq!(ret, TC_ACT_OK);
    assert!((SNAT_PORTS.0..SNAT_PORTS.1).contains(&inspect(&out).src.port()), "a dead connection's port");
    assert!(held[..3].iter().filter(|o| bed.tdp.conntrack.get(o).is_none()).count() >= 1, "dead ones removed");
}

#[test]
fn external_traffic_policy_local_without_local_endpoints_drops_but_pods_short_circuit() {
    let bed = Bed::new();
    let node_port = SocketAddrV4::new(NODE_IP, 30_040);
    bed.expect(
        PROG_FROM_NETDEV,
        &packets::tcp(EXTERNAL, node_port, true, false, &[]),
        TC_ACT_SHOT,
        &[(STAT_DROP_NO_LOCAL_ENDPOINTS, 1)],
    );
    let out = inspect(&bed.run(PROG_FROM_POD, &packets::tcp(POD, node_port, true, false, &[])).1);
    assert_eq!((out.src, out.dst), (POD, sa([10, 244, 2, 8], 8080)));
}

fn affinity_key(client: Ipv4Addr, service_id: u32) -> AffinityKey {
    AffinityKey { client: u64::from(addr_to_map(client.octets())), service_id, _pad: 0 }
}

#[test]
fn session_affinity_sticks_within_the_timeout_and_expires_after_it() {
    let mut bed = Bed::new();
    let vip = sa([10, 96, 0, 30], 80);
    let fe = bed.tdp.desired.frontends.iter().find(|(k, _)| k.addr == addr_to_map(vip.ip().octets())).unwrap().1;
    let service_id = fe.service_id;
    let dst_of = |bed: &Bed, client: SocketAddrV4| {
        inspect(&bed.run(PROG_FROM_POD, &packets::tcp(client, vip, true, false, &[])).1).dst
    };
    // One client, many connections: one backend.
    let first = dst_of(&bed, POD);
    for port in 1..30 {
        assert_eq!(dst_of(&bed, SocketAddrV4::new(*POD.ip(), 40_000 + port)), first, "sticks");
    }
    // Many clients spread over the backends.
    let spread: std::collections::BTreeSet<_> =
        (1..60u8).map(|i| dst_of(&bed, SocketAddrV4::new(Ipv4Addr::new(10, 244, 3, i), 40_000))).collect();
    assert_eq!(spread.len(), 3, "{spread:?}");

    // An entry older than timeoutSeconds (10 s) is not followed: over 20 tries a stale entry pointing
    // at one backend must not always win (chance (1/3)^20 if expiry were honoured and still all hit).
    let key = affinity_key(*POD.ip(), service_id);
    let pinned = bed.tdp.affinity.get(&key, 0).unwrap();
    let stale = Affinity { last_used_ns: now_ns() - 11_000_000_000, ..pinned };
    let mut moved = 0;
    for port in 0..20 {
        bed.tdp.affinity.insert(&key, &stale, 0).unwrap();
        if dst_of(&bed, SocketAddrV4::new(*POD.ip(), 41_000 + port)) != first {
            moved += 1;
        }
    }
    assert!(moved > 0, "expired affinity was still followed");
    // A fresh entry is followed every time.
    for port in 0..20 {
        bed.tdp.affinity.insert(&key, &Affinity { last_used_ns: now_ns(), ..pinned }, 0).unwrap();
        assert_eq!(dst_of(&bed, SocketAddrV4::new(*POD.ip(), 42_000 + port)), first);
    }
}

#[test]
fn sctp_port_rewrite_recomputes_the_crc32c() {
    // RFC 3720 B.4 test vector: 32 zero bytes.
    assert_eq!(sctp_crc32c(&[0u8; 32]), 0x8A91_36AA);
    let bed = Bed::new();
    let vip = sa([10, 96, 0, 50], 53);
    let frame =
        ebpf_proxy::trace::build_packet(ebpf_proxy::trace::TraceProto::Sctp, *POD.ip(), POD.port(), vip).unwrap();
    assert_eq!(&frame[34..], &sctp_init(POD.port(), 53)[..]);
    let out = bed.expect(PROG_FROM_POD, &frame, TC_ACT_OK, &[(STAT_FORWARD_DNAT, 1), (STAT_CT_NEW, 1)]);
    let sctp = &out[34..];
    assert_eq!(u16::from_be_bytes([sctp[2], sctp[3]]), 5353, "destination port rewritten");
    assert_eq!(&out[30..34], &[10, 244, 1, 2], "destination address rewritten");
    let mut zeroed = sctp.to_vec();
    zeroed[8..12].fill(0);
    assert_eq!(u32::from_le_bytes(sctp[8..12].try_into().unwrap()), sctp_crc32c(&zeroed), "CRC32c valid");
}

#[test]
fn sctp_in_a_frame_padded_to_60_bytes_is_checksummed_over_the_packet_only() {
    // A COOKIE ACK (common header + one 4-byte chunk): 16 bytes of SCTP, 50 bytes of frame, which an
    // Ethernet NIC pads to 60. The CRC32c covers the SCTP packet, not the padding.
    let bed = Bed::new();
    let vip = sa([10, 96, 0, 50], 53);
    let mut sctp = Vec::new();
    sctp.extend_from_slice(&POD.port().to_be_bytes());
    sctp.extend_from_slice(&53u16.to_be_bytes());
    sctp.extend_from_slice(&0x1234_5678u32.to_be_bytes()); // verification tag
    sctp.extend_from_slice(&[0; 4]); // checksum
    sctp.extend_from_slice(&[11, 0, 0, 4]); // COOKIE ACK
    let crc = sctp_crc32c(&sctp);
    sctp[8..12].copy_from_slice(&crc.to_le_bytes());
    let ip =
        etherparse::Ipv4Header::new(16, 64, etherparse::IpNumber::SCTP, POD.ip().octets(), vip.ip().octets()).unwrap();
    let mut frame = Vec::new();
    etherparse::Ethernet2Header { source: MAC_A, destination: MAC_B, ether_type: etherparse::EtherType::IPV4 }
        .write(&mut frame)
        .unwrap();
    ip.write(&mut frame).unwrap();
    frame.extend_from_slice(&sctp);
    frame.resize(60, 0);
    let out = bed.expect(PROG_FROM_POD, &frame, TC_ACT_OK, &[(STAT_FORWARD_DNAT, 1), (STAT_CT_NEW, 1)]);
    assert_eq!(out.len(), 60, "the padding stays");
    let sctp = &out[34..50];
    assert_eq!(u16::from_be_bytes([sctp[2], sctp[3]]), 5353, "destination port rewritten");
    let mut zeroed = sctp.to_vec();
    zeroed[8..12].fill(0);
    assert_eq!(u32::from_le_bytes(sctp[8..12].try_into().unwrap()), sctp_crc32c(&zeroed), "CRC32c valid");
}

#[test]
fn reject_answers_are_rate_limited_per_node() {
    let bed = Bed::new();
    let vip = sa([10, 96, 0, 20], 80);
    let started = std::time::Instant::now();
    let answered = (0..300u16)
        .filter(|i| {
            let syn = packets::tcp(SocketAddrV4::new(*POD.ip(), 20_000 + i), vip, true, false, &[]);
            bed.run(PROG_FROM_POD, &syn).0 == TC_ACT_REDIRECT
        })
        .count() as u64;
    let elapsed_ms = started.elapsed().as_millis() as u64;
    // A burst of 50, then one per millisecond (the kernel's icmp_msgs_burst and icmp_msgs_per_sec).
    assert!(answered >= 50 && answered <= 50 + elapsed_ms + 1, "{answered} answers in {elapsed_ms} ms");
    let dropped = bed.stats()[STAT_DROP_REJECT_RATE_LIMITED as usize];
    assert_eq!(answered + dropped, 300);
    // The budget refills: 60 ms later a burst is answered again.
    std::thread::sleep(std::time::Duration::from_millis(60));
    let syn = packets::tcp(SocketAddrV4::new(*POD.ip(), 30_000), vip, true, false, &[]);
    bed.expect(PROG_FROM_POD, &syn, TC_ACT_REDIRECT, &[(STAT_REJECT, 1)]);
}

#[test]
fn session_affinity_survives_changes_to_other_endpoints() {
    // kube-proxy keeps a client on its endpoint while that endpoint exists, whatever happens to the
    // others. Slots are renumbered when an endpoint before it goes away: affinity must follow the
    // backend, not the slot.
    let mut bed = Bed::new();
    let vip = sa([10, 96, 0, 30], 80);
    let last = sa([10, 244, 1, 4], 8080);
    // A client whose affine backend is the last endpoint (slot 2 of 3).
    let client = (1..=250u8)
        .map(|i| SocketAddrV4::new(Ipv4Addr::new(10, 244, 3, i), 40_000))
        .find(|c| inspect(&bed.run(PROG_FROM_POD, &packets::tcp(*c, vip, true, false, &[])).1).dst == last)
        .expect("a client affine to the last endpoint");
    // The first endpoint goes away: the last one moves to slot 1.
    let objects = OBJECTS.replace("  - {addresses: [10.244.1.2], nodeName: node-a, conditions: {ready: true}}\n", "");
    assert_ne!(objects, OBJECTS);
    bed.reprogram(&objects);
    for port in 1..=20 {
        let syn = packets::tcp(SocketAddrV4::new(*client.ip(), 40_000 + port), vip, true, false, &[]);
        let out = bed.expect(
            PROG_FROM_POD,
            &syn,
            TC_ACT_OK,
            &[(STAT_FORWARD_DNAT, 1), (STAT_CT_NEW, 1), (STAT_AFFINITY_HIT, 1)],
        );
        assert_eq!(inspect(&out).dst, last, "the client was moved off its endpoint");
    }
    // Its own endpoint going away does move it.
    bed.reprogram(&objects.replace("  - {addresses: [10.244.1.4], nodeName: node-a, conditions: {ready: true}}\n", ""));
    let syn = packets::tcp(SocketAddrV4::new(*client.ip(), 41_000), vip, true, false, &[]);
    assert_eq!(inspect(&bed.run(PROG_FROM_POD, &syn).1).dst, sa([10, 244, 1, 3], 8080));
}
