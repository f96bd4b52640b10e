"""The HTML report in a real headless Chromium (Debian's ``chromium``): no console output, plots drawn, not blank."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from autoreg.cli import main
from autoreg.synthetic import make_pair, write_pair

pytestmark = [pytest.mark.browser, pytest.mark.slow]

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER_TIMEOUT_S = 90
WINDOW = (1400, 5200)  # tall enough for the whole report of one 2D pair
#: Plotly's first trace colour, the report's orange (default recipe) and the overlay's magenta (fixed image).
BLUE, ORANGE, MAGENTA = (31, 119, 180), (255, 127, 14), (255, 0, 255)


def find_browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser() -> str:
    path = find_browser()
    if path is None:
        pytest.skip("no headless Chromium found (install Debian's 'chromium' package: apt-get install -y chromium)")
    return path


def run_browser(browser: str, url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Chromium headless on ``url`` with console messages logged to stderr; waits for scripts to settle."""
    argv = [
        browser,
        "--headless=new",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--hide-scrollbars",
        "--mute-audio",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=5000",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        *extra,
        url,
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        argv.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
    return subprocess.run(argv, capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S, check=False)


def console_lines(stderr: str) -> list[str]:
    """The page's console messages (any level: the report must log nothing) and uncaught errors."""
    return [ln for ln in stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]


@dataclass
class Report:
    path: Path
    root: Path


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Report:
    """A 96x96 affine pair tuned for 8 trials, and its report."""
    root = tmp_path_factory.mktemp("browser")
    data = root / "data"
    data.mkdir()
    paths = write_pair(make_pair((96, 96), transform="affine", seed=0), data)
    pair = data / "PAIR.yaml"
    pair.write_text(
        yaml.safe_dump(
            {
                "name": "syn",
                "fixed": paths["fixed"].name,
                "moving": paths["moving"].name,
                "landmarks": {"fixed": paths["fixed_landmarks"].name, "moving": paths["moving_landmarks"].name},
                "stages": ["affine"],
                "trial_timeout": 30,
            }
        ),
        encoding="utf-8",
    )
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(["tune", str(pair), "--trials", "8", "--jobs", "1", "--study-dir", str(root / "study"), "-q"]) == 0
        assert main(["report", str(pair), "--study-dir", str(root / "study"), "-o", str(root / "report.html")]) == 0, (
            err.getvalue()
        )
    return Report(root / "report.html", root)


def test_console_output_is_detected(browser: str, tmp_path: Path) -> None:
    """The check below would see a broken page: a script error and a console.error both show up."""
    page = tmp_path / "broken.html"
    page.write_text("<html><body><script>console.error('boom-test'); notDefined();</script></body></html>")
    result = run_browser(browser, page.as_uri(), tmp_path / "profile", "--dump-dom")
    lines = console_lines(result.stderr)
    assert any("boom-test" in ln for ln in lines) and any("notDefined" in ln for ln in lines), result.stderr[-2000:]


def test_report_loads_without_console_messages_and_draws_its_plots(
    browser: str, report: Report, tmp_path: Path
) -> None:
    result = run_browser(browser, report.path.as_uri(), tmp_path / "profile", "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    assert console_lines(result.stderr) == []
    dom = result.stdout
    # history, intermediate values, importances, one slice plot per parameter, TRE per landmark: drawn into SVG
    slices = sorted(set(re.findall(r'id="(slice-\d+)"', dom)))
    assert 1 <= len(slices) <= 6
    assert len(re.findall(r'class="plot-container plotly"', dom)) == 4 + len(slices)
    assert len(re.findall(r'class="main-svg"', dom)) >= 2 * (4 + len(slices))
    for div in ("history", "intermediate", "importances", *slices, "tre-0"):
        block = dom.split(f'id="{div}"', 1)[1][:200_000]
        assert 'class="main-svg"' in block, div
    assert len(re.findall(r'class="point"', dom)) >= 20  # scatter markers actually placed
    assert len(re.findall(r'<img alt="[^"]*" src="data:image/png;base64,', dom)) == 2


def _near(rgb: np.ndarray, colour: tuple[int, int, int], tol: int = 12) -> int:
    return int(np.all(np.abs(rgb.astype(int) - np.array(colour)) <= tol, axis=-1).sum())


def test_report_screenshot_is_not_blank(browser: str, report: Report, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    result = run_browser(browser, report.path.as_uri(), tmp_path / "profile", f"--screenshot={shot}")
    assert shot.is_file(), result.stderr[-2000:]
    rgb = sitk.GetArrayFromImage(sitk.ReadImage(str(shot)))[..., :3]
    assert rgb.shape[:2] == (WINDOW[1], WINDOW[0])
    assert rgb.std() > 20
    packed = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    assert len(np.unique(packed)) > 500  # many distinct colours: plots and pictures, not a flat page
    assert _near(rgb, BLUE) > 200, "no plotly markers or bars in the screenshot"
    assert _near(rgb, ORANGE) > 50, "the default recipe is not marked"
    assert _near(rgb, MAGENTA, 40) > 200, "no colour-overlay image in the screenshot"
    # nothing below the report's end stays blank-white over most of the page: the content fills it
    rows_with_ink = (rgb.std(axis=(1, 2)) > 3).mean()
    assert rows_with_ink > 0.3
