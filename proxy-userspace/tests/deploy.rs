//! The manifests in deploy/base hold together: the DaemonSet's command line, its env expanded as the
//! kubelet does, is one `ebpf-proxy run` accepts, its ConfigMap is a KubeProxyConfiguration read
//! without a complaint, the pod is set up as an AppArmor or SELinux host needs, and the ClusterRole
//! grants exactly get/list/watch on what the watchers read. (tests/tests/deploy_manifests.rs renders
//! the overlays with kubectl and has the real API server accept them.)

use clap::{CommandFactory as _, FromArgMatches as _, Parser};
use ebpf_proxy::{kubeproxy_config, run::RunArgs};
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Container},
    rbac::v1::ClusterRole,
};
use serde::Deserialize as _;

fn documents() -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/base/ebpf-proxy.yaml")).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_json::to_value(serde_yaml::Value::deserialize(d).unwrap()).unwrap())
        .collect()
}

fn find<T: serde::de::DeserializeOwned>(kind: &str) -> T {
    let doc = documents().into_iter().find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("no {kind}"));
    serde_json::from_value(doc).unwrap_or_else(|e| panic!("{kind}: {e}"))
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
}

/// The container's command with `$(VAR)` expanded from its env, as the kubelet does: the node's
/// name and host IP for the field references, the ConfigMap's keys for the ConfigMap references.
fn expanded_command(c: &Container, cm: &ConfigMap, node_name: &str, host_ip: &str) -> Vec<String> {
    let data = cm.data.as_ref().unwrap();
    let env: Vec<(String, String)> = c
        .env
        .iter()
        .flatten()
        .map(|e| {
            let from = e.value_from.as_ref().unwrap();
            let value = match (&from.field_ref, &from.config_map_key_ref) {
                (Some(f), _) if f.field_path == "spec.nodeName" => node_name.to_owned(),
                (Some(f), _) if f.field_path == "status.hostIP" => host_ip.to_owned(),
                (_, Some(k)) => {
                    assert_eq!(k.name, cm.metadata.name.clone().unwrap(), "the manifest's ConfigMap");
                    data.get(&k.key).unwrap_or_else(|| panic!("ConfigMap key {}", k.key)).clone()
                }
                other => panic!("env {}: {other:?}", e.name),
            };
            (e.name.clone(), value)
        })
        .collect();
    c.command
        .iter()
        .flatten()
        .map(|w| {
            let w = env.iter().fold(w.clone(), |w, (k, v)| w.replace(&format!("$({k})"), v));
            assert!(!w.contains("$("), "{w}: a variable the container's env lacks");
            w
        })
        .collect()
}

fn run_args(cmd: &[String]) -> RunArgs {
    assert_eq!(&cmd[..2], ["/usr/local/bin/ebpf-proxy", "run"]);
    let args: Vec<&str> = std::iter::once("ebpf-proxy").chain(cmd[2..].iter().map(String::as_str)).collect();
    let matches = Cli::command().try_get_matches_from(&args).unwrap_or_else(|e| panic!("{e}"));
    Cli::from_arg_matches(&matches).unwrap().run
}

#[test]
fn the_daemon_set_runs_a_command_line_ebpf_proxy_accepts_with_the_config_map() {
    let ds: DaemonSet = find("DaemonSet");
    let cm: ConfigMap = find("ConfigMap");
    let pod = ds.spec.template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));
    let c = &pod.containers[0];
    let run = run_args(&expanded_command(c, &cm, "node-a", "192.0.2.10"));
    assert_eq!(run.node.node_name, "node-a");
    let data = cm.data.clone().unwrap();
    assert_eq!(run.node.cluster_cidr.unwrap().to_string(), data["cluster-cidr"]);
    assert_eq!(run.master.as_deref(), Some(data["api-server"].as_str()));
    assert_eq!(run.pod_interface_prefixes, [data["pod-interface-name-prefix"].clone()]);
    // Metrics where Prometheus scrapes node agents: the node's address, kube-proxy's port; a bare
    // address of either family takes the default port.
    assert_eq!(run.metrics_bind_address.to_string(), "192.0.2.10:10249");
    let bind = ebpf_proxy::run::bind_address;
    assert_eq!(bind("2001:db8::10", 10249).unwrap().to_string(), "[2001:db8::10]:10249");
    assert_eq!(bind("[2001:db8::10]:9000", 10249).unwrap().to_string(), "[2001:db8::10]:9000");
    assert!(bind("node-a", 10249).is_err());
    let caps = c.security_context.as_ref().unwrap().capabilities.as_ref().unwrap();
    assert!(c.security_context.as_ref().unwrap().privileged.is_none(), "not privileged");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let init = pod.init_containers.as_ref().unwrap();
    assert_eq!(init[0].name, "mount-bpffs", "bpffs is mounted before anything pins");
    assert_eq!(init[1].command.as_deref().unwrap()[1], "cleanup");

    let conf = &data["config.conf"];
    let (_, notes) = kubeproxy_config::parse(conf).expect("the ConfigMap's KubeProxyConfiguration");
    assert!(notes.is_empty(), "{notes:?}");
    // The config file the command points at is where the ConfigMap is mounted.
    let mount = c.volume_mounts.as_ref().unwrap().iter().find(|m| m.name == "config").unwrap();
    let mounted = std::path::Path::new(&mount.mount_path);
    assert_eq!(run.config.unwrap(), mounted.join("config.conf"));
    // A rollout (SIGTERM) leaves the datapath to the next pod.
    assert!(run.keep_datapath, "--keep-datapath");
}

#[test]
fn the_pod_runs_on_apparmor_and_selinux_hosts_and_is_probed_and_sized_as_measured() {
    let ds: DaemonSet = find("DaemonSet");
    let annotations = ds.spec.template.metadata.unwrap().annotations.unwrap();
    let pod = ds.spec.template.spec.unwrap();
    let containers: Vec<&Container> = pod.init_containers.iter().flatten().chain(&pod.containers).collect();
    for c in &containers {
        let key = format!("container.apparmor.security.beta.kubernetes.io/{}", c.name);
        assert_eq!(annotations.get(&key).map(String::as_str), Some("unconfined"), "{key}");
        let sc = c.security_context.as_ref().unwrap();
        // Privileged containers run as spc_t already; the others ask for it.
        if sc.privileged != Some(true) {
            let se = sc.se_linux_options.as_ref().unwrap_or_else(|| panic!("{}: seLinuxOptions", c.name));
            assert_eq!(se.type_.as_deref(), Some("spc_t"), "{}", c.name);
        }
    }
    let c = &pod.containers[0];
    let startup = c.startup_probe.as_ref().expect("a startupProbe");
    let window = startup.period_seconds.unwrap() * startup.failure_threshold.unwrap();
    assert!(window >= 60, "the first sync at tens of thousands of Services takes seconds: {window} s");
    assert!(c.liveness_probe.as_ref().unwrap().initial_delay_seconds.is_none(), "the startupProbe covers start");
    // BENCHMARKS.md: ~140 MiB RSS at 10k Services plus ~140 MiB of maps charged to the pod, and a
    // sync's working set.
    let requests = c.resources.as_ref().unwrap().requests.as_ref().unwrap();
    let memory = &requests["memory"].0;
    let mib: u64 = memory.strip_suffix("Mi").unwrap_or_else(|| panic!("{memory} in Mi")).parse().unwrap();
    assert!(mib >= 300, "{memory}");
    let ports: Vec<i32> = c.ports.iter().flatten().map(|p| p.container_port).collect();
    assert!(ports.contains(&10249) && ports.contains(&10256), "{ports:?}");
}

#[test]
fn the_api_server_is_reached_at_its_real_address_not_through_a_service() {
    let ds: DaemonSet = find("DaemonSet");
    let pod = ds.spec.template.spec.unwrap();
    // The cluster DNS is a Service: the node's own resolver, not ClusterFirstWithHostNet.
    assert_eq!(pod.dns_policy.as_deref(), Some("Default"));
    let cm: ConfigMap = find("ConfigMap");
    let data = cm.data.unwrap();
    let (cfg, _) = kubeproxy_config::parse(&data["config.conf"]).unwrap();
    let mount = pod.containers[0].volume_mounts.as_ref().unwrap().iter().find(|m| m.name == "config").unwrap();
    assert_eq!(
        cfg.kubeconfig.as_deref().map(std::path::Path::new),
        Some(std::path::Path::new(&mount.mount_path).join("kubeconfig.conf").as_path()),
        "clientConnection.kubeconfig names the ConfigMap's kubeconfig.conf"
    );
    let kc: kube::config::Kubeconfig = serde_yaml::from_str(&data["kubeconfig.conf"]).expect("a kubeconfig");
    let cluster = kc.clusters[0].cluster.as_ref().unwrap();
    // --master (the `api-server` key) and the kubeconfig's fallback: neither a Service address.
    for server in [cluster.server.as_deref().unwrap(), data["api-server"].as_str()] {
        let host = server.split("://").nth(1).and_then(|rest| rest.split([':', '/']).next()).unwrap();
        ebpf_proxy::kube_source::refuse_service_address(host, "server", "10.96.0.0/12".parse().ok(), false)
            .expect("the API server address is no Service address");
    }
    let user = kc.auth_infos[0].auth_info.as_ref().unwrap();
    assert_eq!(user.token_file.as_deref(), Some("/var/run/secrets/kubernetes.io/serviceaccount/token"));
    assert!(cluster.certificate_authority.as_deref().is_some_and(|ca| ca.ends_with("serviceaccount/ca.crt")));
}

#[test]
fn service_addresses_are_refused_with_what_to_set() {
    use ebpf_proxy::kube_source::refuse_service_address;
    let cidr = "10.96.0.0/12".parse().ok();
    for host in ["10.96.0.1", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local", "kubernetes.default"] {
        let e = refuse_service_address(host, "server", cidr, false).expect_err(host).to_string();
        assert!(e.contains("--master") && e.contains("clientConnection.kubeconfig"), "{e}");
    }
    // The in-cluster address is refused even without a service CIDR to tell.
    assert!(refuse_service_address("10.43.0.1", "server", None, true).is_err());
    for host in ["192.0.2.10", "control-plane.example", "10.0.0.1"] {
        refuse_service_address(host, "server", cidr, false).expect(host);
    }
}

#[test]
fn the_cluster_role_only_reads_services_endpoint_slices_and_nodes() {
    let role: ClusterRole = find("ClusterRole");
    let mut granted = Vec::new();
    for rule in role.rules.unwrap() {
        assert_eq!(rule.verbs, ["get", "list", "watch"]);
        for group in rule.api_groups.unwrap() {
            for r in rule.resources.as_deref().unwrap() {
                granted.push(format!("{group}/{r}"));
            }
        }
    }
    granted.sort();
    assert_eq!(granted, ["/nodes", "/services", "discovery.k8s.io/endpointslices"]);
}
