//! Carrying a running datapath across a change of map layout (proxy-common's `MAP_LAYOUT`), so that
//! an upgrade keeps established connections. The new build adopts every pinned map whose layout it
//! shares, as on any restart. For each map whose value layout changed it creates a fresh map, pinned
//! beside the old one as `NAME-migrating`, and fills it from the old one through that map's
//! conversion — before its programs take over — then, once the old instance's programs are released,
//! once more for the entries they created meanwhile, and renames its pins over the old ones. The
//! layout recorded in `LAYOUT` changes last: a migration cut short (a crash, a kill) is done again
//! from the start by the next run.
//!
//! A build carries only the migrations it lists in [`MIGRATIONS`]; every other layout is refused
//! (datapath::load). Maps are copied with the raw element syscalls: their types on the two sides are
//! different by definition, so the typed aya maps cannot hold both.

use std::{
    fs, io,
    mem::size_of,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    path::Path,
};

use anyhow::{Context as _, Result};
use aya::maps::MapData;

/// The conversion of one value of a migrated map: the old layout's bytes in, the new one's out.
pub type Convert = fn(&[u8]) -> Vec<u8>;

/// A change of layout this build can carry a datapath across.
pub struct Migration {
    /// The layout it migrates from (to this build's `MAP_LAYOUT`).
    pub from: u32,
    /// The maps whose value layout changed, each with the conversion of one value (old bytes in, new
    /// bytes out, of the new map's value size).
    pub maps: &'static [(&'static str, Convert)],
}

/// Every migration this build knows. A release that changes a pinned layout adds the one from the
/// layout before it.
pub const MIGRATIONS: &[Migration] = &[
    #[cfg(feature = "layout-test")]
    Migration { from: 1, maps: &[("CONNTRACK", layout_test::conntrack_from_1)] },
];

/// The migration from pinned layout `from`, if this build has it.
pub fn from(from: u32) -> Option<&'static Migration> {
    MIGRATIONS.iter().find(|m| m.from == from)
}

/// Where a migrated map is pinned until the switch.
pub fn migrating_pin(dir: &Path, name: &str) -> std::path::PathBuf {
    // bpffs refuses names with a dot.
    dir.join(format!("{name}-migrating"))
}

/// Copies the map pinned at `dir/NAME` into the one pinned at `dir/NAME-migrating`, converting each
/// value; only keys the new map lacks (`BPF_NOEXIST`), so a second pass adds what the old programs
/// created since the first and leaves what the new ones already hold. Returns how many it added.
pub fn copy(dir: &Path, name: &str, convert: Convert) -> Result<usize> {
    let old = MapData::from_pin(dir.join(name)).with_context(|| format!("opening the pinned {name}"))?;
    let new = MapData::from_pin(migrating_pin(dir, name)).with_context(|| format!("opening {name}-migrating"))?;
    let (old_info, new_info) = (old.info()?, new.info()?);
    let (key_size, old_size) = (old_info.key_size() as usize, old_info.value_size() as usize);
    let new_size = new_info.value_size() as usize;
    let mut key = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    let mut value = vec![0u8; old_size];
    let mut first = true;
    let mut added = 0;
    loop {
        match elem(old.fd().as_fd(), BPF_MAP_GET_NEXT_KEY, if first { None } else { Some(&key) }, next.as_mut_ptr(), 0)
        {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(added),
            Err(e) => return Err(e).with_context(|| format!("walking {name}")),
        }
        first = false;
        key.copy_from_slice(&next);
        // Gone since (removed by the datapath): nothing to carry.
        if elem(old.fd().as_fd(), BPF_MAP_LOOKUP_ELEM, Some(&key), value.as_mut_ptr(), 0).is_err() {
            continue;
        }
        let mut converted = convert(&value);
        anyhow::ensure!(
            converted.len() == new_size,
            "{name}: conversion gave {} bytes, not {new_size}",
            converted.len()
        );
        match elem(new.fd().as_fd(), BPF_MAP_UPDATE_ELEM, Some(&key), converted.as_mut_ptr(), BPF_NOEXIST) {
            Ok(()) => added += 1,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e).with_context(|| format!("writing {name}-migrating")),
        }
    }
}

/// Makes the migrated maps the pinned ones: `NAME-migrating` renamed over `NAME` (the old map goes
/// when the last program using it is detached).
pub fn switch_pins(dir: &Path, names: &[&str]) -> Result<()> {
    for name in names {
        fs::rename(migrating_pin(dir, name), dir.join(name))
            .with_context(|| format!("renaming {name}-migrating over {name}"))?;
    }
    Ok(())
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_NOEXIST: u64 = 1;

/// `union bpf_attr` for the element commands.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    /// The value, or the next key.
    value: u64,
    flags: u64,
}

fn elem(fd: BorrowedFd<'_>, cmd: libc::c_long, key: Option<&[u8]>, out: *mut u8, flags: u64) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: key.map_or(0, |k| k.as_ptr() as u64),
        value: out as u64,
        flags,
    };
    // SAFETY: the attribute points at a key of the map's key size (or none) and at a buffer of the
    // map's key or value size, as the command needs, alive for the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, &raw mut attr, size_of::<ElemAttr>() as libc::c_uint) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// The test-only layout 2 (proxy-common's `layout-test`): the connection entry of layout 1 with its
/// backend and SNAT addresses in each other's places.
#[cfg(feature = "layout-test")]
mod layout_test {
    /// Where layout 1 keeps `nat_addr` and `snat_addr` (after the two 8-byte timestamps).
    const NAT_ADDR: std::ops::Range<usize> = 16..20;
    const SNAT_ADDR: std::ops::Range<usize> = 20..24;

    pub fn conntrack_from_1(old: &[u8]) -> Vec<u8> {
        let mut new = old.to_vec();
        new[NAT_ADDR].copy_from_slice(&old[SNAT_ADDR]);
        new[SNAT_ADDR].copy_from_slice(&old[NAT_ADDR]);
        new
    }
}
