"""What a newcomer meets first: `facets status` on a fresh or a limited build, a mistyped data dir, and the
expected errors of `facets train` and `facets server`, each one line and exit 2. Real subprocesses of the
command line, a real loopback simulator and, where it answers, the local PostgreSQL."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SOURCES = Path(__file__).parent / "data" / "sources"
BENCH = Path(__file__).parent / "data" / "bench"
NECTAR = f"nectar={SOURCES / 'nectar' / 'data.jsonl'}"
MODEL = "facets-sim"


def facets(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "facets.flows.cli", *args], env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(done: subprocess.CompletedProcess, command: str, *words: str) -> str:
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr + done.stdout, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"facets {command}: error: "), done.stderr[-2000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def stage_table(out: str, title: str) -> dict[str, tuple[int, int, int]]:
    """stage -> (rows, done, missing) of the table headed `<title> stage`."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{title} stage"))
    table = {}
    for line in lines[start + 1:]:
        match = re.fullmatch(r"(\w+)\s+(\d+)\s+(\d+)\s+(\d+)", line.strip())
        if not match:
            break
        table[match[1]] = tuple(int(n) for n in match.groups()[1:])
    return table


# -- facets status / inspect -------------------------------------------------------------------------------

def test_status_after_ingest_calls_the_undrawn_pool_neither_done_nor_missing(tmp_path):
    assert facets("ingest", "--source", NECTAR, "--data-dir", str(tmp_path)).returncode == 0
    done = facets("status", "--data-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    total = int(re.search(r"(\d+) instructions ingested, 0 drawn by builds, (\d+) in the pool", done.stdout)[1])
    assert total > 0 and f"{total} in the pool not drawn yet" in done.stdout
    table = stage_table(done.stdout, "collection")
    assert set(table) == {"preference_trees", "preference_sets", "system_messages", "responses", "pairs"}
    assert all(counts == (0, 0, 0) for counts in table.values()), table
    assert "bench" not in done.stdout


@pytest.mark.parametrize("command", [["status"], ["status", "--shards"], ["inspect", "select 1"]])
def test_a_data_dir_that_does_not_exist_is_one_line_and_exit_2(command, tmp_path):
    done = facets(*command, "--data-dir", str(tmp_path / "no-such-dir"))
    assert_one_line_error(done, command[0], "does not exist", str(tmp_path / "no-such-dir"))
    assert not (tmp_path / "no-such-dir").exists()


def test_status_shards_with_an_unreachable_prefect_server_is_one_line(tmp_path):
    env = {"PREFECT_API_URL": "http://127.0.0.1:9/api"}
    done = facets("status", "--shards", "--data-dir", str(tmp_path), env=env)
    assert_one_line_error(done, "status", "cannot reach the Prefect server", "127.0.0.1:9")


def test_status_and_train_turn_prefect_telemetry_off_before_prefect_is_imported(tmp_path):
    """Telemetry needs the network: offline its errors fill the screen (the other commands did this already)."""
    code = ("import os, sys; from facets.flows.cli import main; "
            f"main(sys.argv[1:]); import prefect.settings as s; "
            "print(os.environ.get('PREFECT_SERVER_ANALYTICS_ENABLED'), os.environ.get('DO_NOT_TRACK'), "
            "s.get_current_settings().server.analytics_enabled)")
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK")}
    env["PREFECT_API_URL"] = "http://127.0.0.1:9/api"
    for args in (["status", "--shards", "--data-dir", str(tmp_path)], ["train", "--release", str(tmp_path)]):
        done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120)
        assert done.stdout.strip().splitlines()[-1] == "false 1 False", (args, done.stdout, done.stderr[-2000:])


@pytest.mark.slow
def test_status_after_a_limited_build_and_a_bench_counts_only_drawn_instructions_and_the_bench_apart(tmp_path):
    from facets.simulator.server import run_simulator

    limit = 3
    with run_simulator(seed=7) as sim:
        env = {"OPENAI_BASE_URL": sim.base_url, "OPENAI_API_KEY": "sk-test"}
        built = facets("build", "--source", NECTAR, "--limit", str(limit), "--data-dir", str(tmp_path),
                       "--model", MODEL, "--rpm", "60000", "--quiet", env=env, timeout=300)
        assert built.returncode == 0, built.stderr[-2000:]
        bench = facets("bench", "build", "--source", f"mt_bench={BENCH / 'mt_bench'}", "--per-benchmark", "2",
                       "--data-dir", str(tmp_path), "--model", MODEL, "--rpm", "60000", env=env, timeout=300)
        assert bench.returncode == 0, bench.stderr[-2000:]
    done = facets("status", "--data-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    total = int(re.search(r"(\d+) instructions ingested", done.stdout)[1])
    assert f"{limit} drawn by builds, {total - limit} in the pool not drawn yet" in done.stdout, done.stdout
    collection = stage_table(done.stdout, "collection")
    assert {stage: counts[1:] for stage, counts in collection.items()} == {
        stage: (limit, 0) for stage in ("preference_trees", "preference_sets", "system_messages", "responses", "pairs")}
    assert collection["preference_trees"][0] == limit, "bench rows counted as collection rows"
    assert "bench: 2 items drawn from benchmarks" in done.stdout, done.stdout
    bench_table = stage_table(done.stdout, "bench")
    assert bench_table["preference_trees"] == (2, 2, 0) and bench_table["bench_rubrics"][1:] == (2, 0), bench_table


# -- facets train ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def release_and_model(tmp_path_factory) -> tuple[Path, Path]:
    pytest.importorskip("torch", reason="the training extra (torch) is installed by `make test`")
    from training_fixtures import corpus, tiny_mistral, write_release

    root = tmp_path_factory.mktemp("newcomer")
    write_release(root / "data", n=3)
    return root / "data", tiny_mistral(root / "tiny", corpus(3), vocab_size=300, layers=1)


def test_train_asking_for_cuda_without_a_gpu_is_one_line(release_and_model, tmp_path):
    release, model = release_and_model
    done = facets("train", "--release", str(release), "--method", "sft", "--base-model", str(model),
                  "--output", str(tmp_path / "out"), "--device", "cuda", env={"CUDA_VISIBLE_DEVICES": ""})
    assert_one_line_error(done, "train", "--device cuda", "no GPU")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("offline", ["", "1"])
def test_train_on_a_hub_model_that_cannot_be_reached_is_one_line_at_once(offline, release_and_model, tmp_path):
    release, _ = release_and_model
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": offline}
    done = facets("train", "--release", str(release), "--method", "sft", "--base-model", "facets-nobody/no-such-model",
                  "--output", str(tmp_path / "out"), "--device", "cpu", env=env, timeout=60)
    line = assert_one_line_error(done, "train", "facets-nobody/no-such-model")
    assert "cache" in line or "hub" in line, line


# -- facets server -----------------------------------------------------------------------------------------

def _postgres_answers(host: str = "127.0.0.1", port: int = 5432) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def test_server_on_a_database_that_does_not_exist_says_so_and_how_to_create_it(tmp_path):
    if not _postgres_answers():
        pytest.skip("PostgreSQL does not answer on 127.0.0.1:5432")
    url = "postgresql+asyncpg://postgres@127.0.0.1:5432/no_such_db_xyz"
    done = facets("server", "--database-url", url, "--port", "0", "--no-deploy", "--log-dir", str(tmp_path),
                  timeout=60)
    assert_one_line_error(done, "server", "no_such_db_xyz", "does not exist", "createdb")
    assert not (tmp_path / "server.log").exists(), "the server was started"
