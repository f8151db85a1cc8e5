//! `ebpf-proxy run`: load and attach the datapath in the current network namespace, then keep its maps
//! equal to the desired state built from the Kubernetes objects.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    os::fd::AsRawFd as _,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{HashMap, MapData};
use clap::{ArgAction, Args};
use proxy_common::{SockFlow, SockFlowKey, default_conntrack_max};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    cgroup,
    config::NodeArgs,
    conntrack::{self, ConntrackMaps},
    datapath::{self, Datapath, MapMode, TcPrograms},
    health::{self, ServiceHealth},
    kube_source,
    links::{self, LinkEvent},
    metrics::Metrics,
    model::{self, ModelOptions},
    objects::Objects,
    proxy_health::ProxyHealth,
    reconcile::{Reconciler, Tables},
    schedule::Schedule,
    source,
    stale::{self, FlowTarget},
    translate::{self, Ids, NodeContext},
};

#[derive(Args, Clone, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// A KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1) file, e.g. kube-proxy's ConfigMap;
    /// flags given on the command line take precedence over it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Read Kubernetes objects (v1 Service, discovery.k8s.io/v1 EndpointSlice, v1 Node) from a YAML
    /// file or directory, watched for changes, instead of the API server.
    #[arg(long, conflicts_with = "kubeconfig")]
    pub objects: Option<PathBuf>,
    /// kubeconfig for the API server; without it (and without --objects): KUBECONFIG, ~/.kube/config
    /// or the in-cluster service account.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The API server's address (kube-proxy's --master), overriding the kubeconfig's or the in-cluster
    /// one while keeping their credentials. It must not be a Service address: nothing translates one
    /// before ebpf-proxy has synced.
    #[arg(long, conflicts_with = "objects")]
    pub master: Option<String>,
    /// Directory on a bpffs mount where the maps are pinned.
    #[arg(long, default_value = "/sys/fs/bpf/ebpf-proxy")]
    pub bpffs: PathBuf,
    /// cgroup v2 directory the socket-level load balancer attaches to: a directory of a cgroup v2
    /// hierarchy, or one with the hierarchy mounted under it (a host's /sys/fs/cgroup on a hybrid host).
    /// Default: the cgroup v2 hierarchy's root, found in the mount table (/sys/fs/cgroup, or
    /// /sys/fs/cgroup/unified on a hybrid host).
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Translate Service addresses at connect()/sendmsg() time. With `false`, the tc programs do all
    /// the work per packet.
    #[arg(long, action = ArgAction::Set, default_value_t = true)]
    pub socket_lb: bool,
    /// Prefix of the host-side names of pod interfaces (repeatable; kube-proxy: --pod-interface-name-prefix).
    #[arg(long = "pod-interface-name-prefix", default_values_t = [String::from("veth")])]
    pub pod_interface_prefixes: Vec<String>,
    /// The node's external interfaces (comma-separated or repeated): Service traffic arriving from
    /// outside, and replies from backends on other nodes, are handled on their ingress. Default: the
    /// interfaces that carry a --node-ip address, found at start.
    #[arg(long, value_delimiter = ',')]
    pub interfaces: Vec<String>,
    /// Leave the pinned datapath running on exit (links pinned under <bpffs>/links).
    #[arg(long)]
    pub keep_datapath: bool,
    /// `--service-proxy-name`: handle Services labelled service.kubernetes.io/service-proxy-name=<this>.
    #[arg(long)]
    pub service_proxy_name: Option<String>,
    /// Source ports for masquerading (MIN-MAX). They are added to the node's
    /// net.ipv4.ip_local_reserved_ports so local sockets never take them.
    #[arg(long, default_value = "61000-65535", value_parser = parse_port_range)]
    pub snat_port_range: (u16, u16),
    /// Where `/healthz` and `/livez` are served (kube-proxy: --healthz-bind-address): IP:port, or
    /// an IP alone for port 10256.
    #[arg(long, default_value = "0.0.0.0:10256", value_parser = |s: &str| bind_address(s, 10256))]
    pub healthz_bind_address: SocketAddr,
    /// Where `/metrics` is served (kube-proxy: --metrics-bind-address): IP:port, or an IP alone for
    /// port 10249 (the DaemonSet passes the node IP, IPv4 or IPv6, this way).
    #[arg(long, default_value = "127.0.0.1:10249", value_parser = |s: &str| bind_address(s, 10249))]
    pub metrics_bind_address: SocketAddr,
    /// How often the maps are fully reconciled against what they hold, changes or not; twice this
    /// with a change still unprogrammed makes /healthz fail (kube-proxy: --sync-period).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub sync_period: Duration,
    /// The least time between two syncs: changes arriving faster are applied together
    /// (kube-proxy: --min-sync-period).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub min_sync_period: Duration,
    /// Connections the datapath tracks at most. A full table drops new connections (after
    /// displacing unanswered ones); established ones are never evicted. Default: kube-proxy's
    /// (conntrack.maxPerCore 32768 per CPU, at least conntrack.min 131072).
    #[arg(long)]
    pub conntrack_max: Option<u32>,
    /// How often connections that are over are removed from the table (the datapath also removes
    /// the ones it meets).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub conntrack_gc_interval: Duration,
}

/// CPUs this process may run on (the default conntrack size counts them, as kube-proxy does).
pub fn cpus() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

/// `IP:port` (`[IPv6]:port`), or an IP alone (either family) with `default_port`.
pub fn bind_address(s: &str, default_port: u16) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(|ip| SocketAddr::new(ip, default_port)))
        .map_err(|_| format!("{s:?} is neither IP:port nor an IP address"))
}

pub fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s.split_once('-').ok_or("expected MIN-MAX")?;
    let a: u16 = a.trim().parse().map_err(|e| format!("{a:?}: {e}"))?;
    let b: u16 = b.trim().parse().map_err(|e| format!("{b:?}: {e}"))?;
    if a == 0 || a > b {
        return Err(format!("{s:?} is not a range of ports (1-65535, MIN <= MAX)"));
    }
    Ok((a, b))
}

const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
const EPHEMERAL_PORTS: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// Keeps local sockets' automatic port choice off the SNAT range: adds the range to the node's
/// reserved ports. Where /proc/sys is read-only (an unprivileged container), that is only acceptable
/// when the ephemeral range does not reach into the SNAT range anyway.
fn reserve_snat_ports((min, max): (u16, u16)) -> Result<()> {
    let current = std::fs::read_to_string(RESERVED_PORTS).with_context(|| format!("reading {RESERVED_PORTS}"))?;
    let range = format!("{min}-{max}");
    if current.trim().split(',').any(|r| r == range) {
        return Ok(());
    }
    let joined = if current.trim().is_empty() { range } else { format!("{},{range}", current.trim()) };
    let Err(write_error) = std::fs::write(RESERVED_PORTS, &joined) else { return Ok(()) };
    let ephemeral = std::fs::read_to_string(EPHEMERAL_PORTS).with_context(|| format!("reading {EPHEMERAL_PORTS}"))?;
    let bounds: Vec<u16> = ephemeral.split_whitespace().filter_map(|p| p.parse().ok()).collect();
    let [lo, hi] = bounds[..] else { bail!("unexpected {EPHEMERAL_PORTS}: {ephemeral:?}") };
    if lo <= max && min <= hi {
        bail!(
            "cannot reserve the SNAT ports {min}-{max} ({RESERVED_PORTS}: {write_error}) and the ephemeral range \
             {lo}-{hi} overlaps them: make /proc/sys writable, or move --snat-port-range or the ephemeral range"
        );
    }
    log::info!(
        "{RESERVED_PORTS} is not writable ({write_error}); the ephemeral range {lo}-{hi} stays clear of the SNAT ports"
    );
    Ok(())
}

/// Gives back the SNAT ports `run` reserved: removes exactly that range from the node's reserved
/// ports. Returns whether it was there.
pub fn release_snat_ports((min, max): (u16, u16), dry_run: bool) -> Result<bool> {
    let current = std::fs::read_to_string(RESERVED_PORTS).with_context(|| format!("reading {RESERVED_PORTS}"))?;
    let range = format!("{min}-{max}");
    let ranges: Vec<&str> = current.trim().split(',').filter(|r| !r.is_empty()).collect();
    if !ranges.contains(&range.as_str()) {
        return Ok(false);
    }
    if !dry_run {
        let kept: Vec<&str> = ranges.into_iter().filter(|r| *r != range).collect();
        // An empty list is written as a newline: the kernel refuses an empty write.
        let text = if kept.is_empty() { "\n".to_owned() } else { kept.join(",") };
        std::fs::write(RESERVED_PORTS, text).with_context(|| format!("writing {RESERVED_PORTS}"))?;
    }
    Ok(true)
}

/// Which tc program an interface gets, if any.
fn tc_programs_for(args: &RunArgs, name: &str, l3: bool) -> Option<TcPrograms> {
    if name == "lo" {
        Some(TcPrograms::LOOPBACK)
    } else if args.interfaces.iter().any(|i| i == name) {
        Some(if l3 { TcPrograms::L3DEV } else { TcPrograms::NETDEV })
    } else if args.pod_interface_prefixes.iter().any(|p| name.starts_with(p.as_str())) {
        Some(TcPrograms::POD)
    } else {
        None
    }
}

/// `SO_NETNS_COOKIE` (include/uapi/asm-generic/socket.h).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of this process's network namespace: the node's, when `run` is started as it should be.
fn netns_cookie() -> Result<u64> {
    let sock = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).context("creating a socket")?;
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket, and a buffer of the size passed.
    let rc = unsafe {
        libc::getsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE, (&raw mut cookie).cast(), &raw mut len)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("getsockopt(SO_NETNS_COOKIE)");
    }
    Ok(cookie)
}

/// The state kept while running.
struct Proxy {
    dp: Datapath,
    tables: Tables,
    reconciler: Reconciler,
    ids: Ids,
    model_opts: ModelOptions,
    node: NodeArgs,
    snat_ports: (u16, u16),
    host_netns_cookie: u64,
    conntrack: ConntrackMaps,
    sock_flows: HashMap<MapData, SockFlowKey, SockFlow>,
    /// Serving UDP endpoints after the last sync; `None` before the first (which always checks, as
    /// entries may be left from an earlier instance).
    serving_udp: Option<BTreeSet<FlowTarget>>,
    health: ServiceHealth,
    proxy_health: ProxyHealth,
    metrics: Arc<Metrics>,
    /// EndpointSlice change trigger times already observed (network programming latency).
    seen_triggers: BTreeSet<(String, String)>,
    /// Skipped objects and translation notes as last logged.
    reported: BTreeSet<String>,
}

/// The annotation the EndpointSlice controller sets to when the change that produced a slice happened.
const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// Every slice's (namespace/name, trigger time), from the annotation.
fn trigger_times(objects: &Objects) -> BTreeSet<(String, String)> {
    objects
        .slices
        .iter()
        .filter_map(|s| {
            let t = s.metadata.annotations.as_ref()?.get(TRIGGER_TIME_ANNOTATION)?;
            let name = format!("{}/{}", s.metadata.namespace.as_deref()?, s.metadata.name.as_deref()?);
            Some((name, t.clone()))
        })
        .collect()
}

/// Whether this node is on its way out (deleted, or marked by the cluster autoscaler), so that
/// /healthz sends load balancers elsewhere first.
fn node_eligible(objects: &Objects, node_name: &str) -> bool {
    let Some(node) = objects.nodes.iter().find(|n| n.metadata.name.as_deref() == Some(node_name)) else {
        return true;
    };
    let deleting = node.metadata.deletion_timestamp.is_some();
    let marked = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == "ToBeDeletedByClusterAutoscaler"));
    !deleting && !marked
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

impl Proxy {
    /// One sync: the maps brought to the state `objects` describe. `full` re-reads what the maps
    /// hold first instead of trusting the mirror (periodic resync, retry after a failure); `snapshot`
    /// is how long taking `objects` from the source took (logged with the other phases).
    async fn apply(&mut self, objects: &Objects, full: bool, snapshot: Duration) -> bool {
        let started = Instant::now();
        let model = model::build(objects, &self.model_opts);
        self.metrics.sync.set_skipped(&model.errors);
        self.proxy_health.set_node_eligible(node_eligible(objects, &self.node.node_name));
        if full {
            match self.reconciler.refresh(&self.tables) {
                Ok(drift) if drift.is_empty() => {}
                // Nothing but ebpf-proxy writes these maps: say what changed behind its back; the
                // sync below repairs it.
                Ok(drift) => {
                    log::warn!("full sync: {} map entries had drifted and are repaired: {drift}", drift.total());
                    self.metrics.sync.count_drift(&drift);
                }
                Err(e) => {
                    log::error!("reading the maps for a full sync: {e:#}");
                    self.metrics.sync.sync_failures.inc();
                    return false;
                }
            }
        }
        let mut node = NodeContext::new(&self.node, &model);
        node.snat_ports = self.snat_ports;
        node.host_netns_cookie = self.host_netns_cookie;
        let modelled = started.elapsed();
        let (desired, notes) = translate::translate(&model, &node, &mut self.ids);
        // Every sync sees the same problems again: each is logged once, when it first appears.
        let problems: BTreeSet<String> = model.errors.iter().map(ToString::to_string).chain(notes).collect();
        for p in problems.difference(&self.reported) {
            log::warn!("{p}");
        }
        self.reported = problems;
        let translated = started.elapsed();
        let synced = match self.reconciler.sync(&desired, &mut self.tables) {
            Ok(s) if full && s.written == 0 && s.deleted == 0 => {
                log::debug!("full resync: the maps hold what is desired ({:?})", started.elapsed());
                true
            }
            Ok(s) => {
                log::info!(
                    "synced {} service ports, {} frontends, {} backends: {} entries written, {} deleted in {:?} \
                     (snapshot {:?}, model {:?}, translation {:?}, maps {:?})",
                    model.ports.len(),
                    desired.frontends.len(),
                    desired.backends.len(),
                    s.written,
                    s.deleted,
                    started.elapsed(),
                    snapshot,
                    modelled,
                    translated - modelled,
                    started.elapsed() - translated
                );
                true
            }
            // The mirror matches what was written; the retry (a full sync) finishes the job.
            Err(e) => {
                log::error!("sync failed: {e:#}");
                self.metrics.sync.sync_failures.inc();
                false
            }
        };
        self.metrics.sync.sync_duration.observe(started.elapsed().as_secs_f64());
        if synced {
            let serving = stale::serving_udp(&model, &node, &desired);
            if self.serving_udp.as_ref().is_none_or(|before| stale::lost_any(before, &serving)) {
                match self.purge_stale_udp(&serving, &desired.backends) {
                    Ok((0, 0)) => {}
                    Ok((ct, sock)) => log::info!(
                        "purged UDP flows to endpoints no longer serving: {ct} conntrack entries, {sock} socket flows"
                    ),
                    Err(e) => log::error!("purging stale UDP flows: {e:#}"),
                }
            }
            self.serving_udp = Some(serving);
            let now = SystemTime::now();
            self.metrics.sync.last_sync_timestamp.set(unix_seconds(now));
            self.proxy_health.updated();
            // Network programming latency: from the change that produced a slice to now.
            let triggers = trigger_times(objects);
            for (_, t) in triggers.difference(&self.seen_triggers) {
                if let Ok(at) = humantime::parse_rfc3339_weak(t)
                    && let Ok(d) = now.duration_since(at)
                {
                    self.metrics.sync.network_programming.observe(d.as_secs_f64());
                }
            }
            self.seen_triggers = triggers;
        }
        self.health.sync(&health::wanted(&model, &self.node.node_name), self.proxy_health.is_healthy()).await;
        synced
    }

    /// Deletes conntrack entries and socket flows of UDP flows to endpoints no longer serving.
    fn purge_stale_udp(
        &mut self,
        serving: &BTreeSet<FlowTarget>,
        backends: &std::collections::BTreeMap<u32, proxy_common::Backend>,
    ) -> Result<(usize, usize)> {
        let ct = self.conntrack.connections()?;
        let stale_ct = self.conntrack.remove(&stale::stale_conntrack(ct.iter().map(|(k, e)| (k, e)), serving))?;
        let flows: Vec<(SockFlowKey, SockFlow)> = self.sock_flows.iter().collect::<Result<_, _>>()?;
        let stale_flows = stale::stale_sock_flows(flows.iter().map(|(k, f)| (k, f)), backends, serving);
        for k in &stale_flows {
            let _ = self.sock_flows.remove(k);
        }
        Ok((stale_ct, stale_flows.len()))
    }

    fn on_link(&mut self, event: LinkEvent, args: &RunArgs) {
        match event {
            LinkEvent::Present { index, name, master, l3 } => {
                let Some(programs) = tc_programs_for(args, &name, l3) else { return };
                // Registered before the program is attached, and again whenever the interface
                // changes (a CNI makes the pod's interface a bridge port after creating it).
                if programs == TcPrograms::POD
                    && let Err(e) = self.dp.set_pod_interface(index, master)
                {
                    log::error!("registering pod interface {name}: {e:#}");
                    return;
                }
                if self.dp.attached_interfaces().contains(&index) {
                    return;
                }
                match self.dp.attach_tc(index, programs) {
                    Ok(()) => log::info!("attached {} to {name} (ifindex {index})", programs.describe()),
                    Err(e) => log::error!("{e:#}"),
                }
            }
            LinkEvent::Gone { index, name } if self.dp.attached_interfaces().contains(&index) => {
                self.dp.forget_interface(index);
                log::info!("released {name} (ifindex {index})");
            }
            _ => {}
        }
    }
}

pub async fn run(mut args: RunArgs) -> Result<()> {
    // The API client first: an address it cannot reach before the datapath runs is an error to give
    // before anything is loaded (see kube_source::client).
    let api_client = match &args.objects {
        Some(_) => None,
        None => {
            Some(kube_source::client(args.kubeconfig.as_deref(), args.master.as_deref(), args.node.service_cidr).await?)
        }
    };
    if args.interfaces.is_empty() && !args.node.node_ips.is_empty() {
        args.interfaces = links::interfaces_with(&args.node.node_ips).await?;
        log::info!("external interfaces (carrying a node IP): {:?}", args.interfaces);
    }
    let cgroup = match (&args.cgroup, args.socket_lb) {
        (_, false) => None,
        (Some(dir), true) => Some(cgroup::cgroup2_in(dir)?),
        (None, true) => Some(cgroup::host_cgroup2()?),
    };
    let links_dir = args.bpffs.join("links");
    let conntrack_max = args.conntrack_max.unwrap_or_else(|| default_conntrack_max(cpus()));
    let mut dp = Datapath::load(MapMode::Pinned { dir: &args.bpffs, conntrack_max })?;
    let own_links = dp.pin_links_in(&links_dir)?;
    let tables = dp.tables()?;
    let reconciler = Reconciler::new(&tables).context("reading the pinned maps")?;
    let ids = Ids::restore(&reconciler.actual().frontends, &reconciler.actual().backends);
    if !reconciler.actual().frontends.is_empty() {
        log::info!("adopting {} frontends from the pinned maps", reconciler.actual().frontends.len());
    }
    if let Some(cg) = &cgroup {
        dp.attach_cgroup(cg)?;
        log::info!("socket-level load balancing on cgroup {}", cg.display());
    }
    let model_opts = ModelOptions { service_proxy_name: args.service_proxy_name.clone() };
    reserve_snat_ports(args.snat_port_range)?;
    if args.node.node_ips.is_empty() {
        log::warn!("no --node-ip: NodePorts are not served and traffic needing masquerade is dropped");
    }
    let conntrack = dp.conntrack()?;
    let conntrack_capacity = conntrack.capacity;
    log::info!("connection table: {conntrack_capacity} connections");
    let sock_flows = HashMap::try_from(dp.take_map("SOCK_FLOWS")?)?;
    // As kube-proxy: every address when NodePorts are served on all of them, else the matching ones.
    let health_bind = if args.node.nodeport_addresses.is_empty() {
        vec![Ipv4Addr::UNSPECIFIED]
    } else {
        NodeContext::new(&args.node, &model::Model::default()).nodeport_ips()
    };
    let mut proxy = Proxy {
        dp,
        tables,
        reconciler,
        ids,
        model_opts,
        node: args.node.clone(),
        snat_ports: args.snat_port_range,
        host_netns_cookie: netns_cookie()?,
        conntrack,
        sock_flows,
        serving_udp: None,
        health: ServiceHealth::new(health_bind),
        // As kube-proxy: unhealthy once a change has waited twice the sync period.
        proxy_health: ProxyHealth::new(2 * args.sync_period),
        metrics: Arc::new(Metrics::new(&args.bpffs, conntrack_capacity)?),
        seen_triggers: BTreeSet::new(),
        reported: BTreeSet::new(),
    };
    let _healthz = proxy.proxy_health.clone().serve(args.healthz_bind_address).await?;
    let _metrics = proxy.metrics.clone().serve(args.metrics_bind_address).await?;
    let gc_stop = Arc::new(AtomicBool::new(false));
    let gc_metrics = proxy.metrics.conntrack.clone();
    let gc = conntrack::spawn_collector(
        ConntrackMaps::pinned(&args.bpffs)?,
        args.conntrack_gc_interval,
        gc_stop.clone(),
        move |result, took| {
            match &result {
                Ok(c) if c.dead + c.orphans > 0 => log::debug!(
                    "conntrack: {} alive, removed {} dead and {} orphan reply tuples in {took:?}",
                    c.alive,
                    c.dead,
                    c.orphans
                ),
                Ok(_) => {}
                Err(e) => log::error!("conntrack collection failed: {e:#}"),
            }
            gc_metrics.record(&result);
        },
    );

    let (link_tx, mut link_rx) = mpsc::channel(256);
    let link_task = tokio::spawn(async move {
        if let Err(e) = links::watch(link_tx).await {
            log::error!("link watcher stopped: {e:#}");
        }
    });
    let mut source = match (&args.objects, api_client) {
        (Some(path), _) => source::files(path.clone()),
        (None, Some(client)) => {
            kube_source::start(client, &args.node.node_name, args.service_proxy_name.as_deref(), &proxy.metrics.sync)
        }
        (None, None) => unreachable!("a client is made when there are no --objects"),
    };
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut schedule = Schedule::new(args.min_sync_period, args.sync_period);
    let mut has_objects = false;
    let mut ready = false;
    loop {
        let due = schedule.next();
        let wait = due.map_or(tokio::time::Instant::now() + args.sync_period, |d| d.at.into());
        tokio::select! {
            Some(event) = link_rx.recv() => proxy.on_link(event, &args),
            Some(()) = source.changes.recv() => {
                has_objects = true;
                schedule.changed();
                proxy.proxy_health.queued();
                proxy.metrics.sync.last_queued_timestamp.set(unix_seconds(SystemTime::now()));
            }
            _ = tokio::time::sleep_until(wait), if due.is_some() => {
                let Some(due) = due.filter(|_| has_objects) else { continue };
                let taken = Instant::now();
                let objects = source.snapshot();
                let ok = proxy.apply(&objects, due.full, taken.elapsed()).await;
                schedule.ran(Instant::now(), ok);
                if ok && !ready {
                    ready = true;
                    // The new programs are attached and the maps are programmed: an earlier instance's
                    // pinned links can go.
                    let n = datapath::release_other_links(&links_dir, &own_links)?;
                    if n > 0 {
                        log::info!("released {n} links left by an earlier instance");
                    }
                    // Only this instance's programs run now: a change of map layout can be completed.
                    if let Some((from, added)) = proxy.dp.finish_migration()? {
                        log::info!(
                            "migrated the pinned maps from layout {from} to {}: {added} more entries carried over",
                            proxy_common::MAP_LAYOUT
                        );
                    }
                    log::info!("ready");
                }
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    link_task.abort();
    gc_stop.store(true, Ordering::Relaxed);
    let _ = gc.join();
    drop(source);
    if args.keep_datapath {
        proxy.dp.keep_links();
        log::info!("leaving the datapath running (links pinned under {})", own_links.display());
    } else {
        drop(proxy);
        let _ = std::fs::remove_dir(&links_dir);
        datapath::unpin_maps(&args.bpffs)?;
        let _ = std::fs::remove_dir(&args.bpffs);
        log::info!("datapath detached and maps unpinned");
    }
    Ok(())
}
