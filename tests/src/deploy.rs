//! The manifests in deploy/ as a node runs them: the base read from its file or a kustomization
//! rendered by the real kubectl, and a container's command line resolved as the kubelet resolves it
//! (`$(VAR)` expanded from the container's env: field references from the node, ConfigMap keys
//! from the manifest's ConfigMap).

use std::{collections::HashMap, path::Path, process::Command};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize as _;
use serde_json::Value;

use crate::{testbed::run, tools::tool};

/// The repository's deploy/ directory.
pub fn deploy_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// A set of rendered objects.
pub struct Manifest {
    pub docs: Vec<Value>,
}

/// What the kubelet knows of the node a pod runs on.
pub struct NodeFields<'a> {
    pub name: &'a str,
    pub host_ip: &'a str,
}

impl Manifest {
    pub fn parse(text: &str) -> Result<Self> {
        let mut docs = Vec::new();
        for d in serde_yaml::Deserializer::from_str(text) {
            let v = serde_json::to_value(serde_yaml::Value::deserialize(d)?)?;
            if !v.is_null() {
                docs.push(v);
            }
        }
        Ok(Self { docs })
    }

    /// deploy/base/ebpf-proxy.yaml, as it is.
    pub fn base() -> Self {
        let path = deploy_dir().join("base/ebpf-proxy.yaml");
        Self::parse(&std::fs::read_to_string(&path).unwrap()).expect("deploy/base/ebpf-proxy.yaml")
    }

    /// `kubectl kustomize DIR` with the kubectl setup.sh built. Returns the objects and the text.
    pub fn kustomize(dir: &Path) -> Result<(Self, String)> {
        let text = run(Command::new(tool("kubectl")).arg("kustomize").arg(dir))?;
        Ok((Self::parse(&text)?, text))
    }

    pub fn find(&self, kind: &str) -> &Value {
        self.docs.iter().find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("no {kind} in the manifest"))
    }

    pub fn config_map(&self) -> &serde_json::Map<String, Value> {
        self.find("ConfigMap")["data"].as_object().expect("ConfigMap data")
    }

    pub fn pod_spec(&self) -> &Value {
        &self.find("DaemonSet")["spec"]["template"]["spec"]
    }

    /// A container or init container by name.
    pub fn container(&self, name: &str) -> &Value {
        let spec = self.pod_spec();
        ["containers", "initContainers"]
            .iter()
            .filter_map(|k| spec[k].as_array())
            .flatten()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no container {name}"))
    }

    /// The container's command and args, `$(VAR)` expanded as the kubelet does.
    pub fn command_line(&self, container: &str, node: &NodeFields) -> Result<Vec<String>> {
        let c = self.container(container);
        let mut env = HashMap::new();
        for e in c["env"].as_array().into_iter().flatten() {
            let name = e["name"].as_str().context("env name")?.to_owned();
            let from = &e["valueFrom"];
            let value = if let Some(v) = e["value"].as_str() {
                v.to_owned()
            } else if let Some(path) = from["fieldRef"]["fieldPath"].as_str() {
                match path {
                    "spec.nodeName" => node.name.to_owned(),
                    "status.hostIP" => node.host_ip.to_owned(),
                    _ => bail!("env {name}: field {path} is not known here"),
                }
            } else if let Some(key) = from["configMapKeyRef"]["key"].as_str() {
                let cm = from["configMapKeyRef"]["name"].as_str().context("configMapKeyRef name")?;
                let map = self.find("ConfigMap");
                if map["metadata"]["name"] != cm {
                    bail!("env {name}: ConfigMap {cm} is not the manifest's");
                }
                self.config_map()[key].as_str().with_context(|| format!("env {name}: no key {key}"))?.to_owned()
            } else {
                bail!("env {name}: unsupported source {from}")
            };
            env.insert(name, value);
        }
        let words = ["command", "args"].iter().filter_map(|k| c[k].as_array()).flatten();
        words
            .map(|w| {
                let mut w = w.as_str().context("a command word")?.to_owned();
                for (k, v) in &env {
                    w = w.replace(&format!("$({k})"), v);
                }
                if let Some(i) = w.find("$(") {
                    bail!("{w}: {} is not in the container's env", &w[i..]);
                }
                Ok(w)
            })
            .collect()
    }

    /// A volume mount's path in `container`, by volume name.
    pub fn mount_path(&self, container: &str, volume: &str) -> String {
        let c = self.container(container);
        let m = c["volumeMounts"].as_array().into_iter().flatten().find(|m| m["name"] == volume);
        m.unwrap_or_else(|| panic!("{container} mounts no {volume}"))["mountPath"].as_str().unwrap().to_owned()
    }

    /// A hostPath volume's host path, by volume name.
    pub fn host_path(&self, volume: &str) -> String {
        let v = self.pod_spec()["volumes"].as_array().unwrap().iter().find(|v| v["name"] == volume);
        v.unwrap_or_else(|| panic!("no volume {volume}"))["hostPath"]["path"].as_str().unwrap().to_owned()
    }
}

/// The ConfigMap's kubeconfig.conf for a plain-HTTP test API server: no CA (there is no TLS to
/// check), the token read from `token_file` (where the kubelet would mount the service account).
pub fn plain_http_kubeconfig(kubeconfig: &str, token_file: &Path) -> String {
    kubeconfig
        .lines()
        .filter(|l| !l.trim_start().starts_with("certificate-authority:"))
        .map(|l| match l.find("tokenFile:") {
            Some(i) => format!("{}tokenFile: {}", &l[..i], token_file.display()),
            None => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

impl Manifest {
    /// Sets a key of the manifest's ConfigMap, as an overlay or an operator would.
    pub fn set_config(&mut self, key: &str, value: &str) {
        let cm = self.docs.iter_mut().find(|d| d["kind"] == "ConfigMap").expect("a ConfigMap");
        cm["data"][key] = value.into();
    }
}
