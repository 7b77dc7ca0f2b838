"""`peft-cp-merge build-library` and `peft-cp-merge merge --library` (peft_cp_merge.cli)."""

from __future__ import annotations

import csv
import json

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("sentence_transformers")
pytest.importorskip("accelerate")
pytest.importorskip("transformers")

from testing_utils import planted_examples, save_tiny_encoder, save_tiny_llama

from peft_cp_merge.cli import main
from peft_cp_merge.library import load_library

pytestmark = pytest.mark.library


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_assets")
    save_tiny_llama(root / "llama")
    save_tiny_encoder(root / "encoder")
    records = [{"prompt": e.instruction, "answer": e.response} for e in planted_examples((12, 8, 4))]
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    with (root / "data.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "answer"])
        writer.writeheader()
        writer.writerows(records)
    return root


def build_args(assets, data, out, *extra):
    return [
        "build-library",
        "--data",
        str(assets / data),
        "--base-model",
        str(assets / "llama"),
        "--encoder",
        str(assets / "encoder"),
        "--out",
        str(out),
        "--target-modules",
        "q_proj",
        "v_proj",
        "--lora-r",
        "4",
        "--max-steps",
        "1",
        "--batch-size",
        "4",
        "--sample-fraction",
        "1",
        "--min-cluster-size",
        "1",
        "--no-progress",
        *extra,
    ]


def test_build_library_then_merge_it(assets, tmp_path, capsys):
    library_dir = tmp_path / "library"
    args = build_args(
        assets, "data.csv", library_dir, "--instruction-field", "prompt", "--response-field", "answer"
    )
    assert main([*args, "--k", "3"]) == 0
    assert "3 clusters of sizes" in capsys.readouterr().out
    library = load_library(library_dir)
    assert library.manifest.complete
    assert library.manifest.settings["lora"]["r"] == 4

    merged = tmp_path / "merged"
    assert main(["merge", "--library", str(library_dir), "--out", str(merged), "--no-progress"]) == 0
    assert "rank 12" in capsys.readouterr().out  # the default cp rank: sum r = 3 x 4
    assert (merged / "adapter_model.safetensors").is_file()
    sizes = library.manifest.sizes
    assert len(set(sizes)) > 1  # unequal clusters: size weights are not uniform
    # the default cp keeps each adapter at its own strength: size weights scaled to mean 1
    assert merge_weights(merged) == pytest.approx([3 * size / sum(sizes) for size in sizes])

    explicit = tmp_path / "explicit"
    args = ["merge", "--library", str(library_dir), "--weights", "1", "0.5", "-2"]
    assert main([*args, "--out", str(explicit), "--no-progress"]) == 0
    assert merge_weights(explicit) == [1.0, 0.5, -2.0]


def merge_weights(folder):
    """The weight of every input, as merge_info.json records it."""
    return [item["weight"] for item in json.loads((folder / "merge_info.json").read_text())["inputs"]]


@pytest.mark.parametrize(
    ("data", "extra", "message"),
    [
        ("data.jsonl", ["--k", "3"], "Line 1 of data.jsonl has no field 'instruction'"),
        (
            "data.jsonl",
            ["--instruction-field", "prompt", "--response-field", "answer", "--k", "25"],
            "larger",
        ),
        ("empty.jsonl", ["--k", "3"], "contains no examples"),
    ],
)
def test_build_library_bad_inputs_fail_cleanly(assets, tmp_path, capsys, data, extra, message):
    (assets / "empty.jsonl").write_text("")
    out = tmp_path / "library"
    assert main(build_args(assets, data, out, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_merge_needs_adapters_or_a_library(tmp_path, capsys):
    assert main(["merge", "--out", str(tmp_path / "merged")]) == 2
    assert "Give ADAPTER_DIR arguments with --weights, or --library" in capsys.readouterr().err
    assert main(["merge", "--library", str(tmp_path), "--out", str(tmp_path / "merged")]) == 2
    assert "is not an adapter library" in capsys.readouterr().err
