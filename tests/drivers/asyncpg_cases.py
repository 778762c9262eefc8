#!/usr/bin/env python3
"""asyncpg cases of shardline's driver matrix (run by tests/tests/drivers.rs).

Usage: asyncpg_cases.py HOST PORT KEYS [CASE...]
  KEYS  user ids per server, e.g. "pg1=3,7;pg2=1,2;pg3=5,6" (every statement names one of them)
  CASE  run only these cases (default: all)

asyncpg prepares every statement with arguments as a named statement (Parse, Describe,
Flush — asyncpg 0.32's coreproto._prepare_and_describe ends with Flush, not Sync), then binds
and executes it (Bind, Execute, Sync); its statement cache reuses them.

Prints PLAN / VERSION / EXPECT / CASE ... PASS|FAIL <reason> / DONE lines (see
psycopg_cases.py) and exits 1 if a case failed. Each case has its own connection(s) and a
time limit (SHARDLINE_CASE_TIMEOUT seconds, default 20).
"""
import asyncio
import datetime
import json
import os
import sys
import uuid

try:
    import asyncpg
except ImportError as e:  # the Rust side reports this line
    print(f"MISSING asyncpg cannot be imported ({e}): run scripts/setup", flush=True)
    sys.exit(3)

HOST, PORT, KEYS_ARG = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ONLY = sys.argv[4:]
CASE_TIMEOUT = int(os.environ.get("SHARDLINE_CASE_TIMEOUT", "20"))

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


def describe(e):
    if isinstance(e, asyncpg.PostgresError):
        return f"{e.sqlstate} {e.args[0] if e.args else e}"
    if isinstance(e, asyncio.TimeoutError):
        return "TimeoutError"
    return f"{type(e).__name__}: {e}"


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

    async def expect_error(self, sqlstate, awaitable):
        try:
            await awaitable
        except asyncpg.PostgresError as e:
            if e.sqlstate != sqlstate:
                raise CaseFailed(f"at {self.step}: expected {sqlstate}, got {describe(e)}")
            return e
        raise CaseFailed(f"at {self.step}: expected {sqlstate}, the statement succeeded")


async def connect():
    return await asyncpg.connect(host=HOST, port=PORT, user="postgres", database="postgres", timeout=10)


INSERT = "INSERT INTO drv (user_id, item_id, note) VALUES ($1, $2, $3)"
NOTE = "SELECT note FROM drv WHERE user_id = $1 AND item_id = $2"


async def case_execute_simple(c, conn):
    """conn.execute() without arguments: the simple query protocol."""
    for key in per_server():
        item = c.item()
        c.step = f"execute {where(key)}"
        await conn.execute(f"INSERT INTO drv (user_id, item_id, note) VALUES ({key}, {item}, '{c.name}')")
        c.present(key, item)


async def case_execute_args(c, conn):
    """conn.execute() with arguments: named statement prepared, then bound. As in the
    issue: the key is the second parameter and the text has a literal."""
    for key in spread(6):
        item = c.item()
        c.step = f"execute {where(key)}"
        status = await conn.execute(f"INSERT INTO drv (item_id, user_id, note) VALUES ($1, $2, '{c.name}')", item, key)
        c.check(status == "INSERT 0 1", f"status {status!r}")
        c.present(key, item)


async def case_fetch(c, conn):
    for key in per_server():
        items = [c.item(), c.item()]
        c.step = f"insert {where(key)}"
        for i in items:
            await conn.execute(INSERT, key, i, c.name)
        c.step = f"fetch {where(key)}"
        rows = await conn.fetch("SELECT item_id FROM drv WHERE user_id = $1 AND note = $2 ORDER BY item_id", key, c.name)
        c.check([r["item_id"] for r in rows] == items, f"rows {rows}")
        for i in items:
            c.present(key, i)


async def case_fetchrow(c, conn):
    for key in per_server():
        item = c.item()
        c.step = f"fetchrow INSERT ... RETURNING {where(key)}"
        row = await conn.fetchrow(INSERT + " RETURNING user_id, item_id", key, item, c.name)
        c.check(tuple(row) == (key, item), f"returned {row}")
        c.step = f"fetchrow SELECT {where(key)}"
        row = await conn.fetchrow("SELECT note, n FROM drv WHERE user_id = $1 AND item_id = $2", key, item)
        c.check(row is not None and tuple(row) == (c.name, None), f"row {row}")
        c.present(key, item)


async def case_fetchval(c, conn):
    for key in per_server():
        item = c.item()
        c.step = f"INSERT {where(key)}"
        await conn.execute(INSERT, key, item, c.name)
        c.step = f"fetchval {where(key)}"
        note = await conn.fetchval(NOTE, key, item)
        c.check(note == c.name, f"value {note!r}")
        c.present(key, item)


async def case_executemany_per_user(c, conn):
    """executemany of 5 rows for one user_id (one Sync at the end since asyncpg 0.22)."""
    for key in per_server():
        items = [c.item() for _ in range(5)]
        c.step = f"executemany {where(key)}"
        await conn.executemany(INSERT, [(key, i, c.name) for i in items])
        c.step = f"count {where(key)}"
        n = await conn.fetchval("SELECT count(*) FROM drv WHERE user_id = $1 AND note = $2", key, c.name)
        c.check(n == 5, f"{n} rows instead of 5")
        for i in items:
            c.present(key, i)


async def case_executemany_across_servers_atomic(c, conn):
    """executemany whose rows live on every server: one implicit transaction (asyncpg's
    executemany is atomic). All rows committed, or 0A000 and none — never part."""
    rows = [(key, c.item(), c.name) for key in spread(6)]
    c.step = "executemany over all servers"
    try:
        await conn.executemany(INSERT, rows)
        committed = True
        c.notes.append("committed all rows")
    except asyncpg.PostgresError as e:
        c.check(e.sqlstate == "0A000", f"expected success or 0A000, got {describe(e)}")
        committed = False
        c.notes.append(f"refused: {describe(e)}")
    check = await connect()
    try:
        for key, item, _ in rows:
            c.step = f"SELECT {where(key)}"
            n = await check.fetchval("SELECT count(*) FROM drv WHERE user_id = $1 AND item_id = $2", key, item)
            c.check(n == (1 if committed else 0), f"{n} rows of ({key}, {item}) after {'commit' if committed else 'refusal'}: partial commit")
            (c.present if committed else c.absent)(key, item)
    finally:
        await check.close()


async def case_prepare_reused(c, conn):
    """conn.prepare() once, then the statement bound with 20 different keys."""
    insert = await conn.prepare(INSERT + " RETURNING item_id")
    select = await conn.prepare(NOTE)
    pairs = [(key, c.item()) for key in spread(20)]
    for key, item in pairs:
        c.step = f"prepared INSERT {where(key)}"
        got = await insert.fetchval(key, item, c.name)
        c.check(got == item, f"returned {got}")
    for key, item in pairs:
        c.step = f"prepared SELECT {where(key)}"
        note = await select.fetchval(key, item)
        c.check(note == c.name, f"value {note!r}")
        c.present(key, item)


async def case_transaction(c, conn):
    """async with conn.transaction(): committed, and rolled back by an exception."""
    for key in per_server():
        kept, dropped = c.item(), c.item()
        c.step = f"committed transaction {where(key)}"
        async with conn.transaction():
            await conn.execute(INSERT, key, kept, "tmp")
            await conn.execute("UPDATE drv SET note = $1, n = 1 WHERE user_id = $2 AND item_id = $3", c.name, key, kept)
        c.step = f"rolled-back transaction {where(key)}"

        class Undo(Exception):
            pass

        try:
            async with conn.transaction():
                await conn.execute(INSERT, key, dropped, c.name)
                raise Undo()
        except Undo:
            pass
        c.step = f"SELECT after {where(key)}"
        rows = await conn.fetch("SELECT item_id, note, n FROM drv WHERE user_id = $1 AND item_id = ANY($2::bigint[])", key, [kept, dropped])
        c.check([tuple(r) for r in rows] == [(kept, c.name, 1)], f"rows {rows}")
        c.present(key, kept)
        c.absent(key, dropped)


async def case_transaction_first_statement(c, conn):
    """A new connection per server, whose first statement is prepared (Parse, Describe,
    Flush) inside `async with conn.transaction()` and then bound to the server's key."""
    for key in per_server():
        item = c.item()
        c.step = f"connect for {where(key)}"
        fresh = await connect()
        try:
            c.step = f"first statement in a transaction {where(key)}"
            async with fresh.transaction():
                got = await fresh.fetchval(INSERT + " RETURNING item_id", key, item, c.name)
                c.check(got == item, f"returned {got}")
                note = await fresh.fetchval(NOTE, key, item)
                c.check(note == c.name, f"value {note!r}")
        finally:
            fresh.terminate()
        c.present(key, item)


async def case_binary_types(c, conn):
    """asyncpg's binary codecs: uuid, jsonb, text[], timestamptz, NULL."""
    for key in per_server():
        item = c.item()
        tag = uuid.uuid4()
        doc = {"driver": "asyncpg", "key": key, "nested": [1, 2, {"x": None}]}
        labels = ["a", "b c", "ünï"]
        at = datetime.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=datetime.timezone.utc)
        c.step = f"INSERT {where(key)}"
        await conn.execute(
            "INSERT INTO drv (user_id, item_id, note, n, doc, tag, labels, at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            key, item, c.name, None, json.dumps(doc), tag, labels, at,
        )
        c.step = f"SELECT {where(key)}"
        row = await conn.fetchrow("SELECT note, n, doc, tag, labels, at FROM drv WHERE user_id = $1 AND item_id = $2", key, item)
        c.check(row is not None, "no row")
        got = (row["note"], row["n"], json.loads(row["doc"]), row["tag"], row["labels"], row["at"])
        c.check(got == (c.name, None, doc, tag, labels, at), f"read back {got}")
        c.step = f"SELECT by uuid {where(key)}"
        found = await conn.fetchval("SELECT item_id FROM drv WHERE user_id = $1 AND tag = $2", key, tag)
        c.check(found == item, f"by uuid: {found}")
        c.present(key, item)


async def case_duplicate_key_then_usable(c, conn):
    """A duplicate key gives 23505 and the connection stays usable."""
    for key in per_server():
        item, after = c.item(), c.item()
        c.step = f"INSERT {where(key)}"
        await conn.execute(INSERT, key, item, c.name)
        c.step = f"duplicate INSERT {where(key)}"
        await c.expect_error("23505", conn.execute(INSERT, key, item, c.name))
        c.step = f"next INSERT {where(key)}"
        await conn.execute(INSERT, key, after, c.name)
        note = await conn.fetchval(NOTE, key, after)
        c.check(note == c.name, f"value {note!r}")
        c.present(key, item)
        c.present(key, after)


async def case_transaction_error_25p02_rollback(c, conn):
    """Inside a transaction: 23505, then 25P02 for the next statement, then ROLLBACK recovers."""
    for key in per_server():
        existing, inside, after = c.item(), c.item(), c.item()
        c.step = f"setup INSERT {where(key)}"
        await conn.execute(INSERT, key, existing, c.name)
        tr = conn.transaction()
        c.step = f"BEGIN {where(key)}"
        await tr.start()
        c.step = f"INSERT in transaction {where(key)}"
        await conn.execute(INSERT, key, inside, c.name)
        c.step = f"duplicate INSERT in transaction {where(key)}"
        await c.expect_error("23505", conn.execute(INSERT, key, existing, c.name))
        c.step = f"statement after the error {where(key)}"
        await c.expect_error("25P02", conn.fetchval(NOTE, key, existing))
        c.step = f"ROLLBACK {where(key)}"
        await tr.rollback()
        c.step = f"after ROLLBACK {where(key)}"
        await conn.execute(INSERT, key, after, c.name)
        rows = await conn.fetch("SELECT item_id FROM drv WHERE user_id = $1 AND item_id = ANY($2::bigint[]) ORDER BY item_id", key, [existing, inside, after])
        c.check([r[0] for r in rows] == [existing, after], f"rows {rows}")
        c.present(key, existing)
        c.absent(key, inside)
        c.present(key, after)


CASES = [
    ("execute_simple", case_execute_simple),
    ("execute_args", case_execute_args),
    ("fetch", case_fetch),
    ("fetchrow", case_fetchrow),
    ("fetchval", case_fetchval),
    ("executemany_per_user", case_executemany_per_user),
    ("executemany_across_servers_atomic", case_executemany_across_servers_atomic),
    ("prepare_reused_20_keys", case_prepare_reused),
    ("transaction", case_transaction),
    ("transaction_first_statement_per_server", case_transaction_first_statement),
    ("binary_types", case_binary_types),
    ("duplicate_key_then_usable", case_duplicate_key_then_usable),
    ("transaction_error_25p02_rollback", case_transaction_error_25p02_rollback),
]


async def run(name, fn):
    c = Case(name)
    conn = None
    try:
        async def body():
            nonlocal conn
            c.step = "connect"
            conn = await connect()
            await fn(c, conn)

        await asyncio.wait_for(body(), CASE_TIMEOUT)
    except (asyncio.TimeoutError, TimeoutError):
        return c, f"at {c.step}: no answer within {CASE_TIMEOUT} s"
    except CaseFailed as e:
        return c, str(e)
    except Exception as e:  # noqa: BLE001 - every error is a case result
        return c, f"at {c.step}: {describe(e)}"
    finally:
        if conn is not None:
            conn.terminate()
    return c, None


async def main():
    cases = [(n, f) for n, f in CASES if not ONLY or n in ONLY]
    print(f"VERSION asyncpg {asyncpg.__version__}", flush=True)
    print("PLAN " + " ".join(n for n, _ in cases), flush=True)
    failed = 0
    for name, fn in cases:
        c, error = await run(name, fn)
        for note in c.notes:
            print(f"NOTE {name}: {note}")
        if error is not None:
            failed += 1
            print(f"CASE {name} FAIL " + error.replace("\n", " "), flush=True)
            continue
        for user, item, state in c.expects:
            print(f"EXPECT {name} {user} {item} {state}")
        print(f"CASE {name} PASS", flush=True)
    print("DONE", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
