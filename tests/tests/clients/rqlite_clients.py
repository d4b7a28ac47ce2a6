"""rqlite's Python clients against one Cairn node: pyrqlite (DB-API, queued writes included)
and SQLAlchemy's rqlite dialect (ORM session, table reflection). Run by t19_rqlite_clients.rs:

    python3 rqlite_clients.py HOST PORT PREFIX

Prints one `OK <check>` line per check; any failure raises (non-zero exit)."""

import sys

import pyrqlite.dbapi2 as dbapi

host, port, prefix = sys.argv[1], int(sys.argv[2]), sys.argv[3]
t = prefix + "_people"


def ok(what):
    print("OK", what, flush=True)


# --- pyrqlite -------------------------------------------------------------------------------
conn = dbapi.connect(host=host, port=port)
cur = conn.cursor()
cur.execute("CREATE TABLE %s (id INTEGER PRIMARY KEY, name TEXT, age INTEGER, score REAL, pic BLOB)" % t)
assert cur.rowcount == 0, cur.rowcount
cur.execute("INSERT INTO %s(name, age, score) VALUES(?, ?, ?)" % t, ("fiona", 20, 1.5))
assert cur.lastrowid == 1, cur.lastrowid
cur.execute("INSERT INTO %s(name, age, score) VALUES(:n, :a, :s)" % t, {"n": "sinead", "a": 30, "s": 2.0})
assert cur.lastrowid == 2, cur.lastrowid
cur.executemany("INSERT INTO %s(name, age) VALUES(?, ?)" % t, [("a", 1), ("b", 2), ("c", 3)])
assert cur.rowcount == 3, cur.rowcount
cur.execute("UPDATE %s SET age = age + 1 WHERE age < 10" % t)
assert cur.rowcount == 3, cur.rowcount
cur.execute("SELECT id, name, age, score FROM %s WHERE name = ?" % t, ("sinead",))
row = cur.fetchone()
assert tuple(row) == (2, "sinead", 30, 2.0), row
assert [d[0] for d in cur.description] == ["id", "name", "age", "score"], cur.description
cur.execute("SELECT count(*) FROM %s" % t)
assert cur.fetchone()[0] == 5
ok("pyrqlite execute/query/params/rowcount/lastrowid")

# Queued writes: answered at once; with wait, once committed.
for i in range(20):
    cur.execute("INSERT INTO %s(name, age) VALUES(?, ?)" % t, ("queued%d" % i, i), queue=True)
cur.execute("INSERT INTO %s(name, age) VALUES(?, ?)" % t, ("waited", 99), queue=True, wait=True)
cur.execute("SELECT count(*) FROM %s WHERE name LIKE 'queued%%' OR name = 'waited'" % t)
n = cur.fetchone()[0]
assert n == 21, n
ok("pyrqlite queue=True and wait=True")

cur.execute("SELECT name FROM %s WHERE id = 1" % t, consistency="strong")
assert cur.fetchone()[0] == "fiona"
cur.execute("SELECT name FROM %s WHERE id = 1" % t, consistency="none")
ok("pyrqlite consistency levels")

try:
    cur.execute("INSERT INTO nonexistent_table VALUES(1)")
    raise AssertionError("no error for a missing table")
except dbapi.Error as e:
    assert "no such table" in str(e), e
ok("pyrqlite errors")
conn.close()

# --- SQLAlchemy (rqlite dialect) -------------------------------------------------------------
import sqlalchemy as sa
from sqlalchemy import inspect
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

engine = sa.create_engine("rqlite+pyrqlite://%s:%d/" % (host, port))


class Base(DeclarativeBase):
    pass


class Sensor(Base):
    __tablename__ = prefix + "_sensors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(40), unique=True)
    reading: Mapped[float] = mapped_column(sa.Float, nullable=True)


Base.metadata.create_all(engine)
with Session(engine) as s:
    s.add_all([Sensor(name="north", reading=1.25), Sensor(name="south", reading=-3.5)])
    s.commit()
with Session(engine) as s:
    north = s.scalars(sa.select(Sensor).where(Sensor.name == "north")).one()
    assert north.reading == 1.25, north.reading
    north.reading = 7.0
    north_id = north.id
    s.commit()
with Session(engine) as s:
    assert s.get(Sensor, north_id).reading == 7.0
    s.delete(s.scalars(sa.select(Sensor).where(Sensor.name == "south")).one())
    s.commit()
    assert s.scalar(sa.select(sa.func.count()).select_from(Sensor)) == 1
ok("sqlalchemy ORM session")

# sqlalchemy-rqlite 2.0 leaves the dialect's server_version_info unset (None), which the
# SQLite dialect's column reflection compares with (3, 31) since SQLAlchemy 2.0: a client bug
# that fails against rqlite too. pysqlite's dialect takes it from its driver; so does this.
engine.dialect.server_version_info = tuple(dbapi.sqlite_version_info)
insp = inspect(engine)
names = insp.get_table_names()
assert Sensor.__tablename__ in names and t in names, names
cols = {c["name"]: c for c in insp.get_columns(Sensor.__tablename__)}
assert set(cols) == {"id", "name", "reading"}, cols
assert insp.get_pk_constraint(Sensor.__tablename__)["constrained_columns"] == ["id"]
people = sa.Table(t, sa.MetaData(), autoload_with=engine)
assert [c.name for c in people.columns] == ["id", "name", "age", "score", "pic"]
with engine.connect() as c:
    got = c.execute(sa.select(people.c.name).where(people.c.id == 1)).scalar_one()
    assert got == "fiona", got
ok("sqlalchemy reflection")
