# Summarizes bench.sh's raw results (TSV) into medians and a Markdown table.
# Input columns: case label tool run ok wall_us ccpu_ms crss_kb scpu_ms srss_kb bytes files extra
#   other_ms (CPU used by the rest of the machine during the run)
# Writes the summary TSV to `sumfile`:
#   case label tool n_ok n_fail wall_us ccpu_ms crss_kb scpu_ms srss_kb bytes files
# (medians of wall and CPU over the successful runs; RSS is the largest peak seen), and prints
# the Markdown table on stdout. In each (case, label) group the tools whose name starts with
# "fsc" get their ratio to every other tool of the group; a group of fsc tools only (-j runs)
# is compared with its "-j 1" tool (else its first). mawk-compatible (no asort).
BEGIN { FS = "\t"; OFS = "\t" }

function median(key,    n, i, j, t, v) {
  n = cnt[key]
  if (n == 0) return -1
  for (i = 1; i <= n; i++) v[i] = vals[key, i]
  for (i = 2; i <= n; i++) {
    t = v[i]
    for (j = i - 1; j >= 1 && v[j] > t; j--) v[j + 1] = v[j]
    v[j + 1] = t
  }
  if (n % 2) return v[(n + 1) / 2]
  return (v[n / 2] + v[n / 2 + 1]) / 2
}

function push(key, x) { cnt[key]++; vals[key, cnt[key]] = x }

function fmt_s(us) { return (us < 0) ? "—" : sprintf("%.3f", us / 1e6) }

function rate(g, us,    b, f) {
  b = bytes[g]; f = files[g]
  if (us <= 0) return "—"
  if (f > 1 && b / f < 1048576) return sprintf("%.0f files/s", f / (us / 1e6))
  return sprintf("%.0f MB/s", b / (us / 1e6) / 1e6)
}

{
  g = $1 SUBSEP $2 SUBSEP $3
  if (!(g in seen)) {
    seen[g] = 1; ng++; order[ng] = g
    gk = $1 SUBSEP $2
    if (!(gk in gseen)) { gseen[gk] = 1 }
    ntools[gk]++; tool_at[gk, ntools[gk]] = $3
  }
  bytes[g] = $11; files[g] = $12
  if ($5 == 1) {
    ok[g]++
    push(g SUBSEP "wall", $6); push(g SUBSEP "ccpu", $7); push(g SUBSEP "scpu", $9); push(g SUBSEP "other", $14 + 0)
    if ($8 > crss[g]) crss[g] = $8
    if ($10 > srss[g]) srss[g] = $10
  } else {
    bad[g]++
  }
}

END {
  print "| case | what | tool | runs | median s | rate | fsc ÷ other | client CPU s | client peak RSS MiB | server CPU s | server peak RSS MiB | rest of machine CPU s (kernel threads, other users) |"
  print "|---|---|---|---|---|---|---|---|---|---|---|---|"
  for (i = 1; i <= ng; i++) {
    g = order[i]
    split(g, p, SUBSEP)
    w = median(g SUBSEP "wall"); med[g] = w
  }
  for (i = 1; i <= ng; i++) {
    g = order[i]
    split(g, p, SUBSEP)
    gk = p[1] SUBSEP p[2]
    w = med[g]
    cc = median(g SUBSEP "ccpu"); sc = median(g SUBSEP "scpu"); oc = median(g SUBSEP "other")
    runs = (ok[g] + 0) ""
    if (bad[g] > 0) runs = runs " (+" bad[g] " failed)"
    ratio = ""
    if (p[3] ~ /^fsc/ && w > 0) {
      anchors = 0
      for (k = 1; k <= ntools[gk]; k++) if (tool_at[gk, k] !~ /^fsc/) anchors++
      base = tool_at[gk, 1]
      for (k = 1; k <= ntools[gk]; k++) if (tool_at[gk, k] ~ /-j 1$/) base = tool_at[gk, k]
      for (k = 1; k <= ntools[gk]; k++) {
        t = tool_at[gk, k]
        if (t == p[3]) continue
        if (anchors > 0 && t ~ /^fsc/) continue
        if (anchors == 0 && t != base) continue
        o = med[gk SUBSEP t]
        if (o > 0) ratio = ratio (ratio == "" ? "" : "; ") sprintf("%.2f× %s", w / o, t)
      }
    }
    printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", p[1], p[2], p[3], runs,
      fmt_s(w), rate(g, w), ratio,
      (cc < 0 ? "—" : sprintf("%.2f", cc / 1000)), (crss[g] > 0 ? sprintf("%.1f", crss[g] / 1024) : "—"),
      (sc < 0 ? "—" : sprintf("%.2f", sc / 1000)), (srss[g] > 0 ? sprintf("%.1f", srss[g] / 1024) : "—"),
      (oc < 0 ? "—" : sprintf("%.2f", oc / 1000))
    if (sumfile != "")
      print p[1], p[2], p[3], ok[g] + 0, bad[g] + 0, w, cc, crss[g] + 0, sc, srss[g] + 0, bytes[g], files[g] > sumfile
  }
}
