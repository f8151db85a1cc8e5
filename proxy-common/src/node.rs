//! What the datapath knows about the node it runs on (`NODE_CONFIG`, `NODE_ADDRS`).

use crate::assert_size;

/// Value of `NODE_CONFIG` (an array with one entry, written by userspace before any frontend).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeConfig {
    /// `--cluster-cidr` address and netmask, network byte order (with `NODE_F_CLUSTER_CIDR`).
    pub cluster_cidr: u32,
    pub cluster_cidr_mask: u32,
    /// `--service-cidr` address and netmask (with `NODE_F_SERVICE_CIDR`): unallocated addresses in it
    /// are dropped.
    pub service_cidr: u32,
    pub service_cidr_mask: u32,
    /// The node address traffic is masqueraded to, network byte order.
    pub masq_addr: u32,
    /// Source ports for SNAT, host byte order, inclusive. Userspace reserves them
    /// (`ip_local_reserved_ports`) so they never collide with local sockets.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// `NODE_F_*` bits.
    pub flags: u32,
    pub _pad: u32,
    /// The node's own network namespace (`SO_NETNS_COOKIE`): connected UDP sockets there are
    /// translated at connect(); pods' connected UDP sockets are left to the tc path, whose conntrack
    /// entries are purged when their backend goes away (a translated connect() cannot be redone).
    pub host_netns_cookie: u64,
}
assert_size!(NodeConfig, 40);

pub const NODE_F_CLUSTER_CIDR: u32 = 1 << 0;
pub const NODE_F_SERVICE_CIDR: u32 = 1 << 1;
/// `--masquerade-all`.
pub const NODE_F_MASQUERADE_ALL: u32 = 1 << 2;
/// The configuration has been written (an all-zero entry means the datapath is not programmed yet).
pub const NODE_F_CONFIGURED: u32 = 1 << 3;

/// Value of `NODE_ADDRS`, keyed by a node address (`u32`, network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeAddr {
    pub flags: u32,
}
assert_size!(NodeAddr, 4);

/// Default SNAT port range: above Linux's default ephemeral range (32768–60999) and the NodePort
/// range (30000–32767).
pub const DEFAULT_SNAT_PORT_MIN: u16 = 61_000;
pub const DEFAULT_SNAT_PORT_MAX: u16 = 65_535;
/// How many ports SNAT tries before giving up on a connection.
pub const SNAT_RETRIES: u32 = 32;

pub const MAX_NODE_ADDRS: u32 = 256;

/// Value of `REJECT_BUDGET`: a token bucket for the node's REJECT answers (TCP RST, ICMP port
/// unreachable), kept in nanoseconds of credit. The kernel rate-limits the ICMP errors it sends
/// (`icmp_msgs_per_sec`, `icmp_msgs_burst`); answers built by the datapath bypass that, and unbounded
/// they would make a node a reflector.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RejectBudget {
    pub credit_ns: u64,
    pub last_ns: u64,
}
assert_size!(RejectBudget, 16);

/// Answers per second and burst: the kernel's defaults for its own ICMP errors.
pub const REJECT_PER_SEC: u64 = 1_000;
pub const REJECT_BURST: u64 = 50;

/// Value of `POD_IFACES`, keyed by the ifindex of a local pod's interface (its host side, where
/// `from_pod` is attached; one pod per interface). Packets from there are the pod's own only when
/// their source address routes back through that interface — or through `master_ifindex` (0: none),
/// the bridge it is a port of, since bridged CNIs route every pod through the bridge.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PodIface {
    pub master_ifindex: u32,
}
assert_size!(PodIface, 4);

/// Pod interfaces on one node (kubelet's default is 110 pods).
pub const MAX_POD_IFACES: u32 = 4_096;
