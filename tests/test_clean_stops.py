"""Clean stops and clean errors of `facets build`, run as a user runs it: SIGTERM and Ctrl-C stop it within
seconds with one line and a sealed journal, a full disk is one line and no retried (re-paid) stage, what a
killed publisher left is swept by the next build, and a --config that is not a config is one line.
Requests are counted at the simulator, never in our code."""
from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from facets.flows.cli import main
from facets.simulator.server import SimulatorProcess
from facets.storage import Store
from facets.storage.scratch import TEMP_FILE_AGE_S, UNLOCKED_FOLDER_AGE_S, open_scratch, sweep

SOURCES = Path(__file__).parent / "data" / "sources"
NECTAR = f"nectar={SOURCES / 'nectar' / 'data.jsonl'}"
MODEL = "facets-sim"
STOP_LINE = re.compile(r"^facets build: stopped by (SIGTERM|SIGINT); \d+ calls journaled, rerun the same command to resume$")


def build_command(data_dir: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "facets.flows.cli", "build", "--source", NECTAR, "--limit", "12",
            "--shard-size", "4", "--data-dir", str(data_dir), "--model", MODEL, *flags]


def endpoint_env(sim) -> dict:
    return {**os.environ, "OPENAI_BASE_URL": sim.base_url, "OPENAI_API_KEY": "sk-test"}


def wait_until(condition, process: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, f"the build ended first: {process.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "the build did not get that far in time"
        time.sleep(0.02)


def stop_and_time(process: subprocess.Popen, signum: int, group: bool) -> tuple[float, str]:
    """Send `signum` (to the whole process group, as a terminal's Ctrl-C does, with `group`); seconds to exit, stderr."""
    started = time.monotonic()
    if group:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        pytest.fail(f"still running 60 s after {signal.Signals(signum).name}: {stderr[-2000:]}")
    return time.monotonic() - started, stderr


def assert_one_stop_line(stderr: str, name: str) -> None:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if "stopped by" in line]
    assert len(lines) == 1 and STOP_LINE.match(lines[0]) and name in lines[0], stderr[-3000:]


def live_journal_files(data_dir: Path) -> list[Path]:
    return [p for p in (data_dir / "journal" / "live").glob("*.jsonl") if p.stat().st_size]


def journaled_anything(data_dir: Path) -> bool:
    return any(p.stat().st_size for p in (data_dir / "journal").glob("*/*.jsonl"))


# --- SIGTERM and Ctrl-C -----------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_stops_a_build_within_10s_with_one_line_and_a_rerun_pays_only_the_calls_in_flight_again(tmp_path):
    in_flight = 4
    with SimulatorProcess(seed=5, latency_ms=400, jitter_ms=100) as sim:
        command = build_command(tmp_path, "--max-in-flight", str(in_flight), "--rpm", "60000", "--quiet")
        build = subprocess.Popen(command, env=endpoint_env(sim), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, start_new_session=True)
        wait_until(lambda: sim.stats()["ok"] >= 10, build)
        seconds, stderr = stop_and_time(build, signal.SIGTERM, group=False)
        made = sim.stats()["ok"]
        assert build.returncode == 143
        assert seconds < 10
        assert_one_stop_line(stderr, "SIGTERM")
        assert not live_journal_files(tmp_path), "the journal is sealed: no live file is left to recover"
        done = subprocess.run(command, env=endpoint_env(sim), capture_output=True, text=True, timeout=600)
        stats = sim.stats()
    assert done.returncode == 0, done.stderr[-3000:]
    assert made < stats["ok"], "the build was stopped mid-way"
    # calls whose replies were rejected are asked again by a rerun on purpose (see test_build's kill -9 test)
    failed = Store(str(tmp_path)).read("failures", columns=["stage", "key"]).to_pylist()
    assert stats["paid_twice"] <= in_flight + 3 * len({(f["stage"], f["key"]) for f in failed})
    assert "release" in done.stdout


@pytest.mark.slow
def test_ctrl_c_stops_a_build_and_the_simulator_it_started_within_10s(tmp_path):
    """A terminal's Ctrl-C reaches the whole process group: the build's own loopback simulator and
    Prefect's embedded server get it too, and must not die before the build has stopped."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    build = subprocess.Popen(build_command(tmp_path, "--rpm", "120"), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_until(lambda: journaled_anything(tmp_path), build)
    children = psutil.Process(build.pid).children(recursive=True)
    assert children, "the build runs its simulator and Prefect's server as child processes"
    seconds, stderr = stop_and_time(build, signal.SIGINT, group=True)
    assert build.returncode == 130
    assert seconds < 10
    assert_one_stop_line(stderr, "SIGINT")
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, f"left running: {[p.cmdline() for p in alive]}"


# --- a full disk ------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs (needs root: mount); the test is skipped where it cannot be mounted."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()[:200]}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave_bytes: int) -> None:
    stat = os.statvfs(disk)
    with open(disk / "filler", "wb") as handle:
        handle.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave_bytes))


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_no_stage_is_retried_to_pay_again(small_disk):
    from facets.ingest.pool import ingest

    ingest(str(small_disk), [NECTAR], seed=0)
    fill(small_disk, leave_bytes=40_000)  # room for a few journaled replies, not for the build
    with SimulatorProcess(seed=5, latency_ms=20) as sim:
        done = subprocess.run([sys.executable, "-m", "facets.flows.cli", "build", "--limit", "12", "--shard-size", "4",
                               "--data-dir", str(small_disk), "--model", MODEL, "--rpm", "60000", "--quiet",
                               "--no-publish"], env=endpoint_env(sim), capture_output=True, text=True, timeout=600)
        stats = sim.stats()
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("facets build: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"facets build: error: no space left on {small_disk}"), done.stderr
    assert stats["ok"] > 0, "calls were made before the disk was full"
    assert stats["paid_twice"] == 0, "a stage was retried and paid again for replies it could not journal"


def test_a_storage_error_is_not_retried_by_prefect_but_a_crash_is():
    from prefect.states import Failed

    from facets.pipeline.shard_run import retry_unless_aborted

    def retried(error: BaseException) -> bool:
        return retry_unless_aborted(None, None, Failed(data=error))

    assert not retried(OSError(errno.ENOSPC, "No space left on device"))
    assert not retried(OSError(errno.EROFS, "Read-only file system"))
    assert not retried(PermissionError(errno.EACCES, "Permission denied", "/data/stages"))
    assert not retried(RuntimeError("IO Error: Could not write file: No space left on device"))  # DuckDB's words
    assert retried(ConnectionResetError(errno.ECONNRESET, "reset"))
    assert retried(RuntimeError("a crashed stage"))


# --- leftovers of killed writers ----------------------------------------------------------------------

def test_sweep_removes_what_dead_writers_left_and_never_a_live_writers_scratch(tmp_path):
    store = Store(str(tmp_path))
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from facets.storage import Store; from facets.storage.scratch import open_scratch\n"
        f"s = open_scratch(Store({str(tmp_path)!r}), 'release'); open(s.path + '/part.parquet', 'wb').write(b'PAR1')\n"
        "print(s.path, flush=True); time.sleep(600)")], stdout=subprocess.PIPE, text=True)
    dead = Path(writer.stdout.readline().strip())
    writer.kill()
    writer.wait()
    live = open_scratch(store, "spill")
    old_unlocked, new_unlocked = tmp_path / ".staging" / "bench-old", tmp_path / ".staging" / "bench-new"
    for folder in (old_unlocked, new_unlocked):
        folder.mkdir()
    stage = tmp_path / "stages" / "responses"
    stage.mkdir(parents=True)
    old_tmp, new_tmp = stage / ".part-a.parquet.tmp", stage / ".part-b.parquet.tmp"
    old_tmp.write_bytes(b"cut")
    new_tmp.write_bytes(b"being written")
    os.utime(old_tmp, (time.time() - TEMP_FILE_AGE_S - 60,) * 2)
    os.utime(old_unlocked, (time.time() - UNLOCKED_FOLDER_AGE_S - 60,) * 2)
    assert dead.is_dir()

    assert sweep(store) == 3
    assert not dead.exists() and not Path(f"{dead}.lock").exists()
    assert Path(live.path).is_dir(), "a live writer's scratch is never touched"
    assert not old_unlocked.exists() and new_unlocked.exists()
    assert not old_tmp.exists() and new_tmp.exists()
    live.close()
    assert not Path(live.path).exists()


@pytest.mark.slow
def test_kill_9_during_publish_leaves_staging_that_the_next_build_removes(tmp_path):
    staging = tmp_path / ".staging"
    with SimulatorProcess(seed=5) as sim:
        command = build_command(tmp_path, "--rpm", "60000", "--quiet")
        build = subprocess.Popen(command, env=endpoint_env(sim), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
        wait_until(lambda: any(p.name.startswith("release-") for p in staging.glob("*")), build, timeout_s=300)
        os.killpg(build.pid, signal.SIGKILL)
        build.wait()
        left = sorted(p.name for p in staging.iterdir())
        assert any(n.startswith("release-") for n in left) and any(n.startswith("spill-") for n in left), left
        done = subprocess.run(command, env=endpoint_env(sim), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not staging.exists() or not any(p.name in left for p in staging.iterdir())
    assert (tmp_path / "releases" / "LATEST").exists()


# --- --config files that are not configs ----------------------------------------------------------------

BAD_CONFIGS = {
    "broken.yaml": ("limit: 3\nseed: [1, 2\n", "not valid YAML"),
    "broken.json": ('{"limit": 3,\n "seed": }', "not valid JSON"),
    "list.json": ("[1, 2]", "not a list"),
    "scalar.yaml": ("42\n", "not a number"),
    "nested.yaml": ("endpoint: 5\n", "endpoint is a mapping"),
    "invalid.json": ('{"limit": -3}', "limit: Input should be greater than or equal to 1"),
}
COMMANDS = [["build"], ["bench", "build"], ["eval", "generate", "--model", "m"], ["eval", "judge"],
            ["train", "--release", "r", "--method", "sft", "--output", "o"]]
CASES = [(command, name) for command in COMMANDS for name in sorted(BAD_CONFIGS)
         if command == ["build"] or name not in ("invalid.json", "nested.yaml")]  # those fields are the build's


@pytest.mark.parametrize(("command", "name"), CASES, ids=[f"{' '.join(c[:2])}-{n}" for c, n in CASES])
def test_a_config_file_that_is_not_a_config_is_one_line_naming_it(tmp_path, capsys, monkeypatch, command, name):
    monkeypatch.setenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")  # the CLI sets it for the process
    text, problem = BAD_CONFIGS[name]
    path = tmp_path / name
    path.write_text(text)
    assert main([*command, "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and problem in err, err


def test_a_bad_config_file_is_one_line_from_the_real_command(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("data_dir: [unclosed\n")
    done = subprocess.run([sys.executable, "-m", "facets.flows.cli", "build", "--config", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"facets build: error: {path}: not valid YAML: expected ',' or ']', but got '<stream end>' (line 2, column 1)"]
