//! The container image (`cargo xtask image`, built by `cargo xtask test` before the tests) run as
//! the DaemonSet runs it, with podman, in the single-node testbed: the init containers and the
//! ebpf-proxy container with exactly the manifest's capabilities and privilege, its hostPath volumes
//! mapped to the testbed's bpffs directory and cgroup, the ConfigMap and the service account token
//! mounted where the kubelet mounts them, and the container's command line from
//! deploy/base/ebpf-proxy.yaml with its env expanded. The node's network namespace is the pod's
//! (hostNetwork). The seed demo's Service (examples/seed) answers through it from a pod, on the
//! socket path and the tc path, and its metrics answer on the node's address.
//! Needs root; fails (never skips) without podman or the image.

use std::{net::SocketAddrV4, path::Path, process::Command, time::Duration};

use serde_json::Value;
use tests::{
    apiserver::ApiServer,
    deploy::{Manifest, NodeFields, plain_http_kubeconfig},
    testbed::{Node, answered_by, require_privileges, run, unique_id, wait_for},
};

/// The image `cargo xtask image` builds.
fn image() -> String {
    format!("localhost/ebpf-proxy:{}", env!("CARGO_PKG_VERSION"))
}

/// podman as `cargo xtask image` runs it (xtask/src/image.rs): runc, and the machine's own limits
/// (podman's defaults for root are above this machine's hard limits; nproc above pid_max is refused).
fn podman() -> Command {
    let mut c = Command::new("podman");
    c.args(["--runtime", "runc"]);
    c
}

fn ulimits() -> Vec<String> {
    let hard = |flag: &str| -> u64 {
        let out = Command::new("sh").arg("-c").arg(format!("ulimit -H{flag}")).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(u64::MAX)
    };
    let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max").unwrap().trim().parse().unwrap();
    let (nofile, nproc) = (hard("n"), hard("u").min(pid_max));
    vec![format!("--ulimit=nofile={nofile}:{nofile}"), format!("--ulimit=nproc={nproc}:{nproc}")]
}

/// A container, removed on drop.
struct Container {
    name: String,
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = podman().args(["logs", &self.name]).status();
        }
        let _ = podman().args(["rm", "-f", "-t", "10", &self.name]).output();
    }
}

/// `podman run` flags for one of the pod's containers: the manifest's securityContext (privileged,
/// or its capability drop and add lists), and its volume mounts with each hostPath replaced through
/// `host` (volume name → the test's directory).
fn security_and_mounts(m: &Manifest, container: &str, host: &dyn Fn(&str) -> String) -> Vec<String> {
    let c = m.container(container);
    let sc = &c["securityContext"];
    let mut flags = Vec::new();
    if sc["privileged"] == Value::Bool(true) {
        flags.push("--privileged".to_owned());
    } else {
        for cap in sc["capabilities"]["drop"].as_array().into_iter().flatten() {
            flags.push(format!("--cap-drop={}", cap.as_str().unwrap()));
        }
        for cap in sc["capabilities"]["add"].as_array().into_iter().flatten() {
            flags.push(format!("--cap-add={}", cap.as_str().unwrap()));
        }
    }
    for mount in c["volumeMounts"].as_array().into_iter().flatten() {
        let volume = mount["name"].as_str().unwrap();
        let mut opts = vec![if mount["readOnly"] == Value::Bool(true) { "ro" } else { "rw" }];
        // The kubelet's propagation modes, as the runtime applies them.
        match mount["mountPropagation"].as_str() {
            Some("HostToContainer") => opts.push("rslave"),
            Some("Bidirectional") => opts.push("rshared"),
            _ => {}
        }
        flags.push(format!("--volume={}:{}:{}", host(volume), mount["mountPath"].as_str().unwrap(), opts.join(",")));
    }
    flags
}

/// Runs an init container to completion; its output.
fn run_init(m: &Manifest, netns: &str, name: &str, host: &dyn Fn(&str) -> String) -> String {
    let c = m.container(name);
    let cmd: Vec<&str> = c["command"].as_array().unwrap().iter().map(|w| w.as_str().unwrap()).collect();
    let mut p = podman();
    p.args(["run", "--rm", &format!("--network=ns:/run/netns/{netns}")]).args(ulimits());
    p.args(security_and_mounts(m, name, host));
    p.arg(format!("--entrypoint={}", cmd[0])).arg(image()).args(&cmd[1..]);
    run(&mut p).unwrap_or_else(|e| panic!("init container {name}: {e:#}"))
}

#[test]
fn the_image_runs_as_the_daemon_set_runs_it_and_serves_the_seed_service() {
    require_privileges().unwrap();
    assert!(
        podman().args(["image", "exists", &image()]).status().is_ok_and(|s| s.success()),
        "{} is missing: build it with `cargo xtask image` (done by `cargo xtask test`)",
        image()
    );
    let mut node = Node::new(0).expect("testbed node");
    for name in ["webapp-0", "webapp-1"] {
        node.add_pod(name).unwrap().start_nginx().unwrap();
    }
    node.add_pod("client").unwrap();
    let api_addr = SocketAddrV4::new(node.node_ip, 6443);
    let api = ApiServer::start_at(&node.ns.name, api_addr).expect("test API server on the node's address");
    let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/seed");
    api.apply(&std::fs::read_to_string(seed.join("service.yaml")).unwrap()).unwrap();
    let mut slice = String::from(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: frontend-1, namespace: default, \
         labels: {kubernetes.io/service-name: frontend}}\naddressType: IPv4\n\
         ports: [{name: http, port: 80, protocol: TCP}]\nendpoints:\n",
    );
    for pod in &node.pods[..2] {
        slice.push_str(&format!(
            "  - {{addresses: [{}], nodeName: {}, conditions: {{ready: true}}}}\n",
            pod.ip, node.name
        ));
    }
    api.apply(&slice).unwrap();

    // The ConfigMap and the service account token, as the kubelet mounts them.
    let mut manifest = Manifest::base();
    manifest.set_config("api-server", &format!("http://{api_addr}"));
    manifest.set_config("pod-interface-name-prefix", &node.pod_if_prefix());
    let config_dir = node.work.0.join("configmap");
    let sa_dir = node.work.0.join("serviceaccount");
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::create_dir_all(&sa_dir).unwrap();
    std::fs::write(sa_dir.join("token"), "test-service-account-token").unwrap();
    let data = manifest.config_map().clone();
    let token_in_pod = Path::new("/var/run/secrets/kubernetes.io/serviceaccount/token");
    std::fs::write(config_dir.join("config.conf"), data["config.conf"].as_str().unwrap()).unwrap();
    let kubeconfig = plain_http_kubeconfig(data["kubeconfig.conf"].as_str().unwrap(), token_in_pod);
    std::fs::write(config_dir.join("kubeconfig.conf"), kubeconfig).unwrap();
    let xtables_lock = node.work.0.join("xtables.lock");
    std::fs::write(&xtables_lock, "").unwrap();
    // hostPath volumes → the testbed's own directories (never the machine's /sys/fs/bpf or cgroup root).
    let (bpffs, cgroup) = (node.bpffs.path.display().to_string(), node.cgroup.path.display().to_string());
    let (config, lock) = (config_dir.display().to_string(), xtables_lock.display().to_string());
    std::fs::create_dir_all(&node.bpffs.path).unwrap();
    let host = move |volume: &str| -> String {
        match volume {
            "bpffs" => bpffs.clone(),
            "cgroup2" => cgroup.clone(),
            "config" => config.clone(),
            "xtables-lock" => lock.clone(),
            other => panic!("the test maps no host directory for volume {other}"),
        }
    };

    // The init containers, in order: bpffs is there already (a no-op), nothing of kube-proxy's.
    for init in ["mount-bpffs", "cleanup"] {
        run_init(&manifest, &node.ns.name, init, &host);
    }

    let host_ip = node.node_ip.to_string();
    let cmd = manifest.command_line("ebpf-proxy", &NodeFields { name: &node.name, host_ip: &host_ip }).unwrap();
    let container = Container { name: format!("epx-image-{}", unique_id()) };
    let mut p = podman();
    p.args(["run", "--detach", "--name", &container.name, &format!("--network=ns:/run/netns/{}", node.ns.name)]);
    p.args(ulimits()).args(security_and_mounts(&manifest, "ebpf-proxy", &host));
    p.arg(format!("--volume={}:/var/run/secrets/kubernetes.io/serviceaccount:ro", sa_dir.display()));
    // What the kubelet sets in every pod.
    p.args(["--env=KUBERNETES_SERVICE_HOST=10.96.0.1", "--env=KUBERNETES_SERVICE_PORT=443"]);
    p.arg(format!("--entrypoint={}", cmd[0])).arg(image()).args(&cmd[1..]);
    run(&mut p).expect("podman run");
    // ebpf-proxy logs to stderr, which `podman logs` replays on its own stderr.
    let logs = || {
        let out = podman().args(["logs", &container.name]).output().unwrap();
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    };
    let pods = node.pods.len();
    wait_for(Duration::from_secs(60), || {
        let log = logs();
        log.contains("ready") && log.matches("attached from_pod").count() >= pods
    })
    .unwrap_or_else(|_| panic!("the container did not become ready:\n{}", logs()));

    // The seed Service from a pod: socket path and tc path, both backends.
    for in_cgroup in [true, false] {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..20 {
            let body = node.curl("client", in_cgroup, "http://10.96.0.10/").expect("the seed Service answers");
            seen.insert(answered_by(&body).unwrap_or("?").to_owned());
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["webapp-0", "webapp-1"], "socket path: {in_cgroup}");
    }
    // Metrics where the DaemonSet puts them: the node's address, kube-proxy's port.
    let metrics = run(&mut node.node_command(
        false,
        "curl",
        &["-sS", "--fail", "-m", "3", &format!("http://{host_ip}:10249/metrics")],
    ))
    .unwrap();
    assert!(metrics.contains("kubeproxy_sync_proxy_rules_last_timestamp_seconds"), "{metrics}");
    // A rollout stops the container with SIGTERM: it exits at once and leaves the datapath.
    run(podman().args(["stop", "-t", "20", &container.name])).unwrap();
    let code = run(podman().args(["inspect", "--format", "{{.State.ExitCode}}", &container.name])).unwrap();
    assert_eq!(code.trim(), "0", "{}", logs());
    let body = node.curl("client", false, "http://10.96.0.10/").expect("the datapath outlives the container");
    assert!(answered_by(&body).is_some(), "{body}");
}
