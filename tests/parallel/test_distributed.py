"""Real multi-process runs: torchrun subprocesses on gloo, compared with one process.

Each test starts one torchrun and runs several layouts inside it (the processes pay for
importing torch once); the one-process references run in the test process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import parallel_worker as worker  # noqa: E402

pytestmark = pytest.mark.slow
REL = 1e-5


def torchrun(nproc: int, *args: str, timeout: int = 300) -> None:
    # --standalone: the rendezvous binds its own port (port 0), so parallel tests never race
    # for a port picked and released beforehand.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
           str(HERE / "parallel_worker.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def references() -> dict[str, list[float]]:
    return {family: worker.single_process_losses(family) for family in ("llama", "qwen3", "deepseek")}


TWO_PROCESS_LAYOUTS = [
    "llama:dp_replicate=2",  # DDP
    "llama:dp_shard=2",  # FSDP2
    "llama:tp=2",  # DTensor TP + sequence parallel (tied embeddings)
    "llama:TensorParallel",  # the seed-shaped wrapper on a materialised model
    "qwen3:tp=2,sequence_parallel=false",  # per-head q/k norms, gated attention, untied head
    "llama:pp=2",  # 1F1B, tied embeddings split across stages
    "llama:pp=2,pp_schedule=Interleaved1F1B,pp_virtual_stages=2",
    "deepseek:dp_shard=2",  # MLA + MoE
    "deepseek:tp=2",
]


@pytest.fixture(scope="module")
def two_process_losses(tmp_path_factory) -> dict[str, list[float]]:
    out = tmp_path_factory.mktemp("parity") / "losses.json"
    torchrun(2, "parity", str(out), *TWO_PROCESS_LAYOUTS)
    return json.loads(out.read_text())


@pytest.mark.parametrize("layout", TWO_PROCESS_LAYOUTS)
def test_two_processes_match_one(layout, two_process_losses, references):
    family = layout.split(":")[0]
    assert two_process_losses[layout] == pytest.approx(references[family], rel=REL)


def test_four_process_meshes_match_one(tmp_path, references):
    layouts = ["llama:dp_shard=2,tp=2", "llama:pp=2,tp=2"]  # 2x2 meshes: FSDP x TP, pipeline x TP
    out = tmp_path / "losses.json"
    torchrun(4, "parity", str(out), *layouts)
    losses = json.loads(out.read_text())
    for layout in layouts:
        assert losses[layout] == pytest.approx(references[layout.split(":")[0]], rel=REL), layout


def test_checkpoint_reshards_across_layouts(tmp_path):
    """Save with FSDP on 2 ranks; load (model + AdamW state) on 1 process, on 2 ranks with
    tensor parallelism and on a 2-stage pipeline; the next step's loss is the same everywhere."""
    torchrun(2, "ckpt-save", str(tmp_path), "llama:dp_shard=2")
    saved = json.loads((tmp_path / "save.json").read_text())
    reference = worker.single_process_losses("llama", steps=3)
    assert saved["first"] + saved["next"] == pytest.approx(reference, rel=REL)

    one = worker.single_process_resume(tmp_path / "run")
    assert one["data_state"] == {"cursor": 2}
    assert one["next"] == pytest.approx(saved["next"], rel=REL)

    torchrun(2, "ckpt-load", str(tmp_path), "llama:tp=2", "llama:pp=2")
    loaded = json.loads((tmp_path / "load.json").read_text())
    for layout in ("llama:tp=2", "llama:pp=2"):
        assert loaded[layout]["next"] == pytest.approx(saved["next"], rel=REL), layout
    assert not list((tmp_path / "run").glob(".*")), "no temporary directory is left behind"


def test_int4_hook_converges_like_uncompressed(tmp_path):
    out = tmp_path / "compress.json"
    torchrun(2, "compress", str(out), "allreduce", "int4")
    result = json.loads(out.read_text())
    plain, int4 = result["allreduce"], result["int4"]
    final = lambda r: sum(r["losses"][-5:]) / 5  # noqa: E731
    assert final(plain) < plain["losses"][0] - 1.5  # the task is learned
    assert final(int4) == pytest.approx(final(plain), rel=0.02)
    assert int4["bytes_per_step"] < 0.15 * plain["bytes_per_step"]  # 4 bits + scales vs fp32 ring all-reduce


def test_train_recipe_under_launch_matches_one_process(tmp_path, monkeypatch):
    """`seekdeep launch --nproc 2 -- train --parallel dp_shard=2` logs the same losses as
    `seekdeep train`, prints once (rank 0), and leaves a loadable final model."""
    import seekdeep
    from seekdeep.data.corpus import stdlib_root
    from seekdeep.recipes.train import TrainConfig, train

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for rel in ("json/decoder.py", "json/encoder.py", "textwrap.py", "string.py", "bisect.py", "heapq.py"):
        (corpus / rel.replace("/", "_")).write_text((stdlib_root() / rel).read_text(encoding="utf-8"), encoding="utf-8")
    home = tmp_path / "home"
    monkeypatch.setenv("SEEKDEEP_HOME", str(home))
    args = dict(data=str(corpus), vocab_size=400, seq_len=32, batch_size=4, steps=4, eval_interval=2, eval_batches=1,
                checkpoint_interval=2, attention_backend="sdpa", sample_tokens=4, progress=False)
    train(TrainConfig(**args, output_dir=str(tmp_path / "one")))

    argv = [sys.executable, "-m", "seekdeep.cli", "launch", "--nproc", "2", "--",
            "train", "--parallel", "dp_shard=2", "--output-dir", str(tmp_path / "two")]
    for key, value in args.items():
        argv += [f"--{key.replace('_', '-')}", str(value)] if not isinstance(value, bool) else ["--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "SEEKDEEP_HOME": str(home)}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count("held-out perplexity") == 1  # rank 0 only

    def records(run):
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    one, two = records("one"), records("two")
    assert [r["kind"] for r in one] == [r["kind"] for r in two]
    for a, b in zip(one, two):
        key = "loss" if a["kind"] == "train" else "eval_loss"
        assert b[key] == pytest.approx(a[key], rel=REL), (a, b)
    model = seekdeep.AutoModel.from_pretrained(tmp_path / "two" / "final")
    reference = seekdeep.AutoModel.from_pretrained(tmp_path / "one" / "final")
    for (name, p), (_, q) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert (p - q).abs().max() < 1e-5, (name, float((p - q).abs().max()))  # Adam amplifies ~1e-7 noise a little
