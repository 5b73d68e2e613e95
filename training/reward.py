"""Scores from a trained reward model, for best-of-N sampling: N answers to one prompt, the best one kept.

An answer is scored as the reward model was trained (training/data.py): `[INST] {system}\\n{prompt} [/INST]
{answer}` and EOS, the value head read at the EOS. Answers are scored in one right-padded batch.
"""
from __future__ import annotations

from typing import Any


class RewardScorer:
    def __init__(self, model_dir: str, device: str | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification

        from facets.training.data import RowTokenizer
        from facets.training.run import load_tokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(model_dir, "rm")
        self.rows = RowTokenizer("rm", "mistral", self.tokenizer)
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=dtype).to(self.device).eval()
        self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def ids(self, system: str, prompt: str, answer: str) -> list[int]:
        # the rm subset's input is `{system}\n{prompt}`; with no system message, the prompt alone
        scored = f"{system}\n{prompt}" if system else prompt
        return self.rows({"input": scored, "chosen": answer, "rejected": answer})["chosen_ids"]

    def score(self, system: str, prompt: str, answers: list[str], batch_size: int = 16) -> list[float]:
        """Each answer's score, `batch_size` answers a forward pass (64 long answers at once would not fit)."""
        import torch

        pad = self.tokenizer.pad_token_id
        scores: list[float] = []
        for start in range(0, len(answers), batch_size):
            sequences = [self.ids(system, prompt, answer) for answer in answers[start:start + batch_size]]
            longest = max(map(len, sequences))
            input_ids = torch.tensor([s + [pad] * (longest - len(s)) for s in sequences], device=self.device)
            mask = torch.tensor([[1] * len(s) + [0] * (longest - len(s)) for s in sequences], device=self.device)
            with torch.no_grad():
                logits = self.model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
            scores.extend(round(float(v), 6) for v in logits[:, 0].float().cpu())
        return scores


def best_of(scorer: Any, system: str, prompt: str, answers: list[str]) -> tuple[int, list[float]]:
    """The index of the best-scored answer (the first of equals) and every answer's score."""
    scores = scorer.score(system, prompt, answers)
    return max(range(len(scores)), key=lambda i: (scores[i], -i)), scores
