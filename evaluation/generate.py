"""Responses of a model under test to every bench item: an OpenAI-compatible endpoint or a local model.

Prompt formats (the paper's inference settings):

| format | endpoint | local transformers model |
|---|---|---|
| `openai` | chat: system and user messages | (not for local models) |
| `chat` | chat: system and user messages, the server applies the model's template; with `system_role` false, one user turn `{system}\\n{prompt}` | the tokenizer's chat template with a system role; one user turn `{system}\\n{prompt}` when the template has none |
| `mistral` | `/v1/completions` with the raw text `[INST] {system}\\n{prompt} [/INST] ` | that raw text, tokenised with BOS |

The Mistral text is the paper's inference script's: stripped inside, a space after `[/INST]`
(`facets.schemas.prompt_format`, the one function training uses too). With `system_message` off (the
paper's "no system message" arm) the item's prompt goes alone: no system turn, `[INST] {prompt} [/INST] `.
Open models (`mistral`, `chat`) are sampled with repetition_penalty 1.03 as the paper's vLLM runs; a server
that refuses the field (a 4xx to a one-token probe) is asked without it, and the run says so.

A local model sees the system message and the prompt as text: a `</s>` or `<s>` inside them is never the
special token (only BOS and the template's own markers are).

Defaults: max 1024 tokens, temperature 1.0, top_p 0.9. A response cut at max_tokens is kept (and marked
`finish_reason="length"`): it is the model's answer under the paper's budget, and the judge grades it.
Every call is journaled (a local model's generations too), so a rerun pays for nothing twice.

Best-of-N (`best_of`, with `reward_model`; the paper: best-of-64 with Janus-RM): N answers are sampled per
item, in one request with `n=N` where the server takes it (a one-request probe says; else N requests, each
journaled under its own salt), or with `num_return_sequences=N` for a local model. The reward model
(`training/reward.py`) scores them and the best (the first of equals) is the item's response; every answer
and its score is stored beside the responses in `evals/<bench>/candidates/`, so the responses keep the
judge's layout. A best-of-N response's `completion_tokens` counts all N answers (what was paid).
"""
from __future__ import annotations

import asyncio
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from facets.llm.errors import BadRequest, CallError
from facets.llm.gateway import Completion, Gateway
from facets.llm.journal import Journal, JournalEntry, request_key
from facets.llm.slots import connection_limit
from facets.llm.transport import LeanTransport, Reply
from facets.schemas import fingerprint, from_table, to_table
from facets.schemas.config import Sampling
from facets.schemas.evaluation import BestOfCandidate, EvalConfig, EvalResponse, ModelSpec
from facets.schemas.prompt_format import mistral_prompt as shared_mistral_prompt
from facets.storage import Store
from facets.evaluation.judge import eval_dir, latest_responses
from facets.evaluation.bench_release import Bench, BenchItem

STAGE = "eval_generate"
SYSTEM_SENTINEL = "facets-system-role-probe"


# -- prompt formats -------------------------------------------------------------------------------------
def mistral_prompt(system: str, prompt: str) -> str:
    """The Mistral / Janus format of the paper's inference script (the training flow's, with its trailing space)."""
    return shared_mistral_prompt(system, prompt, generation=True)


def prepended(system: str, prompt: str) -> str:
    return f"{system}\n{prompt}" if system else prompt


def endpoint_messages(spec: ModelSpec, system: str, prompt: str) -> list[dict]:
    """The chat messages sent for one item (for `mistral`, the one raw prompt the completions call sends)."""
    system = system if spec.system_message else ""
    if spec.prompt_format == "mistral":
        return [{"role": "user", "content": mistral_prompt(system, prompt)}]
    if not system:
        return [{"role": "user", "content": prompt}]
    if spec.prompt_format == "chat" and not spec.system_role:
        return [{"role": "user", "content": prepended(system, prompt)}]
    return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]


def has_system_role(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders a system message (some raise, some drop it)."""
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": SYSTEM_SENTINEL}, {"role": "user", "content": "hello"}],
            tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - templates raise their own errors for an unsupported role
        return False
    return SYSTEM_SENTINEL in text


def local_prompt_ids(tokenizer: Any, spec: ModelSpec, system: str, prompt: str) -> list[int]:
    """The token ids of `render_local`'s text, with the system message and the prompt kept as text: a
    `</s>` or `[INST]` inside them is never the special token (only BOS and a template's markers are)."""
    from facets.training.data import SLOT, TextAsText

    system = system.strip() if spec.system_message else ""
    slotted, add_special_tokens = render_local(tokenizer, spec, SLOT.format(0) if system else "", SLOT.format(1))
    return TextAsText(tokenizer).ids(slotted, [system, prompt.strip()], add_special_tokens)


def render_local(tokenizer: Any, spec: ModelSpec, system: str, prompt: str) -> tuple[str, bool]:
    """(text, add_special_tokens) for a local model: the raw Mistral text gets BOS from the tokenizer, a
    chat template's text already carries its own special tokens."""
    system = system if spec.system_message else ""
    if spec.prompt_format == "mistral":
        return mistral_prompt(system, prompt), True
    if spec.prompt_format != "chat":
        raise ValueError(f"a local model takes prompt_format mistral or chat, not {spec.prompt_format!r}")
    if not system:
        messages = [{"role": "user", "content": prompt}]
    elif spec.system_role and has_system_role(tokenizer):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    else:
        messages = [{"role": "user", "content": prepended(system, prompt)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), False


# -- the endpoint path ---------------------------------------------------------------------------------
class ModelGateway(Gateway):
    """The gateway for a model under test: a reply cut by max_tokens is the model's answer, not a failure.
    A call asking for `n` > 1 answers takes them all: its value is [(text, finish_reason)] per choice, and
    its journal entry holds every choice."""

    length_is_failure = False

    @classmethod
    def judge(cls, call, reply) -> Any:
        if call.body.get("n", 1) > 1:
            return list(zip(reply.contents, reply.finish_reasons))
        return super().judge(call, reply)

    def from_journal(self, call) -> Completion | None:
        if call.body.get("n", 1) == 1:
            return super().from_journal(call)
        entry = self.journal.get(call.key) if self.journal is not None else None
        if entry is None or entry.rejected is not None:
            return None
        choices = journaled_choices(entry)
        self.usage.journal_hits += 1
        return Completion(call.key, choices[0][0], choices, entry.usage.prompt_tokens, entry.usage.completion_tokens,
                          entry.latency_s, True)

    def record(self, call, reply, value, latency: float, source: str, key: str | None = None,
               rejected: str | None = None) -> None:
        if len(reply.contents) == 1 or self.journal is None:
            return super().record(call, reply, value, latency, source, key, rejected)
        self.journal.put(JournalEntry(
            key=key or call.key, model=call.model, content=list(reply.contents),
            finish_reason=list(reply.finish_reasons), latency_s=latency, source=source, rejected=rejected,
            usage={"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                   "cached_tokens": reply.cached_tokens}))


def journaled_choices(entry: JournalEntry) -> list[tuple[str, str]]:
    """(text, finish_reason) of each choice a journal entry holds (one, or the n of a call)."""
    texts = entry.content if isinstance(entry.content, list) else [entry.content]
    reasons = entry.finish_reason if isinstance(entry.finish_reason, list) else [entry.finish_reason or "stop"]
    return [(text, reason or "stop") for text, reason in zip(texts, reasons)]


class CompletionsTransport(LeanTransport):
    """`/v1/completions` with the text of the call's one user message as the raw prompt (the Mistral format
    for servers such as vLLM), answered in the chat reply shape the gateway reads."""

    def __init__(self, base_url: str, api_key: str, timeout_s: float, max_connections: int, max_reply_bytes: int):
        super().__init__(base_url, api_key, timeout_s, max_connections, max_reply_bytes)
        self.url = f"{self.base_url}/completions"

    async def chat(self, body: dict) -> Reply:
        request = {k: v for k, v in body.items() if k not in ("messages", "response_format")}
        request["prompt"] = "".join(m.get("content") or "" for m in body["messages"])
        payload, headers = await self.post_json(self.url, request)
        choices = payload.get("choices") or []
        if not choices:
            raise CallError("malformed_reply", "no choices in the reply", raw=str(payload)[:2000])
        usage = payload.get("usage") or {}
        return Reply(contents=[c.get("text") or "" for c in choices],
                     finish_reasons=[c.get("finish_reason") or "" for c in choices],
                     prompt_tokens=int(usage.get("prompt_tokens") or 0),
                     completion_tokens=int(usage.get("completion_tokens") or 0), headers=headers)


def response_fingerprint(item: BenchItem, spec: ModelSpec, sampling: Sampling) -> str:
    where = {"local": os.path.abspath(spec.local_model)} if spec.local_model else {"served": spec.name}
    if spec.best_of > 1:  # N is in the sampling's `n`; the judge of the N is part of the answer too
        where["reward_model"] = os.path.abspath(spec.reward_model)
    system = item.system if spec.system_message else None
    return fingerprint(STAGE, item.item_id, system, item.prompt, where, spec.prompt_format, spec.system_role,
                       sampling.request_fields())


@dataclass
class GenerateReport:
    model: str
    items: int
    reused: int = 0
    made: int = 0
    failed: int = 0
    truncated: int = 0
    repetition_penalty: float | None = None
    best_of: int = 1
    notes: list[str] = field(default_factory=list)
    usage: dict = field(default_factory=dict)


def _row(spec: ModelSpec, bench: Bench, item: BenchItem, fp: str, text: str, finish: str, prompt_tokens: int,
         completion_tokens: int) -> EvalResponse:
    return EvalResponse(item_id=item.item_id, model=spec.key, bench_version=bench.version, benchmark=item.benchmark,
                        source=item.source, prompt_format=spec.prompt_format, text=text, finish_reason=finish,
                        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, fingerprint=fp)


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "_", label).strip("_")[:48] or "model"


def _todo(config: EvalConfig, spec: ModelSpec, bench: Bench, store: Store,
          sampling: Sampling) -> tuple[list[BenchItem], dict[str, str], int]:
    items = bench.first(config.limit)
    wanted = {item.item_id: response_fingerprint(item, spec, sampling) for item in items}
    stored = latest_responses(store, bench.version, [spec.key]).get(spec.key, {})
    todo = [item for item in items if getattr(stored.get(item.item_id), "fingerprint", None) != wanted[item.item_id]]
    return todo, wanted, len(items) - len(todo)


async def _probe(gateway: Gateway, model: str, **fields: Any) -> tuple[Reply | None, str | None]:
    """A one-token request with `fields`: (its reply, None), or (None, the server's refusal). Only a refusal
    (4xx, or a 5xx saying the request is invalid) counts as an answer about `fields`; other faults are the
    run's to meet, and give (None, None)."""
    body = {"model": model, "messages": [{"role": "user", "content": "Say OK."}], "max_tokens": 1, **fields}
    try:
        return await gateway.transport.chat(body), None
    except BadRequest as exc:
        return None, " ".join(str(exc).split())[:200]
    except CallError:
        return None, None


async def takes_repetition_penalty(gateway: Gateway, model: str, penalty: float) -> str | None:
    """None when the server takes `repetition_penalty`, else its refusal."""
    _, refused = await _probe(gateway, model, temperature=0, repetition_penalty=penalty)
    return refused


async def takes_n(gateway: Gateway, model: str) -> str | None:
    """None when the server answers `n=2` with two choices, else why not."""
    reply, refused = await _probe(gateway, model, temperature=1.0, n=2)
    if refused:
        return f"refused n: {refused}"
    return None if reply is None or len(reply.contents) >= 2 else "answered n=2 with one choice"


def _all_journaled(gateway: Gateway, spec: ModelSpec, todo: list[BenchItem], sampling: Sampling,
                   salt: str | None) -> bool:
    """Whether every item's N answers are in the journal from one request each (a rerun needs no probe)."""
    return all(gateway.journal.get(gateway.prepare(endpoint_messages(spec, item.system, item.prompt), sampling,
                                                   model=spec.name, salt=salt).key) is not None for item in todo)


@dataclass
class Answers:
    """What the model answered to one item: one choice, or the N of best-of-N; tokens are the calls' totals."""

    item: BenchItem
    choices: list[tuple[str, str]]  # (text, finish_reason)
    prompt_tokens: int
    completion_tokens: int


def _finish(done: Completion, sampling: Sampling) -> str:
    return "length" if done.completion_tokens >= sampling.max_tokens else "stop"


async def _ask_each(gateway: Gateway, spec: ModelSpec, todo: list[BenchItem], sampling: Sampling, salt: str | None,
                    one_request: bool) -> list[Answers]:
    """Each item's answers: one call (with `n` = N when `one_request`), else N calls of one answer, each under
    its own salt (journaled apart). An item missing any of its N answers has none (a rerun asks again only
    for the missing ones)."""
    n = sampling.n
    samples = 1 if one_request else n
    single = sampling if one_request else sampling.model_copy(update={"n": 1})
    calls = [(item, k, gateway.prepare(endpoint_messages(spec, item.system, item.prompt), single, model=spec.name,
                                       salt=salt if samples == 1 else f"{salt or ''}/sample-{k}"))
             for item in todo for k in range(samples)]
    labels = [f"{spec.key}#{item.item_id}" + (f"#{k}" if samples > 1 else "") for item, k, _ in calls]
    done = await asyncio.gather(*(gateway.run(call, STAGE, label, 0) for (_, _, call), label in zip(calls, labels)))
    answers = []
    for at, item in enumerate(todo):
        got = done[at * samples:(at + 1) * samples]
        if any(d is None for d in got):
            continue
        if n > 1 and one_request:
            choices = got[0].value
        else:
            choices = [(d.value, _finish(d, sampling)) for d in got]
        answers.append(Answers(item, choices, max(d.prompt_tokens for d in got), sum(d.completion_tokens for d in got)))
    return answers


def _started(config: EvalConfig, spec: ModelSpec, bench: Bench, store: Store):
    """A generation run's sampling, the items it still has to answer, all it wants, and its report so far; a
    best-of run's reward model is checked here, before anything is paid for."""
    sampling = spec.sampling(config.generation)
    todo, wanted, reused = _todo(config, spec, bench, store, sampling)
    report = GenerateReport(spec.key, len(wanted), reused=reused, repetition_penalty=sampling.repetition_penalty,
                            best_of=spec.best_of)
    if todo and spec.best_of > 1:
        check_reward_model(spec.reward_model)
    return sampling, todo, wanted, report


async def generate(config: EvalConfig, spec: ModelSpec, bench: Bench, store: Store, preflight: bool = True) -> GenerateReport:
    """A response of `spec` to each bench item (the first `config.limit`), stored under evals/<bench>/responses."""
    if spec.local_model:
        return await asyncio.to_thread(generate_local, config, spec, bench, store)
    from facets.llm.preflight import check_endpoint

    sampling, todo, wanted, report = _started(config, spec, bench, store)
    if not todo:
        return report
    endpoint = spec.endpoint()
    if preflight:
        await check_endpoint(endpoint, [spec.name])
    gateway = ModelGateway(endpoint, Journal(config.data_dir))
    if spec.prompt_format == "mistral":
        await gateway.transport.close()
        key = endpoint.api_key.get_secret_value() if endpoint.api_key else "unused"
        gateway.transport = CompletionsTransport(gateway.url, key, endpoint.retries.timeout_s,
                                                 connection_limit(endpoint.limits), endpoint.max_reply_bytes)
    salt = "completions" if spec.prompt_format == "mistral" else None
    try:
        if sampling.repetition_penalty is not None:
            refused = await takes_repetition_penalty(gateway, spec.name, sampling.repetition_penalty)
            if refused:
                report.notes.append(f"the server refused repetition_penalty ({refused}); sampled without it")
                sampling = sampling.model_copy(update={"repetition_penalty": None})
                report.repetition_penalty = None
                todo, wanted, report.reused = _todo(config, spec, bench, store, sampling)
        one_request = True
        if sampling.n > 1 and not _all_journaled(gateway, spec, todo, sampling, salt) and \
                (no_n := await takes_n(gateway, spec.name)):
            one_request = False
            report.notes.append(f"the server does not take n ({no_n}); {sampling.n} requests per item")
        answers = await _ask_each(gateway, spec, todo, sampling, salt, one_request)
        failures = gateway.drain_failures()
        if failures:
            store.write_failures(failures, label="eval-generate")
        report.usage = gateway.usage.summary()
    finally:
        await gateway.aclose()
        gateway.journal.close()
    rows, candidates = await asyncio.to_thread(_responses, spec, bench, answers, wanted)
    _store(store, bench, spec, rows, candidates, report)
    return report


def _store(store: Store, bench: Bench, spec: ModelSpec, rows: list[EvalResponse], candidates: list[BestOfCandidate],
           report: GenerateReport) -> None:
    # the candidates first: a response stored is one whose N scores are stored too
    if candidates:
        store.write_table(eval_dir(store, bench.version, "candidates"), to_table(candidates, BestOfCandidate),
                          label=_slug(spec.key))
    if rows:
        store.write_table(eval_dir(store, bench.version, "responses"), to_table(rows, EvalResponse), label=_slug(spec.key))
    report.made = len(rows)
    report.failed = report.items - report.reused - len(rows)
    report.truncated = sum(1 for r in rows if r.finish_reason == "length")


# -- best-of-N: the reward model keeps one answer of N ---------------------------------------------------
def check_reward_model(path: str) -> None:
    """Refuse, in one line and before any answer is paid for, a folder that is not a reward model: a
    transformers sequence-classification model with one score (what `facets train --method rm` saves)."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"reward_model {path!r} is not a model directory (no config.json); pass the output "
                         "directory of `facets train --method rm`")
    with open(config_file) as handle:
        config = json.load(handle)
    heads = config.get("architectures") or []
    labels = len(config.get("id2label") or {}) or config.get("num_labels", 2)
    if not any(h.endswith("ForSequenceClassification") for h in heads) or labels != 1:
        raise ValueError(f"reward_model {path!r} is not a reward model (a sequence-classification model with one "
                         f"score; it is {', '.join(heads) or 'unknown'} with {labels} labels)")


def _responses(spec: ModelSpec, bench: Bench, answers: list[Answers],
               wanted: dict[str, str]) -> tuple[list[EvalResponse], list[BestOfCandidate]]:
    """The item's response from its answers: the one answer, or the reward model's best of N with all N scored."""
    if spec.best_of == 1:
        return [_row(spec, bench, a.item, wanted[a.item.item_id], *a.choices[0], a.prompt_tokens, a.completion_tokens)
                for a in answers], []
    if not answers:
        return [], []
    from facets.training.reward import RewardScorer, best_of

    scorer = RewardScorer(spec.reward_model)
    rows, candidates = [], []
    for a in answers:
        fp = wanted[a.item.item_id]
        system = a.item.system if spec.system_message else ""
        best, scores = best_of(scorer, system, a.item.prompt, [text for text, _ in a.choices])
        rows.append(_row(spec, bench, a.item, fp, *a.choices[best], a.prompt_tokens, a.completion_tokens))
        candidates += [BestOfCandidate(item_id=a.item.item_id, model=spec.key, bench_version=bench.version,
                                       response_fingerprint=fp, index=k, text=text, finish_reason=finish, score=score,
                                       kept=k == best, reward_model=os.path.abspath(spec.reward_model))
                       for k, ((text, finish), score) in enumerate(zip(a.choices, scores))]
    return rows, candidates


def stored_candidates(store: Store, bench_version: str, label: str) -> dict[str, list[BestOfCandidate]]:
    """item id -> the N scored answers of its newest best-of-N response, in sampling order."""
    files = store.parquet_files(eval_dir(store, bench_version, "candidates"))
    if not files:
        return {}
    import pyarrow.dataset as ds

    table = ds.dataset(files, format="parquet", filesystem=store.fs).to_table(filter=ds.field("model") == label)
    newest: dict[str, dict[int, BestOfCandidate]] = {}
    fingerprints: dict[str, str] = {}
    for row in sorted(from_table(table, BestOfCandidate), key=lambda r: r.created_at):
        if fingerprints.get(row.item_id) != row.response_fingerprint or row.index in newest.get(row.item_id, {}):
            newest[row.item_id] = {}  # a later run's answers replace an earlier one's
        fingerprints[row.item_id] = row.response_fingerprint
        newest[row.item_id][row.index] = row
    return {item: [by_index[k] for k in sorted(by_index)] for item, by_index in newest.items()}


# -- the local path ------------------------------------------------------------------------------------
class LocalModel:
    """A transformers causal LM from a local directory (needs the `training` extra: torch, transformers).

    Prompts are generated in batches of `batch_size`, left-padded, sampling with the run's settings; with
    `n` > 1 (best-of-N), n sequences a prompt (`num_return_sequences`).
    """

    def __init__(self, path: str, device: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype).to(self.device).eval()

    def generate(self, prompts: list[list[int]], sampling: Sampling, seed: int) -> list[tuple[str, str, int, int]]:
        """(text, finish_reason, prompt tokens, completion tokens) per sequence: `sampling.n` a prompt (its token
        ids), in the prompts' order."""
        torch, tokenizer = self.torch, self.tokenizer
        torch.manual_seed(seed)
        width = max(map(len, prompts))  # left padding: every prompt ends where generation starts
        encoded = {
            "input_ids": torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts]),
            "attention_mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts]),
        }
        encoded = {name: tensor.to(self.device) for name, tensor in encoded.items()}
        sample = sampling.temperature > 0
        with torch.no_grad():
            output = self.model.generate(**encoded, max_new_tokens=sampling.max_tokens, do_sample=sample,
                                         temperature=sampling.temperature if sample else None,
                                         top_p=sampling.top_p if sample else None, pad_token_id=tokenizer.pad_token_id,
                                         repetition_penalty=getattr(sampling, "repetition_penalty", None),
                                         num_return_sequences=sampling.n)
        width = encoded["input_ids"].shape[1]
        results = []
        for row, mask in zip(output, encoded["attention_mask"].repeat_interleave(sampling.n, dim=0)):
            new = row[width:].tolist()
            eos = tokenizer.eos_token_id
            ended = eos in new
            tokens = new[: new.index(eos)] if ended else [t for t in new if t != tokenizer.pad_token_id]
            finish = "stop" if ended or len(new) < sampling.max_tokens else "length"
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            results.append((text, finish, int(mask.sum()), len(tokens)))
        return results


def local_key(spec: ModelSpec, text: str, sampling: Sampling, seed: int) -> str:
    return request_key(f"local://{os.path.abspath(spec.local_model)}", spec.name, [{"role": "prompt", "content": text}],
                       None, sampling.request_fields(), f"local-{seed}")


def generate_local(config: EvalConfig, spec: ModelSpec, bench: Bench, store: Store,
                   load: Callable[[str], LocalModel] = LocalModel) -> GenerateReport:
    sampling, todo, wanted, report = _started(config, spec, bench, store)
    if not todo:
        return report
    journal = Journal(config.data_dir)
    model = load(spec.local_model)
    answers: list[Answers] = []
    pending: list[tuple[BenchItem, list[int], str]] = []
    for item in todo:
        text, _ = render_local(model.tokenizer, spec, item.system, item.prompt)
        key = local_key(spec, text, sampling, config.seed)
        entry = journal.get(key)
        if entry is not None:
            answers.append(Answers(item, journaled_choices(entry), entry.usage.prompt_tokens,
                                   entry.usage.completion_tokens))
        else:
            pending.append((item, local_prompt_ids(model.tokenizer, spec, item.system, item.prompt), key))
    n = sampling.n
    prompts_per_batch = max(1, spec.batch_size // n)  # batch_size counts sequences: N of them a prompt
    try:
        for start in range(0, len(pending), prompts_per_batch):
            batch = pending[start:start + prompts_per_batch]
            outputs = model.generate([ids for _, ids, _ in batch], sampling, config.seed + start)
            for at, (item, _, key) in enumerate(batch):
                sequences = outputs[at * n:(at + 1) * n]
                choices = [(text, finish) for text, finish, _, _ in sequences]
                prompt_tokens, completion_tokens = sequences[0][2], sum(s[3] for s in sequences)
                journal.put(JournalEntry(
                    key=key, model=spec.name, content=choices[0][0] if n == 1 else [t for t, _ in choices],
                    finish_reason=choices[0][1] if n == 1 else [f for _, f in choices],
                    usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}))
                answers.append(Answers(item, choices, prompt_tokens, completion_tokens))
    finally:
        journal.close()
    del model  # the reward model takes the accelerator next
    rows, candidates = _responses(spec, bench, answers, wanted)
    _store(store, bench, spec, rows, candidates, report)
    return report
