"""YAML is read through one bounded safe loader: alias bombs, duplicate keys and huge inputs are one short line."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from autoreg.errors import UserError
from autoreg.recipe import default_recipe, load_recipe, recipe_from_yaml, recipe_to_yaml


def _bomb(levels: int = 9, width: int = 9) -> str:
    """The classic billion-laughs document: ``width ** levels`` values from a few lines."""
    lines = ['a0: &a0 ["lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def _one_short_line(result, limit: int = 400) -> str:
    assert result.code == 2, (result.code, result.out, result.err[:500])
    assert len(result.err_lines) == 1, result.err[:2000]
    assert "Traceback" not in result.err
    line = result.err_lines[0]
    assert len(line) <= limit, (len(line), line[:500])
    return line


@pytest.mark.parametrize("key", ["seed", "name", "search", "stages", "objective"])
def test_alias_bomb_under_any_key_is_refused_within_a_second(pair_yaml, run_cli, key: str) -> None:
    path = pair_yaml()
    doc = yaml.safe_load(path.read_text())
    doc.pop(key, None)
    text = _bomb() + yaml.safe_dump(doc, sort_keys=False) + f"{key}: *a8\n"
    path.write_text(text)
    t0 = time.monotonic()
    line = _one_short_line(run_cli("check", path))
    assert time.monotonic() - t0 < 1.0
    assert str(path) in line and "expands to more than" in line


def test_alias_bomb_in_a_recipe_is_refused(tmp_path: Path, run_cli, pair_yaml) -> None:
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(_bomb() + recipe_to_yaml(default_recipe(["rigid"], 2)).replace("seed: 0", "seed: *a8"))
    t0 = time.monotonic()
    line = _one_short_line(run_cli("evaluate", recipe, pair_yaml()))
    assert time.monotonic() - t0 < 1.0 and "expands to more than" in line
    with pytest.raises(UserError, match="expands to more than"):
        load_recipe(recipe)


def test_recursive_alias_is_refused(pair_yaml, run_cli) -> None:
    path = pair_yaml()
    path.write_text(path.read_text() + "search: &s {x: *s}\n")
    assert "recursive" in _one_short_line(run_cli("check", path))


def test_small_anchors_still_work(pair_yaml, run_cli) -> None:
    """Aliases are YAML: a few of them are fine."""
    from autoreg.yamlio import load_yaml_text

    path = pair_yaml()
    path.write_text(path.read_text().replace("stages:\n- rigid", "stages: &st [rigid]"))
    assert run_cli("check", path).code == 0
    assert load_yaml_text("a: &x [1, 2]\nb: *x\nc: *x\n", source="t") == {"a": [1, 2], "b": [1, 2], "c": [1, 2]}


@pytest.mark.parametrize(
    "text, key, lines",
    [
        ("name: a\nname: b\n", "name", (1, 2)),
        ("landmarks:\n  fixed: a.csv\n  fixed: b.csv\n", "fixed", (2, 3)),
        ("search: {x: 1, x: 2}\n", "x", (1, 1)),
    ],
)
def test_duplicate_keys_are_an_error_naming_key_and_line(pair_yaml, run_cli, text: str, key: str, lines) -> None:
    path = pair_yaml()
    path.write_text(text)  # the duplicate is found while reading, before the file's shape is checked
    line = _one_short_line(run_cli("check", path))
    assert f"duplicate key '{key}' at line {lines[1]} (first at line {lines[0]})" in line, line
    assert f": {key}: " in line


def test_duplicate_key_in_a_recipe(tmp_path: Path) -> None:
    text = recipe_to_yaml(default_recipe(["rigid"], 2))
    with pytest.raises(UserError, match="duplicate key 'seed'"):
        recipe_from_yaml(text + "seed: 3\n", source="r.yaml")


def test_merge_keys_are_not_duplicates() -> None:
    from autoreg.yamlio import load_yaml_text

    assert load_yaml_text("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\n", source="t") == {
        "base": {"x": 1, "y": 2},
        "other": {"x": 3, "y": 2},
    }


def test_huge_values_are_never_echoed(pair_yaml, run_cli) -> None:
    """A 4 MB value or key in the wrong place gives a message of a few hundred characters at most."""
    huge = "x" * 4_000_000
    path = pair_yaml()
    base = path.read_text()
    for text in (
        base.replace("stages:\n- rigid", f"stages:\n- {huge}"),  # a literal error
        base + f"{huge}: 1\n",  # an unknown key
        base.replace("name: syn", "name: [" + ", ".join(["1"] * 100_000) + "]"),  # wrong type, big list
    ):
        path.write_text(text)
        line = _one_short_line(run_cli("check", path))
        assert "xxxxxxxxxx" * 10 not in line


def test_file_too_large_is_refused_unread(pair_yaml, run_cli) -> None:
    path = pair_yaml()
    path.write_text(path.read_text() + "#" + "y" * 3_000_000 + "\n")
    assert "bytes" in _one_short_line(run_cli("check", path))


def test_pair_file_that_is_a_folder(tmp_path: Path, run_cli) -> None:
    assert "folder" in _one_short_line(run_cli("check", tmp_path))


def test_excerpt_is_short_and_one_line() -> None:
    from autoreg.errors import EXCERPT_CHARS, excerpt

    assert excerpt("abc") == "'abc'"
    assert len(excerpt("a\n" * 10_000)) <= EXCERPT_CHARS and "\n" not in excerpt("a\n" * 10_000)
    assert len(excerpt(list(range(10**6)))) <= EXCERPT_CHARS
    assert len(excerpt({"k" * 1000: ["v" * 1000]})) <= EXCERPT_CHARS
    assert excerpt("a\tb", quote=False) == "a\\tb"
