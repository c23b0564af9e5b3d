"""`deltazip client`: send one prompt to a served build over gRPC or HTTP and print the answer."""

from __future__ import annotations

import sys
import time

import click

from deltazip.commands.context import get_config


@click.command()
@click.option("--model", default="", help="Delta name; empty for the base.")
@click.option("--prompt", required=True, help="Prompt text.")
@click.option("--protocol", type=click.Choice(["grpc", "http"]), default="grpc", show_default=True)
@click.option("--url", default=None, help="host:port (default: [serve].host with its grpc/http port).")
@click.option("--stream/--no-stream", default=True, show_default=True, help="Print text as it arrives.")
@click.option("--max-tokens", type=int, default=None, help="Most new tokens (server default: 64).")
@click.option("--temperature", type=float, default=None, help="0 = greedy.")
@click.option("--top-p", type=float, default=None)
@click.option("--top-k", type=int, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--timeout", "timeout_s", type=float, default=120.0, show_default=True, help="Seconds.")
@click.pass_context
def client(ctx: click.Context, model: str, prompt: str, protocol: str, url: str | None, stream: bool,
           max_tokens: int | None, temperature: float | None, top_p: float | None, top_k: int | None,
           seed: int | None, stop: tuple[str, ...], timeout_s: float) -> None:
    """Send PROMPT to deltazip_llm (base or one delta) and print the generated text."""
    from deltazip.serving.client import generate_grpc, generate_http
    from deltazip.ui import console

    if url is None:
        s = get_config(ctx).serve
        host = "127.0.0.1" if s.host in ("0.0.0.0", "") else s.host
        url = f"{host}:{s.grpc_port if protocol == 'grpc' else s.http_port}"
    generate = generate_grpc if protocol == "grpc" else generate_http

    def on_chunk(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    started = time.perf_counter()
    done = generate(url, prompt, model=model, stream=stream, on_chunk=on_chunk, timeout_s=timeout_s,
                    max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                    stop=list(stop) or None)
    sys.stdout.write("\n")
    elapsed_ms = (time.perf_counter() - started) * 1e3
    console.print(f"[dim]{protocol} {url} · model {model or '(base)'} · finish {done.finish_reason} · "
                  f"{done.prompt_tokens}+{done.completion_tokens} tokens · {len(done.chunks)} response(s) · "
                  f"{elapsed_ms:.0f} ms[/dim]", highlight=False)
