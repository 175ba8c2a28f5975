"""The web demo (`GET /`) in a real headless Chromium, driven by selenium + chromedriver, against
a live server on 127.0.0.1 serving a tiny random checkpoint: a wrong API key shows the server's
error, a spoken reply streams text into the assistant bubble and its PCM16 chunks are scheduled
for playback, and a microphone recording (Chromium's fake capture device) plus an uploaded image
reach the server as valid media. Chromium comes from Debian (`chromium`, `chromium-driver`; see
scripts/install-test-media.sh); the test skips when it is missing."""

import os
import time
import urllib.request

import numpy as np
import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
pytest.importorskip("selenium", reason="needs the selenium package (pip)")

from live_server import serve_in_thread

from qomni import Omni
from qomni.server import Limits, create_app
from qomni.tiny import make_tiny

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
KEY = "demo-key"
MODEL = "tiny-omni"
SCREENSHOT = "/tmp/qomni-web-demo.png"

pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason=f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)")


def _start(app):
    port, stop = serve_in_thread(app)
    return f"http://127.0.0.1:{port}", stop


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    omni = Omni.load(make_tiny(root / "tiny"), dtype="float32", device="cpu", progress=False)
    limits = Limits(max_request_bytes=4 * 1024 * 1024, max_media_items=4, max_media_seconds=20,
                    default_max_tokens=6, max_tokens=32)
    app = create_app(omni, model_name=MODEL, api_key=KEY, limits=limits)
    base, stop = _start(app)
    yield base, omni
    stop()


@pytest.fixture
def url(served):
    return served[0]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                 "--window-size=1100,800", "--autoplay-policy=no-user-gesture-required",
                 # A fake microphone (a beeping tone) that needs no permission prompt.
                 "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: selenium never looks for (or downloads) a driver of its own.
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout=60, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    logs = "\n".join(str(e) for e in driver.get_log("browser"))
    raise AssertionError(f"timed out waiting for {what}; page state "
                         f"{driver.execute_script('return window.qomniDemo')}\n{logs}")


def _state(driver) -> dict:
    state = driver.execute_script(
        "const s = Object.assign({}, window.qomniDemo); delete s.encodeWav; return s;")
    assert state is not None, "window.qomniDemo is missing"
    return state


def _png(path):
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
    return path


def test_page_and_assets_are_served(url):
    with urllib.request.urlopen(url + "/", timeout=10) as r:
        assert r.status == 200 and r.headers["content-type"].startswith("text/html")
        html = r.read().decode()
    assert 'src="static/app.js"' in html and 'href="static/style.css"' in html
    texts = [html]
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        with urllib.request.urlopen(f"{url}/static/{name}", timeout=10) as r:
            assert r.status == 200 and kind in r.headers["content-type"], name
            texts.append(r.read().decode())
    # Nothing from outside this server: the page must work offline.
    for text in texts:
        assert "http://" not in text and "https://" not in text


@pytest.mark.slow
def test_chat_in_the_browser(url, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    d = browser
    d.get(url + "/")
    _wait(d, lambda: _state(d)["ready"], 30, "the page to load")
    find = d.find_element

    # 1. The server wants a key and the page has none: the models call fails visibly.
    error = find(By.ID, "error")
    assert error.is_displayed(), "no error shown without an API key"
    assert "API key" in error.text
    assert find(By.ID, "model").text == "API key needed"

    # 2. A wrong key: the message is not sent, the OpenAI error JSON is shown, the text returns.
    find(By.ID, "api-key").send_keys("wrong-key")
    box = find(By.ID, "input")
    box.send_keys("Hello there")
    find(By.ID, "send").click()
    _wait(d, lambda: _state(d)["requests"] == 1 and not _state(d)["busy"], 30, "the failed send")
    assert error.is_displayed()
    assert "invalid_api_key" in error.text and "invalid or missing API key" in error.text
    assert "invalid or missing API key" in _state(d)["lastError"]
    assert box.get_attribute("value") == "Hello there"
    assert d.find_elements(By.CSS_SELECTOR, ".msg.user.failed")
    d.save_screenshot(SCREENSHOT.replace(".png", "-error.png"))
    assert not d.find_elements(By.CSS_SELECTOR, ".msg.assistant")
    find(By.ID, "error-close").click()
    assert not error.is_displayed()

    # 3. The right key (kept in localStorage), speech on: text streams, audio is scheduled.
    key = find(By.ID, "api-key")
    key.clear()
    key.send_keys(KEY)
    _wait(d, lambda: _state(d)["model"] == MODEL, 20, "the model id with the right key")
    assert d.execute_script("return localStorage.getItem('qomni.apiKey')") == KEY
    voices = Select(find(By.ID, "voice"))
    assert [o.text for o in voices.options] == ["Ethan", "Chelsie", "Aiden"]
    voices.select_by_visible_text("Chelsie")
    find(By.CSS_SELECTOR, "label.toggle").click()
    assert find(By.ID, "speak").is_selected()
    assert not error.is_displayed()  # a working key clears the old error
    find(By.ID, "send").click()
    _wait(d, lambda: _state(d)["busy"], 10, "the request to start")
    assert find(By.ID, "stop").is_displayed() and not find(By.ID, "send").is_displayed()
    _wait(d, lambda: _state(d)["replies"] == 1 and not _state(d)["busy"], 60, "the spoken reply")
    s = _state(d)
    assert s["textChunks"] > 0 and s["finishReason"] in ("length", "stop"), s
    assert s["audioChunks"] > 0 and s["audioSamples"] > 0, s
    assert s["scheduledSeconds"] == pytest.approx(s["audioSamples"] / 24000, rel=1e-3)
    assert s["usage"]["completion_tokens"] > 0
    assert not error.is_displayed(), error.text
    bubble = find(By.CSS_SELECTOR, ".msg.assistant .bubble .text")
    assert bubble.text.strip(), "the assistant bubble is empty"
    meta = find(By.CSS_SELECTOR, ".msg.assistant .meta")
    assert "▶" in meta.text and "first audio" in meta.text  # the replay button

    # 4. A microphone recording (fake device) and an image, sent together as one turn.
    find(By.ID, "speak").find_element(By.XPATH, "..").click()  # speech off: a faster turn
    find(By.ID, "mic").click()
    _wait(d, lambda: "recording" in find(By.ID, "mic").get_attribute("class"), 10,
          "the recording to start")
    time.sleep(1.2)
    find(By.ID, "mic").click()
    _wait(d, lambda: _state(d)["recordings"] == 1, 10, "the recording")
    wav = d.execute_script(
        "return Array.from(window.qomniDemo.encodeWav(new Float32Array([0, 0.5, -1]), 16000));")
    assert bytes(wav[:4]) == b"RIFF" and len(wav) == 44 + 6
    find(By.ID, "file").send_keys(str(_png(tmp_path / "noise.png")))
    _wait(d, lambda: _state(d)["attachments"] == 2, 10, "the image attachment")
    assert len(d.find_elements(By.CSS_SELECTOR, "#attachments .chip")) == 2
    box.send_keys("What do you see and hear?", Keys.ENTER)
    _wait(d, lambda: _state(d)["replies"] == 2 and not _state(d)["busy"], 60, "the media reply")
    assert not error.is_displayed(), error.text  # the server accepted both media items
    last_user = d.find_elements(By.CSS_SELECTOR, ".msg.user")[-1]
    assert last_user.find_elements(By.CSS_SELECTOR, ".media img")
    assert last_user.find_elements(By.CSS_SELECTOR, ".media audio")
    assert len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 2
    assert not d.find_elements(By.CSS_SELECTOR, "#attachments .chip")

    d.save_screenshot(SCREENSHOT)
    _check_screenshot(SCREENSHOT)
    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"
              and "401" not in e["message"]]  # the wrong-key responses are logged as such
    assert not errors, errors


def _check_screenshot(path):
    from PIL import Image

    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[0] >= 600 and img.shape[1] >= 1000, img.shape
    assert img.std() > 10, "the screenshot is blank"


def test_stop_aborts_the_stream(served, browser, monkeypatch):
    """Stop while a spoken reply streams: the fetch is aborted, the partial turn is kept."""
    from selenium.webdriver.common.by import By

    url, omni = served
    real_stream = omni.stream

    def slow_stream(*args, **kwargs):  # slow enough that Stop always comes mid-reply
        events = real_stream(*args, **kwargs)
        try:
            for ev in events:
                time.sleep(0.3)
                yield ev
        finally:
            events.close()

    monkeypatch.setattr(omni, "stream", slow_stream)
    d = browser
    d.get(url + "/")  # the key and settings come back from localStorage
    _wait(d, lambda: _state(d)["model"] == MODEL, 20, "the page with the stored key")
    find = d.find_element
    assert find(By.ID, "api-key").get_attribute("value") == KEY
    if not find(By.ID, "speak").is_selected():
        find(By.CSS_SELECTOR, "label.toggle").click()
    find(By.ID, "max-tokens").send_keys("32")
    find(By.ID, "input").send_keys("Tell me a long story")
    find(By.ID, "send").click()
    _wait(d, lambda: _state(d)["textChunks"] > 0, 30, "the first text")
    find(By.ID, "stop").click()
    _wait(d, lambda: not _state(d)["busy"], 10, "the stop")
    s = _state(d)
    assert s["replies"] == 1 and s["finishReason"] is None, s
    assert "stopped" in find(By.CSS_SELECTOR, ".msg.assistant .meta").text
    assert not find(By.ID, "error").is_displayed()
    # The server is still serving after the client went away.
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        assert r.status == 200

