//! The datapath fuzzer's default run (tests/src/fuzz.rs): generated and mutated packets through both
//! tc programs, every invariant checked. Longer runs: `cargo xtask fuzz --seed N --count N`. Needs
//! root; fails (never skips) without.

#[test]
fn generated_and_mutated_packets_keep_every_datapath_invariant() {
    let count = std::env::var("EPX_FUZZ_COUNT").ok().and_then(|c| c.parse().ok()).unwrap_or(DEFAULT_COUNT);
    let opts = tests::fuzz::Options { count, ..Default::default() };
    match tests::fuzz::run(&opts) {
        Ok(report) => {
            eprintln!("{report}");
            assert_eq!(report.packets, count);
            // The run reached every kind of outcome (a generator that stopped hitting Services would
            // pass vacuously).
            assert!(report.changed > count / 10 && report.reversed > count / 20, "{report}");
            assert!(report.dropped > 0 && report.redirected > 0 && report.foreign > count / 20, "{report}");
        }
        Err(violation) => panic!("{violation}"),
    }
}

/// Packets in `cargo xtask test`'s run (about 20 s here).
const DEFAULT_COUNT: u64 = 1_000_000;
