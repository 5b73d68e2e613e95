"""One build per data dir: a lease that a second build is refused (or waits for), and that a build that
crashed does not hold for ever.

Two builds on one data dir would each pay for every call of every stage: neither sees the other's rows
or journal entries before it has made them itself. So `build-collection` (and `build-bench`, which runs
the same stages) holds this lease from start to end; the shard runs it dispatches are that build and
take none.

A local data dir: an OS lock (`fcntl.flock`) on `locks/build.lock`, which the kernel lets go when the
holding process ends, however it ends (kill -9 included), and `locks/build.json` naming the holder for
the message the refused build prints.

An object store (s3://): one object, `locks/build.lease`, holding its owner and an expiry. It is
created with a conditional write (`If-None-Match: *`: of two builds starting at once, exactly one gets
it), and a thread of the holder moves the expiry on every `ttl_s / 4`, each time with `If-Match` on the
ETag it last wrote. A holder that died stops renewing; once its expiry has passed, the next build takes
the lease over, again with `If-Match`, so of two taking over at once one wins. So does a rerun of the
same flow run (its first attempt crashed). Expiries are wall-clock times: the machines' clocks must
agree to well within the TTL. Other fsspec stores (memory://, ...) get the same steps checked by
reading first, without a conditional write's guarantee against two builds starting in the same instant.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone

from fsspec.implementations.local import LocalFileSystem

from facets.storage.store import open_fs, read_local

LOCKS = "locks"
LEASE_TTL_S = 60.0  # a crashed holder's lease on an object store is free again after this long
POLL_S = {"local": 0.5, "object": 2.0}  # between tries while waiting: a try on an object store is a request

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseOwner:
    purpose: str  # the flow that holds it: build-collection, build-bench
    host: str
    pid: int
    since: str  # UTC, ISO 8601
    flow_run: str | None = None
    token: str = ""  # this holding's: tells one's own lease from another's
    expires: float | None = None  # object stores: epoch seconds after which the lease is free

    def describe(self) -> str:
        run = f", flow run {self.flow_run}" if self.flow_run else ""
        return f"{self.purpose} on {self.host} (pid {self.pid}{run}) since {self.since}"

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def parse(cls, data: bytes | None) -> LeaseOwner | None:
        try:
            return cls(**json.loads(data))
        except (TypeError, ValueError):
            return None  # absent, or being written


class DataDirLocked(RuntimeError):
    """Another build holds the data dir (`owner` None: it has not said who it is yet)."""

    def __init__(self, data_dir: str, owner: LeaseOwner | None, waited_s: float = 0.0):
        self.data_dir, self.owner, self.waited_s = data_dir, owner, waited_s
        holder = owner.describe() if owner else "another build"
        waited = f" (waited {waited_s:.0f} s)" if waited_s else ""
        super().__init__(f"{data_dir} is in use by {holder}{waited}: one build per data dir")

    def __reduce__(self):  # a flow run's exception may be pickled (results, another process)
        return type(self), (self.data_dir, self.owner, self.waited_s)


def data_dir_lease(data_dir: str, purpose: str, flow_run: str | None = None, wait: bool = False,
                   timeout_s: float | None = None, ttl_s: float = LEASE_TTL_S,
                   logger: logging.Logger | logging.LoggerAdapter = log) -> Lease:
    """The lease of `data_dir`, not yet taken: `with`/`async with` it, or `acquire()` and `release()`.
    Taken: raises DataDirLocked at once, or with `wait` once `timeout_s` (None: no limit) has passed."""
    fs, root = open_fs(str(data_dir))
    owner = LeaseOwner(purpose=purpose, host=socket.gethostname(), pid=os.getpid(), flow_run=flow_run or None,
                       since=datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
                       token=uuid.uuid4().hex)
    if isinstance(fs, LocalFileSystem):
        return LocalLease(str(data_dir), owner, wait, timeout_s, logger, f"{root}/{LOCKS}")
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    objects = S3Objects(fs) if "s3" in protocols else CheckedObjects(fs)
    return ObjectLease(str(data_dir), owner, wait, timeout_s, logger, objects, f"{root.rstrip('/')}/{LOCKS}", ttl_s)


class Lease:
    """A data dir's lease: taken by `acquire` (or `with`), let go by `release`; see `data_dir_lease`."""

    kind = "local"

    def __init__(self, data_dir: str, owner: LeaseOwner, wait: bool, timeout_s: float | None, logger):
        self.data_dir, self.owner, self.wait, self.timeout_s, self.logger = data_dir, owner, wait, timeout_s, logger
        self.holder: LeaseOwner | None = None  # who has it, after a try that failed
        self.held = False
        self._told: object = ()  # the holder last named in a "waiting" line

    # -- taking and letting go ------------------------------------------------------------------
    def acquire(self) -> Lease:
        started = time.monotonic()
        while not self._attempt(started):
            time.sleep(POLL_S[self.kind])
        return self

    async def aacquire(self) -> Lease:
        """As `acquire`, waiting without blocking the event loop (a try itself is short)."""
        started = time.monotonic()
        while not self._attempt(started):
            await asyncio.sleep(POLL_S[self.kind])
        return self

    def release(self) -> None:
        if self.held:
            self.held = False
            self._release()

    def _attempt(self, started: float) -> bool:
        """One try; False: try again after a pause. Raises DataDirLocked when the caller is not to wait."""
        if self._try():
            self.held = True
            return True
        waited = time.monotonic() - started
        if not self.wait or (self.timeout_s is not None and waited >= self.timeout_s):
            raise DataDirLocked(self.data_dir, self.holder, waited if self.wait else 0.0)
        holder = self.holder.token if self.holder else None
        if self._told != holder:  # once per holder, not once per try (nor per renewal)
            self._told = holder
            self.logger.info("waiting for %s: %s has it", self.data_dir,
                             self.holder.describe() if self.holder else "another build")
        return False

    def _try(self) -> bool:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    # -- context managers -----------------------------------------------------------------------
    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    async def __aenter__(self) -> Lease:
        return await self.aacquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class LocalLease(Lease):
    """`fcntl.flock` on locks/build.lock; locks/build.json names the holder. The lock file stays: a
    waiter may hold it open, and one removed would let a third process lock a new file beside it."""

    def __init__(self, data_dir, owner, wait, timeout_s, logger, folder: str):
        super().__init__(data_dir, owner, wait, timeout_s, logger)
        self.folder, self.fd = folder, None
        self.lock_path, self.owner_path = f"{folder}/build.lock", f"{folder}/build.json"

    def _try(self) -> bool:
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            self.holder = LeaseOwner.parse(read_local(self.owner_path))
            return False
        self.fd = fd
        temporary = f"{self.owner_path}.{self.owner.token}.tmp"
        with open(temporary, "wb") as handle:
            handle.write(self.owner.to_bytes())
        os.replace(temporary, self.owner_path)
        return True

    def _release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.owner_path)
        os.close(self.fd)  # lets the lock go
        self.fd = None


class Conflict(Exception):
    """A conditional write or delete found the object other than it expected."""


class ObjectLease(Lease):
    """locks/build.lease on an object store, renewed by a thread while held; see the module's docstring."""

    kind = "object"

    def __init__(self, data_dir, owner, wait, timeout_s, logger, objects, folder: str, ttl_s: float):
        super().__init__(data_dir, owner, wait, timeout_s, logger)
        self.objects, self.path, self.ttl_s = objects, f"{folder}/build.lease", ttl_s
        self.etag: str | None = None
        self.lost = False  # another build took the lease over: this one had not renewed it in time
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def _body(self) -> bytes:
        return replace(self.owner, expires=time.time() + self.ttl_s).to_bytes()

    def _try(self) -> bool:
        for _ in range(3):  # the lease can go between a refused create and the read of it
            try:
                return self._took(self.objects.create(self.path, self._body()))
            except Conflict:
                pass
            current = self.objects.read(self.path)
            if current is None:
                continue
            data, etag = current
            holder = LeaseOwner.parse(data)
            if holder is not None and holder.token == self.owner.token:  # a retried write of ours got through
                return self._took(etag)
            if holder is not None and not self._may_take(holder):
                self.holder = holder
                return False
            try:  # expired (or unreadable): taken over only if nobody renewed or took it since we read it
                return self._took(self.objects.replace(self.path, self._body(), etag))
            except Conflict:
                continue
        return False

    def _may_take(self, holder: LeaseOwner) -> bool:
        """Expired, or held by an earlier attempt of this same flow run (which crashed, or it would not rerun)."""
        same_run = self.owner.flow_run is not None and holder.flow_run == self.owner.flow_run
        return same_run or holder.expires is None or holder.expires < time.time()

    def _took(self, etag: str) -> bool:
        self.etag, self.lost = etag, False
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._renew, name="data-dir-lease", daemon=True)
        self._heartbeat.start()
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.etag = self.objects.replace(self.path, self._body(), self.etag)
            except Conflict:
                current = self.objects.read(self.path)
                holder = LeaseOwner.parse(current[0]) if current else None
                if holder is not None and holder.token == self.owner.token:  # our retried write got through
                    self.etag = current[1]
                    continue
                self.lost = True
                self.logger.error("the lease on %s was lost (not renewed within %.0f s); now held by %s: two "
                                  "builds may now pay for the same calls", self.data_dir, self.ttl_s,
                                  holder.describe() if holder else "nobody")
                return
            except Exception as exc:  # the store away for a moment: the lease lasts a TTL, try again
                self.logger.warning("could not renew the lease on %s: %s", self.data_dir, exc)

    def _release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        if not self.lost:
            with contextlib.suppress(Conflict, FileNotFoundError):
                self.objects.delete(self.path, self.etag)


class S3Objects:
    """Conditional writes of S3 (and MinIO, moto, ...): `If-None-Match: *` creates, `If-Match` replaces
    and deletes only the version one read or wrote (its ETag)."""

    # 412, or 409 when two conditional writes of one key are in flight at once; NoSuchKey: If-Match on a
    # key that is gone
    CONFLICTS = {"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409"}

    def __init__(self, fs):
        self.fs = fs

    def create(self, path: str, data: bytes) -> str:
        return self._call("put_object", path, Body=data, IfNoneMatch="*")["ETag"]

    def replace(self, path: str, data: bytes, etag: str) -> str:
        return self._call("put_object", path, Body=data, IfMatch=etag)["ETag"]

    def delete(self, path: str, etag: str) -> None:
        self._call("delete_object", path, IfMatch=etag)

    def read(self, path: str) -> tuple[bytes, str] | None:
        """The object's bytes and the ETag of those very bytes (one GET), None when there is none."""
        from fsspec.asyn import sync

        bucket, key, _ = self.fs.split_path(path)

        async def get() -> tuple[bytes, str]:
            reply = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            try:
                return await reply["Body"].read(), reply["ETag"]
            finally:
                reply["Body"].close()

        try:
            return sync(self.fs.loop, get)
        except FileNotFoundError:
            return None

    def _call(self, method: str, path: str, **kwargs) -> dict:
        bucket, key, _ = self.fs.split_path(path)
        try:
            return self.fs.call_s3(method, Bucket=bucket, Key=key, **kwargs)
        except OSError as exc:  # s3fs turns the S3 error into an OSError; its cause holds the code
            response = getattr(exc.__cause__, "response", None) or {}
            if response.get("Error", {}).get("Code") in self.CONFLICTS or isinstance(exc, FileExistsError):
                raise Conflict(str(exc)) from exc
            raise


class CheckedObjects:
    """The same steps on a store without conditional writes: each checked by reading first. The "ETag"
    is a digest of the bytes."""

    def __init__(self, fs):
        self.fs = fs

    def create(self, path: str, data: bytes) -> str:
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            raise Conflict(path) from None
        return _digest(data)

    def replace(self, path: str, data: bytes, etag: str) -> str:
        self._expect(path, etag)
        self.fs.pipe_file(path, data)
        return _digest(data)

    def delete(self, path: str, etag: str) -> None:
        self._expect(path, etag)
        self.fs.rm_file(path)

    def read(self, path: str) -> tuple[bytes, str] | None:
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        return data, _digest(data)

    def _expect(self, path: str, etag: str) -> None:
        current = self.read(path)
        if current is None or current[1] != etag:
            raise Conflict(path)


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()
