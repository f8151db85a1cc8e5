//! `fuzz [--seed N] [--count N] [--check-every N] [--day-every N]`: the datapath fuzzer (tests/src/fuzz.rs) from the
//! command line, for runs longer than `cargo xtask test`'s. Needs root. Exits 1 on the first
//! violated invariant, naming the packet (the same seed and count replay it).

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: u64| -> u64 {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map_or(default, |v| v.parse().unwrap_or_else(|_| panic!("{name} takes a number, not {v}")))
    };
    let d = tests::fuzz::Options::default();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!(
            "usage: fuzz [--seed N (default {})] [--count N (default {})] [--check-every N (default {})] [--day-every N \
             (default {})]",
            d.seed, d.count, d.check_every, d.day_every
        );
        return;
    }
    let opts = tests::fuzz::Options {
        seed: arg("--seed", d.seed),
        count: arg("--count", d.count),
        check_every: arg("--check-every", d.check_every),
        day_every: arg("--day-every", d.day_every),
    };
    match tests::fuzz::run(&opts) {
        Ok(report) => println!("seed {}: every invariant held\n{report}", opts.seed),
        Err(violation) => {
            eprintln!("{violation}");
            std::process::exit(1);
        }
    }
}
