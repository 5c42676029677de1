"""What the paper profile installs into the study's environment: torchvision (for the data sets'
downloaders) built for the torch already installed, and gdown (CelebA's Google Drive files).

An unpinned ``pip install torchvision`` resolves to the newest torchvision, which requires the newest
torch and replaces the installed one (with several GB of CUDA wheels). Each torchvision release is
built against one torch release: torchvision ``0.(m+15)`` for torch ``2.m`` (0.28 for 2.13, 0.29
for 2.14; torchvision's README table), ``0.(m+1)`` for torch ``1.m``. :func:`pip_commands`
installs exactly that release with ``--no-deps`` (torch, numpy and Pillow are there already), from
PyTorch's index for the installed build (``+cpu``, ``+cu128``, …) when it has a local label, and
gdown under a constraint that pins the installed torch. Nothing else is replaced.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["torchvision_for", "pip_commands", "installed_version", "paper_requirements_missing",
           "install_paper_requirements"]

PYTORCH_INDEX = "https://download.pytorch.org/whl"


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


def installed_version(dist: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def paper_requirements_missing() -> list[str]:
    """Requirements of the paper profile's downloaders not satisfied here: a torchvision for the
    installed torch, gdown."""
    torch_v = installed_version("torch")
    missing = []
    want = torchvision_for(torch_v) if torch_v else "torchvision"
    have = installed_version("torchvision")
    prefix = want.split("==")[-1].rstrip("*")
    if have is None or (torch_v and not have.startswith(prefix)):
        missing.append(want)
    if installed_version("gdown") is None:
        missing.append("gdown")
    return missing


def pip_commands(python: str, torch_version: str, constraints: str | Path,
                 missing: list[str] | None = None, pytorch_index: bool = True) -> list[list[str]]:
    """The pip command lines that install ``missing`` (default: torchvision and gdown) next to
    ``torch_version`` without replacing it. ``constraints``: a file pinning ``torch==VERSION``;
    ``pytorch_index``: add PyTorch's index of the installed build (``+cpu``, ``+cu128``, …)."""
    missing = missing if missing is not None else [torchvision_for(torch_version), "gdown"]
    cmds: list[list[str]] = []
    quick = ["--retries", "1", "--timeout", "15"]
    tv = [r for r in missing if r.startswith("torchvision")]
    if tv:
        cmd = [python, "-m", "pip", "install", *quick, "--no-deps", *tv]
        label = torch_version.partition("+")[2]
        if label and pytorch_index:  # the installed build's torchvision is on that index
            cmd += ["--extra-index-url", f"{PYTORCH_INDEX}/{label}"]
        cmds.append(cmd)
    rest = [r for r in missing if not r.startswith("torchvision")]
    if rest:
        cmds.append([python, "-m", "pip", "install", *quick, *rest, "-c", str(constraints)])
    return cmds


def _online(host: str = "pypi.org", port: int = 443, timeout: float = 3.0) -> bool:
    """Whether the package index answers (fail fast offline, instead of pip's minutes of retries)."""
    import os
    import socket

    if os.environ.get("DIFFPATH_OFFLINE", "").strip().lower() in {"1", "true", "yes"}:
        return False
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def install_paper_requirements(python: str = sys.executable, dry_run: bool = False) -> list[str]:
    """Install what :func:`paper_requirements_missing` lists; returns the problems (empty when all
    went well). The installed torch is checked to be unchanged afterwards."""
    torch_v = installed_version("torch")
    if torch_v is None:
        return ["torch is not installed in this environment (run `make setup`)"]
    missing = paper_requirements_missing()
    if not missing:
        return []
    if not dry_run and not _online():
        return [f"install: {' and '.join(missing)} (for the data sets' downloaders) cannot be installed: "
                "pypi.org is unreachable (offline?)"]
    with tempfile.TemporaryDirectory() as tmp:
        cons = Path(tmp) / "constraints.txt"
        cons.write_text(f"torch=={torch_v}\n")
        index = dry_run or _online("download.pytorch.org")
        for cmd in pip_commands(python, torch_v, cons, missing, pytorch_index=index):
            print("+ " + " ".join(cmd), file=sys.stderr)
            if dry_run:
                continue
            if subprocess.run(cmd).returncode != 0:
                return [f"install: `{' '.join(cmd[3:])}` failed (offline? needs the package index); the "
                        f"data sets' downloaders need {' and '.join(missing)} (torch {torch_v} stays)"]
    if not dry_run and installed_version("torch") != torch_v:  # pragma: no cover - pip obeyed --no-deps
        return [f"install: torch changed from {torch_v} to {installed_version('torch')}"]
    return []
