"""Smoke run of the benchmark (bench/run.py --quick), so it cannot rot.

The benchmark itself is not a test: this only proves that it starts every
path it is asked for, measures, prints its table, and cleans up after
itself. The pipe2me column reads "n/a" while the scripts lack `start`.
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "bench", "run.py")
HEADER = re.compile(r"^\| metric +\| pipe2me +\| direct +\| target \(issue 5\) +\|$", re.M)


def _live_cmdlines_containing(text):
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if text in cmdline:
            found.append("%s: %s" % (entry, cmdline))
    return found


@pytest.mark.slow
def test_bench_quick_run_prints_table_and_cleans_up(tmp_path):
    output = tmp_path / "latest.md"
    done = subprocess.run(
        [sys.executable, RUN, "--quick", "--only", "direct,pipe2me", "--output", str(output)],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        timeout=300)
    stdout = done.stdout.decode("utf-8", "replace")
    stderr = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 0, "bench/run.py exited %d\n%s\n%s" % (done.returncode, stdout, stderr)
    assert HEADER.search(stdout), stdout
    assert HEADER.search(output.read_text()), "the Markdown file lacks the table"
    down = re.search(r"^\| 1 stream down[^|]*\|([^|]*)\|([^|]*)\|", stdout, re.M)
    assert down and re.search(r"\d", down.group(2)), "direct measured nothing:\n" + stdout
    if "pipe2me not measured" not in output.read_text():
        assert re.search(r"\d", down.group(1)), "pipe2me measured nothing:\n" + stdout
    work_dir = re.search(r"temporary directory (\S+)", stderr).group(1)
    assert not os.path.exists(work_dir), "temporary directory left behind"
    assert _live_cmdlines_containing(work_dir) == [], "processes left running"
