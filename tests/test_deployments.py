"""Deployments: prefect.yaml, docker-compose.yml and `facets server`, up to a real
`prefect deployment run build-collection/...` against a Prefect server on PostgreSQL and a worker."""
from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from facets.flows.commands import server
from facets.schemas.config import BuildConfig

ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = ROOT / "prefect.yaml"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
NECTAR = "tests/data/sources/nectar/data.jsonl"  # relative: it resolves against FACETS_HOME on the worker


# -- prefect.yaml ---------------------------------------------------------------------------------------------

def prefect_yaml() -> dict:
    return yaml.safe_load(PREFECT_YAML.read_text(encoding="utf-8"))


def deployment(name: str = "incremental") -> dict:
    return next(d for d in prefect_yaml()["deployments"] if d["name"] == name)


def test_prefect_yaml_is_what_prefect_deploy_reads():
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.client.schemas.actions import DeploymentScheduleCreate

    raw = prefect_yaml()
    model = PrefectYamlModel.model_validate(raw)  # the model `prefect deploy` validates the file with
    assert raw["build"] is None and raw["push"] is None, "no build/push steps: no prompts, no images"
    names = [d.name for d in model.deployments]
    flow_and_name = [(d.entrypoint, d.name) for d in model.deployments]
    assert len(flow_and_name) == len(set(flow_and_name)), "a deployment is named once per flow"
    build = next(d for d in model.deployments if d.name == "incremental")
    assert build.work_pool.name == "cpu"
    assert build.concurrency_limit == 1
    schedule = raw["deployments"][names.index("incremental")]["schedules"][0]
    assert schedule["cron"] and schedule["timezone"] == "UTC" and schedule["active"] is True
    DeploymentScheduleCreate(schedule={"cron": schedule["cron"], "timezone": schedule["timezone"]})
    # the pull step: relative paths of a run resolve against the worker's FACETS_HOME
    (step,) = raw["pull"]
    assert step == {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $FACETS_HOME }}"}}


def test_every_deployment_names_a_flow_that_exists_and_its_parameters_validate():
    from prefect.flows import load_flow_from_entrypoint

    for spec in prefect_yaml()["deployments"]:
        flow = load_flow_from_entrypoint(spec["entrypoint"])
        assert flow.name in {"build-collection", "build-shard", "build-bench", "train", "evaluate", "janus"}
        if flow.name != "build-shard":  # its build passes all its parameters
            flow.validate_parameters(spec.get("parameters") or {})
    build = deployment()
    flow = load_flow_from_entrypoint(build["entrypoint"])
    assert flow.name == "build-collection"
    config = BuildConfig.model_validate(build["parameters"]["config"])
    assert config.data_dir == "data" and config.publish and config.endpoint.max_cost
    assert set(build["parameters"]) == {"config"}
    assert not config.train_after and config.train.deployment == "train/sft"
    # the build spreads its shards over the cpu pool's workers, as runs of a deployment that exists
    shard = deployment("default")
    assert config.shard_deployment == "build-shard/default"
    assert load_flow_from_entrypoint(shard["entrypoint"]).name == "build-shard"
    assert shard["work_pool"]["name"] == "cpu" and not shard.get("schedules") and not shard.get("parameters")


def test_the_paper_deployment_builds_with_the_paper_profile_and_is_never_scheduled():
    spec = deployment("paper")
    assert spec["entrypoint"].endswith(":build_collection") and not spec.get("schedules")
    config = BuildConfig.model_validate(spec["parameters"]["config"])
    assert config.profile == "paper" and config.limit == 65_653 and config.quotas["nectar/anthropic-hh"] == 6037
    assert {config.model_of(stage) for stage in config.stages} == {"gpt-4-0125-preview"}
    assert sorted(s.split("=")[0] for s in config.sources) == ["chatbot_arena", "dsp", "nectar", "openhermes",
                                                                "ultrafeedback"]


def test_try_it_deployments_read_only_the_bundled_sample_and_stay_small():
    """`<flow>/sample`: what `facets server --simulate` prints; every path is in the checkout, nothing is
    streamed from a hub, nothing is scheduled, and the train run needs no GPU and no download."""
    from facets.schemas.evaluation import BenchConfig, EvalConfig
    from facets.schemas.training import TrainConfig

    samples = {spec["entrypoint"].rsplit(":", 1)[1]: spec for spec in prefect_yaml()["deployments"]
               if spec["name"] == "sample"}
    assert set(samples) == {"build_collection", "build_bench", "evaluate", "train"}
    assert [f"{e.replace('_', '-')}/sample" for e in ("build_collection", "build_bench", "evaluate", "train")] == \
        list(server.SAMPLE_ORDER)
    for spec in samples.values():
        assert not spec.get("schedules") and spec["work_pool"]["name"] == "cpu"
    build = BuildConfig.model_validate(samples["build_collection"]["parameters"]["config"])
    bench = BenchConfig.model_validate(samples["build_bench"]["parameters"]["config"])
    for source in [*build.sources, *bench.sources]:
        assert "=" in source and (ROOT / source.split("=", 1)[1]).is_file(), source
    assert build.limit and build.limit <= 50 and build.shard_deployment is None
    assert build.data_dir == bench.data_dir == "data/sample"
    evaluation = EvalConfig.model_validate(samples["evaluate"]["parameters"]["config"])
    assert evaluation.bench == evaluation.data_dir == "data/sample" and evaluation.judge.runs == 1
    train = TrainConfig.model_validate(samples["train"]["parameters"]["config"])
    assert train.device == "cpu" and 0 < train.max_steps <= 5 and train.release == "data/sample"
    assert (ROOT / train.base_model / "model.safetensors").is_file()


def test_train_deployments_run_on_the_gpu_pool_and_cover_the_three_methods():
    from facets.schemas.training import TrainConfig

    trains = {spec["name"]: spec for spec in prefect_yaml()["deployments"]
              if spec["entrypoint"].endswith(":train") and spec["name"] != "sample"}
    assert set(trains) == {"sft", "dpo", "orpo"}
    for name, spec in trains.items():
        assert spec["work_pool"]["name"] == "gpu"
        assert TrainConfig.model_validate(spec["parameters"]["config"]).method == name
    assert f"train/{deployment()['parameters']['config']['train']['deployment'].split('/')[1]}" == "train/sft"


def test_the_server_command_finds_the_project_and_its_pools(tmp_path, monkeypatch):
    assert server.deployment_pools(ROOT) == ["cpu", "gpu"]
    assert server.find_project_dir(ROOT) == ROOT
    monkeypatch.chdir(tmp_path)  # elsewhere: the checkout the package is installed from
    assert server.find_project_dir(None) == ROOT
    with pytest.raises(server.StackError, match="no prefect.yaml"):
        server.find_project_dir(tmp_path)


def test_the_server_command_refuses_a_taken_port(tmp_path):
    with socket.socket() as taken:
        taken.bind((server.HOST, 0))
        taken.listen()
        stack = server.LocalPrefect(ROOT, port=taken.getsockname()[1], log_dir=tmp_path)
        with pytest.raises(server.StackError, match="in use"):
            stack.start()
    assert stack.server is None and not stack.workers


# -- docker-compose.yml and the Dockerfile ---------------------------------------------------------------------

def compose() -> dict:
    """The file as `docker compose` reads it with no variables set: ${VAR:-default} becomes its default."""
    text = re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m[2] or "", COMPOSE.read_text(encoding="utf-8"))
    return yaml.safe_load(text)


def published(service: dict) -> list[tuple[str, str]]:
    """(host ip, the rest) of every published port, short or long syntax."""
    out = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            out.append((port.get("host_ip", ""), str(port.get("published", ""))))
        else:
            parts = str(port).split(":")
            out.append((parts[0] if len(parts) == 3 else "", ":".join(parts[-2:])))
    return out


def test_compose_has_the_services_with_healthchecks_and_nothing_published_beyond_loopback():
    spec = compose()
    services = spec["services"]
    assert {"postgres", "prefect-server", "worker", "gpu-worker"} <= set(services)
    for name in ("postgres", "prefect-server", "worker", "gpu-worker"):
        check = services[name]["healthcheck"]
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
    for name, service in services.items():
        for host_ip, _ in published(service):
            assert host_ip == "127.0.0.1", f"{name} publishes a port beyond 127.0.0.1"
    assert not services["postgres"].get("ports"), "the database port is not published"
    assert published(services["prefect-server"]), "the UI and API are published on 127.0.0.1"


def test_compose_server_is_postgres_backed_and_workers_wait_for_it():
    services = compose()["services"]
    env = services["prefect-server"]["environment"]
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert "@postgres:5432/" in env["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert services["prefect-server"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("worker", "gpu-worker", "deployments"):
        assert services[name]["depends_on"]["prefect-server"]["condition"] == "service_healthy", name
    for name in ("worker", "gpu-worker"):
        assert services[name]["depends_on"]["deployments"]["condition"] == "service_completed_successfully"
    assert "prefect --no-prompt deploy --all" in " ".join(services["deployments"]["command"])
    for name, service in services.items():
        telemetry = service.get("environment") or {}
        if name not in ("postgres", "redis"):
            assert telemetry.get("PREFECT_SERVER_ANALYTICS_ENABLED") == "false", name
            assert telemetry.get("DO_NOT_TRACK") == "1", name
            assert telemetry.get("PREFECT_API_URL", "http://prefect-server:4200/api") == "http://prefect-server:4200/api"


def test_compose_workers_scale_share_data_and_the_gpu_worker_reserves_gpus():
    spec = compose()
    services = spec["services"]
    worker, gpu = services["worker"], services["gpu-worker"]
    assert "container_name" not in worker and not worker.get("ports"), "--scale worker=N needs neither"
    assert worker["command"][:5] == ["prefect", "worker", "start", "--pool", "cpu"]
    assert gpu["command"][:5] == ["prefect", "worker", "start", "--pool", "gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] for d in devices)
    for service in (worker, gpu):
        assert service["environment"]["FACETS_HOME"] == "/opt/facets"
        assert "data:/opt/facets/data" in service["volumes"]
        assert {"OPENAI_API_KEY", "OPENAI_BASE_URL", "AWS_ACCESS_KEY_ID", "AWS_ENDPOINT_URL"} <= set(service["environment"])
    assert "data" in spec["volumes"]
    # a worker's runs beat, and the server crashes a run whose beats stop, so a dead worker's shard runs again
    assert worker["environment"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
    assert "python -m facets.flows.automations" in " ".join(services["deployments"]["command"])
    redis = services["redis"]
    assert not redis.get("ports") and redis["healthcheck"]["test"][0] == "CMD"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"


def test_dockerfile_builds_the_package_from_files_that_exist():
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert re.search(r"^RUN pip install \"\.", text, re.M)
    sources = [src for line in re.findall(r"^COPY (.+)$", text, re.M) for src in line.split()[:-1]]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), f"the Dockerfile copies {src}, which is not in the project"
    package_dirs = {Path(d).parts[0] for d in _package_dirs()}
    copied = {Path(src).parts[0] for src in sources}
    assert package_dirs <= copied, f"the Dockerfile misses package folders {package_dirs - copied}"
    assert "prefect.yaml" in copied


def _package_dirs() -> list[str]:
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return list(pyproject["tool"]["setuptools"]["package-dir"].values())


# -- end to end: `facets server` + `prefect deployment run` -----------------------------------------------------

class Lines:
    """A child's stdout, read by a thread into a list (so the child never blocks on a full pipe)."""

    def __init__(self, process: subprocess.Popen):
        self.lines: list[str] = []
        self._new: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(process,), daemon=True).start()

    def _pump(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            self.lines.append(line)
            self._new.put(line)
        self._new.put(None)

    def wait_for(self, prefix: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._new.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                raise AssertionError(f"`facets server` exited before it was ready:\n{self.tail()}")
            if line.strip().startswith(prefix):
                return line.strip()[len(prefix):]
        raise AssertionError(f"`facets server` was not ready within {timeout_s:.0f} s:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        return "".join(self.lines[-n:])


def _stop_and_reap(process: subprocess.Popen) -> list[psutil.Process]:
    """SIGTERM, as a service manager would; returns what is still alive after the command exited."""
    try:
        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(90)
        except subprocess.TimeoutExpired:
            pass
    _, alive = psutil.wait_procs(family, timeout=15)
    for proc in alive:  # never leave orphans, even when the assertion below fails
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.slow
def test_prefect_deployment_run_completes_on_a_local_server_and_worker(tmp_path, postgres):
    from facets.simulator.server import SimulatorProcess

    data_dir = tmp_path / "data"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    for name in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE"):
        env.pop(name, None)
    started = time.monotonic()
    with SimulatorProcess(seed=3) as sim:
        env.update(OPENAI_BASE_URL=sim.base_url, OPENAI_API_KEY="sk-test")  # the worker inherits these
        command = [sys.executable, "-m", "facets.flows.cli", "server", "--port", str(server.free_port()),
                   "--database-url", postgres, "--log-dir", str(tmp_path / "logs")]
        stack = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, bufsize=1)
        output = Lines(stack)
        try:
            api_url = output.wait_for(server.READY, timeout_s=300)
            ready_s = time.monotonic() - started
            assert re.search(r"^deployments: .*build-collection/incremental", output.tail(), re.M)
            config = {"sources": [f"nectar={NECTAR}"], "limit": 5, "seed": 1, "shard_size": 4,
                      "data_dir": str(data_dir), "endpoint": {"model": "facets-sim"}, "publish": True}
            user_env = {**env, "PREFECT_API_URL": api_url}
            prefect = str(Path(sys.executable).with_name("prefect"))
            # exactly what a user types in the other shell
            run = subprocess.run([prefect, "deployment", "run", "build-collection/incremental",
                                  "--params", json.dumps({"config": config}), "--watch", "--watch-timeout", "400"],
                                 cwd=tmp_path, env=user_env, capture_output=True, text=True, timeout=450)
            report = f"{run.stdout}\n{run.stderr}\n--- facets server:\n{output.tail()}"
            assert run.returncode == 0, report
            flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", run.stdout).group(1)
            with urllib.request.urlopen(f"{api_url}/flow_runs/{flow_run_id}", timeout=30) as reply:
                flow_run = json.loads(reply.read())
            assert flow_run["state"]["type"] == "COMPLETED", report
            assert flow_run["parameters"]["config"]["data_dir"] == str(data_dir)
            assert sim.stats()["requests"] > 0, "the run called the endpoint the worker was given"
        finally:
            leftovers = _stop_and_reap(stack)
        assert stack.returncode == 0, output.tail()
        assert not leftovers, f"`facets server` left processes behind: {leftovers}"
    assert list((data_dir / "stages" / "pairs").glob("*.parquet")), "the run wrote the pairs stage"
    assert (data_dir / "releases" / "LATEST").is_file(), "the run published a release"
    print(f"server ready after {ready_s:.0f} s; whole test {time.monotonic() - started:.0f} s")
