"""Records the files a process (and every kernel it starts) opens, creates, renames or removes.

Put this folder first on ``PYTHONPATH`` with ``DIFFPATH_AUDIT_LOG=<folder>`` and
``DIFFPATH_AUDIT_UNDER=<dir>[:<dir>...]``: every Python process started with that environment
(a stage runner, papermill's kernels) appends ``event<TAB>mode<TAB>absolute path`` lines to
``<folder>/<pid>.log`` for paths under those directories (:func:`sys.addaudithook`, PEP 578).
The paper-profile test reads them to check that no stage touches a file outside its profile's roots.
"""

import os
import sys

_LOG = os.environ.get("DIFFPATH_AUDIT_LOG")
_UNDER = tuple(os.path.join(os.path.abspath(d), "") for d in os.environ.get("DIFFPATH_AUDIT_UNDER", "").split(":") if d)
_EVENTS = {"open", "os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.listdir", "os.scandir"}

if _LOG and _UNDER:
    _fd = os.open(os.path.join(_LOG, f"{os.getpid()}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def _relative_to_a_dir_fd(event: str, args: tuple) -> bool:
        """An operation on a name inside an open directory (``shutil.rmtree`` walks that way): its
        path is not relative to the working directory, and the walk's top is recorded already."""
        if event in ("os.remove", "os.rmdir", "os.mkdir", "os.rename"):
            return any(isinstance(a, int) and a >= 0 for a in args[2 if event in ("os.mkdir", "os.rename") else 1:])
        if event == "open" and args[1] is None and not os.path.isabs(args[0]):  # os.open(name, dir_fd=...)
            return not (args[2] & os.O_CREAT) and not os.path.lexists(args[0])
        return False

    def _hook(event: str, args: tuple) -> None:
        if event not in _EVENTS or not args or isinstance(args[0], int) or args[0] is None:
            return
        if _relative_to_a_dir_fd(event, args):
            return
        try:
            path = os.path.abspath(os.fsdecode(args[0]))
        except (TypeError, ValueError):
            return
        if not path.startswith(_UNDER):
            return
        mode = str(args[1]) if event == "open" and len(args) > 1 and args[1] is not None else ""
        os.write(_fd, f"{event}\t{mode}\t{path}\n".encode("utf-8", "surrogateescape"))

    sys.addaudithook(_hook)
