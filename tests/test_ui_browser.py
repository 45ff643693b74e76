"""``fastwan ui`` in a real browser: headless Debian Chromium driven by selenium.

The page is served on a free loopback port from a thread of this process, with a tiny
random FastWan checkpoint. The test types a prompt, picks a frame count, clicks Generate,
waits for the <video>, downloads its source from the server and decodes it (PyAV). One
screenshot is saved under the session's pytest temp folder, in ``artifacts/``.
Skips only where Chromium or its driver (Debian: ``chromium``, ``chromium-driver``) is not
installed; ``.ci/run`` installs them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import shutil
import socket
import urllib.request

import av
import pytest
from _tiny_wan import build_tiny_wan
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from fastwan.pipeline import VideoGenerator
from fastwan.ui.app import FastWanUI, LazyModel, build_app, launch

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Chromium and chromedriver (Debian: apt-get install chromium chromium-driver)",
)

PROMPT = "a blue bird flies over the field"
FRAMES = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_loopback(address) -> bool:
    host = str(address[0])
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost
        return False


@pytest.fixture(scope="module")
def outside_connections():
    """Addresses beyond loopback that this process (the server) connected to."""
    seen = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def record(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not is_loopback(address):
            seen.append(address)

    def connect(sock, address):
        record(sock, address)
        return real_connect(sock, address)

    def connect_ex(sock, address):
        record(sock, address)
        return real_connect_ex(sock, address)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", connect)
        mp.setattr(socket.socket, "connect_ex", connect_ex)
        yield seen


@contextlib.contextmanager
def serve(ui: FastWanUI):
    """``ui``'s page on a free loopback port, from a thread of this process: its URL."""
    app = build_app(ui, queue_size=4)
    port = free_port()
    launch(app, host="127.0.0.1", port=port, block=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, outside_connections):
    model_dir = build_tiny_wan(tmp_path_factory.mktemp("ui-browser") / "tiny", gates="fastvideo")

    def loader(preset):
        return lambda src: VideoGenerator.from_pretrained(src, preset=preset, device="cpu")

    ui = FastWanUI(  # the same tiny folder: a few-step VSA student and a many-step teacher
        LazyModel("student", str(model_dir), loader("fastwan2.1-t2v-1.3b")),
        LazyModel("teacher", str(model_dir), loader("wan2.1-t2v-1.3b")),
        max_frames=9,
        max_pixels=64 * 80,
        max_sequence_length=16,
        output_dir=tmp_path_factory.mktemp("ui-videos"),
    )
    with serve(ui) as url:
        yield url, ui


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1400",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--autoplay-policy=no-user-gesture-required",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # network requests
    # An explicit driver path: selenium never fetches a driver or a browser.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def requested_urls(driver) -> set[str]:
    """URLs the page has requested since the last call (Chrome's performance log)."""
    urls = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.add(message["params"]["request"]["url"])
    return urls


def click(wait: WebDriverWait, css: str) -> None:
    """Click once the element is there and clickable (Gradio renders the page in steps)."""
    wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, css))).click()


def status_text(driver) -> str:
    return driver.find_element(By.CSS_SELECTOR, "#status").text


def toast_texts(driver) -> list[str]:
    return [t.text for t in driver.find_elements(By.CSS_SELECTOR, "[data-testid='toast-body']")]


def test_type_a_prompt_click_generate_and_get_a_playable_video(
    server, browser, outside_connections, tmp_path, tmp_path_factory
):
    server, _ = server
    wait = WebDriverWait(browser, 45)
    browser.get(server)
    prompt = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea")))

    # An empty prompt is refused in the page (a toast and the status line), and the page
    # keeps working afterwards.
    click(wait, "#generate")
    wait.until(lambda d: "prompt is empty" in status_text(d))
    wait.until(lambda d: any("prompt is empty" in t for t in toast_texts(d)))

    prompt.send_keys(PROMPT)
    click(wait, "#frames input")
    option = wait.until(
        EC.element_to_be_clickable(
            (By.CSS_SELECTOR, f"#frames li[role='option'][aria-label='{FRAMES}']")
        )
    )
    option.click()
    wait.until(
        lambda d: (
            d.find_element(By.CSS_SELECTOR, "#frames input").get_attribute("value") == str(FRAMES)
        )
    )
    click(wait, "#generate")
    video = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#video video[src]")))
    wait.until(lambda d: "Generated" in status_text(d))
    assert f"Generated {FRAMES} frames" in status_text(browser)
    assert "denoise" in browser.find_element(By.CSS_SELECTOR, "#timings").text

    # The browser itself loads the video's metadata (it can play it).
    wait.until(lambda d: d.execute_script("return arguments[0].readyState", video) >= 1)
    width, height = browser.execute_script(
        "return [arguments[0].videoWidth, arguments[0].videoHeight]", video
    )
    src = video.get_attribute("src")
    assert src.startswith(server)

    file = tmp_path / "downloaded.mp4"
    with urllib.request.urlopen(src, timeout=30) as resp:
        file.write_bytes(resp.read())
    with av.open(str(file)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    assert len(frames) == FRAMES
    assert frames[0].shape == (height, width, 3) and (width, height) == (80, 64)

    # Everything the page loaded came from this server (no fonts, CDN or analytics).
    urls = requested_urls(browser)
    assert any(u.startswith(server) for u in urls)
    elsewhere = sorted(u for u in urls if not u.startswith((server, "data:", "blob:")))
    assert not elsewhere, elsewhere
    assert not outside_connections  # nor did the server (analytics, version checks)

    artifacts = tmp_path_factory.getbasetemp() / "artifacts"
    artifacts.mkdir(exist_ok=True)
    shot = artifacts / "fastwan-ui.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")


def test_a_bad_seed_is_named_in_the_page_and_a_good_one_is_used(server, browser):
    server, _ = server
    wait = WebDriverWait(browser, 45)
    browser.get(server)
    prompt = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea")))
    prompt.send_keys(PROMPT)
    seed = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#seed input, #seed textarea")))
    seed.clear()
    seed.send_keys("abc")
    click(wait, "#generate")
    wait.until(lambda d: "seed must be a whole number" in status_text(d))
    assert "or click Random seed" in status_text(browser)
    assert not any("upstream" in t or "internal error" in t for t in toast_texts(browser))
    # Every digit of a 64-bit seed reaches the model (a number field would round it).
    seed.clear()
    seed.send_keys("9223372036854775807")
    click(wait, "#generate")
    wait.until(lambda d: "Generated" in status_text(d))
    used = browser.find_element(By.CSS_SELECTOR, "#seed-used input, #seed-used textarea")
    assert used.get_attribute("value") == "9223372036854775807"


def test_compare_shows_teacher_and_student_side_by_side_with_the_speedup(server, browser):
    server, ui = server
    wait = WebDriverWait(browser, 45)
    browser.get(server)
    prompt = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea")))
    prompt.send_keys(PROMPT)
    tab = wait.until(
        lambda d: next(
            (
                b
                for b in d.find_elements(By.CSS_SELECTOR, "button[role='tab']")
                if "Compare" in b.text
            ),
            False,
        )
    )
    tab.click()
    steps = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#teacher-steps input")))
    steps.clear()
    steps.send_keys("4")
    click(wait, "#compare")
    wait.until(lambda d: "Speedup" in d.find_element(By.CSS_SELECTOR, "#compare-timings").text)
    table = browser.find_element(By.CSS_SELECTOR, "#compare-timings").text
    cfg = ui.teacher.peek().preset.guidance_scale  # the teacher preset's CFG scale
    assert f"teacher (dense, 4 steps, CFG {cfg:g})" in table
    assert "student (VSA 0.8, 3 DMD steps)" in table
    sources = []
    for elem_id in ("teacher-video", "student-video"):
        video = wait.until(
            EC.presence_of_element_located((By.CSS_SELECTOR, f"#{elem_id} video[src]"))
        )
        wait.until(lambda d, v=video: d.execute_script("return arguments[0].readyState", v) >= 1)
        sources.append(video.get_attribute("src"))
    assert sources[0] != sources[1] and all(src.startswith(server) for src in sources)


@pytest.fixture(scope="module")
def i2v_server(tmp_path_factory):
    """The page of the shipped toy image-to-video pair, with more sizes than its native."""

    def load(src):
        return VideoGenerator.from_pretrained(src, device="cpu")

    ui = FastWanUI(
        LazyModel("student", "toy-i2v-student", load),
        LazyModel("teacher", "toy-i2v-teacher", load),
        max_pixels=32 * 64,
        output_dir=tmp_path_factory.mktemp("ui-i2v-videos"),
    )
    with serve(ui) as url:
        yield url, ui


def test_upload_an_image_and_generate_a_video_that_starts_from_it(
    i2v_server, browser, tmp_path, tmp_path_factory
):
    import numpy as np
    from PIL import Image

    from fastwan.toy import i2v, world

    server, ui = i2v_server
    combo = sorted(world.HELD_OUT, key=world.canonical_prompt)[0]
    frame = i2v.render_i2v_batch([combo], [5])[0, 0]  # [16, 16, 3] in [0, 1]
    # a 2:1 picture: the page picks the offered size of that aspect
    picture = Image.fromarray((frame * 255).round().astype(np.uint8)).resize((64, 32))
    path = tmp_path / "first.png"
    picture.save(path)
    want = ui.resolution_for_image(picture)
    w, h = map(int, want.split("x"))
    assert w == 2 * h

    wait = WebDriverWait(browser, 60)
    browser.get(server)
    prompt = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea")))
    prompt.send_keys(world.canonical_prompt(combo))
    tab = wait.until(
        lambda d: next(
            (b for b in d.find_elements(By.CSS_SELECTOR, "button[role='tab']")
             if "Image to video" in b.text),
            False,
        )
    )  # fmt: skip
    tab.click()
    upload = wait.until(
        EC.presence_of_element_located((By.CSS_SELECTOR, "#image input[type='file']"))
    )
    upload.send_keys(str(path))
    wait.until(
        lambda d: (
            d.find_element(By.CSS_SELECTOR, "#resolution input").get_attribute("value") == want
        )
    )
    click(wait, "#generate-image")
    video = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#image-video video[src]")))
    wait.until(lambda d: "Generated" in status_text(d))
    assert f"at {want}" in status_text(browser) and "from the image" in status_text(browser)
    file = tmp_path / "downloaded.mp4"
    with urllib.request.urlopen(video.get_attribute("src"), timeout=30) as resp:
        file.write_bytes(resp.read())
    with av.open(str(file)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert frames[0].shape == (h, w, 3)
    # the first frame is the uploaded picture at the video's size (up to the MP4 codec)
    given = np.asarray(picture.resize((w, h), Image.BICUBIC), dtype=np.float32) / 255
    assert np.abs(frames[0] / 255.0 - given).mean() < 0.08
    artifacts = tmp_path_factory.getbasetemp() / "artifacts"
    artifacts.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(artifacts / "fastwan-ui-i2v.png"))
