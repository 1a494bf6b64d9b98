"""One driver per run (and per `loft-dist score` output): a lease file with a heartbeat.

A driver takes the lease before its first phase and renews it every timeout / 4 seconds from a thread. A second
driver on the same run finds a live lease and stops in one line naming the holder (host, pid, start, last
heartbeat). A lease whose heartbeat is older than `run.lease_timeout_s`, or whose holder is a dead process on this
same host, is taken over, so a killed driver never blocks its own re-run for long.

Every change of the lease is a compare-and-swap, never a listing or a read-then-write:
- local disk (and NFS): under an fcntl lock of a `.lock` file beside the lease;
- s3://: conditional PUTs (If-None-Match: * to create, If-Match: <ETag> to renew or take over, DELETE If-Match to
  release), which S3 and S3-compatible servers evaluate atomically.
Other object stores have no conditional write here; a lease there is taken with a warning that it cannot exclude.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import socket
import threading
import time
import uuid

from loft_dist import storage
from loft_dist.errors import ConfigError, LeaseError, StorageError

log = logging.getLogger(__name__)
LOCK_WAIT_S = 30.0


class _LocalBackend:
    """A JSON file; every operation under an exclusive fcntl lock of `<lease>.lock`."""

    def __init__(self, path: str):
        self.path, self.lock = path, f"{path}.lock"

    @contextlib.contextmanager
    def _locked(self):
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            deadline = time.monotonic() + LOCK_WAIT_S
            while True:  # held for microseconds at a time; a holder frozen inside it must not hang this driver
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise LeaseError(f"{self.lock} stayed locked for {LOCK_WAIT_S:g} s: another driver is stuck "
                                         f"while changing the lease; stop it, or remove {self.lock} if none runs")
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _read(self) -> str | None:
        try:
            with open(self.path) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def create(self, text: str) -> str | None:
        with self._locked():
            if self._read() is not None:
                return None
            storage.write_text(self.path, text)
            return text

    def read(self) -> tuple[str | None, str | None]:
        with self._locked():
            text = self._read()
            return text, text  # the tag of a local lease is its whole content

    def replace(self, text: str, tag: str) -> str | None:
        with self._locked():
            if self._read() != tag:
                return None
            storage.write_text(self.path, text)
            return text

    def delete(self, tag: str) -> None:
        with self._locked():
            if self._read() == tag:
                os.unlink(self.path)


class _S3Backend:
    """An S3 object changed only by conditional requests; the tag is its ETag."""

    def __init__(self, uri: str):
        try:
            import boto3
        except ImportError as e:
            raise ConfigError(f"{uri}: a lease on s3:// needs boto3 (S3's conditional writes); install it with "
                              f"pip install 'loft_dist[s3]'") from e
        self.bucket, _, self.key = uri[len("s3://"):].partition("/")
        if boto3.Session().get_credentials() is None:
            raise StorageError(f"{uri}: no AWS credentials found (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                               f"AWS_PROFILE, or an instance / pod role); the run's lease on s3:// needs them")
        self.s3 = boto3.client("s3")  # endpoint from AWS_ENDPOINT_URL_S3 (run.s3_endpoint), credentials from the chain

    @staticmethod
    def _conflict(e) -> bool:
        code = e.response.get("Error", {}).get("Code", "")
        return code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")

    def create(self, text: str) -> str | None:
        from botocore.exceptions import ClientError

        try:
            return self.s3.put_object(Bucket=self.bucket, Key=self.key, Body=text.encode(), IfNoneMatch="*")["ETag"]
        except ClientError as e:
            if self._conflict(e):
                return None
            raise

    def read(self) -> tuple[str | None, str | None]:
        from botocore.exceptions import ClientError

        try:
            r = self.s3.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None, None
            raise
        return r["Body"].read().decode(), r["ETag"]

    def replace(self, text: str, tag: str) -> str | None:
        from botocore.exceptions import ClientError

        try:
            return self.s3.put_object(Bucket=self.bucket, Key=self.key, Body=text.encode(), IfMatch=tag)["ETag"]
        except ClientError as e:
            if self._conflict(e) or e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise

    def delete(self, tag: str) -> None:
        from botocore.exceptions import ClientError

        with contextlib.suppress(ClientError):  # already taken over or gone: nothing of ours to release
            self.s3.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=tag)


class _PlainBackend(_LocalBackend):
    """A store without conditional writes (gs://, …): read-then-write through pyarrow; cannot exclude a race."""

    def __init__(self, uri: str):
        self.path = uri

    @contextlib.contextmanager
    def _locked(self):
        yield

    def _read(self) -> str | None:
        return storage.read_text(self.path) if storage.is_file(self.path) else None

    def delete(self, tag: str) -> None:
        if self._read() == tag:
            storage.remove(self.path)


def _backend(location: str):
    if not storage.is_uri(location) or location.startswith("file://"):
        return _LocalBackend(storage.resolve(location)[1])
    if location.startswith("s3://"):
        return _S3Backend(location)
    log.warning("%s: this store has no conditional writes in loft_dist; the lease cannot stop two drivers that "
                "start within the same second", location)
    return _PlainBackend(location)


def _describe(holder: dict, now: float) -> str:
    started = _dt.datetime.fromtimestamp(holder.get("started", 0), _dt.timezone.utc).isoformat(timespec="seconds")
    return (f"host {holder.get('host')}, pid {holder.get('pid')}, started {started}, last heartbeat "
            f"{now - holder.get('heartbeat', 0):.0f} s ago")


class Lease:
    """`with Lease(location, what, timeout_s):` holds the lease at `location` (a file) for the block."""

    def __init__(self, location: str, what: str, timeout_s: float):
        self.location, self.what, self.timeout_s = location, what, timeout_s
        self.backend = _backend(location)
        self.record = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                       "started": time.time(), "heartbeat": time.time(), "timeout_s": timeout_s}
        self.tag: str | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    def _text(self) -> str:
        self.record["heartbeat"] = time.time()
        return json.dumps(self.record)

    def acquire(self) -> None:
        for _ in range(3):  # a holder that releases between our create and read: try again
            self.tag = self.backend.create(self._text())
            if self.tag is not None:
                return
            text, tag = self.backend.read()
            if text is None:
                continue
            holder = json.loads(text)
            now = time.time()
            dead = holder.get("host") == socket.gethostname() and not _alive(holder.get("pid"))
            if not dead and now - holder.get("heartbeat", 0) <= self.timeout_s:
                raise LeaseError(
                    f"{self.what} is in use by another driver ({_describe(holder, now)}; lease {self.location}). "
                    f"Wait for it to finish; if it was killed, re-run after its lease expires "
                    f"(run.lease_timeout_s={self.timeout_s:g} s after its last heartbeat)")
            self.tag = self.backend.replace(self._text(), tag)
            if self.tag is not None:
                log.warning("took over the lease of %s from a driver that is gone (%s)", self.what,
                            _describe(holder, now))
                return
        raise LeaseError(f"{self.what}: another driver took the lease {self.location} at the same time; "
                         f"only one may run it")

    def renew(self) -> None:
        with self._mutex:
            if self.lost or self.tag is None:
                return
            tag = self.backend.replace(self._text(), self.tag)
            if tag is None:
                text, _ = self.backend.read()
                holder = json.loads(text) if text else {}
                self.lost = (f"lost the lease of {self.what} ({self.location}) to another driver "
                             f"({_describe(holder, time.time()) if holder else 'none: the lease was removed'})")
                log.error("%s; this driver stops at its next phase", self.lost)
            self.tag = tag

    def check(self) -> None:
        """Raise if another driver took the lease over (this driver then must not write anything more)."""
        if self.lost:
            raise LeaseError(f"{self.lost}; this driver stopped without writing further")

    def _beat(self) -> None:
        while not self._stop.wait(self.timeout_s / 4):
            try:
                self.renew()
            except Exception as e:  # a store that is briefly unreachable: the next beat tries again
                log.warning("lease heartbeat of %s failed: %s", self.what, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._mutex:
            if self.tag is not None and not self.lost:
                self.backend.delete(self.tag)
            self.tag = None

    def __enter__(self) -> "Lease":
        self.acquire()
        self._thread = threading.Thread(target=self._beat, name="loft-dist-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True  # another user's process, or no pid recorded: assume it lives
    return True
