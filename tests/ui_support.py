"""Browser helpers for the panel tests: Debian's Chromium driven by Playwright, ComfyUI opened on the
master, the Distributed panel opened from whichever UI that ComfyUI serves, and console errors kept."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-quic", "--disable-sync"]

# The button that opens the panel: our own in the legacy menu, or the sidebar tab's (its aria-label is
# the tooltip; the class or data-testid carry the tab id, depending on the frontend's version).
LEGACY_BUTTON = "#cdist-menu-button"
SIDEBAR_BUTTON = ('[data-testid="comfyui-distributed-tab-button"], .comfyui-distributed-tab-button, '
                  'button[aria-label^="Distributed GPUs"]')


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("Chromium is not installed (tests/run.py installs Debian's chromium)")
    return path


def launch(playwright):
    return playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)


class ComfyPage:
    """One browser page on the master's ComfyUI, with the console errors it produced."""

    def __init__(self, page, url: str):
        self.page = page
        self.url = url
        self.errors: list[str] = []
        self.ui = ""
        self.expected_statuses: set[int] = set()  # HTTP errors that a test provokes on purpose
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}\n{getattr(exc, 'stack', '') or ''}"))
        page.goto(url, wait_until="load")

    def _console(self, message) -> None:
        if message.type != "error":
            return
        where = message.location.get("url", "") if message.location else ""
        self.errors.append(f"console error: {message.text} ({where})")

    def own_errors(self) -> list[str]:
        """The page's errors that could be ours. Left out: Chromium's lines for HTTP error answers to
        ComfyUI's own requests (its favicon; on the current frontend a fresh user folder's settings
        files, and the release check that cannot reach the internet here), refusals a test provokes
        on purpose, and exceptions whose stack never passes through an extension's script."""
        def comfyui_own(error: str) -> bool:
            if error.startswith("page error:"):
                return "/extensions/" not in error
            if "Failed to load resource" not in error:
                return False
            if any(f"status of {status} " in error for status in self.expected_statuses):
                return True
            return "/extensions/" not in error and "/distributed/" not in error
        return [e for e in self.errors if not comfyui_own(e)]

    def open_panel(self, timeout: float = 60_000):
        """Open the Distributed panel from the menu button (legacy UI) or the sidebar tab (current UI)."""
        legacy, sidebar = self.page.locator(LEGACY_BUTTON), self.page.locator(SIDEBAR_BUTTON)
        legacy.or_(sidebar).first.wait_for(state="visible", timeout=timeout)
        if legacy.count():
            self.ui = "legacy"
            legacy.click()
        else:
            self.ui = "sidebar"
            sidebar.first.click()
        panel = self.panel()
        panel.wait_for(state="visible", timeout=timeout)
        return panel

    def close_panel(self) -> None:
        if self.ui == "legacy":
            self.panel().locator(".cdist-header .cdist-close").click()
        else:
            self.page.locator(SIDEBAR_BUTTON).first.click()
        self.panel().wait_for(state="detached")

    def panel(self):
        return self.page.locator(".cdist-panel")

    def card(self, instance_id: str):
        return self.panel().locator(f'.cdist-instance[data-id="{instance_id}"]')

    @staticmethod
    def scroll_to(locator) -> None:
        """Bring an element into view for a screenshot. The panel re-renders its job list on every
        progress event, so the element found may be replaced before it scrolls: find it again."""
        from playwright.sync_api import Error
        for attempt in range(5):
            try:  # found and scrolled in one step in the page: no time for it to be replaced in between
                locator.evaluate("element => element.scrollIntoView({ block: 'nearest' })", timeout=5_000)
                return
            except Error:
                if attempt == 4:
                    raise

    def screenshot(self, name: str, tmp_path: Path) -> Path:
        """Save a screenshot under the test's tmp dir and, if set, into $DISTRIBUTED_SCREENSHOT_DIR."""
        path = tmp_path / f"{name}.png"
        self.page.screenshot(path=str(path))
        target = os.environ.get("DISTRIBUTED_SCREENSHOT_DIR")
        if target:
            Path(target).mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, Path(target) / path.name)
        return path

    def use_palette(self, palette: str) -> None:
        """Switch ComfyUI's colour palette ("dark", "light") through its own setting, as a user would.
        ComfyUI keeps it in the user's settings on the server: switch back when done."""
        self.page.evaluate("""async (palette) => {
            const { app } = await import("/scripts/app.js");
            if (app.extensionManager?.setting) await app.extensionManager.setting.set("Comfy.ColorPalette", palette);
            else await app.ui.settings.setSettingValueAsync("Comfy.ColorPalette", palette);
        }""", palette)
        self.page.wait_for_timeout(300)  # the palette applies its CSS variables asynchronously
