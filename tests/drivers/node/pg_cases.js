#!/usr/bin/env node
// node-postgres (pg) cases of shardline's driver matrix (run by tests/tests/drivers.rs).
//
// Usage: node pg_cases.js HOST PORT KEYS [CASE...]
//   KEYS  user ids per server, e.g. "pg1=3,7;pg2=1,2;pg3=5,6" (every write names one of them; the scatter cases also read across servers)
//   CASE  run only these cases (default: all)
//
// node-postgres sends a query without values with the simple protocol; with values as one
// request Parse/Bind/Describe/Execute/Sync (unnamed statement), and with a `name` it parses
// the named statement once per connection and later only binds it.
//
// Prints PLAN / VERSION / EXPECT / CASE ... PASS|FAIL <reason> / DONE lines (see
// ../cases.py) and exits 1 if a case failed. Each case has its own connection and a
// time limit (SHARDLINE_CASE_TIMEOUT seconds, default 20). Run `npm ci` here (scripts/setup
// does) to install pg.
'use strict';

const { isDeepStrictEqual } = require('node:util');

let pg;
try {
  pg = require('pg');
} catch (e) {
  console.log(`MISSING node-postgres (pg) cannot be loaded from ${__dirname}/node_modules (${e.code || e.message}): run scripts/setup`);
  process.exit(3);
}

const [HOST, PORT, KEYS_ARG, ...ONLY] = process.argv.slice(2);
const CASE_TIMEOUT = Number(process.env.SHARDLINE_CASE_TIMEOUT || '20');

const SERVER_KEYS = new Map();
for (const part of KEYS_ARG.split(';')) {
  const [server, ids] = part.split('=');
  SERVER_KEYS.set(server, ids.split(',').map(Number));
}
const SERVER_OF = new Map();
for (const [server, keys] of SERVER_KEYS) for (const k of keys) SERVER_OF.set(k, server);

function perServer() {
  return [...SERVER_KEYS.values()].map((keys) => keys[0]);
}

function spread(n) {
  const columns = [...SERVER_KEYS.values()];
  const out = [];
  for (let i = 0; out.length < n; i++) {
    const column = columns[i % columns.length];
    out.push(column[Math.floor(i / columns.length) % column.length]);
  }
  return out;
}

const where = (key) => `user_id ${key} (${SERVER_OF.get(key)})`;

class CaseFailed extends Error {}

function describe(e) {
  if (e && e.code && /^[0-9A-Z]{5}$/.test(e.code)) return `${e.code} ${e.message}`;
  return `${(e && e.name) || 'Error'}: ${(e && e.message) || e}`;
}

let nextItem = 1;

class Case {
  constructor(name) {
    this.name = name;
    this.step = 'start';
    this.expects = [];
  }
  item() {
    return nextItem++;
  }
  present(user, item) {
    this.expects.push([user, item, 'present']);
  }
  absent(user, item) {
    this.expects.push([user, item, 'absent']);
  }
  check(condition, what) {
    if (!condition) throw new CaseFailed(`at ${this.step}: ${what}`);
  }
  async expectError(sqlstate, promise) {
    try {
      await promise;
    } catch (e) {
      if (e.code !== sqlstate) throw new CaseFailed(`at ${this.step}: expected ${sqlstate}, got ${describe(e)}`);
      return e;
    }
    throw new CaseFailed(`at ${this.step}: expected ${sqlstate}, the statement succeeded`);
  }
}

const INSERT = 'INSERT INTO drv (user_id, item_id, note) VALUES ($1, $2, $3)';
const NOTE = 'SELECT note FROM drv WHERE user_id = $1 AND item_id = $2';

// int8 comes back as a string by default: compare numbers.
const num = (v) => (v === null ? null : Number(v));

// --- Reads across servers (scatter-gather). Every row a scatter case writes carries the
// case's name as its note, and its reads filter on that note: earlier cases' rows on the
// same keys are not part of its answers.
const INSERT_N = 'INSERT INTO drv (user_id, item_id, note, n) VALUES ($1, $2, $3, $4)';
// Keyless: every server answers.
const MARKED = 'SELECT user_id, item_id FROM drv WHERE note = $1 ORDER BY user_id, item_id';
// The page starts inside one server's rows and ends in another's (6 keys of 2 rows each).
const PAGE_LIMIT = 5;
const PAGE_OFFSET = 3;
const PAGE = 'SELECT user_id, item_id FROM drv WHERE user_id = ANY($1) AND note = $2 '
  + `ORDER BY user_id DESC, item_id LIMIT ${PAGE_LIMIT} OFFSET ${PAGE_OFFSET}`;
const pairs = (r) => r.rows.map((x) => [num(x.user_id), num(x.item_id)]);
const byKeyThenItem = (a, b) => a[0] - b[0] || a[1] - b[1];

const cases = {
  // A query without values: the simple protocol.
  async simple_query(c, client) {
    for (const key of perServer()) {
      const item = c.item();
      c.step = `INSERT ${where(key)}`;
      await client.query(`INSERT INTO drv (user_id, item_id, note) VALUES (${key}, ${item}, '${c.name}')`);
      c.step = `SELECT ${where(key)}`;
      const r = await client.query(`SELECT note FROM drv WHERE user_id = ${key} AND item_id = ${item}`);
      c.check(r.rows.length === 1 && r.rows[0].note === c.name, `rows ${JSON.stringify(r.rows)}`);
      c.present(key, item);
    }
  },

  // One INSERT with a VALUES row per server and values, RETURNING in VALUES order.
  async multi_row_insert_across_servers(c, client) {
    const rows = spread(6).reverse().map((key) => [key, c.item()]);
    const values = rows.map((_, i) => `($${2 * i + 1}, $${2 * i + 2}, '${c.name}')`).join(', ');
    c.step = 'INSERT ... VALUES over all servers RETURNING';
    const r = await client.query(`INSERT INTO drv (user_id, item_id, note) VALUES ${values} RETURNING user_id, item_id`, rows.flat());
    const got = pairs(r);
    c.check(isDeepStrictEqual(got, rows), `RETURNING ${JSON.stringify(got)}, expected ${JSON.stringify(rows)}`);
    for (const [key, item] of rows) c.present(key, item);
  },

  // A row updated and read by its item id alone, routed by SET shardline.key and by a
  // comment hint (issue 16).
  async routing_hints(c, client) {
    for (const key of perServer()) {
      const item = c.item();
      c.step = `INSERT ${where(key)}`;
      await client.query(INSERT, [key, item, c.name]);
      c.step = `SET shardline.key ${where(key)}`;
      await client.query(`SET shardline.key = '${key}'`);
      const u = await client.query('UPDATE drv SET n = 1 WHERE item_id = $1 AND note = $2', [item, c.name]);
      c.check(u.rowCount === 1, `UPDATE by item id updated ${u.rowCount} rows`);
      await client.query('RESET shardline.key');
      c.step = `comment hint ${where(key)}`;
      const r = await client.query(`/* shardline.key: ${key} */ SELECT n FROM drv WHERE item_id = $1 AND note = $2`, [item, c.name]);
      c.check(r.rows.length === 1 && r.rows[0].n === 1, `read by comment hint: ${JSON.stringify(r.rows)}`);
      c.present(key, item);
    }
  },

  // Values: an unnamed statement, Parse/Bind/Describe/Execute/Sync in one request.
  async unnamed_params(c, client) {
    for (const key of spread(6)) {
      const item = c.item();
      c.step = `INSERT ${where(key)}`;
      await client.query(INSERT, [key, item, c.name]);
      c.step = `SELECT ${where(key)}`;
      const r = await client.query(NOTE, [key, item]);
      c.check(r.rows.length === 1 && r.rows[0].note === c.name, `rows ${JSON.stringify(r.rows)}`);
      c.present(key, item);
    }
  },

  // {name, text, values}: parsed once per connection, then bound with 20 different keys.
  async named_prepared_reused_20_keys(c, client) {
    const pairs = spread(20).map((key) => [key, c.item()]);
    for (const [key, item] of pairs) {
      c.step = `named INSERT ${where(key)}`;
      await client.query({ name: 'drv_insert', text: INSERT, values: [key, item, c.name] });
    }
    for (const [key, item] of pairs) {
      c.step = `named SELECT ${where(key)}`;
      const r = await client.query({ name: 'drv_note', text: NOTE, values: [key, item] });
      c.check(r.rows.length === 1 && r.rows[0].note === c.name, `rows ${JSON.stringify(r.rows)}`);
      c.present(key, item);
    }
  },

  // BEGIN ... COMMIT and BEGIN ... ROLLBACK with parameterized statements.
  async transaction_commit_and_rollback(c, client) {
    for (const key of perServer()) {
      const kept = c.item();
      const dropped = c.item();
      c.step = `committed transaction ${where(key)}`;
      await client.query('BEGIN');
      await client.query(INSERT, [key, kept, 'tmp']);
      await client.query('UPDATE drv SET note = $1, n = 1 WHERE user_id = $2 AND item_id = $3', [c.name, key, kept]);
      await client.query('COMMIT');
      c.step = `rolled-back transaction ${where(key)}`;
      await client.query('BEGIN');
      await client.query(INSERT, [key, dropped, c.name]);
      await client.query('ROLLBACK');
      c.step = `SELECT after ${where(key)}`;
      const r = await client.query('SELECT item_id, note, n FROM drv WHERE user_id = $1 AND item_id = ANY($2::bigint[])', [key, [kept, dropped]]);
      const rows = r.rows.map((x) => [num(x.item_id), x.note, x.n]);
      c.check(JSON.stringify(rows) === JSON.stringify([[kept, c.name, 1]]), `rows ${JSON.stringify(rows)}`);
      c.present(key, kept);
      c.absent(key, dropped);
    }
  },

  // Named statements inside a transaction, reused across the servers' keys (one key per transaction).
  async named_prepared_in_transaction(c, client) {
    for (const key of spread(6)) {
      const item = c.item();
      c.step = `transaction with named statements ${where(key)}`;
      await client.query('BEGIN');
      await client.query({ name: 'tx_insert', text: INSERT, values: [key, item, c.name] });
      const r = await client.query({ name: 'tx_note', text: NOTE, values: [key, item] });
      await client.query('COMMIT');
      c.check(r.rows.length === 1 && r.rows[0].note === c.name, `rows ${JSON.stringify(r.rows)}`);
      c.present(key, item);
    }
  },

  // Parameters of several types: jsonb, uuid, text[], timestamptz and NULL, in a transaction.
  async types_null_jsonb_uuid_array_timestamptz(c, client) {
    for (const key of perServer()) {
      const item = c.item();
      const doc = { driver: 'node-postgres', key, nested: [1, 2, { x: null }] };
      const tag = `00000000-0000-4000-8000-${String(item).padStart(12, '0')}`;
      const labels = ['a', 'b c', 'ünï'];
      const at = new Date('2024-05-06T07:08:09.123Z');
      c.step = `INSERT ${where(key)}`;
      await client.query('BEGIN');
      await client.query(
        'INSERT INTO drv (user_id, item_id, note, n, doc, tag, labels, at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)',
        [key, item, c.name, null, doc, tag, labels, at],
      );
      await client.query('COMMIT');
      c.step = `SELECT ${where(key)}`;
      const r = await client.query('SELECT note, n, doc, tag, labels, at FROM drv WHERE user_id = $1 AND item_id = $2', [key, item]);
      c.check(r.rows.length === 1, `rows ${JSON.stringify(r.rows)}`);
      const row = r.rows[0];
      const got = [row.note, row.n, row.doc, row.tag, row.labels, row.at && row.at.toISOString()];
      const want = [c.name, null, doc, tag, labels, at.toISOString()];
      // (jsonb keeps its own key order: compare values, not texts)
      c.check(isDeepStrictEqual(got, want), `read back ${JSON.stringify(got)}`);
      c.present(key, item);
    }
  },

  // A duplicate key gives 23505 and the connection stays usable.
  async duplicate_key_then_usable(c, client) {
    for (const key of perServer()) {
      const item = c.item();
      const after = c.item();
      c.step = `INSERT ${where(key)}`;
      await client.query({ name: 'dup_insert', text: INSERT, values: [key, item, c.name] });
      c.step = `duplicate INSERT ${where(key)}`;
      await c.expectError('23505', client.query({ name: 'dup_insert', text: INSERT, values: [key, item, c.name] }));
      c.step = `next INSERT ${where(key)}`;
      await client.query(INSERT, [key, after, c.name]);
      const r = await client.query(NOTE, [key, after]);
      c.check(r.rows.length === 1 && r.rows[0].note === c.name, `rows ${JSON.stringify(r.rows)}`);
      c.present(key, item);
      c.present(key, after);
    }
  },

  // Inside a transaction: 23505, then 25P02 for the next statement, then ROLLBACK recovers.
  async transaction_error_25p02_rollback(c, client) {
    for (const key of perServer()) {
      const existing = c.item();
      const inside = c.item();
      const after = c.item();
      c.step = `setup INSERT ${where(key)}`;
      await client.query(INSERT, [key, existing, c.name]);
      c.step = `BEGIN ${where(key)}`;
      await client.query('BEGIN');
      c.step = `INSERT in transaction ${where(key)}`;
      await client.query(INSERT, [key, inside, c.name]);
      c.step = `duplicate INSERT in transaction ${where(key)}`;
      await c.expectError('23505', client.query(INSERT, [key, existing, c.name]));
      c.step = `statement after the error ${where(key)}`;
      await c.expectError('25P02', client.query(NOTE, [key, existing]));
      c.step = `ROLLBACK ${where(key)}`;
      await client.query('ROLLBACK');
      c.step = `after ROLLBACK ${where(key)}`;
      await client.query(INSERT, [key, after, c.name]);
      const r = await client.query('SELECT item_id FROM drv WHERE user_id = $1 AND item_id = ANY($2::bigint[]) ORDER BY item_id', [key, [existing, inside, after]]);
      const rows = r.rows.map((x) => num(x.item_id));
      c.check(JSON.stringify(rows) === JSON.stringify([existing, after]), `rows ${JSON.stringify(rows)}`);
      c.present(key, existing);
      c.absent(key, inside);
      c.present(key, after);
    }
  },
  // Aggregates with no key (count/sum/min/max, and GROUP BY/HAVING on a non-key): every
  // server answers and the proxy combines the partial results.
  async scatter_aggregate_all_servers(c, client) {
    const rows = spread(9).map((key, i) => [key, c.item(), 10 * i + (key % 7)]);
    for (const [key, item, n] of rows) {
      c.step = `INSERT ${where(key)}`;
      await client.query(INSERT_N, [key, item, c.name, n]);
      c.present(key, item);
    }
    const ns = rows.map((r) => r[2]);
    const want = [ns.length, ns.reduce((a, b) => a + b, 0), Math.min(...ns), Math.max(...ns)];
    c.step = 'count/sum/min/max over all servers';
    const r = await client.query('SELECT count(*) AS count, sum(n) AS sum, min(n) AS min, max(n) AS max FROM drv WHERE note = $1', [c.name]);
    const got = r.rows.map((x) => [num(x.count), num(x.sum), x.min, x.max]);
    c.check(isDeepStrictEqual(got, [want]), `got ${JSON.stringify(got)}, expected ${JSON.stringify([want])}`);
    const groups = new Map();
    for (const n of ns) groups.set(n % 3, (groups.get(n % 3) || []).concat([n]));
    const wantGroups = [...groups.entries()]
      .filter(([, g]) => g.length > 1)
      .sort((a, b) => a[0] - b[0])
      .map(([rest, g]) => [rest, g.length, g.reduce((a, b) => a + b, 0)]);
    c.step = 'GROUP BY n % 3 HAVING over all servers';
    const g = await client.query(
      'SELECT n % 3 AS rest, count(*) AS count, sum(n) AS sum FROM drv WHERE note = $1 GROUP BY n % 3 HAVING count(*) > 1 ORDER BY n % 3',
      [c.name],
    );
    const gotGroups = g.rows.map((x) => [x.rest, num(x.count), num(x.sum)]);
    c.check(isDeepStrictEqual(gotGroups, wantGroups), `got ${JSON.stringify(gotGroups)}, expected ${JSON.stringify(wantGroups)}`);
  },

  // user_id = ANY($1) with an array of keys on every server, ORDER BY user_id DESC LIMIT
  // OFFSET: the proxy merges the servers' sorted rows. Unnamed, then a named statement
  // (parsed once, bound twice).
  async scatter_any_order_limit_offset(c, client) {
    const rows = spread(6).flatMap((key) => [[key, c.item()], [key, c.item()]]);
    const keys = [...new Set(rows.map((r) => r[0]))].sort((a, b) => a - b);
    for (const [key, item] of rows) {
      c.step = `INSERT ${where(key)}`;
      await client.query(INSERT, [key, item, c.name]);
      c.present(key, item);
    }
    const want = [...rows].sort((a, b) => b[0] - a[0] || a[1] - b[1]).slice(PAGE_OFFSET, PAGE_OFFSET + PAGE_LIMIT);
    for (const name of [undefined, 'scatter_page', 'scatter_page']) {
      c.step = `ANY(${JSON.stringify(keys)}) ORDER BY LIMIT OFFSET, ${name ? 'named' : 'unnamed'} statement`;
      const got = pairs(await client.query({ name, text: PAGE, values: [keys, c.name] }));
      c.check(isDeepStrictEqual(got, want), `rows ${JSON.stringify(got)}, expected ${JSON.stringify(want)}`);
    }
  },

  // In a transaction (one per server): INSERT, then a read across servers sees the
  // transaction's row beside the committed ones; after ROLLBACK it no longer does.
  async scatter_read_in_transaction(c, client) {
    const committed = perServer().map((key) => [key, c.item()]);
    for (const [key, item] of committed) {
      c.step = `committed INSERT ${where(key)}`;
      await client.query(INSERT, [key, item, c.name]);
      c.present(key, item);
    }
    const before = [...committed].sort(byKeyThenItem);
    for (const key of perServer()) {
      const item = c.item();
      c.step = `BEGIN and INSERT ${where(key)}`;
      await client.query('BEGIN');
      await client.query(INSERT, [key, item, c.name]);
      c.step = `read across servers in the transaction of ${where(key)}`;
      const inside = pairs(await client.query(MARKED, [c.name]));
      const want = [...committed, [key, item]].sort(byKeyThenItem);
      c.check(isDeepStrictEqual(inside, want), `rows ${JSON.stringify(inside)}, expected ${JSON.stringify(want)}`);
      c.step = `ROLLBACK ${where(key)}`;
      await client.query('ROLLBACK');
      c.step = `read across servers after ROLLBACK ${where(key)}`;
      const after = pairs(await client.query(MARKED, [c.name]));
      c.check(isDeepStrictEqual(after, before), `rows ${JSON.stringify(after)}, expected ${JSON.stringify(before)}`);
      c.absent(key, item);
    }
  },
};

async function runCase(name, fn) {
  const c = new Case(name);
  const client = new pg.Client({
    host: HOST,
    port: Number(PORT),
    user: 'postgres',
    database: 'postgres',
    connectionTimeoutMillis: 10000,
  });
  // An error event on an idle client (the proxy closing the connection) must not crash the program.
  client.on('error', () => {});
  let timer;
  const limit = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new CaseFailed(`at ${c.step}: no answer within ${CASE_TIMEOUT} s`)), CASE_TIMEOUT * 1000);
  });
  try {
    await Promise.race([
      (async () => {
        c.step = 'connect';
        await client.connect();
        await fn(c, client);
      })(),
      limit,
    ]);
    return [c, null];
  } catch (e) {
    return [c, e instanceof CaseFailed ? e.message : `at ${c.step}: ${describe(e)}`];
  } finally {
    clearTimeout(timer);
    client.end().catch(() => {});
    // A client stuck on a query never ends cleanly: drop its socket.
    if (client.connection && client.connection.stream) client.connection.stream.destroy();
  }
}

async function main() {
  const selected = Object.entries(cases).filter(([name]) => ONLY.length === 0 || ONLY.includes(name));
  console.log(`VERSION pg ${require('pg/package.json').version} (node ${process.version})`);
  console.log(`PLAN ${selected.map(([name]) => name).join(' ')}`);
  let failed = 0;
  for (const [name, fn] of selected) {
    const [c, error] = await runCase(name, fn);
    if (error !== null) {
      failed++;
      console.log(`CASE ${name} FAIL ${error.replace(/\n/g, ' ')}`);
      continue;
    }
    for (const [user, item, state] of c.expects) console.log(`EXPECT ${name} ${user} ${item} ${state}`);
    console.log(`CASE ${name} PASS`);
  }
  console.log('DONE');
  // Writes to a pipe are synchronous on Linux: nothing printed is lost by exiting now.
  process.exit(failed ? 1 : 0);
}

main().catch((e) => {
  console.log(`FATAL ${describe(e)}`);
  process.exit(2);
});
