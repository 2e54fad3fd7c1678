#!/usr/bin/env python3
"""pipe2me benchmark: pipe2me vs ssh -R vs direct, on loopback, one command.

Usage:
    python3 bench/run.py                 # full run: 3 runs, 1 GiB transfers
    python3 bench/run.py --quick         # seconds-long smoke run (CI)
    python3 bench/run.py --runs 5 --size 256MiB --only pipe2me,ssh
    python3 bench/run.py --install       # apt-get install openssh-server if sshd is missing

It starts, all on 127.0.0.1 with free ports: an echo/sink service
(echo_service.py); a private sshd with throwaway keys in a temporary
directory plus `ssh -N -R` (default cipher, and aes128-gcm@openssh.com);
a pipe2me server and pod in their default, secure configuration; and, for
the added-latency rows, delay_relay.py between pod and server. The table
goes to stdout and to bench/results/latest.md; progress goes to stderr.
Every process started is stopped by PID at the end, also on Ctrl-C, and
the temporary directory is removed (--keep-temp keeps it, with all logs).

Sections: SETTINGS → MEASUREMENTS → PHASES → OUTPUT → CLI.
Exit codes: 0 table complete, 1 a measurement or an available path failed,
2 usage, 130 interrupted. Python 3.8+, stdlib only.
"""
import argparse
import datetime
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import loadgen  # noqa: E402
import peers  # noqa: E402
import report  # noqa: E402

ALL_PATHS = ["pipe2me", "ssh", "ssh-aes", "direct"]
RESULTS_FILE = os.path.join(peers.BENCH_DIR, "results", "latest.md")
SETTLE_TIMEOUT_S = 30.0
SETTLE_SLACK_FDS = 16


# =====================================================================
# SETTINGS — what one run measures, full or quick
# =====================================================================

class Settings:
    """Sizes and counts; --quick shrinks everything to seconds."""

    def __init__(self, args):
        quick = args.quick
        self.quick = quick
        self.runs = args.runs if args.runs is not None else (1 if quick else 3)
        self.size = args.size if args.size is not None else (
            32 * report.MiB if quick else report.GiB)
        self.delay_size = min(self.size, 8 * report.MiB if quick else 256 * report.MiB)
        self.delay_ms = args.delay_ms
        self.rtt_count = 200 if quick else 5000
        self.setup_count = 20 if quick else 200
        self.spaced_count = 10 if quick else 100
        self.burst_small = 100 if quick else 1000
        self.burst_large = 500 if quick else 5000
        self.burst_timeout_s = 20.0 if quick else 30.0
        self.streams = 8
        self.transfer_timeout_s = 60.0 + self.size / (2 * report.MB)


def parse_size(text):
    match = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B?|B)?\s*$", text, re.I)
    if not match:
        raise argparse.ArgumentTypeError("size like 1GiB, 256MiB or 1000000: %r" % text)
    unit = (match.group(2) or "B").upper().rstrip("B").replace("I", "")
    factor = {"": 1, "K": 1024, "M": report.MiB, "G": report.GiB}[unit]
    value = int(float(match.group(1)) * factor)
    if value < 1024 * 1024:
        raise argparse.ArgumentTypeError("size must be at least 1 MiB")
    return value


def parse_only(text):
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL_PATHS]
    if unknown or not names:
        raise argparse.ArgumentTypeError("--only takes a comma list of %s; got %r"
                                         % (",".join(ALL_PATHS), text))
    return names


# =====================================================================
# MEASUREMENTS — one function per group of rows; each adds to Results
# =====================================================================

def log(message):
    print("bench: %s" % message, file=sys.stderr, flush=True)


def attempt(results, path, keys, fn, *args):
    """Run one measurement; on failure record the error for `keys`."""
    try:
        path.check_alive()
        return fn(*args)
    except (loadgen.LoadError, peers.BenchError, OSError) as exc:
        message = str(exc) or exc.__class__.__name__
        for key in keys:
            results.errors.append("%s: %s: %s" % (path.name, key, message))
        log("%s: %s failed: %s" % (path.name, "/".join(keys), message))
        return None


def measure_throughput(results, path, s):
    for key, up, down in (("up", s.size, 0), ("down", 0, s.size)):
        pids = path.relay_pids()
        cpu_before = peers.cpu_seconds(pids)
        seconds = loadgen.transfer(path.port, up, down, s.transfer_timeout_s)
        cpu_after = peers.cpu_seconds(path.relay_pids())
        results.add(path.name, key, s.size / seconds / report.MB)
        if pids:
            gib = s.size / report.GiB
            results.add(path.name, "cpu_" + key, (cpu_after - cpu_before) / gib)
    seconds = loadgen.transfer(path.port, s.size, s.size, s.transfer_timeout_s)
    results.add(path.name, "both", 2 * s.size / seconds / report.MB)


def measure_parallel(results, path, s):
    seconds = loadgen.parallel_download(path.port, s.streams, s.size, s.transfer_timeout_s)
    results.add(path.name, "par8", s.size / seconds / report.MB)


def measure_round_trip(results, path, s):
    samples = loadgen.round_trips(path.port, s.rtt_count)
    results.add(path.name, "rtt_p50", statistics.median(samples) / 1000)
    results.add(path.name, "rtt_p99", report.percentile(samples, 0.99) / 1000)


def measure_setup(results, path, s):
    samples = loadgen.stream_setups(path.port, s.setup_count)
    results.add(path.name, "setup_p50", statistics.median(samples) / 1000)
    results.add(path.name, "setup_p99", report.percentile(samples, 0.99) / 1000)
    samples = loadgen.stream_setups(path.port, s.spaced_count, spacing_s=0.05)
    results.add(path.name, "spaced_p50", statistics.median(samples) / 1000)
    results.add(path.name, "spaced_p99", report.percentile(samples, 0.99) / 1000)


def measure_burst(results, path, s, count, prefix, service, idle_fds):
    with loadgen.Burst(path.port, count, s.burst_timeout_s) as burst:
        burst.run()
        results.add(path.name, prefix + "_ok", burst.ok)
        results.add(path.name, prefix + "_s", burst.seconds)
        pids = path.relay_pids()
        if prefix == "burst1" and pids:
            rss, pss = peers.memory_bytes(pids)
            results.add(path.name, "rss_busy", rss / report.MiB)
            results.add(path.name, "pss_busy", pss / report.MiB)
    if burst.ok < count:
        log("%s: %d of %d concurrent streams failed" % (path.name, count - burst.ok, count))
    wait_settled(path, service, idle_fds)


def measure_idle_memory(results, path):
    pids = path.relay_pids()
    if not pids:
        return
    rss, pss = peers.memory_bytes(pids)
    results.add(path.name, "rss_idle", rss / report.MiB)
    results.add(path.name, "pss_idle", pss / report.MiB)
    pod_rss, _pss = peers.memory_bytes(path.pod_pids())
    results.add(path.name, "pod_rss_idle", pod_rss / report.MiB)


def idle_fd_counts(path, service):
    return (peers.fd_count(path.relay_pids()), peers.fd_count(service.tree()))


def wait_settled(path, service, idle_fds):
    """Wait until relay and service are back to their idle descriptors."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:
        now = idle_fd_counts(path, service)
        if all(n <= idle + SETTLE_SLACK_FDS for n, idle in zip(now, idle_fds)):
            return
        time.sleep(0.05)
    log("%s: descriptors did not settle within %.0f s (idle %s, now %s)"
        % (path.name, SETTLE_TIMEOUT_S, idle_fds, idle_fd_counts(path, service)))


def measure_delay(results, path, s):
    for key, up, down in (("delay_down", 0, s.delay_size), ("delay_up", s.delay_size, 0)):
        seconds = loadgen.transfer(path.port, up, down, 60.0 + s.delay_size / (5 * report.MB))
        results.add(path.name, key, s.delay_size / seconds / report.MB)


# =====================================================================
# PHASES — start the paths, run every measurement, the delayed rows
# =====================================================================

def start_paths(names, group, work_dir, service_port, results, install):
    """Start each requested path; unavailable ones are noted, not fatal."""
    paths = []
    for name in names:
        if name == "direct":
            paths.append(peers.DirectPath(service_port))
            continue
        reason = (peers.pipe2me_missing_reason() if name == "pipe2me"
                  else peers.sshd_missing_reason(install))
        if reason:
            results.unavailable[name] = reason
            log("%s: skipped: %s" % (name, reason))
            continue
        log("%s: starting" % name)
        try:
            if name == "pipe2me":
                paths.append(peers.Pipe2mePath(group, work_dir, service_port))
            else:
                cipher = peers.AES_CIPHER if name == "ssh-aes" else None
                paths.append(peers.SshPath(group, work_dir, service_port, cipher))
        except (peers.BenchError, OSError) as exc:
            results.errors.append("%s: start: %s" % (name, exc))
            results.unavailable[name] = "failed to start: %s" % exc
            log("%s: failed to start: %s" % (name, exc))
    return paths


def run_once(results, path, s, service, idle_fds):
    steps = [
        (["up", "down", "both", "cpu_up", "cpu_down"], measure_throughput, ()),
        (["par8"], measure_parallel, ()),
        (["rtt_p50", "rtt_p99"], measure_round_trip, ()),
        (["setup_p50", "setup_p99", "spaced_p50", "spaced_p99"], measure_setup, ()),
        (["burst1_ok", "burst1_s", "rss_busy", "pss_busy"], measure_burst,
         (s.burst_small, "burst1", service, idle_fds)),
    ]
    for keys, fn, extra in steps:
        attempt(results, path, keys, fn, results, path, s, *extra)


def run_large_bursts(results, paths, s, service, idle_fds):
    """After every memory figure: a large burst leaves a relay's heap grown."""
    for run in range(s.runs):
        for path in paths:
            log("run %d/%d: %s, %d concurrent streams" % (run + 1, s.runs, path.name, s.burst_large))
            attempt(results, path, ["burst2_ok", "burst2_s"], measure_burst,
                    results, path, s, s.burst_large, "burst2", service, idle_fds[path.name])


def run_delayed(results, paths, s, group):
    """Second phase: route pod↔server through delay_relay.py and measure."""
    for path in paths:
        if path.name == "direct":
            continue
        log("%s: adding %g ms each way between pod and server" % (path.name, s.delay_ms))
        keys = ["delay_down", "delay_up"]
        if attempt(results, path, keys, enable_delay, path, s, group) is None:
            continue
        for run in range(s.runs):
            attempt(results, path, keys, measure_delay, results, path, s)


def enable_delay(path, s, group):
    """Switch the path to the delay relay and prove the delay is there."""
    note = path.enable_delay(group, s.delay_ms)
    rtt_us = statistics.median(loadgen.round_trips(path.port, 10, warmup=2)) / 1000
    if rtt_us < 0.8 * 2 * s.delay_ms * 1000:
        raise peers.BenchError(
            "round trip is %.0f µs: the pod does not go through the delay relay%s"
            % (rtt_us, " (%s)" % note if note else ""))
    log("%s: round trip through the delay relay %.1f ms" % (path.name, rtt_us / 1000))
    return True


def run_all(args, settings, results, group, work_dir):
    service, service_port = peers.start_service(group)
    log("service on 127.0.0.1:%d" % service_port)
    paths = start_paths(args.only, group, work_dir, service_port, results, args.install)
    idle_fds = {}
    for path in paths:
        measure_idle_memory(results, path)
        idle_fds[path.name] = idle_fd_counts(path, service)
    for run in range(settings.runs):
        for path in paths:
            log("run %d/%d: %s (port %d)" % (run + 1, settings.runs, path.name, path.port))
            run_once(results, path, settings, service, idle_fds[path.name])
    run_large_bursts(results, paths, settings, service, idle_fds)
    run_delayed(results, paths, settings, group)


# =====================================================================
# OUTPUT — the table on stdout and in bench/results/latest.md
# =====================================================================

def environment_line(settings):
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
            cpu = match.group(1).strip() if match else "?"
    except OSError:
        pass
    try:
        ssh = subprocess.run(["ssh", "-V"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             timeout=10).stdout.decode().strip().split(",")[0]
    except (OSError, subprocess.TimeoutExpired):
        ssh = "ssh not found"
    return ("%s; %s, %d CPUs; Linux %s; Python %s; %s; %d run(s), %s per transfer"
            % (datetime.date.today().isoformat(), cpu, os.cpu_count() or 0,
               platform.release(), platform.python_version(), ssh,
               settings.runs, _size_text(settings.size)))


def _size_text(size):
    if size % report.GiB == 0:
        return "%d GiB" % (size // report.GiB)
    return "%d MiB" % (size // report.MiB)


NOTES = """\
- Cells: median of the runs, then (min–max) when they differ. MB = 10^6 bytes.
- Up = consumer → service, down = service → consumer. "Both ways" sends and
  receives the size at once on one stream and counts both directions.
- Relay processes: pipe2me server + pod; for ssh -R the sshd processes of
  the tunnel's connection (not the listener) + the ssh client. CPU is
  utime+stime from /proc/PID/stat; RSS is VmRSS, PSS from smaps_rollup.
- Stream setup: connect to the public port until the first byte comes back.
- +20 ms RTT: delay_relay.py holds every chunk 10 ms each way between pod and
  server (ssh client and sshd).
- N concurrent streams: all connects at once, each sends 17 bytes and awaits
  their echo; streams that are refused, reset, closed early or not echoed
  within the deadline count as failed. Relay processes inherit the
  benchmark's RLIMIT_NOFILE, raised to its hard limit.
- Client, relays and service share this machine's CPUs; compare columns
  within one run, not across runs or machines.
"""


def write_markdown(table, settings, results, command, path=RESULTS_FILE):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lines = ["# pipe2me benchmark", "", environment_line(settings), "",
             "Reproduce: `%s`" % command, "", table, "", NOTES]
    lines += problem_lines(results)
    with open(path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")


def problem_lines(results):
    lines = []
    for name, reason in sorted(results.unavailable.items()):
        lines.append("- %s not measured: %s" % (report.PATH_LABELS[name], reason))
    for error in results.errors:
        lines.append("- error: %s" % error)
    return lines


# =====================================================================
# CLI — arguments, limits, cleanup, exit code
# =====================================================================

def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description="Benchmark pipe2me against ssh -R and direct loopback.")
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run (CI)")
    parser.add_argument("--runs", type=int, help="runs per path (default 3, quick 1)")
    parser.add_argument("--size", type=parse_size,
                        help="bytes per throughput transfer, e.g. 1GiB (default; quick 32MiB)")
    parser.add_argument("--only", type=parse_only, default=list(ALL_PATHS),
                        help="comma list of pipe2me,ssh,ssh-aes,direct")
    parser.add_argument("--install", action="store_true",
                        help="apt-get install openssh-server if sshd is missing")
    parser.add_argument("--delay-ms", type=float, default=10.0,
                        help="delay each way for the added-latency rows (default 10)")
    parser.add_argument("--output", default=RESULTS_FILE, help="Markdown file to write")
    parser.add_argument("--keep-temp", action="store_true",
                        help="keep the temporary directory (keys, configs, logs)")
    args = parser.parse_args(argv)
    if args.runs is not None and not 1 <= args.runs <= 100:
        parser.error("--runs must be between 1 and 100")
    return args


def reproduce_command(argv):
    """The command line, without the options that only move files around."""
    words, skip = [], False
    for word in sys.argv[1:] if argv is None else argv:
        if skip:
            skip = False
        elif word in ("--output", "--keep-temp") or word.startswith("--output="):
            skip = word == "--output"
        else:
            words.append(shlex.quote(word))
    return " ".join(["python3 bench/run.py"] + words)


def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class Interrupted(Exception):
    """SIGTERM arrived; unwind like Ctrl-C."""


def run_with_cleanup(args, settings, results):
    """run_all inside a temporary directory; stop everything whatever happens.

    Returns an exit code when the run could not complete, else None.
    """
    def on_sigterm(signum, frame):
        raise Interrupted()

    previous_term = signal.signal(signal.SIGTERM, on_sigterm)
    # A shell starts background jobs with SIGINT ignored; Ctrl-C / kill -INT
    # must still stop the benchmark cleanly.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    work_dir = tempfile.mkdtemp(prefix="pipe2me-bench-")
    log("temporary directory %s" % work_dir)
    group = peers.ProcessGroup(work_dir)
    made_privsep = False
    try:
        if any(p.startswith("ssh") for p in args.only):
            made_privsep = peers.ensure_privsep_dir()
        run_all(args, settings, results, group, work_dir)
    except (KeyboardInterrupt, Interrupted):
        log("interrupted; stopping everything")
        return 130
    except peers.BenchError as exc:
        log("failed: %s" % exc)
        return 1
    finally:
        # Cleanup is bounded (STOP_TIMEOUT_S per process); let it finish.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        group.stop_all()
        if made_privsep:
            _remove_empty_dir("/run/sshd")
        if args.keep_temp:
            log("kept %s" % work_dir)
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)
    return None


def main(argv=None):
    args = parse_args(argv)
    settings = Settings(args)
    limit = raise_fd_limit()
    if limit < settings.burst_large * 2 + 100:
        log("RLIMIT_NOFILE hard limit %d is low for %d concurrent streams"
            % (limit, settings.burst_large))
    results = report.Results()
    code = run_with_cleanup(args, settings, results)
    if code is not None:
        return code
    metrics = report.make_metrics(settings.burst_small, settings.burst_large)
    table = report.render(results, metrics, args.only)
    print(table)
    write_markdown(table, settings, results, reproduce_command(argv), args.output)
    for line in problem_lines(results):
        log(line[2:])
    log("table written to %s" % args.output)
    return 1 if results.errors else 0


def _remove_empty_dir(path):
    try:
        os.rmdir(path)
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
