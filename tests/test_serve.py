"""``runners.serve`` end to end in headless Chromium (Selenium): start the server on 127.0.0.1 with the tiny models,
upload an image, read the caption, ask a question and read the answer off the page, score texts; bad uploads
(not an image, too many bytes, too many pixels, an empty question) show a message and the server keeps serving.
A screenshot goes to the test's output folder (and to ``$BLIP2_SERVE_SCREENSHOT`` when set, e.g. docs/serve.png)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def test_only_loopback_addresses():
    from runners.serve import check_loopback

    assert check_loopback("127.0.0.1") == "127.0.0.1"
    assert check_loopback("localhost") == "localhost"
    for host in ("0.0.0.0", "8.8.8.8"):
        with pytest.raises(ValueError, match="not a loopback address"):
            check_loopback(host)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The server as a user starts it (a subprocess), on a free port; yields its URL."""
    log = tmp_path_factory.mktemp("serve") / "server.log"
    cmd = [sys.executable, "-m", "runners.serve", "--port", "0", "--num-beams", "2", "--max-length", "8",
           "--max-upload-mb", "0.25", "--max-pixels", "1000000"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        line = proc.stdout.readline()  # "serving ... on http://127.0.0.1:PORT/" once the models are loaded
        if "http://" not in line:
            proc.kill()
            pytest.fail(f"server did not start: {line!r}\n{log.read_text()[-3000:]}")
        url = line.split(" on ")[-1].strip()
        assert url.startswith("http://127.0.0.1:")
        yield url
        proc.terminate()
        proc.wait(timeout=30)


def _post(url: str, data: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_api_rejects_bad_input_and_keeps_serving(server, tmp_path):
    status, body = _post(server + "api/upload", b"this is not an image", "application/octet-stream")
    assert status == 400 and "not an image" in body["error"]
    status, body = _post(server + "api/upload", b"x" * 300_000, "application/octet-stream")
    assert status == 413 and "at most 0.2 MiB" in body["error"]
    big = tmp_path / "big.png"
    Image.new("RGB", (1200, 1000), (0, 0, 0)).save(big)  # 1.2 M pixels > 1 M, few bytes
    status, body = _post(server + "api/upload", big.read_bytes(), "application/octet-stream")
    assert status == 413 and "1200x1000" in body["error"]
    ok = tmp_path / "ok.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(ok)
    status, body = _post(server + "api/upload", ok.read_bytes(), "application/octet-stream")
    assert status == 200 and (body["width"], body["height"]) == (64, 48) and isinstance(body["caption"], str)
    status, err = _post(server + "api/ask", json.dumps({"id": body["id"], "question": "   "}).encode())
    assert status == 400 and "question is empty" in err["error"]
    status, err = _post(server + "api/ask", json.dumps({"id": "nope", "question": "what?"}).encode())
    assert status == 400 and "upload an image first" in err["error"]
    status, err = _post(server + "api/match", json.dumps({"id": body["id"], "texts": []}).encode())
    assert status == 400 and "at least one text" in err["error"]
    status, answer = _post(server + "api/ask", json.dumps({"id": body["id"], "question": "what colour?"}).encode())
    assert status == 200 and isinstance(answer["answer"], str)


@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None, reason="needs chromium and chromedriver (apt)")
def test_browser_upload_ask_match(server, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "shapes.png"
    picture = Image.new("RGB", (160, 120), (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    draw.ellipse((20, 20, 80, 80), fill="red")
    draw.rectangle((95, 40, 145, 90), fill="blue")
    picture.save(image)
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1100,800", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    wait = WebDriverWait(driver, 180)
    try:
        driver.get(server)
        wait.until(lambda d: "tiny" in d.find_element(By.ID, "models").text)
        # a file that is not an image: a message on the page
        driver.find_element(By.ID, "image").send_keys(str(not_image))
        error = wait.until(ec.visibility_of_element_located((By.ID, "error")))
        assert "not an image" in error.text
        # a real image: its caption
        driver.find_element(By.ID, "image").send_keys(str(image))
        wait.until(lambda d: d.find_element(By.ID, "caption").text.strip())
        assert not driver.find_element(By.ID, "error").is_displayed()
        caption = driver.find_element(By.ID, "caption").text
        # an empty question: a message, then a real one: its answer
        driver.find_element(By.ID, "ask").click()
        assert "question is empty" in wait.until(ec.visibility_of_element_located((By.ID, "error"))).text
        driver.find_element(By.ID, "question").send_keys("what colour is the circle?")
        driver.find_element(By.ID, "ask").click()
        answer = wait.until(lambda d: d.find_element(By.ID, "answer").text.strip())
        # ITM scores for typed texts
        driver.find_element(By.ID, "texts").send_keys("a red circle\na blue square\ntwo cats")
        driver.find_element(By.ID, "match").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#scores tbody tr")) == 3)
        rows = [r.find_elements(By.TAG_NAME, "td") for r in driver.find_elements(By.CSS_SELECTOR, "#scores tbody tr")]
        assert [r[0].text for r in rows] == ["a red circle", "a blue square", "two cats"]
        assert all(0.0 <= float(r[1].text) <= 1.0 and -1.0 <= float(r[2].text) <= 1.0 for r in rows)
        shot = tmp_path / "serve.png"
        driver.save_screenshot(str(shot))
        if os.environ.get("BLIP2_SERVE_SCREENSHOT"):
            shutil.copy(shot, os.environ["BLIP2_SERVE_SCREENSHOT"])
        assert Image.open(shot).size[0] > 0
        print(f"\n[serve] caption {caption!r}, answer {answer!r}, screenshot {shot}")
    finally:
        driver.quit()
