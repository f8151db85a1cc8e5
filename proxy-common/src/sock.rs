//! Maps of the socket-level load balancer (cgroup connect4 / sendmsg4 / recvmsg4 / getpeername4).

use crate::assert_size;

/// Key of `SOCK_REV_NAT`: a UDP socket and the backend it was sent to. The value ([`crate::RevNat`]) is
/// the Service address recvmsg() and getpeername() must report instead of the backend's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNatKey {
    /// `bpf_get_socket_cookie()`.
    pub cookie: u64,
    /// Backend address, network byte order.
    pub addr: u32,
    /// Backend port, network byte order.
    pub port: u16,
    pub _pad: u16,
}
assert_size!(SockRevNatKey, 16);

/// Key of `SOCK_FLOWS`: a UDP socket sending to a Service address with sendmsg() (no connect()).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockFlowKey {
    pub cookie: u64,
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}
assert_size!(SockFlowKey, 16);

/// Value of `SOCK_FLOWS`: the backend chosen for the flow, so that the datagrams of one socket to one
/// Service go to one backend, as conntrack pins them in kube-proxy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockFlow {
    pub last_seen_ns: u64,
    pub backend_id: u32,
    pub service_id: u32,
}
assert_size!(SockFlow, 16);

/// Capacity of `SOCK_REV_NAT` and `SOCK_FLOWS` (LRU).
pub const MAX_SOCK_ENTRIES: u32 = 262_144;

/// Value of `SOCK_PEER` (socket-local storage, freed with the socket): a socket connect()ed to a
/// Service address and sent to a backend instead. getpeername() names the Service while the socket's
/// peer is that backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockPeer {
    pub backend_addr: u32,
    pub service_addr: u32,
    pub backend_port: u16,
    pub service_port: u16,
}
assert_size!(SockPeer, 12);
