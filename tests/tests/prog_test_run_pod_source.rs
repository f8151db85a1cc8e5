//! BPF_PROG_TEST_RUN tests of anti-spoofing on pod interfaces: a local pod's Service traffic must
//! carry the pod's own address, and only a backend's own interface may answer for it. Real veths
//! and routes in the bed's namespace give the programs' FIB lookups a node's answers. Needs root.

use std::net::{Ipv4Addr, SocketAddrV4};

use ebpf_proxy::datapath::{PROG_FROM_NETDEV, PROG_FROM_POD};
use proxy_common::{
    CT_STATE_SYN_SENT, STAT_CT_NEW, STAT_DROP_POD_REPLY_SPOOFED, STAT_DROP_POD_SOURCE_SPOOFED, STAT_FORWARD_DNAT,
    STAT_REVERSE_NAT, STAT_SNAT,
};
use tests::{
    packets::{self, inspect},
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
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: default}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80, protocol: TCP}]
"#;

/// Pod A, the client; pod B, the local backend; pod C, the attacker (each on its own interface).
const POD_A: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 5), 40_000);
const POD_B: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 7), 8080);
const POD_C: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 9);
const REMOTE_BACKEND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 7), 8080);
const EXTERNAL: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 2), 50_000);
const LOCAL_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 12), 80);
const LOOPBACK_IFINDEX: u32 = 1;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const SYN_ACK: u8 = 0x12;

struct Pods {
    bed: ProgBed,
    a: u32,
    b: u32,
    c: u32,
}

fn pods() -> Pods {
    let mut bed = ProgBed::new(OBJECTS, (61_000, 61_003));
    let a = bed.add_pod_interface("pa", "10.244.1.5/32", None);
    let b = bed.add_pod_interface("pb", "10.244.1.7/32", None);
    let c = bed.add_pod_interface("pc", "10.244.1.9/32", None);
    Pods { bed, a, b, c }
}

fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Vec<u8> {
    packets::tcp_ts(src, dst, flags, 1000, 1, 1)
}

#[test]
fn a_pod_cannot_open_connections_or_draw_rejects_in_another_address_name() {
    let p = pods();
    let shot = [(STAT_DROP_POD_SOURCE_SPOOFED, 1)];
    // Pod C forges pod A's address: no connection, no backend chosen (nor affinity written).
    p.bed.expect_on(PROG_FROM_POD, p.c, &tcp(POD_A, LOCAL_VIP, SYN), TC_ACT_SHOT, &shot);
    assert!(p.bed.tdp.conntrack.connections().unwrap().is_empty(), "no connection tracked for a forged source");
    // From its own interface, pod A's connection is translated.
    let out = p.bed.expect_on(
        PROG_FROM_POD,
        p.a,
        &tcp(POD_A, LOCAL_VIP, SYN),
        TC_ACT_OK,
        &[(STAT_FORWARD_DNAT, 1), (STAT_CT_NEW, 1)],
    );
    assert_eq!(inspect(&out).dst, POD_B);
    // Pod C injecting into pod A's connection, with its tuple.
    p.bed.expect_on(PROG_FROM_POD, p.c, &tcp(POD_A, LOCAL_VIP, ACK), TC_ACT_SHOT, &shot);
    // A Service without endpoints is not made to send its RST to the forged address.
    let empty = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 20), 80);
    p.bed.expect_on(PROG_FROM_POD, p.c, &tcp(POD_A, empty, SYN), TC_ACT_SHOT, &shot);
    // Nor may a pod borrow the node's own address, or one routed elsewhere.
    let node = SocketAddrV4::new(NODE_IP, 40_000);
    p.bed.expect_on(PROG_FROM_POD, p.c, &tcp(node, LOCAL_VIP, SYN), TC_ACT_SHOT, &shot);
    p.bed.expect_on(PROG_FROM_POD, p.c, &tcp(REMOTE_BACKEND, LOCAL_VIP, SYN), TC_ACT_SHOT, &shot);
    // Its own address is fine.
    let own = SocketAddrV4::new(POD_C, 40_000);
    p.bed.expect_on(
        PROG_FROM_POD,
        p.c,
        &tcp(own, LOCAL_VIP, SYN),
        TC_ACT_OK,
        &[(STAT_FORWARD_DNAT, 1), (STAT_CT_NEW, 1)],
    );
}

#[test]
fn a_pod_cannot_answer_for_a_backend_it_is_not() {
    let p = pods();
    let shot = [(STAT_DROP_POD_REPLY_SPOOFED, 1)];
    // A masqueraded flow: an external client through the NodePort to a backend on another node.
    let node_port = SocketAddrV4::new(NODE_IP, 30_080);
    let out = p.bed.expect_on(
        PROG_FROM_NETDEV,
        LOOPBACK_IFINDEX,
        &tcp(EXTERNAL, node_port, SYN),
        TC_ACT_OK,
        &[(STAT_FORWARD_DNAT, 1), (STAT_CT_NEW, 1), (STAT_SNAT, 1)],
    );
    let masq = inspect(&out).src;
    assert_eq!((*masq.ip(), inspect(&out).dst), (NODE_IP, REMOTE_BACKEND));
    // Pod C guesses the port and answers as the backend: it must not reach the client (nor move the
    // connection's state).
    p.bed.expect_on(PROG_FROM_POD, p.c, &tcp(REMOTE_BACKEND, masq, SYN_ACK), TC_ACT_SHOT, &shot);
    let states: Vec<u8> = p.bed.tdp.conntrack.connections().unwrap().iter().map(|(_, e)| e.state).collect();
    assert_eq!(states, [CT_STATE_SYN_SENT], "the forged answer moved nothing");
    // The backend's real answer arrives from the network and is restored; afterwards the pod is
    // still refused.
    let out = p.bed.expect_on(
        PROG_FROM_NETDEV,
        LOOPBACK_IFINDEX,
        &tcp(REMOTE_BACKEND, masq, SYN_ACK),
        TC_ACT_OK,
        &[(STAT_REVERSE_NAT, 1)],
    );
    assert_eq!((inspect(&out).src, inspect(&out).dst), (node_port, EXTERNAL));
    p.bed.expect_on(PROG_FROM_POD, p.c, &tcp(REMOTE_BACKEND, masq, ACK), TC_ACT_SHOT, &shot);

    // A local backend: pod A → ClusterIP → pod B. Pod C answering as pod B is refused before and
    // after pod B's own answer, which is restored.
    p.bed.expect_on(
        PROG_FROM_POD,
        p.a,
        &tcp(POD_A, LOCAL_VIP, SYN),
        TC_ACT_OK,
        &[(STAT_FORWARD_DNAT, 1), (STAT_CT_NEW, 1)],
    );
    p.bed.expect_on(PROG_FROM_POD, p.c, &tcp(POD_B, POD_A, SYN_ACK), TC_ACT_SHOT, &shot);
    // (Restored, it is forwarded by the datapath itself, to pod A's interface.)
    let out =
        p.bed.expect_on(PROG_FROM_POD, p.b, &tcp(POD_B, POD_A, SYN_ACK), TC_ACT_REDIRECT, &[(STAT_REVERSE_NAT, 1)]);
    assert_eq!(inspect(&out).src, LOCAL_VIP);
    p.bed.expect_on(PROG_FROM_POD, p.c, &tcp(POD_B, POD_A, ACK), TC_ACT_SHOT, &shot);
    // UDP too: a forged first answer.
    let dns = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 12), 53);
    let backend_dns = SocketAddrV4::new(*POD_B.ip(), 5353);
    p.bed.expect_on(
        PROG_FROM_POD,
        p.a,
        &packets::udp(POD_A, dns, b"q"),
        TC_ACT_OK,
        &[(STAT_FORWARD_DNAT, 1), (STAT_CT_NEW, 1)],
    );
    p.bed.expect_on(PROG_FROM_POD, p.c, &packets::udp(backend_dns, POD_A, b"forged"), TC_ACT_SHOT, &shot);
    p.bed.expect_on(
        PROG_FROM_POD,
        p.b,
        &packets::udp(backend_dns, POD_A, b"a"),
        TC_ACT_REDIRECT,
        &[(STAT_REVERSE_NAT, 1)],
    );
}

#[test]
fn bridged_pods_are_held_to_the_addresses_routed_through_their_bridge() {
    let mut bed = ProgBed::new(OBJECTS, (61_000, 61_003));
    let port = bed.add_pod_interface("pd", "10.244.1.0/24", Some("br-pods"));
    let pod = SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 33), 40_000);
    bed.expect_on(
        PROG_FROM_POD,
        port,
        &tcp(pod, LOCAL_VIP, SYN),
        TC_ACT_OK,
        &[(STAT_FORWARD_DNAT, 1), (STAT_CT_NEW, 1)],
    );
    bed.expect_on(
        PROG_FROM_POD,
        port,
        &tcp(REMOTE_BACKEND, LOCAL_VIP, SYN),
        TC_ACT_SHOT,
        &[(STAT_DROP_POD_SOURCE_SPOOFED, 1)],
    );
}
