"""Building, resuming and merging adapter libraries on a tiny random Llama (peft_cp_merge.library)."""

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
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from testing_utils import planted_examples, planted_texts, save_tiny_encoder, save_tiny_llama
from transformers import AutoModelForCausalLM

from peft_cp_merge.library import (
    ClusteringOptions,
    TrainingOptions,
    build_library,
    library_merge_inputs,
    library_weights,
    load_library,
    merge_library,
)

pytestmark = pytest.mark.library

GROUP_SIZES = (12, 8, 4)  # unequal, so size-proportional and uniform merge weights differ
CLUSTERING = ClusteringOptions(k=3, sample_fraction=1.0, min_cluster_size=1)
TRAINING = TrainingOptions(max_steps=2, batch_size=4)


def lora_config():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from sentence_transformers import SentenceTransformer

    root = tmp_path_factory.mktemp("library_assets")
    encoder = SentenceTransformer(str(save_tiny_encoder(root / "encoder")), device="cpu")
    return SimpleNamespace(
        root=root,
        llama=save_tiny_llama(root / "llama"),
        encoder=encoder,
        examples=planted_examples(GROUP_SIZES),
        groups=planted_texts(GROUP_SIZES)[1],
    )


@pytest.fixture(scope="module")
def built(assets):
    """A library built once with the built-in trainer (base model given as a folder)."""
    return build_library(
        assets.examples,
        assets.root / "library",
        base_model=assets.llama,
        lora_config=lora_config(),
        encoder=assets.encoder,
        clustering=CLUSTERING,
        training=TRAINING,
        progress=False,
    )


def lora_deltas(folder, scaling):
    """Module name -> scaling * B @ A of a saved adapter."""
    weights = load_file(str(folder / "adapter_model.safetensors"))
    return {
        key.removesuffix(".lora_A.weight"): scaling * weights[key.replace("lora_A", "lora_B")] @ weights[key]
        for key in weights
        if key.endswith("lora_A.weight")
    }


def test_library_builds_end_to_end(built, assets):
    from sklearn.metrics import adjusted_rand_score

    manifest = built.manifest
    assert manifest.complete
    labels = np.load(built.path / manifest.assignments_file)
    assert adjusted_rand_score(assets.groups, labels) == 1.0  # the planted groups became the clusters
    assert sorted(manifest.sizes) == sorted(GROUP_SIZES)
    assert np.load(built.path / manifest.centroids_file).shape == (3, 128)
    for entry, folder in zip(manifest.clusters, built.adapter_dirs, strict=True):
        assert entry.training["steps"] == TRAINING.max_steps
        assert entry.training["examples"] == entry.size
        assert all(text in {e.instruction for e in assets.examples} for text in entry.examples)
        base = AutoModelForCausalLM.from_pretrained(str(assets.llama))
        model = PeftModel.from_pretrained(base, str(folder))
        lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
        assert lora_b
        assert all(p.abs().sum() > 0 for p in lora_b)  # lora_B starts at zero: non-zero means trained


def test_manifest_records_settings_and_versions(built, assets):
    data = json.loads((built.path / "library.json").read_text())
    assert data["settings"]["base_model"] == str(assets.llama)
    assert data["settings"]["seed"] == 42
    assert data["settings"]["clustering"]["k"] == 3
    assert data["package_version"]
    assert load_library(built.path).manifest == built.manifest


class Recorder:
    """A user training function: marks each adapter, records which clusters it trained."""

    def __init__(self, interrupt_at=None):
        self.trained, self.interrupt_at = [], interrupt_at

    def __call__(self, model, examples, output_dir):
        if output_dir.name == self.interrupt_at:
            raise KeyboardInterrupt
        assert isinstance(model, PeftModel)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.fill_(len(examples) / 100)
        (output_dir / "notes.txt").write_text("written by the user's function")
        self.trained.append(output_dir.name)
        return {"examples": len(examples)}


def test_resume_after_interruption_skips_finished_clusters(assets, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(str(assets.llama))
    original = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    out = tmp_path / "library"
    kwargs = {
        "base_model": base,
        "lora_config": lora_config(),
        "encoder": assets.encoder,
        "clustering": CLUSTERING,
        "progress": False,
    }
    with pytest.raises(KeyboardInterrupt):
        build_library(assets.examples, out, train_fn=Recorder(interrupt_at=".cluster_01.partial"), **kwargs)
    assert not load_library(out).manifest.complete
    assert (out / ".cluster_01.partial").is_dir()
    (out / "cluster_02").mkdir()  # a cluster folder left half-written by some other crash
    (out / "cluster_02" / "adapter_config.json").write_text("{}")
    finished = (out / "cluster_00" / "adapter_model.safetensors").stat().st_mtime_ns

    recorder = Recorder()
    library = build_library(assets.examples, out, train_fn=recorder, **kwargs)
    assert recorder.trained == [".cluster_01.partial", ".cluster_02.partial"]
    assert (out / "cluster_00" / "adapter_model.safetensors").stat().st_mtime_ns == finished
    assert not any(path.name.endswith(".partial") for path in out.iterdir())
    assert library.manifest.complete
    assert [entry.training for entry in library.manifest.clusters] == [
        {"examples": s} for s in library.manifest.sizes
    ]
    assert all((folder / "notes.txt").is_file() for folder in library.adapter_dirs)
    assert not hasattr(base, "peft_config")  # the loaded base model got its adapters removed again
    assert all(torch.equal(original[name], tensor) for name, tensor in base.state_dict().items())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"examples": []}, "examples is empty"),
        ({"clustering": ClusteringOptions(k=30)}, "larger than the data"),
        ({"clustering": ClusteringOptions(k=3, min_cluster_size=25)}, "min_cluster_size=25"),
        ({"lora_config": {"r": 4}}, "lora_config must be a peft.LoraConfig"),
        ({"base_model": torch.nn.Linear(2, 2)}, "needs tokenizer="),
        ({"embed_batch_size": 0}, "embed_batch_size"),
    ],
)
def test_bad_inputs_raise_and_write_nothing(assets, tmp_path, change, message):
    out = tmp_path / "library"
    kwargs = {
        "examples": assets.examples,
        "base_model": assets.llama,
        "lora_config": lora_config(),
        "encoder": assets.encoder,
        "progress": False,
        **change,
    }
    with pytest.raises(ValueError, match=message):
        build_library(out_dir=out, **kwargs)
    assert not out.exists()


def test_foreign_folder_is_refused(assets, tmp_path):
    (tmp_path / "notes.txt").write_text("not a library")
    with pytest.raises(ValueError, match="not empty and not an adapter library"):
        build_library(
            assets.examples,
            tmp_path,
            base_model=assets.llama,
            lora_config=lora_config(),
            encoder=assets.encoder,
        )
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]


def test_existing_library_with_other_settings_is_refused(built, assets):
    before = (built.path / "library.json").read_bytes()
    with pytest.raises(ValueError, match=r"other settings \(was, now\): \{'seed': \(42, 7\)\}"):
        build_library(
            assets.examples,
            built.path,
            base_model=assets.llama,
            lora_config=lora_config(),
            encoder=assets.encoder,
            clustering=CLUSTERING,
            training=TRAINING,
            seed=7,
        )
    assert (built.path / "library.json").read_bytes() == before


def test_library_weights():
    assert library_weights([30, 10]) == [0.75, 0.25]
    assert library_weights([30, 10], "uniform") == [0.5, 0.5]
    with pytest.raises(ValueError, match="Unknown weights 'mean'"):
        library_weights([30, 10], "mean")
    with pytest.raises(ValueError, match="Need 2 finite weights"):
        library_weights([30, 10], [1.0])


# The sum-like cp (whitening and the flat spectrum off): exact at full rank, weights summing to 1.
SUM_LIKE = {"whiten": False, "isotropic": False}


@pytest.mark.parametrize(
    "weights", [None, "size", "uniform", [0.5, -1.0, 2.0]], ids=["default", "size", "uniform", "explicit"]
)
def test_merge_library_is_the_weighted_sum_at_full_rank(built, tmp_path, weights):
    pytest.importorskip("peft_cp_merge.folders.merging")
    sizes = built.manifest.sizes
    assert len(set(sizes)) == 3  # unequal clusters: "size" and "uniform" give different weights
    if weights in (None, "size"):  # the default is cluster-size proportional
        expected_weights = [size / sum(sizes) for size in sizes]
    elif weights == "uniform":
        expected_weights = [1 / 3] * 3
    else:
        expected_weights = weights
    kwargs = {} if weights is None else {"weights": weights}
    inputs = library_merge_inputs(built.path, options=SUM_LIKE, **kwargs)
    assert list(inputs.weights) == pytest.approx(expected_weights)
    rank = 3 * 4  # the sum of the adapters' ranks: the CP fit is exact
    result = merge_library(
        built.path, tmp_path / "merged", rank=rank, progress=False, options=SUM_LIKE, **kwargs
    )
    merged = lora_deltas(result.out_dir, scaling=1.0)  # merged adapters have r = lora_alpha
    inputs = [lora_deltas(folder, scaling=8 / 4) for folder in built.adapter_dirs]
    for module, delta in merged.items():
        expected = sum(w * deltas[module] for w, deltas in zip(expected_weights, inputs, strict=True))
        assert torch.linalg.norm(delta - expected) <= 1e-4 * torch.linalg.norm(expected)


@pytest.mark.parametrize(
    ("method", "options", "per_adapter"),
    [
        ("cp", None, True),  # the default cp keeps every adapter at its own strength
        ("cp", {"isotropic": False}, True),
        ("cp", SUM_LIKE, False),
        ("tsv", None, True),
        ("iso_c", None, True),
        ("iso_cts", None, True),
        ("svd", None, False),
        ("cat", None, False),
    ],
)
def test_named_library_weights_average_one_for_per_adapter_methods_and_sum_to_one_otherwise(
    built, method, options, per_adapter
):
    sizes, k = built.manifest.sizes, len(built.manifest.sizes)
    scale = k if per_adapter else 1
    size = library_merge_inputs(built.path, method=method, options=options).weights
    assert list(size) == pytest.approx([scale * n / sum(sizes) for n in sizes])
    uniform = library_merge_inputs(built.path, weights="uniform", method=method, options=options).weights
    assert list(uniform) == pytest.approx([scale / k] * k)
    explicit = library_merge_inputs(built.path, weights=[0.5, 2.0, 1.0], method=method, options=options)
    assert list(explicit.weights) == [0.5, 2.0, 1.0]  # given weights are used as given


def test_default_merge_library_uses_weights_of_mean_one_and_the_sum_rank(built, tmp_path):
    pytest.importorskip("peft_cp_merge.folders.merging")
    sizes = built.manifest.sizes
    result = merge_library(built.path, tmp_path / "merged", progress=False)
    recorded = [
        item["weight"] for item in json.loads((result.out_dir / "merge_info.json").read_text())["inputs"]
    ]
    assert recorded == pytest.approx([3 * n / sum(sizes) for n in sizes])
    assert result.plan.rank == 3 * 4
