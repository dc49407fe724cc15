"""Print the benchmark's table, check its targets, write the JSON and draw the chart."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

COLUMNS = [("scenario", "<28"), ("conc", ">5"), ("req/s", ">8"), ("ideal%", ">7"), ("p50 ms", ">8"),
           ("p95 ms", ">8"), ("p99 ms", ">8"), ("+p50 ms", ">8"), ("+p99 ms", ">8"), ("errors", ">6"),
           ("cpu/req ms", ">10"), ("rss MB", ">7"), ("methods", "<0")]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def table(rows: list[dict[str, Any]]) -> str:
    """Return the results as a fixed-width text table, one line per scenario."""
    head = " ".join(f"{name:{fmt}}" for name, fmt in COLUMNS)
    lines = [head, "-" * len(head)]
    for row in rows:
        methods = ",".join(f"{k}={v}" for k, v in sorted(row.get("methods", {}).items()))
        values = [row["scenario"], row.get("concurrency"), row.get("rps"), row.get("ideal_pct"),
                  row.get("p50_ms"), row.get("p95_ms"), row.get("p99_ms"), row.get("added_p50_ms"),
                  row.get("added_p99_ms"), row.get("errors"), row.get("cpu_ms_per_request"),
                  row.get("rss_mb"), methods]
        lines.append(" ".join(f"{_cell(v):{fmt}}" for v, (_, fmt) in zip(values, COLUMNS)))
    return "\n".join(lines)


def _find(rows: list[dict[str, Any]], kind: str, concurrency: int | None = None) -> dict[str, Any] | None:
    for row in rows:
        if row["kind"] == kind and (concurrency is None or row["concurrency"] == concurrency):
            return row
    return None


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Check the targets the data allows; each says what was measured and whether it holds."""
    out: list[dict[str, Any]] = []

    def add(name: str, met: bool, measured: str) -> None:
        out.append({"target": name, "met": met, "measured": measured})

    for path in ("g4f", "openai"):
        kind = f"uncached-{path}"
        top = _find(rows, kind, 1000)
        if top is not None:
            add(f"{path}: 1000 in flight on one worker, no error", top["errors"] == 0,
                f"{top['errors']} errors, upstream held {top.get('upstream_max_in_flight')} at once, "
                f"{top['rps']} req/s")
        low = [r for r in rows if r["kind"] == kind and r["concurrency"] <= 500]
        if low:
            worst = min(low, key=lambda r: r.get("ideal_pct") or 0)
            add(f"{path}: >= 90% of ideal throughput up to 500",
                all((r.get("ideal_pct") or 0) >= 90 for r in low),
                ", ".join(f"c={r['concurrency']}: {r.get('ideal_pct')}%" for r in low)
                + f" (worst c={worst['concurrency']})")
        mid = _find(rows, kind, 100)
        if mid is not None and mid.get("added_p50_ms") is not None:
            add(f"{path}: added latency p50 < 5 ms and p99 < 50 ms at 100",
                mid["added_p50_ms"] < 5 and mid["added_p99_ms"] < 50,
                f"p50 +{mid['added_p50_ms']} ms, p99 +{mid['added_p99_ms']} ms")
    for cached in (r for r in rows if r["kind"] == "cached"):
        bare = _find(rows, "bare", cached["concurrency"])
        if bare is not None and bare["rps"]:
            ratio = cached["rps"] / bare["rps"]
            add(f"cached chat >= half the bare endpoint's throughput (c={cached['concurrency']})",
                ratio >= 0.5, f"{cached['rps']} vs {bare['rps']} req/s ({ratio:.0%})")
    pairs: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for g in rows:
        o = _find(rows, "uncached-openai", g["concurrency"]) if g["kind"] == "uncached-g4f" else None
        if o is not None and o["rps"]:
            pairs.append((g, o))
    if pairs:
        # "As fast": within 5% of the openai path's throughput at every concurrency.
        add("g4f path as fast as the openai path",
            all(g["rps"] >= 0.95 * o["rps"] for g, o in pairs),
            ", ".join(f"c={g['concurrency']}: {g['rps']} vs {o['rps']} req/s, "
                      f"p50 {g['p50_ms']} vs {o['p50_ms']} ms" for g, o in pairs))
    for row in rows:
        if row["kind"] == "health":
            add(f"{row['scenario']} answers within 50 ms (p99)",
                row["errors"] == 0 and (row.get("p99_ms") or 1e9) < 50,
                f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, max {row['max_ms']} ms, "
                f"{row['errors']} not 200 {row.get('statuses')}")
    return out


def targets_text(checks: list[dict[str, Any]]) -> str:
    return "\n".join(f"  [{'met' if c['met'] else 'MISSED'}] {c['target']}: {c['measured']}"
                     for c in checks)


def write_json(report: dict[str, Any], folder: Path, stamp: str) -> list[Path]:
    """Write the report as <stamp>.json and latest.json; return both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2) + "\n"
    paths = [folder / f"{stamp}.json", folder / "latest.json"]
    for path in paths:
        path.write_text(text)
    return paths


def chart(rows: list[dict[str, Any]], path: Path, *, upstream_latency: float, workers: int) -> Path:
    """Draw latency and throughput against concurrency into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat_ax, rps_ax) = plt.subplots(1, 2, figsize=(13, 5.2))
    styles = {"uncached-g4f": ("g4f (uncached)", "tab:blue"),
              "uncached-openai": ("openai (uncached)", "tab:orange"),
              "cached": ("cached chat", "tab:green"), "bare": ("bare Flask endpoint", "tab:gray")}
    levels: set[int] = set()
    for kind, (label, color) in styles.items():
        series = sorted((r for r in rows if r["kind"] == kind and r["rps"]), key=lambda r: r["concurrency"])
        if not series:
            continue
        xs = [r["concurrency"] for r in series]
        levels.update(xs)
        lat_ax.plot(xs, [r["p50_ms"] for r in series], "o-", color=color, label=f"{label} p50")
        lat_ax.plot(xs, [r["p99_ms"] for r in series], "s--", color=color, alpha=0.6, label=f"{label} p99")
        rps_ax.plot(xs, [r["rps"] for r in series], "o-", color=color, label=label)
    uncached = sorted({r["concurrency"] for r in rows if r["kind"].startswith("uncached")})
    if uncached and upstream_latency > 0:
        lat_ax.axhline(upstream_latency * 1000, color="black", lw=0.8, ls=":",
                       label=f"upstream latency {upstream_latency:g} s")
        rps_ax.plot(uncached, [c / upstream_latency for c in uncached], ":", color="black",
                    label="ideal: concurrency / upstream latency")
    for ax in (lat_ax, rps_ax):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("concurrent clients")
        ax.grid(True, which="both", alpha=0.3)
        if levels:
            ax.set_xticks(sorted(levels))
            ax.set_xticklabels([str(x) for x in sorted(levels)])
        ax.legend(fontsize=8)
    lat_ax.set_ylabel("latency (ms)")
    lat_ax.set_title("Latency")
    rps_ax.set_ylabel("requests per second")
    rps_ax.set_title("Throughput")
    fig.suptitle(f"chat backend, gunicorn gevent, {workers} worker{'s' if workers > 1 else ''}, "
                 f"fake upstream {upstream_latency:g} s")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
