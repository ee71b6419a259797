//! Tokenizers, sequence packing, and the seeded order in which sequences are visited.
//!
//! A `tokenizer.json` (HF `tokenizers` format; the paper's T5 tokenizer when the user has it)
//! is loaded as is; without one, [`train_bpe`] learns a byte-level BPE on the training
//! documents and the run saves it beside its checkpoints. [`pack`] appends an end-of-text
//! token to every document, concatenates them, and cuts the stream into windows of
//! `context + 1` tokens (inputs and their next-token targets), dropping the ragged tail.

use crate::ExperimentError;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use std::path::Path;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// The end-of-text token appended to every document.
pub const END_OF_TEXT: &str = "</s>";

fn tok_err(e: impl std::fmt::Display) -> ExperimentError {
    ExperimentError::Invalid(format!("tokenizer: {e}"))
}

/// Loads a `tokenizer.json`.
///
/// # Errors
/// A missing or malformed file.
pub fn load(path: &Path) -> Result<Tokenizer, ExperimentError> {
    Tokenizer::from_file(path).map_err(|e| tok_err(format!("{}: {e}", path.display())))
}

/// Trains a byte-level BPE tokenizer with `vocab_size` entries (the end-of-text token
/// included) on `documents`.
///
/// # Errors
/// A vocabulary too small for the byte alphabet (256 + 1), or a trainer failure.
pub fn train_bpe(documents: &[String], vocab_size: usize) -> Result<Tokenizer, ExperimentError> {
    if vocab_size < 257 {
        return Err(tok_err(format!(
            "vocab_size {vocab_size} is below the 256 bytes plus the end-of-text token"
        )));
    }
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);
    let mut tokenizer = Tokenizer::new(BPE::default());
    // No prefix space: decoding gives back exactly the text that was encoded.
    let byte_level = ByteLevel::default().add_prefix_space(false);
    tokenizer.with_pre_tokenizer(Some(byte_level));
    tokenizer.with_decoder(Some(byte_level));
    tokenizer
        .train(&mut trainer, documents.iter())
        .map_err(tok_err)?;
    Ok(tokenizer)
}

/// Saves a tokenizer as `tokenizer.json`.
///
/// # Errors
/// File system errors.
pub fn save(tokenizer: &Tokenizer, path: &Path) -> Result<(), ExperimentError> {
    tokenizer.save(path, false).map_err(tok_err)
}

/// The id of the end-of-text token: `</s>` (T5, LLaMA), `<|endoftext|>` (GPT-2) or `<eos>`.
///
/// # Errors
/// A tokenizer with none of them.
pub fn end_of_text(tokenizer: &Tokenizer) -> Result<u32, ExperimentError> {
    [END_OF_TEXT, "<|endoftext|>", "<eos>"]
        .iter()
        .find_map(|t| tokenizer.token_to_id(t))
        .ok_or_else(|| tok_err("no end-of-text token (`</s>`, `<|endoftext|>` or `<eos>`)"))
}

/// Token windows of `context + 1` ids, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    /// `n_sequences × (context + 1)` token ids.
    pub tokens: Vec<u32>,
    /// Window length, `context + 1`.
    pub window: usize,
    /// Tokens the documents had in all (before the tail was dropped).
    pub total_tokens: usize,
}

impl Packed {
    /// Number of windows.
    pub fn len(&self) -> usize {
        self.tokens.len() / self.window
    }

    /// Whether there is no full window.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Window `i`.
    pub fn sequence(&self, i: usize) -> &[u32] {
        &self.tokens[i * self.window..(i + 1) * self.window]
    }
}

/// Tokenises `documents` (in parallel), appends the end-of-text id to each, and packs the
/// stream into windows of `context + 1` tokens.
///
/// # Errors
/// Tokenizer failures, or token ids outside `vocab_size`.
pub fn pack(
    tokenizer: &Tokenizer,
    documents: &[String],
    context: usize,
    vocab_size: usize,
) -> Result<Packed, ExperimentError> {
    let eot = end_of_text(tokenizer)?;
    let encodings = tokenizer
        .encode_batch(documents.to_vec(), false)
        .map_err(tok_err)?;
    let mut stream = Vec::new();
    for e in &encodings {
        stream.extend_from_slice(e.get_ids());
        stream.push(eot);
    }
    if let Some(&bad) = stream.iter().find(|&&id| id as usize >= vocab_size) {
        return Err(tok_err(format!(
            "token id {bad} is outside the model's vocabulary of {vocab_size}: the tokenizer ({} entries) and the preset disagree",
            tokenizer.get_vocab_size(true)
        )));
    }
    let window = context + 1;
    let total_tokens = stream.len();
    stream.truncate(total_tokens / window * window);
    Ok(Packed {
        tokens: stream,
        window,
        total_tokens,
    })
}

/// The seeded order of sequences: epoch `e` visits a permutation drawn from `(seed, e)`, and
/// batch `s` of size `b` takes positions `s·b … s·b + b − 1` of the concatenated epochs. The
/// batch of any step is a pure function of `(seed, step)`, which is what makes resumption
/// exact and gives every variant the same data in the same order.
#[derive(Debug, Clone)]
pub struct SequenceOrder {
    n: usize,
    seed: u64,
    epoch: Option<(usize, Vec<usize>)>,
}

impl SequenceOrder {
    /// An order over `n` sequences.
    pub fn new(n: usize, seed: u64) -> Self {
        Self {
            n,
            seed,
            epoch: None,
        }
    }

    /// The sequence at global position `pos`.
    pub fn at(&mut self, pos: usize) -> usize {
        let e = pos / self.n;
        if self.epoch.as_ref().map(|(k, _)| *k) != Some(e) {
            let mut perm: Vec<usize> = (0..self.n).collect();
            let seed = self.seed ^ (e as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            perm.shuffle(&mut rand_pcg::Pcg64Mcg::seed_from_u64(seed));
            self.epoch = Some((e, perm));
        }
        self.epoch.as_ref().expect("set above").1[pos % self.n]
    }

    /// Indices of the `b` sequences of batch `step`.
    pub fn batch(&mut self, step: u64, b: usize) -> Vec<usize> {
        (0..b).map(|i| self.at(step as usize * b + i)).collect()
    }
}
