"""Small timing harness shared by the scripts in scripts/bench/ (stdlib only).

A benchmark is a list of groups; a group is a list of contenders, each a bash command.
Every round runs every contender of every group once, never AAA BBB; the order within a
group alternates between rounds (ABC CBA ABC ...), so slow drifts of the machine (other
tenants, writeback, thermal) hit all contenders alike and no contender always runs right
after the same other one. Before the rounds each contender runs once untimed (warm-up, and its
`check` command proves it produced the right output). After every run its `cleanup`
command (untimed) deletes its outputs and `sync`s, so each run starts from the same state
and does not pay for the previous run's writeback. The page cache is not dropped.

Per run we record wall time (time.perf_counter around the whole command) and CPU time
(user + sys of the command and all its descendants, from os.wait4's rusage). wait4's
ru_maxrss is NOT used: the high-water mark survives fork + exec, so every child would
report at least this Python process's RSS. A contender that needs its peak RSS wraps its
command in `/usr/bin/time -f %M -o FILE` and names FILE as its `rss_file`.

A contender's `cmd`, `cleanup` and `check` may also be functions of the run number (0 for
the warm-up, then 1, 2, ...), e.g. to give every run fresh instance names. A group whose
runs each do `ops` operations (a batch, to average out process start-up noise) is shown per
operation with `fmt_ops_table`.
"""

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

RUN_TIMEOUT = float(os.environ.get("BENCH_RUN_TIMEOUT", "900"))


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def sh(cmd, what):
    """Runs an untimed helper command; fails the benchmark if it fails."""
    r = subprocess.run(["bash", "-c", "set -euo pipefail\n" + cmd])
    if r.returncode != 0:
        raise SystemExit(f"bench: {what} failed (exit {r.returncode}): {cmd}")


def run_timed(cmd):
    """Runs `cmd` under bash; returns (wall s, cpu s, user s, sys s)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(["bash", "-c", "set -euo pipefail\n" + cmd], start_new_session=True)
    timer = threading.Timer(RUN_TIMEOUT, lambda: os.killpg(p.pid, signal.SIGKILL))
    timer.start()
    try:
        _, status, ru = os.wait4(p.pid, 0)
    finally:
        timer.cancel()
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"bench: command failed (exit {p.returncode}): {cmd}")
    return wall, ru.ru_utime + ru.ru_stime, ru.ru_utime, ru.ru_stime


class Contender:
    def __init__(self, name, cmd, cleanup="", check="", rss_file=None, note=""):
        self.name, self.cmd, self.cleanup, self.check = name, cmd, cleanup, check
        self.rss_file, self.note = rss_file, note
        self.wall, self.cpu, self.user, self.sys, self.rss = [], [], [], [], []

        self.n = 0  # runs so far (the warm-up is run 0)

    def at(self, what):
        """`cmd` / `cleanup` / `check` of the current run (a string, or a function of n)."""
        return what(self.n) if callable(what) else what

    def run(self, timed):
        if timed:
            self.n += 1
        wall, cpu, user, sys_ = run_timed(self.at(self.cmd))
        if timed:
            self.wall.append(wall)
            self.cpu.append(cpu)
            self.user.append(user)
            self.sys.append(sys_)
            if self.rss_file:
                with open(self.rss_file) as f:
                    self.rss.append(int(f.read().split()[-1]))
        return wall

    def median(self):
        return statistics.median(self.wall)


class Group:
    """`rounds` caps this group's timed rounds (None: all); `warmup=False` skips the untimed
    warm-up (for very long runs): the group's `check`s then run after its first timed run."""

    def __init__(self, key, title, size, contenders, ours, intro="", ops=1, rounds=None, warmup=True):
        self.key, self.title, self.size = key, title, size
        self.contenders, self.ours, self.intro, self.ops = contenders, ours, intro, ops
        self.rounds, self.warmup = rounds, warmup

    def get(self, name):
        return next(c for c in self.contenders if c.name == name)


def run_rounds(groups, rounds):
    """Warm-up (+ check) of every contender, then `rounds` rounds (fewer for a group with its
    own `rounds`); odd rounds run each group's contenders in order, even rounds in reverse
    order."""
    for g in groups:
        if not g.warmup:
            continue
        for c in g.contenders:
            log(f"warm-up  {g.key}: {c.name}")
            c.run(timed=False)
            if c.check:
                sh(c.at(c.check), f"check of {c.name}")
            if c.cleanup:
                sh(c.at(c.cleanup), f"cleanup of {c.name}")
    for r in range(1, rounds + 1):
        for g in groups:
            if g.rounds is not None and r > g.rounds:
                continue
            order = g.contenders if r % 2 else list(reversed(g.contenders))
            for c in order:
                wall = c.run(timed=True)
                if r == 1 and not g.warmup and c.check:
                    sh(c.at(c.check), f"check of {c.name}")
                if c.cleanup:
                    sh(c.at(c.cleanup), f"cleanup of {c.name}")
                log(f"round {r}/{min(rounds, g.rounds or rounds)}  {g.key}: {c.name}: {wall:.3f} s")


def mib(kib):
    return kib / 1024


def cell(text):
    """Escapes a markdown table cell."""
    return text.replace("|", "\\|")


def fmt_table(g):
    ours = g.get(g.ours)
    rows = [
        f"| contender | median s | min s | max s | MiB/s (median) | CPU s (median) | {cell(ours.name)} ÷ this (medians) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in g.contenders:
        ratio = "—" if c is ours else f"{ours.median() / c.median():.2f}×"
        rows.append(
            f"| {cell(c.name)} | {c.median():.3f} | {min(c.wall):.3f} | {max(c.wall):.3f} | "
            f"{g.size / 2**20 / c.median():.0f} | {statistics.median(c.cpu):.2f} | {ratio} |"
        )
    return "\n".join(rows)


def fmt_ops_table(g, unit="op", scale=1e3, unit_time="ms", digits=1, speedup=False):
    """Like fmt_table, for groups whose runs each do `g.ops` operations: times per operation.
    The last column is ours ÷ this, or with `speedup` this ÷ ours (how many times faster ours is)."""
    ours = g.get(g.ours) if g.ours else None
    per = scale / g.ops
    head = f"| contender | median {unit_time}/{unit} | min {unit_time}/{unit} | max {unit_time}/{unit} | CPU {unit_time}/{unit} (median) |"
    sep = "|---|---:|---:|---:|---:|"
    if ours:
        head += (f" this ÷ {cell(ours.name)} (medians) |" if speedup
                 else f" {cell(ours.name)} ÷ this (medians) |")
        sep += "---:|"
    rows = [head, sep]
    for c in g.contenders:
        row = (
            f"| {cell(c.name)} | {c.median() * per:.{digits}f} | {min(c.wall) * per:.{digits}f} | "
            f"{max(c.wall) * per:.{digits}f} | {statistics.median(c.cpu) * per:.{digits}f} |"
        )
        if ours:
            r = c.median() / ours.median() if speedup else ours.median() / c.median()
            row += " — |" if c is ours else f" {r:.{0 if speedup and r >= 10 else 2}f}× |"
        rows.append(row)
    return "\n".join(rows)


def facts_table(extra=()):
    """The machine-facts table from the BENCH_FACT_* variables that scripts/bench/common.sh
    exports, plus `extra` (fact, value) rows."""
    E = os.environ
    load_end = " ".join(open("/proc/loadavg").read().split()[:3])
    rows = [
        ("date (UTC)", E.get("BENCH_FACT_DATE", "?")),
        ("imgcache commit", E.get("BENCH_FACT_COMMIT", "?")),
        ("CPU", E.get("BENCH_FACT_CPU", "?")),
        ("nproc", E.get("BENCH_FACT_NPROC", "?")),
        ("memory", E.get("BENCH_FACT_MEM", "?")),
        ("kernel", E.get("BENCH_FACT_KERNEL", "?")),
        ("load average 1/5/15 min, at start → at end", f"{E.get('BENCH_FACT_LOAD', '?')} → {load_end}"),
        ("work dir filesystem", E.get("BENCH_FACT_FS", "?")),
        ("tools", E.get("BENCH_FACT_TOOLS", "?")),
        *extra,
    ]
    return "\n".join(["| fact | value |", "|---|---|"] + [f"| {cell(k)} | {cell(v)} |" for k, v in rows])


def write_report(report, groups):
    """Prints the markdown report; writes it to $BENCH_OUT and the raw numbers to $BENCH_JSON
    when set."""
    print(report, flush=True)
    E = os.environ
    if E.get("BENCH_OUT"):
        with open(E["BENCH_OUT"], "w") as f:
            f.write(report + "\n")
    if E.get("BENCH_JSON"):
        with open(E["BENCH_JSON"], "w") as f:
            f.write(to_json(groups) + "\n")


def fmt_raw(groups):
    out = ["| group | contender | wall s per round | CPU s (user+sys) per round |", "|---|---|---|---|"]
    for g in groups:
        for c in g.contenders:
            out.append(
                f"| {g.key} | {cell(c.name)} | {' '.join(f'{w:.3f}' for w in c.wall)} | "
                + " ".join(f"{u:.2f}+{s:.2f}" for u, s in zip(c.user, c.sys))
                + " |"
            )
    return "\n".join(out)


def to_json(groups):
    return json.dumps(
        {
            g.key: {
                c.name: {"wall": c.wall, "user": c.user, "sys": c.sys, "maxrss_kib": c.rss or None}
                for c in g.contenders
            }
            for g in groups
        },
        indent=1,
    )
