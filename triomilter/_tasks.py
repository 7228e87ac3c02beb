"""`ConnectionTasks`: background work tied to one MTA connection (``ctx.connection_nursery``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio
from typing_extensions import TypeVarTuple, Unpack

from ._errors import ConnectionLost

Ts = TypeVarTuple("Ts")


class ConnectionTasks:
    """Background tasks of one MTA connection, started like in a `trio.Nursery`.

    Tasks run until they return or the connection ends; then they are
    cancelled. `start_soon` and `start` keep trio's contracts, with one
    difference: an exception escaping a task once it runs on its own (after
    ``task_status.started()`` for `start`) does not tear the connection down
    with it; it is a *panic* of the milter, caught in the task, so that the
    connection keeps answering (TEMPFAIL) while the server shuts down, as
    for a handler's exception. `ConnectionLost` (the MTA went away) is not a
    panic: the connection is ending anyway.

    The tasks run in a nursery shared by all connections (the server's),
    each in a cancel scope of its own that the connection cancels when it
    ends: an idle connection then costs no nursery of its own.
    """

    __slots__ = ("_nursery", "_on_panic", "_scopes")

    def __init__(self, nursery: trio.Nursery, on_panic: Callable[[BaseException], None]) -> None:
        self._nursery = nursery
        self._on_panic = on_panic
        self._scopes: set[trio.CancelScope] = set()

    def cancel(self) -> None:
        """The connection ends: cancel every task still running."""
        for scope in self._scopes:
            scope.cancel()
        self._scopes.clear()

    def start_soon(
        self,
        async_fn: Callable[[Unpack[Ts]], Awaitable[object]],
        *args: *Ts,
        name: object = None,
    ) -> None:
        """Start ``async_fn(*args)`` in the background."""
        scope = trio.CancelScope()
        self._scopes.add(scope)
        self._nursery.start_soon(self._run, async_fn, args, scope, name=name or async_fn)

    async def start(
        self, async_fn: Callable[..., Awaitable[object]], *args: object, name: object = None
    ) -> Any:
        """Start ``async_fn(*args, task_status=...)``; return what it passes to ``started()``.

        As `trio.Nursery.start`: an exception the task raises before calling
        ``task_status.started()`` comes out of this call as it is (and is the
        caller's to handle, not a panic); if this call is cancelled before
        then, so is the task.
        """
        scope = trio.CancelScope()
        self._scopes.add(scope)
        return await self._nursery.start(
            self._run_started, async_fn, args, scope, name=name or async_fn
        )

    async def _run(
        self,
        async_fn: Callable[..., Awaitable[object]],
        args: tuple[object, ...],
        scope: trio.CancelScope,
    ) -> None:
        try:
            with scope:
                await async_fn(*args)
        except ConnectionLost:
            pass
        except Exception as exc:
            self._on_panic(exc)
        finally:
            self._scopes.discard(scope)

    async def _run_started(
        self,
        async_fn: Callable[..., Awaitable[object]],
        args: tuple[object, ...],
        scope: trio.CancelScope,
        task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        status = _WatchedStatus(task_status)
        try:
            with scope:
                await async_fn(*args, task_status=status)
        except Exception as exc:
            if not status.started_yet:
                raise  # trio's start() hands it to the caller unchanged
            if not isinstance(exc, ConnectionLost):
                self._on_panic(exc)
        finally:
            self._scopes.discard(scope)


class _WatchedStatus:
    """Passes ``started()`` on, remembering that it happened."""

    __slots__ = ("_status", "started_yet")

    def __init__(self, status: trio.TaskStatus[object]) -> None:
        self._status = status
        self.started_yet = False

    def started(self, value: object = None) -> None:
        self._status.started(value)
        self.started_yet = True
