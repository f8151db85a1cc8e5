//! deploy/ as kustomize sees it: the base and every overlay rendered by the real `kubectl
//! kustomize` (v1.20.2, built by setup.sh), each overlay's settings landing in the DaemonSet's
//! resolved command line and image, and every rendered object accepted by a real kube-apiserver
//! v1.20.2 (`kubectl apply --dry-run=server`), which validates and defaults them as it would on a
//! cluster. A broken object is refused the same way, so the acceptance means something.
//! Needs root (the API server runs in a test namespace); fails (never skips) without the binaries.

use std::path::Path;

use tests::{
    deploy::{Manifest, NodeFields, deploy_dir},
    testbed::{Netns, WorkDir, require_privileges, run, unique_id},
    tools::{RealApiServer, tool},
};

const OVERLAYS: &[&str] = &["kind", "k3s", "example"];

fn flag<'a>(cmd: &'a [String], name: &str) -> &'a str {
    let prefix = format!("{name}=");
    let mut found = cmd.iter().filter_map(|a| a.strip_prefix(&prefix));
    let v = found.next().unwrap_or_else(|| panic!("{name} missing from {cmd:?}"));
    assert!(found.next().is_none(), "{name} given twice: {cmd:?}");
    v
}

fn images(m: &Manifest) -> Vec<String> {
    let spec = m.pod_spec();
    ["initContainers", "containers"]
        .iter()
        .filter_map(|k| spec[k].as_array())
        .flatten()
        .map(|c| c["image"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn every_overlay_renders_with_its_settings_on_the_base() {
    let node = NodeFields { name: "node-a", host_ip: "192.0.2.10" };
    let (base, _) = Manifest::kustomize(&deploy_dir().join("base")).expect("kubectl kustomize deploy/base");
    // The rendered base is the file a user can apply without kustomize.
    assert_eq!(base.docs, Manifest::base().docs);
    let base_cmd = base.command_line("ebpf-proxy", &node).unwrap();
    for overlay in OVERLAYS {
        let dir = deploy_dir().join("overlays").join(overlay);
        let (m, _) = Manifest::kustomize(&dir).unwrap_or_else(|e| panic!("{overlay}: {e:#}"));
        let data = m.config_map();
        let cmd = m.command_line("ebpf-proxy", &node).unwrap();
        // The overlay's ConfigMap keys are what the container runs with.
        let wants = std::fs::read_to_string(dir.join("node-settings.yaml")).unwrap();
        for (key, flag_name) in [
            ("api-server", "--master"),
            ("cluster-cidr", "--cluster-cidr"),
            ("pod-interface-name-prefix", "--pod-interface-name-prefix"),
        ] {
            let value = data[key].as_str().unwrap();
            assert!(wants.contains(&format!("{key}: {value}")), "{overlay}: {key} is the overlay's, not the base's");
            assert_eq!(flag(&cmd, flag_name), value, "{overlay}");
        }
        // Everything else of the command line is the base's.
        let rest = |c: &[String]| -> Vec<String> {
            c.iter()
                .filter(|a| !["--master=", "--cluster-cidr=", "--pod-interface-"].iter().any(|p| a.starts_with(p)))
                .cloned()
                .collect()
        };
        assert_eq!(rest(&cmd), rest(&base_cmd), "{overlay}");
        // One image for every container, the overlay's.
        let kustomization = std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap();
        let imgs = images(&m);
        assert!(imgs.windows(2).all(|w| w[0] == w[1]), "{overlay}: {imgs:?}");
        let (name, tag) = imgs[0].rsplit_once(':').unwrap();
        assert!(kustomization.contains(&format!("newTag: {tag}")), "{overlay}: {}", imgs[0]);
        if name != "localhost/ebpf-proxy" {
            assert!(kustomization.contains(&format!("newName: {name}")), "{overlay}: {}", imgs[0]);
        }
    }
    // The overlays differ from each other where clusters do.
    let servers: Vec<String> = OVERLAYS
        .iter()
        .map(|o| {
            let (m, _) = Manifest::kustomize(&deploy_dir().join("overlays").join(o)).unwrap();
            m.config_map()["api-server"].as_str().unwrap().to_owned()
        })
        .collect();
    assert!(servers.iter().all(|s| servers.iter().filter(|t| *t == s).count() == 1), "{servers:?}");
}

/// `kubectl apply --dry-run=server -f FILE` against the real API server: its output or error.
fn dry_run(ns: &Netns, kubeconfig: &Path, file: &Path) -> anyhow::Result<String> {
    run(ns
        .command(tool("kubectl"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["apply", "--dry-run=server", "-f"])
        .arg(file))
}

#[test]
fn every_rendered_object_is_accepted_by_the_real_api_server() {
    require_privileges().unwrap();
    let id = unique_id();
    let ns = Netns::new(format!("epx-{id}-dm")).unwrap();
    let work = WorkDir(std::env::temp_dir().join(format!("epx-{id}")));
    std::fs::create_dir_all(&work.0).unwrap();
    let server = RealApiServer::start(&ns, &work.0).unwrap_or_else(|e| panic!("{e:#}"));
    let kubeconfig = work.0.join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    for dir in std::iter::once("base".to_owned()).chain(OVERLAYS.iter().map(|o| format!("overlays/{o}"))) {
        let (m, text) = Manifest::kustomize(&deploy_dir().join(&dir)).unwrap();
        let file = work.0.join(format!("{}.yaml", dir.replace('/', "-")));
        std::fs::write(&file, &text).unwrap();
        let out = dry_run(&ns, &kubeconfig, &file).unwrap_or_else(|e| panic!("{dir}: {e:#}"));
        // One line per object, each accepted by the server (not only by the client).
        for doc in &m.docs {
            let kind = doc["kind"].as_str().unwrap().to_lowercase();
            let name = doc["metadata"]["name"].as_str().unwrap();
            // `daemonset.apps/ebpf-proxy created (server dry run)`
            let accepted = out.lines().any(|l| {
                l.split_once('/').is_some_and(|(resource, rest)| {
                    resource.split('.').next() == Some(kind.as_str()) && rest.starts_with(&format!("{name} "))
                }) && l.ends_with("(server dry run)")
            });
            assert!(accepted, "{dir}: {kind}/{name} not accepted:\n{out}");
        }
        assert_eq!(out.lines().count(), m.docs.len(), "{dir}:\n{out}");
    }
    // The same path refuses what a cluster would: a container name the API forbids.
    let mut ds = Manifest::base().find("DaemonSet").clone();
    ds["spec"]["template"]["spec"]["initContainers"][1]["name"] = "Clean_Up".into();
    let file = work.0.join("broken.json");
    std::fs::write(&file, ds.to_string()).unwrap();
    let e = dry_run(&ns, &kubeconfig, &file).expect_err("an invalid container name");
    assert!(format!("{e:#}").contains("Clean_Up"), "{e:#}");
}
