//! `cargo xtask reproduce rank-collapse [--quick] [--out DIR]`: seed 002 end to end (spectral
//! gap, rank collapse in width and depth, gradients, free-probability bulks, Heaviside
//! training), CSVs, SVG/PNG figures and `report.md` / `report.html` in `DIR`.

use experiments::rank_collapse::{RankCollapseConfig, run as reproduce};
use std::path::PathBuf;

/// Arguments of `reproduce rank-collapse`.
#[derive(clap::Args)]
pub struct Args {
    /// Small sizes and few repetitions (for tests; under two minutes).
    #[arg(long)]
    quick: bool,
    /// Output directory.
    #[arg(long, default_value = "runs/rank-collapse")]
    out: PathBuf,
}

pub fn run(args: Args) -> Result<(), String> {
    let config = if args.quick {
        RankCollapseConfig::quick()
    } else {
        RankCollapseConfig::full()
    };
    let summary = reproduce(&config, &args.out).map_err(|e| e.to_string())?;
    let (ok, bad, na) = summary.counts();
    let total = summary.timings.last().map_or(0.0, |t| t.1);
    println!(
        "rank-collapse ({}): {ok} claims agree, {bad} do not, {na} n/a; {total:.1} s; report in {}",
        config.mode,
        args.out.join("report.md").display()
    );
    for c in summary
        .claims
        .iter()
        .filter(|c| c.verdict == experiments::report::Verdict::DoesNotAgree)
    {
        println!(
            "  does not agree: {} (predicted {}, measured {}, tolerance {})",
            c.claim, c.predicted, c.measured, c.tolerance
        );
    }
    Ok(())
}
