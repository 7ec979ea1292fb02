"""Layout validation, launch commands, the Kubernetes manifest, the memory estimate and the
int4 codec: everything that is checked without starting a process."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from seekdeep.errors import ConfigError
from seekdeep.models.deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM
from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM
from seekdeep.parallel import ParallelConfig, parallelize
from seekdeep.parallel.compression import dequantize_int4, quantize_int4
from seekdeep.parallel.launch import LaunchSpec, check_command, pytorchjob_manifest
from seekdeep.parallel.memory import GIB, count_parameters, estimate_memory

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- bad layouts


@pytest.mark.parametrize("spec, world, field", [
    ("dp_shard=3", 2, "mesh"),  # does not divide / match the world size
    ("dp_replicate=2,tp=2", 6, "mesh"),
    ("tp=4,dp_shard=-1", 6, "mesh"),
])
def test_mesh_that_does_not_fit_the_world_is_refused(spec, world, field):
    with pytest.raises(ConfigError) as err:
        ParallelConfig.from_string(spec).resolved(world)
    assert err.value.field == field


def test_dp_shard_fill_takes_the_ranks_left_over():
    assert ParallelConfig.from_string("tp=2,dp_shard=-1").resolved(8).dp_shard == 4


@pytest.mark.parametrize("config, spec, field, words", [
    (LlamaConfig.from_name("small"), "tp=3", "tp", "num_attention_heads=8"),  # 8 heads
    (LlamaConfig.from_name("small"), "tp=8", "tp", "num_key_value_heads=4"),  # GQA: 4 kv heads
    (LlamaConfig.from_name("tiny"), "pp=3", "pp", "2 layers"),
    (LlamaConfig.from_name("small"), "pp=2,pp_schedule=Interleaved1F1B,pp_virtual_stages=4", "pp", "4 layers"),
    (LlamaConfig.from_name("tiny", attention_backend="dsa"), "tp=2", "tp", "dsa"),
])
def test_layout_that_cannot_split_the_model_is_refused(config, spec, field, words):
    with pytest.raises(ConfigError) as err:
        ParallelConfig.from_string(spec).check_model(config)
    assert err.value.field == field and words in str(err.value)


@pytest.mark.parametrize("spec, field", [
    ("tp=0", "tp"), ("dp_shard=two", "dp_shard"), ("fsdp=2", "parallel"), ("pp_schedule=zigzag", "pp_schedule"),
    ("dp_shard=2,compression=int4", "compression"),  # hooks need plain DDP
    ("pp=2,pp_schedule=Interleaved1F1B", "pp_virtual_stages"),
])
def test_bad_spec_text_names_the_field(spec, field):
    with pytest.raises(ConfigError) as err:
        ParallelConfig.from_string(spec)
    assert err.value.field == field


def test_parallelize_checks_before_touching_the_model():
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig.from_name("small"))
    with pytest.raises(ConfigError) as err:
        parallelize(model, None, ParallelConfig(tp=2))  # one process, two tp ranks asked for
    assert err.value.field == "mesh"


# ----------------------------------------------------------------------------- launch


def test_launch_with_no_command_is_refused():
    with pytest.raises(ConfigError) as err:
        LaunchSpec(command=[], nproc=2)
    assert err.value.field == "command"


def test_launch_checks_the_train_layout_before_starting_processes(monkeypatch, capsys):
    import subprocess

    from seekdeep.cli import main

    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("a process was started"))
    sdpa = ["--attention-backend", "sdpa"]
    cases = [
        (["--nproc", "2", "--", "train", "--parallel", "dp_shard=4", *sdpa], "mesh"),  # 4-rank layout, 2 processes
        (["--nproc", "3", "--", "train", "--parallel", "tp=3", *sdpa], "tp"),  # tiny preset: 4 heads
        (["--nproc", "2", "--", "train", "--parallel", "pp=4,dp_shard=-1", *sdpa], "mesh"),
        (["--nproc", "2", "--", "train", "--parallel", "dp_shard=2", "--indexer-warmup-steps", "30"],
         "indexer_warmup_steps"),  # the dsa warm-up freezes the trunk
        (["--nproc", "2", "--", "train", *sdpa], "parallel"),  # two processes, no layout
        (["--nproc", "2"], "command"),
    ]
    for argv, field in cases:
        assert main(["launch", *argv]) == 2
        err = capsys.readouterr().err
        assert field in err or field.replace("_", "-") in err, (argv, err)
    with pytest.raises(ConfigError) as err:
        check_command(LaunchSpec(["train", "--parallel", "dp_shard=2", *sdpa], nproc=2, nnodes="1:3", rdzv_endpoint="h:1"))
    assert err.value.field == "nnodes"  # elastic world sizes need dp_shard=-1


def test_torchrun_command_lines():
    single = LaunchSpec(["train", "--steps", "3"], nproc=4).torchrun_argv()
    assert single[1:] == ["-m", "torch.distributed.run", "--nproc-per-node", "4", "--standalone",
                          "-m", "seekdeep.cli", "train", "--steps", "3"]
    elastic = LaunchSpec(["train"], nproc=8, nnodes="2:4", rdzv_endpoint="head:29400", rdzv_id="r1", max_restarts=3)
    argv = elastic.torchrun_argv()
    assert argv[argv.index("--nnodes") + 1] == "2:4" and argv[argv.index("--rdzv-endpoint") + 1] == "head:29400"
    assert argv[argv.index("--max-restarts") + 1] == "3"
    with pytest.raises(ConfigError) as err:
        LaunchSpec(["train"], nproc=8, nnodes="2:4").torchrun_argv()
    assert err.value.field == "rdzv_endpoint"
    with pytest.raises(ConfigError):
        LaunchSpec(["train"], nnodes="4:2")


def test_kubernetes_manifest_validates_against_the_pytorchjob_schema(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    import yaml

    from seekdeep.cli import main

    path = tmp_path / "job.yaml"
    assert main(["launch", "--k8s", str(path), "--image", "registry.local/seekdeep:0.1", "--gpus-per-worker", "8",
                 "--nnodes", "2:4", "--max-restarts", "3", "--memory", "900Gi", "--",
                 "train", "--parallel", "dp_shard=-1,tp=4", "--preset", "base", "--attention-backend", "sdpa"]) == 0
    manifest = yaml.safe_load(path.read_text())
    schema = json.loads((Path(__file__).parent / "pytorchjob_schema.json").read_text())
    jsonschema.validate(manifest, schema)
    worker = manifest["spec"]["pytorchReplicaSpecs"]["Worker"]
    assert worker["replicas"] == 4
    assert worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert manifest["spec"]["elasticPolicy"] == {"rdzvBackend": "c10d", "minReplicas": 2, "maxReplicas": 4,
                                                 "maxRestarts": 3, "nProcPerNode": 8}
    assert worker["template"]["spec"]["containers"][0]["args"][:3] == ["train", "--parallel", "dp_shard=-1,tp=4"]
    # the schema does catch mistakes: a misspelt policy field, a bad restart policy
    bad = json.loads(json.dumps(manifest))
    bad["spec"]["elasticPolicy"]["minReplica"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    with pytest.raises(ConfigError) as err:
        pytorchjob_manifest(LaunchSpec(["train"], nproc=8), image="")
    assert err.value.field == "image"


# ----------------------------------------------------------------------------- memory


@pytest.mark.parametrize("config", [
    LlamaConfig.from_name("small"),
    LlamaConfig.from_name("tiny", tie_word_embeddings=True, qk_norm=True, model_type="qwen3", qkv_bias=True),
    DeepseekV3Config.from_name("small"),
])
def test_parameter_count_matches_the_model(config):
    with torch.device("meta"):
        model = (DeepseekV3ForCausalLM if isinstance(config, DeepseekV3Config) else LlamaForCausalLM)(config)
    assert count_parameters(config).total == model.num_parameters()


def _llama(size: str) -> LlamaConfig:
    shapes = {"7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32),
              "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8)}
    return LlamaConfig(vocab_size=32000, max_position_embeddings=4096, **shapes[size])


def test_memory_estimate_by_hand():
    config = _llama("7b")
    p = count_parameters(config).total  # 6.74e9
    fsdp = estimate_memory(config, ParallelConfig(dp_shard=8, precision="bf16"), seq_len=4096, micro_batch_size=1)
    assert fsdp.parameters == int(4 * p / 8) and fsdp.optimizer == int(8 * p / 8)
    ddp = estimate_memory(config, ParallelConfig(dp_replicate=8, precision="bf16"), seq_len=4096, micro_batch_size=1)
    assert ddp.parameters + ddp.gradients + ddp.optimizer == 16 * p  # every replica holds everything
    # one layer's activations, no tp: tokens * (2 bytes * (4h norms + 4h q,k,v,out + 4i swiglu) + 4 * heads)
    tokens, h, i = 4096, 4096, 11008
    per_layer = tokens * (2 * (4 * h + 4 * h + 4 * i) + 4 * 32)
    assert fsdp.activations == 32 * per_layer
    ac = estimate_memory(config, ParallelConfig(dp_shard=8, precision="bf16", activation_checkpointing=True),
                         seq_len=4096, micro_batch_size=1)
    assert ac.activations == 32 * tokens * h * 2 + per_layer
    tp = estimate_memory(config, ParallelConfig(dp_shard=4, tp=2, precision="bf16"), seq_len=4096, micro_batch_size=1)
    assert tp.activations == 32 * tokens * (2 * (4 * h + 4 * h + 4 * i) // 2 + 4 * 16)  # sequence parallel halves all


def test_scaling_doc_numbers_come_from_the_estimate():
    """docs/scaling.md's table: each row's total is what estimate_memory computes."""
    text = (ROOT / "docs" / "scaling.md").read_text()
    rows = re.findall(r"^\| (7B|70B) \| (\d+) \| `([^`]+)` \| (\d+) \| (\d+) \| (yes|no) \|.*\| ([\d.]+) \|$", text, re.M)
    assert len(rows) >= 4
    for size, gpus, spec, seq, mbs, ac, total in rows:
        layout = ParallelConfig.from_string(spec, precision="bf16", activation_checkpointing=ac == "yes")
        assert layout.resolved(int(gpus)).world_size == int(gpus)
        est = estimate_memory(_llama(size.lower()), layout, seq_len=int(seq), micro_batch_size=int(mbs))
        assert round(est.total / GIB, 1) == float(total), (size, gpus, spec)


# ----------------------------------------------------------------------------- int4 codec


def test_int4_round_trip_error_is_within_half_a_step():
    x = torch.randn(1000) * torch.linspace(0.01, 3, 1000)
    packed, scales = quantize_int4(x, block_size=64)
    assert packed.dtype == torch.uint8 and packed.numel() == 16 * 64 // 2  # 16 blocks, two values a byte
    y = dequantize_int4(packed, scales, x.numel(), block_size=64)
    step = scales.float().repeat_interleave(64)[:1000]
    assert ((x - y).abs() <= step / 2 + 1e-6).all()
    assert torch.equal(dequantize_int4(*quantize_int4(torch.zeros(10)), 10), torch.zeros(10))
