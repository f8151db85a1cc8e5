//! `ebpf-proxy cleanup`: removes what kube-proxy left on a node, as `kube-proxy --cleanup` does, so
//! ebpf-proxy can replace it: the iptables chains kube-proxy owns (in nat, filter and mangle) and the
//! rules in built-in chains that jump to them, in both iptables backends (legacy and nft: kube-proxy's
//! image picks one per node, and a node may hold rules of either); the nftables `kube-proxy` tables;
//! and what IPVS mode leaves (the virtual servers and the kube-ipvs0 device holding their addresses,
//! and the KUBE-* ipsets its rules match). Chains kube-proxy shares with the kubelet (KUBE-MARK-MASQ,
//! KUBE-MARK-DROP, KUBE-FIREWALL, KUBE-KUBELET-CANARY) and every rule that is not kube-proxy's stay.
//! Every step runs even when an earlier one failed; then the command fails naming what failed, so an
//! init container never lets ebpf-proxy start over rules it could not remove. A tool that is not
//! installed is skipped (nothing made with it can be there). Run it in the node's network
//! namespace, as root.
//!
//! `ebpf-proxy cleanup --ebpf-proxy` is the other way round, for rolling back: it removes
//! ebpf-proxy's own datapath — its pinned programs (detaching them), its pinned maps, and the SNAT
//! ports it reserved — and leaves kube-proxy's rules alone (kube-proxy may be rebuilding them).
//! `--dry-run` lists what either would remove and changes nothing.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::{datapath::PinnedState, run};

#[derive(Args, Clone, Debug)]
pub struct CleanupArgs {
    /// Remove ebpf-proxy's own datapath instead of kube-proxy's rules (rolling back to kube-proxy):
    /// its programs, maps and reserved SNAT ports. Run it once ebpf-proxy no longer runs on the node.
    #[arg(long)]
    pub ebpf_proxy: bool,
    /// List what would be removed; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// With --ebpf-proxy: where its maps and links are pinned (`run --bpffs`).
    #[arg(long, default_value = "/sys/fs/bpf/ebpf-proxy")]
    pub bpffs: PathBuf,
    /// With --ebpf-proxy: the SNAT port range `run` reserved (`run --snat-port-range`).
    #[arg(long, default_value = "61000-65535", value_parser = run::parse_port_range)]
    pub snat_port_range: (u16, u16),
}

/// `ebpf-proxy cleanup`: what was (or, with --dry-run, would be) done, a line each.
pub fn run_cleanup(args: &CleanupArgs) -> Result<Vec<String>> {
    if args.ebpf_proxy { ebpf_proxy_state(args) } else { cleanup(args.dry_run) }
}

/// Removes ebpf-proxy's own datapath from this node.
fn ebpf_proxy_state(args: &CleanupArgs) -> Result<Vec<String>> {
    let verb = |done: &str, would: &str| if args.dry_run { would.to_owned() } else { done.to_owned() };
    let mut lines = Vec::new();
    let state = PinnedState::read(&args.bpffs)?;
    for link in &state.links {
        lines.push(format!("{} {}", verb("detached", "would detach"), link.display()));
    }
    for map in &state.maps {
        lines.push(format!("{} {}", verb("removed", "would remove"), map.display()));
    }
    if state == PinnedState::default() {
        lines.push(format!("nothing pinned under {}", args.bpffs.display()));
    } else if !args.dry_run {
        state.remove(&args.bpffs)?;
    }
    let (min, max) = args.snat_port_range;
    if run::release_snat_ports(args.snat_port_range, args.dry_run)? {
        lines.push(format!("{} the reserved ports {min}-{max}", verb("released", "would release")));
    }
    Ok(lines)
}

/// Chains kube-proxy creates under a fixed name.
const OWNED_CHAINS: &[&str] = &[
    "KUBE-SERVICES",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-NODEPORTS",
    "KUBE-POSTROUTING",
    "KUBE-FORWARD",
    "KUBE-PROXY-FIREWALL",
    "KUBE-PROXY-CANARY",
    // IPVS mode's.
    "KUBE-NODE-PORT",
    "KUBE-LOAD-BALANCER",
    "KUBE-SOURCE-RANGES-FIREWALL",
    "KUBE-IPVS-FILTER",
    "KUBE-IPVS-OUT-FILTER",
];
/// Prefixes of the per-Service and per-endpoint chains.
const OWNED_PREFIXES: &[&str] = &["KUBE-SVC-", "KUBE-SVL-", "KUBE-SEP-", "KUBE-FW-", "KUBE-XLB-", "KUBE-EXT-"];

pub fn is_owned(chain: &str) -> bool {
    OWNED_CHAINS.contains(&chain) || OWNED_PREFIXES.iter().any(|p| chain.starts_with(p))
}

/// The target of a rule (`-j X` or `-g X`).
fn target(rule: &str) -> Option<&str> {
    let mut words = rule.split_whitespace();
    while let Some(w) = words.next() {
        if w == "-j" || w == "-g" {
            return words.next();
        }
    }
    None
}

/// From `iptables-save` output, the `iptables-restore --noflush` input that removes kube-proxy's
/// chains and the jumps to them. Empty when there is nothing to remove.
pub fn iptables_cleanup(save: &str) -> String {
    let mut out = String::new();
    let mut table: Option<&str> = None;
    let (mut flush, mut unlink, mut delete) = (Vec::new(), Vec::new(), Vec::new());
    for line in save.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = Some(t);
            (flush, unlink, delete) = (Vec::new(), Vec::new(), Vec::new());
        } else if let Some(decl) = line.strip_prefix(':') {
            let chain = decl.split_whitespace().next().unwrap_or_default();
            if is_owned(chain) {
                flush.push(format!(":{chain} - [0:0]"));
                delete.push(format!("-X {chain}"));
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or_default();
            // Rules inside our chains go with them; jumps into them from elsewhere are deleted.
            if !is_owned(chain) && target(rule).is_some_and(is_owned) {
                unlink.push(format!("-D {rule}"));
            }
        } else if line == "COMMIT"
            && let Some(t) = table.take()
            && !(flush.is_empty() && unlink.is_empty())
        {
            // Declaring a chain in --noflush mode empties it; then nothing refers to it and it can go.
            out += &format!("*{t}\n");
            for l in unlink.iter().chain(&flush).chain(&delete) {
                out += l;
                out.push('\n');
            }
            out += "COMMIT\n";
        }
    }
    out
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether `tool` is on PATH: a backend without its tool has nothing of kube-proxy's to remove.
fn installed(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}

/// The iptables backends, each as (save, restore) for IPv4 and IPv6.
const IPTABLES: &[(&str, &str)] = &[
    ("iptables-legacy-save", "iptables-legacy-restore"),
    ("ip6tables-legacy-save", "ip6tables-legacy-restore"),
    ("iptables-nft-save", "iptables-nft-restore"),
    ("ip6tables-nft-save", "ip6tables-nft-restore"),
];

/// The dummy device IPVS mode binds Service addresses to.
const IPVS_DEVICE: &str = "kube-ipvs0";

/// What a cleanup did, and which of its steps failed.
#[derive(Default)]
struct Report {
    done: Vec<String>,
    failed: Vec<String>,
}

impl Report {
    fn step(&mut self, what: &str, result: Result<Option<String>>) {
        match result {
            Ok(Some(line)) => self.done.push(line),
            Ok(None) => {}
            Err(e) => self.failed.push(format!("{what}: {e:#}")),
        }
    }
}

/// Removes kube-proxy's chains from one iptables backend and family.
fn iptables_backend(save: &str, restore: &str, dry_run: bool) -> Result<Option<String>> {
    if !installed(save) {
        return Ok(Some(format!("{save}: not installed, skipped")));
    }
    let script = iptables_cleanup(&run(&mut Command::new(save))?);
    if script.is_empty() {
        return Ok(None);
    }
    let chains = script.lines().filter(|l| l.starts_with("-X ")).count();
    let rules = script.lines().filter(|l| l.starts_with("-D ")).count();
    if dry_run {
        return Ok(Some(format!("{restore}: would remove {chains} chains and {rules} jump rules")));
    }
    let mut child = Command::new(restore)
        .args(["--noflush"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {restore}"))?;
    child.stdin.take().expect("stdin piped").write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{restore} --noflush failed: {}\ninput:\n{script}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(Some(format!("{restore}: removed {chains} chains and {rules} jump rules")))
}

/// Deletes the nftables `kube-proxy` tables (nftables mode).
fn nftables(dry_run: bool) -> Result<Vec<String>> {
    if !installed("nft") {
        return Ok(vec!["nft: not installed, skipped".into()]);
    }
    let tables = run(Command::new("nft").args(["list", "tables"]))?;
    let mut done = Vec::new();
    for family in ["ip", "ip6"] {
        if tables.lines().any(|l| l.trim() == format!("table {family} kube-proxy")) {
            if dry_run {
                done.push(format!("nft: would delete table {family} kube-proxy"));
                continue;
            }
            run(Command::new("nft").args(["delete", "table", family, "kube-proxy"]))?;
            done.push(format!("nft: deleted table {family} kube-proxy"));
        }
    }
    Ok(done)
}

/// IPVS mode's virtual servers and device. kube-proxy flushes every virtual server; here that is done
/// only where its device shows IPVS mode ran, so a node's own IPVS (keepalived) without it is left.
fn ipvs(dry_run: bool) -> Result<Option<String>> {
    if !Path::new("/sys/class/net").join(IPVS_DEVICE).exists() {
        return Ok(None);
    }
    let verb = if dry_run { "would remove" } else { "removed" };
    let mut servers = String::new();
    if installed("ipvsadm") && Path::new("/proc/net/ip_vs").exists() {
        let count =
            run(Command::new("ipvsadm").args(["--save", "-n"]))?.lines().filter(|l| l.starts_with("-A ")).count();
        if !dry_run {
            run(Command::new("ipvsadm").arg("--clear"))?;
        }
        servers = format!("{count} virtual servers and ");
    }
    if !dry_run {
        run(Command::new("ip").args(["link", "delete", IPVS_DEVICE]))?;
    }
    Ok(Some(format!("ipvs: {verb} {servers}{IPVS_DEVICE}")))
}

/// The names of kube-proxy's ipsets (IPVS mode names every one KUBE-…) in `ipset list -n` output.
pub fn kube_proxy_ipsets(list: &str) -> Vec<&str> {
    list.lines().map(str::trim).filter(|n| n.starts_with("KUBE-")).collect()
}

/// Destroys kube-proxy's ipsets; after the iptables cleanup, which removes the rules matching them
/// (a set still referenced cannot be destroyed).
fn ipsets(dry_run: bool) -> Result<Option<String>> {
    if !installed("ipset") {
        return Ok(None);
    }
    let list = run(Command::new("ipset").args(["list", "-n"]))?;
    let sets = kube_proxy_ipsets(&list);
    if sets.is_empty() {
        return Ok(None);
    }
    if !dry_run {
        for set in &sets {
            run(Command::new("ipset").args(["destroy", set]))?;
        }
    }
    let verb = if dry_run { "would destroy" } else { "destroyed" };
    Ok(Some(format!("ipset: {verb} {}", sets.join(" "))))
}

/// Removes kube-proxy's iptables rules (both backends, IPv4 and IPv6), nftables tables and IPVS
/// leftovers. Returns what was done; fails, after trying every step, if any step failed.
pub fn cleanup(dry_run: bool) -> Result<Vec<String>> {
    let mut report = Report::default();
    for (save, restore) in IPTABLES {
        report.step(save, iptables_backend(save, restore, dry_run));
    }
    match nftables(dry_run) {
        Ok(lines) => report.done.extend(lines),
        Err(e) => report.failed.push(format!("nft: {e:#}")),
    }
    report.step("ipvs", ipvs(dry_run));
    report.step("ipset", ipsets(dry_run));
    if !report.failed.is_empty() {
        bail!("cleanup failed: {}\n(done: {})", report.failed.join("\n"), report.done.join("; "));
    }
    Ok(report.done)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVE: &str = "\
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-NPX46M4PTMTKRN6Y - [0:0]
:KUBE-SEP-AAAAAAAAAAAAAAAA - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A PREROUTING -p tcp -m tcp --dport 2222 -j DNAT --to-destination 10.0.0.9:22
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -j KUBE-SVC-NPX46M4PTMTKRN6Y
-A KUBE-SVC-NPX46M4PTMTKRN6Y -j KUBE-SEP-AAAAAAAAAAAAAAAA
-A KUBE-SEP-AAAAAAAAAAAAAAAA -s 192.168.0.2/32 -j KUBE-MARK-MASQ
COMMIT
*filter
:INPUT ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
-A INPUT -j KUBE-FIREWALL
-A INPUT -p tcp --dport 22 -j ACCEPT
COMMIT
";

    #[test]
    fn only_kube_proxys_chains_and_the_jumps_to_them_are_removed() {
        let script = iptables_cleanup(SAVE);
        let lines: Vec<&str> = script.lines().collect();
        for want in [
            "-D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
            "-D OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
            "-D POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
            "-X KUBE-SERVICES",
            "-X KUBE-SVC-NPX46M4PTMTKRN6Y",
            "-X KUBE-SEP-AAAAAAAAAAAAAAAA",
            "-X KUBE-POSTROUTING",
        ] {
            assert!(lines.contains(&want), "{want} missing from\n{script}");
        }
        // Shared chains, other rules and the filter table (nothing of kube-proxy's there) stay.
        assert!(
            !script.contains("KUBE-MARK-MASQ") && !script.contains("2222") && !script.contains("*filter"),
            "{script}"
        );
        // Jumps are deleted before the chains are emptied and removed.
        let pos = |l: &str| lines.iter().position(|x| x.starts_with(l)).unwrap();
        assert!(pos("-D ") < pos(":KUBE-") && pos(":KUBE-") < pos("-X "));
        assert_eq!(iptables_cleanup("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n"), "");
    }

    #[test]
    fn ipvs_modes_chains_and_sets_are_kube_proxys() {
        for chain in ["KUBE-NODE-PORT", "KUBE-LOAD-BALANCER", "KUBE-IPVS-FILTER", "KUBE-SOURCE-RANGES-FIREWALL"] {
            assert!(is_owned(chain), "{chain}");
        }
        assert!(!is_owned("KUBE-MARK-MASQ") && !is_owned("KUBE-FIREWALL"));
        let list = "KUBE-CLUSTER-IP\nKUBE-6-NODE-PORT-TCP\nmy-blocklist\nKUBE-LOOP-BACK\n";
        assert_eq!(kube_proxy_ipsets(list), ["KUBE-CLUSTER-IP", "KUBE-6-NODE-PORT-TCP", "KUBE-LOOP-BACK"]);
    }
}
