"""README's two commands are the truth: .ci/run runs the test command verbatim, and the main job
(`lmkd-py --dry-run` on the default config) runs for a user without privileges."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    section = ROOT.joinpath("README.md").read_text().split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.+?)\n```", section, flags=re.S)


def test_exactly_two_commands_and_ci_runs_the_test_one() -> None:
    cmds = readme_commands()
    assert len(cmds) == 2, cmds
    main_cmd, test_cmd = cmds
    assert "lmkd-py --dry-run" in main_cmd and "pytest" in test_cmd
    ci = ROOT.joinpath(".ci/run").read_text().splitlines()
    assert test_cmd in ci, ".ci/run must run README's test command verbatim"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to the nobody user")
def test_main_job_runs_as_nobody_on_the_default_config(nobody_python: tuple[list[str], dict[str, str]]) -> None:
    home = Path(tempfile.mkdtemp(prefix="lmkd-py-nobody-"))
    try:
        # nobody's own home: the records writer refuses a directory others may write (issue 18, item 1)
        os.chown(home, 65534, 65534)
        os.chmod(home, 0o700)
        prefix, base_env = nobody_python
        env = {**base_env, "HOME": str(home), "XDG_STATE_HOME": str(home / "state")}
        out = subprocess.run(
            [*prefix, "--dry-run", "--duration", "3", "--log-format", "json"],
            capture_output=True, text=True, timeout=60, user=65534, group=65534, extra_groups=[], env=env,
            cwd=home,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        events = [json.loads(line)["event"] for line in out.stderr.splitlines() if line.startswith("{")]
        assert "daemon.ready" in events and "daemon.stop" in events
        assert "loop.error" not in events
    finally:
        shutil.rmtree(home, ignore_errors=True)
