"""The evaluation report: one self-contained HTML file per dataset that answers "which checkpoint do I keep?".

Why one file with everything inlined: it is opened from a file manager, mailed, or attached to an issue, so
it must not depend on a server, a CDN or the folders beside it (images are base64 data URLs, scaled down;
links to the full-size files are relative and only a convenience). Its Content-Security-Policy forbids any
fetch, so a page that renders is a page that is complete.

Why byte-identical output: the asset's data version is the file's hash, so a re-run on unchanged inputs must
leave everything downstream synced. No timestamps, every list in a fixed order, images encoded the same way.

Each section renders only from inputs that exist; a missing or unreadable input becomes "not available: <why>"
in its section, never an exception, because a report is most useful exactly when something went wrong.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pandas as pd
import yaml

from common.atomic import write_text
from common.images import thumbnail_data_url

# (id, heading) in page order.
SECTIONS: tuple[tuple[str, str], ...] = (
    ("grid", "Evaluation grid"),
    ("loss", "Loss curves"),
    ("metrics", "Metrics per checkpoint"),
    ("settings", "Settings"),
    ("tags", "Tag frequency"),
    ("skipped", "Skipped images"),
)
METRIC_COLUMNS = ("method", "step", "checkpoint", "training_loss", "validation_loss",
                  "clip_image_similarity", "clip_text_similarity", "concept_tag_score", "best")
VALIDATION_COLUMNS = ("step", "validation_loss", "training_loss")
GRID_MAX_SIDE = 1600
LOSS_MAX_SIDE = 900
MAX_PNG_BYTES = 600_000  # above this an inlined image is stored as JPEG, so a report of big grids stays light


@dataclass(frozen=True)
class ReportInputs:
    """Where the report's evidence is; every file is optional.

    `grids`, `loss_curves` and `validation` map a label (the method, or the grid's name) to a file.
    `missing` gives, per section id, why an input is absent when the caller knows better than "file not
    found" (e.g. "no validation split: preprocess.validation_fraction is 0").
    """

    dataset: str
    base_model: str = ""
    methods: Sequence[str] = ()
    grids: Mapping[str, Path] = field(default_factory=dict)
    loss_curves: Mapping[str, Path] = field(default_factory=dict)
    validation: Mapping[str, Path] = field(default_factory=dict)
    metrics: Path | None = None
    metrics_chart: Path | None = None
    settings: Mapping[str, object] | None = None
    tag_frequency: Path | None = None
    manifest: Path | None = None
    top_tags: int = 30
    missing: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RenderedReport:
    html: str
    available: dict[str, bool]  # section id -> rendered from its inputs (False: "not available")
    best: str | None  # the best checkpoint's description, when the metrics name one


class _Unavailable(Exception):
    """Raised inside a section's renderer: the section shows "not available: <message>"."""


def write_report(out_path: str | os.PathLike[str], inputs: ReportInputs) -> Path:
    """Render the report and write it atomically to `out_path`; links are relative to its folder."""
    out_path = Path(out_path)
    write_text(out_path, render_report(inputs, out_path.parent).html)
    return out_path


def render_report(inputs: ReportInputs, report_dir: Path) -> RenderedReport:
    """The whole page as text, and which sections had their inputs."""
    context = _Context(inputs, Path(report_dir))
    renderers = {
        "grid": context.grid,
        "loss": context.loss,
        "metrics": context.metrics,
        "settings": context.settings,
        "tags": context.tags,
        "skipped": context.skipped,
    }
    available: dict[str, bool] = {}
    bodies: list[str] = []
    for section_id, heading in SECTIONS:
        try:
            body = renderers[section_id]()
            available[section_id] = True
        except _Unavailable as why:
            body = _not_available(str(why))
            available[section_id] = False
        bodies.append(f'<section id="{section_id}" data-available="{str(available[section_id]).lower()}">\n'
                      f"<h2>{heading}</h2>\n{body}\n</section>")
    page = _PAGE.format(
        title=_e(f"Evaluation report: {inputs.dataset}"),
        subtitle=_subtitle(inputs, context.methods()),
        nav=" ".join(f'<a href="#{section_id}">{heading}</a>' for section_id, heading in SECTIONS),
        style=_STYLE,
        sections="\n".join(bodies),
    )
    return RenderedReport(html=page, available=available, best=context.best)


class _Context:
    def __init__(self, inputs: ReportInputs, report_dir: Path) -> None:
        self.inputs = inputs
        self.report_dir = report_dir
        self.best: str | None = None
        self._metrics: pd.DataFrame | None = None

    # ----- inputs -----

    def _why(self, section: str, default: str) -> str:
        hint = self.inputs.missing.get(section)
        return f"{default} ({hint})" if hint else default

    def _existing(self, section: str, path: Path | None, what: str) -> Path:
        if path is None:
            raise _Unavailable(self._why(section, f"no {what} was given"))
        if not Path(path).is_file():
            raise _Unavailable(self._why(section, f"{self._rel(path)} does not exist"))
        return Path(path)

    def _table(self, section: str, path: Path | None, what: str) -> pd.DataFrame:
        path = self._existing(section, path, what)
        try:
            return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
        except Exception as error:  # noqa: BLE001 - any unreadable file becomes the section's reason
            raise _Unavailable(f"cannot read {self._rel(path)}: {_one_line(error)}") from error

    def metrics_frame(self) -> pd.DataFrame | None:
        if self._metrics is None and self.inputs.metrics is not None and Path(self.inputs.metrics).is_file():
            try:
                self._metrics = _ordered_metrics(pd.read_parquet(self.inputs.metrics))
            except Exception:  # noqa: BLE001 - reported by the metrics section itself
                return None
        return self._metrics

    def methods(self) -> list[str]:
        names = set(self.inputs.methods)
        frame = self.metrics_frame()
        if frame is not None and "method" in frame.columns:
            names |= {str(name) for name in frame["method"].dropna()}
        return sorted(names)

    def _rel(self, path: Path) -> str:
        return Path(os.path.relpath(Path(path).resolve(), self.report_dir.resolve())).as_posix()

    def _href(self, path: Path) -> str:
        return _e(quote(self._rel(path)))

    def _figure(self, path: Path, caption: str, max_side: int) -> str:
        try:
            source = thumbnail_data_url(Path(path), max_side=max_side, max_png_bytes=MAX_PNG_BYTES)
        except Exception as error:  # noqa: BLE001 - a truncated or non-image file: say so, render the rest
            return _not_available(f"cannot read {self._rel(path)}: {_one_line(error)}")
        return (f'<figure><a href="{self._href(path)}"><img src="{source}" alt="{_e(caption)}"></a>\n'
                f'<figcaption>{_e(caption)}: <a href="{self._href(path)}">{_e(self._rel(path))}</a> '
                f"(full size)</figcaption></figure>")

    # ----- sections -----

    def grid(self) -> str:
        grids = sorted(self.inputs.grids.items())
        if not grids:
            raise _Unavailable(self._why("grid", "no evaluation grid image was found"))
        parts = []
        for label, path in grids:
            if Path(path).is_file():
                parts.append(f"<h3>{_e(label)}</h3>\n" + self._figure(Path(path), label, GRID_MAX_SIDE))
            else:
                parts.append(f"<h3>{_e(label)}</h3>\n" + _not_available(f"{self._rel(path)} does not exist"))
        return "\n".join(parts)

    def loss(self) -> str:
        methods = sorted(set(self.inputs.loss_curves) | set(self.inputs.validation))
        if not methods:
            raise _Unavailable(self._why("loss", "no training run has written a loss curve yet"))
        parts = []
        for method in methods:
            parts.append(f"<h3>{_e(method)}</h3>")
            curve = self.inputs.loss_curves.get(method)
            if curve is not None and Path(curve).is_file():
                parts.append(self._figure(Path(curve), f"training loss: {method}", LOSS_MAX_SIDE))
            else:
                where = f"{self._rel(curve)} does not exist" if curve is not None else "no loss.png"
                parts.append(_not_available(f"training loss curve: {where}"))
            parts.append(self._validation(method))
        return "\n".join(parts)

    def _validation(self, method: str) -> str:
        try:
            frame = self._table("validation", self.inputs.validation.get(method), "validation.csv")
            absent = [column for column in VALIDATION_COLUMNS if column not in frame.columns]
            if absent:
                raise _Unavailable(f"the validation table lacks {', '.join(absent)}")
            if frame.empty:
                raise _Unavailable("the validation table has no rows")
        except _Unavailable as why:
            return _not_available(f"validation loss: {why}")
        frame = frame[list(VALIDATION_COLUMNS)].apply(pd.to_numeric, errors="coerce").dropna(subset=["step"])
        if frame.empty:
            return _not_available("validation loss: the validation table has no numeric steps")
        frame = frame.sort_values("step", kind="stable").reset_index(drop=True)
        return ("<h4>Validation loss (held-out images) and training loss per evaluation</h4>\n"
                + _line_chart(frame, "step", ["validation_loss", "training_loss"]) + "\n"
                + _table_html(frame, "validation"))

    def metrics(self) -> str:
        frame = self._table("metrics", self.inputs.metrics, "metrics table")
        if frame.empty:
            raise _Unavailable("the metrics table has no rows")
        frame = _ordered_metrics(frame)
        best = _best_mask(frame)
        rows = frame.to_dict("records")
        chosen = [row for row, is_best in zip(rows, best) if is_best]
        summary = ""
        if chosen:
            self.best = "; ".join(_describe(row) for row in chosen)
            summary = f'<p class="best-summary">Best checkpoint: <strong>{_e(self.best)}</strong></p>\n'
        shown = frame.assign(best=["best" if is_best else "" for is_best in best]) if "best" in frame else frame
        table = _mark_rows(_table_html(shown, "metrics"), best, 'class="best" data-best="true"')
        chart = self.inputs.metrics_chart
        figure = self._figure(Path(chart), "metrics per checkpoint", LOSS_MAX_SIDE) if chart and Path(chart).is_file() else ""
        return summary + table + ("\n" + figure if figure else "")

    def settings(self) -> str:
        if self.inputs.settings is None:
            raise _Unavailable(self._why("settings", "the dataset's settings could not be read"))
        plain = json.loads(json.dumps(dict(self.inputs.settings), default=str))  # tuples, paths: YAML-safe types
        text = yaml.safe_dump(plain, sort_keys=False, allow_unicode=True, width=100)
        return f"<pre>{_e(text)}</pre>"

    def tags(self) -> str:
        frame = self._table("tags", self.inputs.tag_frequency, "tag frequency table")
        absent = [column for column in ("tag", "images") if column not in frame.columns]
        if absent:
            raise _Unavailable(f"the tag frequency table lacks {', '.join(absent)}")
        if frame.empty:
            raise _Unavailable("no tag passed the caption thresholds")
        frame = frame.assign(tag=frame["tag"].astype(str), images=frame["images"].astype("int64"))
        frame = frame.sort_values(["images", "tag"], ascending=[False, True], kind="stable")
        top = frame.head(max(self.inputs.top_tags, 0))
        most = max(int(top["images"].max()), 1)
        rows = []
        for row in top.itertuples(index=False):
            dropped = bool(getattr(row, "dropped", False))
            fraction = getattr(row, "fraction", None)
            share = f" ({fraction:.0%})" if isinstance(fraction, float) and math.isfinite(fraction) else ""
            row_class = ' class="dropped"' if dropped else ""
            rows.append(
                f'<tr{row_class}><td class="tag">{_e(row.tag)}</td>'
                f"<td class=\"count\">{int(row.images)}{share}</td>"
                f'<td class="bar-cell"><div class="bar" style="width:{100 * int(row.images) / most:.1f}%"></div></td></tr>'
            )
        note = (f"<p>The {len(top)} most frequent of {len(frame)} tags, by the number of images that carry them"
                " (grey: dropped as a subject feature).</p>")
        return (note + '\n<table class="tags"><thead><tr><th>tag</th><th>images</th><th></th></tr></thead>\n<tbody>\n'
                + "\n".join(rows) + "\n</tbody></table>")

    def skipped(self) -> str:
        frame = self._table("skipped", self.inputs.manifest, "prepared manifest")
        absent = [column for column in ("status", "source", "reason") if column not in frame.columns]
        if absent:
            raise _Unavailable(f"the prepared manifest lacks {', '.join(absent)}")
        skipped = frame[frame["status"] == "skipped"].drop_duplicates("source")
        kept = frame[frame["status"] != "skipped"]
        summary = (f"<p>{len(kept)} prepared images from {kept['source'].nunique()} sources; "
                   f"{len(skipped)} sources skipped.</p>")
        if skipped.empty:
            return summary
        table = skipped[["source", "reason"]].astype(str).sort_values(["source", "reason"], kind="stable")
        return summary + "\n" + _table_html(table.reset_index(drop=True), "skipped")


# ----- helpers -----


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300] or type(error).__name__


def _not_available(why: str) -> str:
    return f'<p class="not-available">not available: {_e(why)}</p>'


def _subtitle(inputs: ReportInputs, methods: list[str]) -> str:
    parts = [f"dataset <strong>{_e(inputs.dataset)}</strong>"]
    parts.append(f"method{'s' if len(methods) > 1 else ''}: {_e(', '.join(methods)) if methods else 'none yet'}")
    parts.append(f"base model: {_e(inputs.base_model) if inputs.base_model else 'unknown'}")
    return " &middot; ".join(parts)


def _ordered_metrics(frame: pd.DataFrame) -> pd.DataFrame:
    """The known columns first in their documented order, then any others; rows by method and step."""
    columns = [c for c in METRIC_COLUMNS if c in frame.columns] + [c for c in frame.columns if c not in METRIC_COLUMNS]
    keys = [c for c in ("method", "step") if c in frame.columns]
    frame = frame[columns]
    return frame.sort_values(keys, kind="stable").reset_index(drop=True) if keys else frame.reset_index(drop=True)


def _best_mask(frame: pd.DataFrame) -> list[bool]:
    if "best" not in frame.columns:
        return [False] * len(frame)
    return [False if pd.isna(value) else bool(value) for value in frame["best"]]


def _describe(row: Mapping[str, object]) -> str:
    parts = [str(row[key]) for key in ("method",) if key in row]
    if "step" in row:
        parts.append(f"step {row['step']}")
    if row.get("checkpoint"):
        parts.append(f"({row['checkpoint']})")
    return " ".join(parts)


def _number(value: float) -> str:
    return f"{value:.6g}"


def _table_html(frame: pd.DataFrame, css_class: str) -> str:
    """pandas' HTML with every cell escaped; floats in 6 significant digits, NaN as a dash."""
    return frame.to_html(index=False, escape=True, na_rep="–", float_format=_number, border=0,
                         classes=["data", css_class], justify="left")


def _mark_rows(table: str, marks: list[bool], attributes: str) -> str:
    """Add `attributes` to the body rows of `table` (pandas' HTML, rows in frame order) whose mark is true."""
    head, tbody, body = table.partition("<tbody>")
    pieces = body.split("<tr>")
    rows = [("<tr " + attributes + ">" if index < len(marks) and marks[index] else "<tr>") + piece
            for index, piece in enumerate(pieces[1:])]
    return head + tbody + pieces[0] + "".join(rows)


def _line_chart(frame: pd.DataFrame, x: str, series: list[str]) -> str:
    """An inline SVG line chart (no script, no fonts fetched): one polyline per column, with min/max labels."""
    width, height, left, right, top, bottom = 640, 240, 60, 150, 10, 30
    xs = frame[x].astype(float).to_numpy()
    values = pd.concat([frame[name].astype(float) for name in series])
    finite = values[values.map(math.isfinite)]
    if len(finite) == 0:
        return _not_available("no finite loss values to plot")
    low, high = float(finite.min()), float(finite.max())
    if high == low:
        high, low = high + 0.5 * (abs(high) or 1), low - 0.5 * (abs(low) or 1)
    x_low, x_high = float(xs.min()), float(xs.max())
    x_span = (x_high - x_low) or 1.0
    plot_w, plot_h = width - left - right, height - top - bottom

    def point(x_value: float, y_value: float) -> str:
        return (f"{left + plot_w * (x_value - x_low) / x_span:.1f},"
                f"{top + plot_h * (1 - (y_value - low) / (high - low)):.1f}")

    colours = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd")
    shapes = [f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" class="plot-area"/>']
    for index, name in enumerate(series):
        colour = colours[index % len(colours)]
        points = [point(xv, yv) for xv, yv in zip(xs, frame[name].astype(float)) if math.isfinite(yv)]
        if len(points) == 1:
            cx, cy = points[0].split(",")
            shapes.append(f'<circle cx="{cx}" cy="{cy}" r="3" fill="{colour}"/>')
        elif points:
            shapes.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{" ".join(points)}"/>')
        shapes.append(f'<text x="{width - right + 10}" y="{top + 16 + 18 * index}" fill="{colour}">{_e(name)}</text>')
    labels = [
        f'<text x="{left - 4}" y="{top + 10}" text-anchor="end">{_number(high)}</text>',
        f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end">{_number(low)}</text>',
        f'<text x="{left}" y="{height - 8}">{_e(x)} {_number(x_low)}</text>',
        f'<text x="{left + plot_w}" y="{height - 8}" text-anchor="end">{_number(x_high)}</text>',
    ]
    return (f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
            f'aria-label="{_e(", ".join(series))} by {_e(x)}">' + "".join(shapes + labels) + "</svg>")


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1700px; padding: 1em 2em; color: #222; }
header nav a { margin-right: 1em; }
section { border-top: 1px solid #ccc; margin-top: 1.5em; }
img { max-width: 100%; height: auto; image-rendering: auto; }
figure { margin: 0.5em 0; }
figcaption { font-size: 0.9em; color: #555; }
.not-available { color: #a33; font-style: italic; }
table.data { border-collapse: collapse; font-size: 0.9em; }
table.data th, table.data td { padding: 0.2em 0.6em; border-bottom: 1px solid #ddd; text-align: left; }
table.metrics tr.best { background: #fff3b0; font-weight: bold; }
.best-summary { font-size: 1.1em; }
table.tags { border-collapse: collapse; width: 100%; max-width: 900px; font-size: 0.9em; }
table.tags td, table.tags th { padding: 0.1em 0.5em; text-align: left; }
table.tags td.tag { white-space: nowrap; }
table.tags td.count { text-align: right; white-space: nowrap; }
table.tags td.bar-cell { width: 60%; }
table.tags .bar { background: #3a7bd5; height: 0.9em; }
table.tags tr.dropped .bar { background: #999; }
table.tags tr.dropped td.tag { color: #777; text-decoration: line-through; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; }
svg.chart { font-size: 11px; max-width: 100%; }
svg.chart .plot-area { fill: none; stroke: #ccc; }
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<header>
<h1>{title}</h1>
<p>{subtitle}</p>
<nav>{nav}</nav>
</header>
{sections}
</body>
</html>
"""
