"""Summary of issue 11's protocol (``protocol.py``): ``results/protocol.json`` and Markdown tables.

Per seed: each method's validation-chosen ``lam``, test accuracy and normalised accuracy (test accuracy
over that seed's own individual adapters, task by task). Over seeds: mean and spread (sample standard
deviation over the three seeds) of each method's mean normalised accuracy, and paired bootstrap 95 %
CIs of gaps that pool the seeds: test items are resampled within each task (the same items for every
seed, as the seeds share the test split), and the gap is the mean over seeds and tasks. The best
data-free baseline and the best cp are chosen by mean validation accuracy over the seeds (never on
test). The pooled regime (18 adapters) is normalised by the individual adapters' accuracy averaged over
the seeds. The ``norm`` strength rule is compared with the chosen ``lam`` on validation (points =
100 x mean validation accuracy).

Command (from the repository root; seconds)::

    python benchmarks/quality/protocol_summary.py
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from protocol import (  # noqa: E402
    BASELINES,
    OUT,
    REGIMES,
    SEEDS,
    VAL_ITEMS,
    choice,
    family,
    mean_accuracy,
    methods,
    path_of,
    rule_point,
    validation_means,
)
from run import environment  # noqa: E402
from stages import EVALS  # noqa: E402
from tasks import TASKS  # noqa: E402
from variants_summary import _ci  # noqa: E402

RESULT = HERE / "results" / "protocol.json"
N_BOOT = 2000
CP = ("cp_weighted", "cp_iso")  # the default cp and its whitened, isotropic full-rank variant


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def individual(seed: int) -> dict | None:
    """``{task: [0/1 per test item]}`` of seed ``seed``'s adapters on their own tasks."""
    runs = {t: _load(OUT / f"seed{seed}" / f"individual_{t}.test.json") for t in TASKS}
    return None if None in runs.values() else {t: r["correct"][t] for t, r in runs.items()}


def tested(regime: str, spec_id: str) -> dict | None:
    """``{task: [0/1 ...]}`` of the spec at its chosen ``lam`` on test, or None while missing."""
    try:
        lam = choice(regime, spec_id)
    except (ValueError, FileNotFoundError):
        return None
    run = _load(path_of(regime, spec_id, lam, "test"))
    return None if run is None else run["correct"]


def _arrays(runs: list[dict]) -> dict[str, np.ndarray]:
    """``[{task: [...]}, ...]`` (one per seed) -> ``{task: (seeds, items) float array}``."""
    return {t: np.array([r[t] for r in runs], dtype=float) for t in TASKS}


def normalised(a: list[dict], ind: list[dict], idx: dict | None = None) -> float:
    """Mean over seeds and tasks of accuracy / individual accuracy (tasks where that is 0 left out)."""
    ratios = []
    refs = _arrays(ind)
    for t, arr in _arrays(a).items():
        ref = refs[t]
        cols = idx[t] if idx else slice(None)
        num, den = arr[:, cols].sum(-1), ref[:, cols].sum(-1)
        ratios += [x / y for x, y in zip(num, den, strict=True) if y > 0]
    return float(np.mean(ratios))


def gap(a: list[dict], b: list[dict], ind: list[dict], *, seed: int = 0) -> dict:
    """Paired bootstrap of ``a - b`` (mean normalised accuracy and mean accuracy), pooled over seeds."""
    rng = np.random.default_rng(seed)
    arr_a, arr_b, arr_i = _arrays(a), _arrays(b), _arrays(ind)
    out = {}
    for name, ref in (("mean_normalised", arr_i), ("mean_accuracy", None)):
        draws = np.zeros(N_BOOT)
        point = []
        for t in TASKS:
            diff, den = arr_a[t] - arr_b[t], np.ones_like(arr_a[t]) if ref is None else ref[t]
            n = diff.shape[1]
            idx = rng.integers(0, n, size=(N_BOOT, n))
            d_sum, i_sum = diff[:, idx].sum(-1), den[:, idx].sum(-1)  # (seeds, boots)
            draws += np.where(i_sum > 0, d_sum / np.maximum(i_sum, 1e-12), 0.0).mean(0)
            point.append(float((diff.sum(-1) / np.maximum(den.sum(-1), 1e-12)).mean()))
        draws /= len(TASKS)
        low, high = np.quantile(draws, [0.025, 0.975])
        out[name] = {"gap": sum(point) / len(point), "ci95": [float(low), float(high)]}
    return out


def regime_summary(regime_seeds: dict[str, int | None], ind: list[dict]) -> dict:
    """Methods of the regimes (seed regimes pooled; or the one pooled regime) with gaps."""
    regimes = list(regime_seeds)
    specs = methods(regimes[0])
    rows: dict = {}
    runs_of: dict[str, list[dict]] = {}
    for spec_id in specs:
        runs = [tested(r, spec_id) for r in regimes]
        if None in runs:
            continue
        runs_of[spec_id] = runs
        lams = [choice(r, spec_id) for r in regimes]
        per_seed = [normalised([run], [i]) for run, i in zip(runs, ind, strict=True)]
        acc = [float(np.mean([np.mean(run[t]) for t in TASKS])) for run in runs]
        val = [validation_means(r, spec_id).get(lam) for r, lam in zip(regimes, lams, strict=True)]
        rows[spec_id] = {
            "lam": [str(lam) for lam in lams],
            "validation_mean_accuracy": val if spec_id != "cat" else None,
            "test_mean_accuracy": acc,
            "normalised_per_seed": per_seed,
            "normalised_mean": normalised(runs, ind),
            "normalised_sd": statistics.stdev(per_seed) if len(per_seed) > 1 else None,
            "accuracy_mean": float(np.mean(acc)),
        }

    def best(families) -> str | None:
        found = [s for s in rows if family(s) in families and rows[s]["validation_mean_accuracy"]]
        return max(found, key=lambda s: np.mean(rows[s]["validation_mean_accuracy"]), default=None)

    picks = {"best_baseline": best(BASELINES), "best_cp": best(CP)}
    default = next((s for s in rows if family(s) == "cp_weighted"), None)
    pairs = [(default, picks["best_baseline"]), (picks["best_cp"], picks["best_baseline"])]
    pairs += [(c, b) for c in rows if family(c) == "cp_iso" for b in rows if family(b) in BASELINES]
    pairs += [(c, default) for c in rows if family(c) == "cp_iso"]
    gaps = []
    for a, b in dict.fromkeys(p for p in pairs if None not in p and p[0] != p[1]):
        gaps.append({"a": a, "minus": b, **gap(runs_of[a], runs_of[b], ind)})
    return {"regimes": regimes, "methods": rows, **picks, "default_cp": default, "gaps": gaps}


def strength() -> list[dict]:
    """The ``norm`` rule's grid point against the chosen ``lam``, on validation, per regime and method."""
    out = []
    for regime in REGIMES:
        for spec_id in methods(regime):
            rules = _load(OUT / regime / f"{spec_id}.rules.json")
            if spec_id == "cat" or rules is None:
                continue
            means, lam, at = (
                validation_means(regime, spec_id),
                choice(regime, spec_id),
                rule_point(regime, spec_id),
            )
            if at not in means:
                continue
            out.append(
                {
                    "regime": regime,
                    "spec": spec_id,
                    "chosen": str(lam),
                    "rule_lam": rules["norm"],
                    "rule_grid": str(at),
                    "points_below_chosen": 100 * (means[lam] - means[at]),
                }
            )
    return out


def seed_similarity() -> dict:
    """|cos| of the deltas of every adapter pair, per module (``peft-cp-merge analyze`` on the 18
    adapters, ``results/interference_seeds``): same task across seeds vs different tasks."""
    from seeds_train import seed_root
    from similarity import RESULTS, _analyze, pair_stats

    report = _analyze([seed_root(s) / t for s in SEEDS for t in TASKS], RESULTS / "interference_seeds")
    return pair_stats(report, [*TASKS] * len(SEEDS))


def mean_weights_points() -> dict:
    """Validation accuracy at ``lam = 1/N`` (the weights of a mean): the ``--points`` runs of cp_iso
    beside the default cp's climb, per seed."""
    out = {}
    for seed in SEEDS:
        regime = f"seed{seed}"
        point = OUT / regime / "points" / path_of(regime, "cp_iso_r48", "1/N", "validation").name
        default = validation_means(regime, "cp_weighted_r16").get("1/N")
        if point.exists() and default is not None:
            out[regime] = {"cp_iso_r48": mean_accuracy(point), "cp_weighted_r16": default}
    return out


def summary() -> dict:
    seed_ind = {s: individual(s) for s in SEEDS}
    have = [s for s in SEEDS if seed_ind[s] is not None]
    result: dict = {"environment": environment(), "validation_items_per_task": VAL_ITEMS}
    result["individual_mean_accuracy"] = {
        f"seed{s}": float(np.mean([np.mean(seed_ind[s][t]) for t in TASKS])) for s in have
    }
    if have:
        result["per_task"] = regime_summary({f"seed{s}": s for s in have}, [seed_ind[s] for s in have])
    if len(have) == len(SEEDS):
        pooled_ind = {t: list(np.mean([seed_ind[s][t] for s in SEEDS], axis=0)) for t in TASKS}
        result["pooled"] = regime_summary({"pooled": None}, [pooled_ind])
    ceiling = {}
    for name in ("multitask", "multitask_full"):
        run = _load(EVALS / "reference" / f"{name}.test.json")
        if run and 0 in have:
            ceiling[name] = normalised([run["correct"]], [seed_ind[0]])
    result["multitask_ceiling_seed0"] = ceiling
    result["strength_norm_rule"] = strength()
    if len(have) == len(SEEDS):
        result["delta_cosine"] = seed_similarity()
    result["at_the_weights_of_a_mean"] = mean_weights_points()
    return result


def markdown(result: dict) -> str:
    lines = []
    for part in ("per_task", "pooled"):
        if part not in result:
            continue
        res = result[part]
        lines += [f"### {part}: {', '.join(res['regimes'])}", ""]
        lines += ["| method | lam per seed | val acc | test acc | normalised (mean ± sd over seeds) |"]
        lines += ["|---|---|---|---|---|"]
        for spec_id, row in sorted(res["methods"].items(), key=lambda kv: -kv[1]["normalised_mean"]):
            val = row["validation_mean_accuracy"]
            val_text = "-" if val is None else f"{np.mean(val):.3f}"
            sd = "" if row["normalised_sd"] is None else f" ± {row['normalised_sd']:.3f}"
            cells = [spec_id, ", ".join(row["lam"]), val_text, f"{row['accuracy_mean']:.3f}"]
            lines.append("| " + " | ".join(cells) + f" | {row['normalised_mean']:.3f}{sd} |")
        lines += ["", f"Best baseline by validation: {res['best_baseline']}; best cp: {res['best_cp']}.", ""]
        lines += ["| gap | normalised | accuracy |", "|---|---|---|"]
        for g in res["gaps"]:
            lines.append(
                f"| {g['a']} - {g['minus']} | {_ci(g['mean_normalised'])} | {_ci(g['mean_accuracy'])} |"
            )
        lines.append("")
    lines += ["| regime | method | chosen lam | norm rule lam -> grid | val points below chosen |"]
    lines += ["|---|---|---|---|---|"]
    for s in result["strength_norm_rule"]:
        cells = [s["regime"], s["spec"], s["chosen"], f"{s['rule_lam']:.3f} -> {s['rule_grid']}"]
        lines.append("| " + " | ".join(cells) + f" | {s['points_below_chosen']:.1f} |")
    by_spec: dict[str, list[float]] = {}
    for s in result["strength_norm_rule"]:
        by_spec.setdefault(f"{s['spec']} ({'pooled' if s['regime'] == 'pooled' else 'seeds'})", []).append(
            s["points_below_chosen"]
        )
    lines += ["", "| method | mean val points below chosen | regimes within 2 points |", "|---|---|---|"]
    for spec_id, points in by_spec.items():
        within = sum(p <= 2.0 for p in points)
        lines.append(f"| {spec_id} | {np.mean(points):.1f} | {within} of {len(points)} |")
    return "\n".join(lines)


def main() -> None:
    result = summary()
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
