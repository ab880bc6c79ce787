"""Memory and time of a training step, vectorized over candidate layouts.

Every quantity is a numpy array with one entry per candidate, so ``search`` prices a hundred
thousand layouts in one pass and ``estimate`` is the same code on a single row (they cannot
disagree). Sources of the formulas:

- activations, LM: Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
  Transformer Models", arXiv 2205.05198) eq. 1-2, with the ``5as/h`` score term removed
  because flash attention does not store scores, the MLP term generalized to any FFN width
  and gated MLPs; DiT: the tensors the project's block saves, kind by kind
  (``counts.dit_activation_terms``, measured with ``step_infra.models.saved_tensors``);
- in-flight micro-batches: 1F1B holds ``min(m, p)`` micro-batches on the first stage; the
  interleaved schedule ``(1 + (p - 1) / (p v))`` times that (Korthikanti et al. sec. 4.2.3);
- optimizer: mixed-precision Adam, 2 (bf16 weights) + 4 (fp32 grads) + 12 (fp32 master, m, v)
  bytes per parameter, the 12 sharded over DP x CP by the distributed optimizer
  (Megatron-LM ``distrib_optimizer.md``); plain fp32 training 4 + 4 + 8 (m, v); other state
  layouts by ``ModelSpec.state_precision``. An LM's state shards evenly (Megatron's flat
  buffer); a DiT's as the trainer's ZeRO-1 deals whole tensors (``counts.zero_max_shard``);
  a DiT's embedding, adaLN and caption weights are whole on every TP rank;
- element-wise passes: bytes counted op by op (``counts.elementwise_elements_per_token``) over
  the measured element-wise bandwidth; activations and activation messages in the model's
  dtype (``ModelSpec.dtype_bytes``);
- pipeline bubble ``(p - 1) / (v m)`` of the micro-batch time (Narayanan et al. 2021 sec. 2.2);
- collectives: alpha-beta ring costs on the slowest link the group spans; a collective hides
  under at most ``GPUSpec.comm_overlap`` of the compute it is overlapped with;
- dispatch: every framework op costs the host ``GPUSpec.op_overhead_us``; a GPU queues ops
  ahead, so only dispatch beyond the device's work shows (``max(compute, dispatch)``), a CPU
  pays it on top. Negligible for large GEMMs, it dominates a model of a few hundred tokens.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from step_infra.emulator.counts import (
    ActivationTerm,
    dit_activation_terms,
    dit_checkpoint_term,
    dit_outside_activation_terms,
    dit_param_tensors,
    elementwise_elements_per_token,
    embedding_params,
    embedding_tp_split,
    layer_matmul_params,
    layer_replicated_params,
    layer_small_params,
    layer_text_params,
    layer_tp_split_params,
    zero_max_shard,
)
from step_infra.emulator.specs import ClusterSpec, ModelSpec

Columns = dict[str, np.ndarray]
ArrayOrFloat = np.ndarray | float
GB = 1e9
# Share of tensor-parallel traffic hidden under GEMMs by Transformer-Engine's userbuffer
# overlap (``--tp-comm-overlap``): chunks of the all-gather/reduce-scatter run while the
# previous chunk's GEMM computes; the first and last chunk stay exposed.
TP_OVERLAP_HIDDEN = 0.9
# Time of a backward over its forward: a matmul's backward is two products the size of the
# forward one (input and weight gradients); fused attention's is about 2.5x (REFERENCE.md:
# it recomputes the scores from the saved softmax statistics). ``hwprobe`` counts its
# measured FLOPs with the same factors, so the rates it fits are the rates priced here.
GEMM_BACKWARD_FACTOR = 2.0
ATTN_BACKWARD_FACTOR = 2.5
# Knees of the achievable-attention curve (see ``attention_fill``), fixed, not fitted.
ATTN_SEQ_KNEE = 128.0  # query tokens per rank
ATTN_HEAD_KNEE = 32.0  # elements of one head


def evaluate(model: ModelSpec, cluster: ClusterSpec, c: Columns) -> Columns:
    """Price every layout in ``c`` (integer columns, see ``strategy._numeric``)."""
    mem = _memory(model, cluster, c)
    time = _time(model, cluster, c)
    out: Columns = {**mem, **time}
    out["memory_gb_per_gpu"] = np.sum([mem[k] for k in mem if k.startswith("mem_")], axis=0)
    out["fits"] = out["memory_gb_per_gpu"] <= cluster.gpu.hbm_gb
    return out


# ----------------------------------------------------------------------------------- memory
def layers_per_stage(model: ModelSpec, c: Columns) -> np.ndarray:
    """Layers of the busiest pipeline stage: Megatron allows uneven splits, so it holds
    ``ceil(layers / (pp vpp))`` layers in each of its ``vpp`` virtual stages."""
    return np.ceil(model.layers / (c["pp"] * c["vpp"])) * c["vpp"]


def _params_per_gpu(model: ModelSpec, c: Columns) -> np.ndarray:
    """Parameters held by the busiest pipeline stage's GPU (blocks + embedding/head): the
    TP-split ones divided by ``tp``, the replicated ones (norms, row-parallel biases, a DiT's
    embedding and adaLN weights) whole."""
    split, whole = layer_tp_split_params(model), layer_replicated_params(model)
    embedding = embedding_params(model) / np.where(embedding_tp_split(model), c["tp"], 1)
    return layers_per_stage(model, c) * (split / c["tp"] + whole) + embedding


def state_bytes_per_param(model: ModelSpec) -> tuple[float, float, float]:
    """(weights, gradients, optimizer states) bytes per parameter. Plain fp32: weights 4,
    gradients 4, Adam m, v 8. bf16 by ``ModelSpec.state_precision``: ``"mixed"`` (Megatron)
    bf16 weights 2, fp32 main gradients 4, fp32 master weights + Adam m, v 12; ``"fp32"``
    (fp32 weights under bf16 compute) 4, 4, 8; ``"activation"`` (a model cast to bf16 and
    torch's AdamW, whose m, v take the parameters' dtype) 2, 2, 4."""
    if model.dtype == "fp32" or model.state_precision == "fp32":
        return 4.0, 4.0, 8.0
    if model.state_precision == "activation":
        b = float(model.dtype_bytes)
        return b, b, 2 * b
    return 2.0, 4.0, 12.0


def optimizer_shard_params(model: ModelSpec, c: Columns) -> np.ndarray:
    """Parameters whose optimizer state the busiest rank holds. Without the distributed
    optimizer: all of them. With it, an LM's state splits evenly over ``dp x cp``
    (Megatron's flat buffer); a DiT's as the trainer's ZeRO-1 (``torch``'s
    ``ZeroRedundancyOptimizer``) deals whole tensors, so a rank holds at least the largest
    (the shared adaLN linear, ``6 h^2``)."""
    params = _params_per_gpu(model, c)
    n = c["dp"] * c["cp"]
    even = params / np.where(c["dist_opt"] == 1, n, 1)
    if model.kind == "lm":
        return np.asarray(even, dtype=float)
    layers = layers_per_stage(model, c)
    shards = [
        _zero_shard(model, int(tp), int(held), int(ranks)) if dist_opt == 1 else float(whole)
        for tp, held, ranks, dist_opt, whole in np.broadcast(
            c["tp"], layers, n, c["dist_opt"], params
        )
    ]
    return np.reshape(np.asarray(shards, dtype=float), np.shape(even))


@lru_cache(maxsize=4096)
def _zero_shard(model: ModelSpec, tp: int, layers: int, ranks: int) -> float:
    return float(zero_max_shard(dit_param_tensors(model, tp, layers), ranks))


def _activation_coefficients(model: ModelSpec) -> tuple[float, float]:
    """LM: (replicated, tp-split) bytes per token per hidden unit of one block (Korthikanti
    eq. 2 without the score term). Replicated: norms' inputs, dropout masks (10); split:
    QKV/attention output (8) + MLP (``4 r``, gated ``6 r`` for ``r = ffn / h``). Korthikanti
    counts 2-byte activations; fp32 training stores twice as much."""
    assert model.ffn is not None
    r = model.ffn / model.hidden
    split = 8.0 + (6.0 if model.gated_mlp else 4.0) * r
    rep = 10.0
    scale = model.dtype_bytes / 2.0
    return rep * scale, split * scale


def term_bytes(model: ModelSpec, term: ActivationTerm, c: Columns) -> np.ndarray:
    """Bytes of one :class:`~step_infra.emulator.counts.ActivationTerm` for one micro-batch
    on one GPU: tokens are this CP rank's, text tokens and samples the micro-batch's."""
    units = {
        "token": c["mb"] * model.seq_len / c["cp"],
        "text_token": c["mb"] * float(model.text_tokens),
        "sample": c["mb"] * 1.0,
    }[term.per]
    ones = np.ones(np.shape(c["tp"]), dtype=int)
    div: np.ndarray = {"tp": c["tp"], "sp": np.where(c["sp"] == 1, c["tp"], 1), "none": ones}[
        term.split
    ]
    present = (c["mb"] > 1) if term.batched_only else True
    return np.asarray(np.where(present, units * term.bytes / div, 0.0), dtype=float)


def dit_layer_activation_kinds(
    model: ModelSpec, c: Columns, *, recompute: int
) -> dict[str, np.ndarray]:
    """Bytes one DiT block keeps for one micro-batch, by kind: every term of
    ``counts.dit_activation_terms`` (``recompute`` 0), without the GELU output (1,
    selective), or only the checkpointed input (2, full). The batched-only layout copies
    exist where ``F.linear`` flattens a strided input: the cross-attention text without TP
    (megatron's TP linears save their 3-D input as it is) and the attention output without TP
    or with the SP row linear."""
    if recompute == 2:
        return {"checkpoint_input": term_bytes(model, dit_checkpoint_term(model), c)}
    kinds: dict[str, np.ndarray] = {}
    for term in dit_activation_terms(model):
        if recompute == 1 and term.kind == "mlp_gelu_output":
            continue
        value = term_bytes(model, term, c)
        if term.batched_only and term.kind == "text_kv":
            value = np.where(c["tp"] == 1, value, 0.0)
        elif term.batched_only:
            value = np.where((c["tp"] == 1) | (c["sp"] == 1), value, 0.0)
        kinds[term.kind] = kinds.get(term.kind, 0.0) + value
    return kinds


def dit_layer_activation_bytes(model: ModelSpec, c: Columns, *, recompute: int) -> np.ndarray:
    """The sum of :func:`dit_layer_activation_kinds`."""
    total = np.zeros(np.shape(c["tp"]), dtype=float)
    for value in dit_layer_activation_kinds(model, c, recompute=recompute).values():
        total = total + value
    return total


def _dit_outside_bytes(model: ModelSpec, c: Columns) -> tuple[np.ndarray, np.ndarray]:
    """(first-stage, last-stage) bytes one micro-batch keeps outside the blocks."""
    terms = dit_outside_activation_terms(model)
    zero = np.zeros(np.shape(c["tp"]), dtype=float)
    first = sum((term_bytes(model, t, c) for t in terms["first"]), zero)
    last = sum((term_bytes(model, t, c) for t in terms["last"]), zero)
    return first, last


def _memory(model: ModelSpec, cluster: ClusterSpec, c: Columns) -> Columns:
    tp, pp, vpp, cp, dp = c["tp"], c["pp"], c["vpp"], c["cp"], c["dp"]
    params = _params_per_gpu(model, c)
    tokens = c["mb"] * model.seq_len / cp  # per micro-batch per GPU, before TP
    sbh = tokens * model.hidden
    b = float(model.dtype_bytes)
    assert model.ffn is not None
    micro = c["gb"] / (dp * c["mb"])
    in_flight = np.minimum(micro, pp)
    interleave = np.where(vpp > 1, 1.0 + (pp - 1) / (pp * vpp), 1.0)
    layers_held = layers_per_stage(model, c) * in_flight * interleave
    if model.kind == "dit":
        kept = {r: dit_layer_activation_bytes(model, c, recompute=r) for r in (0, 1, 2)}
        per_layer = np.where(c["recompute"] == 1, kept[1], kept[0])
        layer_input = kept[2]
        first, last = _dit_outside_bytes(model, c)
        outside = in_flight * first + np.where(pp == 1, last, 0.0)  # busiest: the first stage
    else:
        rep, split = _activation_coefficients(model)
        per_layer = np.where(c["sp"] == 1, sbh * (rep + split) / tp, sbh * (rep + split / tp))
        selective = np.where(c["recompute"] == 1, sbh * b * model.ffn / model.hidden / tp, 0.0)
        per_layer = per_layer - selective
        layer_input = np.where(c["sp"] == 1, b * sbh / tp, b * sbh)
        outside = 2.0 * 4.0 * tokens * model.vocab / tp  # logits
    # full recompute: every held layer keeps its input, and one layer's whole activations
    # live again while its backward recomputes it
    acts = np.where(
        c["recompute"] == 2, layers_held * layer_input + per_layer, layers_held * per_layer
    )
    w_bytes, g_bytes, o_bytes = state_bytes_per_param(model)
    return {
        "params_per_gpu": params,
        "mem_params_gb": w_bytes * params / GB,
        "mem_grads_gb": g_bytes * params / GB,
        "mem_optimizer_gb": o_bytes * optimizer_shard_params(model, c) / GB,
        "mem_activations_gb": (acts + outside) / GB,
        "mem_buffers_gb": np.full(tp.shape, cluster.buffers_gb, dtype=float),
    }


# ------------------------------------------------------------------------------------- time
def ring_allreduce_terms(n: ArrayOrFloat) -> tuple[ArrayOrFloat, ArrayOrFloat]:
    """(latency hops, share of the bytes that crosses each link) of a ring all-reduce over
    ``n`` ranks: ``2 (n - 1)`` hops and ``2 (n - 1) / n`` of the bytes (a reduce-scatter then
    an all-gather; the bus-bandwidth convention of nccl-tests). The time model prices a
    collective with them (``hops x latency + share x bytes / bandwidth``) and ``hwprobe`` fits
    measured gloo all-reduces to the same terms."""
    return 2.0 * (n - 1), 2.0 * (n - 1) / n


def _ring_allreduce_s(
    nbytes: np.ndarray, n: np.ndarray, bw_gb_s: np.ndarray, lat_us: np.ndarray
) -> np.ndarray:
    """Ring all-reduce, seconds (see :func:`ring_allreduce_terms`)."""
    hops, share = ring_allreduce_terms(n)
    return np.where(n > 1, share * nbytes / (bw_gb_s * GB) + hops * lat_us * 1e-6, 0.0)


def _ring_half_s(
    nbytes: np.ndarray, n: np.ndarray, bw_gb_s: np.ndarray, lat_us: np.ndarray
) -> np.ndarray:
    """Reduce-scatter, all-gather or all-to-all, seconds: half a ring all-reduce, ``(n - 1) /
    n`` of the bytes and ``n - 1`` hops."""
    hops, share = ring_allreduce_terms(n)
    return np.where(n > 1, share / 2 * nbytes / (bw_gb_s * GB) + hops / 2 * lat_us * 1e-6, 0.0)


def _link(cluster: ClusterSpec, span: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bandwidth GB/s, latency us) of a group spanning ``span`` consecutive ranks."""
    inside = span <= cluster.gpus_per_node
    bw = np.where(inside, cluster.gpu.nvlink_gb_s, cluster.nic_gb_s) * cluster.gpu.comm_eff
    lat = np.where(inside, cluster.nvlink_latency_us, cluster.nic_latency_us)
    return bw, lat


def gemm_fill(dim: ArrayOrFloat, tokens: ArrayOrFloat, half_dim: float) -> ArrayOrFloat:
    """Share of ``peak x gemm_eff_max`` that a ``(tokens x dim)``-sized GEMM reaches,
    ``1 / (1 + half_dim / dim + half_dim / tokens)`` (dimensionless; ``dim`` the per-GPU
    width, ``tokens`` the rows, ``half_dim`` the fitted ``GPUSpec.gemm_half_dim``, all in
    elements): small GEMMs underfill the device. The time model prices with it and
    ``hwprobe.fit_gemm_curve`` fits measured rates to it."""
    return 1.0 / (1.0 + half_dim / dim + half_dim / tokens)


def attention_fill(seq_q: ArrayOrFloat, head_dim: ArrayOrFloat) -> ArrayOrFloat:
    """Share of ``peak x attn_eff`` that fused attention reaches,
    ``1 / (1 + 128 / seq_q + 32 / head_dim)`` (dimensionless; ``seq_q`` query tokens per
    rank, ``head_dim`` elements): short query blocks and small heads underfill the device.

    The knees (``ATTN_SEQ_KNEE``, ``ATTN_HEAD_KNEE``) are fixed; only ``attn_eff`` is fitted
    (``calibration.fit`` on published runs, ``hwprobe.attention_efficiency`` on this machine,
    which inverts this curve). 128 is the query-tile height of FlashAttention-2's forward
    kernel (Dao 2023, arXiv 2307.08691): a shorter sequence leaves the tile part empty. The
    head knee, 32, is chosen, not measured: a 64-wide head loses a third, a 128-wide one a
    fifth, and ``attn_eff`` absorbs the rest.
    """
    return 1.0 / (1.0 + ATTN_SEQ_KNEE / seq_q + ATTN_HEAD_KNEE / head_dim)


def gemm_rate(
    cluster: ClusterSpec, fp8: np.ndarray, dim: np.ndarray, tokens: np.ndarray
) -> np.ndarray:
    """Achievable matmul FLOP/s: peak x efficiency that grows with the per-GPU GEMM size
    (``eff_max x gemm_fill``)."""
    g = cluster.gpu
    peak = np.where(
        fp8 == 1, g.peak_tflops_fp8 * g.fp8_gemm_eff_max, g.peak_tflops_bf16 * g.gemm_eff_max
    )
    return peak * 1e12 * gemm_fill(dim, tokens, g.gemm_half_dim)


def attention_rate(cluster: ClusterSpec, seq_q: np.ndarray, head_dim: int) -> np.ndarray:
    """Achievable fused-attention FLOP/s (bf16): ``peak x attn_eff x attention_fill``."""
    g = cluster.gpu
    return np.asarray(g.peak_tflops_bf16 * 1e12 * g.attn_eff * attention_fill(seq_q, head_dim))


def _time(model: ModelSpec, cluster: ClusterSpec, c: Columns) -> Columns:
    tp, pp, vpp, cp, dp = (c[k].astype(float) for k in ("tp", "pp", "vpp", "cp", "dp"))
    assert model.head_dim is not None and model.kv_heads is not None
    s, h, layers_stage = float(model.seq_len), model.hidden, layers_per_stage(model, c)
    tokens = c["mb"] * s / cp  # per micro-batch per GPU
    micro = c["gb"] / (dp * c["mb"])
    hw = cluster.gpu

    # compute, one micro-batch through one stage (the last: it also holds the logits)
    dense = 2.0 * tokens * layer_matmul_params(model) * layers_stage / tp
    dense += 2.0 * c["mb"] * model.text_tokens * layer_text_params(model) * layers_stage / tp
    dense_rate = gemm_rate(cluster, c["fp8"], h / tp, tokens)
    causal = 0.5 if model.kind == "lm" else 1.0  # flash attention skips masked blocks
    attn = 4.0 * c["mb"] * s * s * model.attn_dim * layers_stage / (tp * cp) * causal
    attn += 4.0 * c["mb"] * s * model.text_tokens * model.attn_dim * layers_stage / (tp * cp)
    attn_rate = attention_rate(cluster, s / cp, model.head_dim)
    logits = 2.0 * tokens * h * model.vocab / tp if model.kind == "lm" else np.zeros_like(tp)
    sp_div = np.where(c["sp"] == 1, tp, 1.0)
    b = float(model.dtype_bytes)
    ew_rep, ew_split = elementwise_elements_per_token(model)
    elem_bytes = b * tokens * layers_stage * (ew_rep / sp_div + ew_split / tp)
    elem = elem_bytes / (hw.hbm_gb_s * GB)
    t_dense, t_attn = (dense + logits) / dense_rate, attn / attn_rate
    fwd = t_dense + t_attn + elem
    bwd = GEMM_BACKWARD_FACTOR * t_dense + ATTN_BACKWARD_FACTOR * t_attn + 2.0 * elem
    recompute = np.select([c["recompute"] == 2, c["recompute"] == 1], [fwd, elem], 0.0)

    # tensor parallel: all-reduce (or RS + AG with SP, same bytes) per block output; a DiT's
    # backward also all-reduces the gradient of the replicated text its cross-attention K/V
    # projection reads (Megatron's copy-to-TP-region on the text input)
    n_tp_coll = 3.0 if model.kind == "dit" else 2.0
    passes = np.where(c["recompute"] == 2, 3.0, 2.0)  # fwd, bwd (+ recomputed fwd)
    tp_bw, tp_lat = _link(cluster, tp)
    tp_bytes = b * tokens * h
    tp_comm = _ring_allreduce_s(tp_bytes, tp, tp_bw, tp_lat) * n_tp_coll * passes * layers_stage
    if model.kind == "dit" and model.text_tokens:
        text_bytes = b * c["mb"] * model.text_tokens * h
        tp_comm = tp_comm + _ring_allreduce_s(text_bytes, tp, tp_bw, tp_lat) * layers_stage
    tp_hidden = np.where(c["overlap_tp"] == 1, TP_OVERLAP_HIDDEN * tp_comm, 0.0)

    # context parallel: Ulysses all-to-alls (q, k, v, out) or ring K/V passes under attention
    cp_bw, cp_lat = _link(cluster, tp * cp)
    head_bytes = b * tokens * model.attn_dim / tp
    ulysses = _ring_half_s(head_bytes, cp, cp_bw, cp_lat) * 4.0 * (passes + 1.0) * layers_stage
    kv_bytes = 2.0 * b * tokens * model.kv_heads * model.head_dim / tp
    ring_fwd = (
        np.where(cp > 1, (cp - 1) * (kv_bytes / (cp_bw * GB) + cp_lat * 1e-6), 0.0) * layers_stage
    )
    ring_total = ring_fwd * (passes + 1.0)  # backward sends K/V and their gradients
    attn_share = t_attn * (passes - 1.0 + ATTN_BACKWARD_FACTOR) / 2.0  # forwards + backward
    ring_exposed = np.maximum(ring_total - attn_share, 0.0)
    cp_comm = np.where(c["ring"] == 1, ring_total, ulysses)
    cp_exposed = np.where(c["ring"] == 1, ring_exposed, ulysses)

    # pipeline: activations sent forward and gradients back at every stage boundary
    pp_bw, pp_lat = _link(cluster, tp * cp * pp)
    pp_bytes = b * tokens * h / sp_div
    pp_comm = np.where(pp > 1, 2.0 * vpp * (pp_bytes / (pp_bw * GB) + pp_lat * 1e-6), 0.0)

    # host dispatch of the stage's framework ops (the busiest stage also runs embedding and loss)
    ops = layers_stage * model.ops_per_layer * passes / 2.0 + model.ops_outside_layers
    dispatch = ops * hw.op_overhead_us * 1e-6
    device_work = fwd + bwd + recompute
    dispatch_exposed = np.maximum(dispatch - device_work, 0.0) if hw.async_dispatch else dispatch

    per_micro = device_work + dispatch_exposed + (tp_comm - tp_hidden) + cp_exposed + pp_comm
    bubble = per_micro * (pp - 1) / vpp
    pipeline = per_micro * micro

    # data parallel (over dp x cp ranks): grads reduced, params gathered, under the backward
    params = _params_per_gpu(model, c)
    n_dp = dp * cp
    dp_bw, dp_lat = _link(cluster, np.full_like(tp, float(cluster.num_gpus)))
    dp_bw = np.where(n_dp > 1, dp_bw, 1.0)
    grad_bytes = 4.0 * params  # fp32 gradient reduction (Megatron default for bf16)
    rs = np.where(
        c["dist_opt"] == 1,
        _ring_half_s(grad_bytes, n_dp, dp_bw, dp_lat),
        _ring_allreduce_s(grad_bytes, n_dp, dp_bw, dp_lat),
    )
    ag = np.where(c["dist_opt"] == 1, _ring_half_s(b * params, n_dp, dp_bw, dp_lat), 0.0)
    hide = hw.comm_overlap
    rs_exposed = np.where(c["overlap_grad"] == 1, np.maximum(rs - hide * bwd, 0.0), rs)
    ag_exposed = np.where(c["overlap_param"] == 1, np.maximum(ag - hide * fwd, 0.0), ag)

    # optimizer: Adam is memory-bound; it reads weights, gradients, m, v and writes weights,
    # m, v (7 x 4 bytes in fp32; mixed precision adds the bf16 weight copy: 30 bytes)
    shard = optimizer_shard_params(model, c)
    adam_bytes = 28.0 if model.dtype == "fp32" else 30.0
    optimizer = adam_bytes * shard / (hw.hbm_gb_s * GB)
    # and the host's ops for it (zero grads, clip, Adam per tensor): a GPU runs them under the
    # memory-bound kernels it queued, a CPU pays each op on top
    update_ops = layers_stage * model.update_ops_per_layer + model.update_ops_outside_layers
    update_dispatch = update_ops * hw.op_overhead_us * 1e-6
    optimizer = (
        np.maximum(optimizer, update_dispatch) if hw.async_dispatch else optimizer + update_dispatch
    )

    # after the backward: gradients that are partial per TP rank (norm gains, biases and
    # modulation tables shared by the heads) summed over TP in one message (megatron-core's
    # coalesced layer-norm all-reduce), and the gradient norm's all-reduce for clipping
    small_bytes = 4.0 * layers_stage * layer_small_params(model)
    tp_grad_sync = _ring_allreduce_s(small_bytes, tp, tp_bw, tp_lat) + _ring_allreduce_s(
        np.full_like(tp, 4.0), tp, tp_bw, tp_lat
    )

    step = pipeline + bubble + rs_exposed + ag_exposed + optimizer + tp_grad_sync
    return {
        "step_time_s": step,
        "micro_batches": micro,
        "t_compute_dense_s": t_dense * (1.0 + GEMM_BACKWARD_FACTOR) * micro,
        "t_compute_attention_s": t_attn * (1.0 + ATTN_BACKWARD_FACTOR) * micro,
        "t_compute_elementwise_s": (elem * 3.0) * micro,
        "t_recompute_s": recompute * micro,
        "t_dispatch_exposed_s": dispatch_exposed * micro,
        "t_tp_comm_exposed_s": (tp_comm - tp_hidden) * micro,
        "t_tp_comm_hidden_s": tp_hidden * micro,
        "t_cp_comm_exposed_s": cp_exposed * micro,
        "t_cp_comm_hidden_s": (cp_comm - cp_exposed) * micro,
        "t_pp_comm_s": pp_comm * micro,
        "t_bubble_s": bubble,
        "t_dp_comm_exposed_s": rs_exposed + ag_exposed,
        "t_dp_comm_hidden_s": (rs - rs_exposed) + (ag - ag_exposed),
        "t_optimizer_s": optimizer,
        "t_tp_grad_sync_s": tp_grad_sync,
    }
