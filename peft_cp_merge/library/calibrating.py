"""Calibrating a merged "cp" adapter folder on instruction/response examples (``merge --calibration``).

The folder merge writes a plain PEFT adapter; this loads it on its base model, learns each CP
component's gain with :func:`~peft_cp_merge.calibration.calibrate` on examples formatted and
tokenised exactly as the library trains its adapters (:func:`.encode_example`), and rewrites the
folder's weights in place (atomically; only ``lora_A`` changes), recording what was done in
``merge_info.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from ..calibration import CalibrationReport, calibrate
from ..folders.output import MARKER, atomic_directory
from ..folders.reading import WEIGHTS_NAME
from .builder import _check_base_model_path, _load_base_model
from .data import Example
from .training import encode_example

__all__ = ["calibrate_adapter_folder", "check_calibration_inputs"]


def check_calibration_inputs(base_model: str | os.PathLike | None, method: str) -> None:
    """Refuse, before any work, a calibration that cannot run: no base model, or not a "cp" merge.

    Raises:
        ValueError: Naming what is missing or wrong.
    """
    if base_model is None:
        raise ValueError("Calibration needs the base model the adapters were trained on (--base-model PATH)")
    if method != "cp":
        raise ValueError(
            f"Calibration learns the gains of CP components; it needs method 'cp', not {method!r}"
        )
    _check_base_model_path(base_model)


def calibrate_adapter_folder(
    adapter_dir: str | os.PathLike,
    examples: Sequence[Example],
    *,
    base_model: str | os.PathLike,
    prompt_template: str = "{instruction}\n",
    max_length: int = 512,
    steps: int | None = 40,
    lr: float = 5e-2,
    seed: int = 0,
    progress: bool = True,
) -> CalibrationReport:
    """Learn the per-component gains of the "cp" adapter in ``adapter_dir`` and write them back.

    Args:
        adapter_dir: A folder written by the folder merge with method ``"cp"``.
        examples: Instruction/response pairs (e.g. from :func:`.load_examples`), a few per task.
        base_model: The base model's folder or name (its tokenizer must be saved with it).
        prompt_template: How an instruction becomes the prompt, as for training the adapters.
        max_length: Tokens per example (prompt and response).
        steps: Optimizer steps of :func:`~peft_cp_merge.calibration.calibrate`.
        lr: Its learning rate.
        seed: Its seed (shuffling and the held-out split).
        progress: Show a progress bar.

    Returns:
        The :class:`~peft_cp_merge.calibration.CalibrationReport`; it is also stored in the
        folder's ``merge_info.json`` under ``"calibration"``.

    Raises:
        ValueError: The folder is not a "cp" merge of this tool, the base model cannot be loaded, or
            :func:`~peft_cp_merge.calibration.calibrate` refuses the examples (the folder is then
            unchanged).

    Example:
        >>> examples = load_examples("few.jsonl")  # doctest: +SKIP
        >>> calibrate_adapter_folder("merged", examples, base_model="model/")  # doctest: +SKIP
    """
    folder = Path(adapter_dir)
    info = _merge_info(folder)
    model, tokenizer = _load_base_model(base_model, None, need_tokenizer=True)
    peft_model = PeftModel.from_pretrained(model, str(folder), adapter_name="default")
    encoded = []
    for example in examples:
        ids, labels = encode_example(
            example, tokenizer, prompt_template=prompt_template, max_length=max_length
        )
        encoded.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    report = calibrate(peft_model, "default", encoded, steps=steps, lr=lr, seed=seed, progress=progress)
    tensors = get_peft_model_state_dict(peft_model, adapter_name="default")
    info["calibration"] = {
        "examples": len(encoded),
        "base_model": os.fspath(base_model),
        "prompt_template": prompt_template,
        "max_length": max_length,
        "lr": lr,
        "seed": seed,
        "report": dataclasses.asdict(report),
    }
    with atomic_directory(folder, overwrite=True) as tmp:
        for item in folder.iterdir():
            if item.name not in (WEIGHTS_NAME, MARKER) and item.is_file():
                shutil.copy2(item, tmp / item.name)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
            str(tmp / WEIGHTS_NAME),
            metadata={"format": "pt"},
        )
        (tmp / MARKER).write_text(json.dumps(info, indent=2, default=_jsonable) + "\n")
    return report


def _merge_info(folder: Path) -> dict:
    try:
        info = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        raise ValueError(
            f"{folder} has no readable {MARKER}; calibrate a folder written by the merge"
        ) from None
    if info.get("method") != "cp":
        raise ValueError(f"{folder} was merged with method {info.get('method')!r}; calibration needs 'cp'")
    return info


def _jsonable(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)
