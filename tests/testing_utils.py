"""Shared test helpers: seeded LoRA stacks, tiny models, adapter folders and planted library data.

Plain functions and classes only; the pytest fixtures built on them live in ``conftest.py``. Test
modules import from here directly (``from testing_utils import random_stack``), as PEFT's tests do.

Everything is built from seeded random weights (and, for the library tests, word-level tokenizers),
so the tests need no model hub and run in seconds on a CPU. The library helpers import
``transformers`` and ``tokenizers`` inside the functions, so importing this module needs only the
core dependencies.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch import Tensor, nn

from peft_cp_merge.engine.compression import LoraStack

# ---------------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------------


def random_stack(
    ranks: Sequence[int],
    d_out: int = 24,
    d_in: int = 20,
    *,
    batch: int = 1,
    scales: Sequence[float] | None = None,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> LoraStack:
    """A LoRA stack with Gaussian factors of the given ranks.

    Args:
        ranks: Rank ``r_i`` of each adapter.
        d_out: Output dimension (rows of ``lora_B``).
        d_in: Input dimension (columns of ``lora_A``).
        batch: Number of modules in the batch.
        scales: One scale per adapter; default ``0.5, 1.5, 2.5, ...``.
        dtype: Factor dtype.
        seed: Seed of the generator that draws every factor.
        device: Where the factors are put (drawn on the CPU, so the values do not depend on it).

    Returns:
        The stack, with ``lora_A[i]`` of shape ``(batch, r_i, d_in)`` and ``lora_B[i]`` of shape
        ``(batch, d_out, r_i)``.
    """
    gen = torch.Generator().manual_seed(seed)
    lora_A = [torch.randn(batch, r, d_in, generator=gen, dtype=dtype).to(device) for r in ranks]
    lora_B = [torch.randn(batch, d_out, r, generator=gen, dtype=dtype).to(device) for r in ranks]
    if scales is None:
        scales = [0.5 + i for i in range(len(ranks))]
    return LoraStack(lora_A, lora_B, scales)


def planted_cp(
    batch: int, dims: Sequence[int], rank: int, *, seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, list[Tensor]]:
    """A dense batch of third-order tensors of CP rank exactly ``rank``, and its factors.

    Args:
        batch: Number of tensors.
        dims: The three mode sizes ``(I, J, K)``.
        rank: CP rank.
        seed: Seed of the factors.
        dtype: Dtype of the factors and the tensor.

    Returns:
        ``(tensor, factors)``: the ``(batch, I, J, K)`` tensor and the three ``(batch, d, rank)``
        Gaussian factors it is the sum of rank-one terms of.
    """
    gen = torch.Generator().manual_seed(seed)
    factors = [torch.randn(batch, d, rank, generator=gen, dtype=dtype) for d in dims]
    return torch.einsum("bir,bjr,bkr->bijk", *factors), factors


def orthonormal(rows: int, cols: int, generator: torch.Generator) -> Tensor:
    """A float64 ``(rows, cols)`` matrix with orthonormal columns (QR of a Gaussian matrix).

    Args:
        rows: Number of rows (``>= cols``).
        cols: Number of columns.
        generator: Draws the Gaussian matrix.

    Returns:
        The ``Q`` factor.
    """
    return torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))[0]


# ---------------------------------------------------------------------------------------------------
# Tiny models
# ---------------------------------------------------------------------------------------------------


class TinyConv2dNet(nn.Module):
    """Embedding -> Linear -> Linear, plus a Conv2d branch: the in-memory PEFT binding tests' base.

    Modules ``emb`` (vocabulary 40), ``lin0``, ``lin1`` and ``conv`` (Conv2d, 2 -> 3 channels). The
    Conv2d branch runs only when an image is passed, so adapters on it can be compared through the
    model's outputs.

    Args:
        vocab: Embedding vocabulary size.
        hidden: Embedding width (and output width).
        inner: Width between the two Linear layers.
    """

    def __init__(self, vocab: int = 40, hidden: int = 16, inner: int = 24) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.lin0 = nn.Linear(hidden, inner)
        self.lin1 = nn.Linear(inner, hidden)
        self.conv = nn.Conv2d(2, 3, kernel_size=3, padding=1)

    def forward(self, ids: Tensor, image: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Token ids ``(batch, seq)`` to ``(batch, seq, hidden)``; with an image, also the conv output."""
        out = self.lin1(torch.relu(self.lin0(self.emb(ids))))
        if image is None:
            return out
        return out, self.conv(image)


class TinyConv1dNet(nn.Module):
    """Embedding -> Conv1d -> Linear -> Linear: the adapter-folder, CLI and analysis tests' base.

    One module of each LoRA layer kind that adapter folders hold (``conv``, ``emb``, ``lin1``,
    ``lin2``). Modules are registered in name order, so the in-memory merge batches them in the same
    order as the folder merge (which sees only sorted file keys): CP-ALS stopped at ``n_iter_max`` can
    differ in the last digits with the order of a batch, and tests that compare the two merges bit for
    bit rely on this order.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.emb = nn.Embedding(20, 8)
        self.lin1 = nn.Linear(8, 12)
        self.lin2 = nn.Linear(12, 4)

    def forward(self, x: Tensor) -> Tensor:
        """Token ids ``(batch, seq)`` to ``(batch, seq, 4)``."""
        h = self.conv(self.emb(x).transpose(1, 2)).transpose(1, 2)
        return self.lin2(torch.relu(self.lin1(h)))


# ---------------------------------------------------------------------------------------------------
# Adapter folders
# ---------------------------------------------------------------------------------------------------

BASE_NAME = "tiny-base"
"""``base_model_name_or_path`` of the adapters written by :func:`write_adapter`."""

TARGETS = ("emb", "conv", "lin1", "lin2")
"""The modules of :class:`TinyConv1dNet` that :func:`save_peft_adapter` targets by default."""


def tiny_base(seed: int = 0) -> TinyConv1dNet:
    """A :class:`TinyConv1dNet` with weights drawn after ``torch.manual_seed(seed)``.

    Args:
        seed: Global torch seed set before the weights are drawn.

    Returns:
        The model (in training mode, as PEFT leaves it).
    """
    torch.manual_seed(seed)
    return TinyConv1dNet()


def cp_delta(stack: LoraStack, weights: Sequence[float], rank: int, **options):
    """One module's ``"cp"`` merge with ``options``: ``(lora_B @ lora_A, MergedLora)``.

    ``whiten`` and ``isotropic`` are off unless given (the sum-like merge, not the package default),
    so that each test turns on exactly the rules it is about.
    """
    from peft_cp_merge.methods.cp import CPOptions, merge_modules

    options = CPOptions.sum_like(**options)
    merged = merge_modules({"m": stack}, {"m": weights}, rank=rank, options=options)["m"]
    return merged.lora_B @ merged.lora_A, merged


def two_adapter_model(net: nn.Module):
    """A ``PeftModel`` of a copy of ``net`` with two random LoRA adapters on ``lin0``, ``lin1``.

    ``"x"``: r = 3, alpha 6; ``"y"``: r = 2, alpha 3 (different ranks and scalings).
    """
    config = {"init_lora_weights": False, "target_modules": ["lin0", "lin1"]}
    model = get_peft_model(copy.deepcopy(net), LoraConfig(r=3, lora_alpha=6, **config), adapter_name="x")
    model.add_adapter("y", LoraConfig(r=2, lora_alpha=3, **config))
    return model


def save_peft_adapter(base: nn.Module, path: Path, *, seed: int, **config) -> Path:
    """Save a random adapter with PEFT itself (``init_lora_weights=False``; nothing is trained).

    Args:
        base: The base model; it is copied, not modified.
        path: The adapter folder to write.
        seed: Global torch seed set before the adapter weights are drawn.
        **config: ``LoraConfig`` arguments; default ``r=4``, ``lora_alpha=8`` and
            ``target_modules=TARGETS``.

    Returns:
        ``path``.
    """
    config = {"r": 4, "lora_alpha": 8, "target_modules": list(TARGETS), **config}
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **config))
    model.save_pretrained(str(path))
    return path


def write_adapter(
    path: Path,
    factors: Mapping[str, tuple[Tensor, Tensor]],
    *,
    r: int,
    lora_alpha: float,
    base: str = BASE_NAME,
    **config,
) -> Path:
    """Write an adapter folder from given Linear factors, without PEFT models.

    Args:
        path: The adapter folder to create (must not exist).
        factors: ``{module: (lora_A (r, d_in), lora_B (d_out, r))}``.
        r: The config's rank.
        lora_alpha: The config's ``lora_alpha``.
        base: The config's ``base_model_name_or_path``.
        **config: Further ``LoraConfig`` arguments.

    Returns:
        ``path``.
    """
    path.mkdir(parents=True)
    LoraConfig(
        r=r, lora_alpha=lora_alpha, target_modules=sorted(factors), base_model_name_or_path=base, **config
    ).save_pretrained(str(path))
    tensors = {}
    for name, (lora_A, lora_B) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = lora_A.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = lora_B.contiguous()
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return path


# ---------------------------------------------------------------------------------------------------
# Libraries (C-LoRA): planted instructions and tiny offline models
# ---------------------------------------------------------------------------------------------------

# Three groups of instructions with disjoint vocabularies: a clustering of their embeddings should
# recover the groups even with a random encoder, because mean pooling averages group-specific words.
GROUP_WORDS = (
    ["add", "sum", "plus", "total", "number", "digits", "compute", "arithmetic", "integer", "count"],
    ["reverse", "letters", "backwards", "spell", "string", "characters", "mirror", "flip", "order", "word"],
    ["capital", "city", "country", "nation", "europe", "map", "border", "region", "river", "mountain"],
)
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>")


def planted_texts(sizes: Sequence[int], *, seed: int = 0) -> tuple[list[str], list[int]]:
    """Instructions of 6-10 words, each drawn from one group's vocabulary.

    Args:
        sizes: ``sizes[g]`` instructions for group ``g`` (at most ``len(GROUP_WORDS)`` groups).
        seed: Seed of the word choices.

    Returns:
        ``(texts, groups)``: the instructions, group by group, and the group id of each.
    """
    rng = random.Random(seed)
    texts, groups = [], []
    for group, (words, size) in enumerate(zip(GROUP_WORDS, sizes, strict=True)):
        for _ in range(size):
            texts.append(" ".join(rng.choice(words) for _ in range(rng.randint(6, 10))))
            groups.append(group)
    return texts, groups


def planted_examples(sizes: Sequence[int], *, seed: int = 0) -> list:
    """Library examples whose responses use the same group vocabulary as their instructions.

    Args:
        sizes: See :func:`planted_texts`.
        seed: Seed of the instructions (``seed + 1`` for the responses).

    Returns:
        A list of ``peft_cp_merge.library.Example``.
    """
    from peft_cp_merge.library import Example

    texts, groups = planted_texts(sizes, seed=seed)
    rng = random.Random(seed + 1)
    return [
        Example(instruction=text, response=" ".join(rng.choice(GROUP_WORDS[group]) for _ in range(3)))
        for text, group in zip(texts, groups, strict=True)
    ]


def word_tokenizer():
    """A ``PreTrainedTokenizerFast`` over the planted vocabulary (whitespace split, word level).

    Returns:
        The tokenizer, with ``SPECIAL_TOKENS`` as pad, unk, cls, sep and eos tokens.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [*SPECIAL_TOKENS, *sorted({w for group in GROUP_WORDS for w in group})]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        eos_token="</s>",
    )


def tiny_llama_config(vocab_size: int, **overrides):
    """A two-layer Llama configuration (hidden 32, 4 heads, 2 key-value heads) for fast tests."""
    from transformers import LlamaConfig

    settings = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    }
    return LlamaConfig(vocab_size=vocab_size, **(settings | overrides))


def save_tiny_llama(folder: Path, *, seed: int = 0) -> Path:
    """Save a 2-layer, hidden-32 Llama with random weights and the word tokenizer.

    Args:
        folder: Where ``save_pretrained`` writes the model and the tokenizer.
        seed: Global torch seed set before the weights are drawn.

    Returns:
        ``folder``.
    """
    from transformers import LlamaForCausalLM

    tokenizer = word_tokenizer()
    config = tiny_llama_config(
        len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_encoder(folder: Path, *, seed: int = 0) -> Path:
    """Save a hidden-128 BERT without encoder layers (embeddings only), random weights, word tokenizer.

    ``SentenceTransformer(folder)`` loads it with mean pooling.

    Args:
        folder: Where ``save_pretrained`` writes the model and the tokenizer.
        seed: Global torch seed set before the weights are drawn.

    Returns:
        ``folder``.
    """
    from transformers import BertConfig, BertModel

    tokenizer = word_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_hidden_layers=0,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
