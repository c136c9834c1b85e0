"""The Dagster UI in Chromium (Debian's package, driven by Playwright): materialise the demo partition from the
asset graph and see the evaluation grid image in the asset's metadata. Screenshots go to test-artifacts/."""

from __future__ import annotations

import time

import pytest

from tests.integration.browser import ARTIFACTS, CHROMIUM, CHROMIUM_FLAGS, sync_playwright_api
from tests.integration.conftest import DATASET
from tests.integration.server import DagsterDev, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_materialize_the_demo_partition_from_the_ui(dagster_dev: DagsterDev) -> None:
    sync_api = sync_playwright_api()
    server = dagster_dev
    wait_for("the demo partition", lambda: DATASET in server.partitions(), ceiling=300)

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(60_000)
            page.goto(f"{server.url}/asset-groups", wait_until="networkidle")
            page.get_by_role("button", name="Materialize all").click()
            dialog = page.get_by_role("dialog")
            dialog.get_by_text("Select a partition or create one").click()
            page.get_by_role("menuitem").filter(has_text=DATASET).last.click()
            page.keyboard.press("Escape")  # closes the partition menu, not the dialog
            page.screenshot(path=str(ARTIFACTS / "1-materialize-dialog.png"))
            clicked = time.time()
            dialog.get_by_role("button", name="Launch 1 run").click()

            run = wait_for(
                "the run launched from the UI",
                lambda: [r for r in server.runs() if r.created > clicked - 1 and r.tags.get("dagster/from_ui")],
                ceiling=300,
            )[0]
            assert run.assets >= {"prepared_images", "tag_scores", "tag_table", "textual_inversion", "evaluation_grid"}
            assert run.tags["dagster/partition"] == DATASET
            assert server.wait_finished(run.run_id, ceiling=900).status == "SUCCESS", server.log_tail()
            assert server.latest_materialization("evaluation_grid", DATASET)["runId"] == run.run_id

            page.goto(f"{server.url}/assets/evaluation_grid?partition={DATASET}", wait_until="networkidle")
            page.screenshot(path=str(ARTIFACTS / "2-evaluation-grid-asset.png"), full_page=True)
            page.get_by_role("row").filter(has=page.get_by_text("grid", exact=True)).get_by_text("Show Markdown").click()
            image = page.get_by_role("dialog").locator("img[src^='data:image/png']")
            image.wait_for()
            width, height = image.evaluate("element => [element.naturalWidth, element.naturalHeight]")
            alt = image.get_attribute("alt")
            page.screenshot(path=str(ARTIFACTS / "3-evaluation-grid-image.png"))
        finally:
            browser.close()
    assert alt == "evaluation grid"
    assert width > 64 and height > 64  # a decoded picture: one 64 px cell plus its labels
