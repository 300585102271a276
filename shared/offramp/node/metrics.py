"""Prometheus metrics without a dependency: counters, gauges and histograms with labels,
rendered in the text exposition format (version 0.0.4). One :class:`Metrics` per service,
owned by its :class:`~offramp.node.runtime.Runtime`; names are documented in the README."""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Sequence

Labels = tuple[tuple[str, str], ...]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _labels(labels: dict[str, str | int | float] | None) -> Labels:
    return tuple(sorted((k, str(v)) for k, v in (labels or {}).items()))


def _fmt_labels(labels: Labels, extra: tuple[str, str] | None = None) -> str:
    items = list(labels) + ([extra] if extra else [])
    if not items:
        return ""
    body = ",".join(f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                    for k, v in items)
    return "{" + body + "}"


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class _Metric:
    kind = ""

    def __init__(self, name: str, doc: str) -> None:
        self.name = name
        self.doc = doc

    def samples(self) -> Iterable[str]:
        raise NotImplementedError

    def render(self) -> str:
        lines = [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} {self.kind}"]
        lines.extend(self.samples())
        return "\n".join(lines)


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, doc: str) -> None:
        super().__init__(name, doc)
        self._values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: str | int | float) -> None:
        key = _labels(labels)
        self._values[key] = self._values.get(key, 0.0) + amount

    def set_total(self, value: float, **labels: str | int | float) -> None:
        """Mirror a total kept elsewhere (counters only ever grow, so does this)."""
        key = _labels(labels)
        self._values[key] = max(self._values.get(key, 0.0), value)

    def samples(self) -> Iterable[str]:
        for key, v in sorted(self._values.items()):
            yield f"{self.name}{_fmt_labels(key)} {_num(v)}"


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name: str, doc: str) -> None:
        super().__init__(name, doc)
        self._values: dict[Labels, float] = {}

    def set(self, value: float, **labels: str | int | float) -> None:
        self._values[_labels(labels)] = value

    def clear(self) -> None:
        self._values.clear()

    def samples(self) -> Iterable[str]:
        for key, v in sorted(self._values.items()):
            yield f"{self.name}{_fmt_labels(key)} {_num(v)}"


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, doc: str, buckets: Sequence[float]) -> None:
        super().__init__(name, doc)
        self.buckets = tuple(sorted(buckets))
        self._data: dict[Labels, tuple[list[int], list[float]]] = {}  # counts, [sum]

    def observe(self, value: float, **labels: str | int | float) -> None:
        counts, total = self._data.setdefault(_labels(labels), ([0] * (len(self.buckets) + 1),
                                                                [0.0]))
        counts[bisect.bisect_left(self.buckets, value)] += 1
        total[0] += value

    def samples(self) -> Iterable[str]:
        for key, (counts, total) in sorted(self._data.items()):
            acc = 0
            for bound, n in zip((*self.buckets, math.inf), counts, strict=True):
                acc += n
                le = "+Inf" if math.isinf(bound) else repr(float(bound))
                yield f"{self.name}_bucket{_fmt_labels(key, ('le', le))} {acc}"
            yield f"{self.name}_sum{_fmt_labels(key)} {_num(total[0])}"
            yield f"{self.name}_count{_fmt_labels(key)} {acc}"


class Metrics:
    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._collectors: list[Callable[[], None]] = []

    def _add(self, metric: _Metric) -> _Metric:
        if metric.name in self._metrics:
            return self._metrics[metric.name]
        self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, doc: str) -> Counter:
        m = self._add(Counter(name, doc))
        assert isinstance(m, Counter)
        return m

    def gauge(self, name: str, doc: str) -> Gauge:
        m = self._add(Gauge(name, doc))
        assert isinstance(m, Gauge)
        return m

    def histogram(self, name: str, doc: str, buckets: Sequence[float]) -> Histogram:
        m = self._add(Histogram(name, doc, buckets))
        assert isinstance(m, Histogram)
        return m

    def on_collect(self, collect: Callable[[], None]) -> None:
        """``collect`` runs before each scrape, to copy state kept elsewhere into metrics."""
        self._collectors.append(collect)

    def render(self) -> str:
        for collect in self._collectors:
            collect()
        return "\n".join(m.render() for m in self._metrics.values()) + "\n"
