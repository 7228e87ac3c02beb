"""MkDocs hooks of the documentation site (``hooks:`` in mkdocs.yml).

- The home page is README.md and the benchmarks page benchmarks/README.md,
  their links rewritten for the site: neither text is kept twice.
- A line ``<!-- help: triomilter ARGS -->`` in a page is replaced by what
  ``triomilter ARGS --help`` prints, from the CLI's own argparse parser, so
  the command-line reference cannot drift from the code.
- Every public name (the ``__all__`` of ``triomilter``, ``triomilter.testing``
  and ``triomilter.protocol``) and every public function, method and property
  of a public class must have a docstring; one without is a warning, which
  ``mkdocs build --strict`` turns into a failure.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import re
import shlex
from pathlib import Path

import griffe
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

ROOT = Path(__file__).resolve().parent
PUBLIC_MODULES = ("triomilter", "triomilter.testing", "triomilter.protocol")
HELP_WIDTH = 88
"""Columns of the generated help (argparse wraps to the terminal otherwise)."""

log = logging.getLogger("mkdocs.hooks.triomilter")

# Pages made from files outside docs/: (site path, source, link rewrites).
_GENERATED = (
    (
        "index.md",
        ROOT / "README.md",
        ((r"\]\(docs/", "]("), (r"\]\(benchmarks/README\.md", "](benchmarks.md")),
    ),
    ("benchmarks.md", ROOT / "benchmarks" / "README.md", ()),
)
_HELP = re.compile(r"^<!-- help: (triomilter(?: [\w-]+)*) -->$", re.M)


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add the pages made from README.md and benchmarks/README.md."""
    for uri, source, rewrites in _GENERATED:
        text = source.read_text(encoding="utf-8")
        for pattern, replacement in rewrites:
            text = re.sub(pattern, replacement, text)
        files.append(File.generated(config, uri, content=text))
    return files


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    """Put the command line's help where a page asks for it; unescape pipes in table code."""
    markdown = _HELP.sub(lambda match: _help_block(match.group(1)), markdown)
    return _TABLE_ROW.sub(_unescape_pipes, markdown)


# GitHub needs `a \| b` for a pipe in the code of a table cell and shows it as
# `a | b`; Python-Markdown shows the backslash, and needs no escape there.
_TABLE_ROW = re.compile(r"^\|.*$", re.M)
_CODE = re.compile(r"`[^`]*`")


def _unescape_pipes(row: re.Match[str]) -> str:
    return _CODE.sub(lambda code: code.group(0).replace("\\|", "|"), row.group(0))


def _help_block(command: str) -> str:
    from triomilter import cli

    args = [*shlex.split(command)[1:], "--help"]
    out = io.StringIO()
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(HELP_WIDTH)
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            cli.main(args)
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    text = out.getvalue().rstrip()
    if not text:
        log.warning("`%s --help` printed nothing", command)
    return f"```text\n$ {command} --help\n{text}\n```"


def on_pre_build(config: MkDocsConfig) -> None:
    """Warn about every public name or public member without a docstring."""
    package = griffe.load("triomilter", search_paths=[str(ROOT)], resolve_aliases=True)
    for module_name in PUBLIC_MODULES:
        runtime = importlib.import_module(module_name)
        module = (
            package[module_name.removeprefix("triomilter").lstrip(".")]
            if "." in module_name
            else package
        )
        for name in runtime.__all__:
            for path in _undocumented(module[name]):
                log.warning(
                    "no docstring: %s.%s (listed in %s.__all__)", module_name, path, module_name
                )


def _undocumented(obj: griffe.Object | griffe.Alias) -> list[str]:
    """The paths (relative to the public name) of ``obj`` and its members that lack a docstring."""
    target = obj.final_target if isinstance(obj, griffe.Alias) else obj
    missing = [] if target.docstring else [obj.name]
    if target.is_class:
        for member in target.members.values():
            if member.name.startswith("_") or member.is_alias:
                continue  # private, or inherited from elsewhere
            if member.is_attribute and "property" not in member.labels:
                continue  # a field or an enum member: the class's docstring covers it
            if not member.docstring:
                missing.append(f"{obj.name}.{member.name}")
    return missing
