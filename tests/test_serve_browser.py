"""The chat page in a real headless browser: Debian's chromium and chromium-driver, driven by Selenium,
against an in-process server. Skipped when the browser is not installed, except under CI=true (.ci/run
installs it), where its absence is a failure."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from minillm.inference.generator import TextGenerator
from minillm.serving import ServerLimits, background_server, create_app

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SYSTEM = "You answer briefly."


def _missing_browser() -> str | None:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if not missing:
        return None
    return (f"no headless browser: {', '.join(missing)} missing (apt-get install chromium chromium-driver; "
            "pip install selenium)")


@pytest.fixture(scope="module")
def browser() -> Iterator:
    reason = _missing_browser()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; under CI the browser is required (.ci/run installs it)")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def generator(chat_model, tokenizer) -> TextGenerator:
    return TextGenerator(chat_model, tokenizer)


@pytest.fixture(scope="module")
def server(generator, tokenizer) -> Iterator[str]:
    app = create_app(generator.model, tokenizer, model_name="tiny-chat", limits=ServerLimits(max_tokens_limit=64))
    with background_server(app) as url:
        yield url


# Counts how often an assistant message's text changes: more than once means it was streamed in.
COUNT_UPDATES = """
window.assistantUpdates = 0;
new MutationObserver((records) => {
  for (const record of records) {
    const node = record.target.nodeType === Node.ELEMENT_NODE ? record.target : record.target.parentElement;
    if (node && node.closest(".msg.assistant")) window.assistantUpdates++;
  }
}).observe(document.getElementById("messages"), {subtree: true, childList: true, characterData: true});
"""


def test_chat_page_streams_replies_and_keeps_the_conversation(browser, server, generator):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{server}/")
    for field, value in (("system", SYSTEM), ("temperature", "0"), ("max-tokens", "12")):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    browser.execute_script(COUNT_UPDATES)

    def finished_replies(count: int) -> list[str]:
        """Waits until `count` assistant replies are complete; returns their texts."""
        selector = ".msg.assistant[data-state=done]"
        WebDriverWait(browser, 30).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, selector)) == count)
        return [e.get_attribute("textContent") for e in browser.find_elements(By.CSS_SELECTOR, selector)]

    browser.find_element(By.ID, "prompt").send_keys("小明有3个苹果，")
    browser.find_element(By.ID, "send").click()
    first = finished_replies(1)[0]
    conversation = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "小明有3个苹果，"}]
    assert first.strip()
    assert first == generator.chat(conversation, max_new_tokens=12, temperature=0)
    assert browser.execute_script("return window.assistantUpdates") > 1  # arrived piece by piece

    # A second turn (sent with Enter) carries the first one: the reply continues the conversation.
    browser.find_element(By.ID, "prompt").send_keys("又买了5个。", Keys.ENTER)
    second = finished_replies(2)[1]
    conversation += [{"role": "assistant", "content": first}, {"role": "user", "content": "又买了5个。"}]
    assert second == generator.chat(conversation, max_new_tokens=12, temperature=0)

    browser.find_element(By.ID, "clear").click()
    assert browser.find_elements(By.CSS_SELECTOR, "#messages > *") == []
