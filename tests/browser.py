"""The study's pages in a real browser: Chromium from Debian, driven headless through Selenium.

Used by the browser test, and to take the screenshots of the pages as a reader sees them::

    python tests/browser.py reports/site docs/screenshots index walkthrough localization_walkthrough

Chromium and its driver come from Debian (``apt-get install chromium chromium-driver``; ``make
test`` installs them); Selenium is told where they are and never downloads a browser or a driver.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars")


def missing() -> str | None:
    """Why the browser cannot run here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if shutil.which(path) is None:
            return f"{path} not found: install Chromium from Debian (apt-get install -y chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (it is in the [dev] extra: make setup)"
    return None


@contextmanager
def chromium(width: int = 1400, height: int = 1000) -> Iterator[Any]:
    """A headless Chromium (a fresh profile, removed after) driven by Selenium."""
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager: never download a browser or a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory(prefix="diffpath-chromium-") as profile:
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for flag in (*FLAGS, f"--window-size={width},{height}", f"--user-data-dir={profile}"):
            opts.add_argument(flag)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
        try:
            yield driver
        finally:
            driver.quit()


def open_page(driver: Any, site: Path, page: str) -> dict[str, Any]:
    """Open ``site/page.html`` and wait for its images; returns its title and each image's
    natural width and source."""
    driver.get((Path(site).resolve() / f"{page}.html").as_uri())
    driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "Promise.all(Array.from(document.images).map(i => i.decode().catch(() => null))).then(() => done());")
    images = driver.execute_script("return Array.from(document.images).map(i => [i.naturalWidth, i.src]);")
    return {"title": driver.title, "images": images}


def screenshot(driver: Any, path: Path, width: int = 1400, max_height: int = 16000) -> Path:
    """The whole page as a reader scrolls through it, at ``width`` pixels."""
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    driver.set_window_size(width, min(height + 40, max_height))
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    driver.set_window_size(width, 1000)
    return path


def main(argv: Sequence[str]) -> int:
    site, out, *pages = argv
    with chromium() as driver:
        for page in pages or ["index"]:
            seen = open_page(driver, Path(site), page)
            broken = [src for width, src in seen["images"] if width == 0]
            shot = screenshot(driver, Path(out) / f"{page}.png")
            print(f"{page}: {seen['title']!r}, {len(seen['images'])} images ({len(broken)} broken) -> {shot}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
