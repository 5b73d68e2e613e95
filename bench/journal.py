"""Benchmark the call journal at the paper's scale (~460k calls).

    python bench/journal.py [--n 460000] [--per-segment 250] [--content-bytes 3000]

A writer process puts N entries of ~3 KB, sealing every `--per-segment` entries (at 5 s seals that
is ~50 calls/s per writer). This process then opens the journal cold, as a no-op rebuild does, and
measures open time, index memory, get/contains latency and refresh cost.
"""
from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import random
import shutil
import statistics
import tempfile
import time
import tracemalloc

import psutil

from facets.llm.journal import Journal, JournalEntry, Usage, request_key

WORDS = "the model answers \"quoted\" text with\nnewlines, unicode é and numbers 42 for each preference".split(" ")


def content(size: int, rng: random.Random) -> str:
    out, n = [], 0
    while n < size:
        out.append(rng.choice(WORDS))
        n += len(out[-1]) + 1
    return " ".join(out)


def make_entry(i: int, text: str) -> JournalEntry:
    key = request_key("http://127.0.0.1:8000/v1", "gpt-4-0125-preview",
                      [{"role": "user", "content": f"instruction {i}"}], None, {"temperature": 1.0}, None)
    return JournalEntry(key=key, model="gpt-4-0125-preview", content=text, finish_reason="stop",
                        usage=Usage(prompt_tokens=900, completion_tokens=700), latency_s=3.2)


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} µs"


def pctl(values: list[float], q: float) -> float:
    return sorted(values)[int(q * (len(values) - 1))]


def write_phase(data_dir: str, n: int, per_segment: int, size: int, out: mp.Queue) -> None:
    rng = random.Random(0)
    texts = [content(size, rng) for _ in range(64)]
    puts, seals = [], []
    with Journal(data_dir, writer_id="bench", seal_interval_s=float("inf")) as j:
        for i in range(n):
            e = make_entry(i, texts[i % len(texts)])
            t = time.perf_counter()
            j.put(e)
            puts.append(time.perf_counter() - t)
            if (i + 1) % per_segment == 0:
                t = time.perf_counter()
                j.seal()
                seals.append(time.perf_counter() - t)
    line = len(make_entry(0, texts[0]).model_dump_json()) + 1
    out.put((statistics.fmean(puts), pctl(puts, 0.5), pctl(puts, 0.99), statistics.fmean(seals), line))


def bench_request_key(rng: random.Random) -> float:
    system = content(1200, rng)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": content(600, rng)}]
    schema = {"type": "json_schema", "json_schema": {"name": "tree", "schema": {"type": "object"}}}
    t = time.perf_counter()
    for _ in range(10_000):
        request_key("http://127.0.0.1:8000/v1", "m", messages, schema, {"temperature": 1.0, "max_tokens": 2048}, None)
    return (time.perf_counter() - t) / 10_000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=460_000)
    ap.add_argument("--per-segment", type=int, default=250)
    ap.add_argument("--content-bytes", type=int, default=3000)
    ap.add_argument("--gets", type=int, default=20_000)
    args = ap.parse_args()
    data_dir = tempfile.mkdtemp(prefix="journal-bench-")
    try:
        run(args, data_dir)
    finally:
        shutil.rmtree(data_dir)


def run(args: argparse.Namespace, data_dir: str) -> None:
    print(f"N={args.n:,} entries, {args.per_segment} per segment, ~{args.content_bytes} B content")
    queue: mp.Queue = mp.get_context("fork").Queue()
    writer = mp.get_context("fork").Process(
        target=write_phase, args=(data_dir, args.n, args.per_segment, args.content_bytes, queue))
    t = time.perf_counter()
    writer.start()
    put_mean, put_p50, put_p99, seal_mean, line = queue.get()
    writer.join()
    print(f"write        {time.perf_counter() - t:.1f} s total; line {line:,} B")
    print(f"put          mean {us(put_mean)}, p50 {us(put_p50)}, p99 {us(put_p99)}")
    print(f"seal         mean {seal_mean * 1e3:.2f} ms ({args.per_segment} entries)")
    seg_dir = os.path.join(data_dir, "journal", "segments")
    names = os.listdir(seg_dir)
    size = {ext: sum(os.path.getsize(os.path.join(seg_dir, f)) for f in names if f.endswith(ext))
            for ext in (".jsonl", ".idx")}
    print(f"on disk      {len(names) // 2:,} segments, {size['.jsonl'] / 2**20:,.0f} MiB data, "
          f"{size['.idx'] / 2**20:,.1f} MiB sidecar index")

    gc.collect()
    rss = psutil.Process().memory_info().rss
    t = time.perf_counter()
    j = Journal(data_dir)
    opened = time.perf_counter() - t
    rss = psutil.Process().memory_info().rss - rss
    assert len(j) == args.n, (len(j), args.n)
    print(f"open         {opened:.2f} s (page cache warm), RSS +{rss / 2**20:.1f} MiB")

    tracemalloc.start()
    again = Journal(data_dir)
    traced = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del again
    print(f"index memory {traced / 2**20:.1f} MiB traced = {traced / args.n:.0f} B/entry")

    rng = random.Random(1)
    keys = [make_entry(rng.randrange(args.n), "").key for _ in range(args.gets)]
    gets = []
    for key in keys:
        t = time.perf_counter()
        hit = j.get(key)
        gets.append(time.perf_counter() - t)
        assert hit is not None
    print(f"get (hit)    mean {us(statistics.fmean(gets))}, p50 {us(pctl(gets, 0.5))}, p99 {us(pctl(gets, 0.99))}")
    misses = [make_entry(args.n + i, "").key for i in range(args.gets)]
    t = time.perf_counter()
    assert not any(j.get(key) for key in misses)
    print(f"get (miss)   mean {us((time.perf_counter() - t) / args.gets)}")
    t = time.perf_counter()
    assert all(key in j for key in keys)
    print(f"contains     mean {us((time.perf_counter() - t) / args.gets)}")

    t = time.perf_counter()
    j.refresh()
    print(f"refresh      {(time.perf_counter() - t) * 1e3:.1f} ms with nothing new")
    other = Journal(data_dir, writer_id="other", seal_interval_s=float("inf"))
    text = content(args.content_bytes, rng)
    for i in range(args.per_segment + 100):
        other.put(make_entry(args.n + i, text))
        if i + 1 == args.per_segment:
            other.seal()
    t = time.perf_counter()
    j.refresh()
    print(f"refresh      {(time.perf_counter() - t) * 1e3:.1f} ms picking up 1 segment + 100 live lines")
    assert len(j) == args.n + args.per_segment + 100
    other.close()
    print(f"request_key  {us(bench_request_key(rng))} (1.8 KB of messages + schema)")


if __name__ == "__main__":
    main()
