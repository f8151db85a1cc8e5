//! The `ebpf-proxy` command.

use anyhow::Result;
use clap::{Parser, Subcommand};
use ebpf_proxy::{run, trace};

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
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match Cli::parse().command {
        Command::Run(args) => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(run::run(*args))
        }
        Command::Trace(args) => trace::trace(&args),
    }
}
