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
"""
from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from facets.llm.errors import BadRequest, CallError
from facets.llm.gateway import Gateway
from facets.llm.journal import Journal, JournalEntry, request_key
from facets.llm.slots import connection_limit
from facets.llm.transport import LeanTransport, Reply
from facets.schemas import fingerprint, to_table
from facets.schemas.config import Sampling
from facets.schemas.evaluation import EvalConfig, EvalResponse, GenerationSampling, ModelSpec
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
    """The gateway for a model under test: a reply cut by max_tokens is the model's answer, not a failure."""

    length_is_failure = False


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


async def takes_repetition_penalty(gateway: Gateway, model: str, penalty: float) -> str | None:
    """None when the server answers a one-token request carrying `repetition_penalty`, else its refusal.
    Only a refusal (4xx, or a 5xx saying the request is invalid) counts: other faults are the run's to meet."""
    body = {"model": model, "messages": [{"role": "user", "content": "Say OK."}], "max_tokens": 1, "temperature": 0,
            "repetition_penalty": penalty}
    try:
        await gateway.transport.chat(body)
    except BadRequest as exc:
        return " ".join(str(exc).split())[:200]
    except CallError:
        pass
    return None


async def generate(config: EvalConfig, spec: ModelSpec, bench: Bench, store: Store, preflight: bool = True) -> GenerateReport:
    """A response of `spec` to each bench item (the first `config.limit`), stored under evals/<bench>/responses."""
    if spec.local_model:
        return await asyncio.to_thread(generate_local, config, spec, bench, store)
    from facets.llm.preflight import check_endpoint

    sampling = spec.sampling(config.generation)
    todo, wanted, reused = _todo(config, spec, bench, store, sampling)
    report = GenerateReport(spec.key, len(wanted), reused=reused, repetition_penalty=sampling.repetition_penalty)
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
    rows = []
    try:
        if sampling.repetition_penalty is not None:
            refused = await takes_repetition_penalty(gateway, spec.name, sampling.repetition_penalty)
            if refused:
                report.notes.append(f"the server refused repetition_penalty ({refused}); sampled without it")
                sampling = sampling.model_copy(update={"repetition_penalty": None})
                report.repetition_penalty = None
                todo, wanted, report.reused = _todo(config, spec, bench, store, sampling)
        calls = [gateway.prepare(endpoint_messages(spec, item.system, item.prompt), sampling, model=spec.name, salt=salt)
                 for item in todo]
        results = await asyncio.gather(*(gateway.run(call, STAGE, f"{spec.key}#{item.item_id}", 0)
                                         for call, item in zip(calls, todo)))
        for item, done in zip(todo, results):
            if done is None:
                continue
            finish = "length" if done.completion_tokens >= sampling.max_tokens else "stop"
            rows.append(_row(spec, bench, item, wanted[item.item_id], done.value, finish, done.prompt_tokens,
                             done.completion_tokens))
        failures = gateway.drain_failures()
        if failures:
            store.write_failures(failures, label="eval-generate")
        report.usage = gateway.usage.summary()
    finally:
        await gateway.aclose()
        gateway.journal.close()
    _store(store, bench, spec, rows, report)
    return report


def _store(store: Store, bench: Bench, spec: ModelSpec, rows: list[EvalResponse], report: GenerateReport) -> None:
    if rows:
        store.write_table(eval_dir(store, bench.version, "responses"), to_table(rows, EvalResponse), label=_slug(spec.key))
    report.made = len(rows)
    report.failed = report.items - report.reused - len(rows)
    report.truncated = sum(1 for r in rows if r.finish_reason == "length")


# -- the local path ------------------------------------------------------------------------------------
class LocalModel:
    """A transformers causal LM from a local directory (needs the `training` extra: torch, transformers).

    Prompts are generated in batches of `batch_size`, left-padded, sampling with the run's settings.
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
        """(text, finish_reason, prompt tokens, completion tokens) per prompt (its token ids)."""
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
                                         repetition_penalty=getattr(sampling, "repetition_penalty", None))
        width = encoded["input_ids"].shape[1]
        results = []
        for row, mask in zip(output, encoded["attention_mask"]):
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
    sampling = spec.sampling(config.generation)
    todo, wanted, reused = _todo(config, spec, bench, store, sampling)
    report = GenerateReport(spec.key, len(wanted), reused=reused, repetition_penalty=sampling.repetition_penalty)
    if not todo:
        return report
    journal = Journal(config.data_dir)
    model = load(spec.local_model)
    rows: list[EvalResponse] = []
    pending: list[tuple[BenchItem, list[int], str]] = []
    for item in todo:
        text, _ = render_local(model.tokenizer, spec, item.system, item.prompt)
        key = local_key(spec, text, sampling, config.seed)
        entry = journal.get(key)
        if entry is not None:
            rows.append(_row(spec, bench, item, wanted[item.item_id], entry.content, entry.finish_reason or "stop",
                             entry.usage.prompt_tokens, entry.usage.completion_tokens))
        else:
            pending.append((item, local_prompt_ids(model.tokenizer, spec, item.system, item.prompt), key))
    try:
        for start in range(0, len(pending), spec.batch_size):
            batch = pending[start:start + spec.batch_size]
            outputs = model.generate([ids for _, ids, _ in batch], sampling, config.seed + start)
            for (item, _, key), (text, finish, prompt_tokens, completion_tokens) in zip(batch, outputs):
                journal.put(JournalEntry(key=key, model=spec.name, content=text, finish_reason=finish,
                                         usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}))
                rows.append(_row(spec, bench, item, wanted[item.item_id], text, finish, prompt_tokens, completion_tokens))
    finally:
        journal.close()
    _store(store, bench, spec, rows, report)
    return report
