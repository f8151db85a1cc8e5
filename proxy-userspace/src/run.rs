//! `ebpf-proxy run`: load and attach the datapath in the current network namespace, then keep its maps
//! equal to the desired state built from the Kubernetes objects.

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use clap::{ArgAction, Args};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    config::NodeArgs,
    datapath::{self, Datapath, MapMode, PROG_FROM_NETDEV, PROG_FROM_POD},
    links::{self, LinkEvent},
    model::{self, ModelOptions},
    objects::Objects,
    reconcile::{Reconciler, Tables},
    source,
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

/// The state kept while running.
struct Proxy {
    dp: Datapath,
    tables: Tables,
    reconciler: Reconciler,
    ids: Ids,
    model_opts: ModelOptions,
    node: NodeArgs,
    snat_ports: (u16, u16),
}

impl Proxy {
    fn apply(&mut self, objects: &Objects) {
        let started = Instant::now();
        let model = model::build(objects, &self.model_opts);
        for e in &model.errors {
            log::warn!("{e}");
        }
        let mut node = NodeContext::new(&self.node, &model);
        node.snat_ports = self.snat_ports;
        let (desired, notes) = translate::translate(&model, &node, &mut self.ids);
        for n in &notes {
            log::warn!("{n}");
        }
        match self.reconciler.sync(&desired, &mut self.tables) {
            Ok(s) => log::info!(
                "synced {} service ports, {} frontends, {} backends: {} entries written, {} deleted in {:?}",
                model.ports.len(),
                desired.frontends.len(),
                desired.backends.len(),
                s.written,
                s.deleted,
                started.elapsed()
            ),
            // The mirror matches what was written; the next change or resync finishes the job.
            Err(e) => log::error!("sync failed: {e:#}"),
        }
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
    let mut proxy =
        Proxy { dp, tables, reconciler, ids, model_opts, node: args.node.clone(), snat_ports: args.snat_port_range };

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
                proxy.apply(&objects);
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
