"""The Distributed panel in a real browser against the real cluster (a master and two workers).

Each test opens ComfyUI on the master, opens the panel from whichever UI it serves (the legacy menu
button, or the sidebar tab of the current frontend), acts as a user would and checks the outcome where
it matters: in the config file the servers read, in the next job, and in the panel's own DOM (cdist-*).
Every test also fails on any console error or uncaught exception in the page.
"""
from __future__ import annotations

import json
import re

import pytest

import harness
from ui_support import LEGACY_BUTTON, SIDEBAR_BUTTON, ComfyPage, launch

pytestmark = pytest.mark.browser

from playwright import sync_api  # noqa: E402  (installed by tests/run.py; missing it must fail, not skip)

expect = sync_api.expect
TIMEOUT = 30_000  # ms: the panel polls every 3 s, and three ComfyUI servers share two cores here


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = launch(playwright)
        yield browser
        browser.close()


@pytest.fixture
def comfy(live, browser, request, tmp_path):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT)
    comfy_page = ComfyPage(page, live.master.url)
    yield comfy_page
    page.screenshot(path=str(tmp_path / f"last-{request.node.name}.png"))  # for a failure's post-mortem
    errors = comfy_page.own_errors()
    context.close()
    assert not errors, "the page logged errors:\n" + "\n".join(errors)


def config_on_disk(live) -> dict:
    return json.loads(live.config_path.read_text())


def run_job(live, **workflow) -> tuple[dict, int]:
    prompt_id = live.master.queue_prompt(harness.image_workflow(**workflow))
    entry = live.master.wait_prompt(prompt_id)
    assert harness.error_of(entry) == ""
    return entry, len(live.master.saved_images(entry, "5"))


def test_panel_lists_every_instance_online(live, comfy, tmp_path):
    panel = comfy.open_panel()
    cards = panel.locator(".cdist-instance")
    expect(panel.locator('.cdist-instance[data-state="online"]')).to_have_count(3, timeout=TIMEOUT)

    # master first, then the workers in config order; each with its role, URL, GPU, VRAM and queue
    assert cards.evaluate_all("cards => cards.map(c => c.dataset.id)") == ["master", "worker1", "worker2"]
    for instance, instance_id in zip(live.instances, ["master", "worker1", "worker2"]):
        card = comfy.card(instance_id)
        expect(card.locator(".cdist-name")).to_have_text(instance.name)
        expect(card.locator(".cdist-role")).to_have_text("master" if instance_id == "master" else "worker")
        expect(card.locator(".cdist-state")).to_have_text("online")
        expect(card.locator(".cdist-url")).to_contain_text(f":{instance.port}")
        expect(card.locator(".cdist-vram-text")).to_have_text(re.compile(r"^\d+\.\d / \d+\.\d GB$"))
        expect(card.locator(".cdist-queue")).to_have_text("queue 0")
        expect(card.locator(".cdist-enable")).to_be_checked()
    expect(panel.locator(".cdist-headline")).to_have_text("3 of 3 online · parallel")
    expect(panel.locator(".cdist-mode")).to_have_value("parallel")

    shot = comfy.screenshot(f"panel-{comfy.ui}-dark", tmp_path)
    assert shot.stat().st_size > 10_000
    comfy.use_palette("light")
    try:
        comfy.screenshot(f"panel-{comfy.ui}-light", tmp_path)
    finally:
        comfy.use_palette("dark")


def test_switching_the_master_off_leaves_it_out_of_the_next_job(live, comfy):
    comfy.open_panel()
    switch = comfy.card("master").locator(".cdist-enable")
    expect(switch).to_be_checked(timeout=TIMEOUT)
    switch.click()
    harness.wait_until(lambda: config_on_disk(live)["master"]["enabled"] is False, 30, what="master disabled on disk")
    expect(comfy.card("master")).to_have_attribute("data-state", "disabled", timeout=TIMEOUT)
    expect(switch).not_to_be_checked()

    _entry, images = run_job(live, seed=7, batch=2)
    assert images == 4  # the two workers' batches only
    assert live.master.port not in {p["port"] for p in live.probes()}


def test_switching_a_worker_off_leaves_it_out_of_the_next_job(live, comfy):
    comfy.open_panel()
    switch = comfy.card("worker2").locator(".cdist-enable")
    expect(switch).to_be_checked(timeout=TIMEOUT)
    switch.click()
    harness.wait_until(lambda: config_on_disk(live)["workers"][1]["enabled"] is False, 30,
                       what="worker2 disabled on disk")
    assert config_on_disk(live)["workers"][0]["enabled"] is True
    expect(comfy.card("worker2")).to_have_attribute("data-state", "disabled", timeout=TIMEOUT)

    _entry, images = run_job(live, seed=8, batch=2)
    assert images == 4  # master and worker1
    ports = {p["port"] for p in live.probes()}
    assert live.workers[1].port not in ports and live.workers[0].port in ports


def test_settings_are_saved_to_the_config(live, comfy):
    panel = comfy.open_panel()
    expect(panel.locator(".cdist-mode")).to_have_value("parallel", timeout=TIMEOUT)
    expect(panel.locator(".cdist-stagger")).to_be_disabled()
    panel.locator(".cdist-mode").select_option("staggered")
    harness.wait_until(lambda: config_on_disk(live)["settings"]["mode"] == "staggered", 30, what="mode saved")
    expect(panel.locator(".cdist-stagger")).to_be_enabled()
    panel.locator(".cdist-stagger").fill("1.5")
    panel.locator(".cdist-stagger").press("Enter")
    harness.wait_until(lambda: config_on_disk(live)["settings"]["stagger_delay"] == 1.5, 30, what="delay saved")
    panel.locator(".cdist-timeout").fill("0")
    panel.locator(".cdist-timeout").press("Enter")
    expect(panel.locator(".cdist-settings .cdist-form-error")).to_contain_text("Job timeout")
    assert config_on_disk(live)["settings"]["job_timeout"] == 20  # unchanged
    expect(panel.locator(".cdist-headline")).to_contain_text("staggered", timeout=TIMEOUT)


SETTING = """async ([id, value]) => {
    const { app } = await import("/scripts/app.js");
    const store = app.extensionManager?.setting;
    if (value === undefined) return store ? store.get(id) : app.ui.settings.getSettingValue(id);
    if (store) await store.set(id, value); else await app.ui.settings.setSettingValueAsync(id, value);
}"""


def setting(comfy, key: str, value=None):
    """A Distributed setting in ComfyUI's Settings dialog, read or set as the dialog's own input does."""
    return comfy.page.evaluate(SETTING, [key, value])


def test_the_settings_appear_in_comfyuis_settings_dialog_and_save_to_the_config(live, comfy, tmp_path):
    live.reset_config(live.default_config(job_timeout=33))
    comfy.open_panel()
    comfy.page.wait_for_function("""async () => {
        const { app } = await import("/scripts/app.js");
        const store = app.extensionManager?.setting;
        return (store ? store.get("Distributed.JobTimeout") : app.ui.settings.getSettingValue("Distributed.JobTimeout")) === 33;
    }""", timeout=TIMEOUT)  # the dialog shows what the config holds
    setting(comfy, "Distributed.JobTimeout", 77)
    harness.wait_until(lambda: config_on_disk(live)["settings"]["job_timeout"] == 77, 30, what="the timeout saved")
    setting(comfy, "Distributed.SpreadQueue", True)
    harness.wait_until(lambda: config_on_disk(live)["settings"]["spread_queue"] is True, 30, what="the switch saved")
    expect(comfy.panel().locator(".cdist-spread-queue")).to_be_checked(timeout=TIMEOUT)  # the panel follows
    comfy.expected_statuses = {400}
    setting(comfy, "Distributed.JobTimeout", 0)  # refused by the master: the dialog goes back to the config's
    comfy.page.wait_for_function("""async () => {
        const { app } = await import("/scripts/app.js");
        const store = app.extensionManager?.setting;
        return (store ? store.get("Distributed.JobTimeout") : app.ui.settings.getSettingValue("Distributed.JobTimeout")) === 77;
    }""", timeout=TIMEOUT)
    assert config_on_disk(live)["settings"]["job_timeout"] == 77
    if comfy.ui == "sidebar":  # the current frontend: a search for "distributed" finds the four
        comfy.page.evaluate("""async () => {
            const { app } = await import("/scripts/app.js");
            await app.extensionManager.command.execute("Comfy.ShowSettingsDialog");
        }""")
        search = comfy.page.get_by_placeholder(re.compile("search", re.I)).last
        search.fill("distributed")
        for name in ("Mode", "Stagger delay (s)", "Job timeout (s)", "Spread the queue"):
            expect(comfy.page.get_by_text(name, exact=True).last).to_be_visible(timeout=TIMEOUT)
        comfy.screenshot(f"settings-dialog-{comfy.ui}", tmp_path)
    live.reset_config()


def test_the_panel_and_the_nodes_speak_comfyuis_language(live, comfy):
    """ComfyUI's Language setting (the current frontend) switched to French: the panel, the sidebar
    tab and the nodes read in French from locales/fr; ComfyUI without /i18n keeps them in English."""
    comfy.open_panel()
    if comfy.ui == "legacy":  # ComfyUI of early 2024 serves no translations: English throughout
        assert live.master.get("/i18n").status_code == 404
        expect(comfy.panel().locator(".cdist-check-button")).to_have_text("Check workers")
        return
    french = live.master.get("/i18n").json()["fr"]
    assert french["distributed"]["panel"]["Check workers"] == "Vérifier les workers"
    assert set(live.master.get("/i18n").json()) >= {"en", "zh", "zh-TW", "ru", "ja", "ko", "fr", "es", "ar"}
    try:
        setting(comfy, "Comfy.Locale", "fr")
        comfy.page.reload()
        panel = comfy.open_panel()
        expect(panel.locator(".cdist-check-button")).to_have_text("Vérifier les workers")
        expect(panel.locator(".cdist-heading").first).to_have_text("Tâches")
        expect(panel.locator('.cdist-instance[data-id="worker1"] .cdist-state')).to_have_text("en ligne", timeout=TIMEOUT)
        expect(panel.locator(".cdist-headline")).to_contain_text("3 sur 3 en ligne", timeout=TIMEOUT)
        title = comfy.page.evaluate("""async () => {
            const { app } = await import("/scripts/app.js");
            const node = LiteGraph.createNode("MultiGPUCollector");
            app.graph.add(node);
            const title = node.title;
            app.graph.remove(node);
            return title;
        }""")
        assert title == "Collecteur multi-GPU"
    finally:
        setting(comfy, "Comfy.Locale", "en")


def test_clear_vram_reports_every_instance_reached(live, comfy):
    panel = comfy.open_panel()
    expect(panel.locator('.cdist-instance[data-state="online"]')).to_have_count(3, timeout=TIMEOUT)
    panel.locator(".cdist-clear-vram").click()
    results = panel.locator(".cdist-results .cdist-result")
    expect(results).to_have_count(3)
    expect(panel.locator('.cdist-result[data-ok="true"]')).to_have_count(3)
    assert results.evaluate_all("rows => rows.map(r => r.dataset.id)") == ["master", "worker1", "worker2"]
    expect(panel.locator(".cdist-results .cdist-box-title")).to_contain_text("3 of 3 reached")


def test_interrupt_all_cancels_the_running_job(live, comfy):
    panel = comfy.open_panel()
    expect(panel.locator('.cdist-instance[data-state="online"]')).to_have_count(3, timeout=TIMEOUT)
    prompt_id = live.master.queue_prompt(harness.image_workflow(seed=13, batch=2, seconds_per_image=5))
    job = panel.locator(".cdist-job").first
    expect(job).to_have_attribute("data-state", "running", timeout=TIMEOUT)
    panel.locator(".cdist-interrupt").click()
    expect(panel.locator('.cdist-results .cdist-result[data-ok="true"]')).to_have_count(3)
    expect(panel.locator(".cdist-results .cdist-box-title")).to_contain_text("Interrupt: 3 of 3 reached")
    expect(job).to_have_attribute("data-state", "cancelled", timeout=TIMEOUT)
    expect(job.locator(".cdist-error")).to_contain_text("interrupted from the Distributed panel")
    live.master.wait_prompt(prompt_id)

def test_a_bad_port_is_refused_in_the_form_and_nothing_is_saved(live, comfy):
    before = live.config_path.read_bytes()
    sent = []
    comfy.page.on("request", lambda r: sent.append(r.url) if r.method != "GET" else None)
    panel = comfy.open_panel()
    panel.locator(".cdist-add-worker").click()
    form = panel.locator(".cdist-worker-form")
    form.locator(".cdist-field-name").fill("gpu9")
    form.locator(".cdist-field-port").fill("70000")
    form.locator(".cdist-submit").click()
    expect(form.locator(".cdist-error-port")).to_be_visible()
    expect(form.locator(".cdist-error-port")).to_contain_text("1 to 65535")
    expect(form.locator(".cdist-field-port")).to_have_attribute("aria-invalid", "")
    form.locator(".cdist-field-port").fill("8200")
    form.locator(".cdist-field-extra_args").fill("--lowvram; rm -rf /")
    form.locator(".cdist-submit").click()
    expect(form.locator(".cdist-error-port")).to_be_hidden()
    expect(form.locator(".cdist-error-extra_args")).to_contain_text("shell characters")
    comfy.page.wait_for_timeout(500)
    assert live.config_path.read_bytes() == before
    assert not [url for url in sent if "/distributed/workers" in url]


def test_the_servers_refusal_is_shown_beside_the_form(live, comfy):
    comfy.expected_statuses = {400}
    before = live.config_path.read_bytes()
    panel = comfy.open_panel()
    panel.locator(".cdist-add-worker").click()
    form = panel.locator(".cdist-worker-form")
    form.locator(".cdist-field-name").fill("clash")
    form.locator(".cdist-field-port").fill(str(live.workers[0].port))  # already worker1's port
    form.locator(".cdist-submit").click()
    expect(form.locator(".cdist-error-port, .cdist-form-error").filter(visible=True).first).to_contain_text(
        str(live.workers[0].port))
    assert live.config_path.read_bytes() == before


def test_add_edit_and_remove_a_worker(live, comfy):
    panel = comfy.open_panel()
    port = harness.free_port()
    panel.locator(".cdist-add-worker").click()
    form = panel.locator(".cdist-worker-form")
    form.locator(".cdist-field-name").fill("spare")
    form.locator(".cdist-field-port").fill(str(port))
    form.locator(".cdist-field-device").fill("3")
    form.locator(".cdist-field-extra_args").fill("--lowvram")
    form.locator(".cdist-submit").click()
    expect(form).to_have_count(0)
    added = harness.wait_until(lambda: [w for w in config_on_disk(live)["workers"] if w["port"] == port], 30,
                               what="the new worker on disk")[0]
    assert (added["name"], added["device"], added["extra_args"], added["enabled"]) == ("spare", 3, "--lowvram", True)
    card = comfy.card(added["id"])
    expect(card).to_have_attribute("data-state", "offline", timeout=TIMEOUT)  # nothing runs on that port

    card.locator(".cdist-edit").click()
    card.locator(".cdist-field-name").fill("spare-renamed")
    card.locator(".cdist-submit").click()
    harness.wait_until(lambda: any(w["name"] == "spare-renamed" for w in config_on_disk(live)["workers"]), 30,
                       what="the rename on disk")
    expect(card.locator(".cdist-name")).to_have_text("spare-renamed", timeout=TIMEOUT)

    card.locator(".cdist-remove").click()
    expect(card.locator(".cdist-remove")).to_have_text("Confirm remove")
    card.locator(".cdist-remove").click()
    harness.wait_until(lambda: all(w["port"] != port for w in config_on_disk(live)["workers"]), 30,
                       what="the worker removed on disk")
    expect(card).to_have_count(0, timeout=TIMEOUT)


def test_a_worker_is_added_and_edited_by_its_url_with_a_hidden_header(live, comfy):
    panel = comfy.open_panel()
    panel.locator(".cdist-add-worker").click()
    form = panel.locator(".cdist-worker-form")
    form.locator(".cdist-field-name").fill("pod")
    form.locator(".cdist-field-url").fill("https://pod-8188.proxy.example.net/comfy")
    form.locator(".cdist-field-headers").fill("X-Proxy-Token: abc123")
    form.locator(".cdist-submit").click()
    expect(form).to_have_count(0)
    added = harness.wait_until(lambda: [w for w in config_on_disk(live)["workers"] if w["name"] == "pod"], 30,
                               what="the worker by url on disk")[0]
    assert added["url"] == "https://pod-8188.proxy.example.net/comfy" and "port" not in added
    assert added["headers"] == {"X-Proxy-Token": "abc123"}
    card = comfy.card(added["id"])
    expect(card).to_have_attribute("data-state", "offline", timeout=TIMEOUT)  # nothing answers there
    expect(card.locator(".cdist-start")).to_be_hidden()  # a worker by url is started where it runs
    assert "abc123" not in panel.inner_text()

    card.locator(".cdist-edit").click()
    expect(card.locator(".cdist-field-headers")).to_have_value("X-Proxy-Token: (hidden)")
    expect(card.locator(".cdist-field-url")).to_have_value("https://pod-8188.proxy.example.net/comfy")
    card.locator(".cdist-field-name").fill("pod-renamed")
    card.locator(".cdist-submit").click()
    harness.wait_until(lambda: any(w["name"] == "pod-renamed" for w in config_on_disk(live)["workers"]), 30,
                       what="the rename on disk")
    edited = next(w for w in config_on_disk(live)["workers"] if w["id"] == added["id"])
    assert edited["headers"] == {"X-Proxy-Token": "abc123"}  # the hidden value kept what it was

    card.locator(".cdist-edit").click()
    card.locator(".cdist-field-url").fill("not a url")
    card.locator(".cdist-submit").click()
    expect(card.locator(".cdist-error-url")).to_contain_text("http:// or https://")


def test_detect_gpus_lists_the_masters_gpus(live, comfy):
    gpus = live.master.get("/distributed/gpus").json()["gpus"]
    panel = comfy.open_panel()
    panel.locator(".cdist-detect-gpus").click()
    expect(panel.locator(".cdist-gpus .cdist-box-title")).to_contain_text(f"GPUs on the master's machine: {len(gpus)}")
    expect(panel.locator(".cdist-gpu-item")).to_have_count(len(gpus))
    if not gpus:
        expect(panel.locator(".cdist-gpus .cdist-empty")).to_be_visible()


def test_the_running_job_shows_each_participants_progress(live, comfy, tmp_path):
    panel = comfy.open_panel()
    expect(panel.locator('.cdist-instance[data-state="online"]')).to_have_count(3, timeout=TIMEOUT)
    prompt_id = live.master.queue_prompt(harness.image_workflow(seed=11, batch=2, seconds_per_image=3))

    job = panel.locator(".cdist-job").first
    expect(job).to_have_attribute("data-state", "running", timeout=TIMEOUT)
    shares = job.locator(".cdist-share")
    expect(shares).to_have_count(3)
    assert shares.evaluate_all("rows => rows.map(r => r.dataset.participant)") == ["master", "worker1", "worker2"]
    expect(job.locator('.cdist-share[data-state="running"], .cdist-share[data-state="queued"]').first).to_be_visible()
    # the master's own share runs as soon as its prompt does, not "queued" until its images are in
    expect(job.locator('.cdist-share[data-participant="master"]')).to_have_attribute("data-state", "running")
    # a worker's sampling steps, from its own websocket (the probe tells 10 steps as a sampler does)
    working = job.locator('.cdist-share[data-participant="worker1"] .cdist-count')
    expect(working).to_have_text(re.compile(r"^step \d+ of 10$"), timeout=TIMEOUT)
    comfy.scroll_to(job)
    comfy.screenshot(f"progress-{comfy.ui}-running", tmp_path)

    live.master.wait_prompt(prompt_id)
    expect(job).to_have_attribute("data-state", "done", timeout=TIMEOUT)
    expect(job.locator(".cdist-row .cdist-count").first).to_have_text("6 of 6 images")  # images, not seed slots
    for participant in ("master", "worker1", "worker2"):
        share = job.locator(f'.cdist-share[data-participant="{participant}"]')
        expect(share.locator(".cdist-count")).to_have_text("2 images")
    comfy.scroll_to(job)
    comfy.screenshot(f"progress-{comfy.ui}-done", tmp_path)


def test_a_failed_worker_is_named_with_its_error(live, comfy, tmp_path):
    config = live.default_config()
    ghost_port = harness.free_port()  # nothing listens there: dispatch fails at once
    config["workers"].append({"id": "ghost", "name": "ghost", "port": ghost_port, "device": None,
                              "enabled": True, "extra_args": ""})
    live.reset_config(config)
    panel = comfy.open_panel()
    expect(comfy.card("ghost")).to_have_attribute("data-state", "offline", timeout=TIMEOUT)
    expect(comfy.card("ghost").locator(".cdist-error")).to_contain_text(str(ghost_port))

    _entry, images = run_job(live, seed=12, batch=1)
    assert images == 4  # the ghost's unit was rendered by another worker
    # known to be down before the job, so planned out: the job says so and why
    job = panel.locator(".cdist-job").first
    expect(job).to_have_attribute("data-state", "done", timeout=TIMEOUT)
    expect(job.locator('.cdist-share[data-participant="ghost"]')).to_have_count(0)
    notice = job.locator(".cdist-notice").filter(has_text="ghost")
    expect(notice).to_contain_text("left out")
    expect(notice).to_contain_text(str(ghost_port))
    expect(comfy.card("ghost").locator(".cdist-error")).not_to_contain_text("Errno")
    comfy.scroll_to(job)
    comfy.screenshot(f"failed-worker-{comfy.ui}", tmp_path)


def test_start_a_local_worker_view_its_log_and_stop_it(live, comfy, tmp_path):
    port = harness.free_port()
    worker = live.master.post("/distributed/workers", {"name": "extra", "port": port}).json()["worker"]
    panel = comfy.open_panel()
    card = comfy.card(worker["id"])
    expect(card).to_have_attribute("data-state", "offline", timeout=TIMEOUT)
    expect(card.locator(".cdist-stop")).to_be_hidden()
    try:
        card.locator(".cdist-start").click()
        # at once: starting, with Stop the only button that applies
        expect(card).to_have_attribute("data-transition", "starting", timeout=TIMEOUT)
        expect(card.locator(".cdist-state")).to_have_text("starting…")
        expect(card.locator(".cdist-start")).to_be_hidden()
        expect(card.locator(".cdist-stop")).to_be_visible()
        expect(card).to_have_attribute("data-state", "online", timeout=240_000)  # a whole ComfyUI starts
        expect(card).not_to_have_attribute("data-transition", "starting")
        expect(card.locator(".cdist-state")).to_have_text("online")
        expect(card.locator(".cdist-start")).to_be_hidden()
        card.locator(".cdist-log-button").click()
        expect(card.locator(".cdist-log")).to_contain_text(str(port), timeout=TIMEOUT)
        comfy.screenshot(f"worker-log-{comfy.ui}", tmp_path)
        card.locator(".cdist-log-button").click()  # closed
        card.locator(".cdist-stop").click()
        expect(card.locator(".cdist-state")).to_have_text("stopping…", timeout=TIMEOUT)
        expect(card.locator(".cdist-stop")).to_be_hidden()
        expect(card).to_have_attribute("data-state", "offline", timeout=60_000)
        expect(card.locator(".cdist-state")).to_have_text("offline")
        expect(card.locator(".cdist-start")).to_be_visible()
        expect(card.locator(".cdist-gpu-name")).to_have_text("GPU unknown")  # nothing stale shown
        expect(card.locator(".cdist-vram-text")).to_have_text("VRAM unknown")
        expect(panel.locator(".cdist-message, .cdist-error").filter(has_text="Could not")).to_have_count(0)
    finally:
        live.master.post(f"/distributed/workers/{worker['id']}/stop", timeout=60)  # 409 if already stopped


def test_stop_is_offered_only_for_workers_this_master_started(live, comfy):
    comfy.open_panel()
    card = comfy.card("worker1")  # started by the test harness, not by the master
    expect(card).to_have_attribute("data-state", "online", timeout=TIMEOUT)
    expect(card.locator(".cdist-stop")).to_be_hidden()
    expect(card.locator(".cdist-start")).to_be_hidden()
    card.locator(".cdist-log-button").click()  # its log is where it was started: the card says so
    expect(card.locator(".cdist-log")).to_contain_text("this master did not start worker1", timeout=TIMEOUT)


def test_the_api_secret_is_shown_for_scripts_and_remote_machines(live, comfy):
    panel = comfy.open_panel()
    panel.locator(".cdist-show-secret").click()
    expected = live.master.auth()["X-Distributed-Secret"]
    expect(panel.locator(".cdist-secret-value")).to_have_text(f"X-Distributed-Secret: {expected}", timeout=TIMEOUT)


def test_opening_and_closing_the_panel_stops_polling_and_logs_no_errors(live, comfy):
    polls = []
    comfy.page.on("request", lambda r: polls.append(r.url) if r.url.endswith("/distributed/status") else None)
    comfy.open_panel()
    expect(comfy.panel().locator('.cdist-instance[data-state="online"]')).to_have_count(3, timeout=TIMEOUT)
    comfy.page.wait_for_timeout(3500)
    assert len(polls) >= 2  # it polls while open
    comfy.close_panel()
    comfy.page.wait_for_timeout(500)
    count = len(polls)
    comfy.page.wait_for_timeout(4000)
    assert len(polls) == count  # and stops when closed
    comfy.open_panel()
    expect(comfy.panel().locator(".cdist-instance")).to_have_count(3, timeout=TIMEOUT)
    assert comfy.panel().count() == 1
    # the fixture then fails the test on any console error or page error


def real_toasts_for_an_error_and_a_left_out_worker(live, comfy):
    """On the current frontend: an error and a left-out worker reach the user as its own toasts."""
    panel = comfy.open_panel()
    expect(panel.locator('.cdist-instance[data-state="online"]')).to_have_count(3, timeout=TIMEOUT)
    panel.locator('.cdist-instance[data-id="worker1"] .cdist-stop').evaluate("button => button.click()")
    toasts = comfy.page.locator(".p-toast-message")
    expect(toasts.filter(has_text="not started from this master")).to_have_count(1, timeout=TIMEOUT)
    config = live.default_config()
    config["workers"].append({"id": "ghost", "name": "ghost", "port": harness.free_port(), "enabled": True})
    live.reset_config(config)
    expect(comfy.card("ghost")).to_have_attribute("data-state", "offline", timeout=TIMEOUT)
    run_job(live, seed=14, batch=1)
    left_out = toasts.filter(has_text="ghost")
    expect(left_out).to_have_count(1, timeout=TIMEOUT)
    expect(left_out).to_contain_text("left out")
    expect(left_out).to_contain_text("the job goes on")


def test_the_sidebar_tab_path_with_a_stand_in_extension_manager(live, comfy):
    """The current frontend's path, where only the legacy UI runs: a stand-in app.extensionManager
    records the tab and the toasts, and our extension's setup() runs again to take that path."""
    comfy.page.locator(f"{LEGACY_BUTTON}, {SIDEBAR_BUTTON}").first.wait_for(timeout=60_000)
    comfy.expected_statuses = {409}  # the Stop below is refused on purpose, to raise a toast
    if not comfy.page.locator(LEGACY_BUTTON).count():  # the current frontend: its own toasts
        real_toasts_for_an_error_and_a_left_out_worker(live, comfy)
        return
    tab = comfy.page.evaluate("""async () => {
        const { app } = await import("/scripts/app.js");
        window.cdistToasts = [];
        app.extensionManager = {  // for the rest of this page's life
            registerSidebarTab: (tab) => { window.cdistTab = tab; },
            toast: { add: (toast) => window.cdistToasts.push(toast) },
        };
        await app.extensions.find((e) => e.name === "comfyui.distributed").setup();
        const { id, icon, title, tooltip, type } = window.cdistTab;
        const host = document.createElement("div");
        host.id = "cdist-test-host";
        host.style.cssText = "position: fixed; right: 200px; top: 0; width: 320px; height: 100vh";
        document.body.append(host);
        window.cdistTab.render(host);
        window.cdistTab.render(host);  // Vue may call it again on a re-render: still one panel
        return { id, icon, title, tooltip, type };
    }""")
    assert tab == {"id": "comfyui-distributed", "icon": "pi pi-server", "title": "Distributed",
                   "tooltip": "Distributed GPUs", "type": "custom"}
    host = comfy.page.locator("#cdist-test-host")
    expect(host.locator(".cdist-panel")).to_have_count(1)
    expect(host.locator(".cdist-header .cdist-close")).to_have_count(0)  # the sidebar closes the tab itself
    expect(host.locator('.cdist-instance[data-state="online"]')).to_have_count(3, timeout=TIMEOUT)

    # An error reaches the user as a toast, not inline: the panel hides Stop for worker1, which this
    # master did not start, so press the hidden button from script to get the server's refusal.
    host.locator('.cdist-instance[data-id="worker1"] .cdist-stop').evaluate("button => button.click()")
    toast = comfy.page.wait_for_function("window.cdistToasts.length && window.cdistToasts[0]").json_value()
    assert toast["severity"] == "error" and toast["summary"] == "Distributed" and toast["life"] == 5000
    assert "not started from this master" in toast["detail"]
    expect(host.locator(".cdist-message")).to_be_hidden()

    # A worker left out of a job is a warning toast, once per notice
    config = live.default_config()
    config["workers"].append({"id": "ghost", "name": "ghost", "port": harness.free_port(), "enabled": True})
    live.reset_config(config)
    expect(host.locator('.cdist-instance[data-id="ghost"]')).to_have_attribute("data-state", "offline",
                                                                               timeout=TIMEOUT)
    run_job(live, seed=14, batch=1)
    left_out = comfy.page.wait_for_function(
        "window.cdistToasts.filter((t) => t.detail.includes('ghost')).length && "
        "window.cdistToasts.filter((t) => t.detail.includes('ghost'))").json_value()
    assert len(left_out) == 1 and left_out[0]["severity"] == "warn" and "left out" in left_out[0]["detail"], left_out

    polls = []
    comfy.page.on("request", lambda r: polls.append(r.url) if r.url.endswith("/distributed/status") else None)
    comfy.page.evaluate("window.cdistTab.destroy()")
    expect(host.locator(".cdist-panel")).to_have_count(0)
    comfy.page.wait_for_timeout(4000)
    assert polls == []  # destroyed: no more polling


def test_a_tiled_upscale_job_counts_tiles_per_participant(live, comfy, tmp_path):
    from distributed_core import sandbox
    from test_e2e_upscale import upscale_workflow
    from PIL import Image

    harness.link_checkpoint(live.tree, harness.build_checkpoint(live.tree, sandbox.CACHE / harness.CHECKPOINT))
    Image.new("RGB", (64, 64), (120, 90, 60)).save(live.master.dirs["input"] / "ui-upscale.png")
    config = live.default_config()
    config["workers"][1]["enabled"] = False  # two models in RAM are enough
    live.reset_config(config)
    panel = comfy.open_panel()
    try:
        entry = live.master.wait_prompt(live.master.queue_prompt(upscale_workflow(["ui-upscale.png"])), 600)
    finally:
        for instance in live.instances:
            instance.post("/free", {"unload_models": True, "free_memory": True})
    assert harness.error_of(entry) == ""
    job = panel.locator(".cdist-job").first
    expect(job).to_have_attribute("data-state", "done", timeout=TIMEOUT)
    expect(job.locator(".cdist-role")).to_have_text("tiles")
    expect(job.locator(".cdist-row .cdist-count").first).to_have_text("9 of 9 tiles")
    counts = job.locator(".cdist-share .cdist-count").all_inner_texts()
    assert len(counts) == 2 and all(re.fullmatch(r"\d+ tiles", c) for c in counts), counts
    assert sum(int(c.split()[0]) for c in counts) == 9, counts
    comfy.scroll_to(job)
    comfy.screenshot(f"upscale-{comfy.ui}-done", tmp_path)


def test_the_cfg_per_gpu_template_renders_each_value_and_the_panel_says_which(live, comfy, tmp_path):
    """The Distributed Value template as a user runs it: loaded, queued from the browser; each share
    in the panel says its CFG. (The test's small random checkpoint stands in for SD 1.5.)"""
    from distributed_core import sandbox
    harness.link_checkpoint(live.tree, harness.build_checkpoint(live.tree, sandbox.CACHE / harness.CHECKPOINT))
    config = live.default_config()
    config["workers"][1]["enabled"] = False  # two models in RAM are enough
    live.reset_config(config)
    template = json.loads((harness.REPO / "example_workflows" / "Distributed Value - a CFG per GPU.json").read_text())
    nodes = {n["type"]: n for n in template["nodes"]}
    assert nodes["DistributedValue"]["title"] == "CFG per GPU"
    assert nodes["CheckpointLoaderSimple"]["properties"]["models"][0]["directory"] == "checkpoints"
    nodes["CheckpointLoaderSimple"]["widgets_values"] = [harness.CHECKPOINT]
    nodes["EmptyLatentImage"]["widgets_values"] = [64, 64, 1]
    nodes["KSampler"]["widgets_values"][2] = 1  # one step
    panel = comfy.open_panel()

    def template_runs() -> list[dict]:  # its SaveImage (node 9) names distributed_cfg
        return [e for e in live.master.get("/history").json().values()
                if (e["prompt"][2].get("9") or {}).get("inputs", {}).get("filename_prefix") == "distributed_cfg"]

    before = {e["prompt"][1] for e in template_runs()}
    try:
        comfy.page.evaluate("""async (graph) => {
            const { app } = await import("/scripts/app.js");
            await app.loadGraphData(graph);
            await app.queuePrompt(0, 1);
        }""", template)
        [entry] = harness.wait_until(lambda: [e for e in template_runs() if e["prompt"][1] not in before
                                             and (e.get("outputs") or harness.error_of(e))] or None,
                                     300, what="the template's run")
    finally:
        for instance in live.instances:
            instance.post("/free", {"unload_models": True, "free_memory": True})
    assert harness.error_of(entry) == "" and len(live.master.saved_images(entry, "9")) == 2
    # this run's job in the panel, found by its prompt (an earlier test's job may be listed above it)
    [job_id] = harness.wait_until(lambda: [j["job_id"] for j in live.master.get("/distributed/status").json()["recent"]
                                           if j["prompt_id"] == entry["prompt"][1]] or None, 30, what="the job")
    job = panel.locator(f'.cdist-job[data-job-id="{job_id}"]')
    expect(job).to_have_attribute("data-state", "done", timeout=TIMEOUT)
    expect(job.locator(".cdist-share")).to_have_count(2)
    values = dict(zip(job.locator(".cdist-share").evaluate_all("rows => rows.map(r => r.dataset.participant)"),
                      job.locator(".cdist-share .cdist-share-values").all_inner_texts()))
    assert values == {"master": "CFG per GPU: 4", "worker1": "CFG per GPU: 7"}, values
    comfy.scroll_to(job)
    comfy.screenshot(f"values-{comfy.ui}-done", tmp_path)


def runs_with_prefix(live, prefix: str) -> list[dict]:
    """The master's finished runs whose Save Image (node 5) names ``prefix``, oldest first."""
    return sorted((e for e in live.master.get("/history").json().values()
                   if (e["prompt"][2].get("5") or {}).get("inputs", {}).get("filename_prefix") == prefix
                   and e.get("outputs")), key=lambda e: e["prompt"][0])


def test_a_workers_image_dragged_back_into_comfyui_makes_that_image_again(live, comfy):
    """Queued from the browser; worker1's image (the second of the batch) opened in ComfyUI as a
    dropped file is; queued again, the master's own image of the new batch is that image."""
    import numpy as np
    from PIL import Image
    live.reset_config()
    prompt = harness.image_workflow(seed=70, batch=1)
    prompt["5"]["inputs"]["filename_prefix"] = "dragged"
    comfy.open_panel()
    comfy.page.evaluate("""async (prompt) => {
        const { app } = await import("/scripts/app.js");
        await app.loadApiJson(prompt);
        await app.queuePrompt(0, 1);
    }""", prompt)
    [first] = harness.wait_until(lambda: runs_with_prefix(live, "dragged") or None, 120, what="the browser's job")
    files = first["outputs"]["5"]["images"]
    images = live.master.saved_images(first, "5")
    assert harness.blue_values(images) == [70, 71, 72]
    info = Image.open(live.master.dirs["output"] / files[1].get("subfolder", "") / files[1]["filename"]).info
    assert json.loads(info["distributed"])["participant"] == "worker1"
    comfy.page.evaluate("""async (name) => {
        const { app } = await import("/scripts/app.js");
        const blob = await (await fetch(`/view?filename=${encodeURIComponent(name)}&type=output`)).blob();
        await app.handleFile(new File([blob], name, { type: "image/png" }));  // what a drop onto the canvas does
        await app.queuePrompt(0, 1);
    }""", files[1]["filename"])
    runs = harness.wait_until(lambda: (lambda r: r if len(r) == 2 else None)(runs_with_prefix(live, "dragged")),
                              120, what="the dragged image's job")
    again = live.master.saved_images(runs[1], "5")
    assert harness.blue_values(again) == [71, 72, 73]
    assert np.array_equal(again[0], images[1])


# --- the worker doctor and newcomer details ------------------------------------------------------------

def test_the_check_button_checks_every_worker_with_the_current_workflow(live, comfy, tmp_path):
    config = live.default_config()
    ghost_port = harness.free_port()  # configured, not running
    config["workers"].append({"id": "ghost", "name": "ghost", "port": ghost_port, "device": None,
                              "enabled": True, "extra_args": ""})
    live.reset_config(config)
    template = json.loads((harness.REPO / "example_workflows" / "Multi-GPU Collector - a colour per GPU.json").read_text())
    comfy.page.locator(f"{LEGACY_BUTTON}, {SIDEBAR_BUTTON}").first.wait_for(timeout=60_000)
    comfy.page.evaluate("""async (graph) => {
        const { app } = await import("/scripts/app.js");
        await app.loadGraphData(graph);
    }""", template)
    sent = []
    comfy.page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/distributed/check") else None)
    panel = comfy.open_panel()
    panel.locator(".cdist-check-button").click()
    box = panel.locator(".cdist-check")
    expect(box.locator(".cdist-check-item")).to_have_count(4, timeout=TIMEOUT)
    expect(box.locator(".cdist-box-title")).to_contain_text("with the current workflow: 3 of 4 ready")
    for ready in ("master", "worker1", "worker2"):
        item = box.locator(f'.cdist-check-item[data-id="{ready}"]')
        expect(item).to_have_attribute("data-ok", "true")
        expect(item.locator(".cdist-check-message")).to_have_text(re.compile(r"^Ready"))
    expect(box.locator('.cdist-check-item[data-id="worker1"] .cdist-check-relay')).to_contain_text(
        f"yes ({live.workers[0].url}/distributed/relay)")
    ghost = box.locator('.cdist-check-item[data-id="ghost"]')
    expect(ghost).to_have_attribute("data-ok", "false")
    expect(ghost.locator(".cdist-check-reachable")).to_have_text("no")
    # not a dash and an address run together: what could not be checked says why
    expect(ghost.locator(".cdist-check-relay")).to_have_text("not checked: the master cannot reach it")
    reaches = box.locator('.cdist-check-item[data-id="worker1"] .cdist-check-relay')
    assert reaches.evaluate("d => d.querySelectorAll('wbr').length") >= 3  # wraps after / . : only
    height, viewport = box.evaluate("b => [b.getBoundingClientRect().height, window.innerHeight]")
    assert 0.2 * viewport <= height <= 0.5 * viewport, (height, viewport)  # long: it scrolls in its box
    expect(ghost).to_be_visible()  # scrolled to inside the box, not cut off
    expect(ghost.locator(".cdist-check-message")).to_contain_text("nothing listens on that port")
    expect(ghost.locator(".cdist-check-message")).to_contain_text("start it")
    # the current workflow went with the check, in the API format
    assert sent and {n["class_type"] for n in sent[-1]["prompt"].values()} == {
        "DistributedSeed", "EmptyImage", "MultiGPUCollector", "SaveImage"}, sent
    comfy.scroll_to(box)
    comfy.screenshot(f"check-{comfy.ui}", tmp_path)


def test_worker_forms_show_no_stray_zero_and_fields_fit_a_narrow_sidebar(live, comfy, tmp_path):
    panel = comfy.open_panel()  # in the current frontend: the sidebar at its default width
    panel.locator(".cdist-add-worker").click()
    form = panel.locator(".cdist-worker-form")
    stray = form.evaluate("f => [...f.childNodes].filter(n => n.nodeType === 3).map(n => n.textContent)")
    assert stray == [], stray  # "0" was shown when no GPU had been detected
    form.locator(".cdist-field-host").fill("192.168.100.200")
    form.locator(".cdist-field-port").fill("18189")
    print(f"\n[ui] panel width in the {comfy.ui} UI: {panel.evaluate('p => p.clientWidth')} px")
    visible = """i => { const r = i.getBoundingClientRect(), p = i.closest('.cdist-panel').parentElement
        .getBoundingClientRect(); return i.scrollWidth <= i.clientWidth && i.clientWidth >= 150 && r.right <= p.right; }"""
    for field in (".cdist-field-host", ".cdist-field-port"):
        assert form.locator(field).evaluate(visible), field
    assert panel.locator(".cdist-mode").evaluate(visible), "the mode field is cut off"
    comfy.screenshot(f"narrow-form-{comfy.ui}", tmp_path)


def test_a_job_that_ended_while_the_panel_was_closed_is_listed(live, comfy):
    _entry, images = run_job(live, seed=14, batch=1)
    assert images == 3
    panel = comfy.open_panel()
    job = panel.locator(".cdist-job").first
    expect(job).to_have_attribute("data-state", "done", timeout=TIMEOUT)
    expect(job.locator(".cdist-row .cdist-count").first).to_have_text("3 of 3 images")
