"""The documentation: the site builds with every link and reference resolved, and its code runs.

Every ```python and ```sh block of README.md and docs/ runs here, the blocks
of a page in order in one scratch folder, or opens with a line
``# not run in the tests: <why>``. Commands run in this process at a tiny
scale: each ``siftune train`` line gets a few steps, a small held-out set and
short sequences appended (flags given later win), each ``siftune analyze``
line one small batch and a coarse grid.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
NOT_RUN = "# not run in the tests:"
BLOCK = re.compile(r"^```(python|sh|bash)\n(.*?)^```", re.S | re.M)
# Flags appended to a command unless the line sets them itself (--steps always: the last one wins).
TINY = {
    ("train",): {"--steps": "2", "--eval-size": "8", "--batch-size": "4", "--max-length": "32", "--quiet": None},
    ("analyze", "gradients"): {"--batches": "1", "--batch-size": "4", "--max-length": "32"},
    ("analyze", "landscape"): {"--batches": "1", "--batch-size": "4", "--max-length": "32", "--grid": "3",
                               "--line-points": "3"},
}
ALWAYS = {"--steps"}


def blocks(page: Path) -> list[tuple[str, str, int]]:
    """``(language, code, line)`` of every python and shell block of ``page``."""
    text = page.read_text(encoding="utf-8")
    return [(m[1], m[2], text[:m.start()].count("\n") + 1) for m in BLOCK.finditer(text)]


def test_the_site_builds_strictly(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "config" / "index.html").is_file()


def test_the_reference_lists_every_config_field_and_flag_with_the_help_text():
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import hooks
    finally:
        sys.path.remove(str(ROOT / "docs"))
    import dataclasses

    from siftune import SiftConfig
    from siftune.cli import build_parser, field_docs

    fields = hooks.config_table()
    for field in dataclasses.fields(SiftConfig):
        assert f"| `{field.name}` |" in fields
        assert field_docs(SiftConfig)[field.name].split(".")[0].replace("|", "\\|") in fields
    flags = hooks.cli_tables()
    train = next(a for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions
                 if "--density" in a.option_strings)
    assert f"| `--density` | {hooks._cell(train.help.replace('%%', '%'))} |" in flags


def test_every_block_runs_or_says_why_not():
    silent = [f"{page.relative_to(ROOT)}:{line}" for page in PAGES for _, code, line in blocks(page)
              if code.startswith("# not run") and not re.match(re.escape(NOT_RUN) + r" \S", code)]
    assert not silent, f"blocks marked 'not run' without '{NOT_RUN} <why>': {silent}"


@pytest.mark.parametrize("page", [p for p in PAGES if any(not c.startswith(NOT_RUN) for _, c, _ in blocks(p))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_the_code_blocks_of_a_page_run(page, tmp_path, monkeypatch):
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for language, code, line in blocks(page):
        if code.startswith(NOT_RUN):
            continue
        where = f"{page.relative_to(ROOT)}:{line}"
        if language == "python":
            exec(compile(code, where, "exec"), {"__name__": "__main__"})
        else:
            for command in _commands(code):
                _run_shell(command, where)


def _commands(code: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", code)
    return [line.split(" #")[0].strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def _run_shell(command: str, where: str) -> None:
    from siftune.cli import main

    words = shlex.split(command)
    if words[0] != "siftune":
        subprocess.run(command, shell=True, check=True, executable="/bin/bash")
        return
    args = words[1:]
    for command_words, flags in TINY.items():
        if tuple(args[:len(command_words)]) == command_words:
            for flag, value in flags.items():
                if flag in ALWAYS or flag not in args:
                    args += [flag] if value is None else [flag, value]
    assert main(args) == 0, f"{where}: siftune {' '.join(args)} failed"


def test_the_readmes_relative_links_point_to_files_that_exist():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\((?!https?://|#)([^)#\s]+)", text)
    assert targets and [t for t in targets if not (ROOT / t).exists()] == []
