//! Live tests of the node's own traffic — a kubelet, a hostNetwork pod, a node agent — reaching
//! Services, with and without socket-level load balancing, on a two-node cluster
//! (tests/src/cluster.rs). The client runs in node-a's own namespace, with strict rp_filter on every
//! interface of node-a: each kind of frontend behaves as kube-proxy's OUTPUT chains make it behave
//! (ClusterIP, NodePort on the node's own addresses, an externalIP, a LoadBalancer IP the node holds
//! itself, LoadBalancer source ranges that hold the primary node IP and ones that do not,
//! externalTrafficPolicy Local short-circuiting to the cluster-wide set, internalTrafficPolicy Local
//! without a local endpoint dropping, no endpoints rejecting, a hostNetwork backend on the node
//! itself, UDP). Needs root; fails (never skips) without.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    process::Stdio,
    time::{Duration, Instant},
};

use proxy_common::{
    STAT_CT_NEW, STAT_DROP_NO_LOCAL_ENDPOINTS, STAT_DROP_SOURCE_RANGE, STAT_REJECT, STAT_SOCK_CONNECT, STAT_SOCK_REJECT,
};
use tests::{
    cluster::{Cluster, node_ip, node_name, secondary_ip},
    k8s::{ready, service},
    proxy_binary,
    testbed::{LbMode, Proc, answered_by, client_seen, run, served_by, start_nginx},
};

const WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 70);
const WEB_NODE_PORT: u16 = 30_070;
/// An externalIP of `web`, routed to the router (the node does not hold it).
const WEB_EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 70);
/// `web`'s LoadBalancer IP, which node-a holds itself (kube-vip, keepalived): on its `lo`.
const WEB_LB_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 71);
const EDGE_NODE_PORT: u16 = 30_071;
const ITP_LOCAL: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 72);
const RANGED_LB_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 73);
const CLOSED_LB_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 74);
const EMPTY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 75);
const HOSTNET: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 76);
const DNS: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 77);
/// Requests per frontend: P(one of two backends never chosen) = 2 · 2^-20.
const N: usize = 20;

fn objects() -> String {
    let (a, b) = (node_name(0), node_name(1));
    let (pod_a, pod_b) = (Ipv4Addr::new(10, 244, 1, 2), Ipv4Addr::new(10, 244, 2, 2));
    let both = [ready(pod_a, &a), ready(pod_b, &b)];
    [
        service(
            "web",
            &format!(
                "  type: LoadBalancer\n  clusterIP: {WEB}\n  externalIPs: [{WEB_EXTERNAL_IP}]\n  ports: [{{name: p, port: 80, nodePort: {WEB_NODE_PORT}}}]"
            ),
            &format!("status: {{loadBalancer: {{ingress: [{{ip: {WEB_LB_IP}}}]}}}}\n"),
            80,
            "TCP",
            &both,
        ),
        // externalTrafficPolicy Local with its only endpoint on node-b: the node's own traffic
        // short-circuits to the cluster-wide set.
        service(
            "edge",
            &format!(
                "  type: NodePort\n  externalTrafficPolicy: Local\n  clusterIP: 10.96.0.71\n  ports: [{{name: p, port: 80, nodePort: {EDGE_NODE_PORT}}}]"
            ),
            "",
            80,
            "TCP",
            &[ready(pod_b, &b)],
        ),
        service(
            "itp",
            &format!("  clusterIP: {ITP_LOCAL}\n  internalTrafficPolicy: Local\n  ports: [{{name: p, port: 80}}]"),
            "",
            80,
            "TCP",
            &[ready(pod_b, &b)],
        ),
        service(
            "ranged",
            &format!(
                "  type: LoadBalancer\n  clusterIP: 10.96.0.73\n  loadBalancerSourceRanges: [{}/32]\n  ports: [{{name: p, port: 80, nodePort: 30073}}]",
                node_ip(0)
            ),
            &format!("status: {{loadBalancer: {{ingress: [{{ip: {RANGED_LB_IP}}}]}}}}\n"),
            80,
            "TCP",
            &both,
        ),
        service(
            "closed",
            "  type: LoadBalancer\n  clusterIP: 10.96.0.74\n  loadBalancerSourceRanges: [203.0.113.0/25]\n  ports: [{name: p, port: 80, nodePort: 30074}]",
            &format!("status: {{loadBalancer: {{ingress: [{{ip: {CLOSED_LB_IP}}}]}}}}\n"),
            80,
            "TCP",
            &both,
        ),
        service("empty", &format!("  clusterIP: {EMPTY}\n  ports: [{{name: p, port: 80}}]"), "", 80, "TCP", &[]),
        // A hostNetwork backend on node-a itself (an ingress controller, the API server).
        service(
            "hostnet",
            &format!("  clusterIP: {HOSTNET}\n  ports: [{{name: p, port: 80}}]"),
            "",
            8081,
            "TCP",
            &[ready(node_ip(0), &a)],
        ),
        service("dns", &format!("  clusterIP: {DNS}\n  ports: [{{name: p, port: 53, protocol: UDP}}]"), "", 5353, "UDP", &both),
    ]
    .concat()
}

/// The cluster, with nginx (and a UDP echo server) in each node's pod, nginx on node-a's own address,
/// node-a holding `web`'s LoadBalancer IP, strict rp_filter on every interface of node-a, and the
/// proxies running in `mode`.
fn cluster(mode: LbMode) -> (Cluster, Vec<Proc>) {
    let mut c = Cluster::new(2, 1).expect("cluster");
    let echo = env!("CARGO_BIN_EXE_udp-echo");
    let mut procs = Vec::new();
    for node in &mut c.nodes {
        node.pods[0].start_nginx().expect("nginx");
        let pod = &node.pods[0];
        let mut cmd = pod.ns.command(echo);
        cmd.args(["serve", &format!("{}-{}", node.name, pod.name), "5353"]).stdout(Stdio::null());
        procs.push(Proc::spawn(cmd, "udp-echo").expect("udp-echo"));
    }
    let dir = c.nodes[0].work.0.join("host-nginx");
    procs.push(start_nginx(&c.nodes[0].ns, &dir, "host-a", SocketAddrV4::new(node_ip(0), 8081)).expect("host nginx"));
    c.nodes[0].ns.ip(&["addr", "add", &format!("{WEB_LB_IP}/32"), "dev", "lo"]).unwrap();
    for key in ["all", "default", "eth0"] {
        c.nodes[0].ns.sysctl(&format!("net.ipv4.conf.{key}.rp_filter"), "1").unwrap();
    }
    c.write_objects("svc.yaml", &objects()).unwrap();
    c.start_proxies(&proxy_binary(), mode, &[]).expect("proxies");
    (c, procs)
}

fn stat(c: &Cluster, index: u32) -> u64 {
    c.nodes[0].stats().expect("stats")[index as usize]
}

/// `n` requests from node-a's own namespace to `url`, each on a new connection (one curl process);
/// the answers' lines (`pod=… server=… client=…`).
fn ask(c: &Cluster, in_cgroup: bool, url: &str, n: usize) -> Vec<String> {
    let mut args = vec!["-sS", "--fail", "-m", "3", "-H", "Connection: close"];
    args.extend(std::iter::repeat_n(url, n));
    let out = run(&mut c.nodes[0].node_command(in_cgroup, "curl", &args)).unwrap_or_else(|e| panic!("{url}: {e:#}"));
    let lines: Vec<String> = out.lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), n, "{url}: {out}");
    lines
}

/// The backends (server addresses) that answered.
fn servers(lines: &[String]) -> BTreeSet<String> {
    lines.iter().map(|l| served_by(l).expect("server=").to_owned()).collect()
}

/// The client addresses the backends saw.
fn clients_seen(lines: &[String]) -> BTreeSet<String> {
    lines.iter().map(|l| client_seen(l).expect("client=").split(':').next().unwrap().to_owned()).collect()
}

/// A curl from node-a that must fail: its exit code and how long it took.
fn refused(c: &Cluster, in_cgroup: bool, url: &str, timeout_s: &str) -> (Option<i32>, Duration) {
    let t = Instant::now();
    let out = c.nodes[0].node_command(in_cgroup, "curl", &["-sS", "-m", timeout_s, url]).output().unwrap();
    (out.status.code(), t.elapsed())
}

/// Every kind of frontend from node-a's own namespace; `socket_lb`: the client is in the cgroup of
/// the socket programs (which then translate what they can at connect()).
fn the_node_reaches_every_kind_of_frontend(mode: LbMode) {
    let socket_lb = mode == LbMode::Socket;
    let (c, _procs) = cluster(mode);
    let both: BTreeSet<String> = ["10.244.1.2", "10.244.2.2"].map(String::from).into();
    // node-a's addresses: its two node IPs, and its side of the pod network (the source the kernel
    // picks towards its own pods).
    let node_a: BTreeSet<String> =
        [node_ip(0), secondary_ip(0), c.nodes[0].pod_gateway()].map(|a| a.to_string()).into();

    // ClusterIP, NodePort on the node's own addresses, an externalIP, the LoadBalancer IP it holds:
    // every backend, here and on node-b. The backends see a node-a address: the source is kept
    // where it is node-a's, translated to it where it is not routable (the LB IP on lo).
    let (ct, sock) = (stat(&c, STAT_CT_NEW), stat(&c, STAT_SOCK_CONNECT));
    for url in [
        format!("http://{WEB}/"),
        format!("http://{}:{WEB_NODE_PORT}/", node_ip(0)),
        format!("http://{}:{WEB_NODE_PORT}/", secondary_ip(0)),
        format!("http://{WEB_EXTERNAL_IP}/"),
        format!("http://{WEB_LB_IP}/"),
    ] {
        let lines = ask(&c, socket_lb, &url, N);
        assert_eq!(servers(&lines), both, "{url}");
        let seen = clients_seen(&lines);
        assert!(seen.is_subset(&node_a), "{url}: backends saw {seen:?}");
    }
    // Which program did it: the connect hook with socket LB, else the tc program at egress.
    let (ct_new, sock_new) = (stat(&c, STAT_CT_NEW) - ct, stat(&c, STAT_SOCK_CONNECT) - sock);
    if socket_lb {
        assert!(sock_new >= 5 * N as u64, "socket path: {sock_new} connect() translated");
    } else {
        assert!(
            ct_new >= 5 * N as u64 && sock_new == 0,
            "tc path: {ct_new} connections tracked, {sock_new} by sockets"
        );
    }

    // externalTrafficPolicy Local, endpoint only on node-b: the node's own traffic uses the
    // cluster-wide set, as kube-proxy short-circuits it.
    let lines = ask(&c, socket_lb, &format!("http://{}:{EDGE_NODE_PORT}/", node_ip(0)), 5);
    assert_eq!(servers(&lines), ["10.244.2.2".to_owned()].into());

    // A hostNetwork backend on node-a itself.
    let lines = ask(&c, socket_lb, &format!("http://{HOSTNET}/"), 5);
    assert!(lines.iter().all(|l| answered_by(l) == Some("host-a")), "{lines:?}");

    // Source ranges holding the primary node IP let the node in, through the tc program (the socket
    // path leaves ranges to it), whichever backend; ranges that do not hold it keep it out.
    let ct = stat(&c, STAT_CT_NEW);
    let lines = ask(&c, socket_lb, &format!("http://{RANGED_LB_IP}/"), N);
    assert_eq!(servers(&lines), both);
    assert!(stat(&c, STAT_CT_NEW) - ct >= N as u64, "the ranges are checked at egress");
    let drops = stat(&c, STAT_DROP_SOURCE_RANGE);
    let (code, _) = refused(&c, socket_lb, &format!("http://{CLOSED_LB_IP}/"), "2");
    assert_eq!(code, Some(28), "a source outside the ranges times out (dropped)");
    assert!(stat(&c, STAT_DROP_SOURCE_RANGE) > drops, "drop_source_range counted");

    // internalTrafficPolicy Local without a local endpoint: dropped, as kube-proxy drops it.
    let drops = stat(&c, STAT_DROP_NO_LOCAL_ENDPOINTS);
    let (code, _) = refused(&c, socket_lb, &format!("http://{ITP_LOCAL}/"), "2");
    assert_eq!(code, Some(28), "internalTrafficPolicy Local without a local endpoint times out");
    assert!(stat(&c, STAT_DROP_NO_LOCAL_ENDPOINTS) > drops, "drop_no_local_endpoints counted");

    // No endpoints: refused at once — EPERM from connect() with socket LB, a RST delivered to the
    // node's socket by the egress program without.
    let rejects = stat(&c, if socket_lb { STAT_SOCK_REJECT } else { STAT_REJECT });
    let (code, took) = refused(&c, socket_lb, &format!("http://{EMPTY}/"), "10");
    assert_eq!(code, Some(7), "no endpoints: connection refused");
    assert!(took < Duration::from_secs(2), "refused in {took:?}, not after a timeout");
    assert!(stat(&c, if socket_lb { STAT_SOCK_REJECT } else { STAT_REJECT }) > rejects);

    // UDP from the node (its resolver asking a DNS Service): every answer from the Service address,
    // with an unconnected and a connected socket; a socket is one flow with one backend, so it takes
    // a socket per question to see both.
    let echo = env!("CARGO_BIN_EXE_udp-echo");
    for connect in [false, true] {
        let mut answered = BTreeSet::new();
        for _ in 0..N {
            let mut args = vec!["ask", "10.96.0.77:53", "2"];
            if connect {
                args.push("connect");
            }
            let out = run(&mut c.nodes[0].node_command(socket_lb, echo, &args)).expect("UDP from the node");
            for l in out.lines() {
                assert!(l.starts_with(&format!("from={DNS}:53 ")), "answer not from the Service address: {l}");
                answered.insert(answered_by(l).unwrap().to_owned());
            }
        }
        assert_eq!(answered, ["node-a-pod-0", "node-b-pod-0"].map(String::from).into(), "connect={connect}");
    }
}

#[test]
fn the_node_reaches_every_kind_of_frontend_with_socket_lb() {
    the_node_reaches_every_kind_of_frontend(LbMode::Socket);
}

#[test]
fn the_node_reaches_every_kind_of_frontend_without_socket_lb() {
    the_node_reaches_every_kind_of_frontend(LbMode::TcOnly);
}
