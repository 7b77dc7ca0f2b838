"""How much do adapters of the same task share? Cosines of their deltas, per module.

Two sets, each analysed with ``peft-cp-merge analyze`` (exact, in the compressed core):

- ``replicates``: the six per-task adapters and the six C-LoRA (K = 6) cluster adapters. The
  clusters recovered the tasks exactly, so each pair is the same task and the same 600 examples,
  trained with a different seed and data order.
- ``clora_k12``: the twelve cluster adapters of K = 12, where several clusters split one task.

For every module, |cos| of each adapter pair's delta; reported: the mean and median over modules and
pairs, for pairs of the same task and pairs of different tasks. Writes ``results/similarity.json``.

Usage: ``python benchmarks/quality/similarity.py`` (after the clora stages; ~1 min on one thread).
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from library_build import CACHE  # noqa: E402
from tasks import TASKS  # noqa: E402

RESULTS = HERE / "results"


def _cluster_tasks(library: Path) -> dict[str, str]:
    """Cluster folder -> its (single) task, from ``composition.json``."""
    clusters = json.loads((library / "composition.json").read_text())["clusters"]
    out = {}
    for folder, info in clusters.items():
        if len(info["tasks"]) != 1:
            raise SystemExit(f"{library / folder} mixes tasks {info['tasks']}; this needs pure clusters")
        out[folder] = next(iter(info["tasks"]))
    return out


def _analyze(dirs: list[Path], out: Path) -> dict:
    report = out / "report.json"
    if not report.exists():
        command = ["peft-cp-merge", "analyze", *map(str, dirs), "--rank", "8", "--out", str(out)]
        command.append("--no-progress")
        subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(report.read_text())


def pair_stats(report: dict, tasks: list[str]) -> dict:
    same, cross = [], []
    for module in report["modules"]:
        cosine = module["cosine"]
        for i, j in itertools.combinations(range(len(tasks)), 2):
            (same if tasks[i] == tasks[j] else cross).append(abs(cosine[i][j]))
    return {
        "same_task_pairs": len(same) // len(report["modules"]),
        "same_task_abs_cos_mean": statistics.mean(same),
        "same_task_abs_cos_median": statistics.median(same),
        "cross_task_abs_cos_mean": statistics.mean(cross),
        "cross_task_abs_cos_median": statistics.median(cross),
        "modules": len(report["modules"]),
    }


def main() -> None:
    out = {}
    k6 = _cluster_tasks(CACHE / "clora")
    by_task = {task: folder for folder, task in k6.items()}
    dirs = [CACHE / "adapters" / t for t in TASKS] + [CACHE / "clora" / by_task[t] for t in TASKS]
    out["replicates"] = pair_stats(_analyze(dirs, RESULTS / "interference_replicates"), [*TASKS, *TASKS])
    k12 = _cluster_tasks(CACHE / "clora_k12")
    folders = sorted(k12)
    report = _analyze([CACHE / "clora_k12" / f for f in folders], RESULTS / "interference_clora_k12")
    out["clora_k12"] = pair_stats(report, [k12[f] for f in folders])
    (RESULTS / "similarity.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
