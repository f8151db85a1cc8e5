//! BPF_PROG_TEST_RUN tests of the connection table: one state for both directions of a connection,
//! lifetimes after a reset and after an unfinished handshake, either direction keeping a connection
//! alive, SNAT ports claimed atomically across CPUs, a full table that displaces unanswered
//! connections but never assured ones, and the collector. Time is moved by ageing the connections'
//! timestamps. Needs root.

use std::net::{Ipv4Addr, SocketAddrV4};

use ebpf_proxy::datapath::{PROG_FROM_NETDEV, PROG_FROM_POD};
use proxy_common::{
    CT_F_ASSURED, CT_STATE_CLOSE, CT_STATE_ESTABLISHED, CT_STATE_SYN_RECV, CtKey, PROTO_TCP, PROTO_UDP, SNAT_RETRIES,
    STAT_CT_EARLY_DROP, STAT_CT_NEW, STAT_DROP_CT_FULL, STAT_DROP_SNAT_EXHAUSTED, STAT_FORWARD_DNAT, STAT_REVERSE_NAT,
    STAT_SNAT, STAT_SNAT_COLLISION, STAT_SNAT_REUSE_CLOSED, STAT_SNAT_REUSE_UNANSWERED, TCP_RST, addr_to_map,
    ct_remaining_ns, port_to_map,
};
use tests::{
    packets::{self, inspect},
    progbed::{NODE_IP, ProgBed, SpinBarrier, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, now_ns},
};

const EXTERNAL: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 2), 50_000);
const OTHER_CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 3), 50_000);
const POD: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 5), 40_000);
const BACKEND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 7), 8080);
const DNS_BACKEND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 7), 5353);
const NODE_PORT: SocketAddrV4 = SocketAddrV4::new(NODE_IP, 30_080);
const DNS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 53), 53);
/// One SNAT port: whoever holds it decides whether the next masqueraded connection gets in.
const ONE_PORT: (u16, u16) = (61_000, 61_000);

const OBJECTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: local, namespace: default}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  clusterIP: 10.96.0.11
  ports: [{name: http, port: 80, nodePort: 30081, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: local-1, namespace: default, labels: {kubernetes.io/service-name: local}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints: [{addresses: [10.244.1.9], nodeName: node-a, conditions: {ready: true}}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, nodePort: 30080, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints: [{addresses: [10.244.2.7], nodeName: node-b, conditions: {ready: true}}]
---
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: default}
spec:
  clusterIP: 10.96.0.53
  ports: [{name: dns, port: 53, protocol: UDP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dns-1, namespace: default, labels: {kubernetes.io/service-name: dns}}
addressType: IPv4
ports: [{name: dns, port: 5353, protocol: UDP}]
endpoints: [{addresses: [10.244.2.7], nodeName: node-b, conditions: {ready: true}}]
"#;

fn key(s: SocketAddrV4, d: SocketAddrV4, proto: u8) -> CtKey {
    CtKey::new(
        addr_to_map(s.ip().octets()),
        addr_to_map(d.ip().octets()),
        port_to_map(s.port()),
        port_to_map(d.port()),
        proto,
    )
}

fn tcp_flags(frame: &mut [u8], flags: u8) -> Vec<u8> {
    frame[14 + 20 + 13] = flags;
    frame.to_vec()
}

const ACK: u8 = 0x10;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;

/// A client's connection through the NodePort, masqueraded to the one SNAT port: the SYN and the
/// backend's SYN-ACK. Returns the SNAT source the backend sees.
fn open_masqueraded(bed: &ProgBed, client: SocketAddrV4) -> SocketAddrV4 {
    let syn = packets::tcp(client, NODE_PORT, true, false, &[]);
    let out =
        bed.expect(PROG_FROM_NETDEV, &syn, TC_ACT_OK, &[(STAT_FORWARD_DNAT, 1), (STAT_CT_NEW, 1), (STAT_SNAT, 1)]);
    let snat = inspect(&out).src;
    assert_eq!((*snat.ip(), inspect(&out).dst), (NODE_IP, BACKEND), "masqueraded to the backend");
    // The SYN-ACK goes back to the client from the NodePort (forwarded by the program itself).
    let synack = packets::tcp(BACKEND, snat, true, true, &[]);
    let back = inspect(&bed.expect(PROG_FROM_NETDEV, &synack, TC_ACT_OK, &[(STAT_REVERSE_NAT, 1)]));
    assert_eq!((back.src, back.dst), (NODE_PORT, client));
    snat
}

/// The next client's SYN through the NodePort: its action.
fn next_client_gets_in(bed: &ProgBed, client: SocketAddrV4) -> bool {
    let (ret, _) = bed.run(PROG_FROM_NETDEV, &packets::tcp(client, NODE_PORT, true, false, &[]));
    assert!(ret == TC_ACT_OK || ret == TC_ACT_SHOT, "action {ret}");
    ret == TC_ACT_OK
}

#[test]
fn a_reset_after_the_handshake_closes_both_directions_and_frees_the_snat_port() {
    for (who, reset_from_backend) in [("client", false), ("backend", true)] {
        let mut bed = ProgBed::new(OBJECTS, ONE_PORT);
        let snat = open_masqueraded(&bed, EXTERNAL);
        // The client completes the handshake, then aborts (a browser, a health check, a scanner).
        let mut ack = packets::tcp(EXTERNAL, NODE_PORT, false, true, &[]);
        bed.expect(PROG_FROM_NETDEV, &tcp_flags(&mut ack, ACK), TC_ACT_OK, &[(STAT_FORWARD_DNAT, 1)]);
        let conn = key(EXTERNAL, NODE_PORT, PROTO_TCP);
        assert_eq!(bed.tdp.conntrack.get(&conn).unwrap().state, CT_STATE_ESTABLISHED);
        if reset_from_backend {
            let mut rst = packets::tcp(BACKEND, snat, false, true, &[]);
            bed.expect(PROG_FROM_NETDEV, &tcp_flags(&mut rst, RST | ACK), TC_ACT_OK, &[(STAT_REVERSE_NAT, 1)]);
        } else {
            let mut rst = packets::tcp(EXTERNAL, NODE_PORT, false, true, &[]);
            bed.expect(PROG_FROM_NETDEV, &tcp_flags(&mut rst, RST | ACK), TC_ACT_OK, &[(STAT_FORWARD_DNAT, 1)]);
        }
        // One state for both directions: closed, for about 10 s.
        let e = bed.tdp.conntrack.get(&conn).unwrap();
        assert_eq!(e.state, CT_STATE_CLOSE, "reset from the {who}");
        let left = ct_remaining_ns(&e, PROTO_TCP, now_ns());
        assert!(left <= 10_000_000_000 && left > 8_000_000_000, "{left} ns left after a reset from the {who}");
        if reset_from_backend {
            // Ten seconds on, the connection is gone: the backend's late packets are not translated
            // to its old client any more, and the port is free.
            bed.age(11);
            let late = packets::tcp(BACKEND, snat, false, true, b"late");
            assert_eq!(bed.run(PROG_FROM_NETDEV, &late).1, late, "a dead connection translated a packet");
            assert!(bed.tdp.conntrack.get(&conn).is_none(), "the dead connection is gone");
            assert!(next_client_gets_in(&bed, OTHER_CLIENT), "the port is still held 11 s after the reset");
        } else {
            // A finished connection does not keep its port from a new one: the next client gets it at
            // once.
            let before = bed.stats();
            assert!(next_client_gets_in(&bed, OTHER_CLIENT), "the port is still held after a reset");
            assert_eq!(bed.stats()[STAT_SNAT_REUSE_CLOSED as usize] - before[STAT_SNAT_REUSE_CLOSED as usize], 1);
            assert!(bed.tdp.conntrack.get(&conn).is_none(), "the reset connection made room");
        }
    }
}

#[test]
fn an_unfinished_handshake_lives_a_minute_and_yields_its_port_when_none_is_left() {
    let mut bed = ProgBed::new(OBJECTS, ONE_PORT);
    open_masqueraded(&bed, EXTERNAL);
    // The client never acknowledges the SYN-ACK (a scanner, a spoofed source).
    let conn = key(EXTERNAL, NODE_PORT, PROTO_TCP);
    let e = bed.tdp.conntrack.get(&conn).unwrap();
    assert_eq!((e.state, e.flags & CT_F_ASSURED), (CT_STATE_SYN_RECV, 0), "the SYN-ACK does not establish it");
    assert!(ct_remaining_ns(&e, PROTO_TCP, now_ns()) <= 60_000_000_000);
    // While its handshake may still complete, its port is its own.
    bed.expect(
        PROG_FROM_NETDEV,
        &packets::tcp(OTHER_CLIENT, NODE_PORT, true, false, &[]),
        TC_ACT_SHOT,
        &[(STAT_SNAT_COLLISION, u64::from(SNAT_RETRIES)), (STAT_DROP_SNAT_EXHAUSTED, 1)],
    );
    // Left unanswered for seconds it is alive (a minute) but yields the port when none is left.
    bed.age(3);
    assert!(bed.tdp.conntrack.get(&conn).is_some_and(|e| ct_remaining_ns(&e, PROTO_TCP, now_ns()) > 0));
    let before = bed.stats();
    assert!(next_client_gets_in(&bed, OTHER_CLIENT), "an unanswered handshake kept its port");
    assert_eq!(bed.stats()[STAT_SNAT_REUSE_UNANSWERED as usize] - before[STAT_SNAT_REUSE_UNANSWERED as usize], 1);
    assert!(bed.tdp.conntrack.get(&conn).is_none(), "the unanswered connection made room");

    // Without pressure on its port it lives its minute, then goes.
    let third = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 4), 50_000);
    let mut bed = ProgBed::new(OBJECTS, (61_000, 61_010));
    open_masqueraded(&bed, third);
    let conn = key(third, NODE_PORT, PROTO_TCP);
    bed.age(59);
    assert!(bed.tdp.conntrack.get(&conn).is_some_and(|e| ct_remaining_ns(&e, PROTO_TCP, now_ns()) > 0));
    bed.age(2);
    let collected = bed.tdp.conntrack.collect(now_ns()).unwrap();
    assert_eq!((collected.alive, collected.dead), (0, 1), "gone 61 s after its last packet");
}

#[test]
fn either_direction_keeps_a_connection_alive() {
    let mut bed = ProgBed::new(OBJECTS, ONE_PORT);
    // A UDP flow whose server answers once, then stays silent while the client keeps sending.
    let query = packets::udp(POD, DNS, b"query");
    let out = inspect(&bed.expect(PROG_FROM_POD, &query, TC_ACT_OK, &[(STAT_FORWARD_DNAT, 1), (STAT_CT_NEW, 1)]));
    assert_eq!(out.dst, DNS_BACKEND);
    let answer = packets::udp(DNS_BACKEND, POD, b"answer");
    bed.expect(PROG_FROM_NETDEV, &answer, TC_ACT_OK, &[(STAT_REVERSE_NAT, 1)]);
    for _ in 0..3 {
        bed.age(50);
        bed.expect(PROG_FROM_POD, &query, TC_ACT_OK, &[(STAT_FORWARD_DNAT, 1)]);
    }
    // 150 s after its last answer the server speaks again: still the same connection.
    let late = inspect(&bed.expect(PROG_FROM_NETDEV, &answer, TC_ACT_OK, &[(STAT_REVERSE_NAT, 1)]));
    assert_eq!((late.src, late.dst), (DNS, POD), "the server's datagram left untranslated");
    // And the other way round: a client silent for 150 s while the server sends.
    for _ in 0..3 {
        bed.age(50);
        bed.expect(PROG_FROM_NETDEV, &answer, TC_ACT_OK, &[(STAT_REVERSE_NAT, 1)]);
    }
    bed.expect(PROG_FROM_POD, &query, TC_ACT_OK, &[(STAT_FORWARD_DNAT, 1)]);
    let conn = bed.tdp.conntrack.get(&key(POD, DNS, PROTO_UDP)).unwrap();
    assert_eq!(conn.created_ns, bed.tdp.conntrack.connections().unwrap()[0].1.created_ns, "one connection throughout");
}

/// As many NodePorts as rounds, each with its own backend port, so every round races for a port
/// of its own.
fn racing_objects(rounds: u16) -> String {
    let mut s = String::new();
    for i in 0..rounds {
        s += &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: default}}\nspec:\n  type: NodePort\n  \
             clusterIP: 10.96.{}.{}\n  ports: [{{name: p, port: 80, nodePort: {}, protocol: TCP}}]\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-1, namespace: default, \
             labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\n\
             ports: [{{name: p, port: {}, protocol: TCP}}]\n\
             endpoints: [{{addresses: [10.244.2.7], nodeName: node-b, conditions: {{ready: true}}}}]\n---\n",
            1 + i / 250,
            1 + i % 250,
            30_000 + i,
            10_000 + i
        );
    }
    s
}

/// Two clients (on two CPUs, started together by a spin barrier) each send a SYN to NodePort
/// 30000 + i in round i; every program's answer, per client and round.
fn race(bed: &ProgBed, rounds: u16) -> Vec<Vec<u32>> {
    let start = SpinBarrier::default();
    std::thread::scope(|s| {
        let threads: Vec<_> = [EXTERNAL, OTHER_CLIENT]
            .iter()
            .map(|client| {
                let start = &start;
                s.spawn(move || {
                    tests::isolate_thread_netns();
                    (0..rounds)
                        .map(|i| {
                            let frame = packets::tcp(*client, SocketAddrV4::new(NODE_IP, 30_000 + i), true, false, &[]);
                            start.wait(u64::from(i));
                            bed.run(PROG_FROM_NETDEV, &frame).0
                        })
                        .collect()
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    })
}

#[test]
fn two_clients_racing_for_the_last_snat_port_never_both_get_it() {
    const ROUNDS: u16 = 600;
    let bed = ProgBed::new(&racing_objects(ROUNDS), ONE_PORT);
    let results = race(&bed, ROUNDS);
    let both = (0..ROUNDS as usize).filter(|&i| results[0][i] != TC_ACT_SHOT && results[1][i] != TC_ACT_SHOT).count();
    let neither =
        (0..ROUNDS as usize).filter(|&i| results[0][i] == TC_ACT_SHOT && results[1][i] == TC_ACT_SHOT).count();
    assert_eq!((both, neither), (0, 0), "rounds where both clients got the one port / neither did");
    assert!(results.iter().flatten().all(|&r| r == TC_ACT_OK || r == TC_ACT_SHOT || r == TC_ACT_REDIRECT));
    assert_eq!(bed.tdp.conntrack.connections().unwrap().len(), usize::from(ROUNDS), "one connection per port");
}

#[test]
fn two_cpus_taking_over_closed_ports_never_share_one_nor_refuse_a_client() {
    // Two SNAT ports, both held by connections that are over (reset after their SYN). Two clients
    // race for them, round after round: both searches pick the same port (the one idle longest) and
    // one CPU loses it. The loser must take the other port — not retry the stale candidate, nor take
    // a port that only looks free because the winner is rewriting it — and the winner must never have
    // its fresh claim deleted under it by the loser (two connections on one port).
    const ROUNDS: u16 = 600;
    let bed = ProgBed::new(&racing_objects(ROUNDS), (61_000, 61_001));
    let holders = [
        SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 1), 50_000),
        SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 2), 50_000),
    ];
    for i in 0..ROUNDS {
        let node_port = SocketAddrV4::new(NODE_IP, 30_000 + i);
        for holder in holders {
            let (ret, out) = bed.run(PROG_FROM_NETDEV, &packets::tcp(holder, node_port, true, false, &[]));
            assert_ne!(ret, TC_ACT_SHOT, "round {i}: a free port was not taken");
            assert_eq!(*inspect(&out).src.ip(), NODE_IP);
            bed.run(PROG_FROM_NETDEV, &packets::tcp_ts(holder, node_port, TCP_RST, 1, 0, 0));
        }
    }
    let before = bed.stats();
    let results = race(&bed, ROUNDS);
    let after = bed.stats();
    let reused = after[STAT_SNAT_REUSE_CLOSED as usize] - before[STAT_SNAT_REUSE_CLOSED as usize];
    let refused =
        (0..ROUNDS as usize).filter(|&i| results[0][i] == TC_ACT_SHOT || results[1][i] == TC_ACT_SHOT).count();
    // Every round's two new connections on two distinct ports.
    let conns = bed.tdp.conntrack.connections().unwrap();
    let shared = (0..ROUNDS)
        .filter(|&i| {
            let mut ports: Vec<u16> = conns
                .iter()
                .filter(|(k, e)| k.dport == port_to_map(30_000 + i) && e.state != CT_STATE_CLOSE)
                .map(|(_, e)| e.snat_port)
                .collect();
            let n = ports.len();
            ports.sort_unstable();
            ports.dedup();
            ports.len() != n
        })
        .count();
    assert_eq!(
        (refused, shared),
        (0, 0),
        "rounds with a client refused / with two connections on one port ({reused} ports taken over)"
    );
    assert_eq!(reused, 2 * u64::from(ROUNDS), "every new connection took over a closed port");
}

#[test]
fn a_full_table_displaces_unanswered_connections_never_assured_ones() {
    const MAX: u32 = 64;
    let mut bed = ProgBed::with_conntrack_max(OBJECTS, (61_000, 65_000), MAX);
    // Ten real connections: handshake completed.
    let real: Vec<SocketAddrV4> = (0..10).map(|i| SocketAddrV4::new(*POD.ip(), 41_000 + i)).collect();
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
    for c in &real {
        let out = inspect(&bed.run(PROG_FROM_POD, &packets::tcp(*c, vip, true, false, &[])).1);
        bed.expect(PROG_FROM_NETDEV, &packets::tcp(out.dst, *c, true, true, &[]), TC_ACT_OK, &[(STAT_REVERSE_NAT, 1)]);
        bed.expect(PROG_FROM_POD, &packets::tcp(*c, vip, false, true, &[]), TC_ACT_OK, &[(STAT_FORWARD_DNAT, 1)]);
    }
    // A SYN flood from spoofed sources to an externalTrafficPolicy Local NodePort, ten times the
    // table: the local backend answers every SYN, nobody on the spoofed side ever will.
    let before = bed.stats();
    let local = SocketAddrV4::new(NODE_IP, 30_081);
    for i in 0..640u32 {
        let src = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, (i % 250) as u8 + 1), 1024 + (i / 250) as u16);
        let (ret, out) = bed.run(PROG_FROM_NETDEV, &packets::tcp(src, local, true, false, &[]));
        assert_eq!(ret, TC_ACT_OK, "flood SYN {i} was not tracked");
        let seen = inspect(&out);
        assert_eq!(seen.src, src, "eTP Local keeps the source");
        let (ret, _) = bed.run(PROG_FROM_POD, &packets::tcp(seen.dst, src, true, true, &[]));
        assert_eq!(ret, TC_ACT_OK);
    }
    let after = bed.stats();
    let moved = |i: u32| after[i as usize] - before[i as usize];
    assert_eq!(moved(STAT_CT_NEW), 640);
    assert!(moved(STAT_CT_EARLY_DROP) >= 640 - u64::from(MAX), "{} displaced", moved(STAT_CT_EARLY_DROP));
    assert_eq!(moved(STAT_DROP_CT_FULL), 0);
    // Every real connection is still there and still translated.
    for c in &real {
        assert!(bed.tdp.conntrack.get(&key(*c, vip, PROTO_TCP)).is_some(), "{c} was evicted by the flood");
        let data = packets::tcp(*c, vip, false, true, b"GET /");
        bed.expect(PROG_FROM_POD, &data, TC_ACT_OK, &[(STAT_FORWARD_DNAT, 1)]);
    }
    // A new real connection still gets in during the flood.
    let late = SocketAddrV4::new(*POD.ip(), 42_000);
    let (ret, _) = bed.run(PROG_FROM_POD, &packets::tcp(late, vip, true, false, &[]));
    assert_eq!(ret, TC_ACT_OK);

    // A table full of assured connections has nothing to displace: the new one is a counted drop.
    bed.tdp.conntrack.clear().unwrap();
    for i in 0..MAX {
        let c = SocketAddrV4::new(*POD.ip(), 43_000 + i as u16);
        let out = inspect(&bed.run(PROG_FROM_POD, &packets::tcp(c, vip, true, false, &[])).1);
        bed.run(PROG_FROM_NETDEV, &packets::tcp(out.dst, c, true, true, &[]));
        bed.run(PROG_FROM_POD, &packets::tcp(c, vip, false, true, &[]));
    }
    assert!(bed.tdp.conntrack.connections().unwrap().iter().all(|(_, e)| e.flags & CT_F_ASSURED != 0));
    let one_more = SocketAddrV4::new(*POD.ip(), 44_000);
    bed.expect(PROG_FROM_POD, &packets::tcp(one_more, vip, true, false, &[]), TC_ACT_SHOT, &[(STAT_DROP_CT_FULL, 1)]);
    // The collector removes what is over: every connection reset, and 11 s later.
    for (orig, mut e) in bed.tdp.conntrack.connections().unwrap() {
        e.state = CT_STATE_CLOSE;
        bed.tdp.conntrack.insert(&orig, &e).unwrap();
    }
    assert!(now_ns() > 12_000_000_000, "needs an uptime over 12 s to age the connections");
    bed.age(11);
    let collected = bed.tdp.conntrack.collect(now_ns()).unwrap();
    assert_eq!((collected.alive, collected.dead), (0, MAX as usize));
    assert!(bed.tdp.conntrack.replies().unwrap().is_empty(), "reply tuples removed with their connections");
}

const FIN: u8 = 0x01;

/// A connection through the NodePort masqueraded to one of the two SNAT ports, closed by the
/// backend first (so the backend holds its tuple in TIME_WAIT), the client's last timestamp
/// `client_tsval`. Returns the SNAT port.
fn closed_by_the_backend(bed: &ProgBed, client: SocketAddrV4, client_tsval: u32) -> u16 {
    let out = bed.run(PROG_FROM_NETDEV, &packets::tcp_ts(client, NODE_PORT, SYN, 1000, 0, client_tsval - 10)).1;
    let snat = inspect(&out).src;
    bed.run(PROG_FROM_NETDEV, &packets::tcp_ts(BACKEND, snat, SYN | ACK, 5000, 1001, 1));
    bed.run(PROG_FROM_NETDEV, &packets::tcp_ts(client, NODE_PORT, ACK, 1001, 5001, client_tsval - 5));
    // The backend's FIN acknowledges nothing of a client FIN: it closes first.
    bed.run(PROG_FROM_NETDEV, &packets::tcp_ts(BACKEND, snat, FIN | ACK, 5001, 1001, 2));
    bed.run(PROG_FROM_NETDEV, &packets::tcp_ts(client, NODE_PORT, FIN | ACK, 1001, 5002, client_tsval));
    bed.run(PROG_FROM_NETDEV, &packets::tcp_ts(BACKEND, snat, ACK, 5002, 1002, 3));
    let e = bed.tdp.conntrack.get(&key(client, NODE_PORT, PROTO_TCP)).unwrap();
    assert_eq!(e.state, proxy_common::CT_STATE_TIME_WAIT);
    assert_ne!(e.flags & proxy_common::CT_F_BACKEND_TIME_WAIT, 0, "the backend closed first");
    assert_eq!((e.orig_end_seq, e.orig_tsval), (1002, client_tsval), "where the client ended");
    snat.port()
}

#[test]
fn a_closed_snat_port_is_reused_only_where_the_backends_time_wait_takes_the_new_syn() {
    // Two ports, both held by connections the backend closed first: one whose client's last
    // timestamp was 5000, one 9000. Clients randomize timestamps per connection; Linux in TIME_WAIT
    // takes a SYN only with a newer timestamp (or, without timestamps, a sequence number past the
    // old connection's end), and answers any other with an ACK (the client resets and retries a
    // second later).
    let mut bed = ProgBed::new(OBJECTS, (61_000, 61_001));
    let third = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 4), 50_000);
    for _ in 0..20 {
        let low = closed_by_the_backend(&bed, EXTERNAL, 5_000);
        let high = closed_by_the_backend(&bed, OTHER_CLIENT, 9_000);
        assert_ne!(low, high);
        // TSval 7000: only the tuple last used at 5000 takes it, whichever port the search starts at.
        let syn = packets::tcp_ts(third, NODE_PORT, SYN, 10, 0, 7_000);
        let before = bed.stats();
        let out = inspect(&bed.run(PROG_FROM_NETDEV, &syn).1);
        assert_eq!(out.src.port(), low, "the SYN was sent over the tuple its backend refuses");
        assert_eq!(bed.stats()[STAT_SNAT_REUSE_CLOSED as usize] - before[STAT_SNAT_REUSE_CLOSED as usize], 1);
        bed.tdp.conntrack.clear().unwrap();
    }
    closed_by_the_backend(&bed, EXTERNAL, 5_000);
    closed_by_the_backend(&bed, OTHER_CLIENT, 9_000);
    // A SYN older than both: no port is safe; it goes out on one anyway (a second's delay, not a
    // loss), counted.
    let old = packets::tcp_ts(third, NODE_PORT, SYN, 10, 0, 1_000);
    let before = bed.stats();
    assert_eq!(bed.run(PROG_FROM_NETDEV, &old).0, TC_ACT_OK);
    let moved = |i: u32| bed.stats()[i as usize] - before[i as usize];
    assert_eq!(moved(proxy_common::STAT_SNAT_REUSE_BACKEND_TIME_WAIT), 1);
}

#[test]
fn a_reopened_tuple_keeps_its_backend_time_wait_for_the_snat_port() {
    // The client reuses its own port at once (its side was not in TIME_WAIT): the connection is
    // replaced, but its SNAT tuple, which the backend still holds, is not handed out as free.
    let bed = ProgBed::new(OBJECTS, (61_000, 61_001));
    let port = closed_by_the_backend(&bed, EXTERNAL, 9_000);
    // The same client port opens a new connection: it gets a new SNAT port.
    let out = inspect(&bed.run(PROG_FROM_NETDEV, &packets::tcp_ts(EXTERNAL, NODE_PORT, SYN, 10, 0, 9_500)).1);
    assert_ne!(out.src.port(), port, "the reopened connection kept the tuple the backend holds");
    // A third connection with an older timestamp than the retired tuple's must not get it as free.
    let third = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 4), 50_000);
    let before = bed.stats();
    let out = inspect(&bed.run(PROG_FROM_NETDEV, &packets::tcp_ts(third, NODE_PORT, SYN, 10, 0, 1_000)).1);
    assert_eq!(out.src.port(), port, "only the retired tuple is left");
    assert_eq!(
        bed.stats()[proxy_common::STAT_SNAT_REUSE_BACKEND_TIME_WAIT as usize]
            - before[proxy_common::STAT_SNAT_REUSE_BACKEND_TIME_WAIT as usize],
        1,
        "taken as a tuple its backend still holds, not as a free one"
    );
}
