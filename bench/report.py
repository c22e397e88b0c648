"""The result table (markdown), printed after a run and pasted into docs/benchmarks.md
between its ``<!-- bench:begin -->`` / ``<!-- bench:end -->`` markers."""

from __future__ import annotations

import re
from typing import Any

from bench.harness import ROOT

DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
NAMES = {"sqlite": "SQLite", "postgres": "PostgreSQL"}


def _yes(v: Any) -> str:
    return "—" if v is None else ("yes" if v else "**no**")


def _f(v: Any, nd: int = 1) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _cells(res: dict[str, Any], pid: str, kind: str) -> tuple[str, Any]:
    """(text, met) of one measurement on one database."""
    d = res.get(pid, {})
    if pid in ("P5", "P6"):
        x = d.get(kind)
    else:
        x = d.get(kind)
    if not x:
        return "not run", None
    if pid == "P1":
        floor = (
            f"; a bare FastAPI relay adds +{_f(x['floor_added_p50'], 2)} ms p50, with "
            f"its two commits +{_f(x['durable_floor_added_p50'], 2)} ms, the gateway's own "
            f"work on top +{_f(x['own_p50'], 2)} ms"
            if "durable_floor_added_p50" in x
            else ""
        )
        return (
            f"+{_f(x['added_p50'], 2)} / +{_f(x['added_p99'], 2)} ms "
            f"(gateway {_f(x['gateway_p50'], 2)} vs direct {_f(x['direct_p50'], 2)} ms "
            f"p50; x{_f(x['ratio_p50'], 2)}){floor}",
            x.get("met"),
        )
    if pid == "P2":
        cpu = x.get("cpu_ms_per_task") or {}
        per = (
            f"; CPU per task life: gateway {_f(cpu.get('gateway'))} ms, simulator "
            f"{_f(cpu.get('sim'))} ms"
            if cpu
            else ""
        )
        fixed = (x.get("fixed_load") or {}).get("cpu_ms_per_task") or {}
        if fixed:
            db_cpu = (
                f", PostgreSQL's backends {_f(fixed['database'])} ms" if "database" in fixed else ""
            )
            per += (
                f" (at a fixed {_f(x['fixed_load']['rate'])}/s: gateway "
                f"{_f(fixed.get('gateway'))} ms{db_cpu})"
            )
        return (
            f"{_f(x['gateway_rps'])}/s vs {_f(x['baseline_rps'])}/s = "
            f"**x{_f(x['ratio'], 2)}** (accepted: {_f(x.get('gateway_accept_rps'))}/s)" + per,
            x.get("met"),
        )
    if pid == "P12":
        return (
            f"{_f(x['gateway_rps'])}/s vs {_f(x['baseline_rps'])}/s = "
            f"**x{_f(x['ratio'], 2)}**; the same stack's floors: a relay committing before "
            f"and after its Run {_f(x['durable_rps'])}/s = x{_f(x['durable_ratio'], 2)}, a "
            f"bare relay {_f(x['relay_rps'])}/s = x{_f(x['relay_ratio'], 2)}",
            x.get("met"),
        )
    if pid == "P11":
        if not x.get("measured", True):
            return f"not measured: {x.get('why')}", None
        return (
            f"{_f(x['two_rps'])}/s vs {_f(x['one_rps'])}/s = **x{_f(x['ratio'], 2)}** "
            f"(accepted: {_f(x['two_accept_rps'])} vs {_f(x['one_accept_rps'])}/s = "
            f"x{_f(x['accept_ratio'], 2)}); CPU per task life {_f(x.get('cpu_ms_two'))} "
            f"vs {_f(x.get('cpu_ms_one'))} ms",
            x.get("met"),
        )
    if pid == "P3":
        b = x.get("burst", {})
        return (
            f"{_f(x['ingest_rps'])}/s vs {_f(x['baseline_rps'])}/s = "
            f"**x{_f(x['ratio'], 2)}** (applied: {_f(x['applied_rps'])}/s = "
            f"x{_f(x['applied_ratio'], 2)}); burst {b.get('callbacks')}: "
            f"{b.get('lost')} lost, {b.get('non_2xx', 0) + b.get('errors', 0)} non-2xx, "
            f"answered in {_f(b.get('all_answered_s'))} s, "
            + (
                f"all applied in {_f(b.get('all_applied_s'))} s"
                if b.get("all_applied_s") is not None
                else f"{b.get('not_terminal_after_wait')} still being applied after "
                f"{_f(b.get('wait_s'), 0)} s"
            )
            + f" ({_f(b.get('applied_per_s'))}/s)",
            x.get("met"),
        )
    if pid == "P4":
        q = x["queries"]
        parts = [
            f"{name} {_f(q[k]['p95_ms_big'], 2)} ms (x{_f(q[k]['ratio'], 2)})"
            for k, name in (
                ("first_page", "first"),
                ("deep_page", "deep"),
                ("status_metadata", "status+meta"),
            )
        ]
        return f"{x['rows_big']:,} rows: " + ", ".join(parts), x.get("met")
    if pid == "P5":
        waves = x["no_callbacks"].get("waves")
        split = (
            f": cold start {_f(waves[0]['detail_per_task'], 2)} (detected "
            f"{_f(waves[0]['lag_p50_s'])} s late, p50), then "
            f"{_f(waves[1]['detail_per_task'], 2)} ({_f(waves[1]['lag_p50_s'])} s)"
            if waves
            else ""
        )
        return (
            f"{_f(x['callbacks']['detail_per_task'], 2)} with callbacks, "
            f"{_f(x['no_callbacks']['detail_per_task'], 2)} without{split} "
            f"(T = {_f(d.get('task_duration_s'), 0)} s, bound "
            f"{d.get('bound_without_callbacks')})",
            x.get("met"),
        )
    if pid == "P6":
        s = x.get("soak", {})
        return (
            f"{_f(x.get('per_task_kib'), 2)} KiB/task ({x.get('inflight_tasks')} in "
            f"flight, idle {_f(x.get('idle_rss_mib'))} MiB); soak {_f(s.get('seconds'), 0)} s: "
            f"{_f(s.get('slope_kib_per_min'))} KiB/min, "
            f"{_f(s.get('implied_rise_mib'), 2)} MiB rise",
            x.get("met"),
        )
    if pid == "P7":
        if not x.get("measured"):
            return f"not measured: {x.get('why')}", None
        return (
            f"p50 {_f(x['p50_ms'])} ms, p90 {_f(x['p90_ms'])} ms "
            f"({x['received']}/{x['tasks']} received)",
            x.get("met"),
        )
    if pid == "P8":
        return (
            f"{_f(x.get('restart_to_converged_s'))} s restart → all converged "
            f"(no crash: {_f(x.get('baseline_converged_s'))} s; x{_f(x.get('ratio'), 2)})",
            x.get("met"),
        )
    if pid == "P9":
        w, o = x["wrong_key"], x["over_limit"]
        return (
            f"{w['clients']} x 10 MB with a wrong key: +{_f(w['peak_rise_mib'], 2)} MiB peak "
            f"({_statuses(w)}, answered in {_f(w['answer_ms_p50'])} ms p50); "
            f"{o['clients']} x 11 MiB chunked over the limit: "
            f"+{_f(o['peak_rise_mib'], 2)} MiB ({_statuses(o)})",
            x.get("met"),
        )
    if pid == "P10":
        return (
            f"{_f(x['kib_per_waiter'])} KiB/waiter (RSS {_f(x['rss_before_mb'])} → "
            f"{_f(x['rss_held_mb'])} MiB); wake-up p50 {_f(x['wake_p50_ms'])} ms, p95 "
            f"{_f(x['wake_p95_ms'])} ms ({x['answered_terminal']}/{x['waiters']} "
            f"answered terminal, {x.get('missed_wakeups')} missed wake-ups)",
            x.get("met"),
        )
    return "?", None


def _statuses(wave: dict[str, Any]) -> str:
    return ", ".join(f"{n} x {code}" for code, n in sorted(wave["statuses"].items()))


WHAT = {
    "P1": (
        "added per submit, one at a time, p50 / p99",
        "direct Run to the simulator",
        "≤ 2 / ≤ 10 ms",
    ),
    "P2": (
        "submits/s at p99 ≤ 250 ms, whole task lives (open loop)",
        "one-insert FastAPI endpoint",
        "≥ 0.25 x",
    ),
    "P3": (
        "callbacks/s at p99 ≤ 250 ms; burst",
        "one-insert FastAPI endpoint",
        "≥ 1.0 x; 0 lost, 0 non-2xx",
    ),
    "P4": (
        "history p95 (first page, deep page, status+metadata)",
        "same queries at 10,000",
        "≤ 10 ms, ratio ≤ 1.5",
    ),
    "P5": ("Detail calls per task", "—", "≤ 1; ≤ ⌈log2(T/3 s)⌉+2"),
    "P6": ("memory per in-flight task; RSS drift", "the idle process", "≤ 32 KiB; no upward drift"),
    "P7": ("upstream completion → signed notification", "—", "p50 ≤ 50 ms"),
    "P8": (
        "kill -9 mid-submit, restart at defaults: until all converged",
        "the same batch without a crash",
        "≤ 20 s, none run twice",
    ),
    "P9": ("peak RSS rise under concurrent hostile uploads", "the idle process", "≤ 8 MiB"),
    "P10": (
        "1,000 `Prefer: wait` callers on one process: memory each; terminal commit → answer",
        "the process before they came",
        "all answered; p50 ≤ 50 ms",
    ),
    "P11": (
        "submits/s at p99 ≤ 250 ms, whole task lives, `serve --workers 2`",
        "`serve` with one process",
        "≥ 1.6 x",
    ),
    "P12": (
        "submits/s at p99 ≤ 250 ms, tasks left queued upstream (open loop)",
        "one-insert FastAPI endpoint",
        "≥ 0.5 x",
    ),
}


def table(results: dict[str, Any]) -> str:
    res = results.get("results", {})
    kinds = results.get("databases", ["sqlite", "postgres"])
    m = results.get("machine", {})
    lines = [
        f"Run {m.get('date')} ({results.get('mode')}, {results.get('elapsed_s')} s), "
        f"{m.get('nproc')} x {m.get('cpu_model')}, Python {m.get('python')}, "
        f"commit {m.get('git_commit')}, load average {m.get('load_avg_start')} → "
        f"{m.get('load_avg_end')}.",
        "",
        "| id | what | database | result | baseline (same run) | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for pid, (what, base, target) in WHAT.items():
        for kind in kinds:
            text, met = _cells(res, pid, kind)
            lines.append(
                f"| {pid} | {what} | {NAMES[kind]} | {text} | {base} | {target} | {_yes(met)} |"
            )
    p5 = res.get("P5", {})
    if any(k in p5 for k in kinds):
        lines += [
            "",
            "Database work per task (the P5 runs: 12 s tasks, statements the "
            "gateway's engine ran while they lived, minus its idle rate):",
            "",
            "| database | callbacks | SELECT | INSERT | UPDATE | WITH (several writes) "
            "| commits | INSERT INTO by table¹ | idle statements/s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for kind in kinds:
            for key, label in (("callbacks", "healthy"), ("no_callbacks", "all dropped")):
                x = p5.get(kind, {}).get(key)
                if not x:
                    continue
                st = x["statements_per_task"]
                rows = ", ".join(f"{k} {_f(v, 1)}" for k, v in x["rows_inserted_per_task"].items())
                lines.append(
                    f"| {NAMES[kind]} | {label} | {_f(st.get('SELECT', 0), 1)} | "
                    f"{_f(st.get('INSERT', 0), 1)} | {_f(st.get('UPDATE', 0), 1)} | "
                    f"{_f(st.get('WITH', 0), 1)} | "
                    f"{_f(x['commits_per_task'], 1)} | {rows} | "
                    f"{_f(x['idle_statements_per_s'], 1)} |"
                )
        lines += [
            "",
            "¹ Each `INSERT INTO` counted once, whatever it wrote: an `INSERT … SELECT` of "
            "a task's deliveries or metadata writes no row for a task without a webhook "
            "or metadata (as here). `WITH` statements (PostgreSQL's single-statement "
            "writes) count once each, their `INSERT INTO`s under their tables; "
            "autocommitted statements count as commits.",
        ]
    inv = results.get("invariants", [])
    if inv:
        tasks = sum(r["tasks"] for r in inv)
        lost = sum(r["not_terminal"] for r in inv)
        dup = sum(r["duplicated_upstream"] for r in inv)
        lines += [
            "",
            f"Invariants: {tasks:,} tasks in {len(inv)} phases, {lost} not terminal "
            f"at the end, {dup} started twice upstream.",
        ]
    if results.get("failures"):
        lines += ["", "**FAILED:** " + "; ".join(results["failures"])]
    return "\n".join(lines)


def write_docs(results: dict[str, Any]) -> None:
    block = f"{BEGIN}\n{table(results)}\n{END}"
    text = DOCS.read_text() if DOCS.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN in text and END in text:
        text = re.sub(
            re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: block, text, flags=re.DOTALL
        )
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOCS.write_text(text)
