//! The desired state as kube-proxy sees it: Service ports with their endpoints, built from v1 Services
//! and discovery.k8s.io/v1 EndpointSlices. Pure: no I/O, no kernel.
//!
//! Follows kube-proxy's `pkg/proxy/servicechangetracker.go` and `endpointschangetracker.go`: headless,
//! ExternalName and other proxies' Services are ignored; EndpointSlices are joined to their Service by
//! the `kubernetes.io/service-name` label and to its ports by port name; the endpoint port comes from the
//! slice. A malformed Service or slice is skipped with an error, never stopping the others.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use proxy_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};

use crate::objects::{Objects, Skipped, SkippedKind};

/// Label naming the proxy that should handle a Service (kube-proxy ignores Services that carry it).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Label joining an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Node label with the node's zone (topology hints).
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// kube-proxy's default sessionAffinity ClientIP timeout (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn parse(s: Option<&str>) -> Option<Self> {
        match s.unwrap_or("TCP") {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }

    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => PROTO_TCP,
            Self::Udp => PROTO_UDP,
            Self::Sctp => PROTO_SCTP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            PROTO_TCP => Some(Self::Tcp),
            PROTO_UDP => Some(Self::Udp),
            PROTO_SCTP => Some(Self::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        })
    }
}

/// `namespace/name:port-name`, as kube-proxy's ServicePortName.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    pub port: String,
    pub protocol: Protocol,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        write!(f, "/{}", self.protocol)
    }
}

/// One endpoint of a Service port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<String>,
    pub zone: Option<String>,
    /// Topology hints: zones and nodes this endpoint is meant for.
    pub zone_hints: BTreeSet<String>,
    pub node_hints: BTreeSet<String>,
}

impl Endpoint {
    pub fn is_local(&self, node_name: &str) -> bool {
        self.node_name.as_deref() == Some(node_name)
    }
}

/// One Service port with everything the datapath needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: ServicePortName,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    /// `nodePort` (type NodePort and LoadBalancer).
    pub node_port: Option<u16>,
    /// What the Service says about its other addresses and its traffic (shared by its ports).
    pub policy: ServicePolicy,
    /// All endpoints of the port, sorted, as the slices list them (before choosing which to use).
    pub endpoints: Vec<Endpoint>,
}

/// The Service-wide fields of a Service port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServicePolicy {
    pub external_ips: Vec<Ipv4Addr>,
    /// `status.loadBalancer.ingress[].ip`, except those with `ipMode: Proxy` (type LoadBalancer).
    pub load_balancer_ips: Vec<Ipv4Addr>,
    pub source_ranges: Vec<Ipv4Net>,
    /// externalTrafficPolicy Local (only set when the Service is externally accessible, as kube-proxy).
    pub external_policy_local: bool,
    pub internal_policy_local: bool,
    /// sessionAffinity ClientIP timeout in seconds.
    pub affinity_timeout_s: Option<u32>,
    /// healthCheckNodePort (type LoadBalancer with externalTrafficPolicy Local).
    pub health_check_node_port: Option<u16>,
}

/// The endpoints a Service port uses on one node (kube-proxy's `CategorizeEndpoints`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Categorized<'a> {
    /// Cluster-wide traffic: ready endpoints (filtered by topology when it applies), else serving
    /// and terminating ones.
    pub cluster: Vec<&'a Endpoint>,
    /// Local-policy traffic: this node's ready endpoints, else its serving and terminating ones.
    pub local: Vec<&'a Endpoint>,
    /// Whether the port has usable endpoints anywhere; without, traffic is rejected.
    pub has_any: bool,
    /// The topology mode applied to the cluster-wide set, if any.
    pub topology: Option<&'static str>,
}

impl ServicePort {
    pub fn externally_accessible(&self) -> bool {
        self.node_port.is_some() || !self.policy.external_ips.is_empty() || !self.policy.load_balancer_ips.is_empty()
    }

    /// The cluster-wide set is needed (eTP Local still needs it: pods and the node short-circuit to it).
    pub fn uses_cluster_endpoints(&self) -> bool {
        !self.policy.internal_policy_local || self.externally_accessible()
    }

    pub fn uses_local_endpoints(&self) -> bool {
        self.policy.internal_policy_local || (self.policy.external_policy_local && self.externally_accessible())
    }

    /// Splits the endpoints into the cluster-wide and the local set, as kube-proxy does.
    pub fn categorize(&self, node_name: &str, zone: Option<&str>) -> Categorized<'_> {
        let mut c = Categorized::default();
        if self.uses_cluster_endpoints() {
            c.topology = topology_mode(&self.endpoints, node_name, zone);
            c.cluster = self
                .endpoints
                .iter()
                .filter(|e| e.ready && available_for_topology(e, c.topology, node_name, zone))
                .collect();
            if c.cluster.is_empty() {
                c.cluster = self.endpoints.iter().filter(|e| e.serving && e.terminating).collect();
            }
            c.has_any = !c.cluster.is_empty();
        }
        if !self.uses_local_endpoints() {
            return c;
        }
        let usable = |e: &&Endpoint| e.ready || (e.serving && e.terminating);
        c.has_any |= self.endpoints.iter().any(|e| usable(&e));
        let local = |e: &&Endpoint| e.is_local(node_name);
        c.local = self.endpoints.iter().filter(local).filter(|e| e.ready).collect();
        if c.local.is_empty() {
            c.local = self.endpoints.iter().filter(local).filter(|e| e.serving && e.terminating).collect();
        }
        c
    }
}

/// kube-proxy's `topologyModeFromHints`: PreferSameNode when every ready endpoint has node hints and
/// one is for this node; else PreferSameZone when every ready endpoint has zone hints and one is for
/// this zone; else none.
fn topology_mode(endpoints: &[Endpoint], node_name: &str, zone: Option<&str>) -> Option<&'static str> {
    let ready: Vec<_> = endpoints.iter().filter(|e| e.ready).collect();
    if ready.is_empty() {
        return None;
    }
    if ready.iter().all(|e| !e.node_hints.is_empty()) && ready.iter().any(|e| e.node_hints.contains(node_name)) {
        return Some("PreferSameNode");
    }
    let zone = zone?;
    if ready.iter().all(|e| !e.zone_hints.is_empty()) && ready.iter().any(|e| e.zone_hints.contains(zone)) {
        return Some("PreferSameZone");
    }
    None
}

fn available_for_topology(e: &Endpoint, mode: Option<&str>, node_name: &str, zone: Option<&str>) -> bool {
    match mode {
        Some("PreferSameNode") => e.node_hints.contains(node_name),
        Some("PreferSameZone") => zone.is_some_and(|z| e.zone_hints.contains(z)),
        _ => true,
    }
}

/// The whole desired state, and what had to be skipped to build it.
#[derive(Clone, Debug, Default)]
pub struct Model {
    pub ports: BTreeMap<ServicePortName, ServicePort>,
    /// Zones of the nodes listed in the objects (`topology.kubernetes.io/zone`), by node name.
    pub node_zones: BTreeMap<String, String>,
    /// Every object, or part of one, left out.
    pub errors: Vec<Skipped>,
}

/// Options that decide which objects are ours.
#[derive(Clone, Debug, Default)]
pub struct ModelOptions {
    /// `--service-proxy-name`: Services labelled with this name are ours; others with the label are not.
    pub service_proxy_name: Option<String>,
}

fn meta_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (String, String) {
    (meta.namespace.clone().unwrap_or_else(|| "default".into()), meta.name.clone().unwrap_or_default())
}

/// Builds the model from the objects.
pub fn build(objects: &Objects, opts: &ModelOptions) -> Model {
    let mut model = Model { errors: objects.errors.clone(), ..Default::default() };
    for node in &objects.nodes {
        if let (Some(name), Some(zone)) =
            (&node.metadata.name, node.metadata.labels.as_ref().and_then(|l| l.get(ZONE_LABEL)))
        {
            model.node_zones.insert(name.clone(), zone.clone());
        }
    }
    // Service ports by (namespace, name) → [(port name, protocol, service port)].
    let mut by_service: BTreeMap<(String, String), Vec<ServicePort>> = BTreeMap::new();
    for svc in &objects.services {
        let (ns, name) = meta_name(&svc.metadata);
        match service_ports(svc, opts) {
            Ok(ports) if !ports.is_empty() => {
                by_service.insert((ns, name), ports);
            }
            Ok(_) => {}
            Err(e) => model.errors.push(Skipped::object(SkippedKind::Service, format!("{ns}/{name}"), e.to_string())),
        }
    }
    let mut seen_endpoints: BTreeMap<ServicePortName, BTreeSet<(Ipv4Addr, u16)>> = BTreeMap::new();
    for slice in &objects.slices {
        let (ns, slice_name) = meta_name(&slice.metadata);
        let labels = slice.metadata.labels.as_ref();
        let Some(svc_name) = labels.and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
            let reason = format!("no {SERVICE_NAME_LABEL} label");
            model.errors.push(Skipped::object(SkippedKind::EndpointSlice, format!("{ns}/{slice_name}"), reason));
            continue;
        };
        if labels.is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL))
            && labels.and_then(|l| l.get(SERVICE_PROXY_NAME_LABEL)) != opts.service_proxy_name.as_ref()
        {
            continue;
        }
        let Some(ports) = by_service.get_mut(&(ns.clone(), svc_name.clone())) else {
            continue;
        };
        if slice.address_type != "IPv4" {
            if slice.address_type != "IPv6" {
                let reason = format!("address type {} is not supported", slice.address_type);
                model.errors.push(Skipped::object(SkippedKind::EndpointSlice, format!("{ns}/{slice_name}"), reason));
            }
            continue;
        }
        for sp in ports.iter_mut() {
            add_slice_endpoints(slice, sp, &mut seen_endpoints, &mut model.errors);
        }
    }
    for ports in by_service.into_values() {
        for mut sp in ports {
            sp.endpoints.sort();
            model.ports.insert(sp.name.clone(), sp);
        }
    }
    model
}

/// The Service ports of a Service, or why it is malformed. Ignored Services give no ports.
fn service_ports(svc: &Service, opts: &ModelOptions) -> Result<Vec<ServicePort>, String> {
    let (namespace, name) = meta_name(&svc.metadata);
    if let Some(proxy) = svc.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_PROXY_NAME_LABEL))
        && Some(proxy) != opts.service_proxy_name.as_ref()
    {
        return Ok(Vec::new());
    }
    let Some(spec) = &svc.spec else {
        return Err("no spec".into());
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(Vec::new());
    }
    let cluster_ip = match spec.cluster_ip.as_deref() {
        None | Some("") => return Err("no clusterIP".into()),
        Some("None") => return Ok(Vec::new()), // headless
        Some(ip) => ip,
    };
    let cluster_ip: Ipv4Addr = match cluster_ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(ip)) => ip,
        Ok(std::net::IpAddr::V6(_)) => return Err(format!("clusterIP {cluster_ip} is IPv6; this proxy is IPv4-only")),
        Err(_) => return Err(format!("clusterIP {cluster_ip:?} is not an IP address")),
    };
    let shared = service_wide(svc, spec)?;
    let has_node_ports = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for p in spec.ports.iter().flatten() {
        let protocol = Protocol::parse(p.protocol.as_deref())
            .ok_or_else(|| format!("port {}: unknown protocol {:?}", p.port, p.protocol.as_deref().unwrap_or("")))?;
        let port = u16::try_from(p.port)
            .ok()
            .filter(|&port| port != 0)
            .ok_or_else(|| format!("port {} is out of range", p.port))?;
        let port_name = p.name.clone().unwrap_or_default();
        if !seen.insert((port, protocol)) {
            return Err(format!("port {port}/{protocol} is listed twice"));
        }
        let node_port = match p.node_port {
            Some(np) if has_node_ports && np != 0 => {
                Some(u16::try_from(np).map_err(|_| format!("nodePort {np} is out of range"))?)
            }
            _ => None,
        };
        out.push(ServicePort {
            name: ServicePortName { namespace: namespace.clone(), name: name.clone(), port: port_name, protocol },
            cluster_ip,
            port,
            node_port,
            policy: shared.clone(),
            endpoints: Vec::new(),
        });
    }
    let mut names = BTreeSet::new();
    for sp in &out {
        if !names.insert((sp.name.port.clone(), sp.name.protocol)) {
            return Err(format!("port name {:?} is used twice for {}", sp.name.port, sp.name.protocol));
        }
    }
    Ok(out)
}

/// Parses a list of IPv4 addresses; IPv6 ones belong to the other family and are left out, anything
/// else is an error.
fn ipv4_list<'a>(what: &str, list: impl Iterator<Item = &'a str>) -> Result<Vec<Ipv4Addr>, String> {
    let mut out = Vec::new();
    for ip in list {
        match ip.trim().parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(v4)) => out.push(v4),
            Ok(std::net::IpAddr::V6(_)) => {}
            Err(_) => return Err(format!("{what} {ip:?} is not an IP address")),
        }
    }
    Ok(out)
}

/// The Service-wide fields every port shares.
fn service_wide(svc: &Service, spec: &k8s_openapi::api::core::v1::ServiceSpec) -> Result<ServicePolicy, String> {
    let ty = spec.type_.as_deref().unwrap_or("ClusterIP");
    let is_lb = ty == "LoadBalancer";
    let external_ips = ipv4_list("externalIP", spec.external_ips.iter().flatten().map(String::as_str))?;
    let load_balancer_ips = if is_lb {
        let ingress = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|l| l.ingress.as_ref());
        let ips = ingress
            .into_iter()
            .flatten()
            .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
            .filter_map(|i| i.ip.as_deref());
        ipv4_list("load balancer ingress IP", ips)?
    } else {
        Vec::new()
    };
    let mut source_ranges = Vec::new();
    if is_lb {
        for r in spec.load_balancer_source_ranges.iter().flatten() {
            match r.trim().parse::<ipnet::IpNet>() {
                Ok(ipnet::IpNet::V4(net)) => source_ranges.push(net.trunc()),
                Ok(ipnet::IpNet::V6(_)) => {}
                Err(_) => return Err(format!("loadBalancerSourceRange {r:?} is not a CIDR")),
            }
        }
    }
    let externally_accessible = matches!(ty, "NodePort" | "LoadBalancer") || !external_ips.is_empty();
    let external_policy_local = externally_accessible && spec.external_traffic_policy.as_deref() == Some("Local");
    let affinity_timeout_s = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        let cfg = spec.session_affinity_config.as_ref().and_then(|c| c.client_ip.as_ref());
        cfg.and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .filter(|&t| t > 0)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_S)
    });
    let health_check_node_port = spec
        .health_check_node_port
        .filter(|_| is_lb && external_policy_local)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|&p| p != 0);
    Ok(ServicePolicy {
        external_ips,
        load_balancer_ips,
        source_ranges,
        external_policy_local,
        internal_policy_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        affinity_timeout_s,
        health_check_node_port,
    })
}

/// Adds the endpoints of `slice` that serve `sp` (matched by port name and protocol).
fn add_slice_endpoints(
    slice: &EndpointSlice,
    sp: &mut ServicePort,
    seen: &mut BTreeMap<ServicePortName, BTreeSet<(Ipv4Addr, u16)>>,
    errors: &mut Vec<Skipped>,
) {
    let (ns, slice_name) = meta_name(&slice.metadata);
    let Some(slice_port) = slice.ports.iter().flatten().find(|p| {
        p.name.clone().unwrap_or_default() == sp.name.port
            && Protocol::parse(p.protocol.as_deref()) == Some(sp.name.protocol)
    }) else {
        return;
    };
    let Some(port) = slice_port.port.and_then(|p| u16::try_from(p).ok()).filter(|&p| p != 0) else {
        let reason = format!("port {:?} has no valid port number", sp.name.port);
        errors.push(Skipped::part(SkippedKind::EndpointSlice, format!("{ns}/{slice_name}"), reason));
        return;
    };
    let seen = seen.entry(sp.name.clone()).or_default();
    for ep in slice.endpoints.iter().flatten() {
        let conditions = ep.conditions.as_ref();
        // An unset `ready` means ready; unset `serving` follows `ready`; unset `terminating` is false.
        let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
        let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
        let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
        // Like kube-proxy, only the first address of an endpoint is used.
        let Some(addr) = ep.addresses.first() else { continue };
        let Ok(addr) = addr.parse::<Ipv4Addr>() else {
            let reason = format!("endpoint address {addr:?} is not an IPv4 address");
            errors.push(Skipped::part(SkippedKind::EndpointSlice, format!("{ns}/{slice_name}"), reason));
            continue;
        };
        // The same endpoint can appear in two slices while it moves between them: count it once.
        if !seen.insert((addr, port)) {
            continue;
        }
        let hints = ep.hints.as_ref();
        sp.endpoints.push(Endpoint {
            addr,
            port,
            ready,
            serving,
            terminating,
            node_name: ep.node_name.clone(),
            zone: ep.zone.clone(),
            zone_hints: hints
                .and_then(|h| h.for_zones.as_ref())
                .into_iter()
                .flatten()
                .map(|z| z.name.clone())
                .collect(),
            node_hints: hints
                .and_then(|h| h.for_nodes.as_ref())
                .into_iter()
                .flatten()
                .map(|n| n.name.clone())
                .collect(),
        });
    }
}
