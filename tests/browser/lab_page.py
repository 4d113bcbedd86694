"""Page objects for the browser tests: a notebook open in JupyterLab, and the course's chat widget in it.

Cells run through JupyterLab's own command registry (what the Run menu calls); the widget is driven
like a student drives it: typing into its text box and clicking its buttons. The kernel is asked for
the Python-side truth (the reply the session produced) on a side channel that never shows in the
notebook.
"""

from __future__ import annotations

import json
import re
import shutil
import time

from jlab import REPO_ROOT

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
SCREENSHOTS = REPO_ROOT / "build" / "screenshots"
# Console messages that are not front-end errors of the course (none expected today; keep it short).
BENIGN_CONSOLE = [re.compile(p) for p in (r"favicon\.ico",)]

# JavaScript run in the page. ``panel(path)`` finds the notebook panel showing ``path``.
_PANEL_JS = """
function panel(path) {
  if (!window.jupyterapp || !window.jupyterapp.shell) return null;  // still loading
  for (const w of window.jupyterapp.shell.widgets('main')) {
    if (w.context && w.context.path === path) return w;
  }
  return null;
}
"""


def _js(body: str) -> str:
    return f"(arg) => {{ {_PANEL_JS} {body} }}"


class NotebookPage:
    """A lesson notebook open in JupyterLab, with a kernel."""

    def __init__(self, page, server, path: str):
        self.page, self.server, self.path = page, server, path

    def open(self, timeout: float = 180) -> "NotebookPage":
        """Show the notebook (loading the Lab UI first if the page is not on it); wait for its kernel."""
        in_lab = self.page.url.startswith(self.server.url) and self.page.evaluate(
            "() => !!(window.jupyterapp && window.jupyterapp.shell)")
        if in_lab:  # reuse the loaded UI, as File > Open does: no second page load
            self.page.evaluate(
                "p => window.jupyterapp.commands.execute('docmanager:open', {path: p}).then(() => null)",
                self.path)
        else:
            self.page.goto(self.server.lab_url(self.path), timeout=timeout * 1000)
        self.page.wait_for_function(_js("""
            const p = panel(arg);
            const k = p && p.sessionContext && p.sessionContext.session && p.sessionContext.session.kernel;
            return !!k && k.status === 'idle' && p.content.widgets.length > 0;"""),
            arg=self.path, timeout=timeout * 1000, polling=250)
        self.page.locator(f"[id='{self._panel_id()}']").wait_for(state="visible")
        return self

    def close(self) -> None:
        """Shut the notebook's kernel down and close its tab without saving anything."""
        self.page.evaluate(_js("""
            const p = panel(arg);
            if (!p) return;
            p.context.model.dirty = false;  // nothing is saved: no "unsaved changes" dialog
            return p.sessionContext.shutdown().then(() => { p.dispose(); return null; });"""),
            self.path)

    def cell_index(self, marker: str) -> int:
        """The index of the first code cell whose source contains ``marker``."""
        index = self.page.evaluate(_js("""
            const cells = panel(arg.path).content.model.cells;
            for (let i = 0; i < cells.length; i++) {
              const c = cells.get(i);
              if (c.type === 'code' && c.sharedModel.getSource().includes(arg.marker)) return i;
            }
            return -1;"""), {"path": self.path, "marker": marker})
        if index < 0:
            raise AssertionError(f"{self.path} has no code cell containing {marker!r}")
        return index

    def run_through(self, index: int, timeout: float = 900) -> None:
        """Select cell ``index``, Run All Above Selected Cell, then run it; fail on an error output."""
        self.page.evaluate(_js("""
            const app = window.jupyterapp, p = panel(arg.path);
            app.shell.activateById(p.id);
            p.content.activeCellIndex = arg.index;
            window.__runResult = null;
            app.commands.execute('notebook:run-all-above')
              .then(ok => ok === false ? false : app.commands.execute('notebook:run-cell'))
              .then(ok => { window.__runResult = ok === false ? 'failed' : 'ok'; },
                    err => { window.__runResult = 'error: ' + err; });"""),
            {"path": self.path, "index": index})
        self.page.wait_for_function("() => window.__runResult !== null", timeout=timeout * 1000,
                                    polling=500)
        errors = self.error_outputs()
        result = self.page.evaluate("() => window.__runResult")
        assert result == "ok" and not errors, f"running {self.path} up to cell {index}: {result} {errors}"

    def error_outputs(self) -> list[str]:
        """``ename: evalue`` of every error output in the notebook as the page holds it."""
        return self.page.evaluate(_js("""
            const cells = panel(arg).content.model.cells, found = [];
            for (let i = 0; i < cells.length; i++) {
              const c = cells.get(i);
              if (c.type !== 'code') continue;
              for (let j = 0; j < c.outputs.length; j++) {
                const o = c.outputs.get(j).toJSON();
                if (o.output_type === 'error') found.push(`cell ${i}: ${o.ename}: ${o.evalue}`);
              }
            }
            return found;"""), self.path)

    def cell(self, index: int):
        """The cell's DOM node (code and outputs)."""
        return self.page.locator(f".jp-NotebookPanel[id='{self._panel_id()}'] .jp-Cell").nth(index)

    def _panel_id(self) -> str:
        return self.page.evaluate(_js("return panel(arg).id;"), self.path)

    def kernel_eval(self, code: str, timeout: float = 60) -> str:
        """Run ``code`` in the notebook's kernel off the record (not shown in the notebook); its stdout."""
        out = self.page.evaluate(_js("""
            const kernel = panel(arg.path).sessionContext.session.kernel;
            const future = kernel.requestExecute({code: arg.code, silent: false, store_history: false});
            let out = '';
            future.onIOPub = msg => {
              const t = msg.header.msg_type;
              if (t === 'stream' && msg.content.name === 'stdout') out += msg.content.text;
              if (t === 'error') out += `\\n!!ERROR ${msg.content.ename}: ${msg.content.evalue}`;
            };
            const limit = new Promise((_, reject) => setTimeout(() => reject('timeout'), arg.ms));
            return Promise.race([future.done.then(() => out), limit]);"""),
            {"path": self.path, "code": code, "ms": int(timeout * 1000)})
        if "!!ERROR" in out:
            raise AssertionError(f"kernel side-channel failed: {out}")
        return out

    def kernel_json(self, source: str, **names):
        """Run ``source`` in a fresh namespace (holding ``names``) in the kernel; the JSON it assigns
        to ``result``. The notebook's own variables stay untouched."""
        source += "\nimport json\nprint('@@result ' + json.dumps(result))"
        code = f"exec({source!r}, {{'__builtins__': __builtins__, **{names!r}}})"
        lines = [ln for ln in self.kernel_eval(code).splitlines() if ln.startswith("@@result ")]
        assert lines, f"the kernel printed no result for {source[:80]!r}"
        return json.loads(lines[-1][len("@@result "):])

    def widget_ids(self, index: int) -> list[str]:
        """The model ids of the widget views in cell ``index``'s outputs."""
        return self.page.evaluate(_js("""
            const c = panel(arg.path).content.model.cells.get(arg.index), ids = [];
            for (let j = 0; j < c.outputs.length; j++) {
              const d = c.outputs.get(j).toJSON().data || {};
              if (d[arg.mime]) ids.push(d[arg.mime].model_id);
            }
            return ids;"""), {"path": self.path, "index": index, "mime": WIDGET_MIME})

    def widget_report(self, expected: int, timeout: float = 90) -> dict:
        """Wait until ``expected`` widget outputs are on the page and each has rendered (or failed);
        count the outputs, views, errors and still-pending ones."""
        script = _js("""
            const r = {outputs: 0, views: 0, errors: [], pending: 0, as_text: 0};
            for (const cell of panel(arg.path).content.widgets) {
              if (cell.model.type !== 'code') continue;
              const area = cell.outputArea;
              for (let j = 0; j < area.model.length; j++) {
                if (!(area.model.get(j).data || {})[arg.mime]) continue;
                r.outputs += 1;
                const node = area.widgets[j] && area.widgets[j].node;
                const text = node ? node.textContent || '' : '';
                if (/Error displaying widget|Could not create|model not found/i.test(text))
                  r.errors.push(text.trim().slice(0, 200));
                else if (node && node.querySelector('[class*="widget-"]')) r.views += 1;
                else if (node && node.querySelector('.jp-RenderedText')) r.as_text += 1;  // untrusted
                else r.pending += 1;
              }
            }
            return r;""")
        deadline = time.monotonic() + timeout
        while True:
            report = self.page.evaluate(script, {"path": self.path, "mime": WIDGET_MIME})
            done = report["outputs"] >= expected and report["pending"] == 0
            if done or time.monotonic() > deadline:
                return report
            time.sleep(0.5)


# The kernel side of a ChatWidget whose view is one of ``ids`` (run through NotebookPage.kernel_json).
CHAT_STATE = """
import gc
from course_utils.chat import ChatWidget
# type(), not isinstance(): isinstance reads __class__, which warns on some lazy torch objects
w = next(o for o in gc.get_objects() if issubclass(type(o), ChatWidget) and o.view.model_id in ids)
assistant = [c.value for c in w.log.children if 'Assistant' in c.value]
result = {"reply": w.last_reply, "history": list(w.session.history),
          "busy": bool(w._thread and w._thread.is_alive()),
          "bubbles": len(w.log.children), "last_html": assistant[-1] if assistant else None}
"""


def html_words(html: str) -> list[str]:
    """The words a browser shows for an HTML fragment (tags dropped, entities decoded)."""
    import html as html_lib

    return words(html_lib.unescape(re.sub(r"<[^>]+>", " ", html)))


def words(text: str) -> list[str]:
    """Letters-only words: what survives Markdown rendering (list numbers and markup do not count)."""
    return re.findall(r"[^\W\d_]+", text)


# The widget's parts. ChatWidget may tag them with CSS classes (``course-chat-*``); until it does, the
# tests find them the way a student does: by the buttons' labels and the bubbles' "You"/"Assistant".
_LAST_ASSISTANT_JS = """
function bubbles(root, who) {
  const tagged = [...root.querySelectorAll('.course-chat-' + who)];
  if (tagged.length) return tagged;
  const label = who === 'assistant' ? 'Assistant' : 'You';
  return [...root.querySelectorAll('.widget-html')].filter(h => {
    const b = h.querySelector('b');
    return b && b.textContent.replace(/[^A-Za-z]/g, '') === label;
  });
}
function lastText(root) {
  const all = bubbles(root, 'assistant');
  return all.length ? all[all.length - 1].innerText : null;
}
function button(root, name) {
  const tagged = root.querySelector('.course-chat-' + name.toLowerCase());
  if (tagged) return tagged.tagName === 'BUTTON' ? tagged : tagged.querySelector('button');
  return [...root.querySelectorAll('button')].find(b => b.textContent.trim() === name);
}
"""


class ChatUI:
    """The course ``ChatWidget`` as a student sees it in a cell's output."""

    def __init__(self, page, cell):
        self.page = page
        tagged = cell.locator(".course-chat")
        by_label = cell.locator(".jp-OutputArea-output").filter(
            has=page.get_by_role("button", name="Send", exact=True))
        self.root = tagged.or_(by_label).first
        self.input = self.root.locator(".course-chat-input textarea").or_(
            self.root.locator("textarea")).first
        self.send = self._button("Send")
        self.stop = self._button("Stop")
        self.clear = self._button("Clear")

    def _button(self, name: str):
        tagged = self.root.locator(f".course-chat-{name.lower()}")
        return tagged.or_(self.root.get_by_role("button", name=name, exact=True)).first

    def _eval(self, body: str, arg=None):
        return self.root.evaluate(f"(root, arg) => {{ {_LAST_ASSISTANT_JS} {body} }}", arg)

    def bubble_texts(self, who: str) -> list[str]:
        """The visible text of every "user" or "assistant" bubble, oldest first."""
        return self._eval("return bubbles(root, arg).map(b => b.innerText);", who)

    def last_reply_text(self) -> str | None:
        """The visible text of the newest assistant bubble, without its "🤖 Assistant" label."""
        text = self._eval("return lastText(root);")
        return None if text is None else re.sub(r"^\W*Assistant\s*", "", text)

    def assistant_bubble(self):
        """The newest assistant bubble (for element-level checks)."""
        tagged = self.root.locator(".course-chat-assistant")
        by_label = self.root.locator(".widget-html").filter(
            has=self.page.locator("b", has_text=re.compile(r"Assistant$")))
        return tagged.or_(by_label).last

    def scroll_log_to_end(self) -> None:
        """Scroll the conversation box to its newest message."""
        self._eval("""const all = bubbles(root, 'user').concat(bubbles(root, 'assistant'));
            for (const b of all) { const log = b.parentElement; log.scrollTop = log.scrollHeight; }""")

    def set_max_tokens(self, value: int) -> None:
        """Type ``value`` into the "max tokens" slider's readout, as a student would."""
        slider = self.root.locator(".course-chat-max-tokens").or_(
            self.root.locator(".widget-slider").filter(has_text="max tokens")).first
        readout = slider.locator(".widget-readout")
        readout.click()
        self.page.keyboard.press("ControlOrMeta+A")
        self.page.keyboard.type(str(value))
        self.page.keyboard.press("Enter")
        self.page.wait_for_function("([el, v]) => el.textContent.trim() === String(v)",
                                    arg=[readout.element_handle(), value], timeout=10_000)

    def record_frames(self) -> None:
        """Start recording every distinct text of the newest assistant bubble (to see streaming)."""
        self._eval("""
            window.__chatFrames = [];
            const note = () => { const t = lastText(root);
              const f = window.__chatFrames;
              if (t !== null && f[f.length - 1] !== t) f.push(t); };
            if (window.__chatObserver) window.__chatObserver.disconnect();
            window.__chatObserver = new MutationObserver(note);
            window.__chatObserver.observe(root, {subtree: true, childList: true, characterData: true});""")

    def frames(self) -> list[str]:
        """The bubble texts recorded since ``record_frames``."""
        return self.page.evaluate("() => window.__chatFrames || []")

    def ask(self, question: str) -> int:
        """Type ``question`` and click Send; returns how many assistant bubbles there were before."""
        before = len(self.bubble_texts("assistant"))
        self.input.click()
        self.input.fill(question)
        self.send.click()
        return before

    def wait_started(self, before: int, timeout: float = 60) -> None:
        """Wait until the new question's assistant bubble is on the page."""
        self._wait("return bubbles(root, 'assistant').length > arg;", before, timeout)

    def wait_streaming(self, min_words: int, timeout: float = 120) -> None:
        """Wait until the reply is still streaming (cursor shown) and has ``min_words`` words."""
        self._wait("""const t = lastText(root) || '';
            return t.includes('▌') && t.replace('Assistant', '').trim().split(/\\s+/).length > arg;""",
                   min_words, timeout)

    def wait_idle(self, timeout: float = 240) -> None:
        """Wait until no reply is streaming: Send enabled, Stop disabled, no cursor, no placeholder."""
        self._wait("""const t = (lastText(root) || '').replace(/^\\W*Assistant\\s*/, '').trim();
            const send = button(root, 'Send'), stop = button(root, 'Stop');
            return !send.disabled && stop.disabled && !t.includes('▌') && t !== '…';""", None, timeout)

    def wait_empty(self, timeout: float = 30) -> None:
        """Wait until the conversation box shows no message at all."""
        self._wait("return bubbles(root, 'user').length + bubbles(root, 'assistant').length === 0;",
                   None, timeout)

    def _wait(self, body: str, arg, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._eval(body, arg):
            if time.monotonic() > deadline:
                raise TimeoutError(f"chat widget: timed out after {timeout:.0f} s waiting for "
                                   f"{body.strip().splitlines()[-1].strip()!r}; last reply: "
                                   f"{self.last_reply_text()!r}")
            time.sleep(0.2)


# ---- page lifecycle (used by the fixtures) ------------------------------------------------------

def new_page(browser):
    """A fresh browser context and page that records console errors and uncaught exceptions."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
    context.set_default_timeout(60_000)
    page = context.new_page()
    page.console_errors = []
    page.on("console", lambda msg: msg.type == "error" and page.console_errors.append(msg.text))
    page.on("pageerror", lambda exc: page.console_errors.append(f"uncaught: {exc}"))
    return context, page


def front_end_errors(page) -> list[str]:
    """Console errors and uncaught exceptions, minus the known-benign ones."""
    return [m for m in page.console_errors if not any(p.search(m) for p in BENIGN_CONSOLE)]


def failure_shot(page, node, screenshots) -> None:
    """If ``node``'s set-up or call failed, save a full-page screenshot under failures/."""
    reports = [getattr(node, f"report_{when}", None) for when in ("setup", "call")]
    if any(r is not None and r.failed for r in reports) and not page.is_closed():
        (screenshots / "failures").mkdir(exist_ok=True)
        page.screenshot(path=str(screenshots / "failures" / f"{_slug(node.name)}.png"), full_page=True)


def close_page(context, page, lab, node, screenshots) -> None:
    """Screenshot on failure, close the page, shut the kernels down."""
    try:
        failure_shot(page, node, screenshots)
    finally:
        context.close()
        lab.shutdown_kernels()


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def copy_to_docs(src: Path, docs_images: Path | None, name: str) -> None:
    """Copy a screenshot into docs/images when ``make screenshots`` asked for it."""
    if docs_images is not None:
        shutil.copyfile(src, docs_images / name)
