"""Training on a release, on the CPU: a tiny Mistral built from a config, a tokenizer trained on the fly,
real TRL trainers, real Parquet through `datasets`. The release is written by tests/training_fixtures.py
in the published layouts (and test_build.py trains on a release the build flow itself wrote)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the training extra (torch) is installed by `make test`")

from facets.schemas.training import RECIPES, TrainConfig  # noqa: E402
from facets.training.data import RowFormatter, TrainingInputError, mistral_prompt  # noqa: E402
from facets.training.run import SUMMARY_FILE, check_inputs, load_tokenizer, resolve_device, train  # noqa: E402
from training_fixtures import corpus, data_dir, model_dir, release_rows, write_release  # noqa: E402, F401 (fixtures)


def config(data_dir: Path, model_dir: Path, output: Path, method: str = "sft", **overrides) -> TrainConfig:
    values = dict(method=method, release=str(data_dir), output_dir=str(output), base_model=str(model_dir),
                  device="cpu", max_steps=3, max_length=512, batch_size=2, global_batch_size=2, logging_steps=1,
                  warmup_steps=0, save_steps=100, precision="fp32")
    return TrainConfig(**{**values, **overrides})


def build(cfg: TrainConfig):
    """The trainer a run would use, over the same formatted, length-checked rows."""
    from facets.training.data import load_rows
    from facets.training.trainers import build_trainer

    cfg = check_inputs(cfg)
    tokenizer = load_tokenizer(cfg.base_model)
    rows, _ = load_rows(cfg, tokenizer)
    return build_trainer(cfg, rows, tokenizer, on_cpu=True), tokenizer


# -- the three methods end to end ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["sft", "dpo", "orpo"])
def test_each_method_trains_saves_and_the_model_reloads_and_generates(method, data_dir, model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = train(config(data_dir, model_dir, tmp_path / method, method))
    assert result.steps == 3
    assert result.final_loss is not None and result.final_loss == result.final_loss  # finite, not NaN
    assert result.lengths["kept"] == result.lengths["rows"] == (36 if method == "sft" else 12)
    assert result.tokens_seen > 0
    summary = json.loads((tmp_path / method / SUMMARY_FILE).read_text())
    assert summary["config"]["learning_rate"] == RECIPES[method].learning_rate, "the paper's recipe fills the rest"
    assert (tmp_path / method / "loss_curve.png").stat().st_size > 1000
    metrics = [json.loads(line) for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]

    model = AutoModelForCausalLM.from_pretrained(tmp_path / method)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / method)
    prompt = tokenizer(mistral_prompt("You are terse.", "Name a colour."), return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


def test_dpo_keeps_one_model_in_memory(data_dir, model_dir, tmp_path):
    trainer, _ = build(config(data_dir, model_dir, tmp_path, "dpo"))
    assert trainer.ref_model is None, "reference log-probs come from the policy, computed once before training"
    assert trainer.args.precompute_ref_log_probs


def test_sft_loss_falls_on_a_repeated_batch(data_dir, model_dir, tmp_path):
    # 4 rows, 4 per step: every step sees the same batch
    small = tmp_path / "small-data"
    write_release(small, n=4)
    train(config(small, model_dir, tmp_path / "out", subset="small", batch_size=4, global_batch_size=4,
                          max_steps=12, learning_rate=3e-3, lr_scheduler="constant", packing=False))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 12
    assert losses[-1] < 0.7 * losses[0], losses


def test_a_stopped_run_resumes_and_a_finished_one_is_not_trained_past_its_steps(data_dir, model_dir, tmp_path):
    def metrics() -> list[dict]:
        return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]

    # logging every 10 steps would log only step 1 of 2: a short run logs every step, the last one included
    first = train(config(data_dir, model_dir, tmp_path, max_steps=2, save_steps=1, logging_steps=10))
    assert (tmp_path / "checkpoint-2").is_dir()
    assert [m["step"] for m in metrics() if "loss" in m] == [1, 2]
    assert first.final_loss == round(metrics()[1]["loss"], 4), "the final loss is the last logged step's, rounded"

    result = train(config(data_dir, model_dir, tmp_path, max_steps=4, save_steps=1, logging_steps=10))
    assert result.steps == 4 and not result.already_trained
    logged = [m["step"] for m in metrics() if "loss" in m]
    assert logged == [1, 2, 3, 4], "the second run started at step 3, not from scratch, and logged each step"
    assert result.final_loss == round(metrics()[-2]["loss"], 4) and len(str(result.final_loss)) <= 7

    for steps in (4, 3):  # finished: the same or fewer steps train nothing more (step 5 never happens)
        again = train(config(data_dir, model_dir, tmp_path, max_steps=steps, save_steps=1, logging_steps=10))
        assert again.already_trained and again.steps == 4 and again.final_loss == result.final_loss
    assert [m["step"] for m in metrics() if "loss" in m] == [1, 2, 3, 4]
    assert not (tmp_path / "checkpoint-5").exists()
    with pytest.raises(TrainingInputError, match="another learning_rate"):
        train(config(data_dir, model_dir, tmp_path, max_steps=4, learning_rate=1e-3))


# -- what the model learns from --------------------------------------------------------------------------------

def test_rows_use_the_mistral_template_and_the_completion_carries_the_space():
    sft, pairs = release_rows(1)
    row = sft[0].model_dump()
    formatted = RowFormatter("sft", "mistral")(row)
    assert formatted == {"prompt": f"[INST] {row['system']}\n{row['prompt']} [/INST]", "completion": f" {row['output']}"}
    pair = RowFormatter("dpo", "mistral")(pairs[0].model_dump(mode="json"))
    assert pair["chosen"] == " " + pairs[0].chosen[1].content and pair["rejected"] == " " + pairs[0].rejected[1].content


def test_the_loss_mask_covers_exactly_the_response_and_its_eos(data_dir, model_dir, tmp_path):
    trainer, tokenizer = build(config(data_dir, model_dir, tmp_path, packing=True, batch_size=4, global_batch_size=4))
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch, "padding-free: one row of whole samples and their bounds"
    bounds = batch["cu_seq_lens_q"].tolist()
    assert len(bounds) > 2, "several samples were packed into the row"
    outputs = {f" {r.output}" for r in release_rows(12)[0]}
    for start, end in zip(bounds[:-1], bounds[1:]):
        ids, labels = batch["input_ids"][0, start:end], batch["labels"][0, start:end]
        trained = labels != -100
        assert batch["position_ids"][0, start] == 0
        first = int(trained.nonzero()[0])
        assert trained[first:].all() and not trained[:first].any(), "the mask is one span at the end"
        assert tokenizer.decode(ids[:first]).startswith("<s>[INST] ") and tokenizer.decode(ids[:first]).endswith(" [/INST]")
        assert ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids[first:-1]) in outputs


MARKERS_AS_TEXT = " Quote: </s> then <s> and [INST] x [/INST] </s>"


def test_a_row_s_text_never_becomes_a_special_token(model_dir):
    """`</s>`, `<s>` and `[INST]` in an instruction, a system message or a response are text: each row has
    exactly one BOS (first) and one EOS (last), and its text tokens decode back to the literal strings."""
    from transformers import AutoTokenizer

    from facets.training.data import RowTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    sft, pairs = release_rows(2, prompt_tail=MARKERS_AS_TEXT)
    row = sft[0].model_dump() | {"system": "Be terse </s>", "output": "Done. </s><s>"}
    ids = RowTokenizer("sft", "mistral", tokenizer)(row)["input_ids"]
    assert ids.count(bos) == 1 and ids[0] == bos and ids.count(eos) == 1 and ids[-1] == eos
    assert tokenizer.decode(ids[1:-1]) == f"[INST] {row['system']}\n{row['prompt']} [/INST] {row['output']}"
    assert tokenizer.decode(ids[1:-1]).count("</s>") == 4

    pair = RowTokenizer("dpo", "mistral", tokenizer)(pairs[0].model_dump(mode="json"))
    assert pair["prompt_ids"].count(bos) == 1 and eos not in pair["prompt_ids"]
    assert all(pair[side].count(eos) == 1 and pair[side][-1] == eos for side in ("chosen_ids", "rejected_ids"))
    assert tokenizer.decode(pair["prompt_ids"][1:]).endswith(f"{MARKERS_AS_TEXT} [/INST]")

    clean = sft[1].model_dump() | {"prompt": "Name a colour."}
    text = f"[INST] {clean['system']}\n{clean['prompt']} [/INST] {clean['output']}"
    assert RowTokenizer("sft", "mistral", tokenizer)(clean)["input_ids"] == tokenizer(text)["input_ids"] + [eos], \
        "a row without such strings is tokenised exactly as before"


def test_a_chat_template_s_markers_stay_special_and_the_row_s_text_does_not(model_dir):
    from transformers import AutoTokenizer

    from facets.training.data import RowTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
                               "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    row = release_rows(1, prompt_tail=MARKERS_AS_TEXT)[0][0].model_dump()
    tokenised = RowTokenizer("sft", "chat", tokenizer)(row)
    ids, mask = tokenised["input_ids"], tokenised["completion_mask"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids.count(tokenizer.eos_token_id) == 3, "one per turn"
    assert f"{MARKERS_AS_TEXT}</s><|assistant|>" in tokenizer.decode(ids)
    assert tokenizer.decode([t for t, m in zip(ids, mask) if m]) == f"{row['output']}</s>"


def test_the_trainers_train_on_the_rows_text_as_text(model_dir, tmp_path):
    """SFT, DPO and ORPO rows as the trainers hold them, from a release whose instructions quote the markers:
    (method, column, BOS and EOS it holds, whether it holds the instruction)."""
    write_release(tmp_path / "data", n=4, prompt_tail=MARKERS_AS_TEXT)
    expected = [("sft", "input_ids", 1, 1, True), ("dpo", "prompt_ids", 1, 0, True), ("dpo", "chosen_ids", 0, 1, False),
                ("orpo", "chosen_input_ids", 1, 1, True), ("orpo", "rejected_input_ids", 1, 1, True)]
    for method, column, bos, eos, quotes in expected:
        trainer, tokenizer = build(config(tmp_path / "data", model_dir, tmp_path / method, method, packing=False))
        for ids in trainer.train_dataset[column]:
            assert (ids.count(tokenizer.bos_token_id), ids.count(tokenizer.eos_token_id)) == (bos, eos), (method, column)
            assert (MARKERS_AS_TEXT in tokenizer.decode(ids)) is quotes


def test_a_local_model_s_prompt_keeps_its_text_as_text(model_dir):
    from transformers import AutoTokenizer

    from facets.schemas.evaluation import ModelSpec
    from facets.evaluation.generate import local_prompt_ids, render_local

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    spec = ModelSpec(name="m", local_model=str(model_dir), prompt_format="mistral")
    ids = local_prompt_ids(tokenizer, spec, "Be terse </s>", f"Why?{MARKERS_AS_TEXT}")
    assert ids.count(tokenizer.bos_token_id) == 1 and tokenizer.eos_token_id not in ids
    assert tokenizer.decode(ids[1:]) == render_local(tokenizer, spec, "Be terse </s>", f"Why?{MARKERS_AS_TEXT}")[0]


@pytest.mark.parametrize("attention", ["facets_varlen", "sdpa"])
def test_a_packed_sample_has_the_same_logits_as_alone(attention, data_dir, model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    import facets.training.attention  # noqa: F401 - registers facets_varlen

    trainer, _ = build(config(data_dir, model_dir, tmp_path, packing=True, batch_size=4, global_batch_size=4))
    batch = next(iter(trainer.get_train_dataloader()))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attention).eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    bounds = batch["cu_seq_lens_q"].tolist()
    with torch.no_grad():
        packed = model(**inputs, use_cache=False).logits[0]
        unbounded = model(input_ids=batch["input_ids"], use_cache=False).logits[0]  # one causal row: the control
        worst = crossed = 0.0
        for start, end in zip(bounds[:-1], bounds[1:]):
            alone = model(input_ids=batch["input_ids"][:, start:end], use_cache=False).logits[0]
            worst = max(worst, (packed[start:end] - alone).abs().max().item())
            crossed = max(crossed, (unbounded[start:end] - alone).abs().max().item())
    assert worst < 1e-5
    assert crossed > 1e-2, "without the sample bounds later samples see earlier ones: the check can fail"


def test_padded_batches_and_generation_are_exact_with_facets_varlen(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import facets.training.attention  # noqa: F401

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = corpus()[:3]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    longest = max(map(len, ids))
    padded = torch.tensor([[tokenizer.pad_token_id] * (longest - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (longest - len(x)) + [1] * len(x) for x in ids])
    models = {name: AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=name).eval()
              for name in ("sdpa", "facets_varlen")}
    with torch.no_grad():
        ours = models["facets_varlen"](padded, attention_mask=mask, use_cache=False).logits
        for i, x in enumerate(ids):
            alone = models["sdpa"](torch.tensor([x]), use_cache=False).logits[0]
            assert (ours[i, longest - len(x):] - alone).abs().max() < 1e-5
        generated = {name: m.generate(padded, attention_mask=mask, max_new_tokens=8, do_sample=False)
                     for name, m in models.items()}
    assert torch.equal(generated["sdpa"], generated["facets_varlen"])


# -- updates that really happen --------------------------------------------------------------------------------

def test_one_step_at_lr_5e_7_changes_the_weights(data_dir, model_dir, tmp_path):
    """fp32 master weights (bf16 compute) keep a 5e-7 update that bf16 weights round away."""
    trainer, _ = build(config(data_dir, model_dir, tmp_path, "dpo", precision="fp32-master", learning_rate=5e-7,
                              max_steps=1, lr_scheduler="constant"))
    assert trainer.args.bf16, "compute is bf16, as on a GPU"
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert all(p.dtype == torch.float32 for p in after.values())
    changed = sum(int((after[n] != w).sum()) for n, w in before.items())
    total = sum(w.numel() for w in before.values())
    assert changed > 0.5 * total, f"only {changed} of {total} weights moved"

    # the same Adam step (about lr per weight) on bf16 weights is lost for almost all of them
    weights = torch.cat([w.flatten() for w in before.values()]).to(torch.bfloat16)
    stepped = weights + 5e-7 * torch.sign(weights.float()).to(torch.bfloat16)
    assert (stepped != weights).float().mean() < 0.05


# -- bad input: clear errors before any model is loaded ---------------------------------------------------------

def test_a_missing_release_is_named(model_dir, tmp_path):
    with pytest.raises(TrainingInputError, match="does not exist"):
        check_inputs(config(tmp_path / "nowhere", model_dir, tmp_path / "out"))


def test_a_release_without_the_method_s_subset_is_named(model_dir, tmp_path):
    release = tmp_path / "releases" / "v1"
    (release / "sft").mkdir(parents=True)
    with pytest.raises(TrainingInputError, match="no dpo/ subset"):
        check_inputs(config(release, model_dir, tmp_path / "out", "dpo"))
    with pytest.raises(TrainingInputError, match="holds no Parquet files"):
        check_inputs(config(release, model_dir, tmp_path / "out", "sft"))


def test_an_empty_release_is_refused(model_dir, tmp_path):
    import pyarrow.parquet as pq

    from facets.schemas import to_table
    from facets.schemas.release import SFTRow

    path = tmp_path / "rel" / "sft" / "train-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(to_table([], SFTRow), path)
    with pytest.raises(TrainingInputError, match="is empty"):
        check_inputs(config(tmp_path / "rel", model_dir, tmp_path / "out"))


def test_the_wrong_layout_for_the_method_is_named(data_dir, model_dir, tmp_path):
    with pytest.raises(TrainingInputError, match="lacks output"):
        check_inputs(config(data_dir, model_dir, tmp_path, "sft").model_copy(update={"subset": "dpo"}))
    with pytest.raises(ValueError, match="dpo trains on dpo"):
        config(data_dir, model_dir, tmp_path, "dpo", subset="sft")


def test_a_base_model_path_that_does_not_exist_is_named(data_dir, tmp_path):
    with pytest.raises(TrainingInputError, match="does not exist"):
        check_inputs(config(data_dir, tmp_path / "no-model", tmp_path / "out"))


def test_a_length_below_the_longest_prompt_is_refused_and_long_rows_are_counted(data_dir, model_dir, tmp_path):
    with pytest.raises(TrainingInputError, match="below the longest prompt"):
        train(config(data_dir, model_dir, tmp_path / "a", max_length=20))
    assert not (tmp_path / "a" / "model.safetensors").exists()
    result = train(config(data_dir, model_dir, tmp_path / "b", "dpo", max_length=110, max_steps=1))
    assert 0 < result.lengths["too_long"] < result.lengths["rows"], result.lengths
    assert result.lengths["kept"] + result.lengths["too_long"] == result.lengths["rows"]


def test_no_gpu_refuses_a_real_run_unless_the_cpu_is_asked_for(data_dir, model_dir, tmp_path):
    auto = config(data_dir, model_dir, tmp_path, device="auto")
    if torch.cuda.is_available():
        assert resolve_device(auto) == "cuda"
    else:
        with pytest.raises(TrainingInputError, match="--device cpu"):
            resolve_device(auto)
    assert resolve_device(config(data_dir, model_dir, tmp_path, device="cpu")) == "cpu"


def test_importing_training_needs_no_gpu_and_no_storage():
    code = ("import sys; import facets.training.run, facets.training.data, facets.training.trainers; "
            "assert 'facets.storage' not in sys.modules, 'training imports storage'; "
            "assert 'torch' not in sys.modules, 'importing training loads torch'; "
            "import facets.flows.train; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


# -- the flow and the command line ------------------------------------------------------------------------------

BYTECODE = re.compile(r"\b(RESUME|LOAD_FAST|LOAD_CONST|LOAD_GLOBAL|RETURN_VALUE|BUILD_LIST|Disassembly of)\b")


def test_the_train_flow_logs_each_step_readably_and_publishes_the_loss_curve(prefect_server, data_dir, model_dir,
                                                                             tmp_path):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    from facets.flows.train import train as train_flow

    state = train_flow(config(data_dir, model_dir, tmp_path, max_steps=2, logging_steps=10), return_state=True)
    result = state.result()
    assert result["steps"] == 2 and Path(result["output_dir"], "model.safetensors").is_file()

    async def artifacts(key: str):
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))

    async def logs(flow_run_id) -> list[str]:
        await APILogHandler.aflush()  # logs go to the server in batches
        async with get_client() as client:
            found = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            return [log.message for log in found]

    table = asyncio.run(artifacts("train-loss"))[0]
    assert [row["step"] for row in json.loads(table.data)] == [1, 2]
    summary = asyncio.run(artifacts("train-summary"))[0]
    assert "data:image/png;base64," in summary.data and "| 2 |" in summary.data

    messages = asyncio.run(logs(state.state_details.flow_run_id))
    assert not [m for m in messages if BYTECODE.search(m)], "no disassembly from datasets' fingerprinting"
    steps = [m for m in messages if m.startswith("step ")]
    plans = [i for i, m in enumerate(messages) if m.startswith("memory plan: sft") and "per GPU" in m]
    assert plans and plans[0] < messages.index(steps[0]), "the memory plan comes before the model is loaded"
    assert [m.split(":")[0] for m in steps] == ["step 1/2", "step 2/2"], messages
    assert re.fullmatch(r"step 2/2: loss \d+\.\d{4}, lr [\d.e+-]+, grad norm [\d.e+-]+", steps[-1])
    assert any(f"final loss {result['final_loss']})" in m for m in messages) and str(result["final_loss"]) in steps[-1]
    assert len(messages) < 20, messages

    again = train_flow(config(data_dir, model_dir, tmp_path, max_steps=2), return_state=True)
    assert again.result()["already_trained"] and again.result()["final_loss"] == result["final_loss"]
    assert any("already trained" in m for m in asyncio.run(logs(again.state_details.flow_run_id)))


def test_the_reward_model_s_test_accuracy_is_published(prefect_server, data_dir, model_dir, tmp_path):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from facets.flows.train import train as train_flow

    result = train_flow(config(data_dir, model_dir, tmp_path, "rm", max_steps=1))
    assert result["evaluation"]["pairs"] == 3

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["rm-accuracy"])))

    (row,) = json.loads(asyncio.run(artifacts())[0].data)
    assert row["accuracy"] == result["evaluation"]["accuracy"] and row["split"] == "test"


def test_dpo_without_a_base_model_is_refused_in_one_line(data_dir, tmp_path):
    """It never starts silently from the base model: a real `facets train` process, before Prefect or torch."""
    command = [sys.executable, "-m", "facets.flows.cli", "train", "--method", "dpo", "--release", str(data_dir),
               "--output", str(tmp_path / "dpo"), "--device", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2, done
    assert done.stderr.startswith("facets train: ") and done.stderr.count("\n") == 1, done.stderr
    assert "--base-model" in done.stderr and "`small`" in done.stderr
    assert not (tmp_path / "dpo").exists()


def test_facets_train_runs_the_flow_and_reports_bad_flags(prefect_server, data_dir, model_dir, tmp_path, capsys):
    from facets.flows.cli import main

    common = ["--release", str(data_dir), "--base-model", str(model_dir), "--output", str(tmp_path / "orpo")]
    assert main(["train", "--method", "orpo", *common, "--device", "cpu", "--max-steps", "1", "--precision", "fp32",
                 "--max-length", "512", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "orpo done: 1 steps" in out and str(tmp_path / "orpo") in out
    summary = json.loads((tmp_path / "orpo" / SUMMARY_FILE).read_text())
    assert summary["config"]["learning_rate"] == 5e-6 and summary["config"]["beta"] == 0.1

    assert main(["train", "--method", "dpo", *common, "--device", "cpu", "--lr", "-1"]) == 2
    assert "learning_rate" in capsys.readouterr().err
    assert main(["train", "--method", "sft", *common[:2], "--output", str(tmp_path / "x"), "--base-model",
                 str(tmp_path / "missing-model"), "--device", "cpu"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--release", str(data_dir)]) == 2
    assert "missing --method, --output" in capsys.readouterr().err
