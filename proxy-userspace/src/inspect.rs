//! `ebpf-proxy services | backends | conntrack`: what a running instance's pinned maps hold, as a
//! table or `--json` — the datapath's own view, the way operators use `cilium-dbg service list` and
//! `bpf ct list`. Read-only: opening the pins changes nothing.

use std::{net::SocketAddrV4, path::PathBuf};

use anyhow::Result;
use clap::Args;
use proxy_common::{
    BACKEND_F_LOCAL, BackendSlotKey, CT_F_ASSURED, CT_F_SEEN_REPLY, CT_F_SNAT, CtEntry, CtKey, FRONTEND_F_AFFINITY,
    FRONTEND_F_ETP_LOCAL, FRONTEND_F_HAS_ENDPOINTS, FRONTEND_F_ITP_LOCAL, LOCAL_SLOT_BASE, addr_from_map, ct_alive,
    ct_remaining_ns, ct_state_name, port_from_map,
};
use serde::Serialize;

use crate::{
    datapath::{open_pinned_hash, pinned_tables},
    model::Protocol,
    translate::{DesiredMaps, describe_frontend},
};

#[derive(Args, Clone, Debug)]
pub struct InspectArgs {
    /// The running instance's pin directory (its `run --bpffs`).
    #[arg(long, default_value = "/sys/fs/bpf/ebpf-proxy")]
    pub bpffs: PathBuf,
    /// One JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn sock(addr: u32, port: u16) -> String {
    SocketAddrV4::new(addr_from_map(addr).into(), port_from_map(port)).to_string()
}

fn proto_name(p: u8) -> String {
    Protocol::from_number(p).map_or_else(|| p.to_string(), |p| p.to_string())
}

#[derive(Serialize)]
pub struct ServiceRow {
    pub id: u32,
    pub frontend: String,
    pub protocol: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub policy: Vec<&'static str>,
    /// Cluster-wide set, in slot order.
    pub backends: Vec<String>,
    /// This node's set (Local policies).
    pub local_backends: Vec<String>,
}

/// One row per frontend, in frontend ID order.
pub fn services(maps: &DesiredMaps) -> Vec<ServiceRow> {
    let backend = |service_id: u32, slot: u32| {
        let id = maps.slots.get(&BackendSlotKey { service_id, slot })?;
        let b = maps.backends.get(id)?;
        Some(format!("{}{}", sock(b.addr, b.port), if b.flags & BACKEND_F_LOCAL != 0 { " (local)" } else { "" }))
    };
    let mut rows: Vec<ServiceRow> = maps
        .frontends
        .iter()
        .map(|(k, fe)| {
            let mut policy = Vec::new();
            for (flag, name) in [
                (FRONTEND_F_ETP_LOCAL, "eTP=Local"),
                (FRONTEND_F_ITP_LOCAL, "iTP=Local"),
                (FRONTEND_F_AFFINITY, "affinity"),
            ] {
                if fe.flags & flag != 0 {
                    policy.push(name);
                }
            }
            if fe.flags & FRONTEND_F_HAS_ENDPOINTS == 0 {
                policy.push("reject");
            }
            ServiceRow {
                id: fe.service_id,
                frontend: sock(k.addr, k.port),
                protocol: proto_name(k.proto),
                kind: describe_frontend(fe.flags),
                policy,
                backends: (0..u32::from(fe.backend_count)).filter_map(|i| backend(fe.service_id, i)).collect(),
                local_backends: (0..u32::from(fe.local_count))
                    .filter_map(|i| backend(fe.service_id, LOCAL_SLOT_BASE + i))
                    .collect(),
            }
        })
        .collect();
    rows.sort_by_key(|r| r.id);
    rows
}

#[derive(Serialize)]
pub struct BackendRow {
    pub id: u32,
    pub address: String,
    pub protocol: String,
    pub local: bool,
}

pub fn backends(maps: &DesiredMaps) -> Vec<BackendRow> {
    maps.backends
        .iter()
        .map(|(id, b)| BackendRow {
            id: *id,
            address: sock(b.addr, b.port),
            protocol: proto_name(b.proto),
            local: b.flags & BACKEND_F_LOCAL != 0,
        })
        .collect()
}

#[derive(Serialize)]
pub struct ConntrackRow {
    pub protocol: String,
    /// The client's address and port as it sent the first packet.
    pub client: String,
    /// The Service address and port it connected to.
    pub service: String,
    /// The backend the connection was translated to.
    pub backend: String,
    /// With SNAT: the source the backend sees (node address, or the client's with another port).
    pub snat: Option<String>,
    pub state: &'static str,
    /// An answer was seen / the connection is assured (never displaced when the table is full).
    pub replied: bool,
    pub assured: bool,
    pub service_id: u32,
    pub backend_id: u32,
    pub idle_s: u64,
    pub expires_in_s: u64,
}

/// Connections still alive at `now_ns` (CLOCK_MONOTONIC), oldest activity first.
pub fn conntrack(entries: &[(CtKey, CtEntry)], now_ns: u64) -> Vec<ConntrackRow> {
    let mut rows: Vec<(u64, ConntrackRow)> = entries
        .iter()
        .filter(|(k, e)| ct_alive(e, k.proto, now_ns))
        .map(|(k, e)| {
            let idle = now_ns.saturating_sub(e.last_seen_ns);
            let row = ConntrackRow {
                protocol: proto_name(k.proto),
                client: sock(k.saddr, k.sport),
                service: sock(k.daddr, k.dport),
                backend: sock(e.nat_addr, e.nat_port),
                snat: (e.flags & CT_F_SNAT != 0).then(|| sock(e.snat_addr, e.snat_port)),
                state: ct_state_name(e.state),
                replied: e.flags & CT_F_SEEN_REPLY != 0,
                assured: e.flags & CT_F_ASSURED != 0,
                service_id: e.service_id,
                backend_id: e.backend_id,
                idle_s: idle / 1_000_000_000,
                expires_in_s: ct_remaining_ns(e, k.proto, now_ns) / 1_000_000_000,
            };
            (idle, row)
        })
        .collect();
    rows.sort_by_key(|(idle, _)| std::cmp::Reverse(*idle));
    rows.into_iter().map(|(_, r)| r).collect()
}

/// Prints rows as aligned columns.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        padded.join("  ").trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out += &line(r.iter().map(String::as_str).collect());
    }
    out
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid pointer to a timespec. bpf_ktime_get_ns() is CLOCK_MONOTONIC.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn print<T: Serialize>(
    args: &InspectArgs,
    rows: &[T],
    header: &[&str],
    cells: impl Fn(&T) -> Vec<String>,
) -> Result<()> {
    if args.json {
        println!("{}", serde_json::to_string(rows)?);
    } else {
        print!("{}", table(header, &rows.iter().map(cells).collect::<Vec<_>>()));
    }
    Ok(())
}

pub fn run_services(args: &InspectArgs) -> Result<()> {
    let maps = pinned_tables(&args.bpffs)?.dump()?;
    print(args, &services(&maps), &["ID", "FRONTEND", "PROTO", "TYPE", "POLICY", "BACKENDS", "LOCAL BACKENDS"], |r| {
        vec![
            r.id.to_string(),
            r.frontend.clone(),
            r.protocol.clone(),
            r.kind.to_owned(),
            r.policy.join(","),
            r.backends.join(", "),
            r.local_backends.join(", "),
        ]
    })
}

pub fn run_backends(args: &InspectArgs) -> Result<()> {
    let maps = pinned_tables(&args.bpffs)?.dump()?;
    print(args, &backends(&maps), &["ID", "ADDRESS", "PROTO", "LOCAL"], |r| {
        vec![r.id.to_string(), r.address.clone(), r.protocol.clone(), r.local.to_string()]
    })
}

pub fn run_conntrack(args: &InspectArgs) -> Result<()> {
    let (map, _) = open_pinned_hash::<CtKey, CtEntry>(&args.bpffs, "CONNTRACK")?;
    // Entries come and go while we read: one that vanished between key and value is skipped.
    let entries: Vec<(CtKey, CtEntry)> = map.iter().filter_map(Result::ok).collect();
    let header =
        ["PROTO", "CLIENT", "SERVICE", "BACKEND", "SNAT", "STATE", "ASSURED", "SVC", "BACKEND ID", "IDLE", "EXPIRES"];
    print(args, &conntrack(&entries, monotonic_ns()), &header, |r| {
        vec![
            r.protocol.clone(),
            r.client.clone(),
            r.service.clone(),
            r.backend.clone(),
            r.snat.clone().unwrap_or_else(|| "-".into()),
            r.state.to_owned(),
            r.assured.to_string(),
            r.service_id.to_string(),
            r.backend_id.to_string(),
            format!("{}s", r.idle_s),
            format!("{}s", r.expires_in_s),
        ]
    })
}
