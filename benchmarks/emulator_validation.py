"""Step Emulator against the real world: every published run in shared/calibration.

Prints, per row, the published and predicted throughput (model TFLOP/s per GPU, or tokens/s
per GPU for the Megatron-Bridge rows), the error and the term that dominates the predicted
loss from peak; then MAPE, the worst row and the rows above 15 %; then the search over 2,048
H100s for stepvideo-t2v-30b at 204x544x992 (time, and whether the top layout fits in 80 GB).

    python benchmarks/emulator_validation.py [--json PATH] [--fit]

``--fit`` re-runs the efficiency fit (the presets carry its result) and prints the values.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from step_infra.emulator import cluster_for, get_model, search
from step_infra.emulator.calibration import fit, load_rows, row_error
from step_infra.emulator.counts import training_flops_per_sample

LOSS_TERMS = {
    "compute efficiency": (
        "t_compute_dense_s",
        "t_compute_attention_s",
        "t_compute_elementwise_s",
        "t_recompute_s",
    ),
    "TP communication": ("t_tp_comm_exposed_s",),
    "CP communication": ("t_cp_comm_exposed_s",),
    "pipeline bubble + PP": ("t_bubble_s", "t_pp_comm_s"),
    "DP communication": ("t_dp_comm_exposed_s",),
    "optimizer": ("t_optimizer_s",),
}


def dominant_loss(row, breakdown: dict[str, float]) -> str:  # type: ignore[no-untyped-def]
    """The term that costs most time beyond the ideal (model FLOPs at peak)."""
    s = row.strategy
    peak = (
        row.cluster.gpu.peak_tflops_fp8
        if s.precision == "fp8"
        else row.cluster.gpu.peak_tflops_bf16
    )
    ideal = (
        s.global_batch * training_flops_per_sample(row.model) / row.cluster.num_gpus / (peak * 1e12)
    )
    losses = {name: sum(breakdown.get(k, 0.0) for k in keys) for name, keys in LOSS_TERMS.items()}
    losses["compute efficiency"] -= ideal
    return max(losses, key=losses.__getitem__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write machine-readable results here")
    parser.add_argument("--fit", action="store_true", help="re-fit the efficiencies and print them")
    args = parser.parse_args()

    rows = load_rows()
    results = []
    print(
        f"{'source':<20} {'run':<16} {'GPUs':>5} {'published':>10} {'predicted':>10} {'error':>7}  dominant loss"
    )
    for r in rows:
        err, breakdown = row_error(r)
        unit_pub = r.published_tokens_per_s_per_gpu or r.published_tflops_per_gpu
        unit = "tok/s" if r.published_tokens_per_s_per_gpu else "TFLOP/s"
        loss = dominant_loss(r, breakdown)
        results.append(
            {
                "source": r.source,
                "run": r.name,
                "gpus": r.cluster.num_gpus,
                "metric": unit,
                "published": unit_pub,
                "predicted": unit_pub * (1 + err),
                "error": err,
                "dominant_loss": loss,
            }
        )
        print(
            f"{r.source:<20} {r.name:<16} {r.cluster.num_gpus:>5} {unit_pub:>10.1f} {unit_pub * (1 + err):>10.1f} "
            f"{err:>+7.1%}  {loss}"
        )
    errors = np.array([x["error"] for x in results])
    worst = results[int(np.argmax(np.abs(errors)))]
    above = [x["run"] for x in results if abs(x["error"]) > 0.15]
    print(
        f"\nMAPE {np.mean(np.abs(errors)):.1%} over {len(rows)} rows (target <= 10%); "
        f"max |error| {abs(worst['error']):.1%} ({worst['run']}); rows above 15%: {above or 'none'}"
    )

    model = get_model("stepvideo-t2v-30b").with_video(204, 544, 992)
    cluster = cluster_for("h100-sxm", 2048)
    t0 = time.perf_counter()
    table = search(model, cluster, global_batch=256, fits_only=False)
    search_s = time.perf_counter() - t0
    fitting = table[table["fits"]]
    top = fitting.iloc[0]
    print(
        f"search: stepvideo-t2v-30b 204x544x992 on 2,048 h100-sxm: {len(table)} valid layouts priced in "
        f"{search_s:.2f} s (target < 5 s); top layout tp={top['tp']} pp={top['pp']} vpp={top['vpp']} "
        f"cp={top['cp']} ({top['cp_kind']}) dp={top['dp']}: {top['step_time_s']:.2f} s/step, "
        f"{top['memory_gb_per_gpu']:.1f} GB of 80"
    )

    out = {
        "rows": results,
        "mape": float(np.mean(np.abs(errors))),
        "max_abs_error": float(abs(worst["error"])),
        "worst_row": worst["run"],
        "rows_above_15pct": above,
        "search": {
            "layouts": len(table),
            "fitting": len(fitting),
            "seconds": search_s,
            "top_memory_gb": float(top["memory_gb_per_gpu"]),
            "top_fits_80gb": bool(top["memory_gb_per_gpu"] <= 80),
            "top_step_time_s": float(top["step_time_s"]),
        },
    }
    if args.fit:
        out["fit"] = fit(rows)
        print("fitted efficiencies:", json.dumps(out["fit"], indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
