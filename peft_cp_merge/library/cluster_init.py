"""OSRM initialisation of each cluster's adapter against the other clusters' examples.

Every cluster contributes a seeded sample of at most ``osrm_examples`` examples, encoded as the
trainer encodes them (prompt + response). Uncentred sums with token counts add and subtract exactly,
so the statistics are shared between clusters, in the cheapest way ``MAX_MEMORY_GB`` allows
(``docs/design.md`` §11):

- ``"each"``: every cluster's sample moments once (each example runs once), cluster ``k`` takes the
  sum of the others': ``K + 2`` sets of statistics held at most;
- ``"total"``: the moments of all samples once, then cluster ``k`` runs its own sample and takes
  ``total.minus(own)`` (each example runs twice): three sets;
- ``"direct"``: ``osrm_init`` on the other samples, in passes under the budget (a 7B model): each
  example runs ``K - 1`` times.

All three give the same rows up to float rounding; ``K (K - 1)`` sample passes is what initialising
each cluster from scratch costs.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..osrm import input_moments, osrm_init, statistics_gb
from .data import Example
from .training import TrainingOptions, encode_example

__all__ = ["ClusterOSRM"]

logger = logging.getLogger(__name__)

MAX_MEMORY_GB = 8.0  # statistics held at once
MODES = ("each", "total", "direct")


class ClusterOSRM:
    """``init(peft_model, index) -> stats``: OSRM-initialises cluster ``index``'s new adapter.

    Args:
        examples: Every training example.
        labels: (num_examples,) cluster of every example.
        tokenizer: The base model's tokenizer.
        options: ``osrm_examples``, ``osrm_freeze_a``, ``prompt_template``, ``max_length``, ``batch_size``.
        seed: Cluster ``k``'s sample is drawn with ``seed + k``.
        progress: Progress bars.

    Raises:
        ValueError: With fewer than two clusters (there are no other clusters).

    Example:
        >>> init = ClusterOSRM(examples, labels, tokenizer, options=options, seed=42)  # doctest: +SKIP
        >>> init(peft_model, 0)["energy_ratio_mean"] < 0.1  # doctest: +SKIP
        True
    """

    def __init__(
        self,
        examples: Sequence[Example],
        labels: np.ndarray,
        tokenizer: Any,
        *,
        options: TrainingOptions,
        seed: int,
        progress: bool = True,
    ) -> None:
        k = int(labels.max()) + 1
        if k < 2:
            raise ValueError("init='osrm' needs at least two clusters: the other clusters' examples.")
        self.options, self.progress = options, progress
        self.mode: str | None = None
        self.total, self.own = None, None
        self.samples = []
        for index in range(k):
            members = np.flatnonzero(labels == index).tolist()
            size = min(len(members), options.osrm_examples)
            chosen = sorted(random.Random(seed + index).sample(members, size))
            self.samples.append([self._encode(examples[i], tokenizer) for i in chosen])

    def _mode(self, gb: float) -> str:
        """The cheapest way of sharing statistics whose sets fit ``MAX_MEMORY_GB`` (``gb`` per set)."""
        if (len(self.samples) + 2) * gb <= MAX_MEMORY_GB:
            return "each"
        return "total" if 3 * gb <= MAX_MEMORY_GB else "direct"

    def _encode(self, example: Example, tokenizer: Any) -> dict[str, list[int]]:
        template, length = self.options.prompt_template, self.options.max_length
        ids, _ = encode_example(example, tokenizer, prompt_template=template, max_length=length)
        return {"input_ids": ids}

    def _moments(self, peft_model, adapter: str, rows):
        return input_moments(
            peft_model,
            adapter,
            rows,
            max_examples=len(rows),
            batch_size=self.options.batch_size,
            max_memory_gb=None,
            progress=self.progress,
        )

    @torch.no_grad()
    def __call__(self, peft_model, index: int) -> dict[str, Any]:
        """Initialises ``peft_model``'s active adapter for cluster ``index``; returns JSON-ready stats."""
        adapter = peft_model.active_adapter
        if self.mode is None:
            self.mode = self._mode(statistics_gb(peft_model, adapter))
            logger.info("OSRM statistics shared between clusters: %r", self.mode)
        if self.mode == "each":
            if self.own is None:
                self.own = [self._moments(peft_model, adapter, sample) for sample in self.samples]
            parts = [moments for k, moments in enumerate(self.own) if k != index]
            others = parts[0]
            for part in parts[1:]:
                others = others.plus(part)
            report = osrm_init(peft_model, adapter, others, freeze_a=self.options.osrm_freeze_a)
        elif self.mode == "direct":
            others = [row for k, sample in enumerate(self.samples) if k != index for row in sample]
            report = osrm_init(
                peft_model,
                adapter,
                others,
                max_examples=len(others),
                batch_size=self.options.batch_size,
                freeze_a=self.options.osrm_freeze_a,
                max_memory_gb=MAX_MEMORY_GB,
                progress=self.progress,
            )
        else:  # "total"
            if self.total is None:
                every = [row for sample in self.samples for row in sample]
                self.total = self._moments(peft_model, adapter, every)
            others = self.total.minus(self._moments(peft_model, adapter, self.samples[index]))
            report = osrm_init(peft_model, adapter, others, freeze_a=self.options.osrm_freeze_a)
        logger.info("Cluster %d: OSRM init on %d other examples", index, report.examples)
        return {
            "init": "osrm",
            "other_examples": report.examples,
            "energy_ratio_mean": report.energy_ratio_mean,
            "energy_ratio_max": report.energy_ratio_max,
            "replaced_energy_ratio_mean": report.replaced_energy_ratio_mean,
            "frozen_a": report.frozen_a,
        }
