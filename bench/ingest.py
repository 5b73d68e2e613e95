"""Ingest throughput and memory: rows/s and peak RSS at growing input sizes.

Generates JSON-lines sources in the Nectar, UltraFeedback and DSP row layouts (text cut from the bundled
real records, realistic lengths: ~7 answers of ~1k characters per Nectar row), then ingests each size in
a fresh process so that peak RSS belongs to that run alone. Flat memory means peak RSS barely moves
while the rows grow.

Large files are judged by worker processes (by default one per CPU, at most 4), so peak RSS is reported
for the ingesting process alone and for all of its processes: the latter adds every worker's own peak,
an upper bound that counts the pages a forked worker shares with its parent once per process. The
target is judged on that bound. Times cover the `ingest()` call, with the inputs in the page cache.

    python bench/ingest.py                      # 50k and 200k rows
    python bench/ingest.py --sizes 200000 --workers 1 --keep /tmp/ingest-bench
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "data" / "sources"
# Share of each layout in the generated rows.
MIX = {"nectar": 0.4, "ultrafeedback": 0.3, "dsp": 0.3}
TARGET_ROWS_PER_S = 50_000
TARGET_PEAK_MB = 1024


def corpus() -> str:
    """Real instruction and answer text to cut generated rows from."""
    dsp = json.loads((FIXTURES / "dsp" / "domain_specific_preference.json").read_text())
    parts = [r["query"] for r in dsp] + [answer for r in dsp for answer in r["responses"].values()]
    for line in (FIXTURES / "nectar" / "data.jsonl").read_text().splitlines():
        row = json.loads(line)
        parts += [a["answer"] for a in row["answers"]]
    return " ".join(parts)


class TextCutter:
    def __init__(self, text: str, rng: random.Random):
        self.text, self.rng = text, rng

    def cut(self, median: int, cap: int = 20_000) -> str:
        length = min(cap, max(8, int(self.rng.lognormvariate(0, 0.8) * median)))
        start = self.rng.randrange(0, len(self.text) - length)
        return self.text[start : start + length]

    def prompt(self, serial: int) -> str:
        # Cut text plus the row's serial: unique, as most real prompts are.
        return f"{self.cut(220)} #{serial}"


def chat(prompt: str, answer: str) -> list[dict[str, str]]:
    return [{"content": prompt, "role": "user"}, {"content": answer, "role": "assistant"}]


def nectar_row(cut: TextCutter, serial: int, rng: random.Random) -> dict:
    prompt, turns = cut.prompt(serial), 1
    if rng.random() < 0.24:  # share of multi-turn rows in the real sample
        prompt, turns = f"{prompt}\n\nAssistant: {cut.cut(300)}\n\nHuman: {cut.cut(80)}", 2
    answers = [{"answer": cut.cut(900), "model": m, "rank": float(k + 1)}
               for k, m in enumerate(["gpt-4", "gpt-3.5-turbo", "llama-2-7b-chat", "mistral-7b-instruct",
                                      "gpt-3.5-turbo-instruct", "vicuna-33b", "wizardlm-13b"])]
    return {"prompt": f"\n\nHuman: {prompt}\n\nAssistant: ", "answers": answers, "turns": turns,
            "num_responses": 7, "source": [rng.choice(["sharegpt", "lmsys-chat-1m", "anthropic-hh", "ultrachat"])],
            "good_natured": True}


def ultrafeedback_row(cut: TextCutter, serial: int, rng: random.Random) -> dict:
    prompt = cut.prompt(serial)
    chosen, rejected = chat(prompt, cut.cut(1200)), chat(prompt, cut.cut(1000))
    return {"prompt": prompt, "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(), "chosen": chosen,
            "rejected": rejected, "messages": chosen, "score_chosen": 8.0, "score_rejected": 5.5,
            "source": rng.choice(["evol_instruct", "sharegpt", "ultrachat", "flan_v2_niv2"])}


def dsp_row(cut: TextCutter, serial: int, rng: random.Random) -> dict:
    return {"query": cut.prompt(serial),
            "responses": {k: cut.cut(800) for k in ("academy", "business", "entertainment", "literature", "normal")}}


ROW_MAKERS = {"nectar": nectar_row, "ultrafeedback": ultrafeedback_row, "dsp": dsp_row}


def generate(directory: Path, rows: int, seed: int = 0) -> dict[str, Path]:
    """One JSONL file per layout; ~2% of prompts repeat an earlier serial (duplicates across sources)."""
    rng = random.Random(seed)
    cut = TextCutter(corpus(), rng)
    paths = {}
    for name, share in MIX.items():
        paths[name] = directory / f"{name}.jsonl"
        with open(paths[name], "wb") as out:
            for serial in range(int(rows * share)):
                repeated = serial if rng.random() > 0.02 else rng.randrange(serial + 1)
                out.write(orjson.dumps(ROW_MAKERS[name](cut, repeated, rng)) + b"\n")
    return paths


def measure(data_dir: Path, workers: int, sources: list[str]) -> dict:
    """Runs in a fresh process: ingest once, report time, rows, CPU time and peak RSS."""
    from facets.ingest.pool import default_workers, ingest

    workers = workers or default_workers()
    before = os.times()
    started = time.perf_counter()
    summary = ingest(data_dir, sources, seed=0, workers=workers)
    elapsed = time.perf_counter() - started
    after = os.times()
    rows = sum(t.read for t in summary.tallies.values())
    own_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest worker's peak
    cpu = (after.user - before.user + after.system - before.system
           + after.children_user - before.children_user + after.children_system - before.children_system)
    return {"rows": rows, "kept": summary.kept, "seconds": elapsed, "rows_per_s": rows / elapsed, "cpu_s": cpu,
            "workers": summary.workers, "own_rss_mb": own_mb,
            "peak_rss_mb": own_mb + (summary.workers * worker_mb if summary.workers > 1 else 0)}


def run_size(rows: int, workdir: Path, workers: int) -> dict:
    size_dir = workdir / f"rows-{rows}"
    size_dir.mkdir(parents=True, exist_ok=True)
    paths = generate(size_dir, rows)
    input_mb = sum(p.stat().st_size for p in paths.values()) / 2**20
    sources = [f"{name}={path}" for name, path in paths.items()]
    child = subprocess.run(
        [sys.executable, __file__, "--measure", str(size_dir / "data"), str(workers), *sources],
        check=True, capture_output=True, text=True,
    )
    result = {**json.loads(child.stdout.strip().splitlines()[-1]), "input_mb": input_mb}
    if result["rows"] != rows:  # every generated row must be read: no silently shrunk N
        raise SystemExit(f"generated {rows} rows but ingest read {result['rows']}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000])
    parser.add_argument("--workers", type=int, default=0, help="judging processes (default: one per CPU)")
    parser.add_argument("--keep", type=Path, help="generate into this directory and keep it")
    parser.add_argument("--measure", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), int(args.measure[1]), args.measure[2:])))
        return 0
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="facets-ingest-bench-"))
    try:
        results = [run_size(rows, workdir, args.workers) for rows in args.sizes]
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"{os.cpu_count()} CPUs. Own RSS: the ingesting process; peak RSS: that plus every worker's own peak")
    print(f"{'rows':>8} {'input MB':>9} {'kept':>8} {'workers':>8} {'seconds':>8} {'CPU s':>6} {'rows/s':>8} "
          f"{'own RSS MB':>11} {'peak RSS MB':>12}")
    for r in results:
        print(f"{r['rows']:>8} {r['input_mb']:>9.0f} {r['kept']:>8} {r['workers']:>8} {r['seconds']:>8.2f} "
              f"{r['cpu_s']:>6.1f} {r['rows_per_s']:>8.0f} {r['own_rss_mb']:>11.0f} {r['peak_rss_mb']:>12.0f}")
    slowest = min(r["rows_per_s"] for r in results)
    peak = max(r["peak_rss_mb"] for r in results)
    ok = slowest >= TARGET_ROWS_PER_S and peak < TARGET_PEAK_MB
    print(f"target >= {TARGET_ROWS_PER_S} rows/s and peak RSS < {TARGET_PEAK_MB} MB: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
