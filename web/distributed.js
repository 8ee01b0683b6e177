// ComfyUI-Distributed's control panel: a sidebar tab on the current frontend, a menu button that
// opens a floating panel on the legacy UI. Both mount the same panel (panel.js).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { mountPanel, refreshOpenPanels, showProgress, showSpreadChange } from "./panel.js";
import { registerSettings } from "./settings.js";
import { loadWords } from "./i18n.js";

function loadStyle() {
  if (document.getElementById("cdist-style")) return;
  const link = document.createElement("link");
  link.id = "cdist-style";
  link.rel = "stylesheet";
  link.href = new URL("./panel.css", import.meta.url).href; // beside this file, whatever its folder is called
  document.head.append(link);
}

function addSidebarTab() {
  let mountedIn = null;
  let destroyPanel = null;
  app.extensionManager.registerSidebarTab({
    id: "comfyui-distributed",
    icon: "pi pi-server",
    title: "Distributed",
    tooltip: "Distributed GPUs",
    type: "custom",
    render(el) {
      // Vue may call render again for the same element when it re-renders: mount once per element.
      if (mountedIn === el) return;
      destroyPanel?.();
      mountedIn = el;
      destroyPanel = mountPanel(el);
    },
    destroy() {
      destroyPanel?.();
      destroyPanel = null;
      mountedIn = null;
    },
  });
}

function addMenuButton() {
  const menu = document.querySelector(".comfy-menu");
  if (!menu) return;
  let close = null;
  const button = document.createElement("button");
  button.id = "cdist-menu-button";
  button.className = "cdist-menu-button";
  button.textContent = "Distributed";
  button.title = "Distributed GPUs";
  button.addEventListener("click", () => {
    if (close) return close();
    const shell = document.createElement("div");
    shell.className = "cdist-floating";
    document.body.append(shell);
    const destroyPanel = mountPanel(shell, { onClose: () => close() });
    close = () => { // stops the panel's polling with it
      destroyPanel();
      shell.remove();
      close = null;
    };
  });
  menu.append(button);
}

app.registerExtension({
  name: "comfyui.distributed",
  async setup() {
    loadStyle();
    await loadWords(); // the panel's words in ComfyUI's language (locales/), before it is drawn
    // Registered here, not by the panel, so the legacy UI knows the event even while the panel is closed.
    api.addEventListener("distributed_progress", (event) => showProgress(event.detail));
    api.addEventListener("distributed_spread", () => showSpreadChange());
    if (app.extensionManager?.registerSidebarTab) addSidebarTab();
    else addMenuButton();
    registerSettings(refreshOpenPanels); // the same settings in ComfyUI's Settings dialog, under Distributed
  },
});
