#!/usr/bin/env python3
"""psycopg 3 cases of shardline's driver matrix (run by tests/tests/drivers.rs).

Usage: psycopg_cases.py HOST PORT KEYS [CASE...]
  KEYS  user ids per server, e.g. "pg1=3,7;pg2=1,2;pg3=5,6" (every statement names one of them)
  CASE  run only these cases (default: all)

Table drv(user_id bigint, item_id bigint, note text NOT NULL, n int, doc jsonb, tag uuid,
labels text[], at timestamptz, PRIMARY KEY (user_id, item_id)), sharded by user_id.

Prints, one line each:
  VERSION <driver version>
  PLAN <case> <case> ...                   the cases it will run
  EXPECT <case> <user_id> <item_id> present|absent
                                           what the servers must hold after a passed case
                                           (checked there directly by the Rust side)
  NOTE <case>: <text>                      something worth knowing that is no failure
  CASE <case> PASS | CASE <case> FAIL <reason>
  DONE
and exits 1 if a case failed. Each case uses its own connection(s) and a time limit
(SHARDLINE_CASE_TIMEOUT seconds, default 20).
"""
import datetime
import os
import signal
import sys
import uuid

try:
    import psycopg
    from psycopg import errors
    from psycopg.types.json import Jsonb
except ImportError as e:  # the Rust side reports this line
    print(f"MISSING psycopg 3 cannot be imported ({e}): run scripts/setup", flush=True)
    sys.exit(3)

HOST, PORT, KEYS_ARG = sys.argv[1], sys.argv[2], sys.argv[3]
ONLY = sys.argv[4:]
CASE_TIMEOUT = int(os.environ.get("SHARDLINE_CASE_TIMEOUT", "20"))
CONNINFO = f"host={HOST} port={PORT} user=postgres dbname=postgres connect_timeout=10"

SERVER_KEYS = {}
for part in KEYS_ARG.split(";"):
    server, ids = part.split("=")
    SERVER_KEYS[server] = [int(k) for k in ids.split(",")]
SERVER_OF = {k: s for s, ks in SERVER_KEYS.items() for k in ks}


def per_server():
    """One key on each server."""
    return [ks[0] for ks in SERVER_KEYS.values()]


def spread(n):
    """n keys taking turns over the servers."""
    columns = list(SERVER_KEYS.values())
    out = []
    i = 0
    while len(out) < n:
        column = columns[i % len(columns)]
        out.append(column[(i // len(columns)) % len(column)])
        i += 1
    return out


def where(key):
    return f"user_id {key} ({SERVER_OF[key]})"


class CaseFailed(Exception):
    pass


class Case:
    next_item = 1

    def __init__(self, name):
        self.name = name
        self.step = "start"
        self.expects = []
        self.notes = []

    def item(self):
        i = Case.next_item
        Case.next_item += 1
        return i

    def present(self, user, item):
        self.expects.append((user, item, "present"))

    def absent(self, user, item):
        self.expects.append((user, item, "absent"))

    def check(self, condition, what):
        if not condition:
            raise CaseFailed(f"at {self.step}: {what}")

    def expect_error(self, sqlstate, fn):
        try:
            fn()
        except psycopg.Error as e:
            if e.sqlstate != sqlstate:
                raise CaseFailed(f"at {self.step}: expected {sqlstate}, got {describe(e)}")
            return e
        raise CaseFailed(f"at {self.step}: expected {sqlstate}, the statement succeeded")


def describe(e):
    if isinstance(e, psycopg.Error):
        primary = e.diag.message_primary if e.diag else None
        return f"{e.sqlstate or '-----'} {primary or str(e).strip()}"
    return f"{type(e).__name__}: {e}"


def connect(**kwargs):
    return psycopg.connect(CONNINFO, **kwargs)


INSERT = "INSERT INTO drv (user_id, item_id, note) VALUES (%s, %s, %s)"
# The key as the second parameter, as in many applications' column orders.
INSERT_KEY_SECOND = "INSERT INTO drv (item_id, user_id, note) VALUES (%s, %s, %s)"
NOTE = "SELECT note FROM drv WHERE user_id = %s AND item_id = %s"


def case_simple_literals(c):
    """Statements without parameters: psycopg sends them with the simple protocol."""
    with connect(autocommit=True) as conn:
        for key in per_server():
            item = c.item()
            c.step = f"INSERT {where(key)}"
            conn.execute(f"INSERT INTO drv (user_id, item_id, note) VALUES ({key}, {item}, '{c.name}')")
            c.step = f"SELECT {where(key)}"
            row = conn.execute(f"SELECT note FROM drv WHERE user_id = {key} AND item_id = {item}").fetchone()
            c.check(row == (c.name,), f"read back {row}")
            c.present(key, item)


def case_client_side_binding(c):
    """ClientCursor: parameters merged into the text client-side, simple protocol."""
    with connect(autocommit=True, cursor_factory=psycopg.ClientCursor) as conn:
        for key in per_server():
            item = c.item()
            c.step = f"INSERT {where(key)}"
            conn.execute(INSERT, (key, item, c.name))
            c.step = f"SELECT {where(key)}"
            row = conn.execute(NOTE, (key, item)).fetchone()
            c.check(row == (c.name,), f"read back {row}")
            c.present(key, item)


def case_extended_params(c):
    """Server-side parameters (extended protocol, unnamed statements)."""
    with connect(autocommit=True, prepare_threshold=None) as conn:
        for key in spread(6):
            item = c.item()
            c.step = f"INSERT {where(key)}"
            conn.execute(INSERT, (key, item, c.name))
            c.step = f"SELECT {where(key)}"
            row = conn.execute(NOTE, (key, item)).fetchone()
            c.check(row == (c.name,), f"read back {row}")
            c.present(key, item)


def case_binary_params_and_results(c):
    """Binary parameters (%b) and binary results: bigint, text, jsonb, uuid, text[], timestamptz, NULL."""
    with connect(autocommit=True) as conn:
        cur = conn.cursor(binary=True)
        for key in per_server():
            item = c.item()
            tag = uuid.uuid4()
            doc = {"driver": "psycopg", "key": key, "nested": [1, 2, {"x": None}]}
            labels = ["a", "b c", "ünï"]
            at = datetime.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=datetime.timezone.utc)
            c.step = f"INSERT {where(key)}"
            cur.execute(
                "INSERT INTO drv (user_id, item_id, note, n, doc, tag, labels, at) "
                "VALUES (%b, %b, %b, %b, %b, %b, %b, %b)",
                (key, item, c.name, None, Jsonb(doc), tag, labels, at),
            )
            c.step = f"SELECT {where(key)}"
            cur.execute(
                "SELECT note, n, doc, tag, labels, at FROM drv WHERE user_id = %b AND item_id = %b",
                (key, item),
            )
            c.check(cur.pgresult.fformat(0) == 1, "results came back in text, not binary")
            row = cur.fetchone()
            c.check(row == (c.name, None, doc, tag, labels, at), f"read back {row}")
            c.present(key, item)


def case_executemany_per_user(c):
    """executemany of 5 rows for one user_id (psycopg >= 3.1 sends them as a pipeline, one Sync)."""
    with connect(autocommit=True) as conn:
        for key in per_server():
            items = [c.item() for _ in range(5)]
            c.step = f"executemany {where(key)}"
            conn.cursor().executemany(INSERT, [(key, i, c.name) for i in items])
            c.step = f"count {where(key)}"
            n = conn.execute("SELECT count(*) FROM drv WHERE user_id = %s AND note = %s", (key, c.name)).fetchone()[0]
            c.check(n == 5, f"{n} rows instead of 5")
            for i in items:
                c.present(key, i)


def case_executemany_across_servers_atomic(c):
    """executemany whose rows live on every server. It is one implicit transaction (one Sync):
    the proxy must either commit all rows or refuse with 0A000 and commit none — never part."""
    rows = [(key, c.item(), c.name) for key in spread(6)]
    with connect(autocommit=True) as conn:
        c.step = "executemany over all servers"
        try:
            conn.cursor().executemany(INSERT, rows)
            committed = True
            c.notes.append("committed all rows")
        except psycopg.Error as e:
            c.check(e.sqlstate == "0A000", f"expected success or 0A000, got {describe(e)}")
            committed = False
            c.notes.append(f"refused: {describe(e)}")
    with connect(autocommit=True) as conn:
        for key, item, _ in rows:
            c.step = f"SELECT {where(key)}"
            n = conn.execute("SELECT count(*) FROM drv WHERE user_id = %s AND item_id = %s", (key, item)).fetchone()[0]
            c.check(n == (1 if committed else 0), f"{n} rows of ({key}, {item}) after {'commit' if committed else 'refusal'}: partial commit")
            (c.present if committed else c.absent)(key, item)


def case_prepared_reused_20_keys(c):
    """prepare=True: one named server-side statement, bound with 20 different keys."""
    with connect(autocommit=True) as conn:
        pairs = [(key, c.item()) for key in spread(20)]
        for key, item in pairs:
            c.step = f"prepared INSERT {where(key)}"
            conn.execute(INSERT, (key, item, c.name), prepare=True)
        for key, item in pairs:
            c.step = f"prepared SELECT {where(key)}"
            row = conn.execute(NOTE, (key, item), prepare=True).fetchone()
            c.check(row == (c.name,), f"read back {row}")
            c.present(key, item)


def case_pipeline_one_user(c):
    """Pipeline mode: ten INSERTs and two SELECTs for one user_id, then one Sync. The
    statements name the key at different parameter positions (the INSERT as $2), and each
    is an unnamed statement until psycopg prepares it (prepare_threshold, 5 uses)."""
    with connect(autocommit=True) as conn:
        for key in per_server():
            items = [c.item() for _ in range(10)]
            c.step = f"pipeline {where(key)}"
            with conn.pipeline():
                for i in items:
                    conn.execute(INSERT_KEY_SECOND, (i, key, c.name))
                count = conn.execute("SELECT count(*) FROM drv WHERE user_id = %s AND note = %s", (key, c.name))
                first = conn.execute(NOTE, (key, items[0]))
            c.step = f"pipeline results {where(key)}"
            n = count.fetchone()[0]
            c.check(n == 10, f"count {n} instead of 10")
            row = first.fetchone()
            c.check(row == (c.name,), f"read back {row}")
            for i in items:
                c.present(key, i)


def case_pipeline_in_transaction(c):
    """Pipeline mode inside an explicit transaction (non-autocommit), then COMMIT."""
    with connect() as conn:
        for key in per_server():
            items = [c.item() for _ in range(4)]
            c.step = f"pipeline in transaction {where(key)}"
            with conn.pipeline():
                with conn.transaction():
                    for i in items:
                        conn.execute(INSERT_KEY_SECOND, (i, key, c.name))
                    count = conn.execute("SELECT count(*) FROM drv WHERE user_id = %s AND note = %s", (key, c.name))
            n = count.fetchone()[0]
            c.check(n == 4, f"count {n} instead of 4")
            for i in items:
                c.present(key, i)


def case_transaction_commit_and_rollback(c):
    """conn.transaction(): a committed block and a rolled-back block per server."""
    with connect() as conn:
        for key in per_server():
            kept, dropped = c.item(), c.item()
            c.step = f"committed block {where(key)}"
            with conn.transaction():
                conn.execute(INSERT, (key, kept, "tmp"))
                conn.execute("UPDATE drv SET note = %s, n = 1 WHERE user_id = %s AND item_id = %s", (c.name, key, kept))
            c.step = f"rolled-back block {where(key)}"
            try:
                with conn.transaction():
                    conn.execute(INSERT, (key, dropped, c.name))
                    raise psycopg.Rollback()
            except psycopg.Rollback:
                pass
            c.step = f"SELECT after {where(key)}"
            rows = conn.execute("SELECT item_id, note, n FROM drv WHERE user_id = %s AND item_id IN (%s, %s)", (key, kept, dropped)).fetchall()
            conn.commit()
            c.check(rows == [(kept, c.name, 1)], f"rows {rows}")
            c.present(key, kept)
            c.absent(key, dropped)


def case_duplicate_key_then_usable(c):
    """A duplicate key gives 23505 and the connection stays usable."""
    with connect(autocommit=True) as conn:
        for key in per_server():
            item, after = c.item(), c.item()
            c.step = f"INSERT {where(key)}"
            conn.execute(INSERT, (key, item, c.name))
            c.step = f"duplicate INSERT {where(key)}"
            c.expect_error("23505", lambda: conn.execute(INSERT, (key, item, c.name)))
            c.step = f"next INSERT {where(key)}"
            conn.execute(INSERT, (key, after, c.name))
            row = conn.execute(NOTE, (key, after)).fetchone()
            c.check(row == (c.name,), f"read back {row}")
            c.present(key, item)
            c.present(key, after)


def case_transaction_error_25p02_rollback(c):
    """Inside a transaction: 23505, then 25P02 for the next statement, then ROLLBACK recovers."""
    with connect() as conn:
        for key in per_server():
            existing, inside, after = c.item(), c.item(), c.item()
            c.step = f"setup INSERT {where(key)}"
            conn.execute(INSERT, (key, existing, c.name))
            conn.commit()
            c.step = f"INSERT in transaction {where(key)}"
            conn.execute(INSERT, (key, inside, c.name))
            c.step = f"duplicate INSERT in transaction {where(key)}"
            c.expect_error("23505", lambda: conn.execute(INSERT, (key, existing, c.name)))
            c.step = f"statement after the error {where(key)}"
            c.expect_error("25P02", lambda: conn.execute(NOTE, (key, existing)))
            c.step = f"ROLLBACK {where(key)}"
            conn.rollback()
            c.step = f"after ROLLBACK {where(key)}"
            conn.execute(INSERT, (key, after, c.name))
            conn.commit()
            rows = conn.execute("SELECT item_id FROM drv WHERE user_id = %s AND item_id IN (%s, %s, %s) ORDER BY item_id", (key, existing, inside, after)).fetchall()
            conn.commit()
            c.check(rows == [(existing,), (after,)], f"rows {rows}")
            c.present(key, existing)
            c.absent(key, inside)
            c.present(key, after)


CASES = [
    ("simple_literals", case_simple_literals),
    ("client_side_binding", case_client_side_binding),
    ("extended_params", case_extended_params),
    ("binary_params_and_results", case_binary_params_and_results),
    ("executemany_per_user", case_executemany_per_user),
    ("executemany_across_servers_atomic", case_executemany_across_servers_atomic),
    ("prepared_reused_20_keys", case_prepared_reused_20_keys),
    ("pipeline_one_user", case_pipeline_one_user),
    ("pipeline_in_transaction", case_pipeline_in_transaction),
    ("transaction_commit_and_rollback", case_transaction_commit_and_rollback),
    ("duplicate_key_then_usable", case_duplicate_key_then_usable),
    ("transaction_error_25p02_rollback", case_transaction_error_25p02_rollback),
]


class TimedOut(Exception):
    pass


def on_alarm(signum, frame):
    signal.alarm(5)  # again, should the clean-up after this one hang too
    raise TimedOut()


def print_notes(c):
    for note in c.notes:
        print(f"NOTE {c.name}: {note}")


def main():
    cases = [(n, f) for n, f in CASES if not ONLY or n in ONLY]
    print(f"VERSION psycopg {psycopg.__version__} ({psycopg.pq.__impl__} implementation, libpq {psycopg.pq.version()})", flush=True)
    print("PLAN " + " ".join(n for n, _ in cases), flush=True)
    signal.signal(signal.SIGALRM, on_alarm)
    failed = 0
    for name, fn in cases:
        c = Case(name)
        signal.alarm(CASE_TIMEOUT)
        try:
            fn(c)
            signal.alarm(0)
        except TimedOut:
            signal.alarm(0)
            failed += 1
            print_notes(c)
            print(f"CASE {name} FAIL at {c.step}: no answer within {CASE_TIMEOUT} s", flush=True)
            continue
        except CaseFailed as e:
            signal.alarm(0)
            failed += 1
            print_notes(c)
            print(f"CASE {name} FAIL {e}", flush=True)
            continue
        except Exception as e:  # noqa: BLE001 - every error is a case result
            signal.alarm(0)
            failed += 1
            print_notes(c)
            print(f"CASE {name} FAIL at {c.step}: {describe(e)}".replace("\n", " "), flush=True)
            continue
        print_notes(c)
        for user, item, state in c.expects:
            print(f"EXPECT {name} {user} {item} {state}")
        print(f"CASE {name} PASS", flush=True)
    print("DONE", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
