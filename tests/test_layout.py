"""The shape of both scripts: the module docstring's map equals the section
banners, each section and file stays within its line budget, no section
uses a name defined in a section below it, the SHARED blocks are
byte-identical, and only the standard library is imported.

Each failure message says what to change, in the script or in this file."""

import ast
import difflib
import os
import re
import sys

import pytest

from conftest import POD, SERVER

# Line budgets, set from the code as it is and a little above it, so that
# growth is a decision. Raising a budget (or adding one for a new section) is
# that decision: explain it in the commit message. Lower a budget when a
# section shrinks for good. PREAMBLE is the module docstring and the imports.
BUDGETS = {
    "pipe2me_server.py": {
        "FILE":                7405,
        "PREAMBLE":            105,
        "SHARED base":         232,
        "SETTINGS":            276,
        "HELPERS":             234,
        "SHARED protocol":     210,
        "SHARED relay":        835,
        "SHARED process":      175,
        "TOKENS":              110,
        "STATE STORE":         506,
        "CERTIFICATES":        435,
        "ACME":                622,
        "API":                 520,
        "TUNNEL SESSIONS":     505,
        "FRONTS":              885,
        "REACHABILITY":        135,
        "DNS":                 610,
        "DNSIMPLE":            310,
        "WIRING":              445,
        "CLI":                 370,
    },
    "pipe2me_pod.py": {
        "FILE":                4240,
        "PREAMBLE":            90,
        "SHARED base":         232,
        "SETTINGS":            75,
        "HELPERS":             80,
        "SHARED protocol":     210,
        "SHARED relay":        835,
        "SHARED process":      175,
        "POD FILES":           305,
        "SERVER API CLIENT":   245,
        "ROUTER PORT MAPPING": 660,
        "TUNNEL CLIENT":       595,
        "ECHO SERVICES":       115,
        "COMMANDS":            540,
        "CLI":                 150,
    },
}

# One dialect in both scripts: a docstring on every class and every function
# or method not named _like_this, no single-underscore names (the scripts are
# programs, not libraries: nothing is private to a reader), and no type
# annotations (the pod must read the same as the server on Python 3.8).
# Sections still being rewritten to it are listed here; take a section out
# when it follows the dialect.
DIALECT_PENDING = {
    "pipe2me_server.py": set(),
    "pipe2me_pod.py": set(),
}

BANNER_RULE = "# " + "=" * 69
SHARED_BEGIN = re.compile(r"# ---- BEGIN SHARED (\w+) \(identical in pipe2me_server\.py and pipe2me_pod\.py\) ----$")
SHARED_END = "# ---- END SHARED %s ----"
MAP_TITLE = "Sections, in the order a tunnel comes to life:"
SCRIPTS = (SERVER, POD)


def read_lines(path):
    with open(path, encoding="utf-8") as fh:
        return fh.read().splitlines()


def sections(path):
    """[(name, first line, last line)] with 1-based inclusive line numbers.
    A section starts at its banner (BANNER_RULE, then `# NAME — ...`) or at
    its BEGIN SHARED marker, and runs up to the next one; PREAMBLE is what
    comes before the first."""
    lines = read_lines(path)
    starts = [("PREAMBLE", 1)]
    for index, line in enumerate(lines):
        shared = SHARED_BEGIN.match(line)
        if shared:
            starts.append(("SHARED " + shared.group(1), index + 1))
        elif (line == BANNER_RULE and index + 1 < len(lines)
              and index > 0 and lines[index - 1] != BANNER_RULE):
            title = re.match(r"# (.+?) — ", lines[index + 1])
            if title:
                starts.append((title.group(1), index + 1))
    ends = [first - 1 for _name, first in starts[1:]] + [len(lines)]
    return [(name, first, last) for (name, first), last in zip(starts, ends)]


def section_at(spans, lineno):
    for name, first, last in spans:
        if first <= lineno <= last:
            return name
    raise AssertionError("line %d is in no section" % lineno)


def docstring_map(path):
    """The section names listed in the module docstring, in order."""
    with open(path, encoding="utf-8") as fh:
        doc = ast.get_docstring(ast.parse(fh.read())) or ""
    lines = doc.splitlines()
    assert MAP_TITLE in lines, "%s: the module docstring has no line %r followed by the list " \
        "of sections" % (os.path.basename(path), MAP_TITLE)
    names = []
    for line in lines[lines.index(MAP_TITLE) + 1:]:
        if not line.strip():
            break
        if re.match(r"    \S", line):  # deeper indentation continues the entry above
            names.append(re.split(r"\s{2,}", line.strip())[0])
    return names


@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_layout_docstring_map_equals_the_banners(path):
    listed = docstring_map(path)
    banners = [name for name, _first, _last in sections(path)][1:]
    hints = []
    for index, name in enumerate(banners):
        if name not in listed:
            after = banners[index - 1] if index else None
            hints.append("add `    %s  <what it owns>` to the list%s" % (
                name, " after %s" % after if after else " at the top"))
    hints += ["remove %s from the list (no banner has it), or give it its banner" % name
              for name in listed if name not in banners]
    if not hints:
        hints.append("put the list in the banners' order")
    assert listed == banners, (
        "%s: the module docstring's section list (under %r) must name the banners in "
        "file order, one line each (`    NAME  what it owns`, continuation lines indented "
        "deeper):\n  docstring: %s\n  banners:   %s\n  so: %s"
        % (os.path.basename(path), MAP_TITLE, listed, banners, "; ".join(hints)))


@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_layout_sections_and_file_within_their_line_budgets(path):
    script = os.path.basename(path)
    budgets = BUDGETS[script]
    sizes = {name: last - first + 1 for name, first, last in sections(path)}
    sizes["FILE"] = len(read_lines(path))
    problems = []
    for name, size in sizes.items():
        if name not in budgets:
            problems.append("%s has no line budget: add `%r: %d,` (its size now plus a little) "
                            "to BUDGETS[%r] in tests/test_layout.py, and say why the section "
                            "exists in the commit message" % (name, name, size + size // 20 + 5, script))
        elif size > budgets[name]:
            problems.append("%s has %d lines, over its budget of %d: make it smaller, or raise "
                            "BUDGETS[%r][%r] in tests/test_layout.py and explain why in the "
                            "commit message" % (name, size, budgets[name], script, name))
    for name in sorted(set(budgets) - set(sizes)):
        problems.append("BUDGETS[%r] names %r, which is no section of %s any more: remove it "
                        "from tests/test_layout.py (or fix the banner)" % (script, name, script))
    assert not problems, "%s:\n  %s" % (script, "\n  ".join(problems))


class NameUses(ast.NodeVisitor):
    """Loads of global names, with their line numbers: names bound in the
    enclosing function (arguments, assignments, imports, except and
    comprehension targets) are that function's own and are skipped."""

    def __init__(self):
        self.uses = []
        self.local = [set()]

    def visit_FunctionDef(self, node):
        for decorator in node.decorator_list:
            self.visit(decorator)
        for default in node.args.defaults + [d for d in node.args.kw_defaults if d]:
            self.visit(default)
        bound = {a.arg for a in ast.walk(node.args) if isinstance(a, ast.arg)}
        for child in ast.walk(node):
            if isinstance(child, ast.Name) and isinstance(child.ctx, (ast.Store, ast.Del)):
                bound.add(child.id)
            elif isinstance(child, ast.ExceptHandler) and child.name:
                bound.add(child.name)
            elif isinstance(child, (ast.Import, ast.ImportFrom)):
                bound.update((a.asname or a.name).split(".")[0] for a in child.names)
        self.local.append(self.local[-1] | bound)
        for statement in node.body:
            self.visit(statement)
        self.local.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node):
        bound = {a.arg for a in ast.walk(node.args) if isinstance(a, ast.arg)}
        self.local.append(self.local[-1] | bound)
        self.visit(node.body)
        self.local.pop()

    def visit_Name(self, node):
        if isinstance(node.ctx, ast.Load) and node.id not in self.local[-1]:
            self.uses.append((node.id, node.lineno))


def top_level_definitions(tree):
    """{name: line} of what the module's top level defines first."""
    defined = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.setdefault(node.name, node.lineno)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        defined.setdefault(name.id, node.lineno)
    return defined


@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_layout_no_section_uses_a_name_defined_below_it(path):
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    spans = sections(path)
    order = {name: index for index, (name, _first, _last) in enumerate(spans)}
    defined = top_level_definitions(tree)
    visitor = NameUses()
    for node in tree.body:
        visitor.visit(node)
    problems = set()
    for name, lineno in visitor.uses:
        if name not in defined:
            continue
        here, there = section_at(spans, lineno), section_at(spans, defined[name])
        if order[there] > order[here]:
            problems.add("line %d in %s uses %s, defined below in %s (line %d)"
                         % (lineno, here, name, there, defined[name]))
    assert not problems, (
        "%s: a section names only sections above it; move the definition up into the "
        "section that owns it (or above), or have the caller pass it in as an argument "
        "(the server's WIRING builds the parts and connects them):\n  %s"
        % (os.path.basename(path), "\n  ".join(sorted(problems))))


def shared_blocks(path):
    """{name: block text, BEGIN to END marker} in file order."""
    lines, blocks, index = read_lines(path), {}, 0
    while index < len(lines):
        begin = SHARED_BEGIN.match(lines[index])
        if begin:
            name = begin.group(1)
            end = lines.index(SHARED_END % name, index)
            blocks[name] = "\n".join(lines[index:end + 1]) + "\n"
            index = end
        index += 1
    return blocks


def test_layout_shared_blocks_identical():
    server, pod = shared_blocks(SERVER), shared_blocks(POD)
    assert list(server) == list(pod), (
        "the SHARED blocks must be the same, in the same order, in both scripts: "
        "pipe2me_server.py has %s, pipe2me_pod.py has %s" % (list(server), list(pod)))
    for name, text in server.items():
        if pod[name] != text:
            diff = "".join(difflib.unified_diff(
                pod[name].splitlines(True), text.splitlines(True),
                "pipe2me_pod.py", "pipe2me_server.py (copy from the server)"))
            pytest.fail("SHARED %s differs; the server's copy is the source of truth: edit it "
                        "there, then copy the whole block into pipe2me_pod.py.\n%s" % (name, diff))


@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_layout_imports_only_the_standard_library(path):
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    outside = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module or ""] if not node.level else ["(relative import)"]
        else:
            continue
        outside += ["line %d: %s" % (node.lineno, module) for module in modules
                    if module.split(".")[0] not in sys.stdlib_module_names]
    assert not outside, (
        "%s imports beyond the standard library (SPEC §1: standard library only; do it with "
        "the standard library or the openssl CLI):\n  %s"
        % (os.path.basename(path), "\n  ".join(outside)))


def dialect_problems(node, spans, pending, owner=""):
    """Breaches of the dialect among the definitions in `node`'s body."""
    problems = []
    for child in node.body:
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        section = section_at(spans, child.lineno)
        where = "line %d in %s: %s%s" % (child.lineno, section, owner, child.name)
        if section not in pending:
            if not ast.get_docstring(child) and (isinstance(child, ast.ClassDef)
                                                 or not child.name.startswith("_")):
                problems.append(where + " has no docstring: say in one line what it does "
                                "or returns (a contract, not the code again)")
            if child.name.startswith("_") and not child.name.startswith("__"):
                problems.append(where + " starts with an underscore: drop it")
            if isinstance(child, ast.ClassDef):
                pass
            elif child.returns or any(arg.annotation for arg in ast.walk(child.args)
                                      if isinstance(arg, ast.arg)):
                problems.append(where + " has type annotations: drop them")
        if isinstance(child, ast.ClassDef):
            problems += dialect_problems(child, spans, pending, child.name + ".")
    if not owner:
        for child in node.body:
            targets = child.targets if isinstance(child, ast.Assign) else []
            for target in targets:
                section = section_at(spans, child.lineno)
                if (isinstance(target, ast.Name) and target.id.startswith("_")
                        and not target.id.startswith("__") and section not in pending):
                    problems.append("line %d in %s: %s starts with an underscore: drop it"
                                    % (child.lineno, section, target.id))
    return problems


@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_layout_one_dialect(path):
    script = os.path.basename(path)
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    spans = sections(path)
    pending = DIALECT_PENDING[script]
    unknown = pending - {name for name, _first, _last in spans}
    assert not unknown, ("DIALECT_PENDING[%r] in tests/test_layout.py names %s, no section of "
                         "%s any more: remove it" % (script, sorted(unknown), script))
    problems = dialect_problems(tree, spans, pending)
    assert not problems, "%s does not follow the dialect (see DIALECT_PENDING in " \
        "tests/test_layout.py):\n  %s" % (script, "\n  ".join(problems))
