"""Drive the real app in Debian's Chromium: upload, see the overlay, click a patch, open every tab,
switch to Chinese, load the bundled TNT and see its inner view. Screenshots of every tab in both
languages, and of TNT's attention tab, go to ``tests/artifacts/screenshots`` (or
``$SCREENSHOT_DIR``; the README's are made with ``SCREENSHOT_DIR=assets/screenshots``)."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from _app import app_url  # noqa: F401  (session fixture)

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        raise RuntimeError("CI needs Debian's chromium (apt-get install chromium): .ci/run installs it")
    pytest.skip("Debian's chromium is not installed (apt-get install chromium fonts-noto-cjk)",
                allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api")

ROOT = Path(__file__).resolve().parent.parent
SHOTS = Path(os.environ.get("SCREENSHOT_DIR", ROOT / "tests" / "artifacts" / "screenshots"))
TABS = ["attention", "patches", "posembed", "distance", "tsne", "about"]
TAB_TEXT = {"en": ["Attention", "Patches and tokens", "Position embeddings", "Receptive field", "Class tokens",
                   "Model"],
            "zh-CN": ["注意力", "图像块与 token", "位置编码", "感受野", "类别 token", "模型"]}


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def page(browser, app_url):  # noqa: F811
    pg = browser.new_page(viewport={"width": 1440, "height": 1000}, locale="en-US")
    pg.set_default_timeout(120_000)
    pg.goto(app_url)
    pg.wait_for_selector("#overlay img")
    yield pg
    pg.close()


def overlay_src(pg) -> str:
    return pg.locator("#overlay img").first.get_attribute("src") or ""


def wait_change(pg, get, before, what: str, timeout=90.0):
    """Until ``get()`` is non-empty and differs from ``before``; on a timeout, the message says what
    did not change and a screenshot of the page is kept in tests/artifacts."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        now = get()
        if now and now != before:
            return now
        time.sleep(0.2)
    shot = ROOT / "tests" / "artifacts" / "failed.png"  # never among the README's screenshots
    try:
        shot.parent.mkdir(parents=True, exist_ok=True)
        pg.screenshot(path=str(shot), full_page=True, timeout=10_000)
        where = f"screenshot: {shot}"
    except Exception as e:  # a crashed page: the message below still says what did not change
        where = f"no screenshot: {type(e).__name__}"
    raise AssertionError(f"the page did not update: {what} stayed {str(before)[:80]!r} for {timeout:.0f} s ({where})")


def wait_text(pg, selector: str, text: str) -> None:
    """Until the element's text contains ``text`` (the default timeout fails the test)."""
    pg.wait_for_function("([sel, text]) => { const e = document.querySelector(sel); "
                         "return e && e.innerText.includes(text); }", arg=[selector, text])


def query_value(pg) -> str:
    return pg.locator("#query input").input_value()


def check_posembed_hover_data(pg) -> None:
    """The figure's grid indices (int16 typed arrays in the JSON) reach plotly.js intact: the
    customdata the hover label reads names each tile's grid position (8×8 grid: tiles of 8 cells
    and a gap). Hover itself does not fire under headless Chromium here, so the data is read."""
    cd = pg.evaluate("(() => { const d = document.querySelector('#pos_plot .js-plotly-plot')._fullData[0]"
                     ".customdata; return [d[0][0], d[9][0], d[0][27], d[10][19], d[8][0]].map(v => Array.from(v)); })()")
    assert cd == [[1, 1], [2, 1], [1, 4], [2, 3], [-1, -1]], cd  # rows and columns counted from 1


def check_layer_head_hover_data(pg) -> None:
    """The layer × head grid after a click on token 22 (row 2, col 5 of the 8×8 grid counted from
    0; the app counts rows, columns, layers and heads from 1): plotly.js has the axes' category
    names the hover label shows and the (token, weight) hover data."""
    pg.wait_for_function("(() => { const g = document.querySelector('#layer_head .js-plotly-plot'); "
                         "return g && g._fullLayout && g._fullLayout.title.text.includes('token 22'); })()")
    d = pg.evaluate("(() => { const t = document.querySelector('#layer_head .js-plotly-plot')._fullData[0]; "
                    "return [t.y[2], t.x[5], Array.from(t.customdata[2][5]), t.x[8]]; })()")
    assert d[0] == "layer 1 · row 3" and d[1] == "head 1 · col 6", d
    assert d[2][0] == 22 and 0.0 <= d[2][1] <= 1.0, d  # token index, attention weight
    assert d[3].strip() == "", d  # the gap column between head 1 and head 2


def shoot_all_tabs(pg, lang: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    tabs = pg.locator("#tabs button[role=tab]")
    assert [tabs.nth(i).inner_text().strip() for i in range(tabs.count())] == TAB_TEXT[lang]
    for i, name in enumerate(TABS):
        tabs.nth(i).click()
        if name == "tsne":
            done = "images embedded" if lang == "en" else "张图像"
            pg.click("#tsne_run")
            pg.wait_for_function(f"document.querySelector('#tsne_md').innerText.includes('{done}')",
                                 timeout=300_000)
            pg.wait_for_selector("#tsne_plot .js-plotly-plot")
        elif name in ("posembed", "distance", "about"):
            pg.wait_for_selector(f"#{ {'posembed': 'pos_plot', 'distance': 'mad_plot', 'about': 'curve'}[name]} "
                                 ".js-plotly-plot")
        time.sleep(1.0)  # let plotly finish drawing
        if name == "posembed":
            check_posembed_hover_data(pg)
        pg.screenshot(path=str(SHOTS / f"{lang}_{i}_{name}.png"), full_page=True)
    tabs.nth(0).click()


def test_upload_click_tabs_and_chinese(page):
    pg = page
    # an example is explained at start; upload another image and see the overlay change
    first = overlay_src(pg)
    ring = sorted((ROOT / "assets" / "examples" / "shapes" / "ring").glob("ring_*[0-9].png"))[0]
    pg.set_input_files("#image input[type=file]", str(ring))
    wait_change(pg, lambda: overlay_src(pg), first, "the overlay after the upload")
    pg.wait_for_function("document.querySelector('#prediction') && "
                         "document.querySelector('#prediction').innerText.includes('%')")
    wait_text(pg, "#caption", "class token")
    # click the patch in row 2, col 5 of the 8x8 grid: the query moves there
    box = pg.locator("#overlay img").first.bounding_box()
    before = overlay_src(pg)
    pg.mouse.click(box["x"] + box["width"] * (5.5 / 8), box["y"] + box["height"] * (2.5 / 8))
    wait_change(pg, lambda: query_value(pg), "0", "the query box after the click")
    assert query_value(pg) == str(1 + 2 * 8 + 5)
    # the query box, caption and overlay arrive in one event but may be drawn one after another
    wait_text(pg, "#caption", "token 22 (the patch in row 3, column 6)")
    wait_change(pg, lambda: overlay_src(pg), before, "the overlay after the click")
    check_layer_head_hover_data(pg)
    pg.click("#reset")
    wait_change(pg, lambda: query_value(pg), str(1 + 2 * 8 + 5), "the query box after Reset")
    assert query_value(pg) == "0"
    shoot_all_tabs(pg, "en")
    # switch to Chinese
    pg.get_by_text("中文", exact=True).click()
    pg.wait_for_function("document.body.innerText.includes('怎么看')")
    wait_text(pg, "#caption", "类别 token")
    shoot_all_tabs(pg, "zh-CN")
    pg.get_by_text("English", exact=True).click()
    pg.wait_for_function("document.body.innerText.includes('How to read this')")


def test_tnt_shows_the_words_inside_a_patch(page):
    """Load the bundled TNT from the model box: the example is explained again and the inner view
    appears, the patch's words beside their shares, in English and in Chinese (screenshots of the
    attention tab in both: ``en_tnt_attention.png``, ``zh-CN_tnt_attention.png``)."""
    pg = page
    before = overlay_src(pg)
    box = pg.locator("#model input")
    box.fill("classroom-tnt")
    box.press("Enter")
    pg.click("#load")
    wait_change(pg, lambda: overlay_src(pg), before, "the overlay after loading classroom-tnt")
    wait_text(pg, "#inner_md", "TNT inner attention")
    wait_text(pg, "#inner_md", "each if all were equal")
    img = pg.locator("#inner img").first
    img.wait_for(state="visible")
    w, h = pg.evaluate("(() => { const i = document.querySelector('#inner img'); "
                       "return [i.naturalWidth, i.naturalHeight]; })()")
    assert w == 2 * h + 12, (w, h)  # two square panels and the gap
    time.sleep(1.0)
    SHOTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(SHOTS / "en_tnt_attention.png"), full_page=True)
    pg.get_by_text("中文", exact=True).click()
    wait_text(pg, "#inner_md", "TNT 内部注意力")
    wait_text(pg, "#inner_md", "若平均分配")
    time.sleep(1.0)
    pg.screenshot(path=str(SHOTS / "zh-CN_tnt_attention.png"), full_page=True)
    pg.get_by_text("English", exact=True).click()
    wait_text(pg, "#inner_md", "TNT inner attention")


def test_language_follows_the_browser(browser, app_url):  # noqa: F811
    pg = browser.new_page(locale="zh-CN", extra_http_headers={"Accept-Language": "zh-CN,zh;q=0.9"})
    pg.set_default_timeout(120_000)
    pg.goto(app_url)
    pg.wait_for_function("document.body.innerText.includes('怎么看')")
    wait_text(pg, "#title", "ViT 注意力探索器")
    pg.close()
