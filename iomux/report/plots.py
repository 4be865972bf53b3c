"""The two plots of report.html, drawn with matplotlib when it is installed.

The data comes from each target's recorded probe output, in the shapes of
DESIGN.md section 7 (``wait_cost`` and ``level_edge``). A target whose probe
output is missing or malformed is left out of a plot (with a note), never an
error: a run whose probes failed must still get its report. matplotlib is
imported only here and only when there is something to draw, so the rest of
the package stays standard-library only.
"""

from __future__ import annotations

import base64
import io
import math
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from iomux.report import model

MATPLOTLIB_MISSING = "plots not drawn: matplotlib is not installed"

# One colour per mechanism family; the edge-triggered variant is the lighter shade,
# so that LT/ET pairs read as pairs in both plots.
COLOURS = {
    "select": "#c0392b",
    "poll": "#e67e22",
    "epoll": "#1f5fa8",
    "epoll-et": "#7fb2e5",
    "kqueue": "#1e8449",
    "kqueue-et": "#82d19b",
}
FALLBACK_COLOURS = ["#8e44ad", "#7f8c8d", "#b7950b", "#17a589"]
SCENARIOS = [
    ("byte", "one unread byte"),
    ("listen", "10 pending connections, 1 accepted"),
]


class Plot:
    """One drawn plot: a title, a caption (HTML-escaped by the caller) and PNG bytes."""

    def __init__(self, title: str, caption: str, png: bytes) -> None:
        self.title = title
        self.caption = caption
        self.png = png

    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


def _number(value: Any) -> Optional[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _colour(backend: str, others: List[str]) -> str:
    if backend in COLOURS:
        return COLOURS[backend]
    return FALLBACK_COLOURS[others.index(backend) % len(FALLBACK_COLOURS)]


# Per target: (name, idle counts, backend -> seconds per wait or None, note key -> note).
WaitSeries = Tuple[str, List[float], Dict[str, List[Optional[float]]], Dict[str, str]]
# Per target: (name, scenario -> backend -> notifications or None, waits per scenario).
EdgeSeries = Tuple[str, Dict[str, Dict[str, Optional[float]]], Optional[float]]


def _sections(results: Dict[str, Any], probe: str, notes: List[str]) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """(target name, probe output) for each target that recorded ``probe``; failures become notes."""
    for t in model.targets(results):
        section = model.probe_section(t, probe)
        if section is None:
            continue
        if "error" in section:
            notes.append(f"{t.get('name')}: the {probe} probe failed: {section['error']}")
            continue
        yield str(t.get("name")), section


def wait_cost_data(results: Dict[str, Any]) -> Tuple[List[WaitSeries], List[str]]:
    """The wait_cost series of every target that has a usable one, and notes on the others."""
    series: List[WaitSeries] = []
    notes: List[str] = []
    for name, section in _sections(results, "wait_cost", notes):
        counts = section.get("idle_counts")
        backends = section.get("backends")
        if not isinstance(counts, list) or not isinstance(backends, dict) or not counts:
            notes.append(f"{name}: wait_cost has no idle_counts/backends")
            continue
        xs = [_number(c) for c in counts]
        lines: Dict[str, List[Optional[float]]] = {}
        for backend, values in backends.items():
            if isinstance(values, list) and len(values) == len(counts):
                lines[str(backend)] = [_number(v) for v in values]
            else:
                notes.append(f"{name}: wait_cost[{backend}] does not match idle_counts")
        if any(x is None for x in xs) or not lines:
            notes.append(f"{name}: wait_cost is not numeric")
            continue
        if not any(v for values in lines.values() for v in values):
            notes.append(f"{name}: wait_cost measured nothing")
            continue
        # "notes" is what iomux.probes records; "why" is the older spelling of DESIGN.md 7.
        why_map = section.get("notes", section.get("why"))
        why: Dict[str, Any] = why_map if isinstance(why_map, dict) else {}
        series.append((name, [float(x or 0) for x in xs], lines, {str(k): str(v) for k, v in why.items()}))
    return series, notes


def level_edge_data(results: Dict[str, Any]) -> Tuple[List[EdgeSeries], List[str]]:
    """The level_edge counts of every target that has usable ones, and notes on the others."""
    series: List[EdgeSeries] = []
    notes: List[str] = []
    for name, section in _sections(results, "level_edge", notes):
        scenarios: Dict[str, Dict[str, Optional[float]]] = {}
        for key, _ in SCENARIOS:
            values = section.get(key)
            if isinstance(values, dict):
                scenarios[key] = {str(b): _number(v) for b, v in values.items()}
        if not scenarios:
            notes.append(f"{name}: level_edge has neither 'byte' nor 'listen'")
            continue
        series.append((name, scenarios, _number(section.get("waits"))))
    return series, notes


def draw(results: Dict[str, Any]) -> Tuple[List[Plot], List[str]]:
    """Draw every plot the data allows.

    Returns:
        The plots, and notes for the reader (targets left out and why, or
        MATPLOTLIB_MISSING when there was data but no matplotlib).
    """
    waits, wait_notes = wait_cost_data(results)
    edges, edge_notes = level_edge_data(results)
    notes = wait_notes + edge_notes
    if not waits and not edges:
        return [], notes
    try:
        from matplotlib.figure import Figure  # noqa: F401  (probe for the import only)
    except ImportError:
        return [], [MATPLOTLIB_MISSING, *notes]
    jobs: List[Tuple[str, Callable[[], Plot]]] = []
    if waits:
        jobs.append(("wait cost", lambda: _wait_cost_plot(waits)))
    if edges:
        jobs.append(("level/edge", lambda: _level_edge_plot(edges)))
    plots = []
    for title, drawer in jobs:
        try:
            plots.append(drawer())
        except Exception as exc:  # a plot must never cost the run its report
            notes.append(f"{title} plot not drawn: {type(exc).__name__}: {exc}")
    return plots, notes


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    try:
        return Figure(figsize=(width, height), layout="constrained")
    except TypeError:  # matplotlib < 3.5 has only the older keyword
        return Figure(figsize=(width, height), constrained_layout=True)


def _legend(fig: Any, handles: List[Any], labels: List[str]) -> None:
    # Below the axes; savefig(bbox_inches="tight") grows the image to include it,
    # which works the same on every matplotlib since 3.0.
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=max(len(labels), 1), frameon=False)


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _wait_cost_plot(series: List[WaitSeries]) -> Plot:
    # The object-oriented API with no pyplot: no global backend switch and no
    # figure registry, so the harness process's own matplotlib state is untouched.
    from matplotlib.ticker import FuncFormatter

    ncols = min(len(series), 3)
    nrows = math.ceil(len(series) / ncols)
    fig = _figure(4.3 * ncols, 3.3 * nrows)
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False)
    others = sorted({b for _, _, lines, _ in series for b in lines if b not in COLOURS})
    handles: Dict[str, Any] = {}
    for ax, (name, counts, lines, _) in zip(axes.flat, series):
        # Idle counts step by 10x, so evenly spaced positions are a log axis that
        # can also show N = 0.
        positions = list(range(len(counts)))
        order = [b for b in COLOURS if b in lines] + sorted(b for b in lines if b not in COLOURS)
        for backend in order:
            micro = [v * 1e6 if v is not None and v > 0 else None for v in lines[backend]]
            pts = [(x, y) for x, y in zip(positions, micro) if y is not None]
            if not pts:
                continue
            (line,) = ax.plot(
                [p[0] for p in pts], [p[1] for p in pts], marker="o", linewidth=1.8,
                markersize=4, color=_colour(backend, others),
                linestyle="--" if backend.endswith("-et") else "-", label=backend,
            )
            handles.setdefault(backend, line)
        ax.set_yscale("log")
        ax.set_xticks(positions)
        ax.set_xticklabels([f"{int(c):,}" for c in counts])
        ax.set_xlim(-0.3, len(counts) - 0.7)
        ax.set_title(name, fontsize=11)
        ax.set_xlabel("idle fds")
        ax.grid(True, which="major", alpha=0.35)
        ax.grid(True, which="minor", axis="y", alpha=0.12)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    for ax in axes[:, 0]:
        ax.set_ylabel("µs per wait (log)")
    for ax in list(axes.flat)[len(series):]:
        ax.set_visible(False)
    _legend(fig, list(handles.values()), list(handles.keys()))
    # Group identical notes: "kqueue: no kqueue (debian-12, debian-13)" once, not per target.
    grouped: Dict[Tuple[str, str], List[str]] = {}
    for name, _, _, reasons in series:
        for key, reason in reasons.items():
            grouped.setdefault((key, reason), []).append(name)
    caption = (
        "Time per wait with one active socket pair and N idle ones, per backend "
        "(log scale; lower is better). A missing point was not measured."
    )
    if grouped:
        caption += " Notes: " + "; ".join(
            f"{key}: {reason} ({', '.join(names)})" for (key, reason), names in grouped.items()
        ) + "."
    return Plot("Wait cost against idle fds", caption, _png(fig))


def _level_edge_plot(series: List[EdgeSeries]) -> Plot:
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    names = [s[0] for s in series]
    present = {b for _, sc, _ in series for v in sc.values() for b in v}
    backends = [b for b in model.KNOWN_BACKENDS if b in present] + sorted(present - set(model.KNOWN_BACKENDS))
    others = [b for b in backends if b not in COLOURS]
    width = 0.8 / max(len(backends), 1)
    # Side by side while it fits; with more targets the scenarios stack, so the
    # image keeps a width a browser shows without shrinking the text.
    stacked = len(names) > 2
    group = 0.35 + 0.22 * len(backends)
    if stacked:
        fig = _figure(min(max(8.0, group * len(names) + 1.5), 16.0), 6.4)
        axes = list(fig.subplots(len(SCENARIOS), 1, sharey=True, squeeze=False)[:, 0])
    else:
        fig = _figure(max(6.5, 2 * (group * len(names) + 0.8)), 3.6)
        axes = list(fig.subplots(1, len(SCENARIOS), sharey=True, squeeze=False)[0])
    waits = {w for _, _, w in series if w is not None}
    top = max([w for w in waits] + [v or 0 for _, sc, _ in series for d in sc.values() for v in d.values()] + [1])
    for ax, (key, label) in zip(axes, SCENARIOS):
        labelled: set[str] = set()
        for i, backend in enumerate(backends):
            offset = (i - (len(backends) - 1) / 2) * width
            for x, (_, scenarios, _) in enumerate(series):
                value = scenarios.get(key, {}).get(backend)
                xpos = x + offset
                if value is None:
                    # Say "n/a" rather than draw a zero bar: zero would be a claim.
                    if backend in scenarios.get(key, {}):
                        ax.text(xpos, 0.05, "n/a", ha="center", va="bottom", fontsize=7, rotation=90, color="#777")
                    continue
                ax.bar(
                    xpos, value, width * 0.92, color=_colour(backend, others),
                    hatch="//" if backend.endswith("-et") else None, edgecolor="white",
                    label=None if backend in labelled else backend,
                )
                labelled.add(backend)
                ax.text(xpos, value + top * 0.02, f"{value:g}", ha="center", va="bottom", fontsize=8)
        for w in waits:
            ax.axhline(w, color="#555", linewidth=0.8, linestyle=":")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names)
        ax.set_xlim(-0.5, len(names) - 0.5)
        ax.set_ylim(0, top * 1.2)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(label, fontsize=11)
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    for ax in axes if stacked else axes[:1]:
        ax.set_ylabel("notifications")
    seen: Dict[str, Any] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    # A backend with no bar anywhere (kqueue on an all-Linux run) still gets a
    # legend entry, so its absence reads as "n/a", not as forgotten.
    labels = [b if b in seen else f"{b} (n/a)" for b in backends]
    handles = [
        seen[b] if b in seen else Patch(facecolor=_colour(b, others), alpha=0.35,
                                        hatch="//" if b.endswith("-et") else None, edgecolor="white")
        for b in backends
    ]
    _legend(fig, handles, labels)
    wait_text = " / ".join(f"{w:g}" for w in sorted(waits)) or "?"
    caption = (
        f"Notifications over {wait_text} waits (dotted line): level-triggered reports a ready "
        "fd on every wait, edge-triggered once per change. n/a: the backend does not exist "
        "on that kernel."
    )
    return Plot("Level- against edge-triggered notifications", caption, _png(fig))


def slowdown_plot(results: Dict[str, Any]) -> Tuple[Optional[Plot], List[str]]:
    """The slowdown of each target against the host, per figure, as grouped bars (log scale).

    Returns (the plot or None, notes); None with MATPLOTLIB_MISSING when
    matplotlib is not installed, and None without a note when there is nothing
    to compare (no host target, or no other target with figures).
    """
    host, slow = model.slowdown(results)
    if not slow:
        return None, []
    try:
        from matplotlib.figure import Figure  # noqa: F401  (probe for the import only)
    except ImportError:
        return None, [MATPLOTLIB_MISSING]
    try:
        return _slowdown_plot(str(host), slow), []
    except Exception as exc:  # a plot must never cost the run its report
        return None, [f"slowdown plot not drawn: {type(exc).__name__}: {exc}"]


def _slowdown_plot(host: str, slow: List[Tuple[str, Dict[str, float]]]) -> Plot:
    metrics = sorted({k for _, r in slow for k in r})
    palette = ["#1f5fa8", "#e67e22", "#1e8449", "#8e44ad", "#c0392b", "#7f8c8d"]
    width = 0.8 / max(len(metrics), 1)
    fig = _figure(max(6.5, 1.1 * len(slow) * max(len(metrics), 1) * 0.45 + 2), 3.8)
    ax = fig.subplots()
    for i, metric in enumerate(metrics):
        xs: List[float] = []
        ys: List[float] = []
        for x, (_, ratios) in enumerate(slow):
            if metric in ratios:
                xs.append(x + (i - (len(metrics) - 1) / 2) * width)
                ys.append(ratios[metric])
        ax.bar(xs, ys, width * 0.92, color=palette[i % len(palette)], label=metric)
        for xp, yp in zip(xs, ys):
            ax.text(xp, yp, f"{yp:.3g}", ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="#555", linewidth=0.8, linestyle=":")
    ax.set_yscale("log")
    ax.set_xticks(range(len(slow)))
    ax.set_xticklabels([name for name, _ in slow])
    ax.set_ylabel(f"time / time on {host} (log)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    handles, labels = ax.get_legend_handles_labels()
    _legend(fig, handles, labels)
    caption = (f"How much slower each target is than the host ({host}) on figures the suites "
               "already measure: one epoll_wait with one ready fd and a poll over 1,000 fds "
               "(wait_cost probe), one epoll_ctl (registration probe), the whole probe suite's "
               "wall time, and the median ratio of the in-guest tests both ran. The dotted line "
               "is 1x. Figures from one run on a shared machine: a single timing can be off by a "
               "few times where other targets ran at once; the suite-level ones are steadier.")
    return Plot("Slowdown against the host", caption, _png(fig))
