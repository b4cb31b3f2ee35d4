"""``/metrics`` in the Prometheus text exposition format."""

from __future__ import annotations

import os


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(service, api_errors: dict) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
            lines.append(f"{name}{{{lab}}} {value}" if lab else f"{name} {value}")

    stats = service.stats
    metric(
        "nekko_pulls_total",
        "counter",
        "Pulls finished, by source and result.",
        [({"source": s, "result": r}, n) for (s, r), n in sorted(stats["pulls"].items())],
    )
    metric(
        "nekko_downloaded_bytes_total",
        "counter",
        "Bytes received from upstreams.",
        [({}, stats["bytes_downloaded"])],
    )
    metric(
        "nekko_deduplicated_bytes_total",
        "counter",
        "Bytes not downloaded because the cache already had the blob.",
        [({}, stats.get("bytes_deduplicated", 0))],
    )
    metric("nekko_inflight_pulls", "gauge", "Pulls in progress.", [({}, len(service._flights))])
    metric(
        "nekko_api_errors_total",
        "counter",
        "API error answers, by error code.",
        [({"code": c}, n) for c, n in sorted(api_errors.items())],
    )
    size = count = 0
    try:
        with os.scandir(service.store.blobs_dir) as it:
            for e in it:
                try:
                    size += e.stat(follow_symlinks=False).st_size
                    count += 1
                except OSError:
                    pass
    except OSError:
        pass
    metric("nekko_cache_bytes", "gauge", "Bytes in blobs/.", [({}, size)])
    metric("nekko_cache_blobs", "gauge", "Blobs in blobs/.", [({}, count)])
    metric(
        "nekko_cache_entries",
        "gauge",
        "Entries in the cache.",
        [({}, service.store.count_entries())],
    )
    budget = service.budget
    metric(
        "nekko_evictions_total",
        "counter",
        "Entries and stale partial downloads evicted by this process to keep the budget.",
        [({}, budget.evictions)],
    )
    metric(
        "nekko_evicted_bytes_total",
        "counter",
        "Bytes those evictions freed.",
        [({}, budget.bytes_evicted)],
    )
    if budget.enabled:
        try:
            use = budget.usage()
        except OSError:
            use = None
        if budget.max_size is not None:
            metric(
                "nekko_cache_budget_bytes",
                "gauge",
                "The cache budget (--max-cache-size).",
                [({}, budget.max_size)],
            )
        if use is not None:
            metric(
                "nekko_cache_budget_used_bytes",
                "gauge",
                "What the budget counts: blobs entries reach, pulls in flight (reserved),"
                " partial downloads.",
                [({}, use.used)],
            )
            metric(
                "nekko_disk_min_free_bytes",
                "gauge",
                "Free space the budget keeps on the cache's file system (--min-free-space).",
                [({}, budget.floor(use.disk))],
            )
            metric(
                "nekko_disk_free_bytes",
                "gauge",
                "Free space on the cache's file system.",
                [({}, use.free)],
            )
    return "\n".join(lines) + "\n"
