//! `cargo xtask …`: the project's runner.
//!
//! * `cargo xtask diagnose CHECKPOINT.safetensors [--format table|csv|json] [--per-head]`
//! * `cargo xtask bench eigen|diagnose` — performance against a reference measured in the
//!   same invocation (numpy/LAPACK), one line per size.
//! * `cargo xtask bench train` — training throughput and loss curves against the PyTorch
//!   reference (`benches/reference/`), same weights, batches and invocation.

mod bench;
mod bench_probe;
mod bench_train;
mod diagnose;
mod gpu;
mod mla_spectra;
mod models;
mod npy;
mod rank_collapse;
mod reproduce;

use clap::{Parser, Subcommand};
use std::io::Write;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Attention-spectra project runner",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Marchenko–Pastur diagnostics of QKᵀ for every attention layer of a safetensors checkpoint.
    Diagnose(diagnose::Args),
    /// Benchmarks against a reference measured in the same run.
    #[command(subcommand)]
    Bench(bench::Bench),
    /// Parameter counts and KV-cache sizes of MHA, MLA-PreRoPE and MLA-Decoupled.
    Models(models::Args),
    /// Reproduce a paper end to end: `mla-spectra` (seed 000) or `rank-collapse` (seed 002).
    #[command(subcommand)]
    Reproduce(reproduce::Reproduce),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Diagnose(args) => diagnose::run(args),
        Command::Bench(b) => bench::run(b),
        Command::Models(args) => models::run(args),
        Command::Reproduce(r) => reproduce::run(r),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Not `eprintln!`: it panics when stderr is a closed pipe.
            let _ = writeln!(std::io::stderr(), "error: {e}");
            ExitCode::FAILURE
        }
    }
}
