//! Effective query/key weights of every attention layer (DESIGN.md), for the spectral
//! diagnostics: the probe and `cargo xtask diagnose` consume the same
//! [`rmt_core::effective::AttentionLayer`].

use crate::ModelError;
use crate::attention::Attention;
use crate::export::data_to_f32;
use crate::transformer::Llama;
use burn::nn::{Linear, RmsNorm};
use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::Transaction;
use rmt_core::diagnostics::Factorization;
use rmt_core::effective::{
    AttentionKind, AttentionLayer, MlaLayout, MlaShapes, MlaWeights, RowMajor, mha_effective,
    mha_layout, mla_effective, mla_layout,
};

/// Anything that can list its attention layers' effective `Q, K ∈ ℝ^{m×d}` (rows grouped
/// by head). Implemented for this crate's models; implement it for any other burn model to
/// use the probe on it.
pub trait EffectiveQk {
    /// One entry per attention layer, in order.
    ///
    /// # Errors
    /// Weights whose shapes contradict the head count.
    fn effective_qk(&self) -> Result<Vec<AttentionLayer>, ModelError>;
}

/// Takes the next datum of a read, as a row-major `[out, in]` matrix.
fn next_row_major(data: &mut dyn Iterator<Item = TensorData>) -> Result<RowMajor, ModelError> {
    let d = next_datum(data)?;
    let [rows, cols] = [d.shape[0], d.shape[1]];
    Ok(RowMajor::new(data_to_f32(d), rows, cols)?)
}

fn next_datum(data: &mut dyn Iterator<Item = TensorData>) -> Result<TensorData, ModelError> {
    data.next()
        .ok_or_else(|| ModelError::Device("fewer tensors read than registered".into()))
}

fn next_gain<B: Backend>(
    norm: &Option<RmsNorm<B>>,
    data: &mut dyn Iterator<Item = TensorData>,
) -> Result<Option<Vec<f32>>, ModelError> {
    norm.as_ref()
        .map(|_| next_datum(data).map(data_to_f32))
        .transpose()
}

fn register_linear<B: Backend>(t: Transaction<B>, l: &Linear<B>) -> Transaction<B> {
    t.register(l.weight.val().transpose()) // [out, in]
}

fn register_gain<B: Backend>(t: Transaction<B>, norm: &Option<RmsNorm<B>>) -> Transaction<B> {
    match norm {
        Some(n) => t.register(n.gamma.val()),
        None => t,
    }
}

fn execute<B: Backend>(t: Transaction<B>) -> Result<Vec<TensorData>, ModelError> {
    t.try_execute()
        .map_err(|e| ModelError::Device(format!("reading attention weights: {e}")))
}

impl<B: Backend> Attention<B> {
    /// This layer's effective `Q, K` (index `index`).
    ///
    /// # Errors
    /// Weights whose shapes contradict the head count, or a device error.
    pub fn effective_qk(&self, index: usize) -> Result<AttentionLayer, ModelError> {
        let data = execute(self.register_qk(Transaction::default()))?;
        self.assemble_qk(index, &mut data.into_iter())
    }

    /// Adds the weights [`Self::assemble_qk`] needs to a read.
    fn register_qk(&self, t: Transaction<B>) -> Transaction<B> {
        match self {
            Attention::Mha(a) => register_linear(register_linear(t, &a.wq), &a.wk),
            Attention::Mla(a) => {
                let t = register_gain(register_linear(t, &a.q_down), &a.q_norm);
                let t = register_linear(t, &a.q_up);
                let t = register_gain(register_linear(t, &a.kv_down), &a.kv_norm);
                register_linear(t, &a.kv_up)
            }
        }
    }

    /// The effective `Q, K` from the data [`Self::register_qk`] read, in its order.
    fn assemble_qk(
        &self,
        index: usize,
        data: &mut dyn Iterator<Item = TensorData>,
    ) -> Result<AttentionLayer, ModelError> {
        Ok(match self {
            Attention::Mha(_) => {
                let wq = next_row_major(data)?;
                mha_effective(index, self.heads(), wq, next_row_major(data)?)?
            }
            Attention::Mla(a) => {
                let q_down = next_row_major(data)?;
                let q_norm = next_gain(&a.q_norm, data)?;
                let q_up = next_row_major(data)?;
                let kv_down = next_row_major(data)?;
                let kv_norm = next_gain(&a.kv_norm, data)?;
                let kv_up = next_row_major(data)?;
                mla_effective(
                    index,
                    self.heads(),
                    MlaWeights {
                        q_down: Some((q_down, q_norm)),
                        q_up,
                        kv_down,
                        kv_norm,
                        kv_up,
                    },
                )?
            }
        })
    }
}

impl<B: Backend> EffectiveQk for Llama<B> {
    /// Every layer's weights in one device read, then the products on the host.
    fn effective_qk(&self) -> Result<Vec<AttentionLayer>, ModelError> {
        let read = self
            .blocks
            .iter()
            .fold(Transaction::default(), |t, b| b.attention.register_qk(t));
        let mut data = execute(read)?.into_iter();
        self.blocks
            .iter()
            .enumerate()
            .map(|(i, b)| b.attention.assemble_qk(i, &mut data))
            .collect()
    }
}

/// One layer's effective `Q, K ∈ ℝ^{m×d}` as f32 tensors on the model's device, rows grouped
/// by head exactly as in [`AttentionLayer`], with the layer's parametrisation.
#[derive(Debug, Clone)]
pub struct QkTensors<B: Backend> {
    /// Layer index.
    pub index: usize,
    /// The parametrisation.
    pub kind: AttentionKind,
    /// Factor shapes of `M = QKᵀ` for the product null.
    pub factorization: Factorization,
    /// Effective query weights `[m, d]`, f32.
    pub q: Tensor<B, 2>,
    /// Effective key weights `[m, d]`, f32.
    pub k: Tensor<B, 2>,
}

impl<B: Backend> QkTensors<B> {
    /// A host layer copied to `device`: the whole of an [`EffectiveQkTensors`] implementation
    /// for a model that has only [`EffectiveQk`].
    pub fn upload(layer: &AttentionLayer, device: &B::Device) -> Self {
        let upload = |values: &[f32]| {
            Tensor::<B, 2>::from_data(
                TensorData::new(values.to_vec(), [layer.rows, layer.width]),
                (device, DType::F32),
            )
        };
        Self {
            index: layer.index,
            kind: layer.kind.clone(),
            factorization: layer.factorization.clone(),
            q: upload(&layer.q),
            k: upload(&layer.k),
        }
    }
}

/// The effective `Q, K` of every attention layer as tensors on the model's device, formed
/// there: the probe's products then never leave the device. The values are those of
/// [`EffectiveQk`] (rmt-core's host products), up to f32 rounding.
pub trait EffectiveQkTensors<B: Backend> {
    /// One entry per attention layer, in order.
    ///
    /// # Errors
    /// Weights whose shapes contradict the head count.
    fn effective_qk_tensors(&self) -> Result<Vec<QkTensors<B>>, ModelError>;
}

/// `W = weightᵀ`, PyTorch's `[out, in]`, in f32.
fn hf_f32<B: Backend>(l: &Linear<B>) -> Tensor<B, 2> {
    l.weight.val().cast(DType::F32).transpose()
}

fn dims<B: Backend>(t: &Tensor<B, 2>) -> [usize; 2] {
    t.dims()
}

impl<B: Backend> Attention<B> {
    /// This layer's effective `Q, K` on its device (see [`EffectiveQkTensors`]).
    ///
    /// # Errors
    /// Weights whose shapes contradict the head count.
    pub fn effective_qk_tensors(&self, index: usize) -> Result<QkTensors<B>, ModelError> {
        let heads = self.heads();
        match self {
            Attention::Mha(a) => {
                let (q, k) = (hf_f32(&a.wq), hf_f32(&a.wk));
                let kind = mha_layout(index, heads, dims(&q), dims(&k))?;
                let rows = kind.key_rows().expect("mha_layout returns an MHA kind");
                let k = if rows.iter().enumerate().all(|(i, &r)| i == r) {
                    k
                } else {
                    let rows: Vec<i64> = rows.into_iter().map(|r| r as i64).collect();
                    let device = k.device();
                    k.select(0, Tensor::<B, 1, Int>::from_data(rows.as_slice(), &device))
                };
                Ok(QkTensors {
                    index,
                    kind,
                    factorization: Factorization::dense(dims(&q)[1]),
                    q,
                    k,
                })
            }
            Attention::Mla(a) => {
                let gain =
                    |n: &Option<RmsNorm<B>>| n.as_ref().map(|n| n.gamma.val().cast(DType::F32));
                let (q_down, q_up) = (hf_f32(&a.q_down), hf_f32(&a.q_up));
                let (kv_down, kv_up) = (hf_f32(&a.kv_down), hf_f32(&a.kv_up));
                let (g_q, g_kv) = (gain(&a.q_norm), gain(&a.kv_norm));
                let shapes = MlaShapes {
                    q_down: Some((dims(&q_down), g_q.as_ref().map(|g| g.dims()[0]))),
                    q_up: dims(&q_up),
                    kv_down: dims(&kv_down),
                    kv_norm: g_kv.as_ref().map(|g| g.dims()[0]),
                    kv_up: dims(&kv_up),
                };
                let MlaLayout {
                    kind,
                    factorization,
                    kv_latent,
                    nope_dim: nope,
                    rope_dim: rope,
                } = mla_layout(index, heads, &shapes)?;
                let scale = |w: Tensor<B, 2>, g: Option<Tensor<B, 1>>| match g {
                    Some(g) => w * g.unsqueeze::<2>(), // columns scaled: W·diag(g)
                    None => w,
                };
                // Q = W_qb·diag(g_q)·W_qa.
                let q = scale(q_up, g_q).matmul(q_down);
                // Head h's keys: its d_nope rows of W_kb·diag(g_kv)·W_kva[latent], then the
                // shared rotary rows W_kva[rope].
                let [kv_rows, _] = dims(&kv_up);
                let [kva_rows, d] = dims(&kv_down);
                let kb_nope = kv_up
                    .reshape([heads, kv_rows / heads, kv_latent])
                    .slice([0..heads, 0..nope, 0..kv_latent])
                    .reshape([heads * nope, kv_latent]);
                let content = scale(kb_nope, g_kv)
                    .matmul(kv_down.clone().slice([0..kv_latent, 0..d]))
                    .reshape([heads, nope, d]);
                let k = if rope == 0 {
                    content
                } else {
                    let rotary = kv_down
                        .slice([kv_latent..kva_rows, 0..d])
                        .unsqueeze::<3>()
                        .repeat_dim(0, heads);
                    Tensor::cat(vec![content, rotary], 1)
                }
                .reshape([heads * (nope + rope), d]);
                Ok(QkTensors {
                    index,
                    kind,
                    factorization,
                    q,
                    k,
                })
            }
        }
    }
}

impl<B: Backend> EffectiveQkTensors<B> for Llama<B> {
    fn effective_qk_tensors(&self) -> Result<Vec<QkTensors<B>>, ModelError> {
        self.blocks
            .iter()
            .enumerate()
            .map(|(i, b)| b.attention.effective_qk_tensors(i))
            .collect()
    }
}
