"""Append-only answer cache that makes `edu-filter score` resumable after a crash or SIGKILL.

Every answer the model gives is committed to SQLite (WAL journal) the moment it arrives, keyed by
(run key, document id, attempt), with why it stopped, the model that wrote it, how many characters of the document
its prompt held and a hash of the document's text. The run key hashes everything that changes an answer: prompt
version, model and generation settings. Re-running the same command replays stored answers instead of asking again;
changing the prompt or the settings gives a new run key, so answers are never mixed across settings, and an answer
is replayed only for the very text it was given (an edited document, or another --text-field, is asked again).
Another --max-chars alone is the exception: an answer is replayed where its prompt held what this run's would (see
`_Scorer._answers_with_other_max_chars`).

Answers that arrive together are committed together: `add` opens a transaction and the commit runs on the very
next turn of the event loop, so at most the answers of one loop turn are in flight to disk. WAL with
synchronous=NORMAL survives the process being killed at any point after a commit (the OS already holds the write);
only a power cut can lose the last few answers, which are then simply asked again.

`score --select active` also records each round's draw (documents and inclusion probabilities) here, committed
before any of its documents is asked about, so a resumed run replays the same choices instead of drawing anew, and
the pool the draws were made from, so that a run on another pool is refused instead of drawing (and paying) anew.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from edu_filter.documents import LEGACY_SAMPLER, NESTED_SAMPLER, InputError, RunError, text_hash

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_key TEXT PRIMARY KEY,
    settings TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS answers (
    run_key TEXT NOT NULL,
    doc_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    response TEXT NOT NULL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    created REAL NOT NULL,
    finish_reason TEXT,
    model TEXT,
    doc_chars INTEGER,
    text_hash TEXT,
    PRIMARY KEY (run_key, doc_id, attempt)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS selections (
    selection_key TEXT NOT NULL,
    round INTEGER NOT NULL,
    doc_id TEXT NOT NULL,
    probability REAL NOT NULL,
    PRIMARY KEY (selection_key, doc_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS selection_pools (
    selection_key TEXT PRIMARY KEY,
    pool TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS facts (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
"""
SAMPLER = "sampler"  # fact: how `score --sample` drew the documents whose answers the cache holds
# Columns added after the first release; caches written before get them on open. Their answers have no text_hash:
# nothing says which text they were given, so they are never replayed (asked again once rather than risk a wrong score).
_ADDED_COLUMNS = {"finish_reason": "TEXT", "model": "TEXT", "doc_chars": "INTEGER", "text_hash": "TEXT"}


@dataclass(frozen=True)
class Answer:
    """One model answer as received (before parsing)."""

    text: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None  # "stop", or "length" when cut off at max_tokens
    model: str | None = None  # the model named in the response


def run_key(settings: dict) -> str:
    """Stable id of everything that changes an answer (prompt version, model, generation settings)."""
    return hashlib.sha256(orjson.dumps(settings, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def recorded_selection_pool(path: str | Path, selection_key: str) -> str | None:
    """`AnswerCache.selection_pool` read without opening the cache for a run (nothing created or written): for
    checks made before a server is started."""
    row = _read_only(path, "SELECT pool FROM selection_pools WHERE selection_key = ?", (selection_key,))
    return None if row is None else row[0]


def recorded_selection_rounds(path: str | Path, selection_key: str) -> int:
    """How many rounds of this selection the cache holds, read as `recorded_selection_pool` is."""
    row = _read_only(path, "SELECT COUNT(DISTINCT round) FROM selections WHERE selection_key = ?", (selection_key,))
    return 0 if row is None else row[0]


def _read_only(path: str | Path, query: str, args: tuple) -> tuple | None:
    """The first row of `query` on the cache at `path` opened read-only; None where there is no such cache."""
    if not Path(path).is_file():
        return None
    db = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
    try:
        return db.execute(query, args).fetchone()
    except sqlite3.OperationalError:  # a cache written before selections were recorded
        return None
    finally:
        db.close()


SQLITE_HEADER = b"SQLite format 3\x00"


def check_answer_cache(path: str | Path) -> None:
    """An existing --cache must be an SQLite file (an empty one is a new cache): another file named there (an input,
    a JSONL) stopped the run in a traceback after the server was started."""
    path = Path(path)
    if path.is_file() and path.stat().st_size:
        with path.open("rb") as fh:
            if fh.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
                raise InputError(f"--cache {path}: not an edu-filter answer cache (not an SQLite file); give another "
                                 "path")


class AnswerCache:
    """SQLite-backed store of received answers; use as a context manager."""

    def __init__(self, path: str | Path, settings: dict):
        self.path = Path(path)
        self.settings = settings
        self.run_key = run_key(settings)
        self._db: sqlite3.Connection | None = None
        self._fresh = False  # nothing stored for this run yet: skip lookups
        self._commit_scheduled = False
        self._unwritable: RunError | None = None  # set once a write failed: every later `add` raises it

    def __enter__(self) -> AnswerCache:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None)  # we open and commit transactions ourselves
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        present = {row[1] for row in db.execute("PRAGMA table_info(answers)")}
        for column, kind in _ADDED_COLUMNS.items():
            if column not in present:
                db.execute(f"ALTER TABLE answers ADD COLUMN {column} {kind}")
        db.execute(
            "INSERT OR IGNORE INTO runs VALUES (?, ?, ?)",
            (self.run_key, orjson.dumps(self.settings, option=orjson.OPT_SORT_KEYS).decode(), time.time()),
        )
        if db.execute("SELECT 1 FROM answers LIMIT 1").fetchone() is None:
            # a cache this edu-filter starts: its samples are nested (answers without the fact: an older cache)
            db.execute("INSERT OR IGNORE INTO facts VALUES (?, ?)", (SAMPLER, NESTED_SAMPLER))
        self._db = db
        self.other_max_chars = self._runs_apart_only_in_max_chars()
        self._fresh = self.count() == 0 and not self.other_max_chars
        return self

    def _runs_apart_only_in_max_chars(self) -> dict[str, int | None]:
        """Run key -> --max-chars of the runs with answers whose settings are these but for --max-chars. Each answer
        records how much of its document it was given (`doc_chars`): where that is what this run sends, it is the
        same answer. A run whose server refused over-long documents is rerun with --max-chars, as the README says,
        and its other answers are not paid again."""
        mine = {k: v for k, v in self.settings.items() if k != "max_chars"}
        found = {}
        for key, settings in self._db.execute("SELECT run_key, settings FROM runs WHERE run_key != ?",
                                              (self.run_key,)):
            theirs = orjson.loads(settings)
            if ("max_chars" in theirs and {k: v for k, v in theirs.items() if k != "max_chars"} == mine
                    and self._db.execute("SELECT 1 FROM answers WHERE run_key = ? LIMIT 1", (key,)).fetchone()):
                found[key] = theirs["max_chars"]
        return found

    def __exit__(self, *exc) -> None:
        if self._db is not None:
            try:
                self.commit()
            finally:
                self._db.close()
                self._db = None

    def record_fact(self, name: str, value: str) -> None:
        """Something about the runs this cache serves that a later run must know (the sampler); the first kept."""
        self._db.execute("INSERT OR IGNORE INTO facts VALUES (?, ?)", (name, value))

    def answers(self, doc_id: str, text: str) -> list[tuple[Answer, int | None]]:
        """Stored (answer, characters of the document in its prompt) of one document for this run, in the order
        they were received; only answers to this very text (another version of the document is asked again)."""
        return [] if self._fresh else self._stored(self.run_key, doc_id, text)

    def answers_with_other_max_chars(self, doc_id: str, text: str) -> list[tuple[int | None, list]]:
        """(--max-chars, `answers`) of this text in each run that differs from this one only in --max-chars."""
        found = [(max_chars, self._stored(key, doc_id, text)) for key, max_chars in self.other_max_chars.items()]
        return [(max_chars, answers) for max_chars, answers in found if answers]

    def _stored(self, key: str, doc_id: str, text: str) -> list[tuple[Answer, int | None]]:
        rows = self._db.execute(
            "SELECT response, prompt_tokens, completion_tokens, finish_reason, model, doc_chars FROM answers "
            "WHERE run_key = ? AND doc_id = ? AND text_hash = ? ORDER BY attempt", (key, doc_id, text_hash(text)),
        ).fetchall()
        return [(Answer(*row[:5]), row[5]) for row in rows]

    def add(self, doc_id: str, text: str, attempt: int, answer: Answer, doc_chars: int | None = None) -> None:
        """Store one answer to the prompt built from `text`; committed on the next turn of the running event loop
        (or now, without a loop). A RunError where the cache cannot be written (disk full, locked by another
        process), or where the last commit failed: the run stops rather than pay for answers a kill would lose."""
        if self._unwritable is not None:
            raise self._unwritable
        try:
            if not self._db.in_transaction:
                self._db.execute("BEGIN")
            self._db.execute(
                "INSERT OR REPLACE INTO answers (run_key, doc_id, attempt, response, prompt_tokens, "
                "completion_tokens, created, finish_reason, model, doc_chars, text_hash) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (self.run_key, doc_id, attempt, answer.text, answer.prompt_tokens, answer.completion_tokens,
                 time.time(), answer.finish_reason, answer.model, doc_chars, text_hash(text)),
            )
        except sqlite3.Error as e:
            raise self._cannot_write(e) from None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.commit()
            return
        if not self._commit_scheduled:
            self._commit_scheduled = True
            loop.call_soon(self._commit_soon)

    def _commit_soon(self) -> None:
        """The commit `add` schedules: an error raised in a loop callback is only logged by asyncio, and the run
        went on paying for answers that piled up uncommitted; it is kept for the next `add` to raise."""
        try:
            self.commit()
        except RunError as e:
            self._unwritable = e

    def commit(self) -> None:
        self._commit_scheduled = False
        if self._db is not None and self._db.in_transaction:
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                raise self._cannot_write(e) from None

    def _cannot_write(self, error: sqlite3.Error) -> RunError:
        self._unwritable = RunError(
            f"the answer cache {self.path} cannot be written ({error}): stopped so that no answer is paid for and "
            "lost; free disk space, or stop the other run using this cache, then run the same command again (the "
            "answers committed before are replayed)")
        return self._unwritable

    def other_runs(self) -> list[tuple[dict, int]]:
        """The settings of the other runs this cache holds answers of, with their numbers of answers, most first."""
        rows = self._db.execute(
            "SELECT runs.settings, COUNT(*) FROM answers JOIN runs ON runs.run_key = answers.run_key "
            "WHERE answers.run_key != ? GROUP BY answers.run_key ORDER BY 2 DESC", (self.run_key,)).fetchall()
        return [(orjson.loads(settings), n) for settings, n in rows]

    def count(self) -> int:
        """Number of answers stored for this run."""
        return self._db.execute("SELECT COUNT(*) FROM answers WHERE run_key = ?", (self.run_key,)).fetchone()[0]

    def selection(self, selection_key: str) -> dict[int, list[tuple[str, float]]]:
        """Rounds already drawn for this selection: round -> [(document id, inclusion probability)]."""
        drawn: dict[int, list[tuple[str, float]]] = {}
        for round_index, doc_id, probability in self._db.execute(
            "SELECT round, doc_id, probability FROM selections WHERE selection_key = ? ORDER BY round, doc_id",
            (selection_key,),
        ):
            drawn.setdefault(round_index, []).append((doc_id, probability))
        return drawn

    def selection_pool(self, selection_key: str) -> str | None:
        """Fingerprint of the pool this selection's recorded draws were made from (None: nothing drawn yet)."""
        row = self._db.execute("SELECT pool FROM selection_pools WHERE selection_key = ?", (selection_key,)).fetchone()
        return None if row is None else row[0]

    def drawn_by_other_selections(self, pool: str, selection_key: str) -> int:
        """Documents drawn from `pool` by selections other than this one (other --sample, --rounds, --seed...)."""
        return self._db.execute(
            "SELECT COUNT(DISTINCT doc_id) FROM selections JOIN selection_pools USING (selection_key) "
            "WHERE pool = ? AND selection_key != ?", (pool, selection_key)).fetchone()[0]

    def record_selection(self, selection_key: str, round_index: int, drawn: list[tuple[str, float]],
                         pool: str) -> list[tuple[str, float]]:
        """Store one round's draw from `pool` and commit it now, before its documents are sent. Returns the round's
        draw as stored: another run sharing this cache may have drawn the round first, and its draw is the one (two
        draws would spend the budget twice; the second insert failed with a traceback)."""
        self.commit()  # answers pending: the round's transaction takes the write lock at once
        try:
            self._db.execute("BEGIN IMMEDIATE")
            stored = self._db.execute(
                "SELECT doc_id, probability FROM selections WHERE selection_key = ? AND round = ? ORDER BY doc_id",
                (selection_key, round_index)).fetchall()
            if not stored:
                self._db.execute("INSERT OR IGNORE INTO selection_pools VALUES (?, ?)", (selection_key, pool))
                self._db.executemany(
                    "INSERT INTO selections (selection_key, round, doc_id, probability) VALUES (?, ?, ?, ?)",
                    [(selection_key, round_index, doc_id, float(p)) for doc_id, p in drawn],
                )
            self._db.execute("COMMIT")
        except sqlite3.Error as e:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise self._cannot_write(e) from None
        return [(doc_id, float(p)) for doc_id, p in stored or drawn]


def recorded_sampler(path: str | Path) -> str | None:
    """How the runs served by the cache at `path` drew their `--sample`: the sampler it records; LEGACY_SAMPLER for
    a cache holding answers from an edu-filter that recorded none (a resumed run must draw the sample it was
    answering); None for no cache or one without answers."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "facts" in tables:
                row = db.execute("SELECT value FROM facts WHERE name = ?", (SAMPLER,)).fetchone()
                if row:
                    return row[0]
            holds = "answers" in tables and db.execute("SELECT 1 FROM answers LIMIT 1").fetchone() is not None
            return LEGACY_SAMPLER if holds else None
        finally:
            db.close()
    except sqlite3.Error:
        return None
