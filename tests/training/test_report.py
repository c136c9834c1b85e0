"""The HTML evaluation report: stable bytes, escaped user text, inlined images, and "not available" sections."""

from __future__ import annotations

import base64
import io
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pandas as pd
from PIL import Image

from tests.report_fixtures import BEST_STEP, HOSTILE_FILE, HOSTILE_TAG, report_inputs
from training.report import SECTIONS, ReportInputs, render_report, write_report


def _sections(page: str) -> dict[str, bool]:
    return {name: flag == "true" for name, flag in re.findall(r'<section id="(\w+)" data-available="(\w+)"', page)}


def test_identical_inputs_give_identical_bytes_and_a_changed_input_changes_them(tmp_path: Path) -> None:
    first = tmp_path / "one" / "demo"
    inputs = report_inputs(first)
    out = write_report(first / "evaluation_report" / "report.html", inputs)
    again = write_report(tmp_path / "again.html", inputs).read_bytes()
    assert out.read_bytes() == write_report(out, inputs).read_bytes()
    # The same files in another folder: links are relative, so the page is the same too.
    shutil.copytree(first, tmp_path / "two" / "demo")
    moved = write_report(tmp_path / "two" / "demo" / "evaluation_report" / "report.html",
                         report_inputs(tmp_path / "two" / "demo"))
    assert moved.read_bytes() == out.read_bytes()
    assert again != out.read_bytes()  # written elsewhere, its relative links differ

    metrics = pd.read_parquet(inputs.metrics)
    metrics["best"] = metrics["step"] == 30
    metrics.to_parquet(inputs.metrics, index=False)
    assert write_report(tmp_path / "changed.html", inputs).read_bytes() != again


def test_every_section_renders_from_complete_inputs(tmp_path: Path) -> None:
    inputs = report_inputs(tmp_path)
    report = render_report(inputs, tmp_path / "evaluation_report")
    assert report.available == {name: True for name, _ in SECTIONS}
    assert _sections(report.html) == report.available
    assert "not available" not in report.html
    assert "method: textual_inversion" in report.html and "base model: models/tiny-sd" in report.html
    # The grid and loss images link to the full-size files by relative path.
    assert 'href="../evaluation_grid/pip_grid.png"' in report.html
    assert 'href="../textual_inversion/loss.png"' in report.html
    # Skipped files with their reasons; tags by count, then name, with a bar as wide as the share of the top tag.
    assert "zero-byte file" in report.html and "empty.png" in report.html
    tags = re.findall(r'<td class="tag">(.*?)</td>', report.html)
    assert tags == ["solo", "&lt;script&gt;alert(&#x27;tag&#x27;)&lt;/script&gt;", "smile", "blue sky"]
    assert re.findall(r'class="bar" style="width:([\d.]+)%"', report.html) == ["100.0", "50.0", "50.0", "25.0"]


def test_the_best_checkpoint_row_is_marked(tmp_path: Path) -> None:
    report = render_report(report_inputs(tmp_path), tmp_path)
    table = report.html.split('<section id="metrics"')[1].split("</section>")[0]
    rows = re.findall(r"<tr([^>]*)>\s*<td>textual_inversion</td>\s*<td>(\d+)</td>", table)
    assert [int(step) for _, step in rows] == [10, 20, 30]
    assert [step for attributes, step in rows if 'class="best"' in attributes] == [str(BEST_STEP)]
    assert report.best == f"textual_inversion step {BEST_STEP} (checkpoints/pip-{BEST_STEP}.pt)"
    assert "Best checkpoint" in table


def test_the_concept_tag_score_is_a_column_of_the_metrics_table(tmp_path: Path) -> None:
    """evaluation.tagger_scores adds concept_tag_score; the table shows it after the CLIP scores, before best."""
    inputs = report_inputs(tmp_path)
    metrics = pd.read_parquet(inputs.metrics)
    metrics.insert(2, "concept_tag_score", [0.125, 0.75, 0.5])  # written anywhere, shown in its place
    metrics.to_parquet(inputs.metrics, index=False)
    table = render_report(inputs, tmp_path).html.split('<section id="metrics"')[1].split("</section>")[0]
    headings = re.findall(r"<th>(\w+)</th>", table)
    assert headings.index("clip_image_similarity") < headings.index("concept_tag_score") < headings.index("best")
    assert "<td>0.125</td>" in table and "<td>0.75</td>" in table


def test_user_text_is_escaped(tmp_path: Path) -> None:
    inputs = replace(report_inputs(tmp_path), dataset="<img src=x onerror=alert(1)>")
    page = render_report(inputs, tmp_path).html
    assert "<script" not in page and "<img src=x" not in page and "<b>name" not in page
    assert "&lt;script&gt;alert(&#x27;tag&#x27;)&lt;/script&gt;" in page
    assert "bad &lt;b&gt;name&lt;/b&gt; &amp; co.png" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert HOSTILE_TAG not in page and HOSTILE_FILE not in page


def test_the_page_is_self_contained_and_images_are_inlined_small(tmp_path: Path) -> None:
    inputs = report_inputs(tmp_path)
    big = tmp_path / "evaluation_grid" / "big_grid.png"
    Image.effect_noise((2400, 1800), 60).convert("RGB").save(big)
    inputs = replace(inputs, grids={**inputs.grids, "big_grid": big})
    page = render_report(inputs, tmp_path / "evaluation_report").html
    assert not re.search(r"https?://|<link|<script|@import|url\(", page)
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == 4  # two grids, the loss curve, the metrics chart
    sides = []
    for source in sources:
        header, _, payload = source.partition(",")
        assert header in ("data:image/png;base64", "data:image/jpeg;base64")
        picture = Image.open(io.BytesIO(base64.b64decode(payload)))
        picture.load()
        sides.append(max(picture.size))
    assert max(sides) <= 1600  # the 2400 px grid was scaled down
    assert len(page) < 2_000_000  # noise is the worst case for compression; JPEG keeps it light


def test_missing_inputs_say_not_available_instead_of_failing(tmp_path: Path) -> None:
    report = render_report(ReportInputs(dataset="empty"), tmp_path)
    assert report.available == {name: False for name, _ in SECTIONS}
    assert report.html.count('class="not-available"') == len(SECTIONS)
    assert "not available: no evaluation grid image was found" in report.html
    assert "method: none yet" in report.html and report.best is None

    inputs = report_inputs(tmp_path / "data")
    (tmp_path / "data" / "tables" / "tag_frequency.parquet").write_bytes(b"not parquet")
    inputs.validation["textual_inversion"].unlink()
    truncated = inputs.grids["pip_grid"]
    truncated.write_bytes(truncated.read_bytes()[:40])
    inputs = replace(inputs, metrics=tmp_path / "nowhere" / "metrics.parquet",
                     missing={"metrics": "written by the evaluation_metrics stage"})
    report = render_report(inputs, tmp_path / "data" / "evaluation_report")
    assert report.available["tags"] is False and "not available: cannot read ../tables/tag_frequency.parquet" in report.html
    assert "not available: ../../nowhere/metrics.parquet does not exist (written by the evaluation_metrics stage)" \
        in report.html
    assert "not available: validation loss: ../textual_inversion/validation.csv does not exist" in report.html
    assert "not available: cannot read ../evaluation_grid/pip_grid.png" in report.html
    assert report.available["skipped"] and report.available["settings"]

    inputs.validation["textual_inversion"].write_text("step,validation_loss,training_loss\nlate,high,low\n")
    report = render_report(replace(inputs, settings={"evaluation": {"seeds": (1, 2)}}), tmp_path)
    assert "not available: validation loss: the validation table has no numeric steps" in report.html
    assert "seeds:\n  - 1\n  - 2" in report.html
