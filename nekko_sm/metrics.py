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
    metric("nekko_pulls_total", "counter", "Pulls finished, by source and result.",
           [({"source": s, "result": r}, n) for (s, r), n in sorted(stats["pulls"].items())])
    metric("nekko_downloaded_bytes_total", "counter", "Bytes received from upstreams.",
           [({}, stats["bytes_downloaded"])])
    metric("nekko_deduplicated_bytes_total", "counter",
           "Bytes not downloaded because the cache already had the blob.",
           [({}, stats.get("bytes_deduplicated", 0))])
    metric("nekko_inflight_pulls", "gauge", "Pulls in progress.",
           [({}, len(service._flights))])
    metric("nekko_api_errors_total", "counter", "API error answers, by error code.",
           [({"code": c}, n) for c, n in sorted(api_errors.items())])
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
    metric("nekko_cache_entries", "gauge", "Entries in the cache.",
           [({}, service.store.count_entries())])
    return "\n".join(lines) + "\n"
