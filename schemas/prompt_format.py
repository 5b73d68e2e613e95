"""The Mistral / Janus prompt, one function for training and for generation (they must never drift apart).

Training writes `[INST] {system}\\n{prompt} [/INST]` and the completion starts with its separating space (the
recipe's template). Generation follows the paper's inference script: the joined text is stripped and the
prompt ends in `[/INST] ` with its trailing space, where the model's answer begins. Without a system
message (the "no system message" arm of the evaluation) the instruction stands alone after `[INST] `.
"""
from __future__ import annotations


def mistral_prompt(system: str, prompt: str, *, generation: bool = False) -> str:
    """`[INST] {system}\\n{prompt} [/INST]`; for generation, stripped inside and with a trailing space."""
    body = f"{system}\n{prompt}" if system else prompt
    if generation:
        return f"[INST] {body.strip()} [/INST] "
    return f"[INST] {body} [/INST]"
