"""The review queue in a real browser (headless Chromium via Playwright): keyboard shortcuts,
the next item swapped in without a page reload, edit with re-check, help, undo, and a teacher's
<script> shown as text and never run."""
import pytest
from django.db import connection

from projects.models import Sample
from tests.review_data import make_samples

pytestmark = pytest.mark.browser


@pytest.mark.django_db(transaction=True)
def test_keyboard_review_flow(chromium, live_server, client, owner, project, monkeypatch):
    from playwright.sync_api import sync_playwright

    # Playwright's sync API runs an event loop in this thread; the ORM reads below are plain
    # synchronous checks of the database, which Django would otherwise refuse in that context.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

    s0, s1, s2 = make_samples(project, [
        {"query": "Where is my card?", "response": '<script>alert("owned")</script>', "failed": [("label_in_set", "not a label")]},
        {"query": "Card stolen at the station", "response": "stolen", "failed": [("label_in_set", "not a label")]},
        {"query": "Refund missing", "response": "refund", "failed": [("label_in_set", "not a label")]},
    ])
    client.force_login(owner)
    session = client.cookies["sessionid"].value
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            ctx = browser.new_context()
            ctx.add_cookies([{"name": "sessionid", "value": session, "url": live_server.url}])
            page = ctx.new_page()
            dialogs = []
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(f"{live_server.url}/p/{project.slug}/review/")
            card = page.locator("#review-item article.review-card")
            assert card.get_attribute("data-sample") == str(s0.pk)
            assert page.locator(".review-answer").first.inner_text() == '<script>alert("owned")</script>'
            page.evaluate("window.__noReload = true")

            page.keyboard.press("r")  # reject -> next item swapped in
            page.wait_for_selector(f'article[data-sample="{s1.pk}"]')
            assert page.locator(".review-notice").inner_text().startswith(f"Rejected sample {s0.pk}")

            page.keyboard.press("e")  # edit: a failing edit is shown, not saved
            page.keyboard.press("Control+a")
            page.keyboard.type("stolen")
            page.keyboard.press("Control+Enter")
            page.wait_for_selector(".review-error")
            assert "The edit fails label_in_set" in page.locator(".review-error").inner_text()
            assert Sample.objects.get(pk=s1.pk).review_status is None
            ta = page.locator("textarea[name=edited_response]")
            ta.fill("Lost or stolen card")
            ta.press("Control+Enter")
            page.wait_for_selector(f'article[data-sample="{s2.pk}"]')
            s = Sample.objects.get(pk=s1.pk)
            assert (s.review_status, s.edited_response, s.parsed) == ("accepted", "Lost or stolen card", "lost_or_stolen_card")

            page.keyboard.press("?")
            assert page.locator("#review-help").is_visible()
            page.keyboard.press("Escape")
            assert not page.locator("#review-help").is_visible()

            page.keyboard.press("u")  # undo the edit: s1 comes back
            page.wait_for_selector(f'article[data-sample="{s1.pk}"]')
            assert Sample.objects.get(pk=s1.pk).review_status is None

            page.keyboard.press("s")  # skip s1 -> s2
            page.wait_for_selector(f'article[data-sample="{s2.pk}"]')
            page.keyboard.press("k")  # previous -> s1 again
            page.wait_for_selector(f'article[data-sample="{s1.pk}"]')
            page.keyboard.press("a")
            page.wait_for_selector(f'article[data-sample="{s2.pk}"]')
            assert Sample.objects.get(pk=s1.pk).review_status == "accepted"

            assert page.evaluate("window.__noReload") is True  # every step without a page reload
            assert dialogs == []  # the teacher's <script> never ran
        finally:
            browser.close()
            # Inside Playwright's event loop Django hands this context its own connection: close it.
            connection.close()
