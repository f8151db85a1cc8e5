//! Frontend lookup and backend selection, shared by the tc and socket programs: which backend set a
//! packet uses, session affinity, loadBalancerSourceRanges.

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_get_prandom_u32, maps::lpm_trie::Key};
use proxy_common::{
    AFFINITY_CLIENT_NETNS, Affinity, AffinityKey, Backend, BackendSlotKey, FRONTEND_F_AFFINITY, FRONTEND_F_CLUSTER_IP,
    FRONTEND_F_ETP_LOCAL, FRONTEND_F_ITP_LOCAL, Frontend, FrontendKey, LOCAL_SLOT_BASE, MEMBER_F_CLUSTER,
    MEMBER_F_LOCAL, MemberKey, SOURCE_RANGE_ID_BITS, STAT_AFFINITY_HIT, STAT_DROP_NO_BACKEND, SourceRangeKey,
};

use crate::{
    maps::{AFFINITY, BACKEND_MEMBERS, BACKEND_SLOTS, BACKENDS, FRONTENDS, SOURCE_RANGES},
    stats,
};

#[inline(always)]
pub fn frontend(addr: u32, port: u16, proto: u8) -> Option<Frontend> {
    let key = FrontendKey { addr, port, proto, _pad: 0 };
    FRONTENDS.get_ptr(&key).map(|fe| unsafe { *fe })
}

#[inline(always)]
pub fn backend(backend_id: u32) -> Option<Backend> {
    BACKENDS.get_ptr(&backend_id).map(|be| unsafe { *be })
}

/// One of a frontend's two backend sets: slots `base..base + count`, members marked `member`.
#[derive(Clone, Copy)]
pub struct BackendSet {
    pub base: u32,
    pub count: u32,
    pub member: u32,
}

/// Which set a new connection uses. `from_outside`: the client is neither on this node nor a pod
/// (kube-proxy's local detector): only then does externalTrafficPolicy Local apply; pods and the node
/// itself short-circuit to the cluster-wide set.
#[inline(always)]
pub fn backend_set(fe: &Frontend, from_outside: bool) -> BackendSet {
    let local = if fe.flags & FRONTEND_F_CLUSTER_IP != 0 {
        fe.flags & FRONTEND_F_ITP_LOCAL != 0
    } else {
        fe.flags & FRONTEND_F_ETP_LOCAL != 0 && from_outside
    };
    if local {
        BackendSet { base: LOCAL_SLOT_BASE, count: fe.local_count as u32, member: MEMBER_F_LOCAL }
    } else {
        BackendSet { base: 0, count: fe.backend_count as u32, member: MEMBER_F_CLUSTER }
    }
}

#[inline(always)]
fn slot_backend(service_id: u32, slot: u32) -> Option<u32> {
    BACKEND_SLOTS.get_ptr(&BackendSlotKey { service_id, slot }).map(|id| unsafe { *id })
}

/// Whether backend `backend_id` is (still) in `set` of frontend `service_id`.
#[inline(always)]
fn in_set(service_id: u32, backend_id: u32, set: BackendSet) -> bool {
    BACKEND_MEMBERS
        .get_ptr(&MemberKey { service_id, backend_id })
        .is_some_and(|flags| unsafe { *flags } & set.member != 0)
}

/// The tc path's affinity client: the source address.
#[inline(always)]
pub fn client_addr(addr: u32) -> u64 {
    addr as u64
}

/// The socket path's affinity client: the caller's network namespace.
#[inline(always)]
pub fn client_netns(cookie: u64) -> u64 {
    cookie | AFFINITY_CLIENT_NETNS
}

/// Picks a backend from a non-empty set: the one the client is affine to while that is still in the
/// set (wherever its slot moved) and within the timeout, otherwise uniformly at random.
#[inline(always)]
pub fn select_backend(fe: &Frontend, set: BackendSet, client: u64, now: u64) -> Result<(u32, Backend), u32> {
    let affine = fe.flags & FRONTEND_F_AFFINITY != 0;
    let akey = AffinityKey { client, service_id: fe.service_id, _pad: 0 };
    if affine && let Some(a) = AFFINITY.get_ptr_mut(&akey) {
        // SAFETY: a map value, valid for the program's run; racing updates are plain integers.
        let a = unsafe { &mut *a };
        let fresh = now.saturating_sub(a.last_used_ns) <= fe.affinity_timeout_s as u64 * 1_000_000_000;
        if fresh
            && in_set(fe.service_id, a.backend_id, set)
            && let Some(be) = backend(a.backend_id)
        {
            a.last_used_ns = now;
            stats::count(STAT_AFFINITY_HIT);
            return Ok((a.backend_id, be));
        }
    }
    let slot = set.base + unsafe { bpf_get_prandom_u32() } % set.count;
    let backend_id = slot_backend(fe.service_id, slot).ok_or(STAT_DROP_NO_BACKEND)?;
    let be = backend(backend_id).ok_or(STAT_DROP_NO_BACKEND)?;
    if affine {
        // Best effort: without the entry the next connection is balanced afresh.
        let _ = AFFINITY.insert(&akey, &Affinity { last_used_ns: now, backend_id, _pad: 0 }, BPF_ANY as u64);
    }
    Ok((backend_id, be))
}

/// loadBalancerSourceRanges: whether `saddr` is in one of the frontend's ranges.
#[inline(always)]
pub fn source_allowed(fe: &Frontend, saddr: u32) -> bool {
    let key = Key::new(SOURCE_RANGE_ID_BITS + 32, SourceRangeKey { service_id_be: fe.service_id.to_be(), addr: saddr });
    SOURCE_RANGES.get(&key).is_some()
}
