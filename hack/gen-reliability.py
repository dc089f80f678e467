#!/usr/bin/env python3
"""RELIABILITY.md's results, from a test run's own output (never written by hand).

    python3 hack/gen-reliability.py LOG [FIGURES]          rewrite RELIABILITY.md from the run
    python3 hack/gen-reliability.py --check LOG [FIGURES]  fail if a test the tables name did not
                                                           pass in that run (CI does this)

LOG is the output of `hack/test.sh` (it keeps one in target/test-run/output.log): every
`test NAME ... ok|FAILED` line of cargo's test harness, and the `commit` line hack/test.sh prints.
FIGURES (default: target/test-run/figures.tsv) holds what tests measured, one
`test<TAB>figure` per line (kata_testbed::figures::record and node-stages' common::figure).

In every table whose last column is "Test", the Result column becomes what the named tests did
in that run ("passed", plus their figures) or says which of them failed or did not run; a row
whose Test cell is "same" names the tests of the row above. The paragraph starting "Results
below" names the command, the commit and the date of the run.
"""
import os
import re
import subprocess
import sys
from collections import OrderedDict

DOC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "RELIABILITY.md")
TEST_LINE = re.compile(r"^test (\S+) \.\.\. (ok|FAILED|ignored)")
NAME = re.compile(r"`([a-z][a-z0-9_]{8,})`")


def read_results(log):
    status, commit = {}, None
    with open(log, errors="replace") as f:
        for line in f:
            m = TEST_LINE.match(line.strip())
            if m:
                name = m.group(1).split("::")[-1]
                # A name that failed anywhere stays failed.
                if status.get(name) != "FAILED":
                    status[name] = m.group(2)
            m = re.search(r"\bcommit ([0-9a-f]{7,40})\b", line)
            if m and commit is None:
                commit = m.group(1)
    return status, commit


def read_figures(path):
    figs = OrderedDict()
    if path and os.path.exists(path):
        with open(path, errors="replace") as f:
            for line in f:
                test, _, text = line.rstrip("\n").partition("\t")
                if text:
                    figs.setdefault(test, []).append(text)
    return figs


def result_of(names, status, figs):
    failed = [n for n in names if status.get(n) == "FAILED"]
    missing = [n for n in names if n not in status]
    if failed:
        return "FAILED: " + ", ".join(failed), failed + missing
    if missing:
        return "NOT RUN: " + ", ".join(missing), missing
    cell = "passed"
    texts = [t for n in names for t in figs.get(n, [])]
    if texts:
        cell += "; " + "; ".join(texts)
    return cell, []


def rewrite_tables(lines, status, figs):
    """The doc with its Result cells from the run, and the names that did not pass."""
    out, bad = [], []
    header, prev_names = None, []
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if cells is None:
            header = None
            out.append(line)
            continue
        if header is None:
            header = cells
            out.append(line)
            continue
        if set("".join(cells)) <= set("-: ") or header[-1] != "Test" or "Result" not in header:
            out.append(line)
            continue
        names = prev_names if cells[-1] == "same" else NAME.findall(cells[-1])
        prev_names = names
        if not names:
            out.append(line)
            continue
        cell, not_passed = result_of(names, status, figs)
        bad += not_passed
        cells[header.index("Result")] = cell
        out.append("| " + " | ".join(cells) + " |\n")
    return out, bad


def main(argv):
    check = "--check" in argv
    args = [a for a in argv if a != "--check"]
    if not args:
        sys.exit(__doc__)
    log = args[0]
    figures = args[1] if len(args) > 1 else os.path.join("target", "test-run", "figures.tsv")
    status, commit = read_results(log)
    if not status:
        sys.exit(f"{log}: no `test NAME ... ok` line: not the output of hack/test.sh")
    with open(DOC) as f:
        lines = f.readlines()
    out, bad = rewrite_tables(lines, status, read_figures(figures))
    if check:
        if bad:
            sys.exit("RELIABILITY.md names tests that did not pass in this run: " + ", ".join(sorted(set(bad))))
        print(f"RELIABILITY.md: every test its tables name passed in this run ({len(status)} tests in the log)")
        return
    commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    date = subprocess.run(["date", "-u", "+%Y-%m-%d"], capture_output=True, text=True).stdout.strip()
    passed = sum(1 for s in status.values() if s == "ok")
    stamp = (f"Results below are generated (`python3 hack/gen-reliability.py {log}`) from a `hack/test.sh` run "
             f"at commit {commit}, {date}, on the 2-core development machine: {passed} of {len(status)} tests passed.\n")
    text = "".join(out)
    text = re.sub(r"Results below [^\n]*(\n[^\n#|]+)*\n", stamp, text, count=1)
    with open(DOC, "w") as f:
        f.write(text)
    print(f"RELIABILITY.md rewritten from {log} (commit {commit}); not passed: {sorted(set(bad)) or 'none'}")


if __name__ == "__main__":
    main(sys.argv[1:])
