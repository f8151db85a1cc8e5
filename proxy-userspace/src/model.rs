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

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use proxy_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};

use crate::objects::Objects;

/// Label naming the proxy that should handle a Service (kube-proxy ignores Services that carry it).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Label joining an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

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
}

/// One Service port with everything the datapath needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: ServicePortName,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    /// All endpoints of the port, sorted, as the slices list them (before choosing which to use).
    pub endpoints: Vec<Endpoint>,
}

impl ServicePort {
    /// The endpoints that take new connections, as kube-proxy's `CategorizeEndpoints` picks them for
    /// cluster-wide traffic: the ready ones, or if none is ready, those still serving while terminating.
    pub fn usable_endpoints(&self) -> Vec<&Endpoint> {
        let ready: Vec<_> = self.endpoints.iter().filter(|e| e.ready).collect();
        if !ready.is_empty() {
            return ready;
        }
        self.endpoints.iter().filter(|e| e.serving && e.terminating).collect()
    }
}

/// The whole desired state, and what had to be skipped to build it.
#[derive(Clone, Debug, Default)]
pub struct Model {
    pub ports: BTreeMap<ServicePortName, ServicePort>,
    /// One line per skipped object or field.
    pub errors: Vec<String>,
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
    // Service ports by (namespace, name) → [(port name, protocol, service port)].
    let mut by_service: BTreeMap<(String, String), Vec<ServicePort>> = BTreeMap::new();
    for svc in &objects.services {
        let (ns, name) = meta_name(&svc.metadata);
        match service_ports(svc, opts) {
            Ok(ports) if !ports.is_empty() => {
                by_service.insert((ns, name), ports);
            }
            Ok(_) => {}
            Err(e) => model.errors.push(format!("Service {ns}/{name} skipped: {e}")),
        }
    }
    let mut seen_endpoints: BTreeMap<ServicePortName, BTreeSet<(Ipv4Addr, u16)>> = BTreeMap::new();
    for slice in &objects.slices {
        let (ns, slice_name) = meta_name(&slice.metadata);
        let labels = slice.metadata.labels.as_ref();
        let Some(svc_name) = labels.and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
            model.errors.push(format!("EndpointSlice {ns}/{slice_name} skipped: no {SERVICE_NAME_LABEL} label"));
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
                model.errors.push(format!(
                    "EndpointSlice {ns}/{slice_name} skipped: address type {} is not supported",
                    slice.address_type
                ));
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
        out.push(ServicePort {
            name: ServicePortName { namespace: namespace.clone(), name: name.clone(), port: port_name, protocol },
            cluster_ip,
            port,
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

/// Adds the endpoints of `slice` that serve `sp` (matched by port name and protocol).
fn add_slice_endpoints(
    slice: &EndpointSlice,
    sp: &mut ServicePort,
    seen: &mut BTreeMap<ServicePortName, BTreeSet<(Ipv4Addr, u16)>>,
    errors: &mut Vec<String>,
) {
    let (ns, slice_name) = meta_name(&slice.metadata);
    let Some(slice_port) = slice.ports.iter().flatten().find(|p| {
        p.name.clone().unwrap_or_default() == sp.name.port
            && Protocol::parse(p.protocol.as_deref()) == Some(sp.name.protocol)
    }) else {
        return;
    };
    let Some(port) = slice_port.port.and_then(|p| u16::try_from(p).ok()).filter(|&p| p != 0) else {
        errors.push(format!("EndpointSlice {ns}/{slice_name}: port {:?} has no valid port number", sp.name.port));
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
            errors.push(format!("EndpointSlice {ns}/{slice_name}: endpoint address {addr:?} is not an IPv4 address"));
            continue;
        };
        // The same endpoint can appear in two slices while it moves between them: count it once.
        if !seen.insert((addr, port)) {
            continue;
        }
        sp.endpoints.push(Endpoint {
            addr,
            port,
            ready,
            serving,
            terminating,
            node_name: ep.node_name.clone(),
            zone: ep.zone.clone(),
        });
    }
}
