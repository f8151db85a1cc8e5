//! BPF_PROG_TEST_RUN tests of fragmented datagrams through Services: the first fragment is
//! translated as any packet, the rest follow it by (source, destination, IP id, protocol), both
//! directions, with and without SNAT; the reassembled datagram's checksum is valid. Needs root.

use std::net::{Ipv4Addr, SocketAddrV4};

use ebpf_proxy::datapath::{PROG_FROM_NETDEV, PROG_FROM_POD};
use proxy_common::{
    STAT_CT_NEW, STAT_DROP_FRAGMENT, STAT_FORWARD_DNAT, STAT_FRAGMENT_NAT, STAT_PASS_FRAGMENT, STAT_REVERSE_NAT,
    STAT_SNAT,
};
use tests::{
    packets::{self, fragments, inspect, reassemble},
    progbed::{NODE_IP, ProgBed, TC_ACT_OK, TC_ACT_SHOT},
};

const OBJECTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: default}
spec:
  clusterIP: 10.96.0.12
  ports: [{name: dns, port: 53, protocol: UDP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dns-1, namespace: default, labels: {kubernetes.io/service-name: dns}}
addressType: IPv4
ports: [{name: dns, port: 5353, protocol: UDP}]
endpoints: [{addresses: [10.244.1.7], nodeName: node-a, conditions: {ready: true}}]
---
apiVersion: v1
kind: Service
metadata: {name: remote, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.13
  ports: [{name: dns, port: 53, nodePort: 30053, protocol: UDP}, {name: s, port: 99, nodePort: 30099, protocol: SCTP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: remote-1, namespace: default, labels: {kubernetes.io/service-name: remote}}
addressType: IPv4
ports: [{name: dns, port: 5353, protocol: UDP}, {name: s, port: 99, protocol: SCTP}]
endpoints: [{addresses: [10.244.2.7], nodeName: node-b, conditions: {ready: true}}]
"#;

const POD: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 5), 40_000);
const DNS_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 12), 53);
const DNS_BACKEND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 7), 5353);
const REMOTE_BACKEND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 7), 5353);
const EXTERNAL: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 2), 50_000);
const NODE_PORT: SocketAddrV4 = SocketAddrV4::new(NODE_IP, 30_053);

/// Runs a datagram's fragments through `prog` (the first opening or matching a connection, moving
/// `first`); returns the datagram reassembled from what came out.
fn through(bed: &ProgBed, prog: &str, frags: &[Vec<u8>], first: &[(u32, u64)]) -> Vec<u8> {
    let out: Vec<Vec<u8>> = frags
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let moved: &[(u32, u64)] = if i == 0 { first } else { &[(STAT_FRAGMENT_NAT, 1)] };
            bed.expect(prog, f, TC_ACT_OK, moved)
        })
        .collect();
    reassemble(&out)
}

#[test]
fn a_4000_byte_question_and_answer_cross_a_cluster_ip_in_fragments() {
    let bed = ProgBed::new(OBJECTS, (61_000, 61_003));
    let question = fragments(&packets::udp(POD, DNS_VIP, &[0x5a; 4000]), 1480, 0x1234);
    assert_eq!(question.len(), 3);
    let seen = inspect(&through(&bed, PROG_FROM_POD, &question, &[(STAT_FORWARD_DNAT, 1), (STAT_CT_NEW, 1)]));
    assert_eq!((seen.src, seen.dst), (POD, DNS_BACKEND), "every fragment goes to the backend");
    assert!(seen.ip_checksum_ok && seen.l4_checksum_ok == Some(true), "the datagram's checksum: {seen:?}");
    let answer = fragments(&packets::udp(DNS_BACKEND, POD, &[0xa5; 4000]), 1480, 0x4321);
    let seen = inspect(&through(&bed, PROG_FROM_POD, &answer, &[(STAT_REVERSE_NAT, 1)]));
    assert_eq!((seen.src, seen.dst), (DNS_VIP, POD), "every fragment of the answer comes from the Service");
    assert!(seen.ip_checksum_ok && seen.l4_checksum_ok == Some(true), "{seen:?}");

    // A later fragment whose first never came cannot be told apart from an attack on the Service
    // address: dropped, counted.
    let orphan = fragments(&packets::udp(POD, DNS_VIP, &[0x5a; 4000]), 1480, 0x7777);
    bed.expect(PROG_FROM_POD, &orphan[1], TC_ACT_SHOT, &[(STAT_DROP_FRAGMENT, 1)]);
}

#[test]
fn fragments_through_a_node_port_are_masqueraded_with_their_first() {
    let bed = ProgBed::new(OBJECTS, (61_000, 61_003));
    let question = fragments(&packets::udp(EXTERNAL, NODE_PORT, &[0x5a; 4000]), 1480, 0x0101);
    let seen = inspect(&through(
        &bed,
        PROG_FROM_NETDEV,
        &question,
        &[(STAT_FORWARD_DNAT, 1), (STAT_CT_NEW, 1), (STAT_SNAT, 1)],
    ));
    assert_eq!((*seen.src.ip(), seen.dst), (NODE_IP, REMOTE_BACKEND));
    assert!(seen.ip_checksum_ok && seen.l4_checksum_ok == Some(true), "{seen:?}");
    let answer = fragments(&packets::udp(REMOTE_BACKEND, seen.src, &[0xa5; 4000]), 1480, 0x0202);
    let seen = inspect(&through(&bed, PROG_FROM_NETDEV, &answer, &[(STAT_REVERSE_NAT, 1)]));
    assert_eq!((seen.src, seen.dst), (NODE_PORT, EXTERNAL));
    assert!(seen.ip_checksum_ok && seen.l4_checksum_ok == Some(true), "{seen:?}");
}

#[test]
fn sctp_fragments_to_a_service_drop_and_other_fragments_pass_byte_for_byte() {
    let bed = ProgBed::new(OBJECTS, (61_000, 61_003));
    // SCTP's checksum covers the whole datagram: its first fragment cannot be translated alone.
    let mut sctp = packets::udp(EXTERNAL, SocketAddrV4::new(NODE_IP, 30_099), &[0x5a; 3000]);
    sctp[packets::IP_OFF + 9] = 132;
    packets::fix_ip_checksum(&mut sctp);
    let frags = fragments(&sctp, 1480, 0x0303);
    bed.expect(PROG_FROM_NETDEV, &frags[0], TC_ACT_SHOT, &[(STAT_DROP_FRAGMENT, 1)]);
    // Not Service traffic: untouched.
    let other = fragments(&packets::udp(POD, SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 9), 53), &[1; 3000]), 1480, 9);
    assert_eq!(bed.expect(PROG_FROM_POD, &other[0], TC_ACT_OK, &[]), other[0]);
    assert_eq!(bed.expect(PROG_FROM_POD, &other[1], TC_ACT_OK, &[(STAT_PASS_FRAGMENT, 1)]), other[1]);
}
