"""Parameter and FLOP counts: named formulas, each with its source.

Units are in the names. FLOPs follow the Megatron *model FLOPs* convention: a multiply-add is
2 FLOPs, a training step is 3x the forward (backward = 2x forward), recomputation is not
counted, and attention scores are counted in full even for causal masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from step_infra.emulator.specs import ModelSpec


def layer_matmul_params(m: ModelSpec) -> int:
    """Weights of one block that multiply every token (biases and norms excluded).

    LM: fused QKV (``h x (a + 2 kv)``) + output (``a x h``) + MLP (``2 h f``, or ``3 h f``
    for a gated/SwiGLU MLP). DiT (Step-Video, REFERENCE.md): self-attention ``4 h^2``,
    cross-attention query + output ``2 h^2`` (its K/V act on the text tokens, see
    :func:`layer_text_params`), GELU MLP ``2 h f``.
    """
    h, a = m.hidden, m.attn_dim
    assert m.kv_heads is not None and m.head_dim is not None and m.ffn is not None
    kv = m.kv_heads * m.head_dim
    mlp = (3 if m.gated_mlp else 2) * h * m.ffn
    self_attn = h * (a + 2 * kv) + a * h
    if m.kind == "dit":
        return self_attn + 2 * h * a + mlp
    return self_attn + mlp


def layer_text_params(m: ModelSpec) -> int:
    """Cross-attention K/V projection of a DiT block (acts on text tokens only)."""
    return 2 * m.hidden * m.attn_dim if m.kind == "dit" else 0


def layer_small_params(m: ModelSpec) -> int:
    """Norms, biases and modulation tables of one block.

    GPT (Megatron, biases on): ``13 h`` (Narayanan et al. 2021, eq. for P). Llama-style: two
    RMSNorm gains ``2 h``. DiT: the adaLN-single table ``6 h``, per-head q/k RMSNorm gains
    for self- and cross-attention ``4 head_dim``, the affine LayerNorm before cross-attention
    ``2 h`` and the MLP biases ``ffn + h``.
    """
    assert m.head_dim is not None and m.ffn is not None
    if m.kind == "dit":
        return 6 * m.hidden + 4 * m.head_dim + 2 * m.hidden + m.ffn + m.hidden
    return 13 * m.hidden if m.learned_positions else 2 * m.hidden


def layer_replicated_params(m: ModelSpec) -> int:
    """The part of :func:`layer_small_params` every tensor-parallel rank holds whole.

    Megatron splits a column-parallel linear's bias with its weight and keeps a row-parallel
    one (added after the reduction) whole, as it keeps norms whole. GPT: 2 LayerNorms ``4 h``
    + the output and fc2 biases ``2 h`` (its QKV ``3 h`` and fc1 ``4 h`` biases split);
    Llama-style: the two gains ``2 h``. DiT (``step_infra.models.dit``): the adaLN table ``6 h``,
    q/k RMSNorm gains ``4 head_dim``, norm2's affine ``2 h`` and fc2's bias ``h`` (fc1's bias
    ``ffn`` splits).
    """
    assert m.head_dim is not None
    if m.kind == "dit":
        return 6 * m.hidden + 4 * m.head_dim + 2 * m.hidden + m.hidden
    return 6 * m.hidden if m.learned_positions else 2 * m.hidden


def layer_tp_split_params(m: ModelSpec) -> int:
    """Parameters of one block that tensor parallelism splits (divide by ``tp``)."""
    return (
        layer_matmul_params(m)
        + layer_text_params(m)
        + layer_small_params(m)
        - layer_replicated_params(m)
    )


def embedding_tp_split(m: ModelSpec) -> bool:
    """Whether tensor parallelism splits :func:`embedding_params`. An LM's vocabulary-parallel
    embedding and output layer split (Megatron); a DiT's patch embedding, timestep MLP,
    shared adaLN, caption projections and final layer are plain linears every TP rank holds
    whole (``step_infra.models.dit.DiTEmbedding`` / ``DiTHead``)."""
    return m.kind == "lm"


def dit_param_tensors(m: ModelSpec, tp: int, layers: int) -> list[int]:
    """Element counts of every parameter tensor a TP rank of a DiT stage holds: ``layers``
    blocks plus everything outside the blocks (the busiest-stage convention of
    ``costmodel``). ZeRO-1 as the trainer runs it (``torch``'s ``ZeroRedundancyOptimizer``)
    gives whole tensors to ranks, so :func:`zero_max_shard` needs them one by one."""
    h, a, f, d = m.hidden, m.attn_dim, m.ffn, m.head_dim
    assert f is not None and d is not None and m.text_dim_long is not None
    block = [h * 3 * a // tp, a * h // tp, d, d]  # self-attention: qkv, proj, q/k norm gains
    block += [h, h, h * a // tp, h * 2 * a // tp, a * h // tp, d, d]  # norm2, cross-attention
    block += [h * f // tp, f // tp, f * h // tp, h, 6 * h]  # MLP (fc1 w, b; fc2 w, b), table
    c, tl, t = m.latent_channels * m.patch**2, m.text_dim_long, m.timestep_channels
    outside = [c * h, h, t * h, h, h * h, h, 6 * h * h, 6 * h, m.text_dim * h, h]
    outside += [tl, tl, tl * h, h, h * h, h, 2 * h, h * c, c]
    return block * layers + outside


def zero_max_shard(tensors: list[int], ranks: int) -> int:
    """Elements the busiest rank owns when ``tensors`` are dealt to ``ranks`` as
    ``ZeroRedundancyOptimizer._partition_parameters`` deals them: largest first, each to the
    rank with the fewest so far (greedy, whole tensors). At least ``max(tensors)`` and at
    least the even share ``sum / ranks``."""
    loads = [0] * max(1, ranks)
    for size in sorted(tensors, reverse=True):
        i = loads.index(min(loads))
        loads[i] += size
    return max(loads)


def embedding_params(m: ModelSpec) -> int:
    """Parameters outside the blocks.

    LM: token embedding ``V h`` (+ untied output head ``V h``) (+ learned positions ``s h``)
    + final norm. DiT (REFERENCE.md): patchify ``C h``, timestep MLP
    ``timestep_channels x h + h^2``, shared adaLN ``h x 6h``, caption projections (CLIP
    ``text_dim x h``; the LLM's ``d = text_dim_long``-wide output through an affine LayerNorm
    and a 2-layer projection ``d h + h^2``), the final ``2 h`` adaLN table and output
    ``h x C``, plus biases.
    """
    h = m.hidden
    if m.kind == "dit":
        c = m.latent_channels * m.patch**2
        d = m.text_dim_long
        assert d is not None
        return (
            (c * h + h)
            + (m.timestep_channels * h + h + h * h + h)
            + (6 * h * h + 6 * h)
            + (m.text_dim * h + h)
            + (2 * d + d * h + h + h * h + h)
            + (2 * h + h * c + c)
        )
    emb = m.vocab * h * (1 if m.tied_embeddings else 2)
    if m.learned_positions:
        emb += m.seq_len * h
    return emb + 2 * h


def parameter_count(m: ModelSpec) -> int:
    """All parameters (Megatron GPT: ``12 l h^2 (1 + 13/(12 h) + (V + s)/(12 l h))``,
    Narayanan et al. 2021 sec. 5.1, which this reproduces for the GPT presets)."""
    per_layer = layer_matmul_params(m) + layer_text_params(m) + layer_small_params(m)
    return m.layers * per_layer + embedding_params(m)


def elementwise_elements_per_token(m: ModelSpec) -> tuple[float, float]:
    """Elements that one block's forward element-wise ops read and write per token, as
    ``(replicated, tp_split)``: the first acts on ``h``-wide tensors (every TP rank does all of
    it unless sequence parallel splits the tokens), the second on the ``a``-wide heads and the
    ``f``-wide MLP (split by TP). Multiply by ``ModelSpec.dtype_bytes`` for bytes; the
    backward reads the output gradient and the saved input of each op and writes the input
    gradient, about twice the forward's traffic.

    Counted op by op as eager PyTorch / Megatron-core runs them (one kernel per op, each reads
    its inputs once and writes its output once; a norm ``2 h``, an add ``3 h``, a multiply by a
    per-sample vector ``2 h``; flash attention keeps its softmax on chip, so no ``s^2`` term):

    - LM (pre-LN GPT / Llama): 2 norms ``4 h`` + 2 residual adds (Megatron's fused
      bias-dropout-add) ``6 h``; activation GELU ``2 f`` (read, write) or fused SwiGLU ``3 f``.
    - DiT (Step-Video block, ``step_infra.models.dit``): 3 LayerNorms ``6 h``; 2 adaLN
      modulations ``norm(x) * (1 + scale) + shift`` ``2 x 4 h``; 2 gated residuals
      ``x + gate * y`` ``2 x 5 h``; the cross-attention residual ``3 h``; the MLP's output bias
      ``2 h`` (29 h); q/k RMSNorm on self-attention q, k and cross-attention q ``3 x 2 a``; the
      attention outputs' head-to-hidden layout copy ``2 x 2 a``; GELU ``2 f``.

    For Step-Video (a = h, f = 4 h) that is 47 h elements, 94 bytes per token and hidden unit
    in bf16; a GPT block 18 h (36 bytes).
    """
    h, a = float(m.hidden), float(m.attn_dim)
    assert m.ffn is not None
    act = (3.0 if m.gated_mlp else 2.0) * m.ffn
    if m.kind == "lm":
        return 2 * 2 * h + 2 * 3 * h, act
    norms, modulate, gated_residual = 3 * 2 * h, 2 * (2 * h + 2 * h), 2 * (2 * h + 3 * h)
    residual, mlp_bias = 3 * h, 2 * h
    qk_norm, head_layout = 3 * 2 * a, 2 * 2 * a
    return norms + modulate + gated_residual + residual + mlp_bias, qk_norm + head_layout + act


# ---------------------------------------------------------------------- activations (DiT)
Per = Literal["token", "text_token", "sample"]
Split = Literal["tp", "sp", "none"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ActivationTerm:
    """Bytes one DiT block keeps for the backward per token, per text token or per sample.

    ``split``: ``"tp"`` inside the tensor-parallel region (heads, FFN columns: divided by
    ``tp``), ``"sp"`` outside it (the residual stream: divided by ``tp`` only with sequence
    parallelism), ``"none"`` whole on every rank. ``kind`` is the name the saved-tensor
    counter (``step_infra.models.saved_tensors.KINDS``) gives the same tensors; the test
    ``tests/emulator/test_saved_tensors_vs_emulator.py`` compares the two kind by kind.
    """

    kind: str
    per: Per
    split: Split
    bytes: float
    saved_by: str
    batched_only: bool = False  # exists only with micro_batch > 1 (a layout copy)


def dit_activation_terms(m: ModelSpec) -> tuple[ActivationTerm, ...]:
    """What one Step-Video block (``step_infra.models.dit.DiTLayer``) keeps for the backward,
    tensor by tensor, in bytes (``b`` the activation dtype's bytes; ``h`` hidden, ``a`` heads x
    head dim, ``f`` FFN width, ``n`` heads, ``T`` text tokens).

    Counted on the model with ``saved_tensors_hooks`` (:mod:`step_infra.models.saved_tensors`)
    with the attention kernel's saved set (q, k, v, out, fp32 LSE, as the Triton kernel and
    FlashAttention keep) and torch's own ops for the rest, as they dispatch on the CPU and the
    meta device in torch 2.13: LayerNorm keeps its input and fp32 mean/rstd (the CPU keeps
    them in the input dtype); ``F.rms_norm`` runs in fp32 and keeps its fp32 input (a copy for
    bf16 activations) and normalized value; ``x * (1 + scale)`` keeps ``x`` and the vector;
    RoPE's multiplies keep only the shared cos/sin tables (counted once per model).

    Per token: residual stream ``10 h b`` (3 norm inputs, 2 modulation inputs, 3 linear
    inputs, 2 gate inputs); TP region ``(3 + 3 + 2) a b`` (qkv, attention q/k, attention
    outputs) ``+ 2 f b`` (GELU input and output) ``+ (6 a or 4 a) x 4`` (RMSNorm) and per-head
    fp32 statistics. For Step-Video in bf16 that is 20 + 16 + 16 + 24 = 76 bytes per token per
    hidden unit (38 hidden-wide bf16 tensors); a Megatron/TE block with fused QK-norm would
    drop the 24 of the fp32 RMSNorm copies.
    """
    h, a, n = float(m.hidden), float(m.attn_dim), float(m.heads)
    assert m.ffn is not None
    f, b, fp32 = float(m.ffn), float(m.dtype_bytes), 4.0
    norm_kept = (3 * a if b < fp32 else a) * fp32  # fp32 inputs: a copy, or cross q itself
    k_copy = a * fp32 if b < fp32 else 0.0
    terms = [
        ("norm_input", "token", "sp", 3 * h * b, "norm1-3 (LayerNorm) inputs"),
        ("norm_stats", "token", "sp", 3 * 2 * fp32, "norm1-3 mean, rstd (fp32)"),
        ("modulation_input", "token", "sp", 2 * h * b, "adaLN multiply: norm1/norm3 outputs"),
        ("linear_input", "token", "sp", 3 * h * b, "linear_qkv, cross linear_q, linear_fc1"),
        ("gate_input", "token", "sp", 2 * h * b, "gated residual: attention/MLP outputs"),
        ("qkv", "token", "tp", 3 * a * b, "q/k RMSNorm (views) and attention's v"),
        ("qk_norm", "token", "tp", 3 * a * fp32 + norm_kept, "per-head RMSNorm, fp32"),
        ("qk_norm_stats", "token", "tp", 3 * n * fp32, "per-head RMSNorm rstd"),
        ("attention_qk", "token", "tp", 3 * a * b, "attention kernel: RoPE'd q, k; cross q"),
        ("attention_out", "token", "tp", 2 * a * b, "attention kernel and linear_proj"),
        ("attention_lse", "token", "tp", 2 * n * fp32, "attention kernel"),
        ("mlp_fc1_output", "token", "tp", f * b, "GELU"),
        ("mlp_gelu_output", "token", "tp", f * b, "linear_fc2"),
        ("text_kv", "text_token", "tp", 3 * a * b + a * fp32 + k_copy + n * fp32,
         "cross k RMSNorm and attention kernel: kv, normalized k"),
        ("modulation_vectors", "sample", "none", 8 * h * b, "(1 + scale) x 2, gates' table"),
        ("kv_lengths", "sample", "none", 4.0, "attention kernel (int32 text lengths)"),
    ]  # fmt: skip
    out = [ActivationTerm(kind=k, per=p, split=s, bytes=v, saved_by=w) for k, p, s, v, w in terms]  # type: ignore[arg-type]
    out.append(ActivationTerm(  # F.linear flattens a strided (S, B, a) input by copying it
        kind="attention_out_copy", per="token", split="tp", bytes=2 * a * b,
        saved_by="linear_proj (F.linear's copy of the transposed output)", batched_only=True,
    ))  # fmt: skip
    out.append(ActivationTerm(
        kind="text_kv", per="text_token", split="none", bytes=h * b,
        saved_by="linear_kv (F.linear's copy of the transposed text)", batched_only=True,
    ))  # fmt: skip
    return tuple(out)


def dit_checkpoint_term(m: ModelSpec) -> ActivationTerm:
    """What a fully recomputed block keeps: its input (the residual stream, ``h b`` a token)."""
    return ActivationTerm(
        kind="checkpoint_input", per="token", split="sp", bytes=float(m.hidden * m.dtype_bytes),
        saved_by="the activation checkpoint (recomputes the rest in the backward)",
    )  # fmt: skip


def dit_outside_activation_terms(m: ModelSpec) -> dict[str, tuple[ActivationTerm, ...]]:
    """What a DiT keeps outside its blocks, by where it lives: ``"first"`` stage (patch
    embedding input, per CP-local token, and the conditioning every block reads: the RoPE
    cos/sin tables, fp32 ``2 x head_dim`` a token, and the packed text ``T h b``), ``"last"``
    stage (the head: final norm input and fp32 stats, its modulated input and the final
    linear's input, on the SP shard, and its ``1 + scale`` vector). Not priced: the timestep MLP (per sample) and the
    caption projections (per text token of each encoder), under 1 % of one block."""
    h, b = float(m.hidden), float(m.dtype_bytes)
    assert m.head_dim is not None
    c = float(m.latent_channels * m.patch**2)
    first = (
        ActivationTerm(kind="patch_input", per="token", split="none", bytes=c * b,
                       saved_by="patch_embed (before the SP split)"),
        ActivationTerm(kind="rope", per="token", split="none", bytes=2 * m.head_dim * 4.0,
                       saved_by="RoPE multiplies of every block (one table)"),
        ActivationTerm(kind="text", per="text_token", split="none", bytes=h * b,
                       saved_by="cross-attention linear_kv of every block (one tensor)"),
    )  # fmt: skip
    last = (
        ActivationTerm(kind="head", per="token", split="sp", bytes=3 * h * b + 2 * 4.0,
                       saved_by="final norm, its modulation and final_linear"),
        ActivationTerm(kind="head", per="sample", split="none", bytes=h * b,
                       saved_by="the head's modulation vector (1 + scale)"),
    )  # fmt: skip
    return {"first": first, "last": last}


def forward_flops_per_sample(m: ModelSpec) -> dict[str, float]:
    """Forward FLOPs of one sample by kind: ``dense`` (token-wise matmuls), ``attention``
    (scores and weighted sum, ``4 s^2 a`` per layer, Megatron convention), ``cross``
    (cross-attention ``4 s T a`` + its text K/V ``4 T h a``) and ``logits`` (``2 s h V``).

    REFERENCE.md: a 204x544x992 sample of stepvideo-t2v-30b is about 10.7 PFLOP forward,
    about 64 % of it self-attention.
    """
    s, layers = float(m.seq_len), m.layers
    dense = 2.0 * s * layer_matmul_params(m) * layers
    attention = 4.0 * s * s * m.attn_dim * layers
    cross = 0.0
    if m.kind == "dit":
        t = float(m.text_tokens)
        cross = (4.0 * s * t * m.attn_dim + 2.0 * t * layer_text_params(m)) * layers
    logits = 2.0 * s * m.hidden * m.vocab if m.kind == "lm" else 0.0
    return {"dense": dense, "attention": attention, "cross": cross, "logits": logits}


def training_flops_per_sample(m: ModelSpec) -> float:
    """Model FLOPs of one sample's training step (3x forward, no recompute)."""
    return 3.0 * sum(forward_flops_per_sample(m).values())
