"""`deltazip serve`: run tritonserver on a build until Ctrl-C or SIGTERM."""

from __future__ import annotations

import signal
from pathlib import Path

import click

from deltazip.cli import get_config


@click.command()
@click.argument("build_dir", required=False, type=click.Path(file_okay=False))
@click.option("--host", default=None, help="Address to bind ([serve].host, default 127.0.0.1).")
@click.option("--http-port", type=int, default=None, help="HTTP port ([serve].http_port; 0 = a free port).")
@click.option("--grpc-port", type=int, default=None, help="gRPC port ([serve].grpc_port; 0 = a free port).")
@click.option("--metrics-port", type=int, default=None, help="Metrics port ([serve].metrics_port; 0 = free).")
@click.pass_context
def serve(ctx: click.Context, build_dir: str | None, host: str | None, http_port: int | None,
          grpc_port: int | None, metrics_port: int | None) -> None:
    """Serve BUILD_DIR (default: [build].out) with the bundled tritonserver; Ctrl-C stops it cleanly."""
    from deltazip.builder.build import load_build
    from deltazip.serving.server import ServerError, TritonServer
    from deltazip.ui import console, print_table

    config = get_config(ctx)
    build = Path(build_dir) if build_dir else config.path(config.build.out)
    manifest = load_build(build)
    s = config.serve
    server = TritonServer(build, host=host or s.host,
                          http_port=s.http_port if http_port is None else http_port,
                          grpc_port=s.grpc_port if grpc_port is None else grpc_port,
                          metrics_port=s.metrics_port if metrics_port is None else metrics_port)

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        console.print(f"starting tritonserver on {build.resolve()} (log: see below) …")
        server.start()
        variants = ["(base)"] + [d["name"] for d in manifest["deltas"]]
        print_table("deltazip_llm is ready", ["endpoint", "address"], [
            ("HTTP generate", f"http://{server.http_url}/v2/models/deltazip_llm/generate[_stream]"),
            ("gRPC (stream)", server.grpc_url),
            ("metrics", server.metrics_url),
            ("variants", ", ".join(variants)),
            ("log", str(server.log_path)),
        ])
        console.print("press Ctrl-C to stop")
        code = server.process.wait()
        raise ServerError(f"tritonserver exited unexpectedly (code {code}); last log lines:\n"
                          f"{server.log_tail()}")
    except KeyboardInterrupt:
        console.print("stopping …")
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)
    console.print("stopped")
