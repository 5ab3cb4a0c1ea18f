"""The Idempotency Log page on `idem consume`'s admin listener, which has no token (loopback).

Run by tests/it/consumer.rs after the consumer delivered one message: the page opens
without a prompt, lists the message's record, shows the consumer's message counters, and
its own (same-origin) calls may act: Forget removes the record, checked through the API.
"""

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request

from playwright.sync_api import expect, sync_playwright


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--admin", required=True, help="the admin listener, http://HOST:PORT")
    parser.add_argument("--subscriber", required=True)
    parser.add_argument("--key", required=True, help="the delivered message's id")
    args = parser.parse_args()
    scope = f"consumer:{args.subscriber}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True)
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(args.admin + "/")
        expect(page.locator("#main")).to_be_visible()
        expect(page.get_by_label("Admin token")).to_be_hidden()
        print("ok      without a token the page opens without asking for one")
        page.get_by_label("Scope").fill(scope)
        page.get_by_role("button", name="Filter").click()
        expect(page.locator("#list tbody a[data-key]")).to_have_text([args.key])
        print(f"ok      the consumer's record {scope}/{args.key} is listed")
        row = page.locator(f"#decisions table.decisions tr[data-name='{args.subscriber}']")
        expect(page.locator("#decisions caption")).to_have_text(["Consumer messages"])
        expect(row.locator("td[data-decision='delivered']")).to_have_text("1")
        print("ok      the consumer's message counters are shown")
        page.get_by_role("link", name=args.key, exact=True).click()
        page.once("dialog", lambda dialog: dialog.accept())
        page.get_by_role("button", name="Forget").click()
        expect(page.locator("#notice")).to_contain_text("Forgot")
        path = f"/v1/records/{urllib.parse.quote(scope, safe='')}/{urllib.parse.quote(args.key, safe='')}"
        try:
            urllib.request.urlopen(args.admin + path, timeout=10)
            sys.exit(f"{scope}/{args.key} is still in the store after Forget")
        except urllib.error.HTTPError as error:
            assert error.code == 404, error.code
        print("ok      the page's own calls act without a token: Forget removed the record (API: 404)")
        assert not errors, f"the page logged errors: {errors}"
        browser.close()
    print(json.dumps({"consumer page": "every check passed"}))


if __name__ == "__main__":
    main()
