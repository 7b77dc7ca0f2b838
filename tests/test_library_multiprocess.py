"""Two processes under `accelerate launch` (CPU, gloo) build the same library as one process.

Accelerate 1.x forks several CPU processes on one machine only through MPI (`--cpu`) or torchrun
(`--multi_gpu`, which with ACCELERATE_USE_CPU=true runs on the CPU with the gloo backend).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("sentence_transformers")
pytest.importorskip("accelerate")
pytest.importorskip("transformers")

import torch
from safetensors.torch import load_file
from testing_utils import planted_examples, save_tiny_encoder, save_tiny_llama

pytestmark = [pytest.mark.library, pytest.mark.slow]

SCRIPT = """
import logging, sys
from pathlib import Path

import torch
from peft import LoraConfig

from peft_cp_merge.library import ClusteringOptions, TrainingOptions, build_library, load_examples

logging.basicConfig(level=logging.INFO, format="pid=%(process)d %(name)s %(message)s")
torch.set_num_threads(1)
assets, out = Path(sys.argv[1]), Path(sys.argv[2])
build_library(
    load_examples(assets / "data.jsonl"),
    out,
    base_model=assets / "llama",
    encoder=assets / "encoder",
    lora_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    clustering=ClusteringOptions(k=3, sample_fraction=1.0, min_cluster_size=1),
    training=TrainingOptions(max_steps=2, batch_size=4),
    progress=False,
)
# A script that owns the launch ends the process group: left to interpreter exit, gloo's threads can
# abort a rank ("terminate called without an active exception") after all the work is done.
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(command, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stderr


def without_timings(manifest: dict) -> dict:
    for entry in manifest["clusters"]:
        entry["training"].pop("seconds")
    return manifest


def test_two_processes_build_the_same_library_as_one(tmp_path):
    assets = tmp_path / "assets"
    save_tiny_llama(assets / "llama")
    save_tiny_encoder(assets / "encoder")
    lines = [
        json.dumps({"instruction": e.instruction, "response": e.response})
        for e in planted_examples((12, 8, 4))
    ]
    (assets / "data.jsonl").write_text("\n".join(lines) + "\n")
    script = tmp_path / "build.py"
    script.write_text(SCRIPT)

    run([sys.executable, str(script), str(assets), "single"], tmp_path)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(free_port())]
    log = run([*launch, str(script), str(assets), "multi"], tmp_path)

    trainers = {pid for pid, _ in re.findall(r"pid=(\d+) \S+builder Trained (cluster_\d+)", log)}
    assert len(trainers) == 2, log[-4000:]  # both processes trained clusters
    single, multi = tmp_path / "single", tmp_path / "multi"
    manifest = without_timings(json.loads((single / "library.json").read_text()))
    assert without_timings(json.loads((multi / "library.json").read_text())) == manifest
    for entry in manifest["clusters"]:
        one = load_file(str(single / entry["folder"] / "adapter_model.safetensors"))
        two = load_file(str(multi / entry["folder"] / "adapter_model.safetensors"))
        assert one.keys() == two.keys()
        assert all(torch.equal(one[key], two[key]) for key in one)
