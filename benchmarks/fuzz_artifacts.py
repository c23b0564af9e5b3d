"""Fuzz the artifact reader: seeded mutations of real artifacts, every outcome classified and counted.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fuzz_artifacts.py --seed 0 --cases 10000   # make fuzz

Seeds are real artifacts written by `save_delta` from small random PackedLinear deltas (2-bit 2:4 `nibbles`,
3/4/8-bit codes + patterns, exact float32/float64, a zero-size tensor, raw and zstd encodings), one version 1
artifact (`groups` stream), and, when given with --artifact, any artifact on disk (e.g. a tiny-family delta).
Each case copies one seed, applies 1–3 mutations (payload byte flips, truncations, appends, sparse 1 TiB
extensions, safetensors header edits; manifest field edits of every type and range, deletions, additions,
deep nesting, raw-text damage; missing, extra, replaced and symlinked files), some of them followed by
"re-signing" (the checksums in `files` recomputed, so the mutation reaches the decoder), then loads it with
`load_delta(verify=True)` under a per-case timeout, and every 8th case also runs `deltazip inspect` on it.

Outcome classes: clean error (ArtifactError / DeltazipError), identical load (the seed's tensors, bit for
bit), changed load (re-signed: a valid artifact with other content; allowed), changed load without
re-signing (an undetected corruption: a bug), crash (any other exception, or a traceback or a false
"checksums ok" from inspect), hang (over the timeout). Targets: zero of the last three.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from inspect import signature
from pathlib import Path

import torch

CLASSES = ("clean error", "identical load", "changed load (re-signed)", "changed load (not re-signed)",
           "crash", "hang")
BAD = ("changed load (not re-signed)", "crash", "hang")
PAYLOAD, MANIFEST = "delta.safetensors", "manifest.json"
FINGERPRINT = "sha256:" + "5a" * 32


class Hang(BaseException):
    """Raised in the main thread by the per-case alarm (BaseException: no `except Exception` swallows it)."""


# ---------------------------------------------------------------- seeds

def _random_packed(n: int, k: int, bits: int, sparse: bool, group: int, gen: torch.Generator):
    from deltazip.format.codec import PATTERNS_24
    from deltazip.packed import PackedLinear

    codes = torch.randint(0, 1 << bits, (n, k // 2 if sparse else k), generator=gen)
    positions = None
    if sparse:
        symbols = torch.randint(0, 6, (n * k // 4,), generator=gen)
        positions = torch.tensor(PATTERNS_24)[symbols].reshape(n, k // 2)
    scales = torch.rand(n, k // group, generator=gen) + 0.01
    zeros = torch.full((n, k // group), float(1 << (bits - 1)))
    return PackedLinear.from_codes(codes, scales, zeros, bits, group, positions=positions, in_features=k)


def make_seeds(root: Path, extra: list[Path] = ()) -> list[Path]:
    """Real artifacts to mutate (written by save_delta; one rewritten as a version 1 artifact)."""
    from deltazip.format import save_delta

    gen = torch.Generator().manual_seed(1234)
    seeds = []
    a = save_delta(root / "a.dz", "a", FINGERPRINT,
                   {"model.layers.0.mlp.down_proj": _random_packed(8, 64, 2, True, 64, gen),
                    "lm_head": _random_packed(4, 32, 4, False, 16, gen)},
                   {"model.norm.weight": torch.randn(32, generator=gen)})
    seeds.append(a)
    seeds.append(save_delta(root / "b.dz", "b-raw", FINGERPRINT,
                            {"model.layers.0.self_attn.q_proj": _random_packed(6, 64, 3, True, 32, gen),
                             "model.layers.0.self_attn.k_proj": _random_packed(3, 32, 8, False, 32, gen)},
                            {"model.layers.0.input_layernorm.weight":
                                 torch.randn(2, 8, generator=gen).double(),
                             "model.empty": torch.zeros(0)}, lossless="none"))
    seeds.append(save_delta(root / "c.dz", "c.v2_", FINGERPRINT,
                            {"model.embed_tokens": _random_packed(5, 32, 2, False, 32, gen),
                             "model.layers.1.mlp.up_proj": _random_packed(1, 32, 4, True, 16, gen)}, {}))
    seeds.append(_as_version_1(a, root / "v1.dz"))
    if "checksum" in signature(save_delta).parameters:  # a sha256 (version 2/3) seed beside blake3
        seeds.append(save_delta(root / "d.dz", "d", FINGERPRINT,
                                {"lm_head": _random_packed(4, 64, 2, True, 32, gen)},
                                {"model.norm.weight": torch.randn(64, generator=gen)}, checksum="sha256"))
    if "compact" in signature(save_delta).parameters:  # version 5: log scales, tensor table as tensors_zstd
        seeds.append(save_delta(root / "e.dz", "e", FINGERPRINT,
                                {"model.layers.0.mlp.gate_proj": _random_packed(8, 64, 2, False, 32, gen),
                                 "lm_head": _random_packed(4, 64, 3, True, 64, gen)},
                                {"model.norm.weight": torch.randn(64, generator=gen)}, compact=True))
    for i, path in enumerate(extra):
        dest = root / f"extra{i}.dz"
        shutil.copytree(path, dest)
        seeds.append(dest)
    return seeds


def _as_version_1(source: Path, dest: Path) -> Path:
    """A version 1 artifact (2-bit 2:4 as the `groups` stream) with the same tensors as `source`."""
    import numpy as np
    from safetensors.numpy import save_file

    from deltazip.format import load_delta
    from deltazip.format.codec import PATTERNS_24, _encode, _encode_streams, linear_streams
    from deltazip.format.manifest import write_manifest
    from deltazip.format.schema import TABLE_KEY, tensor_table_sha256

    art = load_delta(source)
    manifest = copy.deepcopy(art.manifest)
    manifest["version"] = 1
    blobs = {}
    for name, entry in manifest["tensors"].items():
        if name in art.linears:
            packed = art.linears[name]
            streams = linear_streams(packed)
            if "nibbles" in streams:
                codes, positions = packed.codes().reshape(-1, 2), packed.positions().reshape(-1, 2)
                symbols = torch.tensor([PATTERNS_24.index(tuple(p)) for p in positions.tolist()])
                groups = (symbols * 16 + codes[:, 0] * 4 + codes[:, 1]).to(torch.uint8)
                streams = {"groups": groups, **{k: v for k, v in streams.items() if k != "nibbles"}}
            blobs[name], entry["streams"] = _encode_streams(streams, entry["encoding"])
        else:
            raw = art.exact[name].contiguous().view(torch.uint8).numpy().tobytes()
            blobs[name] = _encode(raw, entry["encoding"])
            entry["streams"] = [["delta", len(raw), len(blobs[name])]]
    dest.mkdir()
    save_file({k: np.frombuffer(v, dtype=np.uint8) for k, v in blobs.items()}, str(dest / PAYLOAD),
              metadata={"format": "deltazip.delta", TABLE_KEY: tensor_table_sha256(manifest["tensors"])})
    write_manifest(dest, manifest)
    return dest


def fingerprint_of(art) -> str:
    """sha256 over every decoded tensor (name, kind, packed fields / exact bytes): equal iff identical."""
    digest = hashlib.sha256()
    for name in sorted(art.linears):
        p = art.linears[name]
        digest.update(f"L{name}|{p.out_features}|{p.in_features}|{p.bits}|{p.group_size}|{p.sparse24}|".encode())
        for key, t in sorted(p.tensors().items()):
            digest.update(key.encode() + str(tuple(t.shape)).encode() + str(t.dtype).encode())
            digest.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    for name in sorted(art.exact):
        t = art.exact[name]
        digest.update(f"E{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        digest.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------- mutations

WEIRD = [None, True, False, 0, -1, 1, 2, 3, 7, 16, 31, 32, 2**31, 2**53 + 1, 2**63, 2**64, 10**30, -(2**63),
         0.5, 1e308, -0.0, float("nan"), float("inf"), "", "x", "false", "true", "0", "2", "raw", "zstd",
         "linear", "exact", "float16", "nibbles", "../../etc/passwd", "/etc/passwd", "a\x00b", "a/b", "..",
         ".hidden", "ü", "[red]x[/]", "a" * 5000, [], {}, [0], [1, 2, 3], [[1]], {"a": 1},
         ["nibbles", 1, 1], ["delta", 0, 0], [8, 64], [0, 0], [2**40, 2**40]]


def _paths(node, prefix=()):
    """Every (path, value) in a JSON tree, containers included."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _set(root, path, value):
    node = root
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def _numeric_variant(value, rng: random.Random):
    if isinstance(value, bool) or not isinstance(value, int | float):
        return rng.choice(WEIRD)
    return rng.choice([value + 1, value - 1, value * 2, value // 2 if isinstance(value, int) else value / 2,
                       -value, 0, value + 2**32, float(value), str(value)])


def _deep(depth: int, rng: random.Random):
    value: object = rng.choice([0, "x", None])
    for _ in range(depth):
        value = [value] if rng.random() < 0.5 else {"k": value}
    return value


def mutate_manifest(manifest: dict, rng: random.Random) -> tuple[dict | None, bytes | None, str]:
    """(new manifest, or raw text) and a label."""
    m = copy.deepcopy(manifest)
    op = rng.choice(["set", "set", "set", "numeric", "numeric", "delete", "delete", "add", "nest", "rename",
                     "streams", "files", "text", "dupkey"])
    if "tensors" not in m and op in ("streams", "dupkey"):  # version 5 `tensors_zstd`: one string to break
        op = "set"
    paths = [p for p, _ in _paths(m) if p]
    if op == "set":
        path = rng.choice(paths)
        _set(m, path, copy.deepcopy(rng.choice(WEIRD)))
    elif op == "numeric":
        nums = [(p, v) for p, v in _paths(m) if p and isinstance(v, int | float) and not isinstance(v, bool)]
        path, value = rng.choice(nums)
        _set(m, path, _numeric_variant(value, rng))
    elif op == "delete":
        path = rng.choice(paths)
        parent = m
        for key in path[:-1]:
            parent = parent[key]
        del parent[path[-1]]
    elif op == "add":
        containers = [(p, v) for p, v in _paths(m) if isinstance(v, dict | list)]
        path, node = rng.choice(containers)
        if isinstance(node, dict):
            key = rng.choice(["extra", "quality", "name", "x" * 3, "../x", ""])
            node[key] = copy.deepcopy(rng.choice(WEIRD))
        else:
            node.append(copy.deepcopy(rng.choice(WEIRD)))
    elif op == "nest":
        depth = rng.choice([5, 20, 40, 100, 1000, 5000, 100_000])
        if depth >= 1000 and rng.random() < 0.5:  # raw text: no Python object that deep is ever built
            text = "[" * depth + "]" * depth if rng.random() < 0.5 else '{"a":' * depth + "1" + "}" * depth
            return None, text.encode(), f"nest-text-{depth}"
        _set(m, rng.choice(paths), _deep(min(depth, 500), rng))
        return m, None, f"nest-{min(depth, 500)}"
    elif op == "rename":
        tensors = m.get("tensors", {})
        if tensors:
            name = rng.choice(list(tensors))
            new = rng.choice(["", "../../etc/passwd", "/abs", "a\x00b", name + "x", "lm_head", "x" * 1000])
            tensors[new] = tensors.pop(name)
        else:
            m["name"] = rng.choice(WEIRD)
    elif op == "streams":
        entry = rng.choice(list(m["tensors"].values()))
        streams = entry["streams"]
        choice = rng.randrange(4)
        if choice == 0 and len(streams) > 1:
            i, j = rng.sample(range(len(streams)), 2)
            streams[i], streams[j] = streams[j], streams[i]
        elif choice == 1:
            streams.append(copy.deepcopy(rng.choice(streams)))
        elif choice == 2 and streams:
            streams.pop(rng.randrange(len(streams)))
        else:
            s = rng.choice(streams)
            s[0] = rng.choice(["nibbles", "groups", "codes", "patterns", "scales", "zeros", "delta", "x"])
    elif op == "files":
        choice = rng.randrange(6)
        if choice == 0:
            m["files"] = {}
        elif choice == 1:
            m["files"][PAYLOAD] = None
        elif choice == 2:
            m["files"].pop(PAYLOAD, None)
        elif choice == 3:
            m["files"][rng.choice(["../x", "/etc/passwd", MANIFEST, "", "a\x00b", "extra.bin"])] = \
                {_digest_key(m): "0" * 64, "bytes": 0}
        elif choice == 4:
            m["files"][PAYLOAD]["bytes"] = rng.choice([0, 2**40, -1, 2**64, "1"])
        else:
            m["files"][PAYLOAD][_digest_key(m)] = rng.choice(["0" * 64, "", "A" * 64, None])
    elif op == "text":
        text = bytearray(json.dumps(manifest, separators=(",", ":")).encode())
        choice = rng.randrange(6)
        if choice == 0 and text:
            for _ in range(rng.randint(1, 8)):
                text[rng.randrange(len(text))] ^= 1 << rng.randrange(8)
        elif choice == 1:
            text = text[:rng.randrange(len(text) + 1)]
        elif choice == 2:
            text += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        elif choice == 3:
            text = bytearray(b"\xef\xbb\xbf") + text if rng.random() < 0.5 else text + b"\xff\xfe"
        elif choice == 4:
            text = bytearray(rng.choice([b"", b"null", b"[]", b"1", b'"x"', b"{}", b"NaN", b" " * 10000]))
        else:
            text = bytearray(text.replace(b'"version":', b'"version":2,"version":', 1))
        return None, bytes(text), f"text-{choice}"
    else:  # dupkey: a duplicated tensor key in the JSON text
        text = json.dumps(m, separators=(",", ":"))
        name = rng.choice(list(m["tensors"]))
        entry = json.dumps(m["tensors"][name], separators=(",", ":"))
        text = text.replace('"tensors":{', f'"tensors":{{{json.dumps(name)}:{entry},', 1)
        return None, text.encode(), "dupkey"
    return m, None, op


def _header(data: bytes) -> tuple[int, dict]:
    length = int.from_bytes(data[:8], "little")
    return length, json.loads(data[8:8 + length])


def mutate_payload(data: bytes, rng: random.Random) -> tuple[bytes | None, int | None, str]:
    """(new bytes, or None with a sparse size to extend to) and a label."""
    data = bytearray(data)
    op = rng.choice(["flip", "flip", "truncate", "append", "header", "header", "random", "sparse", "zero"])
    if op == "flip" and data:
        for _ in range(rng.choice([1, 1, 2, 8, 64])):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif op == "truncate":
        data = data[:rng.choice([0, 4, 8, 9, rng.randrange(len(data) + 1)])]
    elif op == "append":
        data += bytes(rng.randrange(256) for _ in range(rng.choice([1, 7, 100])))
    elif op == "header":
        try:
            length, header = _header(bytes(data))
        except ValueError:
            return bytes(data), None, "header-bad"
        body = data[8 + length:]
        names = [k for k in header if k != "__metadata__"]
        choice = rng.randrange(8)
        if names:
            name = rng.choice(names)
            if choice == 0:
                header[name]["data_offsets"] = [rng.choice([0, -1, 2**63, 2**64, 10**30, 1.5, "0"]),
                                                rng.choice([0, 2**63, 2**64, 1e300])]
            elif choice == 1:
                header[name]["dtype"] = rng.choice(["F32", "I64", "U8 ", None])
            elif choice == 2:
                header[name]["shape"] = rng.choice([[], [2**40], [-1], [1, 2], None])
            elif choice == 3:
                del header[name]
            elif choice == 4:
                header["extra"] = {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}
            elif choice == 5:
                header["__metadata__"] = rng.choice([None, {"a": 1}, [], {"tensors_sha256": "0" * 64}])
            elif choice == 6:
                header[name] = rng.choice(WEIRD)
            else:
                a, b = header[name]["data_offsets"]
                header[name]["data_offsets"] = [a, b + rng.choice([-1, 1, 1000])]
        text = json.dumps(header).encode()
        size = len(text) if rng.random() < 0.9 else rng.choice([2**64 - 1, 2**40, len(text) + 3])
        data = bytearray(size.to_bytes(8, "little")) + text + body
        return bytes(data), None, f"header-{choice}"
    elif op == "random":
        data = bytearray(rng.randbytes(len(data)))
    elif op == "sparse":
        return None, rng.choice([1 << 40, 1 << 33, len(data) + (1 << 20)]), "sparse"
    else:
        start = rng.randrange(len(data) + 1)
        data[start:start + rng.randint(1, 256)] = bytes(min(256, len(data) - start))
    return bytes(data), None, op


def _small_regular(path: Path) -> bytes:
    """The bytes of a regular file of at most 16 MiB (OSError for anything else: the mutation is skipped)."""
    import stat

    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode) or st.st_size > 1 << 24:
        raise OSError(f"{path}: not a small regular file")
    return path.read_bytes()


def _digest_key(manifest) -> str:
    """The checksum a manifest's version records in `files` (blake3 from version 4, else sha256)."""
    from deltazip.format.schema import checksum_key

    version = manifest.get("version") if isinstance(manifest, dict) else None
    return checksum_key(version) if isinstance(version, int) and not isinstance(version, bool) else "sha256"


def resign(art: Path) -> None:
    """Recompute the payload's checksum and size in the manifest (when it parses): the mutation then reaches
    past the checksums into the decoder."""
    from deltazip.format.manifest import new_hasher

    try:
        manifest = json.loads(_small_regular(art / MANIFEST))
        payload = art / PAYLOAD
        key = _digest_key(manifest)
        hasher = new_hasher(key)
        hasher.update(_small_regular(payload))
        manifest["files"][PAYLOAD] = {key: hasher.hexdigest(),
                                      "bytes": payload.stat().st_size}
        (art / MANIFEST).write_text(json.dumps(manifest))
    except Exception:  # noqa: BLE001 - an unparseable manifest stays as the mutation left it
        pass


def resign_table(art: Path) -> None:
    """Rewrite the payload's record of the tensor table (metadata tensors_sha256) to match the manifest."""
    from deltazip.format.schema import TABLE_KEY, tensor_table_sha256

    try:
        manifest = json.loads(_small_regular(art / MANIFEST))
        data = _small_regular(art / PAYLOAD)
        length, header = _header(data)
        header["__metadata__"] = {**header.get("__metadata__", {}),
                                  TABLE_KEY: tensor_table_sha256(manifest["tensors"])}
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        (art / PAYLOAD).write_bytes(len(text).to_bytes(8, "little") + text + data[8 + length:])
    except Exception:  # noqa: BLE001 - nothing to re-record: the mutation stays as it is
        pass


def mutate_files(art: Path, rng: random.Random, outside: Path) -> str:
    from deltazip.format.manifest import new_hasher

    choice = rng.randrange(11)
    payload, manifest = art / PAYLOAD, art / MANIFEST
    if choice == 0:
        payload.unlink()
    elif choice == 1:
        manifest.unlink()
    elif choice == 2:  # an unlisted extra file: ignored
        (art / rng.choice(["notes.txt", ".hidden", "delta.safetensors.bak"])).write_bytes(b"x" * 10)
    elif choice == 3:  # the payload replaced by a symlink to an identical copy outside
        copy_path = outside / f"payload-{rng.randrange(1 << 30)}"
        shutil.copy(payload, copy_path)
        payload.unlink()
        payload.symlink_to(copy_path)
    elif choice == 4:
        payload.unlink()
        payload.symlink_to(rng.choice(["/dev/zero", "/dev/null", "/nonexistent", "/etc/passwd"]))
    elif choice == 5:
        payload.unlink()
        payload.mkdir()
    elif choice == 6:
        payload.unlink()
        os.mkfifo(payload)
    elif choice == 7:
        manifest.unlink()
        manifest.symlink_to(rng.choice(["/dev/zero", "/dev/null", "/nonexistent", "/etc/passwd"]))
    elif choice == 8:
        manifest.unlink()
        manifest.mkdir()
    elif choice == 9:  # a listed extra file with the right checksum: still identical
        data = rng.randbytes(rng.randrange(100))
        (art / "extra.bin").write_bytes(data)
        m = json.loads(_small_regular(manifest))
        hasher = new_hasher(_digest_key(m))
        hasher.update(data)
        m["files"]["extra.bin"] = {_digest_key(m): hasher.hexdigest(), "bytes": len(data)}
        manifest.write_text(json.dumps(m))
    else:
        (art / "extra.bin").write_bytes(b"x")
        m = json.loads(_small_regular(manifest))
        m["files"]["extra.bin"] = {_digest_key(m): "0" * 64, "bytes": 1}
        manifest.write_text(json.dumps(m))
    return f"files-{choice}"


def make_case(seed: Path, dest: Path, rng: random.Random, outside: Path) -> tuple[bool, str]:
    """Copy `seed` to `dest` and mutate it; (re-signed?, label)."""
    shutil.copytree(seed, dest)
    labels, resigned = [], False
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        kind = rng.choice(["manifest", "manifest", "payload", "payload", "files"])
        try:
            if kind == "manifest":
                manifest = json.loads(_small_regular(dest / MANIFEST))
                new, text, label = mutate_manifest(manifest, rng)
                if new is not None:
                    text = json.dumps(new).encode()
                (dest / MANIFEST).write_bytes(text)
                if rng.random() < 0.3:  # record the edited table in the payload too: reach the decoder
                    resign_table(dest)
                    resign(dest)
                    resigned, label = True, label + "+resign-table"
            elif kind == "payload":
                data = _small_regular(dest / PAYLOAD)
                new, sparse, label = mutate_payload(data, rng)
                if new is not None:
                    (dest / PAYLOAD).write_bytes(new)
                else:
                    os.truncate(dest / PAYLOAD, sparse)
                if rng.random() < 0.5:
                    resign(dest)
                    resigned, label = True, label + "+resign"
            else:
                label = mutate_files(dest, rng, outside)
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError):
            label = f"{kind}-skipped"  # a previous mutation left nothing to mutate this way
        labels.append(label)
    return resigned, ",".join(labels)


# ---------------------------------------------------------------- running

def _alarm(signum, frame):
    raise Hang()


def run_case(path: Path, expected: str, resigned: bool, timeout_s: float, inspect: bool) -> tuple[str, str]:
    """Load (and maybe inspect) one mutated artifact; (class, detail)."""
    from deltazip.errors import DeltazipError
    from deltazip.format import load_delta

    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        try:
            art = load_delta(path, verify=True)
        except DeltazipError as e:
            outcome, detail, loaded = "clean error", str(e), False
        else:
            loaded = True
            same = fingerprint_of(art) == expected
            outcome = "identical load" if same else (
                "changed load (re-signed)" if resigned else "changed load (not re-signed)")
            detail = ""
        if inspect and outcome != "changed load (not re-signed)":
            problem = _inspect(path, loaded)
            if problem:
                outcome, detail = "crash", problem
    except Hang:
        outcome, detail = "hang", f"over {timeout_s} s"
    except Exception as e:  # noqa: BLE001 - exactly what the fuzzer counts
        outcome, detail = "crash", "".join(traceback.format_exception_only(type(e), e)).strip()[:300]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return outcome, detail


def _inspect(path: Path, loaded: bool) -> str:
    """'' when `deltazip inspect` behaves: exit 0 with "ok" iff the artifact loads, else exit 2, one line."""
    from click.testing import CliRunner

    from deltazip.cli import cli

    result = CliRunner().invoke(cli, ["inspect", str(path)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return f"inspect raised {type(result.exception).__name__}: {str(result.exception)[:200]}"
    if loaded != (result.exit_code == 0):
        return f"inspect exit {result.exit_code} for an artifact that {'loads' if loaded else 'fails'}"
    if not loaded and ("Traceback" in result.output or "ok" in result.output.split("checksums")[-1][:50]
                       and "checksums" in result.output):
        return "inspect printed a traceback or 'checksums ok' for a failing artifact"
    return ""


def run(seed: int, cases: int, timeout_s: float = 10.0, extra: list[Path] = (), inspect_every: int = 8,
        log=None) -> dict:
    """Run `cases` seeded cases; returns counts, per-operator counts, bad cases, timing."""
    rng = random.Random(seed)
    counts: Counter = Counter()
    bad: list[tuple[int, str, str, str]] = []
    slowest = 0.0
    started, cpu_started = time.perf_counter(), time.process_time()
    previous = signal.signal(signal.SIGALRM, _alarm)
    with tempfile.TemporaryDirectory(prefix="deltazip-fuzz-") as tmp:
        root = Path(tmp)
        (root / "seeds").mkdir()
        (root / "outside").mkdir()
        from deltazip.format import load_delta

        seeds = make_seeds(root / "seeds", list(extra))
        expected = {s: fingerprint_of(load_delta(s)) for s in seeds}
        try:
            for i in range(cases):
                seed_path = rng.choice(seeds)
                dest = root / "case" / f"{seed_path.name}"
                if dest.parent.exists():
                    shutil.rmtree(dest.parent)
                dest.parent.mkdir()
                resigned, label = make_case(seed_path, dest, rng, root / "outside")
                if os.environ.get("DELTAZIP_FUZZ_TRACE"):
                    print(f"case {i} [{seed_path.name}: {label}]", flush=True)
                t0 = time.perf_counter()
                outcome, detail = run_case(dest, expected[seed_path], resigned, timeout_s,
                                           inspect=inspect_every > 0 and i % inspect_every == 0)
                slowest = max(slowest, time.perf_counter() - t0)
                counts[outcome] += 1
                if outcome in BAD:
                    bad.append((i, label, outcome, detail))
                    if log:
                        log(f"case {i} [{seed_path.name}: {label}] {outcome}: {detail}")
                for leftover in (root / "outside").iterdir():
                    leftover.unlink()
        finally:
            signal.signal(signal.SIGALRM, previous)
    return {"counts": {c: counts.get(c, 0) for c in CLASSES}, "cases": cases, "bad": bad,
            "seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu_started,
            "slowest_case_s": slowest, "seeds": len(expected)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--timeout", type=float, default=10.0, help="per-case limit in seconds (a hang)")
    parser.add_argument("--artifact", type=Path, action="append", default=[],
                        help="another seed artifact (e.g. a tiny-family delta); repeatable")
    parser.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    result = run(args.seed, args.cases, args.timeout, args.artifact, log=print)
    counts = result["counts"]
    rows = [[c, counts[c], f"{100 * counts[c] / result['cases']:.1f}%"] for c in CLASSES]
    from _results import command_line, markdown_table, write_section

    table = markdown_table(["outcome", "cases", "share"], rows)
    print(table)
    print(f"{result['cases']} cases over {result['seeds']} seed artifacts in {result['seconds']:.1f} s "
          f"(slowest case {result['slowest_case_s']:.2f} s)")
    if not args.no_write:
        notes = (f"{result['cases']} cases over {result['seeds']} seed artifacts, "
                 f"{result['seconds']:.0f} s wall ({result['cpu_seconds']:.0f} s CPU), "
                 f"slowest case {result['slowest_case_s']:.2f} s (per-case limit {args.timeout:g} s). "
                 "Clean error: ArtifactError/ChecksumError; re-signed: the mutation recomputed the payload "
                 "checksum, so a successful load is a valid artifact with other content. Every 8th case also "
                 "runs `deltazip inspect`. Targets: 0 crashes, 0 hangs, 0 changed loads without re-signing.")
        write_section("Artifact fuzzing (load_delta, inspect)", command_line(), table, notes)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    sys.exit(1 if any(counts[c] for c in BAD) else 0)


if __name__ == "__main__":
    main()
