"""Rows in the published Multifaceted-Bench layout, made from the Janus README's example records."""
from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).parent / "data"


def published_rows() -> list[dict]:
    """Five rows in the published layout from the two README records (sources and prompts varied)."""
    readme = json.loads((DATA / "published" / "janus_readme_b6df510_multifaceted_bench_example.json").read_text())
    old = json.loads((DATA / "published" / "janus_readme_5529fba_multifaceted_bench_example_468.json").read_text())["468"]
    flask_row = {"source": readme["source"], "preference_set": None, "system": readme["system"],
                 "prompt": readme["prompt"], "reference_answer": readme["reference_answer"], "rubrics": readme["rubric"]}
    base = {"preference_set": old["preference"], "system": old["system_prompt"], "prompt": old["user_prompt"],
            "reference_answer": old["reference_answer"], "rubrics": old["rubric"]}
    return [
        flask_row,
        {**base, "source": "self-instruct"},
        {**base, "source": "koala", "prompt": old["user_prompt"] + " Keep it under 200 words."},
        {**base, "source": "mt-bench", "prompt": "Explain " + old["user_prompt"]},
        # the same prompt again under another system message: another item
        {**base, "source": "alpaca-eval", "system": readme["system"]},
    ]
