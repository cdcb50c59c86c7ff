"""TensorBoard in a real browser (issue 24): `tensorboard --logdir` on a finished tiny run, read by
headless Chromium, shows the scalar tags, the report's images and the run's hparams that the
TensorBoard section of docs/evaluation.md names. Screenshots go to build/test-artifacts/ (VGGTRAIN_ARTIFACTS).

Needs Debian's chromium and chromium-driver (.ci/run installs them where it may) and selenium (the
dev extra); skipped, with the reason, without them."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_config, write_yaml
from vggtrain.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(os.environ.get("VGGTRAIN_ARTIFACTS", "build/test-artifacts"))
SCALAR_TAGS = ("train/loss_step", "train/loss", "train/acc", "train/lr", "train/images_per_s",
               "train/epoch", "val/loss", "val/acc", "test/acc", "test/loss", "test/top5")
IMAGE_TAGS = ("curves", "test/confusion_matrix", "test/misclassified")

pytestmark = pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                                reason="no chromium/chromedriver installed (Debian: apt-get install "
                                       "chromium chromium-driver)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tensorboard(cifar_bin, tmp_path_factory):
    """(url, run's report) of a TensorBoard serving runs/ with one finished tiny run."""
    tmp = tmp_path_factory.mktemp("tb")
    cfg = write_yaml(tmp / "tiny.yaml", tiny_config(cifar_bin, tmp / "runs", train={"epochs": 2}))
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["fit", "--config", str(cfg)]) == 0
    report = json.loads((tmp / "runs" / "tiny" / "report.json").read_text())
    port = _free_port()
    exe = Path(sys.executable).with_name("tensorboard")
    proc = subprocess.Popen([str(exe), "--logdir", str(tmp / "runs"), "--host", "127.0.0.1",
                             "--port", str(port), "--reload_interval", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:  # until it answers
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"tensorboard did not start: {proc.stderr.read()[-2000:]}")
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}", report
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (dev extra)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=2400,1400"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)  # no driver download
    try:
        yield driver
    finally:
        driver.quit()


def _page_shows(driver, url: str, needles: list[str], shot: str, timeout: float = 90) -> str:
    """Open url, wait until the page's visible text holds every needle; screenshot either way."""
    driver.get(url)
    deadline = time.monotonic() + timeout
    text = ""
    try:
        while time.monotonic() < deadline:
            text = driver.find_element("tag name", "body").text
            if all(n in text for n in needles):
                return text
            time.sleep(1)
    finally:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / shot))
    missing = [n for n in needles if n not in text]
    pytest.fail(f"{url}: the page never showed {missing} (screenshot {ARTIFACTS / shot}); it shows: "
                f"{text[:1500]!r}")


def test_scalars_images_and_hparams_are_seen_in_a_browser(tensorboard, browser):
    url, report = tensorboard
    for group in ("train", "val", "test"):  # the dashboard opens only its first groups: one each
        tags = [t for t in SCALAR_TAGS if t.startswith(f"{group}/")]
        _page_shows(browser, f"{url}/#scalars&tagFilter={group}%2F", ["tiny/tb", *tags],
                    f"tensorboard-scalars-{group}.png")
    _page_shows(browser, f"{url}/#images", list(IMAGE_TAGS), "tensorboard-images.png")
    # The hparams table: the run's config keys, the final metrics, and this run's own values.
    text = _page_shows(browser, f"{url}/#hparams",
                       ["tiny/tb", "optim.lr", "model.arch", "train.epochs", "test/acc", "val/acc"],
                       "tensorboard-hparams.png")
    assert f"{report['metrics']['top1']:.4f}" in text  # the test accuracy of this run, in its row
