"""Does this environment hold exactly a lock? Fast (``importlib.metadata``, no pip), standard library only.

``python diffpath/study/lockcheck.py requirements/cpu.lock.txt`` (the Makefile runs it before every
target that runs the study, with the environment's own Python) exits

* 0 when every locked package is installed at its locked version, and any package the lock does not
  list was either recorded by the paper profile's install step (:data:`EXTRAS_FILE`, written only
  after the study's imports were checked) or leaves the study's imports working;
* 1 (one line on stdout) when a locked package is missing or has another version: ``make``
  reinstalls the lock;
* 2 (one line on stderr) when packages the lock does not list break the study's imports (a
  torchvision built for another torch makes ``import diffusers`` fail): reinstalling the lock would
  not remove them, so ``make`` stops and the line says what to remove.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["canonical", "read_lock", "installed_versions", "lock_differences", "recorded_extras",
           "record_extras", "EXTRAS_FILE", "STUDY_IMPORTS", "main"]

#: where the paper profile's install step records what it added (under the environment's prefix)
EXTRAS_FILE = ".diffpath-extras.json"
#: what must import for the study to run (diffusers imports torchvision whenever it is installed)
STUDY_IMPORTS = ("torch", "diffusers.models.unets.unet_2d")
#: installed by venv/ensurepip or editable installs, never part of a lock's pins
_BOOTSTRAP = {"pip", "diffpath"}


def canonical(name: str) -> str:
    """PEP 503 name: lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: str | Path) -> dict[str, str]:
    """``{canonical name: version}`` of a pip-compile lock (``name==version \\`` lines)."""
    pins = {}
    for line in Path(path).read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+?)\s*\\?$", line)
        if m:
            pins[canonical(m.group(1))] = m.group(2)
    return pins


def installed_versions() -> dict[str, str]:
    """``{canonical name: version}`` of this interpreter's distributions (the first on
    ``sys.path`` when one is installed twice, as ``import`` finds it)."""
    out: dict[str, str] = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name:
            out.setdefault(canonical(name), dist.version)
    return out


def _same(a: str, b: str) -> bool:
    try:
        from packaging.version import Version

        return Version(a) == Version(b)
    except Exception:  # packaging missing or a non-PEP 440 version
        return a.strip().lower() == b.strip().lower()


def lock_differences(lock: Mapping[str, str], installed: Mapping[str, str],
                     allowed_extras: Mapping[str, str] = {}) -> tuple[list[str], list[str]]:
    """(locked packages missing or at another version, unlisted packages not recorded as allowed),
    each as ``"name have (lock want)"`` / ``"name version"`` strings."""
    wrong = [f"{n} {installed.get(n, 'missing')} (lock {v})" for n, v in sorted(lock.items())
             if n not in installed or not _same(installed[n], v)]
    extra = [f"{n} {v}" for n, v in sorted(installed.items())
             if n not in lock and n not in _BOOTSTRAP
             and not (n in allowed_extras and _same(allowed_extras[n], v))]
    return wrong, extra


def recorded_extras(prefix: str | Path = sys.prefix) -> dict[str, str]:
    """What the paper profile's install step added and checked (``{name: version}``)."""
    try:
        return {canonical(k): str(v) for k, v in json.loads((Path(prefix) / EXTRAS_FILE).read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def record_extras(prefix: str | Path, added: Mapping[str, str]) -> None:
    """Add ``added`` to the environment's record of checked extras."""
    have = recorded_extras(prefix)
    have.update({canonical(k): v for k, v in added.items()})
    (Path(prefix) / EXTRAS_FILE).write_text(json.dumps(dict(sorted(have.items())), indent=1) + "\n")


def imports_fail(python: str = sys.executable, modules: Sequence[str] = STUDY_IMPORTS) -> str | None:
    """The last line of the error when ``python`` cannot import ``modules`` (in a fresh process), else None."""
    r = subprocess.run([python, "-c", "import " + ", ".join(modules)], capture_output=True, text=True)
    if r.returncode == 0:
        return None
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit status {r.returncode}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lockcheck.py", description=__doc__.split("\n")[0])
    ap.add_argument("lock", help="the lock file the environment should hold")
    args = ap.parse_args(argv)
    env = sys.prefix
    wrong, extra = lock_differences(read_lock(args.lock), installed_versions(), recorded_extras(env))
    if wrong:
        print(f"{env}: {len(wrong)} locked package(s) differ from {args.lock}: {', '.join(wrong[:6])}"
              + (" …" if len(wrong) > 6 else "") + "; reinstalling the lock")
        return 1
    if extra:
        error = imports_fail()
        if error:
            names = " ".join(e.split()[0] for e in extra)
            print(f"diffpath: {env} holds packages {args.lock} does not list ({', '.join(extra)}) and the study's "
                  f"imports fail ({error}); remove them: {env}/bin/python -m pip uninstall -y {names} "
                  "(or start afresh: make clean-venv)", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
