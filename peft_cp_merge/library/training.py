"""The built-in trainer: fits one LoRA adapter on one cluster's examples with Accelerate.

Any callable ``train_fn(model, examples, output_dir)`` can replace it in `build_library`; this one
is a plain causal-LM fine-tune with the loss on the response tokens only. Each call trains on a
single process: under ``accelerate launch`` the builder hands different clusters to different
processes, so nothing here is wrapped in DistributedDataParallel.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from .data import Example

__all__ = ["INITS", "MIXED_PRECISION", "LoraTrainer", "TrainingOptions", "TrainingStats", "encode_example"]

logger = logging.getLogger(__name__)

MIXED_PRECISION = ("no", "fp16", "bf16")
INITS = ("default", "osrm")  # how each cluster's adapter starts (docs/design.md §11)
IGNORE_INDEX = -100  # label value the causal-LM loss skips


@dataclass(frozen=True)
class TrainingOptions:
    """Hyper-parameters of the built-in trainer, the same for every cluster.

    Args:
        epochs: Passes over a cluster's examples (ignored when ``max_steps`` is set).
        max_steps: Optimizer steps per cluster, overriding ``epochs``.
        batch_size: Examples per forward pass.
        gradient_accumulation_steps: Forward passes per optimizer step.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        max_length: Tokens per example (prompt + response + EOS); longer ones are cut at the end.
        prompt_template: Formats the instruction; ``{instruction}`` is replaced. The response
            follows it directly, then the tokenizer's EOS token.
        mixed_precision: One of ``MIXED_PRECISION``, passed to ``accelerate.Accelerator``.
        log_every: Log the mean loss every this many optimizer steps.
        init: One of ``INITS``: ``"default"`` (PEFT's initialisation) or ``"osrm"`` (each cluster's
            ``lora_A`` starts where the other clusters' inputs have the least energy,
            :func:`peft_cp_merge.osrm_init`; applies to a ``train_fn`` too).
        osrm_examples: With ``init="osrm"``, examples sampled per cluster (seeded) for the statistics.
        osrm_freeze_a: With ``init="osrm"``, keep ``lora_A`` frozen during training.

    Raises:
        ValueError: For a value out of range.
    """

    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    max_length: int = 512
    prompt_template: str = "{instruction}\n"
    mixed_precision: str = "no"
    log_every: int = 10
    init: str = "default"
    osrm_examples: int = 64
    osrm_freeze_a: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "gradient_accumulation_steps", "max_length", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}.")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"max_steps must be None or an integer >= 1, got {self.max_steps!r}.")
        if not self.learning_rate > 0 or self.weight_decay < 0:
            raise ValueError(
                "Need learning_rate > 0 and weight_decay >= 0, "
                f"got {self.learning_rate!r}, {self.weight_decay!r}."
            )
        if "{instruction}" not in self.prompt_template:
            raise ValueError(f"prompt_template must contain '{{instruction}}', got {self.prompt_template!r}.")
        if self.init not in INITS:
            raise ValueError(f"Unknown init {self.init!r}; expected one of {INITS}.")
        if not isinstance(self.osrm_examples, int) or self.osrm_examples < 1:
            raise ValueError(f"osrm_examples must be an integer >= 1, got {self.osrm_examples!r}.")
        if not isinstance(self.osrm_freeze_a, bool):
            raise ValueError(f"osrm_freeze_a must be True or False, got {self.osrm_freeze_a!r}.")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"Unknown mixed_precision {self.mixed_precision!r}; expected one of {MIXED_PRECISION}."
            )

    def num_steps(self, num_examples: int) -> int:
        """Optimizer steps for a cluster of ``num_examples`` examples."""
        if self.max_steps is not None:
            return self.max_steps
        batches = self.epochs * math.ceil(num_examples / self.batch_size)
        return math.ceil(batches / self.gradient_accumulation_steps)


@dataclass(frozen=True)
class TrainingStats:
    """What the built-in trainer reports for one cluster (stored in the library manifest).

    Attributes:
        examples: Examples trained on.
        steps: Optimizer steps taken.
        response_tokens: Tokens the loss was computed on, summed over all forward passes.
        first_loss: Mean loss of the first optimizer step.
        final_loss: Mean loss over the last ``log_every`` optimizer steps.
        seconds: Wall-clock training time.
    """

    examples: int
    steps: int
    response_tokens: int
    first_loss: float
    final_loss: float
    seconds: float


class LoraTrainer:
    """Trains the active adapter of a PeftModel on instruction/response pairs.

    Args:
        tokenizer: The base model's tokenizer.
        options: Hyper-parameters; see `TrainingOptions`.
        progress: Show a progress bar per cluster.

    Example:
        >>> trainer = LoraTrainer(tokenizer, options=TrainingOptions(max_steps=50))  # doctest: +SKIP
        >>> stats = trainer(peft_model, examples, Path("scratch"))  # doctest: +SKIP
        >>> stats["final_loss"] < stats["first_loss"]  # doctest: +SKIP
        True
    """

    def __init__(
        self, tokenizer: Any, *, options: TrainingOptions | None = None, progress: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.options = options or TrainingOptions()
        self.progress = progress

    def __call__(
        self, model: torch.nn.Module, examples: Sequence[Example], output_dir: Path
    ) -> dict[str, Any]:
        """Trains ``model`` in place on ``examples``; ``output_dir`` is not used by this trainer.

        The caller seeds the random number generators: the batch order and dropout draw from
        torch's global generator.

        Returns:
            `TrainingStats` as a dict.

        Raises:
            ValueError: If an example keeps no response token within ``max_length``.
        """
        options = self.options
        features = [self._encode(example) for example in examples]
        truncated = next((i for i, (_, labels) in enumerate(features) if max(labels) == IGNORE_INDEX), None)
        if truncated is not None:
            raise ValueError(
                f"Example {examples[truncated].instruction[:60]!r}... has no response token within "
                f"max_length={options.max_length}; raise max_length."
            )
        steps = options.num_steps(len(examples))
        # Accelerate keeps its settings in process-wide state: build the Accelerator per call so that
        # another trainer's settings in the same process are never picked up.
        accelerator = Accelerator(
            mixed_precision=options.mixed_precision,
            gradient_accumulation_steps=options.gradient_accumulation_steps,
        )
        model.to(accelerator.device)
        model.train()
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = accelerator.prepare_optimizer(
            torch.optim.AdamW(parameters, lr=options.learning_rate, weight_decay=options.weight_decay)
        )
        batches = self._batches(features, accelerator.device)
        losses, response_tokens, start = [], 0, time.perf_counter()
        bar = tqdm(total=steps, desc="training adapter", disable=not self.progress, leave=False)
        for step in range(1, steps + 1):
            step_loss = 0.0
            for _ in range(options.gradient_accumulation_steps):
                batch = next(batches)
                with accelerator.autocast():
                    loss = model(**batch).loss
                accelerator.backward(loss)  # divides by gradient_accumulation_steps
                step_loss += loss.item() / options.gradient_accumulation_steps
                response_tokens += int((batch["labels"] != IGNORE_INDEX).sum())
            optimizer.step()
            optimizer.zero_grad()
            losses.append(step_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            if step % options.log_every == 0 or step == steps:
                window = losses[-options.log_every :]
                logger.info("step %d/%d: loss %.4f", step, steps, sum(window) / len(window))
        bar.close()
        model.eval()
        accelerator.free_memory()
        window = losses[-options.log_every :]
        stats = TrainingStats(
            examples=len(examples),
            steps=steps,
            response_tokens=response_tokens,
            first_loss=losses[0],
            final_loss=sum(window) / len(window),
            seconds=round(time.perf_counter() - start, 3),
        )
        return asdict(stats)

    def _encode(self, example: Example) -> tuple[list[int], list[int]]:
        """Token ids and labels (prompt masked with IGNORE_INDEX), cut at ``max_length``."""
        return encode_example(
            example,
            self.tokenizer,
            prompt_template=self.options.prompt_template,
            max_length=self.options.max_length,
        )

    def _batches(self, features: list[tuple[list[int], list[int]]], device: torch.device) -> Iterator[dict]:
        """Endless right-padded batches, reshuffled every epoch from torch's global generator."""
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        size = self.options.batch_size
        while True:
            order = torch.randperm(len(features)).tolist()
            for begin in range(0, len(order), size):
                chunk = [features[i] for i in order[begin : begin + size]]
                width = max(len(ids) for ids, _ in chunk)
                input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
                attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, (ids, targets) in enumerate(chunk):
                    input_ids[row, : len(ids)] = torch.tensor(ids)
                    labels[row, : len(targets)] = torch.tensor(targets)
                    attention_mask[row, : len(ids)] = 1
                yield {
                    "input_ids": input_ids.to(device),
                    "attention_mask": attention_mask.to(device),
                    "labels": labels.to(device),
                }


def encode_example(
    example: Example, tokenizer: Any, *, prompt_template: str, max_length: int
) -> tuple[list[int], list[int]]:
    """Token ids and labels of one example, as the adapters are trained on it.

    The prompt is ``prompt_template.format(instruction=...)`` with the tokenizer's special tokens;
    the response follows, closed by the EOS token; labels mask the prompt with ``IGNORE_INDEX``
    (-100), so the loss is on the response only. Both are cut at ``max_length``.

    Example:
        >>> ids, labels = encode_example(  # doctest: +SKIP
        ...     Example("Add 3 and 4.", "7"), tokenizer, prompt_template="{instruction}\\n", max_length=64
        ... )
    """
    prompt = prompt_template.format(instruction=example.instruction)
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = [*response_ids, tokenizer.eos_token_id]
    return (prompt_ids + response_ids)[:max_length], ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[
        :max_length
    ]
