//! The manifests in deploy/ hold together: the DaemonSet's command line is one `ebpf-proxy run`
//! accepts, its ConfigMap is a KubeProxyConfiguration read without a complaint, and the ClusterRole
//! grants exactly get/list/watch on what the watchers read.

use clap::{CommandFactory as _, FromArgMatches as _, Parser};
use ebpf_proxy::{kubeproxy_config, run::RunArgs};
use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::ConfigMap, rbac::v1::ClusterRole};
use serde::Deserialize as _;

fn documents() -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/ebpf-proxy.yaml")).unwrap();
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

#[test]
fn the_daemon_set_runs_a_command_line_ebpf_proxy_accepts_with_the_config_map() {
    let ds: DaemonSet = find("DaemonSet");
    let pod = ds.spec.template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));
    let c = &pod.containers[0];
    let cmd = c.command.clone().unwrap();
    assert_eq!(&cmd[..2], ["/usr/local/bin/ebpf-proxy", "run"]);
    // Kubernetes expands $(VAR) from the container's env: stand in values.
    let args: Vec<String> = std::iter::once("ebpf-proxy".to_owned())
        .chain(cmd[2..].iter().map(|a| a.replace("$(NODE_NAME)", "node-a").replace("$(NODE_IP)", "192.0.2.10")))
        .collect();
    let matches = Cli::command().try_get_matches_from(&args).unwrap_or_else(|e| panic!("{e}"));
    let run = Cli::from_arg_matches(&matches).unwrap().run;
    assert_eq!(run.node.node_name, "node-a");
    let caps = c.security_context.as_ref().unwrap().capabilities.as_ref().unwrap();
    assert!(c.security_context.as_ref().unwrap().privileged.is_none(), "not privileged");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let init = &pod.init_containers.unwrap()[0];
    assert_eq!(init.command.as_deref().unwrap()[1], "cleanup");

    let cm: ConfigMap = find("ConfigMap");
    let conf = &cm.data.unwrap()["config.conf"];
    let (cfg, notes) = kubeproxy_config::parse(conf).expect("the ConfigMap's KubeProxyConfiguration");
    assert!(notes.is_empty(), "{notes:?}");
    assert!(cfg.cluster_cidr.is_some());
    // The config file the command points at is where the ConfigMap is mounted.
    let mount = c.volume_mounts.as_ref().unwrap().iter().find(|m| m.name == "config").unwrap();
    let mounted = std::path::Path::new(&mount.mount_path);
    assert_eq!(run.config.unwrap(), mounted.join("config.conf"));
    // A rollout (SIGTERM) leaves the datapath to the next pod.
    assert!(run.keep_datapath, "--keep-datapath");
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
    let server = cluster.server.as_deref().unwrap();
    let host = server.split("://").nth(1).and_then(|rest| rest.split([':', '/']).next()).unwrap();
    ebpf_proxy::kube_source::refuse_service_address(host, "server", "10.96.0.0/12".parse().ok(), false)
        .expect("the kubeconfig's server is no Service address");
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
