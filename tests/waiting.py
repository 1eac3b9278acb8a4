"""One way for tests to wait for a state that raises no event (another process, the kernel)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str = "condition", within: float = 10.0
) -> float:
    """Poll `check` until it is true, failing after `within` seconds; returns the seconds it took.

    Only for states nothing notifies us of; where an event exists (a watch, a long poll, a
    process exit), await that instead.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not await check():
        assert loop.time() - started < within, f"{what}: not within {within} s"
        await asyncio.sleep(0.05)
    return loop.time() - started
