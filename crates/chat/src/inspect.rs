//! A human-readable look at what the model will learn: each chat's rendered text with the
//! supervised spans marked, and the dataset counts. `qwen-sft inspect` prints this.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::chat::Chat;
use crate::dataset::DatasetOptions;
use crate::error::{Result, Source};
use crate::labels::MaskMode;
use crate::read::read_jsonl;
use crate::report::{DataReport, SkipPolicy};
use crate::tokenizer::ChatTokenizer;

/// How supervised text is marked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Markup {
    /// `⟦learned text⟧`, for logs and files.
    #[default]
    Brackets,
    /// Learned text in green, for terminals.
    Ansi,
}

impl Markup {
    fn open(self) -> &'static str {
        match self {
            Markup::Brackets => "⟦",
            Markup::Ansi => "\x1b[32m",
        }
    }

    fn close(self) -> &'static str {
        match self {
            Markup::Brackets => "⟧",
            Markup::Ansi => "\x1b[0m",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InspectOptions {
    pub mode: MaskMode,
    pub max_len: usize,
    /// How many examples to show in full (all of them are counted).
    pub show: usize,
    pub markup: Markup,
}

impl Default for InspectOptions {
    fn default() -> Self {
        Self {
            mode: MaskMode::Assistant,
            max_len: 2048,
            show: 3,
            markup: Markup::Brackets,
        }
    }
}

/// One example as `inspect` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InspectedExample {
    pub source: Source,
    /// The rendered text, cut where truncation cuts, with supervised spans marked.
    pub marked: String,
    pub tokens: usize,
    pub supervised_tokens: usize,
    /// Tokens cut by truncation.
    pub truncated_tokens: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InspectReport {
    pub mode: MaskMode,
    pub examples: Vec<InspectedExample>,
    pub report: DataReport,
}

impl ChatTokenizer {
    /// Reads JSONL files (skipping bad lines, which the report lists) and inspects them.
    pub fn inspect_files<P: AsRef<Path>>(
        &self,
        paths: &[P],
        opts: &InspectOptions,
    ) -> Result<InspectReport> {
        let mut report = DataReport::default();
        let mut chats = Vec::new();
        for path in paths {
            chats.extend(read_jsonl(path, SkipPolicy::Skip, &mut report)?);
        }
        self.inspect_chats(&chats, opts, report)
    }

    /// Inspects chats already read; `report` carries what reading found.
    pub fn inspect_chats(
        &self,
        chats: &[Chat],
        opts: &InspectOptions,
        mut report: DataReport,
    ) -> Result<InspectReport> {
        let dataset_opts = DatasetOptions {
            mode: opts.mode,
            max_len: opts.max_len,
            policy: SkipPolicy::Skip,
        };
        self.tokenize_chats(chats, &dataset_opts, &mut report)?;
        let examples = chats
            .iter()
            .filter_map(|chat| self.inspect_one(chat, opts))
            .take(opts.show)
            .collect();
        Ok(InspectReport {
            mode: opts.mode,
            examples,
            report,
        })
    }

    /// `None` for chats that fail (they are already listed in the report as skipped).
    fn inspect_one(&self, chat: &Chat, opts: &InspectOptions) -> Option<InspectedExample> {
        chat.validate_for_training().ok()?;
        let encoded = self.encode_chat(chat, opts.mode).ok()?;
        let kept = encoded.input_ids.len().min(opts.max_len);
        let offsets = &encoded.offsets[..kept];
        let labels = &encoded.labels[..kept];
        let text_end = offsets.last().map_or(0, |o| o.1);
        let mut supervised = vec![false; text_end];
        for (&(s, e), &l) in offsets.iter().zip(labels) {
            if l != -100 {
                supervised[s..e].fill(true);
            }
        }
        let mut marked = mark(&encoded.text[..text_end], &supervised, opts.markup);
        let truncated_tokens = encoded.input_ids.len() - kept;
        if truncated_tokens > 0 {
            marked.push_str(&format!("⟨… {truncated_tokens} tokens cut at max_len⟩"));
        }
        Some(InspectedExample {
            source: chat.source.clone(),
            marked,
            tokens: kept,
            supervised_tokens: labels.iter().skip(1).filter(|&&l| l != -100).count(),
            truncated_tokens,
        })
    }
}

/// Wraps each maximal supervised stretch of `text` in the markup.
fn mark(text: &str, supervised: &[bool], markup: Markup) -> String {
    let mut out = String::with_capacity(text.len() + 64);
    let mut inside = false;
    for (i, c) in text.char_indices() {
        if supervised[i] != inside {
            out.push_str(if supervised[i] {
                markup.open()
            } else {
                markup.close()
            });
            inside = supervised[i];
        }
        out.push(c);
    }
    if inside {
        out.push_str(markup.close());
    }
    out
}

impl fmt::Display for InspectReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for e in &self.examples {
            writeln!(
                f,
                "=== {} ({} tokens, {} supervised, mode {}) ===",
                e.source, e.tokens, e.supervised_tokens, self.mode
            )?;
            writeln!(f, "{}", e.marked)?;
        }
        writeln!(f, "=== totals ===")?;
        writeln!(f, "{}", self.report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_maximal_stretches() {
        let text = "ab€d";
        let mut sup = vec![false; text.len()];
        sup[1..5].fill(true);
        assert_eq!(mark(text, &sup, Markup::Brackets), "a⟦b€⟧d");
    }
}
