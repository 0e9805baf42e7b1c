"""``gatekeeper serve`` chooses its event loop: uvloop when installed (``auto``; it is a
dependency wherever it builds), or what ``GATEKEEPER_EVENT_LOOP`` says."""

from __future__ import annotations

import asyncio
import importlib.util
import sys

import pytest

from gatekeeper.cli.main import event_loop_factory

HAS_UVLOOP = importlib.util.find_spec("uvloop") is not None


def test_asyncio_is_the_default_loop_when_asked() -> None:
    assert event_loop_factory("asyncio") is None


def test_an_unknown_choice_is_an_error() -> None:
    with pytest.raises(SystemExit, match="auto, asyncio or uvloop"):
        event_loop_factory("trio")


@pytest.mark.skipif(not HAS_UVLOOP, reason="uvloop is not installed")
@pytest.mark.parametrize("choice", ["auto", "uvloop"])
def test_uvloop_is_chosen_when_installed(choice: str) -> None:
    factory = event_loop_factory(choice)
    assert factory is not None
    loop = factory()
    try:
        assert isinstance(loop, asyncio.AbstractEventLoop)
        assert type(loop).__module__.startswith("uvloop")
    finally:
        loop.close()


def test_without_uvloop_auto_falls_back_and_uvloop_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # ``import uvloop`` raises ImportError
    assert event_loop_factory("auto") is None
    with pytest.raises(SystemExit, match="not installed"):
        event_loop_factory("uvloop")
