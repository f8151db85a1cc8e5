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
///
/// A frontend has two backend sets, as kube-proxy's `CategorizeEndpoints` computes them: the
/// cluster-wide set (slots `0..backend_count`) and the set of endpoints on this node (slots
/// `LOCAL_SLOT_BASE..LOCAL_SLOT_BASE + local_count`). The flags say which set which traffic uses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Frontend {
    /// Identifies this frontend: key of its slots in `BACKEND_SLOTS` and its backends in
    /// `BACKEND_MEMBERS`.
    pub service_id: u32,
    /// Number of backends in the cluster-wide set.
    pub backend_count: u16,
    /// Number of backends in the local set.
    pub local_count: u16,
    /// `FRONTEND_F_*` bits.
    pub flags: u16,
    pub _pad: u16,
    /// sessionAffinity ClientIP timeout in seconds (with `FRONTEND_F_AFFINITY`).
    pub affinity_timeout_s: u32,
}
assert_size!(Frontend, 16);

/// The frontend is a ClusterIP (wrong ports on its address are rejected).
pub const FRONTEND_F_CLUSTER_IP: u16 = 1 << 0;
/// NodePort, LoadBalancer ingress IP or externalIP: externalTrafficPolicy applies.
pub const FRONTEND_F_EXTERNAL: u16 = 1 << 1;
/// The frontend is a NodePort on a node address.
pub const FRONTEND_F_NODE_PORT: u16 = 1 << 2;
/// externalTrafficPolicy: Local — traffic from outside uses the local set and keeps its source.
pub const FRONTEND_F_ETP_LOCAL: u16 = 1 << 3;
/// internalTrafficPolicy: Local — ClusterIP traffic uses the local set.
pub const FRONTEND_F_ITP_LOCAL: u16 = 1 << 4;
/// sessionAffinity: ClientIP.
pub const FRONTEND_F_AFFINITY: u16 = 1 << 5;
/// loadBalancerSourceRanges: only sources in `SOURCE_RANGES` for this `service_id` may use it.
pub const FRONTEND_F_SOURCE_RANGES: u16 = 1 << 6;
/// The Service port has usable endpoints somewhere in the cluster; without, traffic is rejected.
pub const FRONTEND_F_HAS_ENDPOINTS: u16 = 1 << 7;

/// First slot of a frontend's local backend set.
pub const LOCAL_SLOT_BASE: u32 = 1 << 31;

/// Key of `BACKEND_SLOTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendSlotKey {
    pub service_id: u32,
    /// `0..backend_count` of the frontend.
    pub slot: u32,
}
assert_size!(BackendSlotKey, 8);

/// Key of `BACKEND_MEMBERS`: one backend of one frontend. The value (`u32`) says which of the
/// frontend's sets hold it (`MEMBER_F_*`), so a client's affinity can follow its backend wherever the
/// backend's slot moves as other endpoints come and go.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemberKey {
    pub service_id: u32,
    pub backend_id: u32,
}
assert_size!(MemberKey, 8);

/// The backend is in the frontend's cluster-wide set.
pub const MEMBER_F_CLUSTER: u32 = 1 << 0;
/// The backend is in the frontend's local set.
pub const MEMBER_F_LOCAL: u32 = 1 << 1;

/// Value of `BACKENDS` (the key is the backend id, a `u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    /// Endpoint address, network byte order.
    pub addr: u32,
    /// Endpoint (target) port, network byte order.
    pub port: u16,
    pub proto: u8,
    /// `BACKEND_F_*` bits.
    pub flags: u8,
}
assert_size!(Backend, 8);

/// The endpoint runs on this node (replies come back through its pod interface).
pub const BACKEND_F_LOCAL: u8 = 1 << 0;

/// An address and port a socket's peer must appear to be (the socket path's reverse NAT,
/// `SOCK_REV_NAT`).
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
    pub frontends: u16,
    /// `SERVICE_ADDR_F_*` bits.
    pub flags: u16,
}
assert_size!(ServiceAddr, 4);

/// The address is a ClusterIP: traffic to a port no Service has there is rejected.
pub const SERVICE_ADDR_F_CLUSTER_IP: u16 = 1 << 0;

/// Data of a `SOURCE_RANGES` key (an LPM trie; the prefix length is 32 + the range's prefix length, so
/// a lookup with prefix length 64 finds a range of this frontend that contains the address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRangeKey {
    /// The frontend's `service_id`, big-endian so its bytes come first in prefix order.
    pub service_id_be: u32,
    /// Range address, network byte order.
    pub addr: u32,
}
assert_size!(SourceRangeKey, 8);

/// Prefix length of a `SOURCE_RANGES` key that covers exactly the `service_id`.
pub const SOURCE_RANGE_ID_BITS: u32 = 32;

/// Key of `AFFINITY`: a client of one frontend. The tc path knows the client by its address; the socket
/// path, at connect() time, only by its network namespace (`AFFINITY_CLIENT_NETNS` | netns cookie).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityKey {
    /// Client address (network byte order, zero-extended) or tagged netns cookie.
    pub client: u64,
    pub service_id: u32,
    pub _pad: u32,
}
assert_size!(AffinityKey, 16);

/// Tag of `AffinityKey::client` values that are network namespace cookies.
pub const AFFINITY_CLIENT_NETNS: u64 = 1 << 63;

/// Value of `AFFINITY`: the backend a client sticks to, for as long as that backend is in the set the
/// client's packets use (`BACKEND_MEMBERS`), as kube-proxy keeps affinity while the endpoint exists.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Affinity {
    /// `bpf_ktime_get_ns()` of the last new connection that used it.
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub _pad: u32,
}
assert_size!(Affinity, 16);

/// Map capacities. Sized for 30,000 Services with 10 endpoints each and room to spare; the hash maps
/// are created without preallocation so an idle node pays only for what it holds.
pub const MAX_FRONTENDS: u32 = 131_072;
pub const MAX_BACKEND_SLOTS: u32 = 1_048_576;
pub const MAX_BACKEND_MEMBERS: u32 = 1_048_576;
pub const MAX_BACKENDS: u32 = 524_288;
pub const MAX_SERVICE_ADDRS: u32 = 131_072;
pub const MAX_SOURCE_RANGES: u32 = 65_536;
pub const MAX_AFFINITY: u32 = 262_144;
