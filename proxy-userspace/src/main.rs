//! The `ebpf-proxy` command.

use anyhow::Context as _;
use anyhow::Result;
use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand, parser::ValueSource};
use ebpf_proxy::{cleanup, inspect, kubeproxy_config, run, trace};

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
    /// Remove kube-proxy's iptables and nftables rules from this node (as `kube-proxy --cleanup`), or
    /// with --ebpf-proxy ebpf-proxy's own datapath (rolling back).
    Cleanup(cleanup::CleanupArgs),
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let matches = Cli::command().get_matches();
    match Cli::from_arg_matches(&matches)?.command {
        Command::Run(mut args) => {
            if let Some(path) = args.config.clone() {
                let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
                let (cfg, mut notes) =
                    kubeproxy_config::parse(&text).with_context(|| format!("--config {}", path.display()))?;
                let run_matches = matches.subcommand_matches("run").expect("run subcommand");
                let explicit = |id: &str| {
                    matches!(run_matches.value_source(id), Some(ValueSource::CommandLine | ValueSource::EnvVariable))
                };
                notes.extend(kubeproxy_config::apply(&cfg, &mut args, explicit));
                for n in notes {
                    log::warn!("--config {}: {n}", path.display());
                }
            }
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(run::run(*args))
        }
        Command::Trace(args) => trace::trace(&args),
        Command::Services(args) => inspect::run_services(&args),
        Command::Backends(args) => inspect::run_backends(&args),
        Command::Conntrack(args) => inspect::run_conntrack(&args),
        Command::Cleanup(args) => {
            for line in cleanup::run_cleanup(&args)? {
                println!("{line}");
            }
            Ok(())
        }
    }
}
