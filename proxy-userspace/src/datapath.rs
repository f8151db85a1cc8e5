//! Loading the kernel programs, pinning their maps and attaching them.

use std::{
    collections::BTreeMap,
    fs,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader, Pod,
    maps::{
        Array, HashMap, IterableMap as _, Map, MapData, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{
        CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
    },
};
use proxy_common::{MAP_LAYOUT, NODE_F_CONFIGURED, NodeConfig, PodIface, STAT_MAX, SourceRangeKey};

use crate::{
    batch,
    conntrack::ConntrackMaps,
    migrate::{self, Migration},
    reconcile::{Table, Tables},
    translate::SourceRange,
};

/// The eBPF object, built by build.rs and embedded so the binary is all a node needs.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

/// Program names (ELF symbols) and the pinned maps, as operators see them in bpftool.
pub const PROG_FROM_POD: &str = "from_pod";
pub const PROG_FROM_NETDEV: &str = "from_netdev";
/// `from_netdev` for interfaces without a link-layer header (ipip, WireGuard, tun).
pub const PROG_FROM_L3DEV: &str = "from_l3dev";
/// tc egress: what the node's own stack sends (its connections to Services, replies of hostNetwork
/// backends, its ICMP errors).
pub const PROG_FROM_NODE: &str = "from_node";
pub const PROG_FROM_NODE_L3: &str = "from_node_l3";
pub const TC_PROGRAMS: [&str; 5] =
    [PROG_FROM_POD, PROG_FROM_NETDEV, PROG_FROM_L3DEV, PROG_FROM_NODE, PROG_FROM_NODE_L3];
/// The benchmarks' baseline (never attached).
pub const PROG_BASELINE: &str = "parse_only";
pub const SOCK_PROGRAMS: [&str; 4] = ["sock4_connect", "sock4_sendmsg", "sock4_recvmsg", "sock4_getpeername"];
pub const MAP_NAMES: [&str; 20] = [
    "LAYOUT",
    "FRONTENDS",
    "BACKEND_SLOTS",
    "BACKENDS",
    "BACKEND_MEMBERS",
    "SERVICE_ADDRS",
    "SOURCE_RANGES",
    "NODE_CONFIG",
    "NODE_ADDRS",
    "AFFINITY",
    "CONNTRACK",
    "CT_REPLY",
    "CT_LEASES",
    "CT_RECENT",
    "CT_RECENT_CURSOR",
    "SOCK_REV_NAT",
    "SOCK_FLOWS",
    "STATS",
    "REJECT_BUDGET",
    "SOCK_PEER",
];

/// The programs an interface gets: one on ingress (if any), one on egress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcPrograms {
    pub ingress: Option<&'static str>,
    pub egress: &'static str,
}

impl TcPrograms {
    /// A local pod's interface.
    pub const POD: Self = Self { ingress: Some(PROG_FROM_POD), egress: PROG_FROM_NODE };
    /// An external interface with an Ethernet header.
    pub const NETDEV: Self = Self { ingress: Some(PROG_FROM_NETDEV), egress: PROG_FROM_NODE };
    /// An external interface without a link-layer header (ipip, WireGuard, tun).
    pub const L3DEV: Self = Self { ingress: Some(PROG_FROM_L3DEV), egress: PROG_FROM_NODE_L3 };
    /// The loopback device: the node's connections to its own addresses (a NodePort, an LB IP or
    /// externalIP it holds) leave through it. Nothing arrives on it but what the node sent, so
    /// nothing on ingress — the datapath's deliveries to the node's sockets come in that way.
    pub const LOOPBACK: Self = Self { ingress: None, egress: PROG_FROM_NODE };

    /// What the log says was attached.
    pub fn describe(&self) -> String {
        match self.ingress {
            Some(ingress) => format!("{ingress} (ingress) and {} (egress)", self.egress),
            None => format!("{} (egress)", self.egress),
        }
    }
}

/// How the maps are created.
pub enum MapMode<'a> {
    /// Pinned under `dir` (reused if already pinned there): the datapath of `run`, with a connection
    /// table of `conntrack_max` connections (an adopted table keeps the size it was created with).
    Pinned { dir: &'a Path, conntrack_max: u32 },
    /// Private maps with small capacities and a table of `conntrack_max` connections: `trace` and
    /// tests.
    Private { conntrack_max: u32 },
}

/// The connection table's two maps, sized together.
const CONNTRACK_MAPS: [&str; 2] = ["CONNTRACK", "CT_REPLY"];
/// Connections in a private datapath (`trace`, tests) unless said otherwise.
pub const PRIVATE_CONNTRACK_MAX: u32 = 65_536;

impl MapMode<'_> {
    /// Private maps of the default sizes.
    pub const PRIVATE: MapMode<'static> = MapMode::Private { conntrack_max: PRIVATE_CONNTRACK_MAX };
}

/// The loaded object. Every link is pinned the moment it is made, under this instance's own
/// directory, so the datapath keeps running if the process dies (kill -9, OOM): the next instance
/// attaches its own links, then releases the dead one's. Dropping the Datapath releases its links
/// (detaching the programs) unless [`Datapath::keep_links`] was called.
pub struct Datapath {
    ebpf: Ebpf,
    /// This instance's link pins (`<bpffs>/links/<instance>`); `None` until [`Datapath::pin_links_in`].
    link_dir: Option<PathBuf>,
    /// ifindex → the pinned links of its programs (ingress, if any, and egress).
    tc_links: BTreeMap<u32, Vec<PathBuf>>,
    sock_links: Vec<PathBuf>,
    keep: bool,
    /// A change of map layout under way (see `migrate`): the pin directory and the migration, until
    /// [`Datapath::finish_migration`].
    migration: Option<(PathBuf, &'static Migration)>,
}

/// Hash maps are read, written and cleared in batches (crate::batch): a sync of 100,000 entries, or
/// adopting them at start, is a few dozen syscalls.
impl<K: Pod + Ord, V: Pod> Table<K, V> for HashMap<MapData, K, V> {
    fn put(&mut self, key: &K, value: &V) -> Result<()> {
        self.insert(key, value, 0).map_err(Into::into)
    }
    fn del(&mut self, key: &K) -> Result<()> {
        match self.remove(key) {
            Ok(()) => Ok(()),
            // Already gone is what we wanted.
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
    fn entries(&self) -> Result<BTreeMap<K, V>> {
        Ok(batch::dump(self.map().fd().as_fd())?.into_iter().collect())
    }
    fn put_many(&mut self, entries: &[(K, V)]) -> Result<(), (usize, anyhow::Error)> {
        batch::update(self.map().fd().as_fd(), entries).map_err(|(n, e)| (n, e.into()))
    }
    fn del_many(&mut self, keys: &[K]) -> Result<(), (usize, anyhow::Error)> {
        batch::delete(self.map().fd().as_fd(), keys).map_err(|(n, e)| (n, e.into()))
    }
}

impl Table<SourceRange, u32> for LpmTrie<MapData, SourceRangeKey, u32> {
    fn put(&mut self, key: &SourceRange, value: &u32) -> Result<()> {
        self.insert(&Key::new(key.0, key.1), value, 0).map_err(Into::into)
    }
    fn del(&mut self, key: &SourceRange) -> Result<()> {
        match self.remove(&Key::new(key.0, key.1)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
    fn entries(&self) -> Result<BTreeMap<SourceRange, u32>> {
        self.iter().map(|r| r.map(|(k, v)| ((k.prefix_len(), k.data()), v)).map_err(Into::into)).collect()
    }
}

/// The one-entry configuration array: "deleting" zeroes it, which the programs read as unconfigured.
impl Table<u32, NodeConfig> for Array<MapData, NodeConfig> {
    fn put(&mut self, key: &u32, value: &NodeConfig) -> Result<()> {
        self.set(*key, value, 0).map_err(Into::into)
    }
    fn del(&mut self, key: &u32) -> Result<()> {
        self.set(*key, &NodeConfig::default(), 0).map_err(Into::into)
    }
    fn entries(&self) -> Result<BTreeMap<u32, NodeConfig>> {
        let c = self.get(&0, 0)?;
        Ok(if c.flags & NODE_F_CONFIGURED != 0 { BTreeMap::from([(0, c)]) } else { BTreeMap::new() })
    }
}

impl Datapath {
    /// Loads the object and its programs into the kernel (verifying them), without attaching.
    pub fn load(mode: MapMode<'_>) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        let pins: Vec<(&str, PathBuf)>;
        let mut migration = None;
        match mode {
            MapMode::Pinned { dir, conntrack_max } => {
                fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
                migration = plan_layout(dir)?.map(|m| (dir.to_owned(), m));
                let migrated =
                    |name: &str| migration.as_ref().is_some_and(|(_, m)| m.maps.iter().any(|(n, _)| *n == name));
                pins = MAP_NAMES
                    .iter()
                    .map(|n| (*n, if migrated(n) { migrate::migrating_pin(dir, n) } else { dir.join(n) }))
                    .collect();
                for (name, path) in &pins {
                    // A migration cut short left one: it is done again from the start.
                    if migrated(name) && path.exists() {
                        fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
                    }
                    loader.map_pin_path(name, path.as_path());
                }
                let size = adopted_size(dir, conntrack_max)?;
                for name in CONNTRACK_MAPS {
                    loader.map_max_entries(name, size);
                }
            }
            MapMode::Private { conntrack_max } => {
                // Enough for any trace; keeps creating the maps cheap.
                for (name, size) in [("AFFINITY", 1024), ("SOCK_REV_NAT", 1024), ("SOCK_FLOWS", 1024)]
                    .into_iter()
                    .chain(CONNTRACK_MAPS.map(|n| (n, conntrack_max)))
                {
                    loader.map_max_entries(name, size);
                }
            }
        }
        let mut ebpf = loader.load(EBPF_OBJECT).context("loading the eBPF object")?;
        match &migration {
            // The old layout stays recorded until the switch (a run cut short starts over).
            Some((dir, m)) => {
                for (name, convert) in m.maps {
                    let n = migrate::copy(dir, name, *convert)?;
                    log::info!(
                        "migrating the pinned maps from layout {} to {MAP_LAYOUT}: {n} entries of {name} carried over",
                        m.from
                    );
                }
            }
            None => set_layout(&mut ebpf, MAP_LAYOUT, 0)?,
        }
        for name in TC_PROGRAMS {
            let prog: &mut SchedClassifier = program(&mut ebpf, name)?.try_into()?;
            prog.load().with_context(|| format!("loading {name}"))?;
        }
        for name in SOCK_PROGRAMS {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?.try_into()?;
            prog.load().with_context(|| format!("loading {name}"))?;
        }
        Ok(Self { ebpf, link_dir: None, tc_links: BTreeMap::new(), sock_links: Vec::new(), keep: false, migration })
    }

    /// Ends a change of map layout, once this instance's programs have taken over from the old
    /// ones (their links released): the entries the old programs created since the first copy are
    /// carried over, the migrated maps' pins take the old ones' names, and the new layout is
    /// recorded. Returns the layout migrated from and the entries added, if there was a migration.
    pub fn finish_migration(&mut self) -> Result<Option<(u32, usize)>> {
        let Some((dir, m)) = self.migration.take() else { return Ok(None) };
        let mut added = 0;
        for (name, convert) in m.maps {
            added += migrate::copy(&dir, name, *convert)?;
        }
        // Marked first: a run cut short between the renames finishes them (plan_layout).
        set_layout(&mut self.ebpf, m.from, MAP_LAYOUT)?;
        migrate::switch_pins(&dir, &m.maps.iter().map(|(n, _)| *n).collect::<Vec<_>>())?;
        set_layout(&mut self.ebpf, MAP_LAYOUT, 0)?;
        Ok(Some((m.from, added)))
    }

    /// Loads `parse_only`, the benchmarks' baseline program (parsing as the Service programs do,
    /// then pass), for BPF_PROG_TEST_RUN.
    pub fn load_baseline(&mut self) -> Result<()> {
        let prog: &mut SchedClassifier = program(&mut self.ebpf, PROG_BASELINE)?.try_into()?;
        prog.load().context("loading parse_only")?;
        Ok(())
    }

    /// The load-balancing maps, for the reconciler.
    pub fn tables(&mut self) -> Result<Tables> {
        Ok(Tables {
            frontends: Box::new(HashMap::try_from(self.take_map("FRONTENDS")?)?),
            slots: Box::new(HashMap::try_from(self.take_map("BACKEND_SLOTS")?)?),
            backends: Box::new(HashMap::try_from(self.take_map("BACKENDS")?)?),
            members: Box::new(HashMap::try_from(self.take_map("BACKEND_MEMBERS")?)?),
            service_addrs: Box::new(HashMap::try_from(self.take_map("SERVICE_ADDRS")?)?),
            source_ranges: Box::new(LpmTrie::try_from(self.take_map("SOURCE_RANGES")?)?),
            node_config: Box::new(Array::try_from(self.take_map("NODE_CONFIG")?)?),
            node_addrs: Box::new(HashMap::try_from(self.take_map("NODE_ADDRS")?)?),
        })
    }

    pub fn take_map(&mut self, name: &str) -> Result<Map> {
        self.ebpf.take_map(name).ok_or_else(|| anyhow!("map {name} missing (or already taken)"))
    }

    /// The connection table's maps.
    pub fn conntrack(&mut self) -> Result<ConntrackMaps> {
        ConntrackMaps::new(self.take_map("CONNTRACK")?, self.take_map("CT_REPLY")?, self.take_map("CT_LEASES")?)
    }

    /// The per-reason counters, summed over CPUs.
    pub fn read_stats(&self) -> Result<Vec<u64>> {
        let map = self.ebpf.map("STATS").ok_or_else(|| anyhow!("map STATS missing"))?;
        let stats: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map)?;
        (0..STAT_MAX).map(|i| Ok(stats.get(&i, 0)?.iter().sum())).collect()
    }

    /// A loaded program, for `BPF_PROG_TEST_RUN`.
    pub fn classifier(&self, name: &str) -> Result<&SchedClassifier> {
        let prog = self.ebpf.program(name).ok_or_else(|| anyhow!("program {name} missing"))?;
        Ok(prog.try_into()?)
    }

    /// Where this instance pins its links: a new directory under `links_root`, named by the start
    /// time so that it never collides with an earlier instance's.
    pub fn pin_links_in(&mut self, links_root: &Path) -> Result<PathBuf> {
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
        let dir = links_root.join(stamp.to_string());
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        self.link_dir = Some(dir.clone());
        Ok(dir)
    }

    fn link_path(&self, file: &str) -> Result<PathBuf> {
        let dir = self.link_dir.as_ref().ok_or_else(|| anyhow!("no link pin directory set"))?;
        Ok(dir.join(file))
    }

    /// Attaches the interface's tc programs (TCX) — `programs.ingress` on ingress, `programs.egress`
    /// on egress — and pins the links. Idempotent per interface index.
    pub fn attach_tc(&mut self, ifindex: u32, programs: TcPrograms) -> Result<()> {
        if self.tc_links.contains_key(&ifindex) {
            return Ok(());
        }
        let mut paths = Vec::with_capacity(2);
        let hooks = [(programs.ingress, TcAttachType::Ingress), (Some(programs.egress), TcAttachType::Egress)];
        for (name, direction) in hooks.into_iter().filter_map(|(p, d)| Some((p?, d))) {
            let path = self.link_path(&format!("{name}_if{ifindex}"))?;
            let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?.try_into()?;
            let attached = prog
                .attach(aya::programs::NetworkInterface::Index(ifindex), direction)
                .with_context(|| format!("attaching {name} to interface {ifindex}"))
                .and_then(|id| Ok(FdLink::try_from(prog.take_link(id)?)?))
                .and_then(|link| pin_link(link, &path));
            if let Err(e) = attached {
                // Both or neither: an ingress program without its egress one would leave the node's
                // own replies untranslated.
                paths.iter().for_each(|p: &PathBuf| drop(fs::remove_file(p)));
                return Err(e);
            }
            paths.push(path);
        }
        self.tc_links.insert(ifindex, paths);
        Ok(())
    }

    /// Forgets the links of an interface that went away (the kernel already detached them).
    pub fn forget_interface(&mut self, ifindex: u32) {
        for path in self.tc_links.remove(&ifindex).into_iter().flatten() {
            let _ = fs::remove_file(path);
        }
        if let Ok(mut ifaces) = self.pod_ifaces() {
            let _ = ifaces.remove(&ifindex);
        }
    }

    /// Registers a local pod's interface (and the bridge it is a port of, 0 if none): its packets are
    /// then held to the pod's own source address.
    pub fn set_pod_interface(&mut self, ifindex: u32, master_ifindex: u32) -> Result<()> {
        self.pod_ifaces()?.insert(&ifindex, &PodIface { master_ifindex }, 0).context("writing POD_IFACES")
    }

    fn pod_ifaces(&mut self) -> Result<HashMap<&mut MapData, u32, PodIface>> {
        let map = self.ebpf.map_mut("POD_IFACES").ok_or_else(|| anyhow!("map POD_IFACES missing"))?;
        Ok(HashMap::try_from(map)?)
    }

    /// Interfaces a tc program is attached to.
    pub fn attached_interfaces(&self) -> Vec<u32> {
        self.tc_links.keys().copied().collect()
    }

    /// Attaches the socket programs to a cgroup v2 directory and pins the links. As BPF links they
    /// coexist with an earlier instance's until that is released: the first program that translates
    /// an address leaves the others nothing to do.
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<()> {
        let dir = fs::File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        for name in SOCK_PROGRAMS {
            let path = self.link_path(name)?;
            let prog: &mut CgroupSockAddr = program(&mut self.ebpf, name)?.try_into()?;
            let id = prog
                .attach(dir.as_fd(), CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
            let link: FdLink = prog.take_link(id)?.try_into()?;
            pin_link(link, &path)?;
            self.sock_links.push(path);
        }
        Ok(())
    }

    /// Leaves every link attached after this process exits (`run --keep-datapath`).
    pub fn keep_links(&mut self) {
        self.keep = true;
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        // Unpinning the last reference detaches the program.
        if let Some(dir) = &self.link_dir {
            let _ = unpin_dir(dir);
        }
    }
}

fn pin_link(link: FdLink, path: &Path) -> Result<()> {
    if path.exists() {
        fs::remove_file(path)?;
    }
    link.pin(path).with_context(|| format!("pinning link at {}", path.display()))?;
    Ok(())
}

/// Unpins (releases) every link pinned in `dir` and removes it; returns how many.
fn unpin_dir(dir: &Path) -> Result<usize> {
    let Ok(entries) = fs::read_dir(dir) else { return Ok(0) };
    let mut n = 0;
    for entry in entries {
        let path = entry?.path();
        if path.is_dir() {
            n += unpin_dir(&path)?;
        } else if let Ok(link) = PinnedLink::from_pin(&path) {
            link.unpin().with_context(|| format!("unpinning {}", path.display()))?;
            n += 1;
        } else {
            fs::remove_file(&path)?;
        }
    }
    fs::remove_dir(dir)?;
    Ok(n)
}

/// Releases the links left under `links_root` by earlier instances (kept with `--keep-datapath`, or
/// left by one that died), all but `own`.
pub fn release_other_links(links_root: &Path, own: &Path) -> Result<usize> {
    let Ok(entries) = fs::read_dir(links_root) else { return Ok(0) };
    let mut n = 0;
    for entry in entries {
        let path = entry?.path();
        if path == own {
            continue;
        }
        if path.is_dir() {
            n += unpin_dir(&path)?;
        } else if let Ok(link) = PinnedLink::from_pin(&path) {
            link.unpin()?;
            n += 1;
        }
    }
    Ok(n)
}

/// The size of the connection table: `wanted`, unless a table is already pinned under `dir` — a
/// running datapath's connections are adopted with the table they live in, whatever its size.
/// The layout record of the maps pinned under `dir` — the layout, and the layout a migration was
/// switching to (0: none) — or `None` when no maps are pinned; pins made before the layout was
/// recorded are layout 1.
pub fn pinned_layout(dir: &Path) -> Result<Option<(u32, u32)>> {
    if !dir.join("FRONTENDS").exists() {
        return Ok(None);
    }
    let Ok(data) = MapData::from_pin(dir.join("LAYOUT")) else { return Ok(Some((1, 0))) };
    let layout: Array<MapData, u32> = Array::try_from(Map::Array(data))?;
    let read = |i| layout.get(&i, 0).context("reading the pinned LAYOUT");
    Ok(Some((read(0)?, read(1)?)))
}

/// Decides what to do with maps pinned under `dir` (see proxy-common's `MAP_LAYOUT` and `migrate`):
/// adopt them (this build's layout, or none pinned), migrate them (`Some`), or refuse — adopting
/// maps of another layout would read every entry wrongly.
fn plan_layout(dir: &Path) -> Result<Option<&'static Migration>> {
    let Some((pinned, switching)) = pinned_layout(dir)? else { return Ok(None) };
    if pinned != MAP_LAYOUT && switching == MAP_LAYOUT {
        // A migration to this layout stopped while switching its pins: finish the switch.
        if let Some(m) = migrate::from(pinned) {
            let left: Vec<&str> =
                m.maps.iter().map(|(n, _)| *n).filter(|n| migrate::migrating_pin(dir, n).exists()).collect();
            migrate::switch_pins(dir, &left)?;
            let data = MapData::from_pin(dir.join("LAYOUT"))?;
            let mut layout: Array<MapData, u32> = Array::try_from(Map::Array(data))?;
            layout.set(0, &MAP_LAYOUT, 0)?;
            layout.set(1, &0, 0)?;
            return Ok(None);
        }
    }
    if pinned == MAP_LAYOUT {
        return Ok(None);
    }
    match migrate::from(pinned) {
        Some(m) => Ok(Some(m)),
        None => bail!(
            "the maps pinned under {} have layout {pinned}; this build reads layout {MAP_LAYOUT} and will not \
             adopt them (every connection, affinity and ID would be misread). Upgrade through the release that \
             migrates layout {pinned}, or remove the running datapath with `ebpf-proxy cleanup --ebpf-proxy` \
             first (established connections through Services then break)",
            dir.display()
        ),
    }
}

/// Records the layout (and the layout a migration is switching to, 0: none) in `LAYOUT`.
fn set_layout(ebpf: &mut Ebpf, layout: u32, switching: u32) -> Result<()> {
    let map = ebpf.map_mut("LAYOUT").ok_or_else(|| anyhow!("map LAYOUT missing"))?;
    let mut array = Array::<&mut MapData, u32>::try_from(map)?;
    array.set(1, &switching, 0).context("recording the map layout")?;
    array.set(0, &layout, 0).context("recording the map layout")
}

fn adopted_size(dir: &Path, wanted: u32) -> Result<u32> {
    let Ok(data) = MapData::from_pin(dir.join(CONNTRACK_MAPS[0])) else { return Ok(wanted) };
    let pinned = data.info()?.max_entries();
    if pinned != wanted {
        log::warn!(
            "the pinned connection table holds {pinned} connections, not --conntrack-max {wanted}: keeping its \
             connections and its size (a restart without --keep-datapath, which removes the maps, applies the new size)"
        );
    }
    Ok(pinned)
}

/// A map pinned by a running instance under `bpffs`, with its capacity.
pub fn open_pinned(bpffs: &Path, name: &str) -> Result<(Map, u32)> {
    let data = MapData::from_pin(bpffs.join(name)).with_context(|| {
        format!("opening {} (is ebpf-proxy running with --bpffs {}?)", bpffs.join(name).display(), bpffs.display())
    })?;
    let capacity = data.info()?.max_entries();
    Ok((Map::from_map_data(data)?, capacity))
}

/// A pinned hash map (LRU or not) with its capacity.
pub fn open_pinned_hash<K: Pod, V: Pod>(bpffs: &Path, name: &str) -> Result<(HashMap<MapData, K, V>, u32)> {
    let (map, capacity) = open_pinned(bpffs, name)?;
    Ok((HashMap::try_from(map)?, capacity))
}

/// The load-balancing maps of a running instance, read through their pins.
pub fn pinned_tables(bpffs: &Path) -> Result<Tables> {
    let hash = |name| -> Result<Map> { Ok(open_pinned(bpffs, name)?.0) };
    Ok(Tables {
        frontends: Box::new(HashMap::try_from(hash("FRONTENDS")?)?),
        slots: Box::new(HashMap::try_from(hash("BACKEND_SLOTS")?)?),
        backends: Box::new(HashMap::try_from(hash("BACKENDS")?)?),
        members: Box::new(HashMap::try_from(hash("BACKEND_MEMBERS")?)?),
        service_addrs: Box::new(HashMap::try_from(hash("SERVICE_ADDRS")?)?),
        source_ranges: Box::new(LpmTrie::try_from(hash("SOURCE_RANGES")?)?),
        node_config: Box::new(Array::try_from(hash("NODE_CONFIG")?)?),
        node_addrs: Box::new(HashMap::try_from(hash("NODE_ADDRS")?)?),
    })
}

/// Removes the pinned maps under `dir` (on shutdown, unless the datapath is kept).
/// What ebpf-proxy has pinned under `bpffs`: its links (each a program attached to an interface or
/// the cgroup) and its maps.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PinnedState {
    pub links: Vec<PathBuf>,
    pub maps: Vec<PathBuf>,
}

impl PinnedState {
    /// Reads what is pinned under `bpffs` (nothing if it does not exist).
    pub fn read(bpffs: &Path) -> Result<Self> {
        let mut state = Self::default();
        let Ok(entries) = fs::read_dir(bpffs) else { return Ok(state) };
        for entry in entries {
            let path = entry?.path();
            if path.is_dir() {
                collect_files(&path, &mut state.links)?;
            } else {
                state.maps.push(path);
            }
        }
        state.links.sort();
        state.maps.sort();
        Ok(state)
    }

    /// Detaches every program (unpinning its link) and removes every map pin and the directory.
    pub fn remove(self, bpffs: &Path) -> Result<()> {
        for link in &self.links {
            match PinnedLink::from_pin(link) {
                // Unpinned, the link's last reference is this one: dropping it detaches the program.
                Ok(l) => drop(l.unpin().with_context(|| format!("unpinning {}", link.display()))?),
                Err(_) => fs::remove_file(link).with_context(|| format!("removing {}", link.display()))?,
            }
        }
        for map in &self.maps {
            fs::remove_file(map).with_context(|| format!("removing {}", map.display()))?;
        }
        remove_empty_dirs(bpffs)
    }
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() { collect_files(&path, out)? } else { out.push(path) }
    }
    Ok(())
}

fn remove_empty_dirs(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            remove_empty_dirs(&path)?;
        }
    }
    fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))
}

pub fn unpin_maps(dir: &Path) -> Result<()> {
    for name in MAP_NAMES {
        let path = dir.join(name);
        if path.exists() {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} missing from the object"))
}
