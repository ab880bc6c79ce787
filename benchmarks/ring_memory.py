"""Ring context parallel keeps O(local K/V) for the backward: bytes saved per rank at cp = 2, 4.

For each cp, real ``torchrun`` processes on gloo run ``step_infra.models.ring_memory_check``:
one rank's attention over the whole sequence against the ring over cp ranks, counting the
bytes autograd keeps (saved-tensor hooks, storages counted once). ``ratio`` is the per-rank
bytes over one rank's share (``bytes_one_rank / cp``): about 1 for a ring that keeps only its
own K/V; ``allgather_ratio`` is what an all-gathered K/V would keep at least. The issue's
bound is ratio <= 1.5 at cp = 4.

    python benchmarks/ring_memory.py [--cp 2 4] [--seq 256] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(cp: int, seq: int, timeout_s: float = 300.0) -> dict[str, object]:
    """One ``ring_memory_check`` run on ``cp`` processes; its JSON row."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={cp}",
        "--master-addr=127.0.0.1", f"--master-port={_free_port()}",
        "-m", "step_infra.models.ring_memory_check", "--seq", str(seq),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"ring_memory_check at cp={cp} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if len(rows) != 1:
        raise RuntimeError(f"expected one JSON row from cp={cp}, got {len(rows)}")
    return rows[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cp", type=int, nargs="+", default=[2, 4], help="context-parallel sizes")
    ap.add_argument("--seq", type=int, default=256, help="tokens of the whole sequence")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    bad = [c for c in args.cp if c < 2 or args.seq % c]
    if bad:
        raise SystemExit(f"--cp {bad}: each must be >= 2 and divide --seq {args.seq}")
    rows = [measure(cp, args.seq) for cp in args.cp]
    print(f"{'cp':>3} {'one rank B':>11} {'per rank B':>11} {'ratio':>6} {'all-gather':>10} "
          f"{'err out':>8} {'err grad':>8}")  # fmt: skip
    for r in rows:
        print(
            f"{r['cp']:>3} {r['bytes_one_rank']:>11,} {r['bytes_per_rank']:>11,} "
            f"{r['ratio']:>6.2f} {r['allgather_ratio']:>10.2f} "
            f"{r['max_rel_err_output']:>8.1e} {r['max_rel_err_grad']:>8.1e}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"seq": args.seq, "rows": rows}, indent=2))
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
