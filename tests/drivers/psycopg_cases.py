#!/usr/bin/env python3
"""psycopg 3 cases of shardline's driver matrix (run by tests/tests/drivers.rs).

Usage: psycopg_cases.py HOST PORT KEYS [CASE...] (see cases.py, which also says what it
prints; it exits 1 if a case failed). Each case uses its own connection(s) and a time
limit, kept by SIGALRM.
"""
import signal
import sys

import cases
from cases import per_server, spread, where

try:
    import psycopg
    from psycopg import errors
    from psycopg.types.json import Jsonb
except ImportError as e:  # the Rust side reports this line
    print(f"MISSING psycopg 3 cannot be imported ({e}): run scripts/setup", flush=True)
    sys.exit(3)

CONNINFO = f"host={cases.HOST} port={cases.PORT} user=postgres dbname=postgres connect_timeout=10"


def describe(e):
    if isinstance(e, psycopg.Error):
        primary = e.diag.message_primary if e.diag else None
        return f"{e.sqlstate or '-----'} {primary or str(e).strip()}"
    return f"{type(e).__name__}: {e}"


def on_alarm(signum, frame):
    signal.alarm(5)  # again, should the clean-up after this one hang too
    raise cases.TimedOut()


class Case(cases.Case):
    """A psycopg case: a function of the case, which opens its own connections."""

    describe = staticmethod(describe)

    def run(self, fn):
        signal.alarm(cases.CASE_TIMEOUT)
        try:
            fn(self)
        finally:
            signal.alarm(0)

    def error_of(self, fn):
        """The psycopg error `fn()` raises, or None."""
        try:
            fn()
        except psycopg.Error as e:
            return e
        return None

    def expect_error(self, sqlstate, fn):
        return self.check_error(sqlstate, self.error_of(fn))


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


def insert_and_read_back(c, conn, keys):
    """INSERT and SELECT with parameters, once per key."""
    for key in keys:
        item = c.item()
        c.step = f"INSERT {where(key)}"
        conn.execute(INSERT, (key, item, c.name))
        c.step = f"SELECT {where(key)}"
        row = conn.execute(NOTE, (key, item)).fetchone()
        c.check(row == (c.name,), f"read back {row}")
        c.present(key, item)


def case_client_side_binding(c):
    """ClientCursor: parameters merged into the text client-side, simple protocol."""
    with connect(autocommit=True, cursor_factory=psycopg.ClientCursor) as conn:
        insert_and_read_back(c, conn, per_server())


def case_extended_params(c):
    """Server-side parameters (extended protocol, unnamed statements)."""
    with connect(autocommit=True, prepare_threshold=None) as conn:
        insert_and_read_back(c, conn, spread(6))


def case_binary_params_and_results(c):
    """Binary parameters (%b) and binary results: bigint, text, jsonb, uuid, text[], timestamptz, NULL."""
    with connect(autocommit=True) as conn:
        cur = conn.cursor(binary=True)
        for key in per_server():
            item = c.item()
            tag, doc, labels, at = cases.typed_values("psycopg", key)
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
    """executemany whose rows live on every server. It is one implicit transaction (one Sync),
    which the proxy commits on every server (two-phase commit)."""
    rows = [(key, c.item(), c.name) for key in spread(6)]
    with connect(autocommit=True) as conn:
        c.step = "executemany over all servers"
        committed = c.check_committed(c.error_of(lambda: conn.cursor().executemany(INSERT, rows)))
    with connect(autocommit=True) as conn:
        for key, item, _ in rows:
            c.step = f"SELECT {where(key)}"
            n = conn.execute("SELECT count(*) FROM drv WHERE user_id = %s AND item_id = %s", (key, item)).fetchone()[0]
            c.check(n == (1 if committed else 0), f"{n} rows of ({key}, {item}) after {'commit' if committed else 'refusal'}: partial commit")
            (c.present if committed else c.absent)(key, item)


def case_multi_row_insert_across_servers(c):
    """One INSERT with a VALUES row per server and parameters, RETURNING in VALUES order;
    then the same in a transaction that is rolled back."""
    rows = [(key, c.item()) for key in reversed(spread(6))]
    values = ", ".join(f"(%s, %s, '{c.name}')" for _ in rows)
    args = [v for row in rows for v in row]
    with connect(autocommit=True) as conn:
        c.step = "INSERT ... VALUES over all servers RETURNING"
        got = conn.execute(f"INSERT INTO drv (user_id, item_id, note) VALUES {values} RETURNING user_id, item_id", args).fetchall()
        c.check([tuple(r) for r in got] == rows, f"RETURNING {got}, expected {rows}")
        for key, item in rows:
            c.present(key, item)
    undone = [(key, c.item()) for key in spread(6)]
    with connect() as conn:
        c.step = "INSERT ... VALUES over all servers in a transaction"
        n = conn.execute(f"INSERT INTO drv (user_id, item_id, note) VALUES {values}", [v for row in undone for v in row]).rowcount
        c.check(n == len(undone), f"rowcount {n}")
        conn.rollback()
        for key, item in undone:
            c.absent(key, item)


def case_routing_hints(c):
    """A row updated and read by its item id alone, routed by SET shardline.key, by a
    comment hint, and by SET LOCAL in a transaction (issue 16)."""
    with connect(autocommit=True) as conn:
        for key in per_server():
            item = c.item()
            c.step = f"INSERT {where(key)}"
            conn.execute(INSERT, (key, item, c.name))
            c.step = f"SET shardline.key {where(key)}"
            conn.execute(f"SET shardline.key = '{key}'")
            n = conn.execute("UPDATE drv SET n = 1 WHERE item_id = %s AND note = %s", (item, c.name)).rowcount
            c.check(n == 1, f"UPDATE by item id updated {n} rows")
            conn.execute("RESET shardline.key")
            c.step = f"comment hint {where(key)}"
            row = conn.execute(f"/* shardline.key: {key} */ SELECT n FROM drv WHERE item_id = %s AND note = %s", (item, c.name)).fetchone()
            c.check(row is not None and row[0] == 1, f"read by comment hint: {row}")
            c.step = f"SET LOCAL shardline.key {where(key)}"
            with conn.transaction():
                conn.execute(f"SET LOCAL shardline.key = '{key}'")
                row = conn.execute("SELECT n FROM drv WHERE item_id = %s AND note = %s FOR UPDATE", (item, c.name)).fetchone()
                c.check(row is not None and row[0] == 1, f"SELECT ... FOR UPDATE by local hint: {row}")
            c.present(key, item)


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


INSERT_N = "INSERT INTO drv (user_id, item_id, note, n) VALUES (%s, %s, %s, %s)"
# Keyless: every server answers.
MARKED = "SELECT user_id, item_id FROM drv WHERE note = %s ORDER BY user_id, item_id"


def case_scatter_aggregate_all_servers(c):
    """Aggregates with no key (count/sum/min/max, and GROUP BY/HAVING on a non-key): every
    server answers and the proxy combines the partial results."""
    rows = cases.aggregate_rows(c)
    with connect(autocommit=True) as conn:
        for key, item, n in rows:
            c.step = f"INSERT {where(key)}"
            conn.execute(INSERT_N, (key, item, c.name, n))
            c.present(key, item)
        c.step = "count/sum/min/max over all servers"
        got = conn.execute("SELECT count(*), sum(n), min(n), max(n) FROM drv WHERE note = %s", (c.name,)).fetchone()
        c.check(got == cases.totals(rows), f"got {got}, expected {cases.totals(rows)}")
        c.step = "GROUP BY n % 3 HAVING over all servers"
        got = conn.execute(
            # (%% is a literal % for psycopg: the modulo operator)
            "SELECT n %% 3, count(*), sum(n) FROM drv WHERE note = %s GROUP BY n %% 3 HAVING count(*) > 1 ORDER BY n %% 3",
            (c.name,),
        ).fetchall()
        c.check(got == cases.groups(rows), f"got {got}, expected {cases.groups(rows)}")


def case_scatter_any_order_limit_offset(c):
    """user_id = ANY(%s) with a list of keys on every server, ORDER BY user_id DESC LIMIT
    OFFSET: the proxy merges the servers' sorted rows. Text results from an unnamed
    statement, then binary results from a prepared one."""
    rows = cases.page_rows(c)
    keys = sorted({key for key, _ in rows})
    want = cases.page(rows)
    with connect(autocommit=True) as conn:
        for key, item in rows:
            c.step = f"INSERT {where(key)}"
            conn.execute(INSERT, (key, item, c.name))
            c.present(key, item)
        for binary, prepare in ((False, False), (True, True)):
            c.step = f"ANY({keys}) ORDER BY LIMIT OFFSET, {'binary, prepared' if binary else 'text, unnamed'}"
            cur = conn.cursor(binary=binary)
            cur.execute(
                "SELECT user_id, item_id FROM drv WHERE user_id = ANY(%s) AND note = %s "
                f"ORDER BY user_id DESC, item_id LIMIT {cases.PAGE_LIMIT} OFFSET {cases.PAGE_OFFSET}",
                (keys, c.name),
                prepare=prepare,
            )
            c.check(cur.pgresult.fformat(0) == (1 if binary else 0), f"result format {cur.pgresult.fformat(0)}")
            got = cur.fetchall()
            c.check(got == want, f"rows {got}, expected {want}")


def case_scatter_read_in_transaction(c):
    """In a transaction (one per server): INSERT, then a read across servers sees the
    transaction's row beside the committed ones; after ROLLBACK it no longer does."""
    committed = [(key, c.item()) for key in per_server()]
    with connect(autocommit=True) as conn:
        for key, item in committed:
            c.step = f"committed INSERT {where(key)}"
            conn.execute(INSERT, (key, item, c.name))
            c.present(key, item)
    with connect() as conn:
        for key in per_server():
            item = c.item()
            c.step = f"INSERT in transaction {where(key)}"
            conn.execute(INSERT, (key, item, c.name))
            c.step = f"read across servers in the transaction of {where(key)}"
            got = conn.execute(MARKED, (c.name,)).fetchall()
            want = sorted(committed + [(key, item)])
            c.check(got == want, f"rows {got}, expected {want}")
            c.step = f"ROLLBACK {where(key)}"
            conn.rollback()
            c.step = f"read across servers after ROLLBACK {where(key)}"
            got = conn.execute(MARKED, (c.name,)).fetchall()
            conn.commit()
            c.check(got == sorted(committed), f"rows {got}, expected {sorted(committed)}")
            c.absent(key, item)


if __name__ == "__main__":
    signal.signal(signal.SIGALRM, on_alarm)
    version = f"psycopg {psycopg.__version__} ({psycopg.pq.__impl__} implementation, libpq {psycopg.pq.version()})"
    sys.exit(cases.main(version, Case, globals()))
