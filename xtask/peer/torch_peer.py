#!/usr/bin/env python3
"""The PyTorch + transformers peer of `qwen-sft bench`: the same shapes, timed the same way.

    python3 xtask/peer/torch_peer.py --preset 0.5b --seq-len 2048 --batch-size 8 --steps 20 --mode amp

A random-init Qwen2ForCausalLM of the preset's shapes (Qwen2.5 sizes), random token rows of
`seq_len` with the first half of every row's labels set to -100 (half supervised), AdamW
(torch's fused implementation, transformers' defaults), global-norm clipping at 1.0, and the
model's own loss (transformers shifts and ignores -100). Modes:

- amp: fp32 weights with bf16 autocast (what the Trainer's `bf16=True` does);
- bf16: the model and optimizer state in bf16;
- compile: amp plus torch.compile.

Prints one JSON line: tokens/s over the timed steps and torch's peak memory.
"""
import argparse
import json
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

PRESETS = {
    # vocab, hidden, intermediate, layers, heads, kv heads, tied
    "tiny": (151936, 64, 176, 2, 4, 2, True),
    "0.5b": (151936, 896, 4864, 24, 14, 2, True),
    "1.5b": (151936, 1536, 8960, 28, 12, 2, True),
    "7b": (152064, 3584, 18944, 28, 28, 4, False),
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="0.5b")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--mode", choices=["amp", "bf16", "compile"], default="amp")
    args = p.parse_args()

    vocab, hidden, inter, layers, heads, kv, tied = PRESETS[args.preset]
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied,
        rope_theta=1_000_000.0, max_position_embeddings=32768, use_sliding_window=False,
    )
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = Qwen2ForCausalLM(config).to(device)
    if args.mode == "bf16":
        model = model.to(torch.bfloat16)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)
    step_fn = model
    if args.mode == "compile":
        step_fn = torch.compile(model)

    b, s = args.batch_size, args.seq_len
    total = args.warmup_steps + args.steps
    gen = torch.Generator(device="cpu").manual_seed(1)
    batches = []
    for _ in range(total):
        ids = torch.randint(0, 151643, (b, s), generator=gen)
        labels = ids.clone()
        labels[:, : s // 2] = -100
        batches.append((ids.to(device), labels.to(device)))

    times, losses = [], []
    for i, (ids, labels) in enumerate(batches):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.mode in ("amp", "compile")):
            loss = step_fn(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        torch.cuda.synchronize()
        if i >= args.warmup_steps:
            times.append(time.perf_counter() - t)
        if i + 1 == args.warmup_steps:
            torch.cuda.reset_peak_memory_stats()

    elapsed = sum(times)
    supervised = b * (s - s // 2) - b  # labels[:, 1:] that are not -100 (HF shifts)
    print(json.dumps({
        "peer": "torch " + torch.__version__ + " + transformers",
        "mode": args.mode,
        "preset": args.preset,
        "parameters": params,
        "seq_len": s,
        "batch_size": b,
        "steps_timed": len(times),
        "tokens_per_second": b * s * len(times) / elapsed,
        "supervised_tokens_per_second": supervised * len(times) / elapsed,
        "step_seconds_median": sorted(times)[len(times) // 2],
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "torch_max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "torch_max_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
    }))


if __name__ == "__main__":
    main()
