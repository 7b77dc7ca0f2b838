"""Clustered adapter libraries (C-LoRA): one LoRA per cluster of instructions, merged with "cp".

Needs the ``library`` extra (sentence-transformers, scikit-learn, transformers, accelerate)::

    pip install -e ".[library]"   # from a clone of the repository

Example:
    >>> from peft import LoraConfig
    >>> from peft_cp_merge.library import ClusteringOptions, build_library, load_examples, merge_library
    >>> library = build_library(  # doctest: +SKIP
    ...     load_examples("train.jsonl"), "my_library", base_model="path/to/model",
    ...     lora_config=LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    ...     clustering=ClusteringOptions(k=10),
    ... )
    >>> merge_library("my_library", "merged_adapter")  # doctest: +SKIP
"""

from .builder import TrainFn, build_library
from .clustering import Clustering, ClusteringOptions, cluster_embeddings
from .data import Example, load_examples
from .embedding import embed_texts, load_encoder
from .manifest import ClusterEntry, Library, LibraryManifest, load_library
from .merging import LibraryMergeInputs, library_merge_inputs, library_weights, merge_library
from .training import LoraTrainer, TrainingOptions, TrainingStats

__all__ = [
    "ClusterEntry",
    "Clustering",
    "ClusteringOptions",
    "Example",
    "Library",
    "LibraryManifest",
    "LibraryMergeInputs",
    "LoraTrainer",
    "TrainFn",
    "TrainingOptions",
    "TrainingStats",
    "build_library",
    "cluster_embeddings",
    "embed_texts",
    "library_merge_inputs",
    "library_weights",
    "load_encoder",
    "load_examples",
    "load_library",
    "merge_library",
]
