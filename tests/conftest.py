from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Procs, processes


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    with processes(tmp_path) as p:
        yield p


@pytest.fixture(params=["asyncio", "uvloop"])
def either_loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the tool on the standard loop and on uvloop (the default when installed)."""
    if request.param == "uvloop":
        pytest.importorskip(
            "uvloop",
            reason="uvloop is not installed (a default dependency on Linux and macOS CPython)",
        )
    monkeypatch.setenv("TETE_TUNNEL_LOOP", request.param)
    return request.param
