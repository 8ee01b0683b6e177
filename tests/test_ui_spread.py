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
    data = json.loads(live.config_path.read_text())
    data["master"]["enabled"] = False  # the workers render, the panel names them
    live.reset_config(data)
    ids = [live.master.queue_prompt(plain_workflow(k, seconds=6.0)) for k in range(2)]
    rows = panel.locator('.cdist-spread-prompt[data-state="running"]')
    expect(rows).to_have_count(2, timeout=TIMEOUT)
    assert sorted(rows.nth(i).get_attribute("data-participant") for i in range(2)) == ["worker1", "worker2"]
    expect(panel.locator(".cdist-spread-prompt .cdist-spread-who").first).to_contain_text("worker")
    for pid in ids:
        assert live.master.wait_prompt(pid, 60)["status"]["status_str"] == "success"
    for pid in ids:  # listed among the recent ones (earlier tests' prompts may be listed too)
        expect(panel.locator(f'.cdist-spread-prompt[data-state="done"][data-prompt="{pid}"]')).to_have_count(
            1, timeout=TIMEOUT)
