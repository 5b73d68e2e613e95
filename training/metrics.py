"""Training metrics in the output folder: one JSON line per log, and the loss curve as a PNG."""
from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"
LOGGED_POINTS = 50  # a run of fewer optimiser steps than this logs every one of them


def rounded(value: float | None, digits: int = 4) -> float | None:
    """A loss as a person reads it: four decimals."""
    return None if value is None else round(float(value), digits)


def logging_interval(configured: int, total_steps: int) -> int:
    """Steps between logs: the configured interval, but at most total/LOGGED_POINTS, so a short run logs
    every step and a long one still draws a curve of some fifty points."""
    return max(1, min(configured, total_steps // LOGGED_POINTS))


class LogEveryFewSteps(TrainerCallback):
    """Logs often enough to see the run (`logging_interval`), and always the last step, so the final loss is
    that step's and not an earlier one's (a resumed run's state carries the interval it was saved with)."""

    def on_train_begin(self, args, state, control, **kwargs):
        state.logging_steps = logging_interval(args.logging_steps, state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True


class MetricsFile(TrainerCallback):
    """Appends every log (loss, learning rate, grad norm, tokens seen) with its step; the main process only."""

    def __init__(self, output_dir: str):
        self.path = Path(output_dir) / METRICS_FILE

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, **logs,
                  "tokens_seen": state.num_input_tokens_seen}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def read_metrics(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def final_loss(records: list[dict]) -> float | None:
    """The loss of the last logged step, rounded."""
    points = loss_points(records)
    return rounded(points[-1][1]) if points else None


def loss_points(records: list[dict]) -> list[tuple[int, float]]:
    """(step, loss) of the training logs; a resumed run's repeated steps keep their latest value."""
    points = {r["step"]: float(r["loss"]) for r in records if "loss" in r}
    return sorted(points.items())


def plot_loss_curve(records: list[dict], path: str | Path, title: str) -> Path | None:
    points = loss_points(records)
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    axis.plot([s for s, _ in points], [loss for _, loss in points], marker="o" if len(points) < 30 else None)
    axis.set(xlabel="optimiser step", ylabel="training loss", title=title)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return Path(path)
