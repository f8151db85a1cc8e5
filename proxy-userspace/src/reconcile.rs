//! Writes the desired map contents into the maps: diff against what they hold, write what is new or
//! changed — everything a reference needs before the reference — then delete what nothing wants, in
//! reverse order. Only changed entries are touched, so one Service's update leaves the rest alone.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use proxy_common::{Backend, BackendSlotKey, Frontend, FrontendKey, MemberKey, NodeAddr, NodeConfig, ServiceAddr};

use crate::translate::{DesiredMaps, SourceRange};

/// One BPF map as the reconciler sees it.
pub trait Table<K, V> {
    fn put(&mut self, key: &K, value: &V) -> Result<()>;
    fn del(&mut self, key: &K) -> Result<()>;
    fn entries(&self) -> Result<BTreeMap<K, V>>;

    /// Writes `entries` in order. On error, how many were written before it (a map that can do it
    /// in one call overrides this; the result is the same).
    fn put_many(&mut self, entries: &[(K, V)]) -> Result<(), (usize, anyhow::Error)> {
        for (i, (k, v)) in entries.iter().enumerate() {
            self.put(k, v).map_err(|e| (i, e))?;
        }
        Ok(())
    }

    /// Deletes `keys` in order (one already gone is no error). On error, how many were deleted first.
    fn del_many(&mut self, keys: &[K]) -> Result<(), (usize, anyhow::Error)> {
        for (i, k) in keys.iter().enumerate() {
            self.del(k).map_err(|e| (i, e))?;
        }
        Ok(())
    }
}

/// An in-memory table, for tests and for `trace`'s bookkeeping.
impl<K: Ord + Clone, V: Clone> Table<K, V> for BTreeMap<K, V> {
    fn put(&mut self, key: &K, value: &V) -> Result<()> {
        self.insert(key.clone(), value.clone());
        Ok(())
    }
    fn del(&mut self, key: &K) -> Result<()> {
        self.remove(key);
        Ok(())
    }
    fn entries(&self) -> Result<BTreeMap<K, V>> {
        Ok(self.clone())
    }
}

/// The load-balancing maps.
pub struct Tables {
    pub frontends: Box<dyn Table<FrontendKey, Frontend> + Send + Sync>,
    pub slots: Box<dyn Table<BackendSlotKey, u32> + Send + Sync>,
    pub backends: Box<dyn Table<u32, Backend> + Send + Sync>,
    pub members: Box<dyn Table<MemberKey, u32> + Send + Sync>,
    pub service_addrs: Box<dyn Table<u32, ServiceAddr> + Send + Sync>,
    pub source_ranges: Box<dyn Table<SourceRange, u32> + Send + Sync>,
    pub node_config: Box<dyn Table<u32, NodeConfig> + Send + Sync>,
    pub node_addrs: Box<dyn Table<u32, NodeAddr> + Send + Sync>,
}

impl Tables {
    /// Tables backed by memory only.
    pub fn in_memory() -> Self {
        Self {
            frontends: Box::new(BTreeMap::new()),
            slots: Box::new(BTreeMap::new()),
            backends: Box::new(BTreeMap::new()),
            members: Box::new(BTreeMap::new()),
            service_addrs: Box::new(BTreeMap::new()),
            source_ranges: Box::new(BTreeMap::new()),
            node_config: Box::new(BTreeMap::new()),
            node_addrs: Box::new(BTreeMap::new()),
        }
    }

    /// What the maps hold now.
    pub fn dump(&self) -> Result<DesiredMaps> {
        Ok(DesiredMaps {
            frontends: self.frontends.entries().context("reading frontends")?,
            slots: self.slots.entries().context("reading backend slots")?,
            backends: self.backends.entries().context("reading backends")?,
            members: self.members.entries().context("reading backend memberships")?,
            service_addrs: self.service_addrs.entries().context("reading service addresses")?,
            source_ranges: self.source_ranges.entries().context("reading source ranges")?,
            node_config: self.node_config.entries().context("reading the node configuration")?,
            node_addrs: self.node_addrs.entries().context("reading node addresses")?,
        })
    }
}

/// What a full sync found changed behind the reconciler's back, per map: entries whose value
/// differs from what was written, entries gone, entries nobody wrote. Nothing but ebpf-proxy writes
/// these maps, so anything here is drift (a tool, an operator, a bug) — there should be none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Drift {
    /// (map, changed, missing, unexpected), for the maps that drifted.
    pub maps: Vec<(&'static str, usize, usize, usize)>,
}

impl Drift {
    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }

    /// Entries that drifted, in all.
    pub fn total(&self) -> usize {
        self.maps.iter().map(|(_, c, m, u)| c + m + u).sum()
    }

    fn compare<K: Ord, V: PartialEq>(&mut self, map: &'static str, believed: &BTreeMap<K, V>, held: &BTreeMap<K, V>) {
        let changed = believed.iter().filter(|(k, v)| held.get(*k).is_some_and(|h| h != *v)).count();
        let missing = believed.keys().filter(|k| !held.contains_key(*k)).count();
        let unexpected = held.keys().filter(|k| !believed.contains_key(*k)).count();
        if changed + missing + unexpected > 0 {
            self.maps.push((map, changed, missing, unexpected));
        }
    }
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> =
            self.maps.iter().map(|(map, c, m, u)| format!("{map}: {c} changed, {m} missing, {u} unexpected")).collect();
        f.write_str(&parts.join("; "))
    }
}

/// Counts of entries written and deleted by one sync.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub written: usize,
    pub deleted: usize,
}

/// Keeps a mirror of what the maps hold and brings them to the desired state.
pub struct Reconciler {
    actual: DesiredMaps,
}

/// Writes what differs from the mirror, in one call to the table; the mirror follows exactly what
/// was written, also when the table fails part way.
fn write_changed<K: Ord + Clone, V: PartialEq + Clone>(
    table: &mut dyn Table<K, V>,
    actual: &mut BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
    stats: &mut SyncStats,
) -> Result<()> {
    let changed: Vec<(K, V)> =
        desired.iter().filter(|(k, v)| actual.get(*k) != Some(*v)).map(|(k, v)| (k.clone(), v.clone())).collect();
    let (written, result) = match table.put_many(&changed) {
        Ok(()) => (changed.len(), Ok(())),
        Err((n, e)) => (n, Err(e)),
    };
    for (k, v) in changed.into_iter().take(written) {
        actual.insert(k, v);
    }
    stats.written += written;
    result
}

/// Deletes what the mirror holds and nothing wants, in one call; the mirror follows.
fn delete_unwanted<K: Ord + Clone, V>(
    table: &mut dyn Table<K, V>,
    actual: &mut BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
    stats: &mut SyncStats,
) -> Result<()> {
    let stale: Vec<K> = actual.keys().filter(|k| !desired.contains_key(k)).cloned().collect();
    let (deleted, result) = match table.del_many(&stale) {
        Ok(()) => (stale.len(), Ok(())),
        Err((n, e)) => (n, Err(e)),
    };
    for k in stale.iter().take(deleted) {
        actual.remove(k);
    }
    stats.deleted += deleted;
    result
}

impl Reconciler {
    /// Starts from what the maps hold (a restarted proxy adopts a running datapath).
    pub fn new(tables: &Tables) -> Result<Self> {
        Ok(Self { actual: tables.dump()? })
    }

    /// Forgets what it believed and reads what the maps hold (a full sync: anything changed behind
    /// its back is then corrected). Returns how the maps differed from what it believed. After a
    /// failed sync the belief still matches what was written, so that is drift too.
    pub fn refresh(&mut self, tables: &Tables) -> Result<Drift> {
        let held = tables.dump()?;
        let (b, h) = (&self.actual, &held);
        let mut drift = Drift::default();
        drift.compare("frontends", &b.frontends, &h.frontends);
        drift.compare("backend_slots", &b.slots, &h.slots);
        drift.compare("backends", &b.backends, &h.backends);
        drift.compare("backend_members", &b.members, &h.members);
        drift.compare("service_addrs", &b.service_addrs, &h.service_addrs);
        drift.compare("source_ranges", &b.source_ranges, &h.source_ranges);
        drift.compare("node_config", &b.node_config, &h.node_config);
        drift.compare("node_addrs", &b.node_addrs, &h.node_addrs);
        self.actual = held;
        Ok(drift)
    }

    /// What the reconciler believes the maps hold.
    pub fn actual(&self) -> &DesiredMaps {
        &self.actual
    }

    /// Brings the maps to `desired`. On error the mirror still matches what was written, so the next
    /// call continues where this one stopped.
    pub fn sync(&mut self, desired: &DesiredMaps, t: &mut Tables) -> Result<SyncStats> {
        let mut s = SyncStats::default();
        let a = &mut self.actual;
        // Referenced before referencing: the node's configuration first (SNAT needs it); backends ←
        // slots and memberships ← frontends; the address set and source ranges before the frontend
        // that makes packets need them.
        write_changed(t.node_config.as_mut(), &mut a.node_config, &desired.node_config, &mut s)
            .context("writing the node configuration")?;
        write_changed(t.node_addrs.as_mut(), &mut a.node_addrs, &desired.node_addrs, &mut s)
            .context("writing node addresses")?;
        write_changed(t.backends.as_mut(), &mut a.backends, &desired.backends, &mut s).context("writing backends")?;
        write_changed(t.slots.as_mut(), &mut a.slots, &desired.slots, &mut s).context("writing backend slots")?;
        write_changed(t.members.as_mut(), &mut a.members, &desired.members, &mut s)
            .context("writing backend memberships")?;
        write_changed(t.service_addrs.as_mut(), &mut a.service_addrs, &desired.service_addrs, &mut s)
            .context("writing service addresses")?;
        write_changed(t.source_ranges.as_mut(), &mut a.source_ranges, &desired.source_ranges, &mut s)
            .context("writing source ranges")?;
        write_changed(t.frontends.as_mut(), &mut a.frontends, &desired.frontends, &mut s)
            .context("writing frontends")?;
        // Then the reverse: frontends first, so nothing is looked up through an entry being removed.
        delete_unwanted(t.frontends.as_mut(), &mut a.frontends, &desired.frontends, &mut s)
            .context("deleting frontends")?;
        delete_unwanted(t.slots.as_mut(), &mut a.slots, &desired.slots, &mut s).context("deleting backend slots")?;
        delete_unwanted(t.service_addrs.as_mut(), &mut a.service_addrs, &desired.service_addrs, &mut s)
            .context("deleting service addresses")?;
        delete_unwanted(t.members.as_mut(), &mut a.members, &desired.members, &mut s)
            .context("deleting backend memberships")?;
        delete_unwanted(t.source_ranges.as_mut(), &mut a.source_ranges, &desired.source_ranges, &mut s)
            .context("deleting source ranges")?;
        delete_unwanted(t.backends.as_mut(), &mut a.backends, &desired.backends, &mut s)
            .context("deleting backends")?;
        delete_unwanted(t.node_addrs.as_mut(), &mut a.node_addrs, &desired.node_addrs, &mut s)
            .context("deleting node addresses")?;
        delete_unwanted(t.node_config.as_mut(), &mut a.node_config, &desired.node_config, &mut s)
            .context("clearing the node configuration")?;
        Ok(s)
    }
}
