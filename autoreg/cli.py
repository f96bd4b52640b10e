"""argv -> calls. The one place that prints and maps errors to exit codes (0 ok, 2 user error, 130 interrupted)."""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import SimpleITK as sitk

from . import __version__
from .config import SEED_LIMIT
from .errors import RegistrationFailed, UserError, excerpt, special_file
from .quiet import LIBRARY_LOG
from .tuning import DEFAULT_TRIALS, MAX_JOBS, MAX_TRIALS

if TYPE_CHECKING:
    from .trial import TrialRecord
    from .tuning import TuneResult

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
#: What a shell reports for a command whose reader went away (``autoreg check ... | head -1``): 128 + SIGPIPE.
EXIT_BROKEN_PIPE = 141
#: A failed registration's detail (where it stopped, ITK's message) is cut to this many characters of its line.
FAILURE_DETAIL_CHARS = 300

log = logging.getLogger("autoreg")


#: The ``--storage`` URL of this run: its password is hidden from every line printed (see ``study.redact``).
_storage_url: str | None = None


def _shown(text: str) -> str:
    if not _storage_url:
        return text
    from .study import redact

    return redact(text, _storage_url)


def _out(text: str = "") -> None:
    print(_shown(text), flush=True)


def _err(text: str) -> None:
    print(f"autoreg: {_shown(text)}", file=sys.stderr, flush=True)


class _RedactingFilter(logging.Filter):
    """Log records pass through the same redaction as printed lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        shown = _shown(text)
        if shown != text:
            record.msg, record.args = shown, None
        return True


# --- check -----------------------------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    """Everything ``tune`` would refuse is refused here, before any trial: the file, the data, the search overrides,
    the recipes to enqueue or warm-start from."""
    from .fingerprint import fingerprint_dataset
    from .pipeline import Pipeline
    from .registration import axis_factors
    from .space import pyramid_plan

    pipe = Pipeline.load(args.pair)
    cfg = pipe.cfg
    pipe.space  # noqa: B018 - builds (and so checks) the search space and its overrides on the tuning pairs
    starting = pipe.starting_points
    fp = fingerprint_dataset([*pipe.all_landmark_pairs, *pipe.holdout_pairs])
    _out(f"study {cfg.name}: {len(cfg.pairs)} pair(s)" + (f", {len(cfg.holdout)} holdout" if cfg.holdout else ""))
    objective = (
        "holdout NMI" if not cfg.uses_landmarks else "TRE relative to before registration" if cfg.relative else "TRE"
    )
    _out(f"stages: {' -> '.join(cfg.stages)}; objective: {objective} ({cfg.score_name})")
    n_warn = 0
    for p in fp.pairs:
        _out(f"\npair {p.name} ({p.dim}D)")
        for which, info in (("fixed", p.fixed), ("moving", p.moving)):
            _out(
                f"  {which:6s} size {_x(info.size)}  spacing {_x(info.spacing, '.4g')}  extent {_x(info.extent, '.4g')}"
                f"  intensity [{info.intensity_min:.4g}, {info.intensity_max:.4g}] (1-99%: {info.intensity_p01:.4g}"
                f"..{info.intensity_p99:.4g})"
            )
        _out(
            f"  overlap after initialization: geometry {p.overlap_geometry:.0%}, moments {p.overlap_moments:.0%}, "
            f"as the headers place them {p.overlap_identity:.0%} (the fixed image's share inside the moving one)"
        )
        for which, cov in (("fixed", p.fixed_mask_coverage), ("moving", p.moving_mask_coverage)):
            if cov is not None:
                _out(
                    f"  {which} mask: covers {cov.of_image:.1%} of the {which} image's voxels; "
                    f"{cov.inside_image:.1%} of the mask lies inside the image"
                )
        if p.n_landmarks:
            _out(
                f"  landmarks: {p.n_landmarks}; mean TRE before registration {p.tre_identity:.4g} (identity), "
                f"{p.tre_geometry:.4g} (geometry), {p.tre_moments:.4g} (moments)"
            )
        else:
            _out("  landmarks: none (the objective is the holdout metric)")
        factors = axis_factors(p.fixed.spacing, p.max_shrink, p.fixed.size)
        per_axis = "" if len(set(factors)) == 1 else f", per axis {'x'.join(map(str, factors))}"
        _out(f"  deepest pyramid: shrink {p.max_shrink}{per_axis} (keeps >= 16 voxels on every axis it shrinks)")
        for w in p.warnings:
            n_warn += 1
            _out(f"  warning: {w}")
    for name, split in pipe.split.items():
        counts = f"{split['select']} select, {len(split['report'])} report (never seen by the search)"
        _out(f"landmarks of {name}: {split.get('note') or counts}")
    for point in starting:
        _out(f"starting point {point.role}: {' -> '.join(point.recipe.kinds)}")
    plan = pyramid_plan(fp, pipe.cfg.stages)
    _out(f"\nthe search may use: {plan}")
    baseline_s = _baseline_seconds(pipe)
    if baseline_s is not None:
        _out(
            f"the baseline (trial 0, SimpleITK's default recipe) is predicted at about {_duration(baseline_s)} on one "
            "thread; it runs to its end as the study's reference, unless --timeout ends the study first"
        )
    _out(f"\nok ({n_warn} warning{'s' if n_warn != 1 else ''})")
    return EXIT_OK


#: ``check`` says how long the baseline will take when the uncalibrated cost model puts it above this.
SLOW_BASELINE_S = 60.0


def _baseline_seconds(pipe) -> float | None:
    """The baseline's seconds on one thread of this machine (measured coefficients, about 2 s to measure) where they
    pass ``SLOW_BASELINE_S`` (asked only where the default coefficients say so): on a CT-sized grid it takes many
    minutes (``benchmarks/ct_sized.py`` measures it against this prediction)."""
    from .cost import CostModel

    recipe = pipe.space.baseline_recipe()
    sizes = [p.fixed.GetSize() for p in pipe.pairs]
    if CostModel().predict(recipe, sizes) < SLOW_BASELINE_S:
        return None
    seconds = CostModel.calibrate(1).predict(recipe, sizes)
    return seconds if seconds >= SLOW_BASELINE_S else None


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _x(values, spec: str = "d") -> str:
    return "x".join(format(v, spec) for v in values)


# --- apply ------------------------------------------------------------------------------------------------------


def cmd_apply(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .data import check_recipe_fits, load_images, require_inside
    from .landmarks import read_landmarks
    from .quiet import captured_stderr
    from .recipe import load_recipe
    from .registration import register
    from .scoring import folding_fraction, has_deformable, tre

    recipe = load_recipe(args.recipe)
    if args.threads is not None:
        recipe = recipe.with_(threads=args.threads)
    if bool(args.fixed_landmarks) != bool(args.moving_landmarks):
        raise UserError("give both --fixed-landmarks and --moving-landmarks, or neither", key="--fixed-landmarks")
    if Path(args.transform_out).suffix.lower() not in TRANSFORM_SUFFIXES:
        raise UserError(f"expected a transform file ending in {', '.join(TRANSFORM_SUFFIXES)}", key="--transform-out")
    pair = load_images(args.fixed, args.moving, args.fixed_mask, args.moving_mask)
    if args.image_out and pair.dim == 3 and Path(args.image_out).suffix.lower() in _EIGHT_BIT:
        raise UserError(
            f"{Path(args.image_out).suffix} holds 2D images but the fixed image is 3D; use .nii.gz, .nrrd or .mha",
            key="--image-out",
        )
    for warning in check_recipe_fits(recipe, [pair], source=args.recipe):
        _err(f"warning: {warning}")
    fp = mp = None
    if args.fixed_landmarks:
        fp = read_landmarks(args.fixed_landmarks, image=pair.fixed, dim=pair.dim, key="--fixed-landmarks")
        mp = read_landmarks(args.moving_landmarks, image=pair.moving, dim=pair.dim, key="--moving-landmarks")
        if len(fp) != len(mp):
            raise UserError(f"{len(mp)} points but --fixed-landmarks has {len(fp)}", file=args.moving_landmarks)
        require_inside(fp, pair.fixed, which="fixed", source=args.fixed_landmarks, key="--fixed-landmarks")
        require_inside(mp, pair.moving, which="moving", source=args.moving_landmarks, key="--moving-landmarks")
        pair = replace(pair, fixed_points=fp, moving_points=mp)
    progress = _LevelProgress(recipe)
    try:
        result = register(recipe, pair, level_callback=progress)
    finally:
        progress.stop()
    out = Path(args.transform_out)
    try:
        with captured_stderr(f"writing {out}"):
            sitk.WriteTransform(result.transform, str(out))
    except RuntimeError as err:
        raise UserError(f"cannot write transform ({str(err).strip().splitlines()[-1]})", file=out) from None
    _out(f"registered in {result.seconds:.2f} s; transform (fixed -> moving points) written to {out}")
    for i, stop in enumerate(result.stop_conditions):
        _out(f"  stage {i} ({recipe.stages[i].kind}): {stop}")
    if fp is not None and mp is not None:
        before = tre(sitk.Transform(pair.dim, sitk.sitkIdentity), fp, mp, pair.fixed)
        after = tre(result.transform, fp, mp, pair.fixed)
        _out(
            f"  TRE mean {before.mean:.4g} -> {after.mean:.4g} "
            f"(median {after.median:.4g}, p90 {after.p90:.4g}, max {after.max:.4g})"
        )
    if has_deformable(result.transform):
        folded = folding_fraction(result.transform, pair.fixed)
        _out(f"  folded: {100 * folded:.3g} % of the fixed grid (Jacobian determinant <= 0)")
    if args.image_out:
        write_warped(pair, result.transform, Path(args.image_out))
        _out(f"  warped moving image written to {args.image_out}")
    return EXIT_OK


#: ``apply`` stays quiet for runs shorter than this; longer runs get a line when it passes, then one per level.
APPLY_PROGRESS_AFTER_S = 3.0


class _LevelProgress:
    """The level callback of ``apply``: quiet for a short run; once it has taken ``after`` seconds, a line saying so
    (from a timer, even in the middle of a level) and then a line per pyramid level."""

    def __init__(self, recipe, after: float | None = None) -> None:
        import threading
        import time

        self._after = APPLY_PROGRESS_AFTER_S if after is None else after
        self._t0 = time.monotonic()
        self._kinds = list(recipe.kinds)
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._shown = False
        self._timer = threading.Timer(self._after, self._show)
        self._timer.daemon = True
        self._timer.start()

    def _show(self) -> None:
        with self._lock:
            if not self._shown:
                self._shown = True
                _out(f"registering ({' -> '.join(self._kinds)}); a line per pyramid level as it ends:")
            for line in self._pending:
                _out(line)
            self._pending.clear()

    def __call__(self, record, _transform) -> None:
        import time

        line = (
            f"  stage {record.stage} ({record.transform}) level {record.level + 1} (shrink {record.shrink}): "
            f"{record.iterations} iterations, metric {record.metric_value:.4g}, {record.seconds:.1f} s"
        )
        if record.tre_mean is not None:
            line += f", TRE {record.tre_mean:.4g}"
        with self._lock:
            self._pending.append(line)
            due = self._shown or time.monotonic() - self._t0 >= self._after
        if due:
            self._show()

    def stop(self) -> None:
        self._timer.cancel()


_EIGHT_BIT = {".png", ".jpg", ".jpeg", ".bmp"}
#: What ITK's transform writers recognise: text (.tfm, .txt), HDF5 (.h5, .hdf5), MATLAB (.mat, linear only), MINC.
TRANSFORM_SUFFIXES = (".tfm", ".txt", ".h5", ".hdf5", ".mat", ".xfm")


def write_warped(pair, transform: sitk.Transform, path: Path) -> None:
    """The moving image resampled onto the fixed grid (8-bit formats get intensities clamped to 0..255)."""
    warped = sitk.Resample(pair.moving, pair.fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    if path.suffix.lower() in _EIGHT_BIT:
        warped = sitk.Cast(sitk.Clamp(warped, sitk.sitkFloat32, 0, 255), sitk.sitkUInt8)
    from .quiet import captured_stderr

    try:
        with captured_stderr(f"writing {path}"):
            sitk.WriteImage(warped, str(path))
    except RuntimeError as err:
        raise UserError(f"cannot write image ({str(err).strip().splitlines()[-1]})", file=path) from None


# --- tune / export -------------------------------------------------------------------------------------------


def _open_study_args(args: argparse.Namespace):
    from .config import load_config
    from .study import storage_spec, study_dir

    cfg = load_config(args.pair)
    directory = study_dir(cfg, args.study_dir)
    return cfg, directory, storage_spec(cfg, directory, args.storage)


def cmd_tune(args: argparse.Namespace) -> int:
    from .progress import terminal
    from .tuning import run_tune

    def show(event) -> None:
        if not args.quiet or event.kind in ("reaped", "requeued", "cluster"):
            _out(event.text)

    result = run_tune(
        args.pair,
        trials=args.trials,
        timeout=args.timeout,
        jobs=args.jobs,
        seed=args.seed,
        study_dir=args.study_dir,
        storage=args.storage,
        dask_scheduler=getattr(args, "dask_scheduler", None),
        warm_start=args.warm_start or (),
        progress=show,
        console=None if args.quiet else terminal(),
    )
    snap, best, base = result.snapshot, result.best, result.baseline
    _out(
        f"{'interrupted' if result.interrupted else 'done'}: {snap.finished} trials ({snap.complete} complete, "
        f"{snap.failed} failed, {snap.pruned} pruned"
        f"{f', {snap.not_run} not run: predicted too slow for their share of --timeout' if snap.not_run else ''}"
        f"{f', {snap.interrupted} interrupted by Ctrl-C or the --timeout, not counted' if snap.interrupted else ''}"
        f"), {result.seconds:.1f} s this run"
    )
    if result.aborted:
        _out(f"trial(s) {result.aborted} did not stop within {_grace()} s of Ctrl-C: failed as interrupted")
    if result.cut_by_skips:
        _out(
            f"the study reached --trials {result.target} early: {snap.not_run} suggestions were predicted too slow for "
            f"their share of the time left, and at most {result.target} of them give their place to another; a longer "
            "--timeout or fewer --trials gives each trial more time"
        )
    metric, unit = result.metric, result.unit
    _out(
        f"best {metric}: {_valued(best.value, unit)} (trial {best.number})" if best else "best: no completed trial yet"
    )
    if best is not None:
        _folding_summary(result, best)
    if best is not None and best.tre_report_mean is not None:
        _out(
            f"honest score of the best: mean TRE {_valued(best.tre_report_mean, unit)} on the landmarks the search "
            f"never saw ({_valued(best.tre_mean, unit)} on those it selected with)"
        )
    if base is not None:
        worse = _worse_than_before(base.value, result.before, unit)
        _out(f"baseline (SimpleITK-notebooks default) {metric}: {_baseline_summary(base, unit)}{worse}")
    if result.before is not None:
        _out(f"before registration (the identity) {metric}: {_valued(result.before, unit)}")
        if best is not None and best.value > result.before:
            _err(f"warning: no trial ended below the {metric} before registration: every recipe made it worse")
    for h in result.holdout:
        _out(f"holdout {h.name}: {h.metric} {f'{h.value:.4g}' if h.value is not None else f'failed ({h.failure})'}")
    _out(f"study: {result.directory} (storage {result.storage.display})")
    if result.interrupted:
        _out("finished trials are kept; run the same command again to continue")
        return EXIT_INTERRUPTED
    if best is None and snap.finished:
        _err(f"registration failed: no trial of the study completed ({_why_none_completed(result.study)})")
        return EXIT_FAILED
    return EXIT_OK


def _why_none_completed(study) -> str:
    """The commonest reasons the study's trials ended without a score, with their counts."""
    from collections import Counter

    from .trial import TIME_LIMIT, records

    def reason(t) -> str:
        if t.fail_reason:
            return t.fail_reason
        if t.pruned_at and t.pruned_at.startswith(TIME_LIMIT):
            return f"cut at its {TIME_LIMIT}"  # whatever the limit was: one reason
        return f"pruned at {t.pruned_at.split(' (')[0]}" if t.pruned_at else "pruned"

    ended = [t for t in records(study) if t.state in ("FAIL", "PRUNED")]
    counts = Counter(reason(t) for t in ended)
    return "; ".join(f"{why}: {n} of {len(ended)}" for why, n in counts.most_common(3))


def _folding_summary(result: TuneResult, best: TrialRecord) -> None:
    """Say when the folding limit decided which trial is the best (``trial.best_and_baseline``)."""
    from .trial import records

    limit = result.config.objective.max_folding_percent
    folded = [t for t in records(result.study) if t.complete and not t.feasible]
    if not best.feasible:
        _out(
            f"no trial stayed within objective.max_folding_percent ({limit:g} %): the best folds "
            f"{100 * (best.folding_fraction or 0.0):.3g} % of the voxels"
        )
    elif lower := sum(t.value < best.value for t in folded):
        _out(f"{lower} trial(s) scored lower but fold more than {limit:g} % of the voxels: not chosen")


def _grace() -> str:
    from .tuning import GRACE_S

    return f"{GRACE_S:g}"


def _valued(value: float, unit: str | None) -> str:
    """A score with its unit where it has one (``progress.score_unit``)."""
    return f"{value:.4g} {unit}" if unit else f"{value:.4g}"


def _worse_than_before(value: float | None, before: float | None, unit: str | None) -> str:
    """A note for a score above the value with no registration: a reference that did harm is no reference."""
    if value is None or before is None or value <= before:
        return ""
    return f", worse than before registration ({_valued(before, unit)})"


def _baseline_summary(base, unit: str | None = None) -> str:
    """The baseline's score, or how it ended; cut by the clock, the TRE of the last level it finished."""
    if base.value is not None:
        return _valued(base.value, unit)
    if base.out_of_time:
        last = base.last_level_tre()
        done = (
            f"; TRE {_valued(last, unit)} after stage {base.levels[-1]['stage']} level {base.levels[-1]['level']}"
            if last is not None
            else "; no level finished"
        )
        return f"cut at its {base.pruned_at}{done}"
    return f"{base.state.lower()} ({base.fail_reason or base.pruned_at or ''})"


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_best, write_export

    cfg, directory, spec = _open_study_args(args)
    text, trial, lucky = export_best(cfg, spec, fmt=args.format, repeats=args.repeats, within=args.within)
    out = Path(args.output)
    try:
        write_export(out, text)
    except OSError as err:
        raise UserError(f"cannot write ({err.strerror})", file=out) from None
    speed = f", {trial.runtime_s:.3g} s per run" if args.within is not None and trial.runtime_s else ""
    _out(f"trial {trial.number} (score {trial.value:.4g}{speed}) written to {out} as {args.format}")
    if lucky:
        _err(f"warning: {lucky}")
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from .data import check_recipe_fits
    from .evaluate import evaluate
    from .pipeline import Pipeline
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe)
    pipe = Pipeline.load(args.pair)
    cfg = pipe.cfg
    specs = list(cfg.holdout) if args.holdout_only else [*cfg.pairs, *cfg.holdout]
    if not specs:
        raise UserError("no holdout pairs in the file", file=cfg.path, key="holdout")
    # every landmark, not only those the search selected with
    pairs = pipe.holdout_pairs if args.holdout_only else [*pipe.all_landmark_pairs, *pipe.holdout_pairs]
    for warning in check_recipe_fits(recipe, pairs, source=args.recipe):
        _err(f"warning: {warning}")
    ev = evaluate(
        recipe, pairs, repeats=args.repeats, use_landmarks=cfg.uses_landmarks, deterministic=args.deterministic
    )
    tuned_on = {p.get("name") for p in ((recipe.provenance or {}).get("fingerprint") or {}).get("pairs", [])}
    mode = "deterministic (1 thread, the recipe's seed)" if args.deterministic else "sampling seeds varied"
    _out(f"{ev.metric} of {args.recipe} over {args.repeats} repeat(s), {mode}")
    _out(f"{'pair':32s} {'mean':>9s} {'std':>9s} {'min':>9s} {'max':>9s}  notes")
    for p, spec in zip(ev.pairs, specs):
        sp = p.spread
        notes = []
        if spec in cfg.holdout:
            notes.append("holdout")
        if p.name in tuned_on:
            notes.append("tuned on")
        if p.folding is not None:
            limit = cfg.objective.max_folding_percent
            over = f", over objective.max_folding_percent ({limit:g} %)" if 100 * p.folding > limit else ""
            notes.append(f"folds {100 * p.folding:.3g} % of the fixed grid{over}")
        if p.failures:
            notes.append(f"{len(p.failures)} failed: {'; '.join(sorted(set(p.failures)))}")
        _out(
            f"{p.name:32s} {_num(sp['mean'])} {_num(sp['std'])} {_num(sp['min'])} {_num(sp['max'])}  {', '.join(notes)}"
        )
    o = ev.overall
    _out(f"{'overall (mean over pairs)':32s} {_num(o['mean'])} {_num(o['std'])} {_num(o['min'])} {_num(o['max'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(ev.as_dict(), indent=2), encoding="utf-8")
    return EXIT_FAILED if any(p.failures for p in ev.pairs) else EXIT_OK


def _num(v) -> str:
    return f"{v:9.4g}" if v is not None else f"{'-':>9s}"


# --- crossval ---------------------------------------------------------------------------------------------------


def cmd_crossval(args: argparse.Namespace) -> int:
    import json

    from .config import load_config
    from .crossval import crossval, table
    from .study import study_dir

    cfg = load_config(args.pair)
    out = Path(args.out) if args.out else study_dir(cfg, None) / "crossval"
    folds = args.folds or len(cfg.pairs)
    try:
        result = crossval(
            cfg.path,
            folds=folds,
            trials=args.trials,
            jobs=args.jobs or 1,
            seed=args.seed,
            out_dir=out,
            own=not args.no_own,
            progress=_out,
        )
    except KeyboardInterrupt:
        _out(f"interrupted: the folds' finished trials are kept in {out}; run the same command again to continue")
        return EXIT_INTERRUPTED
    for line in table(result):
        _out(line)
    _out(f"results: {out / 'crossval.json'}" + (f" and {args.json}" if args.json else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(result.as_dict(), indent=2), encoding="utf-8")
    return EXIT_OK


# --- report / dashboard -----------------------------------------------------------------------------------------


def cmd_report(args: argparse.Namespace) -> int:
    from .report import build_report, render_html

    cfg, directory, spec = _open_study_args(args)
    data = build_report(cfg, spec, directory)
    out = Path(args.output)
    try:
        out.write_text(render_html(data), encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot write ({err.strerror})", file=out) from None
    c = data.counts
    best = (
        f"best {data.objective} {_valued(data.best.value, data.objective_unit)} (trial {data.best.number})"
        if data.best
        else "no completed trial yet"
    )
    _out(
        f"report of {cfg.name} ({c.get('COMPLETE', 0)} complete, {c.get('PRUNED', 0)} pruned, "
        f"{c.get('FAIL', 0)} failed; "
        f"{best}) written to {out} ({out.stat().st_size / 1e6:.1f} MB)"
    )
    return EXIT_OK


def cmd_dashboard(args: argparse.Namespace) -> int:
    from .dashboard import dashboard_url, make_dashboard_server, serve_until_stopped

    cfg, directory, spec = _open_study_args(args)
    server = make_dashboard_server(cfg, spec, directory, host=args.host, port=args.port)
    _out(
        f"optuna-dashboard for study {cfg.name} (storage {spec.display}) at {dashboard_url(args.host, args.port)}; "
        "Ctrl-C stops it"
    )
    serve_until_stopped(server)
    _out("dashboard stopped")
    return EXIT_OK


# --- the parser -----------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line, like every other user error (argparse adds a usage block)."""

    def error(self, message: str) -> NoReturn:
        message = re.sub(r"^argument ([^:]+): ", r"\1: ", message)
        _err(f"error: {message} (see '{self.prog} --help')")
        self.exit(EXIT_USER_ERROR)


def _whole(low: int, high: int) -> Callable[[str], int]:
    """An ``argparse`` type: a whole number from ``low`` to ``high``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a whole number from {low} to {high} (got {excerpt(text)})"
            ) from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected a whole number from {low} to {high} (got {value})")
        return value

    return parse


def _seconds(text: str) -> float:
    """An ``argparse`` type: a finite, positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive, finite number of seconds (got {excerpt(text)})")
    return value


def _percent(text: str) -> float:
    """An ``argparse`` type: a finite percentage of 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a percentage of 0 or more (got {excerpt(text)})")
    return value


def _storage_url_text(text: str) -> str:
    """An ``argparse`` type: a storage URL or journal path, not blank (a blank one would mean the default silently)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a storage URL (e.g. postgresql://host/db) or a journal file path")
    return text


def _folder(text: str) -> Path:
    """An ``argparse`` type: a folder that exists or can be made (no file or device on its path)."""
    path = Path(text).expanduser()
    for part in (path, *path.parents):
        if part.exists() or part.is_symlink():
            if not part.is_dir():
                what = "a file" if part.is_file() else "a device or other special file"
                raise argparse.ArgumentTypeError(f"expected a folder; {excerpt(str(part))} is {what}")
            break
    return path


def _output_file(text: str) -> Path:
    """An ``argparse`` type: a file to write, in a folder that exists (checked before any work is done)."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"expected a file to write; {excerpt(text)} is a folder")
    parent = path.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(
            f"expected a file in an existing folder; {excerpt(str(parent), quote=False)} is not a folder"
        )
    special = special_file(path)
    if special:
        raise argparse.ArgumentTypeError(f"expected a file to write; {excerpt(text)} is {special}")
    # written only at the end of the work: find out now whether it can be (a read-only folder, /proc...)
    existed = path.exists()
    try:
        with path.open("a"):
            pass
    except OSError as err:
        raise argparse.ArgumentTypeError(f"cannot write {excerpt(text)} ({err.strerror})") from None
    if not existed:
        path.unlink(missing_ok=True)
    return path


#: Ranges of the numeric options: generous, but none that would start absurd work or wrap around.
MAX_REPEATS = 1000
MAX_THREADS = 1024


def _study_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--study-dir", type=_folder, help="folder of the study's files (default: studies/<name> beside PAIR.yaml)"
    )
    p.add_argument(
        "--storage",
        type=_storage_url_text,
        help="Optuna storage URL (e.g. postgresql://...) instead of the journal file",
    )


#: Each command's help ends with these command lines (the first one also goes into ``autoreg --help``).
EXAMPLES: dict[str, list[tuple[str, str]]] = {
    "check": [
        ("autoreg check pair.yaml", "sizes, spacings, overlap, TRE before registration, warnings"),
        ("autoreg -v check pair.yaml", "the same, with what the image libraries said"),
    ],
    "tune": [
        ("autoreg tune pair.yaml --trials 50", "run until the study holds 50 trials, on all cores"),
        ("autoreg tune pair.yaml --timeout 3600 --jobs 4", "4 workers for an hour"),
        ("autoreg tune pair.yaml --storage postgresql://user@host/db", "one study shared by several machines"),
        ("autoreg tune pair.yaml --trials 30 --warm-start library/", "start from earlier studies' recipes"),
    ],
    "crossval": [
        ("autoreg crossval dataset.yaml --trials 30", "leave-one-out over the dataset's pairs"),
        ("autoreg crossval dataset.yaml --folds 3 --trials 30 --json cv.json", "3 folds, results also as JSON"),
    ],
    "export": [
        ("autoreg export pair.yaml -o best.yaml", "the best trial as a recipe"),
        ("autoreg export pair.yaml -o best.py --format python", "a standalone SimpleITK script"),
        ("autoreg export pair.yaml -o best_elastix --format elastix", "elastix parameter maps, one per stage"),
        ("autoreg export pair.yaml -o fast.yaml --within 5", "the fastest recipe within 5 % of the best"),
    ],
    "evaluate": [
        ("autoreg evaluate best.yaml pair.yaml", "score the recipe on the file's pairs"),
        ("autoreg evaluate best.yaml other.yaml --repeats 5", "5 runs per pair: the run-to-run spread"),
        ("autoreg evaluate best.yaml pair.yaml --holdout-only --json scores.json", "only the 'holdout:' pairs"),
    ],
    "report": [
        ("autoreg report pair.yaml -o report.html", "one offline HTML file"),
        ("autoreg report pair.yaml --study-dir /data/studies/lung -o lung.html", "a study kept elsewhere"),
    ],
    "dashboard": [
        ("autoreg dashboard pair.yaml", "optuna-dashboard at http://127.0.0.1:8080"),
        ("autoreg dashboard pair.yaml --port 8090", "on another port"),
    ],
    "apply": [
        ("autoreg apply best.yaml --fixed f.nii.gz --moving m.nii.gz --transform-out t.tfm", "register one pair"),
        (
            "autoreg apply best.yaml --fixed f.png --moving m.png --transform-out t.tfm --image-out warped.png",
            "and write the moving image on the fixed grid",
        ),
        (
            "autoreg apply best.yaml --fixed ct_dir --moving mr_dir --transform-out t.tfm "
            "--fixed-landmarks f.csv --moving-landmarks m.csv",
            "DICOM folders, with the TRE printed",
        ),
    ],
}


def _example_lines(examples: list[tuple[str, str]]) -> str:
    return "\n".join(f"  {cmd}\n      {what}" for cmd, what in examples)


def _examples(command: str) -> dict:
    """``add_parser`` arguments giving a command's help its examples (kept as written: no re-wrapping)."""
    return {
        "epilog": f"examples:\n{_example_lines(EXAMPLES[command])}",
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }


_TOP_EXAMPLES = "examples (one per command; 'autoreg COMMAND --help' shows more):\n" + _example_lines(
    [(lines[0][0], lines[0][1]) for lines in EXAMPLES.values()]
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="autoreg",
        description="Tune SimpleITK registration recipes.",
        epilog=_TOP_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"autoreg {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("tune", help="create or resume the study and run trials", **_examples("tune"))
    p.add_argument("pair", help="PAIR.yaml")
    p.add_argument(
        "--trials",
        type=_whole(1, MAX_TRIALS),
        help=f"total trials in the study, all workers together (default {DEFAULT_TRIALS} without --timeout)",
    )
    p.add_argument("--timeout", type=_seconds, help="stop starting trials after this many seconds")
    p.add_argument("--jobs", type=_whole(1, MAX_JOBS), help="worker processes (default: all cores)")
    p.add_argument("--seed", type=_whole(0, SEED_LIMIT - 1), help="study seed (overrides PAIR.yaml's 'seed')")
    _study_args(p)
    p.add_argument(
        "--warm-start",
        action="append",
        metavar="RECIPE",
        help="an earlier study's recipe, or a folder of recipes, whose points start the search (repeatable)",
    )
    p.add_argument(
        "--dask-scheduler",
        metavar="ADDRESS",
        help="run the trials on the workers of this dask.distributed cluster (tcp://host:8786, or a "
        "scheduler file) instead of local processes; --jobs then caps how many of its workers take part",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no live progress, only the summary")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("export", help="write the best trial as a recipe", **_examples("export"))
    p.add_argument("pair", help="PAIR.yaml")
    _study_args(p)
    p.add_argument(
        "-o",
        "--output",
        type=_output_file,
        required=True,
        help="RECIPE.yaml; recipe.py with --format python; a folder of parameter maps with --format "
        "elastix; a shell script with --format ants",
    )
    p.add_argument("--format", choices=("yaml", "python", "elastix", "ants"), default="yaml")
    p.add_argument(
        "--repeats",
        type=_whole(0, MAX_REPEATS),
        default=3,
        help="re-run the best recipe this many times under other seeds and store the spread (0: skip)",
    )
    p.add_argument(
        "--within",
        type=_percent,
        metavar="PCT",
        help="the fastest recipe whose score is within PCT %% of the best, instead of the best",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "evaluate", help="score a recipe on pairs, repeated to show its run-to-run spread", **_examples("evaluate")
    )
    p.add_argument("recipe", help="RECIPE.yaml")
    p.add_argument("pair", help="PAIR.yaml whose pairs (and holdout pairs) to score")
    p.add_argument(
        "--repeats", type=_whole(1, MAX_REPEATS), default=1, help="runs per pair under different sampling seeds"
    )
    p.add_argument(
        "--deterministic", action="store_true", help="one thread and the recipe's own seed: repeats must be identical"
    )
    p.add_argument("--holdout-only", action="store_true", help="only the pairs under 'holdout:'")
    p.add_argument("--json", type=_output_file, help="also write the figures as JSON")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "crossval", help="tune on K-1 folds of a dataset's pairs, score the held-out fold", **_examples("crossval")
    )
    p.add_argument("pair", help="PAIR.yaml with 'pairs:'")
    p.add_argument("--folds", type=_whole(2, 10_000), help="number of folds (default: one per pair, leave-one-out)")
    p.add_argument("--trials", type=_whole(1, MAX_TRIALS), default=30, help="trials of each study (default 30)")
    p.add_argument("--jobs", type=_whole(1, MAX_JOBS), help="worker processes of each study (default 1)")
    p.add_argument("--seed", type=_whole(0, SEED_LIMIT - 1), default=0, help="fold assignment and study seed")
    p.add_argument(
        "--out", type=_folder, help="folder of the fold studies and crossval.json (default: beside the study)"
    )
    p.add_argument("--no-own", action="store_true", help="skip tuning each pair alone (its own best, the reference)")
    p.add_argument("--json", type=_output_file, help="also write the results as JSON here")
    p.set_defaults(func=cmd_crossval)

    p = sub.add_parser("report", help="write an offline HTML report of the study", **_examples("report"))
    p.add_argument("pair", help="PAIR.yaml")
    _study_args(p)
    p.add_argument("-o", "--output", type=_output_file, required=True, help="report.html")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("dashboard", help="serve optuna-dashboard over the study's storage", **_examples("dashboard"))
    p.add_argument("pair", help="PAIR.yaml")
    _study_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_whole(1, 65535), default=8080, help="port (default 8080)")
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("check", help="validate PAIR.yaml and its data without tuning", **_examples("check"))
    p.add_argument("pair", help="PAIR.yaml")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("apply", help="run a recipe on any image pair", **_examples("apply"))
    p.add_argument("recipe", help="RECIPE.yaml")
    p.add_argument("--fixed", required=True)
    p.add_argument("--moving", required=True)
    p.add_argument(
        "--transform-out", type=_output_file, required=True, help="output transform (.tfm), maps fixed to moving points"
    )
    p.add_argument("--image-out", type=_output_file, help="write the moving image resampled onto the fixed grid")
    p.add_argument("--fixed-mask")
    p.add_argument("--moving-mask")
    p.add_argument("--fixed-landmarks", help="report TRE against these landmarks (any supported format)")
    p.add_argument("--moving-landmarks")
    p.add_argument("--threads", type=_whole(1, MAX_THREADS), help="override the recipe's ITK thread count")
    p.set_defaults(func=cmd_apply)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, or a bad option (already reported in one line)
        return int(done.code or 0) if not isinstance(done.code, str) else EXIT_USER_ERROR
    level = logging.WARNING - 10 * min(2, args.verbose)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    global _storage_url
    _storage_url = getattr(args, "storage", None)
    for handler in (*logging.getLogger().handlers, *logging.getLogger("optuna").handlers):
        if not any(isinstance(f, _RedactingFilter) for f in handler.filters):
            handler.addFilter(_RedactingFilter())
    # What the libraries say (C-level stderr caught around image I/O, Python warnings) is shown with -v only.
    logging.getLogger(LIBRARY_LOG).setLevel(logging.DEBUG if args.verbose else logging.NOTSET)
    if not args.verbose:
        _quiet_loky_trackers()
    with warnings.catch_warnings():
        warnings.showwarning = _log_warning
        import optuna

        optuna.logging.set_verbosity(logging.WARNING if args.verbose < 2 else logging.INFO)
        # ITK writes its warnings straight to stderr; failures reach the user through exceptions instead.
        sitk.ProcessObject.SetGlobalWarningDisplay(args.verbose >= 1)
        func: Callable[[argparse.Namespace], int] = args.func
        try:
            return func(args)
        except UserError as err:
            _err(f"error: {err}")
            return EXIT_USER_ERROR
        except RegistrationFailed as err:  # where and why, on one line (ITK's own text can run over several)
            detail = " ".join(err.detail.split())[:FAILURE_DETAIL_CHARS] if err.detail != err.reason else ""
            _err(f"registration failed: {err.reason}" + (f" ({detail})" if detail else ""))
            return EXIT_FAILED
        except KeyboardInterrupt:
            _err("interrupted")
            return EXIT_INTERRUPTED
        except BrokenPipeError:
            _stdout_gone()
            return EXIT_BROKEN_PIPE
        except OSError as err:  # the system refused a file or folder we were given (read-only, full, /proc...)
            where = f"{excerpt(str(err.filename), quote=False)}: " if err.filename else ""
            _err(f"error: {where}{err.strerror or err}")
            return EXIT_USER_ERROR


def _stdout_gone() -> None:
    """Point stdout at /dev/null once its reader has gone, so that the interpreter's last flush says nothing."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError:
        pass


#: loky's resource tracker, started with the first worker pool, inherits this: after an interrupted tune leaves
#: with ``os._exit`` it removes the pool's semaphores and memmap folder, and would print a warning for each kind.
_LOKY_TRACKER_QUIET = "ignore::UserWarning:joblib.externals.loky.backend.resource_tracker"


def _quiet_loky_trackers() -> None:
    """Keep loky's tracker's clean-up warnings off the terminal (its clean-up still happens; ``-v`` shows them)."""
    current = os.environ.get("PYTHONWARNINGS", "")
    if _LOKY_TRACKER_QUIET not in current.split(","):
        os.environ["PYTHONWARNINGS"] = ",".join(filter(None, (current, _LOKY_TRACKER_QUIET)))


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` for the CLI: a Python warning (Optuna, SQLAlchemy...) is a debug record, not a line
    before the one error line."""
    logging.getLogger(LIBRARY_LOG).debug("%s:%s: %s: %s", filename, lineno, category.__name__, message)


def entry() -> None:  # pragma: no cover - console script
    """The ``autoreg`` command. Interrupted, it leaves at once: a tune's in-process worker may still be inside a
    long SimpleITK call (its trial is already recorded), and the interpreter's teardown would wait on the CPU it
    takes; every study write is already on disk (the journal is fsynced) or committed."""
    code = main()
    if code == EXIT_INTERRUPTED:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
