//! The in-cluster bootstrap, in the single-node testbed. A node whose Service datapath is
//! ebpf-proxy cannot reach the API server through the `kubernetes` Service before ebpf-proxy has
//! synced, and ebpf-proxy cannot sync without the API server. Started the way the DaemonSet starts
//! it — deploy/base/ebpf-proxy.yaml's command line and its ConfigMap's config.conf and kubeconfig.conf,
//! with the in-cluster environment variables set — it reaches the API server at its real address,
//! becomes ready and serves the `kubernetes` ClusterIP to a pod; started with only the in-cluster
//! variables, it refuses at once, saying what to set. Needs root; fails (never skips) without.

use std::{net::SocketAddrV4, path::Path, time::Duration};

use tests::{
    apiserver::ApiServer,
    deploy::{Manifest, NodeFields, plain_http_kubeconfig},
    proxy_binary,
    testbed::{Node, run, service_yaml},
};

/// The `kubernetes` Service's ClusterIP, as in-cluster configuration names it.
const KUBERNETES_SERVICE_HOST: &str = "10.96.0.1";
/// The API server's real address: on the node itself, as on a control-plane node.
const API_PORT: u16 = 6443;

/// The `kubernetes` Service (port 443 → the API server on the node) and its EndpointSlice.
fn kubernetes_service(node: &Node) -> String {
    let mut svc = service_yaml("kubernetes", KUBERNETES_SERVICE_HOST.parse().unwrap(), 443, "TCP");
    svc.push_str(&format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: kubernetes, namespace: default, \
         labels: {{kubernetes.io/service-name: kubernetes}}}}\naddressType: IPv4\n\
         ports: [{{name: p, port: {API_PORT}, protocol: TCP}}]\n\
         endpoints: [{{addresses: [{}], nodeName: {}, conditions: {{ready: true}}}}]\n",
        node.node_ip, node.name
    ));
    svc
}

/// The DaemonSet's container command line and ConfigMap, as a node would run them: the ConfigMap's
/// files written where the test keeps them (its mount path replaced), with the API server address
/// (the ConfigMap's `api-server`, passed as --master) and the service account token the operator
/// and the kubelet supply; the host paths and the pod-interface prefix replaced by the testbed's
/// own; the env the DaemonSet gives the container expanded.
fn daemon_set_command(node: &Node, api: SocketAddrV4) -> Vec<String> {
    let mut manifest = Manifest::base();
    let config_mount = manifest.mount_path("ebpf-proxy", "config");
    let dir = node.work.0.join("configmap");
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("token");
    // As the kubelet writes it: no trailing newline (which would land in the Authorization header).
    std::fs::write(&token, "test-service-account-token").unwrap();
    let mounted = |s: &str| s.replace(&config_mount, &dir.display().to_string());
    // A plain-HTTP test API server at the node's address.
    manifest.set_config("api-server", &format!("http://{api}"));
    manifest.set_config("pod-interface-name-prefix", &node.pod_if_prefix());
    let data = manifest.config_map();
    let kubeconfig = plain_http_kubeconfig(data["kubeconfig.conf"].as_str().unwrap(), &token);
    std::fs::write(dir.join("kubeconfig.conf"), kubeconfig).unwrap();
    std::fs::write(dir.join("config.conf"), mounted(data["config.conf"].as_str().unwrap())).unwrap();
    let host_ip = node.node_ip.to_string();
    let fields = NodeFields { name: &node.name, host_ip: &host_ip };
    manifest.command_line("ebpf-proxy", &fields).unwrap()[1..]
        .iter()
        .map(|a| match a.split_once('=') {
            Some(("--bpffs", _)) => format!("--bpffs={}", node.bpffs.path.display()),
            Some(("--cgroup", _)) => format!("--cgroup={}", node.cgroup.path.display()),
            _ => mounted(a),
        })
        .collect()
}

/// In-cluster environment: what the kubelet sets in every pod.
fn in_cluster_env(home: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("KUBERNETES_SERVICE_HOST", KUBERNETES_SERVICE_HOST.to_owned()),
        ("KUBERNETES_SERVICE_PORT", "443".to_owned()),
        // No ~/.kube/config of the test machine's to fall back on.
        ("HOME", home.display().to_string()),
    ]
}

#[test]
fn started_as_the_daemon_set_starts_it_it_reaches_the_api_server_and_serves_the_kubernetes_service() {
    let mut node = Node::new(1).expect("testbed node");
    node.add_pod("client").unwrap();
    let api_addr = SocketAddrV4::new(node.node_ip, API_PORT);
    let api = ApiServer::start_at(&node.ns.name, api_addr).expect("test API server on the node's address");
    api.apply(&kubernetes_service(&node)).unwrap();
    let args = daemon_set_command(&node, api_addr);
    assert!(args.iter().any(|a| a.starts_with("--config=")), "the DaemonSet passes its ConfigMap: {args:?}");
    let home = node.work.0.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let env = in_cluster_env(&home);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    node.spawn_proxy(&proxy_binary(), &args, &env).expect("ebpf-proxy started as the DaemonSet starts it");
    let log = node.proxy_log_text();
    assert!(log.contains("synced "), "programmed from the API server: {log}");
    // A pod reaches the API server through the `kubernetes` Service: socket path and tc path.
    for in_cgroup in [true, false] {
        let url = format!("http://{KUBERNETES_SERVICE_HOST}:443/api/v1/services");
        let out = run(&mut node.pod_command("client", in_cgroup, "curl", &["-sS", "--fail", "-m", "3", &url]))
            .unwrap_or_else(|e| panic!("pod → kubernetes Service (socket path: {in_cgroup}): {e:#}"));
        assert!(out.contains("\"kind\":\"ServiceList\""), "{out}");
        assert!(out.contains("\"name\":\"kubernetes\""), "{out}");
    }
}

#[test]
fn started_with_only_the_in_cluster_variables_it_refuses_saying_what_to_set() {
    let mut node = Node::new(1).expect("testbed node");
    let home = node.work.0.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let args: Vec<String> = [
        "run",
        "--bpffs",
        &node.bpffs.path.display().to_string(),
        "--cgroup",
        &node.cgroup.path.display().to_string(),
        "--node-name",
        &node.name.clone(),
        "--node-ip",
        &node.node_ip.to_string(),
    ]
    .map(String::from)
    .into();
    let env = in_cluster_env(&home);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    node.spawn_proxy_unready(&proxy_binary(), &args, &env).unwrap();
    let status = node.wait_proxy_exit(Duration::from_secs(10)).expect("it exits on its own");
    assert!(!status.success(), "{status}");
    let log = node.proxy_log_text();
    for what in ["10.96.0.1 is a Service address", "--master", "clientConnection.kubeconfig"] {
        assert!(log.contains(what), "the error names {what:?}: {log}");
    }
    // It said so before loading anything.
    assert!(!log.contains("attached"), "{log}");
}
