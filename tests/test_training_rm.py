"""The reward model (`--method rm`): TRL's RewardTrainer on the release's rm subset, its accuracy on the rm test
split, and stage 2 on general helpfulness pairs read with `datasets.load_dataset` from local copies laid out
as Anthropic/hh-rlhf, tasksource/oasst1_pairwise_rlhf_reward and openai/webgpt_comparisons are on the hub."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the training extra (torch) is installed by `make test`")

from facets.schemas.training import RECIPES, TrainConfig  # noqa: E402
from facets.training.general_pairs import general_pairs, mix_counts  # noqa: E402
from facets.training.run import load_tokenizer, train  # noqa: E402
from training_fixtures import data_dir, model_dir  # noqa: E402, F401 (fixtures)


@pytest.fixture(scope="module")
def general_copies(tmp_path_factory) -> dict[str, str]:
    """Small local copies in the three datasets' hub layouts."""
    root = tmp_path_factory.mktemp("general")
    hh = root / "hh-rlhf" / "helpful-base"
    hh.mkdir(parents=True)
    dialogue = "\n\nHuman: How do I boil an egg?\n\nAssistant: In water.\n\nHuman: For how long?\n\nAssistant:"
    rows = [{"chosen": f"{dialogue} About {i + 7} minutes for a firm yolk.", "rejected": f"{dialogue} Ask someone."}
            for i in range(30)]
    rows.append({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: other\n\nAssistant: c"})
    with gzip.open(hh / "train.jsonl.gz", "wt") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows)

    import pyarrow as pa
    import pyarrow.parquet as pq

    oasst = root / "oasst1" / "data"
    oasst.mkdir(parents=True)
    pq.write_table(pa.table({"lang": ["en"] * 10, "parent_id": [f"p{i}" for i in range(10)],
                             "prompt": [f"Name a prime above {i}." for i in range(10)],
                             "chosen": [f"{i + 1} is not always prime; try the next one." for i in range(10)],
                             "rejected": ["No."] * 10}), oasst / "train-00000-of-00001.parquet")

    webgpt = root / "webgpt"
    webgpt.mkdir()
    with (webgpt / "comparisons.jsonl").open("w") as handle:
        for i in range(10):
            scores = (1.0, -1.0) if i % 2 else (-0.5, 0.5)
            handle.write(json.dumps({
                "question": {"dataset": "eli5", "id": f"q{i}", "full_text": f"Why is the sky blue ({i})?"},
                "quotes_0": {"title": ["t"], "extract": ["e"]}, "answer_0": f"Rayleigh scattering ({i}).",
                "tokens_0": [1, 2], "score_0": scores[0],
                "quotes_1": {"title": [], "extract": []}, "answer_1": f"Because it is ({i}).",
                "tokens_1": [3], "score_1": scores[1]}) + "\n")
        handle.write(json.dumps({"question": {"dataset": "eli5", "id": "tie", "full_text": "A tie?"},
                                 "quotes_0": {"title": [], "extract": []}, "answer_0": "x", "tokens_0": [],
                                 "score_0": 0.0, "quotes_1": {"title": [], "extract": []}, "answer_1": "y",
                                 "tokens_1": [], "score_1": 0.0}) + "\n")
    return {"hh-rlhf": str(root / "hh-rlhf"), "oasst1": str(root / "oasst1"), "webgpt": str(root / "webgpt")}


def config(data_dir: Path, model_dir: Path, output: Path, **overrides) -> TrainConfig:
    values = dict(method="rm", release=str(data_dir), output_dir=str(output), base_model=str(model_dir),
                  device="cpu", max_steps=2, max_length=512, batch_size=2, global_batch_size=2, logging_steps=1,
                  precision="fp32", learning_rate=1e-3)
    return TrainConfig(**{**values, **overrides})


def test_the_reward_model_trains_on_the_rm_subset_and_reports_its_test_accuracy(data_dir, model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    result = train(config(data_dir, model_dir, tmp_path))
    assert result.steps == 2 and result.final_loss is not None
    assert result.lengths["rows"] == 9, "the rm train split (12 pairs, every fourth held out for test)"
    assert result.evaluation["split"] == "test" and result.evaluation["pairs"] == 3
    assert result.evaluation["accuracy"] in (0.0, 0.3333, 0.6667, 1.0)
    recipe = RECIPES["rm"]
    given = result.config
    assert (given["learning_rate"], given["adam_beta2"], given["warmup_steps"]) == (1e-3, 0.95, 0.03)
    assert (recipe.learning_rate, recipe.epochs, recipe.max_length, recipe.global_batch_size) == (9e-6, 1, 2048, 128)

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    assert model.config.pad_token_id != model.config.eos_token_id, "the value head reads the EOS, not padding"

    # best-of-N: N answers scored in one padded batch, each as it would score alone; the best one kept
    from facets.training.reward import RewardScorer, best_of

    scorer = RewardScorer(str(tmp_path), device="cpu")
    answers = ["Short.", "A longer answer that explains why, step by step.", "Another one, of middling length."]
    best, scores = best_of(scorer, "You are terse.", "Why is the sky blue?", answers)
    assert len(scores) == 3 and scores[best] == max(scores) and len(set(scores)) == 3
    alone = [scorer.score("You are terse.", "Why is the sky blue?", [a])[0] for a in answers]
    assert alone == pytest.approx(scores, abs=1e-5), "padding does not move a score"


def test_pairs_are_scored_on_the_paper_s_template_ending_in_eos(data_dir, model_dir):
    from facets.training.data import load_rows

    tokenizer = load_tokenizer(str(model_dir))
    rows, _ = load_rows(config(data_dir, model_dir, Path("-")).resolved(), tokenizer)
    row = rows[0]
    for side in ("chosen_ids", "rejected_ids"):
        ids = row[side]
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert ids.count(tokenizer.eos_token_id) == 1
        assert tokenizer.decode(ids[1:-1]).startswith("[INST] ") and " [/INST] " in tokenizer.decode(ids)


def test_general_pairs_load_offline_from_the_datasets_layouts_and_mix_as_the_paper(general_copies):
    mixed = general_pairs(general_copies, total=40, seed=0)
    # 0.72 / 0.14 / 0.14 of 40: 28 of hh-rlhf (30 usable), 5 of oasst1, 5 of webgpt
    assert len(mixed) == 38 and set(mixed.column_names) == {"input", "chosen", "rejected"}
    rows = mixed.to_list()
    hh = [r for r in rows if r["input"].startswith("Human:")]
    assert len(hh) == 28 and hh[0]["input"].endswith("For how long?") and hh[0]["rejected"] == "Ask someone."
    webgpt = [r for r in rows if r["input"].startswith("Why is the sky blue")]
    assert len(webgpt) == 5 and all(r["chosen"].startswith(("Rayleigh", "Because")) for r in webgpt)
    for r in webgpt:  # the higher score is chosen: odd questions favour answer 0, even ones answer 1
        number = int(r["input"].split("(")[1].split(")")[0])
        assert r["chosen"].startswith("Rayleigh" if number % 2 else "Because")
    assert not [r for r in rows if r["input"] in ("A tie?", "a")], "ties and pairs of different dialogues left out"
    assert mix_counts({"hh-rlhf": 10**6, "oasst1": 10**6, "webgpt": 10**6}, 66_000) == \
        {"hh-rlhf": 47_520, "oasst1": 9_240, "webgpt": 9_240}


def test_stage_two_trains_on_general_pairs_and_is_still_judged_on_the_release(data_dir, model_dir, general_copies,
                                                                               tmp_path):
    result = train(config(data_dir, model_dir, tmp_path, max_steps=1, general_pairs=general_copies,
                          max_general_pairs=40))
    assert result.lengths["rows"] == 38 and result.evaluation["pairs"] == 3
    with pytest.raises(ValueError, match="general_pairs takes"):
        config(data_dir, model_dir, tmp_path, general_pairs={"reddit": "x"})
