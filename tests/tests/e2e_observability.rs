//! Live tests of what operators look at: /healthz, /livez, /metrics and the `services`, `backends` and
//! `conntrack` commands of a running ebpf-proxy in the single-node testbed. Needs root; fails (never skips) without.

use std::{
    net::Ipv4Addr,
    time::{Duration, SystemTime},
};

use tests::{
    proxy_binary,
    testbed::{LbMode, Node, run, service_yaml, slice_yaml, wait_for},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// GET from inside the node namespace: (status, body).
fn get(node: &Node, url: &str) -> (String, String) {
    let out = run(node.ns.command("curl").args(["-sS", "-m", "3", "-w", "\n%{http_code}", url])).expect("curl");
    let (body, code) = out.rsplit_once('\n').expect("status line");
    (code.to_owned(), body.to_owned())
}

/// The value of the sample named exactly `series` (name plus labels) in a Prometheus text page.
fn sample(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in\n{page}"))
}

#[test]
fn health_metrics_and_inspection_commands_show_syncs_counters_maps_and_skipped_objects() {
    let mut node = Node::new(2).expect("testbed node");
    for pod in &mut node.pods {
        pod.start_nginx().unwrap();
    }
    node.add_pod("client").unwrap();
    let ips: Vec<_> = node.pods[..2].iter().map(|p| p.ip).collect();
    // The slice carries the EndpointSlice controller's trigger time: network programming latency.
    let now = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let slice = slice_yaml("web", 80, "TCP", &ips).replacen(
        "metadata: {",
        &format!("metadata: {{annotations: {{endpoints.kubernetes.io/last-change-trigger-time: \"{now}\"}}, "),
        1,
    );
    node.write_objects("web.yaml", &(service_yaml("web", VIP, 80, "TCP") + "---\n" + &slice)).unwrap();
    node.write_objects("bad.yaml", &service_yaml("bad", Ipv4Addr::new(10, 96, 0, 11), 0, "TCP")).unwrap();
    // kube-proxy's configuration file moves the metrics port (and is read as kube-proxy reads it).
    let config = node.work.0.join("kube-proxy.yaml");
    std::fs::write(
        &config,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: iptables\n\
         metricsBindAddress: 127.0.0.1:10299\nconntrack: {maxPerCore: 1000, min: 150000, tcpCloseWaitTimeout: 2h}\n",
    )
    .unwrap();
    node.proxy_args = vec!["--config".into(), config.display().to_string()];
    node.start_proxy(&proxy_binary(), LbMode::TcOnly).unwrap();
    assert!(
        node.proxy_log_text().contains("conntrack.tcpCloseWaitTimeout is set but not supported"),
        "{}",
        node.proxy_log_text()
    );
    for _ in 0..5 {
        node.curl("client", false, &format!("http://{VIP}/")).expect("through the ClusterIP");
    }

    let (code, page) = get(&node, "http://127.0.0.1:10299/metrics");
    assert_eq!(code, "200");
    assert!(sample(&page, "kubeproxy_sync_proxy_rules_duration_seconds_count") >= 1.0);
    assert!(sample(&page, "kubeproxy_sync_proxy_rules_last_timestamp_seconds") > 1.7e9);
    assert!(sample(&page, "kubeproxy_network_programming_duration_seconds_count") >= 1.0);
    assert!(sample(&page, "ebpf_proxy_datapath_packets_total{reason=\"forward_dnat\"}") >= 5.0);
    assert!(sample(&page, "ebpf_proxy_datapath_packets_total{reason=\"conntrack_new\"}") >= 5.0);
    assert_eq!(sample(&page, "ebpf_proxy_datapath_drops_total{reason=\"drop_no_endpoints\"}"), 0.0);
    // The connections are counted by the collector's pass (every 5 s), not by a walk per scrape: five
    // closed connections stay in TIME_WAIT.
    wait_for(Duration::from_secs(12), || {
        sample(&get(&node, "http://127.0.0.1:10299/metrics").1, "ebpf_proxy_map_entries{map=\"conntrack\"}") >= 5.0
    })
    .expect("the collector counts the connections");
    // The connection table is sized as kube-proxy sizes conntrack (max(maxPerCore × CPUs, min)).
    assert_eq!(sample(&page, "ebpf_proxy_map_capacity{map=\"conntrack\"}"), 150_000.0);
    // The Service with port 0 is skipped and counted; the good one works (above).
    assert_eq!(sample(&page, "ebpf_proxy_skipped_objects{kind=\"Service\"}"), 1.0);

    // The inspection commands read the running instance's pinned maps.
    let inspect = |what: &str, json: bool| {
        let mut cmd = std::process::Command::new(proxy_binary());
        cmd.arg(what).arg("--bpffs").arg(&node.bpffs.path);
        if json {
            cmd.arg("--json");
        }
        run(&mut cmd).unwrap_or_else(|e| panic!("{what}: {e:#}"))
    };
    let services: serde_json::Value = serde_json::from_str(&inspect("services", true)).unwrap();
    let web = services.as_array().unwrap().iter().find(|r| r["frontend"] == "10.96.0.10:80").expect("the ClusterIP");
    assert_eq!((web["type"].as_str(), web["protocol"].as_str()), (Some("ClusterIP"), Some("TCP")));
    let mut backends: Vec<&str> = web["backends"].as_array().unwrap().iter().map(|b| b.as_str().unwrap()).collect();
    backends.sort();
    assert_eq!(backends, ["10.244.1.2:80 (local)", "10.244.1.3:80 (local)"]);
    let table = inspect("services", false);
    assert!(table.starts_with("ID  FRONTEND") && table.contains("10.96.0.10:80"), "{table}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&inspect("backends", true)).unwrap().as_array().unwrap().len(),
        2
    );
    let ct: serde_json::Value = serde_json::from_str(&inspect("conntrack", true)).unwrap();
    let to_backends = ct
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["service"] == "10.96.0.10:80")
        .inspect(|r| assert!(r["backend"].as_str().unwrap().starts_with("10.244.1."), "{r}"))
        // curl closed each connection properly: the backend answered and the handshake completed.
        .inspect(|r| assert!(r["assured"] == true && r["replied"] == true, "{r}"))
        .count();
    assert!(to_backends >= 5, "{ct}");
    // The maps carry BTF: bpftool prints them with field names.
    let dump = run(std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(node.bpffs.path.join("FRONTENDS")))
    .expect("bpftool");
    assert!(dump.contains("\"service_id\"") && dump.contains("\"backend_count\""), "{dump}");

    let (code, body) = get(&node, "http://127.0.0.1:10256/healthz");
    assert_eq!(code, "200", "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v["lastUpdated"].as_str().is_some_and(|s| !s.is_empty()), "{v}");
    assert_eq!(v["nodeEligible"], true);
    assert_eq!(get(&node, "http://127.0.0.1:10256/livez").0, "200");

    // This node being deleted: /healthz sends load balancers away, /livez stays up.
    node.write_objects(
        "node.yaml",
        "apiVersion: v1\nkind: Node\nmetadata: {name: node-a, deletionTimestamp: \"2026-01-01T00:00:00Z\"}\n",
    )
    .unwrap();
    node.wait_for_syncs(2).unwrap();
    let (code, body) = get(&node, "http://127.0.0.1:10256/healthz");
    assert_eq!(code, "503", "{body}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["nodeEligible"], false);
    assert_eq!(get(&node, "http://127.0.0.1:10256/livez").0, "200");
    node.stop_proxy().unwrap();
}

#[test]
fn a_full_sync_repairs_map_entries_changed_behind_its_back_and_counts_them() {
    let mut node = Node::new(2).expect("testbed node");
    for pod in &mut node.pods {
        pod.start_nginx().unwrap();
    }
    node.add_pod("client").unwrap();
    let ips: Vec<_> = node.pods[..2].iter().map(|p| p.ip).collect();
    node.write_objects(
        "web.yaml",
        &(service_yaml("web", VIP, 80, "TCP") + "---\n" + &slice_yaml("web", 80, "TCP", &ips)),
    )
    .unwrap();
    // A full sync every second (kube-proxy's --sync-period), so the test need not wait 30 s.
    node.proxy_args = vec!["--sync-period".into(), "1s".into()];
    node.start_proxy(&proxy_binary(), LbMode::TcOnly).unwrap();
    let mut tables = ebpf_proxy::datapath::pinned_tables(&node.bpffs.path).unwrap();
    let before = tables.dump().unwrap();
    // Behind its back, as a stray tool would: the frontend's backend count changed, a backend deleted.
    let (key, frontend) = before.frontends.iter().next().map(|(k, v)| (*k, *v)).expect("the ClusterIP's frontend");
    let mut changed = frontend;
    changed.backend_count = 7;
    tables.frontends.put(&key, &changed).unwrap();
    let backend = *before.backends.keys().next().unwrap();
    tables.backends.del(&backend).unwrap();
    assert_ne!(tables.dump().unwrap(), before);
    // The next full sync puts both back, says so, and counts them by map.
    wait_for(Duration::from_secs(10), || tables.dump().unwrap() == before).expect("repaired by a full sync");
    let log = node.proxy_log_text();
    assert!(log.contains("map entries had drifted and are repaired"), "{log}");
    assert!(log.contains("frontends: 1 changed, 0 missing, 0 unexpected"), "{log}");
    assert!(log.contains("backends: 0 changed, 1 missing, 0 unexpected"), "{log}");
    let (_, page) = get(&node, "http://127.0.0.1:10249/metrics");
    assert_eq!(sample(&page, "ebpf_proxy_sync_drift_repaired_total{map=\"frontends\"}"), 1.0);
    assert_eq!(sample(&page, "ebpf_proxy_sync_drift_repaired_total{map=\"backends\"}"), 1.0);
    // Then no more drift: later full syncs find the maps as written.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(node.proxy_log_text().matches("had drifted").count(), 1, "{}", node.proxy_log_text());
    for _ in 0..5 {
        node.curl("client", false, &format!("http://{VIP}/")).expect("through the ClusterIP");
    }
    // Batched deletes (what syncs use) take a key already gone in their stride and go on after it.
    let gone = u32::MAX;
    assert!(!before.backends.contains_key(&gone));
    tables.backends.del_many(&[gone, backend]).map_err(|(n, e)| format!("after {n}: {e:#}")).unwrap();
    assert!(!tables.backends.entries().unwrap().contains_key(&backend));
    node.stop_proxy().unwrap();
}
