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

from servers import ServerProcess


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
