"""Summary of ``osrm_eval.py``: OSRM vs plain adapters, alone and merged, with paired bootstrap CIs.

Normalised accuracy divides by the PLAIN individual adapters' accuracy on each task for both sets
(one denominator), so an OSRM gain in it is a gain in accuracy, not a lower bar; the OSRM adapters'
own ratio (merged / their own individual accuracy) is reported beside it.

``summary(part)``: ``per_task`` (the six task adapters, ``results/osrm.json``) or ``clora_k12`` (the
K = 12 libraries, ``results/osrm_k12.json``): the same normalisation by the plain per-task individual
adapters (a library has no per-task individual adapters of its own, so there is no "own" column), the
specs of ``osrm_eval.PART_SPECS``, osrm - plain per method and for the best merge of each set chosen on
validation, and (issue 11) the plain library's default cp minus each baseline and minus the best of
``CP_BASELINES`` chosen on validation.
"""

from __future__ import annotations

import json
from pathlib import Path

from fewshot_summary import gap
from osrm_eval import (
    CALIBRATED,
    OUT,
    PART_SPECS,
    SETS,
    chosen_lam,
    library_dir,
    n_adapters,
    out_dir,
    val_means,
)
from osrm_train import OSRM_ADAPTERS
from report import data_fingerprint
from run import environment
from stages import lam_value
from tasks import TASKS

HERE = Path(__file__).resolve().parent

PLAIN_PAIRS = (
    ("iso_cts_r48", "tsv_r48"),
    ("iso_cts_r48", "knots_ties"),
    ("iso_c_r48", "tsv_r48"),
    ("iso_c_r48", "knots_ties"),
    ("iso_cts_r48", "iso_c_r48"),
    ("cp_weighted_r16", "iso_cts_r48"),
    ("cp_whiten_r16", "cp_weighted_r16"),
    ("calibrated_cp", "iso_cts_r48"),
)
CP_BASELINES = ("tsv_r48", "knots_ties", "iso_cts_r48")  # issue 11: default cp >= the best of these?
LIBRARY_PAIRS = (
    *(("cp_weighted_r16", b) for b in (*CP_BASELINES, "iso_c_r48", "cat")),
    ("iso_cts_r48", "tsv_r48"),
    ("iso_cts_r48", "knots_ties"),
    ("iso_cts_r48", "iso_c_r48"),
)


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def individual(adapters: str) -> dict | None:
    results = [_load(OUT / adapters / f"individual_{t}.test.json") for t in TASKS]
    if any(r is None for r in results):
        return None
    return {
        "accuracy": {t: r["accuracy"][t] for t, r in zip(TASKS, results, strict=True)},
        "correct": {t: r["correct"][t] for t, r in zip(TASKS, results, strict=True)},
    }


def _calibrated_path(adapters: str) -> Path:
    c = CALIBRATED
    name = f"calibrated_k{c['k']}_s{c['steps']}_lr{c['lr']:g}_l2{c['l2']:g}_seed{c['seed']}"
    return OUT / adapters / f"{name}.items{c['items']}.test.json"


def merged(adapters: str, spec: str, part: str = "per_task") -> dict | None:
    """The test result of ``spec`` at its validation-chosen ``lam`` (or calibrated cp), or None."""
    if spec == "calibrated_cp":
        return _load(_calibrated_path(adapters)) if part == "per_task" else None
    if spec not in ("cat",) and val_means(adapters, spec, part) is None:
        return None
    lam = chosen_lam(adapters, spec, part)
    return _load(out_dir(adapters, part) / f"{spec}.lam{lam_value(lam, n_adapters(part)):.3f}.test.json")


def describe(result: dict, plain: dict | None, own: dict | None) -> dict:
    acc = result["accuracy"]
    out = {"accuracy": acc, "mean_accuracy": sum(acc.values()) / len(TASKS)}
    for key, ref in (("mean_normalised", plain), ("mean_normalised_own", own)):
        if ref:
            out[key] = sum(acc[t] / ref["accuracy"][t] for t in TASKS) / len(TASKS)
    return out


def best_static(adapters: str, part: str = "per_task", specs=None) -> str | None:
    """The static merge with the best mean validation accuracy at its chosen ``lam`` (cat: not tuned).

    Among ``specs`` (default: the part's); ties go to the later spec name (``max`` of tuples). Scores
    are rounded to 9 digits first, so that equal accuracies averaged in another order tie (plain
    per task: Iso-C, Iso-CTS and cp_iso all score 0.608).
    """
    scored = []
    for spec in specs or PART_SPECS[part]:
        means = val_means(adapters, spec, part) if spec != "cat" else None
        if means and merged(adapters, spec, part):
            scored.append((round(max(means.values()), 9), spec))
    return max(scored)[1] if scored else None


def summary(part: str = "per_task") -> dict:
    """The JSON of ``results/osrm.json`` (``per_task``) or of a library part (``library_summary``)."""
    return per_task_summary() if part == "per_task" else library_summary(part)


def _training(folder: Path) -> dict:
    """Per cluster of a library: size, tasks, losses, seconds and (OSRM) the initialisation's report."""
    from peft_cp_merge.library import load_library
    from peft_cp_merge.library.manifest import MANIFEST_FILE

    if not (folder / MANIFEST_FILE).exists():
        return {}
    manifest = load_library(folder).manifest
    keep = ("steps", "loss_first10", "loss_last10", "seconds", "tasks", "osrm")
    return {
        entry.folder: {"size": entry.size, **{k: v for k, v in (entry.training or {}).items() if k in keep}}
        for entry in manifest.clusters
    }


def _osrm_settings(part: str) -> dict:
    """The OSRM library's init settings (from its manifest) and whether both libraries cluster alike."""
    import numpy as np

    from peft_cp_merge.library.manifest import MANIFEST_FILE

    folders = {adapters: library_dir(adapters, part) for adapters in SETS}
    out = {
        "library": str(folders["osrm"].relative_to(HERE)),
        # Not in the manifest (a custom train_fn replaces the training settings there): see library_build.py.
        "statistics_format": "prompt_template=tasks.chat('{instruction}'), tokenizer EOS <|im_end|>: the "
        "training sequences; batch_size 8, max_length 512 (TrainingOptions defaults)",
    }
    manifest = folders["osrm"] / MANIFEST_FILE
    if manifest.exists():
        out["init"] = json.loads(manifest.read_text())["settings"].get("init")
    labels = [folder / "assignments.npy" for folder in folders.values()]
    if all(path.exists() for path in labels):
        out["same_clusters_as_plain"] = bool(np.array_equal(*(np.load(path) for path in labels)))
    return out


def library_summary(part: str) -> dict:
    """OSRM vs plain library ``part``: merges, paired gaps, issue 11's cp vs the best baseline."""
    from library_build import clora_dir, clora_k

    plain_ind = individual("plain")  # the per-task individual adapters: the per-task table's denominator
    out: dict = {"part": part, "n_adapters": n_adapters(part), "merges": {}, "gaps": {}}
    if plain_ind:
        out["denominator"] = {
            "source": str(out_dir("plain").relative_to(OUT.parent.parent.parent)) + "/individual_*.test.json",
            "accuracy": plain_ind["accuracy"],
            "mean_accuracy": sum(plain_ind["accuracy"].values()) / len(TASKS),
        }
    reproduction = out_dir("plain", part) / "reproduction.json"
    if reproduction.exists():
        out["plain_retrain_reproduction"] = json.loads(reproduction.read_text())
    specs = PART_SPECS[part]
    for spec in specs:
        for adapters in SETS:
            result = merged(adapters, spec, part)
            if result is None:
                continue
            entry = describe(result, plain_ind, None)
            entry["lam"] = str(chosen_lam(adapters, spec, part))
            entry["lam_value"] = lam_value(chosen_lam(adapters, spec, part), n_adapters(part))
            means = val_means(adapters, spec, part) if spec != "cat" else None
            if means:
                entry["validation_means"] = {str(k): v for k, v in means.items()}
            if "reused_from" in result:
                entry["test_reused_from"] = result["reused_from"]
            out["merges"][f"{adapters}: {spec}"] = entry
        a, b = merged("osrm", spec, part), merged("plain", spec, part)
        if a and b:
            out["gaps"][f"{spec}: osrm - plain"] = gap(a, b, plain_ind)
    best = {adapters: best_static(adapters, part) for adapters in SETS}
    out["best_static_by_validation"] = best
    if all(best.values()):
        out["gaps"]["best static: osrm - plain"] = gap(
            merged("osrm", best["osrm"], part), merged("plain", best["plain"], part), plain_ind
        )
    best_baseline = {adapters: best_static(adapters, part, CP_BASELINES) for adapters in SETS}
    out["best_cp_baseline_by_validation"] = best_baseline
    for adapters in SETS:
        pairs = [*LIBRARY_PAIRS, ("cp_weighted_r16", best_baseline[adapters])]
        for a, b in pairs:
            first, second = merged(adapters, a, part), merged(adapters, b, part) if b else None
            if first and second:
                label = f"{adapters}: {a} - {b}"
                if (a, b) == pairs[-1]:
                    label = f"{adapters}: {a} - best of {'/'.join(CP_BASELINES)} by validation ({b})"
                out["gaps"][label] = gap(first, second, plain_ind)
    k = clora_k(part)
    out["osrm_settings"] = _osrm_settings(part)
    out["training"] = {
        adapters: _training(clora_dir(k, "default" if adapters == "plain" else "osrm")) for adapters in SETS
    }
    out["environment"] = environment()
    out["data"] = data_fingerprint()
    return out


def per_task_summary() -> dict:
    plain_ind, osrm_ind = individual("plain"), individual("osrm")
    own = {"plain": plain_ind, "osrm": osrm_ind}
    out: dict = {"individual": {}, "merges": {}, "gaps": {}}
    for adapters, ind in own.items():
        if ind:
            out["individual"][adapters] = {
                "accuracy": ind["accuracy"],
                "mean_accuracy": sum(ind["accuracy"].values()) / len(TASKS),
            }
    if plain_ind and osrm_ind:
        out["gaps"]["individual osrm - plain"] = gap(osrm_ind, plain_ind, None)
    for spec in (*PART_SPECS["per_task"], "calibrated_cp"):
        for adapters in SETS:
            result = merged(adapters, spec)
            if result is None:
                continue
            entry = describe(result, plain_ind, own[adapters])
            entry["lam"] = None if spec == "calibrated_cp" else str(chosen_lam(adapters, spec))
            means = val_means(adapters, spec) if spec not in ("cat", "calibrated_cp") else None
            if means:
                entry["validation_means"] = {str(k): v for k, v in means.items()}
            out["merges"][f"{adapters}: {spec}"] = entry
        a, b = merged("osrm", spec), merged("plain", spec)
        if a and b:
            out["gaps"][f"{spec}: osrm - plain"] = gap(a, b, plain_ind)
    for a, b in PLAIN_PAIRS:  # issue 11: the static variants against each other, plain adapters
        first, second = merged("plain", a), merged("plain", b)
        if first and second:
            out["gaps"][f"plain: {a} - {b}"] = gap(first, second, plain_ind)
    best = {adapters: best_static(adapters) for adapters in SETS}
    out["best_static_by_validation"] = best
    if all(best.values()):
        out["gaps"]["best static: osrm - plain"] = gap(
            merged("osrm", best["osrm"]), merged("plain", best["plain"]), plain_ind
        )
    out["osrm_training"] = {
        t: json.loads((OSRM_ADAPTERS / t / "train_record.json").read_text())
        for t in TASKS
        if (OSRM_ADAPTERS / t / "train_record.json").exists()
    }
    out["environment"] = environment()
    out["data"] = data_fingerprint()
    return out


def _fmtgap(g: dict) -> str:
    lo, hi = g["ci95"]
    return f"{g['gap']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def markdown(result: dict) -> str:
    header = ["adapters", "merge", "lam (val)", *TASKS, "mean acc.", "mean norm.", "own norm."]
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|---" * (len(TASKS) + 6) + "|")
    for adapters, ind in result.get("individual", {}).items():
        accs = " | ".join(f"{ind['accuracy'][t]:.2f}" for t in TASKS)
        lines.append(f"| {adapters} | individual | | {accs} | {ind['mean_accuracy']:.3f} | | |")
    for name, entry in result["merges"].items():
        adapters, spec = name.split(": ")
        accs = " | ".join(f"{entry['accuracy'][t]:.2f}" for t in TASKS)
        lam = entry.get("lam") or ""
        scores = [
            entry["mean_accuracy"],
            *(entry.get(k, float("nan")) for k in ("mean_normalised", "mean_normalised_own")),
        ]
        cells = " | ".join("" if x != x else f"{x:.3f}" for x in scores)  # nan (no own denominator): blank
        lines.append(f"| {adapters} | {spec} | {lam} | {accs} | {cells} |")
    lams = ("0.05", "0.1", "1/N", "0.3", "0.5", "0.75", "1.0", "1.5", "2.0", "3.0")
    if "denominator" in result:  # a library part: the plain per-task individual adapters
        accs = " | ".join(f"{result['denominator']['accuracy'][t]:.2f}" for t in TASKS)
        mean = result["denominator"]["mean_accuracy"]
        lines.insert(2, f"| plain per-task | individual (denominator) | | {accs} | {mean:.3f} | 1.000 | |")
    lines += ["", "| validation mean accuracy | " + " | ".join(lams) + " |", "|---" * (len(lams) + 1) + "|"]
    for name, entry in result["merges"].items():
        means = entry.get("validation_means")
        if means:
            cells = [f"{means[lam]:.3f}" if lam in means else "" for lam in lams]
            cells = [f"**{c}**" if lam == entry["lam"] else c for c, lam in zip(cells, lams, strict=True)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| comparison | mean normalised (plain denominators) | mean accuracy |", "|---|---|---|"]
    for name, gaps in result["gaps"].items():
        norm = _fmtgap(gaps["mean_normalised"]) if "mean_normalised" in gaps else ""
        lines.append(f"| {name} | {norm} | {_fmtgap(gaps['mean_accuracy'])} |")
    return "\n".join(lines)
