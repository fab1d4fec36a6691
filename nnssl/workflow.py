"""Console scripts run in a workspace of their own: nnU-Net's environment, one logged step per script.

``nnssl_demo``, the benchmark scripts and the tests run the real console scripts (``nnUNetv2_train``,
``nnssl_make_split``, ...) as child processes whose nnU-Net folders point into a work folder. This module is that
seam: :func:`nnunet_env` makes the environment as a dict (``os.environ`` is never changed), :func:`run_step`
runs a script with it, logs the command, its output and its duration and raises :class:`StepFailed` with the
output's tail when it fails, and :class:`Workspace` holds a work folder's environment and log and records its
steps. :func:`environ` is for the few nnssl functions called in-process that read nnU-Net's folders from
``os.environ``: it restores the environment after the block.

Importing this module imports neither torch nor nnU-Net.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from nnssl.commands.trainer_path import ext_trainer_value
from nnssl.utils import UserInputError

# nnU-Net's folder variables, in the order of nnunet_env's ``folders``
FOLDER_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
TAIL_CHARS = 3000  # output shown in a StepFailed message


class StepFailed(UserInputError):
    """A console script exited with an error or ran past its timeout; the message ends with its output's tail.

    A :class:`~nnssl.utils.UserInputError`, so that commands print it without a traceback (exit code 2)."""


def console_script(name: str) -> str:
    """The path of the console script ``name``: this environment's (next to ``sys.executable``), else on PATH.

    Raises:
        UserInputError: when neither has it (nnssl or nnU-Net not installed in this environment).
    """
    path = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.isfile(path):
        return path
    found = shutil.which(name)
    if found is None:
        raise UserInputError(f"console script {name} not found next to {sys.executable} nor on PATH: install nnssl "
                             f"(pip install -e . in its folder, which also installs nnU-Net) into this environment")
    return found


def nnunet_env(root: str, base: Optional[Mapping[str, str]] = None, folders: Sequence[str] = FOLDER_VARS,
               **extra) -> Dict[str, str]:
    """An environment for nnU-Net's and nnssl's scripts with nnU-Net's folders under ``root``.

    Args:
        root: the work folder.
        base: the environment to start from (default ``os.environ``, which is copied, never changed).
        folders: the raw, preprocessed and results folders' names under ``root`` (default: the variables' names).
        extra: more variables (values converted with ``str``); they win over everything else.

    Returns:
        A copy of ``base`` with ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results`` under ``root`` and
        ``nnUNet_extTrainer`` naming nnssl's re-export folder first (so that the stock commands find the
        ``nnSSL_*`` trainers), the folders it named before kept after it.
    """
    env = dict(os.environ if base is None else base)
    env.update({var: os.path.join(root, name) for var, name in zip(FOLDER_VARS, folders)})
    env["nnUNet_extTrainer"] = ext_trainer_value(env.get("nnUNet_extTrainer"))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def planner_env(env: Mapping[str, str]) -> Dict[str, str]:
    """``env`` without ``nnUNet_n_proc_DA``, for ``nnUNetv2_plan_and_preprocess`` and ``nnUNetv2_preprocess``:
    nnU-Net's experiment planner calls ``torch.set_num_threads(nnUNet_n_proc_DA)``, which fails for the 0 that
    CPU trainings use."""
    return {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}


@contextlib.contextmanager
def environ(values: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` updated with ``values`` inside the block and restored after it.

    For nnssl functions called in-process that read nnU-Net's folders from the environment when they run (e.g.
    :func:`nnssl.preprocessing.splits.labeled_case_ids`); ``nnunetv2.paths`` reads them once, when first imported.
    """
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class Step:
    """One finished run of a console script."""

    title: str
    command: str  # the arguments as given (script names, not paths), shell-quoted: for logs and results files
    returncode: int  # negative: ended by that signal (-9 when killed at its timeout)
    timed_out: bool
    seconds: float
    peak_rss_mb: Optional[float]  # the child's peak resident memory (None where os.wait4 does not exist)
    output: str  # stdout and stderr, interleaved as written
    log: Optional[str]  # the file that has the output too

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def tail(self, chars: int = TAIL_CHARS) -> str:
        return self.output[-chars:]

    def raise_if_failed(self) -> None:
        """Raise :class:`StepFailed` (naming the step, the exit status, the log and the output's tail) unless ok."""
        if self.ok:
            return
        status = "ran past its timeout" if self.timed_out else f"failed (exit code {self.returncode})"
        where = f"; the whole output is in {self.log}" if self.log else ""
        raise StepFailed(f"step '{self.title}' {status}: {self.command}{where}\n--- end of its output ---\n"
                         f"{self.tail()}")


def _wait(p: subprocess.Popen, timeout: Optional[float]) -> Tuple[bool, Optional[float]]:
    """Wait for ``p`` (killed once ``timeout`` seconds have passed): (timed out, its peak RSS in MB or None)."""
    if not hasattr(os, "wait4"):  # Windows: no resource usage of a child
        try:
            p.wait(timeout)
            return False, None
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            return True, None
    deadline = None if timeout is None else time.monotonic() + timeout
    timed_out = False
    while True:
        pid, status, usage = os.wait4(p.pid, os.WNOHANG if deadline is not None else 0)
        if pid:
            p.returncode = os.waitstatus_to_exitcode(status)
            return timed_out, usage.ru_maxrss / (1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0)
        if not timed_out and time.monotonic() > deadline:
            p.kill()
            timed_out = True
        time.sleep(0.05)


def run_step(args: Sequence, env: Mapping[str, str], title: Optional[str] = None, log: Optional[str] = None,
             cwd: Optional[str] = None, timeout: Optional[float] = None, check: bool = True,
             echo: Optional[str] = None) -> Step:
    """Run a console script with the environment ``env`` and return its :class:`Step`.

    Args:
        args: the script and its arguments (converted with ``str``). A bare name is found with
            :func:`console_script`; a path (e.g. ``sys.executable``) is run as it is.
        env: the child's whole environment (see :func:`nnunet_env`).
        title: the step's name in messages (default: the script's name).
        log: a file that gets ``$ <command>``, the output as it is written and a line with the exit status and
            the duration (appended); None: the output is only kept in the returned step.
        cwd: the child's working folder (default: this process's).
        timeout: seconds after which the child is killed (None: no limit).
        check: raise :class:`StepFailed` when the script fails.
        echo: print ``[<echo>] <time> <title>: <command>`` before the step (None: print nothing).
    """
    args = [str(a) for a in args]
    command = shlex.join(args)
    title = title or os.path.basename(args[0])
    executable = console_script(args[0]) if os.path.basename(args[0]) == args[0] else args[0]
    if echo:
        print(f"[{echo}] {time.strftime('%H:%M:%S')} {title}: {command}", flush=True)
    if log:
        os.makedirs(os.path.dirname(os.path.abspath(log)), exist_ok=True)
    with (open(log, "a+b") if log else tempfile.TemporaryFile()) as sink:
        sink.write(f"\n$ {command}\n".encode())
        sink.flush()
        begin = sink.tell()
        start = time.monotonic()
        p = subprocess.Popen([executable] + args[1:], env=dict(env), cwd=cwd, stdout=sink, stderr=subprocess.STDOUT)
        timed_out, peak_rss_mb = _wait(p, timeout)
        seconds = time.monotonic() - start
        sink.seek(begin)
        output = sink.read().decode(errors="replace")
        sink.write(f"[{'timed out' if timed_out else f'exit code {p.returncode}'} after {seconds:.1f} s]\n".encode())
    step = Step(title, command, p.returncode, timed_out, seconds, peak_rss_mb, output, log)
    if check:
        step.raise_if_failed()
    return step


class Workspace:
    """A work folder whose nnU-Net folders are inside it, with the environment that points there.

    Runs console scripts in that environment (:meth:`run`), each logged to ``log`` and recorded in :attr:`steps`,
    and lends its folders to in-process nnssl functions for a block (:meth:`environ`).
    """

    def __init__(self, root: str, env: Optional[Mapping[str, str]] = None,
                 log: Union[None, str, Callable[[str], str]] = None, echo: Optional[str] = None):
        """``env``: the environment (default :func:`nnunet_env` of ``root``); ``log``: the log file of every step,
        or a function of a step's title that names its log file (None: no log); ``echo``: the prefix of the line
        printed per step (None: quiet)."""
        self.root = os.path.abspath(root)
        self.env: Dict[str, str] = nnunet_env(self.root) if env is None else dict(env)
        self.log = log
        self.echo = echo
        self.steps: List[Step] = []

    @property
    def raw(self) -> str:
        return self.env["nnUNet_raw"]

    @property
    def preprocessed(self) -> str:
        return self.env["nnUNet_preprocessed"]

    @property
    def results(self) -> str:
        return self.env["nnUNet_results"]

    def run(self, args: Sequence, title: Optional[str] = None, env: Optional[Mapping[str, str]] = None,
            log: Optional[str] = None, timeout: Optional[float] = None, check: bool = True) -> Step:
        """:func:`run_step` with this workspace's environment (or ``env``) and log (or ``log``); the step is
        recorded in :attr:`steps` before a failure is raised."""
        title = title or os.path.basename(str(args[0]))
        log = log or (self.log(title) if callable(self.log) else self.log)
        step = run_step(args, self.env if env is None else env, title, log, timeout=timeout, check=False,
                        echo=self.echo)
        self.steps.append(step)
        if check:
            step.raise_if_failed()
        return step

    def environ(self):
        """A context manager: ``os.environ`` has this workspace's nnU-Net folders inside the block (see
        :func:`environ`)."""
        return environ({k: self.env[k] for k in FOLDER_VARS})
