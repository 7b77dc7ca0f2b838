"""``peft-cp-merge build-library``: cluster instructions and train one LoRA adapter per cluster."""

from __future__ import annotations

import argparse

__all__ = ["add_build_library_parser", "run_build_library"]


def add_build_library_parser(subparsers) -> None:
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
            "      (clusters split across the processes; on CPUs set ACCELERATE_USE_CPU=true)\n"
            "  peft-cp-merge build-library --data train.jsonl --base-model model/ --k 10 --init osrm \\\n"
            "      --out library/   (each adapter starts orthogonal to the other clusters' inputs)"
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
    train.add_argument(
        "--init",
        choices=("default", "osrm"),
        default="default",
        help="adapter start: PEFT's (default) or OSRM, lora_A where the other clusters' inputs are weakest",
    )
    train.add_argument(
        "--osrm-examples", type=int, default=64, help="with --init osrm: sample per cluster (default 64)"
    )
    train.add_argument("--osrm-freeze-a", action="store_true", help="with --init osrm: train lora_B only")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.set_defaults(run=run_build_library)


def run_build_library(args: argparse.Namespace) -> int:
    """``build-library``: :func:`~.library.build_library` on the examples of ``--data``."""
    from peft import LoraConfig

    from ..library import ClusteringOptions, TrainingOptions, build_library, load_examples

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
            init=args.init,
            osrm_examples=args.osrm_examples,
            osrm_freeze_a=args.osrm_freeze_a,
        ),
        seed=args.seed,
        progress=not args.no_progress,
    )
    _end_process_group()
    manifest = library.manifest
    scores = ", ".join(f"K={k}: {s:.3f}" for k, s in manifest.k_scores if s is not None)
    print(f"Wrote {library.path}: {manifest.k} clusters of sizes {list(manifest.sizes)}")
    if scores:
        print(f"Silhouette by K: {scores}")
    return 0


def _end_process_group() -> None:
    """The command owns its launch: end the process group (under ``accelerate launch``) before exit.

    Left to interpreter exit, gloo's threads can abort a rank after all the work is done.
    """
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
