"""Quality report: scoring on the real tiny family, perplexity, the manifest report, the eval CLI."""

from __future__ import annotations

import json
import math
import shutil

import factories
import pytest
import torch
from click.testing import CliRunner

from deltazip.errors import DeltazipError
from deltazip.eval.report import artifact_bytes, evaluate_artifact, store_quality
from deltazip.eval.scoring import answer_perplexity, perplexity, score
from deltazip.hf import add_delta, load_model


@pytest.fixture(scope="module")
def synthetic_model_dir(tmp_path_factory):
    """A random tiny Llama with the family tokenizer, saved in HF format."""
    out = tmp_path_factory.mktemp("synthetic") / "model"
    factories.tiny_llama(0, out, factories.family_tokenizer(), max_position_embeddings=2048)
    return out


def test_perplexity_matches_per_text_nll_and_ignores_padding(synthetic_model_dir):
    model, tokenizer = load_model(synthetic_model_dir)
    texts = ["reverse abc=cba", "sort zyxwv=vwxyz"]  # different lengths: the batch is padded
    nll, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        nll += torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    assert perplexity(model, tokenizer, texts) == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_answer_perplexity_scores_only_answer_and_eos(synthetic_model_dir):
    model, tokenizer = load_model(synthetic_model_dir)
    examples = [{"prompt": "reverse abc=", "answer": "cba"}, {"prompt": "upper hello=", "answer": "HELLO"}]
    nll, count = 0.0, 0
    for ex in examples:
        n_prompt = len(tokenizer(ex["prompt"])["input_ids"])
        ids = torch.tensor([tokenizer(ex["prompt"] + ex["answer"])["input_ids"] + [tokenizer.eos_token_id]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        losses = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
        nll += losses[n_prompt - 1:].sum().item()  # predictions of answer tokens and EOS
        count += len(ex["answer"]) + 1
    assert answer_perplexity(model, tokenizer, examples) == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_add_delta_adds_once_and_names_bad_input(synthetic_model_dir):
    model, _ = load_model(synthetic_model_dir)
    name = "model.layers.0.mlp.up_proj.weight"
    before = dict(model.named_parameters())[name].detach().clone()
    add_delta(model, {name: torch.ones_like(before)})
    assert torch.equal(dict(model.named_parameters())[name], before + 1)
    with pytest.raises(DeltazipError, match="model.nope.weight"):
        add_delta(model, {"model.nope.weight": torch.zeros(1)})
    with pytest.raises(DeltazipError, match="shape"):
        add_delta(model, {name: torch.zeros(3, 3)})


def test_quality_lands_in_manifest_and_checksums_stay_valid(synthetic_model_dir, tmp_path):
    from deltazip.format import fingerprint_model, load_delta, save_delta

    model, _ = load_model(synthetic_model_dir)
    exact = {n: torch.full_like(p, 0.01) for n, p in model.named_parameters() if p.dim() == 1}
    path = save_delta(tmp_path / "t.dz", "t", fingerprint_model(synthetic_model_dir), {}, exact)
    size_before = artifact_bytes(path)
    report = {"task": "t", "rows": [{"method": "deltazip", "accuracy": 1.0}]}
    store_quality(path, report)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["quality"] == report
    loaded = load_delta(path, verify=True)
    assert loaded.manifest["quality"] == report
    assert artifact_bytes(path) == size_before  # the report is not part of the delta's size
    assert not [p for p in path.iterdir() if p.name.startswith(".manifest.")]  # no temp file left


def test_lm_eval_backend_missing_package_is_clear():
    try:
        import lm_eval  # noqa: F401
        pytest.skip("lm-eval is installed here")
    except ImportError:
        pass
    from deltazip.eval.scoring import lm_eval_scores

    with pytest.raises(DeltazipError, match=r"install deltazip\[eval\]"):
        lm_eval_scores(None, None, [])


def test_cli_missing_artifact_exits_2(tmp_path):
    from deltazip.cli import cli

    result = CliRunner().invoke(cli, ["eval", str(tmp_path / "nope.dz")])
    assert result.exit_code == 2
    assert "error: delta artifact not found" in result.output and "Traceback" not in result.output
    bad = CliRunner().invoke(cli, ["eval", str(tmp_path), "--baselines", "qlora"])
    assert bad.exit_code == 2 and "unknown baseline 'qlora'" in bad.output


def test_tiny_family_finetune_scores_high_and_base_low(tiny_family):
    from deltazip.family import load_eval_set

    task = "reverse"
    examples = load_eval_set(tiny_family.eval_path(task))[:64]
    base, tokenizer = load_model(tiny_family.base_dir)
    finetune, _ = load_model(tiny_family.finetune_dirs[task])
    base_acc, base_ppl = score(base, tokenizer, examples)
    ft_acc, ft_ppl = score(finetune, tokenizer, examples)
    assert ft_acc >= 0.8 and base_acc <= 0.3
    assert ft_ppl < base_ppl


def test_evaluate_artifact_report_on_tiny_family(tiny_family, tiny_deltas, tmp_path):
    from deltazip.format import load_delta

    art = shutil.copytree(tiny_deltas["upper"], tmp_path / "upper.dz")  # leave the shared fixture untouched
    report = evaluate_artifact(tiny_family.base_dir, art, tiny_family.root, baselines=("bitdelta", "svd"),
                               max_examples=48)
    assert report["task"] == "upper" and report["n_examples"] == 48
    rows = {r["method"].split()[0]: r for r in report["rows"]}
    assert set(rows) >= {"base", "full", "deltazip", "BitDelta", "SVD"}
    assert rows["deltazip"]["accuracy"] > rows["base"]["accuracy"]
    assert rows["SVD"]["size_bytes"] <= rows["deltazip"]["size_bytes"]  # equal-bytes baseline
    assert rows["full"]["ratio_vs_fp16"] == 1.0
    assert load_delta(art, verify=True).manifest["quality"] == report


def test_cli_eval_prints_table_without_storing(tiny_family, tiny_deltas, tmp_path):
    from deltazip.cli import cli

    art = shutil.copytree(tiny_deltas["sort"], tmp_path / "sort.dz")
    result = CliRunner().invoke(cli, ["eval", "--base", str(tiny_family.base_dir), "--family",
                                      str(tiny_family.root), str(art), "--max-examples", "16", "--no-store"])
    assert result.exit_code == 0, result.output
    assert "task 'sort' (16 examples)" in result.output and "base" in result.output
    assert "quality" not in json.loads((art / "manifest.json").read_text())


def test_lm_eval_local_task_file_runs(synthetic_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval.models.huggingface")  # only where deltazip[eval] is installed
    from deltazip.eval.scoring import lm_eval_scores

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "toy.jsonl"
    rows = [json.dumps({"prompt": f"copy {w}=", "answer": w}) + "\n" for w in ("ab", "cd", "ef")]
    data.write_text("".join(rows))
    task = tmp_path / "toy.yaml"
    task.write_text(f"task: deltazip_toy\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                    f"    test: {data}\ntest_split: test\noutput_type: loglikelihood\n"
                    "doc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    model, tokenizer = load_model(synthetic_model_dir)
    scores = lm_eval_scores(model, tokenizer, [task])
    assert 0.0 <= scores["deltazip_toy"]["acc,none"] <= 1.0
