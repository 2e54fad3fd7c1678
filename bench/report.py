"""The benchmark's table: metrics, statistics, targets from issue 5, Markdown.

`Results` collects raw values per (path, metric), one per run; `render()`
turns them into one Markdown table (aligned, so it reads in a terminal
too): rows are metrics, columns are the paths, the ratio pipe2me / ssh -R,
and the target with ✓ (met), ✗ (missed) or ? (not measurable in this run).
Cells show the median and, over several runs, the spread (min–max).

Python 3.8+, stdlib only. Importing this module has no side effects.
"""
import math
import statistics

MB = 1000 * 1000
MiB = 1024 * 1024
GiB = 1024 * MiB
PATH_ORDER = ["pipe2me", "ssh", "ssh-aes", "direct"]
PATH_LABELS = {"pipe2me": "pipe2me", "ssh": "ssh -R",
               "ssh-aes": "ssh -R aes128-gcm", "direct": "direct"}


# =====================================================================
# RESULTS — raw values per path and metric
# =====================================================================

class Results:
    def __init__(self):
        self.values = {}         # (path, key) -> [value per run]
        self.errors = []         # "path: metric: message"
        self.unavailable = {}    # path -> reason it was not measured

    def add(self, path, key, value):
        self.values.setdefault((path, key), []).append(value)

    def get(self, path, key):
        return self.values.get((path, key), [])

    def median(self, path, key):
        values = self.get(path, key)
        return statistics.median(values) if values else None

    def failed(self, path, key):
        prefix = "%s: %s:" % (path, key)
        return any(e.startswith(prefix) for e in self.errors)


def percentile(samples, fraction):
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(fraction * len(ordered) - 1e-9))
    return ordered[min(rank, len(ordered)) - 1]


# =====================================================================
# METRICS — rows of the table, their format and their target
# =====================================================================

def _rate(v):
    return "{:,.0f}".format(v)


def _micro(v):
    return "{:,.0f}".format(v)


def _secs(v):
    return "{:.2f}".format(v)


def _mib(v):
    return "{:.1f}".format(v)


def _count(v):
    return "{:,.0f}".format(v)


class Metric:
    """One row. `check(med)` gets {path: median} and says True/False/None."""

    def __init__(self, key, label, fmt, target="", check=None):
        self.key = key
        self.label = label
        self.fmt = fmt
        self.target = target
        self.check = check


def _ratio_check(op, factor, peer="ssh"):
    def check(med):
        p, s = med.get("pipe2me"), med.get(peer)
        if p is None or s is None or s == 0:
            return None
        return p >= factor * s if op == ">=" else p <= factor * s
    return check


def _throughput_check(med):
    a = _ratio_check(">=", 2.0)(med)
    b = _ratio_check(">=", 1.2, "ssh-aes")(med)
    if a is False or b is False:
        return False
    return None if a is None or b is None else True


def _absolute_check(op, bound):
    def check(med):
        p = med.get("pipe2me")
        if p is None:
            return None
        return p >= bound if op == ">=" else p <= bound
    return check


def make_metrics(small_burst, large_burst):
    tput = "≥ 2× ssh -R and ≥ 1.2× aes128-gcm"
    return [
        Metric("up", "1 stream up (consumer → service), MB/s", _rate, tput, _throughput_check),
        Metric("down", "1 stream down (service → consumer), MB/s", _rate, tput, _throughput_check),
        Metric("both", "1 stream both ways at once (sum), MB/s", _rate),
        Metric("par8", "8 streams down, aggregate MB/s", _rate, "≥ 2× ssh -R", _ratio_check(">=", 2.0)),
        Metric("rtt_p50", "round trip 64 B, p50 µs", _micro, "≤ 1.2× ssh -R", _ratio_check("<=", 1.2)),
        Metric("rtt_p99", "round trip 64 B, p99 µs", _micro),
        Metric("setup_p50", "stream setup back to back, p50 µs", _micro, "≤ 1× ssh -R", _ratio_check("<=", 1.0)),
        Metric("setup_p99", "stream setup back to back, p99 µs", _micro),
        Metric("spaced_p50", "stream setup 50 ms apart, p50 µs", _micro, "≤ 1× ssh -R", _ratio_check("<=", 1.0)),
        Metric("spaced_p99", "stream setup 50 ms apart, p99 µs", _micro),
        Metric("burst1_ok", "{:,} concurrent streams: succeeded".format(small_burst), _count,
               "all {:,}".format(small_burst), _absolute_check(">=", small_burst)),
        Metric("burst1_s", "{:,} concurrent streams: total s".format(small_burst), _secs),
        Metric("burst2_ok", "{:,} concurrent streams: succeeded".format(large_burst), _count,
               "all {:,}".format(large_burst), _absolute_check(">=", large_burst)),
        Metric("burst2_s", "{:,} concurrent streams: total s".format(large_burst), _secs),
        Metric("rss_idle", "relay RSS idle, MiB", _mib),
        Metric("rss_busy", "relay RSS, {:,} idle streams, MiB".format(small_burst), _mib,
               "≤ 0.6× ssh -R", _ratio_check("<=", 0.6)),
        Metric("pss_idle", "relay PSS idle, MiB", _mib),
        Metric("pss_busy", "relay PSS, {:,} idle streams, MiB".format(small_burst), _mib),
        Metric("pod_rss_idle", "pod RSS idle (ssh: client), MiB", _mib,
               "≤ 20 MB", _absolute_check("<=", 20 * MB / MiB)),
        Metric("cpu_up", "relay CPU s per GiB, up", _secs, "≤ 0.6× ssh -R", _ratio_check("<=", 0.6)),
        Metric("cpu_down", "relay CPU s per GiB, down", _secs, "≤ 0.6× ssh -R", _ratio_check("<=", 0.6)),
        Metric("delay_down", "1 stream down, +20 ms RTT pod↔server, MB/s", _rate,
               "≥ 50 MB/s", _absolute_check(">=", 50)),
        Metric("delay_up", "1 stream up, +20 ms RTT pod↔server, MB/s", _rate,
               "≥ 50 MB/s", _absolute_check(">=", 50)),
    ]


# =====================================================================
# TABLE — cells, ratio, target mark, Markdown rendering
# =====================================================================

def cell(results, path, metric):
    if path in results.unavailable:
        return "n/a"
    values = results.get(path, metric.key)
    if not values:
        return "err" if results.failed(path, metric.key) else "–"
    text = metric.fmt(statistics.median(values))
    low, high = min(values), max(values)
    if len(values) > 1 and metric.fmt(low) != metric.fmt(high):
        text += " (%s–%s)" % (metric.fmt(low), metric.fmt(high))
    return text


def ratio_cell(results, metric):
    p, s = results.median("pipe2me", metric.key), results.median("ssh", metric.key)
    if p is None or s is None or s == 0:
        return "–"
    return "{:.2f}×".format(p / s)


def target_cell(results, metric, paths):
    if not metric.target:
        return ""
    medians = {p: results.median(p, metric.key) for p in paths}
    medians = {p: v for p, v in medians.items() if v is not None}
    verdict = metric.check(medians) if metric.check else None
    mark = {True: "✓", False: "✗", None: "?"}[verdict]
    return "%s %s" % (metric.target, mark)


def render(results, metrics, paths):
    """The Markdown table as a string, columns padded to line up."""
    paths = [p for p in PATH_ORDER if p in paths]
    header = ["metric"] + [PATH_LABELS[p] for p in paths]
    with_ratio = "pipe2me" in paths and "ssh" in paths
    if with_ratio:
        header.append("pipe2me / ssh -R")
    header.append("target (issue 5)")
    rows = []
    for metric in metrics:
        row = [metric.label] + [cell(results, p, metric) for p in paths]
        if with_ratio:
            row.append(ratio_cell(results, metric))
        row.append(target_cell(results, metric, paths))
        rows.append(row)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)
