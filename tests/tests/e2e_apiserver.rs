//! ebpf-proxy watching an API server (tests/src/apiserver.rs, the real HTTP API) through a
//! kubeconfig, in the single-node testbed: changes reach the datapath, malformed and foreign objects
//! are skipped while the rest works, watch cuts and an expired resourceVersion (410) are survived
//! without flushing the datapath, under a client loop that must see no failure.
//! Needs root; fails (never skips) without.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use tests::{
    apiserver::{ApiServer, Kind},
    client::{connect_in, in_netns, keepalive_request, request},
    cluster::StopFlag,
    proxy_binary,
    testbed::{LbMode, Node, answered_by, run, service_yaml, slice_yaml, wait_for},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// A node with `backends` nginx pods and a client pod, an API server holding the Service `web` over
/// the first `serving` pods, and the proxy watching it.
fn node_with_api(backends: usize, serving: usize, mode: LbMode) -> (Node, ApiServer) {
    let mut node = Node::new(backends).expect("testbed node");
    for pod in &mut node.pods {
        pod.start_nginx().unwrap();
    }
    node.add_pod("client").unwrap();
    let api = ApiServer::start(&node.ns.name).expect("test API server");
    api.apply(&web(&node, serving)).unwrap();
    let kubeconfig = node.work.0.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    node.proxy_args = vec!["--kubeconfig".into(), kubeconfig.display().to_string()];
    node.start_proxy(&proxy_binary(), mode).expect("proxy watching the API server");
    (node, api)
}

/// The Service and its slice over the first `n` pods.
fn web(node: &Node, n: usize) -> String {
    let ips: Vec<_> = node.pods[..n].iter().map(|p| p.ip).collect();
    service_yaml("web", VIP, 80, "TCP") + "---\n" + &slice_yaml("web", 80, "TCP", &ips)
}

fn reached(node: &Node, n: usize) -> BTreeSet<String> {
    (0..n)
        .map(|_| answered_by(&node.curl("client", true, &format!("http://{VIP}/")).unwrap()).unwrap().to_owned())
        .collect()
}

fn pods(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn frontends(node: &Node) -> Vec<String> {
    let out =
        run(std::process::Command::new(proxy_binary()).args(["services", "--json", "--bpffs"]).arg(&node.bpffs.path))
            .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array().unwrap().iter().map(|r| r["frontend"].as_str().unwrap().to_owned()).collect()
}

#[test]
fn api_changes_reach_the_datapath_and_malformed_or_foreign_objects_are_skipped() {
    let (mut node, api) = node_with_api(3, 2, LbMode::Socket);
    assert_eq!(reached(&node, 20), pods(&["pod-0", "pod-1"]));
    assert_eq!((api.requests(Kind::Service, false), api.requests(Kind::EndpointSlice, false)), (1, 1), "one list each");
    assert!(api.requests(Kind::Node, true) >= 1, "the Node is watched");

    // An update: a third endpoint.
    api.apply(&web(&node, 3)).unwrap();
    node.wait_for_syncs(2).unwrap();
    assert_eq!(reached(&node, 30), pods(&["pod-0", "pod-1", "pod-2"]));

    // Malformed Services — an address out of range, port 0, the same port twice, an unknown protocol,
    // an IPv6 address on this IPv4-only proxy — and one for another proxy: skipped, the rest works.
    let bad = |name: &str, ip: &str, ports: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
             spec: {{type: ClusterIP, clusterIP: \"{ip}\", ports: {ports}}}\n"
        )
    };
    let malformed = [
        bad("bad-ip", "10.96.0.300", "[{name: p, port: 80}]"),
        bad("port-zero", "10.96.0.21", "[{name: p, port: 0}]"),
        bad("duplicate-port", "10.96.0.22", "[{name: a, port: 80}, {name: b, port: 80}]"),
        bad("unknown-protocol", "10.96.0.23", "[{name: p, port: 80, protocol: QUIC}]"),
        bad("ipv6", "fd00::23", "[{name: p, port: 80}]"),
    ];
    for m in &malformed {
        api.apply(m).unwrap();
    }
    api.apply(&service_yaml("other", Ipv4Addr::new(10, 96, 0, 12), 80, "TCP").replace(
        "namespace: default}",
        "namespace: default, labels: {service.kubernetes.io/service-proxy-name: other}}",
    ))
    .unwrap();
    wait_for(Duration::from_secs(10), || node.proxy_log_text().contains("Service default/ipv6 skipped")).unwrap();
    let log = node.proxy_log_text();
    for name in ["bad-ip", "port-zero", "duplicate-port", "unknown-protocol", "ipv6"] {
        assert!(log.contains(&format!("Service default/{name} skipped")), "{name} not reported:\n{log}");
    }
    let metrics = run(node.ns.command("curl").args(["-sS", "http://127.0.0.1:10249/metrics"])).unwrap();
    assert!(metrics.contains("ebpf_proxy_skipped_objects{kind=\"Service\"} 5"), "{metrics}");
    // Changes after the initial list: the five malformed Services (web was re-applied unchanged — a
    // no-op, not counted — and the other proxy's Service is never even listed), and web's slice update.
    assert!(metrics.contains("kubeproxy_sync_proxy_rules_service_changes_total 5"), "{metrics}");
    assert!(metrics.contains("kubeproxy_sync_proxy_rules_endpoint_changes_total 1"), "{metrics}");
    let fe = frontends(&node);
    assert!(!fe.iter().any(|f| f.starts_with("10.96.0.12")), "another proxy's Service was programmed: {fe:?}");
    // 40 tries: the chance that a random choice misses one of three is 3·(2/3)^40 < 1e-6.
    assert_eq!(reached(&node, 40).len(), 3);

    // A deletion.
    api.delete(Kind::Service, "default", "web").unwrap();
    wait_for(Duration::from_secs(10), || !frontends(&node).iter().any(|f| f == "10.96.0.10:80")).unwrap();
    // Syncs after the malformed Services arrived did not report them again.
    assert_eq!(node.proxy_log_text().matches("Service default/bad-ip skipped").count(), 1);
    node.stop_proxy().unwrap();
}

#[test]
fn watch_cuts_and_an_expired_resource_version_relist_without_flushing_the_datapath() {
    let (mut node, api) = node_with_api(3, 2, LbMode::TcOnly);
    let stop = StopFlag::default();
    let flag = stop.clone();
    let target = SocketAddrV4::new(VIP, 80);
    let client = in_netns(&node.pod("client").ns.name, move || {
        let (mut ok, mut failed) = (0usize, Vec::new());
        let deadline = Instant::now() + Duration::from_secs(60);
        while !flag.stopped() && Instant::now() < deadline {
            match request(target) {
                Ok(_) => ok += 1,
                Err(e) => failed.push(e.to_string()),
            }
        }
        (ok, failed)
    });
    let lists = api.requests(Kind::Service, false);
    let watches = api.requests(Kind::Service, true);

    // Cut every watch; a change made meanwhile arrives when the watchers resume (no relist).
    api.cut_watches();
    api.apply(&web(&node, 3)).unwrap();
    wait_for(Duration::from_secs(15), || frontend_backends(&node) == 3).expect("change after a cut watch");
    assert!(api.requests(Kind::Service, true) > watches, "watch not resumed");
    assert_eq!(api.requests(Kind::Service, false), lists, "a cut watch resumes from its resourceVersion, no relist");

    // Expire the history and cut again: the watch gets 410 Gone and the watcher relists.
    api.compact();
    api.cut_watches();
    wait_for(Duration::from_secs(20), || api.requests(Kind::Service, false) > lists).expect("relist after 410");
    wait_for(Duration::from_secs(10), || node.proxy_log_text().matches("Services: listed").count() >= 2).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    stop.stop();
    let (ok, failed) = client.join().unwrap();
    println!("watch cut + 410 relist: {ok} requests, {} failed", failed.len());
    assert!(failed.is_empty(), "{} requests failed: {:?}", failed.len(), &failed[..failed.len().min(3)]);
    assert!(ok > 100, "only {ok} requests ran");
    // The relist changed nothing: no sync after it deleted an entry.
    let log = node.proxy_log_text();
    let after_relist = &log[log.rfind("Services: listed").unwrap()..];
    assert!(!after_relist.lines().any(|l| l.contains("synced") && !l.contains(", 0 deleted")), "{after_relist}");
    assert_eq!(frontend_backends(&node), 3);
    node.stop_proxy().unwrap();
}

/// Backends of the ClusterIP frontend, as the running instance's maps hold them.
fn frontend_backends(node: &Node) -> usize {
    let out =
        run(std::process::Command::new(proxy_binary()).args(["services", "--json", "--bpffs"]).arg(&node.bpffs.path))
            .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|r| r["frontend"] == "10.96.0.10:80")
        .map_or(0, |r| r["backends"].as_array().unwrap().len())
}

/// How the running instance goes before the next one starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Exit {
    /// kill -9: no cleanup of any kind (an OOM kill, a crash).
    Kill,
    /// SIGTERM with --keep-datapath: a DaemonSet rollout or an eviction.
    TermKeepingDatapath,
}

#[test]
fn kill_9_and_a_restart_lose_no_request_and_keep_established_connections() {
    restart_under_load(Exit::Kill);
}

#[test]
fn a_rollout_sigterm_and_a_new_instance_lose_no_request_and_keep_established_connections() {
    restart_under_load(Exit::TermKeepingDatapath);
}

fn restart_under_load(exit: Exit) {
    let (mut node, api) = node_with_api(2, 2, LbMode::Socket);
    if exit == Exit::TermKeepingDatapath {
        // Started as the DaemonSet starts it.
        node.stop_proxy().unwrap();
        node.proxy_args.push("--keep-datapath".into());
        node.start_proxy(&proxy_binary(), LbMode::Socket).unwrap();
    }
    // A kept-alive connection (tc path) and two loops of new connections: through the socket path
    // (curl in the node's cgroup, client pod) and through the tc path (a thread in another pod). A
    // pod's processes all take one path on a real node, and so they do here: the kept-alive
    // connection is the tc-path pod's. (From the client pod, a socket-path connection to the same
    // backend could draw the kept connection's source port — the kernel sees two different peers,
    // the VIP and the backend — and then both are one 4-tuple on the wire.)
    let tc_client = node.add_pod("tc-client").unwrap().ns.name.clone();
    node.wait_for_attached(4).unwrap();
    let mut kept = connect_in(&tc_client, SocketAddrV4::new(VIP, 80));
    let kept_pod = keepalive_request(&mut kept);
    let script = format!(
        "i=0; while [ $i -lt 100000 ] && [ ! -e {stop} ]; do curl -s -o /dev/null -w '%{{http_code}} %{{local_port}} %{{errormsg}}\\n' -m 2 http://{VIP}/; i=$((i+1)); done",
        stop = node.work.0.join("stop").display()
    );
    let mut socket_loop = node.pod_command("client", true, "sh", &["-c", &script]);
    socket_loop.stdout(std::process::Stdio::piped());
    let mut socket_loop = tests::testbed::Proc::spawn(socket_loop, "curl loop").unwrap();
    let stop = StopFlag::default();
    let flag = stop.clone();
    let tc_loop = in_netns(&tc_client, move || {
        let (mut ok, mut failed) = (0usize, Vec::new());
        let deadline = Instant::now() + Duration::from_secs(60);
        while !flag.stopped() && Instant::now() < deadline {
            match request(SocketAddrV4::new(VIP, 80)) {
                Ok(_) => ok += 1,
                Err(e) => failed.push(e.to_string()),
            }
            // A steady loop, not a flood: unpaced, it ran ~5,000 connections a second into the same
            // two nginx workers while the new instance's verification took both CPUs, and nginx's
            // accept queue (not the datapath) dropped another client's SYNs.
            std::thread::sleep(Duration::from_millis(1));
        }
        (ok, failed)
    });
    std::thread::sleep(Duration::from_millis(1000));
    match exit {
        Exit::Kill => node.kill_proxy().unwrap(),
        Exit::TermKeepingDatapath => node.stop_proxy().unwrap(),
    }
    // No proxy process at all for a while: the pinned programs and maps carry on.
    std::thread::sleep(Duration::from_millis(1500));
    std::fs::write(&node.proxy_log, "").unwrap();
    node.start_proxy(&proxy_binary(), LbMode::Socket).expect("restart");
    let log = node.proxy_log_text();
    assert!(log.contains("adopting 1 frontends") && log.contains("0 entries written, 0 deleted"), "{log}");
    // The dead instance's links (4 socket programs; ingress and egress of 4 pod interfaces; egress
    // of lo) are released once the new ones are attached and the maps checked.
    assert!(log.contains("released 13 links left by an earlier instance"), "{log}");
    // The new instance follows the API server.
    api.apply(&web(&node, 1)).unwrap();
    node.wait_for_syncs(2).unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    std::fs::write(node.work.0.join("stop"), "").unwrap();
    stop.stop();
    let (tc_ok, tc_failed) = tc_loop.join().unwrap();
    socket_loop.child.wait().unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(socket_loop.child.stdout.as_mut().unwrap(), &mut out).unwrap();
    let codes: Vec<&str> = out.lines().collect();
    let socket_failed = codes.iter().filter(|c| !c.starts_with("200")).count();
    println!(
        "{exit:?} + restart: socket path {} requests, {socket_failed} failed; tc path {tc_ok} requests, {} failed",
        codes.len(),
        tc_failed.len()
    );
    assert!(tc_failed.is_empty(), "{:?}", &tc_failed[..tc_failed.len().min(3)]);
    assert_eq!(socket_failed, 0, "{codes:?}");
    assert!(codes.len() > 50 && tc_ok > 100);
    // The connection established before the kill still answers, from the same pod.
    assert_eq!(keepalive_request(&mut kept), kept_pod);
    node.stop_proxy().unwrap();
}
