"""A real `dagster dev` (webserver + daemon) on a free loopback port, and a small GraphQL client for it.

Waits poll the server until something has happened (a run finished, a sensor ticked); each has a generous
ceiling so a broken server fails the test instead of hanging it, never a timing assertion.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tests.integration.project import PROJECT, instance_home, project_env, subprocess_env
from tests.integration.servers import free_port

T = TypeVar("T")
FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}
RUN_FIELDS = "runId status creationTime tags { key value } assetSelection { path }"

# Small enough to run the whole graph in seconds on a CPU: 5 images, 2 training steps, a 1x1 grid of 2 steps.
TINY_DATASET_YAML = """\
preprocess: {size: 64, min_images: 1, workers: 1}
tagging: {tagger: wd14, batch_size: 8, workers: 1}
captions: {general_threshold: 0.35, exclude_tags: ["pip_(demo)"]}
training: {embedding_name: pip, initialization_text: character, max_steps: 2, save_embedding_every: 0}
evaluation: {prompts: ["a photo of [name]"], seeds: [1], steps: 2}
"""


def wait_for(what: str, check: Callable[[], T | None], ceiling: float = 300, every: float = 1.0) -> T:
    """Poll `check` until it returns something truthy; fail with `what` after `ceiling` seconds."""
    deadline = time.monotonic() + ceiling
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {ceiling:.0f} s")
        time.sleep(every)


@dataclass
class Run:
    run_id: str
    status: str
    created: float
    tags: dict[str, str]
    assets: set[str]

    @classmethod
    def from_graphql(cls, data: dict[str, Any]) -> Run:
        return cls(
            run_id=data["runId"],
            status=data["status"],
            created=data["creationTime"],
            tags={tag["key"]: tag["value"] for tag in data["tags"]},
            assets={"/".join(key["path"]) for key in data["assetSelection"] or []},
        )


@dataclass
class DagsterDev:
    """A `dagster dev` process with its own DAGSTER_HOME, datasets and data folders."""

    base: Path
    embedded_root: Path
    env_overrides: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    location: str = ""
    repository: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def datasets(self) -> Path:
        return self.base / "datasets"

    @property
    def data(self) -> Path:
        return self.base / "data"

    def add_tiny_dataset(self, name: str, images: int = 5) -> Path:
        folder = self.datasets / name
        folder.mkdir(parents=True)
        for image in sorted((self.embedded_root / "datasets" / "demo").glob("*.png"))[:images]:
            shutil.copy(image, folder / image.name)
        (folder / "dataset.yaml").write_text(TINY_DATASET_YAML, encoding="utf-8")
        return folder

    def start(self) -> None:
        env = subprocess_env({
            **project_env(self.base, self.embedded_root),
            "DAGSTER_HOME": str(instance_home(self.base)),
            "SDP_SENSOR_INTERVAL_SECONDS": "3",
            "SDP_EXECUTOR": "in_process",  # one process per run instead of one per step
            **self.env_overrides,
        })  # fmt: skip
        dagster = Path(sys.executable).with_name("dagster")
        log = open(self.base / "dagster-dev.log", "wb")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(
            [str(dagster), "dev", "-w", str(PROJECT / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(self.port)],
            cwd=PROJECT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_for("the code location to load", self._loaded, ceiling=600)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)  # dagster dev, its webserver, daemon and code server
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever of the group outlived the shutdown
        except ProcessLookupError:
            pass
        self.process.wait()

    def log_tail(self, lines: int = 60) -> str:
        path = self.base / "dagster-dev.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    # --- GraphQL -------------------------------------------------------------------------------------

    def graphql(self, query: str, **variables: Any) -> dict[str, Any]:
        body = json.dumps({"query": query, "variables": variables}).encode()
        request = urllib.request.Request(f"{self.url}/graphql", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            payload = json.loads(response.read())
        if payload.get("errors"):
            raise AssertionError(f"GraphQL errors: {payload['errors']}")
        return payload["data"]

    def _loaded(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"dagster dev exited with {self.process.returncode}:\n{self.log_tail()}")
        try:
            data = self.graphql("""{ workspaceOrError { ... on Workspace { locationEntries { name
                locationOrLoadError { __typename ... on RepositoryLocation { repositories { name } }
                                      ... on PythonError { message } } } } } }""")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False
        for entry in data["workspaceOrError"]["locationEntries"]:
            loaded = entry["locationOrLoadError"]
            if loaded and loaded["__typename"] == "PythonError":
                raise AssertionError(f"code location failed to load: {loaded['message']}")
            if loaded and loaded.get("repositories"):
                self.location, self.repository = entry["name"], loaded["repositories"][0]["name"]
                return True
        return False

    def launch(self, job: str, partition: str) -> str:
        data = self.graphql(
            """mutation($params: ExecutionParams!) { launchRun(executionParams: $params) { __typename
                 ... on LaunchRunSuccess { run { runId } } ... on PythonError { message }
                 ... on RunConfigValidationInvalid { errors { message } } } }""",
            params={
                "selector": {"repositoryLocationName": self.location, "repositoryName": self.repository,
                             "jobName": job},
                "executionMetadata": {"tags": [{"key": "dagster/partition", "value": partition}]},
            },
        )["launchRun"]
        assert data["__typename"] == "LaunchRunSuccess", data
        return data["run"]["runId"]

    def runs(self, **run_filter: Any) -> list[Run]:
        data = self.graphql(
            f"""query($filter: RunsFilter) {{ runsOrError(filter: $filter) {{
                  ... on Runs {{ results {{ {RUN_FIELDS} }} }} }} }}""",
            filter=run_filter or None,
        )
        return sorted((Run.from_graphql(item) for item in data["runsOrError"]["results"]), key=lambda r: r.created)

    def run(self, run_id: str) -> Run:
        return next(run for run in self.runs(runIds=[run_id]))

    def wait_finished(self, run_id: str, ceiling: float = 900) -> Run:
        return wait_for(f"run {run_id} to finish", lambda: (r := self.run(run_id)).status in FINISHED and r, ceiling)

    def wait_idle(self, ceiling: float = 900) -> None:
        """No run queued, starting or in progress."""
        wait_for("all runs to finish", lambda: all(run.status in FINISHED for run in self.runs()), ceiling)

    def partitions(self) -> list[str]:
        data = self.graphql("""{ assetNodeOrError(assetKey: {path: ["prepared_images"]}) {
                                   ... on AssetNode { partitionKeys } } }""")
        return data["assetNodeOrError"]["partitionKeys"]

    def sensor_ticks(self, sensor: str) -> list[dict[str, Any]]:
        data = self.graphql(
            """query($selector: SensorSelector!) { sensorOrError(sensorSelector: $selector) {
                 ... on Sensor { sensorState { ticks(limit: 20) { timestamp endTimestamp status } } } } }""",
            selector={"repositoryLocationName": self.location, "repositoryName": self.repository,
                      "sensorName": sensor},
        )
        return data["sensorOrError"]["sensorState"]["ticks"]

    def wait_sensor_tick_after(self, sensor: str, moment: float, ceiling: float = 600) -> None:
        """Until `sensor` has finished an evaluation that started after `moment` (epoch seconds)."""
        wait_for(
            f"a tick of {sensor} after {moment}",
            lambda: any(tick["timestamp"] > moment and tick["status"] != "STARTED"
                        for tick in self.sensor_ticks(sensor)),
            ceiling,
        )

    def latest_materialization(self, asset: str, partition: str) -> dict[str, Any] | None:
        data = self.graphql(
            """query($key: AssetKeyInput!, $partition: String!) { assetOrError(assetKey: $key) {
                 ... on Asset { assetMaterializations(limit: 1, partitions: [$partition]) { runId timestamp
                   metadataEntries { label __typename ... on MarkdownMetadataEntry { mdStr } } } } } }""",
            key={"path": [asset]}, partition=partition,
        )
        found = data["assetOrError"].get("assetMaterializations") or []
        return found[0] if found else None
