"""Every command's `--help` states each option's default, once, and no option reads "(default: None)"."""

import argparse
import importlib
import re

import pytest

from kosmos2_jax.utils import cli

COMMANDS = ["ablate", "convert", "data.build", "data.synthetic", "evaluate", "evaluation.language_data", "export",
            "grit.build", "predict", "serve", "tokenizer"]


class _Parser(Exception):
    pass


def _parsers(module_name, monkeypatch):
    """The command's parser (and its subcommands'), caught where `main` would parse."""
    def catch(self, *args, **kwargs):
        raise _Parser(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", catch)
    module = importlib.import_module(f"kosmos2_jax.{module_name}")
    with pytest.raises(_Parser) as caught:
        module.main([])
    found, todo = [], [("python -m kosmos2_jax." + module_name, caught.value.args[0])]
    while todo:
        name, parser = todo.pop()
        found.append((name, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += [(f"{name} {sub}", p) for sub, p in action.choices.items()]
    return found


def _blocks(help_text):
    """option -> its block of the help text (from its line to the next option's)."""
    blocks, current = {}, None
    for line in help_text.splitlines():
        m = re.match(r"  (-{1,2}[\w-]+)", line)
        if line and not line.startswith(" "):  # a group's title ends the option before it
            current = None
        if m:
            current = m.group(1)
            blocks[current] = ""
        if current:
            blocks[current] += " " + line.strip()
    return blocks


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_every_default_once(command, monkeypatch):
    for name, parser in _parsers(command, monkeypatch):
        assert isinstance(parser, cli.ArgumentParser), name
        text = parser.format_help()
        assert "(default: None)" not in text, (name, text)
        blocks = _blocks(text)
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            block = blocks[action.option_strings[-1]]
            assert block.count("(default") <= 1, (name, block)
            default = action.default  # an option with a value when not given (0 included; not a False switch)
            if default is not None and default is not False and default is not argparse.SUPPRESS and default not in ("", []):
                assert block.count("(default") == 1, (name, action.option_strings, block)
            # a help text ends a sentence or a parenthesis, never mid-clause
            assert not block.rstrip().endswith((":", ",", " give")), (name, block)
