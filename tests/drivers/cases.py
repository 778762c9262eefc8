"""What the Python programs of shardline's driver matrix share (psycopg_cases.py,
asyncpg_cases.py; run by tests/tests/drivers.rs): their command line, the keys, a case's
bookkeeping, and the lines they print. Importing it reads the program's command line:

Usage: <program> HOST PORT KEYS [CASE...]
  KEYS  user ids per server, e.g. "pg1=3,7;pg2=1,2;pg3=5,6" (every write names one of them; the scatter cases also read across servers)
  CASE  run only these cases (default: all)

Table drv(user_id bigint, item_id bigint, note text NOT NULL, n int, doc jsonb, tag uuid,
labels text[], at timestamptz, PRIMARY KEY (user_id, item_id)), sharded by user_id.

A program prints, one line each (the node-postgres and pgjdbc programs print the same):
  VERSION <driver version>
  PLAN <case> <case> ...                   the cases it will run
  EXPECT <case> <user_id> <item_id> present|absent
                                           what the servers must hold after a passed case
                                           (checked there directly by the Rust side)
  NOTE <case>: <text>                      something worth knowing that is no failure
  CASE <case> PASS | CASE <case> FAIL <reason>
  DONE
and exits 1 if a case failed. Each case uses its own connection(s) and a time limit
(SHARDLINE_CASE_TIMEOUT seconds, default 20). A program's cases are its functions named
case_<name>, run in the order it defines them (see main).
"""
import datetime
import os
import sys
import uuid

HOST, PORT, KEYS_ARG = sys.argv[1], sys.argv[2], sys.argv[3]
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


def typed_values(driver, key):
    """A uuid, a jsonb document, a text[] with a space and non-ASCII letters, and a
    timestamptz with microseconds: what the type cases write and read back."""
    doc = {"driver": driver, "key": key, "nested": [1, 2, {"x": None}]}
    at = datetime.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=datetime.timezone.utc)
    return uuid.uuid4(), doc, ["a", "b c", "ünï"], at


class CaseFailed(Exception):
    pass


class TimedOut(Exception):
    """The case ran out of its time limit."""


class Case:
    """One case: the step it is at, and the rows it leaves. A program subclasses it
    with `run(fn)` (the case function under the time limit), `describe(error)` and
    its way of catching the driver's errors."""

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

    def check_error(self, sqlstate, error):
        """`error`, what a statement raised (None: it succeeded), must have `sqlstate`."""
        if error is None:
            raise CaseFailed(f"at {self.step}: expected {sqlstate}, the statement succeeded")
        if error.sqlstate != sqlstate:
            raise CaseFailed(f"at {self.step}: expected {sqlstate}, got {self.describe(error)}")
        return error

    def check_committed(self, error):
        """A request whose rows live on every server committed them all (`error` None):
        the proxy runs it as one transaction over the servers, with two-phase commit."""
        if error is not None:
            raise CaseFailed(f"at {self.step}: expected the rows committed on every server, got {self.describe(error)}")
        self.notes.append("committed all rows")
        return True

    def failure(self, fn):
        """Why `self.run(fn)` failed, or None."""
        try:
            self.run(fn)
        except TimedOut:
            return f"at {self.step}: no answer within {CASE_TIMEOUT} s"
        except CaseFailed as e:
            return str(e)
        except Exception as e:  # noqa: BLE001 - every error is a case result
            return f"at {self.step}: {self.describe(e)}"
        return None

    def report(self, error):
        """The case's NOTE lines, then its EXPECT lines and PASS, or its FAIL line."""
        for note in self.notes:
            print(f"NOTE {self.name}: {note}")
        if error is not None:
            print(f"CASE {self.name} FAIL " + error.replace("\n", " "), flush=True)
            return
        for user, item, state in self.expects:
            print(f"EXPECT {self.name} {user} {item} {state}")
        print(f"CASE {self.name} PASS", flush=True)


def main(version, case_class, namespace):
    """Runs the program's cases selected on the command line, each in a fresh
    `case_class`, printing the lines above; returns the exit status. The cases are the
    functions named case_<name> in the program's `namespace` (its globals()), in the
    order the program defines them."""
    found = [(n.removeprefix("case_"), f) for n, f in namespace.items() if n.startswith("case_")]
    selected = [(n, f) for n, f in found if not ONLY or n in ONLY]
    print(f"VERSION {version}", flush=True)
    print("PLAN " + " ".join(n for n, _ in selected), flush=True)
    failed = 0
    for name, fn in selected:
        c = case_class(name)
        error = c.failure(fn)
        failed += error is not None
        c.report(error)
    print("DONE", flush=True)
    return 1 if failed else 0


# --- Reads across servers (scatter-gather): what the scatter cases write and expect. ---
# Every row a scatter case writes carries the case's name as its note, and its reads filter
# on that note: earlier cases' rows on the same keys are not part of its answers.

# LIMIT and OFFSET of the paged read: the page starts inside one server's rows and ends in
# another's (6 keys of 2 rows each, ordered by user_id DESC).
PAGE_LIMIT = 5
PAGE_OFFSET = 3


def aggregate_rows(c):
    """(user_id, item_id, n) on 3 keys of every server, with different n: the rows the
    keyless aggregate case writes."""
    return [(key, c.item(), 10 * i + key % 7) for i, key in enumerate(spread(9))]


def totals(rows):
    """count(*), sum(n), min(n), max(n) of `aggregate_rows`."""
    ns = [n for _, _, n in rows]
    return (len(ns), sum(ns), min(ns), max(ns))


def groups(rows):
    """n % 3, count(*), sum(n) GROUP BY n % 3 HAVING count(*) > 1 ORDER BY n % 3."""
    by = {}
    for _, _, n in rows:
        by.setdefault(n % 3, []).append(n)
    return [(r, len(ns), sum(ns)) for r, ns in sorted(by.items()) if len(ns) > 1]


def page_rows(c):
    """(user_id, item_id): 2 rows on each of 2 keys of every server, for the paged read."""
    return [(key, c.item()) for key in spread(6) for _ in range(2)]


def page(rows):
    """`rows` ORDER BY user_id DESC, item_id LIMIT PAGE_LIMIT OFFSET PAGE_OFFSET."""
    ordered = sorted(rows, key=lambda r: (-r[0], r[1]))
    return ordered[PAGE_OFFSET:PAGE_OFFSET + PAGE_LIMIT]
