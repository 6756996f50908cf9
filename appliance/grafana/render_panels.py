#!/usr/bin/env python3
"""Renders the panels of dashboard.json to one PNG, from a real Prometheus.

Grafana is not packaged for Debian, so the README's screenshot is made this way: every
panel's PromQL expressions, exactly as in dashboard.json, are evaluated by a Prometheus
server over a time range (the HTTP API's query_range) and plotted with matplotlib, one
subplot per panel, with the panel's title, unit and legend format.

    render_panels.py --prometheus http://127.0.0.1:9099 --start 1700000000 --end 1700000120 \
        --out dashboard.png [--step 1] [--rate-interval 4s]

Template variables ($instance, $export, ...) select everything; $__rate_interval is
--rate-interval (Grafana uses four scrape intervals at least). Series that stay at zero for
the whole range are counted in a note instead of drawn, to keep legends readable.
Needs python3-matplotlib.
"""

import argparse
import json
import math
import re
import sys
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

HERE = Path(__file__).resolve().parent


def query_range(prometheus, expr, start, end, step):
    params = urllib.parse.urlencode(
        {"query": expr, "start": start, "end": end, "step": step}
    )
    with urllib.request.urlopen(f"{prometheus}/api/v1/query_range?{params}") as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body}")
    return body["data"]["result"]


def substitute(expr, variables, rate_interval, range_):
    for name, value in [
        ("__rate_interval", rate_interval),
        ("__interval", rate_interval),
        ("__range", range_),
    ]:
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    for v in variables:
        expr = expr.replace("${" + v + "}", ".*").replace("$" + v, ".*")
    return expr


def legend(fmt, metric):
    if not fmt:
        return ",".join(f"{k}={v}" for k, v in sorted(metric.items())) or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m.group(1), ""), fmt)


def si(value, unit):
    """A tick label for `value` in Grafana unit `unit`."""
    if value == 0 or not math.isfinite(value):
        return "0"
    if unit == "s":
        for scale, suffix in [(1, "s"), (1e-3, "ms"), (1e-6, "µs"), (1e-9, "ns")]:
            if abs(value) >= scale:
                return f"{value / scale:.3g} {suffix}"
        return f"{value:.2g} s"
    if unit in ("bytes", "Bps"):
        tail = "/s" if unit == "Bps" else ""
        for scale, suffix in [(2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")]:
            if abs(value) >= scale:
                return f"{value / scale:.3g} {suffix}{tail}"
        return f"{value:.3g} B{tail}"
    tail = {"iops": " io/s", "ops": " /s", "reqps": " req/s"}.get(unit, "")
    for scale, suffix in [(1e9, "G"), (1e6, "M"), (1e3, "k")]:
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}{tail}"
    return f"{value:.3g}{tail}"


def panels_of(dashboard):
    out = []
    for p in dashboard["panels"]:
        if p.get("type") == "row":
            out.extend(p.get("panels", []))
        else:
            out.append(p)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prometheus", required=True)
    ap.add_argument("--start", type=float, required=True)
    ap.add_argument("--end", type=float, required=True)
    ap.add_argument("--step", default="1")
    ap.add_argument("--rate-interval", default="4s")
    ap.add_argument("--dashboard", default=str(HERE / "dashboard.json"))
    ap.add_argument("--out", default=str(HERE / "dashboard.png"))
    ap.add_argument("--columns", type=int, default=3)
    ap.add_argument("--title", default="")
    args = ap.parse_args()

    dashboard = json.loads(Path(args.dashboard).read_text())
    variables = [v["name"] for v in dashboard.get("templating", {}).get("list", [])]
    range_ = f"{int(args.end - args.start)}s"
    panels = panels_of(dashboard)
    rows = math.ceil(len(panels) / args.columns)
    fig, axes = plt.subplots(
        rows, args.columns, figsize=(6.2 * args.columns, 3.3 * rows), squeeze=False
    )
    plt.rcParams.update({"font.size": 8})
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, panel in zip(axes.flat, panels):
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        log = (
            panel.get("fieldConfig", {})
            .get("defaults", {})
            .get("custom", {})
            .get("scaleDistribution", {})
            .get("type")
            == "log"
        )
        drawn = zeros = 0
        for target in panel.get("targets", []):
            expr = substitute(target["expr"], variables, args.rate_interval, range_)
            for series in query_range(args.prometheus, expr, args.start, args.end, args.step):
                points = [(float(t) - args.start, float(v)) for t, v in series["values"]]
                points = [(t, v) for t, v in points if math.isfinite(v)]
                if not points:
                    continue
                if all(v == 0 for _, v in points):
                    zeros += 1
                    continue
                # A gap in the data (no samples: e.g. no reads during a write phase) is a
                # break in the line, as in Grafana, not a straight segment across it.
                xs, ys = [], []
                for t, v in points:
                    if xs and t - xs[-1] > 2 * float(args.step):
                        xs.append(xs[-1] + float(args.step))
                        ys.append(math.nan)
                    xs.append(t)
                    ys.append(v)
                ax.plot(xs, ys, linewidth=1.1, label=legend(target.get("legendFormat"), series["metric"]))
                drawn += 1
        ax.set_title(panel["title"], fontsize=10, loc="left")
        ax.grid(True, alpha=0.3)
        ax.set_xlim(0, args.end - args.start)
        ax.set_xlabel("seconds", fontsize=7)
        ax.tick_params(labelsize=7)
        if log:
            ax.set_yscale("log")
        elif panel.get("fieldConfig", {}).get("defaults", {}).get("min") == 0 and drawn:
            ax.set_ylim(bottom=0, top=max(ax.get_ylim()[1], 1e-9))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _, u=unit: si(v, u)))
        if drawn:
            ax.legend(fontsize=6, loc="upper left", ncol=2 if drawn > 4 else 1, framealpha=0.6)
        note = f"{zeros} series at 0 throughout, not drawn" if zeros else ""
        if not drawn:
            note = f"all {zeros} series at 0 throughout" if zeros else "no series: none occurred"
            ax.set_ylim(0, 1)
        if note:
            ax.text(0.99, 0.02, note, ha="right", va="bottom", transform=ax.transAxes,
                    color="grey", fontsize=7)
    start = datetime.fromtimestamp(args.start).strftime("%Y-%m-%d %H:%M:%S")
    fig.suptitle(
        args.title or f"{dashboard['title']} dashboard, {range_} from {start}",
        fontsize=12,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out} ({len(panels)} panels)", file=sys.stderr)


if __name__ == "__main__":
    main()
