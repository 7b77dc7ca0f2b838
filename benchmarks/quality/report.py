"""Collect the cached evaluations into ``results/quality_results.json``, a Markdown table and a plot.

Normalised accuracy of a model on a task = its accuracy / the individual (per-task) adapter's
accuracy on the same split; averaged over tasks. Confidence intervals: paired bootstrap over test
items, resampled within each task (2000 resamples, seed 0); the individual adapter's items are
resampled together with the compared models', so the denominator varies too.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from stages import EVALS, SPECS, lam_value
from tasks import TASKS

RESULTS = Path(__file__).resolve().parent / "results"
SVD_BASED = ("svd_r8", "svd_r32", "tsv_r48", "knots_ties")
N_BOOT = 2000


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def references() -> dict:
    ref = {}
    for split in ("validation", "test"):
        ref[split] = {
            "base": _load(EVALS / "reference" / f"base.{split}.json"),
            "multitask": _load(EVALS / "reference" / f"multitask.{split}.json"),
            "multitask_full": _load(EVALS / "reference" / f"multitask_full.{split}.json"),
        }
        indiv = {"accuracy": {}, "correct": {}}
        for task in TASKS:
            r = _load(EVALS / "reference" / f"individual_{task}.{split}.json")
            if r:
                indiv["accuracy"][task] = r["accuracy"][task]
                indiv["correct"][task] = r["correct"][task]
        ref[split]["individual"] = indiv if len(indiv["accuracy"]) == len(TASKS) else None
    return ref


def summarise(result: dict, individual: dict) -> dict:
    acc = result["accuracy"]
    norm = {
        t: acc[t] / individual["accuracy"][t] if individual["accuracy"][t] > 0 else float("nan")
        for t in TASKS
    }
    return {
        "accuracy": acc,
        "mean_accuracy": sum(acc.values()) / len(acc),
        "normalised": norm,
        "mean_normalised": sum(norm.values()) / len(norm),
    }


def merges_of(part: str, ref: dict) -> dict:
    out = {}
    for spec in SPECS:
        test = _load(EVALS / part / f"{spec.id}.test.json")
        info = _load(EVALS / part / f"{spec.id}.merge.json")
        if not test or not info:
            continue
        n = len(info["adapters"])
        val = {}
        for lam in spec.lams:
            v = _load(EVALS / part / f"{spec.id}.lam{lam_value(lam, n):.3f}.validation.json")
            if v:
                val[str(lam)] = summarise(v, ref["validation"]["individual"])
        out[spec.id] = {
            "params": spec.params,
            "chosen_lam": test["lam"],
            "merge_seconds": info["merge_seconds"],
            "extra": {k: v for k, v in info.items() if k not in ("spec", "kind", "params", "merge_seconds")},
            "validation": val,
            "test": summarise(test, ref["test"]["individual"]),
            "correct": test["correct"],
        }
        if spec.id == "cat":
            mean = _load(EVALS / part / f"cat.lam{1 / n:.3f}.test.json") or (
                test if test["lam"] == "1/N" else None
            )
            if mean:
                out["linear_average"] = {
                    "params": {"lam": "1/N"},
                    "chosen_lam": "1/N (fixed)",
                    "merge_seconds": info["merge_seconds"],
                    "validation": {},
                    "test": summarise(mean, ref["test"]["individual"]),
                    "correct": mean["correct"],
                }
    return out


def best_by_validation(merged: dict, ids) -> str | None:
    """The spec among ``ids`` with the best mean validation normalised accuracy at its chosen lam."""
    scored = []
    for i in ids:
        if i in merged and merged[i]["validation"]:
            v = merged[i]["validation"].get(str(merged[i]["chosen_lam"]))
            if v:
                scored.append((v["mean_normalised"], i))
    return max(scored)[1] if scored else None


CP_SETTING_PAIRS = (
    ("cp_weighted_r16", "cp_weighted_r8"),
    ("cp_weighted_r32", "cp_weighted_r16"),
    ("cp_weighted_r16", "cp_disjoint_r16"),
    ("cp_weighted_r32", "cp_disjoint_r32"),
)


def bootstrap_gap(a: dict, b: dict, individual: dict, *, seed: int = 0) -> dict:
    """Paired bootstrap of mean normalised accuracy(a) - (b) over test items (stratified by task)."""
    rng = random.Random(seed)

    def norm_gap(idx: dict) -> float:
        gaps = []
        for t in TASKS:
            ind = sum(individual[t][i] for i in idx[t])
            if ind == 0:
                continue
            gaps.append((sum(a[t][i] for i in idx[t]) - sum(b[t][i] for i in idx[t])) / ind)
        return sum(gaps) / len(gaps)

    full = {t: list(range(len(a[t]))) for t in TASKS}
    point = norm_gap(full)
    draws = sorted(
        norm_gap({t: [rng.randrange(len(a[t])) for _ in a[t]] for t in TASKS}) for _ in range(N_BOOT)
    )
    return {
        "gap": point,
        "ci95": [draws[int(0.025 * N_BOOT)], draws[int(0.975 * N_BOOT) - 1]],
        "n_boot": N_BOOT,
    }


def data_fingerprint() -> dict:
    """Split sizes and a sha256 of every (task, split, prompt, answer), to tie results to the data."""
    import hashlib

    from stages import VAL_ITEMS
    from tasks import load_tasks

    data = load_tasks()
    digest = hashlib.sha256()
    for task in TASKS:
        for split in ("train", "validation", "test"):
            for e in data[task][split]:
                digest.update(f"{task}\t{split}\t{e.prompt}\t{e.answer}\n".encode())
    sizes = {t: {s: len(v) for s, v in data[t].items()} for t in TASKS}
    return {"sha256": digest.hexdigest(), "sizes": sizes, "validation_items_used_per_task": VAL_ITEMS}


def collect() -> dict:
    from run import environment

    ref = references()
    indiv_test = ref["test"]["individual"]
    out = {
        "environment": environment(),
        "tasks": list(TASKS),
        "data": data_fingerprint(),
        "reference": {},
        "parts": {},
        "comparisons": {},
    }
    for name in ("base", "multitask", "multitask_full"):
        if ref["test"][name] and indiv_test:
            out["reference"][name] = summarise(ref["test"][name], indiv_test)
    if indiv_test:
        out["reference"]["individual"] = {
            "accuracy": indiv_test["accuracy"],
            "mean_accuracy": sum(indiv_test["accuracy"].values()) / len(TASKS),
            "validation_accuracy": ref["validation"]["individual"]["accuracy"],
        }
    out["validation_grid"] = {}
    clora_parts = sorted(p.name for p in EVALS.glob("clora*") if p.is_dir())
    for part in ("per_task", *clora_parts):
        if (EVALS / part).exists() and indiv_test:
            out["parts"][part] = merges_of(part, ref)
            out["validation_grid"][part] = validation_grid(part, ref)
    per_task = out["parts"].get("per_task", {})
    cp_ids = [s.id for s in SPECS if s.kind == "cp"]
    best_cp, best_svd = best_by_validation(per_task, cp_ids), best_by_validation(per_task, SVD_BASED)
    comp = out["comparisons"]
    if best_cp and best_svd:
        comp["cp_vs_best_svd_based"] = {
            "cp": best_cp,
            "baseline": best_svd,
            "selected_on": "validation",
            **bootstrap_gap(
                per_task[best_cp]["correct"], per_task[best_svd]["correct"], indiv_test["correct"]
            ),
        }
        for other in ("linear_average", "tsv_r48", "knots_ties", "svd_r8"):
            if other in per_task:
                comp[f"cp_vs_{other}"] = {
                    "cp": best_cp,
                    "baseline": other,
                    **bootstrap_gap(
                        per_task[best_cp]["correct"], per_task[other]["correct"], indiv_test["correct"]
                    ),
                }
    for path in sorted((EVALS / "per_task").glob("*.lam*.test.json")):  # other lams tested on purpose
        spec_id, lam = path.name.split(".lam")[0], path.name.split(".lam")[1].removesuffix(".test.json")
        if best_cp and spec_id != "cat":
            comp[f"cp_vs_{spec_id}_lam{lam}"] = {
                "cp": best_cp,
                "baseline": f"{spec_id} at lam {lam}",
                **bootstrap_gap(per_task[best_cp]["correct"], _load(path)["correct"], indiv_test["correct"]),
            }
    for a, b in CP_SETTING_PAIRS:  # the settings behind the defaults, on test (chosen on validation)
        if a in per_task and b in per_task:
            comp[f"{a}_vs_{b}"] = {
                "cp": a,
                "baseline": b,
                **bootstrap_gap(per_task[a]["correct"], per_task[b]["correct"], indiv_test["correct"]),
            }
    for part in clora_parts:
        clora = out["parts"].get(part, {})
        best_clora_cp = best_by_validation(clora, cp_ids)
        if best_cp and best_clora_cp:
            comp[f"{part}_cp_vs_per_task_cp"] = {
                part: best_clora_cp,
                "per_task": best_cp,
                **bootstrap_gap(
                    clora[best_clora_cp]["correct"], per_task[best_cp]["correct"], indiv_test["correct"]
                ),
            }
    return out


def markdown(res: dict) -> str:
    tasks = res["tasks"]
    head = "| model | lam (val) | " + " | ".join(tasks) + " | mean acc | mean norm. | merge s |"
    lines = [head, "|" + "---|" * (len(tasks) + 5)]

    def row(name, summ, lam="", secs=""):
        accs = " | ".join(f"{summ['accuracy'][t]:.2f}" for t in tasks)
        norm = f"{summ['mean_normalised']:.3f}" if "mean_normalised" in summ else "1.000"
        return f"| {name} | {lam} | {accs} | {summ['mean_accuracy']:.3f} | {norm} | {secs} |"

    for name in ("base", "individual", "multitask", "multitask_full"):
        if name in res["reference"]:
            lines.append(row(name, res["reference"][name]))
    for part, merged in res["parts"].items():
        for spec_id, m in merged.items():
            secs = f"{m['merge_seconds']:.1f}"
            lines.append(row(f"{part}: {spec_id}", m["test"], str(m["chosen_lam"]), secs))
    return "\n".join(lines)


def validation_markdown(res: dict) -> str:
    """Every evaluated (spec, lam) on validation: mean accuracy / mean normalised accuracy."""
    lines = ["| part: spec | lam | val mean acc | val mean norm. | chosen |", "|---|---|---|---|---|"]
    for part, grid in res.get("validation_grid", {}).items():
        for spec_id, by_lam in grid.items():
            chosen = res["parts"].get(part, {}).get(spec_id, {}).get("chosen_lam")
            for lam, v in by_lam.items():
                mark = "yes" if chosen is not None and str(chosen) == lam else ""
                acc, norm = v["mean_accuracy"], v["mean_normalised"]
                lines.append(f"| {part}: {spec_id} | {lam} | {acc:.3f} | {norm:.3f} | {mark} |")
    return "\n".join(lines)


def validation_grid(part: str, ref: dict) -> dict:
    """Validation results of every spec of ``part``, including specs without a test run."""
    grid = {}
    for spec in SPECS:
        info = _load(EVALS / part / f"{spec.id}.merge.json")
        if not info:
            continue
        n = len(info["adapters"])
        for lam in spec.lams:
            v = _load(EVALS / part / f"{spec.id}.lam{lam_value(lam, n):.3f}.validation.json")
            if v:
                grid.setdefault(spec.id, {})[str(lam)] = summarise(v, ref["validation"]["individual"])
    return grid


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values = [], []
    for part, merged in res["parts"].items():
        for spec_id, m in merged.items():
            labels.append(f"{part}:{spec_id}")
            values.append(m["test"]["mean_normalised"])
    for name in ("multitask", "multitask_full"):
        if name in res["reference"]:
            labels.append(name)
            values.append(res["reference"][name]["mean_normalised"])
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(labels) + 1))
    ax.barh(range(len(labels)), values, color=["C1" if "cp_" in lab else "C0" for lab in labels])
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.axvline(0.9, color="gray", ls="--", lw=0.8)
    ax.set_xlabel("mean normalised test accuracy (merged / individual)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_report() -> None:
    res = collect()
    RESULTS.mkdir(exist_ok=True)
    slim = json.loads(json.dumps(res))
    for merged in slim["parts"].values():
        for m in merged.values():
            m.pop("correct", None)
    (RESULTS / "quality_results.json").write_text(json.dumps(slim, indent=2))
    (RESULTS / "table.md").write_text(markdown(res) + "\n\n" + validation_markdown(res) + "\n")
    if res["parts"]:
        plot(res, RESULTS / "normalised_accuracy.png")
    print(markdown(res))
    print(json.dumps(res["comparisons"], indent=2))
