// lem-serve chat page.
//
// Plain modern JavaScript, no dependencies, no build step: the page must work
// offline and under a strict Content-Security-Policy (no inline scripts, no
// eval). Model output and user text are only ever put into the page with
// textContent / createTextNode, never parsed as HTML.
"use strict";

(() => {
  // =========================================================================
  // Constants
  // =========================================================================

  const STORE_CONVERSATIONS = "lem-chat.conversations.v1";
  const STORE_SETTINGS = "lem-chat.settings.v1";
  const STORE_API_KEY = "lem-chat.api-key";

  // The server sends ": keepalive" comments while it works, so this long a
  // silence (no byte at all, not even a comment) means something is wrong.
  const IDLE_TIMEOUT_MS = 120_000;
  const HEALTH_INTERVAL_MS = 10_000;
  const SAVE_THROTTLE_MS = 1_000;
  const DEFAULT_TEMPERATURE = 0.7;
  const DEFAULT_MAX_TOKENS = 1024;

  // =========================================================================
  // Markdown renderer (pure: text in, DocumentFragment out)
  //
  // A small, forgiving subset of CommonMark/GFM: paragraphs, headings, lists
  // (nested, ordered/unordered), block quotes, fenced code, tables, rules,
  // and inline code, bold, italic, strikethrough, links. It also copes with
  // half-written input, because it re-renders on every streamed token: an
  // unclosed fence or <think> block renders as if it were closed.
  // =========================================================================

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    if (attrs) {
      for (const [key, value] of Object.entries(attrs)) {
        if (value === undefined || value === null || value === false) continue;
        if (key === "text") el.textContent = value;
        else if (key === "className") el.className = value;
        else el.setAttribute(key, value === true ? "" : String(value));
      }
    }
    for (const child of children) {
      if (child !== null && child !== undefined) el.append(child);
    }
    return el;
  }

  function renderMarkdown(text) {
    const frag = document.createDocumentFragment();
    for (const part of splitThink(String(text ?? ""))) {
      if (part.think) frag.append(renderThink(part.text, part.open));
      else renderBlocks(part.text, frag);
    }
    return frag;
  }

  // Split reasoning (<think>...</think>) from the answer. Some chat templates
  // put the opening <think> in the prompt, so a reply may start inside the
  // block and only contain the closing tag.
  function splitThink(text) {
    const parts = [];
    const firstOpen = text.indexOf("<think>");
    const firstClose = text.indexOf("</think>");
    let rest = text;
    if (firstClose !== -1 && (firstOpen === -1 || firstClose < firstOpen)) {
      parts.push({ think: true, text: text.slice(0, firstClose), open: false });
      rest = text.slice(firstClose + "</think>".length);
    }
    for (;;) {
      const start = rest.indexOf("<think>");
      if (start === -1) break;
      if (start > 0) parts.push({ think: false, text: rest.slice(0, start) });
      const after = rest.slice(start + "<think>".length);
      const end = after.indexOf("</think>");
      if (end === -1) {
        parts.push({ think: true, text: after, open: true });
        rest = "";
        break;
      }
      parts.push({ think: true, text: after.slice(0, end), open: false });
      rest = after.slice(end + "</think>".length);
    }
    if (rest) parts.push({ think: false, text: rest });
    return parts;
  }

  function renderThink(text, stillThinking) {
    const body = h("div", { className: "think-body" });
    renderBlocks(text.trim(), body);
    // Collapsed by default: the reasoning is there if wanted, not in the way.
    return h("details", { className: "think", "data-thinking": stillThinking ? "true" : null },
      h("summary", { text: stillThinking ? "Thinking…" : "Reasoning" }),
      body);
  }

  const RE_BLANK = /^\s*$/;
  const RE_FENCE = /^( {0,3})(`{3,}|~{3,})\s*([^\s`]*)[^`]*$/;
  const RE_HEADING = /^ {0,3}(#{1,6})(?:\s+(.*?))?(?:\s+#+)?\s*$/;
  const RE_RULE = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
  const RE_QUOTE = /^ {0,3}> ?(.*)$/;
  const RE_ITEM = /^(\s*)([-*+]|\d{1,9}[.)])(\s+(.*)|$)/;
  const RE_TABLE_DELIM = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;

  function leadingSpaces(line) {
    return line.length - line.trimStart().length;
  }

  function isTableStart(lines, i) {
    return i + 1 < lines.length && lines[i].includes("|") &&
      lines[i + 1].includes("|") && RE_TABLE_DELIM.test(lines[i + 1]);
  }

  // Does this line start a block that ends a paragraph?
  function startsBlock(lines, i) {
    const line = lines[i];
    return RE_FENCE.test(line) || RE_HEADING.test(line) || RE_RULE.test(line) ||
      RE_QUOTE.test(line) || RE_ITEM.test(line) || isTableStart(lines, i);
  }

  function renderBlocks(src, parent) {
    const lines = src.replace(/\r\n?/g, "\n").replace(/\t/g, "    ").split("\n");
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if (RE_BLANK.test(line)) { i++; continue; }
      if ((m = line.match(RE_FENCE))) { i = parseFence(lines, i, m, parent); continue; }
      if ((m = line.match(RE_HEADING))) {
        const level = m[1].length;
        parent.append(renderInline(m[2] || "", h(`h${Math.min(level + 2, 6)}`, { "data-md-level": level })));
        i++;
        continue;
      }
      if (RE_RULE.test(line)) { parent.append(h("hr")); i++; continue; }
      if (RE_QUOTE.test(line)) { i = parseQuote(lines, i, parent); continue; }
      if (RE_ITEM.test(line)) { i = parseList(lines, i, parent); continue; }
      if (isTableStart(lines, i)) { i = parseTable(lines, i, parent); continue; }
      i = parseParagraph(lines, i, parent);
    }
    return parent;
  }

  function parseFence(lines, start, m, parent) {
    const indent = m[1].length;
    const fence = m[2];
    const lang = m[3] || "";
    const body = [];
    let i = start + 1;
    for (; i < lines.length; i++) {
      const close = lines[i].match(/^ {0,3}(`{3,}|~{3,})\s*$/);
      if (close && close[1][0] === fence[0] && close[1].length >= fence.length) { i++; break; }
      // Strip the fence's own indentation from the content, as CommonMark does.
      body.push(lines[i].slice(Math.min(indent, leadingSpaces(lines[i]))));
    }
    parent.append(renderCodeBlock(body.join("\n"), lang));
    return i;
  }

  function renderCodeBlock(code, lang) {
    const codeEl = h("code", { text: code, className: lang ? `language-${lang}` : null });
    return h("div", { className: "code-block" },
      h("div", { className: "code-head" },
        h("span", { className: "code-lang", text: lang || "text" }),
        h("button", { type: "button", className: "btn small ghost copy-code", "aria-label": lang ? `Copy ${lang} code` : "Copy code", text: "Copy" })),
      h("pre", null, codeEl));
  }

  function parseQuote(lines, start, parent) {
    const body = [];
    let i = start;
    while (i < lines.length) {
      const m = lines[i].match(RE_QUOTE);
      if (m) body.push(m[1]);
      else if (!RE_BLANK.test(lines[i]) && body.length && !RE_BLANK.test(body[body.length - 1]) && !startsBlock(lines, i)) body.push(lines[i]); // lazy continuation
      else break;
      i++;
    }
    parent.append(renderBlocks(body.join("\n"), h("blockquote")));
    return i;
  }

  // Lists: each item's lines (minus the marker's indentation) are rendered
  // recursively, which gives nested lists and code inside items for free.
  function parseList(lines, start, parent) {
    const first = lines[start].match(RE_ITEM);
    const indent = first[1].length;
    const ordered = /\d/.test(first[2]);
    const list = h(ordered ? "ol" : "ul");
    if (ordered && parseInt(first[2], 10) !== 1) list.setAttribute("start", parseInt(first[2], 10));
    const isSibling = (m) => m && m[1].length >= indent && m[1].length <= indent + 1 && /\d/.test(m[2]) === ordered;

    let i = start;
    while (i < lines.length) {
      const m = lines[i].match(RE_ITEM);
      if (!isSibling(m)) break;
      const contentIndent = m[1].length + m[2].length + 1;
      const body = [m[4] || ""];
      i++;
      while (i < lines.length) {
        const line = lines[i];
        if (RE_BLANK.test(line)) {
          // A blank line continues the item only if indented content follows.
          let j = i + 1;
          while (j < lines.length && RE_BLANK.test(lines[j])) j++;
          if (j < lines.length && leadingSpaces(lines[j]) > indent && !isSibling(lines[j].match(RE_ITEM))) {
            for (; i < j; i++) body.push("");
            continue;
          }
          break;
        }
        const im = line.match(RE_ITEM);
        if (im && im[1].length <= indent + 1) break; // next sibling, or the list ends
        if (leadingSpaces(line) > indent) {
          body.push(line.slice(Math.min(contentIndent, leadingSpaces(line))));
          i++;
          continue;
        }
        if (!startsBlock(lines, i) && !RE_BLANK.test(body[body.length - 1])) { body.push(line); i++; continue; } // lazy continuation
        break;
      }
      list.append(renderBlocks(body.join("\n"), h("li")));
      // Blank lines between items keep the list going.
      let j = i;
      while (j < lines.length && RE_BLANK.test(lines[j])) j++;
      if (j < lines.length && isSibling(lines[j].match(RE_ITEM))) i = j;
      else break;
    }
    parent.append(list);
    return i;
  }

  function splitRow(line) {
    let s = line.trim();
    if (s.startsWith("|")) s = s.slice(1);
    if (s.endsWith("|") && !s.endsWith("\\|")) s = s.slice(0, -1);
    const cells = [];
    let cur = "";
    for (let k = 0; k < s.length; k++) {
      if (s[k] === "\\" && s[k + 1] === "|") { cur += "|"; k++; }
      else if (s[k] === "|") { cells.push(cur.trim()); cur = ""; }
      else cur += s[k];
    }
    cells.push(cur.trim());
    return cells;
  }

  function parseTable(lines, start, parent) {
    const header = splitRow(lines[start]);
    const aligns = splitRow(lines[start + 1]).map((c) =>
      c.startsWith(":") && c.endsWith(":") ? "center" : c.endsWith(":") ? "right" : c.startsWith(":") ? "left" : null);
    const cell = (tag, text, col) => {
      const el = renderInline(text, h(tag));
      if (aligns[col]) el.style.textAlign = aligns[col];
      return el;
    };
    const headRow = h("tr");
    header.forEach((text, col) => headRow.append(cell("th", text, col)));
    const tbody = h("tbody");
    let i = start + 2;
    for (; i < lines.length && lines[i].includes("|") && !RE_BLANK.test(lines[i]); i++) {
      const row = h("tr");
      const cells = splitRow(lines[i]);
      header.forEach((_, col) => row.append(cell("td", cells[col] || "", col)));
      tbody.append(row);
    }
    parent.append(h("div", { className: "table-wrap" }, h("table", null, h("thead", null, headRow), tbody)));
    return i;
  }

  function parseParagraph(lines, start, parent) {
    const p = h("p");
    let i = start;
    while (i < lines.length && !RE_BLANK.test(lines[i]) && (i === start || !startsBlock(lines, i))) {
      // Chat models write line-oriented text, so a single newline is a line break.
      if (i > start) p.append(h("br"));
      renderInline(lines[i].trim(), p);
      i++;
    }
    parent.append(p);
    return i;
  }

  // Inline rules, tried at every position; the earliest match wins, then the
  // order below breaks ties. Content of emphasis and links is parsed again.
  const INLINE_RULES = [
    { name: "escape", re: /\\([!-/:-@[-`{-~])/g },
    { name: "code", re: /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/g },
    { name: "autolink", re: /<((?:https?:\/\/|mailto:)[^\s<>]+)>/g },
    { name: "image", re: /!\[([^\]\n]*)\]\(\s*<?([^\s<>()]+)>?(?:\s+"[^"\n]*")?\s*\)/g },
    { name: "link", re: /\[([^\]\n]+)\]\(\s*<?([^\s<>()]+)>?(?:\s+"[^"\n]*")?\s*\)/g },
    { name: "strong", re: /\*\*(?=\S)([\s\S]*?\S)\*\*/g },
    { name: "strong", re: /(?<![\p{L}\p{N}_])__(?=\S)([\s\S]*?\S)__(?![\p{L}\p{N}_])/gu },
    { name: "del", re: /~~(?=\S)([\s\S]*?\S)~~/g },
    { name: "em", re: /\*(?=[^\s*])([\s\S]*?[^\s*])\*(?!\*)/g },
    { name: "em", re: /(?<![\p{L}\p{N}_])_(?=[^\s_])([\s\S]*?[^\s_])_(?![\p{L}\p{N}_])/gu },
    { name: "url", re: /\bhttps?:\/\/[^\s<>()[\]]*[^\s<>()[\].,;:!?'"*_~]/g },
  ];

  function safeHref(url) {
    return /^(https?:|mailto:)/i.test(url) ? url : null;
  }

  // A link only for http(s) and mailto; anything else (javascript:, data:, ...)
  // is shown as the source text it came from.
  function renderLink(label, url, source, parseLabel = false) {
    const href = safeHref(url);
    if (!href) return document.createTextNode(source);
    const a = h("a", { href, target: "_blank", rel: "noopener noreferrer nofollow" });
    if (parseLabel) renderInline(label, a);
    else a.textContent = label;
    return a;
  }

  function renderInline(text, parent) {
    const next = INLINE_RULES.map(() => undefined); // cached next match per rule
    let pos = 0;
    while (pos < text.length) {
      let best = null;
      let bestRule = null;
      INLINE_RULES.forEach((rule, k) => {
        if (next[k] === undefined || (next[k] && next[k].index < pos)) {
          rule.re.lastIndex = pos;
          next[k] = rule.re.exec(text);
        }
        const m = next[k];
        if (m && (!best || m.index < best.index)) { best = m; bestRule = rule; }
      });
      if (!best) break;
      if (best.index > pos) parent.append(document.createTextNode(text.slice(pos, best.index)));
      parent.append(renderInlineMatch(bestRule.name, best));
      pos = best.index + best[0].length;
    }
    if (pos < text.length) parent.append(document.createTextNode(text.slice(pos)));
    return parent;
  }

  function renderInlineMatch(name, m) {
    switch (name) {
      case "escape": return document.createTextNode(m[1]);
      case "code": {
        let code = m[2];
        if (/^ .*[^ ].* $/s.test(code)) code = code.slice(1, -1);
        return h("code", { text: code });
      }
      case "autolink": return renderLink(m[1].replace(/^mailto:/i, ""), m[1], m[0]);
      case "image": return renderLink(m[1] ? `[image: ${m[1]}]` : "[image]", m[2], m[0]); // never load remote images
      case "link": return renderLink(m[1], m[2], m[0], true);
      case "url": return renderLink(m[0], m[0], m[0]);
      case "strong": return renderInline(m[1], h("strong"));
      case "em": return renderInline(m[1], h("em"));
      case "del": return renderInline(m[1], h("del"));
      default: return document.createTextNode(m[0]);
    }
  }

  // Reasoning is not sent back to the model in later turns.
  function stripThink(text) {
    return splitThink(text).filter((p) => !p.think).map((p) => p.text).join("").trim();
  }

  // =========================================================================
  // Storage: settings, API key, conversations (localStorage)
  // =========================================================================

  function readJSON(key, fallback) {
    try {
      const raw = localStorage.getItem(key);
      return raw ? JSON.parse(raw) : fallback;
    } catch {
      return fallback;
    }
  }

  function writeJSON(key, value) {
    try {
      localStorage.setItem(key, JSON.stringify(value));
      return true;
    } catch {
      return false; // quota exceeded or storage disabled
    }
  }

  function readMeta(name) {
    const el = document.querySelector(`meta[name="${name}"]`);
    const value = el ? el.content.trim() : "";
    return value.startsWith("{{") ? "" : value; // placeholder not filled in: page opened from disk
  }

  const server = {
    model: readMeta("lem-model"),
    maxTokens: parseInt(readMeta("lem-max-tokens"), 10) || null,
  };

  function loadSettings() {
    const s = readJSON(STORE_SETTINGS, {});
    return {
      systemPrompt: typeof s.systemPrompt === "string" ? s.systemPrompt : "",
      temperature: Number.isFinite(s.temperature) ? s.temperature : DEFAULT_TEMPERATURE,
      maxTokens: Number.isInteger(s.maxTokens) ? s.maxTokens : DEFAULT_MAX_TOKENS,
    };
  }

  function effectiveMaxTokens() {
    const wanted = Math.max(1, state.settings.maxTokens | 0);
    return server.maxTokens ? Math.min(wanted, server.maxTokens) : wanted;
  }

  function loadConversations() {
    const data = readJSON(STORE_CONVERSATIONS, null);
    const list = data && Array.isArray(data.conversations) ? data.conversations : [];
    // A reply that was streaming when the page went away can't be resumed.
    for (const conv of list) {
      for (const msg of conv.messages || []) {
        if (msg.status === "streaming") msg.status = "stopped";
      }
    }
    return { conversations: list, currentId: data ? data.currentId : null };
  }

  let saveTimer = 0;
  function saveConversations() {
    clearTimeout(saveTimer);
    saveTimer = 0;
    const data = { conversations: state.conversations, currentId: state.currentId };
    // When storage is full, drop the oldest conversations until it fits.
    while (!writeJSON(STORE_CONVERSATIONS, data) && state.conversations.length > 1) {
      state.conversations.pop();
    }
  }

  // During streaming, save at most once a second so a reload keeps most of it.
  function saveSoon() {
    if (!saveTimer) saveTimer = setTimeout(saveConversations, SAVE_THROTTLE_MS);
  }

  // =========================================================================
  // State
  // =========================================================================

  const state = {
    settings: loadSettings(),
    apiKey: localStorage.getItem(STORE_API_KEY) || "",
    conversations: [],
    currentId: null,
    run: null, // the request in flight, if any: { controller, conv, msg, ... }
    stickToBottom: true,
  };
  Object.assign(state, loadConversations());

  const $ = (id) => document.getElementById(id);
  const ui = {};
  const messageViews = new WeakMap(); // message object -> its DOM element

  function currentConversation() {
    return state.conversations.find((c) => c.id === state.currentId) || null;
  }

  function newId() {
    return Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
  }

  function titleFrom(text) {
    const line = text.trim().split("\n")[0];
    return line.length > 60 ? `${line.slice(0, 57)}…` : line || "New chat";
  }

  // =========================================================================
  // Rendering: conversation list, transcript, messages
  // =========================================================================

  function formatDate(ts) {
    const d = new Date(ts);
    const today = new Date();
    return d.toDateString() === today.toDateString()
      ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
      : d.toLocaleDateString([], { month: "short", day: "numeric" });
  }

  function renderConversationList() {
    const items = state.conversations.map((conv) => {
      const current = conv.id === state.currentId;
      const open = h("button", { type: "button", className: "conv-open", "data-id": conv.id, "aria-current": current ? "page" : null },
        h("span", { className: "conv-title", text: conv.title || "New chat" }),
        h("span", { className: "conv-date", text: formatDate(conv.updated || conv.created) }));
      const del = h("button", { type: "button", className: "btn icon small ghost conv-del", "data-delete": conv.id,
        "aria-label": `Delete conversation: ${conv.title || "New chat"}`, title: "Delete", text: "×" });
      return h("li", { className: current ? "current" : null }, open, del);
    });
    if (!items.length) items.push(h("li", { className: "conv-empty", text: "No conversations yet." }));
    ui.convList.replaceChildren(...items);
  }

  function renderEmptyState() {
    const name = server.model || "the model";
    return h("div", { className: "empty", id: "empty-state" },
      h("h2", { text: `Chat with ${name}` }),
      h("p", { text: "Replies stream from this lem-serve instance. Nothing leaves this machine." }),
      h("p", null, "Press ", h("span", { className: "kbd", text: "Enter" }), " to send, ",
        h("span", { className: "kbd", text: "Shift" }), "+", h("span", { className: "kbd", text: "Enter" }), " for a new line."));
  }

  function renderTranscript() {
    const conv = currentConversation();
    if (!conv || !conv.messages.length) {
      ui.thread.replaceChildren(renderEmptyState());
    } else {
      ui.thread.replaceChildren(...conv.messages.map((msg, idx) => renderMessage(msg, idx === conv.messages.length - 1)));
    }
    state.stickToBottom = true;
    scrollToBottom();
  }

  function renderMessage(msg, isLast) {
    const el = h("article", { className: `msg ${msg.role}`, "data-role": msg.role });
    messageViews.set(msg, el);
    updateMessage(msg, el, isLast);
    return el;
  }

  // Re-render one message in place (called for each streamed chunk, batched
  // per animation frame). Open/closed state of reasoning blocks survives.
  function updateMessage(msg, el = messageViews.get(msg), isLast = true) {
    if (!el) return;
    const openThinks = [...el.querySelectorAll(".msg-body details")].map((d) => d.open);
    el.dataset.state = msg.status || "done";
    const label = h("div", { className: "msg-role", text: msg.role === "user" ? "You" : (msg.model || server.model || "Assistant") });
    let body;
    if (msg.role === "user") {
      body = h("div", { className: "msg-body", text: msg.content }); // user text is shown verbatim
    } else {
      body = h("div", { className: "msg-body md" }, renderMarkdown(msg.content));
      body.querySelectorAll("details").forEach((d, k) => { if (openThinks[k]) d.open = true; });
    }
    const parts = [label, body];
    if (msg.error) parts.push(renderError(msg));
    parts.push(renderMeta(msg, isLast));
    el.replaceChildren(...parts);
    if (msg.chunks) el.dataset.chunks = msg.chunks;
  }

  function renderError(msg) {
    const err = msg.error;
    const box = h("div", { className: "msg-error", role: "alert", "data-kind": err.kind },
      h("p", { text: err.message }));
    if (err.kind === "auth") {
      box.append(h("button", { type: "button", className: "btn small", "data-action": "api-key", text: "Enter API key" }));
    }
    if (err.retryable !== false) {
      box.append(h("button", { type: "button", className: "btn small", "data-action": "retry", text: "Retry" }));
    }
    return box;
  }

  function renderMeta(msg, isLast) {
    const meta = h("div", { className: "msg-meta" });
    if (msg.role === "assistant" && msg.status === "streaming") {
      meta.append(h("span", { className: "msg-stats", text: "Generating…" }));
      return meta;
    }
    if (msg.role === "assistant") {
      const stats = statsText(msg);
      if (stats) meta.append(h("span", { className: "msg-stats", text: stats.text, title: stats.title }));
      if (msg.status === "stopped") meta.append(h("span", { className: "msg-note", text: "Stopped" }));
      if (msg.finishReason === "length") meta.append(h("span", { className: "msg-note", text: "Hit the max tokens limit" }));
    }
    if (msg.content) {
      const actions = h("span", { className: "msg-actions" },
        h("button", { type: "button", className: "btn small ghost", "data-action": "copy", text: "Copy",
          "aria-label": msg.role === "user" ? "Copy message" : "Copy reply" }));
      if (msg.role === "assistant" && isLast && !msg.error) {
        actions.append(h("button", { type: "button", className: "btn small ghost", "data-action": "regenerate", text: "Regenerate" }));
      }
      meta.append(actions);
    }
    return meta;
  }

  function statsText(msg) {
    const s = msg.stats;
    if (!s) return null;
    const parts = [];
    const title = [];
    if (s.completionTokens != null) parts.push(`${s.completionTokens} tokens`);
    else if (s.chunks) parts.push(`~${s.chunks} tokens`);
    if (s.tokensPerSecond) parts.push(`${s.tokensPerSecond.toFixed(1)} tok/s`);
    if (s.promptTokens != null) parts.push(`prompt ${s.promptTokens}`);
    if (s.firstTokenMs != null) title.push(`First token after ${(s.firstTokenMs / 1000).toFixed(2)} s`);
    if (s.totalMs != null) title.push(`Total ${(s.totalMs / 1000).toFixed(2)} s`);
    if (s.tokensPerSecond) title.push(s.endToEnd ? "Speed counted over the whole request" : "Speed counted from the first token to the last");
    return { text: parts.join(" · "), title: title.join("\n") };
  }

  // Batch re-renders of the streaming message to one per frame.
  let renderQueued = false;
  function scheduleRender() {
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(() => {
      renderQueued = false;
      if (state.run && state.run.conv.id === state.currentId) {
        updateMessage(state.run.msg);
        scrollToBottom();
      }
    });
  }

  // =========================================================================
  // Auto-scroll: follow the reply unless the user scrolled up to read.
  // =========================================================================

  function distanceFromBottom() {
    const t = ui.transcript;
    return t.scrollHeight - t.scrollTop - t.clientHeight;
  }

  function scrollToBottom(force) {
    if (force) state.stickToBottom = true;
    if (state.stickToBottom) ui.transcript.scrollTop = ui.transcript.scrollHeight;
    updateJumpButton();
  }

  function updateJumpButton() {
    ui.jump.hidden = state.stickToBottom || distanceFromBottom() < 8;
  }

  // A scroll caused by the transcript changing size (phone keyboard, window
  // resize, the message box growing) is not the user scrolling away.
  let transcriptHeight = 0;
  function onTranscriptScroll() {
    if (ui.transcript.clientHeight !== transcriptHeight) {
      transcriptHeight = ui.transcript.clientHeight;
      scrollToBottom();
      return;
    }
    state.stickToBottom = distanceFromBottom() < 48;
    updateJumpButton();
  }

  function onTranscriptResize() {
    transcriptHeight = ui.transcript.clientHeight;
    scrollToBottom();
  }

  // =========================================================================
  // Talking to the server
  // =========================================================================

  function authHeaders() {
    return state.apiKey ? { Authorization: `Bearer ${state.apiKey}` } : {};
  }

  // Build the messages array: system prompt, then the turns. Failed empty
  // replies are skipped and consecutive same-role turns merged, because many
  // chat templates insist that user and assistant alternate.
  function buildMessages(conv) {
    const out = [];
    const system = state.settings.systemPrompt.trim();
    if (system) out.push({ role: "system", content: system });
    for (const msg of conv.messages) {
      if (msg.status === "streaming") continue;
      const content = msg.role === "assistant" ? stripThink(msg.content) : msg.content;
      if (!content) continue;
      const last = out[out.length - 1];
      if (last && last.role === msg.role) last.content += `\n\n${content}`;
      else out.push({ role: msg.role, content });
    }
    return out;
  }

  async function errorFromResponse(res) {
    let detail = "";
    try {
      const body = await res.json();
      detail = (body && body.error && body.error.message) || "";
    } catch {
      /* not JSON: fall back to the status text */
    }
    const retryAfter = parseInt(res.headers.get("Retry-After") || "", 10);
    switch (res.status) {
      case 401:
      case 403:
        return { kind: "auth", message: state.apiKey
          ? `The server rejected the API key (${res.status}).${detail ? ` ${detail}` : ""}`
          : "The server needs an API key." };
      case 429:
        return { kind: "busy", message: `Server busy: it is already answering as many requests as it allows.${
          Number.isFinite(retryAfter) ? ` Try again in ${retryAfter} s.` : " Try again in a moment."}${detail ? ` (${detail})` : ""}` };
      case 503:
        return { kind: "unavailable", message: `The model is unavailable (503).${detail ? ` ${detail}` : ""}` };
      case 504:
        return { kind: "timeout", message: `The server timed out (504).${detail ? ` ${detail}` : ""}` };
      case 400:
        return { kind: "invalid", retryable: false, message: `The server refused the request: ${detail || "bad request"}.${
          /max_tokens|context/i.test(detail) ? " Lower “Max tokens” in Settings, or start a new chat." : ""}` };
      default:
        return { kind: "http", message: `Request failed (${res.status}${res.statusText ? ` ${res.statusText}` : ""}).${detail ? ` ${detail}` : ""}`,
          retryable: res.status >= 500 || res.status === 408 };
    }
  }

  // Parse the SSE stream: events are separated by blank lines, each has one
  // or more "data:" lines; lines starting with ":" are keepalive comments.
  async function readEventStream(res, run, onData) {
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let data = [];
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return false;
      run.lastActivity = Date.now();
      buffer += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buffer.indexOf("\n")) !== -1) {
        let line = buffer.slice(0, nl);
        buffer = buffer.slice(nl + 1);
        if (line.endsWith("\r")) line = line.slice(0, -1);
        if (line === "") {
          if (data.length && onData(data.join("\n")) === "done") {
            reader.cancel().catch(() => {});
            return true;
          }
          data = [];
        } else if (line.startsWith("data:")) {
          data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
        } // ":" comments and other fields (event:, id:, retry:) are ignored
      }
    }
  }

  function handleChunk(run, payload) {
    if (payload === "[DONE]") return "done";
    let chunk;
    try {
      chunk = JSON.parse(payload);
    } catch {
      return null; // a malformed chunk is skipped rather than killing the reply
    }
    if (chunk.error) {
      // Headers were already sent, so errors after the stream started arrive in-band.
      const e = chunk.error;
      const timedOut = e.code === "timeout" || e.type === "timeout_error";
      run.msg.error = timedOut
        ? { kind: "timeout", message: `The server timed out: ${e.message || "the request took too long"}.` }
        : { kind: "server", message: `The server reported an error: ${e.message || "unknown error"}` };
      return null;
    }
    if (chunk.model && !run.msg.model) run.msg.model = chunk.model;
    if (chunk.usage) run.usage = chunk.usage;
    const choice = chunk.choices && chunk.choices[0];
    if (choice) {
      const delta = choice.delta || {};
      if (typeof delta.content === "string" && delta.content) {
        const now = performance.now();
        if (!run.firstTokenAt) run.firstTokenAt = now;
        run.lastTokenAt = now;
        run.msg.content += delta.content;
        run.msg.chunks = (run.msg.chunks || 0) + 1;
        scheduleRender();
        saveSoon();
      }
      if (choice.finish_reason) run.msg.finishReason = choice.finish_reason;
    }
    return null;
  }

  function finishStats(run) {
    const msg = run.msg;
    const u = run.usage;
    const stats = {
      promptTokens: u ? u.prompt_tokens : null,
      completionTokens: u ? u.completion_tokens : null,
      chunks: msg.chunks || 0,
      totalMs: Math.round(performance.now() - run.startedAt),
      firstTokenMs: run.firstTokenAt ? Math.round(run.firstTokenAt - run.startedAt) : null,
      tokensPerSecond: null,
    };
    const count = stats.completionTokens ?? stats.chunks;
    const spanMs = run.lastTokenAt - run.firstTokenAt;
    if (count > 1 && spanMs >= 250 && (msg.chunks || 0) >= 4) {
      // Decoding speed: n tokens arrive over n-1 intervals after the first one.
      stats.tokensPerSecond = ((count - 1) * 1000) / spanMs;
    } else if (count > 0 && run.lastTokenAt > run.startedAt) {
      // A short reply that arrived in a burst: a first-to-last rate would be
      // meaningless, so count the whole request instead.
      stats.tokensPerSecond = (count * 1000) / (run.lastTokenAt - run.startedAt);
      stats.endToEnd = true;
    }
    msg.stats = stats;
  }

  async function generate(conv) {
    const msg = { role: "assistant", content: "", status: "streaming", created: Date.now() };
    conv.messages.push(msg);
    conv.updated = Date.now();
    const controller = new AbortController();
    const run = { controller, conv, msg, reason: null, startedAt: performance.now(), firstTokenAt: 0,
      lastTokenAt: 0, lastActivity: Date.now(), usage: null, gotResponse: false };
    state.run = run;
    setBusy(true);
    if (conv.id === state.currentId) renderTranscript();
    announce("Generating a reply…");
    setTimeout(() => { if (state.run === run) refreshHealth(); }, 300); // show "Busy" in the header

    const watchdog = setInterval(() => {
      if (Date.now() - run.lastActivity > IDLE_TIMEOUT_MS) {
        run.reason = "timeout";
        controller.abort();
      }
    }, 1000);

    const body = {
      messages: buildMessages(conv),
      stream: true,
      stream_options: { include_usage: true },
      temperature: state.settings.temperature,
    };
    // At the server's own limit, leave max_tokens out: the server then trims the
    // budget to what fits the model's context, where an explicit value that
    // cannot fit is refused (context_length_exceeded), as OpenAI does.
    const maxTokens = effectiveMaxTokens();
    if (!server.maxTokens || maxTokens < server.maxTokens) body.max_tokens = maxTokens;
    try {
      const res = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...authHeaders() },
        body: JSON.stringify(body),
        signal: controller.signal,
        cache: "no-store",
      });
      run.gotResponse = true;
      run.lastActivity = Date.now();
      if (!res.ok) {
        msg.error = await errorFromResponse(res);
      } else {
        const sawDone = await readEventStream(res, run, (payload) => handleChunk(run, payload));
        if (!sawDone && !msg.error && !msg.finishReason) {
          msg.error = { kind: "dropped", message: "The connection closed before the reply finished." };
        }
      }
    } catch (err) {
      if (run.reason === "stop") {
        /* the user pressed Stop: keep what arrived */
      } else if (run.reason === "timeout") {
        msg.error = { kind: "timeout", message: `No response from the server for ${IDLE_TIMEOUT_MS / 1000} s; gave up.` };
      } else if (run.gotResponse) {
        msg.error = { kind: "dropped", message: "The connection to the server was lost while the reply was streaming." };
      } else {
        msg.error = { kind: "network", message: `Could not reach the server${err && err.message ? ` (${err.message})` : ""}.` };
      }
    } finally {
      clearInterval(watchdog);
      msg.status = run.reason === "stop" ? "stopped" : msg.error ? "error" : "done";
      finishStats(run);
      state.run = null;
      setBusy(false);
      saveConversations();
      if (conv.id === state.currentId) {
        updateMessage(msg);
        scrollToBottom();
      }
      announce(msg.error ? msg.error.message : msg.status === "stopped" ? "Stopped." : `Reply complete. ${statsText(msg)?.text || ""}`);
      refreshHealth();
      if (msg.error && msg.error.kind === "auth") openKeyDialog();
    }
  }

  function stopGenerating() {
    if (!state.run) return;
    state.run.reason = "stop";
    // Aborting closes the connection; the server then frees its slot.
    state.run.controller.abort();
  }

  // =========================================================================
  // Actions
  // =========================================================================

  function sendMessage() {
    const text = ui.prompt.value;
    if (!text.trim()) return;
    if (state.run) {
      announce("Wait for the current reply to finish, or press Stop.");
      return;
    }
    let conv = currentConversation();
    if (!conv) {
      conv = { id: newId(), title: titleFrom(text), created: Date.now(), updated: Date.now(), messages: [] };
      state.conversations.unshift(conv);
      state.currentId = conv.id;
    }
    // A failed, empty reply is dropped from view when the user moves on.
    const last = conv.messages[conv.messages.length - 1];
    if (last && last.role === "assistant" && last.error && !last.content) conv.messages.pop();
    conv.messages.push({ role: "user", content: text, created: Date.now() });
    moveToTop(conv);
    ui.prompt.value = "";
    autoSizePrompt();
    renderConversationList();
    saveConversations();
    generate(conv);
  }

  function moveToTop(conv) {
    const idx = state.conversations.indexOf(conv);
    if (idx > 0) {
      state.conversations.splice(idx, 1);
      state.conversations.unshift(conv);
    }
  }

  // Retry / regenerate: drop the last reply and ask again.
  function regenerate() {
    const conv = currentConversation();
    if (!conv || state.run) return;
    const last = conv.messages[conv.messages.length - 1];
    if (last && last.role === "assistant") conv.messages.pop();
    if (!conv.messages.length) return;
    generate(conv);
  }

  function newChat() {
    openConversation(null); // no current conversation: the next message starts one
  }

  function openConversation(id) {
    state.currentId = id;
    saveConversations();
    renderConversationList();
    renderTranscript();
    closeSidebarIfOverlay();
    ui.prompt.focus();
  }

  function deleteConversation(id) {
    if (state.run && state.run.conv.id === id) stopGenerating();
    state.conversations = state.conversations.filter((c) => c.id !== id);
    if (state.currentId === id) state.currentId = null;
    saveConversations();
    renderConversationList();
    renderTranscript();
    announce("Conversation deleted.");
  }

  async function copyText(text) {
    // The Clipboard API needs a secure context; over plain http on a LAN
    // address it is missing, so fall back to a hidden textarea.
    try {
      if (navigator.clipboard && window.isSecureContext) {
        await navigator.clipboard.writeText(text);
        return true;
      }
    } catch {
      /* fall through */
    }
    const ta = h("textarea", { readonly: true, "aria-hidden": "true" });
    ta.value = text;
    ta.style.position = "fixed";
    ta.style.opacity = "0";
    document.body.append(ta);
    ta.select();
    let ok = false;
    try {
      ok = document.execCommand("copy");
    } catch {
      ok = false;
    }
    ta.remove();
    return ok;
  }

  async function copyWithFeedback(button, text) {
    const ok = await copyText(text);
    const original = button.textContent;
    button.textContent = ok ? "Copied" : "Copy failed";
    announce(ok ? "Copied to the clipboard." : "Could not copy.");
    setTimeout(() => { if (button.isConnected) button.textContent = original; }, 1500);
  }

  function messageOf(el) {
    const conv = currentConversation();
    const article = el.closest("article.msg");
    if (!conv || !article) return null;
    const idx = [...ui.thread.children].indexOf(article);
    return conv.messages[idx] || null;
  }

  function onThreadClick(event) {
    const button = event.target.closest("button");
    if (!button) return;
    if (button.classList.contains("copy-code")) {
      const code = button.closest(".code-block").querySelector("code");
      copyWithFeedback(button, code.textContent);
      return;
    }
    const action = button.dataset.action;
    if (action === "copy") {
      const msg = messageOf(button);
      if (msg) copyWithFeedback(button, msg.content);
    } else if (action === "retry" || action === "regenerate") {
      regenerate();
    } else if (action === "api-key") {
      openKeyDialog();
    }
  }

  // =========================================================================
  // Busy state, composer, announcements
  // =========================================================================

  function setBusy(busy) {
    ui.send.hidden = busy;
    ui.stop.hidden = !busy;
    // Keep keyboard focus on the composer's action button when it swaps.
    if (busy && document.activeElement === ui.send) ui.stop.focus();
    if (!busy && document.activeElement === ui.stop) ui.send.focus();
  }

  function autoSizePrompt() {
    ui.prompt.style.height = "auto";
    ui.prompt.style.height = `${Math.min(ui.prompt.scrollHeight, window.innerHeight * 0.4)}px`;
  }

  function onPromptKeydown(event) {
    if (event.key === "Enter" && !event.shiftKey && !event.altKey && !event.isComposing) {
      event.preventDefault(); // Enter sends, Shift+Enter inserts a newline
      sendMessage();
    } else if (event.key === "Escape" && state.run) {
      event.preventDefault();
      stopGenerating();
    }
  }

  let announceTimer = 0;
  function announce(text) {
    // Screen readers hear status changes, not every streamed token.
    clearTimeout(announceTimer);
    ui.announcer.textContent = "";
    announceTimer = setTimeout(() => { ui.announcer.textContent = text; }, 50);
  }

  function renderSettingsSummary() {
    const s = state.settings;
    const parts = [`Temperature ${s.temperature}`, `Max ${effectiveMaxTokens()} tokens`];
    if (s.systemPrompt.trim()) parts.push("System prompt on");
    ui.settingsSummary.textContent = parts.join(" · ");
    ui.settingsSummary.setAttribute("aria-label", `Settings: ${parts.join(", ")}`);
  }

  // =========================================================================
  // Sidebar (a drawer on narrow screens)
  // =========================================================================

  const narrowScreen = window.matchMedia("(max-width: 860px)");

  function sidebarVisible() {
    return narrowScreen.matches ? ui.app.classList.contains("sidebar-open") : !ui.app.classList.contains("sidebar-collapsed");
  }

  function syncSidebarButton() {
    ui.toggleSidebar.setAttribute("aria-expanded", String(sidebarVisible()));
  }

  function toggleSidebar() {
    if (narrowScreen.matches) {
      const open = ui.app.classList.toggle("sidebar-open");
      if (open) (ui.convList.querySelector("[aria-current]") || ui.convList.querySelector("button") || ui.sidebar).focus();
    } else {
      ui.app.classList.toggle("sidebar-collapsed");
    }
    syncSidebarButton();
  }

  function closeSidebarIfOverlay() {
    if (narrowScreen.matches && ui.app.classList.contains("sidebar-open")) {
      ui.app.classList.remove("sidebar-open");
      syncSidebarButton();
    }
  }

  // =========================================================================
  // Dialogs: settings and API key
  // =========================================================================

  function openSettings() {
    const s = state.settings;
    ui.setSystem.value = s.systemPrompt;
    ui.setTemperature.value = String(s.temperature);
    ui.setMaxTokens.value = String(effectiveMaxTokens());
    ui.setApiKey.value = state.apiKey;
    if (server.maxTokens) {
      ui.setMaxTokens.max = String(server.maxTokens);
      ui.maxTokensHint.textContent = `Length limit of a reply. The server allows up to ${server.maxTokens}.`;
    }
    ui.settingsDialog.showModal();
  }

  // Settings are saved as they are edited; out-of-range numbers are clamped
  // when the field is left so typing is never fought.
  function saveSettingsFromForm(clamp) {
    const s = state.settings;
    s.systemPrompt = ui.setSystem.value;
    const t = parseFloat(ui.setTemperature.value);
    if (Number.isFinite(t)) s.temperature = Math.min(2, Math.max(0, Math.round(t * 100) / 100));
    const n = parseInt(ui.setMaxTokens.value, 10);
    if (Number.isFinite(n)) s.maxTokens = Math.max(1, server.maxTokens ? Math.min(n, server.maxTokens) : n);
    if (clamp) {
      ui.setTemperature.value = String(s.temperature);
      ui.setMaxTokens.value = String(effectiveMaxTokens());
    }
    writeJSON(STORE_SETTINGS, s);
    setApiKey(ui.setApiKey.value.trim());
    renderSettingsSummary();
  }

  function setApiKey(key) {
    state.apiKey = key;
    try {
      if (key) localStorage.setItem(STORE_API_KEY, key);
      else localStorage.removeItem(STORE_API_KEY);
    } catch {
      /* storage disabled: the key lives for this page only */
    }
  }

  function openKeyDialog() {
    ui.keyError.hidden = !state.apiKey;
    ui.keyError.textContent = state.apiKey ? "The saved key was rejected." : "";
    ui.keyInput.value = state.apiKey;
    if (!ui.keyDialog.open) ui.keyDialog.showModal();
    ui.keyInput.focus();
  }

  function saveKeyAndRetry() {
    const key = ui.keyInput.value.trim();
    if (!key) {
      ui.keyError.hidden = false;
      ui.keyError.textContent = "Enter a key, or Cancel.";
      ui.keyInput.focus();
      return;
    }
    setApiKey(key);
    ui.keyDialog.close();
    refreshHealth();
    const conv = currentConversation();
    const last = conv && conv.messages[conv.messages.length - 1];
    if (last && last.role === "assistant" && last.error && last.error.kind === "auth") regenerate();
  }

  function clearHistory() {
    if (!window.confirm("Delete all conversations stored in this browser?")) return;
    stopGenerating();
    state.conversations = [];
    state.currentId = null;
    saveConversations();
    renderConversationList();
    renderTranscript();
    ui.settingsDialog.close();
  }

  // =========================================================================
  // Health: model name and server status in the header
  // =========================================================================

  let healthTimer = 0;

  function setHealth(kind, text) {
    ui.health.dataset.state = kind;
    // Only touch the live region when something changed, so it isn't re-announced every poll.
    if (ui.healthText.textContent !== text) ui.healthText.textContent = text;
    ui.health.title = `Server: ${text}`;
  }

  function setModelName(name) {
    if (!name) return;
    server.model = name;
    ui.modelName.textContent = name;
    ui.modelName.title = `Model: ${name}`;
    document.title = `${name} · lem-serve`;
  }

  async function refreshHealth() {
    clearTimeout(healthTimer);
    try {
      const res = await fetch("/healthz", { cache: "no-store", headers: authHeaders() });
      let body = null;
      try { body = await res.json(); } catch { /* not JSON */ }
      if (res.ok && body && body.status === "ok") {
        setModelName(body.model);
        if (!server.maxTokens && Number.isInteger(body.max_tokens)) {
          server.maxTokens = body.max_tokens;
          renderSettingsSummary();
        }
        const active = body.active_requests ?? 0;
        const max = body.max_requests ?? 0;
        if (max && active >= max) setHealth("busy", `Busy (${active}/${max})`);
        else setHealth("ok", max ? `Ready (${active}/${max})` : "Ready");
      } else {
        const detail = body && (typeof body.error === "string" ? body.error : body.error && body.error.message);
        if (detail) setHealth("error", `Error: ${detail}`);
        else if (body && body.status === "error") setHealth("error", "Model engine stopped");
        else setHealth("error", `Error (${res.status})`);
      }
    } catch {
      setHealth("offline", "Offline");
    }
    if (!document.hidden) healthTimer = setTimeout(refreshHealth, HEALTH_INTERVAL_MS);
  }

  // =========================================================================
  // Start-up and event wiring
  // =========================================================================

  function bindUI() {
    for (const [key, id] of Object.entries({
      app: "app", thread: "thread", transcript: "transcript", prompt: "prompt", send: "send", stop: "stop",
      newChat: "new-chat", openSettings: "open-settings", convList: "conv-list", sidebar: "sidebar",
      toggleSidebar: "toggle-sidebar", backdrop: "backdrop", jump: "jump-latest", health: "health",
      modelName: "model-name", announcer: "announcer", settingsSummary: "settings-summary",
      settingsDialog: "settings-dialog", setSystem: "set-system", setTemperature: "set-temperature",
      setMaxTokens: "set-max-tokens", maxTokensHint: "set-max-tokens-hint", setApiKey: "set-api-key",
      settingsDone: "settings-done", clearHistory: "clear-history", keyDialog: "key-dialog",
      keyInput: "key-input", keyError: "key-error", keySave: "key-save", keyCancel: "key-cancel",
    })) ui[key] = $(id);
    ui.healthText = ui.health.querySelector(".health-text");
  }

  function wireEvents() {
    ui.send.addEventListener("click", sendMessage);
    ui.stop.addEventListener("click", stopGenerating);
    ui.prompt.addEventListener("keydown", onPromptKeydown);
    ui.prompt.addEventListener("input", autoSizePrompt);
    ui.newChat.addEventListener("click", newChat);
    ui.openSettings.addEventListener("click", openSettings);
    ui.settingsSummary.addEventListener("click", openSettings);
    ui.toggleSidebar.addEventListener("click", toggleSidebar);
    ui.backdrop.addEventListener("click", closeSidebarIfOverlay);
    ui.thread.addEventListener("click", onThreadClick);
    ui.transcript.addEventListener("scroll", onTranscriptScroll, { passive: true });
    new ResizeObserver(onTranscriptResize).observe(ui.transcript);
    // Scrolling up with the wheel detaches immediately, before the next token pulls the view down.
    ui.transcript.addEventListener("wheel", (e) => { if (e.deltaY < 0) state.stickToBottom = false; }, { passive: true });
    ui.jump.addEventListener("click", () => { scrollToBottom(true); ui.prompt.focus(); });

    ui.convList.addEventListener("click", (event) => {
      const del = event.target.closest("[data-delete]");
      if (del) { deleteConversation(del.dataset.delete); return; }
      const open = event.target.closest("[data-id]");
      if (open) openConversation(open.dataset.id);
    });

    for (const input of [ui.setSystem, ui.setTemperature, ui.setMaxTokens, ui.setApiKey]) {
      input.addEventListener("input", () => saveSettingsFromForm(false));
      input.addEventListener("change", () => saveSettingsFromForm(true));
    }
    ui.settingsDone.addEventListener("click", () => { saveSettingsFromForm(true); ui.settingsDialog.close(); });
    ui.settingsDialog.addEventListener("close", () => saveSettingsFromForm(true));
    ui.clearHistory.addEventListener("click", clearHistory);
    ui.keySave.addEventListener("click", saveKeyAndRetry);
    ui.keyCancel.addEventListener("click", () => ui.keyDialog.close());
    ui.keyInput.addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); saveKeyAndRetry(); } });

    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && ui.app.classList.contains("sidebar-open")) {
        closeSidebarIfOverlay();
        ui.toggleSidebar.focus();
      }
    });
    narrowScreen.addEventListener("change", () => {
      ui.app.classList.remove("sidebar-open");
      syncSidebarButton();
    });
    document.addEventListener("visibilitychange", () => { if (!document.hidden) refreshHealth(); });
    window.addEventListener("online", refreshHealth);

    // Another tab changed the conversations: pick them up unless we are streaming.
    window.addEventListener("storage", (event) => {
      if (event.key === STORE_CONVERSATIONS && !state.run) {
        Object.assign(state, loadConversations());
        renderConversationList();
        renderTranscript();
      } else if (event.key === STORE_SETTINGS) {
        state.settings = loadSettings();
        renderSettingsSummary();
      } else if (event.key === STORE_API_KEY) {
        state.apiKey = event.newValue || "";
      }
    });
  }

  function start() {
    bindUI();
    if (!currentConversation()) state.currentId = null;
    if (server.model) setModelName(server.model);
    syncSidebarButton();
    renderSettingsSummary();
    renderConversationList();
    renderTranscript();
    wireEvents();
    refreshHealth();
    ui.prompt.focus();
  }

  // Exposed for tests and for the curious; renderMarkdown is pure.
  window.lemChat = { renderMarkdown, splitThink, stripThink, state, stop: stopGenerating };

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
