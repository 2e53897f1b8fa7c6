"""The search web UI in a real headless Chromium: type a query, submit, wait for the result images to load,
save a screenshot to tests/artifacts/webui.png.

    python -m pytest tests/test_webui.py -q          # needs Debian's `chromium` (CI's .ci/run installs it)

Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe: JSON messages separated by NUL
on file descriptors 3 and 4), so no selenium/webdriver dependency. Set CHROME_BIN to use another binary.
"""
import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_fixtures import REPO, make_export, write_images, write_split_image  # noqa: E402

sys.path.insert(0, str(REPO))
from search.api import Searcher  # noqa: E402
from search.engine import TextEncoder  # noqa: E402
from search.enroll import get_args_parser, run_enrolment  # noqa: E402
from search.enroll_by_onnx import OnnxEnrolEncoder  # noqa: E402
from search.webui import make_server, serve_in_thread  # noqa: E402

ARTIFACT = REPO / "tests" / "artifacts" / "webui.png"
CHROME_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chrome():
    env = os.environ.get("CHROME_BIN")
    if env:
        return env if shutil.which(env) or os.path.isfile(env) else None
    for name in CHROME_CANDIDATES:
        p = shutil.which(name)
        if p:
            return p
    return None


class CDP:
    """Minimal Chrome DevTools Protocol client over --remote-debugging-pipe."""

    def __init__(self, chrome, user_data_dir, log_path):
        cmd_r, cmd_w = os.pipe()  # we write commands -> chromium reads fd 3
        ev_r, ev_w = os.pipe()  # chromium writes fd 4 -> we read
        # move the child's ends above fd 10 so dup2 onto 3/4 cannot clobber one another
        child_r, child_w = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10), fcntl.fcntl(ev_w, fcntl.F_DUPFD, 10)
        os.close(cmd_r)
        os.close(ev_w)

        def setup_fds():
            os.dup2(child_r, 3)
            os.dup2(child_w, 4)

        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--no-proxy-server", "--no-default-browser-check",
                 "--window-size=1200,900", f"--user-data-dir={user_data_dir}", "--remote-debugging-pipe",
                 "about:blank"]
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen([chrome, *flags], stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, preexec_fn=setup_fds, close_fds=False)
        os.close(child_r)
        os.close(child_w)
        self.w, self.r = cmd_w, ev_r
        self.buf, self.next_id, self.log_path = b"", 0, log_path

    def _recv(self, deadline):
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from chromium")
            ready, _, _ = select.select([self.r], [], [], left)
            if ready:
                chunk = os.read(self.r, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium exited; its log: " + Path(self.log_path).read_text(errors="replace")[-2000:])
                self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method, params=None, session=None, timeout=30):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        while data:
            data = data[os.write(self.w, data):]
        deadline = time.monotonic() + timeout
        while True:
            m = self._recv(deadline)
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})

    def eval(self, session, expr):
        r = self.call("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session)
        if "exceptionDetails" in r:
            raise RuntimeError(f"page script failed: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, session, expr, timeout=30, what=""):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = self.eval(session, expr)
            if v:
                return v
            time.sleep(0.1)
        raise TimeoutError(f"timed out waiting for {what or expr}")

    def close(self):
        try:
            self.call("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - already gone
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self.w, self.r):
            try:
                os.close(fd)
            except OSError:
                pass
        self.log.close()


@pytest.fixture()
def web(tmp_path):
    export = make_export(tmp_path / "export")
    imgs = tmp_path / "imgs"
    write_images(imgs, ("red", "green", "blue", "yellow", "purple"), size=(60, 120))
    write_split_image(imgs / "street/cam1.png", "red", "blue", size=(160, 120))
    boxes = {"street/cam1.png": [[10, 10, 70, 115], [90, 5, 150, 110]]}
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    prefix = tmp_path / "coll" / "p"
    # whole images, then the boxes of the street frame into the same collection (append)
    for extra in ([], ["--boxes", str(tmp_path / "boxes.json")]):
        a = get_args_parser().parse_args(["--image-dir", str(imgs), "--output-prefix", str(prefix), *extra])
        a.model_dir, a.image_model = str(export), None
        run_enrolment(a, OnnxEnrolEncoder(a), log=lambda m: None)
    s = Searcher(TextEncoder(str(export)), f"{prefix}_features.npy", image_root=str(imgs), log=lambda m: None)
    srv = make_server(s, str(imgs), "127.0.0.1", 0, quiet=True)
    serve_in_thread(srv)
    yield f"http://127.0.0.1:{srv.server_address[1]}/"
    srv.shutdown()
    srv.server_close()


def test_webui_in_headless_chromium(web, tmp_path):
    chrome = find_chrome()
    assert chrome, ("chromium not found: install it (Debian: apt-get install -y chromium chromium-driver; "
                    "CI's .ci/run does this) or set CHROME_BIN")
    cdp = CDP(chrome, tmp_path / "chrome-profile", tmp_path / "chrome.log")
    try:
        target = cdp.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = cdp.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        cdp.call("Page.enable", session=sid)
        cdp.call("Page.navigate", {"url": web}, session=sid)
        cdp.wait_for(sid, f"location.href === {json.dumps(web)} && document.readyState === 'complete' "
                          "&& !!document.querySelector('#q')", what="the search page")
        # type the query like a user: focus the box, insert text, press Enter (implicit form submission)
        cdp.eval(sid, "document.querySelector('#q').focus()")
        cdp.call("Input.insertText", {"text": "r"}, session=sid)
        assert cdp.eval(sid, "document.querySelector('#q').value") == "r"
        for kind in ("keyDown", "keyUp"):
            cdp.call("Input.dispatchKeyEvent", {"type": kind, "key": "Enter", "code": "Enter", "text": "\r",
                                                "windowsVirtualKeyCode": 13, "nativeVirtualKeyCode": 13},
                     session=sid)
        n = cdp.wait_for(sid, "(() => { const im = [...document.querySelectorAll('#results img')];"
                              " return im.length > 0 && im.every(i => i.complete && i.naturalWidth > 0)"
                              " ? im.length : 0; })()", what="loaded result images")
        assert n == 8  # the default top 10 of an 8-entry gallery (6 whole images + 2 boxes)
        assert "q=r" in cdp.eval(sid, "location.search")
        status = cdp.eval(sid, "document.querySelector('#status').textContent")
        assert "search completed in" in status
        first = cdp.eval(sid, "document.querySelector('#results figure figcaption').textContent")
        assert first.startswith("1. Score:") and ("red.png" in first or "BBox: [10, 10, 70, 115]" in first), first
        shot = cdp.call("Page.captureScreenshot", {"format": "png"}, session=sid)["data"]
        ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
        ARTIFACT.write_bytes(base64.b64decode(shot))
        assert ARTIFACT.stat().st_size > 1000
    finally:
        cdp.close()
