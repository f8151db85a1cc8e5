//! Live tests of ICMP errors through translated connections on a two-node cluster
//! (tests/src/cluster.rs): path MTU discovery across a 1,280-byte link on the far side of the
//! router, for bulk TCP through a NodePort and a ClusterIP, and ECONNREFUSED for UDP clients of a
//! closed backend port. Needs root; fails (never skips) without.

use std::{
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddrV4},
};

use proxy_common::{STAT_ICMP_ERROR_NAT, STAT_SNAT};
use tests::{
    client::{in_netns, udp_exchange},
    cluster::{Cluster, EXT_CLIENT, node_ip, node_name},
    k8s::{ready, service},
    proxy_binary,
    testbed::{LbMode, Netns, run, unique_id},
};

const FAR_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const BULK_BYTES: usize = 4 << 20;

fn stat(c: &Cluster, node: usize, index: u32) -> u64 {
    c.nodes[node].stats().expect("stats")[index as usize]
}

/// A client behind the external client's namespace, which routes for it: client —1500— ext
/// —1280— router. The client's own link is 1,500 bytes, so it offers an MSS of 1,460 and only path
/// MTU discovery (ICMP fragmentation needed from the router) can tell the servers to send less.
fn far_client(c: &Cluster) -> Netns {
    let far = Netns::new(format!("epx-{}-far", unique_id())).expect("far netns");
    c.ext.ip(&["link", "add", "far0", "type", "veth", "peer", "name", "eth0", "netns", &far.name]).unwrap();
    c.ext.ip(&["addr", "add", "198.51.100.1/24", "dev", "far0"]).unwrap();
    c.ext.ip(&["link", "set", "far0", "up"]).unwrap();
    c.ext.sysctl("net.ipv4.ip_forward", "1").unwrap();
    far.ip(&["addr", "add", &format!("{FAR_CLIENT}/24"), "dev", "eth0"]).unwrap();
    far.ip(&["link", "set", "eth0", "up"]).unwrap();
    far.ip(&["route", "add", "default", "via", "198.51.100.1"]).unwrap();
    // The narrow link, both ends.
    c.ext.ip(&["link", "set", "eth0", "mtu", "1280"]).unwrap();
    c.router.ip(&["link", "set", "ext0", "mtu", "1280"]).unwrap();
    c.router.ip(&["route", "add", "198.51.100.0/24", "via", &EXT_CLIENT.to_string()]).unwrap();
    far
}

fn cluster(objects: &str) -> Cluster {
    let mut c = Cluster::new(2, 1).expect("cluster");
    for node in &mut c.nodes {
        node.pods[0].start_nginx().expect("nginx");
    }
    c.write_objects("svc.yaml", objects).unwrap();
    c.start_proxies(&proxy_binary(), LbMode::Socket, &[]).expect("proxies");
    c
}

#[test]
fn bulk_tcp_through_a_node_port_and_a_cluster_ip_finds_the_path_mtu() {
    // The NodePort's backend is on node-b (node-a masquerades); the ClusterIP's on node-a itself.
    let (a, b) = (node_name(0), node_name(1));
    let objects = service(
        "far-np",
        "  type: NodePort\n  clusterIP: 10.96.0.30\n  ports: [{name: p, port: 80, nodePort: 30090}]",
        "",
        80,
        "TCP",
        &[ready(Ipv4Addr::new(10, 244, 2, 2), &b)],
    ) + &service(
        "near",
        "  clusterIP: 10.96.0.31\n  ports: [{name: p, port: 80}]",
        "",
        80,
        "TCP",
        &[ready(Ipv4Addr::new(10, 244, 1, 2), &a)],
    );
    let c = cluster(&objects);
    for node in &c.nodes {
        node.pods[0].serve_bulk(BULK_BYTES).unwrap();
    }
    c.route_to_node(Ipv4Addr::new(10, 96, 0, 31), 0).unwrap();
    let far = far_client(&c);
    let download = |url: &str| {
        run(far.command("curl").args(["-sS", "--fail", "-m", "30", "-o", "/dev/null", "-w", "%{size_download}", url]))
    };
    for url in [format!("http://{}:30090/bulk", node_ip(0)), "http://10.96.0.31/bulk".to_owned()] {
        let got =
            download(&url).unwrap_or_else(|e| panic!("{url}: the transfer never completed (a PMTU black hole): {e:#}"));
        assert_eq!(got.trim(), BULK_BYTES.to_string(), "{url}");
    }
    assert!(stat(&c, 0, STAT_SNAT) > 0, "the NodePort's connection was masqueraded");
    assert!(stat(&c, 0, STAT_ICMP_ERROR_NAT) >= 2, "each server learnt the path MTU through a translated error");
}

#[test]
fn udp_clients_of_a_closed_backend_port_get_connection_refused() {
    // Nothing listens on UDP 5353 in either pod: each backend's kernel answers port unreachable.
    let b = node_name(1);
    let objects = service(
        "closed",
        "  clusterIP: 10.96.0.32\n  ports: [{name: p, port: 53, protocol: UDP}]",
        "",
        5353,
        "UDP",
        &[ready(Ipv4Addr::new(10, 244, 2, 2), &b)],
    );
    let c = cluster(&objects);
    c.route_to_node(Ipv4Addr::new(10, 96, 0, 32), 0).unwrap();
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 32), 53);
    // From outside through node-a (masqueraded to node-b's pod), and from node-a's pod (the tc path:
    // the test's own thread is outside the socket programs' cgroup).
    for ns in [c.ext.name.clone(), c.nodes[0].pods[0].ns.name.clone()] {
        let result = in_netns(&ns, move || udp_exchange(vip)).join().unwrap();
        assert_eq!(
            result.as_ref().map_err(std::io::Error::kind).err(),
            Some(ErrorKind::ConnectionRefused),
            "from {ns}: {result:?}"
        );
    }
    assert!(stat(&c, 0, STAT_ICMP_ERROR_NAT) >= 2);
}
