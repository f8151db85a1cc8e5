//! Live end-to-end tests: a node in network namespaces with nginx pods and a client pod, ebpf-proxy
//! running in the node namespace, real curl and real sockets. Needs root; fails (never skips) without.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    process::Stdio,
    time::Duration,
};

use proxy_common::{STAT_CT_NEW, STAT_FORWARD_DNAT, STAT_FRAGMENT_NAT, STAT_REVERSE_NAT, STAT_SOCK_CONNECT};
use tests::{
    client::{connect_in, keepalive_request},
    proxy_binary,
    testbed::{LbMode, Node, Proc, answered_by, client_seen, run, service_yaml, slice_yaml},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const UDP_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);

/// A node with `backends` nginx pods (pod-0..) and a client pod, a Service `web` on VIP:80 over all
/// backends, and the proxy running in `mode`.
fn node_with_service(backends: usize, mode: LbMode) -> Node {
    let mut node = Node::new(backends).expect("testbed node");
    for pod in &mut node.pods {
        pod.start_nginx().expect("nginx");
    }
    node.add_pod("client").expect("client pod");
    let ips: Vec<_> = node.pods[..backends].iter().map(|p| p.ip).collect();
    node.write_objects(
        "web.yaml",
        &(service_yaml("web", VIP, 80, "TCP") + "---\n" + &slice_yaml("web", 80, "TCP", &ips)),
    )
    .unwrap();
    node.start_proxy(&proxy_binary(), mode).expect("proxy");
    node
}

/// curls the Service `n` times from the client and returns the set of pods that answered.
fn pods_reached(node: &Node, in_cgroup: bool, n: usize) -> BTreeSet<String> {
    let client_ip = node.pod("client").ip.to_string();
    (0..n)
        .map(|_| {
            let body = node.curl("client", in_cgroup, &format!("http://{VIP}/")).expect("curl through the ClusterIP");
            let seen = client_seen(&body).expect("client address in answer");
            assert!(seen.starts_with(&format!("{client_ip}:")), "backend saw {seen}, not the client pod");
            answered_by(&body).expect("pod name in answer").to_owned()
        })
        .collect()
}

fn all_backends(n: usize) -> BTreeSet<String> {
    (0..n).map(|i| format!("pod-{i}")).collect()
}

#[test]
fn socket_lb_reaches_every_backend() {
    let mut node = node_with_service(3, LbMode::Socket);
    assert_eq!(pods_reached(&node, true, 30), all_backends(3));
    // connect() was translated: no packet needed the tc path.
    let stats = node.stats().unwrap();
    assert_eq!(stats[STAT_SOCK_CONNECT as usize], 30, "{stats:?}");
    assert_eq!(stats[STAT_FORWARD_DNAT as usize], 0, "{stats:?}");
    // The application still sees the Service as its peer (getpeername), as with kube-proxy's DNAT.
    let out =
        run(&mut node.pod_command("client", true, env!("CARGO_BIN_EXE_sockname"), &["tcp", &format!("{VIP}:80")]))
            .expect("sockname");
    assert_eq!(out.trim(), format!("peer={VIP}:80"), "a socket-LB connection names its backend as peer");
    node.stop_proxy().unwrap();
}

#[test]
fn tc_path_alone_reaches_every_backend() {
    let mut node = node_with_service(3, LbMode::TcOnly);
    // Clients in the cgroup too: with --socket-lb=false nothing is attached there.
    assert_eq!(pods_reached(&node, true, 30), all_backends(3));
    let stats = node.stats().unwrap();
    assert_eq!(stats[STAT_CT_NEW as usize], 30, "{stats:?}");
    assert_eq!(stats[STAT_SOCK_CONNECT as usize], 0, "{stats:?}");
    assert!(stats[STAT_REVERSE_NAT as usize] >= 30, "{stats:?}");
    node.stop_proxy().unwrap();
    // Stopping detaches everything and unpins the maps: the Service address is gone.
    assert!(!node.bpffs.path.exists(), "pins left behind");
    assert!(node.curl("client", false, &format!("http://{VIP}/")).is_err(), "ClusterIP still answers after shutdown");
}

fn udp_node(mode: LbMode) -> (Node, Vec<Proc>) {
    let mut node = Node::new(2).expect("testbed node");
    node.add_pod("client").unwrap();
    let echo = env!("CARGO_BIN_EXE_udp-echo");
    let servers = node.pods[..2]
        .iter()
        .map(|p| {
            let mut c = p.ns.command(echo);
            c.args(["serve", &p.name, "5353"]).stdout(Stdio::null());
            Proc::spawn(c, format!("udp-echo in {}", p.name)).unwrap()
        })
        .collect();
    let ips: Vec<_> = node.pods[..2].iter().map(|p| p.ip).collect();
    node.write_objects(
        "dns.yaml",
        &(service_yaml("dns", UDP_VIP, 53, "UDP") + "---\n" + &slice_yaml("dns", 5353, "UDP", &ips)),
    )
    .unwrap();
    node.start_proxy(&proxy_binary(), mode).unwrap();
    (node, servers)
}

/// Sends `n` UDP requests from the client and checks every answer comes from the Service address.
fn udp_ask(node: &Node, in_cgroup: bool, connect: bool, n: usize) -> BTreeSet<String> {
    let echo = env!("CARGO_BIN_EXE_udp-echo");
    let mut args = vec!["ask".to_owned(), format!("{UDP_VIP}:53"), n.to_string()];
    if connect {
        args.push("connect".into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run(&mut node.pod_command("client", in_cgroup, echo, &args)).expect("UDP request/response");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), n, "{out}");
    lines
        .iter()
        .map(|l| {
            assert!(l.starts_with(&format!("from={UDP_VIP}:53 ")), "answer not from the Service address: {l}");
            if connect {
                assert!(l.contains(&format!("peer={UDP_VIP}:53 ")), "getpeername shows the backend: {l}");
            }
            answered_by(l).unwrap().to_owned()
        })
        .collect()
}

#[test]
fn udp_request_response_through_cluster_ip_tc_path() {
    let (mut node, _servers) = udp_node(LbMode::TcOnly);
    // One socket, several datagrams: one flow, one backend (as conntrack pins it).
    assert_eq!(udp_ask(&node, false, false, 5).len(), 1);
    // New sockets spread over both backends.
    let reached: BTreeSet<_> = (0..20).flat_map(|_| udp_ask(&node, false, false, 1)).collect();
    assert_eq!(reached, all_backends(2));
    node.stop_proxy().unwrap();
}

#[test]
fn udp_request_response_through_cluster_ip_socket_lb() {
    let (mut node, _servers) = udp_node(LbMode::Socket);
    assert_eq!(udp_ask(&node, true, false, 5).len(), 1, "sendmsg flow sticks to one backend");
    assert_eq!(udp_ask(&node, true, true, 5).len(), 1, "connected socket talks to one backend");
    let reached: BTreeSet<_> = (0..20).flat_map(|_| udp_ask(&node, true, false, 1)).collect();
    assert_eq!(reached, all_backends(2));
    node.stop_proxy().unwrap();
}

#[test]
fn a_4000_byte_udp_question_and_answer_cross_a_cluster_ip_on_both_paths() {
    // MTU 1500 everywhere: both datagrams travel as three IP fragments (as a large DNS answer over
    // UDP with EDNS does).
    let (mut node, _servers) = udp_node(LbMode::Socket);
    let echo = env!("CARGO_BIN_EXE_udp-echo");
    for in_cgroup in [false, true] {
        let vip = format!("{UDP_VIP}:53");
        let args = ["ask", vip.as_str(), "3", "bytes=4000"];
        let out = run(&mut node.pod_command("client", in_cgroup, echo, &args))
            .unwrap_or_else(|e| panic!("in_cgroup={in_cgroup}: no answer to a 4,000-byte question: {e:#}"));
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        for l in lines {
            assert!(l.starts_with(&format!("from={UDP_VIP}:53 ")) && l.contains(" bytes=4000 "), "{l}");
        }
    }
    // The tc path translated the later fragments as their first (the socket path's datagrams carry
    // the backend's address from the start).
    let stats = node.stats().unwrap();
    assert!(stats[STAT_FRAGMENT_NAT as usize] >= 12, "{stats:?}");
    node.stop_proxy().unwrap();
}

#[test]
fn removing_an_endpoint_keeps_established_connections_to_the_others() {
    let mut node = node_with_service(3, LbMode::TcOnly);
    let client_ns = node.pod("client").ns.name.clone();
    // An established connection; note its backend.
    let mut conn = connect_in(&client_ns, SocketAddrV4::new(VIP, 80));
    let kept = keepalive_request(&mut conn);
    // Remove another endpoint.
    let removed = all_backends(3).into_iter().find(|p| *p != kept).unwrap();
    let remaining: Vec<_> = node.pods[..3].iter().filter(|p| p.name != removed).map(|p| p.ip).collect();
    node.write_objects(
        "web.yaml",
        &(service_yaml("web", VIP, 80, "TCP") + "---\n" + &slice_yaml("web", 80, "TCP", &remaining)),
    )
    .unwrap();
    node.wait_for_syncs(2).unwrap();
    let reached = pods_reached(&node, false, 30);
    assert!(!reached.contains(&removed), "new connections still reach {removed}: {reached:?}");
    assert_eq!(reached.len(), 2);
    // The established connection still works, to the same backend.
    for _ in 0..5 {
        assert_eq!(keepalive_request(&mut conn), kept);
    }
    node.stop_proxy().unwrap();
}

#[test]
fn pod_interfaces_are_attached_as_they_appear() {
    let mut node = node_with_service(1, LbMode::TcOnly);
    // A new backend pod appears after the proxy started.
    let pod = node.add_pod("late").unwrap();
    pod.start_nginx().unwrap();
    let late_ip = pod.ip;
    let log_has = |node: &Node, s: &str| node.proxy_log_text().contains(s);
    tests::testbed::wait_for(Duration::from_secs(5), || log_has(&node, &node.pod("late").host_if))
        .expect("proxy attached to the new interface");
    let ips = vec![node.pods[0].ip, late_ip];
    node.write_objects(
        "web.yaml",
        &(service_yaml("web", VIP, 80, "TCP") + "---\n" + &slice_yaml("web", 80, "TCP", &ips)),
    )
    .unwrap();
    node.wait_for_syncs(2).unwrap();
    // Through the tc path alone, replies from the late pod are reverse-translated only if the proxy
    // attached to its interface.
    let reached = pods_reached(&node, false, 30);
    assert!(reached.contains("late"), "{reached:?}");
    node.stop_proxy().unwrap();
}

/// A node whose proxy ran with --keep-datapath and has exited (SIGTERM): its programs and maps still
/// at work, as the DaemonSet leaves a node on a rollout.
fn datapath_left_running(mode: LbMode) -> Node {
    let mut node = node_with_service(2, mode);
    node.stop_proxy().unwrap();
    node.proxy_args = vec!["--keep-datapath".into()];
    node.start_proxy(&proxy_binary(), mode).unwrap();
    node.stop_proxy().unwrap();
    node
}

#[test]
fn keep_datapath_leaves_services_working_and_the_next_run_adopts_it() {
    let mut node = datapath_left_running(LbMode::TcOnly);
    let links = node.bpffs.path.join("links");
    let instances: Vec<_> = std::fs::read_dir(&links).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(instances.len(), 1, "one instance's links");
    let pinned = std::fs::read_dir(&instances[0]).map(|d| d.count()).unwrap_or(0);
    assert_eq!(pinned, 7, "an ingress and an egress link per pod interface, lo's egress, under {}", links.display());
    // No process runs, yet the Service works: pinned programs and maps.
    assert_eq!(pods_reached(&node, false, 20), all_backends(2));
    // The next run adopts the maps (no entry rewritten) and replaces the pinned links.
    node.proxy_args.clear();
    std::fs::write(&node.proxy_log, "").unwrap();
    node.start_proxy(&proxy_binary(), LbMode::TcOnly).unwrap();
    let log = node.proxy_log_text();
    assert!(log.contains("adopting 1 frontends"), "{log}");
    assert!(log.contains("0 entries written, 0 deleted"), "{log}");
    // Ingress and egress of 3 pod interfaces, egress of lo (no socket programs in this mode).
    assert!(log.contains("released 7 links"), "{log}");
    assert!(!instances[0].exists(), "the earlier instance's links are gone");
    assert_eq!(pods_reached(&node, false, 20), all_backends(2));
    node.stop_proxy().unwrap();
    assert!(!node.bpffs.path.exists());
}

#[test]
fn rolling_back_removes_the_kept_datapath_and_its_reserved_ports() {
    let node = datapath_left_running(LbMode::Socket);
    assert_eq!(pods_reached(&node, true, 20), all_backends(2), "socket path, no process");
    assert_eq!(pods_reached(&node, false, 20), all_backends(2), "tc path, no process");
    let reserved = || run(node.ns.command("cat").arg("/proc/sys/net/ipv4/ip_local_reserved_ports")).unwrap();
    assert!(reserved().contains("61000-65535"), "{}", reserved());
    let cleanup = |extra: &[&str]| {
        let mut cmd = node.ns.command(proxy_binary());
        cmd.args(["cleanup", "--ebpf-proxy", "--bpffs"]).arg(&node.bpffs.path).args(extra);
        run(&mut cmd).expect("cleanup --ebpf-proxy")
    };
    // A dry run lists everything and changes nothing.
    let plan = cleanup(&["--dry-run"]);
    // 4 socket programs; ingress and egress of 3 pod interfaces; lo's egress.
    assert_eq!(plan.lines().filter(|l| l.starts_with("would detach")).count(), 11, "{plan}");
    assert!(plan.contains("would remove") && plan.contains("/CONNTRACK"), "{plan}");
    assert!(plan.contains("would release the reserved ports 61000-65535"), "{plan}");
    assert_eq!(pods_reached(&node, true, 20), all_backends(2), "unchanged by the dry run");
    assert!(reserved().contains("61000-65535"));
    // The real run: programs detached, pins and ports gone, the ClusterIP no longer translated.
    let done = cleanup(&[]);
    assert_eq!(done.lines().filter(|l| l.starts_with("detached")).count(), 11, "{done}");
    assert!(!node.bpffs.path.exists(), "{} still there", node.bpffs.path.display());
    assert!(!reserved().contains("61000-65535"), "{}", reserved());
    for in_cgroup in [true, false] {
        let out =
            node.pod_command("client", in_cgroup, "curl", &["-sS", "-m", "2", &format!("http://{VIP}/")]).output();
        assert!(!out.unwrap().status.success(), "the ClusterIP still answers (socket path: {in_cgroup})");
    }
    assert!(cleanup(&[]).contains("nothing pinned"), "a second run finds nothing");
}

#[test]
fn pinned_maps_of_another_layout_are_refused_and_left_working() {
    use aya::maps::{Array, Map, MapData};
    let mut node = datapath_left_running(LbMode::TcOnly);
    // As an older or newer release would have left them: its layout recorded as another.
    let pin = node.bpffs.path.join("LAYOUT");
    let mut layout: Array<MapData, u32> = Array::try_from(Map::Array(MapData::from_pin(&pin).unwrap())).unwrap();
    assert_eq!(layout.get(&0, 0).unwrap(), proxy_common::MAP_LAYOUT, "the layout is recorded");
    layout.set(0, &(proxy_common::MAP_LAYOUT + 1), 0).unwrap();
    let args = node.proxy_command(LbMode::TcOnly);
    node.spawn_proxy_unready(&proxy_binary(), &args, &[]).unwrap();
    let status = node.wait_proxy_exit(Duration::from_secs(10)).expect("it refuses at once");
    assert!(!status.success());
    let log = node.proxy_log_text();
    let want =
        format!("have layout {}; this build reads layout {}", proxy_common::MAP_LAYOUT + 1, proxy_common::MAP_LAYOUT);
    assert!(log.contains(&want) && log.contains("cleanup --ebpf-proxy"), "{log}");
    // What it refused is left as it was, and still serves.
    assert_eq!(layout.get(&0, 0).unwrap(), proxy_common::MAP_LAYOUT + 1);
    assert_eq!(pods_reached(&node, false, 20), all_backends(2));
}

#[test]
fn pins_from_before_layouts_were_recorded_are_adopted_as_layout_1() {
    let mut node = datapath_left_running(LbMode::TcOnly);
    // What the release before this one pins: neither LAYOUT nor CT_LEASES.
    for name in ["LAYOUT", "CT_LEASES"] {
        std::fs::remove_file(node.bpffs.path.join(name)).unwrap();
    }
    std::fs::write(&node.proxy_log, "").unwrap();
    node.proxy_args.clear();
    node.start_proxy(&proxy_binary(), LbMode::TcOnly).unwrap();
    let log = node.proxy_log_text();
    assert!(log.contains("adopting 1 frontends") && log.contains("0 entries written, 0 deleted"), "{log}");
    assert!(node.bpffs.path.join("LAYOUT").exists() && node.bpffs.path.join("CT_LEASES").exists());
    assert_eq!(pods_reached(&node, false, 20), all_backends(2));
}

/// Runs `ebpf-proxy trace --json` against the objects of `node`.
fn trace(node: &Node, src: &str, dst: &str, proto: &str) -> serde_json::Value {
    let out =
        run(std::process::Command::new(proxy_binary()).arg("trace").arg("--objects").arg(&node.objects_dir).args([
            "--node-name",
            "node-a",
            "--node-ip",
            "192.168.50.2",
            "--cluster-cidr",
            "10.244.0.0/16",
            "--proto",
            proto,
            "--src",
            src,
            "--dst",
            dst,
            "--json",
        ]))
        .expect("trace");
    assert_eq!(out.lines().count(), 1, "exactly one JSON object: {out}");
    serde_json::from_str(&out).expect("JSON")
}

#[test]
fn trace_reports_every_backend_passes_other_traffic_and_names_drop_reasons() {
    let node = Node::new(0).unwrap();
    let eps = [Ipv4Addr::new(10, 244, 1, 2), Ipv4Addr::new(10, 244, 1, 3), Ipv4Addr::new(10, 244, 1, 4)];
    node.write_objects(
        "objs.yaml",
        &[
            service_yaml("web", VIP, 80, "TCP"),
            slice_yaml("web", 8080, "TCP", &eps),
            service_yaml("dns", UDP_VIP, 53, "UDP"),
            slice_yaml("dns", 5353, "UDP", &eps[..1]),
            service_yaml("empty", Ipv4Addr::new(10, 96, 0, 99), 80, "TCP"),
        ]
        .join("---\n"),
    )
    .unwrap();
    let t = trace(&node, "10.244.1.9", "10.96.0.10:80", "tcp");
    assert_eq!(
        t,
        serde_json::json!({"verdict": "forward", "program": "from_pod", "reason": null, "backends": [
            {"addr": "10.244.1.2:8080", "masquerade": false},
            {"addr": "10.244.1.3:8080", "masquerade": false},
            {"addr": "10.244.1.4:8080", "masquerade": false}]})
    );
    let t = trace(&node, "10.244.1.9", "10.96.0.53:53", "udp");
    assert_eq!(t["backends"], serde_json::json!([{"addr": "10.244.1.2:5353", "masquerade": false}]));
    let t = trace(&node, "203.0.113.2", "10.96.0.10:80", "tcp");
    assert_eq!((t["verdict"].as_str(), t["program"].as_str()), (Some("forward"), Some("from_netdev")));
    let t = trace(&node, "10.244.1.9", "10.244.1.2:8080", "tcp");
    assert_eq!(t, serde_json::json!({"verdict": "pass", "backends": [], "program": "from_pod", "reason": null}));
    // A port or protocol the ClusterIP does not serve, and a Service without endpoints: rejected.
    for (dst, proto) in [("10.96.0.10:81", "tcp"), ("10.96.0.10:80", "udp"), ("10.96.0.99:80", "tcp")] {
        let t = trace(&node, "10.244.1.9", dst, proto);
        assert_eq!(t, serde_json::json!({"verdict": "reject", "backends": [], "program": "from_pod", "reason": null}));
    }
}
