"""Counting a class's prompts on Ray: a pool of actors, each loading the model once and folding
the prompts it is sent into its own ClassStatistic; the driver merges the partial sums
(aggregate.merge: sums of sums, so the result is the single-process statistic up to float64
rounding, in any order).

    info, stat, first_skipped = ray_class_statistic(ModelSource(model_dir), prompts, settings,
                                                    CountSettings(engine="ray", workers=4))

Without an address a local Ray cluster is started (and stopped after), so the same call works
on a laptop and, with `address="ray://head:10001"` or "auto", on a cluster whose nodes have
griffin-export and the model installed. A worker that dies fails the run with a clear error;
prompts are not retried (nothing is written either way).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import os
from typing import Iterable, Iterator

from tqdm.auto import tqdm

from ..errors import GriffinError
from ..files.inputs import Prompt
from ..model.load import ModelSource
from ..settings import ClassSettings, CountSettings
from .aggregate import ClassStatistic, StatisticInfo, merge
from .counting import ClassCounter

# GRIFFIN_EXPORT_RAY_FAULT=N makes the first worker exit after N prompts: how the tests show
# that a dead worker fails the run cleanly (a real crash, not a raised exception)
FAULT_ENV = "GRIFFIN_EXPORT_RAY_FAULT"


PROMPTS_PER_TASK = 4  # prompts sent to a worker at a time (two tasks in flight per worker)


def require_ray() -> None:
    if importlib.util.find_spec("ray") is None:
        raise GriffinError('ray is not installed: --engine ray needs the [ray] extra (pip install -e ".[ray]")')


class ModelWorker:
    """A Ray actor's model, loaded once, with `threads` torch threads on `device`; its fingerprint, which
    the driver checks against its own (check_fingerprints)."""

    def __init__(self, source: ModelSource, threads: int, device: str):
        import torch

        torch.set_num_threads(threads)
        self.lm = dataclasses.replace(source, device=device).load()

    def fingerprint(self) -> str:
        return self.lm.fingerprint


class _Worker(ModelWorker):
    """One Ray actor for `class`: the model and a ClassCounter of the prompts it was sent."""

    def __init__(self, source: ModelSource, settings: ClassSettings, batch_size: int, threads: int,
                 device: str, fail_after: int | None):
        super().__init__(source, threads, device)
        self.counter = ClassCounter(self.lm, settings, batch_size=batch_size)
        self.fail_after, self.seen = fail_after, 0

    def feed(self, prompts: list[tuple[str, str]]) -> int:
        if self.fail_after is not None and self.seen + len(prompts) > self.fail_after:
            os._exit(1)  # the fault the tests inject: the process is gone, as after an OOM kill
        self.counter.feed(Prompt(text, where) for text, where in prompts)
        self.seen += len(prompts)
        return len(prompts)

    def result(self) -> tuple[StatisticInfo, ClassStatistic, str | None]:
        return self.counter.result()


def _tasks(prompts: Iterable[Prompt], size: int) -> Iterator[list[tuple[str, str]]]:
    task: list[tuple[str, str]] = []
    for p in prompts:
        task.append((p.text, p.where))
        if len(task) == size:
            yield task
            task = []
    if task:
        yield task


@contextlib.contextmanager
def ray_cluster(rs: CountSettings) -> Iterator[object]:
    """The `ray` module, joined to `rs.address` or to a local cluster started for this run (and stopped
    after); a Ray session already open is used as it is."""
    require_ray()
    import ray

    started = not ray.is_initialized()
    if started:
        local = rs.address is None
        ray.init(address=rs.address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                 configure_logging=True, num_cpus=max(rs.workers, os.cpu_count() or 1) if local else None)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def worker_threads(rs: CountSettings) -> int:
    """A local cluster shares this machine's cores among the workers; on a cluster each gets its one CPU slot."""
    return max(1, (os.cpu_count() or 1) // rs.workers) if rs.address is None and not rs.gpus_per_worker else 1


def check_fingerprints(ray, workers: list, fingerprint: str) -> None:
    for fp in ray.get([w.fingerprint.remote() for w in workers]):
        if fp != fingerprint:
            raise GriffinError("a Ray worker loaded other weights than this process (fingerprint "
                               f"{fp[:16]} vs {fingerprint[:16]}): every node needs the same model files")


@contextlib.contextmanager
def worker_errors(what: str) -> Iterator[None]:
    """A worker's failure as one line: a GriffinError it raised (a bad prompt, named), or its death."""
    from ray.exceptions import RayActorError, RayTaskError

    try:
        yield
    except RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, GriffinError):
            raise GriffinError(str(cause)) from None  # a bad prompt, named by file and line
        raise GriffinError(f"a Ray worker failed while {what}: {str(cause or e).splitlines()[0]}") from None
    except RayActorError as e:
        raise GriffinError(f"a Ray worker died while {what} (its process exited: out of memory, or "
                           f"killed?); prompts are not retried and nothing was written [{type(e).__name__}]") from None


def ray_class_statistic(source: ModelSource, prompts: Iterable[Prompt], settings: ClassSettings,
                        ray_settings: CountSettings, *, fingerprint: str, total: int | None = None,
                        progress: bool = False) -> tuple[StatisticInfo, ClassStatistic, str | None]:
    """The class's statistic counted by `ray_settings.workers` Ray actors, merged here.
    `fingerprint` is the driver's model: every worker must have loaded the same weights."""
    with ray_cluster(ray_settings) as ray:
        return _count(ray, source, prompts, settings, ray_settings, fingerprint, total, progress)


def _count(ray, source, prompts, settings, rs: CountSettings, fingerprint, total, progress):
    gpu = rs.gpus_per_worker > 0
    actor = ray.remote(_Worker).options(num_cpus=1, num_gpus=rs.gpus_per_worker, max_restarts=0)
    fault = os.environ.get(FAULT_ENV)
    workers = [actor.remote(source, settings, rs.batch_size, worker_threads(rs), "cuda" if gpu else "cpu",
                            int(fault) if fault and i == 0 else None) for i in range(rs.workers)]
    bar = tqdm(total=total, desc=f"class {settings.name} (ray, {rs.workers} workers)", unit="prompt",
               disable=not progress)
    try:
        with worker_errors("counting prompts"):
            check_fingerprints(ray, workers, fingerprint)
            pending: dict = {}  # object ref -> worker
            idle = [w for w in workers for _ in range(2)]  # two tasks in flight per worker
            for task in _tasks(prompts, PROMPTS_PER_TASK):
                if not idle:
                    bar.update(_finished(ray, pending, idle))
                w = idle.pop(0)
                pending[w.feed.remote(task)] = w
            while pending:
                bar.update(_finished(ray, pending, idle))
            parts = ray.get([w.result.remote() for w in workers])
    finally:
        bar.close()
        for w in workers:
            ray.kill(w)
    info, stat = merge((i, s) for i, s, _ in parts)
    first_skipped = next((f for _, _, f in parts if f), None)
    return info, stat, first_skipped


def _finished(ray, pending: dict, idle: list) -> int:
    """Wait for one task; its worker gets a slot back. Returns the number of prompts it counted."""
    [done], _ = ray.wait(list(pending), num_returns=1)
    idle.append(pending.pop(done))
    return ray.get(done)
