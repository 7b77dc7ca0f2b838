"""LoRA training for the quality benchmark: one adapter per task and one multi-task adapter.

A small loop (AdamW, linear warm-up and decay, loss on the answer tokens and the closing
``<|im_end|>`` only). Adapters are saved with ``PeftModel.save_pretrained`` under
``cache/adapters/<name>`` and skipped when present, so reruns only train what is missing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tasks import END_OF_TURN, Example, chat

log = logging.getLogger(__name__)

ADAPTERS = Path(__file__).resolve().parent / "cache" / "adapters"
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters shared by every adapter of the benchmark (same LoraConfig for all)."""

    r: int = 8
    lora_alpha: int = 16
    steps: int = 60
    batch_size: int = 8
    lr: float = 1.5e-3
    warmup: int = 6
    seed: int = 0


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.0,
        target_modules=TARGET_MODULES,
        task_type="CAUSAL_LM",
    )


def _batch(tok, examples: list[Example]) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels are -100 except on the answer and the end-of-turn token."""
    rows = []
    for e in examples:
        prompt = tok(chat(e.prompt), add_special_tokens=False).input_ids
        answer = tok(e.answer + END_OF_TURN, add_special_tokens=False).input_ids
        rows.append((prompt + answer, [-100] * len(prompt) + answer))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(ids)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def fit(model, tok, examples: list[Example], cfg: TrainConfig, *, steps: int, tag: str) -> dict:
    """Train the active LoRA of ``model`` (a PeftModel) in place; return loss statistics."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(f"{tag}-{cfg.seed}")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        return max(0.0, (steps - step) / max(1, steps - cfg.warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    pool: list[Example] = []
    losses, start = [], time.perf_counter()
    for step in range(steps):
        if len(pool) < cfg.batch_size:
            pool = list(examples)
            rng.shuffle(pool)
        batch = _batch(tok, [pool.pop() for _ in range(cfg.batch_size)])
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 20 == 0 or step == steps - 1:
            log.info(
                "%s step %d/%d loss %.4f (%.1f s)", tag, step, steps, loss.item(), time.perf_counter() - start
            )
    model.eval()
    return {
        "n_examples": len(examples),
        "steps": steps,
        "loss_first10": sum(losses[:10]) / len(losses[:10]),
        "loss_last10": sum(losses[-10:]) / len(losses[-10:]),
        "seconds": time.perf_counter() - start,
    }


def train_adapter(
    base,
    tok,
    examples: list[Example],
    name: str,
    cfg: TrainConfig,
    *,
    steps: int | None = None,
    root: Path = ADAPTERS,
):
    """Train one LoRA on ``examples`` and save it to ``root / name``; return its training record.

    Skipped when the record exists. ``base`` is left unchanged (the LoRA is unloaded after saving).
    """
    from peft import get_peft_model

    out_dir = root / name
    record_path = out_dir / "train_record.json"
    if record_path.exists():
        return json.loads(record_path.read_text())
    with claimed(out_dir.with_suffix(".lock")) as mine:
        if not mine:
            log.info("%s is being trained by another process; skipped", name)
            return {"name": name, "skipped": "in progress elsewhere"}
        model = get_peft_model(base, lora_config(cfg))
        stats = fit(model, tok, examples, cfg, steps=steps or cfg.steps, tag=name)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out_dir))
        record = {"name": name, **stats, "config": asdict(cfg), "target_modules": TARGET_MODULES}
        record_path.write_text(json.dumps(record, indent=2))
        model.unload()
    return record


@contextlib.contextmanager
def claimed(lock: Path):
    """Whether this process holds ``lock``, a file with the holder's pid (one naming a live process
    is someone else's; a dead holder's is taken over); released on leaving. Lets several processes
    share one list of jobs."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    if lock.exists() and Path(f"/proc/{lock.read_text().strip() or 0}").exists():
        yield False
        return
    lock.write_text(str(os.getpid()))
    try:
        yield True
    finally:
        lock.unlink(missing_ok=True)


def load_lora_deltas(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Dense deltas ``{module: scaling * B @ A}`` of a saved LoRA, keyed by the base model's module names."""
    return {name: s * b @ a for name, (a, b, s) in load_lora_factors(adapter_dir).items()}


def stacked_factors(dirs: dict[str, Path]) -> dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]]:
    """``{module: [(A, B, scaling) of each adapter, in the order of dirs]}`` over the modules that
    every adapter of ``dirs`` (name -> folder) has."""
    factor_maps = [load_lora_factors(d) for d in dirs.values()]
    modules = sorted(set.intersection(*(set(f) for f in factor_maps)))
    return {m: [f[m] for f in factor_maps] for m in modules}


def load_lora_factors(adapter_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``{module: (A (r, d_in), B (d_out, r), scaling)}`` of a saved LoRA (plain Linear layers only)."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if cfg.get("use_rslora") or cfg.get("use_dora") or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError(f"{adapter_dir}: only plain LoRA without patterns is supported here")
    scaling = cfg["lora_alpha"] / cfg["r"]
    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    out = {}
    for key, a in state.items():
        if not key.endswith("lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        b = state[key.replace("lora_A", "lora_B")]
        out[module] = (a.float(), b.float(), scaling)
    return out
