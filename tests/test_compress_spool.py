"""Spooled artifact writing (deltazip/format/spool.py): the payload writer against safetensors, the spool
against save_delta, the compressor's spool path against its in-memory one, and packed deltas held in memory
that do not grow with the number of blocks."""

from __future__ import annotations

import gc
import json

import factories
import numpy as np
import pytest
import torch

from deltazip.compress import compress_model, pipeline, resume
from deltazip.config import CompressConfig
from deltazip.format import load_delta, save_delta
from deltazip.format.codec import encode_tensors
from deltazip.format.manifest import file_digest
from deltazip.format.spool import Spool, payload_header, write_payload
from deltazip.packed import PACKED_KEYS, PackedLinear

FINGERPRINT = "sha256:" + "ab" * 32


def _reference(blobs: dict[str, bytes], metadata: dict[str, str]) -> bytes:
    """What the writer used before: safetensors' own serializer (metadata in hash-map order)."""
    from safetensors.numpy import save

    return save({k: np.frombuffer(v, dtype=np.uint8) for k, v in blobs.items()}, metadata=metadata)


def _swapped_metadata(data: bytes, metadata: dict[str, str]) -> bytes:
    """`data` with its two metadata entries written in the other order (same length)."""
    (a, va), (b, vb) = sorted(metadata.items())
    return data.replace(json.dumps({a: va, b: vb}, separators=(",", ":")).encode(),
                        json.dumps({b: vb, a: va}, separators=(",", ":")).encode(), 1)


def test_payload_writer_writes_the_bytes_of_safetensors(tmp_path):
    gen = np.random.default_rng(0)
    blobs = {name: gen.integers(0, 256, size, dtype=np.uint8).tobytes()
             for name, size in [("model.layers.10.mlp.up_proj", 1001), ("lm_head", 37), ("empty", 0),
                                ("model.layers.2.mlp.up_proj", 4096), ("model.embed_tokens", 5)]}
    sizes = {k: len(v) for k, v in blobs.items()}

    def chunks(name):  # in uneven pieces, as the spool reads them
        blob = blobs[name]
        return [blob[i:i + 300] for i in range(0, len(blob), 300)]

    for metadata in ({"format": "deltazip.delta"}, {"format": "deltazip.delta", "tensors_sha256": "0" * 64}):
        path = tmp_path / "p.safetensors"
        digest = write_payload(path, sizes, chunks, metadata, "blake3")
        ours = path.read_bytes()
        assert digest == file_digest(path, "blake3")
        assert ours.startswith(payload_header(sizes, metadata))
        want = _reference(blobs, metadata)
        if len(metadata) == 1:
            assert ours == want
        else:  # safetensors writes metadata keys in hash-map order, varying between processes
            assert want in (ours, _swapped_metadata(ours, metadata))


def _tensors(seed: int) -> tuple[dict[str, PackedLinear], dict[str, torch.Tensor]]:
    linears = {f"model.layers.{i}.mlp.{p}": factories.random_linear(64, 128, 2, True, 128, seed=seed + i)
               for i in range(3) for p in ("up_proj", "down_proj")}
    linears["lm_head"] = factories.random_linear(32, 64, 4, False, 32, seed=seed + 9)
    exact = {f"model.layers.{i}.input_layernorm.weight": torch.randn(64, dtype=torch.float64)
             for i in range(3)}
    exact["model.norm.weight"] = torch.randn(64)
    return linears, exact


def _files(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_spool_writes_the_bytes_of_save_delta(tmp_path):
    linears, exact = _tensors(0)

    def info():
        return {"target": "t", "stats": {"compress_seconds": 1.5}}

    save_delta(tmp_path / "a.dz", "d", FINGERPRINT, linears, exact, info())
    with Spool(tmp_path) as spool:  # block by block, as the compressor hands them over
        for i in range(3):
            prefix = f"model.layers.{i}."
            spool.add({k: v for k, v in linears.items() if k.startswith(prefix)},
                      {k: v for k, v in exact.items() if k.startswith(prefix)})
        spool.add({"lm_head": linears["lm_head"]}, {"model.norm.weight": exact["model.norm.weight"]})
        spool.save(tmp_path / "b.dz", "d", FINGERPRINT, info())
        with pytest.raises(ValueError, match="spooled twice"):
            spool.add({"lm_head": linears["lm_head"]}, {})
    assert _files(tmp_path / "a.dz") == _files(tmp_path / "b.dz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.dz", "b.dz"]  # the spool file left no name
    # ... and the bytes the safetensors writer gave, up to its metadata order
    blobs, _ = encode_tensors(linears, exact, "zstd")
    payload = (tmp_path / "b.dz" / "delta.safetensors").read_bytes()
    header_len = int.from_bytes(payload[:8], "little")
    metadata = json.loads(payload[8:8 + header_len])["__metadata__"]
    assert _reference(blobs, metadata) in (payload, _swapped_metadata(payload, metadata))
    manifest = json.loads((tmp_path / "b.dz" / "manifest.json").read_text())
    want = file_digest(tmp_path / "b.dz" / "delta.safetensors", "blake3")
    assert manifest["files"]["delta.safetensors"]["blake3"] == want  # hashed while written
    loaded = load_delta(tmp_path / "b.dz")
    assert list(loaded.manifest["tensors"]) == list(linears) + list(exact)
    for name, packed in linears.items():
        assert torch.equal(loaded.linears[name].dequantize(), packed.dequantize()), name


def _comparable(path) -> tuple[bytes, str]:
    """The payload's bytes, and the manifest (key order kept) without the wall time and the sizes that
    count its digits."""
    manifest = json.loads((path / "manifest.json").read_text())
    for key in ("compress_seconds", "artifact_bytes", "bits_per_weight", "ratio"):
        manifest["stats"].pop(key)
    return (path / "delta.safetensors").read_bytes(), json.dumps(manifest)


def test_compress_spool_path_gives_the_in_memory_artifact(tiny_family, tmp_path, monkeypatch):
    task = sorted(tiny_family.finetune_dirs)[0]
    settings = CompressConfig(n_samples=16, seq_len=32, tune_steps=3)

    def run(out):
        return compress_model(tiny_family.base_dir, tiny_family.finetune_dirs[task], out, settings, name="d",
                              calib=tiny_family.calib_path)

    spooled = run(tmp_path / "spooled.dz")
    monkeypatch.setattr(pipeline, "Spool", lambda *a, **k: None)  # the whole delta in memory, save_delta
    in_memory = run(tmp_path / "memory.dz")
    assert _comparable(spooled) == _comparable(in_memory)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.dz", "spooled.dz"]


def _packed_bytes_alive() -> int:
    """Bytes of every PackedLinear's tensors alive in this process (each storage counted once)."""
    gc.collect()
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if type(obj) is PackedLinear:  # (isinstance would touch lazy module proxies)
            for key in PACKED_KEYS:
                t = getattr(obj, key, None)
                if isinstance(t, torch.Tensor):
                    seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def test_packed_deltas_held_do_not_grow_with_the_number_of_blocks(tmp_path, monkeypatch):
    root = tmp_path / "in"
    factories.finetune_pair(root, factories.char_tokenizer(), num_hidden_layers=6)
    factories.write_calib(root / "calib.jsonl")
    held: list[int] = []
    save = resume.Checkpoints.save

    def measured(self, index, *args, **kwargs):  # at the end of every block
        save(self, index, *args, **kwargs)
        held.append(_packed_bytes_alive())

    monkeypatch.setattr(resume.Checkpoints, "save", measured)
    out = compress_model(root / "base", root / "ft", tmp_path / "out.dz",
                         CompressConfig(n_samples=8, seq_len=32, tune_steps=2), calib=root / "calib.jsonl")
    assert len(held) == 6
    one_block = sum(e["shape"][0] * e["shape"][1] for n, e in load_delta(out).manifest["tensors"].items()
                    if n.startswith("model.layers.1.") and e["kind"] == "linear") // 4  # 2 bits per weight
    assert held[1] >= one_block > 0  # the measure sees the block just finished
    # blocks 1-5 have the same shapes: what is held at the end of block 5 is what was held after block 1
    # (the in-memory path held every finished block: 5 blocks' deltas more)
    assert held[5] <= held[1], held
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out.dz"]
