"""The spread queue in the Distributed panel, in a real browser against the real cluster: the switch
saves the setting, and the panel shows which participant renders which waiting prompt."""
from __future__ import annotations

import json

import pytest

import harness
from test_ui import TIMEOUT, browser, comfy, expect  # noqa: F401  (fixtures shared with the panel's tests)
from test_e2e_spread import plain_workflow

pytestmark = pytest.mark.browser


def test_spread_switch_saves_and_the_panel_shows_who_renders_what(live, comfy):
    panel = comfy.open_panel()
    switch = panel.locator(".cdist-spread-queue")
    expect(switch).not_to_be_checked(timeout=TIMEOUT)
    switch.check()
    harness.wait_until(lambda: json.loads(live.config_path.read_text())["settings"].get("spread_queue") is True,
                       30, what="spread_queue saved")
    assert live.master.get("/distributed/spread").json()["enabled"] is True  # at once, not at the next dispatch
    expect(panel.locator(".cdist-spread .cdist-empty")).to_have_text("No prompt is waiting.")
    data = json.loads(live.config_path.read_text())
    data["master"]["enabled"] = False  # the workers render, the panel names them
    live.reset_config(data)
    ids = [live.master.queue_prompt(plain_workflow(k, seconds=6.0)) for k in range(2)]
    rows = panel.locator('.cdist-spread-prompt[data-state="running"]')
    expect(rows).to_have_count(2, timeout=TIMEOUT)
    assert sorted(rows.nth(i).get_attribute("data-participant") for i in range(2)) == ["worker1", "worker2"]
    expect(panel.locator(".cdist-spread-prompt .cdist-spread-who").first).to_contain_text("worker")
    for k in range(2):  # prompt, who and state each in its own place, the state in words
        row = rows.nth(k)
        assert row.locator(".cdist-spread-id").inner_text().startswith("#")
        assert row.locator(".cdist-state").inner_text() == "running"
        assert row.locator(".cdist-spread-who").bounding_box()["x"] > row.locator(".cdist-spread-id").bounding_box()["x"]
    for pid in ids:
        assert live.master.wait_prompt(pid, 60)["status"]["status_str"] == "success"
    for pid in ids:  # listed among the recent ones (earlier tests' prompts may be listed too)
        expect(panel.locator(f'.cdist-spread-prompt[data-state="done"][data-prompt="{pid}"]')).to_have_count(
            1, timeout=TIMEOUT)


def test_a_spread_prompt_that_the_master_renders_shows_running_there(live, comfy):
    """The master's own spread prompt is listed as running on the master, not by an internal word."""
    config = live.default_config(spread_queue=True)
    for worker in config["workers"]:
        worker["enabled"] = False
    live.reset_config(config)
    panel = comfy.open_panel()
    try:
        pid = live.master.queue_prompt(plain_workflow(7, seconds=8.0))
        row = panel.locator(f'.cdist-spread-prompt[data-prompt="{pid}"]')
        expect(row).to_have_attribute("data-participant", "master", timeout=TIMEOUT)
        expect(row).to_have_attribute("data-state", "running")
        expect(row.locator(".cdist-state")).to_have_text("running")
        live.master.wait_prompt(pid, 60)
    finally:
        live.reset_config()
