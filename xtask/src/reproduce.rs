//! `cargo xtask reproduce mla-spectra|rank-collapse`: the two papers end to end.

use clap::Subcommand;

/// The reproductions.
#[derive(Subcommand)]
pub enum Reproduce {
    /// Seed 000: pre-train MHA, MLA-PreRoPE and MLA-Decoupled with the probe, figures, report.
    MlaSpectra(Box<crate::mla_spectra::Args>),
    /// Seed 002: spectral gap, rank collapse, exploding gradients; theory against measurement.
    RankCollapse(crate::rank_collapse::Args),
}

pub fn run(r: Reproduce) -> Result<(), String> {
    match r {
        Reproduce::MlaSpectra(a) => crate::mla_spectra::run(*a),
        Reproduce::RankCollapse(a) => crate::rank_collapse::run(a),
    }
}
