"""Screenshots of the MLflow UI for the README, taken with headless Chromium. Rerunnable.

    python -m pipeline demo                                # in some folder, e.g. /tmp/demo
    python docs/screenshots.py --store /tmp/demo           # -> docs/screenshots/*.png
    python docs/screenshots.py --store /tmp/demo --registered_model NAME   # + its page
    python docs/screenshots.py --store /tmp/demo --heldout demo_data/heldout.csv  # + Models tab

`--store` is the folder the pipeline ran in (its mlflow.db and mlruns/); the script starts
`mlflow ui` on 127.0.0.1 against it, opens the pages in Chromium through Playwright, in MLflow's
Model training view, and writes:

    runs_list.png         the experiment's runs, the pipeline run expanded, with their datasets
    vqvae_overview.png    the VQ-VAE run's Overview: description, metrics, datasets
    reconstructions.png   the VQ-VAE run's `reconstructions` card (Model metrics tab) as it
                          opens (step 0, before training), and enlarged at the last step
    prior_samples.png     the same of the prior run's `training_samples` card, where it has one
                          (`--prior.sample_every`)
    models_tab.png        with --heldout: the experiment's Models tab, its logged models with
                          their figures on that held-out data set
    registered_model.png  with --registered_model: that model's page

Needs what neither the pipeline nor the tests need (docs/requirements-screenshots.txt):
`apt-get install -y chromium` and `pip install playwright`, which drives that chromium (it
downloads no browser of its own).
"""

import argparse
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from PIL import Image

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
# MLflow 3.17 keeps its GenAI / Model training switch in the browser; this parameter sets it.
ML_VIEW = "workflowType=machine_learning"
WIDTH = 1600
# the held-out figures the Models tab shows
MODEL_METRICS = ("quality/fd_ratio", "quality/precision", "quality/recall",
                 "quality/classifier_confidence", "quality/label_agreement")
SETTLE_MS = 2500  # after the page's text is there, for images and charts to draw


# the server

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(store, port):
    """`mlflow ui` on 127.0.0.1 against store/mlflow.db; returns the process once it answers."""
    if not (store / "mlflow.db").is_file():
        sys.exit(f"error: {store}/mlflow.db does not exist (run `python -m pipeline demo` there)")
    log = open(store / "screenshots_server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri",
         f"sqlite:///{store / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=store, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)  # its own process group: it starts uvicorn and job workers
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"error: mlflow ui exited; see {log.name}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return process
        except OSError:
            time.sleep(0.5)
    stop_ui(process)
    sys.exit(f"error: mlflow ui did not answer within 180 s; see {log.name}")


def stop_ui(process):
    """Stop `mlflow ui` and the worker processes it started (its process group)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            pass
        time.sleep(2)
        os.killpg(process.pid, signal.SIGKILL)  # its job workers outlive a SIGTERM a while
    except ProcessLookupError:  # the whole group is gone
        pass
    process.wait(10)


def find_runs(tracking_uri, experiment):
    """(experiment id, newest VQ-VAE run, newest prior run or None) of `experiment`."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        sys.exit(f"error: no experiment '{experiment}' in {tracking_uri}")
    runs = client.search_runs([found.experiment_id], "tags.`pipeline.stage` = 'tokenizer' AND "
                                                     "tags.`pipeline.tokenizer` = 'vqvae'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        sys.exit(f"error: experiment '{experiment}' has no VQ-VAE run")
    # the prior of the same pipeline run as that VQ-VAE, else the newest
    parent = runs[0].data.tags.get("mlflow.parentRunId")
    same = f" AND tags.`mlflow.parentRunId` = '{parent}'" if parent else ""
    priors = client.search_runs([found.experiment_id], "tags.`pipeline.stage` = 'prior'" + same,
                                order_by=["attributes.start_time DESC"], max_results=1)
    return found.experiment_id, runs[0], priors[0] if priors else None


def has_step_images(run, key):
    """Whether `run` logged images under `key` with steps (an image card with a slider)."""
    from mlflow.tracking import MlflowClient
    return any(Path(a.path).name.startswith(f"{key}+step+")
               for a in MlflowClient().list_artifacts(run.info.run_id, "images"))


# the pages

class Browser:
    def __init__(self, playwright, profile, base, out):
        self.base, self.out = base, out
        self.context = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True,
            viewport={"width": WIDTH, "height": 1000}, device_scale_factor=1)
        self.page = self.context.new_page()

    def open(self, route, wait_for_text, height=1000):
        """Open `route` in the Model training view, tall enough that MLflow renders every card
        (it draws cards only once scrolled to), and wait for `wait_for_text`."""
        self.page.set_viewport_size({"width": WIDTH, "height": height})
        sep = "&" if "?" in route else "?"
        self.page.goto(f"{self.base}/#{route}{sep}{ML_VIEW}")
        self.page.get_by_text(wait_for_text, exact=True).first.wait_for(timeout=120_000)
        close = self.page.get_by_role("button", name="Close", exact=True)  # the Assistant panel
        if close.count():
            close.first.click()
        self.page.wait_for_timeout(SETTLE_MS)

    def save(self, name, locator=None, clip=None):
        path = self.out / name
        if locator is not None:
            locator.screenshot(path=str(path))
        else:
            self.page.screenshot(path=str(path), clip=clip)
        print(path)
        return path


def main_panel(page, height):
    """The clip of the page right of the side bar, `height` pixels tall."""
    return {"x": 190, "y": 0, "width": WIDTH - 190, "height": height}


def shoot_runs_list(browser, experiment_id, parent_name):
    page = browser.page
    browser.open(f"/experiments/{experiment_id}/runs", parent_name, height=600)
    page.locator('button[data-component-id$="runnamecellrenderer.tsx_46"]').first.click()
    page.get_by_text("Expand rows").click()  # every dataset of a run, not "+1"
    handle = page.locator('.ag-header-cell:has-text("Run Name") .ag-header-cell-resize')
    if handle.count():  # widen the Run Name column so that names show whole
        box = handle.first.bounding_box()
        page.mouse.move(box["x"] + 2, box["y"] + box["height"] / 2)
        page.mouse.down()
        page.mouse.move(box["x"] + 120, box["y"] + box["height"] / 2, steps=5)
        page.mouse.up()
        page.mouse.move(5, 5)  # no header tooltip in the picture
    page.wait_for_timeout(SETTLE_MS)
    browser.save("runs_list.png", clip=main_panel(page, 470))


def shoot_overview(browser, experiment_id, run):
    page = browser.page
    browser.open(f"/experiments/{experiment_id}/runs/{run.info.run_id}", run.info.run_name,
                 height=1500)
    more = page.get_by_text("Show more", exact=True)
    if more.count():
        more.first.click()
        page.wait_for_timeout(1000)
    browser.save("vqvae_overview.png", clip=main_panel(page, 1250))


def shoot_slider(browser, experiment_id, run, key, name):
    """An image card with a step slider (a VQ-VAE's `reconstructions`, a prior's `samples`):
    the card as it opens (step 0: before training), and enlarged by dragging its corner (as the
    README says) at the last step, side by side in one PNG."""
    page = browser.page
    browser.open(f"/experiments/{experiment_id}/runs/{run.info.run_id}/model-metrics", key,
                 height=6000)  # below 25 metric charts
    card = page.locator('[data-testid="experiment-view-compare-runs-card"]',
                        has=page.get_by_text(key, exact=True)).first
    as_opened = card.screenshot()
    track = card.get_by_role("slider").first.locator("xpath=../..")  # the step slider
    box = track.bounding_box()
    page.mouse.click(box["x"] + box["width"] - 2, box["y"] + box["height"] / 2)  # last step
    resizable = page.locator(".react-resizable", has=page.get_by_text(key, exact=True)).first
    corner = resizable.locator(":scope > div").last  # the resize handle, after the card
    box = corner.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + 40, box["y"] + 600, steps=20)
    page.mouse.up()
    page.mouse.move(5, 5)
    page.wait_for_timeout(SETTLE_MS)
    enlarged = card.screenshot()
    parts = [Image.open(io.BytesIO(data)).convert("RGB") for data in (as_opened, enlarged)]
    joined = Image.new("RGB", (parts[0].width + 20 + parts[1].width,
                               max(p.height for p in parts)), "white")
    joined.paste(parts[0], (0, 0))
    joined.paste(parts[1], (parts[0].width + 20, 0))
    path = browser.out / name
    joined.save(path)
    print(path)


def shoot_models_tab(browser, experiment_id, dataset, metrics):
    """The experiment's Models tab: its logged models with their figures on the held-out
    `dataset` (the name its column group shows) — only `metrics` of them, and fewer attribute
    columns, so that the figures fit beside the models' names and versions."""
    page = browser.page
    browser.open(f"/experiments/{experiment_id}/models", "Models", height=700)
    page.get_by_text("Columns", exact=True).first.click()
    tree = page.locator(".du-bois-light-tree").first
    tree.wait_for()

    def node(title):
        return tree.locator(".du-bois-light-tree-treenode",
                            has=page.locator(".du-bois-light-tree-title", has_text=title)).first

    def toggle(title):
        node(title).locator(".du-bois-light-tree-checkbox").click()
        page.wait_for_timeout(300)

    for title in ("Status", "Logged from", "Dataset", "No dataset", "Parameters"):
        toggle(title)
    for other in tree.locator(".du-bois-light-tree-title", has_text="Dataset: ").all_inner_texts():
        if not other.startswith(f"Dataset: {dataset}"):
            toggle(other)
    toggle(f"Dataset: {dataset}")  # all of its metrics off, then the chosen ones on
    node(f"Dataset: {dataset}").locator(".du-bois-light-tree-switcher").click()
    page.wait_for_timeout(500)
    for metric in metrics:
        toggle(metric)
    page.keyboard.press("Escape")
    page.mouse.click(5, 690)
    page.wait_for_timeout(SETTLE_MS)
    browser.save("models_tab.png", clip=main_panel(page, 330))


def shoot_registered_model(browser, name):
    browser.open(f"/models/{name}", name, height=900)
    browser.page.get_by_text("Description", exact=True).first.click()  # collapsed at first
    browser.page.wait_for_timeout(SETTLE_MS)
    browser.save("registered_model.png", clip=main_panel(browser.page, 560))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="folder with the mlflow.db to show")
    parser.add_argument("--experiment", default="Default")
    parser.add_argument("--out", default=str(Path(__file__).parent / "screenshots"))
    parser.add_argument("--registered_model", help="also shoot this registered model's page")
    parser.add_argument("--heldout", help="also shoot the Models tab, with the figures on this "
                                          "held-out data set (as its name shows there, e.g. "
                                          "demo_data/heldout.csv)")
    args = parser.parse_args(argv)
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import sync_playwright
    store, out = Path(args.store).resolve(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
    experiment_id, vqvae_run, prior_run = find_runs(os.environ["MLFLOW_TRACKING_URI"],
                                                    args.experiment)
    parent_id = vqvae_run.data.tags.get("mlflow.parentRunId")
    parent_name = MlflowClient().get_run(parent_id).info.run_name if parent_id else None
    port = free_port()
    server = start_ui(store, port)
    try:
        with sync_playwright() as playwright, tempfile.TemporaryDirectory() as profile:
            browser = Browser(playwright, profile, f"http://127.0.0.1:{port}", out)
            if parent_name:
                shoot_runs_list(browser, experiment_id, parent_name)
            shoot_overview(browser, experiment_id, vqvae_run)
            shoot_slider(browser, experiment_id, vqvae_run, "reconstructions",
                         "reconstructions.png")
            if prior_run is not None and has_step_images(prior_run, "training_samples"):
                shoot_slider(browser, experiment_id, prior_run, "training_samples",
                             "prior_samples.png")
            if args.heldout:
                shoot_models_tab(browser, experiment_id, args.heldout, MODEL_METRICS)
            if args.registered_model:
                shoot_registered_model(browser, args.registered_model)
            browser.context.close()
    finally:
        stop_ui(server)


if __name__ == "__main__":
    main()
