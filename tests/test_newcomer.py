"""Small command-line courtesies: a progress bar that never goes back, readable estimates, --version,
help descriptions, and an outcome line that counts the failure rows kept from earlier runs."""
import asyncio
import json
import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import pytest

from facets.flows.commands.build import _print_outcome, progress_bar
from facets.pipeline.report import Progress
from facets.schemas.config import BuildConfig
from facets.schemas.records import Failure
from facets.storage import FAILURES, Store


def facets(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}  # offline: no endpoint anywhere
    return subprocess.run([sys.executable, "-m", "facets.flows.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env)


# -- progress ------------------------------------------------------------------------------------------------

def shown_percentages(stderr: str) -> list[float]:
    return [float(p) for p in re.findall(r"\]\s+([\d.]+)%", stderr)]


def test_the_progress_bar_never_goes_back_when_replacement_shards_grow_the_total(monkeypatch, capsys):
    monkeypatch.setenv("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "false")  # the Prefect bar: no server in this test
    progress = Progress(listeners=[progress_bar])
    shard = SimpleNamespace(name="0-7", title="0-7")
    fractions: list[float] = []

    async def steps(n: int) -> None:
        for _ in range(n):
            await progress.advance("responses", shard)
            fractions.append(progress.fraction)

    async def build() -> None:
        progress.add(10, 40)
        await steps(7)  # 70.0% 7/10
        progress.add(5, 20)  # replacements: 8/15 would show 53.3%
        await steps(5)
        progress.add(2, 3)
        await steps(5)

    asyncio.run(build())
    assert fractions == sorted(fractions) and fractions[6] == pytest.approx(0.7)
    assert fractions[7] > 0.7 and fractions[-1] == 1.0 and progress.done == progress.total == 17
    bar = capsys.readouterr().err
    percentages = shown_percentages(bar)
    assert len(percentages) == 17 and percentages == sorted(percentages) and percentages[-1] == 100.0
    assert "8/15 stage-shards" in bar and "17/17 stage-shards" in bar  # the counts stay as they are
    assert bar.count("100.0%") == 1  # full only when every planned unit is done


# -- estimate ------------------------------------------------------------------------------------------------

def test_estimate_shows_a_time_under_an_hour_in_minutes_or_seconds():
    minutes = facets("estimate", "--limit", "1000", "--rpm", "5000")  # 7,000 calls: 1.4 min
    assert minutes.returncode == 0, minutes.stderr
    assert "7,000 calls" in minutes.stdout and "at least 1.4 min at 5000 RPM" in minutes.stdout
    seconds = facets("estimate", "--limit", "100", "--rpm", "5000")  # 700 calls: 8.4 s
    assert "at least 8 s at 5000 RPM" in seconds.stdout
    hours = facets("estimate", "--limit", "1000", "--rpm", "60")
    assert "at least 1.9 h at 60 RPM" in hours.stdout


@pytest.mark.parametrize("flags, named", [(["--rpm", "0"], "--rpm"), (["--rpm", "-5"], "--rpm"),
                                          (["--limit", "0"], "--limit")])
def test_estimate_refuses_a_rate_or_limit_it_cannot_use_in_one_line(flags, named):
    done = facets("estimate", *flags)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"facets estimate: error: {named} must")


# -- version and help -----------------------------------------------------------------------------------------

def test_facets_version_prints_the_package_version():
    done = facets("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"facets {version('facets')}"


@pytest.mark.parametrize("action, words", [("generate", "Generate a response per bench item"),
                                           ("judge", "Grade the stored responses")])
def test_eval_subcommand_help_has_a_description(action, words):
    done = facets("eval", action, "--help")
    assert done.returncode == 0 and words in " ".join(done.stdout.split())


# -- outcome line ---------------------------------------------------------------------------------------------

def test_the_outcome_line_counts_failure_rows_kept_from_earlier_runs(tmp_path, capsys):
    store = Store(str(tmp_path))
    store.write_failures([Failure(stage="responses", key=f"i{n}/0", reason="empty reply") for n in range(3)])
    assert store.count(FAILURES) == 3
    _print_outcome({"accepted": 5, "wanted": 5, "failures": {}}, BuildConfig(data_dir=str(tmp_path)))
    line = capsys.readouterr().out.strip()
    assert line == f"accepted 5 of 5 instructions; failures: 0 this run (3 kept in {tmp_path}/failures)"


# -- a whole build as a newcomer runs it ------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_simulated_build_takes_the_readme_config_and_prints_next_steps_that_run_as_printed(tmp_path):
    """Without a key the build runs on the simulator even with the README's config (its max_cost and
    per-stage models); the commands it ends with run from a shell whose PATH lacks the virtualenv; and
    Prefect's state lands in the data dir, never in ~/.prefect."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    config = json.loads(re.search(r"```json\n(.*?)```", readme, re.S)[1])
    assert config["endpoint"]["max_cost"] and config["stages"]["responses"]["model"] != config["endpoint"]["model"]
    config.update(limit=3, sources=[f"nectar={ROOT / 'tests/data/sources/nectar/data.jsonl'}"], shard_size=4)
    (tmp_path / "build.json").write_text(json.dumps(config), encoding="utf-8")
    home, data = tmp_path / "home", tmp_path / "data"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "PREFECT_HOME", "PREFECT_API"))}
    env.update(HOME=str(home), PATH=os.defpath)  # a shell where the virtualenv is not activated
    done = subprocess.run([sys.executable, "-m", "facets.flows.cli", "build", "--config", str(tmp_path / "build.json"),
                           "--data-dir", str(data), "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "accepted 3 of 3 instructions" in done.stdout, done.stdout
    steps = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in done.stdout.splitlines()
             if line.strip().startswith(("open:", "query:"))}
    assert set(steps) == {"open", "query"}, done.stdout
    for name, command in steps.items():
        ran = subprocess.run(command, shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert ran.returncode == 0, f"{name}: {command}\n{ran.stderr[-2000:]}"
        assert ("DatasetDict" if name == "open" else "preference_set") in ran.stdout, ran.stdout[-2000:]
    release = (data / "releases" / (data / "releases/LATEST").read_text().strip())
    card = (release / "README.md").read_text(encoding="utf-8")
    assert "Simulated text." in card and '"max_tokens": 4096' in card and "<redacted>" not in card
    assert not (home / ".prefect").exists(), "Prefect kept its state in ~/.prefect"
    assert (data / ".prefect").is_dir()
