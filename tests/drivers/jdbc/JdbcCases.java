// pgjdbc cases of shardline's driver matrix (run by tests/tests/drivers.rs).
//
// Usage: java -cp /usr/share/java/postgresql.jar JdbcCases.java HOST PORT KEYS [CASE...]
//   KEYS  user ids per server, e.g. "pg1=3,7;pg2=1,2;pg3=5,6" (every write names one of them; the scatter cases also read across servers)
//   CASE  run only these cases (default: all)
//
// pgjdbc uses the extended protocol for every statement: unnamed statements until a
// PreparedStatement has run prepareThreshold times (default 5), then a named server-side
// statement (S_1, ...). With autocommit off it sends BEGIN ahead of the first statement in
// the same request.
//
// Prints PLAN / VERSION / EXPECT / CASE ... PASS|FAIL <reason> / DONE lines (see
// ../cases.py) and exits 1 if a case failed. Each case has its own connection and a
// time limit (SHARDLINE_CASE_TIMEOUT seconds, default 20).

import java.sql.Array;
import java.sql.BatchUpdateException;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.sql.Types;
import java.time.OffsetDateTime;
import java.time.ZoneOffset;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Objects;
import java.util.UUID;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;

public class JdbcCases {
    static String host;
    static String port;
    static int caseTimeout;
    static final Map<String, List<Long>> SERVER_KEYS = new LinkedHashMap<>();
    static final Map<Long, String> SERVER_OF = new LinkedHashMap<>();
    static long nextItem = 1;

    static final String INSERT = "INSERT INTO drv (user_id, item_id, note) VALUES (?, ?, ?)";
    static final String NOTE = "SELECT note FROM drv WHERE user_id = ? AND item_id = ?";

    static final class CaseFailed extends Exception {
        CaseFailed(String message) {
            super(message);
        }
    }

    interface Body {
        void run(Case c, Connection conn) throws Exception;
    }

    static final class Case {
        final String name;
        volatile String step = "start";
        final List<String> expects = new ArrayList<>();
        final List<String> notes = new ArrayList<>();

        Case(String name) {
            this.name = name;
        }

        long item() {
            return nextItem++;
        }

        // The servers must hold these rows of the user after the case passed...
        void present(long user, long... items) {
            expect(user, items, "present");
        }

        // ... and must not hold these.
        void absent(long user, long... items) {
            expect(user, items, "absent");
        }

        private void expect(long user, long[] items, String state) {
            for (long item : items) {
                expects.add(user + " " + item + " " + state);
            }
        }

        void check(boolean condition, String what) throws CaseFailed {
            if (!condition) {
                throw new CaseFailed("at " + step + ": " + what);
            }
        }

        interface Action {
            void run() throws SQLException;
        }

        void expectError(String sqlstate, Action action) throws CaseFailed {
            try {
                action.run();
            } catch (SQLException e) {
                if (!sqlstate.equals(rootCause(e).getSQLState())) {
                    throw new CaseFailed("at " + step + ": expected " + sqlstate + ", got " + describe(e));
                }
                return;
            }
            throw new CaseFailed("at " + step + ": expected " + sqlstate + ", the statement succeeded");
        }
    }

    static SQLException rootCause(SQLException e) {
        if (e instanceof BatchUpdateException && e.getNextException() != null) {
            return e.getNextException();
        }
        return e;
    }

    static String describe(Throwable t) {
        if (t instanceof SQLException) {
            SQLException e = rootCause((SQLException) t);
            String message = e.getMessage();
            if (e instanceof org.postgresql.util.PSQLException) {
                org.postgresql.util.ServerErrorMessage server = ((org.postgresql.util.PSQLException) e).getServerErrorMessage();
                if (server != null) {
                    message = server.getMessage();
                }
            }
            return e.getSQLState() + " " + message;
        }
        return t.getClass().getSimpleName() + ": " + t.getMessage();
    }

    static List<Long> perServer() {
        List<Long> out = new ArrayList<>();
        for (List<Long> keys : SERVER_KEYS.values()) {
            out.add(keys.get(0));
        }
        return out;
    }

    static List<Long> spread(int n) {
        List<List<Long>> columns = new ArrayList<>(SERVER_KEYS.values());
        List<Long> out = new ArrayList<>();
        for (int i = 0; out.size() < n; i++) {
            List<Long> column = columns.get(i % columns.size());
            out.add(column.get((i / columns.size()) % column.size()));
        }
        return out;
    }

    static String where(long key) {
        return "user_id " + key + " (" + SERVER_OF.get(key) + ")";
    }

    static Connection connect() throws SQLException {
        String url = "jdbc:postgresql://" + host + ":" + port + "/postgres?user=postgres&connectTimeout=10"
                + "&socketTimeout=" + caseTimeout + "&ApplicationName=shardline-driver-matrix";
        return DriverManager.getConnection(url);
    }

    static void insert(Connection conn, long key, long item, String note) throws SQLException {
        try (PreparedStatement ps = conn.prepareStatement(INSERT)) {
            ps.setLong(1, key);
            ps.setLong(2, item);
            ps.setString(3, note);
            ps.executeUpdate();
        }
    }

    static String note(Connection conn, long key, long item) throws SQLException {
        try (PreparedStatement ps = conn.prepareStatement(NOTE)) {
            ps.setLong(1, key);
            ps.setLong(2, item);
            try (ResultSet rs = ps.executeQuery()) {
                return rs.next() ? rs.getString(1) : null;
            }
        }
    }

    static long count(Connection conn, long key, long item) throws SQLException {
        try (PreparedStatement ps = conn.prepareStatement("SELECT count(*) FROM drv WHERE user_id = ? AND item_id = ?")) {
            ps.setLong(1, key);
            ps.setLong(2, item);
            try (ResultSet rs = ps.executeQuery()) {
                rs.next();
                return rs.getLong(1);
            }
        }
    }

    // java.sql.Statement with literals (pgjdbc still sends it with the extended protocol).
    static void statementLiterals(Case c, Connection conn) throws Exception {
        try (Statement st = conn.createStatement()) {
            for (long key : perServer()) {
                long item = c.item();
                c.step = "INSERT " + where(key);
                st.executeUpdate("INSERT INTO drv (user_id, item_id, note) VALUES (" + key + ", " + item + ", '" + c.name + "')");
                c.step = "SELECT " + where(key);
                try (ResultSet rs = st.executeQuery("SELECT note FROM drv WHERE user_id = " + key + " AND item_id = " + item)) {
                    c.check(rs.next() && c.name.equals(rs.getString(1)), "row not read back");
                }
                c.present(key, item);
            }
        }
    }

    // One PreparedStatement run 12 times with keys on every server: from the 5th run on it
    // is a named server-side statement.
    static void preparedAfterThreshold(Case c, Connection conn) throws Exception {
        List<long[]> pairs = new ArrayList<>();
        for (long key : spread(12)) {
            pairs.add(new long[] {key, c.item()});
        }
        try (PreparedStatement ins = conn.prepareStatement(INSERT); PreparedStatement sel = conn.prepareStatement(NOTE)) {
            for (long[] p : pairs) {
                c.step = "prepared INSERT " + where(p[0]);
                ins.setLong(1, p[0]);
                ins.setLong(2, p[1]);
                ins.setString(3, c.name);
                c.check(ins.executeUpdate() == 1, "update count");
            }
            c.check(ins.unwrap(org.postgresql.PGStatement.class).isUseServerPrepare(), "the INSERT never became a server-side prepared statement");
            for (long[] p : pairs) {
                c.step = "prepared SELECT " + where(p[0]);
                sel.setLong(1, p[0]);
                sel.setLong(2, p[1]);
                try (ResultSet rs = sel.executeQuery()) {
                    c.check(rs.next() && c.name.equals(rs.getString(1)), "row not read back");
                }
                c.present(p[0], p[1]);
            }
        }
    }

    // The same, inside one transaction per key (setAutoCommit(false)).
    static void preparedAfterThresholdInTransaction(Case c, Connection conn) throws Exception {
        conn.setAutoCommit(false);
        try (PreparedStatement ins = conn.prepareStatement(INSERT)) {
            for (long key : perServer()) {
                c.step = "7 prepared INSERTs in a transaction " + where(key);
                for (int i = 0; i < 7; i++) {
                    long item = c.item();
                    ins.setLong(1, key);
                    ins.setLong(2, item);
                    ins.setString(3, c.name);
                    ins.executeUpdate();
                    c.present(key, item);
                }
                c.step = "COMMIT " + where(key);
                conn.commit();
            }
        }
    }

    // addBatch/executeBatch of 5 rows for one user_id.
    static void batchPerUser(Case c, Connection conn) throws Exception {
        try (PreparedStatement ps = conn.prepareStatement(INSERT)) {
            for (long key : perServer()) {
                c.step = "executeBatch " + where(key);
                List<Long> items = new ArrayList<>();
                for (int i = 0; i < 5; i++) {
                    long item = c.item();
                    items.add(item);
                    ps.setLong(1, key);
                    ps.setLong(2, item);
                    ps.setString(3, c.name);
                    ps.addBatch();
                }
                int[] counts = ps.executeBatch();
                c.check(counts.length == 5, "update counts " + Arrays.toString(counts));
                for (long item : items) {
                    c.step = "SELECT " + where(key);
                    c.check(count(conn, key, item) == 1, "row " + item + " missing");
                    c.present(key, item);
                }
            }
        }
    }

    // A batch whose rows live on every server: one implicit transaction, committed on every
    // server (two-phase commit).
    static void batchAcrossServersAtomic(Case c, Connection conn) throws Exception {
        List<long[]> rows = new ArrayList<>();
        for (long key : spread(6)) {
            rows.add(new long[] {key, c.item()});
        }
        boolean committed;
        c.step = "executeBatch over all servers";
        try (PreparedStatement ps = conn.prepareStatement(INSERT)) {
            for (long[] r : rows) {
                ps.setLong(1, r[0]);
                ps.setLong(2, r[1]);
                ps.setString(3, c.name);
                ps.addBatch();
            }
            ps.executeBatch();
            committed = true;
            c.notes.add("committed all rows");
        } catch (SQLException e) {
            c.check(false, "expected the rows committed on every server, got " + describe(e));
            committed = false;
        }
        try (Connection check = connect()) {
            for (long[] r : rows) {
                c.step = "SELECT " + where(r[0]);
                long n = count(check, r[0], r[1]);
                c.check(n == (committed ? 1 : 0), n + " rows of (" + r[0] + ", " + r[1] + ") after " + (committed ? "commit" : "refusal") + ": partial commit");
                if (committed) {
                    c.present(r[0], r[1]);
                } else {
                    c.absent(r[0], r[1]);
                }
            }
        }
    }

    // A batch over every server inside a transaction (autocommit off): pgjdbc sends its BEGIN
    // with the batch; COMMIT makes every row visible, and a second batch rolled back leaves none.
    static void batchAcrossServersInTransaction(Case c, Connection conn) throws Exception {
        conn.setAutoCommit(false);
        List<long[]> kept = new ArrayList<>();
        List<long[]> undone = new ArrayList<>();
        for (long key : spread(6)) {
            kept.add(new long[] {key, c.item()});
            undone.add(new long[] {key, c.item()});
        }
        try (PreparedStatement ps = conn.prepareStatement(INSERT)) {
            for (List<long[]> rows : List.of(kept, undone)) {
                c.step = "executeBatch over all servers in a transaction";
                for (long[] r : rows) {
                    ps.setLong(1, r[0]);
                    ps.setLong(2, r[1]);
                    ps.setString(3, c.name);
                    ps.addBatch();
                }
                int[] counts = ps.executeBatch();
                c.check(counts.length == rows.size(), "update counts " + Arrays.toString(counts));
                if (rows == kept) {
                    c.step = "COMMIT";
                    conn.commit();
                } else {
                    c.step = "ROLLBACK";
                    conn.rollback();
                }
            }
        }
        try (Connection check = connect()) {
            for (long[] r : kept) {
                c.step = "SELECT committed " + where(r[0]);
                c.check(count(check, r[0], r[1]) == 1, "row (" + r[0] + ", " + r[1] + ") missing after COMMIT");
                c.present(r[0], r[1]);
            }
            for (long[] r : undone) {
                c.step = "SELECT rolled back " + where(r[0]);
                c.check(count(check, r[0], r[1]) == 0, "row (" + r[0] + ", " + r[1] + ") present after ROLLBACK");
                c.absent(r[0], r[1]);
            }
        }
    }

    // One INSERT with a VALUES row per server and parameters, RETURNING in VALUES order.
    static void multiRowInsertAcrossServers(Case c, Connection conn) throws Exception {
        List<long[]> rows = new ArrayList<>();
        for (long key : spread(6)) {
            rows.add(0, new long[] {key, c.item()});
        }
        StringBuilder sql = new StringBuilder("INSERT INTO drv (user_id, item_id, note) VALUES ");
        for (int i = 0; i < rows.size(); i++) {
            sql.append(i == 0 ? "" : ", ").append("(?, ?, ?)");
        }
        sql.append(" RETURNING user_id, item_id");
        c.step = "INSERT ... VALUES over all servers RETURNING";
        try (PreparedStatement ps = conn.prepareStatement(sql.toString())) {
            for (int i = 0; i < rows.size(); i++) {
                ps.setLong(3 * i + 1, rows.get(i)[0]);
                ps.setLong(3 * i + 2, rows.get(i)[1]);
                ps.setString(3 * i + 3, c.name);
            }
            try (ResultSet rs = ps.executeQuery()) {
                for (long[] r : rows) {
                    c.check(rs.next(), "fewer RETURNING rows than VALUES rows");
                    c.check(rs.getLong(1) == r[0] && rs.getLong(2) == r[1],
                        "RETURNING (" + rs.getLong(1) + ", " + rs.getLong(2) + "), expected (" + r[0] + ", " + r[1] + ")");
                    c.present(r[0], r[1]);
                }
                c.check(!rs.next(), "more RETURNING rows than VALUES rows");
            }
        }
    }

    // A row updated and read by its item id alone, routed by SET shardline.key, by a comment
    // hint, and by SET LOCAL in a transaction (issue 16).
    static void routingHints(Case c, Connection conn) throws Exception {
        for (long key : perServer()) {
            long item = c.item();
            c.step = "INSERT " + where(key);
            insert(conn, key, item, c.name);
            c.step = "SET shardline.key " + where(key);
            try (Statement st = conn.createStatement()) {
                st.execute("SET shardline.key = '" + key + "'");
            }
            try (PreparedStatement ps = conn.prepareStatement("UPDATE drv SET n = 1 WHERE item_id = ? AND note = ?")) {
                ps.setLong(1, item);
                ps.setString(2, c.name);
                int n = ps.executeUpdate();
                c.check(n == 1, "UPDATE by item id updated " + n + " rows");
            }
            try (Statement st = conn.createStatement()) {
                st.execute("RESET shardline.key");
            }
            c.step = "comment hint " + where(key);
            try (PreparedStatement ps = conn.prepareStatement("/* shardline.key: " + key + " */ SELECT n FROM drv WHERE item_id = ? AND note = ?")) {
                ps.setLong(1, item);
                ps.setString(2, c.name);
                try (ResultSet rs = ps.executeQuery()) {
                    c.check(rs.next() && rs.getInt(1) == 1, "read by comment hint");
                }
            }
            c.step = "SET LOCAL shardline.key " + where(key);
            conn.setAutoCommit(false);
            try (Statement st = conn.createStatement()) {
                st.execute("SET LOCAL shardline.key = '" + key + "'");
            }
            try (PreparedStatement ps = conn.prepareStatement("SELECT n FROM drv WHERE item_id = ? AND note = ? FOR UPDATE")) {
                ps.setLong(1, item);
                ps.setString(2, c.name);
                try (ResultSet rs = ps.executeQuery()) {
                    c.check(rs.next() && rs.getInt(1) == 1, "SELECT ... FOR UPDATE by local hint");
                }
            }
            conn.commit();
            conn.setAutoCommit(true);
            c.present(key, item);
        }
    }

    static final OffsetDateTime AT = OffsetDateTime.of(2024, 5, 6, 7, 8, 9, 123456000, ZoneOffset.UTC);

    // INSERT with NULL, jsonb (setObject(.., Types.OTHER)), uuid, text[] (createArrayOf) and
    // timestamptz parameters, then read back.
    static void typedInsert(Case c, Connection conn, boolean inTransaction) throws Exception {
        conn.setAutoCommit(!inTransaction);
        for (long key : perServer()) {
            long item = c.item();
            UUID tag = UUID.randomUUID();
            String doc = "{\"driver\": \"pgjdbc\", \"key\": " + key + "}";
            c.step = "INSERT with NULL/jsonb/uuid/array " + where(key);
            try (PreparedStatement ps = conn.prepareStatement(
                    "INSERT INTO drv (user_id, item_id, note, n, doc, tag, labels, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")) {
                ps.setLong(1, key);
                ps.setLong(2, item);
                ps.setString(3, c.name);
                ps.setNull(4, Types.INTEGER);
                ps.setObject(5, doc, Types.OTHER);
                ps.setObject(6, tag);
                Array labels = conn.createArrayOf("text", new String[] {"a", "b c", "\u00fcn\u00ef"});
                ps.setArray(7, labels);
                ps.setObject(8, AT);
                c.check(ps.executeUpdate() == 1, "update count");
            }
            if (inTransaction) {
                c.step = "COMMIT " + where(key);
                conn.commit();
            }
            c.step = "SELECT " + where(key);
            try (PreparedStatement ps = conn.prepareStatement(
                    "SELECT note, n, doc::text, tag, labels, at FROM drv WHERE user_id = ? AND item_id = ? AND tag = ?")) {
                ps.setLong(1, key);
                ps.setLong(2, item);
                ps.setObject(3, tag);
                try (ResultSet rs = ps.executeQuery()) {
                    c.check(rs.next(), "row not found");
                    c.check(c.name.equals(rs.getString(1)), "note " + rs.getString(1));
                    rs.getInt(2);
                    c.check(rs.wasNull(), "n is not NULL");
                    c.check(rs.getString(3).contains("\"pgjdbc\""), "doc " + rs.getString(3));
                    c.check(tag.equals(rs.getObject(4)), "tag " + rs.getObject(4));
                    c.check(Arrays.equals(new String[] {"a", "b c", "\u00fcn\u00ef"}, (String[]) rs.getArray(5).getArray()), "labels " + rs.getString(5));
                    c.check(AT.toInstant().equals(rs.getObject(6, OffsetDateTime.class).toInstant()), "at " + rs.getString(6));
                }
            }
            if (inTransaction) {
                conn.commit();
            }
            c.present(key, item);
        }
    }

    static void autocommitNullJsonbUuidArray(Case c, Connection conn) throws Exception {
        typedInsert(c, conn, false);
    }

    static void transactionNullJsonbUuidArray(Case c, Connection conn) throws Exception {
        typedInsert(c, conn, true);
    }

    // setAutoCommit(false): a committed and a rolled-back transaction per key.
    static void transactionCommitAndRollback(Case c, Connection conn) throws Exception {
        conn.setAutoCommit(false);
        for (long key : perServer()) {
            long kept = c.item();
            long dropped = c.item();
            c.step = "committed transaction " + where(key);
            insert(conn, key, kept, "tmp");
            try (PreparedStatement ps = conn.prepareStatement("UPDATE drv SET note = ?, n = 1 WHERE user_id = ? AND item_id = ?")) {
                ps.setString(1, c.name);
                ps.setLong(2, key);
                ps.setLong(3, kept);
                c.check(ps.executeUpdate() == 1, "update count");
            }
            conn.commit();
            c.step = "rolled-back transaction " + where(key);
            insert(conn, key, dropped, c.name);
            conn.rollback();
            c.step = "SELECT after " + where(key);
            c.check(c.name.equals(note(conn, key, kept)), "committed row not read back");
            c.check(count(conn, key, dropped) == 0, "rolled-back row is there");
            conn.commit();
            c.present(key, kept);
            c.absent(key, dropped);
        }
    }

    // A duplicate key gives 23505 and the connection stays usable.
    static void duplicateKeyThenUsable(Case c, Connection conn) throws Exception {
        for (long key : perServer()) {
            long item = c.item();
            long after = c.item();
            c.step = "INSERT " + where(key);
            insert(conn, key, item, c.name);
            c.step = "duplicate INSERT " + where(key);
            c.expectError("23505", () -> insert(conn, key, item, c.name));
            c.step = "next INSERT " + where(key);
            insert(conn, key, after, c.name);
            c.check(c.name.equals(note(conn, key, after)), "row not read back");
            c.present(key, item, after);
        }
    }

    // Inside a transaction: 23505, then 25P02 for the next statement, then rollback recovers.
    static void transactionError25p02Rollback(Case c, Connection conn) throws Exception {
        for (long key : perServer()) {
            long existing = c.item();
            long inside = c.item();
            long after = c.item();
            conn.setAutoCommit(true);
            c.step = "setup INSERT " + where(key);
            insert(conn, key, existing, c.name);
            conn.setAutoCommit(false);
            c.step = "INSERT in transaction " + where(key);
            insert(conn, key, inside, c.name);
            c.step = "duplicate INSERT in transaction " + where(key);
            c.expectError("23505", () -> insert(conn, key, existing, c.name));
            c.step = "statement after the error " + where(key);
            c.expectError("25P02", () -> note(conn, key, existing));
            c.step = "rollback " + where(key);
            conn.rollback();
            c.step = "after rollback " + where(key);
            insert(conn, key, after, c.name);
            conn.commit();
            c.check(count(conn, key, inside) == 0, "the rolled-back row is there");
            c.check(count(conn, key, after) == 1, "the row after rollback is missing");
            conn.commit();
            c.present(key, existing, after);
            c.absent(key, inside);
        }
    }

    // --- Reads across servers (scatter-gather). Every row a scatter case writes carries the
    // case's name as its note, and its reads filter on that note: earlier cases' rows on the
    // same keys are not part of its answers.

    // Keyless: every server answers.
    static final String MARKED = "SELECT user_id, item_id FROM drv WHERE note = ? ORDER BY user_id, item_id";
    // The page starts inside one server's rows and ends in another's (6 keys of 2 rows each).
    static final int PAGE_LIMIT = 5;
    static final int PAGE_OFFSET = 3;

    static List<List<Long>> pairs(ResultSet rs) throws SQLException {
        List<List<Long>> out = new ArrayList<>();
        while (rs.next()) {
            out.add(List.of(rs.getLong(1), rs.getLong(2)));
        }
        return out;
    }

    static List<List<Long>> marked(Connection conn, String note) throws SQLException {
        try (PreparedStatement ps = conn.prepareStatement(MARKED)) {
            ps.setString(1, note);
            try (ResultSet rs = ps.executeQuery()) {
                return pairs(rs);
            }
        }
    }

    static final java.util.Comparator<List<Long>> BY_KEY_THEN_ITEM =
            java.util.Comparator.<List<Long>, Long>comparing(r -> r.get(0)).thenComparing(r -> r.get(1));

    // Aggregates with no key (count/sum/min/max, and GROUP BY/HAVING on a non-key): every
    // server answers and the proxy combines the partial results.
    static void scatterAggregateAllServers(Case c, Connection conn) throws Exception {
        List<Long> keys = spread(9);
        long count = 0;
        long sum = 0;
        int min = Integer.MAX_VALUE;
        int max = Integer.MIN_VALUE;
        Map<Integer, long[]> groups = new java.util.TreeMap<>();
        try (PreparedStatement ps = conn.prepareStatement("INSERT INTO drv (user_id, item_id, note, n) VALUES (?, ?, ?, ?)")) {
            for (int i = 0; i < keys.size(); i++) {
                long key = keys.get(i);
                long item = c.item();
                int n = 10 * i + (int) (key % 7);
                c.step = "INSERT " + where(key);
                ps.setLong(1, key);
                ps.setLong(2, item);
                ps.setString(3, c.name);
                ps.setInt(4, n);
                ps.executeUpdate();
                c.present(key, item);
                count++;
                sum += n;
                min = Math.min(min, n);
                max = Math.max(max, n);
                long[] group = groups.computeIfAbsent(n % 3, r -> new long[2]);
                group[0]++;
                group[1] += n;
            }
        }
        c.step = "count/sum/min/max over all servers";
        try (PreparedStatement ps = conn.prepareStatement("SELECT count(*), sum(n), min(n), max(n) FROM drv WHERE note = ?")) {
            ps.setString(1, c.name);
            try (ResultSet rs = ps.executeQuery()) {
                c.check(rs.next(), "no row");
                List<Long> got = List.of(rs.getLong(1), rs.getLong(2), rs.getLong(3), rs.getLong(4));
                List<Long> want = List.of(count, sum, (long) min, (long) max);
                c.check(got.equals(want), "got " + got + ", expected " + want);
                c.check(!rs.next(), "more than one row");
            }
        }
        List<List<Long>> wantGroups = new ArrayList<>();
        for (Map.Entry<Integer, long[]> g : groups.entrySet()) {
            if (g.getValue()[0] > 1) {
                wantGroups.add(List.of((long) g.getKey(), g.getValue()[0], g.getValue()[1]));
            }
        }
        c.step = "GROUP BY n % 3 HAVING over all servers";
        try (PreparedStatement ps = conn.prepareStatement(
                "SELECT n % 3, count(*), sum(n) FROM drv WHERE note = ? GROUP BY n % 3 HAVING count(*) > 1 ORDER BY n % 3")) {
            ps.setString(1, c.name);
            try (ResultSet rs = ps.executeQuery()) {
                List<List<Long>> got = new ArrayList<>();
                while (rs.next()) {
                    got.add(List.of(rs.getLong(1), rs.getLong(2), rs.getLong(3)));
                }
                c.check(got.equals(wantGroups), "got " + got + ", expected " + wantGroups);
            }
        }
    }

    // user_id = ANY(?) with an array of keys on every server (createArrayOf), ORDER BY user_id
    // DESC LIMIT OFFSET: the proxy merges the servers' sorted rows. The PreparedStatement runs
    // 6 times: from the 5th run on (prepareThreshold) it is a named server-side statement.
    static void scatterAnyOrderLimitOffset(Case c, Connection conn) throws Exception {
        List<List<Long>> rows = new ArrayList<>();
        for (long key : spread(6)) {
            for (int i = 0; i < 2; i++) {
                long item = c.item();
                c.step = "INSERT " + where(key);
                insert(conn, key, item, c.name);
                c.present(key, item);
                rows.add(List.of(key, item));
            }
        }
        Long[] keys = rows.stream().map(r -> r.get(0)).distinct().sorted().toArray(Long[]::new);
        List<List<Long>> sorted = new ArrayList<>(rows);
        sorted.sort(java.util.Comparator.<List<Long>, Long>comparing(r -> -r.get(0)).thenComparing(r -> r.get(1)));
        List<List<Long>> want = sorted.subList(PAGE_OFFSET, PAGE_OFFSET + PAGE_LIMIT);
        try (PreparedStatement ps = conn.prepareStatement(
                "SELECT user_id, item_id FROM drv WHERE user_id = ANY(?) AND note = ? "
                        + "ORDER BY user_id DESC, item_id LIMIT " + PAGE_LIMIT + " OFFSET " + PAGE_OFFSET)) {
            ps.setArray(1, conn.createArrayOf("bigint", keys));
            ps.setString(2, c.name);
            for (int run = 1; run <= 6; run++) {
                c.step = "ANY(" + Arrays.toString(keys) + ") ORDER BY LIMIT OFFSET, run " + run;
                try (ResultSet rs = ps.executeQuery()) {
                    List<List<Long>> got = pairs(rs);
                    c.check(got.equals(want), "rows " + got + ", expected " + want);
                }
            }
            c.check(ps.unwrap(org.postgresql.PGStatement.class).isUseServerPrepare(), "the SELECT never became a server-side prepared statement");
        }
    }

    // In a transaction (setAutoCommit(false), one per server): INSERT, then a read across
    // servers sees the transaction's row beside the committed ones; after rollback it no
    // longer does.
    static void scatterReadInTransaction(Case c, Connection conn) throws Exception {
        List<List<Long>> committed = new ArrayList<>();
        for (long key : perServer()) {
            long item = c.item();
            c.step = "committed INSERT " + where(key);
            insert(conn, key, item, c.name);
            c.present(key, item);
            committed.add(List.of(key, item));
        }
        committed.sort(BY_KEY_THEN_ITEM);
        conn.setAutoCommit(false);
        for (long key : perServer()) {
            long item = c.item();
            c.step = "INSERT in transaction " + where(key);
            insert(conn, key, item, c.name);
            c.step = "read across servers in the transaction of " + where(key);
            List<List<Long>> want = new ArrayList<>(committed);
            want.add(List.of(key, item));
            want.sort(BY_KEY_THEN_ITEM);
            List<List<Long>> got = marked(conn, c.name);
            c.check(got.equals(want), "rows " + got + ", expected " + want);
            c.step = "rollback " + where(key);
            conn.rollback();
            c.step = "read across servers after rollback " + where(key);
            got = marked(conn, c.name);
            conn.commit();
            c.check(got.equals(committed), "rows " + got + ", expected " + committed);
            c.absent(key, item);
        }
    }

    static final LinkedHashMap<String, Body> CASES = new LinkedHashMap<>();

    static {
        CASES.put("statement_literals", JdbcCases::statementLiterals);
        CASES.put("prepared_after_threshold", JdbcCases::preparedAfterThreshold);
        CASES.put("prepared_after_threshold_in_transaction", JdbcCases::preparedAfterThresholdInTransaction);
        CASES.put("batch_per_user", JdbcCases::batchPerUser);
        CASES.put("batch_across_servers_atomic", JdbcCases::batchAcrossServersAtomic);
        CASES.put("batch_across_servers_in_transaction", JdbcCases::batchAcrossServersInTransaction);
        CASES.put("multi_row_insert_across_servers", JdbcCases::multiRowInsertAcrossServers);
        CASES.put("routing_hints", JdbcCases::routingHints);
        CASES.put("autocommit_null_jsonb_uuid_array", JdbcCases::autocommitNullJsonbUuidArray);
        CASES.put("transaction_null_jsonb_uuid_array", JdbcCases::transactionNullJsonbUuidArray);
        CASES.put("transaction_commit_and_rollback", JdbcCases::transactionCommitAndRollback);
        CASES.put("duplicate_key_then_usable", JdbcCases::duplicateKeyThenUsable);
        CASES.put("transaction_error_25p02_rollback", JdbcCases::transactionError25p02Rollback);
        CASES.put("scatter_aggregate_all_servers", JdbcCases::scatterAggregateAllServers);
        CASES.put("scatter_any_order_limit_offset", JdbcCases::scatterAnyOrderLimitOffset);
        CASES.put("scatter_read_in_transaction", JdbcCases::scatterReadInTransaction);
    }

    public static void main(String[] args) throws Exception {
        host = args[0];
        port = args[1];
        for (String part : args[2].split(";")) {
            String[] kv = part.split("=");
            List<Long> keys = new ArrayList<>();
            for (String k : kv[1].split(",")) {
                keys.add(Long.parseLong(k));
                SERVER_OF.put(Long.parseLong(k), kv[0]);
            }
            SERVER_KEYS.put(kv[0], keys);
        }
        List<String> only = Arrays.asList(args).subList(3, args.length);
        caseTimeout = Integer.parseInt(Objects.requireNonNullElse(System.getenv("SHARDLINE_CASE_TIMEOUT"), "20"));

        Class.forName("org.postgresql.Driver");
        System.out.println("VERSION pgjdbc " + org.postgresql.util.DriverInfo.DRIVER_VERSION + " (java " + System.getProperty("java.version") + ")");
        List<String> selected = new ArrayList<>();
        for (String name : CASES.keySet()) {
            if (only.isEmpty() || only.contains(name)) {
                selected.add(name);
            }
        }
        System.out.println("PLAN " + String.join(" ", selected));
        System.out.flush();
        ExecutorService executor = Executors.newCachedThreadPool(r -> {
            Thread t = new Thread(r);
            t.setDaemon(true);
            return t;
        });
        int failed = 0;
        for (String name : selected) {
            Case c = new Case(name);
            Connection[] conn = new Connection[1];
            String error = null;
            Future<?> run = executor.submit(() -> {
                c.step = "connect";
                conn[0] = connect();
                CASES.get(name).run(c, conn[0]);
                return null;
            });
            try {
                run.get(caseTimeout + 5, TimeUnit.SECONDS);
            } catch (TimeoutException e) {
                error = "at " + c.step + ": no answer within " + caseTimeout + " s";
                run.cancel(true);
            } catch (java.util.concurrent.ExecutionException e) {
                Throwable cause = e.getCause();
                error = cause instanceof CaseFailed ? cause.getMessage() : "at " + c.step + ": " + describe(cause);
            }
            if (conn[0] != null) {
                try {
                    conn[0].abort(executor);
                } catch (SQLException ignored) {
                    // the connection is gone either way
                }
            }
            for (String note : c.notes) {
                System.out.println("NOTE " + name + ": " + note);
            }
            if (error != null) {
                failed++;
                System.out.println("CASE " + name + " FAIL " + error.replace('\n', ' '));
            } else {
                for (String e : c.expects) {
                    System.out.println("EXPECT " + name + " " + e);
                }
                System.out.println("CASE " + name + " PASS");
            }
            System.out.flush();
        }
        System.out.println("DONE");
        System.out.flush();
        System.exit(failed == 0 ? 0 : 1);
    }
}
