//! Reading a whole BPF hash map with `BPF_MAP_LOOKUP_BATCH`: a few syscalls per thousand entries
//! instead of two per entry (aya iterates key by key), so the conntrack collector and the UDP flow
//! purge can walk a table of hundreds of thousands of connections in milliseconds.

use std::{
    io,
    mem::{MaybeUninit, size_of},
    os::fd::{AsRawFd as _, BorrowedFd},
};

use aya::Pod;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries asked for per call; a bucket larger than this makes the kernel answer ENOSPC, and the
/// call is repeated with room for more.
const CHUNK: usize = 4096;

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every (key, value) of the hash map behind `fd`. Entries that come and go during the walk may be
/// missed or seen; every entry present throughout is seen once.
pub fn dump<K: Pod, V: Pod>(fd: BorrowedFd<'_>) -> io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    let mut chunk = CHUNK;
    // The hash map's position token is a bucket index (u32).
    let mut token_in = 0u32;
    let mut token_out = 0u32;
    let mut first = true;
    loop {
        let mut keys: Vec<MaybeUninit<K>> = (0..chunk).map(|_| MaybeUninit::uninit()).collect();
        let mut values: Vec<MaybeUninit<V>> = (0..chunk).map(|_| MaybeUninit::uninit()).collect();
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { (&raw const token_in) as u64 },
            out_batch: (&raw mut token_out) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: the attribute points at buffers of `count` keys and values and at the tokens, all
        // alive for the call; the kernel writes at most `count` of each.
        let rc = unsafe {
            libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_BATCH, &raw mut attr, size_of::<BatchAttr>() as libc::c_uint)
        };
        let err = if rc < 0 { Some(io::Error::last_os_error()) } else { None };
        let got = attr.count as usize;
        match err.as_ref().and_then(io::Error::raw_os_error) {
            Some(libc::ENOSPC) if got == 0 => {
                chunk *= 2;
                continue;
            }
            None | Some(libc::ENOENT) => {}
            _ => return Err(err.expect("an error")),
        }
        for i in 0..got {
            // SAFETY: the kernel filled the first `got` slots.
            out.push(unsafe { (keys[i].assume_init(), values[i].assume_init()) });
        }
        if err.is_some() {
            // ENOENT: the walk reached the end.
            return Ok(out);
        }
        token_in = token_out;
        first = false;
    }
}
