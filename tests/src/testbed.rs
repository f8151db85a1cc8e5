//! A Kubernetes node built from network namespaces, for the live tests and the demo.
//!
//! Safety (the testbed rules in README.md): everything lives in namespaces this code creates; nothing is
//! added to the root network namespace; socket programs attach to a cgroup created here; every
//! namespace, cgroup, pin and process is removed on drop, also when a test panics.
//!
//! ```text
//!   [node ns]  10.244.<k+1>.1 on every pod-facing veth (the pods' gateway), ip_forward=1, ebpf-proxy runs here
//!     |  pv<id>0   |  pv<id>1   ...   host-side veths: the proxy's --pod-interface-name-prefix
//!   [pod 0]      [pod 1]            eth0 10.244.<k+1>.<2+i>/32, default route via 10.244.1.1
//! ```

use std::{
    fs,
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

const BPFFS_ROOT: &str = "/sys/fs/bpf";
/// Where the tests mount a cgroup v2 hierarchy of their own on a host that has none mounted.
const PRIVATE_CGROUP2: &str = "/run/ebpf-proxy-tests/cgroup2";

/// The cgroup v2 hierarchy the per-test cgroups go under (never into its root cgroup itself): the
/// host's, wherever it is mounted (/sys/fs/cgroup on a systemd-unified host, /sys/fs/cgroup/unified
/// on a hybrid one), or one the tests mount when there is none.
pub fn cgroup2_root() -> Result<PathBuf> {
    static ROOT: std::sync::OnceLock<std::result::Result<PathBuf, String>> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        ebpf_proxy::cgroup::host_cgroup2().or_else(|_| {
            fs::create_dir_all(PRIVATE_CGROUP2).map_err(|e| format!("creating {PRIVATE_CGROUP2}: {e}"))?;
            run(Command::new("mount").args(["-t", "cgroup2", "none", PRIVATE_CGROUP2]))
                .map_err(|e| format!("no cgroup v2 hierarchy mounted, and mounting one failed: {e:#}"))?;
            Ok(PathBuf::from(PRIVATE_CGROUP2))
        })
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// The cluster's pod network (`--cluster-cidr`); node k's pods are in 10.244.<k+1>.0/24.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
pub const NODE_NAME: &str = "node-a";
/// The node's own address (on its loopback: this single-node bed has no external network).
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);

/// Runs a command, failing with its output if it does not succeed.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

/// Fails with a clear message unless the live tests can run here (root, tools installed).
pub fn require_privileges() -> Result<()> {
    ensure!(
        nix::unistd::Uid::effective().is_root(),
        "live tests need root (they create network namespaces and load BPF programs)"
    );
    for tool in ["ip", "nsenter", "nginx", "curl"] {
        ensure!(which(tool), "{tool} is not installed: run scripts/setup.sh");
    }
    let cgroup2 = cgroup2_root()?;
    ensure!(cgroup2.join("cgroup.procs").exists(), "no cgroup v2 hierarchy at {}", cgroup2.display());
    ensure!(
        run(Command::new("mountpoint").args(["-q", BPFFS_ROOT])).is_ok(),
        "bpffs is not mounted at {BPFFS_ROOT}: run scripts/setup.sh"
    );
    Ok(())
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        || Path::new("/usr/sbin").join(tool).is_file()
}

/// A short name unique to this process and call, so parallel tests and a crashed earlier run never
/// collide (interface names are limited to 15 characters).
pub fn unique_id() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{:x}{n:x}", std::process::id() & 0xffff)
}

/// A network namespace, deleted (with every process in it) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Result<Self> {
        ip(&["netns", "add", &name])?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// A command run inside the namespace. `nsenter --net` keeps the mount namespace, so bpffs and
    /// the cgroup hierarchy stay visible (unlike `ip netns exec`, which remounts /sys).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.name)).arg("--").arg(program);
        c
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        run(self.command("sysctl").args(["-qw", &format!("{key}={value}")]))?;
        Ok(())
    }

    fn kill_all(&self) {
        if let Ok(pids) = ip(&["netns", "pids", &self.name]) {
            for pid in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.kill_all();
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// A child process, killed on drop.
pub struct Proc {
    pub child: Child,
    pub what: String,
}

impl Proc {
    pub fn spawn(mut cmd: Command, what: impl Into<String>) -> Result<Self> {
        let what = what.into();
        let child = cmd.spawn().with_context(|| format!("starting {what}"))?;
        Ok(Self { child, what })
    }

    /// Sends SIGTERM and waits up to `timeout` for a clean exit.
    pub fn terminate(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {timeout:?} of SIGTERM", self.what);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A cgroup v2 directory for the processes subject to socket-level load balancing; removed on drop.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new(id: &str) -> Result<Self> {
        let path = cgroup2_root()?.join(format!("ebpf-proxy-test-{id}"));
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Processes still inside keep it busy: they belong to the test and are killed with it.
        for _ in 0..50 {
            if fs::remove_dir(&self.path).is_ok() {
                return;
            }
            if let Ok(procs) = fs::read_to_string(self.path.join("cgroup.procs")) {
                for pid in procs.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A pinning directory on bpffs for one proxy; removed (with anything left in it) on drop.
pub struct BpffsDir {
    pub path: PathBuf,
}

impl Drop for BpffsDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A pod: its own namespace, a veth to the node, optionally an nginx.
pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    pub host_if: String,
    pub ns: Netns,
    nginx: Option<Proc>,
    dir: PathBuf,
}

impl Pod {
    /// Starts nginx answering every request with `pod=<name> server=<pod IP> client=<addr>:<port>`.
    pub fn start_nginx(&mut self) -> Result<()> {
        self.nginx = Some(start_nginx(&self.ns, &self.dir, &self.name, SocketAddrV4::new(self.ip, 80))?);
        Ok(())
    }
}

/// Starts nginx in `ns` on `listen`, its files in `dir`, answering every request with
/// `pod=<name> server=<address> client=<addr>:<port>` (and `/bulk` with the file `dir/bulk`); returns
/// once it answers.
pub fn start_nginx(ns: &Netns, dir: &Path, name: &str, listen: SocketAddrV4) -> Result<Proc> {
    fs::create_dir_all(dir.join("logs"))?;
    let conf = format!(
        "worker_processes 1;\npid {dir}/nginx.pid;\nerror_log {dir}/logs/error.log;\ndaemon off;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n  \
         fastcgi_temp_path {dir}/fastcgi;\n  uwsgi_temp_path {dir}/uwsgi;\n  scgi_temp_path {dir}/scgi;\n  \
         keepalive_timeout 300s;\n  keepalive_requests 100000;\n  \
         server {{\n    listen {port};\n    location / {{ default_type text/plain; return 200 \"pod={name} server=$server_addr client=$remote_addr:$remote_port\\n\"; }}\n    \
         location = /bulk {{ default_type application/octet-stream; alias {dir}/bulk; }}\n  }}\n}}\n",
        dir = dir.display(),
        port = listen.port(),
    );
    let conf_path = dir.join("nginx.conf");
    fs::write(&conf_path, conf)?;
    let mut cmd = ns.command("nginx");
    cmd.arg("-c").arg(&conf_path).arg("-p").arg(dir).stdout(Stdio::null()).stderr(Stdio::piped());
    let nginx = Proc::spawn(cmd, format!("nginx in {name}"))?;
    wait_for(Duration::from_secs(10), || {
        run(ns.command("curl").args(["-sf", "-m", "1", &format!("http://{listen}/")])).is_ok()
    })
    .with_context(|| format!("nginx in {name} did not come up"))?;
    Ok(nginx)
}

impl Pod {
    /// Makes nginx serve `bytes` bytes at `/bulk` (bulk transfers).
    pub fn serve_bulk(&self, bytes: usize) -> Result<()> {
        fs::write(self.dir.join("bulk"), vec![0x5a; bytes])?;
        Ok(())
    }

    /// Stops the pod's nginx (a deleted pod's server going away).
    pub fn stop_nginx(&mut self) {
        self.nginx.take();
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.nginx.take();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("timed out after {timeout:?}")
}

/// How the proxy runs on the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LbMode {
    /// Socket-level LB on (clients in the node's cgroup) plus the tc path.
    Socket,
    /// `--socket-lb=false`: the tc programs alone.
    TcOnly,
}

/// One node with its pods, a cgroup and a bpffs directory. Field order is drop order: the proxy
/// first, then pods, then the node namespace and the kernel objects.
pub struct Node {
    proxy: Option<Proc>,
    pub pods: Vec<Pod>,
    pub id: String,
    /// The node's name (EndpointSlices' `nodeName`), its index (pods get 10.244.<index+1>.0/24) and
    /// its primary address.
    pub name: String,
    pub index: u8,
    pub node_ip: Ipv4Addr,
    pub ns: Netns,
    pub cgroup: Cgroup,
    pub bpffs: BpffsDir,
    pub objects_dir: PathBuf,
    pub proxy_log: PathBuf,
    /// Extra arguments for `ebpf-proxy run`.
    pub proxy_args: Vec<String>,
    /// The node has an uplink the proxy must attach `from_netdev` to before it counts as started.
    pub uplink: bool,
    /// How long `start_proxy` waits for the proxy to be ready.
    pub ready_timeout: Duration,
    /// Objects and the proxy's log; removed last.
    pub work: WorkDir,
}

/// A test's scratch directory, removed on drop. When the test is failing, the proxy log in it is
/// printed first so the failure can be understood.
pub struct WorkDir(pub PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Ok(log) = fs::read_to_string(self.0.join("proxy.log"))
        {
            eprintln!("--- ebpf-proxy log ({}) ---\n{log}", self.0.display());
        }
        let _ = fs::remove_dir_all(&self.0);
    }
}

impl Node {
    /// A single node with `pods` pods named `pod-0`, `pod-1`, … at 10.244.1.2, .3, … and its address
    /// on its loopback (no external network).
    pub fn new(pods: usize) -> Result<Self> {
        let node = Self::bare(NODE_NAME, 0, NODE_IP)?;
        node.ns.ip(&["addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"])?;
        node.with_pods(pods)
    }

    /// Adds `pods` pods named `pod-0`, `pod-1`, …
    pub fn with_pods(mut self, pods: usize) -> Result<Self> {
        for i in 0..pods {
            self.add_pod(&format!("pod-{i}"))?;
        }
        Ok(self)
    }

    /// A node namespace without pods or addresses yet (see [`crate::cluster`] for nodes on a network).
    pub fn bare(name: &str, index: u8, node_ip: Ipv4Addr) -> Result<Self> {
        require_privileges()?;
        let id = unique_id();
        let ns = Netns::new(format!("epx-{id}-n{index}"))?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        // A router, as a node is: no reverse-path filter or redirects getting in the way of Service
        // traffic (set before any interface exists, so every one inherits it).
        for key in ["all", "default"] {
            ns.sysctl(&format!("net.ipv4.conf.{key}.rp_filter"), "0")?;
            ns.sysctl(&format!("net.ipv4.conf.{key}.send_redirects"), "0")?;
        }
        let cgroup = Cgroup::new(&id)?;
        let bpffs = BpffsDir { path: Path::new(BPFFS_ROOT).join(format!("epx-test-{id}")) };
        let work = std::env::temp_dir().join(format!("epx-{id}"));
        fs::create_dir_all(work.join("objects"))?;
        Ok(Self {
            proxy: None,
            pods: Vec::new(),
            name: name.into(),
            index,
            node_ip,
            objects_dir: work.join("objects"),
            proxy_log: work.join("proxy.log"),
            proxy_args: Vec::new(),
            uplink: false,
            ready_timeout: Duration::from_secs(20),
            id,
            ns,
            cgroup,
            bpffs,
            work: WorkDir(work),
        })
    }

    /// The pods' gateway on this node (on every pod-facing veth).
    pub fn pod_gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.index + 1, 1)
    }

    /// This node's pod CIDR.
    pub fn pod_cidr(&self) -> String {
        format!("10.244.{}.0/24", self.index + 1)
    }

    /// The prefix of this node's pod-facing interface names.
    pub fn pod_if_prefix(&self) -> String {
        format!("pv{}", self.id)
    }

    /// Adds a pod (works while the proxy runs: it must attach to the new interface).
    pub fn add_pod(&mut self, name: &str) -> Result<&mut Pod> {
        let i = self.pods.len();
        let ip = Ipv4Addr::new(10, 244, self.index + 1, 2 + i as u8);
        let gw = self.pod_gateway().to_string();
        let host_if = format!("{}{i}", self.pod_if_prefix());
        let ns = Netns::new(format!("epx-{}-p{i}", self.id))?;
        // Created inside the node namespace with the peer straight in the pod's: no end ever
        // exists in the root namespace.
        self.ns.ip(&["link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns.name])?;
        self.ns.ip(&["addr", "add", &format!("{gw}/32"), "dev", &host_if])?;
        self.ns.ip(&["link", "set", &host_if, "up"])?;
        self.ns.ip(&["route", "add", &format!("{ip}/32"), "dev", &host_if])?;
        ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["route", "add", &gw, "dev", "eth0", "scope", "link"])?;
        ns.ip(&["route", "add", "default", "via", &gw, "dev", "eth0"])?;
        let dir = self.objects_dir.parent().expect("work dir").join(name);
        fs::create_dir_all(&dir)?;
        self.pods.push(Pod { name: name.into(), ip, host_if, ns, nginx: None, dir });
        Ok(self.pods.last_mut().expect("just pushed"))
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Writes (or replaces) one objects file the proxy watches.
    pub fn write_objects(&self, file: &str, yaml: &str) -> Result<()> {
        // Write-then-rename: the proxy never reads a half-written file.
        let tmp = self.objects_dir.parent().expect("work dir").join(format!(".{file}.tmp"));
        fs::write(&tmp, yaml)?;
        fs::rename(&tmp, self.objects_dir.join(file))?;
        Ok(())
    }

    /// Starts `ebpf-proxy run` in the node namespace and waits until it has programmed the maps.
    pub fn start_proxy(&mut self, binary: &Path, mode: LbMode) -> Result<()> {
        let args = self.proxy_command(mode);
        self.spawn_proxy(binary, &args, &[])
    }

    /// The command line [`Self::start_proxy`] runs the proxy with.
    pub fn proxy_command(&self, mode: LbMode) -> Vec<String> {
        let mut args: Vec<String> = vec!["run".into()];
        // Objects from the files, unless the test points the proxy at an API server.
        if !self.proxy_args.iter().any(|a| a == "--kubeconfig") {
            args.extend(["--objects".into(), self.objects_dir.display().to_string()]);
        }
        args.extend(["--bpffs".into(), self.bpffs.path.display().to_string()]);
        args.extend(["--cgroup".into(), self.cgroup.path.display().to_string()]);
        args.extend(["--socket-lb".into(), (mode == LbMode::Socket).to_string()]);
        args.extend(["--pod-interface-name-prefix".into(), self.pod_if_prefix()]);
        args.extend(["--cluster-cidr".into(), CLUSTER_CIDR.into(), "--node-name".into(), self.name.clone()]);
        args.extend(["--node-ip".into(), self.node_ip.to_string()]);
        args.extend(self.proxy_args.iter().cloned());
        args
    }

    /// Starts `binary` with exactly `args` and the environment `env` added (as a DaemonSet would
    /// start it), and waits until it is ready with every pod interface attached.
    pub fn spawn_proxy(&mut self, binary: &Path, args: &[String], env: &[(&str, &str)]) -> Result<()> {
        self.spawn_proxy_unready(binary, args, env)?;
        let want = self.pods.len();
        let uplink = self.uplink || args.iter().any(|a| a == "--interfaces");
        let log_path = self.proxy_log.clone();
        wait_for(self.ready_timeout, || {
            let text = fs::read_to_string(&log_path).unwrap_or_default();
            text.contains("ready")
                && text.matches("attached from_pod").count() >= want
                && (!uplink || text.contains("attached from_netdev"))
        })
        .with_context(|| format!("ebpf-proxy did not become ready; log:\n{}", self.proxy_log_text()))
    }

    /// Waits up to `timeout` for the proxy to exit on its own; its exit status.
    pub fn wait_proxy_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let proxy = self.proxy.as_mut().context("no proxy started")?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = proxy.child.try_wait()? {
                return Ok(status);
            }
            ensure!(Instant::now() < deadline, "the proxy still runs after {timeout:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// [`Self::spawn_proxy`] without waiting (for a start that is expected to fail).
    pub fn spawn_proxy_unready(&mut self, binary: &Path, args: &[String], env: &[(&str, &str)]) -> Result<()> {
        let log = fs::File::create(&self.proxy_log)?;
        let mut cmd = self.ns.command(binary);
        cmd.args(args).env("RUST_LOG", "info").envs(env.iter().copied()).stdout(log.try_clone()?).stderr(log);
        self.proxy = Some(Proc::spawn(cmd, "ebpf-proxy")?);
        Ok(())
    }

    /// Kills the proxy with SIGKILL (no cleanup of any kind, as an OOM kill or a crash).
    pub fn kill_proxy(&mut self) -> Result<()> {
        if let Some(mut p) = self.proxy.take() {
            p.child.kill()?;
            p.child.wait()?;
        }
        Ok(())
    }

    /// The proxy's process ID, while it runs.
    pub fn proxy_pid(&self) -> Option<u32> {
        self.proxy.as_ref().map(|p| p.child.id())
    }

    /// Stops the proxy with SIGTERM and checks it exited cleanly.
    pub fn stop_proxy(&mut self) -> Result<()> {
        if let Some(mut p) = self.proxy.take() {
            let status = p.terminate(Duration::from_secs(10))?;
            ensure!(status.success(), "ebpf-proxy exited with {status}; log:\n{}", self.proxy_log_text());
        }
        Ok(())
    }

    /// The datapath's per-reason counters (summed over CPUs), read from the pinned STATS map.
    pub fn stats(&self) -> Result<Vec<u64>> {
        let data = aya::maps::MapData::from_pin(self.bpffs.path.join("STATS"))?;
        let map = aya::maps::Map::PerCpuArray(data);
        let stats: aya::maps::PerCpuArray<_, u64> = aya::maps::PerCpuArray::try_from(&map)?;
        (0..proxy_common::STAT_MAX).map(|i| Ok(stats.get(&i, 0)?.iter().sum())).collect()
    }

    pub fn proxy_log_text(&self) -> String {
        fs::read_to_string(&self.proxy_log).unwrap_or_default()
    }

    /// Waits until the proxy has attached to `n` pod interfaces (counted from its log).
    pub fn wait_for_attached(&self, n: usize) -> Result<()> {
        wait_for(Duration::from_secs(10), || self.proxy_log_text().matches("attached from_pod").count() >= n)
            .with_context(|| format!("proxy did not attach to {n} pods; log:\n{}", self.proxy_log_text()))
    }

    /// Waits until the proxy has applied `n` syncs (counted from its log).
    pub fn wait_for_syncs(&self, n: usize) -> Result<()> {
        wait_for(Duration::from_secs(10), || self.proxy_log_text().matches("synced ").count() >= n)
            .with_context(|| format!("proxy did not sync {n} times; log:\n{}", self.proxy_log_text()))
    }

    /// A command run in pod `name`, inside the node's cgroup when `in_cgroup` (so socket-level load
    /// balancing applies to it, as it does to every pod on a real node).
    pub fn pod_command(&self, name: &str, in_cgroup: bool, program: &str, args: &[&str]) -> Command {
        self.command_in(&self.pod(name).ns, in_cgroup, program, args)
    }

    /// A command run in the node's own network namespace — a kubelet, a hostNetwork pod, a node
    /// agent — inside the node's cgroup when `in_cgroup` (the socket programs then see it).
    pub fn node_command(&self, in_cgroup: bool, program: &str, args: &[&str]) -> Command {
        self.command_in(&self.ns, in_cgroup, program, args)
    }

    fn command_in(&self, ns: &Netns, in_cgroup: bool, program: &str, args: &[&str]) -> Command {
        if in_cgroup {
            let mut c = ns.command("sh");
            let procs = self.cgroup.path.join("cgroup.procs");
            c.arg("-c").arg(format!("echo $$ > {} && exec \"$@\"", procs.display())).arg("sh").arg(program).args(args);
            c
        } else {
            let mut c = ns.command(program);
            c.args(args);
            c
        }
    }

    /// `curl` from pod `from` to `url`; returns the body.
    pub fn curl(&self, from: &str, in_cgroup: bool, url: &str) -> Result<String> {
        run(&mut self.pod_command(from, in_cgroup, "curl", &["-sS", "--fail", "-m", "3", url]))
    }
}

/// The pod name in an nginx answer (`pod=<name> server=<addr> client=<addr>:<port>`).
pub fn answered_by(body: &str) -> Option<&str> {
    body.split_whitespace().find_map(|w| w.strip_prefix("pod="))
}

/// The address the answering pod was reached on (its pod IP), from an nginx answer.
pub fn served_by(body: &str) -> Option<&str> {
    body.split_whitespace().find_map(|w| w.strip_prefix("server="))
}

/// The client address in an nginx answer.
pub fn client_seen(body: &str) -> Option<&str> {
    body.split_whitespace().find_map(|w| w.strip_prefix("client="))
}

/// Reads lines of a child's stdout as they come.
pub fn lines(child: &mut Child) -> impl Iterator<Item = String> + '_ {
    BufReader::new(child.stdout.as_mut().expect("stdout piped")).lines().map_while(Result::ok)
}

/// A ClusterIP Service with one port, in YAML.
pub fn service_yaml(name: &str, cluster_ip: Ipv4Addr, port: u16, protocol: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  type: ClusterIP\n  clusterIP: {cluster_ip}\n  ports:\n    - {{name: p, port: {port}, protocol: {protocol}}}\n"
    )
}

/// The EndpointSlice of a Service whose endpoints are the given pods (all ready, on this node).
pub fn slice_yaml(service: &str, port: u16, protocol: &str, endpoints: &[Ipv4Addr]) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {service}-1, namespace: default, labels: {{kubernetes.io/service-name: {service}}}}}\n\
         addressType: IPv4\nports:\n  - {{name: p, port: {port}, protocol: {protocol}}}\nendpoints:\n"
    );
    for ep in endpoints {
        s.push_str(&format!("  - addresses: [{ep}]\n    conditions: {{ready: true}}\n    nodeName: {NODE_NAME}\n"));
    }
    if endpoints.is_empty() {
        s.push_str("  []\n");
    }
    s
}
