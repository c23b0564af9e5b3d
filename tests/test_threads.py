"""deltazip/threads.py: CPUs from affinity and the cgroup quota (v2 and v1, fake files), the override order,
torch's pools, and OMP_WAIT_POLICY set before any command imports torch."""

from __future__ import annotations

import os

import pytest
import torch

from deltazip import threads
from deltazip.config import parse_config
from deltazip.errors import ConfigError


def _cgroup(tmp_path, files: dict[str, str]):
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "50000 100000"}, 0.5),
    ({"cpu.max": "garbage"}, None),
    ({"cpu.max": ""}, None),
    ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
    ({"cpu/cpu.cfs_quota_us": "200000", "cpu/cpu.cfs_period_us": "100000"}, 2.0),
    ({"cpu,cpuacct/cpu.cfs_quota_us": "300000", "cpu,cpuacct/cpu.cfs_period_us": "100000"}, 3.0),
    ({}, None),
])
def test_cgroup_quota(tmp_path, files, expected):
    root = _cgroup(tmp_path / "cg", files)
    assert threads.cgroup_cpu_limit(root, self_cgroup=tmp_path / "none") == expected


def test_cgroup_v2_own_group_is_read_and_the_tighter_limit_wins(tmp_path):
    root = _cgroup(tmp_path / "cg", {"cpu.max": "400000 100000", "app/worker/cpu.max": "100000 100000"})
    (tmp_path / "self").write_text("0::/app/worker\n")
    assert threads.cgroup_cpu_limit(root, self_cgroup=tmp_path / "self") == 1.0
    (tmp_path / "self").write_text("0::/gone\n")  # a group not visible in this mount: the root's limit
    assert threads.cgroup_cpu_limit(root, self_cgroup=tmp_path / "self") == 4.0


def test_usable_cpus_combines_affinity_and_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    root = _cgroup(tmp_path / "cg", {"cpu.max": "150000 100000"})
    assert threads.usable_cpus(root) == 2  # 1.5 CPUs of quota: 2 threads
    assert threads.usable_cpus(_cgroup(tmp_path / "none", {})) == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})  # taskset -c 3
    assert threads.usable_cpus(root) == 1
    assert threads.usable_cpus() >= 1  # this machine


def test_resolve_threads_order(tmp_path, monkeypatch):
    root = _cgroup(tmp_path / "cg", {"cpu.max": "100000 100000"})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.resolve_threads(0, root) == 1  # auto: the quota
    assert threads.resolve_threads(3, root) == 3  # deltazip.toml wins
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.resolve_threads(0, root) == 2  # then the user's OMP_NUM_THREADS
    assert threads.resolve_threads(5, root) == 5
    with pytest.raises(ValueError):
        threads.resolve_threads(-1)


def test_configure_threads_sets_torch_and_passive_wait(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(threads, "_chosen_by_user", threads._chosen_by_user)  # restored afterwards
    try:
        assert threads.configure_threads(1) == 1 and torch.get_num_threads() == 1
        assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
        monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # a user's explicit choice is kept
        threads.configure_threads(1)
        assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    finally:
        torch.set_num_threads(before)


def test_work_threads_one_for_narrow_models_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "_chosen_by_user", False)
    before = torch.get_num_threads()
    assert threads.work_threads(threads.NARROW_WIDTH) == 1
    assert threads.work_threads(threads.NARROW_WIDTH * 2) == before
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's count is kept, however narrow the model
    assert threads.work_threads(128) == before
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(threads, "_chosen_by_user", True)  # [runtime] threads in deltazip.toml
    assert threads.work_threads(128) == before


def test_config_threads_key():
    assert parse_config({}, ".", "t").runtime.threads == 0
    assert parse_config({"runtime": {"threads": 2}}, ".", "t").runtime.threads == 2
    with pytest.raises(ConfigError, match="threads"):
        parse_config({"runtime": {"threads": -1}}, ".", "t")
    with pytest.raises(ConfigError, match="threads"):
        parse_config({"runtime": {"threads": "2"}}, ".", "t")


def test_cli_sets_passive_wait_before_torch_starts():
    """A fresh `deltazip` process: OMP_WAIT_POLICY is in the environment before the command imports torch."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = ("import os, sys\nfrom deltazip.cli import cli\nimport click\n"
            "@click.command()\ndef probe():\n"
            "    print('torch' in sys.modules, os.environ.get('OMP_WAIT_POLICY'))\n"
            "cli.add_command(probe)\ncli(['probe'], standalone_mode=False)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "PASSIVE"]
