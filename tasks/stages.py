"""What makes each stage's rows: the `run` of `tasks/<stage>.py`, and the stage's prompt template.

The stages themselves (names, rows, order, defaults) are declared once in schemas/stages.py; a stage's
module is found by its name, so a stage cannot be declared without the module that runs it.
"""
from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType

from facets.schemas.config import BuildConfig
from facets.schemas.stages import STAGES, Stage
from facets.tasks.templates import Template, load_template


def module_of(stage: Stage) -> ModuleType:
    return importlib.import_module(f"facets.tasks.{stage.name}")


RUNNERS: dict[str, Callable[..., Awaitable[None]]] = {stage.name: module_of(stage).run for stage in STAGES}


def template_data(stage: Stage) -> tuple[Path, ...]:
    """Data files a stage's prompt draws on: their content is part of its template's version."""
    return tuple(getattr(module_of(stage), "TEMPLATE_DATA", ()))


def load_templates(config: BuildConfig) -> dict[str, Template]:
    """The prompt template of every stage that makes calls, by the stage's name."""
    return {stage.template: load_template(stage.template, config.templates_dir, depends_on=template_data(stage))
            for stage in STAGES if stage.calls_llm}
