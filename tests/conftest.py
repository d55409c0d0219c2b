from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

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


Run = Callable[[Coroutine[Any, Any, Any]], Any]  # the `run` fixture's type


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    """In-process tests: asyncio.run on the standard loop or on uvloop (60 s at most)."""
    factory = None
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        factory = uvloop.new_event_loop

    def runner(coro: Coroutine[Any, Any, Any]) -> Any:
        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(asyncio.wait_for(coro, 60))

    return runner
