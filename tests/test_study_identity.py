"""A study refuses to resume (tune) or be read (export, report) on inputs other than those it was made with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import SimpleITK as sitk
import yaml

FAST = {"search": {"stage0.pyramid.levels": 1}}


def _tuned(pair_yaml, run_cli, tmp_path: Path, **kw) -> tuple[Path, Path]:
    pair, sdir = pair_yaml(extra={**FAST, **kw.pop("extra", {})}, **kw), tmp_path / "s"
    result = run_cli("tune", pair, "--trials", "2", "--jobs", "1", "-q", "--study-dir", sdir)
    assert result.code == 0, result.err
    return pair, sdir


def _edit(pair: Path, **changes) -> None:
    doc = yaml.safe_load(pair.read_text())
    doc.update(changes)
    pair.write_text(yaml.safe_dump(doc, sort_keys=False))


def _refused(result, key: str, *fragments: str) -> str:
    assert result.code == 2, (result.out, result.err)
    assert len(result.err_lines) == 1, result.err
    line = result.err_lines[0]
    assert f": {key}: " in line and "start a new study" in line and "--study-dir" in line, line
    for fragment in fragments:
        assert fragment in line, line
    return line


def _every_command(run_cli, pair: Path, sdir: Path, tmp_path: Path, key: str, *fragments: str) -> None:
    for cmd in (
        ("tune", "--trials", "4", "--jobs", "1", "-q"),
        ("export", "-o", tmp_path / "r.yaml"),
        ("report", "-o", tmp_path / "r.html"),
    ):
        _refused(run_cli(cmd[0], pair, *cmd[1:], "--study-dir", sdir), key, *fragments)
    assert not (tmp_path / "r.yaml").exists()


def test_a_changed_image(pair_yaml, run_cli, tmp_path) -> None:
    pair, sdir = _tuned(pair_yaml, run_cli, tmp_path)
    before = (sdir / "study.json").read_text()
    image = sitk.ReadImage(str(pair.parent / "moving.png"))
    image[3, 3] = 255 - int(image[3, 3])
    sitk.WriteImage(image, str(pair.parent / "moving.png"))
    _every_command(run_cli, pair, sdir, tmp_path, "moving", "moving file changed")
    assert (sdir / "study.json").read_text() == before  # the refused tune did not rewrite what the study is


def test_changed_landmarks(pair_yaml, run_cli, tmp_path) -> None:
    pair, sdir = _tuned(pair_yaml, run_cli, tmp_path)
    csv = pair.parent / "fixed_landmarks.csv"
    lines = csv.read_text().splitlines()
    lines[1] = ",".join(str(float(v) + 0.5) for v in lines[1].split(","))
    csv.write_text("\n".join(lines) + "\n")
    _every_command(run_cli, pair, sdir, tmp_path, "landmarks.fixed", "landmarks fixed file changed")


def test_a_mask_added(pair_yaml, run_cli, tmp_path) -> None:
    pair, sdir = _tuned(pair_yaml, run_cli, tmp_path)
    fixed = sitk.ReadImage(str(pair.parent / "fixed.png"))
    mask = sitk.Image(fixed.GetSize(), sitk.sitkUInt8) + 1
    mask.CopyInformation(fixed)
    sitk.WriteImage(mask, str(pair.parent / "mask.png"))
    _edit(pair, masks={"fixed": "mask.png"})
    _refused(run_cli("tune", pair, "--trials", "4", "--study-dir", sdir), "masks.fixed", "was added")


def test_changed_stages_and_objective(pair_yaml, run_cli, tmp_path) -> None:
    pair, sdir = _tuned(pair_yaml, run_cli, tmp_path)
    _edit(pair, stages=["affine"])
    _every_command(run_cli, pair, sdir, tmp_path, "stages", "['rigid']", "['affine']")
    _edit(pair, stages=["rigid"], objective={"aggregate": "worst"})
    _every_command(run_cli, pair, sdir, tmp_path, "objective", "aggregate")


def test_the_suggested_way_out_works_and_unchanged_inputs_resume(pair_yaml, run_cli, tmp_path) -> None:
    pair, sdir = _tuned(pair_yaml, run_cli, tmp_path)
    assert run_cli("tune", pair, "--trials", "3", "--jobs", "1", "-q", "--study-dir", sdir).code == 0
    _edit(pair, stages=["affine"])
    assert run_cli("tune", pair, "--trials", "2", "--jobs", "1", "-q", "--study-dir", tmp_path / "new").code == 0
    _edit(pair, name="other")
    assert run_cli("tune", pair, "--trials", "2", "--jobs", "1", "-q", "--study-dir", sdir).code == 0


def test_a_study_without_a_record_gets_one_on_resume(pair_yaml, run_cli, tmp_path) -> None:
    """Studies made before identities were recorded keep working; the first resume records the inputs."""
    pair, sdir = _tuned(pair_yaml, run_cli, tmp_path)
    journal = sdir / "journal.log"
    kept = [
        line
        for line in journal.read_text().splitlines()
        if not (json.loads(line)["op_code"] == 2 and "identity" in json.loads(line).get("user_attr", {}))
    ]
    journal.write_text("\n".join(kept) + "\n")
    assert run_cli("export", pair, "--study-dir", sdir, "-o", tmp_path / "r.yaml", "--repeats", "0").code == 0
    assert "identity" not in journal.read_text()  # reading does not record
    assert run_cli("tune", pair, "--trials", "3", "--jobs", "1", "-q", "--study-dir", sdir).code == 0
    assert "identity" in journal.read_text()
    _edit(pair, objective={"aggregate": "worst"})
    _refused(run_cli("export", pair, "--study-dir", sdir, "-o", tmp_path / "r.yaml"), "objective")


@pytest.mark.parametrize("what", ["pair_added", "pair_removed"])
def test_pairs_added_or_removed(what: str, pair_yaml, run_cli, tmp_path) -> None:
    pair = pair_yaml(extra=FAST)
    doc = yaml.safe_load(pair.read_text())
    one = {k: doc.pop(k) for k in ("fixed", "moving", "landmarks")}
    doc["pairs"] = [{"name": "a", **one}, {"name": "b", **one}] if what == "pair_removed" else [{"name": "a", **one}]
    pair.write_text(yaml.safe_dump(doc))
    sdir = tmp_path / "s"
    assert run_cli("tune", pair, "--trials", "2", "--jobs", "1", "-q", "--study-dir", sdir).code == 0
    doc["pairs"] = [{"name": "a", **one}] if what == "pair_removed" else [{"name": "a", **one}, {"name": "b", **one}]
    pair.write_text(yaml.safe_dump(doc))
    result = run_cli("tune", pair, "--trials", "3", "--study-dir", sdir)
    _refused(result, "pairs" if what == "pair_removed" else "pairs[1].name", "'b'")
