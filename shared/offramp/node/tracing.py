"""Traces across hops: one OpenTelemetry trace per sampled frame (docs/architecture.md, Traces).

The admission-controller opens a frame's span when it admits the frame, and carries the span's
context to the workers in each sample header of the activation packets (``trace``, a W3C
``traceparent``), not in MQTT properties, so the bus's fast path is untouched. Every service
then records its own part as spans with the times it measured anyway (a hop's arrived, started
and finished), parented to the frame's span; the admission-controller ends the frame's span
when it publishes the result. A frame that is not sampled carries no context and costs nothing.

Off by default (``OFFRAMP_TRACE_SAMPLE=0``). Each service owns its tracer provider (nothing
process-global); spans leave through a batching processor, over OTLP/HTTP to the collector
the standard ``OTEL_EXPORTER_OTLP_*`` variables name, or as JSON lines to a file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from offramp.errors import SettingsError
from offramp.settings import TraceSettings

if TYPE_CHECKING:
    from opentelemetry.trace import Span

AttributeValue = str | int | float | bool


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


class Tracing:
    """One service's tracer. Every method is a no-op when tracing is off."""

    def __init__(self, settings: TraceSettings, service: str, node: str) -> None:
        self.enabled = settings.sample > 0
        self._file: Any = None
        self._node = node
        if not self.enabled:
            return
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        resource = Resource.create({"service.name": f"offramp-{service}",
                                    "service.instance.id": node})
        self._provider = TracerProvider(resource=resource,
                                        sampler=ParentBased(TraceIdRatioBased(settings.sample)))
        self._provider.add_span_processor(BatchSpanProcessor(
            self._exporter(settings), max_queue_size=settings.queue,
            schedule_delay_millis=1000))
        self._tracer = self._provider.get_tracer("offramp")
        self._propagator = TraceContextTextMapPropagator()

    def _exporter(self, settings: TraceSettings) -> Any:
        if settings.exporter == "file":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            try:
                self._file = open(settings.file.replace("{node}", self._node), "a",  # noqa: SIM115
                                  encoding="utf-8")
            except OSError as exc:
                raise SettingsError(f"OFFRAMP_TRACE_FILE={settings.file!r}: {exc}") from None
            return ConsoleSpanExporter(out=self._file,
                                       formatter=lambda span: span.to_json(indent=None) + "\n")
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()

    # -- a frame's own span -------------------------------------------------------------------
    def start_frame(self, start: float, attributes: Mapping[str, AttributeValue]) -> Span | None:
        """The frame's span if the sampler picks this frame, else None."""
        if not self.enabled:
            return None
        span = self._tracer.start_span("frame", start_time=_ns(start), attributes=attributes)
        if not span.is_recording():
            return None
        return span

    def traceparent(self, span: Span) -> str:
        """What travels in the sample header: the W3C traceparent of ``span``."""
        from opentelemetry.trace import set_span_in_context

        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=set_span_in_context(span))
        return carrier["traceparent"]

    @staticmethod
    def end(span: Span, at: float, attributes: Mapping[str, AttributeValue] | None = None
            ) -> None:
        if attributes:
            span.set_attributes(attributes)
        span.end(end_time=_ns(at))

    # -- spans of a part, recorded once measured ------------------------------------------------
    def record(self, parent: Span | str | None, name: str, start: float, end: float,
               attributes: Mapping[str, AttributeValue] | None = None) -> Span | None:
        """A finished span under ``parent`` (a span of this service, or a traceparent from a
        sample header); None when tracing is off or there is no parent."""
        if not self.enabled or parent is None:
            return None
        from opentelemetry.trace import set_span_in_context

        if isinstance(parent, str):
            context = self._propagator.extract({"traceparent": parent})
        else:
            context = set_span_in_context(parent)
        span = self._tracer.start_span(name, context=context, start_time=_ns(start),
                                       attributes=attributes)
        span.end(end_time=_ns(end))
        return span

    def close(self) -> None:
        """Export what is held and stop (at service exit)."""
        if self.enabled:
            self._provider.shutdown()
        if self._file is not None:
            self._file.close()
