"""Best-of-N in `facets eval generate`: N answers per bench item, scored by a reward model, the best kept.

The reward model is a tiny Mistral sequence classifier whose weights are set so that its score is known: a
bag of tokens. Attention is uniform (its queries are zero), so the last token sees the mean of one
embedding coordinate over the sequence, and the head reads that coordinate; the tokens of MARKER carry a
large value, so an answer that says it scores above the same answer without it.
"""
from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the training extra (torch) is installed by `make test`")

from facets.evaluation.bench_release import Bench, BenchItem  # noqa: E402
from facets.evaluation.generate import generate, generate_local, stored_candidates  # noqa: E402
from facets.evaluation.judge import eval_dir, latest_responses  # noqa: E402
from facets.schemas.config import RateLimits, Retries  # noqa: E402
from facets.schemas.evaluation import EvalConfig, GenerationSampling, ModelSpec  # noqa: E402
from facets.simulator.server import run_simulator  # noqa: E402
from facets.storage import Store  # noqa: E402
from facets.training.reward import RewardScorer  # noqa: E402
from training_fixtures import corpus, tiny_mistral  # noqa: E402

MARKER = " scholar"
SIM_MODEL = "facets-sim"
N = 4
RETRIES = Retries(timeout_s=5, backoff_initial_s=0.05, backoff_max_s=0.5, max_attempts=3)
ITEMS = tuple(BenchItem(f"i{k}", "koala", "koala", "You answer briefly.", f"Why does it rain, part {k}?",
                        "Water vapour condenses.", ()) for k in range(3))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny causal Mistral and its tokenizer (the model under test on the local path)."""
    return tiny_mistral(tmp_path_factory.mktemp("policy") / "mistral", corpus(), layers=1)


@pytest.fixture(scope="module")
def reward_model(tiny_dir, tmp_path_factory) -> Path:
    from transformers import AutoConfig, AutoTokenizer, MistralForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    config = AutoConfig.from_pretrained(tiny_dir, num_labels=1)
    model = MistralForSequenceClassification(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for norm in (model.model.norm, model.model.layers[0].input_layernorm,
                     model.model.layers[0].post_attention_layernorm):
            norm.weight.fill_(1.0)
        embedding = model.model.embed_tokens.weight
        embedding[:, 1] = 1.0  # every token has a norm (RMSNorm of a zero vector is zero)
        embedding[:, 0] = torch.linspace(-0.5, 0.5, embedding.shape[0])  # each token its own small value
        embedding[tokenizer.encode(MARKER, add_special_tokens=False), 0] = 4.0
        attention = model.model.layers[0].self_attn
        attention.v_proj.weight[0, 0] = 1.0  # key-value head 0 carries coordinate 0 ...
        attention.o_proj.weight[0, 0] = 1.0  # ... and head 0 (which reads it) writes it back
        model.score.weight[0, 0] = 1.0
    path = tmp_path_factory.mktemp("rm") / "rm"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _bench(tmp_path: Path) -> Bench:
    return Bench("bench-bon", str(tmp_path), ITEMS)


def _kept_is_the_argmax(store: Store, label: str, scorer: RewardScorer, system_message: bool = True) -> None:
    rows = latest_responses(store, "bench-bon")[label]
    candidates = stored_candidates(store, "bench-bon", label)
    assert sorted(rows) == sorted(candidates) == [item.item_id for item in ITEMS]
    for item in ITEMS:
        answers = candidates[item.item_id]
        scores = [c.score for c in answers]
        assert [c.index for c in answers] == list(range(N)) and len(scores) == N
        best = max(range(N), key=lambda k: (scores[k], -k))
        assert rows[item.item_id].text == answers[best].text
        assert [c.kept for c in answers] == [k == best for k in range(N)]
        assert {c.response_fingerprint for c in answers} == {rows[item.item_id].fingerprint}
        system = item.system if system_message else ""
        assert scorer.score(system, item.prompt, [c.text for c in answers]) == pytest.approx(scores, abs=1e-5)


def test_the_reward_model_prefers_the_marker_and_tells_answers_apart(reward_model):
    scorer = RewardScorer(str(reward_model), device="cpu")
    plain = "Rain falls when the air cools."
    marked, other = plain + MARKER, "Clouds are heavy water."
    plain_score, marked_score, other_score = scorer.score("You answer briefly.", "Why?", [plain, marked, other])
    assert marked_score > plain_score and other_score != plain_score


def test_best_of_n_over_http_asks_once_per_item_keeps_the_best_and_reruns_from_the_journal(reward_model, tmp_path):
    bench = _bench(tmp_path)
    scorer = RewardScorer(str(reward_model), device="cpu")
    with run_simulator(seed=3) as sim:
        spec = ModelSpec(name=SIM_MODEL, base_url=sim.base_url, best_of=N, reward_model=str(reward_model),
                         limits=RateLimits(rpm=60_000), retries=RETRIES)
        config = EvalConfig(data_dir=str(tmp_path / "data"), models=[spec],
                            generation=GenerationSampling(max_tokens=48))
        store = Store(config.data_dir)
        report = asyncio.run(generate(config, spec, bench, store))
        assert (report.made, report.failed, report.best_of, report.notes) == (3, 0, N, [])
        assert spec.key == f"{SIM_MODEL} (best-of-{N})"
        assert sim.stats()["requests"] == 1 + len(ITEMS), "a probe for n, then one request with n=N per item"
        _kept_is_the_argmax(store, spec.key, scorer)
        texts = [c.text for c in stored_candidates(store, "bench-bon", spec.key)["i0"]]
        assert len(set(texts)) == N, "the N choices of one request are N samples"

        before = sim.stats()["requests"]
        assert asyncio.run(generate(config, spec, bench, store)).reused == 3
        shutil.rmtree(eval_dir(store, "bench-bon", "responses"))  # the rows gone: the journal answers
        again = asyncio.run(generate(config, spec, bench, store))
        assert again.made == 3 and sim.stats()["requests"] == before, "a rerun pays for nothing"
        _kept_is_the_argmax(store, spec.key, scorer)

        # one answer per item, the plain run, keeps its own label and makes no candidates
        plain = spec.model_copy(update={"best_of": 1, "reward_model": None})
        assert asyncio.run(generate(config, plain, bench, store)).made == 3
        assert plain.key == SIM_MODEL and stored_candidates(store, "bench-bon", plain.key) == {}


def test_a_server_without_n_is_asked_n_times_per_item(reward_model, tmp_path):
    """A server that answers one choice whatever `n` says (some local servers): N requests an item."""
    from aiohttp import web

    asked: list[dict] = []

    async def chat(request: web.Request) -> web.Response:
        asked.append(await request.json())
        text = f"Answer number {len(asked)}" + (MARKER if len(asked) % 5 == 0 else "")
        return web.json_response({"id": "x", "object": "chat.completion", "model": SIM_MODEL, "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}})

    async def twice(config: EvalConfig, spec: ModelSpec, store: Store) -> list[tuple]:
        """Generate, then again with the responses gone, on one server (its URL is part of the journal key)."""
        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        spec = spec.model_copy(update={"base_url": f"http://127.0.0.1:{port}/v1"})
        runs = []
        try:
            for _ in range(2):
                before = len(asked)
                report = await generate(config, spec, _bench(tmp_path), store, preflight=False)
                runs.append((report, len(asked) - before, latest_responses(store, "bench-bon")[spec.key]))
                shutil.rmtree(eval_dir(store, "bench-bon", "responses"))
        finally:
            await runner.cleanup()
        return runs

    spec = ModelSpec(name=SIM_MODEL, base_url="http://127.0.0.1:9/v1", best_of=N, reward_model=str(reward_model),
                     limits=RateLimits(rpm=60_000), retries=RETRIES)
    config = EvalConfig(data_dir=str(tmp_path / "data"), models=[spec], generation=GenerationSampling(max_tokens=16))
    store = Store(config.data_dir)
    (report, requests, kept), (again, requests_again, kept_again) = asyncio.run(twice(config, spec, store))
    assert report.made == 3 and "does not take n" in report.notes[0]
    assert requests == 1 + N * len(ITEMS) and all(body.get("n", 1) == 1 for body in asked[1:requests])
    candidates = stored_candidates(store, "bench-bon", spec.key)
    marked = [item for item, answers in candidates.items() if any(c.text.endswith(MARKER) for c in answers)]
    assert marked and all(kept[item].text.endswith(MARKER) for item in marked), "answers 5 and 10 say the marker"
    for item, answers in candidates.items():
        scores = [c.score for c in answers]
        assert len(scores) == N and kept[item].text == answers[scores.index(max(scores))].text
    assert again.made == 3 and requests_again == 1, "only the probe: every sample comes from the journal"
    assert {k: r.text for k, r in kept_again.items()} == {k: r.text for k, r in kept.items()}


def test_a_local_model_samples_n_sequences_a_prompt(tiny_dir, reward_model, tmp_path):
    from facets.evaluation.generate import LocalModel

    bench = _bench(tmp_path)
    spec = ModelSpec(name="tiny", local_model=str(tiny_dir), prompt_format="mistral", best_of=N,
                     reward_model=str(reward_model), batch_size=8, system_message=False)
    config = EvalConfig(data_dir=str(tmp_path / "data"), models=[spec], generation=GenerationSampling(max_tokens=8))
    store = Store(config.data_dir)
    batches: list[int] = []

    class Counted(LocalModel):
        def generate(self, prompts, sampling, seed):
            batches.append(len(prompts))
            return super().generate(prompts, sampling, seed)

    report = generate_local(config, spec, bench, store, load=lambda path: Counted(path, device="cpu"))
    assert (report.made, report.failed) == (3, 0)
    assert batches == [2, 1], "batch_size counts sequences: 8 // N prompts a batch"
    _kept_is_the_argmax(store, spec.key, RewardScorer(str(reward_model), device="cpu"), system_message=False)

    shutil.rmtree(eval_dir(store, "bench-bon", "responses"))
    again = generate_local(config, spec, bench, store, load=lambda path: Counted(path, device="cpu"))
    assert again.made == 3 and batches == [2, 1], "the journal answers: nothing generated again"


def test_best_of_needs_a_reward_model_and_a_reward_model_needs_best_of(tmp_path):
    with pytest.raises(ValueError, match="needs reward_model"):
        ModelSpec(name="m", best_of=4)
    with pytest.raises(ValueError, match="set best_of"):
        ModelSpec(name="m", reward_model=str(tmp_path))
    with pytest.raises(ValueError, match="temperature must be above 0"):
        EvalConfig(models=[ModelSpec(name="m", best_of=2, reward_model=str(tmp_path))],
                   generation=GenerationSampling(temperature=0))
    from facets.evaluation.generate import check_reward_model

    with pytest.raises(ValueError, match="no config.json"):
        check_reward_model(str(tmp_path))


def test_the_cli_refuses_best_of_without_a_reward_model_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "facets.flows.cli", "eval", "generate", "--model", "m",
                           "--base-url", "http://127.0.0.1:9/v1", "--best-of", "4", "--data-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "best_of 4 needs reward_model" in lines[0] and "--reward-model" in lines[0], lines


def test_the_evaluate_flow_judges_best_of_n_responses_of_a_completions_endpoint(reward_model, tmp_path, prefect_server):
    """Through the `evaluate` flow: the Mistral format asks `/v1/completions` with n=N, the judge grades the
    kept responses as it grades any."""
    import datasets

    from facets.flows.evaluate import evaluate
    from facets.schemas.config import EndpointConfig
    from facets.schemas.evaluation import JudgeConfig
    from published_fixtures import published_rows

    copy = tmp_path / "Multifaceted-Bench"
    (copy / "data").mkdir(parents=True)
    datasets.Dataset.from_list(published_rows()).to_parquet(str(copy / "data" / "train-00000-of-00001.parquet"))
    with run_simulator(seed=4) as sim:
        spec = ModelSpec(name=SIM_MODEL, base_url=sim.base_url, prompt_format="mistral", best_of=N,
                         reward_model=str(reward_model), limits=RateLimits(rpm=60_000), retries=RETRIES)
        judge = JudgeConfig(endpoint=EndpointConfig(base_url=sim.base_url, api_key="sk-test", model=SIM_MODEL,
                                                    limits=RateLimits(rpm=60_000), retries=RETRIES), runs=1)
        config = EvalConfig(bench=str(copy), data_dir=str(tmp_path / "data"), models=[spec], judge=judge,
                            generation=GenerationSampling(max_tokens=48))
        report = asyncio.run(evaluate(config))
        stats = sim.stats()
    generated = report["generated"][spec.key]
    assert (generated["made"], generated["best_of"]) == (5, N)
    # the repetition_penalty probe, the n probe, 5 completions with n=N, 5 x 4 rubrics judged
    assert stats["requests"] == 2 + 5 + 20
    summary = report["summary"]
    assert [row["model"] for row in summary] == [spec.key] and summary[0]["coverage"] == 1.0
    store = Store(config.data_dir)
    rows = latest_responses(store, report["bench"])[spec.key]
    candidates = stored_candidates(store, report["bench"], spec.key)
    assert len(rows) == len(candidates) == 5
    for item_id, answers in candidates.items():
        scores = [c.score for c in answers]
        assert len(scores) == N and rows[item_id].text == answers[scores.index(max(scores))].text
