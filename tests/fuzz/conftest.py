"""The fuzz stage runs only when asked for (`pytest -m fuzz`, as scripts/test does in its own step)."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "fuzz" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="the fuzz stage runs on its own: pytest -m fuzz tests/fuzz (scripts/test does)")
    for item in items:
        if item.get_closest_marker("fuzz") is not None:
            item.add_marker(skip)
