"""Prometheus metrics of the service: one registry per app instance, names agreed with the dashboards."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from treepo.client.schema import Tree

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
FINISH_REASONS = ("answer", "eos", "max_tokens", "max_depth", "repetition")
REJECT_REASONS = (
    "queue_full",
    "engine_unavailable",
    "redis_unavailable",
    "too_large",
    "unauthorized",
    "invalid",
)
ENGINE_ERROR_REASONS = ("unavailable", "invalid", "error", "weights")
DELIVERIES = ("inline", "queue", "stream")


class ServiceMetrics:
    """All service metrics on a private `CollectorRegistry` (tests get a fresh one per app)."""

    def __init__(self, routes: tuple[tuple[str, str], ...] = ()) -> None:
        self.registry = CollectorRegistry()
        self._http_metrics(self.registry)
        self._sampling_metrics(self.registry)
        self._queue_and_engine_metrics(self.registry)
        self._precreate(routes)

    def _http_metrics(self, r: CollectorRegistry) -> None:
        self.http_requests = Counter(
            "treepo_http_requests",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "treepo_http_request_duration_seconds",
            "HTTP request latency (whole body for streams).",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rollout_prompts = Counter(
            "treepo_rollout_prompts", "Prompts accepted by POST /rollout_tree.", ["delivery"], registry=r
        )
        self.rejected = Counter(
            "treepo_rejected_requests", "Refused requests by reason.", ["reason"], registry=r
        )

    def _sampling_metrics(self, r: CollectorRegistry) -> None:
        self.trees = Counter("treepo_trees", "Trees completed.", registry=r)
        self.trajectories = Counter("treepo_trajectories", "Trajectories (leaves) completed.", registry=r)
        self.decoded_tokens = Counter("treepo_decoded_tokens", "Tokens the tree sampler decoded.", registry=r)
        self.independent_tokens = Counter(
            "treepo_independent_tokens",
            "Tokens independent sampling would decode for the same leaves.",
            registry=r,
        )
        self.prefill_tokens = Counter(
            "treepo_prefill_tokens", "Input tokens computed by the engine.", registry=r
        )
        self.cached_tokens = Counter(
            "treepo_cached_tokens", "Input tokens served from the prefix cache.", registry=r
        )
        self.engine_calls = Counter(
            "treepo_engine_calls", "Engine requests sent (one generate call each).", registry=r
        )
        self.engine_in_flight = Gauge(
            "treepo_engine_requests_in_flight",
            "Engine requests in flight (the engine batches them itself).",
            registry=r,
        )
        self.finish_reasons = Counter(
            "treepo_finish_reasons", "Leaves by finish reason.", ["reason"], registry=r
        )
        self.fallbacks = Counter("treepo_fallbacks", "Fallback re-openings of finished paths.", registry=r)
        self.sampling_duration = Histogram(
            "treepo_tree_sampling_duration_seconds",
            "Wall time of one tree.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inflight_trees = Gauge("treepo_inflight_trees", "Trees being sampled now.", registry=r)

    def _queue_and_engine_metrics(self, r: CollectorRegistry) -> None:
        self.queue_depth = Gauge(
            "treepo_queue_depth_trees", "Trees in the stream not yet consumed.", registry=r
        )
        self.queue_oldest_age = Gauge(
            "treepo_queue_oldest_age_seconds", "Age of the oldest unconsumed tree in the stream.", registry=r
        )
        self.redis_stream_length = Gauge(
            "treepo_redis_stream_length_entries", "Entries in a Redis stream.", ["stream"], registry=r
        )
        self.redis_memory = Gauge(
            "treepo_redis_memory_bytes", "Memory Redis uses (INFO used_memory).", registry=r
        )
        self.engine_worker_weight_version = Gauge(
            "treepo_engine_worker_weight_version",
            "Weights version each SGLang worker last reported (0: its launch weights, e.g. after a restart).",
            ["worker"],
            registry=r,
        )
        self.redis_trimmed = Counter(
            "treepo_redis_trimmed_entries",
            "Stream entries trimmed: trees every training group acknowledged, expired failure records.",
            ["stream"],
            registry=r,
        )
        self.jobs_resumed = Counter(
            "treepo_queue_jobs_resumed",
            "Queue jobs taken over after their owner stopped renewing the lease (crash, stop, Redis outage).",
            registry=r,
        )
        self.trees_resumed = Counter(
            "treepo_queue_trees_resumed", "Unpublished trees of resumed jobs, sampled again.", registry=r
        )
        self.policy_version = Gauge("treepo_policy_version", "Weights version being sampled.", registry=r)
        self.weight_update_duration = Histogram(
            "treepo_weight_update_duration_seconds",
            "Weight update latency.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.weight_update_failures = Counter(
            "treepo_weight_update_failures", "Failed weight updates.", registry=r
        )
        self.engine_errors = Counter(
            "treepo_engine_errors", "Engine failures by reason.", ["reason"], registry=r
        )

    def _precreate(self, routes: tuple[tuple[str, str], ...]) -> None:
        """Create every fixed label value at 0 so dashboards show zeros, not gaps."""
        for reason in FINISH_REASONS:
            self.finish_reasons.labels(reason=reason)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason=reason)
        for reason in ENGINE_ERROR_REASONS:
            self.engine_errors.labels(reason=reason)
        for delivery in DELIVERIES:
            self.rollout_prompts.labels(delivery=delivery)
        for stream in ("trees", "failures"):
            self.redis_stream_length.labels(stream=stream)
            self.redis_trimmed.labels(stream=stream)
        for route, method in routes:
            self.http_duration.labels(route=route)
            self.http_requests.labels(route=route, method=method, status="200")

    def observe_tree(self, tree: Tree) -> None:
        """Count a completed tree's sampling cost."""
        stats = tree.stats
        self.trees.inc()
        self.trajectories.inc(len(tree.leaves))
        self.decoded_tokens.inc(stats.decoded_tokens)
        self.independent_tokens.inc(stats.independent_tokens)
        self.fallbacks.inc(stats.num_fallbacks)
        self.sampling_duration.observe(stats.wall_s)
        for reason, count in stats.finish_reasons.items():
            self.finish_reasons.labels(reason=reason).inc(count)

    def observe_engine_call(self, prefill_tokens: int, cached_tokens: int) -> None:
        """Count one finished engine request, with its prefix-cache accounting."""
        self.engine_calls.inc()
        self.prefill_tokens.inc(prefill_tokens)
        self.cached_tokens.inc(cached_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
