"""A release subset as TRL rows: located, checked for its layout, formatted, tokenised and filtered by length.

Training reads the release as published (docs/ARCHITECTURE.md, decision 12) and writes the prompt itself, because TRL
would drop the `system` column. Rows are tokenised here, not by TRL: TRL tokenises text with its special
tokens parsed, so an instruction quoting `</s>` or `<s>` would train on a real EOS or BOS mid-prompt.
Here the format's markers (BOS, EOS, a chat template's own tokens) are the only special tokens; a row's
instruction, system message and responses stay text. Rows longer than the configured length are dropped
and counted here, before training: TRL would otherwise cut them mid-response (and lose their EOS) or drop
them silently.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from facets.schemas.prompt_format import mistral_prompt  # the recipe's prompt, shared with evaluation
from facets.schemas.training import TrainConfig

SFT_COLUMNS = ("system", "prompt", "output")
PAIR_COLUMNS = ("system", "prompt", "chosen", "rejected")
RM_COLUMNS = ("input", "chosen", "rejected")  # input = system + "\n" + prompt, as the published RM set
LAYOUTS = {"sft": (SFT_COLUMNS, "SFT (system, prompt, output)"),
           "rm": (RM_COLUMNS, "reward-model (input, chosen, rejected)")}


class TrainingInputError(ValueError):
    """Bad input found before any model is loaded: the message says what and where."""


# -- locating and checking ------------------------------------------------------------------------
def resolve_release(path: str | os.PathLike[str]) -> Path:
    """A release folder itself, or a folder (data dir, releases/) whose LATEST names one."""
    root = Path(path)
    if not root.is_dir():
        raise TrainingInputError(f"release folder {root} does not exist")
    for pointer in (root / "LATEST", root / "releases" / "LATEST"):
        if pointer.is_file():
            version = pointer.read_text().strip()
            release = pointer.parent / version
            if not release.is_dir():
                raise TrainingInputError(f"{pointer} names {version!r}, but {release} does not exist")
            return release
    return root


def subset_files(release: Path, subset: str, split: str = "train") -> list[Path]:
    folder = release / subset
    if not folder.is_dir():
        present = sorted(p.name for p in release.iterdir() if p.is_dir()) if release.is_dir() else []
        raise TrainingInputError(
            f"{release} has no {subset}/ subset (found: {', '.join(present) or 'nothing'}); "
            "pass a release folder written by `facets build`")
    files = sorted(folder.glob(f"{split}-*.parquet"))
    if split == "train":
        files = files or sorted(p for p in folder.glob("*.parquet") if not p.name.startswith("test-"))
    if not files:
        raise TrainingInputError(f"{folder} holds no {split} Parquet files" if split != "train"
                                 else f"{folder} holds no Parquet files")
    return files


def check_layout(files: list[Path], method: str) -> int:
    """The columns the method needs, with the pair sides as chats; returns the row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    wanted, kind = LAYOUTS.get(method, (PAIR_COLUMNS, "preference (system, prompt, chosen, rejected)"))
    rows = 0
    for file in files:
        schema = pq.read_schema(file)
        missing = [c for c in wanted if c not in schema.names]
        if missing:
            raise TrainingInputError(f"{file} lacks {', '.join(missing)}: {method} needs the {kind} layout")
        if method in ("dpo", "orpo") and not pa.types.is_list(schema.field("chosen").type):
            raise TrainingInputError(f"{file}: chosen/rejected must be [user, assistant] chats, as the published DPO layout")
        rows += pq.ParquetFile(file).metadata.num_rows
    if not rows:
        raise TrainingInputError(f"{files[0].parent} is empty: no rows to train on")
    return rows


def check_base_model(base_model: str) -> None:
    """A path-like base model must exist; a hub id is left to `from_pretrained` (and its cache)."""
    looks_like_path = base_model.startswith((".", "/", "~")) or base_model.count("/") > 1
    path = Path(base_model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise TrainingInputError(f"base model folder {path} has no config.json")
    elif looks_like_path:
        raise TrainingInputError(f"base model {base_model} does not exist")


# -- formatting -----------------------------------------------------------------------------------
def _response(side: list[dict]) -> str:
    return side[-1]["content"]


class RowFormatter:
    """Release rows -> TRL prompt/completion (SFT) or prompt/chosen/rejected (DPO, ORPO) rows."""

    def __init__(self, method: str, prompt_format: str, tokenizer: Any = None):
        self.method, self.prompt_format = method, prompt_format
        self.system_role = prompt_format == "chat" and _accepts_system_role(tokenizer)

    def prompt(self, row: dict) -> str | list[dict]:
        if self.prompt_format == "mistral":
            return mistral_prompt(row["system"], row["prompt"])
        if self.system_role:
            return [{"role": "system", "content": row["system"]}, {"role": "user", "content": row["prompt"]}]
        return [{"role": "user", "content": f"{row['system']}\n\n{row['prompt']}"}]

    def answer(self, text: str) -> str | list[dict]:
        return f" {text}" if self.prompt_format == "mistral" else [{"role": "assistant", "content": text}]

    def __call__(self, row: dict) -> dict:
        if self.method == "sft":
            return {"prompt": self.prompt(row), "completion": self.answer(row["output"])}
        return {"prompt": self.prompt(row), "chosen": self.answer(_response(row["chosen"])),
                "rejected": self.answer(_response(row["rejected"]))}


def _accepts_system_role(tokenizer: Any) -> bool:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise TrainingInputError("--prompt-format chat needs a tokenizer with a chat template; use mistral")
    try:
        tokenizer.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                                      tokenize=False)
        return True
    except Exception:  # noqa: BLE001 - templates reject a system role in many ways; fold it into the user turn
        return False


# -- tokenising: the row's text stays text ---------------------------------------------------------
SLOT = "\ue000{}\ue001"  # private-use characters: where a row's text goes in a rendered prompt
SLOTS = re.compile("\ue000(\\d+)\ue001")


def _fill(rendered: str, texts: list[str]) -> str:
    return SLOTS.sub(lambda m: texts[int(m.group(1))], rendered)


class TextAsText:
    """Token ids of a rendered prompt whose slots hold a row's text: the text never becomes a special token.

    A row with no special-token string in its text is tokenised whole, exactly as the tokenizer always did.
    Otherwise the template around the slots is cut at the tokenizer's added tokens (its markers, ids as
    they are) and the text between them is tokenised with special-token strings split into plain tokens.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.added: dict[str, int] = dict(tokenizer.added_tokens_encoder)
        longest_first = sorted(self.added, key=len, reverse=True)
        self.markers = re.compile("|".join(map(re.escape, longest_first))) if longest_first else None
        self.prefix, self.suffix = _added_around(tokenizer)

    def ids(self, rendered: str, texts: list[str], add_special_tokens: bool) -> list[int]:
        if self.markers is None or not any(self.markers.search(t) for t in texts):
            return self.tokenizer(_fill(rendered, texts), add_special_tokens=add_special_tokens)["input_ids"]
        ids = self._marked(rendered, texts)
        return self.prefix + ids + self.suffix if add_special_tokens else ids

    def _marked(self, rendered: str, texts: list[str]) -> list[int]:
        ids: list[int] = []
        run: list[str] = []  # plain text waiting to be tokenised, template and row text alike

        def flush() -> None:
            text = "".join(run)
            run.clear()
            if text:
                ids.extend(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

        at = 0
        for slot in [*SLOTS.finditer(rendered), None]:
            template = rendered[at:slot.start() if slot else len(rendered)]
            cut = 0
            for marker in self.markers.finditer(template):
                run.append(template[cut:marker.start()])
                flush()
                ids.append(self.added[marker.group()])
                cut = marker.end()
            run.append(template[cut:])
            if slot is not None:
                run.append(texts[int(slot.group(1))])
                at = slot.end()
        flush()
        return ids


def _added_around(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds before and after a text of its own accord (BOS, for Mistral and Llama)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return full[:start], full[start + len(bare):]
    return [], []


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _slotted(row: dict, method: str) -> tuple[list[str], dict]:
    """The row's texts, and the row with a slot in place of each (for the formatter to lay out)."""
    texts = [row["system"], row["prompt"]]
    slotted: dict[str, Any] = {"system": SLOT.format(0), "prompt": SLOT.format(1)}
    sides = ("output",) if method == "sft" else ("chosen", "rejected")
    for side in sides:
        texts.append(row[side] if side == "output" else _response(row[side]))
        slot = SLOT.format(len(texts) - 1)
        slotted[side] = slot if side == "output" else [{"role": "assistant", "content": slot}]
    return texts, slotted


class RowTokenizer:
    """Release rows -> token ids as the trainers take them: SFT `input_ids` and `completion_mask`, DPO and
    ORPO `prompt_ids`, `chosen_ids` and `rejected_ids`. The completion starts where the ids of the prompt
    alone and of the whole row part ways (as TRL finds it); the Mistral format's completion ends with the
    EOS id, a chat template's with the template's own end of turn."""

    def __init__(self, method: str, prompt_format: str, tokenizer: Any):
        self.method = method
        self.formatter = RowFormatter(method, prompt_format, tokenizer)
        self.tokenizer = tokenizer
        self.text = TextAsText(tokenizer)
        self.chat = prompt_format == "chat"
        self.eos = [] if self.chat else [tokenizer.eos_token_id]

    def __call__(self, row: dict) -> dict:
        if self.method == "rm":
            return self._scored(row)
        texts, slotted = _slotted(row, self.method)
        formatted = self.formatter(slotted)
        prompt = self._ids(formatted["prompt"], None, texts)
        if self.method == "sft":
            whole = self._ids(formatted["prompt"], formatted["completion"], texts) + self.eos
            start = _common_prefix(prompt, whole)
            return {"input_ids": whole, "completion_mask": [0] * start + [1] * (len(whole) - start)}
        chosen = self._ids(formatted["prompt"], formatted["chosen"], texts) + self.eos
        rejected = self._ids(formatted["prompt"], formatted["rejected"], texts) + self.eos
        start = min(_common_prefix(prompt, chosen), _common_prefix(prompt, rejected))
        return {"prompt_ids": prompt[:start], "chosen_ids": chosen[start:], "rejected_ids": rejected[start:]}

    def _scored(self, row: dict) -> dict:
        """A reward-model pair: each side the whole sequence, prompt and answer, ending in EOS, whose last token
        the value head reads. The paper's template: `[INST] {input} [/INST] {answer}`."""
        if self.chat:
            raise TrainingInputError("the reward model is trained on the Mistral format; use --prompt-format mistral")
        texts = [row["input"], row["chosen"], row["rejected"]]
        prompt = f"[INST] {SLOT.format(0)} [/INST]"
        return {side: self.text.ids(f"{prompt} {SLOT.format(k)}", texts, add_special_tokens=True) + self.eos
                for side, k in (("chosen_ids", 1), ("rejected_ids", 2))}

    def _ids(self, prompt: Any, answer: Any, texts: list[str]) -> list[int]:
        if self.chat:
            rendered = self.tokenizer.apply_chat_template(prompt + (answer or []), tokenize=False,
                                                          add_generation_prompt=answer is None)
            return self.text.ids(rendered, texts, add_special_tokens=False)  # the template has its BOS
        return self.text.ids(prompt + (answer or ""), texts, add_special_tokens=True)


# -- lengths --------------------------------------------------------------------------------------
@dataclass
class LengthReport:
    rows: int
    kept: int
    too_long: int
    max_length: int
    longest_prompt: int
    longest_row: int
    tokens: int = 0
    dropped_examples: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def measure(dataset: Any, method: str) -> tuple[list[int], list[int]]:
    """(prompt tokens, whole-row tokens) per tokenised row; a pair's row is its prompt plus its longer side."""
    prompt_lengths: list[int] = []
    row_lengths: list[int] = []
    for batch in dataset.iter(batch_size=1024):
        if method == "sft":
            prompts = [mask.index(1) if 1 in mask else len(mask) for mask in batch["completion_mask"]]
            rows = [len(ids) for ids in batch["input_ids"]]
        elif method == "rm":
            prompts = [_common_prefix(c, r) for c, r in zip(batch["chosen_ids"], batch["rejected_ids"])]
            rows = [max(len(c), len(r)) for c, r in zip(batch["chosen_ids"], batch["rejected_ids"])]
        else:
            prompts = [len(ids) for ids in batch["prompt_ids"]]
            rows = [p + max(len(c), len(r)) for p, c, r in zip(prompts, batch["chosen_ids"], batch["rejected_ids"])]
        prompt_lengths.extend(prompts)
        row_lengths.extend(rows)
    return prompt_lengths, row_lengths


def filter_by_length(dataset: Any, method: str, max_length: int) -> tuple[Any, LengthReport]:
    prompt_lengths, row_lengths = measure(dataset, method)
    longest_prompt = max(prompt_lengths)
    if longest_prompt >= max_length:
        row = prompt_lengths.index(longest_prompt)
        raise TrainingInputError(
            f"max length {max_length} is below the longest prompt ({longest_prompt} tokens, row {row}): "
            "no response would fit; raise --max-length")
    keep = [i for i, n in enumerate(row_lengths) if n <= max_length]
    dropped = [i for i, n in enumerate(row_lengths) if n > max_length]
    report = LengthReport(rows=len(row_lengths), kept=len(keep), too_long=len(dropped), max_length=max_length,
                          longest_prompt=longest_prompt, longest_row=max(row_lengths),
                          tokens=sum(row_lengths[i] for i in keep), dropped_examples=dropped[:20])
    return (dataset.select(keep) if dropped else dataset), report


# -- loading --------------------------------------------------------------------------------------
def load_rows(config: TrainConfig, tokenizer: Any, split: str = "train") -> tuple[Any, LengthReport]:
    """The release subset (or, for the reward model's stage 2, the general pairs) through `datasets`, as
    tokenised TRL rows that fit `max_length`."""
    import datasets

    if config.method == "rm" and config.general_pairs and split == "train":
        from facets.training.general_pairs import general_pairs

        raw = general_pairs(config.general_pairs, config.max_general_pairs, config.seed)
    else:
        release = resolve_release(config.release)
        files = subset_files(release, config.subset, split)
        check_layout(files, config.method)
        raw = datasets.load_dataset("parquet", data_files={split: [str(f) for f in files]}, split=split)
    tokenise = RowTokenizer(config.method, config.prompt_format, tokenizer)
    rows = raw.map(tokenise, remove_columns=raw.column_names, desc=f"tokenising {config.subset} {split}")
    return filter_by_length(rows, config.method, config.max_length)
