//! The API server source: kube-rs watchers on Services, EndpointSlices (discovery.k8s.io/v1) and this
//! node's Node, each kept in a reflector store. As kube-proxy's informers: Services and slices are
//! selected server-side by kube-proxy's label selector (no `service.kubernetes.io/headless`, and
//! `service.kubernetes.io/service-proxy-name` absent or ours); a change that leaves an object as it
//! was (only its resourceVersion or managed fields moved) is dropped; nothing is announced before all
//! three initial lists are in. A broken watch is retried with backoff, and an expired resourceVersion
//! (410 Gone) relists — the store keeps the old objects until the new list is complete, so the
//! datapath is never flushed in between.

use std::{
    fmt::Debug,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use anyhow::{Context as _, Result, bail};
use futures::StreamExt as _;
use ipnet::Ipv4Net;
use k8s_openapi::{
    api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
    },
    serde::{Serialize, de::DeserializeOwned},
};
use kube::{
    Api, Client, Resource,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt as _,
        reflector::{self, ObjectRef, Store},
        watcher::{self, Event},
    },
};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

use crate::{
    metrics::SyncMetrics,
    model::SERVICE_PROXY_NAME_LABEL,
    objects::Objects,
    source::{Source, notifier},
};

/// kube-proxy's label selector for Services and EndpointSlices.
pub fn label_selector(service_proxy_name: Option<&str>) -> String {
    let proxy = match service_proxy_name {
        Some(name) => format!("{SERVICE_PROXY_NAME_LABEL}={name}"),
        None => format!("!{SERVICE_PROXY_NAME_LABEL}"),
    };
    format!("{proxy},!service.kubernetes.io/headless")
}

/// A client from `--kubeconfig`, else the usual inference (KUBECONFIG, ~/.kube/config, in-cluster),
/// with `--master` (kube-proxy's flag) overriding the address, not the credentials. It fails at once
/// when the address it would use is a Service address — the ClusterIP of the `kubernetes` Service
/// that in-cluster configuration names, or any address in `--service-cidr`: on a node whose Service
/// datapath is ebpf-proxy, nothing translates it until ebpf-proxy has synced, which it cannot do
/// without the API server. kube-proxy has the same need (kubeadm gives it a kubeconfig with the API
/// server's real address), and so has Cilium (`k8sServiceHost`).
pub async fn client(kubeconfig: Option<&Path>, master: Option<&str>, service_cidr: Option<Ipv4Net>) -> Result<Client> {
    let mut config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?
        }
        None if master.is_none() && !has_kubeconfig() => {
            // In-cluster: check the address before the credentials (which may not even be mounted).
            if let Ok(host) = std::env::var("KUBERNETES_SERVICE_HOST") {
                refuse_service_address(
                    &host,
                    "KUBERNETES_SERVICE_HOST (in-cluster configuration)",
                    service_cidr,
                    true,
                )?;
            }
            kube::Config::incluster().context("no kubeconfig, no --master, and not running in a cluster")?
        }
        None => kube::Config::infer().await.context("no kubeconfig and not running in a cluster")?,
    };
    if let Some(master) = master {
        let url = if master.contains("://") { master.to_owned() } else { format!("https://{master}") };
        config.cluster_url = url.parse().with_context(|| format!("--master {master}"))?;
    }
    let host = config.cluster_url.host().unwrap_or_default().trim_matches(['[', ']']).to_owned();
    let in_cluster_host = std::env::var("KUBERNETES_SERVICE_HOST").ok();
    refuse_service_address(&host, "the API server address", service_cidr, in_cluster_host.as_deref() == Some(&host))?;
    Ok(Client::try_from(config)?)
}

/// Whether KUBECONFIG or ~/.kube/config gives a kubeconfig (as `kube::Config::infer` looks first).
fn has_kubeconfig() -> bool {
    std::env::var_os("KUBECONFIG").is_some()
        || std::env::var_os("HOME").is_some_and(|h| Path::new(&h).join(".kube/config").is_file())
}

/// Fails, saying what to set, when `host` is a Service address: `is_kubernetes_service` (it is the
/// in-cluster address), an address in `service_cidr`, or a cluster DNS name (resolving it needs the
/// cluster DNS Service).
pub fn refuse_service_address(
    host: &str,
    what: &str,
    service_cidr: Option<Ipv4Net>,
    is_kubernetes_service: bool,
) -> Result<()> {
    let in_cidr =
        host.parse::<std::net::Ipv4Addr>().ok().zip(service_cidr).is_some_and(|(ip, cidr)| cidr.contains(&ip));
    let cluster_name = host.ends_with(".svc") || host.contains(".svc.") || host == "kubernetes.default";
    if is_kubernetes_service || in_cidr || cluster_name {
        let why = if cluster_name {
            "a cluster DNS name, which only resolves through a Service".to_owned()
        } else if in_cidr {
            format!("in the service CIDR {}", service_cidr.expect("checked"))
        } else {
            "the ClusterIP of the `kubernetes` Service".to_owned()
        };
        bail!(
            "{what} {host} is a Service address ({why}): on this node nothing translates it until ebpf-proxy has \
             synced, and ebpf-proxy cannot sync without the API server. Give the API server's real address: \
             --master https://<control-plane address>:6443, or a kubeconfig whose server is that address \
             (--kubeconfig, or clientConnection.kubeconfig in --config, as kubeadm's kube-proxy ConfigMap \
             carries in kubeconfig.conf)"
        );
    }
    Ok(())
}

/// Whether two versions of an object differ in anything but bookkeeping.
pub fn same_object<K: Resource + Serialize + Clone>(a: &K, b: &K) -> bool {
    let strip = |k: &K| {
        let mut k = k.clone();
        let m = k.meta_mut();
        m.resource_version = None;
        m.managed_fields = None;
        serde_json::to_value(&k).ok()
    };
    strip(a) == strip(b)
}

/// How many of the three kinds have completed their initial list.
#[derive(Clone, Default)]
struct InitialLists(Arc<AtomicUsize>);

const KINDS: usize = 3;

/// Watches one kind into a store; notifies `tx` of real changes once every kind is listed.
fn watch_kind<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: &'static str,
    lists: InitialLists,
    tx: mpsc::Sender<()>,
    changes: Option<Counter>,
) -> (Store<K>, tokio::task::JoinHandle<()>)
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Serialize + Send + Sync + 'static,
{
    let (reader, mut writer) = reflector::store::<K>();
    let store = reader.clone();
    let task = tokio::spawn(async move {
        let mut listed = false;
        let mut stream = watcher::watcher(api, config).default_backoff().boxed();
        while let Some(event) = stream.next().await {
            let event = match event {
                Ok(e) => e,
                // The watcher retries (with backoff) and relists after 410 Gone by itself.
                Err(e) => {
                    log::warn!("watching {kind}: {e}");
                    continue;
                }
            };
            let changed = match &event {
                Event::Apply(obj) => {
                    reader.get(&ObjectRef::from_obj(obj)).is_none_or(|previous| !same_object(&*previous, obj))
                }
                Event::Delete(_) | Event::InitDone => true,
                Event::Init | Event::InitApply(_) => false,
            };
            writer.apply_watcher_event(&event);
            if matches!(event, Event::InitDone) {
                if !listed {
                    listed = true;
                    lists.0.fetch_add(1, Ordering::SeqCst);
                }
                log::info!("{kind}: listed {} objects", reader.len());
            }
            if changed
                && matches!(event, Event::Apply(_) | Event::Delete(_))
                && let Some(c) = &changes
            {
                c.inc();
            }
            if changed && lists.0.load(Ordering::SeqCst) == KINDS {
                // A pending notification already covers this change.
                let _ = tx.try_send(());
            }
        }
    });
    (store, task)
}

/// Starts the watchers. `node_name` selects the one Node watched (its topology labels and whether it
/// is being deleted).
pub fn start(client: Client, node_name: &str, service_proxy_name: Option<&str>, metrics: &SyncMetrics) -> Source {
    let (tx, rx) = notifier();
    let lists = InitialLists::default();
    let selector = label_selector(service_proxy_name);
    let (services, t1) = watch_kind(
        Api::<Service>::all(client.clone()),
        watcher::Config::default().labels(&selector),
        "Services",
        lists.clone(),
        tx.clone(),
        Some(metrics.service_changes.clone()),
    );
    let (slices, t2) = watch_kind(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default().labels(&selector),
        "EndpointSlices",
        lists.clone(),
        tx.clone(),
        Some(metrics.endpoint_changes.clone()),
    );
    let (nodes, t3) = watch_kind(
        Api::<Node>::all(client),
        watcher::Config::default().fields(&format!("metadata.name={node_name}")),
        "Nodes",
        lists,
        tx,
        None,
    );
    // The stores' own Arcs: a snapshot copies pointers, never objects.
    let snapshot = Box::new(move || Objects {
        services: services.state(),
        slices: slices.state(),
        nodes: nodes.state(),
        errors: Vec::new(),
    });
    Source::new(rx, snapshot, vec![t1, t2, t3])
}
