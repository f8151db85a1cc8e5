//! Load-balancing maps: Service frontends, their backend slots, backends and reverse NAT.
//!
//! A *frontend* is one Service port on one address (ClusterIP, NodePort on a node address, external or
//! LoadBalancer IP) and protocol. Each frontend has a `service_id` that is also its reverse-NAT index.
//! Its backends are listed in `BACKEND_SLOTS` under slots `0..backend_count`; a slot holds a backend id,
//! and `BACKENDS` holds the backend's address. Userspace writes backends and slots before the frontend
//! that points at them, so the datapath never sees a count larger than the slots that exist.

use crate::assert_size;

/// Key of `FRONTENDS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    /// Service address, network byte order.
    pub addr: u32,
    /// Service port, network byte order.
    pub port: u16,
    /// IP protocol (`PROTO_TCP`, `PROTO_UDP`, `PROTO_SCTP`).
    pub proto: u8,
    pub _pad: u8,
}
assert_size!(FrontendKey, 8);

/// Value of `FRONTENDS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Frontend {
    /// Identifies this frontend: key of its slots in `BACKEND_SLOTS` and of its entry in `REV_NAT`.
    pub service_id: u32,
    /// Number of usable backends, in slots `0..backend_count`. Zero means the Service has no endpoints.
    pub backend_count: u16,
    /// `FRONTEND_F_*` bits.
    pub flags: u16,
}
assert_size!(Frontend, 8);

/// The frontend is a ClusterIP.
pub const FRONTEND_F_CLUSTER_IP: u16 = 1 << 0;

/// Key of `BACKEND_SLOTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendSlotKey {
    pub service_id: u32,
    /// `0..backend_count` of the frontend.
    pub slot: u32,
}
assert_size!(BackendSlotKey, 8);

/// Value of `BACKENDS` (the key is the backend id, a `u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    /// Endpoint address, network byte order.
    pub addr: u32,
    /// Endpoint (target) port, network byte order.
    pub port: u16,
    pub proto: u8,
    /// `BACKEND_STATE_*`.
    pub state: u8,
}
assert_size!(Backend, 8);

/// The endpoint is ready and takes new connections.
pub const BACKEND_STATE_ACTIVE: u8 = 0;

/// Value of `REV_NAT` (the key is the frontend's `service_id`): the address replies must appear to come from.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNat {
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}
assert_size!(RevNat, 8);

/// Value of `SERVICE_ADDRS`, keyed by an address (`u32`, network byte order) that carries at least one
/// frontend. Lets the datapath tell Service traffic it cannot translate (fragments, truncated headers)
/// from other traffic, which it must leave alone.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceAddr {
    /// Number of frontends on this address.
    pub frontends: u32,
}
assert_size!(ServiceAddr, 4);

/// Map capacities. Sized for 30,000 Services with 10 endpoints each and room to spare; the hash maps
/// are created without preallocation so an idle node pays only for what it holds.
pub const MAX_FRONTENDS: u32 = 131_072;
pub const MAX_BACKEND_SLOTS: u32 = 1_048_576;
pub const MAX_BACKENDS: u32 = 524_288;
pub const MAX_SERVICE_ADDRS: u32 = 131_072;
