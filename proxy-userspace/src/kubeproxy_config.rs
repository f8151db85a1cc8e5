//! `--config`: a KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1), so an operator can point
//! ebpf-proxy at the kube-proxy ConfigMap they already have. Fields that mean something here are
//! applied (a flag given on the command line still wins); fields ebpf-proxy does not support are
//! reported at start when they are set, never silently ignored; a field the API does not have is an
//! error, as kube-proxy's strict decoding makes it.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use ipnet::Ipv4Net;
use serde_yaml::{Mapping, Value};

pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";

/// What the file sets that ebpf-proxy uses.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct FileConfig {
    pub hostname_override: Option<String>,
    pub cluster_cidr: Option<Ipv4Net>,
    /// CIDRs; `primary` becomes the node's own addresses (`--node-ip`).
    pub nodeport_addresses: Option<Vec<Ipv4Net>>,
    pub nodeport_primary: bool,
    pub bind_address: Option<Ipv4Addr>,
    pub healthz_bind_address: Option<SocketAddr>,
    pub metrics_bind_address: Option<SocketAddr>,
    pub masquerade_all: Option<bool>,
    pub sync_period: Option<Duration>,
    pub min_sync_period: Option<Duration>,
    pub kubeconfig: Option<String>,
    /// `conntrack.maxPerCore` and `conntrack.min`: the connection table's size.
    pub conntrack_max_per_core: Option<u32>,
    pub conntrack_min: Option<u32>,
}

impl FileConfig {
    /// The table size kube-proxy would set (`max(maxPerCore × CPUs, min)`, `min` defaulting to
    /// 131072), if the file sets one.
    pub fn conntrack_max(&self, cpus: u32) -> Option<u32> {
        if self.conntrack_max_per_core.is_none() && self.conntrack_min.is_none() {
            return None;
        }
        let per_core = self.conntrack_max_per_core.unwrap_or(32_768);
        Some(per_core.saturating_mul(cpus).max(self.conntrack_min.unwrap_or(131_072)))
    }
}

/// The datapath's fixed conntrack lifetimes, as kube-proxy's conntrack fields spell them: a file
/// that asks for these is obeyed; one that asks for others is told they are not supported.
const CONNTRACK_TIMEOUTS: &[(&str, &str)] = &[
    ("conntrack.tcpEstablishedTimeout", "24h"),
    ("conntrack.tcpCloseWaitTimeout", "1h"),
    ("conntrack.udpTimeout", "30s"),
    ("conntrack.udpStreamTimeout", "2m"),
];

/// Known fields ebpf-proxy does not act on: reported when set to something other than their zero value.
const UNSUPPORTED: &[&str] = &[
    "featureGates",
    "clientConnection.acceptContentTypes",
    "clientConnection.contentType",
    "clientConnection.qps",
    "clientConnection.burst",
    "logging",
    "bindAddressHardFail",
    "enableProfiling",
    "showHiddenMetricsForVersion",
    "iptables.masqueradeBit",
    "iptables.localhostNodePorts",
    "nftables.masqueradeBit",
    "ipvs",
    "winkernel",
    "detectLocal",
    "oomScoreAdj",
    "conntrack.tcpBeLiberal",
    "configSyncPeriod",
    "portRange",
];

/// Every field of v1alpha1 KubeProxyConfiguration (and its nested structs ebpf-proxy reads into).
const KNOWN: &[&str] = &[
    "apiVersion",
    "kind",
    "featureGates",
    "clientConnection",
    "clientConnection.kubeconfig",
    "clientConnection.acceptContentTypes",
    "clientConnection.contentType",
    "clientConnection.qps",
    "clientConnection.burst",
    "logging",
    "hostnameOverride",
    "bindAddress",
    "healthzBindAddress",
    "metricsBindAddress",
    "bindAddressHardFail",
    "enableProfiling",
    "showHiddenMetricsForVersion",
    "mode",
    "iptables",
    "iptables.masqueradeAll",
    "iptables.masqueradeBit",
    "iptables.localhostNodePorts",
    "iptables.syncPeriod",
    "iptables.minSyncPeriod",
    "ipvs",
    "nftables",
    "nftables.masqueradeAll",
    "nftables.masqueradeBit",
    "nftables.syncPeriod",
    "nftables.minSyncPeriod",
    "winkernel",
    "detectLocalMode",
    "detectLocal",
    "clusterCIDR",
    "nodePortAddresses",
    "oomScoreAdj",
    "conntrack",
    "conntrack.maxPerCore",
    "conntrack.min",
    "conntrack.tcpEstablishedTimeout",
    "conntrack.tcpCloseWaitTimeout",
    "conntrack.tcpBeLiberal",
    "conntrack.udpTimeout",
    "conntrack.udpStreamTimeout",
    "configSyncPeriod",
    "portRange",
    "syncPeriod",
    "minSyncPeriod",
];

/// Sections whose contents are not checked field by field (unsupported as a whole, or free-form).
const OPAQUE: &[&str] = &["featureGates", "logging", "ipvs", "winkernel", "detectLocal"];

fn is_zero(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty() || s == "0" || s == "0s",
        Value::Sequence(s) => s.is_empty(),
        Value::Mapping(m) => m.values().all(is_zero),
        Value::Tagged(t) => is_zero(&t.value),
    }
}

/// Every field path set in the document, depth-first (`iptables.syncPeriod`).
fn walk(prefix: &str, m: &Mapping, out: &mut Vec<(String, Value)>) {
    for (k, v) in m {
        let key = k.as_str().unwrap_or_default();
        let path = if prefix.is_empty() { key.to_owned() } else { format!("{prefix}.{key}") };
        out.push((path.clone(), v.clone()));
        if let Value::Mapping(inner) = v
            && !OPAQUE.contains(&path.as_str())
        {
            walk(&path, inner, out);
        }
    }
}

fn string(v: &Value, path: &str) -> Result<String> {
    v.as_str().map(str::to_owned).with_context(|| format!("{path}: expected a string"))
}

fn duration(v: &Value, path: &str) -> Result<Duration> {
    humantime::parse_duration(&string(v, path)?).with_context(|| format!("{path}: not a duration"))
}

fn count(v: &Value, path: &str) -> Result<u32> {
    v.as_u64().and_then(|n| u32::try_from(n).ok()).with_context(|| format!("{path}: expected a count"))
}

/// `IP:port`, or an IP alone with kube-proxy's default port.
fn bind(v: &Value, path: &str, default_port: u16) -> Result<SocketAddr> {
    crate::run::bind_address(&string(v, path)?, default_port).map_err(|e| anyhow::anyhow!("{path}: {e}"))
}

/// Parses the file. Returns what it sets and notes for the log (unsupported fields that are set).
pub fn parse(text: &str) -> Result<(FileConfig, Vec<String>)> {
    let doc: Value = serde_yaml::from_str(text).context("not YAML")?;
    let Value::Mapping(root) = doc else { bail!("expected a KubeProxyConfiguration object") };
    let api = root.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
    let kind = root.get("kind").and_then(Value::as_str).unwrap_or_default();
    if api != API_VERSION || kind != "KubeProxyConfiguration" {
        bail!("expected apiVersion {API_VERSION}, kind KubeProxyConfiguration; found {api:?}, {kind:?}");
    }
    let mut fields = Vec::new();
    walk("", &root, &mut fields);
    let mut cfg = FileConfig::default();
    let mut notes = Vec::new();
    let mode = root.get("mode").and_then(Value::as_str).unwrap_or("");
    for (path, v) in &fields {
        if !KNOWN.contains(&path.as_str()) {
            bail!("unknown field {path:?} in the KubeProxyConfiguration");
        }
        if is_zero(v) {
            continue;
        }
        if UNSUPPORTED.contains(&path.as_str()) {
            notes.push(format!("{path} is set but not supported by ebpf-proxy: ignored"));
            continue;
        }
        // Per-mode sync periods and masquerade: only the section of the configured mode counts, as
        // in kube-proxy (iptables when no mode is set).
        let section = path.split_once('.').map(|(s, _)| s);
        let active = match section {
            Some("iptables") => mode.is_empty() || mode == "iptables",
            Some("nftables") => mode == "nftables",
            _ => true,
        };
        match path.as_str() {
            "hostnameOverride" => cfg.hostname_override = Some(string(v, path)?),
            "clusterCIDR" => {
                // Dual-stack lists carry an IPv6 range too: this proxy is IPv4-only.
                let s = string(v, path)?;
                let v4 = s.split(',').map(str::trim).find_map(|c| c.parse::<Ipv4Net>().ok());
                cfg.cluster_cidr = Some(v4.with_context(|| format!("clusterCIDR {s:?} has no IPv4 range"))?);
            }
            "nodePortAddresses" => {
                let mut nets = Vec::new();
                for item in v.as_sequence().into_iter().flatten() {
                    let s = string(item, path)?;
                    if s == "primary" {
                        cfg.nodeport_primary = true;
                    } else if let Ok(n) = s.parse::<Ipv4Net>() {
                        nets.push(n);
                    } else if s.parse::<ipnet::Ipv6Net>().is_err() {
                        bail!("nodePortAddresses: {s:?} is not a CIDR");
                    }
                }
                cfg.nodeport_addresses = Some(nets);
            }
            "bindAddress" => {
                let ip: std::net::IpAddr = string(v, path)?.parse().context("bindAddress")?;
                if let std::net::IpAddr::V4(ip) = ip
                    && !ip.is_unspecified()
                {
                    cfg.bind_address = Some(ip);
                }
            }
            "healthzBindAddress" => cfg.healthz_bind_address = Some(bind(v, path, 10256)?),
            "metricsBindAddress" => cfg.metrics_bind_address = Some(bind(v, path, 10249)?),
            "iptables.masqueradeAll" | "nftables.masqueradeAll" if active => cfg.masquerade_all = v.as_bool(),
            "syncPeriod" => cfg.sync_period = Some(duration(v, path)?),
            "minSyncPeriod" => cfg.min_sync_period = Some(duration(v, path)?),
            "iptables.syncPeriod" | "nftables.syncPeriod" if active && cfg.sync_period.is_none() => {
                cfg.sync_period = Some(duration(v, path)?);
            }
            "iptables.minSyncPeriod" | "nftables.minSyncPeriod" if active && cfg.min_sync_period.is_none() => {
                cfg.min_sync_period = Some(duration(v, path)?);
            }
            "clientConnection.kubeconfig" => cfg.kubeconfig = Some(string(v, path)?),
            "conntrack.maxPerCore" => cfg.conntrack_max_per_core = Some(count(v, path)?),
            "conntrack.min" => cfg.conntrack_min = Some(count(v, path)?),
            p if CONNTRACK_TIMEOUTS.iter().any(|(name, _)| *name == p) => {
                let (_, ours) = CONNTRACK_TIMEOUTS.iter().find(|(name, _)| *name == p).expect("listed");
                if duration(v, path)? != humantime::parse_duration(ours).expect("valid") {
                    notes.push(format!("{path} is set but not supported: ebpf-proxy's datapath uses {ours}"));
                }
            }
            "detectLocalMode" if string(v, path)? != "ClusterCIDR" => {
                notes.push(format!(
                    "detectLocalMode {:?} is not supported: local traffic is detected by clusterCIDR",
                    string(v, path)?
                ));
            }
            "mode" => notes.push(format!("mode {mode:?}: ebpf-proxy replaces that datapath")),
            _ => {}
        }
    }
    Ok((cfg, notes))
}

/// Applies the file's settings to `args`, except where `explicit(flag id)` says the value was given
/// on the command line (or in the environment). Returns notes for the log.
pub fn apply(cfg: &FileConfig, args: &mut crate::run::RunArgs, explicit: impl Fn(&str) -> bool) -> Vec<String> {
    let mut notes = Vec::new();
    let node = &mut args.node;
    if let Some(v) = &cfg.hostname_override
        && !explicit("node_name")
    {
        node.node_name = v.clone();
    }
    if let Some(v) = cfg.cluster_cidr
        && !explicit("cluster_cidr")
    {
        node.cluster_cidr = Some(v);
    }
    if let Some(v) = cfg.bind_address
        && !explicit("node_ips")
        && node.node_ips.is_empty()
    {
        node.node_ips = vec![v];
    }
    if let Some(v) = &cfg.nodeport_addresses
        && !explicit("nodeport_addresses")
    {
        node.nodeport_addresses = v.clone();
        if cfg.nodeport_primary {
            node.nodeport_addresses.extend(node.node_ips.iter().map(|ip| Ipv4Net::from(*ip)));
        }
    }
    if let Some(v) = cfg.masquerade_all
        && !explicit("masquerade_all")
    {
        node.masquerade_all = v;
    }
    if let Some(v) = cfg.healthz_bind_address
        && !explicit("healthz_bind_address")
    {
        args.healthz_bind_address = v;
    }
    if let Some(v) = cfg.metrics_bind_address
        && !explicit("metrics_bind_address")
    {
        args.metrics_bind_address = v;
    }
    if let Some(v) = cfg.sync_period
        && !explicit("sync_period")
    {
        args.sync_period = v;
    }
    if let Some(v) = cfg.min_sync_period
        && !explicit("min_sync_period")
    {
        args.min_sync_period = v;
    }
    if let Some(max) = cfg.conntrack_max(crate::run::cpus())
        && !explicit("conntrack_max")
    {
        args.conntrack_max = Some(max);
    }
    if let Some(k) = &cfg.kubeconfig {
        if explicit("kubeconfig") || args.objects.is_some() {
            notes.push(format!("clientConnection.kubeconfig {k:?}: overridden by the command line"));
        } else {
            args.kubeconfig = Some(k.into());
        }
    }
    notes
}
