//! BPF_PROG_TEST_RUN tests of ICMP errors through translated connections (quote, addresses and
//! every checksum restored for the end the error goes to), of packets that pass untouched, and of
//! fragmentation needed for packets the datapath forwards itself. Needs root.

use std::net::{Ipv4Addr, SocketAddrV4};

use ebpf_proxy::datapath::{PROG_FROM_NETDEV, PROG_FROM_POD};
use etherparse::{
    Icmpv4Type, Ipv4Header, NetSlice, SlicedPacket, TransportSlice,
    icmpv4::{DestUnreachableHeader, TimeExceededCode},
};
use proxy_common::{
    STAT_CT_NEW, STAT_DROP_TOO_BIG, STAT_FORWARD_DNAT, STAT_FRAG_NEEDED, STAT_ICMP_ERROR_NAT, STAT_REVERSE_NAT,
    STAT_SNAT,
};
use tests::{
    packets::{self, IP_OFF, L4_OFF, fix_ip_checksum, icmp_error, inspect, inspect_icmp, ip_of},
    progbed::{NODE_IP, ProgBed, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT},
};

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
metadata: {name: local, namespace: default}
spec:
  clusterIP: 10.96.0.12
  ports: [{name: http, port: 80, protocol: TCP}, {name: dns, port: 53, protocol: UDP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: local-1, namespace: default, labels: {kubernetes.io/service-name: local}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]
endpoints: [{addresses: [10.244.1.7], nodeName: node-a, conditions: {ready: true}}]
"#;

const EXTERNAL: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 2), 50_000);
const NODE_PORT: SocketAddrV4 = SocketAddrV4::new(NODE_IP, 30_080);
const REMOTE_BACKEND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 7), 8080);
const POD: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 5), 40_000);
const DNS_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 12), 53);
const DNS_BACKEND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 7), 5353);
const ROUTER: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
const FAR_ROUTER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

fn frag_needed(mtu: u16) -> Icmpv4Type {
    Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu })
}

fn port_unreachable() -> Icmpv4Type {
    Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port)
}

/// Opens the masqueraded NodePort connection: (the SYN as it left for the backend, the backend's
/// SYN-ACK as it left for the client).
fn masqueraded_connection(bed: &ProgBed) -> (Vec<u8>, Vec<u8>) {
    let syn = packets::tcp(EXTERNAL, NODE_PORT, true, false, &[]);
    let sent =
        bed.expect(PROG_FROM_NETDEV, &syn, TC_ACT_OK, &[(STAT_FORWARD_DNAT, 1), (STAT_CT_NEW, 1), (STAT_SNAT, 1)]);
    let masq = inspect(&sent).src;
    let syn_ack = packets::tcp(REMOTE_BACKEND, masq, true, true, &[]);
    let restored = bed.expect(PROG_FROM_NETDEV, &syn_ack, TC_ACT_OK, &[(STAT_REVERSE_NAT, 1)]);
    (sent, restored)
}

#[test]
fn an_error_about_a_forwarded_packet_reaches_the_client_about_its_own_packet() {
    let bed = ProgBed::new(OBJECTS, (61_000, 61_003));
    let (sent, _) = masqueraded_connection(&bed);
    let masq = inspect(&sent).src;
    // A router between the node and the backend cannot forward the (full, quoted) SYN.
    let error = icmp_error(ROUTER, NODE_IP, frag_needed(1400), ip_of(&sent));
    let out = bed.expect(PROG_FROM_NETDEV, &error, TC_ACT_OK, &[(STAT_ICMP_ERROR_NAT, 1)]);
    let seen = inspect_icmp(&out);
    assert_eq!((seen.src, seen.dst), (NODE_IP, *EXTERNAL.ip()), "to the client, from the address it used");
    assert_eq!(seen.icmp_type, frag_needed(1400));
    assert!(seen.checksums_ok, "outer IP and ICMP checksums: {seen:?}");
    assert_eq!((seen.quote.src, seen.quote.dst), (EXTERNAL, NODE_PORT), "the client's own packet, as it sent it");
    assert!(seen.quote.ip_checksum_ok && seen.quote.l4_checksum_ok == Some(true), "quote's checksums: {seen:?}");
    // Time exceeded too (a traceroute through the Service).
    let error =
        icmp_error(ROUTER, *masq.ip(), Icmpv4Type::TimeExceeded(TimeExceededCode::TtlExceededInTransit), ip_of(&sent));
    let seen = inspect_icmp(&bed.expect(PROG_FROM_NETDEV, &error, TC_ACT_OK, &[(STAT_ICMP_ERROR_NAT, 1)]));
    assert_eq!((seen.quote.src, seen.quote.dst, seen.checksums_ok), (EXTERNAL, NODE_PORT, true));
}

#[test]
fn an_error_about_a_restored_reply_reaches_the_backend_about_the_reply_it_sent() {
    let bed = ProgBed::new(OBJECTS, (61_000, 61_003));
    let (sent, restored) = masqueraded_connection(&bed);
    let masq = inspect(&sent).src;
    // A router on the client's side cannot forward the reply: its error goes to the reply's source.
    let error = icmp_error(FAR_ROUTER, NODE_IP, frag_needed(1280), ip_of(&restored));
    let out = bed.expect(PROG_FROM_NETDEV, &error, TC_ACT_OK, &[(STAT_ICMP_ERROR_NAT, 1)]);
    let seen = inspect_icmp(&out);
    assert_eq!((seen.src, seen.dst), (NODE_IP, *REMOTE_BACKEND.ip()), "to the backend, from the SNAT address");
    assert_eq!((seen.quote.src, seen.quote.dst), (REMOTE_BACKEND, masq), "the reply as the backend sent it");
    assert!(seen.checksums_ok && seen.quote.ip_checksum_ok && seen.quote.l4_checksum_ok == Some(true), "{seen:?}");
}

#[test]
fn a_closed_backend_port_reaches_the_udp_client_as_its_own_datagram_refused() {
    let bed = ProgBed::new(OBJECTS, (61_000, 61_003));
    let query = packets::udp(POD, DNS_VIP, b"query");
    let sent = bed.expect(PROG_FROM_POD, &query, TC_ACT_OK, &[(STAT_FORWARD_DNAT, 1), (STAT_CT_NEW, 1)]);
    assert_eq!(inspect(&sent).dst, DNS_BACKEND);
    let refused = icmp_error(*DNS_BACKEND.ip(), *POD.ip(), port_unreachable(), ip_of(&sent));
    let seen = inspect_icmp(&bed.expect(PROG_FROM_POD, &refused, TC_ACT_OK, &[(STAT_ICMP_ERROR_NAT, 1)]));
    assert_eq!((seen.src, seen.dst), (*DNS_VIP.ip(), *POD.ip()));
    assert_eq!((seen.quote.src, seen.quote.dst), (POD, DNS_VIP));
    assert!(seen.checksums_ok && seen.quote.ip_checksum_ok && seen.quote.l4_checksum_ok == Some(true), "{seen:?}");

    // A datagram sent without a checksum is quoted without one.
    let mut bare = sent.clone();
    bare[L4_OFF + 6..L4_OFF + 8].fill(0);
    let seen = inspect_icmp(&bed.expect(
        PROG_FROM_POD,
        &icmp_error(*DNS_BACKEND.ip(), *POD.ip(), port_unreachable(), ip_of(&bare)),
        TC_ACT_OK,
        &[(STAT_ICMP_ERROR_NAT, 1)],
    ));
    assert_eq!((seen.quote.dst, seen.quote.udp_checksum, seen.checksums_ok), (DNS_VIP, Some(0), true));

    // A quote cut after the first 8 bytes of the datagram's payload (all RFC 792 asks for): the
    // ports are restored, the ICMP checksum stays valid.
    let cut = &ip_of(&sent)[..28];
    let out = bed.expect(
        PROG_FROM_POD,
        &icmp_error(*DNS_BACKEND.ip(), *POD.ip(), port_unreachable(), cut),
        TC_ACT_OK,
        &[(STAT_ICMP_ERROR_NAT, 1)],
    );
    let (icmp_ok, quote) = icmp_payload(&out);
    assert!(icmp_ok, "ICMP checksum over the cut quote");
    let (ip, _) = Ipv4Header::from_slice(&quote).unwrap();
    assert_eq!(ip.calc_header_checksum(), ip.header_checksum);
    assert_eq!((Ipv4Addr::from(ip.destination), u16::from_be_bytes([quote[22], quote[23]])), (*DNS_VIP.ip(), 53));
}

/// Whether a frame's ICMP checksum is valid, and its payload (the quote).
fn icmp_payload(frame: &[u8]) -> (bool, Vec<u8>) {
    let sliced = SlicedPacket::from_ethernet(frame).unwrap();
    let Some(TransportSlice::Icmpv4(icmp)) = sliced.transport else { panic!("not ICMP") };
    (icmp.icmp_type().calc_checksum(icmp.payload()) == icmp.checksum(), icmp.payload().to_vec())
}

#[test]
fn errors_about_no_tracked_connection_and_other_icmp_pass_byte_for_byte() {
    let bed = ProgBed::new(OBJECTS, (61_000, 61_003));
    masqueraded_connection(&bed);
    let unknown =
        packets::tcp(SocketAddrV4::new(NODE_IP, 40_000), SocketAddrV4::new(FAR_ROUTER, 443), true, false, &[]);
    let cases = [
        icmp_error(ROUTER, NODE_IP, frag_needed(1400), ip_of(&unknown)),
        icmp_error(ROUTER, NODE_IP, Icmpv4Type::EchoRequest(etherparse::IcmpEchoHeader { id: 1, seq: 1 }), b"ping"),
        // The quote of a later fragment (no ports in it).
        {
            let mut later = unknown.clone();
            later[IP_OFF + 7] = 0x10;
            fix_ip_checksum(&mut later);
            icmp_error(ROUTER, NODE_IP, frag_needed(1400), ip_of(&later))
        },
    ];
    for frame in cases {
        for prog in [PROG_FROM_NETDEV, PROG_FROM_POD] {
            assert_eq!(
                bed.expect(prog, &frame, TC_ACT_OK, &[]),
                frame,
                "{prog} changed an ICMP message it had no part in"
            );
        }
    }
}

#[test]
fn a_packet_too_big_for_the_next_hop_is_answered_with_fragmentation_needed() {
    let bed = ProgBed::new(OBJECTS, (61_000, 61_003));
    // Backends behind a 1280-byte link, clients behind another.
    bed.enable_forwarding();
    for (dev, route) in [("up0", "10.244.2.0/24"), ("up1", "203.0.113.0/24")] {
        bed.ip(&["link", "add", dev, "mtu", "1280", "type", "veth", "peer", "name", &format!("{dev}-peer")]);
        bed.ip(&["link", "set", &format!("{dev}-peer"), "up"]);
        bed.ip(&["link", "set", dev, "up"]);
        bed.ip(&["route", "add", route, "dev", dev]);
    }
    let syn = packets::tcp(EXTERNAL, NODE_PORT, true, false, &[]);
    let sent = bed.expect(
        PROG_FROM_NETDEV,
        &syn,
        TC_ACT_REDIRECT,
        &[(STAT_FORWARD_DNAT, 1), (STAT_CT_NEW, 1), (STAT_SNAT, 1)],
    );
    let masq = inspect(&sent).src;
    let with_df = |mut frame: Vec<u8>, df: bool| {
        frame[IP_OFF + 6] = if df { 0x40 } else { 0 };
        fix_ip_checksum(&mut frame);
        frame
    };
    // The client sends 1,400 bytes with DF: answered from the address it sent to, with the MTU.
    let big = with_df(packets::tcp(EXTERNAL, NODE_PORT, false, true, &[0x5a; 1400]), true);
    let out = bed.expect(PROG_FROM_NETDEV, &big, TC_ACT_REDIRECT, &[(STAT_FRAG_NEEDED, 1)]);
    let (icmp_ok, quote) = icmp_payload(&out);
    let seen = SlicedPacket::from_ethernet(&out).unwrap();
    let Some(NetSlice::Ipv4(ip)) = seen.net else { panic!() };
    assert_eq!((ip.header().source_addr(), ip.header().destination_addr()), (NODE_IP, *EXTERNAL.ip()));
    assert_eq!(inspect_icmp_type(&out), frag_needed(1280));
    assert!(icmp_ok);
    assert_eq!(quote[..28], ip_of(&big)[..28], "the client's packet as it sent it");
    // Without DF it would have to be fragmented: dropped, counted.
    let big = with_df(big, false);
    bed.expect(PROG_FROM_NETDEV, &big, TC_ACT_SHOT, &[(STAT_DROP_TOO_BIG, 1)]);
    // A reply too big for the client's side: the backend is told, about the reply as it sent it.
    let reply = with_df(packets::tcp(REMOTE_BACKEND, masq, false, true, &[0x5a; 1400]), true);
    let out = bed.expect(PROG_FROM_NETDEV, &reply, TC_ACT_REDIRECT, &[(STAT_FRAG_NEEDED, 1)]);
    let (icmp_ok, quote) = icmp_payload(&out);
    assert!(icmp_ok);
    assert_eq!(quote[..28], ip_of(&reply)[..28]);
    // What fits is forwarded.
    let small = with_df(packets::tcp(EXTERNAL, NODE_PORT, false, true, &[0x5a; 1000]), true);
    bed.expect(PROG_FROM_NETDEV, &small, TC_ACT_REDIRECT, &[(STAT_FORWARD_DNAT, 1)]);
}

fn inspect_icmp_type(frame: &[u8]) -> Icmpv4Type {
    let Some(TransportSlice::Icmpv4(icmp)) = SlicedPacket::from_ethernet(frame).unwrap().transport else {
        panic!("not ICMP")
    };
    icmp.icmp_type()
}
