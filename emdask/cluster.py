"""Where ``emdask run``'s tasks run: a Dask cluster (local by default, SLURM or PBS through
dask-jobqueue, or one already running), and how a task is run there: given up after a
timeout so that Dask retries it, with its freed heap handed back to the OS, and followed
with a progress bar."""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator

from emdask.run_config import JOBQUEUE, ClusterSpec
from emdask.store import Lease

__all__ = ["TaskTimeout", "connect", "local_cluster", "make_cluster", "progress"]


# ---------------------------------------------------------------- running tasks
class TaskTimeout(RuntimeError):
    """A block task ran past ``cluster.task_timeout`` and was abandoned."""


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_heap() -> None:
    """Hand the free pages of the C heap back to the OS (glibc's ``malloc_trim``).

    glibc keeps the pages a task freed for later allocations (this package's local
    workers start without a trim threshold, see :func:`local_cluster`), and the holes
    left between live blocks add up over hundreds of tasks: a worker's resident memory
    climbed to 0.87 GB through the 256 watershed tasks of a 512-block run, and a box of the
    tree solve that then needed 0.36 GB more took it to 1.3 GB.  One call after each task
    keeps a worker near what it holds (about 60 ms on a 0.5 GB heap; at 64 blocks the
    workers began their tree tasks at 0.55 GB instead of 0.75)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def guarded(fn: Callable, timeout: float, *args):
    """Run ``fn(*args)``; if it has not finished after ``timeout`` seconds, raise
    :class:`TaskTimeout` so that Dask retries the task (Dask has no per-task timeout).
    Then the heap's free pages go back to the OS (:func:`release_heap`).

    The abandoned call keeps its thread until it returns; its writes are whole chunks of
    the same values, so a late finish is harmless."""
    try:
        return _call(fn, timeout, *args)
    finally:
        release_heap()


def _call(fn: Callable, timeout: float, *args):
    """``fn(*args)``, given up after ``timeout`` seconds (see :func:`guarded`)."""
    if not timeout:
        return fn(*args)
    result: dict = {}

    def target():
        try:
            result["value"] = fn(*args)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller below
            result["error"] = err

    context = contextvars.copy_context()  # get_worker() and friends work in the thread
    worker = threading.Thread(target=context.run, args=(target,), daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise TaskTimeout(f"{getattr(fn, '__name__', fn)}{args} ran past {timeout} s; "
                          "abandoned, to be retried")
    if "error" in result:
        raise result["error"]
    return result.get("value")


#: The lease of the run in progress (its block tasks stop when another run takes it over).
HELD_LEASE: contextvars.ContextVar[Lease | None] = contextvars.ContextVar("emdask_lease",
                                                                     default=None)


def progress(futures: list, label: str) -> list:
    """Wait for futures, printing a progress bar; returns their results in order."""
    from distributed import as_completed

    total, t0, done = len(futures), time.perf_counter(), 0
    width = 30

    tty = sys.stderr.isatty()

    def show() -> None:
        bar = "#" * (width * done // max(total, 1))
        elapsed = time.perf_counter() - t0
        eta = f", ETA {duration(elapsed / done * (total - done))}" if 0 < done < total else ""
        print(("\r" if tty else "") + f"  {label:<12} [{bar:<{width}}] {done}/{total} "
              f"{duration(elapsed)} elapsed{eta}   ", end="" if tty else "\n",
              file=sys.stderr, flush=True)

    step = 1 if tty else max(1, total // 4)  # a log file gets a few lines
    held = HELD_LEASE.get()
    for future in as_completed(futures):
        future.result()  # raises the task's error (after Dask's retries)
        if held is not None and held.lost:  # another run took the store over: stop writing
            for f in futures:
                f.cancel()
            held.check()
        done += 1
        if done % step == 0 or done == total:
            show()
    if tty:
        print(file=sys.stderr)
    return [f.result() for f in futures]


def duration(seconds: float) -> str:
    """A duration for people: 42.1 s, 3 min 05 s, 2 h 07 min."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes} min {int(seconds % 60):02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


# ---------------------------------------------------------------- clusters
def local_cluster(**kwargs):
    """A ``distributed.LocalCluster`` whose worker processes run emdask's kernels at full
    speed.

    distributed starts worker processes with ``MALLOC_TRIM_THRESHOLD_=65536`` (to hand
    freed memory back to the OS).  Setting it makes glibc give up its adaptive mmap
    threshold, so every block-sized numpy allocation is mmapped and page-faulted afresh:
    the watershed block kernel runs 2x slower (71 ms instead of 34 ms for a 74^3 block,
    measured).  The workers of this cluster start without it.  Other malloc settings
    were measured on the predict stage of a 500x1000x1000 fibsem volume (2 workers, 4
    tasks each) and not kept: transparent huge pages (``glibc.malloc.hugetlb=1``) 2.47
    Mvoxel/s against 2.74 without (more system time: 132 s against 106 s); keeping freed
    memory in one never-trimmed heap (``arena_max=1:mmap_max=0``) 2.83-2.95 Mvoxel/s but
    10.7 GiB per worker against 7.5 GiB (the heap's holes), past Dask's pause threshold.
    dask-jobqueue workers are started by the batch system: set
    ``distributed.nanny.pre-spawn-environ`` in their Dask config there."""
    import dask
    from distributed import LocalCluster

    # distributed also copies its pre-spawn variables into this process's environment,
    # where later worker processes inherit them: drop the value it put there
    if os.environ.get("MALLOC_TRIM_THRESHOLD_") == "65536":
        del os.environ["MALLOC_TRIM_THRESHOLD_"]
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        return LocalCluster(**kwargs)


def local_workers(spec: ClusterSpec) -> int:
    """Worker processes of a local cluster: as configured, else one per core."""
    return spec.n_workers or max(1, (os.cpu_count() or 1) // spec.threads_per_worker)


def make_cluster(spec: ClusterSpec):
    """The cluster a config asks for (not for ``scheduler``): a LocalCluster, or a
    dask-jobqueue cluster scaled adaptively between minimum_jobs and maximum_jobs."""
    import dask

    with dask.config.set({"distributed.scheduler.allowed-failures": spec.allowed_failures}):
        if spec.kind == "local":
            return local_cluster(n_workers=local_workers(spec),
                                 threads_per_worker=spec.threads_per_worker,
                                 memory_limit=spec.memory_limit, processes=spec.processes,
                                 dashboard_address=spec.dashboard,
                                 worker_dashboard_address=spec.dashboard)
        try:
            import dask_jobqueue
        except ImportError:
            raise ImportError(f"cluster.kind = {spec.kind!r} needs dask-jobqueue: "
                              "pip install 'emdask[cluster]'") from None
        cluster = getattr(dask_jobqueue, JOBQUEUE[spec.kind])(**spec.jobqueue)
        cluster.adapt(minimum_jobs=spec.minimum_jobs, maximum_jobs=spec.maximum_jobs)
        return cluster


@contextlib.contextmanager
def connect(spec: ClusterSpec, scheduler: str | None = None) -> Iterator:
    import dask
    from distributed import Client

    address = scheduler or spec.scheduler
    with dask.config.set({"distributed.scheduler.allowed-failures": spec.allowed_failures}):
        if address:
            with Client(address) as client:
                print(f"attached to {address}; dashboard: {client.dashboard_link}",
                      file=sys.stderr)
                yield client
            return
        cluster = make_cluster(spec)
        try:
            with Client(cluster) as client:
                print(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr)
                yield client
        finally:
            # a worker process slow to exit on a loaded machine (its nanny waits about a
            # second) must not fail a run whose results are written: it ends with us
            try:
                cluster.close()
            except TimeoutError as err:
                warnings.warn(f"the Dask cluster did not close in time ({err!r}); its "
                              "processes end with this one", stacklevel=2)


def worker_memory(spec: ClusterSpec) -> float:
    """Bytes of memory a worker thread may use: its worker's limit over its threads."""
    import psutil
    from dask.utils import parse_bytes

    limit = spec.memory_limit if spec.kind == "local" else spec.jobqueue.get("memory", "auto")
    if isinstance(limit, str) and limit != "auto":
        limit = parse_bytes(limit)
    # threads sharing that memory: a LocalCluster worker's, or a batch job's cores
    threads = (spec.threads_per_worker if spec.kind == "local"
               else max(1, int(spec.jobqueue.get("cores", 1))))
    if limit == "auto" or not limit:
        return psutil.virtual_memory().total / (
            (os.cpu_count() or 1) if spec.kind == "local" else threads)
    if 0 < float(limit) <= 1:  # a fraction of the machine's memory, as Dask reads it
        limit = float(limit) * psutil.virtual_memory().total
    return float(limit) / threads
