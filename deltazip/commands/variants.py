"""`deltazip variants add|remove|list`: change the variants of a live server through its OpenAI front."""

from __future__ import annotations

import click

from deltazip.commands.context import get_config


def _front_url(ctx: click.Context, url: str | None) -> str:
    if url:
        return url.rstrip("/")
    s = get_config(ctx).serve
    host = "127.0.0.1" if s.openai_host in ("0.0.0.0", "") else s.openai_host
    return f"http://{host}:{s.openai_port}"


def _call(method: str, url: str, body: dict | None = None, timeout_s: float = 600.0) -> dict:
    """One JSON request to the front; its OpenAI error JSON becomes a one-line DeltazipError."""
    import json
    import os
    import urllib.error
    import urllib.request

    from deltazip.errors import DeltazipError

    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    token = os.environ.get("DELTAZIP_ADMIN_TOKEN")
    if token:  # a server started with DELTAZIP_ADMIN_TOKEN wants it for load/unload
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {e.code}"
        raise DeltazipError(message) from None
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        raise DeltazipError(f"cannot reach the deltazip server at {url} ({getattr(e, 'reason', e)}); is "
                            "`deltazip serve` running? (--url sets the OpenAI front's address)") from None


@click.group("variants")
def variants() -> None:
    """Add, replace, remove and list the variants of a running `deltazip serve` (no restart)."""


_url_option = click.option("--url", default=None,
                           help="The OpenAI front (default: http://[serve].openai_host:[serve].openai_port).")


@variants.command("add")
@click.argument("name")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@_url_option
@click.pass_context
def add(ctx: click.Context, name: str, artifact: str, url: str | None) -> None:
    """Verify ARTIFACT (a NAME.dz directory on the server's machine) and serve it as NAME; an existing NAME
    is replaced in place (running requests finish on the old version)."""
    from pathlib import Path

    from deltazip.ui import console

    base = _front_url(ctx, url)
    info = _call("POST", f"{base}/v1/variants/load", {"name": name, "path": str(Path(artifact).resolve())})
    verb = "replaced" if info.get("replaced") else "added"
    ratio = f"{info['ratio']:.1f}x" if info.get("ratio") else "-"
    console.print(f"{verb} {info['name']} (version {info['version']}, {info.get('bits')}-bit, ratio {ratio}, "
                  f"{info['bytes'] / 1e6:.2f} MB) in {info['seconds'] * 1e3:.0f} ms", highlight=False)


@variants.command("remove")
@click.argument("name")
@click.option("--timeout", "timeout_s", type=float, default=30.0, show_default=True,
              help="Seconds to wait for the variant's in-flight requests (0: fail at once if any).")
@_url_option
@click.pass_context
def remove(ctx: click.Context, name: str, timeout_s: float, url: str | None) -> None:
    """Stop serving NAME: new requests are refused, running ones finish, its memory is freed, and it is
    deleted from the store."""
    from deltazip.ui import console

    info = _call("POST", f"{_front_url(ctx, url)}/v1/variants/unload", {"name": name, "timeout_s": timeout_s},
                 timeout_s=timeout_s + 120)
    console.print(f"removed {info['name']} in {info['seconds'] * 1e3:.0f} ms", highlight=False)


@variants.command("list")
@_url_option
@click.pass_context
def list_cmd(ctx: click.Context, url: str | None) -> None:
    """The variants the server's store holds, with version, size and residency."""
    from deltazip.ui import print_table

    answer = _call("GET", f"{_front_url(ctx, url)}/v1/variants")
    rows = [[v["name"], v["version"], v.get("bits") or "-", f"{v['ratio']:.1f}x" if v.get("ratio") else "-",
             f"{v['bytes'] / 1e6:.2f}", "yes" if v.get("resident") else "no"] for v in answer["data"]]
    print_table(f"variants of base '{answer.get('base')}'", ["name", "version", "bits", "ratio", "MB",
                                                             "resident"], rows)
