//! The `ebpf-proxy` command.

use anyhow::Result;
use clap::{Parser, Subcommand};
use ebpf_proxy::{inspect, run, trace};

#[derive(Parser)]
#[command(name = "ebpf-proxy", version, about = "Kubernetes Service proxy with an eBPF datapath")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the datapath in this network namespace and keep it in sync with the Kubernetes objects.
    Run(Box<run::RunArgs>),
    /// Run a synthetic packet through the real programs (BPF_PROG_TEST_RUN) and report the verdict.
    Trace(trace::TraceArgs),
    /// List the frontends of a running instance with their backends (from its pinned maps).
    Services(inspect::InspectArgs),
    /// List the backends of a running instance.
    Backends(inspect::InspectArgs),
    /// List the live connection-tracking entries of a running instance.
    Conntrack(inspect::InspectArgs),
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match Cli::parse().command {
        Command::Run(args) => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(run::run(*args))
        }
        Command::Trace(args) => trace::trace(&args),
        Command::Services(args) => inspect::run_services(&args),
        Command::Backends(args) => inspect::run_backends(&args),
        Command::Conntrack(args) => inspect::run_conntrack(&args),
    }
}
