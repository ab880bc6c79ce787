"""CURVE: an encrypted link delivers; a consumer without the producer's key gets nothing."""

from __future__ import annotations

import pytest
import torch

from step_infra.rpc.consumer import Consumer, ConsumerConfig
from step_infra.rpc.producer import Producer, ProducerConfig
from step_infra.rpc.security import generate_keys

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_curve_link_delivers(transport: str) -> None:
    keys = generate_keys()
    with Producer("p", config=ProducerConfig(curve=keys)) as prod:
        cfg = ConsumerConfig(transport=transport, curve_server_key=keys.public)
        c = Consumer("p", [prod.address], group="g", config=cfg)
        prod.wait_for_consumers(timeout_s=5)
        prod.send({"x": torch.arange(4)})
        item = c.get(timeout_s=5)
        assert item is not None and torch.equal(item.tensors["x"], torch.arange(4))
        c.close()


def test_consumer_without_key_is_not_served() -> None:
    keys = generate_keys()
    with Producer("p", config=ProducerConfig(curve=keys)) as prod:
        wrong = Consumer(
            "p",
            [prod.address],
            group="w",
            config=ConsumerConfig(transport="tcp", curve_server_key=generate_keys().public),
        )
        plain = Consumer("p", [prod.address], group="n", config=ConsumerConfig(transport="tcp"))
        with pytest.raises(TimeoutError):
            prod.wait_for_consumers(timeout_s=1.0)
        assert prod.groups() == {}
        wrong.close()
        plain.close()
