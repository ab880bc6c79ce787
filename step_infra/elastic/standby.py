"""A hot spare on standby: a process that has loaded torchrun and waits to be activated.

Why not let the spare's agent wait in the rendezvous, as TorchElastic allows? Because a worker
that *crashes* (rather than being evicted) sends every agent back to the rendezvous with the
spare still there: three agents for two places, and torch 2.13's dynamic rendezvous then
leaves one on its wait list while the others restart their workers again and again. A standby
spare takes no part in the rendezvous until the controller activates it (after an eviction),
by creating its ``go`` file; it then runs the agent in this already-warm interpreter. It exits
by itself if its controller dies (it gets re-parented).

    python -m step_infra.elastic.standby --go FILE -- <torchrun arguments>
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or args[0] != "--go" or args[2] != "--":
        raise SystemExit("usage: python -m step_infra.elastic.standby --go FILE -- ARGS...")
    go, torchrun_args = Path(args[1]), args[3:]
    from torch.distributed import run  # the slow import happens before activation

    parent = os.getppid()
    while not go.exists():
        if os.getppid() != parent:  # the controller is gone: nothing will activate us
            raise SystemExit(0)
        time.sleep(0.1)
    sys.argv = ["torchrun", *torchrun_args]
    run.main()


if __name__ == "__main__":
    main()
