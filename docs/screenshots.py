"""Takes the screenshots of docs/ui.md: `facets server --simulate`, the `sample` deployments run as the
server prints them, then headless Chromium on the Prefect UI pages a user opens next.

    .venv/bin/python docs/screenshots.py            # writes docs/images/*.png (a few minutes)

Needs Chromium (Debian: `apt-get install chromium`). The runs write into a temporary copy of the project's
prefect.yaml with the bundled samples, so the checkout's data/ is left alone.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "images"
READY = "export PREFECT_API_URL="
WINDOW = "1440,1000"


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    sys.exit("docs/screenshots.py: no Chromium found (Debian: apt-get install chromium)")


def api(api_url: str, path: str, body: dict | None = None):
    request = urllib.request.Request(f"{api_url}{path}", method="POST" if body is not None else "GET",
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read())


def start_server(project: Path, port: int, log: Path) -> tuple[subprocess.Popen, dict[str, str], list[str]]:
    """`facets server --simulate`; returns it, the variables it says to export and the run commands it printed."""
    # Prefect's state then goes to the scratch project's data/.prefect (flows/cli.py)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "PREFECT_API", "PREFECT_HOME"))}
    env.update(PREFECT_WORKER_QUERY_SECONDS="1")
    out = open(log, "w+", encoding="utf-8")
    stack = subprocess.Popen([sys.executable, "-m", "facets.flows.cli", "server", "--simulate", "--port", str(port),
                              "--project-dir", str(project)], cwd=ROOT, env=env, stdout=out,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        text = log.read_text(encoding="utf-8")
        if "Ctrl-C stops" in text:
            exports = dict(shlex.split(line.strip())[1].split("=", 1) for line in text.splitlines()
                           if line.strip().startswith("export "))
            runs = [line.split("#")[0].strip() for line in text.splitlines() if " deployment run " in line]
            return stack, exports, runs
        if stack.poll() is not None:
            sys.exit(f"facets server exited:\n{text[-3000:]}")
        time.sleep(1)
    stack.terminate()
    sys.exit(f"facets server was not ready in time:\n{log.read_text(encoding='utf-8')[-3000:]}")


def screenshot(browser: str, url: str, name: str, wait_ms: int = 12000) -> Path:
    """One page as a person sees it; the UI is a single-page app, so it gets virtual time to load."""
    target = IMAGES / f"{name}.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--window-size={WINDOW}", f"--virtual-time-budget={wait_ms}",
                        f"--screenshot={target}", url], check=True, capture_output=True, timeout=180)
    print(f"{target.relative_to(ROOT)}  <- {url}")
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=4210)
    parser.add_argument("--runs", type=int, default=4, help="how many of the printed sample runs to make (1-4)")
    args = parser.parse_args()
    browser = chromium()
    IMAGES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="facets-ui-") as scratch:
        project = Path(scratch) / "facets"
        project.mkdir()
        shutil.copy(ROOT / "prefect.yaml", project / "prefect.yaml")
        (project / "tests").symlink_to(ROOT / "tests")
        stack, exports, runs = start_server(project, args.port, Path(scratch) / "server.log")
        api_url = exports["PREFECT_API_URL"]
        try:
            env = {**os.environ, **exports}
            run_ids = {}
            for run in runs[:args.runs]:
                print(f"$ {run}", flush=True)
                done = subprocess.run(shlex.split(run), cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
                if done.returncode:
                    sys.exit(f"{run} failed:\n{done.stdout[-3000:]}{done.stderr[-2000:]}")
                run_ids[shlex.split(run)[3]] = next(line.split("UUID:")[1].strip() for line in done.stdout.splitlines()
                                                   if "UUID:" in line)
            ui = api_url.removesuffix("/api")
            artifacts = {a["key"]: a["id"] for a in api(api_url, "/artifacts/latest/filter", {})}
            release = next(key for key in artifacts if key.startswith("release-"))
            screenshot(browser, f"{ui}/runs", "runs")
            screenshot(browser, f"{ui}/runs/flow-run/{run_ids['build-collection/sample']}", "build-run")
            # The artifact pages (/artifacts/artifact/<id>) came out blank in headless Chromium: not taken yet.
            print(f"artifacts: {', '.join(sorted(artifacts))} (release card: {release})")
            screenshot(browser, f"{ui}/deployments", "deployments")
        finally:
            stack.terminate()
            try:
                stack.wait(120)
            except subprocess.TimeoutExpired:
                stack.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
