//! A private datapath for BPF_PROG_TEST_RUN tests: the real programs, maps programmed from Kubernetes
//! YAML by the same translation and reconciler as `ebpf-proxy run`, run in a fresh network namespace
//! of the calling thread so FIB lookups answer the same on every machine.

use std::{fs, net::Ipv4Addr};

use aya::programs::{TestRun as _, TestRunOptions};
use ebpf_proxy::{config::NodeArgs, trace::TraceDatapath};

use crate::testbed::WorkDir;

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

/// The node the beds pretend to be.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);

pub struct ProgBed {
    pub tdp: TraceDatapath,
    _dir: WorkDir,
}

impl ProgBed {
    /// `objects`: Kubernetes YAML; `snat_ports`: the SNAT range (small ones make exhaustion testable).
    pub fn new(objects: &str, snat_ports: (u16, u16)) -> Self {
        Self::with_conntrack_max(objects, snat_ports, ebpf_proxy::datapath::PRIVATE_CONNTRACK_MAX)
    }

    /// As [`Self::new`], with a connection table of `conntrack_max` connections.
    pub fn with_conntrack_max(objects: &str, snat_ports: (u16, u16), conntrack_max: u32) -> Self {
        assert!(nix::unistd::Uid::effective().is_root(), "BPF_PROG_TEST_RUN tests need root");
        crate::isolate_thread_netns();
        let dir = std::env::temp_dir().join(format!("epx-prog-{}-{}", std::process::id(), crate::testbed::unique_id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("objects.yaml"), objects).unwrap();
        let node = NodeArgs {
            node_name: "node-a".into(),
            node_ips: vec![NODE_IP],
            cluster_cidr: Some("10.244.0.0/16".parse().unwrap()),
            service_cidr: Some("10.96.0.0/16".parse().unwrap()),
            ..Default::default()
        };
        let tdp =
            TraceDatapath::with_options(&dir.join("objects.yaml"), &node, snat_ports, conntrack_max).expect("datapath");
        Self { tdp, _dir: WorkDir(dir) }
    }

    /// Runs a frame through a program: (action, output frame).
    pub fn run(&self, prog: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        let prog = self.tdp.dp.classifier(prog).unwrap();
        let mut out = vec![0u8; frame.len() + 256];
        let mut attempt =
            || prog.test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..Default::default() });
        // Once in some ten million runs inside the full suite, the syscall itself failed on a frame
        // the program passes (not reproduced alone). Its allocations come before the program runs
        // (an error after it, ENOSPC, would repeat): one retry, said on stderr, then a failure.
        let r = attempt()
            .or_else(|e| {
                eprintln!("test_run of {} bytes failed ({e:?}); retrying once", frame.len());
                attempt()
            })
            .unwrap_or_else(|e| panic!("test_run of {} bytes {frame:02x?}: {e} ({e:?})", frame.len()));
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    /// As [`Self::run`], with the skb's context set from `skb` (arrival interface, GSO fields).
    pub fn run_with(&self, prog: &str, frame: &[u8], skb: &SkbContext) -> (u32, Vec<u8>) {
        let prog = self.tdp.dp.classifier(prog).unwrap();
        let mut out = vec![0u8; frame.len() + 256];
        let ctx = skb.bytes();
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..Default::default()
            })
            .expect("test_run");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    /// Programs the maps for other objects (as `run` does on a change: IDs kept).
    pub fn reprogram(&mut self, objects: &str) {
        fs::write(self._dir.0.join("objects.yaml"), objects).unwrap();
        self.tdp.reprogram(&self._dir.0.join("objects.yaml")).expect("reprogram");
    }

    pub fn stats(&self) -> Vec<u64> {
        self.tdp.dp.read_stats().unwrap()
    }

    /// Runs a frame; asserts the action and exactly which counters moved (with how much).
    pub fn expect(&self, prog: &str, frame: &[u8], action: u32, moved: &[(u32, u64)]) -> Vec<u8> {
        self.expect_run(|| self.run(prog, frame), action, moved)
    }

    /// As [`Self::expect`], for a frame arriving on interface `ifindex`.
    pub fn expect_on(&self, prog: &str, ifindex: u32, frame: &[u8], action: u32, moved: &[(u32, u64)]) -> Vec<u8> {
        self.expect_run(|| self.run_with(prog, frame, &SkbContext { ifindex, ..Default::default() }), action, moved)
    }

    fn expect_run(&self, run: impl FnOnce() -> (u32, Vec<u8>), action: u32, moved: &[(u32, u64)]) -> Vec<u8> {
        let before = self.stats();
        let (ret, out) = run();
        let after = self.stats();
        let changed: Vec<(u32, u64)> =
            (0..before.len()).filter(|&i| after[i] != before[i]).map(|i| (i as u32, after[i] - before[i])).collect();
        assert_eq!((ret, changed.as_slice()), (action, moved), "action and the counters that moved");
        out
    }

    /// Makes every tracked connection `secs` seconds older, as if that long had passed without a
    /// packet (the clock of the programs cannot be moved; the connections' timestamps can).
    pub fn age(&mut self, secs: u64) {
        let ct = &mut self.tdp.conntrack;
        for (orig, mut e) in ct.connections().unwrap() {
            e.last_seen_ns = e.last_seen_ns.saturating_sub(secs * 1_000_000_000);
            e.created_ns = e.created_ns.saturating_sub(secs * 1_000_000_000);
            ct.insert(&orig, &e).unwrap();
        }
    }
}

impl ProgBed {
    /// Creates a local pod's interface in the bed's namespace: a veth `name` (host side, up) with a
    /// route to `pod_route` through it — or, with `bridge`, enslaved to that bridge (created if
    /// missing), which then carries the route, as bridged CNIs do. Registers it as `run` does when it
    /// attaches `from_pod`, and returns its ifindex for [`SkbContext::ifindex`]. Forwarding is turned
    /// on ([`Self::enable_forwarding`]).
    pub fn add_pod_interface(&mut self, name: &str, pod_route: &str, bridge: Option<&str>) -> u32 {
        let ip = |args: &[&str]| self.ip(args);
        self.enable_forwarding();
        ip(&["link", "add", name, "type", "veth", "peer", "name", &format!("{name}-pod")]);
        ip(&["link", "set", name, "up"]);
        ip(&["link", "set", &format!("{name}-pod"), "up"]);
        let master = match bridge {
            Some(br) => {
                if nix::net::if_::if_nametoindex(br).is_err() {
                    ip(&["link", "add", br, "type", "bridge"]);
                    ip(&["link", "set", br, "up"]);
                    ip(&["route", "add", pod_route, "dev", br]);
                }
                ip(&["link", "set", name, "master", br]);
                nix::net::if_::if_nametoindex(br).expect("bridge ifindex")
            }
            None => {
                ip(&["route", "add", pod_route, "dev", name]);
                0
            }
        };
        let ifindex = nix::net::if_::if_nametoindex(name).expect("ifindex");
        self.tdp.dp.set_pod_interface(ifindex, master).expect("register the pod interface");
        ifindex
    }

    /// Runs `ip` in the bed's namespace (the calling thread's: a child process inherits it).
    pub fn ip(&self, args: &[&str]) {
        let out = std::process::Command::new("ip").args(args).output().expect("ip");
        assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Turns forwarding on in the bed's namespace, as on any node: the FIB answers for a router only.
    pub fn enable_forwarding(&self) {
        let out = std::process::Command::new("sysctl").args(["-qw", "net.ipv4.conf.all.forwarding=1"]).output();
        assert!(out.is_ok_and(|o| o.status.success()), "sysctl net.ipv4.conf.all.forwarding=1");
    }
}

/// CLOCK_MONOTONIC now, as bpf_ktime_get_ns() reads it.
pub fn now_ns() -> u64 {
    ebpf_proxy::conntrack::monotonic_ns()
}

/// A barrier for two threads that spin instead of sleeping, so both leave it within nanoseconds of
/// each other: what a race between two CPUs needs to be reproduced at all.
#[derive(Default)]
pub struct SpinBarrier {
    arrived: std::sync::atomic::AtomicU64,
}

impl SpinBarrier {
    /// Waits for the other thread's `round`-th arrival (rounds count from 0, the same on both).
    pub fn wait(&self, round: u64) {
        use std::sync::atomic::Ordering::SeqCst;
        self.arrived.fetch_add(1, SeqCst);
        let target = 2 * (round + 1);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.arrived.load(SeqCst) < target {
            assert!(std::time::Instant::now() < deadline, "the other thread never arrived");
            std::hint::spin_loop();
        }
    }
}

/// The fields of `struct __sk_buff` BPF_PROG_TEST_RUN lets a test set (every other must be zero).
#[derive(Clone, Copy, Debug, Default)]
pub struct SkbContext {
    /// The interface the packet arrives on (0: loopback).
    pub ifindex: u32,
    pub gso_segs: u32,
    pub gso_size: u32,
}

impl SkbContext {
    /// `struct __sk_buff` (192 bytes) with these fields at their offsets in the UAPI.
    fn bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; 192];
        b[40..44].copy_from_slice(&self.ifindex.to_ne_bytes());
        b[164..168].copy_from_slice(&self.gso_segs.to_ne_bytes());
        b[176..180].copy_from_slice(&self.gso_size.to_ne_bytes());
        b
    }
}
