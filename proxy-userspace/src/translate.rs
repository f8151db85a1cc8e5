//! Model → map entries: the exact contents the datapath maps should hold. Pure apart from the ID
//! allocator, whose state is passed in so that IDs stay stable across syncs and restarts.

use std::collections::{BTreeMap, BTreeSet};

use proxy_common::{
    BACKEND_STATE_ACTIVE, Backend, BackendSlotKey, FRONTEND_F_CLUSTER_IP, Frontend, FrontendKey, PROTO_SCTP, RevNat,
    ServiceAddr, addr_to_map, port_to_map,
};

use crate::model::Model;

/// The desired contents of every load-balancing map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredMaps {
    pub frontends: BTreeMap<FrontendKey, Frontend>,
    pub slots: BTreeMap<BackendSlotKey, u32>,
    pub backends: BTreeMap<u32, Backend>,
    pub rev_nat: BTreeMap<u32, RevNat>,
    pub service_addrs: BTreeMap<u32, ServiceAddr>,
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

    fn service_id(&mut self, key: FrontendKey, next: &mut u32) -> u32 {
        *self.frontends.entry(key).or_insert_with(|| {
            let id = *next;
            *next += 1;
            id
        })
    }

    fn backend_id(&mut self, key: BackendKey, next: &mut u32) -> u32 {
        *self.backends.entry(key).or_insert_with(|| {
            let id = *next;
            *next += 1;
            id
        })
    }
}

/// Translates the model into map entries, allocating IDs for new frontends and backends and freeing
/// those nothing uses any more.
pub fn translate(model: &Model, ids: &mut Ids) -> (DesiredMaps, Vec<String>) {
    let mut out = DesiredMaps::default();
    let mut notes = Vec::new();
    let mut wanted_frontends = BTreeSet::new();
    let mut wanted_backends = BTreeSet::new();
    // New IDs come after the highest one in use: freed IDs are not reused at once, so an ID seen in a
    // conntrack entry or a log line keeps meaning one thing for as long as possible.
    let mut next_service = next_id(ids.frontends.values());
    let mut next_backend = next_id(ids.backends.values());

    for sp in model.ports.values() {
        let proto = sp.name.protocol.number();
        if proto == PROTO_SCTP {
            notes.push(format!("Service port {} skipped: SCTP is not handled by the datapath", sp.name));
            continue;
        }
        let key = FrontendKey { addr: addr_to_map(sp.cluster_ip.octets()), port: port_to_map(sp.port), proto, _pad: 0 };
        let service_id = ids.service_id(key, &mut next_service);
        wanted_frontends.insert(key);
        let endpoints = sp.usable_endpoints();
        let count = u16::try_from(endpoints.len()).unwrap_or(u16::MAX);
        if usize::from(count) < endpoints.len() {
            notes.push(format!(
                "Service port {}: only the first {count} of {} endpoints are used",
                sp.name,
                endpoints.len()
            ));
        }
        for (slot, ep) in endpoints.iter().take(count.into()).enumerate() {
            let backend = Backend {
                addr: addr_to_map(ep.addr.octets()),
                port: port_to_map(ep.port),
                proto,
                state: BACKEND_STATE_ACTIVE,
            };
            let bkey = (backend.addr, backend.port, backend.proto);
            let backend_id = ids.backend_id(bkey, &mut next_backend);
            wanted_backends.insert(bkey);
            out.backends.insert(backend_id, backend);
            out.slots.insert(BackendSlotKey { service_id, slot: slot as u32 }, backend_id);
        }
        out.frontends.insert(key, Frontend { service_id, backend_count: count, flags: FRONTEND_F_CLUSTER_IP });
        out.rev_nat.insert(service_id, RevNat { addr: key.addr, port: key.port, _pad: 0 });
        out.service_addrs.entry(key.addr).or_default().frontends += 1;
    }
    ids.frontends.retain(|k, _| wanted_frontends.contains(k));
    ids.backends.retain(|k, _| wanted_backends.contains(k));
    (out, notes)
}
