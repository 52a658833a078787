#!/usr/bin/env python3
"""Where the host's time goes, from `qwen-sft bench --host-profile` collapsed stacks.

    python3 xtask/peer/host_profile.py NAME.stacks[.xz] [--top 30] [--thread T] [--under FUNCTION] [--json]

Each line of the input is `thread;outermost;...;innermost count` (crates/trainer/src/
host_profile.rs). Prints the samples per thread, then for the busiest thread:
- the share of each phase of the step (the outermost frame that names one: the optimizer,
  the backward, the forward, the loss, the rest);
- the share of each crate, by the innermost frame that belongs to a crate (self time);
- the functions with the most self and inclusive samples.
`--under F` narrows all of it to the stacks through a function whose name contains F.
"""
import argparse
import collections
import json
import lzma
import re
import sys

# Phases of a training step, by a substring of a frame's name; the outermost match wins.
PHASES = [
    ("optimizer", "optim::Optimizer"),
    ("backward", "::backward"),
    ("loss", "qwen_loss::"),
    ("forward", "::forward"),
]


def strip_generics(name):
    """`a::B<C<D>>::f` -> `a::B::f`; `<a::B<T> as c::D>::f` -> `<a::B as c::D>::f`."""
    out, depth = [], 0
    for i, ch in enumerate(name):
        if ch == "<":
            # A `<` that opens a qualified path (`<T as Trait>`) starts a name: keep it.
            if depth == 0 and i == 0:
                out.append(ch)
                continue
            if depth == 0 and out[-2:] == [":", ":"]:
                del out[-2:]  # a turbofish, `f::<T>`
            depth += 1
        elif ch == ">" and depth > 0:
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return "".join(out)


def crate_of(name):
    name = name.lstrip("<&* ")
    if name.startswith("dyn "):
        name = name[4:]
    head = re.split(r"::|<| ", name, maxsplit=1)[0]
    return head or name


def read(path):
    stacks = []
    opener = lzma.open if path.endswith(".xz") else open
    for line in opener(path, "rt", encoding="utf-8"):
        line = line.rstrip("\n")
        if not line:
            continue
        stack, count = line.rsplit(" ", 1)
        frames = [strip_generics(f) for f in stack.split(";")]
        stacks.append((frames[0], frames[1:], int(count)))
    return stacks


def phase_of(frames):
    for frame in frames:
        for phase, marker in PHASES:
            if marker in frame:
                return phase
    return "other"


# Innermost frames that belong to no crate of interest: the C library, the allocator's
# internals, unnamed addresses. A sample's crate is the innermost frame outside these.
NOT_A_CRATE = {"", "core", "alloc", "std", "hashbrown", "__rust_alloc", "__rust_dealloc"}


def crate_of_sample(frames):
    for frame in reversed(frames):
        crate = crate_of(frame)
        if crate and crate not in NOT_A_CRATE and re.match(r"^[a-z_][a-z0-9_]*$", crate):
            return crate
    return crate_of(frames[-1]) if frames else "?"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("stacks")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--under", help="only the stacks through a function containing this")
    ap.add_argument("--thread", help="this thread, not the busiest")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    stacks = read(args.stacks)
    threads = collections.Counter()
    for thread, _, n in stacks:
        threads[thread] += n
    thread = args.thread or threads.most_common(1)[0][0]
    mine = [(f, n) for t, f, n in stacks if t == thread]
    if args.under:
        cut = []
        for frames, n in mine:
            at = next((i for i, f in enumerate(frames) if args.under in f), None)
            if at is not None:
                cut.append((frames[at:], n))
        mine = cut
    total = sum(n for _, n in mine) or 1

    phases, crates, own, inclusive = (collections.Counter() for _ in range(4))
    for frames, n in mine:
        phases[phase_of(frames)] += n
        crates[crate_of_sample(frames)] += n
        if frames:
            own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n

    def share(counter, k):
        return [(name, n, round(100 * n / total, 1)) for name, n in counter.most_common(k)]

    report = {
        "threads": threads.most_common(),
        "thread": thread,
        "under": args.under,
        "samples": total,
        "phases": share(phases, 10),
        "crates": share(crates, 20),
        "self": share(own, args.top),
        "inclusive": share(inclusive, args.top),
    }
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        return
    print("samples per thread:", report["threads"][:8])
    print(f"thread {thread!r}{' under ' + args.under if args.under else ''}: {total} samples")
    for key in ["phases", "crates", "self", "inclusive"]:
        print(f"\n{key}:")
        for name, n, pct in report[key]:
            print(f"  {pct:5.1f}%  {n:6d}  {name[:160]}")


if __name__ == "__main__":
    main()
