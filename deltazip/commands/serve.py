"""`deltazip serve`: run tritonserver on a build, and the OpenAI-compatible front beside it, until Ctrl-C or
SIGTERM."""

from __future__ import annotations

import signal
from pathlib import Path

import click

from deltazip.commands.context import get_config


@click.command()
@click.argument("build_dir", required=False, type=click.Path(file_okay=False))
@click.option("--host", default=None,
              help="Address tritonserver binds ([serve].host, default 127.0.0.1; keep it on loopback).")
@click.option("--http-port", type=int, default=None, help="HTTP port ([serve].http_port; 0 = a free port).")
@click.option("--grpc-port", type=int, default=None, help="gRPC port ([serve].grpc_port; 0 = a free port).")
@click.option("--metrics-port", type=int, default=None, help="Metrics port ([serve].metrics_port; 0 = free).")
@click.option("--openai-host", default=None,
              help="Address the OpenAI-compatible front binds ([serve].openai_host, default 127.0.0.1).")
@click.option("--openai-port", type=int, default=None,
              help="OpenAI-compatible front port ([serve].openai_port; 0 = a free port; -1 = no front).")
@click.pass_context
def serve(ctx: click.Context, build_dir: str | None, host: str | None, http_port: int | None,
          grpc_port: int | None, metrics_port: int | None, openai_host: str | None,
          openai_port: int | None) -> None:
    """Serve BUILD_DIR (default: [build].out) with the bundled tritonserver and the OpenAI-compatible front;
    Ctrl-C stops both cleanly."""
    from deltazip.builder.build import load_build
    from deltazip.serving.server import TritonServer, supervise
    from deltazip.ui import console, print_table

    config = get_config(ctx)
    build = Path(build_dir) if build_dir else config.path(config.build.out)
    manifest = load_build(build)
    s = config.serve
    openai_port = s.openai_port if openai_port is None else openai_port
    server = TritonServer(build, host=host or s.host,
                          http_port=s.http_port if http_port is None else http_port,
                          grpc_port=s.grpc_port if grpc_port is None else grpc_port,
                          metrics_port=s.metrics_port if metrics_port is None else metrics_port)
    front = None

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    if server.host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning: tritonserver binds {server.host}: its HTTP endpoint (2.51) crashes "
                      "on deeply nested JSON and wraps integers beyond INT32; expose the OpenAI front or "
                      "gRPC instead (see README, Serving)[/yellow]")
    try:
        console.print(f"starting tritonserver on {build.resolve()} (log: see below) …")
        server.start()
        rows = []
        if openai_port >= 0:
            from deltazip.serving.openai_api import FrontSettings, OpenAIFront

            front = OpenAIFront(FrontSettings.from_build(build, server.grpc_url),
                                host=openai_host or s.openai_host, port=openai_port).start()
            rows += [("OpenAI API", f"{front.url}/v1  (model: {front.settings.base_id} or a variant)")]
        from deltazip.serving.variants import list_variants

        # the store is the source of truth (variants added since the build are served too)
        variants = ["(base)"] + [v.name for v in list_variants(Path(manifest["inputs"]["deltas_dir"]))]
        rows += [
            ("HTTP generate", f"http://{server.http_url}/v2/models/deltazip_llm/generate[_stream]"),
            ("gRPC (stream)", server.grpc_url),
            ("metrics", server.metrics_url),
            ("variants", ", ".join(variants)),
            ("log", str(server.log_path)),
        ]
        print_table("deltazip_llm is ready", ["endpoint", "address"], rows)
        console.print("press Ctrl-C to stop")
        # a dead model stub or tritonserver: restart on the same ports (a few times), else exit 2
        supervise(server, report=lambda line: console.print(f"[yellow]{line}[/yellow]"))
    except KeyboardInterrupt:
        console.print("stopping …")
    finally:
        if front is not None:
            front.stop()
        server.stop()
        signal.signal(signal.SIGTERM, previous)
    console.print("stopped")
