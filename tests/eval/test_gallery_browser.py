"""The gallery in a real browser: headless Chromium opens it from file:// (no server), its DOM holds every
thumbnail as a complete PNG data URI under the section titles, and its screenshot shows images, not an error page.

Skipped where Chromium cannot be (no `chromium` on PATH), except in CI (CI=true), which installs it (.ci/run):
there its absence fails the test."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from gallery_pool import C_HARD, C_OOD, synthetic_pool, write_images, write_table  # noqa: E402

from loft_dist.eval.gallery import SECTIONS, write_gallery  # noqa: E402

NAMES = ["ant", "bee", "cat"]
WIDTH, HEIGHT = 1280, 2000
DATA_URI = re.compile(r'<img src="data:image/png;base64,([^"]*)" alt="id \d+">')


def chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        message = "headless Chromium not found: install the Debian package `chromium` (apt-get install chromium)"
        if os.environ.get("CI") == "true":  # CI installs it: a missing browser there is a broken CI, not a skip
            pytest.fail(message + "; .ci/run installs it in CI")
        pytest.skip(message)
    # Its own profile dir: nothing of the user's is read or written, and two runs never share one.
    cmd = [binary, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-dev-shm-usage",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(cmd)} exited {done.returncode}: {done.stderr[-2000:]}"
    return done


def test_chromium_renders_the_gallery_from_file_url(tmp_path):
    cols = synthetic_pool(240, 3)
    write_table(tmp_path / "table", cols)
    write_images(tmp_path / "data", np.unique(cols["id"]), dataset_json={"class_names": NAMES})
    page = tmp_path / "gallery.html"
    g = write_gallery(tmp_path / "table", tmp_path / "data", NAMES, C_HARD, C_OOD, page)
    url = page.resolve().as_uri()

    dom = chromium(tmp_path, "--dump-dom", url).stdout
    assert "<h1>Pseudo-label gallery</h1>" in dom and "ERR_" not in dom
    for title in SECTIONS.values():
        assert f"<h3>{title} <small>" in dom, title
    uris = DATA_URI.findall(dom)
    assert len(uris) == g["images"] == 60 and len(re.findall(r"<img\b", dom)) == 60  # 3 classes x 5 sections x 4
    for data in uris:  # every data URI is a whole PNG
        with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as im:
            im.load()
            assert im.format == "PNG" and im.size == (24, 24)

    shot = tmp_path / "gallery.png"
    chromium(tmp_path, f"--screenshot={shot}", f"--window-size={WIDTH},{HEIGHT}", url)
    with Image.open(shot) as im:
        assert im.size == (WIDTH, HEIGHT)
        pixels = np.asarray(im.convert("RGB"), dtype=np.int16)
    assert pixels.std() > 20, "a flat screenshot: nothing was drawn"
    # The thumbnails are saturated colours; a page of text (or Chromium's error page) has next to none.
    saturated = (pixels.max(axis=2) - pixels.min(axis=2) > 60).mean()
    assert saturated > 0.03, f"only {saturated:.1%} of the screenshot is coloured: were the images drawn?"
