//! UDP flows to endpoints that stopped serving. UDP has no connection to break: a client whose
//! conntrack entry still points at a deleted pod sends into the void until the entry expires. So
//! kube-proxy deletes the conntrack entries of UDP endpoints that are gone or no longer serving
//! (kubernetes#48370, #139628); here the entries live in our own maps — `CONNTRACK` for the tc path,
//! `SOCK_FLOWS` for unconnected sendmsg() — and the next datagram of the flow picks a live backend.
//!
//! As in kube-proxy, an endpoint that is terminating but still serving keeps its flows.

use std::collections::{BTreeMap, BTreeSet};

use proxy_common::{Backend, CtEntry, CtKey, FrontendKey, PROTO_UDP, SockFlow, SockFlowKey, addr_to_map, port_to_map};

use crate::{
    model::Model,
    translate::{DesiredMaps, NodeContext, frontend_addresses},
};

/// Where a UDP flow goes: the frontend's `service_id` and the backend's address and port (map byte
/// order).
pub type FlowTarget = (u32, u32, u16);

/// Every (frontend, serving endpoint) pair of the UDP Service ports: flows to anything else are stale.
pub fn serving_udp(model: &Model, node: &NodeContext, desired: &DesiredMaps) -> BTreeSet<FlowTarget> {
    let mut out = BTreeSet::new();
    // Translation gives a frontend address used by two Service ports to the first: same order here.
    let mut seen = BTreeSet::new();
    for sp in model.ports.values().filter(|sp| sp.name.protocol.number() == PROTO_UDP) {
        for (ip, port, _) in frontend_addresses(sp, node) {
            let key =
                FrontendKey { addr: addr_to_map(ip.octets()), port: port_to_map(port), proto: PROTO_UDP, _pad: 0 };
            if !seen.insert(key) {
                continue;
            }
            let Some(fe) = desired.frontends.get(&key) else { continue };
            for ep in sp.endpoints.iter().filter(|e| e.serving) {
                out.insert((fe.service_id, addr_to_map(ep.addr.octets()), port_to_map(ep.port)));
            }
        }
    }
    out
}

/// The UDP connections to endpoints no longer serving (removed with both directions).
pub fn stale_conntrack<'a>(
    entries: impl IntoIterator<Item = (&'a CtKey, &'a CtEntry)>,
    serving: &BTreeSet<FlowTarget>,
) -> Vec<(CtKey, CtEntry)> {
    entries
        .into_iter()
        .filter(|(k, e)| k.proto == PROTO_UDP && !serving.contains(&(e.service_id, e.nat_addr, e.nat_port)))
        .map(|(k, e)| (*k, *e))
        .collect()
}

/// The socket-path UDP flows pinned to a backend that is gone or no longer serving.
pub fn stale_sock_flows<'a>(
    flows: impl IntoIterator<Item = (&'a SockFlowKey, &'a SockFlow)>,
    backends: &BTreeMap<u32, Backend>,
    serving: &BTreeSet<FlowTarget>,
) -> Vec<SockFlowKey> {
    flows
        .into_iter()
        .filter(|(k, f)| {
            k.proto == PROTO_UDP
                && backends.get(&f.backend_id).is_none_or(|b| !serving.contains(&(f.service_id, b.addr, b.port)))
        })
        .map(|(k, _)| *k)
        .collect()
}

/// Whether a sync removed a serving UDP endpoint (only then is a walk of the maps worth it).
pub fn lost_any(before: &BTreeSet<FlowTarget>, after: &BTreeSet<FlowTarget>) -> bool {
    before.difference(after).next().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_common::PROTO_TCP;

    const SVC: u32 = 7;

    fn a(last: u8) -> u32 {
        addr_to_map([10, 244, 1, last])
    }

    fn flow(proto: u8, backend: u8) -> (CtKey, CtEntry) {
        let client = addr_to_map([10, 244, 2, 9]);
        let vip = addr_to_map([10, 96, 0, 53]);
        let (p53, p5353, client_port) = (port_to_map(53), port_to_map(5353), port_to_map(4000 + u16::from(backend)));
        let entry = CtEntry { service_id: SVC, nat_addr: a(backend), nat_port: p5353, ..Default::default() };
        (CtKey::new(client, vip, client_port, p53, proto), entry)
    }

    #[test]
    fn udp_flows_to_endpoints_that_stopped_serving_are_stale() {
        let ct: BTreeMap<CtKey, CtEntry> = [flow(PROTO_UDP, 2), flow(PROTO_UDP, 3), flow(PROTO_TCP, 2)].into();
        let serving = BTreeSet::from([(SVC, a(3), port_to_map(5353))]);
        let stale = stale_conntrack(&ct, &serving);
        assert_eq!(stale.len(), 1, "{stale:?}");
        assert!(stale.iter().all(|(k, e)| k.proto == PROTO_UDP && e.nat_addr == a(2)), "TCP is never purged");
        // The same endpoint serving another frontend does not keep this frontend's flows.
        assert_eq!(stale_conntrack(&ct, &BTreeSet::from([(SVC + 1, a(2), port_to_map(5353))])).len(), 2);
    }

    #[test]
    fn socket_flows_to_gone_or_not_serving_backends_are_stale() {
        let be = |last| Backend { addr: a(last), port: port_to_map(5353), proto: PROTO_UDP, flags: 0 };
        let backends = BTreeMap::from([(1, be(2)), (2, be(3))]);
        let key = |cookie| SockFlowKey { cookie, addr: 0, port: 0, proto: PROTO_UDP, _pad: 0 };
        let f = |backend_id| SockFlow { last_seen_ns: 0, backend_id, service_id: SVC };
        let flows = [(key(1), f(1)), (key(2), f(2)), (key(3), f(9))];
        let serving = BTreeSet::from([(SVC, a(3), port_to_map(5353))]);
        let stale = stale_sock_flows(flows.iter().map(|(k, f)| (k, f)), &backends, &serving);
        assert_eq!(stale, vec![key(1), key(3)]);
    }

    #[test]
    fn only_a_lost_endpoint_triggers_a_walk() {
        let one = BTreeSet::from([(SVC, a(2), 1)]);
        let two = BTreeSet::from([(SVC, a(2), 1), (SVC, a(3), 1)]);
        assert!(!lost_any(&one, &two));
        assert!(lost_any(&two, &one));
    }
}
