"""Collect the few-shot comparison of issue 12 (``fewshot.py --summary``) into one JSON and a Markdown table.

Every cached test evaluation of one folder (``results/evals/calibration/``) with the same number of
test items per task is a setting: the static cp (``static``), calibrated cp (``calibrated_*``),
learned soup weights (``soups_*``), few-shot multi-task LoRAs (``multitask_*``) and static baseline
merges (``static_<spec>_*``). Normalised accuracy divides by the individual adapters' accuracy
(their re-evaluation ``individual_*`` in the same folder, else the reference JSONs; the source is
recorded). Gaps: paired bootstrap over test items within tasks (``report.bootstrap_gap``) of every
calibrated cp setting minus the soups and multi-task settings with the same k, steps and seed, minus
the static cp, and minus the best static merge (the static cp or a static baseline, whichever has the
best mean normalised test accuracy: chosen on test, in the baseline's favour).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import calibration
from report import bootstrap_gap, data_fingerprint, summarise
from run import environment
from tasks import TASKS

PREFIXES = (  # file-name prefix -> method (the static cp is "static.items<N>.test.json")
    ("individual_", "individual"),
    ("static_", "static"),
    ("calibrated_", "calibrated_cp"),
    ("soups_", "soups"),
    ("multitask_", "multitask_fewshot"),
)
ORDER = ("individual", "static_cp", "static", "calibrated_cp", "soups", "multitask_fewshot")  # table rows
BASELINES = ("soups", "multitask_fewshot")


def _method(stem: str) -> str | None:
    if stem == "static":
        return "static_cp"
    return next((method for prefix, method in PREFIXES if stem.startswith(prefix)), None)


def _seconds(result: dict) -> float | None:
    """Training / calibration / merge seconds of a result (``None`` when not recorded)."""
    for key in ("calibration", "fit"):
        if key in result:
            return result[key]["seconds"]
    return result.get("merge_seconds")


def _report(result: dict) -> dict | None:
    if "calibration" in result:
        return calibration._gain_summary(result["calibration"])
    if "fit" in result:
        weights = {k: v for k, v in result.get("soup_weights", {}).items() if k != "module_weights"}
        return result["fit"] | ({"soup_weights": weights} if weights else {})
    return None


def describe(result: dict, individual: dict | None) -> dict:
    """Accuracy, normalised accuracy, seconds and settings of one evaluation."""
    acc = result["accuracy"]
    out = {"accuracy": acc, "mean_accuracy": sum(acc.values()) / len(TASKS)}
    if individual:
        norm = summarise(result, individual)
        out |= {"normalised": norm["normalised"], "mean_normalised": norm["mean_normalised"]}
        rest = [v for t, v in norm["normalised"].items() if t != "add_sub"]  # add_sub: 0.1 alone
        out["mean_normalised_without_add_sub"] = sum(rest) / len(rest)
    settings = result.get("settings", {})
    out |= {"k": settings.get("k_per_task"), "steps": settings.get("steps"), "seed": settings.get("seed")}
    out |= {"train_seconds": _seconds(result), "eval_seconds": result["seconds"], "settings": settings}
    if result.get("lam") is not None:
        out["lam"] = result["lam"]
    return out


def gap(a: dict, b: dict, individual: dict | None) -> dict:
    """Paired bootstrap gaps ``a - b`` of mean accuracy and, with ``individual``, mean normalised accuracy."""
    ones = {t: [1] * len(a["correct"][t]) for t in TASKS}
    out = {"mean_accuracy": bootstrap_gap(a["correct"], b["correct"], ones)}
    if individual:
        out["mean_normalised"] = bootstrap_gap(a["correct"], b["correct"], individual["correct"])
    return out


def _score(entry: dict) -> float:
    """Mean normalised accuracy (mean accuracy where undefined: an individual adapter at 0 on a task)."""
    norm = entry.get("mean_normalised", math.nan)
    return entry["mean_accuracy"] if math.isnan(norm) else norm


def comparisons(results: dict, settings: dict, individual: dict | None) -> tuple[list[dict], str | None]:
    """Every calibrated cp setting minus its baselines; also returns the best static merge."""
    static = [n for n, s in settings.items() if s["method"] in ("static_cp", "static")]
    best_static = max(static, key=lambda n: _score(settings[n]), default=None)
    out = []
    for name, entry in settings.items():
        if entry["method"] != "calibrated_cp":
            continue
        others = [
            (other, settings[other]["method"])
            for other in settings
            if settings[other]["method"] in BASELINES
            and all(settings[other][key] == entry[key] for key in ("k", "steps", "seed"))
        ]
        static_cp = [n for n in static if settings[n]["method"] == "static_cp"]
        others += [(n, "static_cp = best_static" if n == best_static else "static_cp") for n in static_cp]
        others += [(best_static, "best_static")] if best_static and best_static not in static_cp else []
        for other, kind in others:
            row = {"k": entry["k"], "steps": entry["steps"], "calibrated": name, "minus": other, "kind": kind}
            out.append(row | gap(results[name], results[other], individual))
    return out, best_static


def collect(evals: Path, items: int) -> dict:
    """The summary of ``evals`` (``*.items<items>.test.json``) as a JSON-ready dict."""
    individual, source = calibration._individual(items, evals)
    suffix = f".items{items}.test.json"
    results, settings = {}, {}
    for path in sorted(evals.glob(f"*{suffix}")):
        stem = path.name.removesuffix(suffix)
        method = _method(stem)
        if method is None or method == "individual":
            continue
        results[stem] = json.loads(path.read_text())
        settings[stem] = {"method": method} | describe(results[stem], individual)
        report = _report(results[stem])
        if report:
            settings[stem]["report"] = report
    if individual:
        acc = individual["accuracy"]
        settings["individual"] = {"method": "individual", "accuracy": acc}
        settings["individual"] |= {"mean_accuracy": sum(acc.values()) / len(TASKS), "mean_normalised": 1.0}
        settings["individual"] |= {"source": source}
    settings = dict(
        sorted(settings.items(), key=lambda kv: (ORDER.index(kv[1]["method"]), kv[1].get("k") or 0))
    )
    gaps, best_static = comparisons(results, settings, individual)
    return {
        "question": "calibrated cp vs static merges, learned soup weights and a few-shot multi-task LoRA",
        "test_items_per_task": items,
        "protocol": {**calibration_protocol(), "best_static": "best mean normalised test accuracy"},
        "settings": settings,
        "best_static": best_static,
        "comparisons": gaps,
        "bootstrap": "paired over test items, within tasks, 2000 resamples, seed 0 (report.bootstrap_gap)",
        "environment": environment(),
        "data": data_fingerprint(),
    }


def calibration_protocol() -> dict:
    return {
        "examples": "first k of each task's train split (calibration.calibration_examples)",
        "batch_size": 8,
        "holdout": 0.25,
        "patience": 3,
        "test": "first N test items per task, greedy, exact match (evaluate.evaluate)",
    }


def markdown(summary: dict) -> str:
    """The settings table and the gaps table."""
    head = ["setting", "method", "k", "steps", *TASKS, "mean acc", "mean norm.", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in summary["settings"].items():
        accs = [f"{s['accuracy'][t]:.2f}" for t in TASKS]
        norm = f"{s['mean_normalised']:.3f}" if "mean_normalised" in s else ""
        secs = f"{s['train_seconds']:.0f}" if s.get("train_seconds") is not None else ""
        k, steps = s.get("k") or "", s.get("steps") or ""
        cells = [name, s["method"], str(k), str(steps), *accs, f"{s['mean_accuracy']:.3f}", norm, secs]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "| k | calibrated cp | minus | gap, norm. [95 % CI] | gap, acc. [95 % CI] |",
        "|---|---|---|---|---|",
    ]
    for row in summary["comparisons"]:
        cells = [str(row["k"]), row["calibrated"], f"{row['minus']} ({row['kind']})"]
        for key in ("mean_normalised", "mean_accuracy"):
            g = row.get(key)
            cells.append(f"{g['gap']:+.3f} [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}]" if g else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
