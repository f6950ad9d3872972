"""Opening Optuna storages from a URL, locking a study across workers, and keeping
passwords out of every message.

``--storage`` (or ``$DLOPS_STORAGE``) takes one of these forms:

=====================================================  ==========================================
``sqlite:///relative/dlops.db``,                       one worker at a time (the default, under
``sqlite:////absolute/dlops.db``                       ``$DLOPS_HOME``)
``postgresql+psycopg2://user:password@host:5432/db``   many workers on many machines (heartbeats;
(or ``postgresql://``, ``postgres://``: psycopg2        a bare URL gets psycopg2, the driver that
unless psycopg 3 is installed)                         ships with dlops)
``journal:///absolute/path.log``,                      many workers on one machine (an append-only
``journal:relative/path.log``, or a plain path         Optuna journal file, ``fcntl``-locked)
ending in ``.log`` / ``.journal``
``redis://[:password@]host:6379/0[?prefix=NAME]``      many workers on many machines (Optuna's
                                                       Redis journal; ``prefix`` namespaces keys)
=====================================================  ==========================================

Other SQLAlchemy URLs (``mysql+pymysql://...``) are passed to Optuna's ``RDBStorage``; a
scheme SQLAlchemy does not know (``sqlit://``, ``file://``) is one line naming it.
In ``sqlite:`` and ``journal:`` URLs a path with ``?``, ``%`` or ``#`` is percent-encoded
(``%3F``, ``%25``, ``%23``), as the default URL under ``$DLOPS_HOME`` is; a password with
``@`` in a SQL URL is written ``%40``.
Every message that may show a URL goes through :func:`mask_url`.

Commands that only read (``study list``, ``study show``, ``report``, ``dashboard``, ``final
--params best``) open a storage with ``create=False``: a SQLite or journal file that does
not exist is not created (a mistyped ``--storage`` path leaves nothing behind, and says so),
and nothing is created beside one that does (the lock under which a new SQLite database is
created is taken by writers only). A folder given as the storage is refused in one line,
and so is a SQLite file or a PostgreSQL database that is not a study storage (another
program's database, or not a database): Optuna never adds its tables to it. A reader finds
no storage yet in an empty PostgreSQL database, and creates nothing there. A PostgreSQL
server that does not answer fails after :data:`CONNECT_TIMEOUT` seconds.

A writer (``create=True``) checks a journal file's tail first, under the lock Optuna appends
under (:func:`repair_journal_tail`): a last record cut off mid-write is moved to a side file
and the journal cut back to its last complete line (:attr:`StudyStorage.note` says so); a
last complete line that is not JSON is refused. While the run goes on, each of its appends
does the same first (a record another worker tore meanwhile), and so does every append of any
command (the record of ``study delete``, a note written in the dashboard). Commands that only
read never change the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import sqlite3
import sys
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import optuna
from optuna.storages.journal import JournalFileBackend

from dlops.errors import StorageError

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

# ``scheme://user:PASSWORD@host``: the password runs to the last ``@`` before the host (a
# password may hold ``@``; the host part ends at ``/``, ``?`` or ``#``, so an ``@`` in a query
# string is not taken for one). A password with a raw ``/``, ``?`` or ``#`` (not a valid URL,
# though SQLAlchemy reads one) is masked up to its first ``@``, unless it is all digits up to
# the ``/`` (``host:6379/0?prefix=a@b`` has a port there, not a password).
_URL_PASSWORD = re.compile(
    r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)"
    r"(?P<password>[^\s/?#]*|(?!\d*(?:[/?#\s]|$))[^@\s]*)(?P<tail>@)"
)
_KEY_PASSWORD = re.compile(r"(?P<head>\bpassword\s*=\s*)(?P<password>[^&\s'\"]+)", re.IGNORECASE)

JOURNAL_SUFFIXES = (".log", ".journal")
RETRY_LIMIT = 3  # a trial whose worker keeps dying is retried this often, then left FAIL
HEARTBEAT_INTERVAL = 60  # seconds between trial heartbeats on a PostgreSQL (RDB) storage, by default
REDIS_LOCK_TTL = 120  # seconds; a lock whose holder vanished expires after this
CONNECT_TIMEOUT = 10  # seconds a PostgreSQL connection may take to open (unless the URL says)


def mask_url(text: str) -> str:
    """Replace every password in ``text`` (``scheme://user:PASSWORD@``, ``password=...``) by ``***``."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}***{m['tail']}", text)
    return _KEY_PASSWORD.sub(lambda m: f"{m['head']}***", text)


def storage_kind(url: str) -> str:
    """``sqlite``, ``postgresql``, ``rdb`` (another SQLAlchemy database), ``journal`` or ``redis``."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if url.startswith("journal:") or (not scheme and url.endswith(JOURNAL_SUFFIXES)):
        return "journal"
    if scheme in ("redis", "rediss", "unix"):
        return "redis"
    if scheme.startswith("sqlite"):
        return "sqlite"
    if scheme.startswith("postgresql") or scheme.startswith("postgres"):
        return "postgresql"
    if scheme:
        return "rdb"
    raise StorageError(
        f"unsupported storage {mask_url(url)!r}: use sqlite:///path.db, postgresql+psycopg2://user@host/db, "
        "journal:///path.log or redis://host:6379/0"
    )


SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file
_SCHEMES = ("sqlite", "postgresql", "postgres", "journal", "redis", "rediss", "unix")


def check_sql_scheme(url: str) -> None:
    """A PostgreSQL URL or one of another SQL database names a dialect SQLAlchemy has: a
    mistyped scheme (``sqlit://``, ``postgress://``, ``file://``, ``http://``) is one line
    naming it, with the nearest dlops scheme, rather than SQLAlchemy's "Can't load plugin:
    sqlalchemy.dialects:sqlit". (A dialect whose driver is not installed, ``mysql://``
    without MySQLdb, passes: the driver's own error names the module.)"""
    import difflib

    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    scheme = url.split("://", 1)[0]
    try:
        make_url(sqlalchemy_url(url)).get_dialect()
    except NoSuchModuleError:
        base = scheme.split("+")[0].lower()
        near = difflib.get_close_matches(base, _SCHEMES, n=1, cutoff=0.6)
        hint = f" (a typo of {near[0]}?)" if near and near[0] != base else ""
        raise StorageError(
            f"unknown storage scheme {scheme!r} in {mask_url(url)!r}{hint}: use sqlite:///path.db, "
            "postgresql+psycopg2://user@host/db, journal:///path.log (or a path ending in .log), "
            "redis://host:6379/0 or another SQLAlchemy database URL"
        ) from None
    except ArgumentError:
        pass  # a URL SQLAlchemy cannot parse: its own message, when it is opened


def sqlalchemy_url(url: str) -> str:
    """The URL handed to SQLAlchemy. A bare ``postgresql://`` (or ``postgres://``, which
    SQLAlchemy does not know) names the psycopg2 driver that ships with dlops, unless
    psycopg 3, SQLAlchemy's own default, is installed."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("postgresql", "postgres"):
        return url
    import importlib.util

    return ("postgresql" if importlib.util.find_spec("psycopg") else "postgresql+psycopg2") + "://" + rest


def server_identity(url: str) -> str:
    """A PostgreSQL or Redis URL as one spelling per database, password masked: what a
    server storage's checkpoints are kept by. The spellings dlops accepts for one database
    give one identity: ``postgres://``, ``postgresql://`` or any driver, the default port
    (5432, 6379) written or not, a host name in any case, connection options
    (``connect_timeout``, ``sslmode``, ...) or not; a Redis database 0 written or not, and
    Redis connection options. What picks another database (its name, a PostgreSQL
    ``options=-csearch_path=...``, a Redis ``prefix``) is kept. The documented forms
    (``postgresql+psycopg2://user:***@host:5432/db``, ``redis://host:6379/0?prefix=p``) are
    their own identity. Any other URL: :func:`mask_url`."""
    kind = storage_kind(url)
    try:
        if kind == "postgresql":
            from sqlalchemy.engine import make_url

            parsed = make_url(url)
            kept = {k: v for k, v in parsed.query.items() if k == "options"}
            return parsed.set(
                drivername="postgresql+psycopg2",
                host=(parsed.host or "").lower() or None,
                port=parsed.port or 5432,
                query=kept,
            ).render_as_string(hide_password=True)
        if kind == "redis" and url.lower().startswith(("redis://", "rediss://")):
            from redis.connection import parse_url

            plain, prefix = _split_redis_prefix(url)
            options = parse_url(plain)
            user = options.get("username") or ""
            auth = f"{user}:***@" if options.get("password") else (f"{user}@" if user else "")
            host = str(options.get("host") or "localhost").lower()
            tail = f"?{urlencode({'prefix': prefix}, quote_via=quote)}" if prefix else ""
            scheme = url.split("://", 1)[0].lower()
            return f"{scheme}://{auth}{host}:{options.get('port') or 6379}/{options.get('db') or 0}{tail}"
    except Exception:  # noqa: BLE001 - a URL the driver will refuse anyway: as written
        pass
    return mask_url(url)


def journal_path(url: str) -> Path:
    """The file of a journal URL: ``journal:///abs/x.log`` -> ``/abs/x.log``, ``journal:x.log`` -> ``x.log``.

    As in a ``sqlite:///`` URL, ``%XX`` in a ``journal:`` URL is decoded (``%3F`` is ``?``,
    ``%25`` is ``%``; see :func:`journal_url`); a plain path is taken as it is."""
    if url.startswith("journal:"):
        rest = unquote(url[len("journal:") :])
        if rest.startswith("//"):
            rest = rest[2:]
    else:
        rest = url
    if not rest:
        raise StorageError(f"journal storage {url!r} names no file (e.g. journal:///path/to/study.log)")
    return Path(rest).expanduser()


def journal_url(path: Path) -> str:
    """The ``journal:///...`` URL of ``path`` (made absolute), read back by :func:`journal_path`."""
    return "journal://" + quote(str(Path(path).absolute()))


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL as SQLAlchemy reads it (``%XX`` decoded);
    None for an in-memory database."""
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    return Path(database) if database not in (None, "", ":memory:") else None


def heartbeat_settings(url: str, interval: int | None, grace_period: int | None) -> tuple[int | None, int | None]:
    """The heartbeat interval and grace period (seconds) a run opens ``url`` with.

    Heartbeats exist on PostgreSQL and the other SQLAlchemy databases (not SQLite): the
    interval defaults to :data:`HEARTBEAT_INTERVAL`, the grace period (None) to twice the
    interval; a grace period shorter than the interval would fail trials whose workers are
    alive, and is refused. SQLite and the journal storages have none: an interval or grace
    period given for one would have no effect, and is refused too (:class:`StorageError`)."""
    kind = storage_kind(url)
    if kind not in ("postgresql", "rdb"):
        given = [
            name
            for name, value in (("--heartbeat-interval", interval), ("--grace-period", grace_period))
            if value is not None
        ]
        if given:
            it = "they" if len(given) > 1 else "it"
            raise StorageError(
                f"{' and '.join(given)}: {mask_url(url)} is a {kind} storage, without the heartbeats of PostgreSQL, "
                f"so {it} would have no effect: leave {'them' if len(given) > 1 else 'it'} out (dlops finds the "
                "trial of a dead worker by its pid on this machine)"
            )
        return None, None
    interval = HEARTBEAT_INTERVAL if interval is None else interval
    if grace_period is not None and grace_period < interval:
        raise StorageError(
            f"--grace-period {grace_period} is shorter than the heartbeat interval ({interval} s): trials of "
            "live workers would be failed between two heartbeats; give a grace period of at least the interval "
            "(by default it is twice the interval)"
        )
    return interval, grace_period


class StorageLost(StorageError):
    """The storage stopped answering during a run (a server down, a network gone)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(
            f"lost the storage {mask_url(url)} ({mask_url(reason)}): a trial it was running stays RUNNING there with "
            "its checkpoint; once the storage answers, run the same command again and it resumes from that checkpoint"
        )


_PROBE = "\0dlops-probe"  # a study name no study has


def storage_outage(storage: optuna.storages.BaseStorage) -> str | None:
    """Why ``storage`` does not answer (one line), or None when it does: a look-up of a
    study that does not exist, which a storage that answers refuses with ``KeyError``."""
    try:
        storage.get_study_id_from_name(_PROBE)
    except KeyError:
        return None
    except Exception as exc:  # noqa: BLE001 - whatever the driver raises is the reason
        return driver_error_line(exc)
    return None


def _innermost(exc: BaseException, *, context: bool = False) -> BaseException:
    """The root of a chain of errors: the ``__cause__`` of each (and, with ``context``, the
    error being handled when it was raised), to the end or to where the chain loops."""
    seen = {id(exc)}
    while (inner := exc.__cause__ or (exc.__context__ if context else None)) is not None and id(inner) not in seen:
        seen.add(id(inner))
        exc = inner
    return exc


def _error_lines(exc: BaseException) -> list[str]:
    """The non-blank lines of an error's message, without SQLAlchemy's link to its docs."""
    return [ln.strip() for ln in str(exc).splitlines() if ln.strip() and "sqlalche.me" not in ln]


def driver_error_line(exc: BaseException) -> str:
    """A storage driver's error as one line: the root of Optuna's wrapping (its "An exception
    is raised during the commit ..." hides a lost connection), without SQLAlchemy's link."""
    exc = _innermost(exc)
    return " ".join(_error_lines(exc))[:200] or type(exc).__name__


class NoStorageYet(StorageError):
    """A SQLite or journal storage whose file does not exist, opened to read."""


class StorageWriteRefused(StorageError):
    """A storage that can be read but refused a write (a read-only file or mount, a
    read-only database user, a database locked by another writer for too long)."""


def write_refusal(exc: BaseException) -> str:
    """Why a storage refused a write, in a few words: the first line of the innermost
    error (``attempt to write a readonly database``), not the driver's SQL and parameters."""
    exc = _innermost(exc, context=True)
    lines = _error_lines(exc)
    return mask_url(lines[0][:200]) if lines else type(exc).__name__


def storage_file(url: str) -> Path | None:
    """The file a SQLite or journal storage lives in (None for a server or in-memory one)."""
    kind = storage_kind(url)
    if kind == "sqlite":
        _check_sqlite_url(url)
        return sqlite_path(url)
    if kind == "journal":
        return journal_path(url).absolute()
    return None


def _check_sqlite_url(url: str) -> None:
    """SQLAlchemy takes everything after a ``?`` for options and silently drops what is not
    ``key=value``: ``sqlite:////a/b?c/dlops.db`` opens ``/a/b``. Nor does it expand ``~``:
    ``sqlite:///~/dlops.db`` is ``./~/dlops.db``, another database in every folder it runs
    from. Refuse such URLs."""
    rest = url.split("://", 1)[1] if "://" in url else ""
    if rest and not rest.startswith("/"):  # sqlite://host.db, sqlite://tmp/x.db: SQLite has no host
        path = rest.split("?", 1)[0]
        raise StorageError(
            f"SQLite URL {mask_url(url)!r} names a host, {path.split('/', 1)[0]!r}, which SQLite ignores "
            f"(it would open {'an in-memory database' if '/' not in path else repr(path.split('/', 1)[1])}): "
            f"write sqlite:///{path} for a path relative to the current folder, sqlite:////{path} for an absolute one"
        )
    database = rest[1:]
    if database.startswith("~/"):
        home = Path(database).expanduser()
        raise StorageError(
            f"SQLite URL {mask_url(url)!r}: SQLAlchemy does not expand '~' (it would open {Path.cwd() / database}, "
            f"a folder named '~' here): write the path out, sqlite:///{home}"
        )
    if "?" not in url:
        return
    options = url.split("?", 1)[1]
    if "/" in options or any("=" not in part for part in options.split("&")):
        raise StorageError(
            f"SQLite URL {mask_url(url)!r} has a '?' in its path (SQLAlchemy would read the rest as options "
            f"and open another file): write it as %3F (and a '%' as %25)"
        )


def _split_redis_prefix(url: str) -> tuple[str, str]:
    """dlops' own ``?prefix=`` query parameter is not a redis-py option: take it out."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = "".join(v for k, v in query if k == "prefix")
    rest = urlencode([(k, v) for k, v in query if k != "prefix"])
    # Rebuilt by hand: urlunsplit drops the "//" of a URL without a host (unix:///run/redis.sock).
    plain = f"{parts.scheme}://{parts.netloc}{parts.path}" + (f"?{rest}" if rest else "")
    return plain + (f"#{parts.fragment}" if parts.fragment else ""), prefix


def _check_redis_db(url: str) -> None:
    """The path of a ``redis://`` URL is its database number; redis-py reads any other path
    (``/abc``, ``/1/x``) as database 0, where other studies may be: refused in one line."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("redis", "rediss"):
        return
    db = unquote(parts.path).strip("/")
    if db and not db.isdigit():
        raise StorageError(
            f"the Redis database in {mask_url(url)} is {db!r}, not a number (redis://HOST:6379/0; "
            "a study's keys are told apart by ?prefix=NAME)"
        )


class _Lock:
    """Base: idempotent release and ``with`` support."""

    held = False

    def acquire(self) -> None:
        self._acquire()
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self._release()

    def _acquire(self) -> None: ...

    def _release(self) -> None: ...

    def __enter__(self) -> _Lock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class _FileLock(_Lock):
    """``flock`` on a side file: released by the kernel when the holder dies."""

    def __init__(self, path: Path):
        self.path = path
        self._file: IO[str] | None = None

    def _acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+")  # noqa: SIM115 - open while the lock is held
        fcntl.flock(self._file, fcntl.LOCK_EX)

    def _release(self) -> None:
        assert self._file is not None
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
        self._file = None


class _PostgresLock(_Lock):
    """A session-level advisory lock: released by the server when the holder's connection dies."""

    def __init__(self, engine: Engine, name: str):
        self.engine, self.key = engine, zlib.crc32(f"dlops:{name}".encode())
        self._conn: Connection | None = None

    def _acquire(self) -> None:
        from sqlalchemy import text

        self._conn = self.engine.connect()
        self._conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
        self._conn.commit()

    def _release(self) -> None:
        from sqlalchemy import text

        assert self._conn is not None
        try:
            self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
            self._conn.commit()
        finally:
            self._conn.close()
            self._conn = None


class _RedisLock(_Lock):
    def __init__(self, client: Any, name: str):
        self._lock = client.lock(name, timeout=REDIS_LOCK_TTL)

    def _acquire(self) -> None:
        self._lock.acquire(blocking=True)

    def _release(self) -> None:
        # Any failure means the lock expired: someone else may hold it now, nothing to undo.
        with contextlib.suppress(Exception):
            self._lock.release()


class _NoLock(_Lock):
    pass


@dataclass
class StudyStorage:
    """An opened storage and what dlops needs to know about it."""

    url: str
    kind: str
    optuna: optuna.storages.BaseStorage
    lock_file: Path | None = None
    redis_url: str | None = None
    redis_prefix: str = ""
    note: str | None = None  # what opening it repaired (a journal's torn last record set aside), to print

    @property
    def masked(self) -> str:
        return mask_url(self.url)

    @property
    def many_workers(self) -> bool:
        """SQLite takes one writer at a time: parallel workers get "database is locked"."""
        return self.kind != "sqlite"

    @property
    def heartbeat(self) -> bool:
        """Optuna's heartbeats are on (RDB storages opened with a heartbeat interval)."""
        return getattr(self.optuna, "get_heartbeat_interval", lambda: None)() is not None

    def lock(self, study_name: str) -> _Lock:
        """A lock every dlops worker of ``study_name`` takes around "how many trials are
        left? then ask": the baseline is enqueued once and no more trials start than asked for."""
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", study_name)
        if self.lock_file is not None:
            return _FileLock(self.lock_file.with_name(f"{self.lock_file.name}.{safe}.dlops-lock"))
        if self.kind == "postgresql":
            return _PostgresLock(self.optuna.engine, study_name)  # type: ignore[attr-defined]
        if self.kind == "redis":
            import redis

            assert self.redis_url is not None  # connect() sets it for every Redis storage
            return _RedisLock(redis.Redis.from_url(self.redis_url), f"{self.redis_prefix}:dlops-lock:{study_name}")
        return _NoLock()  # another SQL database: best effort (no cross-worker lock)


def check_url(url: str) -> str:
    """What can be told of ``url`` without opening it, in one line each: a scheme that is no
    storage, an in-memory or host-naming SQLite URL, a password with '@', a folder given as
    the file. Returns the storage kind (:func:`storage_kind`)."""
    kind = storage_kind(url)
    if kind in ("rdb", "postgresql"):
        check_sql_scheme(url)
    if kind == "sqlite" and storage_file(url) is None:
        raise StorageError(
            f"{mask_url(url)} is an in-memory SQLite database: the study would vanish with this process "
            "(use sqlite:///path/to/dlops.db)"
        )
    password = _URL_PASSWORD.match(url)
    if kind in ("postgresql", "rdb") and password and "@" in password["password"]:
        # SQLAlchemy splits at the first '@' and would send the rest of the password out as
        # the host name (and print it in the driver's error).
        raise StorageError(f"the password in {mask_url(url)} contains '@': write it as %40 in the URL")
    path = storage_file(url)
    if path is not None and path.is_dir():
        raise StorageError(f"{mask_url(url)} names the folder {path}, not a study storage file (check --storage)")
    return kind


def connect(
    url: str, *, create: bool = True, heartbeat_interval: int | None = None, grace_period: int | None = None
) -> StudyStorage:
    """Open ``url`` (see the module docstring for the forms).

    With ``create=False`` a SQLite or journal file that does not exist raises
    :class:`NoStorageYet` instead of being created (with its folders).

    For RDB storages other than SQLite, ``heartbeat_interval`` (seconds) turns on Optuna's
    heartbeats: a trial whose worker stops beating for ``grace_period`` seconds (default
    twice the interval) is marked FAIL and re-queued by ``RetryHeartbeatStaleTrialCallback``.
    The journal storages have no heartbeat (dlops proves dead workers by pid instead).
    """
    kind = check_url(url)
    path = storage_file(url)
    if not create and path is not None and not path.exists():
        relative = (
            f"; sqlite:/// with three slashes is a path relative to the current folder, {Path.cwd()}, "
            "sqlite://// with four an absolute one"
            if kind == "sqlite" and not path.is_absolute()
            else ""
        )
        raise NoStorageYet(
            f"no study storage at {path.absolute()}: nothing has run with {mask_url(url)} yet "
            f"(check --storage, $DLOPS_STORAGE and $DLOPS_HOME{relative})"
        )
    if kind == "journal" and path is not None and _is_sqlite_file(path):  # read or written: the same line
        raise StorageError(f"{path} is a SQLite database, not a journal file: use --storage sqlite:///{path}")
    try:
        with warnings.catch_warnings():  # the journal backends and the retry callback are "experimental"
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return _connect(url, kind, heartbeat_interval, grace_period, create=create)
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any driver error is about the user's URL or server
        detail = " ".join(_error_lines(exc))[:300] or type(exc).__name__
        if kind == "journal" and isinstance(exc, (KeyError, TypeError, ValueError)):
            # a file of other JSON lines: Optuna fails on a missing key of its log format
            detail = f"{storage_file(url)} is not an Optuna journal file ({type(exc).__name__} {detail})"
        elif kind == "journal" and isinstance(exc, AssertionError):
            # Optuna's replay meets an op_code it does not know: "Should not reach."
            detail = (
                f"{storage_file(url)} holds a record of an operation Optuna {optuna.__version__} does not know "
                "(a journal written by a newer Optuna, or not an Optuna journal file)"
            )
        raise StorageError(f"cannot open storage {mask_url(url)}: {mask_url(detail)}") from None


def _is_sqlite_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(16) == SQLITE_MAGIC
    except OSError:
        return False


# Tables every Optuna RDB storage has (Optuna creates them all at once, under the create lock).
_OPTUNA_TABLES = {"studies", "version_info"}


def rdb_engine_kwargs(url: str, kind: str) -> dict[str, Any]:
    """SQLAlchemy engine options for a PostgreSQL (or other SQL server) URL: connections
    checked before use (PostgreSQL drops idle ones) and, on PostgreSQL, a connect timeout
    of :data:`CONNECT_TIMEOUT` s (psycopg2, psycopg) unless the URL gives ``connect_timeout``: without one,
    libpq waits forever on a host that drops packets or a port where another server
    listens (a Redis port, say)."""
    from sqlalchemy.engine import make_url

    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    parsed = make_url(sqlalchemy_url(url))
    libpq = kind == "postgresql" and parsed.get_driver_name() in ("psycopg2", "psycopg")
    if libpq and "connect_timeout" not in parsed.query:
        kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT}
    return kwargs


def _check_rdb_database(url: str, engine_kwargs: dict[str, Any], create: bool) -> None:
    """A SQL server database (PostgreSQL, ...) with tables must hold Optuna's, and a
    reader does not create them in an empty one: Optuna would add its tables (and an
    ``alembic_version``) to another program's database, or to a mistyped one."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(sqlalchemy_url(url), **engine_kwargs)
    try:
        tables = set(sqlalchemy.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    _check_tables(
        tables,
        create,
        empty=f"no study storage in {mask_url(url)}: the database holds no tables (check --storage)",
        foreign=lambda listed: (
            f"{mask_url(url)} is another program's database (tables {listed}), not a study storage: "
            "give another database in --storage"
        ),
    )


def _check_tables(tables: set[str], create: bool, *, empty: str, foreign: Callable[[str], str]) -> None:
    """A database with no tables is no storage yet for a reader (``empty``: :class:`NoStorageYet`);
    one with tables but not Optuna's is refused for everyone (``foreign`` of the tables listed)."""
    if not tables and not create:
        raise NoStorageYet(empty)
    if tables and not tables >= _OPTUNA_TABLES:
        listed = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        raise StorageError(foreign(listed))


def _check_sqlite_file(url: str, path: Path, create: bool) -> None:
    """A SQLite file that exists must be a study storage, or (for a writer) an empty
    database: Optuna would otherwise add its tables to another program's database, or a
    reader would create them in an empty file."""
    if not path.exists():
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        raise StorageError(f"{mask_url(url)}: {path} is not a SQLite database ({exc}); check --storage") from None
    _check_tables(
        tables,
        create,
        empty=f"no study storage at {path}: the file holds no tables (check --storage)",
        foreign=lambda listed: (
            f"{mask_url(url)}: {path} is another program's SQLite database (tables {listed}), "
            "not a study storage: give another --storage path"
        ),
    )


def _connect(
    url: str, kind: str, heartbeat_interval: int | None, grace_period: int | None, *, create: bool = True
) -> StudyStorage:
    if kind == "sqlite":
        _check_sqlite_url(url)
        lock_file = sqlite_path(url)
        if lock_file is not None and create:
            lock_file.parent.mkdir(parents=True, exist_ok=True)
            # Optuna creates the tables of a new database without a transaction around them:
            # two processes opening one new file at once collide ("table ... already exists").
            # Whoever holds the lock creates them; the others find them there. A reader
            # (create=False) opens a file that exists and creates nothing, not even this lock.
            with _FileLock(lock_file.with_name(f"{lock_file.name}.dlops-create-lock")):
                _check_sqlite_file(url, lock_file, create)
                return StudyStorage(url, kind, optuna.storages.RDBStorage(url), lock_file=lock_file)
        if lock_file is not None:
            _check_sqlite_file(url, lock_file, create)
        return StudyStorage(url, kind, optuna.storages.RDBStorage(url), lock_file=lock_file)
    if kind == "journal":
        from optuna.storages.journal import JournalStorage

        from dlops.journal_lock import OwnedJournalLock

        path = journal_path(url).absolute()
        lock = OwnedJournalLock(path)  # the lock Optuna appends under, naming its owner
        note = None
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
            note = repair_journal_tail(path, lock)
        # Every command's appends check the tail (a reader's only append may be a deletion or
        # a dashboard note); a command that appends nothing never changes the file.
        file_backend = _CheckedJournalFileBackend(str(path), lock_obj=lock)
        return StudyStorage(url, kind, JournalStorage(file_backend), lock_file=path, note=note)
    if kind == "redis":
        import redis
        from optuna.storages.journal import JournalRedisBackend, JournalStorage

        redis_url, prefix = _split_redis_prefix(url)
        _check_redis_db(url)
        redis.Redis.from_url(redis_url).ping()  # fail here, in one line, not mid-study
        backend = JournalRedisBackend(redis_url, prefix=prefix)
        return StudyStorage(url, kind, JournalStorage(backend), redis_url=redis_url, redis_prefix=prefix)
    engine_kwargs = rdb_engine_kwargs(url, kind)
    _check_rdb_database(url, engine_kwargs, create)
    kwargs: dict[str, Any] = {"engine_kwargs": engine_kwargs}
    if heartbeat_interval is not None:
        kwargs.update(
            heartbeat_interval=int(heartbeat_interval),
            grace_period=int(grace_period) if grace_period is not None else None,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=RETRY_LIMIT),
        )
    return StudyStorage(url, kind, optuna.storages.RDBStorage(sqlalchemy_url(url), **kwargs))


class _CheckedJournalFileBackend(JournalFileBackend):
    """Optuna's journal file, whose every append first sets aside a record another process
    cut off mid-write since the last one (``kill -9`` or a full disk during its append,
    while this run goes on): glued to it, the next record would make the whole file
    unreadable. Says so on stderr, once per torn record."""

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        self._lock.acquire()
        try:
            note = _set_aside_torn_tail(Path(self._file_path), quick=True)
            if note:
                sys.stderr.write(f"{note}\n")
                sys.stderr.flush()
            data = "\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n"
            with open(self._file_path, "ab") as f:  # as Optuna appends
                f.write(data.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
        finally:
            self._lock.release()


def _tail_lines(f: IO[bytes], size: int, chunk: int = 1 << 16) -> tuple[int, int]:
    """Where the last complete line of a file of ``size`` bytes starts and where it ends
    (just past its newline): (0, 0) when the file holds no complete line."""
    pos = size
    found: list[int] = []  # the offsets of the last two newlines, the last first
    while pos > 0 and len(found) < 2:
        start = max(0, pos - chunk)
        f.seek(start)
        block = f.read(pos - start)
        i = len(block)
        while len(found) < 2 and (i := block.rfind(b"\n", 0, i)) >= 0:
            found.append(start + i)
        pos = start
    if not found:
        return 0, 0
    return (found[1] + 1 if len(found) == 2 else 0), found[0] + 1


def _line_number(f: IO[bytes], offset: int) -> int:
    """The number (from 1) of the line that starts at byte ``offset``."""
    f.seek(0)
    count, done = 0, 0
    while done < offset:
        block = f.read(min(1 << 20, offset - done))
        if not block:
            break
        count += block.count(b"\n")
        done += len(block)
    return count + 1


def repair_journal_tail(path: Path, lock: Any) -> str | None:
    """Before a writer appends to the journal file ``path``: a last record cut off mid-write
    (no trailing newline: ``kill -9`` or a full disk during an append), which Optuna's reader
    skips but would glue the next record onto, making the whole file unreadable, is moved to
    ``PATH.torn-<time>`` beside it and the journal cut back to its last complete line; the
    returned note says so (None when there was nothing to do). A last complete line that is
    not JSON is refused (:class:`StorageError`) and the file left as it is. Runs under
    ``lock``, the one Optuna appends under, so no record is being written meanwhile."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    lock.acquire()
    try:
        return _set_aside_torn_tail(path)
    finally:
        lock.release()


def _set_aside_torn_tail(path: Path, *, quick: bool = False) -> str | None:
    """:func:`repair_journal_tail` under the journal's lock, held by the caller. ``quick``
    (before each append): a file that is empty or ends in a newline, as after every append
    but a torn one, is left at that, by its last byte."""
    if quick:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return None
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return None
    with open(path, "r+b") as f:
        if f.read(16) == SQLITE_MAGIC:
            raise StorageError(
                f"{path} is a SQLite database, not a journal file: use --storage sqlite:///{path} (nothing was written)"
            )
        size = os.fstat(f.fileno()).st_size
        start, end = _tail_lines(f, size)
        if end > start:
            f.seek(start)
            line = f.read(end - start)
            try:
                json.loads(line)
            except ValueError:
                number = _line_number(f, start)
                raise StorageError(
                    f"journal {path}: line {number}, its last complete line, is not a journal record (not "
                    "JSON); nothing was written, since a record appended after it would make the file "
                    "unreadable: move that line out of the file, then run again"
                ) from None
        if end == size:
            return None
        f.seek(end)
        torn = f.read(size - end)
        if not torn.lstrip().startswith(b"{"):  # every record is a JSON object: this is another file
            raise StorageError(
                f"journal {path}: its last {len(torn)} bytes (after its last complete line) are not the start "
                "of a journal record; is it a journal file? Nothing was written"
            )
        aside = _write_aside(path, torn)
        f.truncate(end)
        f.flush()
        os.fsync(f.fileno())
        complete = f"its last complete line (line {_line_number(f, start)})" if end else "empty"
    return (
        f"journal {path} ended in a record cut off mid-write ({len(torn)} bytes, without a newline; "
        f"never applied): moved it to {aside} and cut the journal back to {complete}"
    )


def _write_aside(path: Path, data: bytes) -> Path:
    """Write ``data`` to a new file ``PATH.torn-<time>`` (never over another) and sync it;
    a failure (a full disk) removes what was begun and raises :class:`StorageError`."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for n in range(1000):
        aside = path.with_name(f"{path.name}.torn-{stamp}" + (f"-{n}" if n else ""))
        try:
            fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue
        except OSError as exc:
            raise StorageError(
                f"journal {path} ends in a record cut off mid-write, which could not be set aside "
                f"({exc.strerror or exc}); nothing was changed: free some space, then run again"
            ) from None
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            aside.unlink(missing_ok=True)
            raise StorageError(
                f"journal {path} ends in a record cut off mid-write, which could not be set aside in {aside} "
                f"({exc.strerror or exc}); nothing was changed: free some space, then run again"
            ) from None
        return aside
    raise StorageError(f"journal {path}: too many {path.name}.torn-* files from this second; run again")


def open_storage(url: str, **kwargs: Any) -> optuna.storages.BaseStorage:
    """The Optuna storage for ``url`` (see :func:`connect`; ``create=False`` to only read)."""
    return connect(url, **kwargs).optuna
