"""The ``peft-cp-merge`` command line: parses arguments and calls the library, nothing more.

Each subcommand has an ``_add_<name>_parser`` function that declares its arguments and a
``run_<name>`` function that calls the matching library function and prints the result:

- ``merge`` -> :func:`.merge_adapter_folders` (``--dry-run``: :func:`.plan_merge`),
- ``analyze`` -> :func:`.analyze_adapter_folders` and :mod:`.analysis.report`,
- ``build-library`` (:mod:`.cli.build_library`) -> :func:`.build_library` (``merge --library``
  merges its adapters).

Argument types and the method options generated from the registry are in :mod:`.cli.arguments`.

Example::

    peft-cp-merge merge math/ code/ --weights 1 1 --out merged/
    peft-cp-merge analyze math/ code/ --rank 8 16 32 --out report/
    peft-cp-merge build-library --data train.jsonl --base-model model/ --k 10 --out library/
    peft-cp-merge merge --library library/ --out merged/
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path

from .._version import __version__
from ..analysis.metrics import analyze_adapter_folders
from ..analysis.report import format_report, plot_report, write_report_json
from ..folders.merging import check_values, merge_adapter_folders
from ..folders.output import OutputError, check_output_dir
from ..folders.plan import plan_merge
from ..folders.reading import CONFIG_NAME, WEIGHTS_NAME
from ..input_checks import check_device
from ..methods import METHODS, get_method
from .arguments import add_common, add_method_options, finite, method_options, positive, positive_int
from .build_library import add_build_library_parser, run_build_library

__all__ = [
    "EXIT_FAULT",
    "EXIT_USAGE",
    "build_parser",
    "main",
    "run_analyze",
    "run_build_library",
    "run_merge",
]

_PROG = "peft-cp-merge"
EXIT_USAGE = 2  # the request cannot be carried out as given (argparse's code for usage errors)
EXIT_FAULT = 1  # a fault while carrying it out (disk full, out of memory, an unexpected error)
# Errors that mean "the request cannot be carried out as given": one line, exit code 2.
_USER_ERRORS = (ValueError, FileExistsError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


def _add_merge_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="merge LoRA adapter folders into a new adapter folder",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Merge PEFT LoRA adapter folders (adapter_config.json + adapter_model.safetensors)\n"
            "into one adapter from the files alone: no base model is loaded. For cp, cat and svd\n"
            "the result is what PEFT's add_weighted_adapter(..., combination_type=METHOD) gives\n"
            "in memory; PeftModel.from_pretrained(base, OUT_DIR) loads it."
        ),
        epilog=(
            "methods:\n" + "".join(f"  {m.name:<7} {m.help}\n" for m in METHODS.values()) + "\n"
            "which method (six task adapters of a 135M model, 3 seeds; README, Quality):\n"
            "  no data: the default cp (whitened, isotropic, rank sum r) with weights about 1\n"
            "  each, or iso_cts (both 0.68 of the individual adapters' accuracy), then tsv\n"
            "  (0.62); the sum-like cp (--no-whiten --no-isotropic) and the mean keep 0.55.\n"
            "  With 16-32 examples per task, calibrate cp (--calibration; one seed).\n\n"
            "weights: about 1 each keeps every adapter at its own strength for the default cp,\n"
            "tsv, iso_c and iso_cts; weights summing to 1 average them for cat, svd and the\n"
            "sum-like cp.\n\nexamples:\n"
            "  peft-cp-merge merge math/ code/ --weights 1 1 --out merged/\n"
            "  peft-cp-merge merge a/ b/ c/ --weights .5 .3 .2 --method cat --out cat/ --dry-run\n"
            "  peft-cp-merge merge --library library/ --out merged/"
        ),
    )
    parser.add_argument("adapters", nargs="*", metavar="ADAPTER_DIR", help="adapter folders to merge")
    parser.add_argument(
        "--library",
        metavar="LIB_DIR",
        help="merge the cluster adapters of a library from build-library instead (default weights: "
        "K x cluster sizes / total for the default cp, tsv, iso_c, iso_cts; cluster sizes / total for "
        "cat, svd and the sum-like cp; default rank: sum r for cp/iso_c/iso_cts, max r for svd/tsv)",
    )
    parser.add_argument(
        "--weights",
        nargs="+",
        type=finite,
        metavar="W",
        help="one merge weight per adapter (required without --library)",
    )
    parser.add_argument(
        "--rank",
        type=positive_int,
        help="rank R of the merged adapter (not with --method cat); at most the largest sum of the "
        "adapters' ranks in a module (above it only zeros would be added: refused)",
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="OUT_DIR",
        help="folder to create; never an input, inside one, around one, or the current directory",
    )
    parser.add_argument("--method", choices=list(METHODS), default="cp", help="merge method (default: cp)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT_DIR if it is a merge this tool wrote (has its merge_info.json) or empty; "
        "any other folder is refused",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check the inputs (configs, shapes, every value for NaN/Inf), the rank and OUT_DIR, print "
        "what would be merged, write nothing",
    )
    calibration = parser.add_argument_group(
        "calibration (cp only; needs the base model and the [library] extra)",
        "learn each CP component's gain from a few examples after the merge (peft_cp_merge.calibrate)",
    )
    calibration.add_argument("--calibration", metavar="FILE", help="examples, .jsonl or .csv")
    calibration.add_argument("--base-model", metavar="PATH", help="the adapters' base model folder or name")
    calibration.add_argument("--instruction-field", default="instruction", help="(default: instruction)")
    calibration.add_argument("--response-field", default="response", help="(default: response)")
    calibration.add_argument(
        "--prompt-template", default="{instruction}\n", help="as for training (default: '{instruction}\\n')"
    )
    calibration.add_argument("--max-length", type=positive_int, default=512, help="tokens per example (512)")
    calibration.add_argument(
        "--calibration-steps", type=positive_int, default=40, help="optimizer steps (40)"
    )
    calibration.add_argument("--calibration-lr", type=positive, default=5e-2, help="learning rate (0.05)")
    add_method_options(parser)
    add_common(parser)
    parser.set_defaults(run=run_merge)


def _add_analyze_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="show where adapters interfere, module by module",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Per module: pairwise cosine similarity of the adapters' deltas, TSV interference\n"
            "(STI_rel), its CP counterpart (CP-STI_rel, specificity) and the CP fit at each --rank,\n"
            "all computed exactly in the compressed core (definitions: peft_cp_merge.analysis.metrics).\n"
            "Prints the worst modules and a summary by layer depth; with --out also writes\n"
            "report.json and PNG plots (plots need matplotlib: pip install matplotlib)."
        ),
        epilog="example:\n  peft-cp-merge analyze math/ code/ --rank 8 16 32 --out report/",
    )
    parser.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR", help="adapter folders to analyse")
    parser.add_argument(
        "--rank",
        dest="ranks",
        nargs="+",
        type=positive_int,
        metavar="R",
        help="CP ranks to fit (default: the largest adapter rank r and 2r)",
    )
    parser.add_argument(
        "--out",
        metavar="REPORT_DIR",
        help="write report.json and plots here (not into an adapter folder or an input)",
    )
    parser.add_argument(
        "--top", type=positive_int, default=15, help="rows in the worst-modules table (default 15)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of CP-ALS (default 0)")
    add_common(parser)
    parser.set_defaults(run=run_analyze)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Merge LoRA adapter folders by a joint CP decomposition, and see where they interfere.",
        epilog="Exit status: 0 done, 2 bad input or usage (nothing written), 1 a fault while working "
        "(disk full, out of memory); errors are one line, -v adds the traceback.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    _add_merge_parser(subparsers)
    _add_analyze_parser(subparsers)
    add_build_library_parser(subparsers)
    return parser


def run_merge(args: argparse.Namespace) -> int:
    """``merge``: :func:`~.folders.merging.merge_adapter_folders`, or the plan with ``--dry-run``."""
    method = get_method(args.method)
    options = method.make_options(method_options(args))
    if args.library is not None:
        if args.adapters:
            raise ValueError("Give either ADAPTER_DIR arguments or --library, not both")
        from ..library import library_merge_inputs

        inputs = library_merge_inputs(
            args.library, weights=args.weights or "size", rank=args.rank, method=args.method, options=options
        )
        args.adapters, args.weights, args.rank = list(inputs.adapter_dirs), list(inputs.weights), inputs.rank
    elif not args.adapters or args.weights is None:
        raise ValueError("Give ADAPTER_DIR arguments with --weights, or --library")
    device = check_device(args.device)
    calibration_examples = _calibration_examples(args)
    if args.dry_run:
        check_output_dir(args.out, args.adapters, overwrite=args.overwrite)
        plan = plan_merge(
            args.adapters,
            weights=args.weights,
            rank=args.rank,
            method=args.method,
            allow_different_base=args.allow_different_base,
        )
        check_values(plan, device=device, group_bytes=int(args.group_mb * 2**20))
        print(plan.format_table())
        print(f"Dry run: nothing written; would write {args.out}")
        return 0
    result = merge_adapter_folders(
        args.adapters,
        args.out,
        weights=args.weights,
        rank=args.rank,
        method=args.method,
        device=device,
        overwrite=args.overwrite,
        allow_different_base=args.allow_different_base,
        options=options,
        group_bytes=int(args.group_mb * 2**20),
        progress=not args.no_progress,
    )
    errors = [e for e in result.rel_errors.values() if e is not None]
    on_purpose = method.per_adapter_weights(options)
    print(
        f"Wrote {result.out_dir}: method {result.plan.method}, rank {result.plan.rank}, "
        f"{len(result.plan.modules)} modules in {result.seconds:.1f} s; distance to the weighted sum "
        f"(relative) mean {sum(errors) / len(errors):.4g}, max {max(errors):.4g}"
        + (" (this method departs from the sum on purpose)" if on_purpose else "")
    )
    if calibration_examples is not None:
        from ..library.calibrating import calibrate_adapter_folder

        report = calibrate_adapter_folder(
            result.out_dir,
            calibration_examples,
            base_model=args.base_model,
            prompt_template=args.prompt_template,
            max_length=args.max_length,
            steps=args.calibration_steps,
            lr=args.calibration_lr,
            seed=getattr(args, "seed", None) or 0,
            progress=not args.no_progress,
        )
        print(
            f"Calibrated on {len(calibration_examples)} examples in {report.seconds:.1f} s: held-out loss "
            f"{report.holdout_loss_before} -> {report.holdout_loss_after}, gains {report.gain_min:.3g} .. "
            f"{report.gain_max:.3g}"
        )
    return 0


def _calibration_examples(args: argparse.Namespace):
    """The calibration examples, read and checked before any merge work (``None`` without them)."""
    if args.calibration is None:
        if args.base_model is not None:
            raise ValueError("--base-model is only used with --calibration FILE")
        return None
    from ..library.calibrating import check_calibration_inputs
    from ..library.data import load_examples

    check_calibration_inputs(args.base_model, args.method)
    return load_examples(
        args.calibration, instruction_field=args.instruction_field, response_field=args.response_field
    )


def run_analyze(args: argparse.Namespace) -> int:
    """``analyze``: :func:`.analyze_adapter_folders`, printed and optionally written."""
    out = _report_dir(args.out, args.adapters) if args.out else None
    report = analyze_adapter_folders(
        args.adapters,
        ranks=args.ranks,
        device=check_device(args.device),
        allow_different_base=args.allow_different_base,
        seed=args.seed,
        group_bytes=int(args.group_mb * 2**20),
        progress=not args.no_progress,
    )
    print(format_report(report, top=args.top))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        print(f"Wrote {write_report_json(report, out / 'report.json')}")
        try:
            for path in plot_report(report, out):
                print(f"Wrote {path}")
        except ImportError as exc:
            print(f"No plots: {exc}", file=sys.stderr)
    return 0


def _report_dir(out: str, adapters: Sequence[str]) -> Path:
    """Refuse a report folder that overlaps an input or the current directory, or holds an adapter."""
    path = check_output_dir(out, adapters, marker=None)
    found = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if (path / name).exists()]
    if found:
        raise OutputError(
            f"Report folder {path} holds an adapter ({', '.join(found)}); choose a folder of its own"
        )
    return path


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"{_PROG}: warning: {message}\n"


def _terminate(signum, frame) -> None:
    """SIGTERM ends the run like Ctrl-C does, so temporary output is removed on the way out."""
    raise KeyboardInterrupt(f"signal {signum}")


def _error(exc: BaseException, verbose: bool) -> str:
    if verbose:
        traceback.print_exc()
    if isinstance(exc, _USER_ERRORS):
        return str(exc)
    if isinstance(exc, OSError):
        where = f" {exc.filename}" if exc.filename else ""
        return f"cannot read or write{where}: {exc.strerror or exc}"
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return f"out of memory ({type(exc).__name__}); try a smaller --group-mb, or another device"
    hint = "" if verbose else " (run with -v for the traceback)"
    first = str(exc).strip().splitlines()
    return f"unexpected {type(exc).__name__}: {first[0] if first else ''}{hint}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``peft-cp-merge`` and ``python -m peft_cp_merge``; returns the exit code.

    Every expected failure is one line ``peft-cp-merge: error: ...`` on stderr: exit status 2 for
    input that cannot be carried out as given (bad arguments, unreadable or unsupported adapters, an
    unsafe output folder; nothing is written), 1 for faults while working (I/O errors, out of memory,
    anything unexpected). ``-v`` adds the traceback. SIGTERM and Ctrl-C remove partial output.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    formatwarning, warnings.formatwarning = warnings.formatwarning, _format_warning
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"{_PROG}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"{_PROG}: error: {_error(exc, args.verbose)}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, _USER_ERRORS) else EXIT_FAULT
    finally:
        warnings.formatwarning = formatwarning
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
