"""The ``peft-cp-merge`` command line: parses arguments and calls the library, nothing more.

Each subcommand has an ``_add_<name>_parser`` function that declares its arguments and a
``run_<name>`` function that calls the matching library function and prints the result:

- ``merge`` -> :func:`.merge_adapter_folders` (``--dry-run``:
  :func:`.plan_merge`),
- ``analyze`` -> :func:`.analyze_adapter_folders` and :mod:`.analysis.report`,
- ``build-library`` -> :func:`~.library.build_library` (``merge --library`` merges its adapters).

Example::

    peft-cp-merge merge math/ code/ --weights 1 1 --rank 16 --out merged/
    peft-cp-merge analyze math/ code/ --rank 8 16 32 --out report/
    peft-cp-merge build-library --data train.jsonl --base-model model/ --k 10 --out library/
    peft-cp-merge merge --library library/ --rank 16 --out merged/
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__
from .analysis.metrics import analyze_adapter_folders
from .analysis.report import format_report, plot_report, write_report_json
from .folders.merging import DEFAULT_GROUP_BYTES, check_values, merge_adapter_folders
from .folders.output import OutputError, check_output_dir
from .folders.plan import plan_merge
from .folders.reading import CONFIG_NAME, WEIGHTS_NAME
from .input_checks import check_device
from .methods import METHODS, get_method

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


def _number(kind: Callable[[str], float], low: float, *, inclusive: bool = True, what: str):
    """An argparse type: a number of ``kind`` at least ``low`` (or above it), with a clear error."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (not inclusive and value == low):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _number(int, 1, what="an integer >= 1")
_non_negative = _number(float, 0.0, what="a finite number >= 0")
_positive = _number(float, 0.0, inclusive=False, what="a number > 0")
_finite = _number(float, -math.inf, what="a finite number")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="where to compute: cpu (default), cuda, or cuda:N")
    parser.add_argument(
        "--allow-different-base",
        action="store_true",
        help="accept adapters whose configs name different base models (a warning instead of an error)",
    )
    parser.add_argument(
        "--group-mb",
        type=_positive,
        default=DEFAULT_GROUP_BYTES / 2**20,
        help="MiB of adapter factors read at a time; bounds peak memory (default %(default)g)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")


def _add_merge_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="merge LoRA adapter folders into a new adapter folder",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Merge PEFT LoRA adapter folders (adapter_config.json + adapter_model.safetensors)\n"
            "into one adapter from the files alone: no base model is loaded. The result is what\n"
            "PEFT's add_weighted_adapter(..., combination_type=METHOD) gives in memory, and\n"
            "PeftModel.from_pretrained(base, OUT_DIR) loads it."
        ),
        epilog=(
            "methods:\n" + "".join(f"  {m.name:<4} {m.help}\n" for m in METHODS.values()) + "\nexamples:\n"
            "  peft-cp-merge merge math/ code/ --weights 1 1 --rank 16 --out merged/\n"
            "  peft-cp-merge merge a/ b/ c/ --weights .5 .3 .2 --method cat --out cat/ --dry-run\n"
            "  peft-cp-merge merge --library library/ --rank 16 --out merged/"
        ),
    )
    parser.add_argument("adapters", nargs="*", metavar="ADAPTER_DIR", help="adapter folders to merge")
    parser.add_argument(
        "--library",
        metavar="LIB_DIR",
        help="merge the cluster adapters of a library from build-library instead (default weights: "
        "cluster sizes / total; default rank: min(2 max r, sum r) for cp, max r for svd/tsv)",
    )
    parser.add_argument(
        "--weights",
        nargs="+",
        type=_finite,
        metavar="W",
        help="one merge weight per adapter (required without --library)",
    )
    parser.add_argument(
        "--rank",
        type=_positive_int,
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
    _add_method_options(parser)
    _add_common(parser)
    parser.set_defaults(run=run_merge)


_OPTION_TYPES = {"int": int, "float": _finite, "str": str}


def _add_method_options(parser: argparse.ArgumentParser) -> None:
    """One argument group per method with options, generated from its options dataclass."""
    seen: set[str] = set()
    for method in METHODS.values():
        fields = [f for f in dataclasses.fields(method.options_type) if f.name not in seen]
        if not fields:
            continue
        group = parser.add_argument_group(
            f"{method.name} options (checked by {method.options_type.__name__})"
        )
        for field in fields:
            seen.add(field.name)
            group.add_argument(
                f"--{field.name.replace('_', '-')}",
                type=_OPTION_TYPES[str(field.type)],
                choices=field.metadata.get("choices"),
                help=f"{field.metadata.get('help', '')} (default {field.default!r})",
            )


def _method_options(args: argparse.Namespace) -> dict[str, object]:
    """The method options given on the command line (the others keep their defaults)."""
    names = {f.name for m in METHODS.values() for f in dataclasses.fields(m.options_type)}
    return {name: getattr(args, name) for name in sorted(names) if getattr(args, name, None) is not None}


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
        type=_positive_int,
        metavar="R",
        help="CP ranks to fit (default: the largest adapter rank r and 2r)",
    )
    parser.add_argument(
        "--out",
        metavar="REPORT_DIR",
        help="write report.json and plots here (not into an adapter folder or an input)",
    )
    parser.add_argument(
        "--top", type=_positive_int, default=15, help="rows in the worst-modules table (default 15)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of CP-ALS (default 0)")
    _add_common(parser)
    parser.set_defaults(run=run_analyze)


def _add_build_library_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "build-library",
        help="cluster instructions and train one LoRA adapter per cluster (C-LoRA)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Embed every instruction with a sentence encoder, cluster them with k-means (fitted on\n"
            "a sample), train one LoRA adapter per cluster and write a library folder with a\n"
            "library.json manifest. Re-running the same command resumes an interrupted build.\n"
            "Needs the library extra: pip install -e '.[library]' from a clone."
        ),
        epilog=(
            "examples:\n"
            "  peft-cp-merge build-library --data train.jsonl --base-model model/ --k 10 --out library/\n"
            "  peft-cp-merge build-library --data train.csv --instruction-field prompt \\\n"
            "      --response-field answer --base-model model/ --k 4 6 8 10 12 --out library/\n"
            "      (several --k values: K chosen by silhouette on the sample)\n"
            "  accelerate launch --multi_gpu --num_processes 2 -m peft_cp_merge build-library ...\n"
            "      (clusters split across the processes; on CPUs set ACCELERATE_USE_CPU=true)"
        ),
    )
    parser.add_argument("--data", required=True, metavar="FILE", help="training data (.jsonl or .csv)")
    parser.add_argument("--instruction-field", default="instruction", help="field with the instruction")
    parser.add_argument("--response-field", default="response", help="field with the response")
    parser.add_argument("--base-model", required=True, metavar="PATH", help="base model folder or name")
    parser.add_argument(
        "--out", required=True, metavar="LIB_DIR", help="library folder (resumed if it exists)"
    )
    parser.add_argument("--encoder", help="SentenceTransformer name or folder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--k", nargs="+", type=int, default=[10], help="K, or candidate Ks (default 10)")
    parser.add_argument("--sample-fraction", type=float, default=0.2, help="k-means sample (default 0.2)")
    parser.add_argument(
        "--min-cluster-size", type=int, default=10, help="merge smaller clusters (default 10)"
    )
    parser.add_argument("--seed", type=int, default=42, help="seed of clustering and training (default 42)")
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora-r", type=int, default=8, help="adapter rank (default 8)")
    lora.add_argument("--lora-alpha", type=int, default=16, help="LoRA alpha (default 16)")
    lora.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
    lora.add_argument("--target-modules", nargs="+", help="modules to adapt (default: PEFT's for the model)")
    train = parser.add_argument_group("training (the same for every cluster)")
    train.add_argument("--epochs", type=int, default=1, help="passes over a cluster (default 1)")
    train.add_argument("--max-steps", type=int, help="optimizer steps per cluster (overrides --epochs)")
    train.add_argument("--batch-size", type=int, default=8, help="examples per forward pass (default 8)")
    train.add_argument(
        "--grad-accum", type=int, default=1, help="forward passes per optimizer step (default 1)"
    )
    train.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default 2e-4)")
    train.add_argument("--max-length", type=int, default=512, help="tokens per example (default 512)")
    train.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no", help="(default no)")
    train.add_argument(
        "--prompt-template", default="{instruction}\n", help="prompt format (default: '{instruction}\\n')"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.set_defaults(run=run_build_library)


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
    _add_build_library_parser(subparsers)
    return parser


def run_merge(args: argparse.Namespace) -> int:
    """``merge``: :func:`~.folders.merging.merge_adapter_folders`, or the plan with ``--dry-run``."""
    if args.library is not None:
        if args.adapters:
            raise ValueError("Give either ADAPTER_DIR arguments or --library, not both")
        from .library import library_merge_inputs

        inputs = library_merge_inputs(
            args.library, weights=args.weights or "size", rank=args.rank, method=args.method
        )
        args.adapters, args.weights, args.rank = list(inputs.adapter_dirs), list(inputs.weights), inputs.rank
    elif not args.adapters or args.weights is None:
        raise ValueError("Give ADAPTER_DIR arguments with --weights, or --library")
    device = check_device(args.device)
    options = get_method(args.method).make_options(_method_options(args))
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
    print(
        f"Wrote {result.out_dir}: method {result.plan.method}, rank {result.plan.rank}, "
        f"{len(result.plan.modules)} modules in {result.seconds:.1f} s; distance to the weighted sum "
        f"(relative) mean {sum(errors) / len(errors):.4g}, max {max(errors):.4g}"
    )
    return 0


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


def run_build_library(args: argparse.Namespace) -> int:
    """``build-library``: :func:`~.library.build_library` on the examples of ``--data``."""
    from peft import LoraConfig

    from .library import ClusteringOptions, TrainingOptions, build_library, load_examples

    examples = load_examples(
        args.data, instruction_field=args.instruction_field, response_field=args.response_field
    )
    library = build_library(
        examples,
        args.out,
        base_model=args.base_model,
        lora_config=LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=args.target_modules,
            task_type="CAUSAL_LM",
        ),
        encoder=args.encoder,
        clustering=ClusteringOptions(
            k=args.k[0] if len(args.k) == 1 else tuple(args.k),
            sample_fraction=args.sample_fraction,
            min_cluster_size=args.min_cluster_size,
        ),
        training=TrainingOptions(
            epochs=args.epochs,
            max_steps=args.max_steps,
            batch_size=args.batch_size,
            gradient_accumulation_steps=args.grad_accum,
            learning_rate=args.lr,
            max_length=args.max_length,
            mixed_precision=args.mixed_precision,
            prompt_template=args.prompt_template,
        ),
        seed=args.seed,
        progress=not args.no_progress,
    )
    manifest = library.manifest
    scores = ", ".join(f"K={k}: {s:.3f}" for k, s in manifest.k_scores if s is not None)
    print(f"Wrote {library.path}: {manifest.k} clusters of sizes {list(manifest.sizes)}")
    if scores:
        print(f"Silhouette by K: {scores}")
    return 0


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
