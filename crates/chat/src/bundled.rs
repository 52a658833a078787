//! The Qwen2.5 tokenizer vendored in `assets/qwen2.5/` (see `NOTICE.md` there for its origin and
//! licenses), embedded so tests and the offline demo need no download.

/// Qwen2.5's `tokenizer.json` (byte-level BPE, 151,643 tokens + 22 added tokens).
pub const TOKENIZER_JSON: &[u8] = include_bytes!("../assets/qwen2.5/tokenizer.json");

/// Qwen2.5-Instruct's `tokenizer_config.json`, with its chat template.
pub const TOKENIZER_CONFIG_JSON: &str = include_str!("../assets/qwen2.5/tokenizer_config.json");

/// The official Qwen2.5-Instruct chat template. It is also the built-in template used when a
/// model directory has none, so "no template" renders exactly like Qwen2.5.
pub const QWEN2_5_CHAT_TEMPLATE: &str =
    include_str!("../assets/qwen2.5/qwen2_5_chat_template.jinja");

/// The official Qwen2-Instruct chat template (default system prompt "You are a helpful assistant.").
pub const QWEN2_CHAT_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Origin and licenses of the vendored files.
pub const NOTICE: &str = include_str!("../assets/qwen2.5/NOTICE.md");
