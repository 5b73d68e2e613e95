"""The reward model's stage 2: general helpfulness pairs in the RM layout (input, chosen, rejected).

The paper trains Janus-RM a second epoch on 66,000 pairs mixed 0.72 : 0.14 : 0.14 from Anthropic/hh-rlhf,
tasksource/oasst1_pairwise_rlhf_reward and openai/webgpt_comparisons. Each is read with `datasets.load_dataset`
from its hub id or from a local copy laid out as on the hub, and turned into the RM layout:
- hh-rlhf: `chosen` and `rejected` are whole dialogues ("\\n\\nHuman: ...\\n\\nAssistant: ..."); the input is the
  dialogue before the last assistant turn (the same on both sides, else the pair is left out), the answers what
  each side's last assistant turn says;
- oasst1: `prompt`, `chosen`, `rejected` as they are;
- webgpt: `question.full_text`, and the answer with the higher score chosen; ties are left out.
"""
from __future__ import annotations

from typing import Any

from facets.schemas.training import GENERAL_PAIR_SHARES

ASSISTANT = "\n\nAssistant:"


def hh_rlhf_pair(row: dict) -> dict:
    chosen_cut, rejected_cut = row["chosen"].rfind(ASSISTANT), row["rejected"].rfind(ASSISTANT)
    context = row["chosen"][:chosen_cut]
    if chosen_cut < 0 or rejected_cut < 0 or context != row["rejected"][:rejected_cut]:
        return _empty()
    return {"input": context.strip(), "chosen": row["chosen"][chosen_cut + len(ASSISTANT):].strip(),
            "rejected": row["rejected"][rejected_cut + len(ASSISTANT):].strip()}


def oasst1_pair(row: dict) -> dict:
    return {"input": row["prompt"].strip(), "chosen": row["chosen"].strip(), "rejected": row["rejected"].strip()}


def webgpt_pair(row: dict) -> dict:
    scores = (row["score_0"], row["score_1"])
    if scores[0] == scores[1]:
        return _empty()
    better = 0 if scores[0] > scores[1] else 1
    return {"input": row["question"]["full_text"].strip(), "chosen": row[f"answer_{better}"].strip(),
            "rejected": row[f"answer_{1 - better}"].strip()}


def _empty() -> dict:
    return {"input": "", "chosen": "", "rejected": ""}


PAIRS = {"hh-rlhf": hh_rlhf_pair, "oasst1": oasst1_pair, "webgpt": webgpt_pair}
HUB_IDS = {"hh-rlhf": "Anthropic/hh-rlhf", "oasst1": "tasksource/oasst1_pairwise_rlhf_reward",
           "webgpt": "openai/webgpt_comparisons"}


def load_source(name: str, location: str) -> Any:
    """One source's train split in the RM layout; pairs with an empty side are left out."""
    import datasets

    raw = datasets.load_dataset(location, split="train")
    pairs = raw.map(PAIRS[name], remove_columns=raw.column_names, desc=f"pairs of {name}")
    return pairs.filter(lambda row: bool(row["input"] and row["chosen"] and row["rejected"]
                                         and row["chosen"] != row["rejected"]))


def mix_counts(available: dict[str, int], total: int) -> dict[str, int]:
    """Rows taken from each source: its share of `total` (0.72 : 0.14 : 0.14 over the sources given,
    renormalised), never more than it has."""
    shares = {name: GENERAL_PAIR_SHARES[name] for name in available}
    whole = sum(shares.values())
    return {name: min(available[name], int(total * share / whole)) for name, share in shares.items()}


def general_pairs(locations: dict[str, str], total: int, seed: int = 0) -> Any:
    """The stage-2 mix, shuffled: a hub id or a local copy per source (hh-rlhf, oasst1, webgpt)."""
    import datasets

    sources = {name: load_source(name, location) for name, location in locations.items()}
    counts = mix_counts({name: len(rows) for name, rows in sources.items()}, total)
    parts = [rows.shuffle(seed=seed).select(range(counts[name])) for name, rows in sources.items()]
    return datasets.concatenate_datasets(parts).shuffle(seed=seed)
