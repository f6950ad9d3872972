"""Storage URLs: the forms dlops accepts, one-line errors, masked passwords, the study lock.

PostgreSQL and Redis are the real servers on 127.0.0.1 (.ci/run starts them); every test
uses its own study name or key prefix and removes it afterwards.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from dlops.cli import app
from dlops.errors import StorageError
from dlops.storage import NoStorageYet, connect, journal_path, mask_url, storage_kind
from dlops.studies import list_studies

PG = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"


def _missing(kind: str) -> str | None:
    try:
        if kind == "postgresql":
            import psycopg2

            psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="test", connect_timeout=3).close()
        else:
            import redis

            redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=3).ping()
    except Exception as exc:  # noqa: BLE001
        return f"{kind} is not reachable on 127.0.0.1 ({str(exc).strip().splitlines()[0]}); .ci/run starts it"
    return None


PG_MISSING, REDIS_MISSING = _missing("postgresql"), _missing("redis")
requires_pg = pytest.mark.skipif(PG_MISSING is not None, reason=PG_MISSING or "")
requires_redis = pytest.mark.skipif(REDIS_MISSING is not None, reason=REDIS_MISSING or "")


def test_mask_url_hides_every_password() -> None:
    assert mask_url("postgresql+psycopg2://me:s3cret@db:5432/x") == "postgresql+psycopg2://me:***@db:5432/x"
    assert mask_url("redis://:s3cret@host:6379/0?prefix=a") == "redis://:***@host:6379/0?prefix=a"
    assert (
        mask_url("error at mysql://u:p%40ss@h/db and redis://h:6379")
        == "error at mysql://u:***@h/db and redis://h:6379"
    )
    assert mask_url("host=db user=me password=s3cret") == "host=db user=me password=***"
    assert mask_url("sqlite:///storage/dlops.db") == "sqlite:///storage/dlops.db"
    assert mask_url("postgresql://me@db/x") == "postgresql://me@db/x"


def test_url_forms() -> None:
    assert storage_kind("sqlite:///storage/dlops.db") == "sqlite"
    assert storage_kind("postgresql+psycopg2://u@h/db") == storage_kind("postgresql://u@h/db") == "postgresql"
    assert storage_kind("journal:///tmp/x.log") == storage_kind("runs/study.log") == "journal"
    assert storage_kind("redis://h:6379/0") == "redis"
    assert storage_kind("mysql+pymysql://u@h/db") == "rdb"
    assert journal_path("journal:///abs/x.log") == Path("/abs/x.log")
    assert journal_path("journal:rel/x.log") == Path("rel/x.log")
    assert journal_path("runs/x.journal") == Path("runs/x.journal")
    with pytest.raises(StorageError, match="unsupported storage"):
        storage_kind("my-study.db")


BACKENDS = [
    "sqlite",
    "journal",
    "journal-path",
    pytest.param("postgresql", marks=requires_pg),
    pytest.param("redis", marks=requires_redis),
]


@pytest.fixture
def url(request: pytest.FixtureRequest, tmp_path: Path):
    tag = uuid.uuid4().hex[:10]
    urls = {
        "sqlite": f"sqlite:///{tmp_path / 'dlops.db'}",
        "journal": f"journal://{tmp_path / 'j' / 'study.log'}",
        "journal-path": str(tmp_path / "study.journal"),
        "postgresql": PG,
        "redis": f"redis://127.0.0.1:6379/0?prefix=dlops-test-{tag}",
    }
    name = f"s-{tag}"
    yield urls[request.param], name
    if request.param == "postgresql":
        try:
            optuna.delete_study(study_name=name, storage=PG)
        except KeyError:
            pass
    if request.param == "redis":
        import redis

        client = redis.Redis(host="127.0.0.1", port=6379)
        for key in client.scan_iter(f"dlops-test-{tag}*"):
            client.delete(key)


@pytest.mark.parametrize("url", BACKENDS, indirect=True)
def test_every_backend_stores_and_lists_a_study(url: tuple[str, str]) -> None:
    url, name = url
    storage = connect(url, heartbeat_interval=5)
    assert storage.many_workers == (storage.kind != "sqlite")
    assert storage.heartbeat == (storage.kind == "postgresql")  # Optuna heartbeats: RDB only; not SQLite
    study = optuna.create_study(study_name=name, storage=storage.optuna)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    again = connect(url)  # a second worker sees the same study
    rows = [r for r in list_studies(url) if r["name"] == name]
    assert rows and rows[0]["n_trials"] == 2
    assert len(optuna.load_study(study_name=name, storage=again.optuna).trials) == 2


@pytest.mark.parametrize("url", [b for b in BACKENDS if b != "journal-path"], indirect=True)
def test_the_study_lock_excludes_other_workers(url: tuple[str, str]) -> None:
    url, name = url
    first, second = connect(url).lock(name), connect(url).lock(name)
    other_study = connect(url).lock(name + "-other")
    got: list[float] = []
    first.acquire()
    with other_study:  # another study's lock is independent
        pass
    thread = threading.Thread(target=lambda: (second.acquire(), got.append(time.monotonic()), second.release()))
    thread.start()
    time.sleep(0.5)
    assert got == []  # still waiting
    released = time.monotonic()
    first.release()
    thread.join(timeout=10)
    assert got and got[0] >= released
    first.release()  # releasing twice is harmless


@requires_pg
def test_a_bad_postgresql_url_is_one_masked_line(dlops_home: Path) -> None:
    bad = "postgresql+psycopg2://postgres:s3cret@127.0.0.1:5432/no_such_db_dlops"
    with pytest.raises(StorageError) as err:
        connect(bad)
    message = str(err.value)
    assert "s3cret" not in message and "postgres:***@" in message and "no_such_db_dlops" in message
    assert "\n" not in message
    result = CliRunner().invoke(app, ["study", "list", "--storage", bad])
    assert result.exit_code == 2 and "s3cret" not in result.output and "does not exist" in result.output
    assert "Traceback" not in result.output


def test_unreachable_servers_are_one_masked_line() -> None:
    for bad in ("redis://:s3cret@127.0.0.1:1/0", "postgresql+psycopg2://u:s3cret@127.0.0.1:1/db"):
        with pytest.raises(StorageError) as err:
            connect(bad)
        assert "s3cret" not in str(err.value) and ":***@127.0.0.1:1" in str(err.value)


def test_a_redis_database_that_is_not_a_number_is_refused_and_a_socket_url_keeps_its_slashes() -> None:
    from dlops.storage import _split_redis_prefix

    for bad, db in (("redis://:s3cret@127.0.0.1:6379/abc?prefix=p", "abc"), ("rediss://127.0.0.1:6379/1/x", "1/x")):
        with pytest.raises(StorageError) as err:
            connect(bad)  # refused before any connection: redis-py would use database 0
        assert f"the Redis database in {mask_url(bad)} is {db!r}, not a number" in str(err.value)
        assert "s3cret" not in str(err.value)
    assert _split_redis_prefix("unix:///run/redis.sock?db=2&prefix=me") == ("unix:///run/redis.sock?db=2", "me")
    assert _split_redis_prefix("redis://h:6379/3?prefix=me") == ("redis://h:6379/3", "me")
    assert _split_redis_prefix("redis://h:6379/3") == ("redis://h:6379/3", "")


def test_a_postgresql_port_that_never_answers_times_out_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A PostgreSQL URL naming a port where something accepts connections but never answers
    (another server's port, a host that drops packets) fails after the connect timeout
    instead of waiting forever (libpq has no timeout of its own)."""
    import socket

    import dlops.storage

    monkeypatch.setattr(dlops.storage, "CONNECT_TIMEOUT", 2, raising=False)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel accepts; nobody ever answers
    port = silent.getsockname()[1]
    errors: list[BaseException] = []

    def open_it() -> None:
        try:
            connect(f"postgresql://u:s3cret@127.0.0.1:{port}/db")
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    opener = threading.Thread(target=open_it, daemon=True)
    opener.start()
    opener.join(timeout=20)
    hung = opener.is_alive()
    silent.close()
    assert not hung, "connecting to a silent PostgreSQL port hung"
    (error,) = errors
    assert isinstance(error, StorageError) and "timeout expired" in str(error), error
    assert "s3cret" not in str(error) and "\n" not in str(error)


@pytest.fixture
def pg_schema():
    """A schema of its own in the test database, and its URL (search_path): removed afterwards."""
    import psycopg2

    schema = f"dlops_test_{uuid.uuid4().hex[:10]}"
    db = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="test")
    db.autocommit = True
    db.cursor().execute(f"CREATE SCHEMA {schema}")

    def tables() -> set[str]:
        cur = db.cursor()
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema,))
        return {row[0] for row in cur.fetchall()}

    try:
        yield f"{PG}?options=-csearch_path%3D{schema}", schema, db, tables
    finally:
        db.cursor().execute(f"DROP SCHEMA {schema} CASCADE")
        db.close()


@requires_pg
def test_another_programs_postgresql_database_is_never_given_optuna_tables(pg_schema) -> None:
    """A PostgreSQL database (here a schema) of another program named as the storage: every
    command refuses it in one line and adds nothing to it (Optuna added its tables and an
    alembic_version); an empty one is no storage yet for a reader, and becomes one for a writer."""
    url, schema, db, tables = pg_schema
    db.cursor().execute(f"CREATE TABLE {schema}.users (id integer)")
    for command in (["study", "list"], ["study", "show", "x"], ["report"]):
        result = CliRunner().invoke(app, [*command, "--storage", url])
        assert result.exit_code == 2, (command, result.output)
        (line,) = result.output.strip().splitlines()
        assert "is another program's database (tables users)" in line, line
    with pytest.raises(StorageError, match="another program's database"):
        connect(url)  # a writer too
    assert tables() == {"users"}

    db.cursor().execute(f"DROP TABLE {schema}.users")
    result = CliRunner().invoke(app, ["study", "list", "--storage", url])
    assert result.exit_code == 0 and "no studies yet" in result.output, result.output
    with pytest.raises(NoStorageYet, match="holds no tables"):
        connect(url, create=False)
    assert tables() == set()
    connect(url)  # a writer makes it a study storage
    assert {"studies", "version_info"} <= tables()
    assert connect(url, create=False) is not None


def test_an_unknown_storage_is_refused_by_the_cli(dlops_home: Path, tmp_path: Path) -> None:
    from data_trees import one_error_line

    result = CliRunner().invoke(app, ["study", "list", "--storage", "nowhere.db"])
    assert result.exit_code == 2 and "unsupported storage" in result.output and "journal:///" in result.output
    # A scheme SQLAlchemy has no database for (file:// for a journal, a typo): the forms to use,
    # not "Can't load plugin: sqlalchemy.dialects:file".
    for url in (f"file://{tmp_path}/j.log", "postgress://me@db/x"):
        for command in (["study", "list"], ["study", "run", "--loss", "ce", "--dataset", "digits"]):
            line = one_error_line(CliRunner().invoke(app, [*command, "--storage", url]))
            scheme = url.split("://")[0]
            assert line.startswith(f"error: unknown storage scheme {scheme!r} in {url!r}"), line
            assert "journal:///path.log" in line and "plugin" not in line and "dialects" not in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("sqlit:///{tmp}/x.db", "unknown storage scheme 'sqlit' in 'sqlit:///{tmp}/x.db' (a typo of sqlite?)"),
        ("jornal:///{tmp}/x.log", "unknown storage scheme 'jornal' in 'jornal:///{tmp}/x.log' (a typo of journal?)"),
        ("postgress://u:secret@h/db", "unknown storage scheme 'postgress' in 'postgress://u:***@h/db' (a typo of"),
        ("file:///{tmp}/x.db", "unknown storage scheme 'file' in 'file:///{tmp}/x.db': use sqlite:///path.db"),
    ],
)
def test_a_mistyped_storage_scheme_is_named_in_one_line(dlops_home: Path, tmp_path: Path, url: str, says: str):
    """A mistyped scheme was SQLAlchemy's "Can't load plugin: sqlalchemy.dialects:sqlit"."""
    url, says = url.format(tmp=tmp_path), says.format(tmp=tmp_path)
    for command in (["study", "list"], ["study", "show", "s"], ["study", "replay", "s"], ["report"], ["dashboard"]):
        result = CliRunner().invoke(app, [*command, "--storage", url])
        assert result.exit_code == 2, (command, result.output)
        (line,) = result.output.strip().splitlines()
        assert line.startswith("error: ") and says in line and "plugin" not in line and "secret" not in line, line
    assert not list(tmp_path.iterdir())  # no database, no reports, no $DLOPS_HOME


def test_a_relative_sqlite_path_that_does_not_exist_is_named_in_full(
    dlops_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`sqlite:///tmp/x.db` (three slashes: relative) meant for /tmp/x.db: `study list` said
    only "no studies yet", `study show` "no study storage at tmp/x.db"; both name the file
    they looked for, and say how an absolute path is written. Nothing is created."""
    monkeypatch.chdir(tmp_path)
    url = "sqlite:///typo/x.db"
    where = f"no study storage at {tmp_path / 'typo' / 'x.db'}: nothing has run with {url} yet"
    hint = f"sqlite:/// with three slashes is a path relative to the current folder, {tmp_path}"
    listed = CliRunner().invoke(app, ["study", "list", "--storage", url])
    assert listed.exit_code == 0, listed.output
    assert listed.output.startswith(f"no studies yet in {url}: {where}") and hint in listed.output, listed.output
    shown = CliRunner().invoke(app, ["study", "show", "s", "--storage", url])
    (line,) = shown.output.strip().splitlines()
    assert shown.exit_code == 2 and line.startswith(f"error: {where}") and hint in line, line
    absolute = CliRunner().invoke(app, ["study", "show", "s", "--storage", f"sqlite:///{tmp_path}/typo/x.db"])
    assert absolute.exit_code == 2 and "three slashes" not in absolute.output, absolute.output
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_reading_a_storage_that_does_not_exist_creates_nothing(kind: str, dlops_home: Path, tmp_path: Path) -> None:
    """A mistyped --storage path: the read-only commands say so and leave no file or folder."""
    from dlops.dashboard import dashboard_app
    from dlops.report import build_report
    from dlops.storage import journal_url
    from dlops.studies import find_study

    missing = tmp_path / "typo" / ("x.db" if kind == "sqlite" else "x.log")
    url = f"sqlite:///{missing}" if kind == "sqlite" else journal_url(missing)
    runner = CliRunner()
    listed = runner.invoke(app, ["study", "list", "--storage", url])
    assert listed.exit_code == 0 and f"no studies yet in {url}" in listed.output
    as_json = json.loads(runner.invoke(app, ["study", "list", "--storage", url, "--json"]).output)
    assert as_json["studies"] == [] and f"no study storage at {missing}" in as_json["no_storage"]
    shown = runner.invoke(app, ["study", "show", "s", "--storage", url])
    assert shown.exit_code == 2 and f"no study storage at {missing}" in shown.output
    assert "Traceback" not in shown.output and len(shown.output.strip().splitlines()) == 1
    replayed = runner.invoke(app, ["study", "replay", "s", "--storage", url])
    assert replayed.exit_code == 2 and "no study storage at" in replayed.output
    final = runner.invoke(app, ["final", "--loss", "ce", "--storage", url])
    assert final.exit_code == 2 and "no study named 'resnet18-ce'" in final.output
    assert f"no study storage at {missing}" in final.output, final.output  # the mistyped path, not only the study
    assert find_study(url, "s") is None
    with pytest.raises(StorageError, match="no study storage at"):
        dashboard_app(url)
    assert build_report(storage=url).entries == []  # no reference run, no study
    assert not (tmp_path / "typo").exists()
    # The same URL, written to, is created as before.
    optuna.create_study(study_name="s", storage=connect(url).optuna)
    assert missing.is_file()
    assert [r["name"] for r in list_studies(url)] == ["s"] and find_study(url, "s") is not None


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_report_on_a_storage_that_does_not_exist_says_so(kind: str, dlops_home: Path, tmp_path: Path) -> None:
    """`dlops report` with a mistyped --storage writes the reference runs' report, as on an
    empty storage, but says in one line that no study storage is there."""
    from dlops.storage import journal_url

    missing = tmp_path / "typo" / ("x.db" if kind == "sqlite" else "x.log")
    url = f"sqlite:///{missing}" if kind == "sqlite" else journal_url(missing)
    result = CliRunner().invoke(app, ["report", "--storage", url])
    assert result.exit_code == 0 and "Traceback" not in result.output
    notes = [line for line in result.output.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and f"no study storage at {missing}" in notes[0], result.output
    assert not (tmp_path / "typo").exists()


def test_reading_a_storage_creates_no_file_beside_it(dlops_home: Path, tmp_path: Path) -> None:
    """The read commands open an existing SQLite file (here made by Optuna alone) and leave
    nothing beside it, not even the lock a new database is created under; a folder given as
    the storage is one line, and nothing appears next to it either."""
    from data_trees import one_error_line
    from dlops.dashboard import dashboard_app
    from dlops.storage import journal_url

    store = tmp_path / "store"
    store.mkdir()
    url = f"sqlite:///{store / 'x.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(study_name="s", storage=url, direction="maximize").optimize(
        lambda t: t.suggest_float("x", 0, 1), n_trials=1
    )
    runner = CliRunner()
    for command in (["study", "list"], ["study", "show", "s"], ["study", "replay", "s"], ["report"]):
        result = runner.invoke(app, [*command, "--storage", url])
        assert "Traceback" not in result.output, (command, result.output)
    dashboard_app(url)
    assert [p.name for p in store.iterdir()] == ["x.db"]

    folder = tmp_path / "folder" / "lk"
    folder.mkdir(parents=True)
    for bad in (f"sqlite:///{folder}", journal_url(folder)):
        for command in (["study", "list"], ["study", "show", "s"], ["report"]):
            line = one_error_line(runner.invoke(app, [*command, "--storage", bad]))
            assert f"names the folder {folder}, not a study storage file" in line, line
        with pytest.raises(StorageError, match="names the folder"):
            dashboard_app(bad)
    assert [p.name for p in folder.parent.iterdir()] == ["lk"] and not any(folder.iterdir())


def test_heartbeat_settings_apply_to_postgresql_only() -> None:
    from dlops.storage import HEARTBEAT_INTERVAL, heartbeat_settings

    pg = "postgresql://u@127.0.0.1:1/x"
    assert heartbeat_settings(pg, None, None) == (HEARTBEAT_INTERVAL, None)  # Optuna's default grace: 2x
    assert heartbeat_settings(pg, 5, 5) == (5, 5) and heartbeat_settings("mysql://u@h/db", None, 90) == (60, 90)
    with pytest.raises(StorageError, match="--grace-period 4 is shorter than the heartbeat interval"):
        heartbeat_settings(pg, 5, 4)
    for url in ("sqlite:///x.db", "journal:///x.log", "redis://127.0.0.1:1/0"):
        assert heartbeat_settings(url, None, None) == (None, None)
        with pytest.raises(StorageError, match="without the heartbeats of PostgreSQL, so it would have no effect"):
            heartbeat_settings(url, 60, None)


@pytest.mark.parametrize("folder", ["c9q?x", "p%q", "a%41b", "h#sh", "sp ace%3F"])
def test_the_default_sqlite_database_stays_under_an_odd_dlops_home(
    folder: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dlops.paths import default_storage_url, dlops_home

    monkeypatch.setenv("DLOPS_HOME", str(tmp_path / folder / "storage"))
    monkeypatch.delenv("DLOPS_STORAGE", raising=False)
    url = default_storage_url()
    storage = connect(url)
    optuna.create_study(study_name="s", storage=storage.optuna)
    files = [p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()]
    assert Path(folder, "storage", "dlops.db") in files
    assert all(f.parent == Path(folder, "storage") for f in files), files  # nothing outside DLOPS_HOME
    assert storage.lock_file == dlops_home() / "dlops.db"
    assert [r["name"] for r in list_studies(url)] == ["s"]


def test_a_sqlite_url_with_a_raw_question_mark_in_its_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=r"'\?' in its path.*%3F"):
        connect(f"sqlite:///{tmp_path / 'c9q?x' / 'storage' / 'dlops.db'}")
    assert list(tmp_path.iterdir()) == []
    assert connect(f"sqlite:///{tmp_path / 'ok.db'}?timeout=5").lock_file == tmp_path / "ok.db"  # real options pass


def test_a_sqlite_url_with_a_tilde_is_refused_not_made_a_folder_named_tilde(
    tmp_path: Path, dlops_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLAlchemy does not expand '~': sqlite:///~/dlops.db was ./~/dlops.db, a new database
    in each folder a command ran from (a $DLOPS_STORAGE in a shell profile)."""
    from data_trees import one_error_line

    monkeypatch.chdir(tmp_path)
    url = "sqlite:///~/dlops.db"
    expected = (
        f"error: SQLite URL {url!r}: SQLAlchemy does not expand '~' (it would open {tmp_path / '~' / 'dlops.db'}, "
        f"a folder named '~' here): write the path out, sqlite:///{Path('~/dlops.db').expanduser()}"
    )
    for command in (["study", "list"], ["study", "run", "--loss", "ce", "--dataset", "digits"]):
        assert one_error_line(CliRunner().invoke(app, [*command, "--storage", url])) == expected
    assert list(tmp_path.iterdir()) == []
    assert storage_kind("sqlite:////abs/~/x.db") == "sqlite" and connect(f"sqlite:///{tmp_path / 'a~' / 'x.db'}")


def test_journal_urls_round_trip_odd_folders(tmp_path: Path) -> None:
    from dlops.storage import journal_url

    for folder in ("c9q?x", "p%q", "a%41b", "h#sh"):
        path = tmp_path / folder / "study.log"
        assert journal_path(journal_url(path)) == path
        assert journal_path(str(path)) == path  # a plain path is taken literally


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql+psycopg2://postgres:s3c@ret@host:5432/db", "postgresql+psycopg2://postgres:***@host:5432/db"),
        ("postgresql://u:a@b@c@host/db", "postgresql://u:***@host/db"),
        ("postgresql://u:p:w@host/db", "postgresql://u:***@host/db"),
        ("postgresql://u:p@host/db?application_name=a@b", "postgresql://u:***@host/db?application_name=a@b"),
        ("postgresql://u:pa/ss@host/db", "postgresql://u:***@host/db"),
        ("postgresql://u@host/db?x=a@b", "postgresql://u@host/db?x=a@b"),
        ("postgresql://host:5432/db?x=a@b", "postgresql://host:5432/db?x=a@b"),
        ("redis://:s3c@ret@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://:s3c@ret@host:6379/0?prefix=me@work", "redis://:***@host:6379/0?prefix=me@work"),
        ("redis://host:6379/0?prefix=me@work", "redis://host:6379/0?prefix=me@work"),
        ("rediss://user:p@ss@host", "rediss://user:***@host"),
        (
            "cannot open postgresql://a:b@c@d/x (and redis://:e@f@g/0)",
            "cannot open postgresql://a:***@d/x (and redis://:***@g/0)",
        ),
    ],
)
def test_mask_url_hides_the_whole_password(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_an_unencoded_at_in_a_sql_password_is_refused_without_leaking_it() -> None:
    with pytest.raises(StorageError) as caught:
        connect("postgresql+psycopg2://postgres:s3c@ret@127.0.0.1:5432/test")
    assert "ret" not in str(caught.value) and "%40" in str(caught.value)
    result = CliRunner().invoke(
        app, ["study", "list", "--storage", "postgresql+psycopg2://postgres:s3c@ret@127.0.0.1:5432/test"]
    )
    assert result.exit_code != 0 and "s3c" not in result.output and "ret@" not in result.output


def _open_at_once(url: str, barrier, errors) -> None:
    barrier.wait()
    try:
        connect(url)
    except Exception as exc:  # noqa: BLE001 - reported by the test
        errors.put(str(exc)[:300])


def test_processes_opening_a_new_sqlite_database_at_once_all_get_it(tmp_path: Path) -> None:
    """Two `dlops study run` on a fresh SQLite file: Optuna's table creation is not atomic
    ("table trial_system_attributes already exists"); dlops creates it under a file lock."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    failed = []
    for round_ in range(3):
        url = f"sqlite:///{tmp_path / f'r{round_}' / 'dlops.db'}"
        barrier, errors = ctx.Barrier(3), ctx.Queue()
        procs = [ctx.Process(target=_open_at_once, args=(url, barrier, errors)) for _ in range(3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        assert [p.exitcode for p in procs] == [0, 0, 0]
        while not errors.empty():
            failed.append(errors.get())
        optuna.create_study(study_name="s", storage=connect(url).optuna)  # usable afterwards
    assert not failed, failed[0]


def test_a_bare_postgresql_url_uses_the_psycopg2_driver_that_ships(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from dlops.storage import sqlalchemy_url

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "psycopg" else real(name, *a))
    assert sqlalchemy_url("postgresql://u:p@h:5432/db") == "postgresql+psycopg2://u:p@h:5432/db"
    assert sqlalchemy_url("postgres://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert sqlalchemy_url("postgresql+psycopg2://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert sqlalchemy_url("sqlite:///x.db") == "sqlite:///x.db"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # psycopg 3 installed
    assert sqlalchemy_url("postgres://u@h/db") == "postgresql://u@h/db"


@requires_pg
@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_a_bare_postgresql_url_opens_the_server(scheme: str) -> None:
    url = f"{scheme}://postgres@127.0.0.1:5432/test"
    name = f"s-{uuid.uuid4().hex[:10]}"
    try:
        optuna.create_study(study_name=name, storage=connect(url).optuna)
        result = CliRunner().invoke(app, ["study", "list", "--storage", url])
        assert result.exit_code == 0, result.output
        assert name in result.output
    finally:
        optuna.delete_study(study_name=name, storage=PG)


@pytest.mark.parametrize("memory", ["sqlite://", "sqlite:///:memory:"])
def test_an_in_memory_sqlite_storage_is_refused_in_one_line(memory: str, dlops_home: Path) -> None:
    with pytest.raises(StorageError, match="in-memory SQLite database"):
        connect(memory)
    result = CliRunner().invoke(
        app, ["study", "run", "--loss", "ce", "--dataset", "digits", "--n-trials", "1", "--storage", memory]
    )
    assert result.exit_code == 2, result.output
    errors = result.output.strip().splitlines()  # one line: the run's header does not come first
    assert len(errors) == 1 and errors[0].startswith(f"error: {memory} is an in-memory SQLite database"), errors


@pytest.mark.parametrize(
    ("url", "opens"),
    [("sqlite://host.db", "an in-memory database"), ("sqlite://tmp/x.db", "'x.db'")],
)
def test_a_sqlite_url_with_a_host_is_refused_with_the_slashes_to_write(
    url: str, opens: str, dlops_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite ignores the host part: sqlite://tmp/x.db opened ./x.db, sqlite://host.db a
    database in memory that vanished with the run."""
    monkeypatch.chdir(tmp_path)
    path = url.removeprefix("sqlite://")
    for command in (["study", "list"], ["study", "run", "--loss", "ce", "--dataset", "digits", "--n-trials", "1"]):
        result = CliRunner().invoke(app, [*command, "--storage", url])
        assert result.exit_code == 2, result.output
        (line,) = result.output.strip().splitlines()  # not even the run's header before it
        assert line.startswith(f"error: SQLite URL {url!r} names a host") and f"it would open {opens}" in line, line
        assert f"sqlite:///{path} for a path relative" in line and f"sqlite:////{path} for an absolute" in line
    assert list(tmp_path.iterdir()) == []


def test_a_file_of_other_json_lines_given_as_a_journal_says_so(tmp_path: Path) -> None:
    other = tmp_path / "events.log"
    other.write_text('{"a": 1}\n')
    result = CliRunner().invoke(app, ["study", "list", "--storage", str(other)])
    assert result.exit_code != 0
    (line,) = result.output.strip().splitlines()
    assert f"{other} is not an Optuna journal file" in line, line
    assert other.read_text() == '{"a": 1}\n'  # left as it was


def test_a_journal_with_an_operation_this_optuna_does_not_know_says_so(tmp_path: Path, dlops_home: Path) -> None:
    """A record of an operation Optuna's replay has no case for (a newer Optuna's journal)
    was "cannot open storage ...: Should not reach."."""
    path = tmp_path / "newer.log"
    _journal_with_trials(path, n=1)
    with path.open("a") as f:
        f.write('{"op_code": 99, "worker_id": "w", "study_id": 0}\n')
    before = path.read_bytes()
    for command in (["study", "list"], ["study", "run", "--loss", "ce", "--dataset", "digits"]):
        result = CliRunner().invoke(app, [*command, "--storage", str(path)])
        assert result.exit_code == 2 and "Traceback" not in result.output
        line = result.output.strip().splitlines()[-1]
        assert line == (
            f"error: cannot open storage {path}: {path} holds a record of an operation Optuna {optuna.__version__} "
            "does not know (a journal written by a newer Optuna, or not an Optuna journal file)"
        ), result.output
        assert path.read_bytes() == before


def test_another_programs_sqlite_database_is_never_given_optuna_tables(tmp_path: Path) -> None:
    """A SQLite file of another program named as the storage: every command refuses it in
    one line and leaves it as it was (Optuna once added its tables to it); an empty file is
    no storage yet for a reader, and becomes one for a writer."""
    import sqlite3

    theirs = tmp_path / "app.db"
    with sqlite3.connect(theirs) as db:
        db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        db.execute("INSERT INTO users (name) VALUES ('ada')")
    before = theirs.read_bytes()
    for command in (["study", "list"], ["study", "show", "x"], ["report"]):
        result = CliRunner().invoke(app, [*command, "--storage", f"sqlite:///{theirs}"])
        assert result.exit_code != 0, (command, result.output)
        (line,) = result.output.strip().splitlines()
        assert "is another program's SQLite database (tables users)" in line, line
    with pytest.raises(StorageError, match="another program's SQLite database"):
        connect(f"sqlite:///{theirs}")  # a writer too
    assert theirs.read_bytes() == before

    text = tmp_path / "notes.db"
    text.write_text("not a database at all, just some text that is long enough to have a header\n" * 3)
    with pytest.raises(StorageError, match="is not a SQLite database"):
        connect(f"sqlite:///{text}", create=False)

    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(NoStorageYet, match="holds no tables"):
        connect(f"sqlite:///{empty}", create=False)
    assert empty.stat().st_size == 0
    connect(f"sqlite:///{empty}")  # a writer makes it a study storage
    assert connect(f"sqlite:///{empty}", create=False) is not None


def _journal_with_trials(path: Path, n: int = 3) -> list[tuple[int, str, float | None]]:
    """A journal file holding study "s" with ``n`` complete trials; their (number, state, value)."""
    study = optuna.create_study(study_name="s", storage=connect(f"journal://{path}").optuna)
    for i in range(n):
        study.enqueue_trial({"x": float(i)})
    study.optimize(lambda t: t.suggest_float("x", 0, 10) ** 2, n_trials=n)
    return _trials(path)


def _trials(path: Path) -> list[tuple[int, str, float | None]]:
    storage = connect(f"journal://{path}", create=False).optuna
    return [(t.number, t.state.name, t.value) for t in optuna.load_study(study_name="s", storage=storage).trials]


def test_a_torn_last_journal_record_is_set_aside_before_a_writer_appends(tmp_path: Path) -> None:
    """A journal whose last record was cut off mid-write (kill -9, a full disk) reads fine,
    since Optuna skips a line without its newline, but the next append was glued onto it and
    made the whole file unreadable. A reader leaves the file as it is; a writer moves the
    torn bytes to a side file, cuts the journal back to its last complete line and says so,
    and what it appends then reads back with every earlier trial."""
    path = tmp_path / "w.log"
    _journal_with_trials(path)
    whole = path.read_bytes()
    torn = whole[:-20]
    path.write_bytes(torn)
    kept = torn[: torn.rindex(b"\n") + 1]
    readable = _trials(path)  # what the torn file shows: the torn record was never applied
    assert [s for _, s, _ in readable[:2]] == ["COMPLETE", "COMPLETE"]
    assert path.read_bytes() == torn  # a reader never repairs

    storage = connect(f"journal://{path}")
    (aside,) = tmp_path.glob("w.log.torn-*")
    assert aside.read_bytes() == torn[len(kept) :]  # nothing lost: the torn bytes are beside the journal
    assert path.read_bytes() == kept
    assert storage.note is not None and str(aside) in storage.note and str(path) in storage.note
    complete_lines = kept.count(b"\n")
    assert f"its last complete line (line {complete_lines})" in storage.note
    study = optuna.load_study(study_name="s", storage=storage.optuna)
    study.enqueue_trial({"x": 5.0})
    study.optimize(lambda t: t.suggest_float("x", 0, 10) ** 2, n_trials=1)
    assert _trials(path) == [*readable, (len(readable), "COMPLETE", 25.0)]
    assert connect(f"journal://{path}").note is None  # a whole journal is left as it is

    only = tmp_path / "only.log"
    only.write_bytes(whole[: whole.index(b"\n") - 5])  # not one complete record
    assert "back to empty" in (connect(f"journal://{only}").note or "")
    assert only.read_bytes() == b"" and len(list(tmp_path.glob("only.log.torn-*"))) == 1


def test_a_record_torn_by_another_worker_during_a_run_is_set_aside_before_the_next_append(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Another worker of the study killed mid-append (or out of disk) while this run goes
    on: the storage this run opened before checks the tail under the lock before each
    append, so its next record is not glued to the torn one (which made the whole journal
    unreadable for every command, this run's next read included)."""
    path = tmp_path / "live.log"
    trials = _journal_with_trials(path, n=2)
    storage = connect(f"journal://{path}")  # opened while the journal was whole
    study = optuna.load_study(study_name="s", storage=storage.optuna)
    torn = b'{"op_code":6,"worker_id":"w1","trial_id":1,"user_attr":{"hist'
    with path.open("ab") as f:  # the other worker's append, cut off
        f.write(torn)
    study.enqueue_trial({"x": 3.0})
    study.optimize(lambda t: t.suggest_float("x", 0, 10) ** 2, n_trials=1)
    assert _trials(path) == [*trials, (len(trials), "COMPLETE", 9.0)]
    assert [t.value for t in study.trials] == [v for _, _, v in trials] + [9.0]
    (aside,) = tmp_path.glob("live.log.torn-*")
    assert aside.read_bytes() == torn
    said = [line for line in capfd.readouterr().err.splitlines() if line]
    assert (
        len(said) == 1
        and said[0].startswith(f"journal {path} ended in a record cut off mid-write")
        and str(aside) in said[0]
    )


def test_a_journal_whose_last_line_is_not_json_is_refused_before_writing(tmp_path: Path) -> None:
    """A complete last line that is no record (garbage ending in a newline) is skipped by
    Optuna's reader while it is last, but a record appended after it makes the file
    unreadable: a writer refuses in one line naming the file and the line, and changes
    nothing; a reader still reads the trials."""
    path = tmp_path / "g.log"
    trials = _journal_with_trials(path, n=2)
    lines = path.read_bytes().count(b"\n")
    with path.open("ab") as f:
        f.write(b"not json at all\n")
    before = path.read_bytes()
    with pytest.raises(StorageError, match=rf"journal {path}: line {lines + 1}, its last complete line, is not") as exc:
        connect(f"journal://{path}")
    assert "\n" not in str(exc.value)
    assert path.read_bytes() == before and not list(tmp_path.glob("g.log.torn-*"))
    assert _trials(path) == trials


def test_a_writer_never_cuts_a_file_that_is_not_a_journal(tmp_path: Path) -> None:
    """`--storage journal:FILE` naming a SQLite database, or a text file without a newline,
    is refused in one line by a writer and left byte for byte as it was (the torn-record
    repair would have moved the file's tail aside and cut the file)."""
    import sqlite3

    db = tmp_path / "dlops.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (x)")
    text = tmp_path / "notes.log"
    text.write_bytes(b"remember the milk")
    cases = [
        (db, f"{db} is a SQLite database, not a journal file: use --storage sqlite:///{db}"),
        (text, f"journal {text}: its last 17 bytes (after its last complete line) are not the start"),
    ]
    for path, says in cases:
        before = path.read_bytes()
        with pytest.raises(StorageError) as exc:
            connect(f"journal://{path}")
        assert str(exc.value).startswith(says) and "\n" not in str(exc.value)
        assert path.read_bytes() == before and not list(tmp_path.glob("*.torn-*"))
    # A reader (study list, show, replay, report, dashboard) says the same of the database,
    # where it said "not an Optuna journal file (UnicodeDecodeError ...)".
    for command in (["study", "list"], ["study", "show", "s"], ["report"]):
        result = CliRunner().invoke(app, [*command, "--storage", f"journal://{db}"])
        assert result.exit_code == 2, result.output
        (line,) = result.output.strip().splitlines()
        assert f"{db} is a SQLite database, not a journal file: use --storage sqlite:///{db}" in line, line
