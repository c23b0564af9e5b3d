"""`deltazip status`: the per-variant metrics of a running server (Triton's metrics endpoint) as a table."""

from __future__ import annotations

import click

from deltazip.commands.context import get_config


@click.command("status")
@click.option("--metrics-url", default=None,
              help="Triton's metrics endpoint (default: http://[serve].host:[serve].metrics_port/metrics).")
@click.pass_context
def status(ctx: click.Context, metrics_url: str | None) -> None:
    """Requests, errors, tokens, time to first token, swap-ins, residency and memory per variant."""
    import urllib.error
    import urllib.request

    from deltazip.errors import DeltazipError
    from deltazip.serving.metrics import parse_prometheus, status_rows
    from deltazip.ui import console, print_table

    if metrics_url is None:
        s = get_config(ctx).serve
        host = "127.0.0.1" if s.host in ("0.0.0.0", "") else s.host
        metrics_url = f"http://{host}:{s.metrics_port}/metrics"
    try:
        with urllib.request.urlopen(metrics_url, timeout=10) as response:
            text = response.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        raise DeltazipError(f"cannot reach the metrics endpoint {metrics_url} ({getattr(e, 'reason', e)}); "
                            "is `deltazip serve` running? (--metrics-url sets it)") from None
    metrics = parse_prometheus(text)
    if not metrics:
        raise DeltazipError(f"{metrics_url} has no deltazip_* metrics (is it a deltazip server?)")
    headers, rows, totals = status_rows(metrics)
    print_table("deltazip status: per variant", headers, rows)
    console.print(f"resident variants {int(totals['resident_variants'])} · device "
                  f"{totals['device_bytes'] / 1e6:.2f} MB · host {totals['host_bytes'] / 1e6:.2f} MB · "
                  f"queue {int(totals['queue_depth'])} · running {int(totals['running_requests'])}",
                  highlight=False)
