"""Independent branches of the DAG at the same time (the flow's `max_parallel` > 1): docs/flows.md, "Concurrent
branches".

Each stage still runs as `dvc repro --single-item <stage>` in its own process, so DVC itself does everything a
repro does (run-cache restore, removal of the non-persist outputs, the command, hashing, the cache, the stage's
dvc.lock entry with its params). Concurrent repros are safe because DVC 3 releases its repository lock while a
stage's command runs (`unlocked_repo(cmd_run)` in dvc/stage/run.py) and guards each stage's deps (read) and outs
(write) with its rwlock (.dvc/tmp/rwlock); only the short locked phases (collecting the stages, their status,
hashing, committing, writing dvc.lock) take turns. `--wait-for-lock` makes a repro wait for its turn instead of
failing after 3 s, and `dvc_repo` does the same for the flow's own status calls.

What is added here: the scheduler (a stage starts once its upstream stages are done, at most `max_parallel` at
a time), and what each running stage gets: a thread budget, and on a CUDA machine a device of its own.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
_API = threading.Lock()  # one DVC API call at a time in this process (DVC's Repo is not thread-safe)


def thread_budget(max_parallel: int, cpus: int | None = None) -> int:
    """Threads per running stage: ⌊cpus / max_parallel⌋, at least 1 (cpus: the CPUs this process may use)."""
    cpus = cpus if cpus is not None else len(os.sched_getaffinity(0))
    return max(1, cpus // max_parallel)


def visible_devices(environ: dict[str, str] | None = None) -> list[str]:
    """The CUDA devices stages can be pinned to: the entries of CUDA_VISIBLE_DEVICES when it is set (up to the
    first `-1`, as CUDA reads it), else 0 … n−1 for the n devices torch sees; [] on a machine without CUDA."""
    environ = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in environ:
        found = []
        for entry in environ["CUDA_VISIBLE_DEVICES"].split(","):
            if not entry.strip() or entry.strip() == "-1":
                break
            found.append(entry.strip())
        return found
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


@contextmanager
def dvc_repo(root: str, wait: bool) -> Iterator[Any]:
    """DVC's Repo for one API call. `wait` (a concurrent run): one call at a time in this process, and DVC's
    repository lock waited for (a stage's repro may hold it) instead of failing after 3 s."""
    from dvc.repo import Repo

    if not wait:
        with Repo(root) as repo:
            yield repo
        return
    with _API, Repo(root, _wait_for_lock=True) as repo:
        yield repo


def descendants(deps: dict[str, set[str]]) -> dict[str, int]:
    """How many stages depend on each stage, directly or not (the scheduler starts the most-needed first)."""
    below: dict[str, set[str]] = {n: set() for n in deps}
    for name in deps:
        todo = list(deps[name])
        while todo:
            up = todo.pop()
            if name not in below.setdefault(up, set()):
                below[up].add(name)
                todo.extend(deps.get(up, ()))
    return {n: len(s) for n, s in below.items()}


class Slots:
    """What a running stage gets: the thread budget, and a GPU stage a free device of its own (CUDA_VISIBLE_DEVICES;
    handed out in turn, taken back when the stage ends). Without devices (a CPU machine) GPU stages are CPU stages."""

    def __init__(self, max_parallel: int, devices: list[str], cpus: int | None = None):
        self.threads = str(thread_budget(max_parallel, cpus))
        self.devices = list(devices)
        self.free = list(devices)

    def can_start(self, gpu: bool) -> bool:
        return not (gpu and self.devices and not self.free)

    def take(self, gpu: bool) -> dict[str, str]:
        env = dict.fromkeys(THREAD_VARS, self.threads)
        if gpu and self.devices:
            env["CUDA_VISIBLE_DEVICES"] = self.free.pop(0)
        return env

    def give_back(self, env: dict[str, str]) -> None:
        if "CUDA_VISIBLE_DEVICES" in env:
            self.free.append(env["CUDA_VISIBLE_DEVICES"])


def run_concurrently(order: list[str], deps: dict[str, set[str]], gpu: set[str], max_parallel: int,
                     submit: Callable[[str, list, dict[str, str]], Any], slots: Slots) -> dict[str, Any]:
    """Submit each stage of `order` once its upstream stages in `order` have completed, at most `max_parallel`
    at a time; among ready stages, those with the most stages below them first, then `order`'s.

    `submit(name, upstream_futures, slot_env)` returns a Prefect future. After a failure nothing new starts and
    the running stages finish (as `dvc repro` stops at a failure). Returns {stage: its future}, in `order`."""
    from prefect.futures import as_completed

    rank = descendants({n: deps[n] & set(order) for n in order})
    pending, futures, running, done = list(order), {}, {}, set()
    failed = False
    while (pending and not failed) or running:
        if not failed:
            ready = [n for n in pending if deps[n] & set(order) <= done]
            for name in sorted(ready, key=lambda n: (-rank[n], order.index(n))):
                if len(running) >= max_parallel:
                    break
                if not slots.can_start(name in gpu):
                    continue
                env = slots.take(name in gpu)
                upstream = [futures[d] for d in sorted(deps[name]) if d in futures]  # the UI draws the edges
                futures[name] = submit(name, upstream, env)
                running[futures[name]] = (name, env)
                pending.remove(name)
        assert running, f"no stage can start: {pending}"  # cannot happen on a DAG in dependency order
        finished = next(as_completed(list(running)))
        finished.wait()  # its final state, not the API's possibly older one
        name, env = running.pop(finished)
        slots.give_back(env)
        if finished.state.is_completed():
            done.add(name)
        else:
            failed = True
    return {n: futures[n] for n in order if n in futures}
