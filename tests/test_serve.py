"""``cmhash serve`` for real: the command started by the test on a free loopback port, its
JSON API hit over HTTP with real MIRFlickr photos and captions, and its page driven in a
headless Chromium (the system's browser through Selenium): type a caption, see the expected
thumbnails, and check the screenshot. Expected results come from a HashIndex of the Encoder's
own codes (tests/fixtures/collection.py), never from the service."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnx", reason="the test builds its ONNX towers with the onnx package")
pytest.importorskip("starlette", reason="cmhash serve needs the serve extra")
pytest.importorskip("uvicorn", reason="cmhash serve needs the serve extra")
pytest.importorskip("python_multipart", reason="cmhash serve needs the serve extra")

UPLOAD_LIMIT = 400_000  # bytes: above every photo of the collection, below the oversized upload


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    from fixtures.collection import make_collection

    return make_collection(tmp_path_factory.mktemp("collection"))


@contextlib.contextmanager
def running(*argv, env: dict | None = None):
    """``cmhash serve ARGV --port 0`` in a subprocess; yields its base URL, then stops it and
    checks that it printed no traceback."""
    command = [sys.executable, "-m", "cmhash.cli", "serve", *map(str, argv), "--port", "0", "--threads", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **(env or {})})
    try:
        line = process.stdout.readline()  # "cmhash serve: http://127.0.0.1:PORT/  (Ctrl-C stops)"
        assert line.startswith("cmhash serve: http://127.0.0.1:"), line + process.stderr.read()
        yield line.split()[2].rstrip("/")
    finally:
        process.terminate()
        process.wait(10)
    assert "Traceback" not in process.stderr.read()


@pytest.fixture(scope="module")
def server(collection):
    """The photos and the captions, thumbnails from the photo folder, a small upload limit."""
    with running(collection.bundle, collection.photo_index, collection.caption_index, "--images", collection.photos,
                 env={"CMHASH_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT)}) as url:
        yield url


def call(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, dict | bytes, dict]:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, body, got = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        status, body, got = exc.code, exc.read(), dict(exc.headers)
    if got.get("content-type", "").startswith("application/json"):
        return status, json.loads(body), got
    return status, body, got


def search(server: str, **params) -> tuple[int, dict]:
    status, body, _ = call(f"{server}/api/search?{urllib.parse.urlencode(params)}")
    return status, body


def upload(server: str, data: bytes, filename: str = "query.jpg", **fields) -> tuple[int, dict]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    status, body, _ = call(f"{server}/api/search", data=b"".join(parts) + f"--{boundary}--\r\n".encode(),
                           headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    return status, body


def strip(results: list[dict]) -> list[dict]:
    return [{k: v for k, v in hit.items() if k != "thumbnail"} for hit in results]


# --------------------------------------------------------------------------- the API


def test_info_names_the_collections_and_limits(server, collection):
    status, info, headers = call(f"{server}/api/info")
    assert status == 200
    assert info["collections"] == [{"name": "photos", "items": len(collection.photo_names), "bits": 32},
                                   {"name": "captions", "items": len(collection.captions), "bits": 32}]
    assert info["modalities"] == ["image", "text"] and info["thumbnails"] is True
    assert info["limits"]["max_upload_bytes"] == UPLOAD_LIMIT
    assert "default-src 'self'" in headers["content-security-policy"]


def test_text_query_returns_the_expected_photos_with_thumbnails(server, collection):
    caption = "a dog on a beach"
    status, body = search(server, text=caption, k=8)
    assert status == 200 and body["query"] == {"kind": "text", "text": caption} and body["collection"] == "photos"
    assert strip(body["results"]) == collection.expected(collection.encoder.hash_text(caption), "image", 8)
    for hit in body["results"][:3]:
        assert hit["thumbnail"] == f"/api/thumbnail/photos/{hit['id']}"
        status, data, headers = call(server + hit["thumbnail"])
        assert status == 200 and headers["content-type"] == "image/jpeg"
        thumb = Image.open(io.BytesIO(data))
        original = Image.open(collection.photos / hit["name"])
        assert max(thumb.size) <= 192 and thumb.size[0] / thumb.size[1] == pytest.approx(
            original.size[0] / original.size[1], rel=0.05)


def test_image_upload_finds_captions_cross_modally(server, collection):
    photo = collection.photos / collection.photo_names[7]
    status, body = upload(server, photo.read_bytes(), photo.name, collection="captions", k="6")
    assert status == 200 and body["query"]["kind"] == "image" and body["query"]["filename"] == photo.name
    assert strip(body["results"]) == collection.expected(collection.encoder.hash(photo), "text", 6)
    assert all(hit["thumbnail"] is None for hit in body["results"])  # captions have no picture
    status, body = upload(server, photo.read_bytes(), k="1")  # and among the photos it finds itself
    assert body["results"][0]["name"] == photo.name and body["results"][0]["distance"] == 0


def test_radius_and_k_shape_the_results(server, collection):
    code = collection.encoder.hash_text("a photo of sky")
    everything = collection.expected(code, "image", len(collection.photo_names))
    radius = everything[len(everything) // 2]["distance"]
    status, body = search(server, text="a photo of sky", k=100, radius=radius)
    assert status == 200 and strip(body["results"]) == collection.expected(code, "image", 100, radius)
    assert 0 < len(body["results"]) < len(everything)


@pytest.mark.parametrize("params, status, words", [
    ({"text": "zebra xylophone"}, 400, "no word of 'zebra xylophone' is in the bundle's vocabulary"),
    ({"text": "a dog", "k": "0"}, 400, "k must be at least 1"),
    ({"text": "a dog", "k": "1001"}, 400, "over the limit of 1000"),
    ({"text": "a dog", "k": "ten"}, 400, "k must be an integer"),
    ({"text": "a dog", "radius": "-2"}, 400, "radius must be at least 0"),
    ({"k": "3"}, 400, "give a query"),
    ({"text": "a dog", "collection": "nope"}, 404, "no collection 'nope'"),
])
def test_bad_text_requests_get_4xx_with_a_message(server, params, status, words):
    got, body = search(server, **params)
    assert got == status and words in body["error"], body
    assert "Traceback" not in json.dumps(body)


def test_bad_uploads_get_4xx_with_a_message(server, collection):
    status, body = upload(server, b"this is not an image")
    assert status == 400 and body["type"] == "ImageDecodeError", body
    status, body = upload(server, b"")
    assert status == 400 and "empty" in body["error"]
    status, body = upload(server, os.urandom(UPLOAD_LIMIT + 1000))
    assert status == 413 and body["type"] == "RequestTooLargeError" and f"{UPLOAD_LIMIT:,}" in body["error"]
    status, body, _ = call(f"{server}/api/search", data=b'{"text": "a dog"}', headers={"Content-Type": "application/json"})
    assert status == 400 and "takes a form" in body["error"]
    status, body, _ = call(f"{server}/api/search", data=b"--x\r\nContent-Disposition: form-data\r\n\r\nbroken",
                           headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert 400 <= status < 500 and body["error"], body


def test_thumbnails_only_for_items_of_the_index_inside_the_folder(server, collection):
    assert call(f"{server}/api/thumbnail/photos/{len(collection.photo_names) + 5}")[0] == 404  # no such id
    assert call(f"{server}/api/thumbnail/captions/0")[0] == 404  # a caption is no file of the folder
    assert call(f"{server}/api/thumbnail/photos/..%2f..%2fetc%2fpasswd")[0] == 404
    assert call(f"{server}/api/thumbnail/nope/0")[0] == 404
    status, body, _ = call(f"{server}/nothing/here")
    assert status == 404 and body["error"] == "Not Found"


def test_names_that_leave_the_images_folder_get_no_thumbnail(collection, tmp_path):
    """An index whose names point outside --images (a file list with ``../``) is served, but
    no file outside the folder is ever read for a thumbnail."""
    from cmhash.cli import main

    outside = tmp_path / "private"
    outside.mkdir()
    shutil.copy(collection.photos / collection.photo_names[0], outside / "secret.jpg")
    inside = tmp_path / "public"
    inside.mkdir()
    shutil.copy(collection.photos / collection.photo_names[1], inside / "shown.jpg")
    listing = inside / "list.txt"
    listing.write_text("shown.jpg\n../private/secret.jpg\n")
    assert main(["encode", str(collection.bundle), str(listing), "--out", str(tmp_path / "enc"), "--quiet"]) == 0
    assert main(["index", "build", str(tmp_path / "enc" / "codes.npz"), "--out", str(tmp_path / "x.cmhidx")]) == 0
    with running(collection.bundle, tmp_path / "x.cmhidx", "--images", inside) as url:
        status, body = search(url, text="a dog", k=2)
        by_name = {hit["name"]: hit for hit in body["results"]}
        assert by_name["shown.jpg"]["thumbnail"] and by_name["../private/secret.jpg"]["thumbnail"] is None
        assert call(f"{url}/api/thumbnail/x/{by_name['shown.jpg']['id']}")[0] == 200
        assert call(f"{url}/api/thumbnail/x/{by_name['../private/secret.jpg']['id']}")[0] == 404


def test_serve_refuses_a_busy_port_and_names_its_extra(collection):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "cmhash.cli", "serve", str(collection.bundle),
                              str(collection.photo_index), "--port", str(port)], capture_output=True, text=True)
    assert out.returncode == 2 and "cannot listen on 127.0.0.1" in out.stderr and "Traceback" not in out.stderr
    script = ("import sys; sys.modules['starlette'] = None; from cmhash.cli import main; "
              f"sys.exit(main(['serve', {str(collection.bundle)!r}, {str(collection.photo_index)!r}]))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 2 and 'pip install "cmhash-sdk[serve]"' in out.stderr, out.stderr


# --------------------------------------------------------------------------- the page, in a browser

CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium from the system's packages, driven by Selenium through the system's
    chromedriver (nothing is downloaded)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="the page test needs selenium (dev extra)")
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no Chromium and chromedriver installed (Debian: apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1200,900", "--disable-extensions", "--no-first-run"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for(driver, condition, seconds: float = 30.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"the page did not get there in {seconds} s: {driver.find_element('id', 'status').text!r} "
                         f"{driver.find_element('id', 'error').text!r}")


def results_of(driver) -> list[dict]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#results figure.hit')].map(f => ({name: f.dataset.name, "
        "distance: Number(f.dataset.distance), img: f.querySelector('img') ? {src: f.querySelector('img').src, "
        "loaded: f.querySelector('img').complete && f.querySelector('img').naturalWidth > 0} : null}))")


def test_page_text_query_shows_the_expected_thumbnails(server, collection, browser, tmp_path):
    from selenium.webdriver.common.by import By

    caption, k = "a dog on a beach", 6
    expected = collection.expected(collection.encoder.hash_text(caption), "image", k)
    browser.get(server + "/")
    wait_for(browser, lambda: "items" in browser.find_element(By.ID, "status").text)  # /api/info answered
    k_box = browser.find_element(By.ID, "k")
    k_box.clear()
    k_box.send_keys(str(k))
    browser.find_element(By.ID, "text").send_keys(caption)
    browser.find_element(By.ID, "search").click()
    wait_for(browser, lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done")
    shown = wait_for(browser, lambda: (r := results_of(browser)) and all(h["img"] and h["img"]["loaded"] for h in r) and r)
    assert [(h["name"], h["distance"]) for h in shown] == [(e["name"], e["distance"]) for e in expected]
    assert all(h["img"]["src"].endswith(f"/api/thumbnail/photos/{e['id']}") for h, e in zip(shown, expected))
    figcaptions = [f.text for f in browser.find_elements(By.CSS_SELECTOR, "#results figcaption")]
    assert figcaptions[0] == f"#1 · distance {expected[0]['distance']} · {expected[0]['name']}"

    png = tmp_path / "page.png"
    assert browser.save_screenshot(str(png))
    screenshot = Image.open(png).convert("RGB")
    pixels = np.asarray(screenshot, dtype=np.float32)
    assert screenshot.size[0] >= 800 and pixels.std() > 20  # not blank
    # the first thumbnail, cut from the screenshot where the page drew it, is the first photo's picture
    box = browser.execute_script("const r = document.querySelector('#results img').getBoundingClientRect(); "
                                 "return [r.left, r.top, r.right, r.bottom, window.devicePixelRatio];")
    scale = box[4]
    drawn = np.asarray(screenshot.crop(tuple(int(v * scale) for v in box[:4])), dtype=np.float32)
    assert drawn.std() > 10  # a photo, not an empty frame
    photo = Image.open(collection.photos / expected[0]["name"]).convert("RGB")
    mean_photo = np.asarray(photo, dtype=np.float32).mean(axis=(0, 1))
    assert np.abs(drawn.mean(axis=(0, 1)) - mean_photo).max() < 40  # object-fit crops; colours stay close


def test_page_image_upload_shows_captions_and_errors_in_words(server, collection, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    photo = collection.photos / collection.photo_names[3]
    expected = collection.expected(collection.encoder.hash(photo), "text", 10)
    browser.get(server + "/")
    wait_for(browser, lambda: "items" in browser.find_element(By.ID, "status").text)
    Select(browser.find_element(By.ID, "collection")).select_by_value("captions")
    browser.find_element(By.ID, "image").send_keys(str(photo))
    wait_for(browser, lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done")
    shown = results_of(browser)
    assert [(h["name"], h["distance"]) for h in shown] == [(e["name"], e["distance"]) for e in expected]
    assert all(h["img"] is None for h in shown)  # captions shown as text
    texts = [el.text for el in browser.find_elements(By.CSS_SELECTOR, "#results .text")]
    assert texts == [e["name"] for e in expected]

    browser.find_element(By.ID, "text").send_keys("zebra")
    browser.find_element(By.ID, "search").click()
    wait_for(browser, lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "error")
    assert "no word of 'zebra'" in browser.find_element(By.ID, "error").text
