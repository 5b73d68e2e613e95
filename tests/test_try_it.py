"""The Prefect way from a fresh clone, offline: `facets server --simulate`, then every `prefect deployment
run` it prints, exactly as printed, completes against the simulator on the bundled sample; the nightly
full-size build is declared but not scheduled; the artifacts hold tables, the card and the sunburst; and
Prefect's state stays in the project's data dir, not in ~/.prefect."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from facets.flows.commands import server
from test_deployments import Lines, _stop_and_reap

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = list(server.SAMPLE_ORDER)


def api(api_url: str, path: str, body: dict | None = None):
    request = urllib.request.Request(f"{api_url}{path}", method="POST" if body is not None else "GET",
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read())


def fresh_project(tmp_path: Path) -> Path:
    """A checkout as a user has it: prefect.yaml and the bundled samples, no data/ yet."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "prefect.yaml", project / "prefect.yaml")
    (project / "tests").symlink_to(ROOT / "tests")
    return project


def printed_runs(lines: list[str]) -> list[str]:
    return [line.split("#")[0].strip() for line in lines if " deployment run " in line]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_printed_deployment_runs_complete_offline_on_a_simulate_server(tmp_path):
    project, home = fresh_project(tmp_path), tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OPENAI_", "PREFECT_API", "PREFECT_HOME", "PREFECT_PROFILE"))}
    env.update(HOME=str(home), PREFECT_WORKER_QUERY_SECONDS="1", PATH=os.defpath)  # no venv on PATH
    started = time.monotonic()
    command = [sys.executable, "-m", "facets.flows.cli", "server", "--simulate", "--port", str(server.free_port()),
               "--project-dir", str(project), "--log-dir", str(tmp_path / "logs")]
    stack = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, bufsize=1)
    output = Lines(stack)
    timings = {}
    try:
        api_url = output.wait_for(server.READY, timeout_s=300)
        output.wait_for("Ctrl-C stops", timeout_s=30)
        timings["server ready"] = time.monotonic() - started
        banner = output.tail()
        runs = printed_runs(output.lines)
        assert [shlex.split(r)[3] for r in runs] == SAMPLES, banner
        assert all(r.startswith(".venv/bin/prefect deployment run ") for r in runs), banner
        assert "schedules off (simulated endpoint): build-collection/incremental" in banner
        incremental = api(api_url, "/deployments/name/build-collection/incremental")
        assert incremental["schedules"] and not any(s["active"] for s in incremental["schedules"])
        assert not api(api_url, "/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}})

        # the shell a user opens: the two exports the server printed
        home_line = next(line.strip() for line in output.lines if line.strip().startswith(server.HOME_LINE))
        user_env = {**env, "PREFECT_API_URL": api_url, "PREFECT_HOME": shlex.split(home_line[len("export "):])[0].split("=", 1)[1]}
        for run in runs:  # exactly what a user types in the other shell, in the printed order
            begun = time.monotonic()
            done = subprocess.run(shlex.split(run) + ["--watch-timeout", "600"], cwd=ROOT, env=user_env,
                                  capture_output=True, text=True, timeout=700)
            timings[shlex.split(run)[3]] = time.monotonic() - begun
            report = f"{run}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n--- facets server:\n{output.tail(80)}"
            assert done.returncode == 0, report
            flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", done.stdout).group(1)
            assert api(api_url, f"/flow_runs/{flow_run_id}")["state"]["type"] == "COMPLETED", report

        artifacts = {a["key"]: a for a in api(api_url, "/artifacts/latest/filter", {})}
        build = artifacts["build-report"]["data"]
        assert "| stage | reused | made | failed |" in build and "### Failures by reason" in build
        assert "![Sunburst" in build and "data:image/png;base64," in build
        release = (project / "data/sample/releases/LATEST").read_text().strip()
        card = artifacts[f"release-{release}"]["data"]
        assert "Simulated text." in card and '"max_tokens": 2048' in card and "<redacted>" not in card
        assert "data:image/png;base64," in card and "\n---\n" not in card[:200], "front matter left out"
        assert {"evaluate-summary", "train-summary"} <= set(artifacts), sorted(artifacts)
    finally:
        leftovers = _stop_and_reap(stack)
    assert stack.returncode == 0, output.tail()
    assert not leftovers, f"`facets server` left processes behind: {leftovers}"
    assert (project / "data/sample/models/sft").is_dir(), "train/sample trained the tiny model"
    assert not (home / ".prefect").exists(), "Prefect's state went to ~/.prefect"
    assert (project / "data/.prefect").is_dir()
    print("; ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items()))
