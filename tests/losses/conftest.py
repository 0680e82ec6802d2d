"""The loss tests (``structkd.losses``) run on tiny tensors: one thread each module."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield
