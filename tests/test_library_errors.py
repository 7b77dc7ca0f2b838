"""A base model that cannot be loaded: one-line errors from `build_library` and `build-library`."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("sentence_transformers")
pytest.importorskip("accelerate")
pytest.importorskip("transformers")

from peft import LoraConfig
from testing_utils import planted_examples, save_tiny_llama

from peft_cp_merge.cli import EXIT_USAGE, main
from peft_cp_merge.library import ClusteringOptions, TrainingOptions, build_library

pytestmark = pytest.mark.library

CLUSTERING = ClusteringOptions(k=2, sample_fraction=1.0, min_cluster_size=1)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("error_assets")
    examples = planted_examples((4, 4, 4))
    data = root / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"instruction": e.instruction, "response": e.response}) + "\n" for e in examples)
    )
    no_tokenizer = save_tiny_llama(root / "no_tokenizer")
    for file in no_tokenizer.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens")):
            file.unlink()
    broken = root / "broken_config"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (root / "empty").mkdir()
    return SimpleNamespace(root=root, examples=examples, data=data, no_tokenizer=no_tokenizer, broken=broken)


def build(assets, out, base_model, **kwargs):
    """`build_library` with an encoder that is never reached: a failure must come before embedding."""
    return build_library(
        assets.examples,
        out,
        base_model=base_model,
        lora_config=LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"),
        encoder=str(assets.root / "no_encoder_here"),
        clustering=CLUSTERING,
        training=TrainingOptions(max_steps=1, batch_size=2),
        progress=False,
        **kwargs,
    )


@pytest.mark.parametrize("as_path", [False, True])
def test_missing_local_folder_is_refused_up_front(assets, tmp_path, as_path):
    missing = tmp_path / "does" / "not" / "exist"
    out = tmp_path / "library"
    base_model = missing if as_path else str(missing)
    with pytest.raises(ValueError, match=re.escape(f"Base model folder '{missing}' does not exist.")) as info:
        build(assets, out, base_model)
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__ or info.value.__context__ is None
    assert not out.exists()  # refused in the up-front validation: nothing written


@pytest.mark.parametrize("name", ["./no_such_model", "models/a/b"])
def test_relative_paths_that_cannot_be_hub_names_are_local(assets, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"Base model folder '{name}' does not exist.")):
        build(assets, tmp_path / "library", name)


def test_folder_without_config_and_a_file_are_refused(assets, tmp_path):
    with pytest.raises(
        ValueError, match=re.escape(f"Base model folder '{assets.root / 'empty'}' has no config.json")
    ):
        build(assets, tmp_path / "library", assets.root / "empty")
    with pytest.raises(ValueError, match=re.escape(f"Base model '{assets.data}' is a file")):
        build(assets, tmp_path / "library", assets.data)
    assert not (tmp_path / "library").exists()


def test_transformers_load_failure_is_one_line(assets, tmp_path):
    with pytest.raises(ValueError, match=re.escape(f"Cannot load base model '{assets.broken}': ")) as info:
        build(assets, tmp_path / "library", assets.broken)
    assert "not a valid JSON" in str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "library").exists()


def test_invalid_hub_name_is_one_line_without_network(assets, tmp_path):
    with pytest.raises(
        ValueError, match=re.escape("Cannot load base model 'bad name!!': Repo id must")
    ) as info:
        build(assets, tmp_path / "library", "bad name!!")
    assert "\n" not in str(info.value)


def test_missing_tokenizer_is_named(assets, tmp_path):
    with pytest.raises(
        ValueError, match=re.escape(f"Cannot load the tokenizer of base model '{assets.no_tokenizer}': ")
    ) as info:
        build(assets, tmp_path / "library", assets.no_tokenizer)
    assert "\n" not in str(info.value)
    assert "tokenizer=" in str(info.value)


def cli_args(assets, base_model, out):
    return [
        "build-library",
        "--data",
        str(assets.data),
        "--base-model",
        str(base_model),
        "--encoder",
        str(assets.root / "no_encoder_here"),
        "--out",
        str(out),
        "--k",
        "2",
        "--min-cluster-size",
        "1",
        "--no-progress",
    ]


def test_cli_missing_base_model_is_one_error_line(assets, tmp_path, capsys):
    missing = tmp_path / "does" / "not" / "exist"
    out = tmp_path / "library"
    assert main(cli_args(assets, missing, out)) == EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        f"peft-cp-merge: error: Base model folder '{missing}' does not exist."
    ]
    assert "Traceback" not in captured.err
    assert not out.exists()


def test_cli_unloadable_base_model_is_one_error_line(assets, tmp_path, capsys):
    assert main(cli_args(assets, assets.broken, tmp_path / "library")) == EXIT_USAGE
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"peft-cp-merge: error: Cannot load base model '{assets.broken}': ")
