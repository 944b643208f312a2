"""The dashboard in headless Chromium against a live server that trained a few steps through the SDK.

It signs in, finds the run, sees a loss curve with one point per step, opens a checkpoint and
downloads it, samples in the playground, watches the health panel update, and then checks that
another tenant's key sees none of it. Each page is saved as `dashboard-*.png` in a temporary
directory, or in `TUFT_DASHBOARD_SCREENSHOTS` (scripts/dashboard_screenshots.py points it at docs/).

Needs Debian's `chromium` and `chromium-driver` (scripts/test.sh installs them when it can) and
selenium. Without them the test is skipped, unless `TUFT_REQUIRE_BROWSER=1` or `CI` is set,
where it fails instead.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tinker
from tinker import types
from transformers import AutoTokenizer

BASE_MODEL = "tuft/tiny-qwen3"
KEY_A = "tml-dashboard-tenant-a"
KEY_B = "tml-dashboard-tenant-b"
STEPS = 4
TEXT = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog."
WAIT_S = 30


def _browser_missing() -> str | None:
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install selenium)"
    for program in ("chromium", "chromedriver"):
        if shutil.which(program) is None:
            return f"{program} is not installed (apt-get install -y chromium chromium-driver)"
    return None


@pytest.fixture(scope="module")
def driver() -> Iterator[object]:
    missing = _browser_missing()
    if missing is not None:
        if os.environ.get("TUFT_REQUIRE_BROWSER") == "1" or os.environ.get("CI"):
            pytest.fail(f"the dashboard browser test needs a browser here: {missing}")
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,800"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False}
    )
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = os.environ.get("TUFT_DASHBOARD_SCREENSHOTS")
    directory = Path(target) if target else tmp_path_factory.mktemp("dashboard-screenshots")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture(scope="module")
def trained(server_url: str) -> Iterator[tuple[str, str]]:
    """(run id, sampler checkpoint path) of tenant A's run, trained `STEPS` steps."""
    service = tinker.ServiceClient(base_url=server_url, api_key=KEY_A)
    training = service.create_lora_training_client(base_model=BASE_MODEL, rank=8, seed=0).result()
    tokens = AutoTokenizer.from_pretrained(training.get_info().model_data.tokenizer_id).encode(TEXT)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )
    for _ in range(STEPS):
        training.forward_backward([datum], "cross_entropy").result()
        training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    training.save_state("dash-state").result()
    sampler_path = training.save_weights_for_sampler("dash-sampler").result().path
    yield training.model_id, sampler_path
    service.close("success")


def test_the_dashboard_in_a_browser(
    driver, server_url: str, trained: tuple[str, str], screenshots: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    run_id, sampler_path = trained
    wait = WebDriverWait(driver, WAIT_S)

    def find(css: str):
        return wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, css)))

    def shot(name: str) -> None:
        driver.save_screenshot(str(screenshots / f"dashboard-{name}.png"))

    def sign_in(key: str) -> None:
        find("#api-key").send_keys(key)
        driver.find_element(By.ID, "sign-in").click()

    # Sign in and find the run.
    driver.get(f"{server_url}/dashboard")
    find("#signin")
    shot("signin")
    sign_in(KEY_A)
    row = find(f'#runs-table tr[data-run-id="{run_id}"]')
    assert row.find_element(By.CSS_SELECTOR, ".step").text == str(STEPS)
    assert BASE_MODEL in row.text and "rank 8" in row.text
    shot("runs")

    # Its loss curve has one point per step; its checkpoints are listed.
    row.find_element(By.CSS_SELECTOR, "a.run-link").click()
    chart = find('svg[data-series="loss_per_token"]')
    assert len(chart.find_elements(By.CSS_SELECTOR, "circle.point")) == STEPS
    for series in ("grad_norm:mean", "learning_rate", "tokens", "step_seconds"):
        assert len(driver.find_elements(By.CSS_SELECTOR, f'svg[data-series="{series}"] circle.point')) == STEPS
    checkpoints = find("#checkpoints")
    assert "dash-state" in checkpoints.text and "dash-sampler" in checkpoints.text
    shot("run")

    # Open the sampler checkpoint and download it through its signed link.
    driver.find_element(By.CSS_SELECTOR, f'tr[data-path="{sampler_path}"] a.checkpoint-link').click()
    assert find("#checkpoint-path").text == sampler_path
    download = wait.until(lambda d: d.find_element(By.ID, "download").get_attribute("href"))
    archive = httpx.get(download, timeout=30)
    assert archive.status_code == 200 and archive.content[:2] == b"\x1f\x8b"
    driver.execute_script("arguments[0].scrollIntoView()", find("#checkpoint-detail"))
    shot("checkpoint")

    # Sample from it in the playground.
    find("#open-in-playground").click()
    assert Select(find("#pg-model")).first_selected_option.get_attribute("value") == sampler_path
    find("#pg-prompt").send_keys("The quick brown")
    max_tokens = driver.find_element(By.ID, "pg-max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("8")
    driver.find_element(By.ID, "pg-sample").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#pg-tokens, #pg-error"))
    assert not driver.find_elements(By.ID, "pg-error"), driver.find_element(By.ID, "pg-error").text
    rows = driver.find_elements(By.CSS_SELECTOR, "#pg-tokens tbody tr")
    assert 1 <= len(rows) <= 8
    logprobs = [float(span.get_attribute("data-logprob")) for span in driver.find_elements(By.CSS_SELECTOR, "#pg-completion .token")]
    assert len(logprobs) == len(rows) and all(lp <= 0 for lp in logprobs)
    shot("playground")

    # Server health updates live.
    driver.get(f"{server_url}/dashboard#/health")
    find(f'[data-model="{BASE_MODEL}"] [data-figure="queue_depth"]')
    assert int(find('[data-figure="xla_compiles"] .value').text) > 0
    first = find("#health-updated").text
    wait.until(lambda d: d.find_element(By.ID, "health-updated").text != first)
    shot("health")
    severe = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert severe == [], severe

    # Another tenant sees none of it.
    driver.find_element(By.ID, "sign-out").click()
    driver.get(f"{server_url}/dashboard#/runs")
    sign_in(KEY_B)
    assert find("#no-runs").text == "No training runs yet."
    driver.get(f"{server_url}/dashboard#/runs/{run_id}")
    assert "unknown training run" in find("#view-error").text
    driver.get(f"{server_url}/dashboard#/playground")
    options = [o.get_attribute("value") for o in Select(find("#pg-model")).options]
    assert options == [BASE_MODEL]
