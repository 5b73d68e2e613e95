"""Clean stops of a command that runs a flow in-process: SIGINT (Ctrl-C) and SIGTERM cancel the flow's
asyncio task, so the flow's own cleanup runs (calls in flight cancelled, the journal sealed), and the
command prints one line instead of a traceback and exits with 128 + the signal's number.

Each Prefect flow run in the main thread installs a SIGTERM handler that raises `TerminationSignal`
wherever that thread happens to be (a crash, not a cancellation: `on_cancellation` hooks do not run), and
a Ctrl-C reaches the whole process group: the embedded Prefect server died with it, and the flow then
spent minutes retrying to report its crash there. So the flow runs on a worker thread, where Prefect
installs no handler, and the main thread keeps the signals: it cancels the flow's task and waits
`GRACE_S` for it to end. The processes the command starts (the loopback simulator, the embedded server)
are started with SIGINT blocked, so a Ctrl-C stops them through this process, after the flow has
reported its end; then the command leaves without Prefect's exit handlers (`exit_now`).
"""
from __future__ import annotations

import asyncio
import contextvars
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# the flow's cleanup gets this long after a signal (it takes a second or two): past it, or at a second
# signal, the command exits anyway; what the journal holds is safe from any exit, and the next run seals it
GRACE_S = 6.0
CHILD_STOP_S = 2.0


class Stopped(Exception):
    """The command was stopped by a signal."""

    def __init__(self, signum: int):
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class StopSignals:
    """For the length of a command (`with StopSignals() as stops:`), SIGINT and SIGTERM stop it instead of
    raising where the main thread happens to be. `stops.run(main)` is `asyncio.run(main)` on a worker thread;
    a signal cancels its task, and `Stopped` is raised once it has ended, or `GRACE_S` after the signal (at
    once on a second one). A signal that comes before, while the command starts, stops it at `run`.
    `on_stop` runs in the main thread at the first signal (e.g. to quiet the logs of the runs it cancels)."""

    def __init__(self, on_stop: Callable[[], None] | None = None):
        self.on_stop = on_stop
        self.signum: int | None = None
        self.runner: _Runner | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        self.previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            # once stopped, the command is on its way out (its children stopped, its line printed): another
            # Ctrl-C would only break that with a KeyboardInterrupt
            signal.signal(signum, signal.SIG_IGN if self.signum is not None else handler)

    def run(self, main: Coroutine[Any, Any, T]) -> T:
        if self.signum is not None:
            main.close()
            raise Stopped(self.signum)
        self.runner = _Runner(main)
        self.runner.thread.start()
        self.runner.wait()
        return self.runner.outcome(self.signum)

    def _handle(self, signum: int, frame: Any = None) -> None:
        if self.signum is not None:  # a second signal: stop waiting for the cleanup
            if self.runner is not None:
                self.runner.deadline = 0.0
            return
        self.signum = signum
        if self.runner is not None:
            self.runner.cancel()
        if self.on_stop is not None:
            self.on_stop()


def start_shielded(start: Callable[[], T]) -> T:
    """`start()` on a thread that blocks SIGINT: the processes it starts inherit the blocked signal, so a
    Ctrl-C at the terminal (sent to the whole process group) stops them only through this process."""
    box: dict[str, Any] = {}

    def shielded() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            box["value"] = start()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=shielded, name="facets-start", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def quiet_prefect_logs() -> None:
    """After a stop, Prefect's console says nothing more: each run it cancels would log a crash."""
    for handler in logging.getLogger().handlers:  # Prefect's console handler is the root logger's
        handler.addFilter(lambda record: not record.name.startswith("prefect"))


def journaled_calls(data_dir: str, within_s: float = 2.0) -> int | None:
    """How many calls the data dir's journal holds (a rerun pays for none of them); None when that cannot
    be told within `within_s` (a large journal on an object store)."""
    from facets.llm.journal import Journal
    from facets.storage.store import open_fs

    box: dict[str, int] = {}

    def count() -> None:
        try:
            fs, root = open_fs(data_dir)
            if not fs.exists(f"{root.rstrip('/')}/journal"):
                box["calls"] = 0
                return
            with Journal(data_dir) as journal:
                box["calls"] = len(journal)
        except Exception:  # a count is a courtesy: the line goes out without it
            pass

    thread = threading.Thread(target=count, name="facets-count", daemon=True)
    thread.start()
    thread.join(within_s)
    return box.get("calls")


def report_stop(stop: Stopped, command: str, data_dir: str, new_line: bool = False) -> NoReturn:
    """Print the one line of a stopped command (`new_line`: after a progress bar's line) and exit with the
    signal's code (see `exit_now`)."""
    calls = journaled_calls(data_dir)
    journaled = "the calls made are journaled" if calls is None else f"{calls} calls journaled"
    print(f"{chr(10) if new_line else ''}{command}: {stop}; {journaled}, rerun the same command to resume",
          file=sys.stderr)
    exit_now(stop.exit_code)


def exit_now(code: int) -> NoReturn:
    """Leave at once after a stop: the child processes are stopped (terminated, killed after `CHILD_STOP_S`)
    and no exit handler runs. Prefect's would wait on a flow that did not end within its grace, and send
    its last logs to the embedded server, retrying for minutes when a signal to the whole process group
    stopped that server already."""
    import psutil

    sys.stdout.flush()
    sys.stderr.flush()
    stop_processes(psutil.Process().children(recursive=True), CHILD_STOP_S)
    os._exit(code)


def stop_processes(processes: list, timeout_s: float, signalled: tuple = ()) -> None:
    """Terminate `processes` (psutil), then kill those still alive after `timeout_s`; `signalled` were sent
    their signal already and are only waited for."""
    import psutil

    for process in processes:
        if process not in signalled:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.terminate()
    _, alive = psutil.wait_procs([*signalled, *processes], timeout=timeout_s)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=5)


class _Runner:
    """One coroutine run by `asyncio.run` on a daemon thread, cancellable from the main thread."""

    def __init__(self, main: Coroutine[Any, Any, Any]):
        self.main = main
        # the thread runs in a copy of the caller's context: a progress listener set there (pipeline/report.py) is seen
        self.thread = threading.Thread(target=contextvars.copy_context().run, args=(self._work,), name="facets-flow",
                                       daemon=True)
        self.ended = threading.Event()
        self.lock = threading.RLock()  # reentrant: a signal handler may interrupt the main thread holding it
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task | None = None
        self.cancelled = False
        self.deadline = float("inf")
        self.value: Any = None
        self.error: BaseException | None = None

    def _work(self) -> None:
        # the processes the flow starts from here (Prefect's embedded server) leave Ctrl-C to this process
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self.value = asyncio.run(self._run())
        except BaseException as exc:  # handed to the main thread
            self.error = exc
        finally:
            self.ended.set()

    async def _run(self) -> Any:
        with self.lock:
            self.loop, self.task = asyncio.get_running_loop(), asyncio.current_task()
            if self.cancelled:  # cancelled before the loop ran
                self.task.cancel()
        return await self.main

    def cancel(self) -> None:
        with self.lock:
            self.cancelled, self.deadline = True, time.monotonic() + GRACE_S
            if self.loop is not None:
                try:
                    self.loop.call_soon_threadsafe(self.task.cancel)
                except RuntimeError:  # the loop closed meanwhile: the run has ended
                    pass

    def wait(self) -> None:
        while not self.ended.wait(0.2):  # a timed wait lets the signal handler run promptly
            if time.monotonic() >= self.deadline:
                return

    def outcome(self, signum: int | None) -> Any:
        if signum is not None and not (self.ended.is_set() and self.error is None):
            raise Stopped(signum)
        if self.error is not None:
            raise self.error
        return self.value
