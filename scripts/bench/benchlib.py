"""Small timing harness shared by the scripts in scripts/bench/ (stdlib only).

A benchmark is a list of groups; a group is a list of contenders, each a bash command.
Every round runs every contender of every group once, in order (ABC ABC ..., never
AAA BBB), so slow drifts of the machine (other tenants, writeback, thermal) hit all
contenders alike. Before the rounds each contender runs once untimed (warm-up, and its
`check` command proves it produced the right output). After every run its `cleanup`
command (untimed) deletes its outputs and `sync`s, so each run starts from the same state
and does not pay for the previous run's writeback. The page cache is not dropped.

Per run we record wall time (time.perf_counter around the whole command) and CPU time
(user + sys of the command and all its descendants, from os.wait4's rusage). wait4's
ru_maxrss is NOT used: the high-water mark survives fork + exec, so every child would
report at least this Python process's RSS. A contender that needs its peak RSS wraps its
command in `/usr/bin/time -f %M -o FILE` and names FILE as its `rss_file`.
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

    def run(self, timed):
        wall, cpu, user, sys_ = run_timed(self.cmd)
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
    def __init__(self, key, title, size, contenders, ours, intro=""):
        self.key, self.title, self.size = key, title, size
        self.contenders, self.ours, self.intro = contenders, ours, intro

    def get(self, name):
        return next(c for c in self.contenders if c.name == name)


def run_rounds(groups, rounds):
    for g in groups:
        for c in g.contenders:
            log(f"warm-up  {g.key}: {c.name}")
            c.run(timed=False)
            if c.check:
                sh(c.check, f"check of {c.name}")
            if c.cleanup:
                sh(c.cleanup, f"cleanup of {c.name}")
    for r in range(1, rounds + 1):
        for g in groups:
            for c in g.contenders:
                wall = c.run(timed=True)
                if c.cleanup:
                    sh(c.cleanup, f"cleanup of {c.name}")
                log(f"round {r}/{rounds}  {g.key}: {c.name}: {wall:.3f} s")


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
