//! Marchenko–Pastur diagnostics of the query/key spectrum (seed 000, Table 1, made precise by
//! DESIGN.md).
//!
//! For one attention layer with effective query and key weights `Q, K ∈ ℝ^{m×d}` (rows
//! grouped by head, `m = H·d_k`):
//!
//! * `M = QKᵀ ∈ ℝ^{m×m}`, `G = MMᵀ/d`, eigenvalues `λ₁ ≥ … ≥ λ_m ≥ 0`;
//! * `γ = m/d`, `σ²` estimated (default: `Var(M_ij)` over all entries, the paper's
//!   "empirical variance correction"), `λ₊ = σ²(1 + √γ)²` under the paper's MP null;
//! * MP-Gap `Δ = λ₁ − λ₊` (raw, may be negative), outlier count `#{λᵢ > λ₊}`, outlier
//!   energy `Σ_{λᵢ>λ₊} λᵢ / Σλᵢ`, MP soft rank `ρ = λ₁/λ₊`, stable rank `Σλᵢ/λ₁`,
//!   normalised stable rank `stable rank / m`;
//! * the same per head (`M_h = Q_hK_hᵀ`, `γ_h = d_k/d`);
//! * a Tracy–Widom test of whether `λ₁` is above the bulk.
//!
//! Every σ² estimator ([`VarianceEstimator`]) and every null law ([`NullModel`]) asked for is
//! reported side by side, named; nothing switches silently.

mod estimators;

pub use estimators::VarianceEstimator;

use crate::eigen::{EigenSolver, eigenvalues_descending, tridiagonalize, tridiagonalize_owned};
use crate::error::{Result, RmtError};
use crate::laws::{MarchenkoPastur, ProductGaussianLaw, SpectralLaw};
use crate::linalg::{
    Element, MatrixView, as_faer, check_matrix, check_non_empty, gram_lower_of_transpose,
    product_abt, release_scratch, thin_qr_r,
};
use crate::tracy_widom::{TracyWidomTest, wishart_largest_eigenvalue_scaling};
use faer::MatRef;
use serde::{Deserialize, Serialize};

/// The null law against which the spectrum of `G` is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NullModel {
    /// The paper's rule: `MP(γ = m/d, σ²)`, edge `λ₊ = σ²(1 + √γ)²`.
    Mp,
    /// The law of `G` when `M` is a product of independent Gaussian factors with the layer's
    /// true shapes (Fuss–Catalan for `QKᵀ` with dense square `Q, K`: edge `27/4·σ²`). See
    /// DESIGN.md, "the product null".
    Product,
}

impl NullModel {
    /// Name used in reports and CSV (`mp`, `product`).
    pub fn name(&self) -> &'static str {
        match self {
            NullModel::Mp => "mp",
            NullModel::Product => "product",
        }
    }

    /// Parses a name.
    pub fn from_name(s: &str) -> Result<Self> {
        match s {
            "mp" => Ok(NullModel::Mp),
            "product" => Ok(NullModel::Product),
            _ => Err(RmtError::invalid("null", s, "expected `mp` or `product`")),
        }
    }
}

/// How `M = QKᵀ` factorises, for the product null: the inner dimensions of
/// `M = X₁⋯X_s`, between the `m` rows of `Q` and the `m` rows of `K`.
///
/// * MHA, `M = QKᵀ`: `[d]`.
/// * MLA, `M = W_uq·W_dq·W_dkvᵀ·W_ukᵀ`: `[q_latent, d, kv_latent]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Factorization {
    /// Inner dimensions `N₁ … N_{s−1}`.
    pub inner: Vec<usize>,
}

impl Factorization {
    /// `M = QKᵀ` with dense `Q, K ∈ ℝ^{m×d}`.
    pub fn dense(d: usize) -> Self {
        Self { inner: vec![d] }
    }

    /// The factor shapes for rows `rows` (`[rows, inner…, rows]`).
    pub fn dims(&self, rows: usize) -> Vec<usize> {
        let mut dims = vec![rows];
        dims.extend(&self.inner);
        dims.push(rows);
        dims
    }
}

/// What to compute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiagnosticsConfig {
    /// σ² estimators, each reported separately. Default: the paper's `Empirical`.
    pub estimators: Vec<VarianceEstimator>,
    /// Null laws, each reported separately. Default: the paper's `Mp`.
    pub nulls: Vec<NullModel>,
    /// Also diagnose every head (`M_h = Q_hK_hᵀ`).
    pub per_head: bool,
    /// Full-spectrum eigensolver.
    pub solver: EigenSolver,
    /// Allow the partial-spectrum path when only the empirical estimator is asked for (its
    /// `λ₊` is known before any eigenvalue): after the two-stage tridiagonalisation, the
    /// outlier count is a Sturm count — the inertia of `G − λ₊I` — and only the eigenvalues
    /// above `λ₊` (and λ₁) are computed, by bisection. It returns the full path's numbers.
    pub fast_path: bool,
}

impl Default for DiagnosticsConfig {
    fn default() -> Self {
        Self {
            estimators: vec![VarianceEstimator::Empirical],
            nulls: vec![NullModel::Mp],
            per_head: false,
            solver: EigenSolver::default(),
            fast_path: true,
        }
    }
}

impl DiagnosticsConfig {
    /// Every estimator under every null, per head too.
    pub fn everything() -> Self {
        Self {
            estimators: VarianceEstimator::ALL.to_vec(),
            nulls: vec![NullModel::Mp, NullModel::Product],
            per_head: true,
            ..Self::default()
        }
    }

    fn validate(&self) -> Result<()> {
        if self.estimators.is_empty() {
            return Err(RmtError::invalid(
                "estimators",
                "[]",
                "ask for at least one σ² estimator",
            ));
        }
        if self.nulls.is_empty() {
            return Err(RmtError::invalid(
                "nulls",
                "[]",
                "ask for at least one null law",
            ));
        }
        Ok(())
    }
}

/// The diagnostics of one spectrum under one (estimator, null) pair.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SpectralMetrics {
    /// `λ₁`.
    pub lambda_max: f64,
    /// The null's bulk edge `λ₊`.
    pub lambda_plus: f64,
    /// The estimated `σ²`.
    pub sigma2: f64,
    /// `Δ = λ₁ − λ₊`.
    pub mp_gap: f64,
    /// `#{λᵢ > λ₊}`.
    pub outlier_count: usize,
    /// `Σ_{λᵢ>λ₊} λᵢ / Σᵢ λᵢ`.
    pub outlier_energy: f64,
    /// `ρ = λ₁/λ₊`.
    pub mp_soft_rank: f64,
    /// `Σλᵢ/λ₁`.
    pub stable_rank: f64,
    /// `stable rank / m`.
    pub normalized_stable_rank: f64,
    /// Tracy–Widom statistic of `λ₁` against the null's edge.
    pub tw_statistic: f64,
    /// Its β = 1 upper-tail p-value.
    pub tw_p_value: f64,
}

impl SpectralMetrics {
    /// Metric names in CSV order.
    pub const NAMES: [&'static str; 11] = [
        "lambda_max",
        "lambda_plus",
        "sigma2",
        "mp_gap",
        "outlier_count",
        "outlier_energy",
        "mp_soft_rank",
        "stable_rank",
        "normalized_stable_rank",
        "tw_statistic",
        "tw_p_value",
    ];

    /// `(name, value)` pairs in [`Self::NAMES`] order.
    pub fn named_values(&self) -> [(&'static str, f64); 11] {
        let v = [
            self.lambda_max,
            self.lambda_plus,
            self.sigma2,
            self.mp_gap,
            self.outlier_count as f64,
            self.outlier_energy,
            self.mp_soft_rank,
            self.stable_rank,
            self.normalized_stable_rank,
            self.tw_statistic,
            self.tw_p_value,
        ];
        let mut out = [("", 0.0); 11];
        for (i, name) in Self::NAMES.iter().enumerate() {
            out[i] = (name, v[i]);
        }
        out
    }
}

/// One (estimator, null) result.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Diagnosis {
    /// How σ² was estimated.
    pub estimator: VarianceEstimator,
    /// Which null law gave `λ₊`.
    pub null: NullModel,
    /// The metrics.
    pub metrics: SpectralMetrics,
}

/// The diagnostics of one `G` (a whole layer or one head).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpectrumDiagnostics {
    /// `None` for the whole layer, `Some(h)` for head `h`.
    pub head: Option<usize>,
    /// Rows of `Q` (and of `K`): `m`, or `d_k` for a head.
    pub rows: usize,
    /// Model width `d`.
    pub width: usize,
    /// `tr G = ‖M‖_F²/d`.
    pub trace: f64,
    /// Whether the partial-spectrum path produced these numbers.
    pub partial_spectrum: bool,
    /// One entry per requested (estimator, null), estimators outermost.
    pub diagnoses: Vec<Diagnosis>,
    /// The (estimator, null) pairs whose σ² is undefined on this spectrum (e.g. the trimmed
    /// estimator on a rank-deficient `M`, where most eigenvalues are 0), with the reason;
    /// they have no entry in `diagnoses`. The paper's empirical estimator is always defined.
    #[serde(default)]
    pub undefined: Vec<UndefinedDiagnosis>,
}

/// An (estimator, null) pair that has no answer on a spectrum, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UndefinedDiagnosis {
    /// The estimator.
    pub estimator: VarianceEstimator,
    /// The null law.
    pub null: NullModel,
    /// Why.
    pub reason: String,
}

impl SpectrumDiagnostics {
    /// The diagnosis for an (estimator, null) pair.
    pub fn get(&self, estimator: VarianceEstimator, null: NullModel) -> Option<&SpectralMetrics> {
        self.diagnoses
            .iter()
            .find(|d| d.estimator == estimator && d.null == null)
            .map(|d| &d.metrics)
    }
}

/// Whole-layer and per-head diagnostics of one attention layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerDiagnostics {
    /// Number of heads.
    pub heads: usize,
    /// The whole layer (`M = QKᵀ`).
    pub layer: SpectrumDiagnostics,
    /// Per head, when asked for.
    pub per_head: Vec<SpectrumDiagnostics>,
}

/// Diagnoses one attention layer from its effective `Q, K ∈ ℝ^{m×d}` (rows grouped by
/// head, `m = heads·d_k`). Products are formed in `T`'s precision, spectra in `f64`.
///
/// `factorization` describes `M` for the product null (defaults to dense `QKᵀ`).
///
/// # Errors
/// Empty or non-finite matrices, shapes of `Q` and `K` that differ, `heads` = 0 or not
/// dividing `m`, an all-zero `M`, finite inputs whose `M` or `‖M‖²` overflows, or an
/// invalid configuration.
///
/// # Example
/// ```
/// use nalgebra::DMatrix;
/// use rand::SeedableRng;
/// use rand_distr::{Distribution, StandardNormal};
/// use rmt_core::diagnostics::{diagnose_layer, DiagnosticsConfig, NullModel, VarianceEstimator};
/// use rmt_core::linalg::view;
///
/// let mut rng = rand_pcg::Pcg64::seed_from_u64(0);
/// let (m, d) = (128, 128);
/// let mut q = DMatrix::<f64>::from_fn(m, d, |_, _| StandardNormal.sample(&mut rng));
/// let k = DMatrix::<f64>::from_fn(m, d, |_, _| StandardNormal.sample(&mut rng));
/// // Plant a strong rank-one spike in Q.
/// let u = DMatrix::<f64>::from_fn(m, 1, |_, _| StandardNormal.sample(&mut rng));
/// q += &u * (&u.transpose() * &k) * 0.5;
/// let cfg = DiagnosticsConfig { nulls: vec![NullModel::Mp, NullModel::Product], ..Default::default() };
/// let diag = diagnose_layer(view(&q), view(&k), 4, &cfg, None).unwrap();
/// let paper = diag.layer.get(VarianceEstimator::Empirical, NullModel::Mp).unwrap();
/// assert!(paper.mp_gap > 0.0 && paper.outlier_count >= 1);
/// assert!(paper.tw_p_value < 1e-6);
/// ```
pub fn diagnose_layer<T: Element>(
    q: MatrixView<'_, T>,
    k: MatrixView<'_, T>,
    heads: usize,
    config: &DiagnosticsConfig,
    factorization: Option<&Factorization>,
) -> Result<LayerDiagnostics> {
    let width = q.ncols();
    diagnose_layer_in_basis(q, k, width, heads, config, factorization)
}

/// [`diagnose_layer`] for `Q, K` given in a basis of the key space: `Q̃ = QBᵀ` and `K̃ = C`
/// (`m × b`) where `K = CB` with `B ∈ ℝ^{b×d}`, so that `M = QKᵀ = Q̃K̃ᵀ` is the same
/// `m × m` matrix, formed from `b` columns instead of `d`. `width` is the model width `d`,
/// which keeps its place in `G = MMᵀ/d`, `γ = m/d` and the null laws. An MLA layer's keys
/// live in the `r_kv + d_rope` rows of `kv_a_proj_with_mqa` (DeepSeek-V3: 576 of 7168).
///
/// # Errors
/// As [`diagnose_layer`], and `width` = 0.
///
/// # Example
/// ```
/// use nalgebra::DMatrix;
/// use rand::SeedableRng;
/// use rand_distr::{Distribution, StandardNormal};
/// use rmt_core::diagnostics::{
///     diagnose_layer, diagnose_layer_in_basis, DiagnosticsConfig, NullModel, VarianceEstimator,
/// };
/// use rmt_core::linalg::view;
///
/// let mut rng = rand_pcg::Pcg64::seed_from_u64(0);
/// let mut draw = |r, c| DMatrix::<f64>::from_fn(r, c, |_, _| StandardNormal.sample(&mut rng));
/// // Keys in a 16-dimensional subspace of a 64-wide model: K = C·B.
/// let (m, d, b) = (48, 64, 16);
/// let (q, c, basis) = (draw(m, d), draw(m, b), draw(b, d));
/// let k = &c * &basis;
/// let cfg = DiagnosticsConfig::default();
/// let wide = diagnose_layer(view(&q), view(&k), 4, &cfg, None).unwrap();
/// let q_in_basis = &q * basis.transpose();
/// let narrow = diagnose_layer_in_basis(view(&q_in_basis), view(&c), d, 4, &cfg, None).unwrap();
/// let pair = (VarianceEstimator::Empirical, NullModel::Mp);
/// let (x, y) = (wide.layer.get(pair.0, pair.1).unwrap(), narrow.layer.get(pair.0, pair.1).unwrap());
/// assert_eq!(x.outlier_count, y.outlier_count);
/// assert!((x.lambda_max - y.lambda_max).abs() < 1e-9 * x.lambda_max);
/// ```
pub fn diagnose_layer_in_basis<T: Element>(
    q: MatrixView<'_, T>,
    k: MatrixView<'_, T>,
    width: usize,
    heads: usize,
    config: &DiagnosticsConfig,
    factorization: Option<&Factorization>,
) -> Result<LayerDiagnostics> {
    config.validate()?;
    if width == 0 {
        return Err(RmtError::invalid("width", width, "must be ≥ 1"));
    }
    let (q, k) = (as_faer(&q), as_faer(&k));
    // Their entries are checked through M's (see `diagnose_block`).
    check_non_empty("Q", q)?;
    check_non_empty("K", k)?;
    if q.nrows() != k.nrows() || q.ncols() != k.ncols() {
        return Err(RmtError::ShapeMismatch {
            context: "diagnose_layer",
            detail: format!(
                "Q is {}×{} but K is {}×{}",
                q.nrows(),
                q.ncols(),
                k.nrows(),
                k.ncols()
            ),
        });
    }
    let m = q.nrows();
    if heads == 0 || m % heads != 0 {
        return Err(RmtError::ShapeMismatch {
            context: "diagnose_layer",
            detail: format!("{m} rows of Q cannot be split into {heads} heads"),
        });
    }
    let dense = Factorization::dense(width);
    let factorization = factorization.unwrap_or(&dense);
    let layer = diagnose_block(q, k, width, None, config, factorization)?;
    let mut per_head = Vec::new();
    if config.per_head {
        let dk = m / heads;
        for h in 0..heads {
            let rows = h * dk..(h + 1) * dk;
            per_head.push(diagnose_block(
                q.subrows(rows.start, dk),
                k.subrows(rows.start, dk),
                width,
                Some(h),
                &DiagnosticsConfig {
                    fast_path: false,
                    ..config.clone()
                },
                factorization,
            )?);
        }
    }
    Ok(LayerDiagnostics {
        heads,
        layer,
        per_head,
    })
}

/// [`diagnose_layer`] for several layers of one model (same head count and factor shapes),
/// in parallel over layers: each of rayon's workers takes whole layers, so the cores stay
/// busy through the stages of one layer that use only one of them (the tridiagonal
/// reduction, the GEMMs' fork and join). One result per layer, in order.
///
/// ```
/// use nalgebra::DMatrix;
/// use rmt_core::diagnostics::{diagnose_layer, diagnose_layers, DiagnosticsConfig};
/// use rmt_core::linalg::view;
///
/// let layers: Vec<(DMatrix<f64>, DMatrix<f64>)> = (0..3)
///     .map(|l| {
///         let q = DMatrix::from_fn(16, 16, |i, j| ((i * 7 + j * 3 + l) % 11) as f64 - 5.0);
///         let k = DMatrix::from_fn(16, 16, |i, j| ((i * 5 + j * 2 + l) % 13) as f64 - 6.0);
///         (q, k)
///     })
///     .collect();
/// let views: Vec<_> = layers.iter().map(|(q, k)| (view(q), view(k))).collect();
/// let cfg = DiagnosticsConfig::default();
/// let all = diagnose_layers(&views, 2, &cfg, None);
/// assert_eq!(all.len(), 3);
/// let one = diagnose_layer(views[1].0, views[1].1, 2, &cfg, None).unwrap();
/// assert_eq!(all[1].as_ref().unwrap(), &one);
/// ```
pub fn diagnose_layers<T: Element>(
    layers: &[(MatrixView<'_, T>, MatrixView<'_, T>)],
    heads: usize,
    config: &DiagnosticsConfig,
    factorization: Option<&Factorization>,
) -> Vec<Result<LayerDiagnostics>> {
    per_layer_in_parallel(layers, |(q, k)| {
        diagnose_layer(*q, *k, heads, config, factorization)
    })
}

/// `f` over `layers` on rayon's workers, one whole layer per task, results in order. A
/// single layer runs on the calling thread, where its own stages use every core.
pub(crate) fn per_layer_in_parallel<L: Sync, R: Send>(
    layers: &[L],
    f: impl Fn(&L) -> R + Sync + Send,
) -> Vec<R> {
    use rayon::prelude::*;
    if layers.len() == 1 {
        return vec![f(&layers[0])];
    }
    layers.par_iter().with_max_len(1).map(f).collect()
}

/// The statistics of `M`'s entries that the metrics need besides the spectrum of `G`: from
/// them come the paper's `σ² = Var(M_ij)` and `tr G = ‖M‖_F²/d`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EntryMoments {
    /// `Var(M_ij)` over all entries (population variance).
    pub variance: f64,
    /// `‖M‖_F² = Σ M_ij²`.
    pub frobenius2: f64,
}

impl EntryMoments {
    /// From `Σ M_ij`, `Σ M_ij²` and the number of entries (as a device would reduce them).
    pub fn from_sums(sum: f64, sum_squares: f64, count: usize) -> Self {
        let n = count as f64;
        let mean = sum / n;
        Self {
            variance: (sum_squares / n - mean * mean).max(0.0),
            frobenius2: sum_squares,
        }
    }
}

/// [`EntryMoments`] of `M` in one pass, compiled for AVX2 + FMA where the CPU has them (the
/// widening to `f64` is then four or eight lanes to an instruction, not one).
fn entry_moments<T: Element>(mm: MatRef<'_, T>) -> EntryMoments {
    #[cfg(target_arch = "x86_64")]
    if crate::eigen::has_avx2_fma() {
        // SAFETY: the CPU has the features (checked).
        return unsafe { entry_moments_avx2(mm) };
    }
    entry_moments_body(mm)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn entry_moments_avx2<T: Element>(mm: MatRef<'_, T>) -> EntryMoments {
    entry_moments_body(mm)
}

#[inline(always)]
fn entry_moments_body<T: Element>(mm: MatRef<'_, T>) -> EntryMoments {
    // Column sums in f64 (eight running sums per column, so the additions vectorise rather
    // than wait on one another), then summed over columns: no catastrophic accumulation.
    const LANES: usize = 8;
    let (mut sum, mut sum2) = (0.0, 0.0);
    for j in 0..mm.ncols() {
        let (mut s, mut s2) = ([0.0f64; LANES], [0.0f64; LANES]);
        match crate::linalg::column(mm, j) {
            Some(col) => {
                let mut chunks = col.chunks_exact(LANES);
                for chunk in &mut chunks {
                    for l in 0..LANES {
                        let x = chunk[l].to_f64();
                        s[l] += x;
                        s2[l] += x * x;
                    }
                }
                for (l, x) in chunks.remainder().iter().enumerate() {
                    let x = x.to_f64();
                    s[l] += x;
                    s2[l] += x * x;
                }
            }
            None => {
                for i in 0..mm.nrows() {
                    let x = mm[(i, j)].to_f64();
                    s[i % LANES] += x;
                    s2[i % LANES] += x * x;
                }
            }
        }
        sum += s.iter().sum::<f64>();
        sum2 += s2.iter().sum::<f64>();
    }
    EntryMoments::from_sums(sum, sum2, mm.nrows() * mm.ncols())
}

/// A null law at unit σ², rescalable.
/// The unit-variance product law of `dims` normalised by `width`, memoised: its lower edge
/// and CDF table cost milliseconds to build, and a probe asks for the same few shapes at
/// every layer, head and step. (Clones share the table.)
fn unit_product_law(dims: &[usize], width: usize) -> Result<ProductGaussianLaw> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    type Cache = Mutex<HashMap<(Vec<usize>, usize), ProductGaussianLaw>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let key = (dims.to_vec(), width);
    if let Some(law) = cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
        return Ok(law);
    }
    let law = ProductGaussianLaw::for_product(dims, width as f64, 1.0)?;
    if let Ok(mut c) = cache.lock() {
        if c.len() >= 256 {
            c.clear();
        }
        c.insert(key, law.clone());
    }
    Ok(law)
}

#[derive(Debug, Clone)]
pub(crate) enum NullLaw {
    Mp(MarchenkoPastur),
    Product(ProductGaussianLaw),
}

impl NullLaw {
    fn new(
        null: NullModel,
        rows: usize,
        width: usize,
        factorization: &Factorization,
    ) -> Result<Self> {
        Ok(match null {
            NullModel::Mp => NullLaw::Mp(MarchenkoPastur::new(rows as f64 / width as f64, 1.0)?),
            NullModel::Product => {
                NullLaw::Product(unit_product_law(&factorization.dims(rows), width)?)
            }
        })
    }

    /// The law at entry variance `σ²`.
    pub(crate) fn at(&self, sigma2: f64) -> Result<NullLaw> {
        Ok(match self {
            NullLaw::Mp(l) => NullLaw::Mp(l.with_variance(sigma2)?),
            NullLaw::Product(l) => NullLaw::Product(l.with_scale(l.scale() * sigma2)?),
        })
    }

    pub(crate) fn law(&self) -> &dyn SpectralLaw {
        match self {
            NullLaw::Mp(l) => l,
            NullLaw::Product(l) => l,
        }
    }

    /// Tracy–Widom location and scale of the largest of `rows` eigenvalues: Johnstone's
    /// real-Wishart scaling for MP (columns `d`), edge universality for the product law.
    fn tracy_widom(&self, rows: usize, width: usize) -> (f64, f64) {
        match self {
            NullLaw::Mp(l) => wishart_largest_eigenvalue_scaling(rows, width, l.entry_variance()),
            NullLaw::Product(l) => l.soft_edge_scaling(rows),
        }
    }
}

/// Metrics from `λ₁`, `λ₊`, σ², the outliers' count and sum, and `tr G`.
#[allow(clippy::too_many_arguments)]
fn metrics(
    lambda_max: f64,
    lambda_plus: f64,
    sigma2: f64,
    outlier_count: usize,
    outlier_sum: f64,
    trace: f64,
    rows: usize,
    tw: TracyWidomTest,
) -> SpectralMetrics {
    let stable_rank = trace / lambda_max;
    SpectralMetrics {
        lambda_max,
        lambda_plus,
        sigma2,
        mp_gap: lambda_max - lambda_plus,
        outlier_count,
        // An empty sum is −0.0 in Rust; report a plain 0 when there is no outlier.
        outlier_energy: if outlier_count == 0 {
            0.0
        } else {
            outlier_sum / trace
        },
        mp_soft_rank: lambda_max / lambda_plus,
        stable_rank,
        normalized_stable_rank: stable_rank / rows as f64,
        tw_statistic: tw.statistic,
        tw_p_value: tw.p_value,
    }
}

/// Diagnoses `G = (QKᵀ)(QKᵀ)ᵀ/d` for one block of rows.
fn diagnose_block<T: Element>(
    q: MatRef<'_, T>,
    k: MatRef<'_, T>,
    width: usize,
    head: Option<usize>,
    config: &DiagnosticsConfig,
    factorization: &Factorization,
) -> Result<SpectrumDiagnostics> {
    if q.nrows() >= THIN_QR_MIN_RATIO * q.ncols() {
        return diagnose_thin(q, k, width, head, config, factorization);
    }
    // Mᵀ = KQᵀ, column-major: G = MMᵀ is then a TN product of it with itself.
    let mt = product_abt(k, q);
    let moments = entry_moments(mt.as_ref());
    if !moments.frobenius2.is_finite() {
        // Q and K are scanned only here: a NaN or an infinity in either makes every entry of
        // M that it enters non-finite (0·∞ is NaN), so a finite ‖M‖² clears both without a
        // pass over them (≈ 2 % of a layer's time).
        let found = check_matrix("Q", q)
            .and(check_matrix("K", k))
            .and(check_matrix("M = QKᵀ", mt.as_ref().transpose()));
        release_scratch(mt);
        found?;
        return Err(overflow(head));
    }
    let rows = q.nrows();
    through_factor(mt, rows, moments, width, head, config, factorization)
}

/// The metrics of `G = FFᵀ/d` from `Fᵀ` (column-major; `F = M`, or [`diagnose_thin`]'s core
/// `C`): `G`'s lower triangle only — every consumer of `G` reads no more — then
/// [`spectrum_diagnostics`].
fn through_factor<T: Element>(
    ft: faer::Mat<T>,
    rows: usize,
    moments: EntryMoments,
    width: usize,
    head: Option<usize>,
    config: &DiagnosticsConfig,
    factorization: &Factorization,
) -> Result<SpectrumDiagnostics> {
    let g = gram_lower_of_transpose(ft.as_ref(), 1.0 / width as f64);
    release_scratch(ft);
    spectrum_diagnostics(
        Gram::Owned(g),
        rows,
        moments,
        width,
        head,
        config,
        factorization,
    )
}

/// From `m ≥` this many times the inner width `b` of `Q, K ∈ ℝ^{m×b}`, a block is
/// diagnosed through thin QR factors ([`diagnose_thin`]): `4mb² + 3b³` flops against
/// `3m²b + 4m³/3` for `M`, `G` and their reduction, 2.7× fewer at `m = 2b`.
const THIN_QR_MIN_RATIO: usize = 2;

/// A block with more rows than columns, `m ≥ 2b`, through thin QR factors: with
/// `Q = U_Q R_Q` and `K = U_K R_K` (`U` with orthonormal columns, `R ∈ ℝ^{b×b}`),
/// `M = U_Q (R_Q R_Kᵀ) U_Kᵀ`, so `G = MMᵀ/d` has the eigenvalues of `CCᵀ/d` for the core
/// `C = R_Q R_Kᵀ`, and `m − b` zeros. The moments need no `M` either: `Σ M_ij = (Qᵀ1)·(Kᵀ1)`
/// and `‖M‖_F² = ‖C‖_F²`. Neither `M` nor `G` (`m × m`) is formed.
fn diagnose_thin<T: Element>(
    q: MatRef<'_, T>,
    k: MatRef<'_, T>,
    width: usize,
    head: Option<usize>,
    config: &DiagnosticsConfig,
    factorization: &Factorization,
) -> Result<SpectrumDiagnostics> {
    // M is never formed, so its entries cannot vouch for Q's and K's.
    check_matrix("Q", q)?;
    check_matrix("K", k)?;
    let (rq, rk) = (thin_qr_r(q), thin_qr_r(k));
    // Cᵀ = R_K R_Qᵀ, column-major: CCᵀ is then a TN product of it with itself.
    let ct = product_abt(rk.as_ref(), rq.as_ref());
    let column_sums = |a: MatRef<'_, T>| -> Vec<f64> {
        (0..a.ncols())
            .map(|j| (0..a.nrows()).map(|i| a[(i, j)].to_f64()).sum())
            .collect()
    };
    let sum: f64 = column_sums(q)
        .iter()
        .zip(column_sums(k))
        .map(|(a, b)| a * b)
        .sum();
    let rows = q.nrows();
    let frobenius2 = entry_moments(ct.as_ref()).frobenius2;
    if !frobenius2.is_finite() {
        release_scratch(ct);
        return Err(overflow(head));
    }
    let moments = EntryMoments::from_sums(sum, frobenius2, rows * rows);
    through_factor(ct, rows, moments, width, head, config, factorization)
}

/// The error for finite `Q` and `K` whose `‖M‖²` is not finite.
fn overflow(head: Option<usize>) -> RmtError {
    RmtError::Degenerate(format!(
        "‖M‖² of M = QKᵀ{} overflows f64: the entries of Q and K are too large",
        head.map(|h| format!(" of head {h}")).unwrap_or_default()
    ))
}

/// Diagnoses a Gram matrix `G = MMᵀ/d` computed elsewhere (on a training device, say) from
/// `M = QKᵀ` with `rows` rows, model width `width`, and the entry moments of `M`. The same
/// metrics as [`diagnose_layer`] for one block.
///
/// # Errors
/// `G` not square, empty or non-finite; `M` without variance; an invalid configuration.
pub fn diagnose_gram<T: Element>(
    gram: MatrixView<'_, T>,
    moments: EntryMoments,
    width: usize,
    head: Option<usize>,
    config: &DiagnosticsConfig,
    factorization: Option<&Factorization>,
) -> Result<SpectrumDiagnostics> {
    config.validate()?;
    let g = as_faer(&gram);
    check_matrix("G", g)?;
    if g.nrows() != g.ncols() {
        return Err(RmtError::NotSquare {
            what: "G",
            rows: g.nrows(),
            cols: g.ncols(),
        });
    }
    if width == 0 {
        return Err(RmtError::invalid("width", width, "must be ≥ 1"));
    }
    let dense = Factorization::dense(width);
    spectrum_diagnostics(
        Gram::Borrowed(g),
        g.nrows(),
        moments,
        width,
        head,
        config,
        factorization.unwrap_or(&dense),
    )
}

/// A `G` whose lower triangle is read: computed here (and reduced in place), or the
/// caller's.
enum Gram<'a, T> {
    Owned(faer::Mat<T>),
    Borrowed(MatRef<'a, T>),
}

impl<T: Element> Gram<'_, T> {
    fn as_ref(&self) -> MatRef<'_, T> {
        match self {
            Gram::Owned(g) => g.as_ref(),
            Gram::Borrowed(g) => *g,
        }
    }
}

/// The metrics of one `G` (lower triangle read) with the moments of its `M`. `G` may be
/// smaller than `rows × rows` ([`diagnose_thin`]): the spectrum's other `rows − n`
/// eigenvalues are zeros.
fn spectrum_diagnostics<T: Element>(
    g: Gram<'_, T>,
    rows: usize,
    moments: EntryMoments,
    width: usize,
    head: Option<usize>,
    config: &DiagnosticsConfig,
    factorization: &Factorization,
) -> Result<SpectrumDiagnostics> {
    debug_assert!(g.as_ref().nrows() <= rows);
    if moments.frobenius2 == 0.0 || moments.variance == 0.0 || !moments.variance.is_finite() {
        return Err(RmtError::Degenerate(format!(
            "M = QKᵀ{} has no variance (all entries equal): the diagnostics are undefined",
            head.map(|h| format!(" of head {h}")).unwrap_or_default()
        )));
    }
    let trace = moments.frobenius2 / width as f64;
    let unit_laws: Vec<(NullModel, NullLaw)> = config
        .nulls
        .iter()
        .map(|&n| NullLaw::new(n, rows, width, factorization).map(|l| (n, l)))
        .collect::<Result<_>>()?;

    let only_empirical = config
        .estimators
        .iter()
        .all(|e| *e == VarianceEstimator::Empirical);
    let partial = config.fast_path && only_empirical && config.solver == EigenSolver::TwoStage;
    let mut diagnoses = Vec::new();
    if partial {
        let tri = match g {
            Gram::Owned(g) => tridiagonalize_owned(g),
            Gram::Borrowed(g) => tridiagonalize(g),
        };
        for (null, unit) in &unit_laws {
            let law = unit.at(moments.variance)?;
            let lp = law.law().upper_edge();
            let (above, lambda_max) = tri.eigenvalues_above(lp);
            let (loc, scale) = law.tracy_widom(rows, width);
            let tw = TracyWidomTest::new(lambda_max, loc, scale);
            diagnoses.push(Diagnosis {
                estimator: VarianceEstimator::Empirical,
                null: *null,
                metrics: metrics(
                    lambda_max,
                    lp,
                    moments.variance,
                    above.len(),
                    above.iter().sum(),
                    trace,
                    rows,
                    tw,
                ),
            });
        }
        return Ok(SpectrumDiagnostics {
            head,
            rows,
            width,
            trace,
            partial_spectrum: true,
            diagnoses,
            undefined: Vec::new(),
        });
    }

    let mut spectrum = eigenvalues_descending(g.as_ref(), config.solver)?;
    if spectrum.len() < rows {
        // The zeros may pass a rounding error's negative eigenvalue: sorted again.
        spectrum.resize(rows, 0.0);
        spectrum.sort_by(|a, b| b.total_cmp(a));
    }
    let mut undefined = Vec::new();
    for &estimator in &config.estimators {
        for (null, unit) in &unit_laws {
            let sigma2 = match estimator.estimate(&spectrum, unit, moments.variance) {
                Ok(s) => s,
                Err(RmtError::Degenerate(reason)) if estimator != VarianceEstimator::Empirical => {
                    undefined.push(UndefinedDiagnosis {
                        estimator,
                        null: *null,
                        reason,
                    });
                    continue;
                }
                Err(e) => return Err(e),
            };
            let law = unit.at(sigma2)?;
            let lp = law.law().upper_edge();
            let (count, sum) = outliers_above(&spectrum, lp);
            let (loc, scale) = law.tracy_widom(rows, width);
            let tw = TracyWidomTest::new(spectrum[0], loc, scale);
            diagnoses.push(Diagnosis {
                estimator,
                null: *null,
                metrics: metrics(spectrum[0], lp, sigma2, count, sum, trace, rows, tw),
            });
        }
    }
    Ok(SpectrumDiagnostics {
        head,
        rows,
        width,
        trace,
        partial_spectrum: false,
        diagnoses,
        undefined,
    })
}

/// `(#{λ > edge}, Σ_{λ > edge} λ)` of a descending spectrum.
fn outliers_above(spectrum: &[f64], edge: f64) -> (usize, f64) {
    let count = spectrum.iter().take_while(|&&l| l > edge).count();
    (count, spectrum[..count].iter().sum())
}

/// Diagnostics straight from a spectrum of `G` (for users who already have eigenvalues):
/// the metrics for a given `σ²` and `λ₊`. The spectrum need not be sorted.
///
/// # Errors
/// Empty or non-finite spectrum, `λ₁ ≤ 0`, or a non-positive `lambda_plus`.
pub fn metrics_from_spectrum(
    eigenvalues: &[f64],
    sigma2: f64,
    lambda_plus: f64,
) -> Result<SpectralMetrics> {
    if eigenvalues.is_empty() {
        return Err(RmtError::Empty { what: "spectrum" });
    }
    crate::error::all_finite("spectrum", eigenvalues.iter().copied())?;
    crate::error::positive("λ₊", lambda_plus)?;
    let mut sorted = eigenvalues.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    if sorted[0] <= 0.0 {
        return Err(RmtError::Degenerate("largest eigenvalue ≤ 0".into()));
    }
    let (count, sum) = outliers_above(&sorted, lambda_plus);
    let trace: f64 = sorted.iter().sum();
    let tw = TracyWidomTest {
        statistic: f64::NAN,
        p_value: f64::NAN,
        location: f64::NAN,
        scale: f64::NAN,
    };
    Ok(metrics(
        sorted[0],
        lambda_plus,
        sigma2,
        count,
        sum,
        trace,
        sorted.len(),
        tw,
    ))
}

#[cfg(test)]
mod tests;

/// Every metric of `a` equals `b`'s to `tol` (relative), pair by pair, and the same pairs
/// are undefined.
#[cfg(test)]
pub(crate) fn assert_same_diagnoses(a: &SpectrumDiagnostics, b: &SpectrumDiagnostics, tol: f64) {
    assert_eq!((a.rows, a.width), (b.rows, b.width));
    assert!((a.trace - b.trace).abs() <= tol * b.trace);
    assert_eq!(a.diagnoses.len(), b.diagnoses.len());
    assert_eq!(
        a.undefined.len(),
        b.undefined.len(),
        "{:#?} vs {:#?}",
        a.undefined,
        b.undefined
    );
    for (x, y) in a.diagnoses.iter().zip(&b.diagnoses) {
        assert_eq!((x.estimator, x.null), (y.estimator, y.null));
        assert_eq!(x.metrics.outlier_count, y.metrics.outlier_count);
        for ((name, vx), (_, vy)) in x
            .metrics
            .named_values()
            .iter()
            .zip(&y.metrics.named_values())
        {
            assert!(
                (vx - vy).abs() <= tol * vy.abs().max(1e-9),
                "{:?}/{:?} {name}: {vx} vs {vy}",
                x.estimator,
                x.null
            );
        }
    }
}
