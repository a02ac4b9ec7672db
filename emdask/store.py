"""The output store of ``emdask run``: small files written atomically, block markers
stamped with their stage's generation, the run's lease, and :func:`verify`.

Everything a run keeps besides its zarr arrays lives under ``_emdask/`` in the store:

``_emdask/lease.json``
    who is running on the store (host, pid, heartbeat); a second run refuses.
``_emdask/done/<stage>/<generation>/<block>``
    written after a block's chunks: the block is finished.  A stage's *generation* is
    recorded with its parameters when the stage starts afresh, so markers of an earlier
    generation (whose clearing failed half-way) can never mark a new block done.
``_emdask/<name>/<block>.npz``
    per-block intermediates: plain arrays (``np.load(allow_pickle=False)``), never pickles.

Block outputs are written with every chunk stored (zarr's ``write_empty_chunks``), so a
missing chunk of a finished block is always a loss, never an all-zero chunk left out;
:func:`emdask.pipeline.verify` finds such losses and chunks that do not decode.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Lease", "StoreBusy", "lease"]

LEASE = "_emdask/lease.json"

# The store is an NGFF 0.5 collection: the images raw (the EM the nets read: the input's
# region of interest, or the aligned stack), affinities and synapse_probabilities, and
# the label images of raw (defects, fragments, segmentation_<t>, synapses).
RAW = "raw"
LABELS = f"{RAW}/labels"

#: The correct stage's output: ``segmentation_{t}`` + this, with the decisions applied.
CORRECTED = "_corrected"
#: The decisions the correct stage applies (a table people may edit).
EDITS = "edits.parquet"


# ---------------------------------------------------------------- small files
def local_path(url: str) -> str | None:
    """The local path of a store URL (None for a remote store)."""
    if url.startswith("file://"):
        return url[len("file://"):]
    return None if "://" in url else url


def _fs(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


def put_bytes(url: str, key: str, data: bytes) -> None:
    """Write ``url/key`` atomically (temporary file + rename locally; a PUT remotely)."""
    local = local_path(url)
    if local is None:
        fs, root = _fs(url)
        fs.pipe(f"{root}/{key}", data)
        return
    path = Path(local, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    tmp.write_bytes(data)
    tmp.replace(path)


def get_bytes(url: str, key: str) -> bytes:
    local = local_path(url)
    if local is None:
        fs, root = _fs(url)
        return fs.cat(f"{root}/{key}")
    return Path(local, key).read_bytes()


def exists(url: str, key: str) -> bool:
    local = local_path(url)
    if local is None:
        fs, root = _fs(url)
        return fs.exists(f"{root}/{key}")
    return Path(local, key).exists()


def list_keys(url: str, prefix: str) -> list[str]:
    """Names directly under ``url/prefix`` (hidden temporary files left out)."""
    local = local_path(url)
    if local is None:
        fs, root = _fs(url)
        try:
            return [p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/{prefix}", detail=False)]
        except FileNotFoundError:
            return []
    folder = Path(local, prefix)
    return [p.name for p in folder.iterdir() if not p.name.startswith(".")] \
        if folder.is_dir() else []


def remove(url: str, key: str) -> None:
    """Delete a file or folder of the store; a failure raises (it is never ignored)."""
    local = local_path(url)
    if local is None:
        fs, root = _fs(url)
        if fs.exists(f"{root}/{key}"):
            fs.rm(f"{root}/{key}", recursive=True)
        return
    import shutil

    path = Path(local, key)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def save_arrays(url: str, key: str, arrays: dict[str, np.ndarray]) -> None:
    """Named arrays as one ``.npz`` file, written atomically."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    put_bytes(url, key, buf.getvalue())


def load_arrays(url: str, key: str) -> dict[str, np.ndarray]:
    """Arrays written by :func:`save_arrays` (plain arrays only: no pickles are loaded)."""
    with np.load(io.BytesIO(get_bytes(url, key)), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


# ---------------------------------------------------------------- block markers
def mark_done(url: str, stage: str, block: int, generation: str = "0") -> None:
    put_bytes(url, f"_emdask/done/{stage}/{generation}/{block}", b"")


def marked(url: str, stage: str, generation: str = "0") -> set[int]:
    """Blocks of a stage's generation whose outputs are completely written."""
    return {int(n) for n in list_keys(url, f"_emdask/done/{stage}/{generation}")
            if n.isdigit()}


def unmark(url: str, stage: str, blocks, generation: str = "0") -> None:
    for block in blocks:
        remove(url, f"_emdask/done/{stage}/{generation}/{block}")


# ---------------------------------------------------------------- the lease
class StoreBusy(RuntimeError):
    """Another run holds the store's lease."""


@dataclass
class _Holder:
    host: str
    pid: int
    run: str
    started: str
    heartbeat: float  # time.time() of the holder's last heartbeat

    @classmethod
    def read(cls, url: str) -> _Holder | None:
        try:
            return cls(**json.loads(get_bytes(url, LEASE)))
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            return None  # gone, or half-written by a holder killed mid-write

    def alive_here(self) -> bool | None:
        """Whether the holder's process lives (None: it runs on another host)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def describe(self) -> str:
        age = time.time() - self.heartbeat
        return (f"run {self.run} of pid {self.pid} on {self.host}, started {self.started}, "
                f"last heartbeat {age:.0f} s ago")


class Lease:
    """The right to write to a store, held by one run at a time.

    The holder rewrites ``_emdask/lease.json`` every ``heartbeat`` seconds.  A lease whose
    heartbeat is older than ``timeout`` seconds (or whose process on this host has died)
    is stale: the next run takes it over.  Locally the lease is created with ``O_EXCL`` and
    a stale one is taken over by an atomic rename, so of two runs starting together
    exactly one wins; on an object store, which has no exclusive create, the lease is
    written and read back (two runs starting within the same second could both win).
    """

    def __init__(self, url: str, timeout: float = 120.0, heartbeat: float = 10.0):
        self.url, self.timeout, self.heartbeat = url, float(timeout), float(heartbeat)
        self.run = uuid.uuid4().hex[:12]
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "run": self.run,
                           "started": self.started, "heartbeat": time.time()}).encode()

    def _create(self) -> bool:
        """Create the lease file unless it exists (exclusively where the store allows)."""
        local = local_path(self.url)
        if local is None:
            if exists(self.url, LEASE):
                return False
            put_bytes(self.url, LEASE, self._record())
            time.sleep(0.2)  # let a concurrent writer's PUT land, then see who won
            holder = _Holder.read(self.url)
            return holder is not None and holder.run == self.run
        path = Path(local, LEASE)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(self._record())
        return True

    def _take_over(self, holder: _Holder) -> None:
        local = local_path(self.url)
        if local is None:
            remove(self.url, LEASE)
            return
        moved = Path(local, f"_emdask/.lease.stale.{self.run}")
        with contextlib.suppress(FileNotFoundError):  # another run took it first
            Path(local, LEASE).rename(moved)
            try:
                taken = json.loads(moved.read_bytes()).get("run")
            except (OSError, ValueError):
                taken = holder.run  # half-written: it was no live run's
            if taken != holder.run:  # a run's fresh lease, not the stale one: put it back
                with contextlib.suppress(OSError):
                    os.link(moved, Path(local, LEASE))
            moved.unlink()

    def acquire(self) -> None:
        for _ in range(5):
            if self._create():
                break
            holder = _Holder.read(self.url)
            if holder is None:  # released (or half-written) meanwhile: try again
                time.sleep(0.1)
                if _Holder.read(self.url) is None and exists(self.url, LEASE):
                    self._take_over(_Holder("?", 0, "?", "?", 0.0))
                continue
            alive = holder.alive_here()
            stale = alive is False or (time.time() - holder.heartbeat > self.timeout)
            if not stale:
                raise StoreBusy(
                    f"{self.url} is in use by another emdask run ({holder.describe()}); "
                    "wait for it to finish, or use another output. A lease whose holder "
                    f"has died is taken over after {self.timeout:g} s without a heartbeat.")
            print(f"  taking over the stale lease of {holder.describe()}", file=sys.stderr)
            self._take_over(holder)
        else:
            raise StoreBusy(f"{self.url}: could not take the store's lease "
                            f"({LEASE}); another run keeps taking it")
        self._thread = threading.Thread(target=self._beat, daemon=True, name="emdask-lease")
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                holder = _Holder.read(self.url)
                if holder is not None and holder.run != self.run:
                    self.lost = True  # taken over (this run stalled past the timeout)
                    return
                put_bytes(self.url, LEASE, self._record())
            except Exception as err:  # noqa: BLE001 - a failed heartbeat is retried next time
                print(f"  lease heartbeat failed ({err}); retrying", file=sys.stderr)

    def check(self) -> None:
        """Raise if another run has taken this run's lease over."""
        if self.lost:
            raise StoreBusy(f"{self.url}: this run's lease was taken over by another run "
                            "(no heartbeat for too long); stopping so as not to write "
                            "beside it")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = _Holder.read(self.url)
        if holder is not None and holder.run == self.run:
            with contextlib.suppress(OSError):
                remove(self.url, LEASE)


@contextlib.contextmanager
def lease(url: str, timeout: float = 120.0, heartbeat: float = 10.0) -> Iterator[Lease]:
    """Hold the store's lease for the duration of a ``with`` block (see :class:`Lease`)."""
    held = Lease(url, timeout, heartbeat)
    held.acquire()
    try:
        yield held
    finally:
        held.release()


# ---------------------------------------------------------------- verify
@dataclass(frozen=True)
class Problem:
    """A finished block (or a whole output) whose data is missing or does not decode."""

    stage: str
    block: int | None  # None: an output written whole (not block by block)
    what: str  # the array or file, and the chunk
    error: str

    def __str__(self) -> str:
        where = f"block {self.block}" if self.block is not None else "output"
        return f"{self.stage} {where}: {self.what}: {self.error}"


def chunk_keys(array) -> set[tuple]:
    """Chunk indices of a zarr array that exist in its store (one listing)."""
    from zarr.core.sync import sync

    async def listing() -> set[tuple]:
        prefix = f"{array.path}/" if array.path else ""
        keys = set()
        async for key in array.store.list_prefix(prefix):
            rest = key[len(prefix):]
            if rest.startswith(("c/", "c.")):
                parts = rest[2:].replace(".", "/").split("/")
                if all(p.isdigit() for p in parts):
                    keys.add(tuple(int(p) for p in parts))
        return keys

    return sync(listing())


def block_chunks(array, begin, end) -> list[tuple]:
    """Indices of the chunks of ``array`` (3-D, or channels first) inside a block."""
    chunks = array.chunks[-3:]
    ranges = [range(b // c, -(-e // c)) for b, e, c in zip(begin, end, chunks, strict=True)]
    lead = [(0,) * (array.ndim - 3)]
    return [(*lead[0], i, j, k) for i in ranges[0] for j in ranges[1] for k in ranges[2]]


def decode_error(array, chunk: tuple) -> str | None:
    """Why a stored chunk of ``array`` does not decode (None when it does)."""
    sel = tuple(slice(i * n, (i + 1) * n) for i, n in zip(chunk, array.chunks, strict=True))
    try:
        array[sel]
    except Exception as err:  # noqa: BLE001 - any decode failure is a finding
        return f"does not decode ({type(err).__name__}: {err})"
    return None


# ---------------------------------------------------------------- the run's record and layout
def run_record(url: str) -> dict:
    """The store's emdask record (its root attributes), read straight from ``zarr.json``
    (retried: the run may be rewriting it)."""
    for attempt in range(5):
        try:
            return json.loads(get_bytes(url, "zarr.json")).get("attributes", {}).get(
                "emdask", {})
        except FileNotFoundError:
            return {}
        except json.JSONDecodeError:
            time.sleep(0.05 * (attempt + 1))
    return {}


def stage_generation(url: str, stage: str) -> str:
    """The generation of a stage's record: markers of other generations do not count."""
    return run_record(url).get("stages", {}).get(stage, {}).get("generation", "0")


def done_blocks(url: str, stage: str) -> set[int]:
    """Blocks of a stage whose outputs are completely written (in its current generation)."""
    return marked(url, stage, stage_generation(url, stage))


@contextlib.contextmanager
def quiet_listing():
    """zarr warns, whenever it lists the store, of the Parquet tables that live beside the
    images: silence that."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Object at \S+ is not recognized")
        yield


def has(root, name: str) -> bool:
    """Whether the store holds ``name``."""
    with quiet_listing():
        return name in root


def open_root(url: str, mode: str = "a"):
    import zarr

    from emdask.volumes import _zarr_store

    return zarr.open_group(store=_zarr_store(url, "r" if mode == "r" else "w", None),
                           mode=mode, zarr_format=3)


def meshed(store: str, root, what: str = "meshes") -> list[str]:
    """The label images that have meshes (or skeletons)."""
    with quiet_listing():
        names = list(root[LABELS].group_keys()) if has(root, LABELS) else []
    return [n for n in names if what in list_keys(store, f"{LABELS}/{n}")]
