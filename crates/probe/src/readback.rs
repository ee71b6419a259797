//! Device → host reads of one probe event: every tensor of the event in one burn
//! [`Transaction`] (one synchronisation instead of one per tensor), in the device's own dtype.
//! Widening bf16 maps to f32 is left to the workers ([`to_f32`]), off the training thread.

use crate::ProbeError;
use burn::prelude::*;
use burn::tensor::Transaction;

/// Executes `transaction`: the tensors' data in the order they were registered.
///
/// # Errors
/// A device error since the last synchronisation.
pub(crate) fn read<B: Backend>(transaction: Transaction<B>) -> Result<Vec<TensorData>, ProbeError> {
    transaction
        .try_execute()
        .map_err(|e| ProbeError::Format(format!("reading the probe's tensors: {e}")))
}

/// The values of `data` as f32, whatever float dtype the device used.
///
/// # Errors
/// Data that is not a float tensor.
pub(crate) fn to_f32(data: TensorData) -> Result<Vec<f32>, ProbeError> {
    data.convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| ProbeError::Format(format!("probe tensor is not a float tensor: {e:?}")))
}
