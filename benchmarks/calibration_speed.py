"""Speed of ``peft_cp_merge.calibrate`` at SmolLM2-135M size, with no model download.

The cost of calibration depends on the model's shapes, the adapters' ranks and the examples'
lengths, not on the weights' values. So this script builds SmolLM2-135M from its configuration with
random weights (hidden 576, 30 layers, 9 heads, 3 key-value heads, vocabulary 49,152), loads the six
task adapters of the quality benchmark (``benchmarks/quality/cache/adapters``; their shapes match),
merges them with the default ``"cp"`` (rank 16) and calibrates on ``6 x k`` synthetic examples
whose lengths follow the benchmark's training prompts (20-59 tokens, mean 35, with a 5-6 token
answer: the first ``k = 32`` train items of each task). Options as the quality benchmark's run
(batch 8, lr 0.05, holdout 0.25, patience 3); ``patience`` is raised so no run stops early, and the
time of ``--steps`` steps is what is measured. One result per thread count (CPU) or device.

Usage (from the repository root)::

    python benchmarks/calibration_speed.py --threads 1 2 --steps 120
    python benchmarks/calibration_speed.py --device cuda --out benchmarks/results/calibration_speed_cuda.json

Writes ``benchmarks/results/calibration_speed.json`` (machine, versions, date, seconds, seconds per
step). The accuracy of calibration is measured by ``benchmarks/quality/fewshot.py``, not here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from real_adapters import DEFAULT_FOLDERS, TASKS, environment  # noqa: E402

# Token lengths of the first 32 train prompts of each task (sorted sample of 16 of the 192) and the
# mean answer length, measured with the SmolLM2 tokenizer on benchmarks/quality's data.
LENGTHS = [20, 23, 24, 24, 25, 25, 26, 28, 36, 37, 37, 42, 45, 47, 49, 54]
ANSWER = 6


def smollm2_135m(device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device).eval()


def examples(k: int, vocab: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for index in range(len(TASKS) * k):
        length = LENGTHS[index % len(LENGTHS)]
        ids = torch.randint(3, vocab, (length,), generator=gen)
        labels = torch.full((length,), -100)
        labels[-ANSWER:] = ids[-ANSWER:]
        rows.append(
            {"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long), "labels": labels}
        )
    return rows


def run_once(args, device: str) -> dict:
    from peft import PeftModel

    from peft_cp_merge import calibrate

    model = PeftModel.from_pretrained(smollm2_135m(device), str(args.folders[0]), adapter_name=TASKS[0])
    for name, folder in zip(TASKS[1:], args.folders[1:], strict=True):
        model.load_adapter(str(folder), adapter_name=name)
    start = time.perf_counter()
    sum_like = {"cp_rank": 16, "cp_whiten": False, "cp_isotropic": False}  # the measured merge, spelled out
    weights = [1 / len(TASKS)] * len(TASKS)
    model.add_weighted_adapter(list(TASKS), weights, "cp", combination_type="cp", **sum_like)
    merge_s = time.perf_counter() - start
    model.set_adapter("cp")
    report = calibrate(
        model,
        "cp",
        examples(args.k, model.config.vocab_size),
        steps=args.steps,
        lr=0.05,
        batch_size=8,
        holdout=0.25,
        patience=args.steps,
        seed=0,
        progress=False,
    )
    if device == "cuda":
        torch.cuda.synchronize()
    return {
        "merge_s": merge_s,
        "calibration_s": report.seconds,
        "steps": report.steps,
        "s_per_step": report.seconds / max(report.steps, 1),
        "n_train": report.n_train,
        "n_holdout": report.n_holdout,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "folders", nargs="*", type=Path, help="the six adapter folders (default: the quality cache)"
    )
    parser.add_argument("--k", type=int, default=32, help="examples per task")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "calibration_speed.json")
    args = parser.parse_args()
    args.folders = args.folders or DEFAULT_FOLDERS
    record = {"environment": environment(args.threads), "device": args.device, "k": args.k, "runs": {}}
    for threads in args.threads if args.device == "cpu" else [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        result = run_once(args, args.device)
        record["runs"][f"{args.device}@{threads}"] = result
        print(json.dumps({f"{args.device}@{threads}": result}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
