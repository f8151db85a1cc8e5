//! Every map the programs share with userspace. Types and capacities come from proxy-common; the
//! names here are the pin names under `--bpffs`.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SkStorage},
    macros::btf_map,
};
use proxy_common::{
    Affinity, AffinityKey, Backend, BackendSlotKey, CT_LEASES_MAX, CT_RECENT_SLOTS, CtEntry, CtKey, CtRecentCursor,
    CtReply, FragKey, FragPorts, Frontend, FrontendKey, MAX_AFFINITY, MAX_BACKEND_MEMBERS, MAX_BACKEND_SLOTS,
    MAX_BACKENDS, MAX_CONNTRACK, MAX_FRAGMENTS, MAX_FRONTENDS, MAX_NODE_ADDRS, MAX_POD_IFACES, MAX_SERVICE_ADDRS,
    MAX_SOCK_ENTRIES, MAX_SOURCE_RANGES, MemberKey, NodeAddr, NodeConfig, PodIface, RejectBudget, RevNat, STAT_MAX,
    ServiceAddr, SockFlow, SockFlowKey, SockPeer, SockRevNatKey, SourceRangeKey,
};

const NO_PREALLOC: usize = BPF_F_NO_PREALLOC as usize;

/// The layout of the pinned maps (`MAP_LAYOUT`), and the layout a migration is switching them to
/// (0: none), written by `run`; no program reads it.
#[btf_map]
pub static LAYOUT: Array<u32, 2> = Array::new();

#[btf_map]
pub static FRONTENDS: HashMap<FrontendKey, Frontend, { MAX_FRONTENDS as usize }, NO_PREALLOC> = HashMap::new();

#[btf_map]
pub static BACKEND_SLOTS: HashMap<BackendSlotKey, u32, { MAX_BACKEND_SLOTS as usize }, NO_PREALLOC> = HashMap::new();

#[btf_map]
pub static BACKENDS: HashMap<u32, Backend, { MAX_BACKENDS as usize }, NO_PREALLOC> = HashMap::new();

#[btf_map]
pub static BACKEND_MEMBERS: HashMap<MemberKey, u32, { MAX_BACKEND_MEMBERS as usize }, NO_PREALLOC> = HashMap::new();

#[btf_map]
pub static SERVICE_ADDRS: HashMap<u32, ServiceAddr, { MAX_SERVICE_ADDRS as usize }, NO_PREALLOC> = HashMap::new();

#[btf_map]
pub static SOURCE_RANGES: LpmTrie<SourceRangeKey, u32, { MAX_SOURCE_RANGES as usize }> = LpmTrie::new();

#[btf_map]
pub static NODE_CONFIG: Array<NodeConfig, 1> = Array::new();

#[btf_map]
pub static NODE_ADDRS: HashMap<u32, NodeAddr, { MAX_NODE_ADDRS as usize }, NO_PREALLOC> = HashMap::new();

/// The local pods' interfaces (where `from_pod` is attached). Not pinned: each instance registers
/// the interfaces it attaches to, and its programs read its own.
#[btf_map]
pub static POD_IFACES: HashMap<u32, PodIface, { MAX_POD_IFACES as usize }, NO_PREALLOC> = HashMap::new();

#[btf_map]
pub static AFFINITY: LruHashMap<AffinityKey, Affinity, { MAX_AFFINITY as usize }> = LruHashMap::new();

/// Connections by original tuple; capacity set by userspace (`--conntrack-max`).
#[btf_map]
pub static CONNTRACK: HashMap<CtKey, CtEntry, { MAX_CONNTRACK as usize }, NO_PREALLOC> = HashMap::new();

/// Reply tuple → original tuple, one per connection.
#[btf_map]
pub static CT_REPLY: HashMap<CtKey, CtReply, { MAX_CONNTRACK as usize }, NO_PREALLOC> = HashMap::new();

/// Reply tuples being changed (taken over, retired, released, collected) → when the lease was taken:
/// the one way to change a held reply tuple (see proxy-common's `CT_LEASES_MAX`).
#[btf_map]
pub static CT_LEASES: HashMap<CtKey, u64, { CT_LEASES_MAX as usize }, NO_PREALLOC> = HashMap::new();

/// The most recently created connections: where early drop looks for one to displace.
#[btf_map]
pub static CT_RECENT: Array<CtKey, { CT_RECENT_SLOTS as usize }> = Array::new();

/// Where `CT_RECENT` is written next and searched from.
#[btf_map]
pub static CT_RECENT_CURSOR: Array<CtRecentCursor, 1> = Array::new();

/// Datagrams in fragments: the ports of their first fragment, for the rest.
#[btf_map]
pub static FRAGMENTS: LruHashMap<FragKey, FragPorts, { MAX_FRAGMENTS as usize }> = LruHashMap::new();

#[btf_map]
pub static SOCK_REV_NAT: LruHashMap<SockRevNatKey, RevNat, { MAX_SOCK_ENTRIES as usize }> = LruHashMap::new();

#[btf_map]
pub static SOCK_FLOWS: LruHashMap<SockFlowKey, SockFlow, { MAX_SOCK_ENTRIES as usize }> = LruHashMap::new();

#[btf_map]
pub static STATS: PerCpuArray<u64, { STAT_MAX as usize }> = PerCpuArray::new();

/// The node's budget of REJECT answers.
#[btf_map]
pub static REJECT_BUDGET: Array<RejectBudget, 1> = Array::new();

/// Per socket translated at connect(): the Service it asked for (getpeername).
#[btf_map]
pub static SOCK_PEER: SkStorage<SockPeer> = SkStorage::new();
