"""Tests that need a tool or root skip with a reason on a developer's machine; in CI (CI set,
as `.ci/run` is, root with every package of `make test-deps`) a missing one is a failure: those
tests must run there."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}, and CI is set: this test must run in CI (make test-deps)")
    pytest.skip(reason)
