// The Distributed panel. One rendering path serves both UIs: the current frontend mounts it in a
// sidebar tab, the legacy UI in a floating panel. mountPanel(container) returns its destroy().
import { app } from "../../scripts/app.js";
import { askForSecret, master, storedSecret } from "./master_api.js";
import { showInSettings } from "./settings.js";
import { t, tCount } from "./i18n.js";

const POLL_MS = 3000;
const RENDER_MS = 250;
const JOBS_SHOWN = 3;
const GIB = 1024 ** 3;
const LOCAL_HOSTS = ["127.0.0.1", "localhost", "::1", "0.0.0.0"];
const HIDDEN = "(hidden)"; // a header value as the master shows it; sent back, it keeps what it is
const SHELL_CHARS = /[;|&`$<>\\"'(){}*?!#]/g; // the server refuses these in extra args
const JOB_ACTIVE = ["planned", "running"];
// A spread prompt's state (GET /distributed/spread) in words.
const SPREAD_STATES = {
  sent: "sending", queued: "queued", running: "running", arrived: "rendered, waiting for its turn",
  taken: "finishing", failed: "failed", moved: "moved on", withdrawn: "withdrawn", done: "done",
};

// Progress events arrive once on ComfyUI's socket; every open panel shows them.
const openPanels = new Set();
export function showProgress(summary) {
  toastNewNotices(summary);
  for (const panel of openPanels) panel.showJob(summary);
}

// The spread queue's "distributed_spread" event: who renders which prompt changed. Each open panel
// reads the section again at once rather than at its next poll.
export function showSpreadChange() {
  for (const panel of openPanels) panel.refreshSpread();
}

// A setting changed in ComfyUI's Settings dialog (settings.js): each open panel reads the config again.
export function refreshOpenPanels() {
  for (const panel of openPanels) panel.refresh();
}

// Workers left out of a job or failed during it: each notice once, as a toast in the current
// frontend, whether the panel is open or not (the legacy UI shows them in the panel's job list).
const noticesShown = new Map(); // job id -> notices already shown
function toastNewNotices(summary) {
  const toast = app.extensionManager?.toast;
  const shown = noticesShown.get(summary.job_id) || new Set();
  for (const notice of summary.notices || []) {
    if (shown.has(notice)) continue;
    shown.add(notice);
    toast?.add({ severity: "warn", summary: "Distributed", detail: notice, life: 8000 });
  }
  noticesShown.delete(summary.job_id);
  noticesShown.set(summary.job_id, shown);
  while (noticesShown.size > 50) noticesShown.delete(noticesShown.keys().next().value);
}

export function mountPanel(container, { onClose } = {}) {
  const panel = new Panel(container, onClose);
  return () => panel.destroy();
}

// --- small DOM helpers -------------------------------------------------------------------------

const PROPERTIES = new Set(["value", "checked", "disabled", "hidden", "type", "title", "noValidate"]);

// The current frontend (a sidebar tab, PrimeVue's components and icons), not the legacy UI.
function native() {
  return Boolean(app.extensionManager?.registerSidebarTab);
}

// h("div.a.b", {text, onclick, ...attributes}, children): an element in one expression.
function h(tag, props = {}, children = []) {
  const [name, ...classes] = tag.split(".");
  const el = document.createElement(name);
  if (name === "button" && classes.includes("cdist-button") && !classes.includes("p-button") && native()) {
    // the current frontend's own buttons: the main action filled, the others quieter
    classes.push("p-button", "p-component", "p-button-sm", ...(classes.includes("cdist-main") ? [] : ["p-button-secondary"]));
  }
  if (classes.length) el.className = classes.join(" ");
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null) continue;
    if (key === "text") el.textContent = value;
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (PROPERTIES.has(key)) el[key] = value;
    else el.setAttribute(key, value);
  }
  el.append(...[children].flat().filter((child) => child !== null && child !== undefined && child !== false));
  return el;
}

function bar(done, total, extraClass = "") {
  const fraction = total > 0 ? Math.min(1, Math.max(0, done / total)) : 0;
  const fill = h("div.cdist-bar-fill", { style: `width: ${(fraction * 100).toFixed(1)}%` });
  return h(`div.cdist-bar${extraClass}`, { role: "progressbar", "aria-valuemin": 0, "aria-valuemax": total,
    "aria-valuenow": done }, fill);
}

function dismissButton(box) {
  return h("button.cdist-close", { type: "button", title: "Dismiss", "aria-label": "Dismiss", text: "×",
    onclick: () => { box.hidden = true; } });
}

function section(title, children) {
  return h("section.cdist-section", {}, [h("h4.cdist-heading", { text: t(title) }), ...children]);
}

// "cuda:0 NVIDIA GeForce RTX 4090 : cudaMallocAsync" -> "NVIDIA GeForce RTX 4090"
function gpuLabel(deviceName) {
  return deviceName.replace(/^cuda:\d+\s*/, "").replace(/\s*:\s*[\w-]+$/, "");
}

function describe(err) {
  return err?.message || String(err);
}

// --- the panel ---------------------------------------------------------------------------------

class Panel {
  constructor(container, onClose) {
    this.cards = new Map(); // instance id -> InstanceCard, in the order the master lists them
    this.jobs = new Map(); // job id -> {summary, seenAt, order}
    this.jobOrder = 0;
    this.gpus = []; // from Detect GPUs, offered in the worker form
    this.reachable = true;
    this.closed = false;
    this.build(onClose);
    container.append(this.root);
    openPanels.add(this);
    this.refresh();
  }

  build(onClose) {
    this.headline = h("span.cdist-headline", { text: t("connecting…") });
    this.message = h("div.cdist-message", { hidden: true, role: "status" });
    this.warning = h("div.cdist-warning", { hidden: true });
    this.results = h("div.cdist-results", { hidden: true });
    this.gpuList = h("div.cdist-gpus", { hidden: true });
    this.secretBox = h("div.cdist-secret", { hidden: true });
    this.checkBox = h("div.cdist-check", { hidden: true, "aria-live": "polite" });
    this.instanceList = h("div.cdist-instances");
    this.addSlot = h("div.cdist-add-slot");
    this.jobList = h("div.cdist-jobs", {}, h("div.cdist-empty", { text: t("No distributed job yet.") }));

    // The current frontend: its own buttons (PrimeVue's classes, PrimeIcons) in a header like its
    // Queue tab's. The legacy UI has neither: the same buttons with their names.
    const inFrontend = native();
    const tool = (cls, icon, text, title, run) => h(
      `button.cdist-button.cdist-tool.${cls}${inFrontend ? ".p-button.p-component.p-button-text.p-button-rounded.p-button-sm.p-button-icon-only" : ""}`,
      { type: "button", title: t(title), "aria-label": t(text), onclick: (event) => this.runAction(event.currentTarget, run) },
      inFrontend ? h(`i.pi.${icon}.p-button-icon`, { "aria-hidden": "true" }) : t(text));
    const checkButton = h("button.cdist-button.cdist-check-button.cdist-main",
      { type: "button", title: t("Check that every worker can take part, with the current workflow"),
        onclick: (event) => this.runAction(event.currentTarget, () => this.runCheck()) },
      [inFrontend && h("i.pi.pi-check-circle.p-button-icon.p-button-icon-left", { "aria-hidden": "true" }),
        h("span.p-button-label", { text: t("Check workers") })]);

    this.root = h("div.cdist-panel", { "data-ui": inFrontend ? "sidebar" : "legacy" }, [
      h("div.cdist-header", {}, [
        h("span.cdist-title", { text: "Distributed" }),
        h("div.cdist-toolbar", { role: "toolbar", "aria-label": "Distributed actions" }, [
          tool("cdist-clear-vram", "pi-eraser", "Clear VRAM", "Clear VRAM: unload models and free VRAM on every instance",
            () => this.clearVram()),
          tool("cdist-interrupt", "pi-stop-circle", "Interrupt all", "Interrupt all: stop the running job on every instance",
            () => this.interrupt()),
          tool("cdist-detect-gpus", "pi-microchip", "Detect GPUs", "Detect GPUs: list the GPUs of the master's machine",
            () => this.detectGpus()),
          tool("cdist-show-secret", "pi-key", "API secret", "API secret: what scripts and other machines send",
            () => this.showSecret()),
        ]),
        onClose && h("button.cdist-close", { type: "button", title: "Close", "aria-label": "Close", text: "×",
          onclick: onClose }),
      ]),
      this.headline,
      checkButton,
      this.message,
      this.warning,
      this.checkBox,
      this.results,
      this.gpuList,
      this.secretBox,
      section("Jobs", [this.jobList]),
      section("Instances", [
        this.instanceList,
        this.addSlot,
        h("button.cdist-button.cdist-add-worker", { type: "button", onclick: () => this.toggleAddForm() },
          [inFrontend && h("i.pi.pi-plus.p-button-icon.p-button-icon-left", { "aria-hidden": "true" }),
            h("span.p-button-label", { text: t("Add worker") })]),
      ]),
      section("Spread queue", [this.buildSpread()]),
      section("Settings", [this.buildSettings()]),
    ]);
  }

  destroy() {
    this.closed = true;
    clearTimeout(this.timer);
    clearTimeout(this.renderTimer);
    openPanels.delete(this);
    this.root.remove();
  }

  // --- polling ---------------------------------------------------------------------------------

  // Poll now, then every POLL_MS while open; a call during a poll folds into one more poll after it.
  refresh() {
    if (this.closed) return Promise.resolve();
    if (this.polling) {
      this.pollAgain = true;
      return this.polling;
    }
    clearTimeout(this.timer);
    this.polling = this.poll().finally(() => {
      this.polling = null;
      if (this.closed) return;
      if (this.pollAgain) {
        this.pollAgain = false;
        this.refresh();
      } else {
        this.timer = setTimeout(() => this.refresh(), POLL_MS);
      }
    });
    return this.polling;
  }

  async poll() {
    const startedAt = Date.now();
    try {
      const [status, config, spread] = await Promise.all([master.status(), master.config(), master.spread()]);
      if (this.closed) return;
      this.reachable = true;
      this.showStatus(status, startedAt);
      this.showSettings(config);
      this.showSpread(spread);
      await Promise.all([...this.cards.values()].map((card) => card.refreshLog()));
    } catch (err) {
      if (this.closed) return;
      this.headline.textContent = err?.status === 403 ? "needs the master's secret: press API secret"
        : t("master unreachable");
      this.headline.dataset.error = "";
      if (this.reachable) this.notify(`Cannot read the status: ${describe(err)}`); // once, not every poll
      this.reachable = false;
    }
  }

  showStatus(status, startedAt) {
    const instances = status.instances || [];
    const up = instances.filter((i) => i.state === "online" || i.state === "busy").length;
    this.headline.textContent = `${t("{n} of {total} online", { n: up, total: instances.length })} · ${t(status.mode)}`;
    delete this.headline.dataset.error;
    this.showRay(status.ray);
    this.warning.hidden = !status.config_error;
    this.warning.textContent = status.config_error
      ? `The config file is unusable, so defaults apply: ${status.config_error}` : "";

    const seen = new Set();
    for (const info of instances) {
      seen.add(info.id);
      let card = this.cards.get(info.id);
      if (!card || card.role !== info.role) {
        card?.root.remove();
        card = new InstanceCard(this, info);
        this.cards.set(info.id, card);
      }
      card.update(info);
    }
    for (const [id, card] of this.cards) {
      if (!seen.has(id)) {
        card.root.remove();
        this.cards.delete(id);
      }
    }
    // Re-append only when the order changed: moving a node would take focus from a form inside it.
    const order = instances.map((i) => this.cards.get(i.id).root);
    if (order.some((node, k) => this.instanceList.children[k] !== node)) this.instanceList.append(...order);

    // Once, when the panel opens: the last jobs that ended while it was closed (the master lists
    // them newest first; shown oldest first, as events would have); later endings arrive as events.
    if (!this.listedEnded) {
      const ended = (status.recent || []).slice(0, JOBS_SHOWN).reverse();
      for (const job of ended) if (!this.jobs.has(job.job_id)) this.showJob(job, false);
      this.listedEnded = true;
    }
    for (const job of status.jobs || []) this.showJob(job, false);
    // A job that the master no longer lists has ended; drop it if its last event was missed.
    // It keeps its place with the final state that the master's recent jobs give it, if they do.
    const listed = new Set((status.jobs || []).map((j) => j.job_id));
    const ended = new Map((status.recent || []).map((j) => [j.job_id, j]));
    for (const [id, entry] of this.jobs) {
      if (!JOB_ACTIVE.includes(entry.summary.state) || listed.has(id) || entry.seenAt >= startedAt) continue;
      if (ended.has(id)) this.jobs.set(id, { ...entry, summary: ended.get(id), seenAt: Date.now() });
      else this.jobs.delete(id);
    }
    this.renderJobs();
  }

  // --- messages --------------------------------------------------------------------------------

  notify(message, severity = "error") {
    const toast = app.extensionManager?.toast; // the current frontend; the legacy UI shows it inline
    if (toast) {
      toast.add({ severity, summary: "Distributed", detail: message, life: 5000 });
      return;
    }
    clearTimeout(this.messageTimer);
    this.message.dataset.severity = severity;
    this.message.replaceChildren(h("span", { text: message }), dismissButton(this.message));
    this.message.hidden = false;
    if (severity !== "error") this.messageTimer = setTimeout(() => { this.message.hidden = true; }, 5000);
  }

  async runAction(button, run) {
    button.disabled = true;
    try {
      await run();
    } catch (err) {
      this.notify(describe(err));
    } finally {
      button.disabled = false;
    }
  }

  // --- toolbar actions -------------------------------------------------------------------------

  showResults(title, results) {
    const failed = results.filter((r) => !r.ok);
    this.results.replaceChildren(
      h("div.cdist-box-title", {}, [
        h("span", { text: `${title}: ${results.length - failed.length} of ${results.length} reached` }),
        dismissButton(this.results),
      ]),
      ...results.map((r) => h("div.cdist-result", { "data-id": r.id, "data-ok": String(r.ok) }, [
        h("span.cdist-mark", { text: r.ok ? "✓" : "✗" }),
        h("span.cdist-result-name", { text: r.name }),
        h("span.cdist-result-text", { text: r.ok ? "done" : r.error }),
      ])));
    this.results.hidden = false;
    if (failed.length) this.notify(`${title} did not reach ${failed.map((r) => r.name).join(", ")}`);
  }

  async clearVram() {
    const { results } = await master.clearVram();
    this.showResults("Clear VRAM", results);
    this.refresh();
  }

  async interrupt() {
    const { results } = await master.interrupt();
    this.showResults("Interrupt", results);
    this.refresh();
  }

  async showSecret() {
    let shown;
    try {
      shown = await master.secret(); // only a browser on the master's own machine is shown it
    } catch (err) {
      if (err.status !== 403) throw err;
      // another machine: the secret this browser sends, asked for now if it has none or the user wants another
      const secret = await askForSecret(storedSecret()
        ? "Enter the master's secret again to change the one this browser keeps (Cancel keeps it)."
        : "Enter the master's secret.");
      const kept = secret || storedSecret();
      if (!kept) return;
      shown = { header: "X-Distributed-Secret", secret: kept, path: "" };
      this.refresh();
    }
    const { header, secret, path } = shown;
    this.secretBox.replaceChildren(
      h("div.cdist-box-title", {}, [h("span", { text: "API secret" }), dismissButton(this.secretBox)]),
      h("div.cdist-muted", { text: "Scripts and other machines that change settings send this header:" }),
      h("code.cdist-secret-value", { text: `${header}: ${secret}` }),
      h("div.cdist-muted", { text: path
        ? `Kept in ${path}; delete that file and restart to make a new one.`
        : "This browser keeps it and sends it with every call to the master." }));
    this.secretBox.hidden = false;
  }

  // --- the worker doctor ----------------------------------------------------------------------

  async runCheck() {
    let prompt = null;
    try {
      prompt = (await app.graphToPrompt())?.output || null; // the current workflow, in the API format
    } catch {
      prompt = null; // no graph to read: check reachability and versions only
    }
    if (prompt && !Object.keys(prompt).length) prompt = null;
    this.checkBox.replaceChildren(h("div.cdist-muted", { text: "Checking every instance…" }));
    this.checkBox.hidden = false;
    try {
      this.showCheck(await master.check(prompt), Boolean(prompt));
    } catch (err) {
      this.checkBox.hidden = true;
      throw err;
    }
  }

  showCheck(answer, withWorkflow) {
    const instances = answer.instances || [];
    const ready = instances.filter((i) => checkOk(i, answer.extension_version));
    this.checkBox.replaceChildren(
      h("div.cdist-box-title", {}, [
        h("span", { text: `Check${withWorkflow ? " with the current workflow" : ""}: `
          + `${ready.length} of ${instances.length} ready` }),
        dismissButton(this.checkBox),
      ]),
      ...instances.map((i) => checkView(i, answer.extension_version)));
    this.checkBox.hidden = false;
  }

  async detectGpus() {
    const { gpus } = await master.gpus();
    this.gpus = gpus;
    this.gpuList.replaceChildren(
      h("div.cdist-box-title", {}, [
        h("span", { text: `GPUs on the master's machine: ${gpus.length}` }),
        dismissButton(this.gpuList),
      ]),
      ...(gpus.length
        ? gpus.map((gpu) => h("div.cdist-gpu-item", { "data-index": gpu.index }, [
          h("span.cdist-gpu-index", { text: `GPU ${gpu.index}` }),
          h("span.cdist-gpu-model", { text: gpu.name }),
          h("span.cdist-muted", { text: gpu.vram_total_mb ? `${(gpu.vram_total_mb / 1024).toFixed(1)} GB` : "" }),
        ]))
        : [h("div.cdist-empty", { text: "No NVIDIA GPU found." })]));
    this.gpuList.hidden = false;
  }

  toggleAddForm() {
    if (this.addForm) {
      this.addForm.remove();
      this.addForm = null;
      return;
    }
    const close = () => {
      this.addForm?.remove();
      this.addForm = null;
    };
    this.addForm = workerForm({
      values: { host: "127.0.0.1" },
      submitText: "Add worker",
      gpus: this.gpus,
      onSubmit: async (fields) => {
        await master.addWorker({ ...fields, enabled: true });
        close();
        this.refresh();
      },
      onCancel: close,
    });
    this.addSlot.append(this.addForm);
    this.addForm.querySelector("input").focus();
  }

  // --- settings --------------------------------------------------------------------------------

  buildSettings() {
    const save = () => this.saveSettings();
    this.mode = h("select.cdist-input.cdist-mode", { onchange: save }, [
      h("option", { value: "parallel", text: t("Parallel: all start at once") }),
      h("option", { value: "staggered", text: t("Staggered: start one by one") }),
    ]);
    this.stagger = h("input.cdist-input.cdist-stagger", { type: "number", min: 0, max: 600, step: 0.5, onchange: save });
    this.timeout = h("input.cdist-input.cdist-timeout", { type: "number", min: 1, max: 86400, step: 1, onchange: save });
    this.spreadQueue = h("input.cdist-spread-queue", { type: "checkbox", role: "switch", onchange: save });
    // Ray workers (the config's ray section): how many, and how many answered
    this.rayWorkers = h("input.cdist-input.cdist-ray-workers", { type: "number", min: 0, max: 1024, step: 1,
      onchange: save, title: "How many ComfyUI workers the Ray cluster runs, one GPU each; 0: one per GPU" });
    this.rayState = h("div.cdist-muted.cdist-ray-state");
    this.rayField = h("div.cdist-ray", { hidden: true }, [
      h("label.cdist-field", {}, [h("span.cdist-label", { text: t("Ray workers") }), this.rayWorkers]),
      this.rayState,
    ]);
    this.settingsError = h("div.cdist-form-error", { hidden: true });
    this.configPath = h("div.cdist-muted.cdist-config-path");
    this.settings = h("div.cdist-settings", {}, [
      h("label.cdist-field", {}, [h("span.cdist-label", { text: t("Mode") }), this.mode]),
      h("label.cdist-field", {}, [h("span.cdist-label", { text: t("Stagger delay (s)") }), this.stagger]),
      h("label.cdist-field", {}, [h("span.cdist-label", { text: t("Job timeout (s)") }), this.timeout]),
      h("div.cdist-field.cdist-field-inline", { title: t("Render each prompt without a Multi-GPU Collector whole on the next free GPU") }, [
        h("span.cdist-label", { text: t("Spread the queue") }),
        h("label.cdist-switch", { "aria-label": t("Spread the queue") }, [this.spreadQueue, h("span.cdist-slider")]),
      ]),
      this.rayField,
      this.settingsError,
      this.configPath,
    ]);
    return this.settings;
  }

  showSettings({ config, path }) {
    // Never overwrite what the user is typing, nor a value that is being saved.
    if (this.savingSettings || this.settings.contains(document.activeElement)) return;
    const settings = config.settings;
    this.mode.value = settings.mode;
    this.stagger.value = settings.stagger_delay;
    this.stagger.disabled = settings.mode !== "staggered";
    this.timeout.value = settings.job_timeout;
    this.spreadQueue.checked = Boolean(settings.spread_queue);
    this.rayField.hidden = !config.ray;
    if (config.ray) this.rayWorkers.value = config.ray.workers;
    this.configPath.textContent = path ? `Saved in ${path}` : "";
    showInSettings(settings); // ComfyUI's Settings dialog shows the same values
  }

  async saveSettings() {
    const values = { mode: this.mode.value, stagger_delay: Number(this.stagger.value),
      job_timeout: Number(this.timeout.value), spread_queue: this.spreadQueue.checked };
    this.stagger.disabled = values.mode !== "staggered";
    const rayWorkers = Number(this.rayWorkers.value);
    const problems = [];
    if (!this.rayField.hidden && (this.rayWorkers.value === "" || !Number.isInteger(rayWorkers) || rayWorkers < 0)) {
      problems.push("Ray workers must be a whole number, 0 for one per GPU.");
    }
    if (this.stagger.value === "" || !(values.stagger_delay >= 0 && values.stagger_delay <= 600)) {
      problems.push("Stagger delay must be a number of seconds from 0 to 600.");
    }
    if (this.timeout.value === "" || !(values.job_timeout >= 1 && values.job_timeout <= 86400)) {
      problems.push("Job timeout must be a number of seconds from 1 to 86400.");
    }
    this.settingsError.textContent = problems.join(" ");
    this.settingsError.hidden = !problems.length;
    if (problems.length) return;
    this.savingSettings = true;
    try {
      await master.changeConfig((config) => {
        Object.assign(config.settings, values);
        if (config.ray) config.ray.workers = rayWorkers;
      });
    } catch (err) {
      this.settingsError.textContent = err.errors?.length ? err.errors.join("\n") : describe(err);
      this.settingsError.hidden = false;
      this.notify(`Settings not saved: ${describe(err)}`);
    } finally {
      this.savingSettings = false;
    }
    this.refresh();
  }

  // The Ray cluster as the master last saw it (GET /distributed/status's ray): its workers are listed
  // among the instances, with their node's address.
  showRay(ray) {
    if (!ray || !ray.configured) return;
    const up = (ray.workers || []).length;
    this.rayState.textContent = `${ray.address}: ${up} of ${ray.wanted} up` + (ray.error ? `. ${ray.error}` : "");
    this.rayState.dataset.bad = String(Boolean(ray.error));
  }

  // --- the spread queue -------------------------------------------------------------------------

  buildSpread() {
    this.spreadList = h("div.cdist-spread", {}, h("div.cdist-empty", { text: t("Off.") }));
    return this.spreadList;
  }

  async refreshSpread() {
    try {
      const info = await master.spread();
      if (!this.closed) this.showSpread(info);
    } catch (err) {
      // the next poll says what is wrong
    }
  }

  // Which participant renders which waiting prompt, then the last few finished (GET /distributed/spread).
  showSpread(info) {
    const names = new Map([...this.cards.values()].map((card) => [card.id, card.name.textContent]));
    const row = (p) => h("div.cdist-spread-prompt", { "data-prompt": p.prompt_id, "data-state": p.state,
      "data-participant": p.participant }, [
      h("div.cdist-row", {}, [
        h("span.cdist-spread-id", { text: `#${p.prompt_id.slice(0, 8)}`, title: `Prompt ${p.prompt_id}` }),
        h("span.cdist-spread-who", { text: names.get(p.participant) || p.name || p.participant }),
        h("span.cdist-state", { text: t(SPREAD_STATES[p.state] || p.state) }),
      ]),
      p.error && h("div.cdist-error", { text: p.error }),
      (p.values || []).length > 0 && h("div.cdist-share-values", { text: p.values.join(" · ") }),
    ]);
    const rows = [];
    if (!info.supported) rows.push(h("div.cdist-warning", { text: `Not available: ${info.reason}` }));
    else if (!info.enabled && !info.prompts.length) rows.push(h("div.cdist-empty", { text: t("Off.") }));
    else if (!info.prompts.length) rows.push(h("div.cdist-empty", { text: t("No prompt is waiting.") }));
    rows.push(...info.prompts.map(row));
    if (info.recent?.length) {
      rows.push(h("div.cdist-muted", { text: t("Recently") }), ...info.recent.slice(0, 5).map(row));
    }
    this.spreadList.replaceChildren(...rows);
  }

  // --- jobs ------------------------------------------------------------------------------------

  showJob(summary, render = true) {
    const known = this.jobs.get(summary.job_id);
    // a job that failed before this panel opened is listed, not announced again
    if (summary.state === "failed" && (render || known) && known?.summary.state !== "failed") {
      this.notify(`The distributed job failed: ${summary.error}`);
    }
    this.jobs.set(summary.job_id, { summary, seenAt: Date.now(), order: known ? known.order : ++this.jobOrder });
    if (render) this.renderJobsSoon();
  }

  // Workers tell their steps several times a second: the list is drawn at most every RENDER_MS.
  renderJobsSoon() {
    if (this.renderTimer) return;
    this.renderTimer = setTimeout(() => {
      this.renderTimer = null;
      if (!this.closed) this.renderJobs();
    }, RENDER_MS);
  }

  renderJobs() {
    const newestFirst = [...this.jobs.values()].sort((a, b) => b.order - a.order);
    for (const old of newestFirst.slice(JOBS_SHOWN)) this.jobs.delete(old.summary.job_id);
    const shown = newestFirst.slice(0, JOBS_SHOWN).map((entry) => jobView(entry.summary));
    this.jobList.replaceChildren(...(shown.length ? shown : [h("div.cdist-empty", { text: t("No distributed job yet.") })]));
  }
}

// A share whose units have all arrived is done, though the job may have ended before the master
// marked it so.
function shareState(share) {
  const complete = share.units.length > 0 && share.done >= share.units.length;
  return complete && share.state !== "failed" ? "done" : share.state;
}


// What a share has made: its images once they arrive, the step its worker samples meanwhile. A
// failed share's units went to others (or the job failed): never a count that reads as success.
function shareCount(share) {
  if (share.state === "failed") return t("none rendered here");
  if (share.state === "cancelled" && !share.images) return "";
  const steps = share.state === "running" && (share.steps || []).length === 2 && share.done < share.units.length
    ? t("step {step} of {steps}", { step: share.steps[0], steps: share.steps[1] }) : "";
  const images = share.images ? tCount(share.images, "{n} image", "{n} images") : "";
  return [images, steps].filter(Boolean).join(" · ") || t(share.state === "running" ? "rendering" : "no image yet");
}

// How far a share is: its units that arrived, and the sampling of the one under way.
function shareFraction(share) {
  if (share.state === "failed" || !share.units.length) return [0, 1];
  const steps = share.steps || [];
  const under = share.state === "running" && steps.length === 2 && share.done < share.units.length
    ? steps[0] / Math.max(1, steps[1]) : 0;
  return [share.done + under, share.units.length];
}

function jobCount(job) {
  if (job.kind === "tiles") return t("{done} of {total} tiles", { done: job.done, total: job.units });
  if (job.images_due) return t("{done} of {total} images", { done: job.images, total: job.images_due });
  if (job.images) return tCount(job.images, "{n} image", "{n} images");
  return job.split ? t("{done} of {total} images", { done: 0, total: job.units })
    : t("0 of {total} seed slots", { total: job.units });
}

function jobView(job) {
  const failures = new Set(job.shares.filter((s) => s.error).map((s) => `${s.name} failed: ${s.error}`));
  return h("div.cdist-job", { "data-job-id": job.job_id, "data-state": job.state }, [
    h("div.cdist-row", {}, [
      h("span.cdist-job-title", { text: t("Job {id}", { id: job.job_id.slice(0, 8) }), title: job.job_id }),
      job.split && h("span.cdist-role", { text: t("split"), title: t("One batch divided among the GPUs") }),
      job.kind === "tiles" && h("span.cdist-role", { text: t("tiles"), title: t("One upscale whose tiles every GPU renders") }),
      h("span.cdist-state", { text: t(job.state) }),
      h("span.cdist-count", { text: jobCount(job) }),
    ]),
    bar(job.done, job.units),
    job.error && h("div.cdist-error", { text: job.error }),
    ...job.notices.filter((n) => !failures.has(n)).map((n) => h("div.cdist-notice", { text: n })),
    h("div.cdist-shares", {}, job.shares.map((share) => h("div.cdist-share",
      { "data-participant": share.participant, "data-state": shareState(share) }, [
        h("div.cdist-row", {}, [
          h("span.cdist-share-name", { text: share.name }),
          h("span.cdist-state", { text: t(shareState(share)) }),
          h("span.cdist-count", { text: job.kind === "tiles" ? `${share.done} tiles` : shareCount(share) }),
        ]),
        job.kind === "tiles" ? bar(share.done, job.units, ".cdist-bar-thin")
          : bar(...shareFraction(share), ".cdist-bar-thin"),
        // what its Distributed Values give it ("CFG: 5.5")
        (share.values || []).length > 0 && h("div.cdist-share-values", { text: share.values.join(" · ") }),
        share.error && h("div.cdist-error", { text: `${share.name} failed: ${share.error}` }),
      ]))),
  ]);
}

// --- the worker doctor's answer, one instance ------------------------------------------------------

function checkOk(i, masterVersion) {
  return i.reachable && i.relay !== false && !(i.missing || []).length && !i.error
    && (i.role === "master" || (i.extension && i.extension_version === masterVersion));
}

function yesNo(value) {
  return value === true ? "yes" : value === false ? "no" : "—";
}

function checkView(i, masterVersion) {
  const ok = checkOk(i, masterVersion);
  const facts = [
    ["Reachable", i.role === "master" ? "this is the master" : yesNo(i.reachable), i.reachable === false],
    // the master opens a websocket to each worker prompt; the worker never connects back
    ["Relay", i.role === "master" ? "—"
      : i.reachable === false ? "not checked: the master cannot reach it"
        : yesNo(i.relay) + (i.relay ? ` (${i.url}/distributed/relay)` : i.relay_error ? ` (${i.relay_error})` : ""),
      i.relay === false],
    ["ComfyUI", i.comfyui_version || "unknown", false],
    ["Extension", i.extension_version || (i.reachable ? "not installed" : "—"),
      i.role !== "master" && i.reachable && i.extension_version !== masterVersion],
  ];
  const missing = i.missing || [];
  return h("div.cdist-check-item", { "data-id": i.id, "data-ok": String(ok) }, [
    h("div.cdist-row", {}, [
      h("span.cdist-mark", { text: ok ? "✓" : "✗" }),
      h("span.cdist-result-name", { text: i.name }),
    ]),
    h("dl.cdist-check-facts", {}, facts.flatMap(([label, value, bad]) => [
      h("dt", { text: label }),
      h(`dd.cdist-check-${label.split(" ")[0].toLowerCase()}`, { "data-bad": String(bad) }, breakable(value)),
    ])),
    missing.length > 0 ? h("ul.cdist-check-missing", {}, missing.map((m) => h("li", {
      "data-kind": m.kind, text: missingText(m) }))) : null,
    h("div.cdist-check-message", { text: i.message }),
  ]);
}

// Text whose addresses may wrap only after "/", ".", ":" or "?" (not in the middle of a word).
function breakable(text) {
  const parts = [];
  for (const piece of String(text).split(/(?<=[/.:?])/)) parts.push(piece, h("wbr"));
  parts.pop();
  return parts;
}

function missingText(m) {
  if (m.kind === "node") return `node ${m.name}`;
  if (m.kind === "input") return `input file ${m.name}`;
  if (m.kind === "model") return `${m.folder ? `models/${m.folder}/` : "model "}${m.name}`;
  return `${m.input} ${m.name}`;
}

// --- one instance ------------------------------------------------------------------------------

class InstanceCard {
  constructor(panel, info) {
    this.panel = panel;
    this.id = info.id;
    this.role = info.role;
    this.dot = h("span.cdist-dot");
    this.name = h("span.cdist-name");
    this.stateLabel = h("span.cdist-state");
    this.enable = h("input.cdist-enable", { type: "checkbox", role: "switch", onchange: () => this.toggleEnabled() });
    this.url = h("div.cdist-url.cdist-muted");
    this.gpu = h("span.cdist-gpu-name");
    this.queue = h("span.cdist-queue.cdist-muted");
    this.vramBar = h("div.cdist-bar-fill");
    this.vramText = h("span.cdist-vram-text.cdist-muted");
    this.error = h("div.cdist-error", { hidden: true });
    this.extra = h("div.cdist-extra"); // the editor and the log: left alone by update()

    let actions = null;
    if (info.role === "worker") {
      const button = (cls, text, title, run) => h(`button.cdist-button.cdist-small.${cls}`, { type: "button",
        text: t(text), title: t(title),
        onclick: (event) => panel.runAction(event.currentTarget, () => run(event.currentTarget)) });
      this.startButton = button("cdist-start", "Start", "Start this worker on the master's machine", () => this.startStop("start"));
      this.stopButton = button("cdist-stop", "Stop", "Stop this worker", () => this.startStop("stop"));
      actions = h("div.cdist-actions", {}, [
        button("cdist-edit", "Edit", "Change name, address, GPU or arguments", () => this.toggleEditor()),
        this.startButton,
        this.stopButton,
        button("cdist-log-button", "Log", "Show the worker's log", () => this.toggleLog()),
        button("cdist-remove", "Remove", "Remove this worker from the config", (b) => this.remove(b)),
      ]);
    }
    this.root = h("div.cdist-instance", { "data-id": info.id, "data-role": info.role }, [
      h("div.cdist-row", {}, [
        this.dot,
        this.name,
        h("span.cdist-role", { text: t(info.role) }),
        this.stateLabel,
        h("label.cdist-switch", { title: t("Take part in the next job") }, [this.enable, h("span.cdist-slider")]),
      ]),
      this.url,
      h("div.cdist-row", {}, [this.gpu, this.queue]),
      h("div.cdist-vram", {}, [h("div.cdist-bar", {}, this.vramBar), this.vramText]),
      this.error,
      actions,
      this.extra,
    ]);
  }

  update(info) {
    this.info = info;
    this.root.dataset.state = info.state;
    this.name.textContent = info.name;
    // After Start or Stop, "starting…" or "stopping…" until the checks see it so (or a while passes)
    const up = info.state === "online" || info.state === "busy";
    if (this.transition && (Date.now() > this.transition.until
        || (this.transition.kind === "starting" ? up : info.state === "offline"))) this.transition = null;
    if (this.transition) this.root.dataset.transition = this.transition.kind;
    else delete this.root.dataset.transition;
    this.stateLabel.textContent = t(this.transition ? `${this.transition.kind}…` : info.state);
    const details = [info.url];
    if (info.device !== null && info.device !== undefined) details.push(`GPU ${info.device}`);
    if (info.extra_args) details.push(info.extra_args);
    this.url.textContent = details.join(" · ");
    if (!this.saving) this.enable.checked = info.enabled;
    this.enable.setAttribute("aria-label", `${info.name} takes part in jobs`);
    // what an offline instance last reported is stale: not shown as if it were now
    const current = info.state !== "offline";
    this.gpu.textContent = current && info.device_name ? gpuLabel(info.device_name) : t("GPU unknown");
    this.gpu.title = current ? info.device_name || "" : "";
    this.queue.textContent = !current || info.queue === null || info.queue === undefined ? "" : t("queue {n}", { n: info.queue });
    const hasVram = current && Boolean(info.vram_total);
    const used = hasVram ? info.vram_total - (info.vram_free ?? 0) : 0;
    this.vramBar.style.width = hasVram ? `${((used / info.vram_total) * 100).toFixed(1)}%` : "0%";
    this.vramText.textContent = hasVram
      ? `${(used / GIB).toFixed(1)} / ${(info.vram_total / GIB).toFixed(1)} GB` : t("VRAM unknown");
    // A disabled worker that is switched off is no news: only an offline one shows why.
    this.error.hidden = !(info.error && info.state === "offline");
    this.error.textContent = info.error || "";
    if (this.startButton) {
      const local = LOCAL_HOSTS.includes(info.host) && !info.address;
      const running = info.state !== "offline" && !info.error;
      this.startButton.hidden = !local || running || Boolean(this.transition);
      // Stop only what this master started: anything else is stopped where it was started.
      this.stopButton.hidden = !info.managed || this.transition?.kind === "stopping";
    }
  }

  async toggleEnabled() {
    const enabled = this.enable.checked;
    this.saving = true;
    this.enable.disabled = true;
    try {
      if (this.role === "master") await master.changeConfig((config) => { config.master.enabled = enabled; });
      else await master.editWorker(this.id, { enabled });
    } catch (err) {
      this.enable.checked = !enabled;
      this.panel.notify(`Could not ${enabled ? "enable" : "disable"} ${this.info.name}: ${describe(err)}`);
    } finally {
      this.saving = false;
      this.enable.disabled = false;
    }
    this.panel.refresh();
  }

  toggleEditor() {
    if (this.editor) {
      this.editor.remove();
      this.editor = null;
      return;
    }
    const close = () => {
      this.editor?.remove();
      this.editor = null;
    };
    const { name, host, port, device, extra_args, address, ca_bundle, header_names } = this.info;
    this.editor = workerForm({
      values: address ? { name, url: address, device, extra_args, ca_bundle, headers: shownHeaders(header_names) }
        : { name, host, port, device, extra_args, ca_bundle, headers: shownHeaders(header_names) },
      submitText: "Save",
      gpus: this.panel.gpus,
      onSubmit: async (fields) => {
        await master.editWorker(this.id, fields);
        close();
        this.panel.refresh();
      },
      onCancel: close,
    });
    this.extra.prepend(this.editor);
  }

  async startStop(action) {
    // "starting…" or "stopping…" from the click on, with only the button that applies
    const kind = action === "start" ? "starting" : "stopping";
    this.transition = { kind, until: Date.now() + 600_000 };
    this.update(this.info);
    let answer;
    try {
      answer = action === "start" ? await master.startWorker(this.id) : await master.stopWorker(this.id);
    } catch (err) {
      this.transition = null;
      this.update(this.info);
      throw err;
    }
    if (this.transition?.kind === kind) this.transition.until = Date.now() + (action === "start" ? 300_000 : 30_000);
    this.update({ ...this.info, managed: action === "start" });
    this.panel.notify(action === "start" ? `${this.info.name} is starting (pid ${answer.pid})`
      : `${this.info.name} was stopped`, "info");
    this.panel.refresh();
  }

  async toggleLog() {
    if (this.log) {
      this.log.remove();
      this.log = null;
      return;
    }
    this.log = h("pre.cdist-log", { text: "loading…" });
    this.extra.append(this.log);
    await this.refreshLog();
  }

  async refreshLog() {
    if (!this.log) return;
    const log = this.log;
    const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    try {
      const answer = await master.workerLog(this.id);
      log.textContent = answer.log || (answer.running
        ? `(nothing logged yet; the log is ${answer.path})`
        : `(this master did not start ${this.info.name}: its log is where it was started, such as the `
          + "terminal or service that runs it; workers started with Start or the launcher log to "
          + `${answer.path})`);
      delete log.dataset.error;
    } catch (err) {
      log.textContent = `Cannot read the log: ${describe(err)}`;
      log.dataset.error = "";
    }
    if (atEnd) log.scrollTop = log.scrollHeight;
  }

  // Two clicks: the first arms the button for a few seconds, so a slip never removes a worker.
  async remove(button) {
    if (!("armed" in button.dataset)) {
      button.dataset.armed = "";
      button.textContent = t("Confirm remove");
      setTimeout(() => {
        delete button.dataset.armed;
        button.textContent = t("Remove");
      }, 4000);
      return;
    }
    await master.removeWorker(this.id);
    this.panel.refresh();
  }
}

// --- the worker form (add and edit) ------------------------------------------------------------

const WORKER_FIELDS = [
  { key: "name", label: "Name", type: "text", placeholder: "e.g. gpu1" },
  { key: "host", label: "Host", type: "text", placeholder: "127.0.0.1" },
  { key: "port", label: "Port", type: "number", placeholder: "e.g. 8189" },
  { key: "url", label: "Or URL", type: "text", placeholder: "https://pod-8188.proxy.example.net (in place of host and port)" },
  { key: "ca_bundle", label: "CA file", type: "text", placeholder: "on the master, for a self-signed https worker" },
  { key: "headers", label: "Headers", type: "text", placeholder: "Name: value; Other: value (sent with every request, never shown)" },
  { key: "device", label: "GPU", type: "number", placeholder: "index; empty: not pinned" },
  { key: "extra_args", label: "Extra args", type: "text", placeholder: "e.g. --lowvram" },
];
let formCount = 0;

function workerForm({ values, submitText, gpus, onSubmit, onCancel }) {
  const inputs = {};
  const errors = {};
  const listId = `cdist-gpu-options-${++formCount}`;
  const rows = WORKER_FIELDS.map(({ key, label, type, placeholder }) => {
    inputs[key] = h(`input.cdist-input.cdist-field-${key}`, { type, name: key, placeholder, autocomplete: "off",
      value: values[key] ?? "", list: key === "device" && gpus.length ? listId : null });
    errors[key] = h(`div.cdist-field-error.cdist-error-${key}`, { hidden: true, "aria-live": "polite" });
    return h("label.cdist-field", {}, [h("span.cdist-label", { text: t(label) }), inputs[key], errors[key]]);
  });
  const formError = h("div.cdist-form-error", { hidden: true, "aria-live": "polite" });
  const submit = h("button.cdist-button.cdist-submit", { type: "submit", text: t(submitText) });

  const show = (byField, general) => {
    for (const { key } of WORKER_FIELDS) {
      errors[key].textContent = byField[key] || "";
      errors[key].hidden = !byField[key];
      inputs[key].toggleAttribute("aria-invalid", Boolean(byField[key]));
    }
    formError.textContent = general.join("\n");
    formError.hidden = !general.length;
  };

  const form = h("form.cdist-worker-form", { noValidate: true, onsubmit: async (event) => {
    event.preventDefault();
    const fields = readWorkerFields(inputs);
    const problems = checkWorkerFields(fields, inputs);
    show(problems, []);
    if (Object.keys(problems).length) return;
    submit.disabled = true;
    try {
      await onSubmit(fields);
    } catch (err) {
      // The server names the field in each message ("workers[2].port: ..."); put each by its field.
      const byField = {};
      const general = [];
      for (const message of err.errors?.length ? err.errors : [describe(err)]) {
        const field = /^(?:workers\[\d+\]\.)?(\w+):/.exec(message)?.[1];
        if (field in inputs) byField[field] = byField[field] ? `${byField[field]}\n${message}` : message;
        else general.push(message);
      }
      show(byField, general);
    } finally {
      submit.disabled = false;
    }
  } }, [
    ...rows,
    gpus.length > 0 ? h("datalist", { id: listId }, gpus.map((gpu) => h("option", { value: gpu.index, text: gpu.name }))) : null,
    formError,
    h("div.cdist-form-buttons", {}, [
      submit,
      h("button.cdist-button.cdist-cancel", { type: "button", text: t("Cancel"), onclick: onCancel }),
    ]),
  ]);
  return form;
}

function readWorkerFields(inputs) {
  const text = (key) => inputs[key].value.trim();
  const number = (key) => (text(key) === "" ? null : Number(text(key)));
  const common = { name: text("name"), device: number("device"), extra_args: text("extra_args"),
    ca_bundle: text("ca_bundle"), headers: readHeaders(text("headers")) };
  // A worker is where its URL says, or at host and port; an empty URL clears one set before.
  if (text("url")) return { ...common, url: text("url") };
  return { ...common, url: "", host: text("host") || "127.0.0.1", port: number("port") };
}

// "Name: value; Other: value" -> {Name: "value", Other: "value"}; null for text that is not that.
function readHeaders(line) {
  const headers = {};
  for (const part of line.split(";").map((p) => p.trim()).filter(Boolean)) {
    const at = part.indexOf(":");
    if (at < 1) return null;
    headers[part.slice(0, at).trim()] = part.slice(at + 1).trim();
  }
  return headers;
}

function shownHeaders(names) {
  return (names || []).map((name) => `${name}: ${HIDDEN}`).join("; ");
}

// The obvious mistakes, caught before a request; the server checks everything again.
function checkWorkerFields(fields, inputs) {
  const problems = {};
  if (fields.name.length > 64) problems.name = "name: at most 64 characters";
  if (fields.url) {
    if (!/^https?:\/\/[^\s/?#]+/.test(fields.url)) {
      problems.url = "url: must be an http:// or https:// address such as https://pod-8188.proxy.example.net";
    }
  } else {
    if (!/^[A-Za-z0-9.:_-]+$/.test(fields.host)) problems.host = "host: must be a host name or IP address";
    if (inputs.port.validity.badInput || fields.port === null) {
      problems.port = "port: required, a whole number from 1 to 65535 (or give a URL)";
    } else if (!Number.isInteger(fields.port) || fields.port < 1 || fields.port > 65535) {
      problems.port = `port: must be a whole number from 1 to 65535, got ${inputs.port.value}`;
    }
  }
  if (fields.headers === null) problems.headers = "headers: write them as Name: value; Other: value";
  if (inputs.device.validity.badInput
      || (fields.device !== null && !(Number.isInteger(fields.device) && fields.device >= 0 && fields.device <= 1023))) {
    problems.device = "GPU: a GPU index from 0 to 1023, or empty";
  }
  const shell = [...new Set(fields.extra_args.match(SHELL_CHARS) || [])];
  if (shell.length) {
    problems.extra_args = `extra args: shell characters are not allowed (${shell.join(" ")}); `
      + "give plain ComfyUI arguments such as --lowvram";
  }
  return problems;
}
