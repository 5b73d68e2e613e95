"""A real S3-compatible server on loopback for tests and benchmarks: moto's server as a child process.

Like the LLM simulator, it stands where the real service would, over HTTP; our code reaches it the
standard way, through `AWS_ENDPOINT_URL` and the usual AWS credential variables (`env()`), so the same
code path serves AWS S3, MinIO or any S3-compatible store. Requests are counted at the server, from its
access log, never in our code: `requests()` returns them by method, after a marker request has gone
through so that every earlier request is in the count. Needs the `dev` extra (moto, flask).
"""
from __future__ import annotations

import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter

# werkzeug's access log: 127.0.0.1 - - [date] "GET /bucket/key?x HTTP/1.1" 200 -
_LOG_LINE = re.compile(r'"([A-Z]+) (\S+) HTTP/[\d.]+" (\d{3})')
_MARKER = "/facets-marker-"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "facets-test", "AWS_SECRET_ACCESS_KEY": "facets-test", "AWS_DEFAULT_REGION": "us-east-1"}


class S3Server:
    """`with S3Server() as s3: os.environ.update(s3.env()); s3.make_bucket("b")`, then use `s3://b/...`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, startup_timeout_s: float = 60.0):
        self.host, self.port = host, port or _free_port(host)
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._log: list[tuple[str, str, int]] = []
        self._markers: queue.Queue[str] = queue.Queue()

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        """The variables that point boto3, s3fs, pyarrow and `datasets` at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint_url, **CREDENTIALS}

    def start(self) -> "S3Server":
        command = [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        stdin=subprocess.DEVNULL, text=True, bufsize=1)
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"moto server did not start on {self.endpoint_url}")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def make_bucket(self, name: str) -> str:
        request = urllib.request.Request(f"{self.endpoint_url}/{name}", method="PUT")
        urllib.request.urlopen(request, timeout=30).close()
        return f"s3://{name}"

    def requests(self) -> Counter[str]:
        """Requests served so far by method (GET, PUT, HEAD, POST, DELETE), all earlier ones included."""
        self._sync()
        with self._lock:
            return Counter(self._counts)

    def log(self) -> list[tuple[str, str, int]]:
        """(method, path, status) of every request served so far."""
        self._sync()
        with self._lock:
            return list(self._log)

    def _sync(self) -> None:
        # werkzeug logs a request before it sends the body, so once our marker's line is read every
        # request answered before it has been counted
        marker = f"{_MARKER}{uuid.uuid4().hex}"
        try:
            urllib.request.urlopen(f"{self.endpoint_url}{marker}", timeout=30).close()
        except urllib.error.HTTPError:
            pass
        deadline = time.monotonic() + 30
        while (seen := self._markers.get(timeout=max(0.0, deadline - time.monotonic()))) != marker:
            continue
        del seen

    def _answers(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1):
                return True
        except OSError:
            return False

    def _pump(self) -> None:
        for line in self.process.stderr:
            match = _LOG_LINE.search(line)
            if match is None:
                continue
            method, path, status = match.group(1), match.group(2), int(match.group(3))
            if path.startswith(_MARKER):
                self._markers.put(path)
                continue
            with self._lock:
                self._counts[method] += 1
                self._log.append((method, path, status))

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def apply_env(server: S3Server) -> dict[str, str | None]:
    """Point this process at `server`; returns the previous values, for `restore_env`."""
    previous = {name: os.environ.get(name) for name in server.env()}
    os.environ.update(server.env())
    _forget_filesystems()
    return previous


def restore_env(previous: dict[str, str | None]) -> None:
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _forget_filesystems()


def _forget_filesystems() -> None:
    """fsspec keeps filesystems by their arguments, not by the environment they read: one made for an
    earlier server would keep calling it."""
    from s3fs import S3FileSystem

    S3FileSystem.clear_instance_cache()
