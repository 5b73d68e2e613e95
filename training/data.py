"""A release subset as TRL rows: located, checked for its layout, formatted, and filtered by length.

Training reads the release as published (DESIGN decision 12) and writes the prompt itself, because TRL
would drop the `system` column. Rows longer than the configured length are dropped and counted here,
before training: TRL would otherwise cut them mid-response (and lose their EOS) or drop them silently.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from facets.schemas.training import TrainConfig

SFT_COLUMNS = ("system", "prompt", "output")
PAIR_COLUMNS = ("system", "prompt", "chosen", "rejected")


class TrainingInputError(ValueError):
    """Bad input found before any model is loaded: the message says what and where."""


def mistral_prompt(system: str, prompt: str) -> str:
    """The recipe's prompt; the tokenizer adds BOS, and the completion starts with the separating space."""
    return f"[INST] {system}\n{prompt} [/INST]"


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


def subset_files(release: Path, subset: str) -> list[Path]:
    folder = release / subset
    if not folder.is_dir():
        present = sorted(p.name for p in release.iterdir() if p.is_dir()) if release.is_dir() else []
        raise TrainingInputError(
            f"{release} has no {subset}/ subset (found: {', '.join(present) or 'nothing'}); "
            "pass a release folder written by `facets build`")
    files = sorted(folder.glob("train-*.parquet")) or sorted(folder.glob("*.parquet"))
    if not files:
        raise TrainingInputError(f"{folder} holds no Parquet files")
    return files


def check_layout(files: list[Path], method: str) -> int:
    """The columns the method needs, with the pair sides as chats; returns the row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    wanted = SFT_COLUMNS if method == "sft" else PAIR_COLUMNS
    rows = 0
    for file in files:
        schema = pq.read_schema(file)
        missing = [c for c in wanted if c not in schema.names]
        if missing:
            kind = "SFT (system, prompt, output)" if method == "sft" else "preference (system, prompt, chosen, rejected)"
            raise TrainingInputError(f"{file} lacks {', '.join(missing)}: {method} needs the {kind} layout")
        if method != "sft" and not pa.types.is_list(schema.field("chosen").type):
            raise TrainingInputError(f"{file}: chosen/rejected must be [user, assistant] chats, as DESIGN.md's DPO layout")
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


class TokenCounter:
    """Token counts as the trainers will see them: prompt with BOS, completion plus EOS."""

    def __init__(self, tokenizer: Any, prompt_format: str):
        self.tokenizer, self.prompt_format = tokenizer, prompt_format

    def prompts(self, prompts: list) -> list[int]:
        if self.prompt_format == "mistral":
            return [len(ids) for ids in self.tokenizer(prompts)["input_ids"]]
        return [len(_ids(self.tokenizer.apply_chat_template(p, tokenize=True, add_generation_prompt=True)))
                for p in prompts]

    def answers(self, answers: list) -> list[int]:
        texts = answers if self.prompt_format == "mistral" else [a[-1]["content"] for a in answers]
        return [len(ids) + 1 for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _ids(rendered: Any) -> list[int]:
    return rendered["input_ids"] if isinstance(rendered, dict) or hasattr(rendered, "keys") else rendered


def measure(dataset: Any, counter: TokenCounter, method: str) -> tuple[list[int], list[int]]:
    """(prompt tokens, whole-row tokens) per row; a pair's row is its prompt plus its longer side."""
    prompt_lengths: list[int] = []
    row_lengths: list[int] = []
    for batch in dataset.iter(batch_size=1024):
        prompts = counter.prompts(batch["prompt"])
        if method == "sft":
            answers = counter.answers(batch["completion"])
        else:
            answers = [max(c, r) for c, r in zip(counter.answers(batch["chosen"]), counter.answers(batch["rejected"]))]
        prompt_lengths.extend(prompts)
        row_lengths.extend(p + a for p, a in zip(prompts, answers))
    return prompt_lengths, row_lengths


def filter_by_length(dataset: Any, counter: TokenCounter, method: str, max_length: int) -> tuple[Any, LengthReport]:
    prompt_lengths, row_lengths = measure(dataset, counter, method)
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
def load_rows(config: TrainConfig, tokenizer: Any) -> tuple[Any, LengthReport]:
    """The release subset through `datasets`, as TRL rows that fit `max_length`."""
    import datasets

    release = resolve_release(config.release)
    files = subset_files(release, config.subset)
    check_layout(files, config.method)
    raw = datasets.load_dataset("parquet", data_files={"train": [str(f) for f in files]}, split="train")
    formatter = RowFormatter(config.method, config.prompt_format, tokenizer)
    rows = raw.map(formatter, remove_columns=raw.column_names, desc=f"formatting {config.subset}")
    return filter_by_length(rows, TokenCounter(tokenizer, config.prompt_format), config.method, config.max_length)
