"""A small release in the published layouts and a tiny Mistral with a tokenizer trained on the fly.

The release is made of real records: DSP questions, each answered in three of its domain styles
(academy, business, literature); the system message asks for that style, and the preference sets come
from the shipped seed hierarchy. Rows pass the release schemas before they are written.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from facets.schemas import to_table
from facets.schemas.release import ChatMessage, PreferencePairRow, RMRow, SFTRow
from facets.schemas.records import DIMENSIONS, Preference
from facets.release.publish import LATEST, data_file

ROOT = Path(__file__).parent
DSP = ROOT / "data/sources/dsp/domain_specific_preference.json"
SEEDS = ROOT.parent / "tasks/seed_preferences.json"
STYLES = {
    "academy": "You answer as a careful scholar: you ground each claim, define the terms you use and keep a measured tone.",
    "business": "You answer as a pragmatic consultant: you lead with what matters for a decision and keep it actionable.",
    "literature": "You answer as a writer: you favour vivid images and a flowing voice while staying true to the facts.",
}


def _first_paragraph(text: str, limit: int) -> str:
    return text.strip().split("\n\n")[0][:limit].strip()


def _preference_set(seeds: dict, k: int) -> list[Preference]:
    chosen = []
    for dimension in DIMENSIONS:
        subdimensions = sorted(seeds["dimensions"][dimension].items())
        name, preferences = subdimensions[k % len(subdimensions)]
        preference = preferences[k % len(preferences)]
        chosen.append(Preference(dimension=dimension, subdimension=name, preference=preference,
                                 description=f"Responses follow '{preference}' in {name}."))
    return chosen


def release_rows(n: int, answer_chars: int = 300, prompt_tail: str = "") -> tuple[list[SFTRow], list[PreferencePairRow]]:
    """`prompt_tail` is appended to every instruction (text that looks like a prompt format's markers, say)."""
    records = [{**r, "query": r["query"] + prompt_tail} for r in json.loads(DSP.read_text())[:n]]
    seeds = json.loads(SEEDS.read_text())
    sft, pairs = [], []
    for i, record in enumerate(records):
        answers = {style: _first_paragraph(record["responses"][style], answer_chars) for style in STYLES}
        for k, (style, system) in enumerate(STYLES.items()):
            sft.append(SFTRow(main_source="dsp", original_source=f"dsp/{style}", preference_set=_preference_set(seeds, k),
                              system=system, prompt=record["query"], output=answers[style]))
        chosen_style, rejected_style = list(STYLES)[i % 3], list(STYLES)[(i + 1) % 3]
        pairs.append(PreferencePairRow(
            main_source="dsp", original_source="dsp", system=STYLES[chosen_style], prompt=record["query"],
            chosen=[ChatMessage(role="user", content=record["query"]),
                    ChatMessage(role="assistant", content=answers[chosen_style])],
            rejected=[ChatMessage(role="user", content=record["query"]),
                      ChatMessage(role="assistant", content=answers[rejected_style])]))
    return sft, pairs


def write_release(data_dir: Path, n: int = 12, version: str = "v-fixture", answer_chars: int = 300,
                  prompt_tail: str = "") -> Path:
    """releases/<version>/{sft,small,dpo,orpo}/train-*.parquet, rm/{train,test}-*.parquet and releases/LATEST,
    as `facets build` lays them (the rm test split: every fourth pair)."""
    sft, pairs = release_rows(n, answer_chars, prompt_tail)
    release = data_dir / "releases" / version
    scored = [RMRow(input=f"{p.system}\n{p.prompt}", chosen=p.chosen[1].content, rejected=p.rejected[1].content)
              for p in pairs]
    test = set(range(0, len(scored), 4))
    subsets = {("sft", "train"): (sft, SFTRow), ("small", "train"): (sft[::3], SFTRow),
               ("dpo", "train"): (pairs, PreferencePairRow), ("orpo", "train"): (pairs, PreferencePairRow),
               ("rm", "train"): ([r for i, r in enumerate(scored) if i not in test], RMRow),
               ("rm", "test"): ([r for i, r in enumerate(scored) if i in test], RMRow)}
    for (subset, split), (rows, model) in subsets.items():
        path = release / data_file(subset, split)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(to_table(rows, model), path)
    (data_dir / "releases" / LATEST).write_text(version)
    return release


def corpus(n: int = 12) -> list[str]:
    sft, _ = release_rows(n)
    return [f"[INST] {r.system}\n{r.prompt} [/INST] {r.output}" for r in sft] + list(STYLES.values())


def tiny_mistral(model_dir: Path, texts: list[str], vocab_size: int = 600, layers: int = 2, seed: int = 0) -> Path:
    """A randomly initialised Mistral (about 0.2 M parameters) and a byte-level BPE trained on `texts`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bpe.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>")
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                           sliding_window=None, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                           tie_word_embeddings=False)
    torch.manual_seed(seed)
    MistralForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


# -- fixtures: a tiny model and a release, made once per test module -----------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_mistral(tmp_path_factory.mktemp("tiny") / "mistral", corpus())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("release") / "data"
    write_release(root)
    return root
