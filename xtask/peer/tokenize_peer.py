#!/usr/bin/env python3
"""The transformers peer of `cargo xtask bench-tokenize`: the same chats, the same work.

    cargo xtask bench-tokenize --chats 100000 --write-corpus /tmp/chats.jsonl
    python3 xtask/peer/tokenize_peer.py /tmp/chats.jsonl

With the vendored Qwen2.5 tokenizer, every chat goes through `apply_chat_template(tokenize=True,
return_assistant_tokens_mask=True)` with the `{% generation %}` Qwen2.5 template (ids plus the
assistant mask, which is what qwen-chat's default mode computes), in one call over the whole
list, which lets the fast tokenizer batch. Prints tokens/s as JSON.
"""
import json
import pathlib
import sys
import time

from transformers import PreTrainedTokenizerFast

ROOT = pathlib.Path(__file__).resolve().parents[2]
TEMPLATE = (ROOT / "tests/fixtures/chat/qwen2_5_generation.jinja").read_text()


def main() -> None:
    chats = [json.loads(line)["messages"] for line in pathlib.Path(sys.argv[1]).read_text().splitlines()]
    tokenizer = PreTrainedTokenizerFast.from_pretrained(ROOT / "crates/chat/assets/qwen2.5")
    start = time.perf_counter()
    out = tokenizer.apply_chat_template(
        chats, chat_template=TEMPLATE, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    seconds = time.perf_counter() - start
    tokens = sum(len(ids) for ids in out["input_ids"])
    supervised = sum(sum(mask) for mask in out["assistant_masks"])
    print(json.dumps({
        "peer": "transformers apply_chat_template",
        "chats": len(chats),
        "tokens": tokens,
        "supervised_tokens": supervised,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds,
    }))


if __name__ == "__main__":
    main()
