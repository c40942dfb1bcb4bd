"""CI runs the README's test command: keep .ci/run and README.md saying the same thing."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    block = re.search(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_opens_with_the_two_commands():
    lab, tests = readme_commands()
    assert lab == "bash .ci/setup && flannelctl lab up"
    assert tests.startswith("bash .ci/setup && ")


def test_ci_runs_the_readme_test_command():
    _, tests = readme_commands()
    test_command = tests.split("&&", 1)[1].strip()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "bash .ci/setup" in ci
    assert ci[-1].strip() == test_command
