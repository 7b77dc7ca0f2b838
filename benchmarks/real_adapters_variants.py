"""Side-by-side timing of engine variants (start, line search) on the real adapters and on the
Mistral-shaped synthetic set; alternating, medians, fit / rel_error / caps per variant.

Variants: ``gevd`` / ``svd`` (the start, with the default line search), ``gevd-plain`` /
``svd-plain`` (``CPOptions(line_search=False)``: plain ALS), ``svd_r8_baseline`` (the core-space svd
merge). In results written before the line search became the default (``git_head`` 14440e5),
``gevd`` / ``svd`` were plain ALS and ``+patch`` meant the line search and single-threaded sweeps.

    python benchmarks/real_adapters_variants.py --repeats 3 --threads 1 2
    python benchmarks/real_adapters_variants.py --set mistral --layers 8 --repeats 3 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import real_adapters as ra  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--set", default="real", choices=["real", "mistral"])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--variants", nargs="+", default=["gevd", "svd", "gevd-plain", "svd-plain", "svd_r8_baseline"]
    )
    p.add_argument("--out", type=Path, default=HERE / "results" / "real_adapters_variants.json")
    args = p.parse_args()
    if args.set == "real":
        stacks = ra.load_stacks(ra.DEFAULT_FOLDERS)
    else:
        import speed

        stacks = speed._mistral_stacks(args.layers, 10, 16, "cpu")
    from peft_cp_merge import merge_modules
    from peft_cp_merge.methods.cp import CPOptions

    weights = {n: [1.0] * s.shape[3] for n, s in stacks.items()}
    last = {}

    def variant(name):
        if name == "svd_r8_baseline":
            return lambda: ra.run_svd(stacks, 8)
        start, plain = name.removesuffix("-plain"), name.endswith("-plain")
        options = CPOptions.sum_like(init=start, line_search=not plain)

        def run():
            last[name] = merge_modules(stacks, weights, rank=16, options=options)

        return run

    fns = {v: variant(v) for v in args.variants}
    for fn in fns.values():
        fn()
    timing = ra.time_side_by_side(fns, args.threads, args.repeats)
    out = {"set": args.set, "environment": ra.environment(args.threads), "timing": timing, "quality": {}}
    for name, merged in last.items():
        m = list(merged.values())
        out["quality"][name] = {
            "fit_error_median": statistics.median(x.fit_error for x in m),
            "fit_error_mean": statistics.mean(x.fit_error for x in m),
            "rel_error_median": statistics.median(x.rel_error for x in m),
            "rel_error_mean": statistics.mean(x.rel_error for x in m),
            "hit_n_iter_max": sum(not x.converged for x in m),
            "n_iter_sum": sum(x.n_iter for x in m),
            "n_iter_max": max(x.n_iter for x in m),
        }
    print(json.dumps(out["timing"] | {"q": out["quality"]}, indent=0))
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
