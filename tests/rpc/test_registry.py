"""Registry: token required, pipes and endpoints, leases, re-registration after a restart."""

from __future__ import annotations

import time

import grpc
import pytest
import torch

from step_infra.rpc.consumer import Consumer
from step_infra.rpc.producer import Producer
from step_infra.rpc.registry import Registry, RegistryClient, RegistryConfig

pytestmark = pytest.mark.timeout(60)


def test_token_required() -> None:
    with Registry(RegistryConfig(token="s3cret")) as reg:
        for token in ("", "wrong"):
            client = RegistryClient(reg.address, token)
            with pytest.raises(grpc.RpcError) as err:
                client.create_pipe("latents")
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            client.close()
        ok = RegistryClient(reg.address, "s3cret")
        assert ok.create_pipe("latents") == "spray"
        ok.close()


def test_empty_token_config_rejected() -> None:
    with pytest.raises(ValueError, match="token"):
        RegistryConfig(token="")


def test_discovery_and_lease_expiry() -> None:
    with Registry(RegistryConfig(token="t", lease_s=0.3)) as reg:
        c = RegistryClient(reg.address, "t")
        c.create_pipe("p", "broadcast")
        c.register(pipe="p", role="producer", name="A", address="tcp://127.0.0.1:1")
        c.register(pipe="p", role="consumer", name="0", group="g")
        info = c.lookup("p")
        assert info.pipe.mode == "broadcast"
        assert c.producer_addresses("p") == ["tcp://127.0.0.1:1"]
        assert [e.group for e in info.consumers] == ["g"]
        time.sleep(0.5)
        assert c.lookup("p").producers == []  # lease expired
        assert c.heartbeat() == 2  # unknown -> registered again
        assert len(c.lookup("p").producers) == 1
        c.close()


def test_registry_restart_data_keeps_flowing() -> None:
    reg = Registry(RegistryConfig(token="t"))
    port = int(reg.address.rsplit(":", 1)[1])
    with Producer("p", name="A") as prod:
        pc = RegistryClient(reg.address, "t")
        pc.register(pipe="p", role="producer", name="A", address=prod.address)
        cc = RegistryClient(reg.address, "t")
        cons = Consumer("p", cc.producer_addresses("p"), group="g")
        prod.wait_for_consumers()
        prod.send({"x": torch.zeros(2)})
        assert cons.get(timeout_s=5) is not None
        reg.stop()
        prod.send({"x": torch.ones(2)})  # registry down: data plane unaffected
        item = cons.get(timeout_s=5)
        assert item is not None and item.seq == 1
        reg = Registry(RegistryConfig(token="t", port=port))
        assert pc.heartbeat() == 1  # the restarted registry forgot us: re-register
        assert cc.producer_addresses("p") == [prod.address]
        prod.send({"x": torch.ones(2)})
        item = cons.get(timeout_s=5)
        assert item is not None and item.seq == 2
        cons.close()
        pc.close()
        cc.close()
    reg.stop()
