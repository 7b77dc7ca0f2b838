"""Tiny offline models and planted data for the library tests (imported by tests/test_library_*.py).

Everything is built from configs with seeded random weights and word-level tokenizers, so the
tests need no model hub and run in seconds on a CPU.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

# Three groups of instructions with disjoint vocabularies: a clustering of their embeddings should
# recover the groups even with a random encoder, because mean pooling averages group-specific words.
GROUP_WORDS = (
    ["add", "sum", "plus", "total", "number", "digits", "compute", "arithmetic", "integer", "count"],
    ["reverse", "letters", "backwards", "spell", "string", "characters", "mirror", "flip", "order", "word"],
    ["capital", "city", "country", "nation", "europe", "map", "border", "region", "river", "mountain"],
)
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>")


def planted_texts(sizes: Sequence[int], *, seed: int = 0) -> tuple[list[str], list[int]]:
    """``sizes[g]`` instructions of 6-10 words from group g's vocabulary, and their group ids."""
    rng = random.Random(seed)
    texts, groups = [], []
    for group, (words, size) in enumerate(zip(GROUP_WORDS, sizes, strict=True)):
        for _ in range(size):
            texts.append(" ".join(rng.choice(words) for _ in range(rng.randint(6, 10))))
            groups.append(group)
    return texts, groups


def planted_examples(sizes: Sequence[int], *, seed: int = 0):
    """Examples whose responses use the same group vocabulary as their instructions."""
    from peft_cp_merge.library import Example

    texts, groups = planted_texts(sizes, seed=seed)
    rng = random.Random(seed + 1)
    return [
        Example(instruction=text, response=" ".join(rng.choice(GROUP_WORDS[group]) for _ in range(3)))
        for text, group in zip(texts, groups, strict=True)
    ]


def word_tokenizer():
    """A PreTrainedTokenizerFast over the planted vocabulary (whitespace split, word level)."""
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


def save_tiny_llama(folder: Path, *, seed: int = 0) -> Path:
    """A 2-layer, hidden-32 Llama with random weights and the word tokenizer, saved to ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = word_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_encoder(folder: Path, *, seed: int = 0) -> Path:
    """A 1-layer, hidden-128 BERT with random weights; SentenceTransformer(folder) mean-pools it."""
    import torch
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
