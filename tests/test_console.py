"""The web console at /ui in a real browser: Playwright driving Debian's Chromium against `tether serve`.

One router serves the module. Before it starts, 10,000 environment rows of another organization
("bulk") are written straight into its database, so the paging test costs a second, not a fleet of
registrations. Each test signs in in a fresh browser context (its own sessionStorage) and leaves a
screenshot of the page it checked under .ci/artifacts/.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import TETHER, Router, skip_or_fail, start_router
from tether.console import bundle
from tether.store.tables import environments, organizations

try:
    from playwright.sync_api import Browser, Page, Playwright, Response, expect, sync_playwright
except ImportError:  # the dev extra brings it; the browser tests say so rather than fail to import
    sync_playwright = None

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / ".ci" / "artifacts"
BULK_ROWS = 10_000
PAGE_ROWS = 50  # the console's default page
DASH = "\N{EN DASH}"  # the pager reads "1 (en dash) 50 of 10000"
MAX_PAGE = 200  # the largest page the API serves; the console must never ask for more
# Generous for a loaded 2-core machine; measured (see the report): first page ~0.3 s, re-sort ~0.2 s.
LOAD_WITHIN_MS = 5000
RESORT_WITHIN_MS = 3000


@dataclass
class Console:
    router: Router
    keys: dict[str, str]  # role or org -> key
    bulk_org_id: str
    devices: list[subprocess.Popen[bytes]] = field(default_factory=list)


def _seed_bulk(db_path: Path, org_id: str, now: int) -> None:
    """BULK_ROWS offline rows of one organization, written in one transaction (about a second)."""
    engine = sa.create_engine(f"sqlite:///{db_path}")
    rows = [
        {
            "id": f"env-bulk{i:05d}{uuid.uuid4().hex[:8]}",
            "org_id": org_id,
            "device_id": f"bulk-device-{i:05d}",
            "listener_instance_id": "",
            "connection_name": f"bulk-{i:05d}",
            "metadata": {"os": "linux", "lettaCodeVersion": "0.32.18", "workingDirectory": f"/srv/w{i % 97}"},
            "user_id": None,
            "first_seen_at": now - BULK_ROWS + i,
            "last_seen_at": now - BULK_ROWS + i,
        }
        for i in range(BULK_ROWS)
    ]
    with engine.begin() as conn:
        conn.execute(environments.insert(), rows)
    engine.dispose()


def _cli(env: dict[str, str], cwd: Path, *args: str) -> str:
    out = subprocess.run([*TETHER, *args], env=env, cwd=cwd, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    workdir = tmp_path_factory.mktemp("console")
    data_dir = workdir / ".tether"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env["TETHER_DATA_DIR"] = str(data_dir)
    _cli(env, workdir, "migrate")
    bulk_key = _cli(env, workdir, "keys", "create", "--org", "bulk", "--user", "bob")
    engine = sa.create_engine(f"sqlite:///{data_dir / 'tether.db'}")
    with engine.connect() as conn:
        bulk_org = conn.execute(sa.select(organizations.c.id).where(organizations.c.name == "bulk")).scalar()
    engine.dispose()
    assert isinstance(bulk_org, str)
    _seed_bulk(data_dir / "tether.db", bulk_org, int(time.time() * 1000))

    router = start_router(workdir, org="acme", user="alice")
    keys = {
        "member": router.key,
        "bulk": bulk_key,
        "admin": router.cli("keys", "create", "--org", "acme", "--user", "root", "--role", "admin")
        .stdout.strip()
        .splitlines()[-1],
        "readonly": router.cli("keys", "create", "--org", "acme", "--user", "viewer", "--role", "readonly")
        .stdout.strip()
        .splitlines()[-1],
        "globex": router.create_key("globex", "mallory"),
    }
    state = Console(router, keys, bulk_org)
    yield state
    for proc in state.devices:
        proc.terminate()
        proc.wait(10)
    router.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if sync_playwright is None:
        skip_or_fail("the playwright package is missing (pip install -e '.[dev]')")
    if not os.access(CHROMIUM, os.X_OK):
        skip_or_fail(f"{CHROMIUM} is missing (apt-get install -y chromium; .ci/run does it)")
    pw: Playwright = sync_playwright().start()
    chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield chromium
    chromium.close()
    pw.stop()


class Tab:
    """A fresh browser context on the console, recording page errors and the fleet-list answers."""

    def __init__(self, browser: Browser, base_url: str) -> None:
        self.context = browser.new_context(viewport={"width": 1500, "height": 900})
        self.page: Page = self.context.new_page()
        self.page.set_default_timeout(10_000)
        self.base_url = base_url
        self.errors: list[str] = []
        self.lists: list[tuple[str, int]] = []  # (request URL, rows in the answer)
        self.page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))
        self.page.on("console", self._console)
        self.page.on("response", self._response)

    def _console(self, message: Any) -> None:
        # A refused request (the bad key's 401, a read-only 403) is logged by Chromium itself; any other
        # error (an exception, a CSP violation) is a defect of the console.
        if message.type == "error" and "Failed to load resource" not in message.text:
            self.errors.append(message.text)

    def _response(self, response: Response) -> None:
        if "/v1/tether/environments?" in response.url and response.ok:
            self.lists.append((response.url, len(response.json()["items"])))

    def open(self, hash_: str = "") -> None:
        self.page.goto(f"{self.base_url}/ui{hash_}")

    def sign_in(self, key: str) -> None:
        self.page.fill("#key", key)
        self.page.click("#sign-in")

    def row(self, name: str) -> Any:
        return self.page.locator("#env-rows tr", has=self.page.locator("a.env-link", has_text=name))

    def confirm(self) -> None:
        dialog = self.page.locator("dialog#confirm")
        expect(dialog).to_be_visible()
        dialog.locator("#confirm-ok").click()
        expect(dialog).to_be_hidden()

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"console-{name}.png"), full_page=True)

    def close(self) -> None:
        self.context.close()
        assert not self.errors, self.errors


@pytest.fixture
def tab(browser: Browser, console: Console) -> Iterator[Tab]:
    t = Tab(browser, console.router.base_url)
    yield t
    t.close()


def _register(router: Router, key: str, name: str) -> dict[str, Any]:
    """A row with no socket behind it, as `letta server` leaves after registering (offline)."""
    body = {"deviceId": f"dev-{uuid.uuid4().hex[:8]}", "connectionName": name, "metadata": {"os": "linux"}}
    r = httpx.post(f"{router.base_url}/v1/environments/register", json=body, headers=router.headers(key))
    assert r.status_code == 200, r.text
    rows = httpx.get(
        f"{router.base_url}/v1/tether/environments", params={"q": name}, headers=router.headers(key)
    ).json()["items"]
    [row] = [r for r in rows if r["connectionName"] == name]
    return dict(row)


def _device(console: Console, key: str, name: str) -> subprocess.Popen[bytes]:
    """`tether device --name NAME`, the reference device, as a user runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env.update(LETTA_BASE_URL=console.router.base_url, LETTA_API_KEY=key)
    proc = subprocess.Popen(
        [*TETHER, "device", "--name", name, "--heartbeat", "1", "--turn-delay", "0"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    console.devices.append(proc)
    return proc


# --- the page and its assets over plain HTTP -------------------------------------------------------


def test_page_and_assets_carry_security_and_cache_headers(console: Console) -> None:
    base = console.router.base_url
    page = httpx.get(f"{base}/ui")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["cache-control"] == "no-cache"
    assert "<script>" not in page.text and " style=" not in page.text  # nothing inline for the CSP to allow
    assert httpx.get(f"{base}/ui", headers={"If-None-Match": page.headers["etag"]}).status_code == 304

    build = bundle().build
    assert f"/ui/assets/{build}/app.js" in page.text
    app_js = httpx.get(f"{base}/ui/assets/{build}/app.js")
    assert app_js.status_code == 200
    assert app_js.headers["content-type"].startswith("text/javascript")
    assert "immutable" in app_js.headers["cache-control"]
    stale = httpx.get(f"{base}/ui/assets/0000000000000000/app.js")  # a page of an older release
    assert stale.status_code == 200 and stale.headers["cache-control"] == "no-cache"
    missing = httpx.get(f"{base}/ui/assets/{build}/..%2Fapi%2Fconsole.py")
    assert missing.status_code == 404 and missing.json()["errorCode"] == "NOT_FOUND"
    assert httpx.get(f"{base}/").json()["console"] == "/ui"


def test_every_module_the_console_imports_is_packaged() -> None:
    assets = bundle().assets
    for name, asset in assets.items():
        if name.endswith(".js"):
            for imported in re.findall(r'from "\./([^"]+)"', asset.body.decode()):
                assert imported in assets, f"{name} imports {imported}, which is not in the package"
    for referenced in re.findall(r"/ui/assets/[0-9a-f]+/([\w.]+)", bundle().index.body.decode()):
        assert referenced in assets


# --- in the browser --------------------------------------------------------------------------------


def test_sign_in_refuses_a_bad_key_and_keeps_a_good_one_in_the_session_only(
    tab: Tab, console: Console
) -> None:
    tab.open()
    tab.sign_in("tk_0000000000000000_not-a-key")
    expect(tab.page.locator("#sign-in-error")).to_contain_text("That key was refused")
    expect(tab.page.locator("#top")).to_be_hidden()
    tab.shot("sign-in-refused")

    tab.sign_in(console.keys["member"])
    expect(tab.page.locator("#who-role")).to_have_text("member")
    expect(tab.page.locator("#who-org")).to_have_text("acme")
    expect(tab.page.locator("#env-table")).to_be_visible()
    expect(tab.page.locator("#nav-cluster")).to_be_hidden()  # not an admin
    assert console.keys["member"] not in tab.page.url
    assert tab.context.cookies() == []
    assert tab.page.evaluate("localStorage.length") == 0
    assert tab.page.evaluate("sessionStorage.getItem('tether.console.key')") == console.keys["member"]

    # A reload keeps the session; signing out forgets the key and shows the sign-in page again.
    tab.page.reload()
    expect(tab.page.locator("#who-role")).to_have_text("member")
    tab.page.click("#sign-out")
    expect(tab.page.locator("#key")).to_be_visible()
    assert tab.page.evaluate("sessionStorage.length") == 0


def test_a_device_appears_online_live_takes_a_message_and_reconnects_after_disconnect(
    tab: Tab, console: Console
) -> None:
    name = f"demo-{uuid.uuid4().hex[:6]}"
    tab.open()
    tab.sign_in(console.keys["member"])
    expect(tab.page.locator("#env-table")).to_be_visible()
    tab.page.evaluate("window.notReloaded = true")

    _device(console, console.keys["member"], name)
    row = tab.row(name)
    expect(row.locator(".state")).to_have_attribute("data-state", "online", timeout=10_000)
    assert tab.page.evaluate("window.notReloaded") is True  # it arrived by the live refresh
    tab.shot("environments")

    row.locator("a.env-link").click()
    expect(tab.page.locator("#env-title")).to_contain_text(name)
    expect(tab.page.locator("#env-title .state")).to_have_attribute("data-state", "online")
    expect(tab.page.locator("#env-history tr[data-event=connected]").first).to_be_visible()

    tab.page.fill("#msg-agent", "agent-console-test")
    tab.page.fill("#msg-text", "ping from the browser")
    tab.page.click("#send")
    tab.confirm()
    expect(tab.page.locator("#notice")).to_contain_text("Delivered")
    # The live trace shows the message going out to the device, with no content unless asked.
    sent = tab.page.locator("#trace-rows tr[data-type=message]")
    expect(sent.first).to_be_visible()
    expect(sent.first.locator("td.content")).to_have_text("")
    # Contents are recorded only from the first poll that asks for them on: that poll, then a message.
    with tab.page.expect_response(lambda r: "/trace?" in r.url and "contents=true" in r.url):
        tab.page.check("#trace-contents")
    expect(sent.first.locator("td.content")).to_have_text("not recorded (contents were off)")
    tab.page.fill("#msg-text", "shown with contents")
    tab.page.click("#send")
    tab.confirm()
    expect(tab.page.locator("#trace-rows tr[data-type=message] td.content").first).to_contain_text(
        "shown with contents"
    )

    connects = tab.page.locator("#env-history tr[data-event=connected]").count()
    tab.page.click("#disconnect")
    tab.confirm()
    expect(tab.page.locator("#notice")).to_contain_text("disconnected")
    expect(tab.page.locator("#env-history tr[data-event=disconnected]").first).to_be_visible()
    # The device answers the transient close by reconnecting on its own.
    expect(tab.page.locator("#env-history tr[data-event=connected]")).to_have_count(
        connects + 1, timeout=15_000
    )
    expect(tab.page.locator("#env-title .state")).to_have_attribute("data-state", "online", timeout=15_000)
    tab.shot("environment")


def test_forget_removes_the_row(tab: Tab, console: Console) -> None:
    name = f"ghost-{uuid.uuid4().hex[:6]}"
    ghost = _register(console.router, console.keys["member"], name)
    tab.open()
    tab.sign_in(console.keys["member"])
    tab.page.fill("#search", name)
    expect(tab.row(name)).to_have_count(1)
    tab.row(name).locator("a.env-link").click()
    expect(tab.page.locator("#env-title")).to_contain_text(name)
    expect(tab.page.locator("#send")).to_be_disabled()  # offline: only Forget is possible
    expect(tab.page.locator("#forget")).to_be_enabled()
    tab.page.click("#forget")
    tab.confirm()
    expect(tab.page.locator("#view-envs")).to_be_visible()
    tab.page.fill("#search", name)
    expect(tab.page.locator("#env-rows tr.empty")).to_have_text("No environments match.")
    gone = httpx.get(
        f"{console.router.base_url}/v1/tether/environments/{ghost['id']}",
        headers=console.router.headers(console.keys["member"]),
    )
    assert gone.status_code == 404


def test_a_read_only_key_sees_the_table_but_cannot_act(tab: Tab, console: Console) -> None:
    name = f"watched-{uuid.uuid4().hex[:6]}"
    _device(console, console.keys["member"], name)
    tab.open()
    tab.sign_in(console.keys["readonly"])
    expect(tab.page.locator("#who-role")).to_have_text("readonly")
    expect(tab.row(name).locator(".state")).to_have_attribute("data-state", "online", timeout=10_000)
    tab.row(name).locator("a.env-link").click()
    expect(tab.page.locator("#env-title")).to_contain_text(name)
    expect(tab.page.locator("#actions-why")).to_contain_text("read-only")
    for button in ("#send", "#disconnect", "#forget", "#apply-mode"):
        expect(tab.page.locator(button)).to_be_disabled()
    tab.shot("environment-readonly")
    # The buttons are only the console's courtesy: the API itself refuses the key.
    row_id = tab.page.url.rsplit("/", 1)[-1]
    status = tab.page.evaluate(
        """async (id) => (await fetch(`/v1/tether/environments/${id}/disconnect`, {method: "POST",
             headers: {Authorization: `Bearer ${sessionStorage.getItem("tether.console.key")}`}})).status""",
        row_id,
    )
    assert status == 403
    expect(tab.page.locator("#env-title .state")).to_have_attribute("data-state", "online")


def test_another_organizations_devices_never_appear(tab: Tab, console: Console) -> None:
    secret = f"globex-secret-{uuid.uuid4().hex[:6]}"
    theirs = _register(console.router, console.keys["globex"], secret)
    tab.open()
    tab.sign_in(console.keys["member"])
    expect(tab.page.locator("#env-rows tr").first).to_be_visible()
    page_text = tab.page.locator("#env-rows").inner_text()
    assert "globex" not in page_text and "bulk-" not in page_text
    tab.page.fill("#search", secret)
    expect(tab.page.locator("#env-rows tr.empty")).to_be_visible()
    tab.page.fill("#search", "bulk-0")
    expect(tab.page.locator("#env-rows tr.empty")).to_be_visible()
    assert all(count <= PAGE_ROWS for _, count in tab.lists)
    # Even by its id, the other organization's row is not found.
    tab.open(f"#/env/{theirs['id']}")
    expect(tab.page.locator("#status")).to_contain_text("not in your organization")


def test_the_cluster_and_teleports_pages(tab: Tab, console: Console) -> None:
    tab.open()
    tab.sign_in(console.keys["admin"])
    expect(tab.page.locator("#nav-cluster")).to_be_visible()
    tab.page.click("#nav-cluster")
    pod = tab.page.locator(f"#pod-rows tr[data-pod='{console.router.pod_id}']")
    expect(pod).to_contain_text("this pod")
    expect(pod.locator(".health.ok").first).to_have_text("ok")  # the database
    tab.shot("cluster")
    tab.page.click("#nav a[data-view=teleports]")
    expect(tab.page.locator("#view-teleports")).to_be_visible()
    expect(tab.page.locator("#status")).to_contain_text("refreshed")
    tab.shot("teleports")


def test_ten_thousand_rows_stay_responsive(tab: Tab, console: Console) -> None:
    tab.open()
    started = time.monotonic()
    tab.sign_in(console.keys["bulk"])
    expect(tab.page.locator("#range")).to_have_text(f"1{DASH}{PAGE_ROWS} of {BULK_ROWS}")
    load_ms = (time.monotonic() - started) * 1000
    expect(tab.page.locator("#counts [data-count=offline] strong")).to_have_text(str(BULK_ROWS))
    first = tab.page.locator("#env-rows tr").first.locator("a.env-link")
    expect(first).to_have_text(f"bulk-{BULK_ROWS - 1:05d}")  # newest first by default

    started = time.monotonic()
    tab.page.click("th[data-sort=name] button")
    expect(first).to_have_text("bulk-00000")
    resort_ms = (time.monotonic() - started) * 1000
    tab.page.click("#next")
    expect(first).to_have_text(f"bulk-{PAGE_ROWS:05d}")
    expect(tab.page.locator("#range")).to_have_text(f"{PAGE_ROWS + 1}{DASH}{2 * PAGE_ROWS} of {BULK_ROWS}")
    tab.page.fill("#search", "bulk-0999")
    expect(tab.page.locator("#range")).to_have_text(f"1{DASH}10 of 10")
    tab.shot("environments-10000")

    assert tab.page.locator("#env-rows tr").count() <= PAGE_ROWS
    assert tab.lists, "the console fetched no page"
    for url, count in tab.lists:
        limit = int(re.search(r"[?&]limit=(\d+)", url).group(1))  # type: ignore[union-attr]
        assert limit <= MAX_PAGE and count <= limit, url
    print(f"10,000 rows: first page in {load_ms:.0f} ms, re-sorted in {resort_ms:.0f} ms")
    assert load_ms < LOAD_WITHIN_MS
    assert resort_ms < RESORT_WITHIN_MS
