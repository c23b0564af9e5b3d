"""deltazip.toml parsing: defaults, overrides, and errors that name the key and the file."""

from pathlib import Path

import pytest

from deltazip.config import CompressConfig, Config, load_config
from deltazip.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "deltazip.toml"
    path.write_text(text)
    return path


def test_repo_config_matches_defaults():
    config = load_config(REPO / "deltazip.toml")
    assert config.compress == CompressConfig()
    assert "tiny" in config.bases
    assert config.serve.host == "127.0.0.1"
    assert config.resolve_model("tiny") == REPO / ".deltazip/family/base" or not (REPO / ".deltazip").exists()


def test_values_override_defaults_and_paths_resolve(tmp_path):
    config = load_config(write(tmp_path, '[compress]\nbits = 4\ndamp = 1\n[bases.b]\npath = "models/b"\n'))
    assert config.compress.bits == 4
    assert config.compress.damp == 1.0 and isinstance(config.compress.damp, float)
    assert config.path(config.bases["b"].path) == tmp_path / "models/b"


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[compress]\nbitz = 2\n", "unknown key 'compress.bitz'"),
        ("[compres]\nbits = 2\n", "unknown section 'compres'"),
        ('[compress]\nbits = "two"\n', "'compress.bits' must be int"),
        ("[serve]\nhost = 1\n", "'serve.host' must be str"),
        ("[runtime]\nmax_batch_size = true\n", "'runtime.max_batch_size' must be int"),
        ("[compress]\nbits = 5\n", "bits must be 2, 3, 4, 8 or 16"),
        ("[build]\nbackend = 'tensorflow'\n", "backend must be"),
        ("[bases.x]\npaht = 'a'\n", "unknown key 'bases.x.paht'"),
        ("[compress\nbits = 2\n", "invalid TOML"),
    ],
)
def test_errors_name_key_and_file(tmp_path, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert fragment in str(err.value)
    assert str(path) in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_unknown_model_name_lists_known_bases():
    config = Config(bases={})
    with pytest.raises(ConfigError, match="neither a model directory nor a base"):
        config.resolve_model("llama-2-13b")
