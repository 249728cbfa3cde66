#!/usr/bin/env python3
"""LIST paging cost and its effect on other users (issue 13 item 8). Stdlib only.

    scripts/list_load.py FSD_BINARY [ENTRIES=200000] [PAGES=2000] [SECONDS=20] [INFLIGHT=0]

Makes a directory of ENTRIES empty files in a temporary root, starts FSD_BINARY on it
(127.0.0.1, port 0), then:
  1. one connection pages through it with LIST limit=1 for PAGES pages: the time taken;
  2. four connections page through it with limit=1 for SECONDS (INFLIGHT > 0: instead each
     keeps INFLIGHT LISTs in flight at once, after random names, as a hostile client would)
     while a fifth STATs one file every 50 ms: pages served and STAT latencies.
Build fsd with `cargo build --release` (or `--config 'profile.dev.package.fsd.opt-level=3'`).
Framing as in docs/PROTOCOL.md Appendix A."""
import random, re, shutil, socket, struct, subprocess, sys, tempfile, threading, time, zlib
from pathlib import Path

HDR = struct.Struct(">IBBHIII")
MAGIC, END, ERROR = 0x46534431, 1, 4
HELLO, AUTH, LIST, STAT = 0x01, 0x02, 0x10, 0x11
TOKEN = "list-load-token-0123456789abcdef"

def varint(n):
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n: return bytes(out)

def enc(*fields):  # (number, value): int -> varint, str -> length-delimited
    out = b""
    for num, v in fields:
        if isinstance(v, int): out += varint(num << 3) + varint(v)
        else: v = v.encode(); out += varint(num << 3 | 2) + varint(len(v)) + v
    return out

def dec(buf):  # -> {field number: [values]}; only the wire types LIST and STAT replies use
    out, i = {}, 0
    def rd():
        nonlocal i
        n = s = 0
        while True:
            b = buf[i]; i += 1; n |= (b & 0x7F) << s; s += 7
            if b < 0x80: return n
    while i < len(buf):
        key = rd(); num, wt = key >> 3, key & 7
        if wt == 0: v = rd()
        elif wt == 2: n = rd(); v = buf[i:i + n]; i += n
        else: raise ValueError("wire type %d" % wt)
        out.setdefault(num, []).append(v)
    return out

class Conn:
    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port)); self.f = self.s.makefile("rb")
        self.call(HELLO, 0, enc((1, 1), (2, 16 << 20), (5, "list_load")))
        self.call(AUTH, 1, enc((1, TOKEN)))
    def send(self, cmd, sid, payload):
        self.s.sendall(HDR.pack(MAGIC, 1, END, cmd, sid, len(payload), zlib.crc32(payload)) + payload)
    def recv(self):
        magic, ver, flags, cmd, sid, n, crc = HDR.unpack(self.f.read(HDR.size))
        payload = self.f.read(n)
        if flags & ERROR: raise RuntimeError(dec(payload))
        return dec(payload)
    def call(self, cmd, sid, payload):
        self.send(cmd, sid, payload); return self.recv()
    def page(self, after):
        r = self.call(LIST, 1, enc((1, "big"), (2, after), (3, 1)))
        return [dec(e)[1][0].decode() for e in r.get(1, [])], bool(r.get(2, [0])[0])

def load(port, entries, pages, seconds, inflight):
    c, after, t = Conn(port), "", time.monotonic()
    for _ in range(pages):
        names, more = c.page(after)
        assert len(names) == 1 and names[0] > after and more
        after = names[0]
    print("one client, %d pages of 1: %.2f s" % (pages, time.monotonic() - t))

    stop, served = time.monotonic() + seconds, [0] * 4
    def pager(k):
        c, after = Conn(port), ""
        while time.monotonic() < stop:
            if inflight:
                for sid in range(1, inflight + 1):
                    c.send(LIST, sid, enc((1, "big"), (2, "f%06d" % random.randrange(entries)), (3, 1)))
                for _ in range(inflight): c.recv()
                served[k] += inflight
            else:
                names, more = c.page(after)
                after = names[-1] if more and names else ""
                served[k] += 1
    threads = [threading.Thread(target=pager, args=(k,)) for k in range(4)]
    for th in threads: th.start()
    s, lat = Conn(port), []
    while time.monotonic() < stop:
        t = time.monotonic(); s.call(STAT, 1, enc((1, "big/f000001"))); lat.append(time.monotonic() - t)
        time.sleep(0.05)
    for th in threads: th.join()
    lat.sort()
    print("4 clients (%s) for %d s: %d LISTs; another client's STAT: %d calls, median %.1f ms, max %.1f ms"
          % ("%d LISTs in flight each" % inflight if inflight else "paging", seconds, sum(served),
             len(lat), 1000 * lat[len(lat) // 2], 1000 * lat[-1]))

def main(fsd, entries=200000, pages=2000, seconds=20, inflight=0):
    entries, pages, seconds, inflight = int(entries), int(pages), int(seconds), int(inflight)
    tmp = Path(tempfile.mkdtemp(prefix="list_load."))
    try:
        (tmp / "big").mkdir()
        for i in range(entries): (tmp / "big" / ("f%06d" % i)).touch()
        time.sleep(2.1)  # older than fsd's RACY: a directory changed just now gets no cursor
        err = open(tmp / "fsd.err", "w+")
        p = subprocess.Popen([fsd, "--root", str(tmp), "--listen", "127.0.0.1:0", "--token", TOKEN],
                             stderr=err)
        try:
            for _ in range(100):
                m = re.search(r"listening on 127\.0\.0\.1:(\d+)", (tmp / "fsd.err").read_text())
                if m: break
                time.sleep(0.1)
            load(int(m.group(1)), entries, pages, seconds, inflight)
        finally:
            p.terminate(); p.wait()
    finally:
        shutil.rmtree(tmp)

if __name__ == "__main__":
    main(*sys.argv[1:])
