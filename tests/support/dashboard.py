"""Drives the operator dashboard in headless Chromium (tests/dashboard.rs runs it).

Usage: python3 dashboard.py '<json>' where the JSON gives: base (the service's URL), token (the
admin token), screenshots (a folder for the PNGs), tenant, provider, mailbox, queues (their
names), sent (message_ids delivered), dead (the message_id in the send DLQ), recipient (one of
their recipients), reply (the Message-ID of an email that answers sent[0]), secrets (strings
the configuration page must not show), added (a tenant the last reload added).

Logs in through the form, visits every page, checks it shows the real data, replays the dead
letter from the DLQ page (accepting the confirmation) and saves a screenshot of each page.
Prints the screenshots' paths, one a line. Exits non-zero on the first failed check.
"""

import base64
import json
import math
import os
import shutil
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import Select, WebDriverWait

cfg = json.loads(sys.argv[1])
base = cfg["base"].rstrip("/")
shots = cfg["screenshots"]
os.makedirs(shots, exist_ok=True)

opts = webdriver.ChromeOptions()
opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
            "--window-size=1400,1000", "--no-first-run", "--disable-extensions"):
    opts.add_argument(arg)
driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
d = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
d.set_page_load_timeout(30)
saved = []


def shot(name):
    """A PNG of the whole page (beyond the window, up to 8,000 pixels down)."""
    metrics = d.execute_cdp_cmd("Page.getLayoutMetrics", {})
    size = metrics.get("cssContentSize") or metrics["contentSize"]
    clip = {"x": 0, "y": 0, "scale": 1, "width": math.ceil(size["width"]),
            "height": min(math.ceil(size["height"]), 8000)}
    png = d.execute_cdp_cmd("Page.captureScreenshot",
                            {"format": "png", "captureBeyondViewport": True, "clip": clip})
    path = os.path.join(shots, name + ".png")
    with open(path, "wb") as f:
        f.write(base64.b64decode(png["data"]))
    saved.append(path)


def check(ok, what):
    if not ok:
        raise AssertionError(f"{what}\nat {d.current_url}\n{d.page_source[:4000]}")


def body():
    return d.find_element(By.TAG_NAME, "body").text


def rows(css):
    return d.find_elements(By.CSS_SELECTOR, css)


def row_of(attr, value):
    """The table row whose `attr` attribute is `value` (compared in Python: no escaping)."""
    for r in rows(f"tr[{attr}]"):
        if r.get_attribute(attr) == value:
            return r
    return None


def wait(cond, what, timeout=15):
    try:
        WebDriverWait(d, timeout).until(lambda _: cond())
    except Exception:
        check(False, "timed out waiting for " + what)


def search_outbox(**fields):
    d.get(base + "/ui/outbox")
    for name, value in fields.items():
        if name == "status":
            Select(d.find_element(By.ID, "f-status")).select_by_value(value)
        else:
            el = d.find_element(By.ID, "f-" + name.replace("_", "-"))
            el.clear()
            el.send_keys(value)
    d.find_element(By.ID, "search").click()
    wait(lambda: "/ui/outbox?" in d.current_url, "the search")
    return [r.get_attribute("data-message-id") for r in rows("#outbox tr[data-message-id]")]


try:
    # Not logged in: every page sends to the login form.
    d.get(base + "/ui/outbox")
    check(d.current_url == base + "/login", "a page without the cookie goes to /login")
    shot("01-login")
    d.find_element(By.ID, "token").send_keys("not-the-token")
    d.find_element(By.ID, "login").click()
    wait(lambda: rows("#login-error"), "a wrong token to be refused")
    d.find_element(By.ID, "token").send_keys(cfg["token"])
    d.find_element(By.ID, "login").click()
    wait(lambda: d.current_url == base + "/", "the overview after logging in")
    c = d.get_cookie("mb_admin")
    check(c is not None and c.get("httpOnly") is True and c.get("sameSite") == "Strict",
          f"the session cookie is HttpOnly and SameSite=Strict: {c}")
    check(cfg["token"] not in c.get("value", ""), "the cookie is not the token itself")

    # Overview: queues (with charts filling) and providers.
    for q in cfg["queues"]:
        check(row_of("data-q", q) is not None, "queue row " + q)
    send = cfg["queues"][0]
    wait(lambda: int(row_of("data-q", send).find_element(By.CSS_SELECTOR, "svg.depth-chart")
                     .get_attribute("data-points")) >= 3, "three samples in the charts")
    prov = row_of("data-provider", cfg["provider"])
    check(prov is not None, "provider row")
    sent = int(prov.find_element(By.CSS_SELECTOR, ".sent").text)
    check(sent >= len(cfg["sent"]), f"the provider counted {sent} sent")
    check("ok" in prov.text, "the provider is ok")
    shot("02-overview")

    # Mailboxes: the list, its filters.
    d.get(base + "/ui/mailboxes")
    check(row_of("data-mailbox", cfg["mailbox"]) is not None, "mailbox row")
    Select(d.find_element(By.NAME, "tenant")).select_by_value(cfg["tenant"])
    d.find_element(By.ID, "filter").click()
    wait(lambda: "tenant=" in d.current_url, "the tenant filter")
    check(row_of("data-mailbox", cfg["mailbox"]) is not None, "mailbox row, tenant filter")
    check("last sync" in body(), "the last sync column")
    shot("03-mailboxes")
    Select(d.find_element(By.NAME, "status")).select_by_value("down")
    d.find_element(By.ID, "filter").click()
    wait(lambda: "status=down" in d.current_url, "the state filter")
    check(row_of("data-mailbox", cfg["mailbox"]) is None, "no down mailbox")

    # Outbox: search by tenant and recipient, by message_id, by status.
    found = search_outbox(tenant=cfg["tenant"], recipient=cfg["recipient"])
    for m in cfg["sent"] + [cfg["dead"]]:
        check(m in found, f"{m} found by tenant and recipient: {found}")
    check(search_outbox(recipient="nobody-at-all@example.org") == [], "an unknown recipient")
    found = search_outbox(message_id=cfg["sent"][0])
    check(found == [cfg["sent"][0]], f"found by message_id: {found}")
    shot("04-outbox")
    found = search_outbox(tenant=cfg["tenant"], status="failed")
    check(found == [cfg["dead"]], f"found by status: {found}")

    # One email's history: a sent one with its reply, the failed one with its error.
    search_outbox(message_id=cfg["sent"][0])
    d.find_element(By.LINK_TEXT, cfg["sent"][0]).click()
    wait(lambda: rows("#history"), "the email page")
    history = d.find_element(By.ID, "history").text
    check("received" in history and "sent" in history and "result published" in history,
          "the sent email's history")
    check(cfg["reply"] in d.find_element(By.ID, "replies").text, "the reply to it")
    shot("05-email-sent")
    search_outbox(message_id=cfg["dead"])
    d.find_element(By.LINK_TEXT, cfg["dead"]).click()
    wait(lambda: rows("#history"), "the email page")
    history = d.find_element(By.ID, "history").text
    check("failed" in history and "dead-lettered" in history and "550" in history,
          "the failed email's history")
    shot("06-email-failed")

    # Dead letters: browse, replay one (confirmed).
    d.get(base + "/ui/dlq")
    check(row_of("data-id", cfg["dead"]) is not None, "the dead letter's row")
    check("550" in body(), "its error")
    shot("07-dlq")
    for b in rows("button.replay-one"):
        if b.get_attribute("data-id") == cfg["dead"]:
            b.click()
            break
    else:
        check(False, "a replay button for " + cfg["dead"])
    WebDriverWait(d, 5).until(EC.alert_is_present())
    d.switch_to.alert.accept()
    wait(lambda: rows("#notice"), "the replay's notice")
    check(cfg["dead"] in d.find_element(By.ID, "replayed").text, "replayed " + cfg["dead"])
    shot("08-dlq-replayed")

    # Configuration: no secrets; the last reload's diff.
    d.get(base + "/ui/config")
    page = d.page_source
    check(cfg["tenant"] in page and cfg["provider"] in page, "the tenant and provider")
    check("***" in page, "secrets masked")
    for secret in cfg["secrets"]:
        check(secret not in page, "a secret on the configuration page")
    check(cfg["added"] in d.find_element(By.ID, "last-reload").text, "the last reload's diff")
    check(cfg["added"] in d.find_element(By.ID, "tenants").text, "the reloaded tenants")
    shot("09-config")

    # Log out: the cookie is gone.
    d.find_element(By.ID, "logout").click()
    wait(lambda: d.current_url == base + "/login", "the login form after logging out")
    d.get(base + "/")
    check(d.current_url == base + "/login", "logged out")
finally:
    for p in saved:
        print(p)
    d.quit()
