//! `ebpf-proxy run`: load and attach the datapath in the current network namespace, then keep its maps
//! equal to the desired state built from the Kubernetes objects.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{HashMap, MapData};
use clap::{ArgAction, Args};
use proxy_common::{CtEntry, CtKey, SockFlow, SockFlowKey};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    config::NodeArgs,
    datapath::{self, Datapath, MapMode, PROG_FROM_NETDEV, PROG_FROM_POD},
    health::{self, ServiceHealth},
    links::{self, LinkEvent},
    model::{self, ModelOptions},
    objects::Objects,
    reconcile::{Reconciler, Tables},
    source,
    stale::{self, FlowTarget},
    translate::{self, Ids, NodeContext},
};

#[derive(Args, Clone, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Kubernetes objects (v1 Service, discovery.k8s.io/v1 EndpointSlice): a YAML file or a directory,
    /// watched for changes.
    #[arg(long)]
    pub objects: PathBuf,
    /// Directory on a bpffs mount where the maps are pinned.
    #[arg(long, default_value = "/sys/fs/bpf/ebpf-proxy")]
    pub bpffs: PathBuf,
    /// cgroup v2 directory the socket-level load balancer attaches to (default: /sys/fs/cgroup when it
    /// is a cgroup v2 mount).
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
    /// outside, and replies from backends on other nodes, are handled on their ingress.
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
}

fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s.split_once('-').ok_or("expected MIN-MAX")?;
    let a: u16 = a.trim().parse().map_err(|e| format!("{a:?}: {e}"))?;
    let b: u16 = b.trim().parse().map_err(|e| format!("{b:?}: {e}"))?;
    if a == 0 || a > b {
        return Err(format!("{s:?} is not a range of ports (1-65535, MIN <= MAX)"));
    }
    Ok((a, b))
}

const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// Adds the SNAT range to the node's reserved ports, keeping what is there.
fn reserve_snat_ports((min, max): (u16, u16)) -> Result<()> {
    let current = std::fs::read_to_string(RESERVED_PORTS).with_context(|| format!("reading {RESERVED_PORTS}"))?;
    let range = format!("{min}-{max}");
    if current.trim().split(',').any(|r| r == range) {
        return Ok(());
    }
    let joined = if current.trim().is_empty() { range } else { format!("{},{range}", current.trim()) };
    std::fs::write(RESERVED_PORTS, &joined).with_context(|| format!("writing {joined:?} to {RESERVED_PORTS}"))?;
    Ok(())
}

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

fn default_cgroup() -> Result<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let st = nix::sys::statfs::statfs(root).context("statfs /sys/fs/cgroup")?;
    if st.filesystem_type().0 as i64 != CGROUP2_SUPER_MAGIC {
        bail!("/sys/fs/cgroup is not a cgroup v2 mount: pass --cgroup DIR (a cgroup v2 directory)");
    }
    Ok(root.to_owned())
}

/// Which tc program an interface gets, if any.
fn tc_program_for(args: &RunArgs, name: &str) -> Option<&'static str> {
    if args.interfaces.iter().any(|i| i == name) {
        Some(PROG_FROM_NETDEV)
    } else if args.pod_interface_prefixes.iter().any(|p| name.starts_with(p.as_str())) {
        Some(PROG_FROM_POD)
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
    conntrack: HashMap<MapData, CtKey, CtEntry>,
    sock_flows: HashMap<MapData, SockFlowKey, SockFlow>,
    /// Serving UDP endpoints after the last sync; `None` before the first (which always checks, as
    /// entries may be left from an earlier instance).
    serving_udp: Option<BTreeSet<FlowTarget>>,
    health: ServiceHealth,
}

impl Proxy {
    async fn apply(&mut self, objects: &Objects) {
        let started = Instant::now();
        let model = model::build(objects, &self.model_opts);
        for e in &model.errors {
            log::warn!("{e}");
        }
        let mut node = NodeContext::new(&self.node, &model);
        node.snat_ports = self.snat_ports;
        node.host_netns_cookie = self.host_netns_cookie;
        let (desired, notes) = translate::translate(&model, &node, &mut self.ids);
        for n in &notes {
            log::warn!("{n}");
        }
        let synced = match self.reconciler.sync(&desired, &mut self.tables) {
            Ok(s) => {
                log::info!(
                    "synced {} service ports, {} frontends, {} backends: {} entries written, {} deleted in {:?}",
                    model.ports.len(),
                    desired.frontends.len(),
                    desired.backends.len(),
                    s.written,
                    s.deleted,
                    started.elapsed()
                );
                true
            }
            // The mirror matches what was written; the next change or resync finishes the job.
            Err(e) => {
                log::error!("sync failed: {e:#}");
                false
            }
        };
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
        }
        self.health.sync(&health::wanted(&model, &self.node.node_name), synced).await;
    }

    /// Deletes conntrack entries and socket flows of UDP flows to endpoints no longer serving.
    fn purge_stale_udp(
        &mut self,
        serving: &BTreeSet<FlowTarget>,
        backends: &std::collections::BTreeMap<u32, proxy_common::Backend>,
    ) -> Result<(usize, usize)> {
        let ct: Vec<(CtKey, CtEntry)> = self.conntrack.iter().collect::<Result<_, _>>()?;
        let stale_ct = stale::stale_conntrack(ct.iter().map(|(k, e)| (k, e)), serving);
        for k in &stale_ct {
            // Gone already (expired, evicted) is as good.
            let _ = self.conntrack.remove(k);
        }
        let flows: Vec<(SockFlowKey, SockFlow)> = self.sock_flows.iter().collect::<Result<_, _>>()?;
        let stale_flows = stale::stale_sock_flows(flows.iter().map(|(k, f)| (k, f)), backends, serving);
        for k in &stale_flows {
            let _ = self.sock_flows.remove(k);
        }
        Ok((stale_ct.len(), stale_flows.len()))
    }

    fn on_link(&mut self, event: LinkEvent, args: &RunArgs) {
        match event {
            LinkEvent::Present { index, name } => {
                let Some(prog) = tc_program_for(args, &name) else { return };
                if self.dp.attached_interfaces().contains(&index) {
                    return;
                }
                match self.dp.attach_tc(index, prog) {
                    Ok(()) => log::info!("attached {prog} to {name} (ifindex {index})"),
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

pub async fn run(args: RunArgs) -> Result<()> {
    let cgroup = if args.socket_lb { Some(args.cgroup.clone().map_or_else(default_cgroup, Ok)?) } else { None };
    let links_dir = args.bpffs.join("links");
    let mut dp = Datapath::load(MapMode::Pinned(&args.bpffs))?;
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
    };

    let (link_tx, mut link_rx) = mpsc::channel(256);
    let link_task = tokio::spawn(async move {
        if let Err(e) = links::watch(link_tx).await {
            log::error!("link watcher stopped: {e:#}");
        }
    });
    let (obj_tx, mut obj_rx) = mpsc::channel(4);
    let source_task = tokio::spawn(source::watch(args.objects.clone(), obj_tx));
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut first_sync = true;
    loop {
        tokio::select! {
            Some(event) = link_rx.recv() => proxy.on_link(event, &args),
            Some(objects) = obj_rx.recv() => {
                proxy.apply(&objects).await;
                if first_sync {
                    first_sync = false;
                    // The new programs are attached and the maps are programmed: an earlier instance's
                    // pinned links can go.
                    let n = datapath::unpin_links(&links_dir)?;
                    if n > 0 {
                        log::info!("released {n} links left by an earlier instance");
                    }
                    log::info!("ready");
                }
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    link_task.abort();
    source_task.abort();
    if args.keep_datapath {
        proxy.dp.pin_links(&links_dir)?;
        log::info!("leaving the datapath running (links pinned under {})", links_dir.display());
    } else {
        drop(proxy);
        datapath::unpin_maps(&args.bpffs)?;
        let _ = std::fs::remove_dir(&args.bpffs);
        log::info!("datapath detached and maps unpinned");
    }
    Ok(())
}
