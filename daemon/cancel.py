"""Steps that must not stop halfway when their task is cancelled (Ctrl-C, SIGTERM)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

_T = TypeVar("_T")


async def through_cancel(aw: Awaitable[_T]) -> tuple[_T, bool]:
    """Await ``aw`` to its end even when cancelled meanwhile: (its result, whether cancelled).

    For steps that must not stop halfway (moving files, moving them back, starting tinyserved,
    opening a multipart upload); the caller raises the cancellation once the step is over.
    ``asyncio.shield`` alone would let the caller go on while the step is still under way.
    """
    fut = asyncio.ensure_future(aw)
    cancelled = False
    while True:
        try:
            return await asyncio.shield(fut), cancelled
        except asyncio.CancelledError:
            if fut.cancelled():
                raise  # the step itself was cancelled, not just us
            cancelled = True  # (a step already over returns its outcome on the next pass)
