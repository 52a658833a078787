//! What happened to the data: counts, and every skipped or dropped chat with its file:line.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{ChatError, Result, Source};

/// What to do with a chat that cannot be used (bad JSON, unknown role, template error, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SkipPolicy {
    /// Stop at the first bad chat with its error.
    #[default]
    Fail,
    /// Leave it out, and record it in the report.
    Skip,
}

/// A chat left out under `SkipPolicy::Skip`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    pub at: Source,
    /// `ChatError::kind()`, e.g. `malformed_json`.
    pub reason: String,
    /// The full error message.
    pub message: String,
}

/// Counts for a dataset, filled by reading (`read_jsonl`) and tokenizing (`tokenize_chats`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataReport {
    /// Records read: non-blank lines, or chats handed in from memory.
    pub examples_read: usize,
    /// Examples produced.
    pub kept: usize,
    /// Chats left out because they were bad, with where and why.
    pub skipped: Vec<Skipped>,
    /// Examples cut to `max_len` (keeping the start).
    pub truncated: usize,
    /// Examples dropped because no supervised token was left (after truncation, usually).
    pub dropped_no_supervised: Vec<Source>,
    /// Tokens in the kept examples.
    pub tokens: usize,
    /// Supervised tokens (label != -100, position 0 excepted) in the kept examples.
    pub supervised_tokens: usize,
    /// Whitespace-only lines, which are not records.
    pub blank_lines: usize,
}

impl DataReport {
    /// Skips counted by reason (`malformed_json: 2`, ...).
    pub fn skipped_by_reason(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for s in &self.skipped {
            *counts.entry(s.reason.clone()).or_insert(0) += 1;
        }
        counts
    }

    /// Applies the policy to a bad chat: `Fail` returns the error, `Skip` records it.
    pub(crate) fn skip_or_fail(&mut self, policy: SkipPolicy, error: ChatError) -> Result<()> {
        match policy {
            SkipPolicy::Fail => Err(error),
            SkipPolicy::Skip => {
                self.skipped.push(Skipped {
                    at: error.source_location().cloned().unwrap_or_default(),
                    reason: error.kind().to_string(),
                    message: error.to_string(),
                });
                Ok(())
            }
        }
    }
}

impl fmt::Display for DataReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "examples read:        {}", self.examples_read)?;
        writeln!(f, "examples kept:        {}", self.kept)?;
        writeln!(f, "skipped:              {}", self.skipped.len())?;
        for (reason, n) in self.skipped_by_reason() {
            writeln!(f, "  {reason}: {n}")?;
        }
        for s in &self.skipped {
            writeln!(f, "  - {}", s.message)?;
        }
        writeln!(f, "truncated:            {}", self.truncated)?;
        writeln!(
            f,
            "dropped (no supervised token after truncation): {}",
            self.dropped_no_supervised.len()
        )?;
        for at in &self.dropped_no_supervised {
            writeln!(f, "  - {at}")?;
        }
        writeln!(f, "tokens:               {}", self.tokens)?;
        write!(f, "supervised tokens:    {}", self.supervised_tokens)
    }
}
