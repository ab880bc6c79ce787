"""Parameter and FLOP counts: named formulas, each with its source.

Units are in the names. FLOPs follow the Megatron *model FLOPs* convention: a multiply-add is
2 FLOPs, a training step is 3x the forward (backward = 2x forward), recomputation is not
counted, and attention scores are counted in full even for causal masks.
"""

from __future__ import annotations

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
