//! Developer tasks: `cargo xtask <build-ebpf|build|run|demo|test|fuzz|bench|image>`.

mod image;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the eBPF object alone (target/bpfel-unknown-none/release/proxy-ebpf, with BTF).
    BuildEbpf,
    /// Build everything (the eBPF object is built and embedded by proxy-userspace's build script).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build and run `ebpf-proxy` (through sudo when not root): `cargo xtask run -- run --objects …`.
    Run {
        #[arg(long)]
        release: bool,
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build a sandbox node in network namespaces and show the seed Service load-balanced by ebpf-proxy.
    Demo,
    /// Run every test: unit tests, BPF_PROG_TEST_RUN tests and the network-namespace end-to-end tests.
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the datapath fuzzer (tests/src/fuzz.rs) for as long as asked; `cargo xtask test` runs it
    /// with the defaults.
    Fuzz {
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 10_000_000)]
        count: u64,
    },
    /// Build the container image (localhost/ebpf-proxy:VERSION) with podman, from a Debian base made
    /// with mmdebstrap: deploy/Containerfile.
    Image,
    /// Run the benchmarks (release builds) and write BENCHMARKS.md.
    Bench {
        /// A short subset (smaller sizes, fewer samples).
        #[arg(long)]
        quick: bool,
        /// One part only: control-plane, packet-cost, contenders or masquerade (BENCHMARKS.md's other
        /// sections and the targets stay as they were).
        #[arg(long)]
        only: Option<String>,
    },
}

/// The packages `cargo xtask test` tests: the workspace but the eBPF crate (built for the BPF
/// target through proxy-userspace's build script).
const TEST_PACKAGES: [&str; 4] = ["proxy-common", "proxy-userspace", "xtask", "tests"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn status(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe extern "C" {
        fn geteuid() -> u32;
    }
    unsafe { geteuid() == 0 }
}

/// Runs a built binary as root (sudo -E when needed: it loads BPF programs and creates namespaces).
fn privileged(bin: &Path, args: &[String]) -> Result<()> {
    let mut cmd = if is_root() {
        Command::new(bin)
    } else {
        let mut c = Command::new("sudo");
        c.arg("-E").arg(bin);
        c
    };
    status(cmd.args(args).current_dir(root()))
}

fn target_dir(release: bool) -> PathBuf {
    root().join("target").join(if release { "release" } else { "debug" })
}

fn build(release: bool, packages: &[&str], bins: bool) -> Result<()> {
    let mut c = cargo();
    c.arg("build");
    for p in packages {
        c.args(["-p", p]);
    }
    if bins {
        c.arg("--bins");
    }
    if release {
        c.arg("--release");
    }
    status(&mut c)
}

/// Builds `ebpf-proxy` with proxy-common's test-only `layout-test` map layout and keeps it as
/// `target/debug/ebpf-proxy-layout-test`, for the test of an upgrade across a layout change. Cargo
/// keeps both builds' artifacts: switching between them after the first time only relinks.
fn build_layout_test() -> Result<()> {
    status(cargo().args(["build", "-p", "proxy-userspace", "--bins", "--features", "layout-test"]))?;
    let dir = target_dir(false);
    std::fs::copy(dir.join("ebpf-proxy"), dir.join("ebpf-proxy-layout-test"))
        .context("keeping the layout-test build")?;
    Ok(())
}

/// Runs `cargo test`, echoing its output, and closes with one line totalling every test binary's
/// result (the last `test result:` line cargo prints is the doc-tests', which says little).
fn run_tests(cmd: &mut Command) -> Result<()> {
    use std::io::{BufRead as _, BufReader};
    let mut child = cmd.stdout(std::process::Stdio::piped()).spawn().with_context(|| format!("running {cmd:?}"))?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(['.', ';']) {
                let mut words = part.split_whitespace();
                if let (Some(n), Some(what)) = (words.next(), words.next()) {
                    match (n.parse::<u64>(), what) {
                        (Ok(n), "passed") => passed += n,
                        (Ok(n), "failed") => failed += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let st = child.wait()?;
    println!("tests: {passed} passed, {failed} failed");
    if !st.success() {
        bail!("cargo test failed: {st}");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::BuildEbpf => {
            // The same flags aya-build uses: build-std for the BPF target (stable toolchain, hence
            // RUSTC_BOOTSTRAP) and BTF in the object.
            let mut c = cargo();
            c.args([
                "build",
                "-p",
                "proxy-ebpf",
                "--bins",
                "--release",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
            ])
            .env("RUSTC_BOOTSTRAP", "1")
            .env("CARGO_ENCODED_RUSTFLAGS", "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf");
            status(&mut c)?;
            println!("{}", root().join("target/bpfel-unknown-none/release/proxy-ebpf").display());
            Ok(())
        }
        Task::Build { release } => build(release, &[], false),
        Task::Run { release, args } => {
            build(release, &["proxy-userspace"], true)?;
            privileged(&target_dir(release).join("ebpf-proxy"), &args)
        }
        Task::Demo => {
            build(false, &["proxy-userspace", "tests"], true)?;
            privileged(&target_dir(false).join("demo"), &[])
        }
        Task::Test { args } => {
            // The upgrade test's other side, a build with another map layout; then the real one (the
            // end-to-end tests start the ebpf-proxy binary: build it first).
            build_layout_test()?;
            build(false, &["proxy-userspace", "tests"], true)?;
            // tests/tests/e2e_image.rs runs the image: build it (a cached rebuild after a change).
            image::build(&root(), &target_dir(false).join("image"))?;
            let mut c = cargo();
            // Every package with tests, the privileged `tests` too (it is not a default member). Live
            // tests build whole nodes in namespaces: one at a time keeps a 2-core machine steady.
            c.arg("test");
            for p in TEST_PACKAGES {
                c.args(["-p", p]);
            }
            c.args(["--", "--test-threads=1"]).args(&args);
            if !is_root() {
                bail!("the tests load BPF programs and create network namespaces: run `cargo xtask test` as root");
            }
            run_tests(&mut c)
        }
        Task::Image => {
            if !is_root() {
                bail!("podman builds and mmdebstrap run as root here: run `cargo xtask image` as root");
            }
            image::build(&root(), &target_dir(false).join("image"))
        }
        Task::Fuzz { seed, count } => {
            build(true, &["tests"], true)?;
            privileged(
                &target_dir(true).join("fuzz"),
                &["--seed".into(), seed.to_string(), "--count".into(), count.to_string()],
            )
        }
        Task::Bench { quick, only } => {
            build(true, &["proxy-userspace", "tests"], true)?;
            let proxy = target_dir(true).join("ebpf-proxy");
            let mut args = vec!["--proxy".to_owned(), proxy.display().to_string()];
            args.extend(["--out".to_owned(), root().join("BENCHMARKS.md").display().to_string()]);
            if quick {
                args.push("--quick".into());
            }
            if let Some(part) = only {
                args.extend(["--only".to_owned(), part]);
            }
            privileged(&target_dir(true).join("bench"), &args)
        }
    }
}
