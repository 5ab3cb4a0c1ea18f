"""The Idempotency Log page (SPEC §8) in a real browser: Playwright driving Debian's chromium.

Run by tests/it/log_page.rs, which starts the real gateway, makes the records by real
requests and an `idem run` flow, and passes what it made in a JSON file (--records). Every
action taken in the page is followed by a check of the store through the admin API.
Prints one line per check; exits non-zero on the first failure, with a screenshot.
"""

import argparse
import json
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from playwright.sync_api import Page, expect, sync_playwright

CHROMIUM = "/usr/bin/chromium"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--admin", required=True, help="the admin listener, http://HOST:PORT")
    parser.add_argument("--gateway", required=True, help="the gateway's client listener")
    parser.add_argument("--token", required=True, help="the admin token the gateway was given")
    parser.add_argument("--records", required=True, help="JSON file: what the Rust test made")
    parser.add_argument("--screenshots", required=True, help="where the list and detail PNGs go")
    args = parser.parse_args()
    made = json.loads(Path(args.records).read_text())
    shots = Path(args.screenshots)
    shots.mkdir(parents=True, exist_ok=True)
    api = Api(args.admin, args.token)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            desktop = Check(browser.new_page(viewport={"width": 1280, "height": 900}), shots)
            desktop.run(lambda page: session(page, args, made, api, shots))
            phone = Check(browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True), shots)
            phone.run(lambda page: phone_width(page, args, made, shots))
        finally:
            browser.close()
    print("log page: every check passed")


class Check:
    """Runs one page's checks; on a failure, saves what the page showed and fails loudly."""

    def __init__(self, page: Page, shots: Path):
        self.page = page
        self.shots = shots
        self.errors: list[str] = []
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))

    def run(self, checks) -> None:
        try:
            checks(self.page)
        except Exception:
            path = self.shots / "failure.png"
            self.page.screenshot(path=str(path), full_page=True)
            print(f"FAILED at {self.page.url}; screenshot {path}", file=sys.stderr)
            raise
        # A 401 before the token is entered is the prompt working, not an error.
        unexpected = [e for e in self.errors if "401" not in e]
        assert not unexpected, f"the page logged errors: {unexpected}"


class Api:
    """The admin API, to check the store after each action in the page."""

    def __init__(self, base: str, token: str):
        self.base = base
        self.token = token

    def get(self, path: str):
        request = urllib.request.Request(self.base + path, headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    def record(self, record: dict):
        quote = urllib.parse.quote
        path = f"/v1/records/{quote(record['scope'], safe='')}/{quote(record['key'], safe='')}"
        return self.get(f"{path}?tenant={quote(record['tenant'], safe='')}")


def ok(what: str) -> None:
    print(f"ok      {what}", flush=True)


def rows(page: Page):
    return page.locator("#list tbody tr")


def session(page: Page, args, made: dict, api: Api, shots: Path) -> None:
    page.goto(args.admin + "/")
    token_prompt(page, args.token)
    sent = []
    page.on("request", lambda r: "/v1/" in r.url and sent.append(r))
    list_view(page, made, api, shots)
    filters(page, made)
    pagination(page, made)
    escaping(page, made)
    details(page, made, api, shots)
    counters(page, args, api)
    actions(page, made, api)
    keyboard(page, made)
    labelled(page)
    assert sent, "the page called the admin API"
    for request in sent:
        assert request.headers.get("authorization") == f"Bearer {args.token}", f"{request.url} without the token"
        assert "cookie" not in request.headers, f"{request.url} carried a cookie"
    assert page.context.cookies() == [], "the page set cookies"
    ok(f"every one of {len(sent)} API calls carried the bearer token and no cookie")
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("Admin token")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0
    ok("Sign out forgets the token and asks again")


def token_prompt(page: Page, token: str) -> None:
    field = page.get_by_label("Admin token")
    expect(field).to_be_visible()
    expect(page.locator("#main")).to_be_hidden()
    field.fill("not-the-token")
    field.press("Enter")
    expect(page.get_by_role("alert")).to_contain_text("refused")
    expect(page.locator("#main")).to_be_hidden()
    ok("the page asks for the token and refuses a wrong one")
    field.fill(token)
    page.get_by_role("button", name="Use token").click()
    expect(page.locator("#main")).to_be_visible()
    expect(field).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('idem.admin-token')") == token
    page.reload()
    expect(page.locator("#main")).to_be_visible()
    expect(page.get_by_label("Admin token")).to_be_hidden()
    ok("the token is kept for the browser session (sessionStorage)")


def list_view(page: Page, made: dict, api: Api, shots: Path) -> None:
    status, everything = api.get("/v1/records?limit=50")
    assert status == 200
    expected = [r["key"] for r in everything["records"]]
    expect_keys(page, expected)
    headers = [h.strip() for h in page.locator("#list thead th").all_text_contents()]
    assert headers == ["Scope", "Tenant", "Key", "Status", "Answer status", "Attempts", "Replays", "Created",
                       "Expires"], headers
    first = everything["records"][0]
    cells = rows(page).first.locator("td, th")
    assert cells.nth(0).text_content() == first["scope"]
    created = cells.nth(7).locator("time")
    assert created.get_attribute("datetime") == first["created_at"]
    assert created.get_attribute("title").endswith(" UTC"), created.get_attribute("title")
    ok(f"the list shows all {len(expected)} records newest first, times local with UTC on hover")
    counts = page.locator("#counts")
    status, stats = api.get("/v1/stats")
    orders = stats["scopes"]["orders"]
    cell = counts.get_by_role("link", name=f"{orders['completed']} completed in orders")
    expect(cell).to_be_visible()
    expect(counts.locator("tfoot")).to_contain_text(str(stats["total"]))
    ok("counts by scope and status match /v1/stats")
    page.screenshot(path=str(shots / "log-page-list.png"), full_page=True)


def apply(page: Page, scope="", tenant="", status="", key_prefix="", per_page="50") -> None:
    page.get_by_label("Scope").fill(scope)
    page.get_by_label("Tenant").fill(tenant)
    page.get_by_label("Status").select_option(status)
    page.get_by_label("Key prefix").fill(key_prefix)
    page.get_by_label("Per page").select_option(per_page)
    page.get_by_role("button", name="Filter").click()


def expect_keys(page: Page, keys: list[str]) -> None:
    """Waits until the list shows exactly these keys, in this order."""
    expect(page.locator("#list tbody a[data-key]")).to_have_text(keys)


def filters(page: Page, made: dict) -> None:
    runner = made["runner_step"]
    apply(page, scope=runner["scope"])
    expect_keys(page, made["runner_keys"])
    ok(f"Scope {runner['scope']} lists only that runner step's records")
    apply(page, tenant="globex")
    expect_keys(page, [made["other_tenant"]["key"]])
    ok("Tenant globex lists only that tenant's record")
    apply(page, status="outcome_unknown")
    expect_keys(page, [r["key"] for r in reversed(made["unknown"])])
    ok("Status outcome_unknown lists only the unknown outcomes")
    apply(page, key_prefix="inv-")
    expect_keys(page, list(reversed(made["inv_keys"])))
    ok("Key prefix inv- lists only keys starting with it")
    apply(page, scope="orders", tenant="acme", status="completed", key_prefix="inv-")
    expect_keys(page, [made["gateway"]["key"]])
    assert "scope=orders" in page.url and "tenant=acme" in page.url, page.url
    ok("the four filters combine, and the URL keeps them")
    page.get_by_role("button", name="Clear").click()
    expect(page.get_by_label("Scope")).to_have_value("")


def pagination(page: Page, made: dict) -> None:
    bulk = made["bulk_keys"]
    calls = []
    page.on("request", lambda r: "/v1/records?" in r.url and calls.append(r.url))
    apply(page, key_prefix="bulk-", per_page="10")
    first_page, second_page = bulk[:10], bulk[10:]
    expect_keys(page, first_page)
    page.get_by_role("button", name="Next page").click()
    expect_keys(page, second_page)
    expect(page.get_by_role("button", name="Next page")).to_be_disabled()
    assert "cursor=" in calls[-1], calls
    assert all("limit=10" in url for url in calls[-2:]), calls
    page.get_by_role("button", name="Previous page").click()
    expect_keys(page, first_page)
    ok(f"pages of 10 follow the API's cursor: {len(first_page)} + {len(second_page)} records")
    page.get_by_role("button", name="Clear").click()


def escaping(page: Page, made: dict) -> None:
    key = made["script_key"]
    apply(page, key_prefix="<script>")
    link = page.get_by_role("link", name=key, exact=True)
    expect(link).to_be_visible()
    assert link.text_content() == key
    assert page.locator("#list script").count() == 0
    assert page.evaluate("window.__pwned") is None, "markup from a key ran"
    link.click()
    expect(page.locator("#detail-title")).to_have_text(key)
    body = page.locator(".body pre")
    expect(body).to_contain_text(made["markup_in_body"])
    assert page.locator("#detail-body img, #detail-body script").count() == 0
    assert page.evaluate("window.__pwned") is None, "markup from a body ran"
    ok("a key and a body holding markup are shown as text, never run")
    page.go_back()
    page.get_by_role("button", name="Clear").click()


def open_record(page: Page, record: dict) -> None:
    page.goto(page.url.split("#")[0] + "#/record?" + urllib.parse.urlencode(
        {"scope": record["scope"], "tenant": record["tenant"], "key": record["key"]}))
    expect(page.locator("#detail-title")).to_have_text(record["key"])


def fact(page: Page, name: str):
    return page.locator("#detail .facts div").filter(has=page.locator("dt", has_text=re.compile(f"^{name}$"))).locator("dd")


def details(page: Page, made: dict, api: Api, shots: Path) -> None:
    gateway = made["gateway"]
    apply(page, scope="orders", key_prefix=gateway["key"])
    page.get_by_role("link", name=gateway["key"], exact=True).click()
    _, record = api.record(gateway)
    expect(fact(page, "Fingerprint")).to_have_text(record["fingerprint"])
    expect(fact(page, "Tenant")).to_have_text("acme")
    expect(fact(page, "Status")).to_have_text("completed")
    expect(fact(page, "Attempts")).to_have_text("1")
    expect(fact(page, "Replays")).to_have_text(str(record["replay_count"]))
    expect(fact(page, "Lease")).to_have_text("none")
    expect(fact(page, "Correlation id")).to_have_text(record["correlation_id"] or "—")
    expect(fact(page, "Answer status")).to_have_text("201")
    assert fact(page, "Created").locator("time").get_attribute("title").endswith(" UTC")
    expect(page.locator("#detail .headers")).to_contain_text("content-type")
    expect(page.locator(".body p")).to_contain_text("JSON")
    stored = json.loads(record["response"]["body"])
    expect(page.locator(".body pre")).to_contain_text(f'"id": "{stored["id"]}"')
    expect(page.get_by_role("button", name="Forget")).to_be_visible()
    expect(page.get_by_role("button", name="Release")).to_have_count(0)
    expect(page.get_by_role("button", name="Mark completed")).to_have_count(0)
    ok("a gateway record's detail: fingerprint, times, lease, attempts, stored answer as JSON")
    page.screenshot(path=str(shots / "log-page-detail.png"), full_page=True)

    failed = made["failed"]
    open_record(page, failed)
    expect(fact(page, "Status")).to_have_text("failed retryable")
    expect(fact(page, "Error summary")).not_to_have_text("—")
    ok("a failed record's detail shows its error summary")

    step = made["runner_step"]
    open_record(page, step)
    captured = page.locator("#detail .captures")
    for name, value in step["captures"].items():
        expect(captured.locator("tr", has=page.locator("th", has_text=name))).to_contain_text(str(value))
    ok(f"a runner step's detail ({step['scope']}) shows its captured external ids {step['captures']}")
    review = made["needs_review"]
    open_record(page, review)
    expect(fact(page, "Status")).to_have_text("needs review")
    expect(fact(page, "Error summary")).to_contain_text("422")
    expect(page.get_by_role("button", name="Mark completed")).to_be_visible()
    ok("a runner step needing review shows why, with Release and Mark completed")

    big = made["big"]
    open_record(page, big)
    note = page.locator(".body p")
    expect(note).to_contain_text("showing the first 64.0 KiB")
    _, record = api.record(big)
    size = len(record["response"]["body"].encode())
    expect(note).to_contain_text(f"{size / 1024:.1f} KiB")
    shown = page.locator(".body pre").text_content()
    assert len(shown) <= 64 * 1024 + 1, len(shown)
    ok(f"a large body ({size} bytes) is cut to 64 KiB, with its size")

    binary = made["binary"]
    open_record(page, binary)
    expect(page.locator(".body p")).to_contain_text("binary, shown as base64, 4 B")
    expect(page.locator(".body pre")).to_have_text(binary["body_base64"])
    ok("a binary body is shown as base64 with a note")
    page.get_by_role("link", name="← All records").click()
    expect(page.locator("#list-view")).to_be_visible()


def counters(page: Page, args, api: Api) -> None:
    row = page.locator("#decisions table.decisions tr[data-name='orders']")
    executed = row.locator("td[data-decision='executed']")
    _, before = api.get("/v1/decisions")
    count = sum(e["count"] for e in before["requests"] if e["route"] == "orders" and e["decision"] == "executed")
    expect(executed).to_have_text(str(count))
    request = urllib.request.Request(args.gateway + "/orders", data=b'{"amount": 9}', method="POST",
                                     headers={"Idempotency-Key": "live-1", "X-Tenant-ID": "acme",
                                              "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 201
    # No reload: the page polls the counters by itself.
    expect(executed).to_have_text(str(count + 1), timeout=15000)
    ok(f"decision counters match /v1/decisions and update live ({count} -> {count + 1} executed)")


def accept_next_dialog(page: Page, accept: bool = True) -> list:
    """Answers the next confirmation; returns the list its message lands in."""
    seen = []

    def answer(dialog):
        seen.append(dialog.message)
        dialog.accept() if accept else dialog.dismiss()

    page.once("dialog", answer)
    return seen


def actions(page: Page, made: dict, api: Api) -> None:
    keep = made["gateway"]
    open_record(page, keep)
    seen = accept_next_dialog(page, accept=False)
    page.get_by_role("button", name="Forget").click()
    assert seen and "Forget" in seen[0], seen
    assert api.record(keep)[0] == 200, "a dismissed confirmation acts on nothing"
    ok("a dismissed confirmation leaves the record alone")

    gone = made["other_tenant"]
    open_record(page, gone)
    seen = accept_next_dialog(page)
    page.get_by_role("button", name="Forget").click()
    expect(page.locator("#notice")).to_contain_text("Forgot")
    assert seen and gone["key"] in seen[0], seen
    expect(page.locator("#list-view")).to_be_visible()
    status, _ = api.record(gone)
    assert status == 404, f"forgotten record still there: {status}"
    ok("Forget, confirmed, deletes the record (API: 404)")

    released, completed = made["unknown"]
    open_record(page, released)
    seen = accept_next_dialog(page)
    page.get_by_role("button", name="Release").click()
    expect(fact(page, "Status")).to_have_text("failed retryable")
    assert seen and "Release" in seen[0], seen
    assert api.record(released)[1]["status"] == "failed_retryable"
    ok("Release, confirmed, settles outcome_unknown as not done (API: failed_retryable)")

    open_record(page, completed)
    page.get_by_label("Answer code").fill("201")
    page.get_by_label("Answer body").fill('{"id": "settled-by-hand"}')
    seen = accept_next_dialog(page)
    page.get_by_role("button", name="Mark completed").click()
    expect(fact(page, "Status")).to_have_text("completed")
    assert seen and "201" in seen[0], seen
    _, record = api.record(completed)
    assert record["status"] == "completed" and record["response"]["status"] == 201, record
    assert json.loads(record["response"]["body"]) == {"id": "settled-by-hand"}, record
    ok("Mark completed, confirmed, stores the given answer (API: completed, 201)")

    review = made["needs_review"]
    open_record(page, review)
    accept_next_dialog(page)
    page.get_by_role("button", name="Release").click()
    expect(fact(page, "Status")).to_have_text("failed retryable")
    assert api.record(review)[1]["status"] == "failed_retryable"
    ok("Release works on a needs_review runner step too (API: failed_retryable)")

    page.get_by_role("link", name="← All records").click()
    expired = made["expired"]
    seen = accept_next_dialog(page)
    page.get_by_role("button", name="Purge expired").click()
    notice = page.locator("#notice")
    expect(notice).to_contain_text("expired record")
    assert seen and "Purge" in seen[0], seen
    # Null where the store forgets expired records by itself (Redis TTLs): any count then.
    if made["expect_purged"] is not None:
        expect(notice).to_contain_text(f"Purged {made['expect_purged']} expired records")
    for record in expired:
        assert api.record(record)[0] == 404, f"{record} survived the purge"
    expect(page.locator("#counts")).not_to_contain_text("brief")
    ok(f"Purge expired, confirmed, removes the expired records ({notice.text_content()}; API: 404)")


def keyboard(page: Page, made: dict) -> None:
    page.get_by_label("Key prefix").fill("inv-")
    page.get_by_label("Key prefix").press("Enter")
    link = page.get_by_role("link", name=made["gateway"]["key"], exact=True)
    expect(link).to_be_visible()
    link.focus()
    page.keyboard.press("Enter")
    expect(page.locator("#detail-title")).to_be_focused()
    page.keyboard.press("Tab")
    page.keyboard.press("Escape")
    expect(page.locator("#list-view")).to_be_visible()
    expect(link).to_be_focused()
    ok("keyboard only: Enter filters, Enter opens a key, Escape goes back with the focus on it")
    page.get_by_role("button", name="Clear").click()


def labelled(page: Page) -> None:
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea, button')]
        .filter((e) => !e.closest('[hidden]'))
        .filter((e) => e.tagName === 'BUTTON' ? !e.textContent.trim() : e.labels.length === 0)
        .map((e) => e.outerHTML)""")
    assert not unlabelled, f"controls without a label: {unlabelled}"
    ok("every visible control has a label")


def phone_width(page: Page, args, made: dict, shots: Path) -> None:
    page.goto(args.admin + "/")
    page.get_by_label("Admin token").fill(args.token)
    page.get_by_label("Admin token").press("Enter")
    expect(page.locator("#main")).to_be_visible()
    expect(rows(page).first).to_be_visible()
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page is {width}px wide on a 390px phone"
    page.locator("#records").scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "log-page-phone.png"))
    key = made["gateway"]["key"]
    page.get_by_label("Key prefix").fill(key)
    page.get_by_role("button", name="Filter").click()
    link = page.get_by_role("link", name=key, exact=True)
    expect(link).to_be_in_viewport()
    link.click()
    expect(page.get_by_role("button", name="Forget")).to_be_visible()
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the detail is {width}px wide on a 390px phone"
    ok("at phone width (390px) the list and the detail fit, nothing scrolls sideways")


if __name__ == "__main__":
    main()
