#!/usr/bin/env python3
"""asyncpg cases of shardline's driver matrix (run by tests/tests/drivers.rs).

Usage: asyncpg_cases.py HOST PORT KEYS [CASE...] (see cases.py, which also says what it
prints; it exits 1 if a case failed).

asyncpg prepares every statement with arguments as a named statement (Parse, Describe,
Flush — asyncpg 0.32's coreproto._prepare_and_describe ends with Flush, not Sync), then binds
and executes it (Bind, Execute, Sync); its statement cache reuses them. Each case has its
own connection(s) and a time limit.
"""
import asyncio
import json
import sys

import cases
from cases import per_server, spread, where

try:
    import asyncpg
except ImportError as e:  # the Rust side reports this line
    print(f"MISSING asyncpg cannot be imported ({e}): run scripts/setup", flush=True)
    sys.exit(3)


def describe(e):
    if isinstance(e, asyncpg.PostgresError):
        return f"{e.sqlstate} {e.args[0] if e.args else e}"
    if isinstance(e, asyncio.TimeoutError):
        return "TimeoutError"
    return f"{type(e).__name__}: {e}"


class Case(cases.Case):
    """An asyncpg case: an async function of the case and its connection."""

    describe = staticmethod(describe)

    def run(self, fn):
        try:
            asyncio.run(asyncio.wait_for(self.connected(fn), cases.CASE_TIMEOUT))
        except (asyncio.TimeoutError, TimeoutError) as e:
            raise cases.TimedOut() from e

    async def connected(self, fn):
        """fn(self, conn) on a connection of its own, dropped afterwards."""
        self.step = "connect"
        conn = await connect()
        try:
            await fn(self, conn)
        finally:
            conn.terminate()

    async def error_of(self, awaitable):
        """The asyncpg error `awaitable` raises, or None."""
        try:
            await awaitable
        except asyncpg.PostgresError as e:
            return e
        return None

    async def expect_error(self, sqlstate, awaitable):
        return self.check_error(sqlstate, await self.error_of(awaitable))


async def connect():
    return await asyncpg.connect(host=cases.HOST, port=int(cases.PORT), user="postgres", database="postgres", timeout=10)


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
    executemany is atomic), which the proxy commits on every server (two-phase commit)."""
    rows = [(key, c.item(), c.name) for key in spread(6)]
    c.step = "executemany over all servers"
    committed = c.check_committed(await c.error_of(conn.executemany(INSERT, rows)))
    check = await connect()
    try:
        for key, item, _ in rows:
            c.step = f"SELECT {where(key)}"
            n = await check.fetchval("SELECT count(*) FROM drv WHERE user_id = $1 AND item_id = $2", key, item)
            c.check(n == (1 if committed else 0), f"{n} rows of ({key}, {item}) after {'commit' if committed else 'refusal'}: partial commit")
            (c.present if committed else c.absent)(key, item)
    finally:
        await check.close()


async def case_multi_row_insert_across_servers(c, conn):
    """One INSERT with a VALUES row per server and parameters, RETURNING in VALUES order."""
    rows = [(key, c.item()) for key in reversed(spread(6))]
    values = ", ".join(f"(${2 * i + 1}, ${2 * i + 2}, '{c.name}')" for i in range(len(rows)))
    args = [v for row in rows for v in row]
    c.step = "INSERT ... VALUES over all servers RETURNING"
    returned = await conn.fetch(f"INSERT INTO drv (user_id, item_id, note) VALUES {values} RETURNING user_id, item_id", *args)
    got = [(r["user_id"], r["item_id"]) for r in returned]
    c.check(got == rows, f"RETURNING {got}, expected {rows}")
    for key, item in rows:
        c.present(key, item)


async def case_routing_hints(c, conn):
    """A row updated and read by its item id alone, routed by SET shardline.key, by a
    comment hint, and by SET LOCAL in a transaction (issue 16)."""
    for key in per_server():
        item = c.item()
        c.step = f"INSERT {where(key)}"
        await conn.execute(INSERT, key, item, c.name)
        c.step = f"SET shardline.key {where(key)}"
        await conn.execute(f"SET shardline.key = '{key}'")
        status = await conn.execute("UPDATE drv SET n = 1 WHERE item_id = $1 AND note = $2", item, c.name)
        c.check(status == "UPDATE 1", f"UPDATE by item id: {status}")
        await conn.execute("RESET shardline.key")
        c.step = f"comment hint {where(key)}"
        n = await conn.fetchval(f"/* shardline.key: {key} */ SELECT n FROM drv WHERE item_id = $1 AND note = $2", item, c.name)
        c.check(n == 1, f"read by comment hint: {n}")
        c.step = f"SET LOCAL shardline.key {where(key)}"
        async with conn.transaction():
            await conn.execute(f"SET LOCAL shardline.key = '{key}'")
            n = await conn.fetchval("SELECT n FROM drv WHERE item_id = $1 AND note = $2 FOR UPDATE", item, c.name)
            c.check(n == 1, f"SELECT ... FOR UPDATE by local hint: {n}")
        c.present(key, item)


async def case_prepare_reused_20_keys(c, conn):
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


async def case_transaction_first_statement_per_server(c, conn):
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
        tag, doc, labels, at = cases.typed_values("asyncpg", key)
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


INSERT_N = "INSERT INTO drv (user_id, item_id, note, n) VALUES ($1, $2, $3, $4)"
# Keyless: every server answers.
MARKED = "SELECT user_id, item_id FROM drv WHERE note = $1 ORDER BY user_id, item_id"


async def case_scatter_aggregate_all_servers(c, conn):
    """Aggregates with no key (count/sum/min/max, and GROUP BY/HAVING on a non-key): every
    server answers and the proxy combines the partial results. fetch() first; then
    fetchrow() and fetchval(), which ask for one row (Execute with a row limit of 1)."""
    rows = cases.aggregate_rows(c)
    for key, item, n in rows:
        c.step = f"INSERT {where(key)}"
        await conn.execute(INSERT_N, key, item, c.name, n)
        c.present(key, item)
    totals = "SELECT count(*), sum(n), min(n), max(n) FROM drv WHERE note = $1"
    c.step = "fetch count/sum/min/max over all servers"
    got = [tuple(r) for r in await conn.fetch(totals, c.name)]
    c.check(got == [cases.totals(rows)], f"got {got}, expected {[cases.totals(rows)]}")
    c.step = "fetch GROUP BY n % 3 HAVING over all servers"
    got = await conn.fetch(
        "SELECT n % 3, count(*), sum(n) FROM drv WHERE note = $1 GROUP BY n % 3 HAVING count(*) > 1 ORDER BY n % 3",
        c.name,
    )
    got = [tuple(r) for r in got]
    c.check(got == cases.groups(rows), f"got {got}, expected {cases.groups(rows)}")
    c.step = "fetchrow count/sum/min/max over all servers"
    got = await conn.fetchrow(totals, c.name)
    c.check(got is not None and tuple(got) == cases.totals(rows), f"got {got}, expected {cases.totals(rows)}")
    c.step = "fetchval count(*) over all servers"
    count = await conn.fetchval("SELECT count(*) FROM drv WHERE note = $1", c.name)
    c.check(count == len(rows), f"count {count}, expected {len(rows)}")


async def case_scatter_any_order_limit_offset(c, conn):
    """user_id = ANY($1) with a list of keys on every server, ORDER BY user_id DESC LIMIT
    OFFSET: the proxy merges the servers' sorted rows (asyncpg: named statement, binary
    results); run twice, the second time from asyncpg's statement cache."""
    rows = cases.page_rows(c)
    keys = sorted({key for key, _ in rows})
    want = cases.page(rows)
    for key, item in rows:
        c.step = f"INSERT {where(key)}"
        await conn.execute(INSERT, key, item, c.name)
        c.present(key, item)
    for attempt in ("prepared", "cached"):
        c.step = f"ANY({keys}) ORDER BY LIMIT OFFSET, {attempt}"
        got = await conn.fetch(
            "SELECT user_id, item_id FROM drv WHERE user_id = ANY($1) AND note = $2 "
            f"ORDER BY user_id DESC, item_id LIMIT {cases.PAGE_LIMIT} OFFSET {cases.PAGE_OFFSET}",
            keys,
            c.name,
        )
        got = [tuple(r) for r in got]
        c.check(got == want, f"rows {got}, expected {want}")


async def case_scatter_read_in_transaction(c, conn):
    """In a transaction (one per server): INSERT, then a read across servers sees the
    transaction's row beside the committed ones; after ROLLBACK it no longer does."""
    committed = [(key, c.item()) for key in per_server()]
    for key, item in committed:
        c.step = f"committed INSERT {where(key)}"
        await conn.execute(INSERT, key, item, c.name)
        c.present(key, item)
    for key in per_server():
        item = c.item()
        tr = conn.transaction()
        c.step = f"BEGIN {where(key)}"
        await tr.start()
        c.step = f"INSERT in transaction {where(key)}"
        await conn.execute(INSERT, key, item, c.name)
        c.step = f"read across servers in the transaction of {where(key)}"
        got = [tuple(r) for r in await conn.fetch(MARKED, c.name)]
        want = sorted(committed + [(key, item)])
        c.check(got == want, f"rows {got}, expected {want}")
        c.step = f"ROLLBACK {where(key)}"
        await tr.rollback()
        c.step = f"read across servers after ROLLBACK {where(key)}"
        got = [tuple(r) for r in await conn.fetch(MARKED, c.name)]
        c.check(got == sorted(committed), f"rows {got}, expected {sorted(committed)}")
        c.absent(key, item)


if __name__ == "__main__":
    sys.exit(cases.main(f"asyncpg {asyncpg.__version__}", Case, globals()))
