"""Running a request's coroutine."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


def drive(coro: Coroutine[Any, Any, None], loop: asyncio.AbstractEventLoop) -> Any:
    return loop.create_task(coro)
