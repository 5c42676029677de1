"""What the paper profile installs into an environment that lacks it, and how it never breaks one.

The paper sets' downloaders need torchvision (built for the torch already installed) and gdown
(CelebA's Google Drive files). The GPU lock (``requirements/paper-gpu.lock.txt``, ``make paper`` on a
GPU machine) holds both, so nothing is installed there. In the CPU environment they are installed on
first need, and every such step is a transaction:

1. the environment is recorded (every distribution and its version, in a fresh process);
2. pip runs under a constraints file that pins every installed distribution except the ones asked
   for, so nothing else can be replaced; the files of an asked-for distribution that is already
   there (a torchvision of the wrong release) are copied aside first;
3. afterwards the new packages, torch and diffusers' UNet are imported in a fresh process
   (diffusers imports torchvision whenever it is installed: a torchvision built for another torch
   makes every stage fail with ``operator torchvision::nms does not exist``);
4. if pip failed or an import fails, everything is undone: what was added is uninstalled, what was
   replaced is put back from the copy, and the imports are checked again. The report says what was
   installed, what was undone and whether the environment is as before.

A kept install is recorded in the environment (:data:`diffpath.study.lockcheck.EXTRAS_FILE`), so the
Makefile's lock check accepts it. Each torchvision release is built against one torch release:
``0.(m+15)`` for torch ``2.m`` (0.28 for 2.13, 0.29 for 2.14), ``0.(m+1)`` for torch ``1.m``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from diffpath.study.lockcheck import canonical, imports_fail, record_extras

__all__ = ["torchvision_for", "pip_commands", "installed_version", "paper_requirements_missing",
           "install_paper_requirements", "InstallReport", "environment", "PYTORCH_INDEX"]

PYTORCH_INDEX = "https://download.pytorch.org/whl"
#: the import names of what the step installs
_MODULES = {"torchvision": "torchvision", "gdown": "gdown"}


def torchvision_for(torch_version: str) -> str:
    """The pip requirement of the torchvision built for ``torch_version`` (e.g. ``"2.13.0+cpu"``
    → ``"torchvision==0.28.*"``)."""
    m = re.match(r"^(\d+)\.(\d+)", torch_version)
    if not m:
        raise ValueError(f"cannot parse the torch version {torch_version!r}")
    major, minor = int(m.group(1)), int(m.group(2))
    if major == 2:
        return f"torchvision==0.{minor + 15}.*"
    if major == 1 and minor >= 5:
        return f"torchvision==0.{minor + 1}.*"
    raise ValueError(f"no known torchvision release for torch {torch_version}")


_QUERY = r"""
import importlib.metadata as md, json, re, sys
want = set(sys.argv[1:])
dists = {}
for d in md.distributions():
    if not d.metadata["Name"]:
        continue
    name = re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower()
    if name in dists:
        continue  # shadowed: import finds the first on sys.path
    entry = {"version": d.version}
    if name in want:
        entry["files"] = [str(d.locate_file(f)) for f in (d.files or [])]
    dists[name] = entry
print(json.dumps({"prefix": sys.prefix, "dists": dists}))
"""


def environment(python: str, files_of: Sequence[str] = ()) -> tuple[str, dict[str, dict]]:
    """(sys.prefix, ``{name: {"version", "files"?}}``) of ``python``'s environment, read in a fresh
    process; ``files_of``: names whose installed files are listed too."""
    r = subprocess.run([python, "-c", _QUERY, *files_of], capture_output=True, text=True, check=True)
    out = json.loads(r.stdout)
    return out["prefix"], out["dists"]


def installed_version(dist: str) -> str | None:
    """The installed version of a distribution in this interpreter, or None."""
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def paper_requirements_missing(versions: Mapping[str, str] | None = None) -> list[str]:
    """Requirements of the paper sets' downloaders not satisfied by ``versions`` (``{name: version}``;
    default: this interpreter's): a torchvision for the installed torch, gdown."""
    if versions is None:
        versions = {n: v for n in ("torch", "torchvision", "gdown") if (v := installed_version(n))}
    torch_v = versions.get("torch")
    want = torchvision_for(torch_v) if torch_v else "torchvision"
    have = versions.get("torchvision")
    missing = []
    if have is None or (torch_v and not have.startswith(want.split("==")[-1].rstrip("*"))):
        missing.append(want)
    if versions.get("gdown") is None:
        missing.append("gdown")
    return missing


def pip_commands(python: str, torch_version: str, constraints: str | Path, missing: list[str] | None = None,
                 pytorch_index: bool = True, pip: Sequence[str] | None = None) -> list[list[str]]:
    """The pip command lines that install ``missing`` (default: torchvision and gdown) next to
    ``torch_version`` without replacing anything: ``constraints`` pins what is installed;
    ``pytorch_index`` adds PyTorch's index of the installed build (``+cpu``, ``+cu128``, …);
    ``pip``: the command that runs pip (default ``python -m pip``)."""
    missing = missing if missing is not None else [torchvision_for(torch_version), "gdown"]
    run_pip = list(pip) if pip else [python, "-m", "pip"]
    quick = ["--retries", "1", "--timeout", "15"]
    cmds: list[list[str]] = []
    tv = [r for r in missing if r.startswith("torchvision")]
    if tv:  # --no-deps: torch, numpy and Pillow are there already
        cmd = [*run_pip, "install", *quick, "--no-deps", *tv, "-c", str(constraints)]
        label = torch_version.partition("+")[2]
        if label and pytorch_index:  # the installed build's torchvision is on that index
            cmd += ["--extra-index-url", f"{PYTORCH_INDEX}/{label}"]
        cmds.append(cmd)
    rest = [r for r in missing if not r.startswith("torchvision")]
    if rest:
        cmds.append([*run_pip, "install", *quick, *rest, "-c", str(constraints)])
    return cmds


@dataclass
class InstallReport:
    """What an install step did: ``installed`` (name → (version before or None, version after)),
    ``undone`` (what the rollback did), ``restored`` (the environment is as before), ``problems``."""

    environment: str = ""
    installed: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    undone: list[str] = field(default_factory=list)
    restored: bool = True
    problems: list[str] = field(default_factory=list)

    @property
    def kept(self) -> bool:
        """Whether the environment holds changes now (an install that stayed)."""
        return bool(self.installed) and not self.undone

    def changes(self) -> list[str]:
        """Human lines: what was installed (and kept or undone)."""
        if not self.installed:
            return []
        what = ", ".join(f"{n} {new}" + (f" (replacing {old})" if old else "") if new else f"{n} {old} removed"
                         for n, (old, new) in self.installed.items())
        if not self.undone:
            return [f"installed into {self.environment}: {what} (kept: the study's imports work)"]
        state = ("the environment is as before" if self.restored
                 else "the environment could NOT be fully restored; rebuild it: make clean-venv setup")
        return [f"installed into {self.environment}: {what}; undone: {'; '.join(self.undone)}; {state}"]


def _pip_prefix(python: str, pip: Sequence[str] | None) -> list[str]:
    if pip:
        return list(pip)
    env = os.environ.get("DIFFPATH_PIP", "").strip()  # another pip, e.g. a wrapper (tests)
    return shlex.split(env) if env else [python, "-m", "pip"]


def _diff(before: Mapping[str, dict], after: Mapping[str, dict]) -> dict[str, tuple[str | None, str | None]]:
    names = sorted(set(before) | set(after))
    changed = {n: (before.get(n, {}).get("version"), after.get(n, {}).get("version")) for n in names}
    return {n: v for n, v in changed.items() if v[0] != v[1]}


def _copy_aside(dists: Mapping[str, dict], names: Sequence[str], folder: Path) -> dict[str, list[tuple[str, str]]]:
    """Copy the installed files of ``names`` into ``folder``; ``{name: [(original, copy)]}``."""
    saved: dict[str, list[tuple[str, str]]] = {}
    for name in names:
        pairs = []
        for i, f in enumerate(dists.get(name, {}).get("files", [])):
            if os.path.isfile(f):
                copy = folder / name / f"{i:06d}"
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, copy)
                pairs.append((f, str(copy)))
        saved[name] = pairs
    return saved


def _rollback(python: str, pip: Sequence[str], changed: Mapping[str, tuple[str | None, str | None]],
              saved: Mapping[str, list[tuple[str, str]]]) -> list[str]:
    """Uninstall every changed distribution that is there now, then put back the saved files of
    those that were there before; returns what was done."""
    done = []
    now = [n for n, (_, new) in changed.items() if new]
    if now:
        r = subprocess.run([*pip, "uninstall", "-y", *now], capture_output=True, text=True)
        done.append(f"uninstalled {', '.join(f'{n} {changed[n][1]}' for n in now)}"
                    + ("" if r.returncode == 0 else f" (pip uninstall failed: {r.stderr.strip()[-200:]})"))
    for name, (old, _) in changed.items():
        if old is None:
            continue
        if saved.get(name):
            for original, copy in saved[name]:
                os.makedirs(os.path.dirname(original), exist_ok=True)
                shutil.copy2(copy, original)
            done.append(f"put back {name} {old}")
        else:  # not anticipated: reinstall that version from the index
            r = subprocess.run([*pip, "install", "--no-deps", f"{name}=={old}"], capture_output=True, text=True)
            done.append(f"reinstalled {name} {old}" + ("" if r.returncode == 0 else " (failed)"))
    return done


def _run_pip(cmds: list[list[str]]) -> str | None:
    """Run the pip commands in order; the failing one, or None."""
    for cmd in cmds:
        print("+ " + " ".join(cmd), file=sys.stderr)
        if subprocess.run(cmd).returncode != 0:
            return " ".join(cmd[cmd.index("install"):])
    return None


def _transaction(python: str, pip: Sequence[str], missing: list[str], index: bool) -> InstallReport:
    """Install ``missing`` into ``python``'s environment; undo it all if pip or the imports fail."""
    asked = [canonical(re.split(r"[=<>!~ ]", r)[0]) for r in missing]
    prefix, before = environment(python, files_of=asked)
    report = InstallReport(environment=prefix)
    with tempfile.TemporaryDirectory() as tmp:
        cons = Path(tmp) / "constraints.txt"
        cons.write_text("".join(f"{n}=={d['version']}\n" for n, d in before.items() if n not in asked))
        saved = _copy_aside(before, [n for n in asked if n in before], Path(tmp) / "aside")
        failed = _run_pip(pip_commands(python, before["torch"]["version"], cons, missing, index, pip))
        _, after = environment(python)
        report.installed = _diff(before, after)
        broken = (f"`pip {failed}` failed" if failed else None) or imports_fail(
            python, ["torch", *[_MODULES.get(n, n.replace("-", "_")) for n in asked if n in after],
                     "diffusers.models.unets.unet_2d"])
        if not broken:
            record_extras(prefix, {n: new for n, (_, new) in report.installed.items() if new})
            return report
        report.undone = _rollback(python, pip, report.installed, saved) if report.installed else []
        _, final = environment(python)
        report.restored = not _diff(before, final) and imports_fail(python) is None
    report.problems.append(f"install: {' and '.join(missing)} (for the data sets' downloaders) could not be "
                           f"installed working ({broken}); without them the data sets cannot be downloaded: put "
                           "them in place by hand (the paper profile's message says where), or run the profile "
                           "in the GPU environment (`make paper` on a machine with a GPU)")
    return report


def install_paper_requirements(python: str = sys.executable, dry_run: bool = False,
                               pip: Sequence[str] | None = None) -> InstallReport:
    """Install what :func:`paper_requirements_missing` lists into ``python``'s environment, as a
    transaction (module docstring). ``pip``: the command that runs pip (default ``python -m pip``,
    or ``$DIFFPATH_PIP``)."""
    prefix, dists = environment(python)
    versions = {n: d["version"] for n, d in dists.items()}
    if "torch" not in versions:
        return InstallReport(prefix, problems=["torch is not installed in this environment (run `make setup`)"])
    missing = paper_requirements_missing(versions)
    if not missing:
        return InstallReport(prefix)
    run_pip = _pip_prefix(python, pip)
    custom = run_pip != [python, "-m", "pip"]
    if dry_run:
        for cmd in pip_commands(python, versions["torch"], "constraints.txt", missing, True, run_pip):
            print("+ " + " ".join(cmd), file=sys.stderr)
        return InstallReport(prefix)
    if not custom and not _online():
        return InstallReport(prefix, problems=[
            f"install: {' and '.join(missing)} (for the data sets' downloaders) cannot be installed: "
            "pypi.org is unreachable (offline?)"])
    return _transaction(python, run_pip, missing, index=not custom and _online("download.pytorch.org"))


def _online(host: str = "pypi.org", port: int = 443, timeout: float = 3.0) -> bool:
    """Whether the package index answers (fail fast offline, instead of pip's minutes of retries)."""
    import socket

    if os.environ.get("DIFFPATH_OFFLINE", "").strip().lower() in {"1", "true", "yes"}:
        return False
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False
