"""Watches inside the service: one task per followed netns, all in this one process.

A watch belongs to the service, not to the client that started it: it runs until stopped,
the VM is unregistered or the service stops (its NICs stay plugged unless it was started
with ``unplug_on_exit``). Its recent events are kept, bounded, for ``watch.list``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
from typing import Any

import attrs

from qmpnet.errors import InvalidInputError
from qmpnet.model import InterworkingModel
from qmpnet.network import NetworkState
from qmpnet.service.registry import VmHandle
from qmpnet.watch import WatchEvent, watch

log = logging.getLogger(__name__)

#: events each watch keeps for ``watch.list``
EVENTS_KEPT = 32


@attrs.define(eq=False)
class Watch:
    id: str
    vm: str
    netns: str
    model: str
    started_by: int
    stop: asyncio.Event = attrs.field(factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    events: collections.deque[dict[str, Any]] = attrs.field(
        factory=lambda: collections.deque(maxlen=EVENTS_KEPT)
    )
    error: str = ""

    def view(self) -> dict[str, Any]:
        running = self.task is not None and not self.task.done()
        return {
            "id": self.id,
            "vm": self.vm,
            "netns": self.netns,
            "model": self.model,
            "running": running,
            "error": self.error,
            "events": list(self.events),
        }


@attrs.define(eq=False)
class Watches:
    _by_id: dict[str, Watch] = attrs.field(factory=dict)
    _ids: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1))

    def all(self) -> list[Watch]:
        return list(self._by_id.values())

    def get(self, ident: str) -> Watch | None:
        return self._by_id.get(ident)

    def start(
        self,
        handle: VmHandle,
        state: NetworkState,
        netns: str,
        *,
        model: InterworkingModel | None,
        debounce: float,
        unplug_on_exit: bool,
        started_by: int = 0,
    ) -> Watch:
        for other in self._by_id.values():
            if (
                other.vm == handle.id
                and other.netns == netns
                and other.task
                and not other.task.done()
            ):
                raise InvalidInputError("netns", netns, f"already watched for this VM ({other.id})")
        item = Watch(
            f"w{next(self._ids)}",
            handle.id,
            netns,
            (model or state.config.internetworking_model).resolved().value,
            started_by,
        )

        def on_event(event: WatchEvent) -> None:
            item.events.append(event.to_json())

        async def run() -> None:
            try:
                await watch(
                    state,
                    netns,
                    model=model,
                    debounce=debounce,
                    stop=item.stop,
                    on_event=on_event,
                    unplug_on_exit=unplug_on_exit,
                )
            except Exception as err:
                item.error = str(err)
                log.warning("watch %s (%s): %s", item.id, netns, err)
                raise

        item.task = asyncio.create_task(run(), name=f"watch {item.id}")
        self._by_id[item.id] = item
        return item

    async def stop(self, ident: str) -> None:
        item = self._by_id.pop(ident, None)
        if item is None or item.task is None:
            return
        item.stop.set()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await item.task

    def stop_vm(self, vm_id: str) -> None:
        for item in self._by_id.values():
            if item.vm == vm_id:
                item.stop.set()

    async def stop_all(self) -> None:
        for ident in list(self._by_id):
            await self.stop(ident)
