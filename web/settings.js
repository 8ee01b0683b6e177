// The panel's settings (mode, stagger delay, job timeout, spread queue) in ComfyUI's own Settings
// dialog as well, under "Distributed". gpu_config.json stays the one place they are kept: a change
// in the dialog is saved there (and refused there, with the reason, as the panel's would be), and
// the dialog shows what the config holds each time the panel reads it.
import { app } from "../../scripts/app.js";
import { master } from "./master_api.js";

export const FIELDS = [
  { key: "mode", id: "Distributed.Mode", name: "Mode", type: "combo", defaultValue: "parallel",
    options: [{ text: "Parallel: all start at once", value: "parallel" },
      { text: "Staggered: start one by one", value: "staggered" }],
    tooltip: "How the GPUs start a distributed job." },
  { key: "stagger_delay", id: "Distributed.StaggerDelay", name: "Stagger delay (s)", type: "number", defaultValue: 0,
    attrs: { min: 0, max: 600, step: 0.5 }, tooltip: "In staggered mode, the seconds between one GPU's start and the next." },
  { key: "job_timeout", id: "Distributed.JobTimeout", name: "Job timeout (s)", type: "number", defaultValue: 600,
    attrs: { min: 1, max: 86400, step: 1 },
    tooltip: "How long a worker may stay silent before its images go to the others." },
  { key: "spread_queue", id: "Distributed.SpreadQueue", name: "Spread the queue", type: "boolean", defaultValue: false,
    tooltip: "Render each prompt without a Multi-GPU Collector whole on the next free GPU." },
];

const ours = new Map(); // id -> the value this module is writing into the dialog now: no change of the user's
let saving = 0; // saves from the dialog under way: the config read meanwhile may be older
let latest = null; // the newest config settings to show, and the one loop that shows them
let showingLoop = null;

function read(id) {
  return app.extensionManager?.setting ? app.extensionManager.setting.get(id) : app.ui.settings.getSettingValue(id);
}

async function write(id, value) {
  ours.set(id, value);
  try {
    if (app.extensionManager?.setting) await app.extensionManager.setting.set(id, value);
    else await app.ui.settings.setSettingValueAsync(id, value);
  } finally {
    if (ours.get(id) === value) ours.delete(id);
  }
}

function toast(detail) {
  const toasts = app.extensionManager?.toast;
  if (toasts) toasts.add({ severity: "error", summary: "Distributed", detail, life: 8000 });
  else console.warn(`[Distributed] ${detail}`);
}

async function save(field, value) {
  saving += 1;
  try {
    const { config } = await master.changeConfig((config) => { config.settings[field.key] = value; });
    saving -= 1;
    await showInSettings(config.settings);
    onSaved?.();
  } catch (err) {
    saving -= 1;
    const why = err.errors?.length ? err.errors.join(" ") : err.message || String(err);
    toast(`${field.name} not saved: ${why}`);
    master.config().then(({ config }) => showInSettings(config.settings)).catch(() => {});
  }
}

let onSaved = null;

// Once, at setup: the fields in the dialog; what the config holds, in them. ``saved`` is told after a
// change made in the dialog has been saved (the open panels read the config again).
let registered = false;

export function registerSettings(saved) {
  const dialog = app.ui?.settings;
  onSaved = saved;
  if (!dialog?.addSetting || registered) return;
  registered = true;
  for (const field of FIELDS) {
    dialog.addSetting({
      id: field.id, name: field.name, type: field.type, defaultValue: field.defaultValue,
      options: field.options, attrs: field.attrs, tooltip: field.tooltip,
      category: ["Distributed", "Distributed", field.name],
      // called with no old value when the dialog first loads its value: that is no change of the user's
      onChange: (value, old) => {
        if (old === undefined || value === old || (ours.has(field.id) && ours.get(field.id) === value)) return;
        save(field, field.type === "number" ? Number(value) : value);
      },
    });
  }
  master.configIfAllowed().then((answer) => answer && showInSettings(answer.config.settings)).catch(() => {});
}

// The config's settings, shown in the dialog where they differ from what it holds. Calls that
// come while an earlier one still writes are folded into one, with the newest settings.
export function showInSettings(settings) {
  if (!settings) return Promise.resolve();
  latest = settings;
  showingLoop ||= (async () => {
    while (latest) {
      const shown = latest;
      latest = null;
      if (saving) continue; // a save from the dialog reads the config again when it is done
      try {
        for (const field of FIELDS) {
          const value = shown[field.key];
          if (value !== undefined && read(field.id) !== value) await write(field.id, value);
        }
      } catch (err) {
        // a dialog that cannot be written shows the old value until the next read
      }
    }
  })().finally(() => { showingLoop = null; });
  return showingLoop;
}
