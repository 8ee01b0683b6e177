// The panel's words in the user's language, through ComfyUI's own locales mechanism: each custom
// node's locales/<language>/main.json, served merged at GET /i18n (ComfyUI from late 2024), in the
// language of ComfyUI's Language setting. A word is looked up by its English text, which is also
// what shows where a language or a word has no translation (and on ComfyUI without /i18n).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

let words = {};

// ComfyUI's languages: en, zh, zh-TW, ru, ja, ko, fr, es, ar.
export function currentLanguage() {
  const chosen = app.extensionManager?.setting?.get?.("Comfy.Locale") || navigator.language || "en";
  if (/^zh[-_](tw|hk|hant)/i.test(chosen)) return "zh-TW";
  return String(chosen).split(/[-_]/)[0].toLowerCase();
}

// Once, at setup, before the panel is drawn.
export async function loadWords() {
  const language = currentLanguage();
  if (language === "en") return;
  try {
    const response = await api.fetchApi("/i18n", { cache: "no-store" });
    if (!response.ok) return;
    const all = await response.json();
    words = all?.[language]?.distributed?.panel || {};
  } catch {
    words = {};
  }
}

// t("{n} of {total} online", { n: 2, total: 3 }): the translation, its {names} filled in.
export function t(english, values = {}) {
  let text = typeof words[english] === "string" && words[english] ? words[english] : english;
  for (const [name, value] of Object.entries(values)) text = text.split(`{${name}}`).join(String(value));
  return text;
}

// "1 image", "3 images": English has two forms; the translations give one ("{n} 张图像") or both.
export function tCount(count, one, many) {
  return t(count === 1 ? one : many, { n: count });
}
