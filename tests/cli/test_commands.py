"""Every command has help with an example; `geo baseline` prints the densest-cell table."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from geo.cli import cli
from support.caches import make_location_cache


def _commands(group: click.Group, prefix=()):
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))
        else:
            yield (*prefix, name)


@pytest.mark.parametrize("words", list(_commands(cli)), ids=" ".join)
def test_every_command_has_help_with_an_example(words):
    result = CliRunner().invoke(cli, [*words, "--help"])
    assert result.exit_code == 0 and "Example:" in result.output, result.output


def test_baseline_command(tmp_path):
    cache = make_location_cache(tmp_path / "loc.h5", n=600)
    result = CliRunner().invoke(cli, ["baseline", str(cache), "--n-cells", "16,32"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "densest training cell" in lines[0] and lines[2].split()[0] == "16" and lines[3].split()[0] == "32"
    assert CliRunner().invoke(cli, ["baseline", str(cache), "--n-cells", "16,x"]).exit_code == 2
