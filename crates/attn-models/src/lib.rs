//! placeholder during bring-up
pub use burn;
