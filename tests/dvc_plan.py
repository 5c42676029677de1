"""The stages ``dvc repro`` would run, read from ``dvc.yaml`` itself, in an order that respects
their dependencies: foreach stages expanded from a profile's params, ``${...}`` interpolated, frozen
stages left out (as ``dvc repro`` leaves them). Tests run these commands verbatim, so a stage added
to ``dvc.yaml`` later is run too."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import yaml

__all__ = ["Job", "plan", "waves", "run_jobs"]

_VAR = re.compile(r"\$\{([A-Za-z0-9_.]+)\}")


@dataclass(frozen=True)
class Job:
    """One stage (or foreach item) with its interpolated commands (in order), deps and outs."""

    name: str
    cmds: tuple[str, ...]
    deps: tuple[str, ...]
    outs: tuple[str, ...]


def _lookup(params: Mapping[str, Any], dotted: str) -> Any:
    node: Any = params
    for part in dotted.split("."):
        node = node[part]
    return node


def _interp(text: str, params: Mapping[str, Any], item: str | None) -> str:
    return _VAR.sub(lambda m: str(item if m.group(1) == "item" else _lookup(params, m.group(1))), text)


def _paths(entries: list[Any]) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]


def plan(dvc_yaml: str, params: Mapping[str, Any], prefix: str = "") -> tuple[list[Job], list[str]]:
    """(every job ``dvc repro`` would run, the frozen stages it skips); ``prefix`` on every job's name."""
    jobs, frozen = [], []
    for name, st in yaml.safe_load(dvc_yaml)["stages"].items():
        body = st.get("do", st)
        if body.get("frozen"):
            frozen.append(name)
            continue
        items = _lookup(params, st["foreach"][2:-1]) if "foreach" in st else [None]
        for item in items:
            sub = lambda t: _interp(t, params, item)  # noqa: E731
            outs = [sub(p) for key in ("outs", "metrics", "plots") for p in _paths(body.get(key))]
            cmds = body["cmd"] if isinstance(body["cmd"], list) else [body["cmd"]]
            jobs.append(Job(prefix + (name if item is None else f"{name}@{item}"), tuple(sub(c) for c in cmds),
                            tuple(sub(p) for p in _paths(body.get("deps"))), tuple(outs)))
    return jobs, frozen


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _needs(jobs: list[Job]) -> dict[str, set[str]]:
    return {j.name: {k.name for k in jobs if k is not j
                     and any(_under(d, o) or _under(o, d) for d in j.deps for o in k.outs)} for j in jobs}


def waves(jobs: list[Job]) -> list[list[Job]]:
    """Jobs grouped so that each group depends only on earlier groups (Kahn's levels)."""
    needs = _needs(jobs)
    done: set[str] = set()
    out = []
    while len(done) < len(jobs):
        ready = [j for j in jobs if j.name not in done and needs[j.name] <= done]
        if not ready:
            raise ValueError(f"dependency cycle among {sorted(set(needs) - done)}")
        out.append(ready)
        done |= {j.name for j in ready}
    return out


def run_jobs(jobs: list[Job], run: Callable[[Job], None], workers: int = 2) -> None:
    """Run every job with ``workers`` at a time, each as soon as the jobs it depends on are done."""
    needs, done, pending = _needs(jobs), set(), list(jobs)
    waves(jobs)  # no cycle
    with ThreadPoolExecutor(workers) as pool:
        running: dict = {}
        while pending or running:
            for job in [j for j in pending if needs[j.name] <= done][: workers - len(running)]:
                running[pool.submit(run, job)] = job
                pending.remove(job)
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                f.result()
                done.add(running.pop(f).name)
