"""Per-variant metrics of deltazip_llm, exported on Triton's metrics endpoint (Python backend custom metrics).

`ServingMetrics(pb_utils)` creates the metric families through the backend's `pb_utils.MetricFamily` (in
the tritonserver 2.51 Python backend: COUNTER and GAUGE families, `Metric(labels=...)`, `.increment()`,
`.set()`); tests pass a stand-in with the same shape. Every series has the label `variant` (the delta's
name; "(base)" for the base). `parse_prometheus` and `status_rows` turn the endpoint's text back into the
table `deltazip status` prints.
"""

from __future__ import annotations

import re
import threading
from collections import defaultdict

BASE_LABEL = "(base)"
PREFIX = "deltazip_"

# name → (kind, description); per variant unless listed in GLOBAL
COUNTERS = {
    "requests_total": "Requests received (per variant)",
    "request_errors_total": "Requests that ended with an error (per variant)",
    "prompt_tokens_total": "Prompt tokens of finished requests (per variant)",
    "completion_tokens_total": "Generated tokens of finished requests (per variant)",
    "ttft_seconds_total": "Sum of time to first token, seconds (divide by ttft_count_total)",
    "ttft_count_total": "Requests with a first token (per variant)",
    "request_seconds_total": "Sum of request latency, submit to final response, seconds (per variant)",
    "swap_ins_total": "Host → device slot loads of the variant",
    "swap_in_seconds_total": "Sum of swap-in (host → slot) seconds",
    "disk_loads_total": "Disk → host loads of the variant (decode + checksums)",
    "disk_load_seconds_total": "Sum of disk → host load seconds",
}
GAUGES = {
    "variant_resident": "1 when the variant holds a device slot, else 0",
    "variant_device_bytes": "Packed delta bytes of the variant in device slots",
    "variant_host_bytes": "Decoded delta bytes of the variant in the host tier",
    "variant_precision_bits": "Bits per kept value the variant was last loaded at (any-precision policy)",
    "inflight_requests": "Requests of the variant queued or running",
    "resident_variants": "Variants holding a device slot",
    "device_bytes": "Delta bytes in device slots, all variants",
    "host_bytes": "Delta bytes in the host tier, all variants",
    "queue_depth": "Requests waiting for admission into the batch",
    "running_requests": "Requests in the running batch",
}
GLOBAL = {"resident_variants", "device_bytes", "host_bytes", "queue_depth", "running_requests"}


class ServingMetrics:
    """The model's metric families; thread-safe; cheap enough to call per request."""

    def __init__(self, pb_utils) -> None:
        family = pb_utils.MetricFamily
        self._lock = threading.Lock()
        self._families = {}
        for name, description in COUNTERS.items():
            self._families[name] = family(name=PREFIX + name, description=description, kind=family.COUNTER)
        for name, description in GAUGES.items():
            self._families[name] = family(name=PREFIX + name, description=description, kind=family.GAUGE)
        self._metrics: dict[tuple[str, str], object] = {}
        self._seen_pool: dict[tuple[str, str], float] = defaultdict(float)  # last pool counter values

    def _metric(self, name: str, variant: str | None = None):
        key = (name, variant or "")
        metric = self._metrics.get(key)
        if metric is None:
            labels = {} if name in GLOBAL else {"variant": variant or BASE_LABEL}
            metric = self._metrics[key] = self._families[name].Metric(labels=labels)
        return metric

    def inc(self, name: str, variant: str | None, value: float = 1.0) -> None:
        if value:
            with self._lock:
                self._metric(name, variant).increment(float(value))

    def set(self, name: str, variant: str | None, value: float) -> None:
        with self._lock:
            self._metric(name, variant).set(float(value))

    def request_finished(self, variant: str | None, error: bool, prompt_tokens: int, completion_tokens: int,
                         seconds: float) -> None:
        if error:
            self.inc("request_errors_total", variant)
        self.inc("prompt_tokens_total", variant, prompt_tokens)
        self.inc("completion_tokens_total", variant, completion_tokens)
        self.inc("request_seconds_total", variant, seconds)

    def first_token(self, variant: str | None, seconds: float) -> None:
        self.inc("ttft_seconds_total", variant, seconds)
        self.inc("ttft_count_total", variant)

    def refresh(self, engine_stats: dict, variant_bytes: dict, inflight: dict[str, int],
                known: list[str]) -> None:
        """Gauges and pool counters from the engine's state (called periodically and after requests)."""
        pool = engine_stats.get("pool", {})
        for name, counters in pool.get("per_variant", {}).items():
            for source, target in (("swap_ins", "swap_ins_total"), ("swap_in_s", "swap_in_seconds_total"),
                                   ("disk_loads", "disk_loads_total"),
                                   ("disk_load_s", "disk_load_seconds_total")):
                value = float(counters.get(source, 0))
                delta = value - self._seen_pool[name, source]
                if delta > 0:
                    self.inc(target, name, delta)
                    self._seen_pool[name, source] = value
            if counters.get("precision_bits"):
                self.set("variant_precision_bits", name, float(counters["precision_bits"]))
        names = set(known) | set(variant_bytes) | {n for n in inflight if n}
        for name in names:
            held = variant_bytes.get(name, {})
            self.set("variant_resident", name, 1.0 if held.get("device") else 0.0)
            self.set("variant_device_bytes", name, held.get("device", 0))
            self.set("variant_host_bytes", name, held.get("host", 0))
            self.set("inflight_requests", name, inflight.get(name, 0))
        self.set("inflight_requests", None, inflight.get("", 0))
        self.set("resident_variants", None, sum(1 for v in variant_bytes.values() if v.get("device")))
        self.set("device_bytes", None, sum(v.get("device", 0) for v in variant_bytes.values()))
        self.set("host_bytes", None, pool.get("host_bytes", 0))
        self.set("queue_depth", None, engine_stats.get("waiting", 0))
        self.set("running_requests", None, engine_stats.get("running", 0))


_LINE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str, prefix: str = PREFIX) -> dict[str, dict[str, float]]:
    """{metric name without prefix: {variant label ("" for global series): value}} for our series."""
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue
        match = _LINE.match(line)
        if not match:
            continue
        labels = dict(_LABEL.findall(match["labels"] or ""))
        try:
            value = float(match["value"])
        except ValueError:
            continue
        out[match["name"][len(prefix):]][labels.get("variant", "")] = value
    return dict(out)


def status_rows(metrics: dict[str, dict[str, float]]) -> tuple[list[str], list[list], dict[str, float]]:
    """(headers, one row per variant, global values) for `deltazip status`."""
    def get(name: str, variant: str) -> float:
        return metrics.get(name, {}).get(variant, 0.0)

    variants = sorted({v for name, series in metrics.items() if name not in GLOBAL for v in series if v},
                      key=lambda v: (v != BASE_LABEL, v))
    headers = ["variant", "requests", "errors", "prompt tok", "compl tok", "TTFT ms", "swap-ins",
               "swap-in ms", "resident", "in flight", "device MB"]
    rows = []
    for v in variants:
        ttft_n = get("ttft_count_total", v)
        swaps = get("swap_ins_total", v)
        rows.append([
            v, int(get("requests_total", v)), int(get("request_errors_total", v)),
            int(get("prompt_tokens_total", v)), int(get("completion_tokens_total", v)),
            f"{get('ttft_seconds_total', v) / ttft_n * 1e3:.1f}" if ttft_n else "-",
            int(swaps), f"{get('swap_in_seconds_total', v) / swaps * 1e3:.2f}" if swaps else "-",
            "-" if v == BASE_LABEL else ("yes" if get("variant_resident", v) else "no"),
            int(get("inflight_requests", v)), f"{get('variant_device_bytes', v) / 1e6:.2f}",
        ])
    totals = {name: metrics.get(name, {}).get("", 0.0) for name in GLOBAL}
    return headers, rows, totals
