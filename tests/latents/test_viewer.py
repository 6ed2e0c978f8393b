"""The latent viewer: its files, the loopback server, `saeflow view`, and the pages in headless
Chromium (marked `browser`; skipped where Chromium, its driver or selenium is missing).

Screenshots of the pages go to the test's tmp folder and, when SAEFLOW_SCREENSHOTS names a
folder, there too."""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.view import prepare  # before any CliRunner: Prefect logs to its first import's stderr
from sae_core.config import LatentsConfig
from sae_core.latents.viewer import LatentSite, serving
from sae_core.stages import latents as latents_stage


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_llama_dir, tiny_corpus_dir):
    """(the tiny SAE's store URI, the SAE, its latent statistics)."""
    from tests.helpers.tiny_sae import tiny_sae

    store = tmp_path_factory.getbasetemp() / "latents-store"
    cfg, sae = tiny_sae(store, tiny_llama_dir, tiny_corpus_dir)
    stats, _ = latents_stage.compute_latent_stats(sae, cfg.latents, progress=False)
    return sae, stats


@pytest.fixture(scope="module")
def site(tiny) -> LatentSite:
    return LatentSite(tiny[1])


def test_site_serves_pages_summary_chunks_and_single_latents(site):
    body, kind = site.get("/")
    assert kind.startswith("text/html") and b"index.js" in body
    assert json.loads(site.get("/data/summary.json")[0])["n_latents"] == 256
    assert len(json.loads(site.get("/data/index/chunk-00000.json")[0])) == 256
    latent = json.loads(site.get("/data/latent/00070.json")[0])
    assert latent["id"] == 70 and latent == site.latent(70)
    for bad in ("/data/latent/00256.json", "/data/index/chunk-00001.json", "/../pyproject.toml",
                "/data/../summary.json", "/nope.html", "/data/latent/7.json"):  # fmt: skip
        assert site.get(bad) is None, bad


def test_export_writes_every_path(site, tmp_path):
    files = site.export(tmp_path / "site", progress=False)
    written = sorted(
        str(p.relative_to(tmp_path / "site")) for p in (tmp_path / "site").rglob("*") if p.is_file()
    )
    assert files == len(written) == len(list(site.paths()))
    assert "data/latent/00255.json" in written and "latent.html" in written


def test_server_listens_on_loopback_only(site):
    with serving(site) as url:
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url + "latent.html") as response:
            assert response.headers["Content-Type"].startswith("text/html")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url + "data/latent/99999.json")
        assert err.value.code == 404


def test_prepare_reuses_the_stored_statistics(tiny):
    sae, stats = tiny
    prepared = prepare(sae.uri, LatentsConfig(), progress=False)
    assert prepared.site.ref == stats and prepared.run_id is None  # a store URI: no MLflow run
    assert set(prepared.metrics) >= {"explain/precision_mean", "explain/recall_mean"}


def test_cli_exports_a_store_sae(tiny, tmp_path):
    sae, stats = tiny
    result = CliRunner().invoke(
        app, ["view", sae.uri, "--export", str(tmp_path / "out"), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert "explainability: mean precision" in result.output and stats.uri in result.output
    assert (tmp_path / "out" / "data" / "latent" / "00000.json").is_file()


@pytest.mark.parametrize(
    "target, needle",
    [
        ("nosuch@champion", "no model registry"),
        ("models:/nosuch/3", "no model registry"),
        ("/tmp/nowhere/sae/0123456789abcdef", "no committed SAE dataset"),
        ("models:/x/latest", "not a version number"),
    ],
)
def test_cli_names_a_bad_target_in_one_line(target, needle, tmp_path):
    # No registry: a fresh state directory, and no tracking URI left behind by earlier tests
    # (mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI).
    env = {"SAEFLOW_HOME": str(tmp_path), "MLFLOW_TRACKING_URI": None}
    result = CliRunner().invoke(app, ["view", target, "--no-progress"], env=env)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.output


# In a real browser ---------------------------------------------------------------------------------
def _browser():
    """A headless Chromium driven by selenium, or a skip naming what is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (the dev extras: uv pip install -e '.[dev]')")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip(
            "Chromium or chromedriver is missing (Debian: apt-get install chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1280,1200",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(driver))


@pytest.fixture(scope="module")
def browser():
    driver = _browser()
    yield driver
    driver.quit()


def _screenshot(driver, tmp_path: Path, name: str) -> None:
    driver.save_screenshot(str(tmp_path / name))
    if folder := os.environ.get("SAEFLOW_SCREENSHOTS"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / name, Path(folder) / name)


def _wait(driver, condition, timeout: float = 20):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def _status(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, "status").text


def _rows(driver) -> list[int]:
    from selenium.webdriver.common.by import By

    return [
        int(r.get_attribute("data-id"))
        for r in driver.find_elements(By.CSS_SELECTOR, "#latents tbody tr")
    ]


@pytest.mark.browser
def test_index_search_and_latent_page(site, browser, tmp_path):
    from selenium.webdriver.common.by import By

    with serving(site) as url:
        browser.get(url)
        _wait(browser, lambda d: _status(d) == "256 latents")
        assert _rows(browser) == list(range(50))
        assert "n = 256" in browser.find_element(By.ID, "title").text
        _screenshot(browser, tmp_path, "index.png")

        browser.find_element(By.ID, "next").click()
        _wait(browser, lambda d: _rows(d) == list(range(50, 100)))
        assert "page 2 of 6" in browser.find_element(By.ID, "page").text

        browser.find_element(By.ID, "q").send_keys("70")  # an id
        _wait(browser, lambda d: _status(d) == "1 matching latent" and _rows(d) == [70])

        token = site.latent(70)["top"][0]["tokens"][site.latent(70)["top"][0]["peak"]].strip()
        query = browser.find_element(By.ID, "q")
        query.clear()
        query.send_keys(token)  # a token: every latent whose explanation or top token holds it
        expected = [r["id"] for r in json.loads(site.get("data/index/chunk-00000.json")[0])
                    if any(token.lower() in t.lower() for t in ("".join(r["expl"]), " ".join(r["expl"]), r["top"]))]  # fmt: skip
        _wait(browser, lambda d: "matching" in _status(d) and _rows(d) == expected[:50])
        _screenshot(browser, tmp_path, "index-search.png")

        browser.find_element(By.CSS_SELECTOR, f'#latents tr[data-id="{expected[0]}"] a').click()
        _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#top .context"))
        latent = site.latent(expected[0])
        assert browser.find_element(By.ID, "title").text == f"Latent {expected[0]}"
        assert len(browser.find_elements(By.CSS_SELECTOR, "#top .context")) == len(latent["top"])
        assert len(browser.find_elements(By.CSS_SELECTOR, "#random .context")) == len(
            latent["random"]
        )
        peak = browser.find_element(By.CSS_SELECTOR, "#top .context .tok.peak")
        top = latent["top"][0]
        assert peak.text.strip() == top["tokens"][top["peak"]].strip().replace("\n", "↵")
        promoted = browser.find_elements(By.CSS_SELECTOR, "#promoted li")
        assert len(promoted) == len(latent["logits"]["promoted"])
        assert browser.find_elements(By.CSS_SELECTOR, "#histogram svg rect")
        assert browser.find_element(By.ID, "fires").text.endswith(str(latent["fires"]))
        _screenshot(browser, tmp_path, "latent.png")
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors


@pytest.mark.browser
def test_exported_site_works_from_a_static_server(site, browser, tmp_path):
    from selenium.webdriver.common.by import By

    site.export(tmp_path / "site", progress=False)
    handler = partial(SimpleHTTPRequestHandler, directory=str(tmp_path / "site"))
    handler.log_message = lambda *args: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        browser.get(f"http://127.0.0.1:{server.server_address[1]}/latent.html?id=3")
        _wait(browser, lambda d: d.find_element(By.ID, "title").text == "Latent 3")
        _wait(browser, lambda d: d.find_element(By.ID, "density").text != "")
        assert browser.find_element(By.ID, "next-latent").text == "latent 4 ›"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
