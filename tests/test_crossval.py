"""``autoreg crossval``: folds of a dataset's pairs, each tuned on the others and scored where it never tuned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from autoreg.crossval import CrossValidation, assign_folds, table
from autoreg.synthetic import make_pair, write_pair


def _dataset(folder: Path, n: int = 3) -> Path:
    for i in range(n):
        write_pair(make_pair((64, 64), transform="affine", seed=10 + i), folder / f"p{i}")
    doc = {
        "name": "cv",
        "stages": ["affine"],
        "trial_timeout": 30,
        "pairs": [
            {
                "name": f"p{i}",
                "fixed": f"p{i}/fixed.png",
                "moving": f"p{i}/moving.png",
                "landmarks": {"fixed": f"p{i}/fixed_landmarks.csv", "moving": f"p{i}/moving_landmarks.csv"},
            }
            for i in range(n)
        ],
    }
    path = folder / "pair.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def test_folds_deal_every_pair_once() -> None:
    names = [f"p{i}" for i in range(7)]
    for k in (2, 3, 7):
        folds = assign_folds(names, k, seed=1)
        assert len(folds) == k and sorted(n for f in folds for n in f) == sorted(names)
        assert max(map(len, folds)) - min(map(len, folds)) <= 1
    assert assign_folds(names, 3, seed=1) == assign_folds(names, 3, seed=1)
    assert assign_folds(names, 3, seed=1) != assign_folds(names, 3, seed=2)


@pytest.mark.slow
def test_leave_one_out_scores_each_pair_where_it_never_tuned(tmp_path: Path, run_cli) -> None:
    pair = _dataset(tmp_path / "data")
    out = tmp_path / "cv"
    res = run_cli("crossval", pair, "--trials", 3, "--jobs", 1, "--out", out, "--json", tmp_path / "cv.json")
    assert res.code == 0, res.err
    result = CrossValidation.from_dict(json.loads((out / "crossval.json").read_text()))
    assert json.loads((tmp_path / "cv.json").read_text()) == result.as_dict()
    assert result.folds and sorted(len(f) for f in result.folds) == [1, 1, 1]
    for p in result.pairs:
        held = result.folds[p.fold]
        assert held == [p.name]
        # the fold's study never saw the held-out pair
        fold_doc = yaml.safe_load((out / f"fold{p.fold + 1}" / "pair.yaml").read_text())
        assert p.name not in [q["name"] for q in fold_doc["pairs"]] and len(fold_doc["pairs"]) == 2
        assert all(Path(q["fixed"]).is_absolute() for q in fold_doc["pairs"])
        own_doc = yaml.safe_load((out / f"own-{p.name}" / "pair.yaml").read_text())
        assert [q["name"] for q in own_doc["pairs"]] == [p.name]
        assert p.before > 0 and p.out_of_sample is not None and p.own_best is not None
        # SimpleITK's default samples 1 % of 64 x 64 pixels (41 points): it may fail, and then says why
        assert p.default is not None or any("too few samples" in n for n in p.notes)
        assert p.out_of_sample < p.before  # the recipe from the other pairs registers this one
    lines = res.out.splitlines()
    assert any(line.startswith("out of sample: not worse than the default on") for line in lines)
    assert table(result)[-1] in lines


def test_crossval_needs_several_pairs_with_landmarks(tmp_path: Path, run_cli, pair_yaml) -> None:
    single = pair_yaml()
    res = run_cli("crossval", single, "--trials", 2)
    assert res.code == 2 and "several pairs" in res.err and len(res.err.strip().splitlines()) == 1
    res = run_cli("crossval", _dataset(tmp_path / "d", 2), "--folds", 3, "--trials", 2)
    assert res.code == 2 and "--folds" in res.err


@pytest.mark.slow
def test_the_report_has_a_cross_validation_section(tmp_path: Path, run_cli) -> None:
    pair = _dataset(tmp_path / "data")
    assert run_cli("crossval", pair, "--trials", 2, "--jobs", 1, "--no-own").code == 0  # out: beside the study
    assert run_cli("tune", pair, "--trials", 2, "--jobs", 1, "-q").code == 0
    res = run_cli("report", pair, "-o", tmp_path / "r.html")
    assert res.code == 0, res.err
    html = (tmp_path / "r.html").read_text()
    assert "<h2>Cross-validation</h2>" in html and html.count("<td>p") >= 3
