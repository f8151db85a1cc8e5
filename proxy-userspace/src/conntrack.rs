//! The connection table seen from userspace: its two maps, the garbage collector that removes dead
//! connections (both directions together) and reply tuples left without a connection, and the
//! removal of chosen connections (UDP flows to endpoints that stopped serving).
//!
//! The datapath removes a dead connection when a packet meets it; the collector removes the ones no
//! packet will meet again, so the table's size stays the number of live connections. It judges
//! liveness with the same functions as the programs (proxy-common's `ct_alive`), and removes a
//! reply tuple only under its lease (`CT_LEASES`), as the programs change one, so that it never
//! deletes a tuple a CPU has just taken over.

use std::{
    collections::BTreeSet,
    os::fd::AsFd as _,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, Map, MapData};
use proxy_common::{
    BACKEND_TIME_WAIT_NS, CT_CLAIM_GRACE_NS, CT_LEASE_STALE_NS, CT_REPLY_F_RETIRED, CtEntry, CtKey, CtReply, ct_alive,
    ct_reply_key,
};

use crate::{batch, datapath::open_pinned};

/// A reply tuple without its connection is removed once this old (the datapath writes the
/// connection microseconds after the tuple).
const ORPHAN_AGE_NS: u64 = 10 * CT_CLAIM_GRACE_NS;

type Connections<'a> = HashMap<&'a mut MapData, CtKey, CtEntry>;
type Replies<'a> = HashMap<&'a mut MapData, CtKey, CtReply>;
type Leases<'a> = HashMap<&'a mut MapData, CtKey, u64>;

/// `BPF_NOEXIST`: a lease is taken by whoever inserts it first.
const BPF_NOEXIST: u64 = 1;

/// `CONNTRACK` (original tuple → connection), `CT_REPLY` (reply tuple → original tuple) and
/// `CT_LEASES` (reply tuples being changed).
pub struct ConntrackMaps {
    conntrack: Map,
    replies: Map,
    leases: Map,
    /// Capacity (`--conntrack-max`).
    pub capacity: u32,
}

fn fd(map: &Map) -> Result<std::os::fd::BorrowedFd<'_>> {
    match map {
        Map::HashMap(data) => Ok(data.fd().as_fd()),
        _ => anyhow::bail!("conntrack maps are hash maps"),
    }
}

/// What a collection did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Collected {
    /// Connections alive after it.
    pub alive: usize,
    /// Dead connections removed.
    pub dead: usize,
    /// Reply tuples removed whose connection was gone.
    pub orphans: usize,
}

impl ConntrackMaps {
    pub fn new(conntrack: Map, replies: Map, leases: Map) -> Result<Self> {
        let capacity = match &conntrack {
            Map::HashMap(data) => data.info()?.max_entries(),
            _ => anyhow::bail!("CONNTRACK is not a hash map"),
        };
        Ok(Self { conntrack, replies, leases, capacity })
    }

    /// The maps of a running instance, through their pins.
    pub fn pinned(bpffs: &Path) -> Result<Self> {
        Self::new(
            open_pinned(bpffs, "CONNTRACK")?.0,
            open_pinned(bpffs, "CT_REPLY")?.0,
            open_pinned(bpffs, "CT_LEASES")?.0,
        )
    }

    /// Every connection (dead ones too, until removed).
    pub fn connections(&self) -> Result<Vec<(CtKey, CtEntry)>> {
        batch::dump(fd(&self.conntrack)?).context("reading CONNTRACK")
    }

    /// Every reply tuple with the connection it names.
    pub fn replies(&self) -> Result<Vec<(CtKey, CtReply)>> {
        batch::dump(fd(&self.replies)?).context("reading CT_REPLY")
    }

    /// The maps, for reading and writing entry by entry.
    fn maps(&mut self) -> Result<(Connections<'_>, Replies<'_>, Leases<'_>)> {
        Ok((
            HashMap::try_from(&mut self.conntrack)?,
            HashMap::try_from(&mut self.replies)?,
            HashMap::try_from(&mut self.leases)?,
        ))
    }

    /// One connection, if tracked.
    pub fn get(&self, orig: &CtKey) -> Option<CtEntry> {
        HashMap::<&MapData, CtKey, CtEntry>::try_from(&self.conntrack).ok()?.get(orig, 0).ok()
    }

    /// The original tuple a reply tuple names, if any.
    pub fn orig_of(&self, reply: &CtKey) -> Option<CtKey> {
        HashMap::<&MapData, CtKey, CtReply>::try_from(&self.replies).ok()?.get(reply, 0).ok().map(|r| r.orig)
    }

    /// Writes a connection and its reply tuple (tests, and tools that seed a table).
    pub fn insert(&mut self, orig: &CtKey, entry: &CtEntry) -> Result<()> {
        let (mut conntrack, mut replies, _) = self.maps()?;
        let reply = CtReply { orig: *orig, claimed_ns: entry.created_ns, ..CtReply::default() };
        replies.insert(&ct_reply_key(orig, entry), &reply, 0)?;
        conntrack.insert(orig, entry, 0)?;
        Ok(())
    }

    /// Empties both maps.
    pub fn clear(&mut self) -> Result<()> {
        let connections = self.connections()?;
        let replies = self.replies()?;
        let (mut conntrack, mut reply_map, _) = self.maps()?;
        for (k, _) in connections {
            let _ = conntrack.remove(&k);
        }
        for (k, _) in replies {
            let _ = reply_map.remove(&k);
        }
        Ok(())
    }

    /// Removes connections, both directions, if they are still the ones read (a connection
    /// re-created on the same tuple since has another creation time and stays).
    pub fn remove(&mut self, victims: &[(CtKey, CtEntry)]) -> Result<usize> {
        let (mut conntrack, mut replies, mut leases) = self.maps()?;
        let mut removed = 0;
        for (orig, entry) in victims {
            if conntrack.get(orig, 0).ok().is_none_or(|c| c.created_ns != entry.created_ns) {
                continue;
            }
            let reply = ct_reply_key(orig, entry);
            if let Ok(r) = replies.get(&reply, 0)
                && r.orig == *orig
            {
                remove_leased(&mut replies, &mut leases, &reply, &r);
            }
            // Already gone (the datapath met it first) is as good.
            if conntrack.remove(orig).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// One garbage collection at `now_ns` (CLOCK_MONOTONIC).
    pub fn collect(&mut self, now_ns: u64) -> Result<Collected> {
        let connections = self.connections()?;
        let (alive, dead): (Vec<_>, Vec<_>) = connections.into_iter().partition(|(k, e)| ct_alive(e, k.proto, now_ns));
        let dead_count = self.remove(&dead)?;
        // A reply tuple whose connection is gone, or that names a connection now holding another
        // reply tuple, only takes room: the datapath ignores it. One claimed moments ago belongs to a
        // connection being written; a retired one stands for its backend's TIME_WAIT for a minute.
        let wanted: BTreeSet<(CtKey, CtKey)> = alive.iter().map(|(k, e)| (ct_reply_key(k, e), *k)).collect();
        let orphans: Vec<(CtKey, CtReply)> = self
            .replies()?
            .into_iter()
            .filter(|(reply, r)| {
                let keep_for = if r.flags & CT_REPLY_F_RETIRED != 0 { BACKEND_TIME_WAIT_NS } else { ORPHAN_AGE_NS };
                !wanted.contains(&(*reply, r.orig)) && now_ns.saturating_sub(r.claimed_ns) > keep_for
            })
            .collect();
        let (conntrack, mut replies, mut leases) = self.maps()?;
        let mut removed_orphans = 0;
        for (reply, r) in &orphans {
            // Re-check: a connection created since the read may own it now.
            let owned = conntrack.get(&r.orig, 0).is_ok_and(|e| ct_reply_key(&r.orig, &e) == *reply);
            if !owned && remove_leased(&mut replies, &mut leases, reply, r) {
                removed_orphans += 1;
            }
        }
        // Leases are held for microseconds; one this old was left by a process that died holding it.
        let stale: Vec<CtKey> = leases
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, taken)| now_ns.saturating_sub(*taken) > CT_LEASE_STALE_NS)
            .map(|(k, _)| k)
            .collect();
        for k in stale {
            let _ = leases.remove(&k);
        }
        Ok(Collected { alive: alive.len(), dead: dead_count, orphans: removed_orphans })
    }
}

/// Deletes reply tuple `reply` under its lease, as the datapath changes one, if it still reads `seen`:
/// true if deleted. Without the lease, a CPU taking the tuple over between the check and the
/// delete would lose its claim.
fn remove_leased(replies: &mut Replies<'_>, leases: &mut Leases<'_>, reply: &CtKey, seen: &CtReply) -> bool {
    if leases.insert(reply, &monotonic_ns(), BPF_NOEXIST).is_err() {
        return false;
    }
    let removed = replies.get(reply, 0).ok() == Some(*seen) && replies.remove(reply).is_ok();
    let _ = leases.remove(reply);
    removed
}

/// CLOCK_MONOTONIC in nanoseconds, the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Runs the collector every `period` on its own thread (the map walks are blocking syscalls) until
/// `stop` is set; `report` gets each result.
pub fn spawn_collector(
    mut maps: ConntrackMaps,
    period: Duration,
    stop: Arc<AtomicBool>,
    report: impl Fn(Result<Collected>, Duration) + Send + 'static,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("conntrack-gc".into())
        .spawn(move || {
            let tick = Duration::from_millis(100).min(period);
            let mut next = Instant::now() + period;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(tick);
                if Instant::now() < next {
                    continue;
                }
                let started = Instant::now();
                report(maps.collect(monotonic_ns()), started.elapsed());
                next = Instant::now() + period;
            }
        })
        .expect("spawning the conntrack collector")
}
