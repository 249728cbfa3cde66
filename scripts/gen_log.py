#!/usr/bin/env python3
"""A synthetic web-server access log of exactly N bytes on stdout (the compressible corpus of
scripts/bench_compress.sh): combined log format with addresses, times, paths, statuses, sizes,
referrers and user agents drawn from small vocabularies by a seeded generator, so every run
makes the same bytes. It compresses about as real access logs do (5-7:1)."""
import random
import sys

n = int(sys.argv[1])
rng = random.Random(18)
paths = [f"/{a}/{b}" for a in ("api/v2", "static", "images", "docs", "downloads", "user")
         for b in ("index.html", "list", "item", "search", "thumb.jpg", "app.js", "style.css",
                   "report.pdf", "archive.tar.gz", "profile")]
agents = ["Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
          "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36",
          "curl/8.5.0", "fsc/0.1.0", "Wget/1.21.3", "python-requests/2.31.0"]
refs = ["-", "https://example.org/", "https://example.org/docs/", "https://search.example.com/?q=fsd"]
methods = ["GET"] * 8 + ["POST", "HEAD"]
statuses = [200] * 12 + [206, 301, 304, 404, 500]
out = sys.stdout.buffer
written = 0
t = 1_764_633_600
buf = []
while written < n:
    t += rng.randrange(3)
    line = (f"10.{rng.randrange(4)}.{rng.randrange(256)}.{rng.randrange(256)} - - "
            f"[{t}] \"{rng.choice(methods)} {rng.choice(paths)}?id={rng.randrange(100000)} HTTP/1.1\" "
            f"{rng.choice(statuses)} {rng.randrange(200, 90000)} \"{rng.choice(refs)}\" \"{rng.choice(agents)}\"\n").encode()
    if written + len(line) > n:
        line = line[: n - written]
    buf.append(line)
    written += len(line)
    if len(buf) >= 4096:
        out.write(b"".join(buf))
        buf = []
out.write(b"".join(buf))
