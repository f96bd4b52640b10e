"""The offline report and the artifacts behind it: real registrations on small synthetic pairs, one real pair."""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import SimpleITK as sitk
import yaml
from conftest import real_pair_yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState, create_trial
from plotly.offline import get_plotlyjs

from autoreg.artifacts import ArtifactRecorder, artifact_store, trial_artifacts
from autoreg.cli import main
from autoreg.images import GAP_PIXELS, VIEW_PIXELS, comparison_rgb, landmark_centre, png_bytes, views
from autoreg.report import render_html, report_data, step_labels
from autoreg.scoring import tre
from autoreg.synthetic import make_pair, write_pair

TRIAL_TIMEOUT = 30.0
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class Run:
    code: int
    out: str
    err: str


def cli(*argv: Any) -> Run:
    """``autoreg.cli.main`` in-process with its output captured (usable from module-scoped fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return Run(code, out.getvalue(), err.getvalue())


def write_pair_yaml(
    folder: Path,
    *,
    size: tuple[int, ...] = (96, 96),
    name: str = "syn",
    seed: int = 0,
    stages: tuple[str, ...] = ("affine",),
) -> Path:
    """A synthetic affine pair with landmarks and its PAIR.yaml; returns the yaml's path."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = write_pair(
        make_pair(size, transform="affine", seed=seed), folder, fmt="png" if len(size) == 2 else "nii.gz"
    )
    doc = {
        "name": name,
        "fixed": paths["fixed"].name,
        "moving": paths["moving"].name,
        "landmarks": {"fixed": paths["fixed_landmarks"].name, "moving": paths["moving_landmarks"].name},
        "stages": list(stages),
        "trial_timeout": TRIAL_TIMEOUT,
    }
    path = folder / "PAIR.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def open_study(study_dir: Path, name: str = "syn") -> optuna.Study:
    journal = study_dir / "journal.log"
    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(journal))))


@dataclass
class Reported:
    pair: Path
    study_dir: Path
    html_path: Path
    tune: Run
    report: Run


@pytest.fixture(scope="module")
def reported(tmp_path_factory: pytest.TempPathFactory) -> Reported:
    """A 96x96 affine pair tuned for 10 trials in one worker, and its report."""
    root = tmp_path_factory.mktemp("report")
    pair = write_pair_yaml(root / "data")
    study_dir = root / "study"
    run = cli("tune", pair, "--trials", 10, "--jobs", 1, "--study-dir", study_dir, "-q")
    out = root / "report.html"
    rep = cli("report", pair, "--study-dir", study_dir, "-o", out)
    return Reported(pair, study_dir, out, run, rep)


def _improvers(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of the completed trials that beat every earlier completed one (one worker: completion order)."""
    best, out = np.inf, set()
    for t in sorted(trials, key=lambda t: t.datetime_complete or t.datetime_start):
        if t.state == TrialState.COMPLETE and t.value is not None and t.value < best:
            best = t.value
            out.add(t.number)
    return out


# --- artifacts ----------------------------------------------------------------------------------------------------


def test_improving_trials_and_only_they_store_transform_picture_and_tre(reported: Reported) -> None:
    assert reported.tune.code == 0, reported.tune.err
    study = open_study(reported.study_dir)
    trials = study.get_trials()
    improvers = _improvers(trials)
    assert 0 in improvers  # the default recipe is the first completed trial
    for t in trials:
        names = set(trial_artifacts(study, t))
        if t.number in improvers:
            assert names == {"transform-syn.tfm", "alignment-syn.png", "tre-syn.csv"}, t.number
        else:
            assert names == set(), t.number


def test_stored_transform_and_tre_csv_reproduce_the_trial_score(reported: Reported, tmp_path: Path) -> None:

    study = open_study(reported.study_dir)
    best = study.best_trial
    store = artifact_store(reported.study_dir)
    files = trial_artifacts(study, best)
    for name, artifact_id in files.items():
        with store.open_reader(artifact_id) as fh:
            (tmp_path / name).write_bytes(fh.read())
    from autoreg.pipeline import Pipeline

    pair = Pipeline.load(reported.pair).pairs[0]  # as the trials saw it: the selection landmarks
    tx = sitk.ReadTransform(str(tmp_path / "transform-syn.tfm"))
    assert tre(tx, pair.fixed_points, pair.moving_points, pair.fixed).mean == pytest.approx(best.value, rel=1e-6)
    with open(tmp_path / "tre-syn.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(pair.fixed_points) + len(pair.report_rows)  # every landmark, numbered as in its files
    assert [int(r["landmark"]) for r in rows] == list(range(1, len(rows) + 1))
    assert list(rows[0]) == ["landmark", "fixed_x", "fixed_y", "moving_x", "moving_y", "tre_before", "tre_after", "set"]
    selected = [float(r["tre_after"]) for r in rows if r["set"] == "select"]
    reported_only = [float(r["tre_after"]) for r in rows if r["set"] == "report"]
    assert np.mean(selected) == pytest.approx(best.value, rel=1e-4)
    assert np.mean(reported_only) == pytest.approx(best.user_attrs["tre_report_mean"], rel=1e-4)
    assert np.mean([float(r["tre_before"]) for r in rows]) > best.value
    png = sitk.ReadImage(str(tmp_path / "alignment-syn.png"))
    assert png.GetNumberOfComponentsPerPixel() == 3 and min(png.GetSize()) >= 100


def test_recorder_skips_non_improving_values_and_raises_only_for_a_lost_storage(
    reported: Reported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "study"
    shutil.copytree(reported.study_dir, copy)
    study = open_study(copy)
    recorder = ArtifactRecorder(copy)
    trial = study.ask()
    try:
        assert (
            recorder.record_if_improved(
                study, trial, study.best_value + 1.0, [], {"syn": sitk.Transform(2, sitk.sitkIdentity)}
            )
            == []
        )
        assert recorder.record_if_improved(study, trial, float("nan"), [], {"syn": sitk.Transform()}) == []
        # an improving value with a broken pair object: logged, not raised
        assert recorder.record_if_improved(study, trial, -1.0, [object()], {"syn": sitk.Transform()}) == []  # type: ignore[list-item]

        # a database that stopped answering is not a picture problem: tell would fail too, so it propagates
        def lost(*args: object, **kwargs: object) -> list[str]:
            raise optuna.exceptions.StorageInternalError("server closed the connection")

        monkeypatch.setattr(recorder, "record", lost)
        with pytest.raises(optuna.exceptions.StorageInternalError):
            recorder.record_if_improved(study, trial, -1.0, [], {"syn": sitk.Transform(2, sitk.sitkIdentity)})
    finally:
        study.tell(trial, state=TrialState.FAIL)


# --- the report file ------------------------------------------------------------------------------------------------


def test_report_is_one_offline_file_with_every_section(reported: Reported) -> None:
    assert reported.report.code == 0, reported.report.err
    assert str(reported.html_path) in reported.report.out
    text = reported.html_path.read_text(encoding="utf-8")
    plotly_js = get_plotlyjs()
    assert text.count(plotly_js) == 1 and text.count("* plotly.js v") == 1  # inlined once
    ours = text.replace(plotly_js, "")
    assert not re.search(r"<script[^>]+src=", ours)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", ours)  # nothing loaded from the network
    for div in ("history", "intermediate", "importances", "slice-0", "tre-0"):
        assert f'id="{div}"' in text, div
    assert "default recipe" in text
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', ours)
    assert len(images) == 2  # before and after
    # a 2D PNG pair has no physical geometry: its lengths are pixels, and the page says so
    assert "TRE (px" in ours and "tre_after (px)" in ours and "tre_mean (px)" in ours and "(mm)" not in ours
    assert all(base64.b64decode(i).startswith(PNG_SIGNATURE) for i in images)
    assert "autoreg_recipe: 2" in text and "Best recipe" in text
    assert "stored with trial" in text  # the transform came from the artifacts, not a new registration


def test_report_data_matches_the_study(reported: Reported) -> None:
    study = open_study(reported.study_dir)
    data = report_data(study, pair_names=["syn"])
    assert data.best is not None and data.best.value == pytest.approx(study.best_value)
    assert data.baseline is not None and data.baseline.number == 0 and data.baseline.role == "baseline"
    assert sum(data.counts.values()) == len(study.trials) == 10
    assert data.stages == ["affine"]
    steps = {s for t in data.trials for s in t.intermediate}
    assert steps and steps <= set(data.step_labels)
    assert data.step_labels[0] == "stage 0 affine · coarsest level"
    # several pairs and stages: step = (pair * n_stages + stage) * 3 + {0: coarsest level, 1: before the finest, 2: end}
    assert step_labels(["rigid", "bspline"], ["a"])[5] == "stage 1 bspline · end"
    assert step_labels(["rigid", "bspline"], ["a"])[4] == "stage 1 bspline · before the finest level"
    # several pairs: each pair's whole score is one step (the Wilcoxon pruner's instance)
    assert step_labels(["rigid", "bspline"], ["a", "b"]) == {0: "a (whole pair)", 1: "b (whole pair)"}
    assert data.importances is not None and all(v >= 0 for v in data.importances.values())


def test_failed_and_pruned_trials_are_grouped_by_reason() -> None:
    from autoreg.report.render import trial_table
    from autoreg.trial import FOLDING_CONSTRAINT

    study = optuna.create_study(study_name="groups", direction="minimize")
    dist = {"x": FloatDistribution(0, 1)}
    study.add_trial(create_trial(params={"x": 0.5}, distributions=dist, value=3.0, user_attrs={"role": "baseline"}))
    for reason in ("joint PDF summed to zero", "joint PDF summed to zero", "time limit"):
        study.add_trial(
            create_trial(
                state=TrialState.FAIL, params={"x": 0.1}, distributions=dist, user_attrs={"fail_reason": reason}
            )
        )
    study.add_trial(
        create_trial(
            state=TrialState.PRUNED,
            params={"x": 0.9},
            distributions=dist,
            intermediate_values={0: 9.0},
            user_attrs={"pruned_at": "stage 0 level 0"},
        )
    )
    few = report_data(study)
    assert few.importances is None and "at least 2 completed trials" in (few.importance_note or "")
    assert "at least 2 completed trials" in render_html(few)
    folded = create_trial(  # complete but over the folding limit: it can never be the best, and the report says why
        params={"x": 0.2}, distributions=dist, value=0.5, user_attrs={"folding_fraction": 0.179}
    )
    folded.set_constraint(FOLDING_CONSTRAINT, 17.8)
    study.add_trial(folded)
    data = report_data(study)
    assert [(g.state, g.reason, g.trials) for g in data.groups] == [
        ("FAIL", "joint PDF summed to zero", (1, 2)),
        ("COMPLETE", "infeasible: folds past the study's max_folding_percent", (5,)),
        ("FAIL", "time limit", (3,)),
        ("PRUNED", "pruned at stage 0 level 0", (4,)),
    ]
    assert data.best is not None and data.best.number == 0
    text = render_html(data)
    assert "joint PDF summed to zero" in text
    assert "<td>infeasible</td>" in text
    header, rows = trial_table(data)
    assert header[4] == "folded (%)" and rows[5][4] == pytest.approx(17.9) and rows[0][4] is None


def test_every_text_is_escaped() -> None:
    evil = "<img src=x onerror=alert(1)>"
    study = optuna.create_study(study_name=f"s{evil}", direction="minimize")
    study.set_user_attr("stages", [evil])
    dist = {evil: FloatDistribution(0, 1)}
    for i, v in enumerate((2.0, 1.0, 3.0)):
        study.add_trial(
            create_trial(
                params={evil: i / 3},
                distributions=dist,
                value=v,
                intermediate_values={0: v + 1},
                user_attrs={"fail_reason": evil},
            )
        )
    study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"fail_reason": f"</script>{evil}"}))
    text = render_html(report_data(study, pair_names=[evil, "b"]))
    assert evil not in text and "</script><img" not in text
    assert html_escaped(evil) in text


def html_escaped(s: str) -> str:
    import html

    return html.escape(s)


def test_report_without_stored_artifacts_registers_the_best_recipe_again(reported: Reported, tmp_path: Path) -> None:
    copy = tmp_path / "study"
    shutil.copytree(reported.study_dir, copy)
    shutil.rmtree(copy / "artifacts")  # a study tuned before artifacts existed, or files removed
    out = tmp_path / "r.html"
    run = cli("report", reported.pair, "--study-dir", copy, "-o", out)
    assert run.code == 0, run.err
    text = out.read_text(encoding="utf-8")
    assert "recipe registered again (no stored transform)" in text
    assert len(re.findall(r'<img alt="[^"]*" src="data:image/png;base64,', text)) == 2
    assert 'id="tre-0"' in text


def test_report_of_a_holdout_study_has_pictures_but_no_landmark_table(tmp_path: Path) -> None:
    pair = write_pair_yaml(tmp_path / "data", size=(64, 64), name="hold")
    doc = yaml.safe_load(pair.read_text(encoding="utf-8"))
    del doc["landmarks"]
    pair.write_text(yaml.safe_dump(doc), encoding="utf-8")
    assert cli("tune", pair, "--trials", 3, "--jobs", 1, "--study-dir", tmp_path / "study", "-q").code == 0
    out = tmp_path / "r.html"
    run = cli("report", pair, "--study-dir", tmp_path / "study", "-o", out)
    assert run.code == 0, run.err
    text = out.read_text(encoding="utf-8")
    assert 'id="tre-0"' not in text and "No landmarks" in text
    assert len(re.findall(r'<img alt="[^"]*" src="data:image/png;base64,', text)) == 2
    study = open_study(tmp_path / "study", "hold")
    assert set(trial_artifacts(study, study.trials[0])) == {"transform-hold.tfm", "alignment-hold.png"}


def test_3d_study_stores_three_slice_pictures(tmp_path: Path) -> None:
    pair = write_pair_yaml(tmp_path / "data", size=(32, 32, 32), name="vol", stages=("rigid",))
    assert cli("tune", pair, "--trials", 2, "--jobs", 1, "--study-dir", tmp_path / "study", "-q").code == 0
    study = open_study(tmp_path / "study", "vol")
    files = trial_artifacts(study, study.trials[0])
    with artifact_store(tmp_path / "study").open_reader(files["alignment-vol.png"]) as fh:
        (tmp_path / "a.png").write_bytes(fh.read())
    rgb = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "a.png")))
    # three rows (axial, coronal, sagittal) of square 320-pixel views, two panels each, 4-pixel gaps
    assert rgb.shape == (3 * VIEW_PIXELS + 2 * GAP_PIXELS, 2 * VIEW_PIXELS + GAP_PIXELS, 3)

    # the report shows each slice before and after, named by its axis and its index in the fixed image
    out = tmp_path / "r.html"
    run = cli("report", pair, "--study-dir", tmp_path / "study", "-o", out)
    assert run.code == 0, run.err
    text = out.read_text(encoding="utf-8")
    from autoreg.config import load_config
    from autoreg.data import load_pair

    loaded = load_pair(load_config(pair).pairs[0])
    i, j, k = (
        int(round(c))
        for c in loaded.fixed.TransformPhysicalPointToContinuousIndex(
            landmark_centre(loaded.fixed, loaded.fixed_points)
        )
    )
    labels = [f"axial z={k}", f"coronal y={j}", f"sagittal x={i}"]
    alts = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,', text)
    assert alts == [
        f"vol {label} {what}"
        for label in labels
        for what in ("before registration (identity)", "after the best recipe")
    ]
    for label in labels:
        assert f'<h4 class="view">{label} <span class="muted">(slice' in text, label
    assert "of 0–31 along the fixed image's z index" in text
    # a NIfTI volume has physical geometry: millimetres
    ours = text.replace(get_plotlyjs(), "")
    assert "TRE (mm" in ours and "tre_after (mm)" in ours and "(px)" not in ours


def test_report_before_tune_is_one_clear_error(tmp_path: Path) -> None:
    pair = write_pair_yaml(tmp_path / "data", size=(48, 48))
    run = cli("report", pair, "--study-dir", tmp_path / "none", "-o", tmp_path / "r.html")
    assert run.code == 2
    lines = [ln for ln in run.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no study found" in lines[0] and "autoreg tune" in lines[0]
    assert not (tmp_path / "r.html").exists()


# --- images -----------------------------------------------------------------------------------------------------


def test_png_bytes_round_trip_through_simpleitk(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, size=(17, 23, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    path.write_bytes(png_bytes(rgb))
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    np.testing.assert_array_equal(back, rgb)


def test_3d_pictures_are_three_slices_through_the_landmarks_centre() -> None:
    pair = make_pair((40, 36, 32), transform="affine", seed=0)
    fixed = sitk.Image(pair.fixed)
    fixed.SetSpacing((1.0, 1.0, 2.0))  # anisotropic: views must still have square pixels
    moving = sitk.Image(pair.moving)
    moving.SetSpacing((1.0, 1.0, 2.0))
    vs = views(fixed, moving, None, pair.fixed_points)
    assert [v.name for v in vs] == ["axial", "coronal", "sagittal"]
    # one pixel size for all views (the z extent, 31 x 2 mm, spans VIEW_PIXELS), square pixels in each
    pixel = 62.0 / (VIEW_PIXELS - 1)
    along = {"x": int(39 / pixel) + 1, "y": int(35 / pixel) + 1, "z": VIEW_PIXELS}
    assert vs[0].fixed.shape == (along["y"], along["x"])
    assert vs[1].fixed.shape == (along["z"], along["x"])
    assert vs[2].fixed.shape == (along["z"], along["y"])
    for v in vs:
        assert v.fixed.shape == v.moving.shape and np.isfinite(v.fixed).all()
    centre = landmark_centre(fixed, pair.fixed_points)
    np.testing.assert_allclose(centre, np.mean(pair.fixed_points, axis=0))
    rgb = comparison_rgb(fixed, moving, None, pair.fixed_points)
    assert rgb.ndim == 3 and rgb.shape[2] == 3
    assert rgb.shape[0] == sum(v.fixed.shape[0] for v in vs) + 2 * GAP_PIXELS
    assert rgb.shape[1] == max(2 * v.fixed.shape[1] for v in vs) + GAP_PIXELS


def test_colour_overlay_of_identical_images_is_grey() -> None:
    pair = make_pair((64, 64), transform="affine", seed=2)
    rgb = comparison_rgb(pair.fixed, pair.fixed)
    overlay = rgb[:, rgb.shape[1] // 2 + 4 :]  # right panel
    assert np.abs(overlay[..., 0].astype(int) - overlay[..., 1]).max() <= 1
    moved = comparison_rgb(pair.fixed, pair.moving)[:, rgb.shape[1] // 2 + 4 :]
    assert np.abs(moved[..., 0].astype(int) - moved[..., 1]).max() > 100  # misaligned: colour shows


# --- a real pair ------------------------------------------------------------------------------------------------


def test_report_on_a_real_brain_pair(shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / "itk_brain_t1_pd_shift13x17"
    pair = real_pair_yaml(folder, tmp_path / "PAIR.yaml", name="brain", stages=["rigid"], trial_timeout=TRIAL_TIMEOUT)
    run = cli("tune", pair, "--trials", 4, "--jobs", 1, "--study-dir", tmp_path / "study", "-q")
    assert run.code == 0, run.err
    out = tmp_path / "brain.html"
    rep = cli("report", pair, "--study-dir", tmp_path / "study", "-o", out)
    assert rep.code == 0, rep.err
    text = out.read_text(encoding="utf-8")
    assert len(re.findall(r'<img alt="[^"]*" src="data:image/png;base64,', text)) == 2
    landmark_table = text.split('<table class="landmarks">', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr>(.*?)</tr>", landmark_table, re.S)
    assert len(rows) == 91 + 1  # the header and one row per landmark
    # over the landmarks it selected with, the table's mean TRE after the best recipe is the best trial's score, and
    # over the others its honest score, in px (PNG files carry no spacing)
    study = open_study(tmp_path / "study", "brain")
    header = re.findall(r"<th>(.*?)</th>", rows[0])
    assert header.index("set") == header.index("tre_after (px)") + 1  # a label, not a length: no unit
    cells = [re.findall(r"<td>(.*?)</td>", r) for r in rows[1:]]
    after = {
        which: [float(c[header.index("tre_after (px)")]) for c in cells if c[header.index("set")] == which]
        for which in ("select", "report")
    }
    assert len(after["report"]) == 30 and len(after["select"]) == 61
    assert np.mean(after["select"]) == pytest.approx(study.best_value, rel=1e-3)
    assert np.mean(after["report"]) == pytest.approx(study.best_trial.user_attrs["tre_report_mean"], rel=1e-3)


# --- figures, units and the template ----------------------------------------------------------------------------


def _study_with_costs(n: int = 8, *, conditional: bool = False) -> optuna.Study:
    """An in-memory study: trial 0 the baseline, costs recorded, one pruned trial; optionally a conditional param."""
    study = optuna.create_study(study_name="figs", direction="minimize")
    study.set_user_attr("stages", ["affine"])
    study.set_user_attr("objective", "tre_mean")
    rng = np.random.default_rng(1)
    for i in range(n):
        metric = "mattes" if i % 2 else "correlation"
        params: dict[str, Any] = {"lr": float(rng.uniform(0.1, 2)), "metric": metric}
        dists: dict[str, Any] = {
            "lr": FloatDistribution(0.1, 2, log=True),
            "metric": CategoricalDistribution(["mattes", "correlation"]),
        }
        if conditional and metric == "mattes":
            params["bins"] = float(rng.uniform(16, 64))
            dists["bins"] = FloatDistribution(16, 64)
        attrs = {
            "role": "baseline" if i == 0 else "suggested",
            "runtime_s": 1.0 + i,
            "predicted_s": 2.0,
            "time_limit_s": 30.0,
        }
        state = TrialState.PRUNED if i == n - 1 else TrialState.COMPLETE
        value = {"value": float(3.0 - i * 0.2 + rng.uniform(0, 0.1))} if state == TrialState.COMPLETE else {}
        study.add_trial(
            create_trial(
                state=state,
                params=params,
                distributions=dists,
                user_attrs=attrs,
                intermediate_values={0: 5.0 - i * 0.1, 2: 4.0 - i * 0.1},
                **value,
            )
        )
    return study


def test_history_is_optunas_plot_with_the_baseline_added() -> None:
    from optuna.visualization import plot_optimization_history

    from autoreg.report.figures import history_figure

    study = _study_with_costs()
    data = report_data(study, pair_names=["a"])
    fig = history_figure(data)
    ours = {t.name: t for t in fig.data}
    theirs = plot_optimization_history(study).data[0]
    assert list(ours["completed trial"].x) == list(theirs.x) and list(ours["completed trial"].y) == list(theirs.y)
    star = ours["default recipe (trial 0)"]
    assert list(star.x) == [0] and list(star.y) == [study.trials[0].value] and star.marker.symbol == "star"
    assert "pruned (last reported)" in ours and list(ours["pruned (last reported)"].x) == [7]
    # the cost fields reach the hover text
    assert "runtime 2 s, predicted 2 s, limit 30 s" in ours["completed trial"].text[1]


def test_intermediate_slice_and_importance_figures_mark_best_and_baseline() -> None:
    from autoreg.report.figures import importance_figure, intermediate_figure, slice_figure, slice_params

    data = report_data(_study_with_costs(), pair_names=["a"])
    fig = intermediate_figure(data)
    bold = {t.name: t.line.width for t in fig.data if t.line.width == 3}
    assert set(bold) == {"best trial", "default recipe"}
    assert list(fig.layout.xaxis.ticktext) == ["stage 0 affine · coarsest level", "stage 0 affine · end"]
    assert data.importances is not None
    bars = importance_figure(data).data[0]
    assert dict(zip(bars.y, bars.x)) == pytest.approx({k: v for k, v in data.importances.items() if v > 0})
    params = slice_params(data)
    assert set(params) <= {"lr", "metric"} and params
    for p in params:
        fig = slice_figure(data, p)
        levels = [s.y0 for s in fig.layout.shapes]
        assert levels == [pytest.approx(data.baseline.value)], p  # the default recipe's score as a dashed level
        assert [a.text for a in fig.layout.annotations] == ["default recipe"]


def test_figures_survive_few_trials_and_conditional_parameters() -> None:
    empty = optuna.create_study(study_name="empty")
    text = render_html(report_data(empty))
    assert 'id="history"' not in text and "No completed trial yet" in text
    one = _study_with_costs(1)  # only a pruned trial
    text = render_html(report_data(one))
    assert "at least 2 completed trials" in text
    two = _study_with_costs(2)  # one completed
    text = render_html(report_data(two))
    assert 'id="history"' in text and "at least 2 completed trials" in text
    cond = report_data(_study_with_costs(12, conditional=True))
    text = render_html(cond)
    assert 'id="history"' in text and 'id="slice-0"' in text
    assert cond.importances is not None or "could not be computed" in text


def test_trial_table_shows_the_recorded_costs_only_when_present() -> None:
    from autoreg.report.render import trial_table

    header, rows = trial_table(report_data(_study_with_costs(3)))
    assert header == ["trial", "state", "role", "tre_mean", "runtime_s", "predicted_s", "time_limit_s", "reason"]
    assert rows[0][:3] == [0, "complete", "baseline"] and rows[2][-1] == "pruned"
    bare = optuna.create_study()
    bare.add_trial(create_trial(value=1.0))
    header, _ = trial_table(report_data(bare))
    assert header == ["trial", "state", "role", "score", "reason"]


def test_landmark_bars_get_a_log_axis_when_before_and_after_differ_100x() -> None:
    from autoreg.report.data import LandmarkTable
    from autoreg.report.figures import landmark_figure

    def table(before: float, after: float) -> LandmarkTable:
        rows = [
            {"landmark": i + 1, "tre_before": before * (1 + i / 10), "tre_after": after * (1 + i / 10)}
            for i in range(5)
        ]
        return LandmarkTable("p", rows, baseline=[after * 3] * 5, unit="mm")

    far = landmark_figure(table(20.0, 0.2))
    assert far.layout.yaxis.type == "log" and far.layout.yaxis.title.text == "TRE (mm, log scale)"
    near = landmark_figure(table(2.0, 1.0))
    assert near.layout.yaxis.type != "log" and near.layout.yaxis.title.text == "TRE (mm)"
    assert [t.name for t in near.data] == ["before (identity)", "default recipe", "best recipe"]


def test_physical_unit_is_px_only_for_a_picture_without_geometry() -> None:
    from autoreg.images import physical_unit

    picture = sitk.Image(8, 8, sitk.sitkFloat32)
    assert physical_unit(picture) == "px"
    scanned = sitk.Image(picture)
    scanned.SetSpacing((0.5, 0.5))
    assert physical_unit(scanned) == "mm"
    shifted = sitk.Image(picture)
    shifted.SetOrigin((10.0, 0.0))
    assert physical_unit(shifted) == "mm"
    assert physical_unit(sitk.Image(8, 8, 8, sitk.sitkFloat32)) == "mm"  # a volume is in mm even at 1 mm spacing


def test_no_html_is_built_outside_the_template() -> None:
    """The page comes from the autoescaped Jinja2 template: no module of the report writes tags in Python strings
    (plotly's own hover markup, ``<br>`` and ``<extra>``, is not page HTML)."""
    import ast

    import autoreg.report as package
    from autoreg.report.render import TEMPLATE, environment

    env = environment()
    assert env.autoescape is True and TEMPLATE in env.list_templates()
    tag = re.compile(r"</?(?!br>|extra>)[a-zA-Z][a-zA-Z0-9]*[\s>/]")
    for path in Path(package.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}
        strings = [
            n
            for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
        ]  # f-strings included: their literal parts are constants too
        assert strings, path
        for node in strings:
            assert not tag.search(node.value), f"{path.name}:{node.lineno}: HTML in a string: {node.value[:60]!r}"
