"""deltazip build: rendered repository, build.json, fingerprint refusal, backend switch, atomic output."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from importlib import metadata
from pathlib import Path

import pytest
from click.testing import CliRunner
from google.protobuf import text_format
from safetensors.torch import load_file, save_file
from tritonclient.grpc import model_config_pb2

from deltazip.builder.build import build, load_build
from deltazip.cli import cli
from deltazip.config import RuntimeConfig
from deltazip.errors import DeltazipError


@pytest.fixture(scope="module")
def store(tiny_deltas) -> Path:
    return next(iter(tiny_deltas.values())).parent


def _parse_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_build_renders_repo_and_manifest(tiny_family, tiny_deltas, store, tmp_path):
    from deltazip.format import fingerprint_model

    runtime = RuntimeConfig(max_context=128, delta_slots=2)
    out = tmp_path / "build"
    manifest = build(tiny_family.base_dir, store, out, runtime)

    repo = out / "triton_repo" / "deltazip_llm"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "build.json", "triton_repo/deltazip_llm/1/model.py", "triton_repo/deltazip_llm/config.pbtxt"]
    config = _parse_config(repo / "config.pbtxt")  # Triton's own schema: parses only if well-formed
    assert config.name == "deltazip_llm" and config.backend == "python" and config.max_batch_size == 0
    assert config.model_transaction_policy.decoupled
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    inputs = {i.name: i for i in config.input}
    assert list(inputs) == ["text_input", "model", "max_tokens", "temperature", "top_p", "top_k", "seed",
                            "stop", "stream", "exclude_input_in_output", "control"]
    assert not inputs["text_input"].optional
    assert all(i.optional for name, i in inputs.items() if name != "text_input")
    assert [o.name for o in config.output] == ["text_output", "finish_reason", "prompt_tokens",
                                               "completion_tokens"]
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["base_dir"] == str(Path(tiny_family.base_dir).resolve())
    assert params["deltas_dir"] == str(store.resolve())
    assert RuntimeConfig(**json.loads(params["runtime_config"])) == runtime

    assert load_build(out) == manifest == json.loads((out / "build.json").read_text())
    assert manifest["settings"]["runtime"] == dataclasses.asdict(runtime)
    assert manifest["settings"]["backend"] == "torch"
    assert manifest["base_fingerprint"] == fingerprint_model(tiny_family.base_dir)
    assert [d["name"] for d in manifest["deltas"]] == sorted(tiny_deltas)
    for entry in manifest["deltas"]:
        sha = hashlib.sha256((Path(entry["path"]) / "manifest.json").read_bytes()).hexdigest()
        assert entry["manifest_sha256"] == sha and entry["base_fingerprint"] == manifest["base_fingerprint"]
    assert manifest["versions"]["torch"] == metadata.version("torch")


def test_rebuild_replaces_output_without_leftovers(tiny_family, store, tmp_path):
    out = tmp_path / "build"
    build(tiny_family.base_dir, store, out, RuntimeConfig())
    (out / "stale.txt").write_text("from an older build")
    build(tiny_family.base_dir, store, out, RuntimeConfig(max_batch_size=4))
    assert not (out / "stale.txt").exists()
    assert load_build(out)["settings"]["runtime"]["max_batch_size"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build"]  # no temp or old dirs left


def test_delta_from_another_base_is_refused_before_writing(tiny_family, store, tmp_path):
    other_base = tmp_path / "other-base"
    shutil.copytree(tiny_family.base_dir, other_base)
    weights = load_file(other_base / "model.safetensors")
    name = next(n for n in weights if n.endswith("mlp.down_proj.weight"))
    weights[name] = weights[name] + 0.01  # another base: same shapes, different values
    save_file(weights, other_base / "model.safetensors", metadata={"format": "pt"})

    out = tmp_path / "build"
    with pytest.raises(DeltazipError, match="made against another base"):
        build(other_base, store, out, RuntimeConfig())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other-base"]


def test_missing_deltas_dir_and_bad_base(tiny_family, tmp_path):
    with pytest.raises(DeltazipError, match="deltas directory not found"):
        build(tiny_family.base_dir, tmp_path / "nope", tmp_path / "out", RuntimeConfig())
    with pytest.raises(DeltazipError, match="no config.json"):
        build(tmp_path, tmp_path, tmp_path / "out", RuntimeConfig())
    assert not (tmp_path / "out").exists()


def test_cli_build_and_trtllm_backend_error(tiny_family, store, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["build", "--base", str(tiny_family.base_dir), "--deltas", str(store),
                                 "--out", str(tmp_path / "b1"), "--backend", "trtllm"])
    assert result.exit_code == 2
    assert "not available here" in result.output and "TensorRT-LLM" in result.output
    assert not (tmp_path / "b1").exists()

    result = runner.invoke(cli, ["-q", "build", "--base", str(tiny_family.base_dir), "--deltas", str(store),
                                 "--out", str(tmp_path / "b2")])
    assert result.exit_code == 0, result.output
    assert "reverse" in result.output and (tmp_path / "b2" / "build.json").is_file()


def test_trtllm_dry_run_lists_exactly_the_files(tiny_family, store, tmp_path):
    """`deltazip build --backend trtllm --dry-run` works without TensorRT-LLM, writes nothing and prints
    every file of the build; the converter part of that list is checked against a real CPU conversion."""
    from deltazip.builder.build import planned_files
    from deltazip.builder.trtllm import convert, written_files

    out = tmp_path / "b"
    result = CliRunner().invoke(cli, ["build", "--base", str(tiny_family.base_dir), "--deltas", str(store),
                                      "--out", str(out), "--backend", "trtllm", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert not out.exists()
    listed = [line for line in result.output.splitlines() if line.startswith(str(out.resolve()))]
    names = sorted(p.name.removesuffix(".dz") for p in store.iterdir() if p.name.endswith(".dz"))
    want = planned_files("trtllm", names, 1)
    assert [str(Path(line).relative_to(out.resolve())) for line in listed] == want
    assert {"build.json", "triton_repo/deltazip_llm/config.pbtxt", "triton_repo/deltazip_llm/1/model.py",
            "trtllm/engine/rank0.engine", "trtllm/checkpoint/rank0.safetensors",
            f"trtllm/deltas/{names[0]}/rank0.json"} <= set(want)

    # the CPU step really writes exactly the planned checkpoint and delta-layout files (tp 2)
    work = tmp_path / "work"
    work.mkdir()
    convert(tiny_family.base_dir, sorted(store.glob("*.dz"))[:1], work, tp=2, dtype="float16",
            base_quant="none", calib=None)
    planned = [f.removeprefix("trtllm/") for f in planned_files("trtllm", names[:1], 2)
               if f.startswith(("trtllm/checkpoint/", "trtllm/deltas/"))]
    assert written_files(work) == planned

    # every module the tiny deltas change gets a delta layer in the engine: linears, lm_head, embedding, norms
    from deltazip.builder.trtllm import delta_layer_kind, slot_layout

    layout = slot_layout(work / "deltas", names[:1])
    kinds = {delta_layer_kind(m) for m in layout["packed"]} | {
        delta_layer_kind(p.removesuffix(".weight")) for p in layout["dense"]}
    assert {"column", "row", "lm_head", "embedding", "norm"} <= kinds, kinds
    assert delta_layer_kind("transformer.layers.3.mlp.gate") == "column"
    assert delta_layer_kind("transformer.layers.3.attention.dense") == "row"
    with pytest.raises(DeltazipError, match="no delta layer"):
        delta_layer_kind("transformer.layers.3.attention.rotary")

    torch_files = planned_files("torch", names, 1)
    assert "triton_repo/deltazip_llm/config.pbtxt" in torch_files
    assert not any("variants" in f for f in torch_files)


def test_trtllm_variant_keeps_the_deltazip_llm_contract(tmp_path):
    """The trtllm model repository renders with the same model, inputs and outputs as the torch one."""
    from deltazip.builder.render import model_values, pbtxt_string, render_repo, variant_template

    values = model_values(tmp_path / "base", tmp_path / "deltas", dataclasses.asdict(RuntimeConfig()), True)
    render_repo(tmp_path / "torch", values, variant_template("torch"))
    render_repo(tmp_path / "trtllm", {**values, "trtllm_dir": pbtxt_string(str(tmp_path / "t"))},
                variant_template("trtllm"))
    torch_cfg = _parse_config(tmp_path / "torch" / "deltazip_llm" / "config.pbtxt")
    trt_cfg = _parse_config(tmp_path / "trtllm" / "deltazip_llm" / "config.pbtxt")
    assert trt_cfg.name == torch_cfg.name == "deltazip_llm"
    assert list(trt_cfg.input) == list(torch_cfg.input) and list(trt_cfg.output) == list(torch_cfg.output)
    assert trt_cfg.model_transaction_policy.decoupled and trt_cfg.max_batch_size == 0
    assert trt_cfg.parameters["trtllm_dir"].string_value == str(tmp_path / "t")
    assert (tmp_path / "trtllm" / "deltazip_llm" / "1" / "model.py").is_file()
    assert not (tmp_path / "torch" / "variants").exists()
