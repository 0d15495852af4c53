"""Settings shared by every test module."""

from __future__ import annotations

import os
import signal
from typing import Iterator

import pytest
import torch

# Rich wraps CLI output at the terminal width; a wide virtual terminal keeps long paths
# and messages on one line so tests can look for them.
os.environ["COLUMNS"] = "240"


# A shell that starts the tests in the background (`make test &`, nohup) ignores SIGINT, and an
# ignored signal is inherited by every child: the tests that stop a run with Ctrl-C would then
# watch it finish. A handler (unlike "ignore") is reset to the default in children.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Run torch on one thread: test tensors are tiny and the test machine's cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def no_warm_ask(monkeypatch: pytest.MonkeyPatch) -> None:
    """``slidevl ask`` answers in its own process: a test leaves no background model behind (test_ask_warm tests that one)."""
    monkeypatch.setenv("SLIDEVL_ASK_KEEP_WARM", "0")


@pytest.fixture(autouse=True)
def private_config_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep tests away from the developer's own ~/.config/slidevl (registered encoder paths)."""
    monkeypatch.setenv("SLIDEVL_CONFIG_DIR", str(tmp_path_factory.mktemp("slidevl-config")))
