//! Live tests of every path a reply can take, on a two-node cluster (tests/src/cluster.rs): a
//! hostNetwork backend answering from the node's own stack (behind a ClusterIP and an
//! externalTrafficPolicy Local NodePort); replies arriving through a VXLAN tunnel and through an L3
//! tunnel device without link-layer header; strict rp_filter on every interface, with a LoadBalancer
//! IP the node itself holds. Needs root; fails (never skips) without.

use std::net::{Ipv4Addr, SocketAddrV4};

use proxy_common::{STAT_FORWARD_DNAT, STAT_REVERSE_NAT};
use tests::{
    client::{in_netns, request},
    cluster::{Cluster, EXT_CLIENT, Tunnel, node_ip, node_name},
    k8s::{ready, service},
    proxy_binary,
    testbed::{LbMode, answered_by, start_nginx},
};

fn stat(c: &Cluster, node: usize, index: u32) -> u64 {
    c.nodes[node].stats().expect("stats")[index as usize]
}

fn cluster(objects: &str) -> Cluster {
    let mut c = Cluster::new(2, 1).expect("cluster");
    for node in &mut c.nodes {
        node.pods[0].start_nginx().expect("nginx");
    }
    c.write_objects("svc.yaml", objects).unwrap();
    c
}

/// `n` requests to `to` from inside namespace `ns` (the test's own thread: outside the socket
/// programs' cgroup, so the tc path translates them); the pods that answered.
fn requests_from(ns: &str, to: SocketAddrV4, n: usize) -> Vec<String> {
    in_netns(ns, move || (0..n).map(|i| request(to).unwrap_or_else(|e| panic!("request {i} to {to}: {e}"))).collect())
        .join()
        .unwrap()
}

fn ext_requests(c: &Cluster, to: SocketAddrV4, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let body =
                c.ext_curl(EXT_CLIENT, &format!("http://{to}/"), "3").unwrap_or_else(|e| panic!("{i}: {to}: {e:#}"));
            answered_by(&body).unwrap().to_owned()
        })
        .collect()
}

#[test]
fn a_host_network_backend_answers_through_a_cluster_ip_and_a_local_node_port() {
    // An ingress controller or the API server: the endpoint is node-a's own address.
    let a = node_name(0);
    let objects = service(
        "hostnet",
        "  type: NodePort\n  externalTrafficPolicy: Local\n  clusterIP: 10.96.0.40\n  ports: [{name: p, port: 80, nodePort: 30085}]",
        "",
        8081,
        "TCP",
        &[ready(node_ip(0), &a)],
    );
    let mut c = cluster(&objects);
    let dir = c.nodes[0].work.0.join("host-nginx");
    let _host = start_nginx(&c.nodes[0].ns, &dir, "host-a", SocketAddrV4::new(node_ip(0), 8081)).expect("host nginx");
    c.start_proxies(&proxy_binary(), LbMode::Socket, &[]).expect("proxies");
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 40), 80);
    // The reply leaves from node-a's own stack: only its egress program can restore it.
    for (who, ns) in [
        ("a pod on node-a", c.nodes[0].pods[0].ns.name.clone()),
        ("a pod on node-b", c.nodes[1].pods[0].ns.name.clone()),
    ] {
        let answered = requests_from(&ns, vip, 5);
        assert!(answered.iter().all(|p| p == "host-a"), "{who}: {answered:?}");
    }
    // Socket path: the backend's address from the start.
    let body = c.nodes[0].curl("pod-0", true, &format!("http://{vip}/")).expect("socket path");
    assert_eq!(answered_by(&body), Some("host-a"));
    let answered = ext_requests(&c, SocketAddrV4::new(node_ip(0), 30085), 5);
    assert!(answered.iter().all(|p| p == "host-a"), "external client: {answered:?}");
    assert!(stat(&c, 0, STAT_REVERSE_NAT) >= 10, "node-a restored the replies of its own socket");
}

#[test]
fn strict_rp_filter_everywhere_and_a_load_balancer_ip_the_node_holds() {
    let (a, b) = (node_name(0), node_name(1));
    let lb_ip = Ipv4Addr::new(198, 51, 100, 80);
    let objects = service(
        "strict",
        "  type: LoadBalancer\n  clusterIP: 10.96.0.41\n  ports: [{name: p, port: 80, nodePort: 30086}]",
        &format!("status:\n  loadBalancer: {{ingress: [{{ip: {lb_ip}}}]}}\n"),
        80,
        "TCP",
        &[ready(Ipv4Addr::new(10, 244, 1, 2), &a), ready(Ipv4Addr::new(10, 244, 2, 2), &b)],
    );
    let mut c = cluster(&objects);
    c.start_proxies(&proxy_binary(), LbMode::Socket, &[]).expect("proxies");
    // RHEL's default, on every interface (the effective value is the larger of `all` and the
    // interface's own); node-a also holds the LB IP itself, as kube-vip or keepalived would.
    for node in &c.nodes {
        node.ns.sysctl("net.ipv4.conf.all.rp_filter", "1").unwrap();
    }
    c.nodes[0].ns.ip(&["addr", "add", &format!("{lb_ip}/32"), "dev", "eth0"]).unwrap();
    c.route_to_node(lb_ip, 0).unwrap();
    let pods = ["pod-0".to_owned()];
    let reached = requests_from(&c.nodes[0].pods[0].ns.name, SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 41), 80), 20);
    assert!(reached.iter().any(|p| pods.contains(p)), "the local backend answered through the ClusterIP: {reached:?}");
    let reached = ext_requests(&c, SocketAddrV4::new(node_ip(0), 30086), 20);
    assert!(reached.iter().any(|p| pods.contains(p)), "the local backend answered through the NodePort: {reached:?}");
    let reached = ext_requests(&c, SocketAddrV4::new(lb_ip, 80), 20);
    assert!(reached.iter().any(|p| pods.contains(p)), "the local backend answered through the LB IP: {reached:?}");
}

#[test]
fn replies_through_a_vxlan_tunnel_and_an_l3_tunnel_device_are_restored() {
    let b = node_name(1);
    let objects = service(
        "far",
        "  type: NodePort\n  clusterIP: 10.96.0.42\n  ports: [{name: p, port: 80, nodePort: 30087}]",
        "",
        80,
        "TCP",
        &[ready(Ipv4Addr::new(10, 244, 2, 2), &b)],
    );
    for kind in [Tunnel::Vxlan, Tunnel::Tun] {
        let mut c = cluster(&objects);
        let (dev, _relay) = c.tunnel_pods(kind).expect("tunnel");
        c.start_proxies(&proxy_binary(), LbMode::Socket, &["--interfaces", "eth0", "--interfaces", dev])
            .expect("proxies");
        assert!(c.nodes[0].proxy_log_text().contains(if kind == Tunnel::Tun {
            "attached from_l3dev"
        } else {
            "attached from_netdev (ingress) and from_node (egress) to vx0"
        }));
        // Socket path first: the tunnel itself carries pod traffic.
        let body = c.nodes[0].curl("pod-0", true, "http://10.96.0.42/").unwrap_or_else(|e| panic!("{kind:?}: {e:#}"));
        assert_eq!(answered_by(&body), Some("pod-0"));
        let dnat = stat(&c, 0, STAT_FORWARD_DNAT);
        eprintln!("{kind:?}: tc path");
        let answered =
            requests_from(&c.nodes[0].pods[0].ns.name, SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 42), 80), 10);
        assert_eq!(answered.len(), 10, "{kind:?}");
        assert!(stat(&c, 0, STAT_FORWARD_DNAT) > dnat, "{kind:?}: the tc path translated");
        let answered = ext_requests(&c, SocketAddrV4::new(node_ip(0), 30087), 10);
        assert_eq!(answered.len(), 10, "{kind:?}");
    }
}
