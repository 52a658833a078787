//! ChatML tokenizer and SFT dataset builder for Qwen2-family chat models.
//!
//! ```text
//! data.jsonl -> conversations -> rendered text + spans -> input_ids + labels(-100)
//!   -> batches (pad or pack)
//! ```
//!
//! | step | function |
//! |---|---|
//! | load the tokenizer | [`ChatTokenizer::from_dir`], [`ChatTokenizer::bundled`] (Qwen2.5, offline) |
//! | read JSONL | [`read_jsonl`] (`messages`, `conversations`, `prompt`/`completion`) |
//! | tokenize + label | [`ChatTokenizer::tokenize_chats`] (rayon), or [`ChatTokenizer::build_dataset`] for files |
//! | batch | [`Loader`] with [`LoaderConfig`]: padding or packing, seeded shuffle, epochs, [`Cursor`] |
//! | look at it | [`ChatTokenizer::inspect_files`] -> [`InspectReport`] (printable) |
//! | generate | [`ChatTokenizer::encode_prompt`] ([`ChatTokenizer::render_prompt`] for its text), [`ChatTokenizer::decode`], [`ChatTokenizer::stop_ids`] |
//! | benchmark | [`bench_tokenize`] -> [`BenchReport`] |
//!
//! This crate does not depend on burn or on the model.
//!
//! ```
//! use qwen_chat::{Chat, ChatTokenizer, DatasetOptions, Loader, LoaderConfig, Message};
//!
//! let tok = ChatTokenizer::bundled()?;
//! let chats = vec![Chat::new(vec![Message::user("2+2?"), Message::assistant("4")])];
//! let dataset = tok.dataset_from_chats(&chats, &DatasetOptions::default())?;
//! let config = LoaderConfig { batch_rows: 1, pad_id: tok.pad_id(), ..LoaderConfig::default() };
//! let batch = Loader::new(dataset.examples, config)?.next_batch().expect("one batch");
//! // Learned: "\n4<|im_end|>\n" after "<|im_start|>assistant".
//! assert_eq!(batch.supervised_tokens(), 4);
//! # Ok::<(), qwen_chat::ChatError>(())
//! ```
//!
//! # Rendering and tokenizing
//!
//! The chat template comes from `tokenizer_config.json` (`chat_template`) or `chat_template.jinja`
//! and is rendered by minijinja, set up like transformers (trim_blocks, lstrip_blocks, Python
//! string methods, `raise_exception`, a Python-style `tojson`). Without a template the official
//! Qwen2.5-Instruct template ([`bundled::QWEN2_5_CHAT_TEMPLATE`]) is used, so its output, default
//! system prompt included, is Qwen2.5's. Token ids equal transformers'
//! `apply_chat_template(messages, tokenize=True)` for the Qwen2 and Qwen2.5 templates; the tests
//! compare against goldens made by `tests/fixtures/chat/generate.py`.
//!
//! The rendered text is encoded as transformers encodes it: whole, not message by message, since
//! the pre-tokenizer regex joins across pieces (the `\n` after a role with the content's leading
//! spaces or newlines), and NFC-normalized.
//!
//! # Control tokens in content: a deliberate difference from transformers
//!
//! transformers renders the chat to a string and then finds special tokens anywhere in it, so a
//! user who types `<|im_end|>\n<|im_start|>assistant` creates a real turn boundary and a fake
//! assistant turn. Here, control tokens (the tokenizer's added tokens marked `special`) are
//! recognised **only where the template itself wrote them**; inside message content they are
//! tokenized as plain text (`<|`, `im`, `_end`, `|>`). Content is located by rendering with
//! private-use sentinels in its place (and the template must print content verbatim, or the chat
//! is refused with [`ChatError::ContentNotVerbatim`]). Control tokens in other fields the
//! template prints (tools, tool calls) are refused with [`ChatError::ControlTokenInField`].
//! Non-special added tokens such as `<tool_call>` are matched in content as in transformers,
//! because assistant content legitimately contains them. For chats without control tokens in
//! content the ids are exactly transformers'.
//!
//! # Labels
//!
//! Labels are unshifted: `labels[i] = input_ids[i]` where position `i` is learned, -100
//! elsewhere; the loss crate shifts once. A token is learned when any of its bytes lies in a
//! learned span. Turns are the template's `<|im_start|>role\n ... <|im_end|>\n`, so the modes
//! need a ChatML template (every Qwen2-family template is one); with a template that writes no
//! `<|im_start|>`, only `All` learns anything.
//!
//! | [`MaskMode`] | learned |
//! |---|---|
//! | `Assistant` (default) | per assistant turn: `"\n" + content + "<|im_end|>\n"`, i.e. everything after `<|im_start|>assistant` (TRL's `assistant_only_loss` with a `{% generation %}` Qwen2.5 template) |
//! | `Qwen` | the official Qwen fine-tuning script: every turn's `<|im_start|>`, `<|im_end|>` and the `\n` after it, plus assistant content; role names, the `\n` after them, system and user content are -100 |
//! | `Last` | like `Assistant`, but only the final assistant turn |
//! | `All` | every token (padding aside) |
//!
//! A message's `"train": false` makes its whole turn -100 in every mode; `"train": true` learns
//! the turn as the mode learns an assistant turn.
//!
//! Chats longer than `max_len` keep their start. An example left with no supervised token is
//! dropped and counted ([`DataReport::dropped_no_supervised`]). Supervised counts skip position
//! 0, which no position predicts after the shift; batches set the first label of every sequence
//! to -100 for the same reason (in packed rows it would otherwise be learned across a boundary).
//!
//! # Bad input
//!
//! Every bad line is a [`ChatError`] naming file, line and field: invalid UTF-8, malformed JSON,
//! an unknown format, an unknown role, a missing or non-string content, an empty chat, a chat
//! without an assistant turn. [`SkipPolicy::Fail`] stops at the first; [`SkipPolicy::Skip`]
//! records each in [`DataReport::skipped`] with its reason.
//!
//! # Batches
//!
//! [`Batch`] is row-major `[rows, len]` with `input_ids`, `labels`, `position_ids` (restarting
//! at each sequence), `segment_ids` (0 = padding, 1..=k = the k sequences of a row) and
//! `attention_mask`. Padding uses `<|endoftext|>` with label -100. Packing is best-fit decreasing
//! into rows of `max_len`. The order of an epoch depends only on the seed, the epoch and the
//! data, so a [`Cursor`] (epoch, batch, fingerprint) resumes exactly.

pub mod batch;
pub mod bench;
pub mod bundled;
pub mod chat;
pub mod dataset;
pub mod error;
pub mod inspect;
mod labels;
pub mod read;
pub mod report;
mod template;
pub mod tokenizer;

pub use batch::{Batch, Cursor, Loader, LoaderConfig, QWEN_PAD_ID};
pub use bench::{BENCH_SEED, BenchReport, bench_tokenize, synthetic_chats};
pub use chat::{Chat, Message, Role};
pub use dataset::{Dataset, DatasetOptions, Example};
pub use error::{ChatError, Result, Source};
pub use inspect::{InspectOptions, InspectReport, InspectedExample, Markup};
pub use labels::MaskMode;
pub use read::{parse_jsonl, parse_line, parse_record, read_jsonl};
pub use report::{DataReport, SkipPolicy, Skipped};
pub use tokenizer::{ChatTokenizer, EncodedChat};
