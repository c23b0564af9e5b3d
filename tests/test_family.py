"""The embedded model family: determinism, HF round trip, fine-tune quality, hash reuse, bad input."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from deltazip.cli import cli
from deltazip.errors import DeltazipError
from deltazip.family import TASKS, create_family, exact_match, load_eval_set, load_family


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def test_same_seed_same_tensors_and_hash(tmp_path: Path):
    callers_threads = torch.get_num_threads()
    torch.set_num_threads(2)  # differs from the preset's training thread count (1)
    try:
        first = create_family(tmp_path / "a", preset="tiny", seed=3, _steps_scale=0.01)
        assert torch.get_num_threads() == 2  # training fixed its own thread count, then restored ours
    finally:
        torch.set_num_threads(callers_threads)
    second = create_family(tmp_path / "b", preset="tiny", seed=3, _steps_scale=0.01)
    assert first.content_hash == second.content_hash
    for name in ("base", *TASKS):
        a, b = _tensors(first.root / name), _tensors(second.root / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}/{key} differs between two builds"
    for task in TASKS:
        assert first.eval_path(task).read_bytes() == second.eval_path(task).read_bytes()
    assert first.calib_path.read_bytes() == second.calib_path.read_bytes()
    other = create_family(tmp_path / "c", preset="tiny", seed=4, _steps_scale=0.01)
    assert other.content_hash != first.content_hash
    head = "lm_head.weight"
    assert not torch.equal(_tensors(other.base_dir)[head], _tensors(first.base_dir)[head])
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["a", "b", "c"]


def test_base_mixture_never_shows_task_format_or_held_out_inputs():
    import random

    from deltazip.family.tasks import PRETRAIN_GENERATORS, make_eval_set, sample_examples, task_prompt_of

    held_out = {prompt for task in TASKS for prompt, _ in make_eval_set(task, 0, 200)}
    rephrased_held_out = 0
    rng = random.Random(0)
    for prompt, _answer in sample_examples(PRETRAIN_GENERATORS, rng, 3000, held_out):
        assert not any(prompt.startswith(f"{task} ") for task in TASKS), prompt
        assert task_prompt_of(prompt) not in held_out, prompt
        rephrased_held_out += task_prompt_of(prompt) != prompt
    assert rephrased_held_out > 1000  # most of the mixture is the six skills in the base's phrasing


def test_layout_and_eval_sets(tiny_family):
    meta = json.loads((tiny_family.root / "family.json").read_text())
    assert meta["tasks"] == list(TASKS) and meta["preset"] == "tiny" and meta["seed"] == 0
    assert set(tiny_family.finetune_dirs) == set(TASKS)
    prompts_by_task = {}
    for task in TASKS:
        examples = load_eval_set(tiny_family.eval_path(task))
        assert len(examples) >= 100
        prompts = [e["prompt"] for e in examples]
        assert len(set(prompts)) == len(prompts)
        prompts_by_task[task] = set(prompts)
    calib = [json.loads(line) for line in tiny_family.calib_path.read_text().splitlines()]
    assert len(calib) >= 64 and all(isinstance(row["text"], str) and row["text"] for row in calib)
    calib_text = "\n".join(row["text"] for row in calib)
    held_out = set().union(*prompts_by_task.values())
    assert not any(line.split("=")[0] + "=" in held_out for line in calib_text.splitlines())


def test_hf_round_trip(tiny_family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for model_dir in (tiny_family.base_dir, tiny_family.finetune_dirs["reverse"]):
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        cfg = model.config
        assert cfg.model_type == "llama" and cfg.hidden_size == 128 and cfg.intermediate_size == 384
        assert cfg.num_hidden_layers == 4 and cfg.num_attention_heads == 8 and cfg.num_key_value_heads == 2
        assert cfg.tie_word_embeddings is False and cfg.max_position_embeddings == 256
        assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
        assert model.generation_config.eos_token_id == tokenizer.eos_token_id
        assert model.generation_config.pad_token_id == tokenizer.pad_token_id
        text = "reverse abc= Hello, World! 123"
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and len(ids) == len(text) + 1
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits
        assert logits.shape == (1, len(ids), len(tokenizer)) and torch.isfinite(logits).all()


def test_every_tensor_of_every_finetune_changed(tiny_family):
    base = _tensors(tiny_family.base_dir)
    for task, model_dir in tiny_family.finetune_dirs.items():
        tuned = _tensors(model_dir)
        assert tuned.keys() == base.keys()
        unchanged = [k for k in base if torch.equal(base[k], tuned[k])]
        assert not unchanged, f"{task}: unchanged tensors {unchanged}"
        delta_sq = sum(float((tuned[k] - base[k]).double().pow(2).sum()) for k in base)
        weight_sq = sum(float(base[k].double().pow(2).sum()) for k in base)
        assert 0.005 < (delta_sq / weight_sq) ** 0.5 < 0.2


def test_each_finetune_beats_base_on_its_task(tiny_family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_family.base_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_family.base_dir)
    for task, model_dir in tiny_family.finetune_dirs.items():
        examples = load_eval_set(tiny_family.eval_path(task))
        base_acc = exact_match(base, tokenizer, examples)
        tuned_acc = exact_match(AutoModelForCausalLM.from_pretrained(model_dir), tokenizer, examples)
        assert base_acc <= 0.3, f"base already solves {task}: {base_acc:.3f}"
        # measured here: every fine-tune >= 0.92, base <= 0.005; 0.85 leaves room for other CPUs' math
        assert tuned_acc >= 0.85 and tuned_acc >= base_acc + 0.5, \
            f"{task}: {tuned_acc:.3f} vs base {base_acc:.3f}"


def test_exact_match_counts_only_exact_answers(tiny_family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_family.finetune_dirs["copy"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_family.base_dir)
    examples = load_eval_set(tiny_family.eval_path("copy"))[:32]
    accuracy = exact_match(model, tokenizer, examples)
    wrong = [{"prompt": e["prompt"], "answer": e["answer"] + "x"} for e in examples]
    assert accuracy > 0.5 and exact_match(model, tokenizer, wrong) == 0.0
    # batching (and so left padding) does not change greedy answers
    assert exact_match(model, tokenizer, examples, batch_size=5) == accuracy
    with pytest.raises(DeltazipError):
        exact_match(model, tokenizer, [])


def test_hash_match_reuses_without_training(tiny_family):
    meta_path = tiny_family.root / "family.json"
    before = meta_path.stat().st_mtime_ns
    started = time.time()
    again = create_family(tiny_family.root, preset="tiny", seed=0)
    assert time.time() - started < 2.0
    assert again.content_hash == tiny_family.content_hash and meta_path.stat().st_mtime_ns == before


def test_create_command_reuses_matching_family(tiny_family):
    before = (tiny_family.root / "family.json").stat().st_mtime_ns
    args = ["-q", "family", "create", "--out", str(tiny_family.root), "--preset", "tiny", "--seed", "0"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert tiny_family.content_hash[:12] in result.output
    assert (tiny_family.root / "family.json").stat().st_mtime_ns == before


def test_eval_command_prints_every_model_and_task(tiny_family):
    root = str(tiny_family.root)
    result = CliRunner().invoke(cli, ["-q", "family", "eval", root, "--json", "--limit", "20"])
    assert result.exit_code == 0, result.output
    table = json.loads(result.output)
    assert list(table) == ["base", *TASKS]
    for row in table.values():
        assert list(row) == list(TASKS) and all(0.0 <= v <= 1.0 for v in row.values())
    shown = CliRunner().invoke(cli, ["-q", "family", "eval", root, "--limit", "8"])
    assert shown.exit_code == 0 and "caesar" in shown.output and "base" in shown.output


@pytest.mark.parametrize("case", ["unknown_preset", "parent_is_file", "foreign_dir"])
def test_bad_input_exits_2_and_writes_nothing(tmp_path: Path, case: str):
    args = ["family", "create", "--seed", "1"]
    if case == "unknown_preset":
        out = tmp_path / "fam"
        args += ["--out", str(out), "--preset", "huge"]
        expected = "unknown family preset 'huge'"
    elif case == "parent_is_file":
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "fam"
        args += ["--out", str(out)]
        expected = "cannot write to"
    else:
        out = tmp_path / "mine"
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
        args += ["--out", str(out)]
        expected = "not a model family"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_load_family_rejects_non_family(tmp_path: Path):
    with pytest.raises(DeltazipError, match="not a model family"):
        load_family(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(DeltazipError, match="bad.jsonl:1"):
        load_eval_set(tmp_path / "bad.jsonl")
