"""The playground page in a real headless Chromium (Debian's chromium + chromedriver,
driven by selenium), one test per control: send and stream with usage and cost, markdown
and code rendering sanitised, every parameter reaching the request, stop (its usage from
the server), regenerate, edit, copy, the conversation kept in localStorage, history
trimmed to the context with a note, the default model, and the layout from 360 px up.
Screenshots at 1280 and 390 px go under pytest's tmp dir, and to $SOL_ARTIFACTS when set."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(not (CHROMEDRIVER and CHROMIUM),
                                reason="needs Debian's chromium and chromium-driver (scripts/setup.sh installs them)")

# Records every request body the page sends, and what it copies to the clipboard.
SPY = """
window.__sent = [];
const realFetch = window.fetch;
window.fetch = (url, init) => { window.__sent.push({url: String(url), body: init && init.body ? init.body : null});
                                return realFetch(url, init); };
window.__copied = [];
Object.defineProperty(navigator, 'clipboard', {value: {writeText: async (t) => { window.__copied.push(t); }}});
"""


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def by(css: str):
    from selenium.webdriver.common.by import By
    return By.CSS_SELECTOR, css


def wait(browser, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(browser, timeout).until(condition)


def open_page(browser, server, api_key: str, conversation: list | None = None, settings: dict | None = None,
              width: int = 1280):
    """A fresh page with the key pasted and the models loaded; `conversation` and
    `settings` are put in localStorage first, as a previous visit would have left them."""
    browser.set_window_size(width, 800)
    base = f"http://127.0.0.1:{server.app.http_port}/"
    browser.get(base)
    browser.execute_script("localStorage.clear(); sessionStorage.clear();")
    if conversation is not None or settings is not None:
        browser.execute_script("localStorage.setItem('sol-playground', arguments[0]);",
                               json.dumps({"messages": conversation or [], "settings": settings or {}}))
    browser.execute_script("sessionStorage.setItem('sol-api-key', arguments[0]);", api_key)
    browser.get(base)
    browser.execute_script(SPY)
    wait(browser, lambda d: not d.find_element(*by("#model")).get_attribute("disabled"))
    return browser


def send(browser, text: str) -> None:
    box = browser.find_element(*by("#message"))
    box.send_keys(text)
    browser.find_element(*by("#send")).click()


def turns_done(browser, n: int) -> None:
    """Wait until `n` assistant turns have ended (their usage line shown)."""
    wait(browser, lambda d: len(d.find_elements(*by(".turn.assistant .usage"))) >= n
         and not d.find_elements(*by(".turn.streaming")) and d.execute_script("return !state.busy"))


def set_value(browser, css: str, value: str) -> None:
    browser.execute_script("const e = document.querySelector(arguments[0]); e.value = arguments[1];"
                           "e.dispatchEvent(new Event('input')); e.dispatchEvent(new Event('change'));", css, value)


def sent_chats(browser) -> list[dict]:
    return [json.loads(s["body"]) for s in browser.execute_script("return window.__sent")
            if s["url"].endswith("/v1/chat/completions")]


def shoot(browser, tmp_path: Path, name: str) -> Path:
    shot = tmp_path / name
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("SOL_ARTIFACTS"):
        out = Path(os.environ["SOL_ARTIFACTS"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, out / name)
    return shot


def test_default_model_streaming_usage_and_cost(http_server, api_key, browser, tmp_path):
    open_page(browser, http_server, api_key)
    assert browser.title == "sol playground"
    from selenium.webdriver.support.select import Select
    models = Select(browser.find_element(*by("#model")))
    assert {"tiny", "tiny:sft", "tiny:base", "tiny@1", "tiny@2"} <= {o.get_attribute("value") for o in models.options}
    # The newest chat version (tiny@2, sft), by the alias that follows it; not the base.
    assert models.first_selected_option.get_attribute("value") == "tiny:latest"
    set_value(browser, "#max-tokens", "24")
    send(browser, "What is 48 + 27?")
    turns_done(browser, 1)
    usage = browser.find_element(*by(".turn.assistant .usage")).text
    assert browser.find_element(*by(".turn.assistant .text")).text.strip(), "no streamed text"
    for word in ("prompt", "cached", "completion", "cost", "version 2"):
        assert word in usage, usage
    send(browser, "And 10 + 5?")
    turns_done(browser, 2)
    second = browser.find_elements(*by(".turn.assistant .usage"))[1].text
    assert "(cached 0)" not in second, second          # the first turn's prefix came from the cache
    totals = browser.find_element(*by("#totals")).text
    assert totals.startswith("this conversation: 2 turns") and "cost" in totals
    shoot(browser, tmp_path, "playground-1280.png")


def test_markdown_and_code_render_sanitised(http_server, api_key, browser):
    answer = ("Here is **bold** and `inline`.\n\n```python\nprint('hi')\n```\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
              "<img src=x onerror=\"window.__pwned=1\"><script>window.__pwned=2</script>"
              "[link](javascript:window.__pwned=3)")
    open_page(browser, http_server, api_key, [{"role": "user", "content": "**not markdown** <b>x</b>"},
                                              {"role": "assistant", "content": answer}])
    text = browser.find_element(*by(".turn.assistant .text"))
    assert text.find_element(*by("strong")).text == "bold"
    assert text.find_element(*by("pre code")).text.strip() == "print('hi')"
    assert text.find_element(*by("table td")).text == "1"
    assert not text.find_elements(*by("script")) and not text.find_elements(*by("[onerror]"))
    assert all(not (a.get_attribute("href") or "").startswith("javascript:") for a in text.find_elements(*by("a")))
    text.find_element(*by("a")).click()
    assert browser.execute_script("return window.__pwned") is None
    # The user's own text is shown as typed, never as HTML.
    assert browser.find_element(*by(".turn.user .text")).text == "**not markdown** <b>x</b>"
    text.find_element(*by("pre .copy-code")).click()
    assert browser.execute_script("return window.__copied") == ["print('hi')\n"]


def test_parameters_reach_the_request(http_server, api_key, browser):
    open_page(browser, http_server, api_key)
    set_value(browser, "#temperature", "0.3")
    set_value(browser, "#top-p", "0.9")
    set_value(browser, "#max-tokens", "7")
    set_value(browser, "#system", "Answer briefly.")
    set_value(browser, "#response-format", "json_object")
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    set_value(browser, "#tools", json.dumps(tools))
    from selenium.webdriver.support.select import Select
    Select(browser.find_element(*by("#model"))).select_by_value("tiny:sft")
    assert browser.find_element(*by("#temperature-value")).text == "0.3"
    send(browser, "hi")
    turns_done(browser, 1)
    (body,) = sent_chats(browser)
    assert body["model"] == "tiny:sft" and body["temperature"] == 0.3 and body["top_p"] == 0.9
    assert body["max_tokens"] == 7 and body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "hi"}]
    assert body["response_format"] == {"type": "json_object"} and body["tools"] == tools
    # A schema: the box appears, and its JSON goes out as OpenAI's json_schema format.
    set_value(browser, "#response-format", "json_schema")
    assert browser.find_element(*by("#schema-label")).is_displayed()
    set_value(browser, "#json-schema", '{"type": "object", "properties": {"n": {"type": "integer"}}}')
    set_value(browser, "#tools", "")
    send(browser, "again")
    turns_done(browser, 2)
    second = sent_chats(browser)[1]
    assert second["response_format"]["json_schema"]["schema"]["properties"] == {"n": {"type": "integer"}}
    assert "tools" not in second
    # Invalid JSON is refused on the page, with nothing sent.
    set_value(browser, "#tools", "[not json")
    send(browser, "third")
    wait(browser, lambda d: "not valid JSON" in d.find_element(*by("#status")).text)
    assert len(sent_chats(browser)) == 2


def test_stop_keeps_the_partial_answer_and_its_billed_usage(http_server, api_key, browser):
    open_page(browser, http_server, api_key)
    # The test's own wrapper: the tiny random model may sample its end of turn at any
    # step, so this request ignores it and runs until stopped.
    browser.execute_script("""const spied = window.fetch; window.fetch = (url, init) => {
        if (String(url).endsWith('/v1/chat/completions')) {
          init = {...init, body: JSON.stringify({...JSON.parse(init.body), ignore_eos: true})}; }
        return spied(url, init); };""")
    set_value(browser, "#max-tokens", "900")
    send(browser, "Tell me a long story")
    wait(browser, lambda d: len(d.find_element(*by(".turn.assistant .text")).text) > 20)
    browser.find_element(*by("#stop")).click()
    wait(browser, lambda d: "stopped;" in d.find_element(*by("#status")).text)
    usage = browser.find_element(*by(".turn.assistant .usage")).text
    assert "finish stopped" in usage and "cost" in usage, usage
    completion = int(usage.split("completion ")[1].split(" ")[0])
    assert 0 < completion < 900
    assert browser.find_element(*by("#totals")).text.startswith("this conversation: 1 turns")
    # The page's numbers are the ledger's.
    (request_id,) = browser.execute_script("return window.__sent.filter(s => s.url.includes('/v1/requests/'))"
                                           ".map(s => s.url.split('/')[3]).slice(-1)")
    billed = browser.execute_script(
        "return fetch(`/v1/requests/${arguments[0]}/usage`, {headers: headers()}).then(r => r.json())", request_id)
    assert billed["usage"]["completion_tokens"] == completion


def test_regenerate_edit_and_copy(http_server, api_key, browser):
    open_page(browser, http_server, api_key)
    set_value(browser, "#max-tokens", "12")
    send(browser, "first question")
    turns_done(browser, 1)
    first_answer = browser.execute_script("return state.messages[1].content")
    browser.find_element(*by(".turn.assistant .actions .copy")).click()
    browser.find_element(*by(".turn.user .actions .copy")).click()
    assert browser.execute_script("return window.__copied") == [first_answer, "first question"]

    browser.find_element(*by(".turn.assistant .actions .regenerate")).click()
    wait(browser, lambda d: len(sent_chats(d)) == 2 and d.execute_script("return !state.busy"))
    assert browser.execute_script("return state.messages.map(m => m.role)") == ["user", "assistant"]
    assert sent_chats(browser)[1]["messages"] == [{"role": "user", "content": "first question"}]

    send(browser, "second question")
    turns_done(browser, 2)
    browser.find_element(*by(".turn.user .actions .edit")).click()         # the first user turn
    box = browser.find_element(*by(".turn.user .edit-box"))
    box.clear()
    box.send_keys("edited question")
    browser.find_element(*by(".save-edit")).click()
    wait(browser, lambda d: len(sent_chats(d)) == 4 and d.execute_script("return !state.busy"))
    assert browser.execute_script("return state.messages.map(m => m.role + ':' + (m.role == 'user' ? m.content : ''))") \
        == ["user:edited question", "assistant:"]
    assert sent_chats(browser)[3]["messages"] == [{"role": "user", "content": "edited question"}]
    # Only the last answer can be regenerated.
    assert len(browser.find_elements(*by(".regenerate"))) == 1


def test_conversation_survives_a_reload_and_clears(http_server, api_key, browser):
    open_page(browser, http_server, api_key)
    set_value(browser, "#max-tokens", "6")
    set_value(browser, "#system", "Be terse.")
    send(browser, "remember me")
    turns_done(browser, 1)
    browser.refresh()
    wait(browser, lambda d: not d.find_element(*by("#model")).get_attribute("disabled"))
    assert browser.find_element(*by(".turn.user .text")).text == "remember me"
    assert "cost" in browser.find_element(*by(".turn.assistant .usage")).text
    assert browser.find_element(*by("#system")).get_attribute("value") == "Be terse."
    assert browser.find_element(*by("#max-tokens")).get_attribute("value") == "6"
    browser.find_element(*by("#clear")).click()
    assert browser.find_elements(*by(".turn")) == []
    assert json.loads(browser.execute_script("return localStorage.getItem('sol-playground')"))["messages"] == []


def test_history_is_trimmed_to_the_context_with_a_note(http_server, api_key, browser):
    long = "the quick brown fox jumps over the lazy dog " * 12
    conversation = [{"role": r, "content": f"{i} {long}"} for i in range(10) for r in ("user", "assistant")]
    open_page(browser, http_server, api_key, conversation, {"max-tokens": "700"})
    send(browser, "and now?")
    turns_done(browser, 1)
    note = browser.find_element(*by("#trim-note"))
    assert note.is_displayed() and "left out" in note.text and "1024 tokens" in note.text, note.text
    (body,) = sent_chats(browser)
    sent = body["messages"]
    assert len(sent) < len(conversation) + 1 and sent[-1] == {"role": "user", "content": "and now?"}
    assert sent[0]["role"] == "user"                      # whole turns are dropped, oldest first
    assert browser.find_elements(*by(".turn.trimmed"))
    tokens = browser.execute_script(
        "return fetch('/tokenize', {method: 'POST', headers: headers(), body: JSON.stringify("
        "{model: 'tiny:latest', messages: arguments[0]})}).then(r => r.json())", sent)
    assert tokens["count"] + 700 <= tokens["max_model_len"]


@pytest.mark.parametrize("width", [390, 360])
def test_narrow_layout(http_server, api_key, browser, tmp_path, width):
    open_page(browser, http_server, api_key, [
        {"role": "user", "content": "show me code"},
        {"role": "assistant", "content": "Sure:\n\n```python\n" + "x = 1  # a long line " * 8 + "\n```\n\nDone.",
         "usage": {"prompt": 12, "cached": 0, "completion": 30}, "cost": 0.00007, "version": 2, "finish": "stop"}],
        width=width)
    viewport = browser.execute_script("return document.documentElement.clientWidth")
    assert browser.execute_script("return document.documentElement.scrollWidth") <= viewport
    settings = browser.find_element(*by("#settings"))
    assert not settings.is_displayed()
    assert not browser.find_element(*by("#schema-label")).is_displayed()
    toggle = browser.find_element(*by("#settings-toggle"))
    toggle.click()
    assert settings.is_displayed() and toggle.get_attribute("aria-expanded") == "true"
    assert browser.find_element(*by("#send")).is_displayed()
    if width == 390:
        shoot(browser, tmp_path, "playground-390-settings.png")
        toggle.click()
        shoot(browser, tmp_path, "playground-390.png")
