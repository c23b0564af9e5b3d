"""`deltazip generate --delta` takes the path of an artifact as well as a store name (same answer)."""

from __future__ import annotations

import shutil

from click.testing import CliRunner


def test_generate_delta_by_path_or_name(tiny_family, tiny_deltas, tmp_path):
    from deltazip.cli import cli

    runner = CliRunner()
    prompt = "reverse abcd="
    common = ["generate", "--base", str(tiny_family.base_dir), "--prompt", prompt, "--max-tokens", "6",
              "--device", "cpu"]
    store = str(tiny_deltas["reverse"].parent)
    by_name = runner.invoke(cli, [*common, "--delta", "reverse", "--deltas", store])
    assert by_name.exit_code == 0, by_name.output
    answer = by_name.output.splitlines()[0]
    renamed = tmp_path / "some-dir"  # not named NAME.dz: served from a copy
    shutil.copytree(tiny_deltas["reverse"], renamed)
    for path in (tiny_deltas["reverse"], renamed):
        result = runner.invoke(cli, [*common, "--delta", str(path)])
        assert result.exit_code == 0, result.output
        assert result.output.splitlines()[0] == answer
    result = runner.invoke(cli, [*common, "--delta", str(tmp_path)])
    assert result.exit_code == 2 and "not a delta artifact" in result.output
