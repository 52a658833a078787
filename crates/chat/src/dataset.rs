//! Chats -> `Example`s (input_ids + unshifted labels), on all cores, with truncation and counts.

use std::path::Path;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::chat::Chat;
use crate::error::{ChatError, Result, Source};
use crate::labels::MaskMode;
use crate::read::read_jsonl;
use crate::report::{DataReport, SkipPolicy};
use crate::tokenizer::ChatTokenizer;

/// One tokenized chat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    pub input_ids: Vec<u32>,
    /// Unshifted: `labels[i] = input_ids[i]` where position `i` is learned, -100 elsewhere.
    pub labels: Vec<i64>,
    pub source: Source,
    /// Whether the chat was cut to `max_len`.
    pub truncated: bool,
}

impl Example {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Supervised tokens that some position predicts. Label 0 is never a target after the
    /// one-token shift (nothing comes before it), so it does not count.
    pub fn supervised_tokens(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l != -100).count()
    }
}

/// How chats become examples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetOptions {
    pub mode: MaskMode,
    /// Longer chats are cut to this many tokens, keeping the start.
    pub max_len: usize,
    pub policy: SkipPolicy,
}

impl Default for DatasetOptions {
    fn default() -> Self {
        Self {
            mode: MaskMode::Assistant,
            max_len: 2048,
            policy: SkipPolicy::Fail,
        }
    }
}

/// Examples plus the report of how they were made.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    pub examples: Vec<Example>,
    pub report: DataReport,
}

/// What became of one chat.
enum Outcome {
    Kept(Example),
    Dropped { at: Source, truncated: bool },
    Failed(ChatError),
}

impl ChatTokenizer {
    /// Reads JSONL files and tokenizes them: the whole path from files to examples.
    pub fn build_dataset<P: AsRef<Path>>(
        &self,
        paths: &[P],
        opts: &DatasetOptions,
    ) -> Result<Dataset> {
        let mut report = DataReport::default();
        let mut chats = Vec::new();
        for path in paths {
            chats.extend(read_jsonl(path, opts.policy, &mut report)?);
        }
        let examples = self.tokenize_chats(&chats, opts, &mut report)?;
        Ok(Dataset { examples, report })
    }

    /// Tokenizes chats in memory; `report.examples_read` counts them.
    pub fn dataset_from_chats(&self, chats: &[Chat], opts: &DatasetOptions) -> Result<Dataset> {
        let mut report = DataReport {
            examples_read: chats.len(),
            ..DataReport::default()
        };
        let examples = self.tokenize_chats(chats, opts, &mut report)?;
        Ok(Dataset { examples, report })
    }

    /// Tokenizes chats on all cores, in input order. Bad chats fail or are skipped per
    /// `opts.policy`; truncated and dropped ones are counted in `report` (whose `examples_read`
    /// this leaves alone: the reader counts records).
    pub fn tokenize_chats(
        &self,
        chats: &[Chat],
        opts: &DatasetOptions,
        report: &mut DataReport,
    ) -> Result<Vec<Example>> {
        let outcomes: Vec<Outcome> = chats
            .par_iter()
            .map(|chat| self.tokenize_one(chat, opts))
            .collect();
        let mut examples = Vec::with_capacity(chats.len());
        for outcome in outcomes {
            match outcome {
                Outcome::Kept(example) => {
                    report.kept += 1;
                    report.truncated += usize::from(example.truncated);
                    report.tokens += example.len();
                    report.supervised_tokens += example.supervised_tokens();
                    examples.push(example);
                }
                Outcome::Dropped { at, truncated } => {
                    report.truncated += usize::from(truncated);
                    report.dropped_no_supervised.push(at);
                }
                Outcome::Failed(e) => report.skip_or_fail(opts.policy, e)?,
            }
        }
        Ok(examples)
    }

    fn tokenize_one(&self, chat: &Chat, opts: &DatasetOptions) -> Outcome {
        let encoded = match chat
            .validate_for_training()
            .and_then(|()| self.encode_chat(chat, opts.mode))
        {
            Ok(e) => e,
            Err(e) => return Outcome::Failed(e),
        };
        let mut example = Example {
            input_ids: encoded.input_ids,
            labels: encoded.labels,
            source: chat.source.clone(),
            truncated: false,
        };
        truncate(&mut example, opts.max_len);
        // Usually truncation is what leaves nothing to learn, but `train: false` on every
        // assistant message does too; an example without a target only costs compute.
        if example.supervised_tokens() == 0 {
            return Outcome::Dropped {
                at: example.source,
                truncated: example.truncated,
            };
        }
        Outcome::Kept(example)
    }
}

/// Cuts an example to `max_len` tokens, keeping the start.
fn truncate(example: &mut Example, max_len: usize) {
    if example.input_ids.len() > max_len {
        example.input_ids.truncate(max_len);
        example.labels.truncate(max_len);
        example.truncated = true;
    }
}
