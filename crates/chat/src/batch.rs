//! Examples -> batches: padded or packed rows, a seeded order per epoch, and a cursor that
//! resumes exactly.
//!
//! The order of an epoch is a pure function of (examples, config, epoch), so a cursor only needs
//! the epoch and the batch index; resuming recomputes the epoch's plan and continues.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::dataset::Example;
use crate::error::{ChatError, Result};
use crate::tokenizer::DEFAULT_PAD_TOKEN;

/// A batch of `rows` rows of `len` tokens, every array row-major (`[rows, len]`).
///
/// `segment_ids` is 0 at padding and `1..=k` for the k sequences of a row. Query `i` may attend
/// key `j` iff `j <= i` and `segment_ids[j] == segment_ids[i] != 0`. `position_ids` restart at 0
/// at each sequence. The first label of every sequence is -100, so after the loss's one-token
/// shift no position predicts across a boundary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub rows: usize,
    pub len: usize,
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    pub position_ids: Vec<i64>,
    pub segment_ids: Vec<i32>,
    /// `segment_ids != 0`.
    pub attention_mask: Vec<u8>,
}

impl Batch {
    /// Positions whose label is not -100 (what the loss averages over).
    pub fn supervised_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != -100).count()
    }

    /// Positions that are not padding.
    pub fn real_tokens(&self) -> usize {
        self.attention_mask.iter().filter(|&&m| m != 0).count()
    }
}

/// How examples become batches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderConfig {
    /// Rows per batch.
    pub batch_rows: usize,
    /// Packed rows are this long; no example may be longer.
    pub max_len: usize,
    /// Pack several examples per row (best-fit decreasing) instead of one padded example per row.
    pub packing: bool,
    /// Padding only: batch examples of similar length together (less padding).
    pub group_by_length: bool,
    /// Shuffle each epoch (from `seed`); off, batches follow the input order.
    pub shuffle: bool,
    pub seed: u64,
    pub epochs: usize,
    /// Padding only: round the batch length up to a multiple of this (1: the longest row).
    pub pad_to_multiple: usize,
    /// Drop an epoch's last batch when it has fewer than `batch_rows` rows.
    pub drop_last: bool,
    /// The pad token id (`<|endoftext|>`, 151643, for Qwen2).
    pub pad_id: u32,
}

/// `<|endoftext|>` in the Qwen2 vocabulary.
pub const QWEN_PAD_ID: u32 = 151_643;

impl Default for LoaderConfig {
    fn default() -> Self {
        debug_assert_eq!(DEFAULT_PAD_TOKEN, "<|endoftext|>");
        Self {
            batch_rows: 8,
            max_len: 2048,
            packing: false,
            group_by_length: false,
            shuffle: true,
            seed: 0,
            epochs: 1,
            pad_to_multiple: 1,
            drop_last: false,
            pad_id: QWEN_PAD_ID,
        }
    }
}

/// Where a `Loader` is: the next batch it will return. Save it with a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: usize,
    /// Index of the next batch within the epoch.
    pub batch: usize,
    /// Hash of the examples and the config (epochs aside), to refuse resuming on other data.
    pub fingerprint: u64,
}

/// Rows of example indices for each batch of one epoch.
type Plan = Vec<Vec<Vec<usize>>>;

/// Yields batches over `epochs` epochs. Deterministic: same examples, config and cursor, same
/// batches.
#[derive(Clone)]
pub struct Loader {
    examples: Vec<Example>,
    config: LoaderConfig,
    fingerprint: u64,
    epoch: usize,
    batch: usize,
    plan: Plan,
    plan_epoch: Option<usize>,
    batches_per_epoch: usize,
}

impl Loader {
    pub fn new(examples: Vec<Example>, config: LoaderConfig) -> Result<Self> {
        validate(&examples, &config)?;
        let fingerprint = fingerprint(&examples, &config);
        let mut loader = Self {
            examples,
            config,
            fingerprint,
            epoch: 0,
            batch: 0,
            plan: Vec::new(),
            plan_epoch: None,
            batches_per_epoch: 0,
        };
        // The batch count is the same every epoch (shuffling permutes, it never changes the
        // multiset of lengths that packing sees), so epoch 0 gives it.
        loader.ensure_plan(0);
        loader.batches_per_epoch = loader.plan.len();
        Ok(loader)
    }

    /// A loader positioned at `cursor`, which must come from a loader over the same examples
    /// and config (`epochs` may differ, to train longer).
    pub fn resume(examples: Vec<Example>, config: LoaderConfig, cursor: &Cursor) -> Result<Self> {
        let mut loader = Self::new(examples, config)?;
        if cursor.fingerprint != loader.fingerprint {
            return Err(ChatError::Cursor {
                message: format!(
                    "fingerprint {:#018x} does not match these examples and config ({:#018x})",
                    cursor.fingerprint, loader.fingerprint
                ),
            });
        }
        if cursor.batch > loader.batches_per_epoch {
            return Err(ChatError::Cursor {
                message: format!(
                    "batch {} is past the {} batches of an epoch",
                    cursor.batch, loader.batches_per_epoch
                ),
            });
        }
        loader.epoch = cursor.epoch;
        loader.batch = cursor.batch;
        Ok(loader)
    }

    /// The position of the next batch.
    pub fn cursor(&self) -> Cursor {
        Cursor {
            epoch: self.epoch,
            batch: self.batch,
            fingerprint: self.fingerprint,
        }
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.config
    }

    pub fn examples(&self) -> &[Example] {
        &self.examples
    }

    pub fn batches_per_epoch(&self) -> usize {
        self.batches_per_epoch
    }

    /// Batches over all epochs (for a learning-rate schedule).
    pub fn total_batches(&self) -> usize {
        self.batches_per_epoch * self.config.epochs
    }

    /// The next batch, or `None` after the last epoch.
    pub fn next_batch(&mut self) -> Option<Batch> {
        if self.batch >= self.batches_per_epoch {
            self.epoch += 1;
            self.batch = 0;
        }
        if self.epoch >= self.config.epochs || self.batches_per_epoch == 0 {
            return None;
        }
        self.ensure_plan(self.epoch);
        let rows = &self.plan[self.batch];
        let batch = assemble(&self.examples, rows, &self.config);
        self.batch += 1;
        Some(batch)
    }

    fn ensure_plan(&mut self, epoch: usize) {
        if self.plan_epoch != Some(epoch) {
            let lengths: Vec<usize> = self.examples.iter().map(Example::len).collect();
            self.plan = plan_epoch(&lengths, &self.config, epoch);
            self.plan_epoch = Some(epoch);
        }
    }
}

/// A summary rather than every example.
impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("examples", &self.examples.len())
            .field("config", &self.config)
            .field("cursor", &self.cursor())
            .field("batches_per_epoch", &self.batches_per_epoch)
            .finish_non_exhaustive()
    }
}

impl Iterator for Loader {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        self.next_batch()
    }
}

fn validate(examples: &[Example], config: &LoaderConfig) -> Result<()> {
    let bad = |message: &str| {
        Err(ChatError::LoaderConfig {
            message: message.to_string(),
        })
    };
    if config.batch_rows == 0 {
        return bad("batch_rows must be at least 1");
    }
    if config.max_len == 0 {
        return bad("max_len must be at least 1");
    }
    if config.pad_to_multiple == 0 {
        return bad("pad_to_multiple must be at least 1");
    }
    if let Some(e) = examples
        .iter()
        .find(|e| e.len() > config.max_len || e.is_empty())
    {
        return Err(ChatError::ExampleTooLong {
            at: e.source.clone(),
            len: e.len(),
            max_len: config.max_len,
        });
    }
    Ok(())
}

/// The batches of one epoch, as rows of example indices.
fn plan_epoch(lengths: &[usize], config: &LoaderConfig, epoch: usize) -> Plan {
    let mut rng = SplitMix64::for_epoch(config.seed, epoch);
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    if config.shuffle {
        rng.shuffle(&mut order);
    }
    let mut batches: Plan = if config.packing {
        let mut rows = best_fit_decreasing(&order, lengths, config.max_len);
        if config.shuffle {
            rng.shuffle(&mut rows);
        }
        rows.chunks(config.batch_rows).map(<[_]>::to_vec).collect()
    } else if config.group_by_length {
        group_by_length(&order, lengths, config.batch_rows, config.shuffle, &mut rng)
    } else {
        order
            .chunks(config.batch_rows)
            .map(|c| c.iter().map(|&i| vec![i]).collect())
            .collect()
    };
    if config.drop_last && batches.last().is_some_and(|b| b.len() < config.batch_rows) {
        batches.pop();
    }
    batches
}

/// Length grouping as in transformers' `LengthGroupedSampler`: sort each window of 50 batches
/// by length, cut it into batches, then shuffle the batches.
fn group_by_length(
    order: &[usize],
    lengths: &[usize],
    batch_rows: usize,
    shuffle: bool,
    rng: &mut SplitMix64,
) -> Plan {
    let mut batches: Plan = Vec::new();
    for window in order.chunks(batch_rows * 50) {
        let mut window = window.to_vec();
        // Stable, so equal lengths keep the shuffled order.
        window.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        batches.extend(
            window
                .chunks(batch_rows)
                .map(|c| c.iter().map(|&i| vec![i]).collect()),
        );
    }
    if shuffle {
        rng.shuffle(&mut batches);
    }
    batches
}

/// Best-fit decreasing: longest first, each into the fullest row that still has room.
fn best_fit_decreasing(order: &[usize], lengths: &[usize], capacity: usize) -> Vec<Vec<usize>> {
    let mut items = order.to_vec();
    items.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    let mut rows: Vec<Vec<usize>> = Vec::new();
    // Room left -> rows with that much room (a stack, so ties go to the newest row).
    let mut by_room: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for i in items {
        let len = lengths[i];
        let fit = by_room.range(len..).next().map(|(&room, _)| room);
        let row = match fit {
            Some(room) => {
                let rows_here = by_room.get_mut(&room).expect("key just found");
                let row = rows_here.pop().expect("no empty lists are kept");
                if rows_here.is_empty() {
                    by_room.remove(&room);
                }
                by_room.entry(room - len).or_default().push(row);
                row
            }
            None => {
                rows.push(Vec::new());
                by_room
                    .entry(capacity - len)
                    .or_default()
                    .push(rows.len() - 1);
                rows.len() - 1
            }
        };
        rows[row].push(i);
    }
    rows
}

/// Lays rows of examples out as a batch.
fn assemble(examples: &[Example], rows: &[Vec<usize>], config: &LoaderConfig) -> Batch {
    let len = if config.packing {
        config.max_len
    } else {
        let longest = rows
            .iter()
            .map(|r| r.iter().map(|&i| examples[i].len()).sum::<usize>())
            .max()
            .unwrap_or(0);
        longest.div_ceil(config.pad_to_multiple) * config.pad_to_multiple
    };
    let n = rows.len() * len;
    let mut batch = Batch {
        rows: rows.len(),
        len,
        input_ids: vec![config.pad_id; n],
        labels: vec![-100; n],
        position_ids: vec![0; n],
        segment_ids: vec![0; n],
        attention_mask: vec![0; n],
    };
    for (r, row) in rows.iter().enumerate() {
        let mut at = r * len;
        for (k, &i) in row.iter().enumerate() {
            let example = &examples[i];
            let span = at..at + example.len();
            batch.input_ids[span.clone()].copy_from_slice(&example.input_ids);
            batch.labels[span.clone()].copy_from_slice(&example.labels);
            // Nothing predicts a sequence's first token from inside the sequence; in a packed row
            // the previous sequence's last token would, so it must not be a target.
            batch.labels[span.start] = -100;
            for (p, pos) in batch.position_ids[span.clone()].iter_mut().enumerate() {
                *pos = p as i64;
            }
            batch.segment_ids[span.clone()].fill(k as i32 + 1);
            batch.attention_mask[span.clone()].fill(1);
            at = span.end;
        }
    }
    batch
}

/// FNV-1a over the config (epochs aside) and every token and label.
fn fingerprint(examples: &[Example], config: &LoaderConfig) -> u64 {
    let mut h = Fnv::default();
    for v in [
        config.batch_rows as u64,
        config.max_len as u64,
        u64::from(config.packing),
        u64::from(config.group_by_length),
        u64::from(config.shuffle),
        config.seed,
        config.pad_to_multiple as u64,
        u64::from(config.drop_last),
        u64::from(config.pad_id),
        examples.len() as u64,
    ] {
        h.write(v);
    }
    for e in examples {
        h.write(e.len() as u64);
        for &id in &e.input_ids {
            h.write(u64::from(id));
        }
        for &l in &e.labels {
            h.write(l as u64);
        }
    }
    h.0
}

struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn write(&mut self, v: u64) {
        for b in v.to_le_bytes() {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// SplitMix64: tiny, and fixed here rather than in a dependency, so a saved cursor means the
/// same order after any upgrade.
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn for_epoch(seed: u64, epoch: usize) -> Self {
        let mut s = SplitMix64(seed ^ (epoch as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
        s.next();
        s
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; the bias is below 2^-32 for our sizes).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next()) * n as u128) >> 64) as usize
    }

    pub(crate) fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_fit_decreasing_fills_rows_tightly() {
        let lengths = [6, 5, 4, 3, 2, 2, 1, 1];
        let order: Vec<usize> = (0..lengths.len()).collect();
        let rows = best_fit_decreasing(&order, &lengths, 8);
        let sums: Vec<usize> = rows
            .iter()
            .map(|r| r.iter().map(|&i| lengths[i]).sum())
            .collect();
        assert!(sums.iter().all(|&s| s <= 8));
        assert_eq!(sums.iter().sum::<usize>(), 24);
        assert_eq!(rows.len(), 3, "24 tokens fit 3 rows of 8: {rows:?}");
        let mut all: Vec<usize> = rows.concat();
        all.sort_unstable();
        assert_eq!(all, order);
    }

    #[test]
    fn shuffle_is_a_seeded_permutation() {
        let mut a: Vec<usize> = (0..100).collect();
        let mut b = a.clone();
        SplitMix64::for_epoch(7, 1).shuffle(&mut a);
        SplitMix64::for_epoch(7, 1).shuffle(&mut b);
        assert_eq!(a, b);
        let mut c: Vec<usize> = (0..100).collect();
        SplitMix64::for_epoch(7, 2).shuffle(&mut c);
        assert_ne!(a, c);
        a.sort_unstable();
        assert_eq!(a, (0..100).collect::<Vec<_>>());
    }
}
