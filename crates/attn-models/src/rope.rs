//! Rotary position embeddings (Su et al.), in both pairings used by the checkpoints we
//! export to.

use burn::prelude::*;

/// How the rotated coordinates are paired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopePairing {
    /// `(x_i, x_{i+w/2})`: HF LLaMA's `rotate_half` (so exported `q_proj`/`k_proj` load into
    /// `LlamaForCausalLM` unchanged).
    Half,
    /// `(x_{2i}, x_{2i+1})`: DeepSeek-V2's complex-multiplication form (its `q_pe`, `k_pe`).
    Interleaved,
}

/// Precomputed `cos`/`sin` tables `[max_seq, w/2]` with `θ_i = θ^{−2i/w}`.
///
/// Plain tensors inside a module are constants: not parameters, not saved.
#[derive(Module, Debug)]
pub struct Rope<B: Backend> {
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
    width: usize,
    pairing: RopePairing,
}

impl<B: Backend> Rope<B> {
    /// Tables for rotating `width` coordinates (even) at positions `0..max_seq`.
    pub fn new(
        width: usize,
        max_seq: usize,
        theta: f64,
        pairing: RopePairing,
        device: &B::Device,
    ) -> Self {
        Self::with_fixed_prefix(0, width, max_seq, theta, pairing, device)
    }

    /// Tables over `prefix + width` coordinates that leave the first `prefix` unchanged and
    /// rotate the last `width` as [`Self::new`]`(width, …, Interleaved)` does: `(cos, sin) =
    /// (1, 0)` on the prefix's pairs. Rotating a head `[x_nope | x_pe]` with them gives
    /// `[x_nope | rope(x_pe)]` exactly (`x·1 − y·0 = x` in every float format) in one pass,
    /// as one contiguous tensor (MLA-Decoupled's queries: no slices, no concatenation).
    /// `prefix` and `width` are even.
    pub fn interleaved_after(
        prefix: usize,
        width: usize,
        max_seq: usize,
        theta: f64,
        device: &B::Device,
    ) -> Self {
        Self::with_fixed_prefix(
            prefix,
            width,
            max_seq,
            theta,
            RopePairing::Interleaved,
            device,
        )
    }

    /// The tables of [`Self::interleaved_after`] for either pairing (a prefix only makes sense
    /// for the interleaved one, whose pairs never straddle it).
    fn with_fixed_prefix(
        prefix: usize,
        width: usize,
        max_seq: usize,
        theta: f64,
        pairing: RopePairing,
        device: &B::Device,
    ) -> Self {
        let (fixed, half) = (prefix / 2, width / 2);
        let columns = fixed + half;
        let mut cos = Vec::with_capacity(max_seq * columns);
        let mut sin = Vec::with_capacity(max_seq * columns);
        for p in 0..max_seq {
            cos.extend(std::iter::repeat_n(1.0f32, fixed));
            sin.extend(std::iter::repeat_n(0.0f32, fixed));
            for i in 0..half {
                let freq = theta.powf(-2.0 * i as f64 / width as f64);
                let angle = p as f64 * freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Self {
            cos: Tensor::from_data(TensorData::new(cos, [max_seq, columns]), device),
            sin: Tensor::from_data(TensorData::new(sin, [max_seq, columns]), device),
            width: prefix + width,
            pairing,
        }
    }

    /// Rotates the last dimension of `x` — shape `[batch, heads, seq, width]` — for positions
    /// `start..start+seq`.
    pub fn apply(&self, x: Tensor<B, 4>, start: usize) -> Tensor<B, 4> {
        let interleaved = self.pairing == RopePairing::Interleaved;
        match crate::fused::rotary(x, &self.cos, &self.sin, start, interleaved) {
            crate::fused::Outcome::Computed(y) => y,
            crate::fused::Outcome::Declined(x) => self.apply_composed(x, start),
        }
    }

    /// [`Self::apply`] from burn's operations: the definition the fused kernels are tested
    /// against.
    pub fn apply_composed(&self, x: Tensor<B, 4>, start: usize) -> Tensor<B, 4> {
        let [b, h, s, w] = x.dims();
        debug_assert_eq!(w, self.width);
        let half = w / 2;
        let cos = self
            .cos
            .clone()
            .slice([start..start + s, 0..half])
            .reshape([1, 1, s, half]);
        let sin = self
            .sin
            .clone()
            .slice([start..start + s, 0..half])
            .reshape([1, 1, s, half]);
        match self.pairing {
            RopePairing::Half => {
                let x1 = x.clone().slice([0..b, 0..h, 0..s, 0..half]);
                let x2 = x.slice([0..b, 0..h, 0..s, half..w]);
                let r1 = x1.clone() * cos.clone() - x2.clone() * sin.clone();
                let r2 = x2 * cos + x1 * sin;
                Tensor::cat(vec![r1, r2], 3)
            }
            RopePairing::Interleaved => {
                let pairs = x.reshape([b, h, s, half, 2]);
                let x1 = pairs
                    .clone()
                    .slice([0..b, 0..h, 0..s, 0..half, 0..1])
                    .reshape([b, h, s, half]);
                let x2 = pairs
                    .slice([0..b, 0..h, 0..s, 0..half, 1..2])
                    .reshape([b, h, s, half]);
                let r1 = x1.clone() * cos.clone() - x2.clone() * sin.clone();
                let r2 = x2 * cos + x1 * sin;
                Tensor::stack::<5>(vec![r1, r2], 4).reshape([b, h, s, w])
            }
        }
    }

    /// Rotates `[batch, seq, width]` (a latent, one "head").
    pub fn apply3(&self, x: Tensor<B, 3>, start: usize) -> Tensor<B, 3> {
        let [b, s, w] = x.dims();
        self.apply(x.reshape([b, 1, s, w]), start)
            .reshape([b, s, w])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::Distribution;

    type B = NdArray<f32>;

    #[test]
    fn a_fixed_prefix_stays_exact_and_the_rest_rotates_as_alone() {
        let device = Default::default();
        let (b, h, s, nope, pe) = (2, 3, 5, 8, 4);
        let x = Tensor::<B, 4>::random(
            [b, h, s, nope + pe],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let whole = Rope::<B>::interleaved_after(nope, pe, 16, 10_000.0, &device);
        let tail = Rope::<B>::new(pe, 16, 10_000.0, RopePairing::Interleaved, &device);
        for start in [0, 7] {
            let got = whole.apply(x.clone(), start);
            let want = Tensor::cat(
                vec![
                    x.clone().slice([0..b, 0..h, 0..s, 0..nope]),
                    tail.apply(x.clone().slice([0..b, 0..h, 0..s, nope..nope + pe]), start),
                ],
                3,
            );
            got.into_data().assert_eq(&want.into_data(), true);
        }
    }
}
