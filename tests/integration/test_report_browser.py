"""The HTML evaluation report in headless Chromium, opened from disk: every image decodes, the metrics table
has its rows with the best one marked, user text is shown as text, and the page asks the network for nothing.
A screenshot goes to test-artifacts/."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from tests.integration.browser import ARTIFACTS, CHROMIUM, CHROMIUM_FLAGS, sync_playwright_api
from tests.report_fixtures import BEST_STEP, HOSTILE_TAG, METRIC_STEPS, report_inputs
from training.report import write_report

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_the_report_renders_from_a_file_with_its_images_and_nothing_fetched(tmp_path: Path) -> None:
    sync_api = sync_playwright_api()
    data = tmp_path / "data" / "demo"
    report = write_report(data / "evaluation_report" / "report.html", report_inputs(data))
    requested: list[str] = []
    refused: list[str] = []

    def guard(route) -> None:
        url = route.request.url
        if url.startswith(("file:", "data:")):
            route.continue_()
        else:
            refused.append(url)
            route.abort()

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(60_000)
            page.on("request", lambda request: requested.append(request.url))
            page.route("**/*", guard)
            page.goto(report.as_uri(), wait_until="load")

            images = page.eval_on_selector_all(
                "img", "elements => elements.map(e => [e.complete, e.naturalWidth, e.naturalHeight, e.alt])")
            rows = page.locator("table.metrics tbody tr")
            steps = [int(rows.nth(index).locator("td").nth(1).inner_text()) for index in range(rows.count())]
            best = page.locator("table.metrics tbody tr.best")
            best_rows = best.count()
            best_cells = best.locator("td").all_inner_texts()
            best_colour = best.evaluate("row => getComputedStyle(row).backgroundColor")
            plain_colour = rows.first.evaluate("row => getComputedStyle(row).backgroundColor")
            scripts = page.locator("script").count()
            tag_cell = page.locator("table.tags td.tag").nth(1).inner_text()
            links = page.eval_on_selector_all("a[href]:not([href^='#'])", "links => links.map(a => a.href)")
            unavailable = page.locator(".not-available").count()
            page.screenshot(path=str(ARTIFACTS / "evaluation-report.png"), full_page=True)
        finally:
            browser.close()

    assert [alt for *_, alt in images] == ["pip_grid", "training loss: textual_inversion", "metrics per checkpoint"]
    assert all(complete and width > 0 and height > 0 for complete, width, height, _ in images), images
    assert steps == list(METRIC_STEPS)
    assert best_rows == 1
    assert best_cells[1] == str(BEST_STEP) and best_cells[-1] == "best"
    assert best_colour != plain_colour  # the best row is highlighted, not only labelled
    assert scripts == 0 and tag_cell == HOSTILE_TAG  # the hostile tag is text, not an element
    assert unavailable == 0
    assert refused == [] and all(url.startswith(("file:", "data:")) for url in requested), requested
    # Links to the full-size files resolve to files beside the report.
    assert links and all(Path(unquote(urlparse(link).path)).is_file() for link in links), links
