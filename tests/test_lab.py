"""JupyterLab as a user meets it, in a real browser: JupyterLab from the lab environment with the
options of `make lab`, on 127.0.0.1 with a token, driven by a headless Chromium (Debian's
chromium and chromium-driver, scripts/system-packages.sh; selenium from the dev extra). It opens
on notebooks/ at the repository root. Notebooks 01-03 run all their cells on the smoke preset as
committed, and 07 after a user's edit of its parameters cell (the smoke preset, one callosal
kind); each on the project's kernel, with no error, traceback or stderr output (progress as
tqdm's widgets), every figure rendered, then saved from the browser: the saved pair differs from
the committed one by the user's edit only, once git's filter has stripped the outputs.
Screenshots and the time of each notebook go to outputs/lab/.

The notebooks run in a copy of the repository's notebooks/ beside links to bilateral/ and params/
(so their outputs/ is a fresh folder, not the checkout's). Skips, saying why, where Chromium,
chromedriver, selenium, JupyterLab or the project's kernel is missing.
"""
from __future__ import annotations

import difflib
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from importlib.util import find_spec
from pathlib import Path

import nbformat
import pytest

from bilateral import pipeline
from test_notebooks import as_committed, strip_filter_installed

ROOT = Path(__file__).parents[1]
SHOTS = ROOT / "outputs" / "lab"
# figures each notebook draws on the smoke preset (07: its comparison and one traffic figure for
# each of the 2 conditions' callosal run)
FIGURES = {"01_data": 2, "02_hemispheres": 2, "03_bilateral": 2, "07_callosum": 3}
# what the user types at the end of 07's parameters cell: the smoke preset with a callosal kind,
# on conditions A and D (the pyramid and k-WTA; half the callosal runs of all four)
EDIT = {"07_callosum": ['params_file = "params/smoke.yaml"',
                        'overrides = {"callosum_kinds": ["add"], "conditions": ["A", "D"]}']}
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1400,1000")


def missing() -> str:
    """Why the browser test cannot run here ('' when it can)."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        return ("no chromium/chromedriver: apt-get install chromium chromium-driver "
                "(scripts/system-packages.sh, as root)")
    for module, where in (("selenium", ".[dev]"), ("jupyterlab", ".[notebook]")):
        if find_spec(module) is None:
            return f"{module} is not installed: `make lab` (pip install -e '{where}')"
    from jupyter_client.kernelspec import KernelSpecManager
    if pipeline.KERNEL not in KernelSpecManager().find_kernel_specs():
        return f'the kernel "{pipeline.KERNEL_DISPLAY}" is not registered: `make lab` registers it'
    return ""


def make_lab_args() -> list[str]:
    """The options `make lab` starts JupyterLab with (the Makefile's lab recipe)."""
    recipe = re.search(r"^lab:.*\n\t.*jupyter lab(.*)$", (ROOT / "Makefile").read_text(), re.M)
    return shlex.split(recipe.group(1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """A JupyterLab server on a copy of the notebooks, and a headless Chromium on it."""

    def __init__(self, tmp: Path):
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
        self.root = tmp / "repo"
        (self.root / "notebooks").mkdir(parents=True)
        for name in ("bilateral", "params"):
            (self.root / name).symlink_to(ROOT / name)
        for f in (ROOT / "notebooks").iterdir():
            if f.suffix in (".ipynb", ".py", ".toml"):
                shutil.copy2(f, self.root / "notebooks" / f.name)
        self.token, self.port = secrets.token_hex(16), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k != "JUPYTER_PATH"}
        env.update({k: str(tmp / d) for k, d in (
            ("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_RUNTIME_DIR", "runtime"),
            ("JUPYTERLAB_SETTINGS_DIR", "settings"), ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"))})
        news = tmp / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
        news.parent.mkdir(parents=True)
        news.write_text('{"fetchNews": "false"}')  # no "get notified about news?" toast (offline)
        self.log = open(tmp / "jupyterlab.log", "w")
        self.server = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", *make_lab_args(), "--no-browser",
             "--ip=127.0.0.1", f"--port={self.port}", "--port-retries=0",
             f"--IdentityProvider.token={self.token}", "--allow-root",
             "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
            env=env, cwd=self.root, stdout=self.log, stderr=subprocess.STDOUT)
        self.driver = None
        deadline = time.time() + 90
        while True:
            try:
                self.api("GET", "/api/status")
                break
            except OSError:
                if self.server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"JupyterLab did not start: {(tmp / 'jupyterlab.log').read_text()[-2000:]}")
                time.sleep(0.5)
        opts = Options()
        opts.binary_location = shutil.which("chromium")
        for flag in (*CHROME_FLAGS, f"--user-data-dir={tmp / 'chromium'}"):
            opts.add_argument(flag)
        self.driver = webdriver.Chrome(options=opts, service=Service(shutil.which("chromedriver")))
        self.driver.set_page_load_timeout(60)

    def api(self, method, path):
        req = urllib.request.Request(self.url + path, method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
        return json.loads(body) if body else None

    def js(self, script, *args):
        return self.driver.execute_script(script, *args)

    def wait(self, what, test, timeout):
        deadline = time.time() + timeout
        while not (value := test()):
            if time.time() > deadline:
                raise TimeoutError(f"{what} after {timeout}s")
            time.sleep(0.25)
        return value

    def click_menu(self, menu: str, command: str):
        from selenium.webdriver.common.by import By
        item = next(e for e in self.driver.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-item")
                    if e.text.strip() == menu)
        item.click()
        entry = self.wait(f"menu item {command}", lambda: [
            e for e in self.driver.find_elements(By.CSS_SELECTOR, f'.lm-Menu-item[data-command="{command}"]')
            if e.is_displayed()], 10)[0]
        entry.click()

    def status(self) -> dict:
        return self.js("""
            const q = s => [...document.querySelectorAll(s)];
            const ind = document.querySelector('.jp-Notebook-ExecutionIndicator');
            return {
              kernel: (document.querySelector('.jp-Toolbar-kernelName') || {}).textContent || '',
              bar: q('.jp-StatusBar-TextItem').map(e => e.textContent).join(' | '),
              indicator: ind ? ind.getAttribute('data-status') : null,
              running: q('.jp-InputArea-prompt').some(e => e.textContent.includes('*')),
            };""")

    def landing(self) -> dict:
        """What a user sees first: the file browser's folder and what it lists."""
        from selenium.webdriver.common.by import By
        self.driver.get(f"{self.url}/?token={self.token}")
        items = lambda: [e.text for e in self.driver.find_elements(  # noqa: E731
            By.CSS_SELECTOR, ".jp-DirListing-itemText") if e.text]
        # the listing fills in over several renders (once it held only 02_hemispheres.ipynb):
        # wait until it holds every notebook of the folder, or say what it held
        want = {p.name for p in (ROOT / "notebooks").glob("*.ipynb")}
        def complete():
            got = items()
            return got if want <= set(got) else None
        try:
            listed = self.wait("the file browser listing every notebook", complete, 60)
        except TimeoutError:
            listed = items()
        crumbs = self.driver.find_element(By.CSS_SELECTOR, ".jp-BreadCrumbs").text
        self.driver.save_screenshot(str(SHOTS / "landing.png"))
        return dict(url=self.driver.current_url.split("?")[0], folder=crumbs, listed=listed)

    def run_notebook(self, name: str) -> dict:
        """Open notebooks/NAME.ipynb, type the user's edit, Run All, wait for the end, save."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys
        t0 = time.perf_counter()
        self.driver.get(f"{self.url}/lab/tree/notebooks/{name}.ipynb?reset&token={self.token}")
        self.wait("a started kernel", lambda: (s := self.status())["kernel"].strip() not in
                  ("", "No Kernel") and "Idle" in s["bar"], 90)
        if name in EDIT:  # a user's edit: a line at the end of the parameters cell
            editor = self.driver.find_elements(By.CSS_SELECTOR, ".jp-CodeCell .cm-content")[0]
            editor.click()
            editor.send_keys(Keys.CONTROL, Keys.END)
            for line in EDIT[name]:
                editor.send_keys(Keys.ENTER, line)
            editor.send_keys(Keys.ESCAPE)
        self.click_menu("Run", "runmenu:run-all")
        seen_busy, idle = False, 0
        deadline = time.time() + 240
        while idle < 2:  # idle twice in a row after busy was seen
            if time.time() > deadline:
                raise TimeoutError(f"{name}: still running after 240s: {self.status()}")
            s = self.status()
            if s["indicator"] == "busy" or s["running"]:
                seen_busy, idle = True, 0
            elif seen_busy and s["indicator"] == "idle":
                idle += 1
            time.sleep(0.5)
        ran = time.perf_counter() - t0
        status = self.status()  # now: once its kernel is shut down below, the bar says No Kernel
        found = self.js("""
            const q = s => [...document.querySelectorAll(s)];
            const imgs = q('.jp-OutputArea-output img');
            if (imgs.length) imgs[imgs.length - 1].scrollIntoView();
            return {
              stderr: q('.jp-RenderedText[data-mime-type="application/vnd.jupyter.stderr"]')
                        .map(e => e.textContent.slice(0, 500)),
              text: q('.jp-OutputArea-output').map(e => e.textContent).join('\\n'),
              images: imgs.map(i => i.complete && i.naturalWidth > 0),
              cells: q('.jp-CodeCell').length,
            };""")
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(SHOTS / f"{name}.png"))
        path = self.root / "notebooks" / f"{name}.ipynb"
        saved_at = path.stat().st_mtime
        self.click_menu("File", "docmanager:save")  # jupytext writes the .py in the same save
        self.wait(f"{name} saved", lambda: path.stat().st_mtime > saved_at and not self.js(
            "return document.querySelector('.lm-TabBar-tab.jp-mod-dirty') !== null"), 30)
        for session in self.api("GET", "/api/sessions"):  # shut its kernel down
            self.api("DELETE", f"/api/sessions/{session['id']}")
        outputs = [o for c in nbformat.read(path, 4).cells for o in c.get("outputs", [])]
        saved = dict(widgets=sum("application/vnd.jupyter.widget-view+json" in o.get("data", {})
                                 for o in outputs),
                     stderr_streams=sum(o.get("name") == "stderr" for o in outputs))
        return dict(status=status, seconds=ran, **found, **saved)

    def close(self):
        if self.driver is not None:
            self.driver.quit()
        self.server.terminate()
        try:
            self.server.wait(20)
        except subprocess.TimeoutExpired:
            self.server.kill()
        self.log.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    why = missing()
    if why:
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("lab")
    SHOTS.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    lab = Lab(tmp)
    started = time.perf_counter() - t0
    try:
        runs = {"landing": lab.landing()}
        for name in FIGURES:
            try:
                runs[name] = lab.run_notebook(name)
            except Exception as e:  # noqa: BLE001 - reported by that notebook's test
                runs[name] = dict(failure=f"{type(e).__name__}: {e}")
                lab.driver.save_screenshot(str(SHOTS / f"{name}-failed.png"))
        total = time.perf_counter() - t0
        lines = [f"JupyterLab + Chromium started in {started:.0f}s"] + [
            f"{n}: {runs[n].get('seconds', float('nan')):.0f}s" for n in FIGURES] + [f"total {total:.0f}s"]
        (SHOTS / "timings.txt").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        yield lab, runs
    finally:
        lab.close()


def test_make_lab_opens_on_the_notebooks_at_the_repository_root(lab):
    _, runs = lab
    landing = runs["landing"]
    assert landing["url"].endswith("/lab/tree/notebooks")
    # the file browser in notebooks/, one click below the root (outputs/, results/)
    assert landing["folder"].replace(" ", "").strip("/") == "notebooks", landing["folder"]
    assert "01_data.ipynb" in landing["listed"]


@pytest.mark.parametrize("name", list(FIGURES))
def test_runs_on_the_project_kernel_without_errors_and_draws_every_figure(lab, name):
    _, runs = lab
    r = runs[name]
    assert "failure" not in r, r.get("failure")
    assert r["status"]["kernel"].strip() == pipeline.KERNEL_DISPLAY
    assert "not the project's" not in r["text"]  # the notebook knows its kernel
    assert r["stderr"] == []  # no error, traceback or warning (tqdm's included)
    assert "Traceback" not in r["text"] and "PosixPath(" not in r["text"]
    assert r["images"] == [True] * FIGURES[name], f"{len(r['images'])} images, rendered: {r['images']}"
    assert r["stderr_streams"] == 0  # nothing on stderr while training, even in the saved file
    if name == "02_hemispheres":  # it trains: one progress widget per epoch of each run
        assert r["widgets"] >= 16
    if name == "07_callosum":
        assert "callosal kinds add at" in r["text"]


@pytest.mark.parametrize("name", list(FIGURES))
def test_a_save_from_the_browser_changes_only_what_the_user_changed(lab, name):
    box, runs = lab
    assert "failure" not in runs[name], runs[name].get("failure")
    if not strip_filter_installed():
        pytest.skip("nbstripout is not this checkout's git filter for notebooks: `make lab` installs it")
    saved, committed = box.root / "notebooks" / name, ROOT / "notebooks" / name
    py_diff = [line for line in difflib.unified_diff(
        committed.with_suffix(".py").read_text().splitlines(),
        saved.with_suffix(".py").read_text().splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert py_diff == [f"+{line}" for line in EDIT.get(name, [])]
    # the .ipynb, outputs and all, commits as it was but for the edit
    after = nbformat.reads(as_committed(committed.with_suffix(".ipynb"), saved.with_suffix(".ipynb")), 4)
    before = nbformat.reads(as_committed(committed.with_suffix(".ipynb")), 4)
    if name in EDIT:
        params = next(c for c in before.cells if "parameters" in c.metadata.get("tags", []))
        params.source += "".join("\n" + line for line in EDIT[name])
    assert nbformat.writes(after) == nbformat.writes(before)
