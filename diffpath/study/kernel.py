"""The Jupyter kernel the study's notebooks run in: "Python (diffpath)".

Every notebook names the kernel ``diffpath`` (display name "Python (diffpath)"): ``make lab``
registers it for JupyterLab (``ipykernel install --sys-prefix --name diffpath``), and the stage
runner starts it without any registration, as the interpreter that runs the stage
(:class:`StudyKernelManager`), so the pipeline runs wherever only the default kernel exists (CI, a
fresh clone) and the executed notebooks name the same kernel as the committed ones.

The runner's kernel talks over IPC sockets (files in a private temporary folder) rather than TCP:
nothing listens on a port, and the kernel has no reason to warn that TCP traffic is unencrypted.
It is shut down without the SIGINT that jupyter_client sends first (the notebook has finished, the
kernel is idle), which ipykernel would log as "KeyboardInterrupt caught in kernel".
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpec
from jupyter_client.manager import AsyncKernelManager

__all__ = ["KERNEL_NAME", "DISPLAY_NAME", "KERNELSPEC", "StudyKernelManager", "study_kernel"]

KERNEL_NAME = "diffpath"
DISPLAY_NAME = "Python (diffpath)"
#: the ``kernelspec`` metadata of every notebook of the study
KERNELSPEC: dict[str, str] = {"display_name": DISPLAY_NAME, "language": "python", "name": KERNEL_NAME}


class StudyKernelManager(AsyncKernelManager):
    """A kernel manager whose ``diffpath`` kernel is this interpreter's ipykernel.

    It needs no installed kernelspec: the spec is built here from :data:`sys.executable`, so the
    kernel runs in the environment that runs the stage.
    """

    @property
    def kernel_spec(self) -> KernelSpec:
        if self._kernel_spec is None:
            self._kernel_spec = KernelSpec(
                argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                display_name=DISPLAY_NAME, language="python", name=KERNEL_NAME)
        return self._kernel_spec

    async def _async_interrupt_kernel(self) -> None:
        if self.shutting_down:  # the notebook has finished: a shutdown request is enough
            return
        await super()._async_interrupt_kernel()

    interrupt_kernel = _async_interrupt_kernel  # type: ignore[assignment]


@contextmanager
def study_kernel() -> Iterator[dict[str, Any]]:
    """papermill's keyword arguments for a run in the study's kernel: :class:`StudyKernelManager`
    (started, and shut down, by the notebook client) on IPC sockets in a fresh private folder,
    removed afterwards."""
    from traitlets.config import Config

    with tempfile.TemporaryDirectory(prefix="diffpath-kernel-") as tmp:
        config = Config({"StudyKernelManager": {"transport": "ipc", "ip": str(Path(tmp) / "ipc")}})
        yield {"kernel_name": KERNEL_NAME, "kernel_manager_class": StudyKernelManager, "config": config}
