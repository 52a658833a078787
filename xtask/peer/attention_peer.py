#!/usr/bin/env python3
"""The PyTorch peer of `qwen-sft check-attention --iterations N`: one causal attention, forward
and backward, timed the same way (three warm-up runs, then N runs between two synchronisations).

    python3 xtask/peer/attention_peer.py --heads 14 --kv-heads 2 --head-dim 64 --seq-len 2048 --batch-size 2 --iterations 20

As transformers' Qwen2 runs it by default ("sdpa"): k and v repeated to the query heads
(`repeat_kv`), then `scaled_dot_product_attention(is_causal=True)` in bf16, which picks
PyTorch's flash kernel. The loss is sum(o * G) for a random G, as in ours. Prints one JSON line.
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--iterations", type=int, default=20)
    a = p.parse_args()
    dev = torch.device("cuda")
    rep = a.heads // a.kv_heads

    def leaf(heads: int) -> torch.Tensor:
        x = torch.randn(a.batch_size, heads, a.seq_len, a.head_dim, device=dev, dtype=torch.bfloat16)
        return x.requires_grad_()

    q, k, v = leaf(a.heads), leaf(a.kv_heads), leaf(a.kv_heads)
    g = torch.randn(a.batch_size, a.heads, a.seq_len, a.head_dim, device=dev)

    def run() -> None:
        kr = k.repeat_interleave(rep, dim=1)
        vr = v.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, kr, vr, is_causal=True)
        (o.float() * g).sum().backward()
        q.grad = k.grad = v.grad = None

    for _ in range(3):  # warm-up, as ours
        run()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(a.iterations):
        run()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / a.iterations
    print(json.dumps({
        "peer": f"torch {torch.__version__} scaled_dot_product_attention (repeat_kv, is_causal)",
        "batch": a.batch_size, "heads": a.heads, "kv_heads": a.kv_heads, "seq": a.seq_len,
        "head_dim": a.head_dim, "iterations": a.iterations, "seconds": seconds,
    }))


if __name__ == "__main__":
    main()
