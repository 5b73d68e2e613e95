"""`facets server`: a local Prefect server and worker on loopback with this project's deployments applied.

    facets server --simulate              # then, in another shell, the lines it prints:
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    .venv/bin/prefect deployment run build-collection/sample --watch

What it does, in order:
1. starts `prefect server start --host 127.0.0.1 --port PORT` (API and UI). Its database is
   `--database-url`, else PREFECT_API_DATABASE_CONNECTION_URL, else Prefect's own SQLite file under
   PREFECT_HOME. PostgreSQL: `postgresql+asyncpg://USER[:PASSWORD]@HOST:5432/DATABASE` (the database
   must exist; Prefect creates its tables). It waits for `/api/health`.
2. creates the work pools `prefect.yaml` names (type `process`) and starts `prefect worker start --pool
   POOL` for each (`--workers N`: N for the cpu pool, which share the shards of a build), with FACETS_HOME
   set to the project directory (relative paths in the parameters resolve against it, see prefect.yaml)
   and flow run heartbeats every 30 s; it creates the automations that mark a run Crashed when its
   worker is gone (flows/automations.py), so a build starts again the shards of a worker that died.
3. applies prefect.yaml the way a user would: `prefect --no-prompt deploy --all`, from the project
   directory. With `--simulate` it then turns every schedule off: the nightly full-size build stays
   declared, for a server on a real endpoint, but a try-it server runs only what its user starts.
4. prints the PREFECT_API_URL to export and the run commands (the `sample` deployments with
   `--simulate`, named with this environment's `prefect`), then waits. Ctrl-C or SIGTERM stops the
   workers (and the flow runs they started), then the server.

Runs get their endpoint from this command's OPENAI_BASE_URL / OPENAI_API_KEY, which the workers inherit.
`--simulate` starts the loopback simulator instead and points the workers at it (simulated text, for trying
the deployment without a key). Every process it starts has Prefect's telemetry off
(PREFECT_SERVER_ANALYTICS_ENABLED=false, DO_NOT_TRACK=1): it needs the network.
The server's output goes to `server.log` in `--log-dir` (a fresh temporary directory by default); the
workers' output, with the logs of the flow runs, comes to this terminal.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from facets.flows.automations import HEARTBEAT_S, START_WITHIN_S, ZOMBIE_AFTER_S
from facets.flows.commands import shell
from facets.flows.commands.stopping import stop_processes
from facets.simulator.server import SIMULATED_URL_ENV

HOST = "127.0.0.1"
DEFAULT_PORT = 4200
# The line that says the stack is up; a parent process can wait for it (and read the URL from it).
READY = "export PREFECT_API_URL="
HOME_LINE = "export PREFECT_HOME="
# The try-it deployments (prefect.yaml) on the bundled sample, in the order each needs the one before.
SAMPLE_ORDER = ("build-collection/sample", "build-bench/sample", "evaluate/sample", "train/sample")
QUIET_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
WORKER_LIMIT = 4  # a process worker otherwise takes every scheduled run it sees, the shards of the others too
WORKER_POLL_S = 2  # Prefect's default 10 s between polls would leave a new shard run waiting that long


class StackError(RuntimeError):
    """The local stack could not start; the message says which part and why."""


def configure(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--port", type=int, default=DEFAULT_PORT,
        help=f"port of the Prefect API and UI on {HOST} (default {DEFAULT_PORT}; 0 picks a free one)")
    add("--database-url", help="the server's database (default: PREFECT_API_DATABASE_CONNECTION_URL, else "
                               "Prefect's SQLite), e.g. postgresql+asyncpg://postgres@127.0.0.1:5432/prefect")
    add("--project-dir", type=Path, help="where prefect.yaml is (default: the current directory, else the "
                                         "checkout facets is installed from)")
    add("--pool", action="append", dest="pools", metavar="NAME",
        help="start a worker for this work pool only (repeatable; default: every pool prefect.yaml names)")
    add("--workers", type=int, default=1, metavar="N",
        help="workers for the cpu pool (default 1); the gpu pool gets one")
    add("--worker-limit", type=int, default=WORKER_LIMIT, metavar="N",
        help=f"flow runs a worker runs at once (default {WORKER_LIMIT}): a worker takes no more shards than this, "
             "so the others get theirs")
    add("--zombie-after", type=float, default=ZOMBIE_AFTER_S, metavar="SECONDS",
        help=f"a run with no heartbeat this long is marked Crashed (default {ZOMBIE_AFTER_S})")
    add("--no-deploy", dest="deploy", action="store_false", help="start the server and workers, apply nothing")
    add("--simulate", action="store_true",
        help="point the workers at a loopback simulator it starts (simulated text, no key needed)")
    add("--log-dir", type=Path, help="where server.log goes (default: a new temporary directory)")
    add("--startup-timeout", type=float, default=180.0, help="seconds to wait for the server (default 180)")


def run(args: argparse.Namespace) -> int:
    try:
        project_dir = find_project_dir(args.project_dir)
    except StackError as exc:
        print(f"facets server: {exc}", file=sys.stderr)
        return 2
    if args.workers < 1:
        print("facets server: --workers must be at least 1", file=sys.stderr)
        return 2
    try:
        check_database(args.database_url or os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL"))
    except StackError as exc:
        print(f"facets server: error: {exc}", file=sys.stderr)
        return 2
    stack = LocalPrefect(project_dir, port=args.port, database_url=args.database_url, pools=args.pools,
                         cpu_workers=args.workers, worker_limit=args.worker_limit,
                         zombie_after_s=args.zombie_after,
                         deploy=args.deploy, simulate=args.simulate, log_dir=args.log_dir,
                         startup_timeout_s=args.startup_timeout)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        stack.start()
        print(stack.instructions(), flush=True)
        failed = stack.wait()
        if failed:
            print(f"facets server: {failed} exited unexpectedly; stopping (server log: {stack.server_log})",
                  file=sys.stderr)
            return 1
        return 0
    except StackError as exc:
        print(f"facets server: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("facets server: stopping the workers and the server", file=sys.stderr, flush=True)
        return 0
    finally:
        # A second Ctrl-C during the shutdown must not leave children behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            stack.stop()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def find_project_dir(given: Path | None) -> Path:
    if given is not None:
        if not (given / "prefect.yaml").is_file():
            raise StackError(f"no prefect.yaml in {given}")
        return given.resolve()
    candidates = [Path.cwd()]
    import facets.flows

    candidates.append(Path(facets.flows.__file__).resolve().parents[1])  # an editable install's checkout
    for candidate in candidates:
        if (candidate / "prefect.yaml").is_file():
            return candidate.resolve()
    raise StackError("no prefect.yaml in the current directory: run this in the project's checkout, "
                     "or pass --project-dir")


def deployment_pools(project_dir: Path) -> list[str]:
    """Work pool names the deployments in prefect.yaml use, in order of first use."""
    import yaml

    spec = yaml.safe_load((project_dir / "prefect.yaml").read_text(encoding="utf-8")) or {}
    pools: list[str] = []
    for deployment in spec.get("deployments") or []:
        name = ((deployment or {}).get("work_pool") or {}).get("name")
        if name and name not in pools:
            pools.append(name)
    return pools


def check_database(url: str | None) -> None:
    """A PostgreSQL database must exist before the server starts: Prefect creates its tables, not the
    database, and otherwise fails with a long traceback in its log while we wait for its health check."""
    if not url or not url.startswith("postgresql"):
        return
    import asyncpg
    from sqlalchemy.engine import make_url

    parts = make_url(url)
    host, port, user = parts.host or "localhost", parts.port or 5432, parts.username or "postgres"
    where = f"PostgreSQL at {host}:{port}"

    async def probe() -> None:
        connection = await asyncpg.connect(database=parts.database, host=host, port=port, user=user,
                                           password=parts.password, timeout=10)
        await connection.close()

    try:
        asyncio.run(probe())
    except asyncpg.InvalidCatalogNameError:
        raise StackError(f"database {parts.database!r} does not exist on {where}: create it first, e.g. "
                         f"createdb -h {host} -p {port} -U {user} {parts.database}") from None
    except (OSError, asyncio.TimeoutError) as error:
        raise StackError(f"cannot reach {where} ({_hide_password(url)}): {error}") from None
    except asyncpg.PostgresError as error:
        raise StackError(f"{where} refused database {parts.database!r} for user {user!r}: {error}") from None


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _port_taken(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _hide_password(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def _prefect_command() -> list[str]:
    return [sys.executable, "-m", "prefect"]


class Child:
    """One child process in a session of its own, stopped with everything it started."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], cwd: Path, log: Path | None = None):
        self.name = name
        self.command = command
        self._log = open(log, "ab") if log else None
        self.process = subprocess.Popen(command, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                        stdout=self._log, stderr=subprocess.STDOUT if self._log else None,
                                        start_new_session=True)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 20.0) -> None:
        import psutil

        try:
            # Flow runs are started in sessions of their own, so the process group alone is not enough.
            family = [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            family = []
        if self.alive:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        stop_processes(family[1:], timeout_s, signalled=tuple(family[:1]))
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            pass
        if self._log:
            self._log.close()


class LocalPrefect:
    """A Prefect server on loopback, the project's deployments and a worker per work pool."""

    def __init__(self, project_dir: Path, port: int = DEFAULT_PORT, database_url: str | None = None,
                 pools: list[str] | None = None, cpu_workers: int = 1, worker_limit: int = WORKER_LIMIT,
                 zombie_after_s: float = ZOMBIE_AFTER_S,
                 start_within_s: float = START_WITHIN_S,
                 deploy: bool = True, simulate: bool = False,
                 log_dir: Path | None = None, env: dict[str, str] | None = None, startup_timeout_s: float = 180.0):
        self.project_dir = Path(project_dir).resolve()
        self.port = port or free_port()
        self.database_url = database_url or (env or os.environ).get("PREFECT_API_DATABASE_CONNECTION_URL") or None
        self.pools = list(pools) if pools else deployment_pools(self.project_dir) or ["cpu"]
        self.cpu_workers, self.worker_limit = cpu_workers, worker_limit
        self.zombie_after_s = zombie_after_s
        self.start_within_s = start_within_s
        self.deploy_all = deploy
        self.simulate = simulate
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="facets-server-"))
        self.base_env = dict(os.environ if env is None else env)
        self.startup_timeout_s = startup_timeout_s
        self.server: Child | None = None
        self.workers: list[Child] = []
        self.simulator = None
        self.deployments: list[str] = []
        self.paused: list[str] = []  # deployments whose schedules --simulate turned off

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    @property
    def server_log(self) -> Path:
        return self.log_dir / "server.log"

    def env(self) -> dict[str, str]:
        env = {"PREFECT_WORKER_QUERY_SECONDS": str(WORKER_POLL_S), **self.base_env, **QUIET_ENV,
               "PREFECT_API_URL": self.api_url, "FACETS_HOME": str(self.project_dir), "PREFECT_CLI_PROMPT": "false",
               "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}
        if self.database_url:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = self.database_url
        if self.simulator is not None:
            env["OPENAI_BASE_URL"] = self.simulator.base_url
            env["OPENAI_API_KEY"] = "simulator"
            env[SIMULATED_URL_ENV] = self.simulator.base_url  # a release card built on it says so
        return env

    # -- lifecycle --

    def start(self) -> LocalPrefect:
        if _port_taken(HOST, self.port):
            raise StackError(f"port {self.port} on {HOST} is in use (another Prefect server?): pass --port")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            if self.simulate:
                from facets.simulator.server import SimulatorProcess

                self.simulator = SimulatorProcess().start()
            self.server = Child("the Prefect server", [*_prefect_command(), "server", "start", "--host", HOST,
                                                       "--port", str(self.port)],
                                self.env(), self.project_dir, self.server_log)
            # Import what the next step needs while the server starts (seconds on a small machine).
            warm = threading.Thread(target=importlib.import_module, args=("prefect.workers.process",), daemon=True)
            warm.start()
            self._await_health()
            warm.join()
            asyncio.run(self._create_pools())
            # The workers start while the deployments are applied: neither needs the other.
            for pool in self.pools:
                for n in range(self.cpu_workers if pool == "cpu" else 1):
                    self.start_worker(pool, n)
            if self.deploy_all:
                self._deploy()
                if self.simulate:  # simulated text on a schedule would only fill the data dir
                    self.paused = asyncio.run(self._pause_schedules())
                self.deployments = asyncio.run(self._deployment_names())
            for child in [self.server, *self.workers]:
                if not child.alive:
                    raise StackError(f"{child.name} exited with code {child.process.returncode}")
        except BaseException:
            self.stop()
            raise
        return self

    def start_worker(self, pool: str, n: int = 0) -> Child:
        worker = Child(f"worker {n} of pool {pool!r}", [
            *_prefect_command(), "worker", "start", "--pool", pool, "--type", "process",
            "--limit", str(self.worker_limit), "--name", f"{pool}-{n}-{socket.gethostname()}-{os.getpid()}"],
            self.env(), self.project_dir)
        self.workers.append(worker)
        return worker

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.workers = []
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.simulator is not None:
            self.simulator.stop()
            self.simulator = None

    def wait(self, poll_s: float = 1.0) -> str | None:
        """Blocks while every child lives; returns the name of the first that exits."""
        while True:
            for child in [self.server, *self.workers]:
                if child is not None and not child.alive:
                    return child.name
            time.sleep(poll_s)

    def __enter__(self) -> LocalPrefect:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- steps --

    def _await_health(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if not self.server.alive:
                raise StackError(f"the Prefect server exited with code {self.server.process.returncode}:\n"
                                 f"{self._server_log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=5) as reply:
                    if reply.status == 200 and json.loads(reply.read()) is True:
                        return
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(0.5)
        raise StackError(f"the Prefect server did not answer {self.api_url}/health within "
                         f"{self.startup_timeout_s:.0f} s:\n{self._server_log_tail()}")

    def _server_log_tail(self, lines: int = 30) -> str:
        try:
            text = self.server_log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    def _client(self):
        from prefect.client.orchestration import PrefectClient

        return PrefectClient(self.api_url)

    async def _create_pools(self) -> None:
        from facets.flows.automations import ensure_zombie_automations
        from prefect.client.schemas.actions import WorkPoolCreate
        from prefect.exceptions import ObjectNotFound
        from prefect.workers.process import ProcessWorker

        template = ProcessWorker.get_default_base_job_template()
        async with self._client() as client:
            for pool in dict.fromkeys([*self.pools, *deployment_pools(self.project_dir)]):
                try:
                    await client.read_work_pool(pool)
                except ObjectNotFound:
                    await client.create_work_pool(WorkPoolCreate(name=pool, type="process",
                                                                 base_job_template=template))
        await ensure_zombie_automations(self.api_url, self.zombie_after_s, self.start_within_s)

    def _deploy(self) -> None:
        command = [*_prefect_command(), "--no-prompt", "deploy", "--all"]
        done = subprocess.run(command, env=self.env(), cwd=self.project_dir, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=300)
        if done.returncode:
            raise StackError(f"`{shlex.join(command[2:])}` failed in {self.project_dir} "
                             f"(code {done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")

    async def _pause_schedules(self) -> list[str]:
        """Turns every schedule off (the server then deletes the runs it had scheduled); returns the
        deployments that had one. A try-it server runs what its user starts, never the nightly build."""
        paused = []
        async with self._client() as client:
            for deployment in await client.read_deployments():
                schedules = [s for s in await client.read_deployment_schedules(deployment.id) if s.active]
                for schedule in schedules:
                    await client.update_deployment_schedule(deployment.id, schedule.id, active=False)
                if schedules:
                    paused.append(f"{(await client.read_flow(deployment.flow_id)).name}/{deployment.name}")
        return sorted(paused)

    async def _deployment_names(self) -> list[str]:
        async with self._client() as client:
            deployments = await client.read_deployments()
            flows = {d.flow_id: (await client.read_flow(d.flow_id)).name for d in deployments}
            return sorted(f"{flows[d.flow_id]}/{d.name}" for d in deployments)

    # -- what the user reads --

    def instructions(self) -> str:
        database = (_hide_password(self.database_url) if self.database_url else
                    f"Prefect's SQLite in {self.base_env.get('PREFECT_HOME') or '~/.prefect'}")
        endpoint = (f"the loopback simulator at {self.simulator.base_url} (simulated text)" if self.simulator
                    else self.base_env.get("OPENAI_BASE_URL") or "OPENAI_BASE_URL unset: the OpenAI API")
        lines = [
            f"Prefect server at {self.url} (UI and API), database: {database}",
            f"  server log: {self.server_log}",
            f"workers polling: {', '.join(self.pools)} ({self.cpu_workers} for cpu); their runs resolve relative "
            f"paths against {self.project_dir}",
            f"  endpoint of the runs: {endpoint}",
        ]
        if self.deployments:
            lines.append(f"deployments: {', '.join(self.deployments)}")
        if self.paused:
            lines.append(f"  schedules off (simulated endpoint): {', '.join(self.paused)} runs only when started")
        lines += ["", "In another shell:", f"  {READY}{self.api_url}"]
        if home := self.base_env.get("PREFECT_HOME"):  # the prefect CLI's own state beside the server's, not in ~
            lines.append(f"  {HOME_LINE}{shlex.quote(home)}")
        prefect = shell.command("prefect")
        samples = [d for d in SAMPLE_ORDER if d in self.deployments]
        if self.simulator and samples:
            lines += [f"  {prefect} deployment run {d} --watch" for d in samples]
            lines.append(f"        # in this order: the bundled sample through each flow, into {self.project_dir}/data/sample")
        build = next((d for d in self.deployments if d.startswith("build-collection/") and d not in samples), None)
        if build and not self.simulator:
            lines.append(f"  {prefect} deployment run {build}    # the full-size rebuild (nightly), with its parameters")
            if samples:
                lines.append(f"  {prefect} deployment run {samples[0]} --watch    # a small try on the bundled sample")
        lines += ["", "Ctrl-C stops the workers and the server."]
        return "\n".join(lines)
