"""GET /metrics in Prometheus' text format, read from engine.stats() at scrape time. Every engine series
carries the step implementation as a label, so a dashboard shows which kernels produced a rate."""

from __future__ import annotations

# stats key -> (metric name, type, help)
ENGINE_SERIES = [
    ("requests_total", "apr_requests_total", "counter", "requests the engine accepted"),
    ("prompt_tokens_total", "apr_prompt_tokens_total", "counter", "prompt tokens of finished requests"),
    ("generated_tokens_total", "apr_generated_tokens_total", "counter", "tokens generated"),
    ("cached_tokens_total", "apr_cached_tokens_total", "counter", "prompt tokens served from the prefix cache"),
    ("steps_total", "apr_steps_total", "counter", "batched forward steps"),
    ("queue_depth", "apr_queue_depth", "gauge", "requests waiting for a slot"),
    ("active", "apr_active_sequences", "gauge", "sequences decoding now"),
    ("last_batch_size", "apr_batch_size", "gauge", "sequences in the last step"),
    ("decode_tok_s", "apr_decode_tokens_per_second", "gauge", "aggregate decode rate over the recent steps"),
    ("parallel", "apr_parallel", "gauge", "KV slots (most sequences decoded together)"),
]


def _label(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(stats: dict | None, http_counts: dict[int, int], model: str, loading: bool) -> str:
    lines = ["# HELP apr_up 1 once the model is loaded and the engine runs", "# TYPE apr_up gauge",
             f'apr_up{{model="{_label(model)}"}} {0 if loading else 1}',
             "# HELP apr_http_responses_total HTTP responses by status code", "# TYPE apr_http_responses_total counter"]
    lines += [f'apr_http_responses_total{{code="{code}"}} {n}' for code, n in sorted(http_counts.items())]
    if stats is not None:
        labels = f'step_impl="{_label(stats.get("step_impl", ""))}"'
        for key, name, kind, help_text in ENGINE_SERIES:
            if key in stats and stats[key] is not None:
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{{{labels}}} {float(stats[key]):g}"]
        hist = stats.get("batch_sizes")  # {batch size: decode steps}
        if isinstance(hist, dict):
            lines += ["# HELP apr_steps_by_batch_size steps by the number of sequences they carried",
                      "# TYPE apr_steps_by_batch_size counter"]
            lines += [f'apr_steps_by_batch_size{{{labels},batch_size="{b}"}} {n}' for b, n in sorted(hist.items())]
    return "\n".join(lines) + "\n"
