//! Live tests of the connection table on a two-node cluster (tests/src/cluster.rs) under the traffic
//! real nodes meet: clients that abort after the handshake, handshakes nobody finishes, and a SYN flood
//! from spoofed sources larger than the table while real connections sit idle. Needs root; fails
//! (never skips) without.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    time::{Duration, Instant},
};

use ebpf_proxy::conntrack::{ConntrackMaps, monotonic_ns};
use proxy_common::{
    STAT_CT_EARLY_DROP, STAT_DROP_SNAT_EXHAUSTED, STAT_SNAT, STAT_SNAT_REUSE_CLOSED, STAT_SNAT_REUSE_UNANSWERED,
    addr_to_map, ct_alive,
};
use tests::{
    client::{connect_and_reset, in_netns, send_syns},
    cluster::{Cluster, EXT_CLIENT, node_ip, node_name},
    k8s::{ready, service},
    proxy_binary,
    testbed::{LbMode, answered_by, run, wait_for},
};

fn stat(c: &Cluster, node: usize, index: u32) -> u64 {
    c.nodes[node].stats().expect("stats")[index as usize]
}

/// Live connections node `node` tracks from `client`.
fn live_from(c: &Cluster, node: usize, client: Ipv4Addr) -> usize {
    let maps = ConntrackMaps::pinned(&c.nodes[node].bpffs.path).expect("pinned conntrack");
    let now = monotonic_ns();
    let client = addr_to_map(client.octets());
    maps.connections().unwrap().iter().filter(|(k, e)| k.saddr == client && ct_alive(e, k.proto, now)).count()
}

/// A two-node cluster, one nginx pod per node, `objects` programmed, proxies started with `extra`.
fn cluster(objects: &str, extra: &[&str]) -> Cluster {
    let mut c = Cluster::new(2, 1).expect("cluster");
    for node in &mut c.nodes {
        node.pods[0].start_nginx().expect("nginx");
    }
    c.write_objects("svc.yaml", objects).unwrap();
    c.start_proxies(&proxy_binary(), LbMode::Socket, extra).expect("proxies");
    c
}

#[test]
fn aborted_and_unfinished_connections_through_a_node_port_give_their_snat_ports_back() {
    // externalTrafficPolicy Cluster to the pod on node-b: node-a masquerades every connection from
    // the default SNAT range (61000-65535, 4536 ports towards that one backend).
    let b = node_name(1);
    // Node k's pod i is 10.244.<k+1>.<2+i>.
    let backend = Ipv4Addr::new(10, 244, 2, 2);
    let objects = service(
        "web",
        "  type: NodePort\n  clusterIP: 10.96.0.20\n  ports: [{name: p, port: 80, nodePort: 30080}]",
        "",
        80,
        "TCP",
        &[ready(backend, &b)],
    );
    let c = cluster(&objects, &["--conntrack-gc-interval", "1s"]);
    assert_eq!(c.nodes[1].pods[0].ip, backend);
    let node_port = SocketAddrV4::new(node_ip(0), 30_080);
    let curl = || c.ext_curl(EXT_CLIENT, &format!("http://{node_port}/"), "10");

    // 5,000 clients complete the handshake and abort with a RST: more than the port range.
    let snat_before = stat(&c, 0, STAT_SNAT);
    let failed = in_netns(&c.ext.name, move || (0..5_000).filter(|_| connect_and_reset(node_port).is_err()).count())
        .join()
        .unwrap();
    assert_eq!(failed, 0, "aborted connections could not even connect");
    assert!(stat(&c, 0, STAT_SNAT) - snat_before >= 5_000, "every one masqueraded");
    assert!(stat(&c, 0, STAT_SNAT_REUSE_CLOSED) > 0, "ports of reset connections were never reused");
    assert_eq!(stat(&c, 0, STAT_DROP_SNAT_EXHAUSTED), 0);
    // A normal connection right after gets a port and an answer.
    assert!(answered_by(&curl().expect("a normal connection after 5,000 resets")).is_some());
    // Reset connections are gone after their 10 s (the collector runs every second).
    wait_for(Duration::from_secs(20), || live_from(&c, 0, EXT_CLIENT) <= 1)
        .unwrap_or_else(|_| panic!("{} connections from the client still tracked", live_from(&c, 0, EXT_CLIENT)));

    // 5,000 handshakes nobody finishes: raw SYNs, and the client's kernel must not answer the
    // SYN-ACKs with a RST (a scanner or a spoofed source never does).
    run(c.ext.command("nft").args(["add table ip epx; add chain ip epx out { type filter hook output priority 0; }; add rule ip epx out tcp flags rst drop"])).expect("nft");
    let started = Instant::now();
    in_netns(&c.ext.name, move || {
        send_syns(|i| SocketAddrV4::new(EXT_CLIENT, 20_000 + i as u16), node_port, 5_000, 5_000)
    })
    .join()
    .unwrap()
    .expect("SYNs sent");
    run(c.ext.command("nft").args(["delete table ip epx"])).expect("nft");
    wait_for(Duration::from_secs(5), || live_from(&c, 0, EXT_CLIENT) >= 4_000).expect("the SYNs are tracked");
    // Their ports are held for a handshake's round trip, then yielded to real connections.
    std::thread::sleep(Duration::from_secs(3).saturating_sub(started.elapsed()));
    assert!(answered_by(&curl().expect("a normal connection after 5,000 unfinished handshakes")).is_some());
    assert!(stat(&c, 0, STAT_SNAT_REUSE_UNANSWERED) + stat(&c, 0, STAT_SNAT_REUSE_CLOSED) > 0);
    // And they are gone a minute after their last packet (the backend's SYN-ACK retransmissions).
    wait_for(Duration::from_secs(120), || live_from(&c, 0, EXT_CLIENT) <= 1)
        .unwrap_or_else(|_| panic!("{} unfinished handshakes still tracked", live_from(&c, 0, EXT_CLIENT)));
    assert!(answered_by(&curl().expect("a normal connection at the end")).is_some());
}

/// One HTTP request on a kept-alive connection: whether a 200 came back.
fn request_ok(s: &mut TcpStream) -> bool {
    if s.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 512];
    matches!(s.read(&mut buf), Ok(n) if n > 0 && buf.starts_with(b"HTTP/1.1 200"))
}

#[test]
fn a_syn_flood_several_times_the_table_breaks_no_idle_connection() {
    // externalTrafficPolicy Local to the pod on node-a: the flood reaches a live backend, which
    // answers every SYN (the case where an LRU table evicts idle connections).
    let a = node_name(0);
    let backend = Ipv4Addr::new(10, 244, 1, 2);
    let objects = service(
        "web",
        "  type: NodePort\n  clusterIP: 10.96.0.20\n  externalTrafficPolicy: Local\n  ports: [{name: p, port: 80, nodePort: 30080}]",
        "",
        80,
        "TCP",
        &[ready(backend, &a)],
    );
    const TABLE: u32 = 2_048;
    let c = cluster(&objects, &["--conntrack-max", &TABLE.to_string()]);
    assert_eq!(c.nodes[0].pods[0].ip, backend);
    let node_port = SocketAddrV4::new(node_ip(0), 30_080);

    // Ten real connections, kept alive and idle through the flood.
    let mut idle: Vec<TcpStream> = in_netns(&c.ext.name, move || {
        (0..10)
            .map(|_| {
                let mut s = TcpStream::connect_timeout(&node_port.into(), Duration::from_secs(3)).expect("connect");
                s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                assert!(request_ok(&mut s));
                s
            })
            .collect()
    })
    .join()
    .unwrap();

    // Spoofed SYNs from 198.51.100.0/24, 60,000 over a minute: thirty times the table.
    let flood = in_netns(&c.ext.name, move || {
        send_syns(
            |i| SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 1 + (i % 250) as u8), 1024 + (i / 250) as u16),
            node_port,
            60_000,
            1_000,
        )
    });
    // New connections still get in while it lasts: the flood's unanswered ones make room.
    std::thread::sleep(Duration::from_secs(30));
    let during = c.ext_curl(EXT_CLIENT, &format!("http://{node_port}/"), "5");
    flood.join().unwrap().expect("flood sent");
    assert!(during.is_ok(), "a new connection during the flood failed: {during:?}");
    assert!(stat(&c, 0, STAT_CT_EARLY_DROP) > 50_000, "the flood did not overfill the table");

    // Every idle connection still answers.
    let ok = idle.iter_mut().map(request_ok).filter(|ok| *ok).count();
    assert_eq!(ok, 10, "idle connections broken by the flood");
    assert!(answered_by(&c.ext_curl(EXT_CLIENT, &format!("http://{node_port}/"), "5").unwrap()).is_some());
}
