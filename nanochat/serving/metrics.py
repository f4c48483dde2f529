"""
Prometheus metrics for GET /metrics (text exposition format, via prometheus_client).

Each app gets its own registry, so several servers (tests) in one process do not collide. Queue and
batch sizes are read from the schedulers when scraped rather than tracked by hand.
"""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
RATE_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, schedulers):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("nanochat_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("nanochat_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.completion_tokens = Counter("nanochat_completion_tokens", "Tokens generated for clients", registry=r)
        self.time_to_first_token = Histogram("nanochat_time_to_first_token_seconds",
                                             "From request arrival to the first generated token",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.request_duration = Histogram("nanochat_request_duration_seconds", "Generation requests, arrival to end",
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.tokens_per_second = Histogram("nanochat_request_tokens_per_second",
                                           "Per request: completion tokens / seconds after the first token",
                                           buckets=RATE_BUCKETS, registry=r)
        Gauge("nanochat_queued_requests", "Requests waiting for a batch slot", registry=r).set_function(
            lambda: sum(s.queued() for s in schedulers))
        Gauge("nanochat_running_sequences", "Sequences in the running batches", registry=r).set_function(
            lambda: sum(s.rows_in_use() for s in schedulers))
        Gauge("nanochat_generated_tokens", "Tokens generated since start (all replicas)", registry=r).set_function(
            lambda: sum(s.counters["generated_tokens"] for s in schedulers))
        Gauge("nanochat_speculative_drafted_tokens", "Draft tokens proposed", registry=r).set_function(
            lambda: sum(s.speculative_counts()[0] for s in schedulers))
        Gauge("nanochat_speculative_accepted_tokens", "Draft tokens accepted", registry=r).set_function(
            lambda: sum(s.speculative_counts()[1] for s in schedulers))
        Gauge("nanochat_speculative_acceptance_rate", "Accepted / drafted tokens (0 before any draft)",
              registry=r).set_function(lambda: _acceptance_rate(schedulers))
        Gauge("nanochat_prefix_cache_hit_rate", "Prefills that reused a cached prefix / all prefills (0 before any)",
              registry=r).set_function(lambda: _ratio(schedulers, "prefix_hits", "prefix_lookups"))
        Gauge("nanochat_prefix_cache_reused_tokens", "Prompt tokens copied from the prefix cache instead of computed",
              registry=r).set_function(lambda: sum(s.counters.get("prefix_tokens_reused", 0) for s in schedulers))

    def render(self):
        return generate_latest(self.registry)


def _acceptance_rate(schedulers):
    drafted = sum(s.speculative_counts()[0] for s in schedulers)
    accepted = sum(s.speculative_counts()[1] for s in schedulers)
    return accepted / drafted if drafted else 0.0


def _ratio(schedulers, part, whole):
    total = sum(s.counters.get(whole, 0) for s in schedulers)
    return sum(s.counters.get(part, 0) for s in schedulers) / total if total else 0.0
