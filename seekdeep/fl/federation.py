"""A local Flower federation on 127.0.0.1: one ``flower-superlink``, N ``flower-supernode``
processes and ``flwr run``, each in its own process group (Flower processes start children --
the ServerApp and ClientApp processes -- that outlive a killed parent), all stopped together.

Nothing here is Flower-specific protocol: these are Flower's own executables on free ports,
the same commands a deployment across machines runs (see the README).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seekdeep.errors import SeekdeepError

APP_NAME = "seekdeep-fl"
SECAGG_CLIENT_MODULE = "seekdeep_fl_secagg_client"


class FederationError(SeekdeepError, RuntimeError):
    """A Flower process failed to start or the run failed; the message says which and where its log is."""


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 now (bound together so none repeats)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_app(app_dir: Path, run_config: dict[str, Any], secure: str) -> Path:
    """The Flower app's pyproject (``flwr new`` needs a network): its components are the
    seekdeep modules, its config the run's settings. No dependencies to install at run time."""
    app_dir.mkdir(parents=True, exist_ok=True)
    if secure == "secaggplus":
        server = "seekdeep.fl.app.secagg:server_app"
        # a module inside the app itself: SecAgg+'s stages that do not train start without torch
        import shutil

        shutil.copyfile(Path(__file__).parent / "app" / "secagg_shim.py", app_dir / f"{SECAGG_CLIENT_MODULE}.py")
        client = f"{SECAGG_CLIENT_MODULE}:client_app"
    else:
        server, client = "seekdeep.fl.app.server:app", "seekdeep.fl.app.client:app"
        (app_dir / f"{SECAGG_CLIENT_MODULE}.py").unlink(missing_ok=True)
    lines = [
        "[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
        "[project]", f'name = "{APP_NAME}"', 'version = "1.0.0"', "dependencies = []", "",
        "[tool.hatch.build.targets.wheel]", 'packages = ["."]', "",
        "[tool.flwr.app]", 'publisher = "seekdeep"', "",
        "[tool.flwr.app.components]", f'serverapp = "{server}"', f'clientapp = "{client}"', "",
        "[tool.flwr.app.config]",
        *[f"{key} = {_toml_value(value)}" for key, value in run_config.items()], "",
    ]
    (app_dir / "pyproject.toml").write_text("\n".join(lines), encoding="utf-8")
    return app_dir


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.is_file():
        raise FederationError(f"{name} not found beside {sys.executable}; install the fl extra: "
                              "pip install 'seekdeep[fl]'")
    return str(path)


def _wait_port(port: int, proc: subprocess.Popen, what: str, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FederationError(f"{what} exited with code {proc.returncode} while starting; see {log}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise FederationError(f"{what} did not open 127.0.0.1:{port} within {timeout:.0f}s; see {log}")


@dataclass
class LocalFederation:
    """SuperLink + SuperNodes on 127.0.0.1, started by :meth:`start`, stopped by :meth:`stop`
    (also usable as a context manager). ``node_configs``: one dict per SuperNode."""

    work_dir: Path
    node_configs: list[dict[str, Any]]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.work_dir = Path(self.work_dir).resolve()  # the processes run with it as their cwd
        self.log_dir = self.work_dir / "logs"
        self.flwr_home = self.work_dir / "flwr-home"
        self.env = {**os.environ, "FLWR_HOME": str(self.flwr_home),
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")
        # its own session and process group: stop() signals the whole group, children included
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
                                cwd=self.work_dir)
        log.close()
        self.processes[name] = proc
        self._write_pids()
        return proc

    def _write_pids(self) -> None:
        pids = {name: proc.pid for name, proc in self.processes.items() if proc.poll() is None}
        (self.work_dir / "processes.json").write_text(json.dumps(pids), encoding="utf-8")

    def start(self) -> "LocalFederation":
        fleet, serverappio, control, *clientappio = free_ports(3 + len(self.node_configs))
        self.control_address = f"127.0.0.1:{control}"
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "{self.control_address}"\ninsecure = true\n',
            encoding="utf-8")
        link = self._spawn("superlink", [
            _bin("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
            "--fleet-api-address", f"127.0.0.1:{fleet}", "--serverappio-api-address", f"127.0.0.1:{serverappio}",
            # in-memory state: a restarted SuperLink must not wait for the nodes of a previous one
            "--control-api-address", self.control_address])
        _wait_port(control, link, "flower-superlink", self.log_dir / "superlink.log")
        _wait_port(fleet, link, "flower-superlink", self.log_dir / "superlink.log")
        nodes = []
        for i, (node_config, port) in enumerate(zip(self.node_configs, clientappio)):
            text = " ".join(f"{k}={_toml_value(v)}" for k, v in node_config.items())
            nodes.append((i, port, self._spawn(f"supernode-{i}", [
                _bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{fleet}",
                "--clientappio-api-address", f"127.0.0.1:{port}", "--node-config", text])))
        for i, port, proc in nodes:  # all started at once: their imports overlap
            _wait_port(port, proc, f"flower-supernode {i}", self.log_dir / f"supernode-{i}.log")
        return self

    def run(self, app_dir: Path, on_poll=None, poll_seconds: float = 1.0) -> int:
        """``flwr run APP local --stream`` until it exits; ``on_poll()`` is called while it runs.
        A SuperLink that dies meanwhile ends the run. Returns flwr run's exit code."""
        proc = self._spawn("flwr-run", [_bin("flwr"), "run", str(Path(app_dir).resolve()), "local", "--stream"])
        while proc.poll() is None:
            if on_poll is not None:
                on_poll()
            if self.processes["superlink"].poll() is not None:
                self._stop_one("flwr-run")
                return -1
            time.sleep(poll_seconds)
        if on_poll is not None:
            on_poll()
        return proc.returncode

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal one process group (drills and tests: a SuperNode dropping out). SIGKILL: a
        crash, which the SuperLink notices after two missed heartbeats (flwr 1.32: 30 s each, not
        configurable); SIGTERM: the SuperNode leaves (it deactivates itself: noticed at once)."""
        proc = self.processes[name]
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def _stop_groups(self, names: list[str], grace: float = 5.0) -> None:
        """SIGTERM every named process group at once (Flower's graceful exits take seconds each:
        they overlap), SIGKILL what is left after ``grace`` seconds, then the groups' leftovers."""
        procs = [(name, self.processes[name]) for name in names if name in self.processes]
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            alive = []
            for _, proc in procs:
                try:
                    os.killpg(proc.pid, sig)  # the group: Flower's child processes too
                    alive.append(proc)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            for proc in alive:
                try:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            if all(proc.poll() is not None for _, proc in procs):
                break
        for _, proc in procs:  # the leaders are gone; make sure nothing of their groups lingers
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _stop_one(self, name: str, grace: float = 5.0) -> None:
        self._stop_groups([name], grace)

    def stop(self) -> None:
        # the run first (it would report the SuperLink going away), then the rest together
        self._stop_groups([name for name in self.processes if name == "flwr-run"])
        self._stop_groups([name for name in self.processes if name != "flwr-run"])
        self._write_pids()

    def __enter__(self) -> "LocalFederation":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
