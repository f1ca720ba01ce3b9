"""Prometheus metrics for the relay and the inbox (needs the ``metrics`` extra).

Relay: ``qx_outbox_published_total``, ``qx_outbox_failed_total``, ``qx_outbox_dead_total``
(counters), ``qx_outbox_lag_seconds`` (gauge: age of the oldest event in the last batch) and
``qx_outbox_batch_seconds`` (histogram of batch latency).

Inbox: ``qx_inbox_messages_total{consumer, outcome}``, read from :attr:`Inbox.counts` when
scraped (``applied``, ``duplicate``, ``out_of_order``, ``gap``, ``dead``, ``parked``,
``requeued``): nothing on the message path.

Example:
    >>> metrics = PrometheusMetrics(registry=CollectorRegistry())   # doctest: +SKIP
    >>> relay = OutboxRelay(engine, publisher, metrics=metrics)     # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from qx.core._errors import ConfigurationError
from qx.outbox._inbox import Inbox
from qx.outbox._relay import BatchResult

__all__ = ["InboxMetrics", "PrometheusMetrics"]


class PrometheusMetrics:
    """Relay metrics in a Prometheus registry.

    Args:
        registry: where to register (default: prometheus-client's global registry).
        prefix: metric name prefix.
    """

    def __init__(self, *, registry: Any = None, prefix: str = "qx_outbox") -> None:
        try:
            import prometheus_client as prom
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigurationError(
                "relay metrics need the metrics extra: pip install 'qx[metrics]'"
            ) from exc
        kwargs: dict[str, Any] = {} if registry is None else {"registry": registry}
        self.published = prom.Counter(f"{prefix}_published", "Events published.", **kwargs)
        self.failed = prom.Counter(f"{prefix}_failed", "Publish attempts that failed.", **kwargs)
        self.dead = prom.Counter(f"{prefix}_dead", "Events dead-lettered.", **kwargs)
        self.lag = prom.Gauge(
            f"{prefix}_lag_seconds", "Age of the oldest event of the last batch.", **kwargs
        )
        self.batch_seconds = prom.Histogram(
            f"{prefix}_batch_seconds", "Time to claim, publish and mark one batch.", **kwargs
        )

    def batch(self, result: BatchResult, seconds: float) -> None:
        """Record one batch."""
        self.published.inc(result.published)
        self.failed.inc(result.failed)
        self.dead.inc(result.dead)
        self.lag.set(result.lag_seconds)
        self.batch_seconds.observe(seconds)

    @staticmethod
    def serve(port: int, *, addr: str = "0.0.0.0") -> None:
        """Expose ``/metrics`` over HTTP on ``port`` (a daemon thread)."""
        import prometheus_client as prom

        prom.start_http_server(port, addr=addr)


class InboxMetrics:
    """An inbox's outcomes in a Prometheus registry, read from its counts when scraped.

    Args:
        inbox: the inbox observed.
        registry: where to register (default: prometheus-client's global registry).
        prefix: metric name prefix.

    Example:
        >>> InboxMetrics(inbox, registry=CollectorRegistry())   # doctest: +SKIP
    """

    def __init__(
        self, inbox: Inbox[Any], *, registry: Any = None, prefix: str = "qx_inbox"
    ) -> None:
        try:
            import prometheus_client as prom
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigurationError(
                "inbox metrics need the metrics extra: pip install 'qx[metrics]'"
            ) from exc
        self.inbox = inbox
        self.prefix = prefix
        (registry if registry is not None else prom.REGISTRY).register(self)

    def collect(self) -> Any:
        """What a scrape reads (prometheus-client's collector protocol)."""
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(
            f"{self.prefix}_messages",
            "Messages the inbox handled, by outcome.",
            labels=["consumer", "outcome"],
        )
        for outcome, count in sorted(self.inbox.counts.items()):
            family.add_metric([self.inbox.consumer, outcome], count)
        yield family

    serve = staticmethod(PrometheusMetrics.serve)
