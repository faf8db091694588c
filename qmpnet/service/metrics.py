"""Prometheus metrics of qmpnetd, on an optional listen address (``--metrics-listen``).

Step latencies come from the lifecycle observers every VM's operations already tell (the
same (operation, step, phase) sequence the journal and the crash drills see), so no code
path is instrumented by hand; the gauges are read from the service when scraped. Imported
only when the option is given: ``prometheus-client`` is the ``metrics`` extra, and the thin
client never sees it.
"""

from __future__ import annotations

import sys
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from qmpnet.errors import PlugError
from qmpnet.lifecycle import Operation, Phase, Step

if TYPE_CHECKING:
    from qmpnet.service.methods import Service

#: step latencies span a netlink call (~0.1 ms) to a guest's unplug (seconds)
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The service's metrics: an observer for every operation, a collector for the gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.steps = Histogram(
            "qmpnet_step_seconds",
            "Duration of each plug or unplug step, by operation kind and step",
            ["kind", "step"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter(
            "qmpnet_step_errors",
            "Steps that failed, by operation kind, step and error class",
            ["kind", "step", "error"],
            registry=self.registry,
        )
        self.undos = Counter(
            "qmpnet_step_undos",
            "Steps undone after a later step failed, by kind, step and outcome",
            ["kind", "step", "outcome"],
            registry=self.registry,
        )
        # by operation, weakly: a step cancelled mid-way reports no end, and its entry must
        # go with its operation rather than stay (and meet a later one that reuses an id)
        self._began: weakref.WeakKeyDictionary[Operation, dict[Step, float]] = (
            weakref.WeakKeyDictionary()
        )

    def observe(self, op: Operation, step: Step, phase: Phase) -> None:
        """A lifecycle observer (see :data:`qmpnet.lifecycle.Observer`)."""
        if phase is Phase.BEGIN:
            self._began.setdefault(op, {})[step] = time.monotonic()
            return
        if phase in (Phase.UNDO, Phase.UNDO_FAILED):
            outcome = "ok" if phase is Phase.UNDO else "failed"
            self.undos.labels(op.kind.value, step.value, outcome).inc()
            return
        steps = self._began.get(op, {})
        began = steps.pop(step, None)
        if not steps:
            self._began.pop(op, None)
        if began is not None:
            self.steps.labels(op.kind.value, step.value).observe(time.monotonic() - began)
        if phase is Phase.FAILED:
            # told from inside the step's except clause: the error is the one in flight
            err = sys.exc_info()[1]
            cause = err.__cause__ if isinstance(err, PlugError) and err.__cause__ else err
            error = type(cause).__name__ if cause is not None else "unknown"
            self.errors.labels(op.kind.value, step.value, error).inc()

    def watch(self, service: Service) -> None:
        """Report the service's gauges at each scrape."""
        self.registry.register(_Gauges(service))

    def serve(self, host: str, port: int) -> None:
        """Serve ``/metrics`` from a thread of its own (prometheus-client's HTTP server)."""
        start_http_server(port, host, registry=self.registry)


class _Gauges(Collector):
    def __init__(self, service: Service) -> None:
        self._service = service

    def collect(self) -> Iterator[Any]:
        service = self._service
        handles = service.registry.handles()
        yield _gauge("qmpnet_vms", "VMs the service knows", len(handles))
        yield _gauge(
            "qmpnet_sessions_open",
            "VMs whose QMP session is open",
            sum(1 for h in handles if h.connected),
        )
        # an unreadable state is one of status's entries (with "error"), not a pending NIC
        pending = sum(1 for p in service.pending_unplugs() if "mac" in p)
        yield _gauge("qmpnet_pending_unplugs", "NICs left unplug-pending", pending)
        yield _gauge("qmpnet_watches", "Watches the service runs", len(service.watches.all()))
        yield _gauge("qmpnet_requests_in_flight", "Requests being served", len(service.inflight))


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)
