"""Headless Chromium for the browser tests, the same on every test."""

from __future__ import annotations

from pathlib import Path

from selenium import webdriver
from selenium.webdriver.remote.webdriver import WebDriver


def start_chromium(tmp_path: Path, *switches: str) -> WebDriver:
    """A headless Chromium (profile under `tmp_path`) that reaches nothing but loopback: any
    other host name fails to resolve. `switches` are added to the usual command line."""
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", *switches,
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
                f"--user-data-dir={tmp_path / 'chromium'}"):  # fmt: skip
        opts.add_argument(arg)
    driver = webdriver.Chrome(
        service=webdriver.ChromeService(executable_path="/usr/bin/chromedriver"), options=opts
    )
    driver.set_page_load_timeout(30)
    return driver
