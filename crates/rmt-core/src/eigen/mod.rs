//! Symmetric eigenvalue solvers (eigenvalues only).
//!
//! [`EigenSolver::Faer`] calls faer's `self_adjoint_eigenvalues` (one-stage Householder
//! tridiagonalisation, then implicit QR).

use faer::MatRef;
use serde::{Deserialize, Serialize};

/// Which algorithm computes a full symmetric spectrum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub enum EigenSolver {
    /// faer 0.24's one-stage solver.
    #[default]
    Faer,
}

/// Eigenvalues of the symmetric matrix whose lower triangle is `a`, in descending order.
/// No input checks (callers validate).
pub(crate) fn eigenvalues_descending(a: MatRef<'_, f64>, solver: EigenSolver) -> crate::Result<Vec<f64>> {
    let mut ev = match solver {
        EigenSolver::Faer => a.self_adjoint_eigenvalues(faer::Side::Lower).map_err(|e| crate::RmtError::NoConvergence {
            method: "faer self_adjoint_eigenvalues",
            detail: format!("{e:?}"),
        })?,
    };
    ev.sort_by(|x, y| y.total_cmp(x));
    Ok(ev)
}
