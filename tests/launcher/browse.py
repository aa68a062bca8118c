"""Open a page in headless Chromium (Debian's chromium and chromium-driver), wait until its rendered text holds
every expected string, save a screenshot, and print the text as JSON.

    python browse.py URL OUT.png TEXT [TEXT ...]

The text is read through every shadow root (TensorBoard's plugins are web components), so what is checked is
what a person sees, not the HTML the server sent. Exit status 1, with the last text seen, if the strings do not
all appear within --timeout seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

VISIBLE_TEXT = """
function walk(node) {
  const parts = [];
  if (node.shadowRoot) parts.push(walk(node.shadowRoot));
  for (const child of node.childNodes) {
    if (child.nodeType === Node.TEXT_NODE) parts.push(child.textContent);
    else if (child.nodeType === Node.ELEMENT_NODE && !['SCRIPT', 'STYLE'].includes(child.tagName)) parts.push(walk(child));
  }
  return parts.join(' ');
}
return walk(document.body).replace(/\\s+/g, ' ');
"""


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("screenshot")
    parser.add_argument("expected", nargs="+")
    parser.add_argument("--timeout", type=float, default=90)
    parser.add_argument("--size", default="1600,1000")
    args = parser.parse_args()

    os.environ["SE_OFFLINE"] = "true"  # never let Selenium Manager fetch a browser or driver
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--window-size={args.size}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")))
    deadline = time.monotonic() + args.timeout
    try:
        while True:  # a server just started may not listen yet
            try:
                driver.get(args.url)
                break
            except WebDriverException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        while True:
            text = driver.execute_script(VISIBLE_TEXT)
            missing = [s for s in args.expected if s not in text]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(1)
        time.sleep(1)  # let the last rows paint before the picture
        driver.save_screenshot(args.screenshot)
    finally:
        driver.quit()
    print(json.dumps({"url": args.url, "missing": missing, "text": text}))
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
