"""rqdb (an rqlite client from PyPI, sync and asyncio) against a Cairn node, unchanged. Run by
t19_rqlite_clients.rs: python3 rqdb_client.py HOST:PORT PREFIX. Prints one "OK ..." line per
check that passed; any failure raises."""

import asyncio
import io
import sqlite3
import sys
import time
import tempfile

import rqdb
from rqdb.errors import DBError

host, prefix = sys.argv[1], sys.argv[2]
t = prefix + "_items"

conn = rqdb.connect([host], log=False)
cur = conn.cursor()
cur.execute(f"CREATE TABLE {t} (id INTEGER PRIMARY KEY, name TEXT, n INTEGER)")
r = cur.execute(f"INSERT INTO {t}(name, n) VALUES(?, ?)", ("alpha", 1))
assert cur.rows_affected == 1 and cur.last_insert_id == 1, (cur.rows_affected, cur.last_insert_id)
# executemany3: several statements with their parameters in one transaction.
bulk = cur.executemany3(
    (
        (f"INSERT INTO {t}(name, n) VALUES(?, ?)", ("beta", 2)),
        (f"INSERT INTO {t}(name, n) VALUES(?, ?)", ("gamma", 3)),
    )
)
assert [x.last_insert_id for x in bulk.items] == [2, 3], bulk
print("OK writes")

want = [["alpha", 1], ["beta", 2], ["gamma", 3]]
for level in ("none", "weak", "strong"):
    res = cur.execute(f"SELECT name, n FROM {t} ORDER BY id", read_consistency=level)
    # `none` reads this node's copy as it is: a follower may not have applied the last
    # write yet (rqlite's semantics too), so it may take a moment to catch up.
    deadline = time.time() + 10
    while level == "none" and res.results != want and time.time() < deadline:
        time.sleep(0.05)
        res = cur.execute(f"SELECT name, n FROM {t} ORDER BY id", read_consistency=level)
    assert res.results == want, (level, res.results)
    assert cur.fetchone() == ["alpha", 1]
print("OK reads at none, weak, strong")

# A failed statement raises; a transaction with one rolls back entirely.
try:
    cur.execute(f"INSERT INTO {t}(nope) VALUES(1)")
    raise SystemExit("no error for a bad column")
except DBError as e:
    assert "nope" in str(e), e
try:
    cur.executemany3(
        (
            (f"INSERT INTO {t}(name, n) VALUES(?, ?)", ("delta", 4)),
            (f"INSERT INTO {t}(nope) VALUES(?)", (1,)),
        ),
        transaction=True,
    )
    raise SystemExit("no error for a bad transaction")
except DBError:
    pass
n = cur.execute(f"SELECT count(*) FROM {t}", read_consistency="strong").results[0][0]
assert n == 3, n
print("OK errors and transaction rollback")

# EXPLAIN QUERY PLAN through rqdb's explain helper.
plan = io.BytesIO()
cur.explain(f"SELECT * FROM {t} WHERE id = ?", (1,), out=plan)
assert b"SEARCH" in plan.getvalue() or b"USING" in plan.getvalue(), plan.getvalue()
print("OK explain")

# Backups from the leader: a SQLite file Python's sqlite3 reads, and a SQL dump.
raw = io.BytesIO()
conn.backup(raw)
with tempfile.NamedTemporaryFile(suffix=".db") as f:
    f.write(raw.getvalue())
    f.flush()
    rows = sqlite3.connect(f.name).execute(f"SELECT name FROM {t} ORDER BY id").fetchall()
assert [r[0] for r in rows] == ["alpha", "beta", "gamma"], rows
dump = io.BytesIO()
conn.backup(dump, raw=True)
assert f"CREATE TABLE {t}".encode() in dump.getvalue(), dump.getvalue()[:200]
print("OK backups")


async def run_async():
    aconn = rqdb.connect_async([host], log=False)
    async with aconn:
        acur = aconn.cursor()
        await acur.execute(f"INSERT INTO {t}(name, n) VALUES(?, ?)", ("async", 5))
        assert acur.last_insert_id == 4, acur.last_insert_id
        res = await acur.execute(f"SELECT name FROM {t} WHERE n = ?", (5,), read_consistency="weak")
        assert res.results == [["async"]], res.results


asyncio.run(run_async())
print("OK async")
