"""Drives `cairn shell` through a pseudo-terminal, as a person would. Run by
t19_rqlite_clients.rs: python3 shell_pty.py CAIRN_BIN URL. Prints everything the shell wrote."""

import os
import pty
import select
import sys
import time

cairn, url = sys.argv[1], sys.argv[2]
pid, fd = pty.fork()
if pid == 0:
    os.execv(cairn, [cairn, "shell", "--host", url])

out = b""


def read_until(marker, timeout=60.0):
    global out
    deadline = time.time() + timeout
    while marker.encode() not in out:
        left = deadline - time.time()
        if left <= 0:
            raise SystemExit("timed out waiting for %r; got:\n%s" % (marker, out.decode(errors="replace")))
        r, _, _ = select.select([fd], [], [], left)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk


prompt = url.split("://", 1)[1] + "> "
read_until(prompt)

def answer_to(line):
    """Sends one line and returns what the shell printed up to its next prompt."""
    global out
    before = len(out)
    os.write(fd, (line + "\n").encode())
    deadline = time.time() + 60
    while not out[before:].rstrip().endswith(prompt.rstrip().encode()) or out[before:].count(b"\n") < 1:
        if time.time() > deadline:
            raise SystemExit("no answer to %r:\n%s" % (line, out.decode(errors="replace")))
        r, _, _ = select.select([fd], [], [], 1.0)
        if r:
            out += os.read(fd, 4096)
    return out[before:].decode(errors="replace")


# Writes first; a write caught by an election (a loaded machine) is typed again, as a
# person would.
for line in [
    "CREATE TABLE sh (id INTEGER PRIMARY KEY, v TEXT)",
    "CREATE INDEX sh_v ON sh(v)",
    "INSERT INTO sh(v) VALUES('from the shell')",
]:
    for attempt in range(10):
        said = answer_to(line)
        if "ERROR" not in said or "leader" not in said:
            break
        time.sleep(1)
    assert "ERROR" not in said, said

for line, expect in [
    (".tables", "sh"),
    (".indexes", "sh_v"),
    (".timer on", prompt),
    ("SELECT v FROM sh", "Run Time"),
    (".consistency none", prompt),
    ("SELECT count(*) AS n FROM sh", prompt),
    (".leader", '"leader"'),
    (".ready", "[+]node ok"),
    (".schema", "CREATE INDEX sh_v"),
    # rqlite's output modes.
    (".mode csv", prompt),
    ("SELECT id, v AS 'the, value' FROM sh", 'id,"the, value"'),
    (".mode line", prompt),
    ("SELECT v AS line_v FROM sh", "line_v = from the shell"),
    (".mode json", prompt),
    ("SELECT v AS json_v FROM sh", '"json_v": "from the shell"'),
    (".mode", "json"),
    (".mode column", prompt),
    # History: the Up arrow brings the last line back, Enter runs it again.
    ("SELECT 'again' AS hist", "hist"),
    ("\x1b[A", "again"),
]:
    before = len(out)
    os.write(fd, (line + "\n").encode())
    # Wait for the answer, then for the next prompt.
    deadline = time.time() + 60
    while True:
        read_until(expect)
        tail = out[before:]
        if expect.encode() in tail and tail.rstrip().endswith(prompt.rstrip().encode()):
            break
        if time.time() > deadline:
            raise SystemExit("no answer to %r:\n%s" % (line, out.decode(errors="replace")))
        r, _, _ = select.select([fd], [], [], 1.0)
        if r:
            out += os.read(fd, 4096)
os.write(fd, b".exit\n")
os.waitpid(pid, 0)
sys.stdout.write(out.decode(errors="replace"))
