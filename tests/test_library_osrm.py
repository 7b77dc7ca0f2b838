"""Libraries with ``TrainingOptions(init="osrm")``: each cluster's adapter starts against the others.

The reference is independent of the builder's shortcut (total minus own): ``osrm_init`` run directly
on the other clusters' examples must give the same ``lora_A`` subspace.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("sentence_transformers")
pytest.importorskip("accelerate")
pytest.importorskip("transformers")

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from testing_utils import planted_examples, save_tiny_encoder, save_tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_cp_merge import osrm_init
from peft_cp_merge.cli import main
from peft_cp_merge.library import ClusteringOptions, TrainingOptions, build_library, load_library
from peft_cp_merge.library import cluster_init as cluster_init_module
from peft_cp_merge.library.builder import _settings
from peft_cp_merge.library.training import encode_example
from peft_cp_merge.osrm import input_moments

pytestmark = pytest.mark.library

SIZES = (12, 8, 4)
CLUSTERING = ClusteringOptions(k=3, sample_fraction=1.0, min_cluster_size=1)
OSRM = TrainingOptions(max_steps=1, batch_size=4, init="osrm", osrm_examples=100)  # samples = whole clusters


def lora_config():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from sentence_transformers import SentenceTransformer

    root = tmp_path_factory.mktemp("osrm_library_assets")
    return SimpleNamespace(
        root=root,
        llama=save_tiny_llama(root / "llama"),
        encoder=SentenceTransformer(str(save_tiny_encoder(root / "encoder")), device="cpu"),
        examples=planted_examples(SIZES),
    )


class Untrained:
    """A train_fn that trains nothing (the saved lora_A is the initialised one); can interrupt."""

    def __init__(self, interrupt_at=None):
        self.interrupt_at, self.trained = interrupt_at, []

    def __call__(self, model, examples, output_dir):
        if output_dir.name == self.interrupt_at:
            raise KeyboardInterrupt
        self.trained.append(output_dir.name)
        return {"examples": len(examples)}


def build(assets, out, train_fn):
    return build_library(
        assets.examples,
        out,
        base_model=assets.llama,
        lora_config=lora_config(),
        encoder=assets.encoder,
        clustering=CLUSTERING,
        training=OSRM,
        train_fn=train_fn,
        progress=False,
    )


@pytest.fixture(scope="module")
def built(assets, tmp_path_factory):
    return build(assets, tmp_path_factory.mktemp("osrm") / "library", Untrained())


def lora_a(folder):
    weights = load_file(str(folder / "adapter_model.safetensors"))
    return {k: v for k, v in weights.items() if k.endswith("lora_A.weight")}


def other_moments(assets, labels, index):
    """Module -> the direct input moments of every cluster but ``index`` (the reference), and the report."""
    tokenizer = AutoTokenizer.from_pretrained(str(assets.llama))
    others = [assets.examples[i] for i in np.flatnonzero(labels != index)]
    rows = [
        {"input_ids": encode_example(e, tokenizer, prompt_template="{instruction}\n", max_length=512)[0]}
        for e in others
    ]
    torch.manual_seed(0)
    reference = get_peft_model(AutoModelForCausalLM.from_pretrained(str(assets.llama)), lora_config())
    moments = input_moments(reference, "default", rows, max_examples=len(rows))
    moment_of = {name: m for group, m in zip(moments.groups, moments.sums, strict=True) for name in group}
    return moment_of, osrm_init(reference, "default", moments, progress=False), len(others)


def assert_bottom_rows(folder, moment_of):
    """Each saved ``lora_A`` has the least energy possible on the other clusters' inputs."""
    for key, a in lora_a(folder).items():
        m = moment_of[key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")]
        energy = float(torch.einsum("rd,de,re->", a.double(), m, a.double()))
        smallest = float(torch.linalg.eigvalsh(m)[: a.shape[0]].sum())
        # The library's moments are total minus own, each a sum of float32 batch products: they
        # match the direct ones to float32 rounding, which is all a (near-)null space holds here.
        assert energy == pytest.approx(smallest, rel=1e-4, abs=1e-6 * float(m.trace()))


def test_each_adapter_starts_orthogonal_to_the_other_clusters_inputs(built, assets):
    labels = np.load(built.path / built.manifest.assignments_file)
    for entry, folder in zip(built.manifest.clusters, built.adapter_dirs, strict=True):
        moment_of, report, n_others = other_moments(assets, labels, entry.index)
        assert_bottom_rows(folder, moment_of)
        osrm = entry.training["osrm"]
        assert osrm["other_examples"] == n_others == report.examples
        assert osrm["energy_ratio_mean"] == pytest.approx(report.energy_ratio_mean, rel=1e-4, abs=1e-6)
        assert osrm["energy_ratio_mean"] < 0.1 < 0.5 < osrm["replaced_energy_ratio_mean"]


def test_manifest_records_the_init_and_the_default_settings_are_unchanged(built, assets):
    data = json.loads((built.path / "library.json").read_text())
    assert data["settings"]["init"] == {"init": "osrm", "osrm_examples": 100, "osrm_freeze_a": False}
    default = _settings(assets.examples, "m", lora_config(), None, CLUSTERING, TrainingOptions(), None, 42)
    assert "init" not in default  # a library built before the option still resumes
    assert not {"init", "osrm_examples", "osrm_freeze_a"} & set(default["training"])


def counted_build(assets, out, monkeypatch, gb_per_set):
    """Builds with every set of statistics taken as ``gb_per_set`` GB; returns the rows per moments call."""
    seen = []
    original = cluster_init_module.input_moments

    def counting(model, adapter, rows, **kwargs):
        seen.append(len(rows))
        return original(model, adapter, rows, **kwargs)

    monkeypatch.setattr(cluster_init_module, "input_moments", counting)
    monkeypatch.setattr(cluster_init_module, "statistics_gb", lambda model, adapter: gb_per_set)
    return build(assets, out, Untrained()), seen


def test_statistics_of_each_sample_are_computed_once_when_they_fit(built, assets, tmp_path, monkeypatch):
    library, seen = counted_build(assets, tmp_path / "library", monkeypatch, gb_per_set=1.0)  # 5 sets fit
    assert sorted(seen) == sorted(SIZES)  # every example once; cluster k sums the other samples' moments
    for folder, reference in zip(library.adapter_dirs, built.adapter_dirs, strict=True):
        a, b = lora_a(folder), lora_a(reference)
        assert all(torch.equal(a[key], b[key]) for key in b)  # the default build is this one


def test_with_three_sets_only_the_total_minus_own_is_used(assets, tmp_path, monkeypatch):
    library, seen = counted_build(assets, tmp_path / "library", monkeypatch, gb_per_set=2.0)  # 6 GB: 3 sets
    assert sum(seen) == 2 * sum(SIZES)  # every example twice (total, own), not K - 1 times
    assert len(seen) == 1 + len(SIZES)
    labels = np.load(library.path / library.manifest.assignments_file)
    for entry, folder in zip(library.manifest.clusters, library.adapter_dirs, strict=True):
        assert_bottom_rows(folder, other_moments(assets, labels, entry.index)[0])


def test_a_model_too_large_for_total_minus_own_initialises_each_cluster_directly(
    assets, tmp_path, monkeypatch
):
    monkeypatch.setattr(cluster_init_module, "MAX_MEMORY_GB", 1e-9)  # every module in its own pass
    monkeypatch.setattr(cluster_init_module, "input_moments", None)  # the shortcut must not run
    library = build(assets, tmp_path / "library", Untrained())
    labels = np.load(library.path / library.manifest.assignments_file)
    for entry, folder in zip(library.manifest.clusters, library.adapter_dirs, strict=True):
        assert_bottom_rows(folder, other_moments(assets, labels, entry.index)[0])


def test_resume_after_interruption_gives_the_uninterrupted_adapters(built, assets, tmp_path):
    out = tmp_path / "library"
    with pytest.raises(KeyboardInterrupt):
        build(assets, out, Untrained(interrupt_at=".cluster_01.partial"))
    finished = (out / "cluster_00" / "adapter_model.safetensors").stat().st_mtime_ns
    again = Untrained()
    library = build(assets, out, again)
    assert again.trained == [".cluster_01.partial", ".cluster_02.partial"]
    assert (out / "cluster_00" / "adapter_model.safetensors").stat().st_mtime_ns == finished
    for folder, reference in zip(library.adapter_dirs, built.adapter_dirs, strict=True):
        a, b = lora_a(folder), lora_a(reference)
        assert all(torch.equal(a[key], b[key]) for key in b)
    assert library.manifest.complete


def test_cli_init_osrm_with_the_built_in_trainer(assets, tmp_path):
    data = tmp_path / "data.jsonl"
    records = [{"instruction": e.instruction, "response": e.response} for e in assets.examples]
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    args = ["build-library", "--data", str(data), "--base-model", str(assets.llama)]
    args += ["--encoder", str(assets.root / "encoder"), "--out", str(tmp_path / "lib"), "--k", "3"]
    args += ["--target-modules", "q_proj", "v_proj", "--lora-r", "4", "--max-steps", "1", "--batch-size", "4"]
    args += ["--sample-fraction", "1", "--min-cluster-size", "1", "--no-progress"]
    args += ["--init", "osrm", "--osrm-examples", "3", "--osrm-freeze-a"]
    assert main(args) == 0
    manifest = load_library(tmp_path / "lib").manifest
    assert manifest.settings["init"] == {"init": "osrm", "osrm_examples": 3, "osrm_freeze_a": True}
    for entry in manifest.clusters:
        assert entry.training["steps"] == 1
        assert entry.training["osrm"]["frozen_a"]
        assert entry.training["osrm"]["other_examples"] == 6  # 3 from each of the two other clusters
