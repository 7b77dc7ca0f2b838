"""Issue 11: the cp variants against the data-free baselines, with paired bootstrap CIs.

Reads ``osrm_eval.py``'s evaluations of the PLAIN adapters (per-task, and the K = 12 library where
evaluated): every spec at its validation-chosen ``lam``, on test. For each part:

- per spec: the chosen ``lam``, its mean validation accuracy, test accuracy and mean normalised
  accuracy (divided by the plain per-task individual adapters, as every table of this benchmark);
- the best baseline (``BASELINES``) and the best cp variant (``CP_VARIANTS``), each chosen on
  validation, and their paired gap on test; every cp variant minus the best baseline and minus the
  default cp (``cp_weighted_r16``).

Writes ``results/cp_variants.json`` and prints Markdown tables. Commands (from the repository root;
each spec 5-10 min on one thread; ``/tmp``-free, the evaluations are cached)::

    for spec in cp_shared_r16 cp_iso_r16 cp_iso_r48 cp_rank_tol_r16; do
      python benchmarks/quality/osrm_eval.py --set plain --spec $spec --split validation
      python benchmarks/quality/osrm_eval.py --set plain --spec $spec --split test
    done
    python benchmarks/quality/variants_summary.py
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from fewshot_summary import gap  # noqa: E402
from osrm_eval import chosen_lam, val_means  # noqa: E402
from osrm_summary import best_static, describe, individual, merged  # noqa: E402

RESULT = HERE / "results" / "cp_variants.json"
BASELINES = ("tsv_r48", "knots_ties", "iso_c_r48", "iso_cts_r48", "iso_c_r96", "iso_cts_r96")
CP_VARIANTS = (
    "cp_weighted_r16",  # the default
    "cp_whiten_r16",
    "cp_shared_r16",
    "cp_iso_r16",
    "cp_iso_r48",
    "cp_iso_r96",  # the K = 12 libraries' full rank
    "cp_rank_tol_r16",
)
DEFAULT = "cp_weighted_r16"
PARTS = ("per_task", "clora_k12")


def _entry(spec: str, part: str, ref: dict) -> dict | None:
    result = merged("plain", spec, part)
    means = val_means("plain", spec, part) if spec != "cat" else None
    if result is None:
        return None
    lam = chosen_lam("plain", spec, part)
    return {"lam": lam, "validation": max(means.values()) if means else None, **describe(result, ref, None)}


def part_summary(part: str, ref: dict) -> dict:
    entries = {s: e for s in ("cat", *BASELINES, *CP_VARIANTS) if (e := _entry(s, part, ref))}
    results = {s: merged("plain", s, part) for s in entries}
    best_base, best_cp = (best_static("plain", part, specs) for specs in (BASELINES, CP_VARIANTS))
    gaps = {}
    if best_base and best_cp:
        gaps[f"best cp ({best_cp}) - best baseline ({best_base})"] = gap(
            results[best_cp], results[best_base], ref
        )
    for spec in CP_VARIANTS:
        if spec not in entries:
            continue
        if best_base:
            gaps[f"{spec} - best baseline ({best_base})"] = gap(results[spec], results[best_base], ref)
        if spec != DEFAULT and DEFAULT in entries:
            gaps[f"{spec} - {DEFAULT}"] = gap(results[spec], results[DEFAULT], ref)
    return {"specs": entries, "best_baseline": best_base, "best_cp": best_cp, "gaps": gaps}


def summary() -> dict:
    ref = individual("plain")
    if ref is None:
        raise SystemExit("the plain individual evaluations are missing: run osrm_eval.py --individual")
    out = {}
    for part in PARTS:
        result = part_summary(part, ref)
        if result["specs"]:
            out[part] = result
    return out


def _ci(g: dict) -> str:
    lo, hi = g["ci95"]
    return f"{g['gap']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def markdown(result: dict) -> str:
    lines = []
    for part, r in result.items():
        lines += [
            f"**{part}** (plain adapters)",
            "",
            "| spec | lam (val) | val acc | test acc | normalised |",
            "|---|---|---|---|---|",
        ]
        for spec, e in r["specs"].items():
            val = "-" if e["validation"] is None else f"{e['validation']:.3f}"
            norm = e.get("mean_normalised", math.nan)
            lines.append(f"| {spec} | {e['lam']} | {val} | {e['mean_accuracy']:.3f} | {norm:.3f} |")
        lines += ["", "| paired gap (test) | accuracy | normalised |", "|---|---|---|"]
        for name, g in r["gaps"].items():
            lines.append(f"| {name} | {_ci(g['mean_accuracy'])} | {_ci(g['mean_normalised'])} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    result = summary()
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
