//! Model → map entries: the exact contents the datapath maps should hold. Pure apart from the ID
//! allocator, whose state is passed in so that IDs stay stable across syncs and restarts.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;
use proxy_common::{
    BACKEND_F_LOCAL, Backend, BackendSlotKey, DEFAULT_SNAT_PORT_MAX, DEFAULT_SNAT_PORT_MIN, FRONTEND_F_AFFINITY,
    FRONTEND_F_CLUSTER_IP, FRONTEND_F_ETP_LOCAL, FRONTEND_F_EXTERNAL, FRONTEND_F_HAS_ENDPOINTS, FRONTEND_F_ITP_LOCAL,
    FRONTEND_F_NODE_PORT, FRONTEND_F_SOURCE_RANGES, Frontend, FrontendKey, LOCAL_SLOT_BASE, MEMBER_F_CLUSTER,
    MEMBER_F_LOCAL, MemberKey, NODE_F_CLUSTER_CIDR, NODE_F_CONFIGURED, NODE_F_MASQUERADE_ALL, NODE_F_SERVICE_CIDR,
    NodeAddr, NodeConfig, SERVICE_ADDR_F_CLUSTER_IP, SOURCE_RANGE_ID_BITS, ServiceAddr, SourceRangeKey, addr_to_map,
    port_to_map,
};

use crate::{
    config::NodeArgs,
    model::{Endpoint, Model, ServicePort},
};

/// A `SOURCE_RANGES` key: prefix length and data.
pub type SourceRange = (u32, SourceRangeKey);

/// The desired contents of every map userspace writes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredMaps {
    pub frontends: BTreeMap<FrontendKey, Frontend>,
    pub slots: BTreeMap<BackendSlotKey, u32>,
    pub backends: BTreeMap<u32, Backend>,
    pub members: BTreeMap<MemberKey, u32>,
    pub service_addrs: BTreeMap<u32, ServiceAddr>,
    pub source_ranges: BTreeMap<SourceRange, u32>,
    /// `NODE_CONFIG` (index 0).
    pub node_config: BTreeMap<u32, NodeConfig>,
    pub node_addrs: BTreeMap<u32, NodeAddr>,
}

/// The node as translation sees it.
#[derive(Clone, Debug)]
pub struct NodeContext {
    pub name: String,
    pub zone: Option<String>,
    pub addresses: Vec<Ipv4Addr>,
    /// `--nodeport-addresses`; empty means every node address.
    pub nodeport_addresses: Vec<Ipv4Net>,
    pub cluster_cidr: Option<Ipv4Net>,
    pub service_cidr: Option<Ipv4Net>,
    pub masquerade_all: bool,
    pub snat_ports: (u16, u16),
    /// The node's network namespace cookie (`SO_NETNS_COOKIE`); 0 when unknown.
    pub host_netns_cookie: u64,
}

impl NodeContext {
    /// From the node flags, with the zone taken from the Node object of this name, if listed.
    pub fn new(args: &NodeArgs, model: &Model) -> Self {
        Self {
            name: args.node_name.clone(),
            zone: model.node_zones.get(&args.node_name).cloned(),
            addresses: args.node_ips.clone(),
            nodeport_addresses: args.nodeport_addresses.clone(),
            cluster_cidr: args.cluster_cidr,
            service_cidr: args.service_cidr,
            masquerade_all: args.masquerade_all,
            snat_ports: (DEFAULT_SNAT_PORT_MIN, DEFAULT_SNAT_PORT_MAX),
            host_netns_cookie: 0,
        }
    }

    /// The node addresses NodePorts are served on.
    pub fn nodeport_ips(&self) -> Vec<Ipv4Addr> {
        let allowed = |ip: &&Ipv4Addr| {
            self.nodeport_addresses.is_empty() || self.nodeport_addresses.iter().any(|n| n.contains(*ip))
        };
        self.addresses.iter().filter(allowed).copied().collect()
    }

    fn config(&self) -> NodeConfig {
        let mut c = NodeConfig {
            masq_addr: self.addresses.first().map_or(0, |a| addr_to_map(a.octets())),
            snat_port_min: self.snat_ports.0,
            snat_port_max: self.snat_ports.1,
            flags: NODE_F_CONFIGURED,
            host_netns_cookie: self.host_netns_cookie,
            ..Default::default()
        };
        if let Some(net) = self.cluster_cidr {
            c.cluster_cidr = addr_to_map(net.network().octets());
            c.cluster_cidr_mask = addr_to_map(net.netmask().octets());
            c.flags |= NODE_F_CLUSTER_CIDR;
        }
        if let Some(net) = self.service_cidr {
            c.service_cidr = addr_to_map(net.network().octets());
            c.service_cidr_mask = addr_to_map(net.netmask().octets());
            c.flags |= NODE_F_SERVICE_CIDR;
        }
        if self.masquerade_all {
            c.flags |= NODE_F_MASQUERADE_ALL;
        }
        c
    }
}

/// A backend's identity: the same address, port and protocol is one backend whatever Services use it.
pub type BackendKey = (u32, u16, u8);

/// Stable IDs for frontends (`service_id`) and backends. An ID is kept while its object exists and
/// freed when it is gone; new IDs come after the highest in use (see [`next_id`]). 0 is never handed out.
#[derive(Clone, Debug, Default)]
pub struct Ids {
    frontends: BTreeMap<FrontendKey, u32>,
    backends: BTreeMap<BackendKey, u32>,
}

/// The first ID to hand out: one past the highest in use, or the lowest free one once that would
/// overflow.
fn next_id<'a>(used: impl Iterator<Item = &'a u32> + Clone) -> u32 {
    match used.clone().max().map_or(Some(1), |m| m.checked_add(1)) {
        Some(id) => id,
        None => {
            let used: BTreeSet<u32> = used.copied().collect();
            (1..).find(|id| !used.contains(id)).expect("u32 IDs exhausted")
        }
    }
}

impl Ids {
    /// IDs as the maps of a running datapath hold them, so a restart adopts them unchanged.
    pub fn restore(frontends: &BTreeMap<FrontendKey, Frontend>, backends: &BTreeMap<u32, Backend>) -> Self {
        Self {
            frontends: frontends.iter().map(|(k, v)| (*k, v.service_id)).collect(),
            backends: backends.iter().map(|(id, b)| ((b.addr, b.port, b.proto), *id)).collect(),
        }
    }
}

/// One translation run: IDs handed out so far and what is wanted.
struct Builder<'a> {
    ids: &'a mut Ids,
    next_service: u32,
    next_backend: u32,
    wanted_frontends: BTreeSet<FrontendKey>,
    wanted_backends: BTreeSet<BackendKey>,
    out: DesiredMaps,
    notes: Vec<String>,
}

impl Builder<'_> {
    fn service_id(&mut self, key: FrontendKey) -> u32 {
        self.wanted_frontends.insert(key);
        let next = &mut self.next_service;
        *self.ids.frontends.entry(key).or_insert_with(|| {
            let id = *next;
            *next += 1;
            id
        })
    }

    fn backend_id(&mut self, backend: Backend) -> u32 {
        let key = (backend.addr, backend.port, backend.proto);
        self.wanted_backends.insert(key);
        let next = &mut self.next_backend;
        let id = *self.ids.backends.entry(key).or_insert_with(|| {
            let id = *next;
            *next += 1;
            id
        });
        self.out.backends.insert(id, backend);
        id
    }

    /// Writes one backend set's slots and memberships; returns its size.
    fn slots(&mut self, service_id: u32, base: u32, set: &[&Endpoint], proto: u8, node: &str, sp: &str) -> u16 {
        let member = if base == LOCAL_SLOT_BASE { MEMBER_F_LOCAL } else { MEMBER_F_CLUSTER };
        let count = u16::try_from(set.len()).unwrap_or(u16::MAX);
        if usize::from(count) < set.len() {
            self.notes.push(format!("Service port {sp}: only the first {count} of {} endpoints are used", set.len()));
        }
        for (i, ep) in set.iter().take(count.into()).enumerate() {
            let flags = if ep.is_local(node) { BACKEND_F_LOCAL } else { 0 };
            let backend = Backend { addr: addr_to_map(ep.addr.octets()), port: port_to_map(ep.port), proto, flags };
            let id = self.backend_id(backend);
            self.out.slots.insert(BackendSlotKey { service_id, slot: base + i as u32 }, id);
            *self.out.members.entry(MemberKey { service_id, backend_id: id }).or_default() |= member;
        }
        count
    }
}

/// What kind of frontend the flags describe, for people.
pub fn describe_frontend(flags: u16) -> &'static str {
    if flags & FRONTEND_F_CLUSTER_IP != 0 {
        "ClusterIP"
    } else if flags & FRONTEND_F_NODE_PORT != 0 {
        "NodePort"
    } else if flags & FRONTEND_F_SOURCE_RANGES != 0 {
        "LoadBalancer IP with source ranges"
    } else {
        "externalIP or LoadBalancer IP"
    }
}

/// The traffic policies of a Service port, for people.
pub fn describe_policy(sp: &ServicePort, cat: &crate::model::Categorized<'_>) -> String {
    let p = &sp.policy;
    let mut parts = vec![
        format!("internalTrafficPolicy {}", if p.internal_policy_local { "Local" } else { "Cluster" }),
        format!("externalTrafficPolicy {}", if p.external_policy_local { "Local" } else { "Cluster" }),
    ];
    if let Some(t) = p.affinity_timeout_s {
        parts.push(format!("sessionAffinity ClientIP ({t}s)"));
    }
    if !p.source_ranges.is_empty() {
        let r: Vec<String> = p.source_ranges.iter().map(ToString::to_string).collect();
        parts.push(format!("loadBalancerSourceRanges {}", r.join(",")));
    }
    if !cat.has_any {
        parts.push("no usable endpoints anywhere: rejected".into());
    }
    parts.join("; ")
}

/// Every address a Service port is reachable on, with the frontend flags of each.
pub fn frontend_addresses(sp: &ServicePort, node: &NodeContext) -> Vec<(Ipv4Addr, u16, u16)> {
    let p = &sp.policy;
    let etp = if p.external_policy_local { FRONTEND_F_ETP_LOCAL } else { 0 };
    let itp = if p.internal_policy_local { FRONTEND_F_ITP_LOCAL } else { 0 };
    let mut out = vec![(sp.cluster_ip, sp.port, FRONTEND_F_CLUSTER_IP | itp)];
    if let Some(np) = sp.node_port {
        out.extend(
            node.nodeport_ips().into_iter().map(|ip| (ip, np, FRONTEND_F_EXTERNAL | FRONTEND_F_NODE_PORT | etp)),
        );
    }
    out.extend(p.external_ips.iter().map(|ip| (*ip, sp.port, FRONTEND_F_EXTERNAL | etp)));
    let ranges = if p.source_ranges.is_empty() { 0 } else { FRONTEND_F_SOURCE_RANGES };
    out.extend(p.load_balancer_ips.iter().map(|ip| (*ip, sp.port, FRONTEND_F_EXTERNAL | etp | ranges)));
    out
}

/// loadBalancerSourceRanges of one LB frontend. As kube-proxy: when a range contains the primary node
/// address, traffic from the LB IPs themselves (a VIP held by the node loops back with itself as
/// source) is allowed too. Other node addresses get no such pass.
fn source_ranges(sp: &ServicePort, node: &NodeContext, service_id: u32) -> Vec<SourceRange> {
    let mut nets = sp.policy.source_ranges.clone();
    if let Some(primary) = node.addresses.first()
        && nets.iter().any(|n| n.contains(primary))
    {
        nets.extend(sp.policy.load_balancer_ips.iter().map(|a| Ipv4Net::from(*a)));
    }
    nets.iter()
        .map(|n| {
            let key = SourceRangeKey { service_id_be: service_id.to_be(), addr: addr_to_map(n.network().octets()) };
            (SOURCE_RANGE_ID_BITS + u32::from(n.prefix_len()), key)
        })
        .collect()
}

/// Translates the model into map entries, allocating IDs for new frontends and backends and freeing
/// those nothing uses any more.
pub fn translate(model: &Model, node: &NodeContext, ids: &mut Ids) -> (DesiredMaps, Vec<String>) {
    // New IDs come after the highest one in use: freed IDs are not reused at once, so an ID seen in a
    // conntrack entry or a log line keeps meaning one thing for as long as possible.
    let next_service = next_id(ids.frontends.values());
    let next_backend = next_id(ids.backends.values());
    let mut b = Builder {
        ids,
        next_service,
        next_backend,
        wanted_frontends: BTreeSet::new(),
        wanted_backends: BTreeSet::new(),
        out: DesiredMaps::default(),
        notes: Vec::new(),
    };
    b.out.node_config.insert(0, node.config());
    for a in &node.addresses {
        b.out.node_addrs.insert(addr_to_map(a.octets()), NodeAddr { flags: 0 });
    }
    let mut owners: BTreeMap<FrontendKey, String> = BTreeMap::new();
    for sp in model.ports.values() {
        let proto = sp.name.protocol.number();
        let cat = sp.categorize(&node.name, node.zone.as_deref());
        let mut common = if cat.has_any { FRONTEND_F_HAS_ENDPOINTS } else { 0 };
        if sp.policy.affinity_timeout_s.is_some() {
            common |= FRONTEND_F_AFFINITY;
        }
        let name = sp.name.to_string();
        for (ip, port, flags) in frontend_addresses(sp, node) {
            let addr = addr_to_map(ip.octets());
            let key = FrontendKey { addr, port: port_to_map(port), proto, _pad: 0 };
            if let Some(owner) = owners.get(&key) {
                b.notes.push(format!("Service port {name}: {ip}:{port} is already used by {owner}; left to it"));
                continue;
            }
            owners.insert(key, name.clone());
            let service_id = b.service_id(key);
            let backend_count = b.slots(service_id, 0, &cat.cluster, proto, &node.name, &name);
            let local_count = b.slots(service_id, LOCAL_SLOT_BASE, &cat.local, proto, &node.name, &name);
            let fe = Frontend {
                service_id,
                backend_count,
                local_count,
                flags: common | flags,
                _pad: 0,
                affinity_timeout_s: sp.policy.affinity_timeout_s.unwrap_or(0),
            };
            if flags & FRONTEND_F_SOURCE_RANGES != 0 {
                for r in source_ranges(sp, node, service_id) {
                    b.out.source_ranges.insert(r, 1);
                }
            }
            b.out.frontends.insert(key, fe);
            // Node addresses carry NodePorts but are not Service addresses: other traffic to them
            // (fragments included) is the node's own.
            if !node.addresses.contains(&ip) {
                let sa = b.out.service_addrs.entry(addr).or_default();
                sa.frontends = sa.frontends.saturating_add(1);
                if flags & FRONTEND_F_CLUSTER_IP != 0 {
                    sa.flags |= SERVICE_ADDR_F_CLUSTER_IP;
                }
            }
        }
    }
    let Builder { ids, wanted_frontends, wanted_backends, out, notes, .. } = b;
    ids.frontends.retain(|k, _| wanted_frontends.contains(k));
    ids.backends.retain(|k, _| wanted_backends.contains(k));
    (out, notes)
}
