//! Map types shared by the kernel programs (`proxy-ebpf`) and the controller (`proxy-userspace`).
//!
//! Every type here is the exact byte layout of a BPF map key or value: `#[repr(C)]`, padding spelled out
//! as `_pad` fields, sizes checked at compile time, and no `bool`, `Option` or enum inside (their bit
//! patterns are not guaranteed, and the kernel zero-fills what it does not know).
//!
//! Byte order: addresses and ports are kept in **network byte order**, exactly as they appear in the
//! packet and in `struct bpf_sock_addr`, so the datapath never swaps bytes. Userspace converts with
//! [`addr_to_map`] / [`port_to_map`] and back.
#![cfg_attr(not(test), no_std)]

pub mod conntrack;
pub mod lb;
pub mod node;
pub mod sock;
pub mod stats;

pub use conntrack::*;
pub use lb::*;
pub use node::*;
pub use sock::*;
pub use stats::*;

/// The layout of every pinned map's key and value, recorded in the pinned `LAYOUT` map. An instance
/// adopts pinned maps only of its own layout: one that reads another's would misread every
/// connection, affinity and ID. Bump it with any change to the size or fields of a type kept in a
/// pinned map, and give `run` the migration from the old one. Pins made before the layout was
/// recorded are layout 1.
pub const MAP_LAYOUT: u32 = if cfg!(feature = "layout-test") { 2 } else { 1 };

/// IP protocol numbers as carried in the IPv4 header.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;

/// An IPv4 address as stored in the maps (network byte order in memory).
#[inline(always)]
pub const fn addr_to_map(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

/// The octets of an address read from a map.
#[inline(always)]
pub const fn addr_from_map(addr: u32) -> [u8; 4] {
    addr.to_ne_bytes()
}

/// A port as stored in the maps (network byte order in memory).
#[inline(always)]
pub const fn port_to_map(port: u16) -> u16 {
    port.to_be()
}

/// A host-order port from a map.
#[inline(always)]
pub const fn port_from_map(port: u16) -> u16 {
    u16::from_be(port)
}

/// Implements `aya::Pod` for map types when built for userspace.
#[cfg(feature = "user")]
macro_rules! pod {
    ($($t:ty),* $(,)?) => {
        $(
            // SAFETY: every type listed is #[repr(C)], has no implicit padding (checked by the size
            // asserts next to it) and is valid for any bit pattern.
            unsafe impl aya::Pod for $t {}
        )*
    };
}
#[cfg(feature = "user")]
pod!(
    lb::FrontendKey,
    lb::Frontend,
    lb::BackendSlotKey,
    lb::Backend,
    lb::RevNat,
    lb::MemberKey,
    lb::ServiceAddr,
    lb::SourceRangeKey,
    lb::AffinityKey,
    lb::Affinity,
    node::NodeConfig,
    node::NodeAddr,
    node::RejectBudget,
    node::PodIface,
    conntrack::CtKey,
    conntrack::CtEntry,
    conntrack::CtRecentCursor,
    conntrack::CtReply,
    conntrack::CtClosedEnd,
    conntrack::FragKey,
    conntrack::FragPorts,
    sock::SockRevNatKey,
    sock::SockFlowKey,
    sock::SockFlow,
    sock::SockPeer,
);

/// Asserts a map type's size at compile time (and so that no implicit padding crept in).
#[macro_export]
macro_rules! assert_size {
    ($t:ty, $n:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $n);
    };
}
