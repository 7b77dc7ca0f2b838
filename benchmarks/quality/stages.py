"""The evaluation stages: reference models (base, individual, multi-task) and the merges.

Protocol (never tuned on test). Validation = the first ``VAL_ITEMS`` items of each task's
validation split. Every merge method is computed once with weights 1 and timed; its deltas are
scaled by each ``lam`` of its grid and evaluated on validation; the ``lam`` with the best mean
validation accuracy (ties: the first in grid order) is evaluated on the TEST split. ``cat`` is
also tested at ``lam = 1/N`` (the linear average, not tuned). All results are cached as JSON under
``results/evals/<part>/`` and skipped when present.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import merges
import torch
from base_model import load
from evaluate import evaluate
from tasks import TASKS, load_tasks
from train import ADAPTERS, load_lora_deltas, stacked_factors

EVALS = Path(__file__).resolve().parent / "results" / "evals"
DELTAS = Path(__file__).resolve().parent / "cache" / "deltas"
log = logging.getLogger("quality")

# Ascending, so that ties go to the smaller coefficient. The first run used ("1/N", 0.3, 0.5) and
# ("1/N", 0.3, 0.5, 1.0); its best values sat on the edges, so both grids were widened.
SUM_GRID = (0.1, "1/N", 0.3, 0.5, 0.75)  # methods whose merge is ~ the sum of the deltas
DISJOINT_GRID = (0.1, "1/N", 0.3, 0.5, 0.75, 1.0, 1.5)  # keep an adapter's component at full strength
ISO_GRID = (*DISJOINT_GRID, 2.0, 3.0)  # in case a flat spectrum wants a larger scale


@dataclass(frozen=True)
class Spec:
    """One merge configuration; ``lams`` is the validation grid of its scaling coefficient."""

    id: str
    kind: str
    lams: tuple
    params: dict = field(default_factory=dict)


SPECS = (  # in priority order: the stage runs them in this order
    Spec("cat", "core", SUM_GRID, {"method": "cat"}),
    Spec("cp_weighted_r16", "cp", SUM_GRID, {"cp_rank": 16, "cp_aggregation": "weighted"}),
    Spec("svd_r8", "core", SUM_GRID, {"method": "svd", "rank": 8}),
    Spec("tsv_r48", "core", SUM_GRID, {"method": "tsv", "rank": 48}),
    Spec("cp_disjoint_r16", "cp", DISJOINT_GRID, {"cp_rank": 16, "cp_aggregation": "disjoint"}),
    Spec("knots_ties", "knots", DISJOINT_GRID),
    Spec("cp_weighted_r8", "cp", SUM_GRID, {"cp_rank": 8, "cp_aggregation": "weighted"}),
    Spec("cp_weighted_r32", "cp", SUM_GRID, {"cp_rank": 32, "cp_aggregation": "weighted"}),
    Spec("authors_cp_r4", "authors", ("1/N", 0.3, 0.5)),  # 0 at every lam of the first grid: not widened
    Spec("cp_disjoint_r8", "cp", DISJOINT_GRID, {"cp_rank": 8, "cp_aggregation": "disjoint"}),
    Spec("cp_disjoint_r32", "cp", DISJOINT_GRID, {"cp_rank": 32, "cp_aggregation": "disjoint"}),
    # Whitened CP (issue 11): polar factors of U, V keep every component at full strength, as TSV does.
    Spec(
        "cp_whiten_r16",
        "cp",
        DISJOINT_GRID,
        {"cp_rank": 16, "cp_aggregation": "weighted", "cp_whiten": True},
    ),
    Spec("svd_r32", "core", SUM_GRID, {"method": "svd", "rank": 32}),
    # Isotropic merging (issue 11): flat spectra keep weak directions at full strength.
    Spec("iso_c_r48", "core", ISO_GRID, {"method": "iso_c", "rank": 48}),
    Spec("iso_cts_r48", "core", ISO_GRID, {"method": "iso_cts", "rank": 48}),
    # ... at the K = 12 libraries' rank sum r = 96 (their default; r48 truncates there)
    Spec("iso_c_r96", "core", ISO_GRID, {"method": "iso_c", "rank": 96}),
    Spec("iso_cts_r96", "core", ISO_GRID, {"method": "iso_cts", "rank": 96}),
    # The cp gain rules (issue 11): shared components counted once; flat gains in the whitened CP basis.
    Spec(
        "cp_shared_r16",
        "cp",
        DISJOINT_GRID,
        {"cp_rank": 16, "cp_aggregation": "weighted", "cp_sharing_exponent": 1.0},
    ),
    Spec(
        "cp_iso_r16",
        "cp",
        ISO_GRID,
        {"cp_rank": 16, "cp_aggregation": "weighted", "cp_whiten": True, "cp_isotropic": True},
    ),
    Spec(
        "cp_iso_r48",
        "cp",
        ISO_GRID,
        {"cp_rank": 48, "cp_aggregation": "weighted", "cp_whiten": True, "cp_isotropic": True},
    ),
    Spec(  # the K = 12 libraries' full rank (M = 96): no decomposition, each adapter's SVD
        "cp_iso_r96",
        "cp",
        ISO_GRID,
        {"cp_rank": 96, "cp_aggregation": "weighted", "cp_whiten": True, "cp_isotropic": True},
    ),
    # Issue 11's pooled regime (18 adapters of rank 8, 6 tasks x 3 seeds): full rank sum r = 144.
    Spec("tsv_r144", "core", SUM_GRID, {"method": "tsv", "rank": 144}),
    Spec("iso_cts_r144", "core", ISO_GRID, {"method": "iso_cts", "rank": 144}),
    Spec(
        "cp_iso_r144",
        "cp",
        ISO_GRID,
        {"cp_rank": 144, "cp_aggregation": "weighted", "cp_whiten": True, "cp_isotropic": True},
    ),
    # Each module's rank from its fit curve (issue 11): the fewest of 4/8/12/16 within 0.05 of rank 16.
    Spec(
        "cp_rank_tol_r16",
        "cp",
        SUM_GRID,
        {"cp_rank": 16, "cp_aggregation": "weighted", "cp_rank_tol": 0.05},
    ),
    Spec("peft_ties", "peft", DISJOINT_GRID, {"combination_type": "ties", "density": 0.5}),
    Spec("peft_ties_svd", "peft", DISJOINT_GRID, {"combination_type": "ties_svd", "density": 0.5}),
    # Libraries only: base weights N * size_i / sum(size) (lam = 1/N gives size-proportional weights,
    # merge_library's default); where all clusters have one size they equal the uniform specs.
    Spec("cat_size", "core", SUM_GRID, {"method": "cat", "size_weights": True}),
    Spec(
        "cp_weighted_r16_size",
        "cp",
        SUM_GRID,
        {"cp_rank": 16, "cp_aggregation": "weighted", "size_weights": True},
    ),
)
SIZE_WEIGHTED = ("cat_size", "cp_weighted_r16_size")
# The cp options every cp spec above leaves out, at the values they were measured with.
CP_SPELLED = {"cp_whiten": False, "cp_isotropic": False, "cp_sharing_exponent": 0.0, "cp_rank_tol": 0.0}
CLORA_SPECS = tuple(spec.id for spec in SPECS)  # every method, on the libraries too


def lam_value(lam, n: int) -> float:
    return 1.0 / n if lam == "1/N" else float(lam)


VAL_ITEMS = int(os.environ.get("BENCH_VAL_ITEMS", "20"))  # per task, for the scaling grid


def _split(data, split: str, tasks=TASKS) -> dict:
    """Test: every item. Validation: the first ``VAL_ITEMS`` of each task (CPU budget)."""
    n = VAL_ITEMS if split == "validation" else None
    return {t: data[t][split][:n] for t in tasks}


def cached_eval(path: Path, model, tok, data: dict, deltas, *, keep_predictions: bool, meta: dict) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    result = evaluate(model, tok, data, deltas)
    if not keep_predictions:
        result.pop("predictions")
    result.update(meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    mean = sum(result["accuracy"].values()) / len(result["accuracy"])
    log.info("%s: mean %.3f %s (%.0f s)", path.name, mean, result["accuracy"], result["seconds"])
    return result


def reuse_evaluation(source: Path, path: Path) -> None:
    """Copy the identical evaluation ``source`` to ``path``, noted as ``reused_from`` (relative to the
    benchmark folder); nothing when ``path`` exists or ``source`` does not."""
    if path.exists() or not source.exists():
        return
    here = EVALS.parent.parent
    result = json.loads(source.read_text()) | {"reused_from": str(source.relative_to(here))}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    log.info("%s: reused %s", path.name, source.relative_to(here))


def stage_reference() -> None:
    """Base model, each individual adapter on its own task, and the multi-task adapter (val + test)."""
    model, tok = load()
    data = load_tasks()
    out = EVALS / "reference"
    for split in ("validation", "test"):
        keep = split == "test"
        cached_eval(
            out / f"base.{split}.json",
            model,
            tok,
            _split(data, split),
            None,
            keep_predictions=keep,
            meta={"model": "base", "split": split},
        )
        for task in TASKS:
            if not (ADAPTERS / task / "train_record.json").exists():
                log.info("individual adapter %s not trained yet; skipped", task)
                continue
            deltas = load_lora_deltas(ADAPTERS / task)
            cached_eval(
                out / f"individual_{task}.{split}.json",
                model,
                tok,
                _split(data, split, [task]),
                deltas,
                keep_predictions=keep,
                meta={"model": f"individual_{task}", "split": split},
            )
        for name in ("multitask", "multitask_full"):
            if split == "test" and (ADAPTERS / name / "train_record.json").exists():
                cached_eval(
                    out / f"{name}.{split}.json",
                    model,
                    tok,
                    _split(data, split),
                    load_lora_deltas(ADAPTERS / name),
                    keep_predictions=keep,
                    meta={"model": name, "split": split},
                )


def _adapter_dirs(part: str) -> dict[str, Path]:
    if part == "per_task":
        return {t: ADAPTERS / t for t in TASKS}
    if part.startswith("clora"):
        from library_build import clora_adapter_dirs

        return clora_adapter_dirs(part)
    raise SystemExit(f"Unknown part {part!r}; expected per_task, clora or clora_k<K>")


def _base_weights(spec: Spec, dirs: dict[str, Path]) -> list[float] | None:
    """``None`` (weights 1) or, for ``size_weights`` specs, ``N * size_i / sum(size)``."""
    if not spec.params.get("size_weights"):
        return None
    from library_build import clora_sizes

    sizes = clora_sizes(dirs)
    return [len(sizes) * s / sum(sizes) for s in sizes]


def _compute(spec: Spec, factors, base, dirs: dict[str, Path], cache: dict) -> tuple[dict, float, dict]:
    """The spec's deltas at its base weights, the merge seconds, and extra facts to record."""
    weights = _base_weights(spec, dirs)
    params = {k: v for k, v in spec.params.items() if k != "size_weights"}
    extra = {} if weights is None else {"base_weights": weights}
    if spec.kind == "core":
        deltas, secs = merges.timed(
            merges.merge_core_baseline, factors, params["method"], rank=params.get("rank"), weights=weights
        )
        return deltas, secs, extra
    if spec.kind == "knots":
        deltas, secs = merges.timed(merges.merge_knots, factors)
        return deltas, secs, {}
    if spec.kind == "authors":
        (deltas, facts), secs = merges.timed(merges.merge_authors_cp, factors)
        return deltas, secs, facts
    if "peft" not in cache:
        cache["peft"] = merges.peft_model_with(base, dirs)
    peft_model, names = cache["peft"], list(dirs)
    if spec.kind == "cp":
        params = CP_SPELLED | params  # a spec is the same merge whatever CPOptions' defaults are
        deltas, secs = merges.timed(merges.peft_merge, peft_model, names, "cp", weights, **params)
        if weights is None:
            extra["homogeneity_rel_diff"] = merges.check_homogeneous(peft_model, names, deltas, **params)
        return deltas, secs, extra
    deltas, secs = merges.timed(merges.peft_merge, peft_model, names, **params)
    return deltas, secs, extra


def _deltas(spec: Spec, factors, base, dirs, out: Path, cache: dict) -> dict:
    """The spec's deltas at weights 1: from ``cache/deltas`` or computed (timed, ``<spec>.merge.json``)."""
    from safetensors.torch import load_file, save_file

    path = DELTAS / out.name / f"{spec.id}.safetensors"
    if path.exists() and (out / f"{spec.id}.merge.json").exists():
        return load_file(str(path))
    deltas, secs, extra = _compute(spec, factors, base, dirs, cache)
    info = {
        "spec": spec.id,
        "kind": spec.kind,
        "params": spec.params,
        "merge_seconds": secs,
        "adapters": list(dirs),
        "threads": torch.get_num_threads(),
        **extra,
    }
    out.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({m: d.contiguous() for m, d in deltas.items()}, str(path))
    (out / f"{spec.id}.merge.json").write_text(json.dumps(info, indent=2))
    log.info("merged %s in %.1f s %s", spec.id, secs, extra)
    return deltas


def _val_path(out: Path, spec: Spec, lam, n: int) -> Path:
    return out / f"{spec.id}.lam{lam_value(lam, n):.3f}.validation.json"


def _val_means(out: Path, spec: Spec, n: int) -> dict | None:
    means = {}
    for lam in spec.lams:
        path = _val_path(out, spec, lam, n)
        if not path.exists():
            return None
        acc = json.loads(path.read_text())["accuracy"]
        means[lam] = sum(acc.values()) / len(acc)
    return means


def _chosen_cp(out: Path, specs, n: int) -> set[str]:
    """The cp spec with the best validation mean per aggregation (only these get a test run)."""
    best: dict[str, tuple[float, str]] = {}
    for spec in specs:
        means = _val_means(out, spec, n) if spec.kind == "cp" else None
        if means:
            agg = spec.params["cp_aggregation"]
            best[agg] = max(best.get(agg, (-1.0, "")), (max(means.values()), spec.id))
    return {spec_id for _, spec_id in best.values()}


def stage_merge(part: str) -> None:
    """Merges of ``part``: ``BENCH_PHASE=val`` (grids), ``test`` (chosen scalings) or ``all`` (both).

    ``BENCH_METHODS`` (comma-separated spec ids) restricts the specs, to split the work between
    processes. In the test phase, of the cp specs only the best per aggregation (by validation)
    is tested unless ``BENCH_TEST_CP=all``.
    """
    only = [x for x in os.environ.get("BENCH_METHODS", "").split(",") if x]
    phase = os.environ.get("BENCH_PHASE", "all")
    if part == "per_task":
        specs = [s for s in SPECS if s.id not in SIZE_WEIGHTED]
    else:
        specs = [s for s in SPECS if s.id in CLORA_SPECS]
    specs = [s for s in specs if not only or s.id in only]
    model, tok = load()
    data = load_tasks()
    dirs = _adapter_dirs(part)
    if part != "per_task":
        from library_build import clora_sizes

        if len(set(clora_sizes(dirs))) == 1:  # equal sizes: the size specs are the uniform ones
            specs = [s for s in specs if s.id not in SIZE_WEIGHTED]
    n = len(dirs)
    factors = stacked_factors(dirs)
    out, cache = EVALS / part, {}
    for spec in specs:
        if phase in ("val", "all") and _val_means(out, spec, n) is None:
            deltas = _deltas(spec, factors, model, dirs, out, cache)
            for lam in spec.lams:
                scaled = {m: lam_value(lam, n) * d for m, d in deltas.items()}
                cached_eval(
                    _val_path(out, spec, lam, n),
                    model,
                    tok,
                    _split(data, "validation"),
                    scaled,
                    keep_predictions=False,
                    meta={"spec": spec.id, "lam": lam, "split": "validation"},
                )
        if phase in ("test", "all"):
            _test(
                spec,
                specs,
                factors,
                model,
                tok,
                data,
                dirs,
                out,
                cache,
                explicit=os.environ.get("BENCH_TEST_CP") == "all",
            )


def _test(
    spec: Spec, specs, factors, model, tok, data, dirs, out: Path, cache: dict, *, explicit: bool
) -> None:
    n = len(dirs)
    means = _val_means(out, spec, n)
    test_path = out / f"{spec.id}.test.json"
    if means is None:
        return
    best = max(spec.lams, key=lambda lam: (means[lam], -spec.lams.index(lam)))
    if test_path.exists():
        if json.loads(test_path.read_text())["lam"] == best:
            return
        log.info("%s: validation now chooses lam=%s; the stale test run is redone", spec.id, best)
        test_path.unlink()
    if spec.kind == "cp" and not explicit and spec.id not in _chosen_cp(out, SPECS, n):
        return
    deltas = _deltas(spec, factors, model, dirs, out, cache)
    tests = [best] + (["1/N"] if spec.id == "cat" and best != "1/N" else [])
    for lam in tests:
        scaled = {m: lam_value(lam, n) * d for m, d in deltas.items()}
        name = test_path if lam == best else out / f"{spec.id}.lam{lam_value(lam, n):.3f}.test.json"
        meta = {
            "spec": spec.id,
            "lam": lam,
            "split": "test",
            "chosen_on_validation": lam == best,
            "validation_means": {str(k): v for k, v in means.items()},
        }
        cached_eval(name, model, tok, _split(data, "test"), scaled, keep_predictions=True, meta=meta)
