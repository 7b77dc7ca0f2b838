"""The merge methods compared by the benchmark, each returning dense deltas ``{module: (d_out, d_in)}``.

Every method is run once with all merge weights equal to 1; the benchmark then scales the deltas by
a coefficient ``lam`` chosen on the validation split. For uniform weights this is exactly the merge
with weights ``lam`` for every method here (each is positively homogeneous in uniform weights:
sums and SVDs scale, TIES trimming / sign election / the disjoint threshold are scale-free).
``check_homogeneous`` verifies this for the cp merge of the PEFT binding.

Methods (N adapters; docs/design.md §1, §4, §5):
- ``cat``: PEFT "cat", the exact sum ``sum_i dW_i`` (core-space ``baselines.merge_cat``); ``lam = 1/N``
  is the linear average, other ``lam`` task arithmetic.
- ``svd``: PEFT "svd" on the sum, rank R (core-space ``baselines.merge_svd``, same result).
- ``tsv``: TSV-Merge (core-space ``baselines.merge_tsv``), rank R.
- ``knots``: KnOTS-TIES: SVD of ``[dW_1 ... dW_N]``, TIES (top 20 %, elected sign, disjoint mean)
  on the per-task ``S V_i^T``, ``dW = U merged`` (dense, per module).
- ``ties`` / ``ties_svd``: PEFT's own ``add_weighted_adapter`` with density 0.5.
- ``authors_cp``: the authors' variant: tensorly ``parafac`` on the dense ``(N, d_in, d_out)`` stack,
  rank 4, ``init="random"``, ``random_state=42``; ``dW = (factors[1] @ factors[2].T)^T``, then
  norm-matched to ``sum_i dW_i`` (see :func:`merge_authors_cp`).
- ``cp``: ours, ``add_weighted_adapter(..., combination_type="cp", cp_rank=R, cp_aggregation=...)``.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

Deltas = dict[str, torch.Tensor]
Factors = dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]]  # module -> [(A, B, s)] per adapter


def stacks_of(factors: Factors):
    from peft_cp_merge import LoraStack

    return {
        m: LoraStack([a[None] for a, _, _ in fs], [b[None] for _, b, _ in fs], [s for _, _, s in fs])
        for m, fs in factors.items()
    }


def _from_merged(merged) -> Deltas:
    return {m: (x.lora_B @ x.lora_A).reshape(x.lora_B.shape[-2], -1).float() for m, x in merged.items()}


def merge_core_baseline(
    factors: Factors, method: str, *, rank: int | None = None, weights: list[float] | None = None
) -> Deltas:
    """A core-space merge of ``peft_cp_merge.methods`` (cat, svd, tsv, iso_c, iso_cts): exact."""
    from peft_cp_merge.methods.cat import merge_cat
    from peft_cp_merge.methods.iso_c import merge_iso_c
    from peft_cp_merge.methods.iso_cts import merge_iso_cts
    from peft_cp_merge.methods.svd import merge_svd
    from peft_cp_merge.methods.tsv import merge_tsv

    out = {}
    for module, stack in stacks_of(factors).items():
        merge_weights = weights or [1.0] * len(factors[module])
        if method == "cat":
            merged = merge_cat(stack, merge_weights)
        elif method == "svd":
            merged = merge_svd(stack, merge_weights, rank=rank)
        elif method == "tsv":
            merged = merge_tsv(stack, merge_weights, rank=rank)
        elif method == "iso_c":
            merged = merge_iso_c(stack, merge_weights, rank=rank)
        elif method == "iso_cts":
            merged = merge_iso_cts(stack, merge_weights, rank=rank)
        else:
            raise ValueError(f"Unknown core baseline {method!r}; expected cat, svd, tsv, iso_c or iso_cts")
        out[module] = merged
    return _from_merged(out)


def _ties(tasks: torch.Tensor, density: float) -> torch.Tensor:
    """TIES on ``tasks`` ``(N, ...)``: keep each task's top ``density`` by magnitude, elect, disjoint mean."""
    flat = tasks.reshape(tasks.shape[0], -1)
    k = max(1, int(density * flat.shape[1]))
    thresholds = flat.abs().kthvalue(flat.shape[1] - k + 1, dim=1, keepdim=True).values
    trimmed = torch.where(flat.abs() >= thresholds, flat, torch.zeros_like(flat))
    sign = torch.sign(trimmed.sum(dim=0, keepdim=True))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    kept = torch.where(agree, trimmed, torch.zeros_like(trimmed))
    return (kept.sum(dim=0) / agree.sum(dim=0).clamp_min(1)).reshape(tasks.shape[1:])


@torch.no_grad()
def merge_knots(factors: Factors, *, density: float = 0.2) -> Deltas:
    """KnOTS-TIES (Stoica et al., ICLR 2025): SVD of ``[dW_1 ... dW_N]``, TIES on the per-task ``S V_i^T``.

    The SVD is computed exactly from the factors: ``[dW_1 ... dW_N] = Bcat blockdiag(A_i)`` with
    ``Bcat = [s_1 B_1 ... s_N B_N]``; thin QRs ``Bcat = Q R`` and ``A_i^T = Q_i R_i`` leave an
    ``M x M`` core whose SVD ``U_k S V_k^T`` gives ``U = Q U_k`` and ``S V_i^T = S V_k^T[:, blk_i] Q_i^T``.
    """
    out = {}
    for module, fs in factors.items():
        q_b, r_b = torch.linalg.qr(torch.cat([s * b.double() for _, b, s in fs], dim=1))
        qr_a = [torch.linalg.qr(a.double().T) for a, _, _ in fs]  # A_i^T = Q_i R_i
        core = r_b @ torch.block_diag(*[r.T for _, r in qr_a])
        u_k, sv, vh_k = torch.linalg.svd(core)
        keep = sv > sv[0] * 1e-10
        u_k, sv, vh_k = u_k[:, keep], sv[keep], vh_k[keep]
        ranks = [a.shape[0] for a, _, _ in fs]
        blocks = vh_k.split(ranks, dim=1)
        coeffs = torch.stack([sv[:, None] * blk @ q.T for blk, (q, _) in zip(blocks, qr_a, strict=True)])
        out[module] = ((q_b @ u_k) @ _ties(coeffs, density)).float()
    return out


@torch.no_grad()
def merge_authors_cp(factors: Factors, *, rank: int = 4, random_state: int = 42) -> tuple[Deltas, dict]:
    """The authors' CPMergeAfter: tensorly parafac on the dense stack, loadings dropped.

    As coded, the scale of ``factors[1] @ factors[2].T`` is whatever ALS left outside the dropped
    task factor (from a random init it came out ~1e5 times the sum of the deltas here), and each
    component's sign is arbitrary once its loadings are dropped. So the delta is returned
    norm-matched: rescaled per module to the Frobenius norm of ``sum_i dW_i`` (our addition, to give
    the variant a usable scale; the signs are kept as ALS left them). Also returns the median raw
    norm ratio and the share of modules whose merged delta points against the sum (cosine < 0).
    """
    import tensorly as tl
    from tensorly.decomposition import parafac

    tl.set_backend("numpy")
    out, ratios, against = {}, [], 0
    for module, fs in factors.items():
        dense = [s * b @ a for a, b, s in fs]
        stack = torch.stack([d.T for d in dense]).double().numpy()  # (N, d_in, d_out)
        _, cp_factors = parafac(stack, rank=rank, init="random", random_state=random_state)
        raw = torch.from_numpy(cp_factors[1] @ cp_factors[2].T).T.float().contiguous()
        total = torch.stack(dense).sum(0)
        ratio = float(raw.norm() / total.norm())
        ratios.append(ratio)
        against += int(float((raw * total).sum()) < 0)
        out[module] = raw / max(ratio, 1e-30)
    ratios.sort()
    return out, {
        "raw_norm_ratio_median": ratios[len(ratios) // 2],
        "modules_against_sum": against,
        "modules": len(ratios),
    }


def peft_model_with(base: torch.nn.Module, adapter_dirs: dict[str, Path]):
    """A PeftModel on a deep copy of ``base`` with every adapter of ``adapter_dirs`` loaded."""
    from peft import PeftModel

    names = list(adapter_dirs)
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dirs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapter_dirs[name]), adapter_name=name)
    return model


@torch.no_grad()
def peft_merge(
    peft_model, names: list[str], combination_type: str, weights: list[float] | None = None, **kwargs
) -> Deltas:
    """Run ``add_weighted_adapter`` (weights 1 unless given) and return the new adapter's dense deltas."""
    from peft.tuners.lora import LoraLayer

    import peft_cp_merge  # noqa: F401  (registers combination_type="cp")

    merged = "bench_merged"
    if merged in peft_model.peft_config:
        peft_model.delete_adapter(merged)
    peft_model.add_weighted_adapter(
        names, weights or [1.0] * len(names), merged, combination_type=combination_type, **kwargs
    )
    out = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and merged in module.lora_A:
            key = name.removeprefix("base_model.model.")
            out[key] = module.get_delta_weight(merged).detach().float().clone()
    peft_model.delete_adapter(merged)
    return out


def check_homogeneous(peft_model, names: list[str], deltas_w1: Deltas, **cp_kwargs) -> float:
    """Max relative difference between cp with weights 0.5 and 0.5 * (cp with weights 1), one module.

    ``cp_kwargs``: the ``cp_*`` keywords of the merge being checked (``cp_rank``, ``cp_aggregation``, ...).
    """
    from peft.tuners.lora import LoraLayer

    merged = "bench_check"
    peft_model.add_weighted_adapter(names, [0.5] * len(names), merged, combination_type="cp", **cp_kwargs)
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and merged in module.lora_A:
            key = name.removeprefix("base_model.model.")
            half = module.get_delta_weight(merged).detach().float()
            ref = 0.5 * deltas_w1[key]
            peft_model.delete_adapter(merged)
            return float((half - ref).norm() / ref.norm().clamp_min(1e-30))
    raise RuntimeError("no merged module found")


def timed(fn, *args, **kwargs) -> tuple[Deltas, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start
