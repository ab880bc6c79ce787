"""Environment probes: never raise, and report a missing module as a finding."""

from __future__ import annotations

from step_infra.doctor import _module_version, probe_environment


def test_missing_module_is_reported_not_raised() -> None:
    ok, detail = _module_version("step_infra_no_such_module")
    assert not ok
    assert "ModuleNotFoundError" in detail


def test_required_components_present_in_this_environment() -> None:
    probes = {p.name: p for p in probe_environment()}
    missing = [name for name, p in probes.items() if p.required and not p.ok]
    assert missing == [], f"required components missing: {missing}"
    assert probes["cuda"].required is False
