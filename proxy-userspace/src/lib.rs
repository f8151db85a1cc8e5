//! ebpf-proxy: a kube-proxy replacement whose Service datapath runs in the kernel as eBPF programs.
//!
//! Flow of state: [`objects`] (Kubernetes YAML) → [`model`] (Service ports and endpoints) →
//! [`translate`] (map entries) → [`reconcile`] (diff and write) → the maps of [`datapath`].

pub mod batch;
pub mod cgroup;
pub mod cleanup;
pub mod config;
pub mod conntrack;
pub mod datapath;
pub mod health;
pub mod inspect;
pub mod kube_source;
pub mod kubeproxy_config;
pub mod links;
pub mod metrics;
pub mod migrate;
pub mod model;
pub mod objects;
pub mod proxy_health;
pub mod reconcile;
pub mod run;
pub mod schedule;
pub mod source;
pub mod stale;
pub mod trace;
pub mod translate;
