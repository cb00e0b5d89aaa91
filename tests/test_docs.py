"""The documentation stays true: every ``python -m rdd_lightning.<entry>`` command in a code block of README.md
and docs/*.md composes with Hydra (report's with its argument parser), so a renamed or removed option, group
or choice fails here; and mkdocs.yml lists every page of docs/ (``mkdocs build --strict`` in CI fails on a
listed page that is missing and on a broken link)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

from rdd_lightning.report import parse_args

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
HYDRA_APPS = {
    "train": "train",
    "evaluate": "evaluate",
    "predict": "predict",
    "export": "export",
    "check_data": "check_data",
}
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
COMMAND = re.compile(r"-m rdd_lightning\.(\w+)(.*)$")


def commands(page: Path) -> list[tuple[str, str, list[str]]]:
    """``(where, entry, arguments)`` of every command in the page's code blocks: continuation lines joined,
    comments cut, ``<placeholder>`` -> ``x``, a bare ``...`` (more arguments) and ``-m`` dropped."""
    found = []
    for block in FENCE.findall(page.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            match = COMMAND.search(line.split(" #")[0].strip())
            if match is None or line.lstrip().startswith("#"):
                continue
            text = re.sub(r"<[^>]*>", "x", match.group(2))
            args = [a for a in shlex.split(text) if a not in ("...", "-m", "--multirun")]
            found.append((f"{page.name}: {line.strip()[:90]}", match.group(1), args))
    return found


ALL = [c for page in PAGES for c in commands(page)]


def first_of_sweeps(args: list[str]) -> list[str]:
    """The overrides with every sweep (``a,b,c``, ``range(...)``) replaced by its first value."""
    out = []
    for override in OverridesParser.create().parse_overrides(args):
        if override.is_sweep_override():
            out.append(f"{override.get_key_element()}={next(override.sweep_string_iterator())}")
        else:
            out.append(override.input_line)
    return out


def test_the_docs_have_commands_of_every_entry_point():
    entries = {entry for _, entry, _ in ALL}
    assert entries >= {*HYDRA_APPS, "report"} and len(ALL) >= 30


@pytest.fixture(scope="module")
def package_configs():
    """Hydra initialised once for the module with the package's configs."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="rdd_lightning.conf", version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


@pytest.mark.parametrize(("where", "entry", "args"), ALL, ids=[c[0] for c in ALL])
def test_documented_command_composes(package_configs, where, entry, args):
    if entry == "report":
        parse_args(args)  # argparse: an unknown option or format exits (SystemExit fails the test)
        return
    assert entry in HYDRA_APPS, f"{where}: unknown entry point rdd_lightning.{entry}"
    if "--config-dir" in args:  # the user's own configs (e.g. dataset=mydata) cannot compose here
        pytest.skip("uses the user's own config directory")
    compose(config_name=HYDRA_APPS[entry], overrides=first_of_sweeps(args), return_hydra_config=True)


def test_mkdocs_nav_lists_every_page():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    listed = set()

    def walk(items):
        for item in items:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            if isinstance(value, list):
                walk(value)
            else:
                listed.add(value)

    walk(config["nav"])
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert listed == pages, (
        f"not in the nav: {sorted(pages - listed)}; missing pages: {sorted(listed - pages)}"
    )
