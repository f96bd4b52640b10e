"""Passwords in storage URLs are never printed or stored: every URL form against every place a URL is shown or
written (stdout, stderr, log lines, study.json, the exported recipe's provenance, the HTML report)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from autoreg.study import StorageSpec, redact

SECRET = "Xy7secretQ"

#: (URL, what it must show): the password in the userinfo, with '@' inside (raw and percent-encoded), in the
#: query string, for PostgreSQL, MySQL, Redis and a scheme autoreg does not know.
FORMS = [
    (f"postgresql://alice:{SECRET}@db.example:5432/studies", "postgresql://alice:***@db.example:5432/studies"),
    (f"postgresql://alice:{SECRET}@x@db.example/studies", "postgresql://alice:***@db.example/studies"),
    (f"postgresql://alice:p@{SECRET}@db.example/studies", "postgresql://alice:***@db.example/studies"),
    (f"postgresql://alice:{SECRET}%40x@db.example/studies", "postgresql://alice:***@db.example/studies"),
    (
        f"postgresql://db.example/studies?user=alice&password={SECRET}",
        "postgresql://db.example/studies?user=alice&password=***",
    ),
    (
        f"postgresql+psycopg://alice@db.example/s?sslpassword={SECRET}&x=1",
        "postgresql+psycopg://alice@db.example/s?sslpassword=***&x=1",
    ),
    (f"mysql+pymysql://bob:{SECRET}@127.0.0.1/optuna", "mysql+pymysql://bob:***@127.0.0.1/optuna"),
    (f"redis://:{SECRET}@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    (f"redis://carol:{SECRET}@x@127.0.0.1:6379/0", "redis://carol:***@127.0.0.1:6379/0"),
    (f"redis://127.0.0.1:6379/0?password={SECRET}", "redis://127.0.0.1:6379/0?password=***"),
    (f"cockroachdb://dave:{SECRET}@h:26257/db?token={SECRET}", "cockroachdb://dave:***@h:26257/db?token=***"),
]


@pytest.mark.parametrize("url, shown", FORMS)
def test_redact_every_form(url: str, shown: str) -> None:
    assert redact(url) == shown
    assert StorageSpec(url).display == shown
    assert SECRET not in repr(StorageSpec(url))
    # inside a message, quoted, and the secret on its own (a driver may quote it) when the URL is known
    assert SECRET not in redact(f"could not parse '{url}' (near {SECRET})", url)


def test_redact_leaves_paths_and_plain_urls() -> None:
    for text in ("/some/where/journal.log", "sqlite:////home/a@b/x.db", "postgresql://alice@h/db", "https://h/x?a=1"):
        assert redact(text) == text


@pytest.mark.parametrize("url", [u for u, _ in FORMS] + [f"ftp://eve:{SECRET}@127.0.0.1/x"])
def test_unreachable_storage_is_one_line_without_the_password(url: str, pair_yaml, run_cli, tmp_path) -> None:
    """Port 1 refuses; missing drivers and unknown schemes are errors too: one line, no secret."""
    url = url.replace("db.example:5432", "127.0.0.1:1").replace("db.example", "127.0.0.1:1")
    for cmd in (
        ("tune", "--trials", "1", "-q"),
        ("export", "-o", tmp_path / "r.yaml"),
        ("report", "-o", tmp_path / "r.html"),
    ):
        result = run_cli(cmd[0], pair_yaml(), *cmd[1:], "--storage", url, "--study-dir", tmp_path / "s")
        assert result.code == 2, (cmd, result.err)
        assert len(result.err_lines) == 1, result.err
        assert SECRET not in result.err + result.out, (cmd, result.err)
        assert not (tmp_path / "s" / "study.json").exists() or SECRET not in (tmp_path / "s" / "study.json").read_text()


@pytest.mark.parametrize("url", [u for u, _ in FORMS if not u.startswith("cockroach")])
def test_every_place_a_url_is_shown_or_written(url: str, pair_yaml, run_cli, tmp_path, monkeypatch) -> None:
    """tune, export and report run through with the URL standing for a journal file (no server needed): the URL's
    text still flows everywhere it would (progress, summary, warnings, study.json, provenance, report)."""
    import logging

    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    import autoreg.study as study_mod
    import autoreg.workers as workers_mod

    journal = tmp_path / "journal.log"

    def fake_open(spec: StorageSpec):
        assert spec.url == url  # the real URL travels (to workers too); only its display is redacted
        logging.getLogger("autoreg.test").warning("opening %s", spec.url)  # as a library might log it
        return JournalStorage(JournalFileBackend(str(journal)))

    monkeypatch.setattr(study_mod, "open_storage", fake_open)
    monkeypatch.setattr(workers_mod, "open_storage", fake_open)
    pair, sdir = pair_yaml(), tmp_path / "s"
    outputs = []
    tune = run_cli("tune", pair, "--trials", "2", "--jobs", "1", "--storage", url, "--study-dir", sdir)
    assert tune.code == 0, tune.err
    assert "storage " in tune.out and "***" in tune.out
    outputs += [tune.out, tune.err, (sdir / "study.json").read_text()]
    assert json.loads((sdir / "study.json").read_text())["storage"] == redact(url)
    recipe, html = tmp_path / "best.yaml", tmp_path / "report.html"
    exported = run_cli("export", pair, "--storage", url, "--study-dir", sdir, "-o", recipe, "--repeats", "0")
    assert exported.code == 0, exported.err
    reported = run_cli("report", pair, "--storage", url, "--study-dir", sdir, "-o", html)
    assert reported.code == 0, reported.err
    outputs += [exported.out, exported.err, reported.out, reported.err, recipe.read_text(), html.read_text()]
    assert f"storage: {redact(url)}" in recipe.read_text()
    for text in outputs:
        assert SECRET not in text
    assert SECRET not in journal.read_text()  # nor in the study's own records


@pytest.mark.postgres
def test_real_postgres_never_shows_the_password(postgres_url: str, pair_yaml, tmp_path) -> None:
    """A real server (trust authentication accepts any password): tune with two workers, export and report, each
    through another form of the same URL."""
    base = postgres_url.replace(":not-a-secret@", "@")  # postgresql://autoreg@127.0.0.1:PORT/postgres
    host = base.split("@", 1)[1]
    userinfo, at_sign, query = (
        f"postgresql://autoreg:{SECRET}@{host}",
        f"postgresql://autoreg:{SECRET}%40x@{host}",
        f"{base}?password={SECRET}",
    )
    pair = pair_yaml(name="redact", extra={"search": {"stage0.pyramid.levels": 1}})
    sdir = tmp_path / "s"

    def cli(url: str, *args) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [sys.executable, "-m", "autoreg.cli", *map(str, args), "--storage", url, "--study-dir", str(sdir)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        return done

    runs = [
        cli(userinfo, "-v", "tune", pair, "--trials", 3, "--jobs", 2),
        cli(query, "export", pair, "-o", tmp_path / "r.yaml", "--repeats", "0"),
        cli(at_sign, "report", pair, "-o", tmp_path / "r.html"),
    ]
    texts = [r.stdout + r.stderr for r in runs]
    texts += [(sdir / "study.json").read_text(), (tmp_path / "r.yaml").read_text(), (tmp_path / "r.html").read_text()]
    for text in texts:
        assert SECRET not in text
    assert "password=***" in (tmp_path / "r.yaml").read_text()
