"""When assets run by themselves: cheap stages eagerly, training and evaluation only at night.

Why declarative conditions rather than a schedule with a fixed job: the nightly condition is evaluated per
dataset partition, so a night on which nothing changed launches nothing, and a changed dataset retrains
alone.
"""

from __future__ import annotations

from dagster import AutomationCondition

NIGHTLY_CRON = "0 2 * * *"


def on_change() -> AutomationCondition:
    """Run as soon as an input's data version moves (and the inputs exist)."""
    return AutomationCondition.eager()


def nightly_when_unsynced(cron: str = NIGHTLY_CRON, timezone: str = "UTC") -> AutomationCondition:
    """At the cron tick, run a partition that is missing or whose inputs changed since it last ran."""
    inputs_changed = AutomationCondition.any_deps_match(AutomationCondition.data_version_changed()).since_last_handled()
    code_changed = AutomationCondition.code_version_changed().since_last_handled()
    upstream_runs_tonight = AutomationCondition.any_deps_match(AutomationCondition.will_be_requested())
    return (
        AutomationCondition.cron_tick_passed(cron, timezone)
        & (AutomationCondition.missing() | inputs_changed | code_changed | upstream_runs_tonight)
        & ~AutomationCondition.any_deps_missing()
        & ~AutomationCondition.any_deps_in_progress()  # never train on captions that are being rewritten
        & ~AutomationCondition.in_progress()
    ).with_label(f"nightly ({cron}, {timezone}) when unsynced")
