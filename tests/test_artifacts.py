"""What a person opens after a build: the build report as markdown tables with the release's sunburst, the
release card as the UI shows it, a card that says when its text was simulated and shows the sampling
settings, and next-step commands named as this environment has them."""
from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from facets.flows.commands import shell  # noqa: E402
from facets.pipeline.report import BuildReport, ReleaseFiles  # noqa: E402
from facets.release.card import CardFacts, redact, render_card  # noqa: E402
from facets.simulator.server import SIMULATED_URL_ENV  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("preference_trees", "preference_sets", "system_messages", "responses", "pairs")


def report(release: dict | None = None) -> BuildReport:
    usage = {"preference_trees": {"requests": 12, "rate_limited": 1, "prompt_tokens": 9000, "completion_tokens": 7000,
                                  "cost_usd": 0.0055}}
    return BuildReport(wanted=5, accepted=4, drawn=6, shards=2, seconds=12.5, usage=usage,
                       stages={s: {"reused": 0, "made": 5, "failed": 1} for s in STAGES},
                       failures={"schema_mismatch": 2, "length": 1}, structured_output="json_schema", release=release)


def release_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "releases" / "abc123"
    folder.mkdir(parents=True)
    figure = plt.figure(figsize=(1, 1))
    figure.savefig(folder / "sunburst.png")
    (folder / "report").mkdir()
    figure.savefig(folder / "report" / "rouge_l.png")
    plt.close(figure)
    (folder / "README.md").write_text("---\npretty_name: x\nconfigs: []\n---\n\n# Release `abc123`\n\n"
                                      "[Interactive sunburst](sunburst.html) here.\n\n"
                                      "![Sunburst of dimension](sunburst.png)\n\n"
                                      "![ROUGE-L](report/rouge_l.png) of the [data report](report/README.md)\n",
                                      encoding="utf-8")
    return folder


def test_the_build_report_is_markdown_tables_with_the_release_and_its_sunburst(tmp_path):
    folder = release_folder(tmp_path)
    text = report({"version": "abc123", "path": str(folder), "is_new": True}).markdown(ReleaseFiles(str(folder)))
    assert text.startswith("## Build: 4 of 5 instructions accepted")
    assert "| stage | reused | made | failed | requests | 429s | prompt tokens | completion tokens | cost (USD) |" in text
    assert "| preference_trees | 0 | 5 | 1 | 12 | 1 | 9,000 | 7,000 | 0.0055 |" in text
    assert "| schema_mismatch | 2 |" in text and "| length | 1 |" in text
    assert "| cost | $0.0055 |" in text and "| time | 12.5 s |" in text
    assert f"`abc123` (a new release) at `{folder}`" in text and "artifact `release-abc123`" in text
    png = base64.b64encode((folder / "sunburst.png").read_bytes()).decode()
    assert f"(data:image/png;base64,{png})" in text
    assert "```" not in text, "no code block: its columns are cut off in the UI"


def test_an_unchanged_release_is_named_without_storing_its_pictures_again():
    text = report({"version": "abc123", "path": "/nowhere", "is_new": False}).markdown(None)
    assert "unchanged: no new release" in text and "data:image" not in text
    assert "None in this run." in report().model_copy(update={"failures": {}}).markdown()


def test_the_release_artifact_is_the_card_without_front_matter_and_with_its_picture_inline(tmp_path):
    folder = release_folder(tmp_path)
    card = ReleaseFiles(str(folder)).card_markdown("abc123")
    assert card.startswith(f"Release `abc123` at `{folder}`")
    assert "pretty_name" not in card and "# Release `abc123`" in card
    assert "![Sunburst of dimension](data:image/png;base64," in card
    assert "![ROUGE-L](data:image/png;base64," in card  # the data report's pictures, in report/
    assert f"data report (`{folder}/report/README.md`)" in card
    assert f"Interactive sunburst (`{folder}/sunburst.html`) here." in card
    assert "(no card found)" in ReleaseFiles(str(tmp_path / "missing")).card_markdown("x")


def facts(**config) -> CardFacts:
    return CardFacts(version="v1", content_hash="h", splits={"sft": {"train": 3}}, instructions=1, sources=[],
                     stages=[], left_out={}, failures=[], models={"responses": "gpt-4o-mini"}, prompt_versions={},
                     usage={}, build_seconds=1.0, seed=0, split_seed=0, test_fraction=0.1, config=config)


def test_the_card_shows_sampling_settings_and_hides_only_secrets():
    config = {"endpoint": {"api_key": "sk-1", "hf_token": "hf_x", "api_key_env": "MY_KEY", "password": "p"},
              "stages": {"responses": {"sampling": {"max_tokens": 4096, "temperature": 1.0}}},
              "usage": {"prompt_tokens": 3, "completion_tokens": 4}}
    shown = redact(config)
    assert shown["stages"]["responses"]["sampling"]["max_tokens"] == 4096
    assert shown["usage"] == {"prompt_tokens": 3, "completion_tokens": 4}
    assert shown["endpoint"] == {"api_key": "<redacted>", "hf_token": "<redacted>", "api_key_env": "MY_KEY",
                                 "password": "<redacted>"}
    assert '"max_tokens": 4096' in render_card(facts(**config))


def test_the_card_says_when_its_text_was_simulated(monkeypatch):
    url = "http://127.0.0.1:4321/v1"
    monkeypatch.delenv(SIMULATED_URL_ENV, raising=False)
    assert "Simulated text." not in render_card(facts(endpoint={"base_url": url}))
    monkeypatch.setenv(SIMULATED_URL_ENV, url)
    assert "Simulated text." in render_card(facts(endpoint={"base_url": url}))
    assert "Simulated text." not in render_card(facts(endpoint={"base_url": "http://127.0.0.1:9/v1"}))
    simulator_model = facts()
    simulator_model.models = {"responses": "facets-sim"}
    monkeypatch.delenv(SIMULATED_URL_ENV)
    assert "Simulated text." in render_card(simulator_model)


def test_printed_commands_name_this_environment_and_run_without_it_on_path(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PATH", os.defpath)  # the virtualenv not activated
    python, facets = shell.command("python"), shell.command("facets")
    assert Path(python).is_absolute() or "/" in python
    assert Path(facets).parent == Path(python).parent or facets.endswith("-m facets.flows.cli")
    if Path(sys.executable).parent == ROOT / ".venv" / "bin":
        assert (python, facets) == (".venv/bin/python", ".venv/bin/facets")
    done = subprocess.run(f"{facets} --version", shell=True, capture_output=True, text=True,
                          env={**os.environ, "PATH": os.defpath}, cwd=ROOT, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("facets "), done.stderr
