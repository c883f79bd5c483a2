"""The command line's help: every option's default, as written in its help text, reaches the user."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app


@pytest.mark.parametrize("command, shown", [
    (["run"], ["$LIFELONG_DATA_ROOT", "$RAY_ADDRESS", "sqlite:///<workdir>/mlflow.db", "the embedded digits demo"]),
    (["tune"], ["$LIFELONG_DATA_ROOT", "$RAY_ADDRESS", "<workdir>/tune/<name>"]),
    (["shards", "build"], ["$AWS_ENDPOINT_URL_S3"]),
])
def test_help_shows_the_defaults_in_brackets(command: list[str], shown: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for fragment in shown:
        assert fragment in text, f"{fragment!r} missing from `lifelong {' '.join(command)} --help`"
