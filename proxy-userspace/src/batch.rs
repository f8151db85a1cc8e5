//! Whole-map operations on BPF hash maps, a few syscalls per thousand entries instead of one or two
//! per entry (aya goes key by key): reading with `BPF_MAP_LOOKUP_BATCH`, so the conntrack collector
//! and the UDP flow purge walk hundreds of thousands of connections in milliseconds; writing and
//! deleting with `BPF_MAP_UPDATE_BATCH` and `BPF_MAP_DELETE_BATCH`, so a sync of 100,000 entries is
//! a few dozen syscalls.

use std::{
    io,
    mem::{MaybeUninit, size_of},
    os::fd::{AsRawFd as _, BorrowedFd},
};

use aya::Pod;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
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

/// Calls a batch command; the entries the kernel processed, and its error if it stopped early.
fn batch_call(cmd: libc::c_long, attr: &mut BatchAttr) -> (usize, Option<io::Error>) {
    // SAFETY: the caller's attribute points at `count` keys (and values) alive for the call; the
    // kernel only reads them and writes back `count`.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, &raw mut *attr, size_of::<BatchAttr>() as libc::c_uint) };
    let err = if rc < 0 { Some(io::Error::last_os_error()) } else { None };
    (attr.count as usize, err)
}

/// Writes `entries` in order into the hash map behind `fd`. On error, how many were written first
/// (each of those is in the map; none after).
pub fn update<K: Pod, V: Pod>(fd: BorrowedFd<'_>, entries: &[(K, V)]) -> Result<(), (usize, io::Error)> {
    let mut done = 0;
    for chunk in entries.chunks(CHUNK) {
        let keys: Vec<K> = chunk.iter().map(|(k, _)| *k).collect();
        let values: Vec<V> = chunk.iter().map(|(_, v)| *v).collect();
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let (n, err) = batch_call(BPF_MAP_UPDATE_BATCH, &mut attr);
        if let Some(e) = err {
            return Err((done + n.min(chunk.len()), e));
        }
        done += chunk.len();
    }
    Ok(())
}

/// Deletes `keys` from the hash map behind `fd`; a key already gone is no error. On error, how
/// many were deleted (or found gone) first.
pub fn delete<K: Pod>(fd: BorrowedFd<'_>, keys: &[K]) -> Result<(), (usize, io::Error)> {
    let mut done = 0;
    while done < keys.len() {
        let chunk = &keys[done..keys.len().min(done + CHUNK)];
        let mut attr = BatchAttr {
            keys: chunk.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let (n, err) = batch_call(BPF_MAP_DELETE_BATCH, &mut attr);
        let n = n.min(chunk.len());
        match err {
            None => done += chunk.len(),
            // The kernel stops at a key that is not there: it is gone, as wanted; go on after it.
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => done += n + 1,
            Some(e) => return Err((done + n, e)),
        }
    }
    Ok(())
}
