"""StepRPC throughput, latency and spray balance, each against a baseline in the same run.

A thin script over :mod:`step_infra.rpc.bench`, where the benchmark lives (and its docstring
says what each row measures and why it is run this way) so that an installed package can run
it too: ``python -m step_infra.rpc.bench`` and ``step-infra rpc bench`` are the same program.

    python benchmarks/rpc_throughput.py [--quick] [--warmup N] [--rounds N] [--json PATH]
"""

from __future__ import annotations

import sys

from step_infra.rpc.bench import main

if __name__ == "__main__":
    sys.exit(main())
