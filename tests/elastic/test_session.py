"""ElasticSession helpers that need no process group."""

from __future__ import annotations

import pytest

from step_infra.elastic.session import grad_accumulation


def test_grad_accumulation_keeps_the_global_batch() -> None:
    assert grad_accumulation(24, 4, 3) == 2
    assert grad_accumulation(24, 4, 2) == 3
    assert grad_accumulation(24, 4, 1) == 6
    with pytest.raises(
        ValueError, match="global batch 24 is not divisible by micro_batch x world = 4 x 4"
    ):
        grad_accumulation(24, 4, 4)
