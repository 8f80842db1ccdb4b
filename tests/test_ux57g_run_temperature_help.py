"""`tokenpool run --temperature`'s help names the server's default as the server takes it: a request that leaves
the temperature out gets the model's generation_config.json value (README), not always 1."""

import inspect

from controller.cli import run_cmd


def test_run_temperature_help_names_generation_config():
    option = inspect.signature(run_cmd).parameters["temperature"].default
    assert "generation_config.json" in option.help
    assert "server's, 1;" not in option.help
