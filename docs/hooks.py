"""mkdocs hook: the reference pages' tables of SiftConfig fields and CLI flags, generated from the code.

A page that holds ``<!-- generated: sift-config -->`` or ``<!-- generated: cli -->`` gets the table in its
place, built from the same docstrings (``siftune.cli.field_docs``) and parser the ``--help`` texts come from,
so the two cannot drift.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # the checkout's code, installed or not


def on_page_markdown(markdown: str, page, config, files) -> str:
    if "<!-- generated: sift-config -->" in markdown:
        markdown = markdown.replace("<!-- generated: sift-config -->", config_table())
    if "<!-- generated: cli -->" in markdown:
        markdown = markdown.replace("<!-- generated: cli -->", cli_tables())
    return markdown


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def config_table() -> str:
    from siftune import SiftConfig
    from siftune.cli import field_docs

    docs = field_docs(SiftConfig)
    rows = ["| field | default | what it does |", "|---|---|---|"]
    for field in dataclasses.fields(SiftConfig):
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        rows.append(f"| `{field.name}` | `{default!r}` | {_cell(docs.get(field.name, ''))} |")
    return "\n".join(rows)


def cli_tables() -> str:
    from siftune.cli import build_parser

    out = []
    for path, parser in _commands(build_parser(), ["siftune"]):
        out.append(f"## `{' '.join(path)}`\n")
        if parser.description or parser.usage:
            out.append(_cell(parser.description or "") + "\n")
        rows = ["| flag | what it does |", "|---|---|"]
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or not action.help:
                continue
            names = ", ".join(f"`{name}`" for name in action.option_strings) or f"`{action.dest}`"
            help_text = action.help % {"default": action.default} if "%(default)" in action.help else action.help
            rows.append(f"| {names} | {_cell(help_text.replace('%%', '%'))} |")
        out.append("\n".join(rows) + "\n")
    return "\n".join(out)


def _commands(parser: argparse.ArgumentParser, path: list[str]):
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        yield path, parser
        return
    for name, child in subparsers[0].choices.items():
        yield from _commands(child, path + [name])
