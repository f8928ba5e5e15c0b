"""Prometheus metrics: request series by adapter (bounded labels) and engine gauges read at scrape time.

The `adapter` label takes the adapter's name for the first `max_adapter_labels` distinct names
this process sees; every later name is counted as `other` (so a server with thousands of
adapters keeps a bounded number of series). Requests on the base model alone are labelled `base`
and weighted mixes `mix`.
"""
from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

BASE_LABEL, MIX_LABEL, OTHER_LABEL = "base", "mix", "other"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class AdapterLabels:
    """Adapter name -> label value, at most `cap` distinct names."""

    def __init__(self, cap: int):
        self.cap = cap
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, adapter: str, mixed: bool = False) -> str:
        if mixed:
            return MIX_LABEL
        if not adapter:
            return BASE_LABEL
        with self._lock:
            if adapter in self._seen:
                return adapter
            if len(self._seen) < self.cap:
                self._seen.add(adapter)
                return adapter
        return OTHER_LABEL


class EngineCollector:
    """Gauges and counters the engine already keeps, read when Prometheus scrapes."""

    def __init__(self, get_engine):
        self.get_engine = get_engine

    def collect(self):
        engine = self.get_engine()
        if engine is None:
            return
        yield GaugeMetricFamily("loraplex_queue_depth", "Requests waiting to run.", value=engine.queue_depth())
        yield GaugeMetricFamily("loraplex_running_batch_size", "Sequences in the running batch.",
                                value=engine.running_batch_size())
        yield GaugeMetricFamily("loraplex_kv_cache_usage_ratio", "Share of KV-cache blocks in use or reserved.",
                                value=engine.kv_usage())
        stats = engine.cache.stats
        for name, value, doc in (("hits", stats.hits, "Adapter device-slot cache hits."),
                                 ("misses", stats.misses, "Adapter host-cache misses (loads from disk)."),
                                 ("evictions", stats.evictions, "Adapters evicted from device slots."),
                                 ("host_evictions", stats.host_evictions, "Adapters evicted from host memory."),
                                 ("image_rebuilds", stats.image_rebuilds,
                                  "Host misses that rebuilt a damaged or missing prepared image from its folder.")):
            yield CounterMetricFamily(f"loraplex_adapter_cache_{name}", doc, value=value)
        yield SummaryMetricFamily("loraplex_adapter_load_seconds", "Time to read and validate an adapter from disk.",
                                  count_value=stats.loads, sum_value=stats.load_seconds_total)
        resident = GaugeMetricFamily("loraplex_adapters_resident", "Adapters resident per tier.", labels=["tier"])
        for tier, count in engine.cache.resident_counts().items():
            resident.add_metric([tier], count)
        yield resident
        resident_bytes = GaugeMetricFamily("loraplex_adapters_resident_bytes", "Adapter weight bytes per tier.",
                                           labels=["tier"])
        for tier, num_bytes in engine.cache.resident_bytes().items():
            resident_bytes.add_metric([tier], num_bytes)
        yield resident_bytes
        held = GaugeMetricFamily(
            "loraplex_adapters_held_info", "Which adapter versions this replica holds per tier (value 1; the "
            "`adapters` label joins name@version by ','), for routers that prefer the replica holding an adapter.",
            labels=["tier", "adapters"])
        for tier, keys in engine.cache.resident_keys().items():
            held.add_metric([tier, ",".join(keys)], 1)
        yield held
        yield GaugeMetricFamily("loraplex_adapters_registered", "Registered adapters.",
                                value=len(engine.catalog.list()))


class ServiceMetrics:
    """One registry per server (tests run several servers in one process)."""

    def __init__(self, get_engine, max_adapter_labels: int):
        self.registry = CollectorRegistry()
        self.label = AdapterLabels(max_adapter_labels)
        self.requests = Counter("loraplex_requests", "Generation requests by adapter and gRPC status code.",
                                ["adapter", "code"], registry=self.registry)
        self.time_to_first_token = Histogram(
            "loraplex_time_to_first_token_seconds", "From arrival to the first generated token.", ["adapter"],
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.time_per_output_token = Histogram(
            "loraplex_time_per_output_token_seconds", "Mean time between generated tokens of a request.",
            ["adapter"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.generated_tokens = Counter("loraplex_generated_tokens", "Generated tokens.", ["adapter"],
                                        registry=self.registry)
        self.registry.register(EngineCollector(get_engine))
        self._http = None

    def observe(self, label: str, code: str, generated: int, first_token_seconds: float | None,
                per_token_seconds: float | None) -> None:
        self.requests.labels(label, code).inc()
        if generated:
            self.generated_tokens.labels(label).inc(generated)
        if first_token_seconds is not None:
            self.time_to_first_token.labels(label).observe(first_token_seconds)
        if per_token_seconds is not None:
            self.time_per_output_token.labels(label).observe(per_token_seconds)

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics endpoint; returns the bound port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
