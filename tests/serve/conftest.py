import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread avoids thread-pool overhead (and contention) per op."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m seekdeep.cli serve ...`` on a free 127.0.0.1 port."""

    def __init__(self, args: list[str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "seekdeep.cli", "serve", *args, "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "warning"],
            stdout=self._log, stderr=subprocess.STDOUT, env=env,
        )

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Two tiny models sharing one tokenizer: 'small' (dsa attention) and 'large' (sdpa, 3 layers)."""
    from seekdeep.cli import make_default_model
    from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM
    from seekdeep.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("serve-models")
    small = root / "small"
    make_default_model(small)
    large = root / "large"
    tokenizer = Tokenizer.from_pretrained(small)
    config = json.loads((small / "config.json").read_text())
    config.update(num_hidden_layers=3, attention_backend="sdpa", attention_options={})
    cfg = LlamaConfig.from_hf_dict(config)
    torch.manual_seed(1)
    model = LlamaForCausalLM(cfg)
    model.init_weights()
    model.save_pretrained(large)
    tokenizer.save_pretrained(large)
    return small, large


@pytest.fixture(scope="session")
def server(model_dirs, tmp_path_factory):
    small, large = model_dirs
    proc = ServerProcess([str(small), str(large), "--max-num-seqs", "16", "--route-threshold", "64",
                          "--max-queue", "512", "--num-blocks", "512"],
                         tmp_path_factory.mktemp("server-log") / "server.log")
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def server_process():
    """The ServerProcess class, for tests that start a server of their own."""
    return ServerProcess
