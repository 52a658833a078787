//! ChatML tokenizer and SFT dataset builder.
