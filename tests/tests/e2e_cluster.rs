//! Live tests on a two-node cluster in network namespaces (tests/src/cluster.rs): an external client
//! behind a router, each node running its own ebpf-proxy, nginx pods reporting the client address
//! they saw. One test per Service behaviour that needs more than one node or a real client outside.
//! Needs root; fails (never skips) without.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddrV4},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use proxy_common::{STAT_DROP_NO_LOCAL_ENDPOINTS, STAT_DROP_SOURCE_RANGE, STAT_SNAT, STAT_SOCK_UDP_CONNECT_TO_TC};
use tests::{
    client::{connect_in, in_netns, keepalive_request, request},
    cluster::{Cluster, EXT_CLIENT, EXT_CLIENT_2, StopFlag, node_ip, node_name, secondary_ip},
    k8s::{Ep, ready, service, terminating},
    proxy_binary,
    testbed::{LbMode, Proc, answered_by, client_seen, run, served_by},
};

/// A two-node cluster with `pods` nginx pods per node, proxies running.
fn cluster(pods: usize, mode: LbMode, objects: &[(&str, String)]) -> Cluster {
    let mut c = Cluster::new(2, pods).expect("cluster");
    for node in &mut c.nodes {
        for pod in &mut node.pods {
            pod.start_nginx().expect("nginx");
        }
    }
    for (file, yaml) in objects {
        c.write_objects(file, yaml).unwrap();
    }
    c.start_proxies(&proxy_binary(), mode, &[]).expect("proxies");
    c
}

fn pod_ip(c: &Cluster, node: usize, pod: usize) -> Ipv4Addr {
    c.nodes[node].pods[pod].ip
}

fn stat(c: &Cluster, node: usize, index: u32) -> u64 {
    c.nodes[node].stats().expect("stats")[index as usize]
}

#[test]
fn external_traffic_policy_local_keeps_the_source_and_cluster_masquerades_to_a_remote_pod() {
    let b = node_name(1);
    let mut c = Cluster::new(2, 1).expect("cluster");
    for node in &mut c.nodes {
        node.pods[0].start_nginx().unwrap();
    }
    let remote = c.nodes[1].pods[0].ip;
    let objects = [
        service(
            "local",
            "  type: LoadBalancer\n  clusterIP: 10.96.0.20\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32080\n  ports: [{name: p, port: 80, nodePort: 30080}]",
            "",
            80,
            "TCP",
            &[ready(remote, &b)],
        ),
        service(
            "cluster",
            "  type: NodePort\n  clusterIP: 10.96.0.21\n  ports: [{name: p, port: 80, nodePort: 30081}]",
            "",
            80,
            "TCP",
            &[ready(remote, &b)],
        ),
    ];
    c.write_objects("svc.yaml", &objects.concat()).unwrap();
    c.start_proxies(&proxy_binary(), LbMode::Socket, &[]).unwrap();

    // eTP Local on the node with the endpoint: the backend sees the external client itself.
    let body = c.ext_curl(EXT_CLIENT, &format!("http://{}:30080/", node_ip(1)), "3").expect("NodePort, eTP Local");
    assert!(client_seen(&body).unwrap().starts_with(&format!("{EXT_CLIENT}:")), "source not kept: {body}");
    // eTP Local on a node without one: dropped there, counted.
    let before = stat(&c, 0, STAT_DROP_NO_LOCAL_ENDPOINTS);
    assert!(c.ext_curl(EXT_CLIENT, &format!("http://{}:30080/", node_ip(0)), "1").is_err());
    assert!(stat(&c, 0, STAT_DROP_NO_LOCAL_ENDPOINTS) > before, "drop not counted on node-a");
    // eTP Cluster to the pod on the other node: masqueraded to node-a's address, reply restored.
    let snat_before = stat(&c, 0, STAT_SNAT);
    let body = c.ext_curl(EXT_CLIENT, &format!("http://{}:30081/", node_ip(0)), "3").expect("NodePort, eTP Cluster");
    assert!(client_seen(&body).unwrap().starts_with(&format!("{}:", node_ip(0))), "not masqueraded: {body}");
    assert!(stat(&c, 0, STAT_SNAT) > snat_before);
    // The same NodePort on node-a's secondary address.
    let body = c.ext_curl(EXT_CLIENT, &format!("http://{}:30081/", secondary_ip(0)), "3").expect("secondary address");
    assert_eq!(answered_by(&body), Some("pod-0"));

    // healthCheckNodePort: 200 with one local endpoint where it runs, 503 with none elsewhere.
    let hc = |k: usize| {
        let out = run(c.ext.command("curl").args([
            "-sS",
            "-m",
            "3",
            "-w",
            "\n%{http_code}",
            &format!("http://{}:32080/", node_ip(k)),
        ]))
        .expect("health check");
        let (body, code) = out.rsplit_once('\n').unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
        (code.to_owned(), v)
    };
    let (code, v) = hc(1);
    assert_eq!(code, "200", "{v}");
    assert_eq!(v["service"]["namespace"], "default");
    assert_eq!(v["service"]["name"], "local");
    assert_eq!(v["localEndpoints"], 1);
    let (code, v) = hc(0);
    assert_eq!((code.as_str(), &v["localEndpoints"]), ("503", &serde_json::json!(0)));
    for node in &mut c.nodes {
        node.stop_proxy().unwrap();
    }
}

#[test]
fn no_endpoints_is_rejected_at_once_not_timed_out() {
    let objects = [service(
        "empty",
        "  type: NodePort\n  clusterIP: 10.96.0.30\n  ports: [{name: p, port: 80, nodePort: 30090}]",
        "",
        80,
        "TCP",
        &[],
    )];
    let mut c = cluster(1, LbMode::Socket, &[("svc.yaml", objects.concat())]);
    // curl's exit code 7 is "failed to connect" (refused); 28 would be a timeout.
    let timed = |cmd: &mut std::process::Command| {
        let t = Instant::now();
        let out = cmd.output().unwrap();
        (out.status.code(), t.elapsed(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let cases = [
        (
            "external client → NodePort (tc, RST)",
            timed(c.ext.command("curl").args(["-sS", "-m", "10", &format!("http://{}:30090/", node_ip(0))])),
        ),
        (
            "pod → ClusterIP, tc path (RST)",
            timed(&mut c.nodes[0].pod_command("pod-0", false, "curl", &["-sS", "-m", "10", "http://10.96.0.30/"])),
        ),
        (
            "pod → ClusterIP, socket LB (connect refused)",
            timed(&mut c.nodes[0].pod_command("pod-0", true, "curl", &["-sS", "-m", "10", "http://10.96.0.30/"])),
        ),
    ];
    for (what, (code, elapsed, stderr)) in cases {
        assert_eq!(code, Some(7), "{what}: {stderr}");
        assert!(elapsed < Duration::from_secs(2), "{what}: took {elapsed:?} ({stderr})");
        println!("{what}: refused after {elapsed:?}");
    }
    for node in &mut c.nodes {
        node.stop_proxy().unwrap();
    }
}

#[test]
fn a_pod_reaches_itself_through_its_service_hairpin() {
    let a = node_name(0);
    let mut c = Cluster::new(2, 1).expect("cluster");
    c.nodes[0].pods[0].start_nginx().unwrap();
    let me = c.nodes[0].pods[0].ip;
    c.write_objects(
        "svc.yaml",
        &service("self", "  clusterIP: 10.96.0.40\n  ports: [{name: p, port: 80}]", "", 80, "TCP", &[ready(me, &a)]),
    )
    .unwrap();
    c.start_proxies(&proxy_binary(), LbMode::Socket, &[]).unwrap();
    // The tc path masquerades to the node's address (the pod would otherwise answer itself from its
    // own address); the socket path connects the pod to itself directly and keeps its source, where
    // kube-proxy would masquerade — the reply never leaves the pod, nothing to restore.
    for (in_cgroup, seen) in [(false, node_ip(0)), (true, me)] {
        let body = c.nodes[0].curl("pod-0", in_cgroup, "http://10.96.0.40/").expect("hairpin");
        assert_eq!(answered_by(&body), Some("pod-0"), "in cgroup: {in_cgroup}");
        println!("hairpin (socket LB {in_cgroup}): nginx saw {}", client_seen(&body).unwrap());
        assert!(client_seen(&body).unwrap().starts_with(&format!("{seen}:")), "{body}");
    }
    for node in &mut c.nodes {
        node.stop_proxy().unwrap();
    }
}

#[test]
fn session_affinity_sticks_within_the_timeout_and_expires_after_it() {
    let mut c = Cluster::new(2, 2).expect("cluster");
    for node in &mut c.nodes {
        for pod in &mut node.pods {
            pod.start_nginx().unwrap();
        }
    }
    let eps: Vec<Ep> =
        (0..2).flat_map(|k| (0..2).map(move |p| (k, p))).map(|(k, p)| ready(pod_ip(&c, k, p), &node_name(k))).collect();
    c.write_objects(
        "svc.yaml",
        &service(
            "sticky",
            "  type: NodePort\n  clusterIP: 10.96.0.50\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}\n  ports: [{name: p, port: 80, nodePort: 30050}]",
            "",
            80,
            "TCP",
            &eps,
        ),
    )
    .unwrap();
    c.start_proxies(&proxy_binary(), LbMode::Socket, &[]).unwrap();
    let url = format!("http://{}:30050/", node_ip(0));
    // Backends are told apart by the pod address they were reached on.
    let ask = || served_by(&c.ext_curl(EXT_CLIENT, &url, "3").expect("NodePort with affinity")).unwrap().to_owned();
    // Within the timeout: one backend for 20 connections in a row (without affinity: 4^-19).
    let first: BTreeSet<String> = (0..20).map(|_| ask()).collect();
    assert_eq!(first.len(), 1, "{first:?}");
    // The socket path from a pod in the cgroup sticks too.
    let pod_ask = || served_by(&c.nodes[1].curl("pod-0", true, "http://10.96.0.50/").unwrap()).unwrap().to_owned();
    let from_pod: BTreeSet<String> = (0..10).map(|_| pod_ask()).collect();
    assert_eq!(from_pod.len(), 1, "{from_pod:?}");
    // After the timeout each connection chooses afresh: 8 spaced-out connections do not all land
    // on one of the 4 backends (they would with expiry broken; by chance: 4^-7), on either path.
    let (spaced, spaced_pod): (BTreeSet<String>, BTreeSet<String>) = (0..8)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(1500));
            (ask(), pod_ask())
        })
        .unzip();
    assert!(spaced.len() > 1, "affinity never expired (tc path): {spaced:?}");
    assert!(spaced_pod.len() > 1, "affinity never expired (socket path): {spaced_pod:?}");
    for node in &mut c.nodes {
        node.stop_proxy().unwrap();
    }
}

#[test]
fn load_balancer_source_ranges_block_other_clients_but_not_the_node_port() {
    let b = node_name(1);
    let mut c = Cluster::new(2, 1).expect("cluster");
    c.nodes[1].pods[0].start_nginx().unwrap();
    let lb_ip = Ipv4Addr::new(198, 51, 100, 10);
    c.write_objects(
        "svc.yaml",
        &service(
            "lb",
            &format!("  type: LoadBalancer\n  clusterIP: 10.96.0.60\n  loadBalancerSourceRanges: [{EXT_CLIENT}/32]\n  ports: [{{name: p, port: 80, nodePort: 30060}}]"),
            &format!("status: {{loadBalancer: {{ingress: [{{ip: {lb_ip}}}]}}}}\n"),
            80,
            "TCP",
            &[ready(c.nodes[1].pods[0].ip, &b)],
        ),
    )
    .unwrap();
    c.start_proxies(&proxy_binary(), LbMode::Socket, &[]).unwrap();
    c.route_to_node(lb_ip, 0).unwrap();
    let body = c.ext_curl(EXT_CLIENT, &format!("http://{lb_ip}/"), "3").expect("allowed client");
    assert_eq!(answered_by(&body), Some("pod-0"));
    let before = stat(&c, 0, STAT_DROP_SOURCE_RANGE);
    assert!(c.ext_curl(EXT_CLIENT_2, &format!("http://{lb_ip}/"), "1").is_err(), "a client outside the ranges got in");
    assert!(stat(&c, 0, STAT_DROP_SOURCE_RANGE) > before, "source range drop not counted");
    // NodePorts are not filtered (as kube-proxy).
    c.ext_curl(EXT_CLIENT_2, &format!("http://{}:30060/", node_ip(0)), "3").expect("NodePort from any client");
    for node in &mut c.nodes {
        node.stop_proxy().unwrap();
    }
}

#[test]
fn rolling_update_under_a_request_loop_fails_no_request() {
    let (a, b) = (node_name(0), node_name(1));
    let mut c = Cluster::new(2, 2).expect("cluster");
    for node in &mut c.nodes {
        for pod in &mut node.pods {
            pod.start_nginx().unwrap();
        }
    }
    let spec = "  type: NodePort\n  clusterIP: 10.96.0.70\n  ports: [{name: p, port: 80, nodePort: 30070}]";
    let web = |eps: &[Ep]| service("web", spec, "", 80, "TCP", eps);
    let (old_a, old_b, new_a, new_b) = (pod_ip(&c, 0, 0), pod_ip(&c, 1, 0), pod_ip(&c, 0, 1), pod_ip(&c, 1, 1));
    c.write_objects("web.yaml", &web(&[ready(old_a, &a), ready(old_b, &b)])).unwrap();
    c.start_proxies(&proxy_binary(), LbMode::Socket, &[]).unwrap();

    // The external client loops on new connections to node-a's NodePort, bounded in count and time.
    let stop = StopFlag::default();
    let flag = stop.clone();
    let target = SocketAddrV4::new(node_ip(0), 30070);
    let client = in_netns(&c.ext.name, move || {
        let (mut ok, mut failed, mut answers) = (0usize, Vec::new(), Vec::new());
        let deadline = Instant::now() + Duration::from_secs(60);
        while !flag.stopped() && Instant::now() < deadline && ok + failed.len() < 20_000 {
            match request(target) {
                Ok(pod) => {
                    ok += 1;
                    answers.push(pod);
                }
                Err(e) => failed.push(e.to_string()),
            }
        }
        (ok, failed, answers)
    });
    // A kept-alive connection made before the update, to an old pod.
    let mut kept = connect_in(&c.ext.name, target);
    assert_eq!(keepalive_request(&mut kept), "pod-0");
    std::thread::sleep(Duration::from_millis(500));
    // 1. New pods ready, old ones terminating (still serving).
    c.write_objects(
        "web.yaml",
        &web(&[terminating(old_a, &a), terminating(old_b, &b), ready(new_a, &a), ready(new_b, &b)]),
    )
    .unwrap();
    c.wait_for_syncs(2).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(keepalive_request(&mut kept), "pod-0", "established connection to a terminating pod broken");
    // 2. Old ones removed; then their servers go away, as the pods are deleted.
    c.write_objects("web.yaml", &web(&[ready(new_a, &a), ready(new_b, &b)])).unwrap();
    c.wait_for_syncs(3).unwrap();
    // Until its pod is gone, the established connection keeps working.
    assert_eq!(keepalive_request(&mut kept), "pod-0", "established connection broken before its pod went away");
    drop(kept);
    std::thread::sleep(Duration::from_millis(200));
    for node in &mut c.nodes {
        node.pods[0].stop_nginx();
    }
    std::thread::sleep(Duration::from_millis(1000));
    stop.stop();
    let (ok, failed, answers) = client.join().unwrap();
    println!("rolling update: {ok} requests succeeded, {} failed", failed.len());
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 100, "only {ok} requests ran");
    // Both generations answered, and the last answers all come from the new pods.
    assert!(answers.iter().any(|p| p == "pod-0") && answers.iter().any(|p| p == "pod-1"));
    assert!(answers[answers.len() - 50..].iter().all(|p| p == "pod-1"), "old pods still answering at the end");
    for node in &mut c.nodes {
        node.stop_proxy().unwrap();
    }
}

/// A `udp-echo stream` client: one connected socket, one request per line written.
struct UdpStream {
    proc: Proc,
    out: BufReader<std::process::ChildStdout>,
}

impl UdpStream {
    fn start(mut cmd: std::process::Command) -> Self {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut proc = Proc::spawn(cmd, "udp-echo stream").unwrap();
        let out = BufReader::new(take_stdout(&mut proc.child));
        Self { proc, out }
    }

    /// One request; the answer line (`pod=… client=…`, or `timeout`).
    fn ask(&mut self) -> String {
        writeln!(self.proc.child.stdin.as_mut().unwrap(), "ping").unwrap();
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        line.trim().to_owned()
    }
}

fn take_stdout(child: &mut Child) -> std::process::ChildStdout {
    child.stdout.take().expect("stdout piped")
}

#[test]
fn udp_clients_keep_working_after_their_backend_is_replaced() {
    let b = node_name(1);
    let mut c = Cluster::new(2, 2).expect("cluster");
    let echo = env!("CARGO_BIN_EXE_udp-echo");
    let servers: Vec<Proc> = c.nodes[1]
        .pods
        .iter()
        .map(|p| {
            let mut cmd = p.ns.command(echo);
            cmd.args(["serve", &format!("{}-{}", b, p.name), "5353"]).stdout(Stdio::null());
            Proc::spawn(cmd, format!("udp-echo in {}", p.name)).unwrap()
        })
        .collect();
    let spec =
        "  type: NodePort\n  clusterIP: 10.96.0.53\n  ports: [{name: p, port: 53, nodePort: 30053, protocol: UDP}]";
    let dns = |ep: Ipv4Addr| service("dns", spec, "", 5353, "UDP", &[ready(ep, &b)]);
    let (old, new) = (pod_ip(&c, 1, 0), pod_ip(&c, 1, 1));
    c.write_objects("dns.yaml", &dns(old)).unwrap();
    c.start_proxies(&proxy_binary(), LbMode::Socket, &[]).unwrap();

    // A pod on node-a and node-a itself in the cgroup (connected sockets to the ClusterIP), and the
    // external client through node-a's NodePort (masqueraded to the remote pod).
    let mut clients = [
        (
            "pod (socket LB)",
            UdpStream::start(c.nodes[0].pod_command("pod-0", true, echo, &["stream", "10.96.0.53:53"])),
        ),
        (
            "node-a itself (socket LB)",
            UdpStream::start(c.nodes[0].node_command(true, echo, &["stream", "10.96.0.53:53"])),
        ),
        (
            "external client (NodePort)",
            UdpStream::start({
                let mut cmd = c.ext.command(echo);
                cmd.args(["stream", &format!("{}:30053", node_ip(0))]);
                cmd
            }),
        ),
    ];
    for (what, client) in &mut clients {
        for _ in 0..3 {
            let a = client.ask();
            assert!(a.starts_with(&format!("pod={b}-pod-0 ")), "{what}: {a}");
        }
    }
    // The backend is replaced: new endpoint, then the old server is gone.
    c.write_objects("dns.yaml", &dns(new)).unwrap();
    c.wait_for_syncs(2).unwrap();
    let mut servers = servers;
    drop(servers.remove(0));
    // The same sockets keep working, every request answered by the new backend.
    for (what, client) in &mut clients {
        for _ in 0..5 {
            let a = client.ask();
            assert!(a.starts_with(&format!("pod={b}-pod-1 ")), "{what} after the replacement: {a}");
        }
    }
    assert!(c.nodes[0].proxy_log_text().contains("purged UDP flows"), "{}", c.nodes[0].proxy_log_text());
    // The pod's and the node's connect() were left to the tc path, whose conntrack can be purged.
    assert!(stat(&c, 0, STAT_SOCK_UDP_CONNECT_TO_TC) >= 2);
    drop(clients);
    for node in &mut c.nodes {
        node.stop_proxy().unwrap();
    }
}

/// The address the backend saw for a request, without the port.
fn seen_ip(body: &str) -> Ipv4Addr {
    client_seen(body).and_then(|c| c.split(':').next()).and_then(|a| a.parse().ok()).unwrap_or_else(|| panic!("{body}"))
}

#[test]
fn masquerade_only_where_the_reply_needs_it_and_everywhere_with_masquerade_all() {
    // Where kube-proxy masquerades but the reply comes back through this node anyway, ebpf-proxy keeps
    // the client's address (tests/kube_proxy_flows says why, case by case); with --masquerade-all
    // every path masquerades, as the operator asked. What the backends saw, on a live node.
    let (a, b) = (node_name(0), node_name(1));
    let mut c = Cluster::new(2, 1).expect("cluster");
    for node in &mut c.nodes {
        node.pods[0].start_nginx().unwrap();
    }
    let (local, remote, pod) = (pod_ip(&c, 0, 0), pod_ip(&c, 1, 0), pod_ip(&c, 0, 0));
    let objects = [
        service(
            "web",
            "  type: LoadBalancer\n  clusterIP: 10.96.0.60\n  externalIPs: [198.51.100.40]\n  ports: [{name: p, port: 80, nodePort: 30090}]",
            "status:\n  loadBalancer:\n    ingress: [{ip: 198.51.100.41}]\n",
            80,
            "TCP",
            &[ready(remote, &b)],
        ),
        service(
            "here",
            "  type: NodePort\n  clusterIP: 10.96.0.61\n  ports: [{name: p, port: 80, nodePort: 30091}]",
            "",
            80,
            "TCP",
            &[ready(local, &a)],
        ),
    ];
    c.write_objects("svc.yaml", &objects.concat()).unwrap();
    let from_pod =
        |c: &Cluster, in_cgroup: bool, url: &str| seen_ip(&c.nodes[0].curl("pod-0", in_cgroup, url).expect(url));
    let from_outside =
        |c: &Cluster| seen_ip(&c.ext_curl(EXT_CLIENT, &format!("http://{}:30091/", node_ip(0)), "3").unwrap());
    let pod_paths = ["http://192.168.0.2:30090/", "http://198.51.100.41/", "http://198.51.100.40/"];

    c.start_proxies(&proxy_binary(), LbMode::Socket, &[]).unwrap();
    for url in pod_paths {
        // pod → NodePort, LB IP, externalIP with the backend on the other node: kube-proxy masquerades;
        // the reply returns through node-a anyway, so the pod's address is kept.
        assert_eq!(from_pod(&c, false, url), pod, "{url}");
    }
    // External client → a backend on the node it came in on: kept (kube-proxy masquerades).
    assert_eq!(from_outside(&c), EXT_CLIENT);
    for node in &mut c.nodes {
        node.stop_proxy().unwrap();
    }

    c.start_proxies(&proxy_binary(), LbMode::Socket, &["--masquerade-all"]).unwrap();
    for url in pod_paths.into_iter().chain(["http://10.96.0.60/"]) {
        assert_eq!(from_pod(&c, false, url), node_ip(0), "--masquerade-all, tc path: {url}");
        // The socket path hands a pod's connection to the tc path, which masquerades it.
        assert_eq!(from_pod(&c, true, url), node_ip(0), "--masquerade-all, socket path: {url}");
    }
    assert_eq!(from_outside(&c), node_ip(0), "--masquerade-all, external client");
    assert!(stat(&c, 0, proxy_common::STAT_SOCK_MASQUERADE_TO_TC) >= 4);
    for node in &mut c.nodes {
        node.stop_proxy().unwrap();
    }
}
