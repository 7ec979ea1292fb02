"""Run model-written code's doctests in a separate, restricted Python process.

What the sandbox does, per run:

- a fresh ``python -I -B`` child (isolated mode: no environment variables, no user site, no
  script directory on ``sys.path``; no bytecode written) in a temporary working directory that
  is removed afterwards, with a wall-clock timeout (the child is killed) and an environment
  holding only ``PATH``;
- resource limits in the child before any untrusted code runs: CPU seconds, address space,
  file size 0 (a write of any data fails), no core dumps, and no new processes (RLIMIT_NPROC;
  ignored by the kernel for root, which is why the audit hook below also refuses them);
- a ``sys.addaudithook`` hook (it cannot be removed from Python code) that refuses: opening a
  file for writing / appending / creating, removing, renaming or changing files and folders,
  sockets (create, connect, bind), subprocesses, ``os.system`` / ``exec*`` / ``fork`` /
  ``posix_spawn``, and loading native code through ``ctypes``;
- the function is executed in a copy of its own module's globals (so its doctests see the
  names they were written against; the module's attribute is replaced too, for doctests that
  call ``module.function``) and its doctests run with ``doctest.DocTestRunner``.

What it does not prevent: reading files the user can read (modules must be importable), using
memory and CPU up to the limits, code that reaches the interpreter's internals through paths
the audit events do not cover (e.g. a pre-imported C extension with its own I/O). It protects
the machine from accidents of generated code (a stray ``open(..., "w")``, ``shutil.rmtree``, a
network call, an endless loop); it is not a security boundary against adversarial code — run
untrusted models' RL inside a container or VM for that.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
from dataclasses import dataclass

# The child's bootstrap: limits, then the audit hook, then the task from stdin.
_BOOTSTRAP = r'''
import json, os, resource, sys
task = json.loads(sys.stdin.read())
cpu = max(1, int(task["cpu_seconds"]))
for limit, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_FSIZE, (0, 0)),
                     (resource.RLIMIT_CORE, (0, 0)), (resource.RLIMIT_NPROC, (0, 0)),
                     (resource.RLIMIT_AS, (task["memory_bytes"], task["memory_bytes"]))):
    try:
        resource.setrlimit(limit, value)
    except (ValueError, OSError):
        pass
import doctest, importlib, io  # imported before the hook: nothing else needs opening for write
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
REFUSED = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.link",
           "os.symlink", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile", "shutil.chown",
           "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto",
           "subprocess.Popen", "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn",
           "os.kill", "os.killpg", "ctypes.dlopen", "ctypes.cdata", "ctypes.dlsym", "os.startfile", "pty.spawn"}
def hook(event, args):
    if event == "open":
        mode, flags = args[1], args[2]
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & WRITE_FLAGS):
            raise PermissionError(f"sandbox: writing files is not allowed ({args[0]!r})")
    elif event in REFUSED:
        raise PermissionError(f"sandbox: {event} is not allowed")
sys.addaudithook(hook)
out = {"attempted": 0, "failed": 0, "error": None}
try:
    module = importlib.import_module(task["module"])
    namespace = dict(vars(module))
    # doctests may name the module ("textwrap.shorten(...)"): the module then holds the new function
    namespace.setdefault(task["module"].split(".")[0], importlib.import_module(task["module"].split(".")[0]))
    namespace.setdefault(task["module"].split(".")[-1], module)
    exec(compile(task["source"], "<completion>", "exec"), namespace)
    if "." not in task["name"] and task["name"] in namespace:
        setattr(module, task["name"], namespace[task["name"]])
    parser = doctest.DocTestParser()
    test = parser.get_doctest(task["docstring"], namespace, task["name"], "<completion>", 0)
    runner = doctest.DocTestRunner(verbose=False, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    sink = io.StringIO()
    result = runner.run(test, out=sink.write)
    out.update(attempted=result.attempted, failed=result.failed)
except BaseException as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"[:300]
sys.__stdout__.write("\n" + task["marker"] + json.dumps(out) + "\n")
sys.__stdout__.flush()
os._exit(0)
'''


@dataclass
class SandboxResult:
    """``status``: "ok" (doctests ran; ``attempted`` / ``failed`` examples), "error" (the code
    did not load or run: ``detail``), or "timeout"."""

    status: str
    attempted: int = 0
    failed: int = 0
    detail: str = ""

    @property
    def pass_rate(self) -> float:
        return (self.attempted - self.failed) / self.attempted if self.status == "ok" and self.attempted else 0.0


def run_doctests(module: str, source: str, name: str, docstring: str, timeout: float = 2.0,
                 memory_bytes: int = 1 << 30) -> SandboxResult:
    """Run ``docstring``'s examples against ``source`` (a function named ``name``) executed in
    the namespace of ``module``, in the sandbox described above."""
    marker = f"@@seekdeep-sandbox-{secrets.token_hex(8)}@@"  # generated code cannot forge the report line
    task = {"marker": marker, "module": module, "source": source, "name": name, "docstring": docstring,
            "cpu_seconds": timeout + 1, "memory_bytes": memory_bytes}
    with tempfile.TemporaryDirectory(prefix="seekdeep-sandbox-") as cwd:
        try:
            proc = subprocess.run([sys.executable, "-I", "-B", "-c", _BOOTSTRAP], input=json.dumps(task), cwd=cwd,
                                  capture_output=True, text=True, timeout=timeout, env={"PATH": os.environ.get("PATH", "")})
        except subprocess.TimeoutExpired:
            return SandboxResult("timeout", detail=f"no result within {timeout}s")
    lines = [line[len(marker):] for line in proc.stdout.splitlines() if line.startswith(marker)]
    if not lines:
        return SandboxResult("error", detail=(proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1][:300])
    report = json.loads(lines[-1])
    if report["error"]:
        return SandboxResult("error", report["attempted"], report["failed"], report["error"])
    return SandboxResult("ok", report["attempted"], report["failed"])
