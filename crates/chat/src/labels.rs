//! Masking modes: which bytes of a rendered chat are learned.
//!
//! The rendered text is cut into ChatML turns at the template's own `<|im_start|>` and
//! `<|im_end|>` (never at ones inside content). Each mode then picks byte ranges per turn, and
//! a token is supervised when any of its bytes is in a picked range.

use std::ops::Range;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::chat::Message;
use crate::template::ContentSpan;

/// What the model learns from a chat. See the crate docs for the exact spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MaskMode {
    /// Each assistant turn's `"\n" + content + "<|im_end|>\n"` (TRL's `assistant_only_loss`).
    #[default]
    Assistant,
    /// The official Qwen fine-tuning script: every turn's `<|im_start|>`, `<|im_end|>` and
    /// trailing `\n`, plus assistant content.
    Qwen,
    /// Like `Assistant`, but only the final assistant turn.
    Last,
    /// Every token (padding aside).
    All,
}

impl FromStr for MaskMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "assistant" => Ok(MaskMode::Assistant),
            "qwen" => Ok(MaskMode::Qwen),
            "last" => Ok(MaskMode::Last),
            "all" => Ok(MaskMode::All),
            _ => Err(format!(
                "unknown mask mode {s:?} (expected assistant, qwen, last or all)"
            )),
        }
    }
}

impl std::fmt::Display for MaskMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MaskMode::Assistant => "assistant",
            MaskMode::Qwen => "qwen",
            MaskMode::Last => "last",
            MaskMode::All => "all",
        })
    }
}

/// What kind of control token the template wrote at a position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Control {
    ImStart,
    ImEnd,
    Other,
}

/// One ChatML turn: `<|im_start|>role\n ... <|im_end|>\n`, in byte positions of the rendered text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Turn {
    /// The `<|im_start|>` token.
    pub im_start: Range<usize>,
    /// The role name, e.g. `assistant`, right after `<|im_start|>`.
    pub role: Range<usize>,
    /// The `<|im_end|>` token; `None` for an open turn (a generation prompt).
    pub im_end: Option<Range<usize>>,
    /// One past the turn's last byte: after the `\n` that follows `<|im_end|>`, when there is one.
    pub end: usize,
    /// The messages whose content is in this turn.
    pub messages: Vec<usize>,
}

/// Cuts the rendered text into turns. `controls` are the template's own control tokens, in order.
pub(crate) fn find_turns(
    text: &str,
    controls: &[(Range<usize>, Control)],
    content: &[ContentSpan],
    messages: &[Message],
) -> Vec<Turn> {
    let in_content = |pos: usize| content.iter().any(|s| s.range.contains(&pos));
    let mut turns = Vec::new();
    for (i, (range, kind)) in controls.iter().enumerate() {
        if *kind != Control::ImStart {
            continue;
        }
        let next = controls.get(i + 1);
        // The role runs to the first newline, the next control token or the first content.
        let limit = next.map_or(text.len(), |(r, _)| r.start);
        let limit = content
            .iter()
            .map(|s| s.range.start)
            .filter(|&s| s >= range.end)
            .fold(limit, usize::min);
        let role_end = text[range.end..limit]
            .find('\n')
            .map_or(limit, |p| range.end + p);
        let im_end = next
            .filter(|(_, k)| *k == Control::ImEnd)
            .map(|(r, _)| r.clone());
        let end = match &im_end {
            Some(r) if text[r.end..].starts_with('\n') && !in_content(r.end) => r.end + 1,
            Some(r) => r.end,
            None => limit,
        };
        turns.push(Turn {
            im_start: range.clone(),
            role: range.end..role_end,
            im_end,
            end,
            messages: Vec::new(),
        });
    }
    assign_messages(&mut turns, text, content, messages);
    turns
}

/// Links each turn to its messages: those whose content lies in it. A turn without content
/// (an empty message) takes the next message if it is empty and has the turn's role; a turn with
/// neither (the default system prompt) belongs to no message.
fn assign_messages(turns: &mut [Turn], text: &str, content: &[ContentSpan], messages: &[Message]) {
    for span in content {
        if let Some(turn) = turns
            .iter_mut()
            .find(|t| t.im_start.start <= span.range.start && span.range.start < t.end)
            && !turn.messages.contains(&span.message)
        {
            turn.messages.push(span.message);
        }
    }
    let mut next = 0;
    for turn in turns.iter_mut() {
        if let Some(&last) = turn.messages.iter().max() {
            next = last + 1;
            continue;
        }
        let role = &text[turn.role.clone()];
        if let Some(m) = messages.get(next)
            && m.content.is_empty()
            && m.role.as_str() == role
        {
            turn.messages.push(next);
            next += 1;
        }
    }
}

/// The byte ranges of `text` that `mode` learns, sorted and disjoint.
pub(crate) fn supervised_ranges(
    text: &str,
    turns: &[Turn],
    messages: &[Message],
    mode: MaskMode,
) -> Vec<Range<usize>> {
    let is_assistant = |t: &Turn| &text[t.role.clone()] == "assistant";
    let last_assistant = turns.iter().rposition(is_assistant);
    let mut ranges = Vec::new();
    let mut excluded = Vec::new();
    for (i, turn) in turns.iter().enumerate() {
        let default = match mode {
            MaskMode::Assistant | MaskMode::Qwen => is_assistant(turn),
            MaskMode::Last => Some(i) == last_assistant,
            MaskMode::All => true,
        };
        let overridden = turn.messages.iter().find_map(|&m| messages[m].train);
        let trained = overridden.unwrap_or(default);
        match mode {
            // "\n" + content + "<|im_end|>\n": everything after the role name.
            MaskMode::Assistant | MaskMode::Last if trained => ranges.push(turn.role.end..turn.end),
            MaskMode::Assistant | MaskMode::Last => {}
            MaskMode::Qwen if overridden == Some(false) => {}
            MaskMode::Qwen => {
                ranges.push(turn.im_start.clone());
                let body_start = if text[turn.role.end..].starts_with('\n') {
                    turn.role.end + 1
                } else {
                    turn.role.end
                };
                let body_end = turn.im_end.as_ref().map_or(turn.end, |r| r.start);
                if trained && body_start < body_end {
                    ranges.push(body_start..body_end);
                }
                if let Some(im_end) = &turn.im_end {
                    ranges.push(im_end.start..turn.end);
                }
            }
            MaskMode::All if trained => {}
            MaskMode::All => excluded.push(turn.im_start.start..turn.end),
        }
    }
    if mode == MaskMode::All {
        // Everything, text outside any turn included, except turns marked `train: false`.
        let mut start = 0;
        for r in excluded {
            if start < r.start {
                ranges.push(start..r.start);
            }
            start = r.end;
        }
        if start < text.len() {
            ranges.push(start..text.len());
        }
    }
    ranges
}

/// Token `i` (bytes `offsets[i]`) is supervised when it overlaps a range.
pub(crate) fn label_tokens(
    ids: &[u32],
    offsets: &[(usize, usize)],
    ranges: &[Range<usize>],
) -> Vec<i64> {
    let mut labels = Vec::with_capacity(ids.len());
    let mut r = 0;
    for (&id, &(start, end)) in ids.iter().zip(offsets) {
        // A token always covers at least one byte; treat a degenerate offset as its first byte.
        let end = end.max(start + 1);
        while r < ranges.len() && ranges[r].end <= start {
            r += 1;
        }
        let hit = r < ranges.len() && ranges[r].start < end;
        labels.push(if hit { i64::from(id) } else { -100 });
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_marks_straddling_tokens() {
        let labels = label_tokens(
            &[1, 2, 3, 4],
            &[(0, 2), (2, 5), (5, 6), (6, 9)],
            &[4..6, 20..21],
        );
        assert_eq!(labels, vec![-100, 2, 3, -100]);
    }

    #[test]
    fn mode_names_round_trip() {
        for m in [
            MaskMode::Assistant,
            MaskMode::Qwen,
            MaskMode::Last,
            MaskMode::All,
        ] {
            assert_eq!(m.to_string().parse::<MaskMode>().unwrap(), m);
        }
        assert!("nope".parse::<MaskMode>().is_err());
    }
}
