"""A service's Prometheus metrics, on prometheus-client: one registry per service, owned by its
:class:`~offramp.node.runtime.Runtime` (no process-global registry), and two ways to feed it.

- Instruments (:meth:`Metrics.counter`, :meth:`~Metrics.gauge`, :meth:`~Metrics.histogram`)
  are prometheus-client's own, declared with their label names, for what the service counts as
  it happens (frames, results, latencies).
- Readings (:meth:`Metrics.on_collect`) copy state the service keeps anyway (queue lengths,
  totals its heartbeat also reports) into gauges and counters at each scrape, so nothing is
  counted twice and nothing is computed between scrapes.

Metric names are listed in the README.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Reading:
    """What one scrape reads from a service: gauges and counters with their labels."""

    def __init__(self) -> None:
        self._families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        self._labels: dict[str, tuple[str, ...]] = {}

    def gauge(self, name: str, doc: str, value: float, **labels: object) -> None:
        self._add(GaugeMetricFamily, name, doc, value, labels)

    def counter(self, name: str, doc: str, value: float, **labels: object) -> None:
        """A total the service keeps itself (it only ever grows there)."""
        self._add(CounterMetricFamily, name, doc, value, labels)

    def _add(self, kind: type[GaugeMetricFamily] | type[CounterMetricFamily], name: str,
             doc: str, value: float, labels: dict[str, object]) -> None:
        names = tuple(labels)
        family = self._families.get(name)
        if family is None:
            family = self._families[name] = kind(name, doc, labels=names)
            self._labels[name] = names
        elif self._labels[name] != names or not isinstance(family, kind):
            raise ValueError(f"metric {name}: read as {kind.__name__} with labels {names}, "
                             f"earlier as {type(family).__name__} with {self._labels[name]}")
        family.add_metric([str(v) for v in labels.values()], float(value))

    def families(self) -> Iterable[Metric]:
        return self._families.values()


class _Readings(Collector):
    def __init__(self, readers: list[Callable[[Reading], None]]) -> None:
        self._readers = readers

    def collect(self) -> Iterable[Metric]:
        reading = Reading()
        for read in self._readers:
            read(reading)
        return reading.families()


class Metrics:
    """One service's metrics registry; :meth:`render` is what ``/metrics`` answers."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._readers: list[Callable[[Reading], None]] = []
        self.registry.register(_Readings(self._readers))

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        return Counter(name, doc, labelnames=tuple(labels), registry=self.registry)

    def gauge(self, name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
        return Gauge(name, doc, labelnames=tuple(labels), registry=self.registry)

    def histogram(self, name: str, doc: str, buckets: Sequence[float],
                  labels: Sequence[str] = ()) -> Histogram:
        return Histogram(name, doc, labelnames=tuple(labels), buckets=tuple(buckets),
                         registry=self.registry)

    def on_collect(self, read: Callable[[Reading], None]) -> None:
        """``read(reading)`` runs at each scrape and adds the values it reads."""
        self._readers.append(read)

    def render(self) -> bytes:
        return generate_latest(self.registry)
