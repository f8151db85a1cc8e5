//! Frontend lookup and backend selection, shared by the tc and socket programs.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use proxy_common::{Backend, BackendSlotKey, Frontend, FrontendKey, STAT_DROP_NO_BACKEND, STAT_DROP_NO_ENDPOINTS};

use crate::maps::{BACKEND_SLOTS, BACKENDS, FRONTENDS};

#[inline(always)]
pub fn frontend(addr: u32, port: u16, proto: u8) -> Option<Frontend> {
    let key = FrontendKey { addr, port, proto, _pad: 0 };
    FRONTENDS.get_ptr(&key).map(|fe| unsafe { *fe })
}

#[inline(always)]
pub fn backend(backend_id: u32) -> Option<Backend> {
    BACKENDS.get_ptr(&backend_id).map(|be| unsafe { *be })
}

/// Picks a backend uniformly at random among the frontend's slots.
#[inline(always)]
pub fn select_backend(fe: &Frontend) -> Result<(u32, Backend), u32> {
    if fe.backend_count == 0 {
        return Err(STAT_DROP_NO_ENDPOINTS);
    }
    let slot = unsafe { bpf_get_prandom_u32() } % fe.backend_count as u32;
    let key = BackendSlotKey { service_id: fe.service_id, slot };
    let backend_id = BACKEND_SLOTS.get_ptr(&key).map(|id| unsafe { *id }).ok_or(STAT_DROP_NO_BACKEND)?;
    let be = backend(backend_id).ok_or(STAT_DROP_NO_BACKEND)?;
    Ok((backend_id, be))
}
