#!/usr/bin/env python3
"""Renders panels of the imdsgate Grafana dashboard to one PNG, straight from a Prometheus.

    scripts/render-dashboard.sh --prometheus http://127.0.0.1:9090 --out docs/dashboard.png \\
        [--range 15m] [--end UNIX_TIME] [--panels "Agent requests by route,Cache hit ratio"]

For each chosen timeseries panel it substitutes Grafana's $__rate_interval, $__interval and
$__range the way Grafana does, runs every target through /api/v1/query_range, and draws the
series as a grid of line charts in Grafana's dark style, legends from each target's legendFormat.

    render-dashboard.py --check [--prometheus URL] [--end UNIX_TIME]

runs every target of every panel (stat panels too) as an instant query instead, with
$__rate_interval, $__interval and $__range as Grafana fills them for a one-hour range (1m, 15s
and 1h at the default 15 s scrape interval); it prints how many series each returned, exits
nonzero if any query errors, draws nothing and does not need matplotlib.

Only the standard library and matplotlib (render-dashboard.sh installs a pinned one in a
virtualenv). Exits nonzero with a message if Prometheus cannot be reached or a query errors.
"""

import argparse
import json
import math
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone

PROG = "render-dashboard"
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DASHBOARD = os.path.join(HERE, "..", "deploy", "helm", "imdsgate", "files", "grafana-dashboard.json")
DEFAULT_PANELS = [
    "Agent requests by route",
    "Agent p99 latency by route",
    "Server requests by code",
    "STS calls by result",
    "Cache hit ratio",
    "Pods indexed",
]

PANEL_WIDTH_IN, PANEL_HEIGHT_IN = 6.4, 3.9  # each panel's share of the figure, at --dpi

# Grafana's dark theme.
BACKGROUND = "#111217"
PANEL = "#181b1f"
BORDER = "#2c3235"
TEXT = "#ccccdc"
TEXT_DIM = "#8e8e9e"
GRID = "#24272c"
PALETTE = [  # Grafana's classic palette
    "#73BF69", "#F2CC0C", "#8AB8FF", "#FF780A", "#F2495C", "#5794F2", "#B877D9", "#705DA0",
    "#37872D", "#FADE2A", "#447EBC", "#C15C17", "#890F02", "#0A437C", "#6D1F62", "#584477",
]
# Grafana's named colors (the ones a fixedColor override usually names).
NAMED_COLORS = {
    "green": "#73BF69", "semi-dark-green": "#56A64B", "dark-green": "#37872D", "light-green": "#96D98D",
    "yellow": "#FADE2A", "semi-dark-yellow": "#F2CC0C", "dark-yellow": "#E0B400", "light-yellow": "#FFEE52",
    "red": "#F2495C", "semi-dark-red": "#E02F44", "dark-red": "#C4162A", "light-red": "#FF7383",
    "blue": "#5794F2", "semi-dark-blue": "#3274D9", "dark-blue": "#1F60C4", "light-blue": "#8AB8FF",
    "orange": "#FF9830", "semi-dark-orange": "#FF780A", "dark-orange": "#FA6400", "light-orange": "#FFB357",
    "purple": "#B877D9", "semi-dark-purple": "#A352CC", "dark-purple": "#8F3BB8", "light-purple": "#CA95E5",
    "text": TEXT, "transparent": "#00000000",
}


class Failure(Exception):
    """A problem to report in one line and exit 1 on."""


class Unreachable(Failure):
    """Prometheus could not be asked at all (every other query would fail the same way)."""


# --- durations and Grafana's interval variables -------------------------------------------------

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def parse_duration(text):
    """'15m', '1h30m', '90s', '2d' -> seconds (float)."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)", text.strip())
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 15m, 1h, 90s, 1h30m)")
    seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"duration must be positive: {text!r}")
    return seconds


def promql_duration(seconds):
    """Seconds -> a PromQL duration literal (whole seconds, or milliseconds below one second)."""
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    seconds = round(seconds)
    out = ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            out += f"{seconds // size}{unit}"
            seconds %= size
    return out


def human_duration(seconds):
    return promql_duration(seconds) if seconds >= 1 else f"{seconds * 1000:g}ms"


# Grafana rounds $__interval to one of these (a subset of its roundInterval()).
_NICE_INTERVALS = [1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600, 900, 1200, 1800, 3600, 7200, 10800,
                   21600, 43200, 86400, 604800]


def grafana_intervals(range_s, scrape_s, max_points):
    """(step = $__interval, $__rate_interval) as Grafana picks them for a panel of max_points points:
    the range over the points rounded to a nice interval, no finer than the scrape interval, and
    $__rate_interval = max($__interval + scrape interval, 4 * scrape interval)."""
    raw = range_s / max_points
    step = next((n for n in _NICE_INTERVALS if n >= raw), _NICE_INTERVALS[-1])
    step = max(step, scrape_s)
    return step, max(step + scrape_s, 4 * scrape_s)


_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


def substitute(expr, step_s, rate_interval_s, range_s):
    """Replaces Grafana's built-in interval variables; any other variable is an error."""
    values = {
        "__interval": promql_duration(step_s),
        "__interval_ms": str(round(step_s * 1000)),
        "__rate_interval": promql_duration(rate_interval_s),
        "__range": promql_duration(range_s),
        "__range_s": str(round(range_s)),
        "__range_ms": str(round(range_s * 1000)),
    }

    def one(match):
        name = match.group(1) or match.group(2)
        if name not in values:
            raise Failure(f"the expression uses the Grafana variable ${name}, which this script cannot fill in: {expr}")
        return values[name]

    return _VARIABLE.sub(one, expr)


# --- the dashboard ------------------------------------------------------------------------------

def load_dashboard(path):
    try:
        with open(path, encoding="utf-8") as f:
            dashboard = json.load(f)
    except OSError as e:
        raise Failure(f"cannot read the dashboard {path}: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise Failure(f"the dashboard {path} is not valid JSON: {e}") from e
    if "dashboard" in dashboard and "panels" not in dashboard:  # an API export wraps it
        dashboard = dashboard["dashboard"]
    return dashboard


def all_panels(dashboard):
    """Every panel, including those inside collapsed rows, in dashboard order."""
    out = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def choose_panels(dashboard, titles):
    timeseries = [p for p in all_panels(dashboard) if p.get("type") == "timeseries"]
    chosen = []
    for title in titles:
        wanted = title.strip().lower()
        exact = [p for p in timeseries if p.get("title", "").lower() == wanted]
        partial = [p for p in timeseries if wanted in p.get("title", "").lower()]
        matches = exact or partial
        if len(matches) != 1:
            others = [p for p in all_panels(dashboard) if p.get("title", "").lower() == wanted]
            if others and not exact:
                raise Failure(f"panel {title!r} is a {others[0].get('type')} panel; only timeseries panels are drawn")
            how = "no" if not matches else "more than one"
            names = "\n  ".join(p.get("title", "?") for p in timeseries)
            raise Failure(f"{how} timeseries panel matches {title!r}; the dashboard has:\n  {names}")
        chosen.append(matches[0])
    return chosen


# --- Prometheus -----------------------------------------------------------------------------------

def prometheus_get(base, path, params, timeout):
    url = base.rstrip("/") + path + "?" + urllib.parse.urlencode(params)
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            answer = json.loads(body)
        except ValueError:
            raise Unreachable(f"Prometheus at {base} answered HTTP {e.code} to {path}: {body[:200]!r}") from e
        raise Failure(f"{answer.get('errorType', 'error')}: {answer.get('error', body[:200])}") from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise Unreachable(f"cannot reach Prometheus at {base}: {reason}") from e
    try:
        answer = json.loads(body)
    except ValueError as e:
        raise Unreachable(f"{base}{path} did not answer JSON; is {base} a Prometheus? ({body[:120]!r})") from e
    if answer.get("status") != "success":
        raise Failure(f"{answer.get('errorType', 'error')}: {answer.get('error', answer)}")
    for note in answer.get("warnings", []):  # "infos" (e.g. histogram_quantile fixing buckets) are left out
        print(f"{PROG}: Prometheus says: {note}", file=sys.stderr)
    return answer["data"]


def run_target(base, panel, expr, params, path, timeout):
    try:
        return prometheus_get(base, path, dict(params, query=expr), timeout)
    except Unreachable:
        raise
    except Failure as e:
        raise Failure(f"panel {panel.get('title')!r}: query failed: {e}\n  query: {expr}") from e


def legend(fmt, labels, expr):
    if fmt and fmt != "__auto":
        return re.sub(r"\{\{\s*([\w.]+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip() or expr
    name = labels.get("__name__", "")
    rest = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__")
    return (name + ("{" + rest + "}" if rest else "")) or expr


def fetch_panel(base, panel, start, end, step, rate_interval, range_s, timeout):
    """[(legend, [unix times], [values])] for the panel's visible targets."""
    series = []
    for target in panel.get("targets", []):
        if target.get("hide") or not target.get("expr"):
            continue
        expr = substitute(target["expr"], step, rate_interval, range_s)
        params = {"start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
        data = run_target(base, panel, expr, params, "/api/v1/query_range", timeout)
        if data.get("resultType") != "matrix":
            raise Failure(f"panel {panel.get('title')!r}: expected a range vector, got {data.get('resultType')}")
        found = []
        for result in data["result"]:
            times, values = [], []
            for t, v in result.get("values", []):
                value = float(v)
                if times and t - times[-1] > 1.5 * step:  # a gap: break the line
                    times.append((times[-1] + t) / 2)
                    values.append(math.nan)
                times.append(float(t))
                values.append(value if math.isfinite(value) else math.nan)
            found.append((legend(target.get("legendFormat", ""), result.get("metric", {}), expr), times, values))
        series.extend(sorted(found, key=lambda s: s[0]))
    return series


def check(base, dashboard, end, scrape_s, timeout):
    """Runs every target of every panel as an instant query; returns the number that failed."""
    range_s = 3600
    step, rate_interval = grafana_intervals(range_s, scrape_s, 240)
    failed = 0
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            if not target.get("expr"):
                continue
            try:
                expr = substitute(target["expr"], step, rate_interval, range_s)
                data = run_target(base, panel, expr, {"time": f"{end:.3f}"}, "/api/v1/query", timeout)
            except Unreachable:
                raise
            except Failure as e:
                print(f"FAIL {e}", file=sys.stderr)
                failed += 1
                continue
            print(f"ok   {panel.get('title')} [{target.get('refId')}]: {len(data['result'])} series")
    return failed


# --- drawing --------------------------------------------------------------------------------------

def _si(value, digits=3):
    if value == 0:
        return "0"
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.{digits}g}{suffix}"
    return f"{value:.{digits}g}"


def _seconds(value):
    if value == 0:
        return "0"
    for size, suffix in ((86400, " d"), (3600, " h"), (60, " min"), (1, " s"), (1e-3, " ms"), (1e-6, " µs")):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value * 1e9:.3g} ns"


def unit_formatter(unit):
    """A tick label function for a Grafana unit (the ones this dashboard uses, and a few more)."""
    suffixes = {"reqps": " req/s", "ops": " ops/s", "opm": " ops/min", "reqpm": " req/min", "rps": " rd/s",
                "wps": " wr/s", "bytes": " B", "decbytes": " B", "bps": " b/s", "Bps": " B/s"}
    if unit == "percentunit":
        return lambda v, _: f"{v * 100:.3g}%"
    if unit == "percent":
        return lambda v, _: f"{v:.3g}%"
    if unit == "s":
        return lambda v, _: _seconds(v)
    if unit == "ms":
        return lambda v, _: _seconds(v / 1000)
    suffix = suffixes.get(unit, "")
    return lambda v, _: _si(v) + (suffix if v else "")


def series_overrides(panel):
    """[(matches(name) -> bool, property id, value)] from the panel's byName/byRegexp overrides."""
    rules = []
    for override in panel.get("fieldConfig", {}).get("overrides", []):
        matcher = override.get("matcher", {})
        option = matcher.get("options")
        if not isinstance(option, str):
            continue
        if matcher.get("id") == "byName":
            match = option.__eq__
        elif matcher.get("id") == "byRegexp":
            try:
                match = re.compile(option).search
            except re.error:
                continue
        else:
            continue
        for prop in override.get("properties", []):
            rules.append((match, prop.get("id"), prop.get("value")))
    return rules


def series_style(rules, name, index):
    """(color, linestyle) of one series: the palette's next color and a solid line unless overridden."""
    color, style = PALETTE[index % len(PALETTE)], "-"
    for match, prop, value in rules:
        if not isinstance(value, dict) or not match(name):
            continue
        if prop == "color" and value.get("fixedColor"):
            color = NAMED_COLORS.get(value["fixedColor"], value["fixedColor"])
        elif prop == "custom.lineStyle" and value.get("fill") in ("dash", "dot"):
            style = "--" if value["fill"] == "dash" else ":"
    return color, style


def draw(panels, data, start, end, range_s, step, out, columns, dpi):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.dates as mdates
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator
    except ImportError as e:
        raise Failure("matplotlib is not installed here; run scripts/render-dashboard.sh, which installs a "
                      f"pinned one in a virtualenv ({e})") from e

    columns = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / columns)
    plt.rcParams.update({
        "font.family": "DejaVu Sans",
        "font.size": 9,
        "text.color": TEXT,
        "axes.labelcolor": TEXT,
        "xtick.color": TEXT_DIM,
        "ytick.color": TEXT_DIM,
        "axes.edgecolor": BORDER,
    })
    fig, axes = plt.subplots(rows, columns, figsize=(PANEL_WIDTH_IN * columns, PANEL_HEIGHT_IN * rows + 0.5), dpi=dpi,
                             squeeze=False, layout="constrained", facecolor=BACKGROUND)
    fig.get_layout_engine().set(w_pad=0.12, h_pad=0.12, wspace=0.02, hspace=0.04)
    utc = timezone.utc
    start_dt, end_dt = datetime.fromtimestamp(start, utc), datetime.fromtimestamp(end, utc)
    same_day = start_dt.date() == end_dt.date()
    span = (f"{start_dt:%Y-%m-%d %H:%M} to {end_dt:%H:%M} UTC" if same_day
            else f"{start_dt:%Y-%m-%d %H:%M} to {end_dt:%Y-%m-%d %H:%M} UTC")
    fig.suptitle(f"imdsgate   ·   {span}   ·   range {human_duration(range_s)}, step {human_duration(step)}",
                 x=0.01, ha="left", fontsize=13, color=TEXT, fontweight="bold")

    for index, ax in enumerate(axes.flat):
        if index >= len(panels):
            ax.set_visible(False)
            continue
        panel, series = panels[index], data[index]
        defaults = panel.get("fieldConfig", {}).get("defaults", {})
        custom = defaults.get("custom", {})
        fill = float(custom.get("fillOpacity", 0)) / 100
        width = max(1.0, float(custom.get("lineWidth", 1)) * 1.3)
        ax.set_facecolor(PANEL)
        for spine in ax.spines.values():
            spine.set_color(BORDER)
        ax.set_title(panel.get("title", ""), loc="left", fontsize=10.5, color=TEXT, pad=8)
        ax.grid(True, color=GRID, linewidth=0.8)
        ax.set_axisbelow(True)
        ax.tick_params(length=0, labelsize=8)
        ax.set_xlim(start_dt, end_dt)
        locator = mdates.AutoDateLocator(tz=utc, minticks=4, maxticks=8)
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M" if range_s <= 2 * 86400 else "%m-%d %H:%M", tz=utc))
        log = custom.get("scaleDistribution", {}).get("type") == "log"
        if log:
            ax.set_yscale("log", base=custom.get("scaleDistribution", {}).get("log", 10))
            ax.yaxis.set_major_locator(LogLocator(base=custom.get("scaleDistribution", {}).get("log", 10)))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        else:
            ax.yaxis.set_major_locator(MaxNLocator(nbins=5, integer=defaults.get("decimals") == 0))
        ax.yaxis.set_major_formatter(FuncFormatter(unit_formatter(defaults.get("unit", "short"))))
        rules = series_overrides(panel)

        drawn = 0
        finite = []
        for n, (name, times, values) in enumerate(series):
            color, style = series_style(rules, name, n)
            when = [datetime.fromtimestamp(t, utc) for t in times]
            if log:  # nothing at or below zero on a log axis
                values = [v if v > 0 else math.nan for v in values]
            ax.plot(when, values, color=color, linestyle=style, linewidth=width, label=name)
            if fill and not log:
                ax.fill_between(when, values, 0, color=color, alpha=fill, linewidth=0)
            good = [v for v in values if not math.isnan(v)]
            finite.extend(good)
            drawn += bool(good)
        if not drawn:
            ax.text(0.5, 0.5, "No data", transform=ax.transAxes, ha="center", va="center", color=TEXT_DIM, fontsize=12)
            ax.set_ylim(0, 1)
            continue
        low, high = defaults.get("min"), defaults.get("max")
        top, bottom = max(finite), min(finite)
        if log:
            low = low if low is not None and low > 0 else bottom / 1.5
            high = high if high is not None else top * 1.5
            if high <= low:
                high = low * 10
        else:
            if low is None:
                low = min(0, bottom)
            if high is None:
                high = top * 1.08 if top > low else low + 1
        ax.set_ylim(low, high)
        # As many legend columns as fit under the panel (about 0.07 inch a character at 8 points), so that
        # long names wrap into rows instead of squeezing the plot.
        longest = max(len(name) for name, _, _ in series)
        fits = int(PANEL_WIDTH_IN * 0.85 // (longest * 0.068 + 0.45))
        ax.legend(loc="upper left", bbox_to_anchor=(0, -0.09), ncol=max(1, min(len(series), fits, 4)),
                  frameon=False, fontsize=8, handlelength=1.0, handletextpad=0.4, columnspacing=1.2,
                  borderaxespad=0, labelcolor=TEXT)

    directory = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(directory, exist_ok=True)
        fig.savefig(out, facecolor=BACKGROUND)
    except OSError as e:
        raise Failure(f"cannot write {out}: {e.strerror}") from e
    plt.close(fig)


# --- main -----------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="render-dashboard.py",
        description="Render timeseries panels of the imdsgate Grafana dashboard to a PNG from a Prometheus.",
    )
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus base URL (default %(default)s)")
    parser.add_argument("--dashboard", default=os.path.normpath(DEFAULT_DASHBOARD),
                        help="dashboard JSON (default: the Helm chart's, %(default)s)")
    parser.add_argument("--out", default="docs/dashboard.png", help="PNG to write (default %(default)s)")
    parser.add_argument("--range", dest="range_s", type=parse_duration, default=parse_duration("15m"),
                        metavar="DURATION", help="time range ending at --end, e.g. 15m, 3h (default 15m)")
    parser.add_argument("--end", type=float, default=None, metavar="UNIX_TIME",
                        help="end of the range in Unix seconds (default: now)")
    parser.add_argument("--panels", default=",".join(DEFAULT_PANELS), metavar="TITLE,...",
                        help="comma-separated titles of timeseries panels (case-insensitive; a unique part of "
                             "a title will do). Default: " + ", ".join(DEFAULT_PANELS))
    parser.add_argument("--scrape-interval", type=parse_duration, default=parse_duration("15s"), metavar="DURATION",
                        help="the data source's scrape interval, for $__rate_interval as Grafana computes it "
                             "(default 15s)")
    parser.add_argument("--points", type=int, default=240,
                        help="about how many points per series; sets $__interval (default %(default)s)")
    parser.add_argument("--columns", type=int, default=3, help="panels per row of the grid (default %(default)s)")
    parser.add_argument("--dpi", type=int, default=100, help="resolution of the PNG (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=30, help="seconds to wait for each query (default %(default)s)")
    parser.add_argument("--check", action="store_true",
                        help="run every target of every panel as an instant query at --end, draw nothing, and "
                             "exit nonzero if any fails")
    args = parser.parse_args(argv)
    if args.points < 1 or args.columns < 1 or args.dpi < 10:
        parser.error("--points and --columns must be positive, --dpi at least 10")

    try:
        dashboard = load_dashboard(args.dashboard)
        end = args.end if args.end is not None else time.time()
        if args.check:
            failed = check(args.prometheus, dashboard, end, args.scrape_interval, args.timeout)
            if failed:
                raise Failure(f"{failed} quer{'y' if failed == 1 else 'ies'} failed")
            return 0
        titles = [t for t in args.panels.split(",") if t.strip()]
        if not titles:
            raise Failure("--panels names no panel")
        panels = choose_panels(dashboard, titles)
        start = end - args.range_s
        step, rate_interval = grafana_intervals(args.range_s, args.scrape_interval, args.points)
        data = []
        for panel in panels:
            series = fetch_panel(args.prometheus, panel, start, end, step, rate_interval, args.range_s, args.timeout)
            print(f"{PROG}: {panel.get('title')}: {len(series)} series", file=sys.stderr)
            data.append(series)
        draw(panels, data, start, end, args.range_s, step, args.out, args.columns, args.dpi)
        print(f"{PROG}: wrote {args.out}", file=sys.stderr)
        return 0
    except Failure as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
