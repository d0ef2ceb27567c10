// lem-serve chat page.
//
// Plain modern JavaScript, no dependencies, no build step: the page must work
// offline and under a strict Content-Security-Policy (no inline scripts, no
// eval). Model output and user text are only ever put into the page with
// textContent / createTextNode, never parsed as HTML.
//
// Conversations live in IndexedDB (hundreds of MB), one record each; nothing
// is ever deleted to make room: a save that fails keeps the conversation in
// memory, says so, and offers an export. Each reply streams bound to its own
// conversation, so other conversations stay usable while it runs.
//
// The same file is also the page's service worker (registered as /chat.js,
// so the server serves nothing new): it keeps the last copy of the page and
// this script, and hands them out only when the server cannot be reached, so
// a reload while the server is down still opens the chats, saying "Offline".
"use strict";

if (typeof window === "undefined" && typeof self !== "undefined" && "clients" in self) {
  // =========================================================================
  // Service worker: network first; the cached page only when that fails
  // =========================================================================
  const CACHE = "lem-chat-page-v1";
  const PAGE_PATHS = new Set(["/", "/chat.js"]);
  self.addEventListener("install", (event) => {
    self.skipWaiting();
    event.waitUntil(caches.open(CACHE).then((cache) => cache.addAll([...PAGE_PATHS])).catch(() => {}));
  });
  self.addEventListener("activate", (event) => event.waitUntil(self.clients.claim()));
  self.addEventListener("fetch", (event) => {
    const url = new URL(event.request.url);
    if (event.request.method !== "GET" || url.origin !== self.location.origin || !PAGE_PATHS.has(url.pathname)) return;
    event.respondWith((async () => {
      const cache = await caches.open(CACHE);
      try {
        const response = await fetch(event.request, { cache: "no-store" });
        if (response.ok) await cache.put(url.pathname, response.clone());
        return response;
      } catch (err) {
        const cached = await cache.match(url.pathname);
        if (cached) return cached;
        throw err;
      }
    })());
  });
} else (() => {
  // =========================================================================
  // Constants
  // =========================================================================

  const STORE_CONVERSATIONS = "lem-chat.conversations.v1"; // the old localStorage home, moved to IndexedDB on load
  const STORE_SETTINGS = "lem-chat.settings.v1";
  const STORE_API_KEY = "lem-chat.api-key";
  const STORE_CURRENT = "lem-chat.current"; // id of the open conversation
  const STORE_UNSAVED = "lem-chat.unsaved."; // + a conversation's id: a copy the page left with before writing it
  const DB_NAME = "lem-chat";
  const DB_STORE = "conversations";
  const EXPORT_FORMAT = "lem-chat"; // the "format" field of an export file (version 1)
  const WINDOW_HEADER = "X-Lem-Messages-Dropped"; // leading non-system messages the server's --max-context left out

  const HEALTH_INTERVAL_MS = 10_000;
  const SAVE_THROTTLE_MS = 1_000;   // while streaming, save at most this often
  const UNDO_MS = 10_000;           // how long "Undo" stays offered
  const GAUGE_WARN = 0.8;           // context gauge turns amber at this share of the model's context
  const GAUGE_FULL = 0.95;          // ... and red here
  const DEFAULT_MAX_TOKENS = 1024;

  // Waits, in one object so a test can shorten them (window.lemChat.timing).
  // The server sends a ": keepalive" comment every 5 s while it works, so a
  // silence of stallNoticeMs is worth saying, and one of idleTimeoutMs means
  // the server or the network is gone.
  const timing = {
    stallNoticeMs: 15_000,
    idleTimeoutMs: 60_000,
    busyGiveUpMs: 10 * 60_000,  // stop retrying a 429 after this long
    busyMaxDelayMs: 10_000,     // longest wait between retries (after the first few at Retry-After)
  };

  // =========================================================================
  // Markdown renderer (pure: text in, DocumentFragment out)
  //
  // A small, forgiving subset of CommonMark/GFM: paragraphs, headings, lists
  // (nested, ordered/unordered), block quotes, fenced code, tables, rules,
  // and inline code, bold, italic, strikethrough, links. It also copes with
  // half-written input, because a streaming reply's last blocks are rendered
  // again as tokens arrive: an unclosed fence or <think> block renders as if
  // it were closed. Text blocks carry dir="auto", so right-to-left paragraphs
  // lay out right to left whatever the page's direction.
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

  // The direction of a text by its first letter, as dir="auto" decides it.
  // Containers (lists, items, quotes) get it explicitly: dir="auto" on them
  // would skip their paragraphs, which carry dir themselves.
  const RE_RTL_LETTER = /[\p{Script=Hebrew}\p{Script=Arabic}\p{Script=Syriac}\p{Script=Thaana}\p{Script=Nko}\p{Script=Adlam}]/u;
  function dirOf(text) {
    const letter = text.match(/\p{L}/u);
    return letter && RE_RTL_LETTER.test(letter[0]) ? "rtl" : "ltr";
  }

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
        parent.append(renderInline(m[2] || "", h(`h${Math.min(level + 2, 6)}`, { "data-md-level": level, dir: "auto" })));
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
    const codeEl = h("code", { className: lang ? `language-${lang}` : null }, highlight(code, lang));
    return h("div", { className: "code-block" },
      h("div", { className: "code-head" },
        h("span", { className: "code-lang", text: lang || "text" }),
        h("button", { type: "button", className: "btn small ghost copy-code", "aria-label": lang ? `Copy ${lang} code` : "Copy code", text: "Copy" })),
      h("pre", { dir: "ltr" }, codeEl));
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
    parent.append(renderBlocks(body.join("\n"), h("blockquote", { dir: dirOf(body.join("\n")) })));
    return i;
  }

  // Lists: each item's lines (minus the marker's indentation) are rendered
  // recursively, which gives nested lists and code inside items for free.
  function parseList(lines, start, parent) {
    const first = lines[start].match(RE_ITEM);
    const indent = first[1].length;
    const ordered = /\d/.test(first[2]);
    const list = h(ordered ? "ol" : "ul", { dir: dirOf(first[4] || "") });
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
      list.append(renderBlocks(body.join("\n"), h("li", { dir: dirOf(body.join("\n")) })));
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
      const el = renderInline(text, h(tag, { dir: "auto" }));
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
    const p = h("p", { dir: "auto" });
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
    { name: "displaymath", re: /\$\$([^$]*[^\s$][^$]*)\$\$/g },
    { name: "math", re: /(?<![\\$\w])\$(?=[^\s$])([^$\n]*?[^\s$\\])\$(?![\w$])/g },
    { name: "autolink", re: /<((?:https?:\/\/|mailto:)[^\s<>]+)>/g },
    { name: "image", re: /!\[([^\]\n]*)\]\(\s*<?((?:[^\s<>()]|\([^\s<>()]*\))+)>?(?:\s+"[^"\n]*")?\s*\)/g },
    { name: "link", re: /\[([^\]\n]+)\]\(\s*<?((?:[^\s<>()]|\([^\s<>()]*\))+)>?(?:\s+"[^"\n]*")?\s*\)/g },
    { name: "strong", re: /\*\*(?=\S)([\s\S]*?\S)\*\*/g },
    { name: "strong", re: /(?<![\p{L}\p{N}_])__(?=\S)([\s\S]*?\S)__(?![\p{L}\p{N}_])/gu },
    { name: "del", re: /~~(?=\S)([\s\S]*?\S)~~/g },
    { name: "em", re: /\*(?=[^\s*])([\s\S]*?[^\s*])\*(?!\*)/g },
    { name: "em", re: /(?<![\p{L}\p{N}_])_(?=[^\s_])([\s\S]*?[^\s_])_(?![\p{L}\p{N}_])/gu },
    { name: "url", re: /\bhttps?:\/\/[^\s<>[\]]+/g, trim: trimBareUrl },
  ];

  // A bare URL ends before trailing punctuation, and before a ")" that has no
  // "(" to close inside the URL, as GFM's extended autolinks do: so
  // "(see en.wikipedia.org/wiki/Mars_(planet))" links to the whole
  // article name and leaves the sentence's own parenthesis out.
  function trimBareUrl(url) {
    const count = (ch) => url.split(ch).length - 1;
    for (;;) {
      const last = url[url.length - 1];
      if (/[.,;:!?'"*_~]/.test(last)) url = url.slice(0, -1);
      else if (last === ")" && count("(") < count(")")) url = url.slice(0, -1);
      else return url;
    }
  }

  // The next match of an inline rule at or after `pos`, trimmed when the rule says so.
  function execRule(rule, text, pos) {
    rule.re.lastIndex = pos;
    for (;;) {
      const m = rule.re.exec(text);
      if (!m || !rule.trim) return m;
      const kept = rule.trim(m[0]);
      if (/^https?:\/\/./.test(kept)) return Object.assign([kept], { index: m.index });
      rule.re.lastIndex = m.index + 1; // nothing left of it: look further on
    }
  }

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
        if (next[k] === undefined || (next[k] && next[k].index < pos)) next[k] = execRule(rule, text, pos);
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
      case "displaymath": return renderMath(m[1], true);
      case "math": return renderMath(m[1], false);
      case "strong": return renderInline(m[1], h("strong"));
      case "em": return renderInline(m[1], h("em"));
      case "del": return renderInline(m[1], h("del"));
      default: return document.createTextNode(m[0]);
    }
  }

  // A reply's text without its inline reasoning (<think> blocks), untrimmed.
  function answerOf(text) {
    return splitThink(text).filter((p) => !p.think).map((p) => p.text).join("");
  }

  // Reasoning is not sent back to the model in later turns.
  function stripThink(text) {
    return answerOf(text).trim();
  }

  // =========================================================================
  // Math: a TeX subset to MathML (the browser draws it)
  //
  // $…$ inline and $$…$$ display. Letters, numbers, operators, ^ and _,
  // groups, \frac, \sqrt, \text, fonts, Greek, common symbols, big operators,
  // \left…\right and matrix-like environments. Elements are made with
  // createElementNS and filled with textContent only; an unknown command
  // shows as its own text. Too long or too deep input shows as code.
  // =========================================================================

  const MATH_MAX_CHARS = 4000;
  const MATH_MAX_DEPTH = 40;
  const MATH_NS = document.querySelector("#mathml-ns")?.content.firstElementChild?.namespaceURI || null;
  const TEX_SYMBOLS = {
    alpha: "α", beta: "β", gamma: "γ", delta: "δ", epsilon: "ϵ", varepsilon: "ε", zeta: "ζ", eta: "η", theta: "θ", vartheta: "ϑ",
    iota: "ι", kappa: "κ", lambda: "λ", mu: "μ", nu: "ν", xi: "ξ", pi: "π", rho: "ρ", sigma: "σ", tau: "τ", upsilon: "υ",
    phi: "ϕ", varphi: "φ", chi: "χ", psi: "ψ", omega: "ω", Gamma: "Γ", Delta: "Δ", Theta: "Θ", Lambda: "Λ", Xi: "Ξ", Pi: "Π",
    Sigma: "Σ", Phi: "Φ", Psi: "Ψ", Omega: "Ω", infty: "∞", partial: "∂", nabla: "∇", ell: "ℓ", hbar: "ℏ", emptyset: "∅",
  };
  const TEX_OPERATORS = {
    cdot: "⋅", times: "×", div: "÷", pm: "±", mp: "∓", le: "≤", leq: "≤", ge: "≥", geq: "≥", ne: "≠", neq: "≠", approx: "≈",
    equiv: "≡", sim: "∼", simeq: "≃", propto: "∝", to: "→", rightarrow: "→", leftarrow: "←", Rightarrow: "⇒", Leftarrow: "⇐",
    leftrightarrow: "↔", Leftrightarrow: "⇔", mapsto: "↦", implies: "⟹", iff: "⟺", in: "∈", notin: "∉", subset: "⊂", subseteq: "⊆",
    supset: "⊃", cup: "∪", cap: "∩", wedge: "∧", vee: "∨", neg: "¬", forall: "∀", exists: "∃", ldots: "…", cdots: "⋯", dots: "…",
    circ: "∘", ast: "∗", star: "⋆", mid: "∣", langle: "⟨", rangle: "⟩", lfloor: "⌊", rfloor: "⌋", lceil: "⌈", rceil: "⌉",
    sum: "∑", prod: "∏", int: "∫", iint: "∬", oint: "∮", lim: "lim", max: "max", min: "min", sup: "sup", inf: "inf",
    log: "log", ln: "ln", exp: "exp", sin: "sin", cos: "cos", tan: "tan", det: "det", "{": "{", "}": "}", "|": "‖",
    "\\": "\n",
  };
  const TEX_BIG = new Set(["sum", "prod", "int", "iint", "oint", "lim", "max", "min", "sup", "inf"]);
  const TEX_SPACES = { ",": "0.17em", ":": "0.22em", ";": "0.28em", quad: "1em", qquad: "2em", " ": "0.25em", "!": "0" };
  const TEX_FONTS = { mathbf: "bold", mathrm: "normal", mathit: "italic", mathbb: "double-struck", mathcal: "script", mathsf: "sans-serif", boldsymbol: "bold" };

  function mml(tag, attrs, ...children) {
    const el = document.createElementNS(MATH_NS, tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "text") el.textContent = value;
      else el.setAttribute(key, value);
    }
    for (const child of children) if (child) el.append(child);
    return el;
  }

  // TeX source to a <math> element; null when it cannot be (then shown as code).
  function texToMathML(tex, display) {
    if (!MATH_NS || tex.length > MATH_MAX_CHARS) return null;
    const tokens = tex.match(/\\[A-Za-z]+|\\[^A-Za-z]|[A-Za-z]|\d+(?:\.\d+)?|\s+|[^]/g) || [];
    const state = { tokens, pos: 0, depth: 0, display };
    try {
      const row = parseMathRow(state, null);
      const math = mml("math", display ? { display: "block" } : {}, mml("semantics", {}, row, mml("annotation", { encoding: "application/x-tex", text: tex })));
      return math;
    } catch {
      return null;
    }
  }

  // The next token that is not white space (TeX ignores it in math).
  function peekMath(state) {
    while (/^\s+$/.test(state.tokens[state.pos] || "")) state.pos++;
    return state.tokens[state.pos];
  }

  function parseMathRow(state, until) {
    if (++state.depth > MATH_MAX_DEPTH) throw new Error("too deep");
    const row = mml("mrow");
    while (peekMath(state) !== undefined && state.tokens[state.pos] !== until) {
      const tok = state.tokens[state.pos];
      if (until === "&row" && (tok === "&" || tok === "\\\\" || tok === "\\end")) break;
      row.append(parseScripts(state, parseMathAtom(state)));
    }
    state.depth--;
    return row;
  }

  // An atom, then its ^ and _ scripts.
  function parseScripts(state, base) {
    let sub = null;
    let sup = null;
    while (peekMath(state) === "^" || state.tokens[state.pos] === "_") {
      const which = state.tokens[state.pos++];
      const arg = parseMathAtom(state);
      if (which === "^") sup = arg;
      else sub = arg;
    }
    if (!sub && !sup) return base;
    const big = base.dataset && base.dataset.big && state.display;
    if (sub && sup) return mml(big ? "munderover" : "msubsup", {}, base, sub, sup);
    return mml(big ? (sub ? "munder" : "mover") : sub ? "msub" : "msup", {}, base, sub || sup);
  }

  function parseMathGroup(state) {
    if (peekMath(state) !== "{") return parseMathAtom(state);
    state.pos++;
    const row = parseMathRow(state, "}");
    state.pos++;
    return row;
  }

  function rawGroup(state) {
    if (peekMath(state) !== "{") return state.tokens[state.pos++] || "";
    let text = "";
    let depth = 0;
    for (state.pos++; state.pos < state.tokens.length; state.pos++) {
      const t = state.tokens[state.pos];
      if (t === "{") depth++;
      if (t === "}" && depth-- === 0) break;
      text += t;
    }
    state.pos++;
    return text;
  }

  function parseMathAtom(state) {
    peekMath(state);
    const tok = state.tokens[state.pos++];
    if (tok === undefined) return mml("mrow");
    if (tok === "{") {
      const row = parseMathRow(state, "}");
      state.pos++;
      return row;
    }
    if (/^\d/.test(tok)) return mml("mn", { text: tok });
    if (/^[A-Za-z]$/.test(tok)) return mml("mi", { text: tok });
    if (tok[0] === "\\") return parseMathCommand(state, tok.slice(1));
    return mml("mo", { text: tok });
  }

  function parseMathCommand(state, name) {
    if (name === "frac" || name === "dfrac" || name === "tfrac") return mml("mfrac", {}, parseMathGroup(state), parseMathGroup(state));
    if (name === "sqrt") {
      if (peekMath(state) === "[") {
        state.pos++;
        const index = parseMathRow(state, "]");
        state.pos++;
        return mml("mroot", {}, parseMathGroup(state), index);
      }
      return mml("msqrt", {}, parseMathGroup(state));
    }
    if (name === "text" || name === "mbox" || name === "operatorname") return mml(name === "text" || name === "mbox" ? "mtext" : "mi", { text: rawGroup(state) });
    if (TEX_FONTS[name]) {
      const inner = parseMathGroup(state);
      return mml("mstyle", { mathvariant: TEX_FONTS[name] }, inner);
    }
    if (name === "left" || name === "right" || name === "big" || name === "Big" || name === "bigg" || name === "Bigg") {
      peekMath(state);
      const delim = state.tokens[state.pos++] || "";
      const text = delim === "." ? "" : delim[0] === "\\" ? TEX_OPERATORS[delim.slice(1)] || delim.slice(1) : delim;
      return mml("mo", { text, stretchy: "true" });
    }
    if (name === "begin") return parseEnvironment(state, rawGroup(state));
    if (name in TEX_SPACES) return mml("mspace", { width: TEX_SPACES[name] });
    if (TEX_SYMBOLS[name]) return mml("mi", { text: TEX_SYMBOLS[name] });
    if (TEX_OPERATORS[name]) {
      const op = mml(/^[a-z]{2,}$/.test(TEX_OPERATORS[name]) ? "mi" : "mo", { text: TEX_OPERATORS[name] });
      if (TEX_BIG.has(name)) op.dataset.big = "1";
      return op;
    }
    return mml("mtext", { text: `\\${name}` }); // unknown: its own text
  }

  // matrix, pmatrix, bmatrix, cases, aligned...: rows split by \\, cells by &.
  function parseEnvironment(state, env) {
    const table = mml("mtable");
    for (;;) {
      const tr = mml("mtr");
      for (;;) {
        tr.append(mml("mtd", {}, parseMathRow(state, "&row")));
        if (peekMath(state) !== "&") break;
        state.pos++;
      }
      table.append(tr);
      const tok = state.tokens[state.pos];
      if (peekMath(state) === "\\\\") { state.pos++; continue; }
      if (tok === "\\end") { state.pos++; rawGroup(state); }
      break;
    }
    const fences = { pmatrix: ["(", ")"], bmatrix: ["[", "]"], vmatrix: ["|", "|"], Bmatrix: ["{", "}"], cases: ["{", ""] }[env];
    if (!fences) return table;
    return mml("mrow", {}, mml("mo", { text: fences[0] }), table, fences[1] ? mml("mo", { text: fences[1] }) : null);
  }

  // Math inside Markdown, or its source as code when it cannot be rendered.
  function renderMath(tex, display) {
    const math = texToMathML(tex.trim(), display);
    return math || h("code", { className: "math-source", text: display ? `$$${tex}$$` : `$${tex}$` });
  }

  // =========================================================================
  // Syntax highlighting (hand-written, small): code in, <span>s out
  //
  // One regex per language picks out comments, strings, numbers, words and
  // the language's own marks; words are looked up in its keyword and builtin
  // lists. Only textContent is ever set, so hostile code stays text. Good
  // enough to read code, not a parser: a rare construct shows uncoloured.
  // =========================================================================

  const HL_MAX_CHARS = 200_000; // larger blocks show plain (one regex pass each frame while streaming)
  // An unclosed comment or string runs to the end of the code: (?![\s\S]) is "end of input" under the m flag.
  const C_COMMENTS = [String.raw`\/\/[^\n]*`, String.raw`\/\*[\s\S]*?(?:\*\/|(?![\s\S]))`];
  const QUOTED = [String.raw`"(?:[^"\\\n]|\\.)*"?`, String.raw`'(?:[^'\\\n]|\\.)*'?`];
  const NUMBER = String.raw`\b(?:0[xXbBoO][\da-fA-F_]+|\d[\d_]*(?:\.\d[\d_]*)?(?:[eE][+-]?\d+)?)[a-zA-Z]*\b`;
  const C_LIKE = "if else for while do switch case break continue return default goto sizeof typedef struct union enum " +
    "static const extern volatile inline void char short int long float double signed unsigned bool true false NULL nullptr " +
    "class public private protected virtual override template typename namespace using new delete this throw try catch " +
    "final abstract interface extends implements package import super instanceof synchronized var auto constexpr";
  const LANGS = {
    python: { comments: [String.raw`#[^\n]*`], strings: [String.raw`[rbfuRBFU]{0,2}"""[\s\S]*?(?:"""|(?![\s\S]))`, String.raw`[rbfuRBFU]{0,2}'''[\s\S]*?(?:'''|(?![\s\S]))`, ...QUOTED.map((q) => `[rbfuRBFU]{0,2}${q}`)],
      marks: [["meta", String.raw`@[\w.]+`]], titleAfter: "def class",
      keywords: "def class return if elif else for while in not and or is None True False import from as with try except finally raise pass break continue lambda yield global nonlocal async await del assert match case",
      builtins: "print len range str int float list dict set tuple bool open type isinstance super self enumerate zip map filter sorted min max sum abs any all repr" },
    javascript: { comments: C_COMMENTS, strings: [...QUOTED, String.raw`\x60(?:[^\x60\\]|\\[\s\S])*\x60?`], titleAfter: "function class interface type",
      keywords: "var let const function return if else for while do switch case break continue default new delete typeof instanceof in of class extends super this throw try catch finally async await yield import export from as null undefined true false void static get set interface type enum implements readonly private public protected declare namespace keyof",
      builtins: "console window document Math JSON Object Array String Number Boolean Promise Map Set Error Symbol any string number boolean unknown never" },
    json: { strings: [String.raw`"(?:[^"\\\n]|\\.)*"(?=\s*:)`, QUOTED[0]], stringKinds: ["title", "string"], keywords: "true false null" },
    shell: { comments: [String.raw`(?<![\w$])#[^\n]*`], strings: QUOTED, marks: [["meta", String.raw`\$(?:\{[^}\n]*\}|\w+|[@#?$!*-])`], ["builtin", String.raw`(?<=^|\s)--?[A-Za-z][\w-]*`]],
      keywords: "if then else elif fi for while until do done case esac in function return export local readonly set unset exit",
      builtins: "echo cd ls cat grep sed awk curl git pip python python3 npm node make sudo rm cp mv mkdir chmod source printf test read kill" },
    c: { comments: C_COMMENTS, strings: QUOTED, marks: [["meta", String.raw`^[ \t]*#[ \t]*\w+[^\n]*`]], keywords: C_LIKE, titleAfter: "class struct",
      builtins: "std string vector map printf malloc free size_t uint8_t int32_t int64_t uint32_t uint64_t String System Console" },
    rust: { comments: C_COMMENTS, strings: [String.raw`b?r#*"[\s\S]*?(?:"#*|(?![\s\S]))`, QUOTED[0], String.raw`b?'(?:[^'\\\n]|\\.)'`], marks: [["meta", String.raw`\b\w+!`], ["meta", String.raw`#!?\[[^\]\n]*\]`], ["builtin", String.raw`'[a-z_]\w*\b(?!')`]],
      keywords: "fn let mut const static if else match for while loop in return break continue struct enum impl trait pub use mod crate self Self super where as ref move async await dyn unsafe extern type true false",
      builtins: "Some None Ok Err Option Result Vec String Box Rc Arc HashMap str u8 u16 u32 u64 usize i8 i16 i32 i64 isize f32 f64 bool char", titleAfter: "fn struct enum trait impl" },
    go: { comments: C_COMMENTS, strings: [...QUOTED, String.raw`\x60[^\x60]*\x60?`], titleAfter: "func type",
      keywords: "func package import var const type struct interface map chan go defer select if else for range switch case default break continue return fallthrough goto nil true false",
      builtins: "string int int64 uint8 byte rune float64 bool error make len cap append new panic recover fmt" },
    html: { comments: [String.raw`<!--[\s\S]*?(?:-->|(?![\s\S]))`], strings: QUOTED, marks: [["keyword", String.raw`<\/?[A-Za-z][\w:-]*|\/?>`], ["title", String.raw`(?<=\s)[A-Za-z_:][\w:.-]*(?==)`], ["meta", String.raw`&[#\w]+;`]] },
    css: { comments: [String.raw`\/\*[\s\S]*?(?:\*\/|(?![\s\S]))`], strings: QUOTED, marks: [["meta", String.raw`@[\w-]+`], ["title", String.raw`[\w-]+(?=\s*:[^;{}]*[;}])`], ["number", String.raw`#[\da-fA-F]{3,8}\b`], ["number", String.raw`-?\d*\.?\d+(?:px|em|rem|%|vh|vw|s|ms|deg|fr)?`]],
      keywords: "important inherit initial none auto" },
    sql: { comments: [String.raw`--[^\n]*`, String.raw`\/\*[\s\S]*?(?:\*\/|(?![\s\S]))`], strings: [String.raw`'(?:[^']|'')*'?`, String.raw`"[^"\n]*"?`], caseless: true,
      keywords: "select from where and or not insert into values update set delete create table drop alter add index primary key foreign references join left right inner outer full on group by order having limit offset as distinct union all case when then else end null is in like between exists with returning default unique check view begin commit rollback",
      builtins: "count sum avg min max coalesce integer int text varchar boolean date timestamp serial real now" },
  };
  const LANG_ALIASES = { py: "python", python3: "python", js: "javascript", jsx: "javascript", ts: "javascript", tsx: "javascript",
    typescript: "javascript", mjs: "javascript", node: "javascript", jsonc: "json", json5: "json", sh: "shell", bash: "shell", zsh: "shell",
    console: "shell", shellsession: "shell", "c++": "c", cpp: "c", cc: "c", h: "c", hpp: "c", cxx: "c", java: "c", cs: "c", csharp: "c",
    kotlin: "c", kt: "c", swift: "c", objc: "c", rs: "rust", golang: "go", xml: "html", svg: "html", htm: "html", vue: "html",
    scss: "css", less: "css", postgres: "sql", postgresql: "sql", mysql: "sql", sqlite: "sql", patch: "diff" };

  const compiledLangs = new Map();

  function compileLang(lang) {
    const spec = LANGS[lang];
    const groups = [];
    const kinds = [];
    const add = (kind, source) => { groups.push(`(${source})`); kinds.push(kind); };
    for (const c of spec.comments || []) add("comment", c);
    (spec.strings || []).forEach((q, k) => add(spec.stringKinds ? spec.stringKinds[k] : "string", q));
    for (const [kind, source] of spec.marks || []) add(kind, source);
    add("number", NUMBER);
    add("word", String.raw`[A-Za-z_$][\w$]*`);
    const words = (list) => new Set((list || "").split(" ").filter(Boolean).map((w) => (spec.caseless ? w.toLowerCase() : w)));
    return { re: new RegExp(groups.join("|"), "gm"), kinds, keywords: words(spec.keywords), builtins: words(spec.builtins),
      titleAfter: words(spec.titleAfter), caseless: Boolean(spec.caseless) };
  }

  function langOf(name) {
    const key = String(name || "").toLowerCase();
    const lang = LANG_ALIASES[key] || key;
    return lang === "diff" || LANGS[lang] ? lang : null;
  }

  // Highlighted code as a fragment of text nodes and <span class="tok-...">.
  function highlight(code, name) {
    const lang = langOf(name);
    const frag = document.createDocumentFragment();
    if (!lang || code.length > HL_MAX_CHARS) {
      frag.append(code);
      return frag;
    }
    if (lang === "diff") return highlightDiff(code, frag);
    if (!compiledLangs.has(lang)) compiledLangs.set(lang, compileLang(lang));
    const { re, kinds, keywords, builtins, titleAfter, caseless } = compiledLangs.get(lang);
    let pos = 0;
    let previousWord = "";
    re.lastIndex = 0;
    for (let m = re.exec(code); m; m = re.exec(code)) {
      if (!m[0]) { re.lastIndex++; continue; }
      const at = m.slice(1).findIndex((g) => g !== undefined);
      let kind = kinds[at];
      if (kind === "word") {
        const word = caseless ? m[0].toLowerCase() : m[0];
        kind = keywords.has(word) ? "keyword" : builtins.has(word) ? "builtin" : titleAfter.has(previousWord) ? "title" : null;
        previousWord = word;
      }
      if (m.index > pos) frag.append(code.slice(pos, m.index));
      frag.append(kind ? h("span", { className: `tok-${kind}`, text: m[0] }) : m[0]);
      pos = m.index + m[0].length;
    }
    if (pos < code.length) frag.append(code.slice(pos));
    return frag;
  }

  function highlightDiff(code, frag) {
    code.split("\n").forEach((line, i) => {
      if (i) frag.append("\n");
      const kind = /^(?:\+\+\+|---|diff |index |@@)/.test(line) ? "meta" : line[0] === "+" ? "added" : line[0] === "-" ? "removed" : null;
      frag.append(kind ? h("span", { className: `tok-${kind}`, text: line }) : line);
    });
    return frag;
  }

  // =========================================================================
  // Incremental rendering of a streaming reply
  //
  // The reply is cut into a stable part, whose blocks can no longer change,
  // and a tail. Stable blocks are rendered once and kept; only the tail is
  // rendered again on each frame, so a long reply costs the same per frame
  // at its end as at its start. A cut goes at a blank line outside any code
  // fence or reasoning block, before a line that starts a new top-level
  // block (not indented and not a list item, so a list stays in one piece).
  // When the reply ends it is rendered once in full, which settles any
  // difference the cuts made.
  // =========================================================================

  const RE_THINK_TAG = /<\/?think>/g;

  function newStreamView(body) {
    return { body, stableEnd: 0, tail: [], restart: false,
      scan: { pos: 0, cut: 0, fence: null, think: false, sawThink: false, afterBlank: false } };
  }

  // Look at the complete lines not seen yet and move scan.cut to the last safe cut.
  function advanceScan(view, text) {
    const scan = view.scan;
    for (let nl = text.indexOf("\n", scan.pos); nl !== -1; nl = text.indexOf("\n", scan.pos)) {
      const start = scan.pos;
      const line = text.slice(start, nl);
      scan.pos = nl + 1;
      if (scan.afterBlank && !RE_BLANK.test(line)) {
        if (!scan.fence && !scan.think && /^\S/.test(line) && !RE_ITEM.test(line)) scan.cut = start;
        scan.afterBlank = false;
      }
      for (const tag of line.match(RE_THINK_TAG) || []) scanThinkTag(view, tag);
      if (scan.think) continue;
      if (scan.fence) {
        const close = line.match(/^\s*(`{3,}|~{3,})\s*$/);
        if (close && close[1][0] === scan.fence[0] && close[1].length >= scan.fence.length) scan.fence = null;
      } else if (RE_BLANK.test(line)) {
        scan.afterBlank = true;
      } else {
        const open = line.match(/^\s*(`{3,}|~{3,})/);
        if (open) scan.fence = open[1];
      }
    }
  }

  // Mirrors splitThink: a "</think>" before any "<think>" means all the text
  // before it was reasoning, so stable blocks already shown must go.
  function scanThinkTag(view, tag) {
    const scan = view.scan;
    if (tag === "<think>") {
      if (!scan.think) scan.fence = null;
      scan.think = true;
      scan.sawThink = true;
    } else if (scan.think) {
      scan.think = false;
    } else if (!scan.sawThink) {
      scan.sawThink = true;
      scan.cut = 0;
      view.restart = true;
    }
  }

  function renderStreaming(view, text) {
    advanceScan(view, text);
    if (view.restart) {
      view.restart = false;
      view.body.replaceChildren();
      view.stableEnd = 0;
      view.tail = [];
    }
    const opened = view.tail.flatMap((n) => (n.matches && n.matches("details") ? [n.open] : []));
    for (const node of view.tail) node.remove();
    if (view.scan.cut > view.stableEnd) {
      view.body.append(renderMarkdown(text.slice(view.stableEnd, view.scan.cut)));
      view.stableEnd = view.scan.cut;
    }
    const tail = renderMarkdown(text.slice(view.stableEnd));
    view.tail = [...tail.childNodes];
    view.tail.filter((n) => n.matches && n.matches("details")).forEach((d, k) => { if (opened[k]) d.open = true; });
    view.body.append(tail);
  }

  // =========================================================================
  // Settings and API key (localStorage: small, read synchronously)
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

  function readLocal(key) {
    try {
      return localStorage.getItem(key);
    } catch {
      return null;
    }
  }

  function writeLocal(key, value) {
    try {
      if (value === null || value === undefined || value === "") localStorage.removeItem(key);
      else localStorage.setItem(key, value);
    } catch {
      /* storage disabled: the value lives for this page only */
    }
  }

  function localKeys(prefix) {
    try {
      return Object.keys(localStorage).filter((key) => key.startsWith(prefix));
    } catch {
      return [];
    }
  }

  function readMeta(name) {
    const el = document.querySelector(`meta[name="${name}"]`);
    const value = el ? el.content.trim() : "";
    return value.startsWith("{{") ? "" : value; // placeholder not filled in: page opened from disk
  }

  // What the page knows of the server: from the page's meta tags, then /healthz.
  const server = {
    thinking: false,     // the model thinks before it answers, and the server splits its reasoning out
    model: readMeta("lem-model"),
    maxTokens: parseInt(readMeta("lem-max-tokens"), 10) || null,
    contextLength: null, // the model's context in tokens (null: unknown)
    maxContext: 0,       // the server's --max-context window in messages (0: keeps all)
  };

  function loadSettings() {
    const s = readJSON(STORE_SETTINGS, {});
    return {
      systemPrompt: typeof s.systemPrompt === "string" ? s.systemPrompt : "",
      // null: leave temperature out, so the server's default (the model's recommended one) applies.
      temperature: Number.isFinite(s.temperature) ? s.temperature : null,
      maxTokens: Number.isInteger(s.maxTokens) ? s.maxTokens : DEFAULT_MAX_TOKENS,
      thinking: s.thinking !== false, // off: chat_template_kwargs.enable_thinking = false (thinking models only)
    };
  }

  // A chat's settings: its own, over the defaults for what it has none of.
  function chatSettings(conv) {
    return { ...state.settings, ...(conv && conv.settings) };
  }

  function effectiveMaxTokens(settings = state.settings) {
    const wanted = Math.max(1, settings.maxTokens | 0);
    return server.maxTokens ? Math.min(wanted, server.maxTokens) : wanted;
  }

  // =========================================================================
  // Conversations: the data and its checks
  //
  // conversation: { id, title, titleEdited?, created, updated, messages,
  //                 window?: { firstSeen, dropped, limit } }
  // message:      { id, role, content, created, edited?, and for replies
  //                 status, error?, stats?, model?, finishReason?,
  //                 alts?, alt? }
  // A reply's alternatives (from Regenerate) are kept in `alts`, every one
  // but the shown one, which is the message's own fields; `alt` is the shown
  // one's place among them all (◀ 2/3 ▶).
  // =========================================================================

  const ROLES = new Set(["user", "assistant", "system"]);
  const REPLY_STATUSES = new Set(["done", "stopped", "error", "interrupted"]);
  const REPLY_FIELDS = ["content", "reasoning", "status", "error", "stats", "model", "finishReason", "created"];
  const USER_FIELDS = ["content", "created", "edited"];
  const STAT_NUMBERS = ["promptTokens", "completionTokens", "chunks", "totalMs", "firstTokenMs", "tokensPerSecond"];
  const MAX_TEXT = 8_000_000;  // characters in one message (an import's sanity bound, far above any reply)
  const MAX_ID = 100;          // characters in an id
  const MAX_DEPTH = 64;        // branches inside branches, as an import may nest them

  function newId() {
    return Date.now().toString(36) + Math.random().toString(36).slice(2, 10);
  }

  function titleFrom(text) {
    const line = text.trim().split("\n")[0];
    return line.length > 60 ? `${line.slice(0, 57)}…` : line || "New chat";
  }

  function finite(value, fallback) {
    return Number.isFinite(value) ? value : fallback;
  }

  function isText(value) {
    return typeof value === "string" && value.length <= MAX_TEXT;
  }

  function normalizeError(raw) {
    if (!raw || typeof raw !== "object" || !isText(raw.message)) return undefined;
    return { kind: typeof raw.kind === "string" ? raw.kind.slice(0, 40) : "error", message: raw.message, retryable: raw.retryable !== false };
  }

  // Only the numbers the page writes, each a finite number (or null: not reported).
  function normalizeStats(raw) {
    if (!raw || typeof raw !== "object" || Array.isArray(raw)) return undefined;
    const stats = {};
    for (const key of STAT_NUMBERS) {
      if (Number.isFinite(raw[key]) && raw[key] >= 0) stats[key] = raw[key];
      else if (raw[key] === null) stats[key] = null;
    }
    if (raw.endToEnd === true) stats.endToEnd = true;
    return Object.keys(stats).length ? stats : undefined;
  }

  // One reply's fields, checked: a reply that was streaming when the page went
  // away (or when it was exported) can't be resumed, so it says "interrupted",
  // unless another tab is still writing it (store.live), or may be: a merge
  // keeps "streaming" and asks the reply's lock (watchStreaming).
  function normalizeReply(raw, id = null) {
    if (!raw || typeof raw !== "object" || !isText(raw.content)) return null;
    const live = id && raw.status === "streaming" && (store.live.has(id) || store.keepStreaming);
    const status = live ? "streaming" : raw.status === "streaming" || raw.status === "waiting" ? "interrupted" : raw.status;
    const v = { content: raw.content, status: live || REPLY_STATUSES.has(status) ? status : "done", created: finite(raw.created, Date.now()) };
    const error = normalizeError(raw.error);
    if (error) v.error = error;
    const stats = normalizeStats(raw.stats);
    if (stats) v.stats = stats;
    if (typeof raw.model === "string") v.model = raw.model.slice(0, 200);
    if (typeof raw.finishReason === "string") v.finishReason = raw.finishReason.slice(0, 40);
    if (isText(raw.reasoning) && raw.reasoning) v.reasoning = raw.reasoning;
    return v;
  }

  function normalizeUser(raw) {
    if (!raw || typeof raw !== "object" || !isText(raw.content)) return null;
    const v = { content: raw.content, created: finite(raw.created, Date.now()) };
    if (Number.isFinite(raw.edited)) v.edited = raw.edited;
    return v;
  }

  // A version of a message; `tail` (the messages after it in its branch) is
  // checked like a conversation's messages.
  function normalizeVersion(raw, role, seen, depth) {
    const v = role === "assistant" ? normalizeReply(raw) : normalizeUser(raw);
    if (!v) return null;
    if (Array.isArray(raw.tail) && depth < MAX_DEPTH) {
      const tail = normalizeMessages(raw.tail, seen, depth + 1);
      if (tail) v.tail = tail;
    }
    return v;
  }

  function normalizeMessage(raw, seen, depth = 0) {
    if (!raw || typeof raw !== "object" || !ROLES.has(raw.role)) return null;
    const id = typeof raw.id === "string" && raw.id && raw.id.length <= MAX_ID && !seen.has(raw.id) ? raw.id : newId();
    seen.add(id);
    const fields = raw.role === "assistant" ? normalizeReply(raw, id) : normalizeUser(raw);
    if (!fields) return null;
    const msg = { id, role: raw.role, ...fields };
    const alts = Array.isArray(raw.alts) ? raw.alts.map((a) => normalizeVersion(a, raw.role, seen, depth)).filter(Boolean) : [];
    if (alts.length) {
      msg.alts = alts;
      msg.alt = Math.min(Math.max(0, Number.isInteger(raw.alt) ? raw.alt : 0), alts.length);
    }
    if (Number.isInteger(raw.rev) && raw.rev > 0) msg.rev = raw.rev;
    return msg;
  }

  function normalizeMessages(list, seen, depth = 0) {
    const messages = list.map((m) => normalizeMessage(m, seen, depth));
    return messages.includes(null) ? null : messages;
  }

  // Per-chat settings: what is stored, checked; missing ones follow the defaults.
  function normalizeChatSettings(raw) {
    if (!raw || typeof raw !== "object" || Array.isArray(raw)) return undefined;
    const s = {};
    if (isText(raw.systemPrompt)) s.systemPrompt = raw.systemPrompt;
    if (raw.temperature === null || (Number.isFinite(raw.temperature) && raw.temperature >= 0 && raw.temperature <= 2)) s.temperature = raw.temperature;
    if (Number.isInteger(raw.maxTokens) && raw.maxTokens >= 1) s.maxTokens = raw.maxTokens;
    if (typeof raw.thinking === "boolean") s.thinking = raw.thinking;
    return s;
  }

  // A conversation as stored or imported, checked field by field and with
  // only known fields; null when it is not one (a message without a role or
  // text, say).
  function normalizeConversation(raw) {
    if (!raw || typeof raw !== "object" || !Array.isArray(raw.messages)) return null;
    const messages = normalizeMessages(raw.messages, new Set());
    if (!messages) return null;
    const firstUser = messages.find((m) => m.role === "user");
    const conv = {
      id: typeof raw.id === "string" && raw.id && raw.id.length <= MAX_ID ? raw.id : newId(),
      title: typeof raw.title === "string" && raw.title.trim() ? raw.title.slice(0, 200) : titleFrom(firstUser ? firstUser.content : ""),
      created: finite(raw.created, Date.now()),
      updated: finite(raw.updated, finite(raw.created, Date.now())),
      messages,
    };
    if (raw.titleEdited === true) conv.titleEdited = true;
    const settings = normalizeChatSettings(raw.settings);
    if (settings) conv.settings = settings;
    const w = raw.window;
    if (w && typeof w === "object" && typeof w.firstSeen === "string" && Number.isInteger(w.dropped)) {
      conv.window = { firstSeen: w.firstSeen, dropped: w.dropped, limit: Number.isInteger(w.limit) ? w.limit : 0 };
    }
    return conv;
  }

  // Nothing stored can stop the page: a record that makes the checks throw is
  // skipped. keepStreaming: replies that say "streaming" stay so (a merge with
  // another tab's write, where that tab may be streaming them now).
  function safeNormalize(raw, keepStreaming = false) {
    store.keepStreaming = keepStreaming;
    try {
      return normalizeConversation(raw);
    } catch {
      return null;
    } finally {
      store.keepStreaming = false;
    }
  }

  // JSON with sorted keys, to tell whether two conversations are the same.
  function canonicalJSON(value) {
    return JSON.stringify(value, (key, v) => (v && typeof v === "object" && !Array.isArray(v)
      ? Object.fromEntries(Object.keys(v).sort().map((k) => [k, v[k]])) : v));
  }

  // -- Versions ----------------------------------------------------------------
  // Every message may have versions: a reply's come from Regenerate, Retry and
  // Continue; a user message's from Edit + Send. The shown version is the
  // message's own fields, the others are in `alts`, and `alt` is the shown
  // one's place among them all (◀ 2/3 ▶). A user message's version carries
  // its branch: `tail`, the messages that followed it, so switching versions
  // switches the rest of the conversation too. A reply's versions share the
  // messages after them.

  function versionFields(msg) {
    return msg.role === "assistant" ? REPLY_FIELDS : USER_FIELDS;
  }

  function snapshotVariant(msg, tail = null) {
    const v = {};
    for (const key of versionFields(msg)) if (msg[key] !== undefined) v[key] = msg[key];
    if (tail) v.tail = tail;
    return v;
  }

  function applyVariant(msg, variant) {
    for (const key of versionFields(msg)) {
      if (variant[key] === undefined) delete msg[key];
      else msg[key] = variant[key];
    }
  }

  function variantCount(msg) {
    return (msg.alts ? msg.alts.length : 0) + 1;
  }

  function variantIndex(msg) {
    return msg.alts ? msg.alt : 0;
  }

  function branchTail(conv, msg) {
    return msg.role === "user" ? conv.messages.slice(conv.messages.indexOf(msg) + 1) : null;
  }

  // Every version of a message in order, the shown one included (with its branch).
  function allVariants(conv, msg) {
    const alts = msg.alts || [];
    const at = variantIndex(msg);
    return [...alts.slice(0, at), snapshotVariant(msg, branchTail(conv, msg)), ...alts.slice(at)];
  }

  function setVersions(msg, all, shown) {
    if (all.length) {
      msg.alts = all;
      msg.alt = shown;
    } else {
      delete msg.alts;
      delete msg.alt;
    }
  }

  function showVariant(conv, msg, target) {
    const all = allVariants(conv, msg);
    if (target < 0 || target >= all.length) return;
    const [chosen] = all.splice(target, 1);
    setVersions(msg, all, target);
    applyVariant(msg, chosen);
    if (chosen.tail) conv.messages.splice(conv.messages.indexOf(msg) + 1, Infinity, ...chosen.tail);
  }

  // A new version of a message becomes the shown one; the one shown before is
  // kept (every reply is a version: reasoning-only, stopped and failed ones
  // too; only a reply that never got anything, not even an error, is dropped).
  // A user message's new version starts a new branch: nothing after it yet.
  function startVariant(conv, msg, fields) {
    const all = allVariants(conv, msg);
    if (msg.role === "assistant" && !msg.content && !msg.reasoning && !msg.error) all.splice(variantIndex(msg), 1);
    setVersions(msg, all, all.length);
    applyVariant(msg, fields);
    if (msg.role === "user") conv.messages.splice(conv.messages.indexOf(msg) + 1);
  }

  // =========================================================================
  // Conversation storage: IndexedDB, one record per conversation
  //
  // Saving never deletes anything to make room. A conversation whose save
  // fails stays in memory and in `store.failed`; a banner says which, offers
  // an export and a retry, leaving the page asks for confirmation, and every
  // later change tries again. Without IndexedDB (some private modes) the
  // conversations go to localStorage under the same rules.
  //
  // Several tabs may hold the same conversation. A write never replaces the
  // stored record blindly: in one transaction it reads it and merges message
  // by message (mergeStored). Each message has a revision (`rev`); a tab
  // writes only the messages it changed since it last saw them, keeps the
  // other tabs' messages and their order, and inserts its new ones after the
  // message they follow. When both tabs changed the same message, the stored
  // one stays and this tab's text goes back to the message box with a notice.
  // A tab streaming a reply holds a Web Lock named for it, so other tabs show
  // that reply as streaming (not interrupted) until the lock is let go.
  // A write needs the page to live on, so a page that leaves first keeps what
  // it has not written in localStorage (keepUnsaved); the next load writes it.
  // =========================================================================

  const store = {
    kind: "memory",       // "indexeddb", "localstorage" or "memory" (nothing works)
    db: null,
    dirty: new Set(),     // conversation ids with changes not yet written
    deleted: new Set(),   // conversation ids to delete
    failed: new Map(),    // conversation id -> the error its last save got
    legacy: new Set(),    // ids read from the old localStorage key and not yet in IndexedDB
    unreadable: [],       // stored records the checks refused (left in storage, offered for export)
    timer: 0,
    writing: null,        // the flush in progress
    inFlight: new Set(),  // conversation ids whose write has started and not yet landed
    synced: new Map(),    // conversation id -> { meta, msgs: id -> { rev, json } } as last read or written
    live: new Set(),      // ids of replies another tab is streaming now
    ending: new Set(),    // ids of replies this tab streamed and has not yet written in their last state
    unsaved: new Set(),   // conversation ids whose STORE_UNSAVED copy goes once they are written
    keepStreaming: false, // while a merge reads a record (safeNormalize)
    channel: "BroadcastChannel" in window ? new BroadcastChannel("lem-chat") : null,
  };

  function idbDone(request) {
    return new Promise((resolve, reject) => {
      request.onsuccess = () => resolve(request.result);
      request.onerror = () => reject(request.error);
    });
  }

  function txDone(tx) {
    return new Promise((resolve, reject) => {
      tx.oncomplete = () => resolve();
      tx.onabort = () => reject(tx.error || new DOMException("The write was aborted.", "AbortError"));
      tx.onerror = () => {}; // the abort that follows carries the reason
    });
  }

  async function openDatabase() {
    if (!window.indexedDB) return null;
    const request = indexedDB.open(DB_NAME, 1);
    request.onupgradeneeded = () => request.result.createObjectStore(DB_STORE, { keyPath: "id" });
    request.onblocked = () => {};
    return idbDone(request);
  }

  async function readAllRecords() {
    const tx = store.db.transaction(DB_STORE, "readonly");
    return idbDone(tx.objectStore(DB_STORE).getAll());
  }

  // The conversations to start with, oldest format first: what the old page
  // kept in localStorage joins what IndexedDB holds (IndexedDB wins on an id
  // both have); the old key is removed once all of it is safely written.
  async function loadConversations() {
    try {
      store.db = await openDatabase();
      store.kind = store.db ? "indexeddb" : "localstorage";
    } catch {
      store.kind = "localstorage";
    }
    const legacy = readJSON(STORE_CONVERSATIONS, null);
    const legacyList = legacy && Array.isArray(legacy.conversations) ? legacy.conversations : [];
    const records = store.kind === "indexeddb" ? await readAllRecords().catch(() => []) : [];
    await noteLiveRuns();
    const byId = new Map();
    for (const raw of records) {
      const conv = safeNormalize(raw);
      if (!conv) {
        store.unreadable.push(raw);
        continue;
      }
      byId.set(conv.id, conv);
      rememberSynced(conv);
    }
    for (const raw of legacyList) {
      const conv = safeNormalize(raw);
      if (!conv || byId.has(conv.id)) continue;
      byId.set(conv.id, conv);
      if (store.kind === "indexeddb") store.legacy.add(conv.id);
    }
    if (legacy && !readLocal(STORE_CURRENT) && typeof legacy.currentId === "string") writeLocal(STORE_CURRENT, legacy.currentId);
    adoptUnsaved(byId);
    for (const id of store.legacy) store.dirty.add(id);
    if (legacy && store.kind === "indexeddb" && !store.legacy.size) writeLocal(STORE_CONVERSATIONS, null);
    return [...byId.values()].sort((a, b) => b.updated - a.updated);
  }

  function conversationById(id) {
    return state.conversations.find((c) => c.id === id) || null;
  }

  // Note a change to a conversation; written at once, or soon when streaming.
  function markDirty(conv, soon = false) {
    if (!conv) return;
    store.dirty.add(conv.id);
    if (!soon) flushSoon(0);
    else if (!store.timer) flushSoon(SAVE_THROTTLE_MS);
  }

  function forgetConversation(id) {
    store.dirty.delete(id);
    store.failed.delete(id);
    store.legacy.delete(id);
    store.deleted.add(id);
    flushSoon(0);
  }

  function flushSoon(ms) {
    clearTimeout(store.timer);
    store.timer = setTimeout(() => { store.timer = 0; flush(); }, ms);
  }

  // Write what changed, and again what failed before. One transaction per
  // conversation, deletions first (they free room), so one conversation too
  // big for what is left fails alone.
  async function flush() {
    if (store.writing) {
      await store.writing;
      if (!store.dirty.size && !store.deleted.size) return;
    }
    store.writing = (store.kind === "indexeddb" ? flushToDatabase() : flushToLocalStorage())
      .finally(() => { store.writing = null; });
    await store.writing;
    for (const id of store.unsaved) {
      if (store.dirty.has(id) || store.failed.has(id) || store.inFlight.has(id)) continue;
      store.unsaved.delete(id);
      writeLocal(STORE_UNSAVED + id, null);
    }
    renderStorageWarning();
  }

  // The page is leaving: an IndexedDB write started now would not finish (its
  // read, merge and write need the page to live on), so each conversation not
  // yet written goes to localStorage, which writes at once, with what this tab
  // changed in it; the next load finishes the write (adoptUnsaved).
  function keepUnsaved() {
    if (store.kind !== "indexeddb") return; // localStorage saves are already synchronous
    for (const id of new Set([...store.dirty, ...store.inFlight, ...store.failed.keys()])) {
      const conv = conversationById(id);
      const synced = store.synced.get(id);
      if (!conv) continue;
      const same = (m) => synced.msgs.get(m.id)?.json === canonicalJSON(m);
      const was = synced && {
        meta: metaOf(conv) === synced.meta,
        msgs: [...synced.msgs].map(([mid, w]) => [mid, w.rev, conv.messages.some((m) => m.id === mid && same(m))]),
      };
      if (writeJSON(STORE_UNSAVED + id, { conv, was })) store.unsaved.add(id);
    }
  }

  // Copies a page left with (keepUnsaved) replace the stored ones and are
  // written at once, merged with the stored ones as that page would have.
  function adoptUnsaved(byId) {
    for (const key of localKeys(STORE_UNSAVED)) {
      const entry = readJSON(key, null);
      const conv = entry && safeNormalize(entry.conv);
      if (!conv) {
        writeLocal(key, null);
        continue;
      }
      const was = entry.was;
      if (byId.has(conv.id) && was && Array.isArray(was.msgs)) {
        const json = new Map(conv.messages.map((m) => [m.id, canonicalJSON(m)]));
        store.synced.set(conv.id, { meta: was.meta === true ? metaOf(conv) : "", msgs: new Map(was.msgs
          .filter((w) => Array.isArray(w) && typeof w[0] === "string")
          .map(([id, rev, same]) => [id, { rev: rev | 0, json: same === true && json.has(id) ? json.get(id) : "" }])) });
      } else {
        store.synced.delete(conv.id); // never written, or deleted since: written whole
      }
      byId.set(conv.id, conv);
      store.dirty.add(conv.id);
      store.unsaved.add(conv.id);
    }
  }

  async function flushToDatabase() {
    const deleted = [...store.deleted];
    const saved = [];
    store.deleted.clear();
    if (deleted.length) {
      const tx = store.db.transaction(DB_STORE, "readwrite");
      for (const id of deleted) tx.objectStore(DB_STORE).delete(id);
      await txDone(tx).catch(() => deleted.forEach((id) => store.deleted.add(id)));
    }
    for (const id of new Set([...store.dirty, ...store.failed.keys()])) {
      const conv = conversationById(id);
      store.dirty.delete(id);
      store.failed.delete(id);
      if (!conv) continue;
      store.inFlight.add(id);
      try {
        const { merged, written } = await mergeAndPut(conv);
        store.synced.set(conv.id, written);
        store.legacy.delete(id);
        saved.push(id);
        afterMerge(conv, merged);
      } catch (err) {
        store.failed.set(id, err);
      } finally {
        store.inFlight.delete(id);
      }
    }
    if (!store.legacy.size && readLocal(STORE_CONVERSATIONS) !== null) writeLocal(STORE_CONVERSATIONS, null);
    const live = [...state.runs.values()].map((run) => run.msg.id);
    if (store.channel && (saved.length || deleted.length)) store.channel.postMessage({ saved, deleted, live });
  }

  // Read the stored record, merge this tab's copy into it and write the
  // result, all in one transaction, so no other tab's write falls between.
  // Resolves to the merge's result and what was written, as rememberSynced keeps it
  // (taken at the write: the conversation may change before the write commits).
  function mergeAndPut(conv) {
    const tx = store.db.transaction(DB_STORE, "readwrite");
    const objects = tx.objectStore(DB_STORE);
    const read = objects.get(conv.id);
    let merged = null;
    let written = null;
    read.onsuccess = () => {
      const stored = read.result ? safeNormalize(read.result, true) : null;
      merged = stored ? mergeStored(conv, stored, true) : null;
      objects.put(conv);
      written = syncedSnapshot(conv);
    };
    return txDone(tx).then(() => ({ merged, written }));
  }

  async function flushToLocalStorage() {
    const ids = [...store.dirty];
    store.dirty.clear();
    store.deleted.clear();
    try {
      localStorage.setItem(STORE_CONVERSATIONS, JSON.stringify({ conversations: state.conversations }));
      store.failed.clear();
      store.kind = "localstorage";
    } catch (err) {
      for (const id of ids) store.failed.set(id, err);
      for (const conv of state.conversations) if (!store.failed.has(conv.id)) store.failed.set(conv.id, err);
      store.kind = "memory";
    }
  }

  // Another tab saved or deleted conversations: merge its versions in (what
  // this tab changed and has not written yet stays, and is written next).
  async function onStoreMessage(event) {
    const { saved = [], deleted = [], live = [] } = event.data || {};
    if (store.kind !== "indexeddb") return;
    for (const id of live) watchLiveRun(id);
    const tx = store.db.transaction(DB_STORE, "readonly");
    const fresh = await Promise.all(saved.map((id) => idbDone(tx.objectStore(DB_STORE).get(id))));
    for (const raw of fresh) adoptStored(raw, true);
    const busy = (id) => state.runs.has(id) || store.dirty.has(id) || store.failed.has(id);
    state.conversations = state.conversations.filter((c) => !deleted.includes(c.id) || busy(c.id));
    state.conversations.sort((a, b) => b.updated - a.updated);
    if (!currentConversation()) state.currentId = null;
    renderConversationList();
    renderChatHead();
  }

  function adoptStored(raw, keepStreaming) {
    const stored = safeNormalize(raw, keepStreaming);
    if (!stored) return;
    const conv = conversationById(stored.id);
    if (!conv) {
      state.conversations.push(stored);
      rememberSynced(stored);
      watchStreaming(stored);
      return;
    }
    afterMerge(conv, mergeStored(conv, stored, false));
  }

  // -- Merging two copies of a conversation -------------------------------------

  function metaOf(conv) {
    const { messages, ...meta } = conv;
    return canonicalJSON(meta);
  }

  function syncedSnapshot(conv) {
    return { meta: metaOf(conv), msgs: new Map(conv.messages.map((m) => [m.id, { rev: m.rev || 0, json: canonicalJSON(m) }])) };
  }

  // Note conv (or only its messages `ids`) as the same as in storage now.
  function rememberSynced(conv, ids = null) {
    const old = store.synced.get(conv.id);
    if (!ids || !old) {
      store.synced.set(conv.id, syncedSnapshot(conv));
      return;
    }
    for (const m of conv.messages) if (ids.has(m.id)) old.msgs.set(m.id, { rev: m.rev || 0, json: canonicalJSON(m) });
  }

  // Merge `stored` (another tab's latest) into `conv` (this tab's copy), in
  // place: this tab's message objects stay (their views and runs hold them).
  // writing: conv is about to be written, so its changes get a new revision.
  // Returns { changed, conflicts }: whether what is shown changed, and this
  // tab's messages that lost to another tab's change of the same message.
  function mergeStored(conv, stored, writing) {
    const synced = store.synced.get(conv.id) || { meta: null, msgs: new Map() };
    const owned = ownReplies();
    const mine = new Map(conv.messages.map((m) => [m.id, m]));
    const theirs = new Map(stored.messages.map((m) => [m.id, m]));
    const result = { changed: false, conflicts: [], taken: new Set() };
    const keep = new Set();
    for (const m of conv.messages) {
      const verdict = mergeMessage(m, theirs.get(m.id), synced.msgs.get(m.id), owned.has(m.id), writing);
      if (verdict === "drop") result.changed = true;
      else keep.add(m.id);
      if (verdict === "theirs" || verdict === "conflict") result.taken.add(m.id);
      if (verdict === "conflict") result.conflicts.push(m.content);
      if (verdict !== "mine" && verdict !== "same") result.changed = true;
    }
    const order = mergeOrder(conv.messages.filter((m) => keep.has(m.id)), stored.messages, mine, synced.msgs, keep);
    for (const m of order) if (!mine.has(m.id)) result.taken.add(m.id); // new from another tab: stored as it is
    if (order.length !== conv.messages.length || order.some((m, i) => m !== conv.messages[i])) result.changed = true;
    conv.messages = order;
    mergeMeta(conv, stored, synced.meta);
    return result;
  }

  // What becomes of one message of this tab: "same", "mine" (this tab's
  // change wins), "theirs" (taken over in place), "conflict" (both changed
  // it: theirs is taken), "drop" (another tab deleted it, unchanged here).
  // A stored revision below this tab's is an older copy (read before this
  // tab's own write landed): never taken.
  function mergeMessage(m, theirs, was, owned, writing) {
    const changedHere = !was || canonicalJSON(m) !== was.json;
    if (!theirs) {
      if (was && !changedHere) return "drop";
      if (writing && changedHere) m.rev = (m.rev || 0) + 1;
      return "mine";
    }
    const changedThere = (theirs.rev || 0) > (m.rev || 0);
    const older = (theirs.rev || 0) < (m.rev || 0);
    if (owned || older || (changedHere && !changedThere)) { // a reply this tab streams is its own to write
      if (writing && (changedHere || changedThere)) m.rev = Math.max(m.rev || 0, theirs.rev || 0) + 1;
      return "mine";
    }
    if (!changedThere && canonicalJSON(theirs) === canonicalJSON(m)) return "same";
    const conflict = changedHere && m.role === "user" && theirs.content !== m.content;
    for (const key of Object.keys(m)) if (!(key in theirs)) delete m[key];
    Object.assign(m, theirs);
    return conflict ? "conflict" : "theirs";
  }

  // The stored order, without what this tab deleted (known to it and not
  // changed since), with this tab's new messages after the one they follow here.
  function mergeOrder(kept, storedList, mine, synced, keep) {
    const out = [];
    for (const t of storedList) {
      if (mine.has(t.id)) {
        if (keep.has(t.id)) out.push(mine.get(t.id));
      } else if (!synced.has(t.id) || (t.rev || 0) > synced.get(t.id).rev) {
        out.push(t); // new from another tab, or changed there after this tab deleted it
      }
    }
    const placed = new Set(out.map((m) => m.id));
    kept.forEach((m, i) => {
      if (placed.has(m.id)) return;
      const before = kept.slice(0, i).reverse().find((p) => placed.has(p.id));
      out.splice(before ? out.indexOf(before) + 1 : 0, 0, m);
      placed.add(m.id);
    });
    return out;
  }

  // Title, settings and window: this tab's when it changed them, else the stored ones.
  function mergeMeta(conv, stored, was) {
    if (was !== null && metaOf(conv) !== was) return;
    for (const key of Object.keys(conv)) if (key !== "messages" && key !== "id" && !(key in stored)) delete conv[key];
    for (const [key, value] of Object.entries(stored)) if (key !== "messages") conv[key] = value;
  }

  function afterMerge(conv, merged) {
    if (!merged) return;
    watchStreaming(conv);
    if (merged.taken.size) rememberSynced(conv, merged.taken);
    if (merged.conflicts.length) showConflict(conv, merged.conflicts);
    if (merged.changed && conv.id === state.currentId && state.loaded) refreshTranscript(conv, merged.taken);
  }

  // -- Replies streaming in other tabs (Web Locks) ------------------------------

  const RUN_LOCK = "lem-chat.run.";

  function holdRunLock(run) {
    if (!navigator.locks) return;
    navigator.locks.request(RUN_LOCK + run.msg.id, () => (run.finished ? null
      : new Promise((resolve) => { run.releaseLock = resolve; }))).catch(() => {});
  }

  // Let the other tabs know the reply ended, once its last state is written;
  // until then the reply stays this tab's to write (ownReplies), though its run is over.
  function releaseRunLock(run) {
    run.finished = true;
    store.ending.add(run.msg.id);
    const release = () => {
      store.ending.delete(run.msg.id);
      if (run.releaseLock) run.releaseLock();
    };
    (store.writing || Promise.resolve()).then(() => flush()).then(release, release);
  }

  // Ids of the replies this tab streams or has just ended: its own to write, whatever other tabs stored.
  function ownReplies() {
    return new Set([...[...state.runs.values()].map((run) => run.msg.id), ...store.ending]);
  }

  async function noteLiveRuns() {
    if (!navigator.locks || !navigator.locks.query) return;
    try {
      const { held = [] } = await navigator.locks.query();
      for (const lock of held) if (lock.name && lock.name.startsWith(RUN_LOCK)) watchLiveRun(lock.name.slice(RUN_LOCK.length));
    } catch { /* no locks: such replies show as interrupted */ }
  }

  // Another tab streams this reply: show it as streaming until its lock is
  // let go (the reply ended, or that tab went away), then read what it left:
  // still "streaming" then means interrupted.
  function watchLiveRun(id) {
    if (!navigator.locks || store.live.has(id) || ownReplies().has(id)) return;
    store.live.add(id);
    navigator.locks.request(RUN_LOCK + id, async () => {
      store.live.delete(id);
      const conv = state.conversations.find((c) => c.messages.some((m) => m.id === id));
      if (conv && store.db) adoptStored(await idbDone(store.db.transaction(DB_STORE).objectStore(DB_STORE).get(conv.id)), false);
    }).catch(() => store.live.delete(id));
  }

  // Every reply of conv that says "streaming" and is not this tab's: watched.
  function watchStreaming(conv) {
    for (const m of conv.messages) if (m.status === "streaming") watchLiveRun(m.id);
  }

  function storageProblem(err) {
    const name = err && err.name;
    if (name === "QuotaExceededError") return "this browser's storage for the page is full";
    return `the browser refused to store it${err && err.message ? ` (${err.message})` : ""}`;
  }

  function renderStorageWarning() {
    const failed = [...store.failed.keys()].map(conversationById).filter(Boolean);
    ui.storageWarning.hidden = !failed.length;
    if (!failed.length) return;
    const what = failed.length === 1 ? `“${failed[0].title}”` : `${failed.length} conversations`;
    ui.storageWarningText.textContent = `Not saved: ${what}, because ${storageProblem(store.failed.get(failed[0].id))}. ` +
      "Nothing has been deleted. Export your chats to a file, or delete conversations you no longer need; " +
      "saving is tried again after every change.";
  }

  // =========================================================================
  // State
  // =========================================================================

  const state = {
    settings: loadSettings(),
    apiKey: readLocal(STORE_API_KEY) || "",
    conversations: [],
    currentId: readLocal(STORE_CURRENT),
    runs: new Map(),      // conversation id -> its request in flight (one per conversation)
    stickToBottom: true,
    search: "",
    editing: null,        // { id, draft } of the message being edited
    loaded: false,
    unloading: false,
  };

  const $ = (id) => document.getElementById(id);
  const ui = {};
  const messageViews = new WeakMap(); // message object -> its <article>
  const streamViews = new WeakMap();  // streaming message -> its incremental view

  function currentConversation() {
    return conversationById(state.currentId);
  }

  function setCurrent(id) {
    state.currentId = id;
    writeLocal(STORE_CURRENT, id);
  }

  function runOf(conv) {
    return conv ? state.runs.get(conv.id) || null : null;
  }

  function messageById(conv, id) {
    return conv ? conv.messages.find((m) => m.id === id) || null : null;
  }

  // =========================================================================
  // Rendering: conversation list, header, transcript, messages
  // =========================================================================

  function formatDate(ts) {
    const d = new Date(ts);
    const today = new Date();
    return d.toDateString() === today.toDateString()
      ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
      : d.toLocaleDateString([], { month: "short", day: "numeric" });
  }

  function renderAll() {
    renderConversationList();
    renderChatHead();
    renderTranscript();
    renderComposer();
    renderStorageWarning();
    renderSettingsSummary();
  }

  function matchesSearch(conv, query) {
    if (!query) return true;
    const has = (text) => typeof text === "string" && text.toLocaleLowerCase().includes(query);
    return has(conv.title) || conv.messages.some((m) => has(m.content) || (m.alts || []).some((v) => has(v.content)));
  }

  function runLabel(run) {
    return run.phase === "waiting" ? "Waiting for a free slot…" : "Generating…";
  }

  function renderConversationItem(conv) {
    const current = conv.id === state.currentId;
    const run = runOf(conv);
    const title = conv.title || "New chat";
    const open = h("button", { type: "button", className: "conv-open", "data-id": conv.id, "aria-current": current ? "page" : null },
      h("span", { className: "conv-title", text: title, dir: "auto" }),
      h("span", { className: "conv-date", text: run ? runLabel(run) : formatDate(conv.updated || conv.created) }));
    const rename = h("button", { type: "button", className: "btn icon small ghost conv-rename", "data-rename": conv.id,
      "aria-label": `Rename conversation: ${title}`, title: "Rename", text: "✎" });
    const del = h("button", { type: "button", className: "btn icon small ghost conv-del", "data-delete": conv.id,
      "aria-label": `Delete conversation: ${title}`, title: "Delete", text: "×" });
    const classes = [current ? "current" : "", run ? "generating" : ""].filter(Boolean).join(" ");
    return h("li", { className: classes || null, "data-conv": conv.id }, open, rename, del);
  }

  // Re-rendering the list keeps keyboard focus on the same control.
  function renderConversationList() {
    const focused = document.activeElement && ui.convList.contains(document.activeElement)
      ? ["data-id", "data-rename", "data-delete"].map((a) => [a, document.activeElement.getAttribute(a)]).find(([, v]) => v)
      : null;
    const query = state.search.trim().toLocaleLowerCase();
    const items = state.conversations.filter((c) => matchesSearch(c, query)).map(renderConversationItem);
    if (!items.length) {
      items.push(h("li", { className: "conv-empty", text: query ? `No conversation matches “${state.search.trim()}”.` : "No conversations yet." }));
    }
    ui.convList.replaceChildren(...items);
    if (focused) {
      const again = ui.convList.querySelector(`[${focused[0]}="${CSS.escape(focused[1])}"]`);
      if (again) again.focus();
    }
  }

  // The tokens in the model's context after the last reply that reported them.
  // A reply's reasoning is not sent back (templates drop it), so only the
  // answer's share of its tokens, estimated by characters, stays.
  function contextUsed(conv) {
    for (let i = conv.messages.length - 1; i >= 0; i--) {
      const msg = conv.messages[i];
      const s = msg.stats;
      if (msg.role === "assistant" && s && Number.isFinite(s.promptTokens)) {
        const reply = finite(s.completionTokens, 0);
        const thought = msg.reasoning ? msg.reasoning.length : 0;
        const kept = thought ? Math.round(reply * (msg.content.length / (msg.content.length + thought))) : reply;
        return { prompt: s.promptTokens, reply: kept, reasoning: reply - kept };
      }
    }
    return null;
  }

  function renderChatHead() {
    const conv = currentConversation();
    ui.chatHead.hidden = !conv;
    if (!conv) return;
    ui.chatTitle.textContent = conv.title || "New chat";
    renderGauge(conv);
  }

  // The context gauge: tokens the model held at the end of the last turn
  // (its prompt plus its reply, which the next prompt will contain) against
  // the model's context from /healthz.
  function renderGauge(conv) {
    const used = contextUsed(conv);
    ui.gauge.hidden = !used;
    if (!used) return;
    const tokens = used.prompt + used.reply;
    const limit = server.contextLength;
    const n = (x) => x.toLocaleString("en-US");
    const share = limit ? tokens / limit : 0;
    ui.gauge.dataset.level = share >= GAUGE_FULL ? "full" : share >= GAUGE_WARN ? "warn" : "ok";
    ui.gaugeBar.hidden = !limit;
    ui.gaugeFill.style.width = `${Math.min(100, share * 100).toFixed(1)}%`;
    ui.gaugeText.replaceChildren(limit ? `${n(tokens)} / ${n(limit)}` : n(tokens), h("span", { className: "label-wide", text: " tokens" }));
    if (limit) {
      ui.gaugeBar.setAttribute("aria-valuemax", String(limit));
      ui.gaugeBar.setAttribute("aria-valuenow", String(Math.min(tokens, limit)));
      ui.gaugeBar.setAttribute("aria-valuetext", `${n(tokens)} of ${n(limit)} tokens (${Math.round(share * 100)}%)`);
    }
    const lines = [`Context after the last reply: prompt ${n(used.prompt)} + reply ${n(used.reply)} tokens.`];
    if (used.reasoning) lines.push(`Its ${n(used.reasoning)} tokens of reasoning (about) are not counted: they are not sent back.`);
    if (limit) lines.push(`The model's context holds ${n(limit)} tokens.`);
    if (share >= GAUGE_WARN) lines.push("Nearly full: delete or shorten long messages, or start a new chat.");
    if (server.maxContext) lines.push(`The server keeps only the last ${server.maxContext} messages (--max-context), in whole turns.`);
    ui.gauge.title = lines.join("\n");
    ui.gaugeHelp.textContent = lines.join(" ");
  }

  function renderEmptyState() {
    const name = server.model || "the model";
    return h("div", { className: "empty", id: "empty-state" },
      h("h2", { text: `Chat with ${name}` }),
      h("p", { text: "Replies stream from this lem-serve instance. Nothing leaves this machine." }),
      h("p", { className: "hint", text: `Chats are kept in this browser for ${location.host} only: another address ` +
        "(localhost and 127.0.0.1, say) has its own list. Export all and Import move chats between them." }),
      h("p", null, ...keyHint(), " · ", h("span", { className: "kbd", text: "?" }), " for shortcuts"));
  }

  // The messages before the first one the model saw in its last request.
  function outsideWindow(conv) {
    const w = conv.window;
    const at = w ? conv.messages.findIndex((m) => m.id === w.firstSeen) : -1;
    return at > 0 ? at : 0;
  }

  function windowMarker(conv, hidden) {
    const limit = conv.window.limit;
    const why = limit ? `the server keeps only the last ${limit} (--max-context ${limit}), in whole turns` : "the server's window left them out";
    return h("div", { className: "window-marker", id: "window-marker", role: "note" },
      h("span", { text: `The model did not see the ${hidden === 1 ? "message" : `${hidden} messages`} above in its last reply: ${why}.` }));
  }

  // keepScroll: re-rendered in place (an edit, a deletion) rather than opened.
  function renderTranscript(keepScroll = false) {
    const conv = currentConversation();
    const top = ui.transcript.scrollTop;
    if (!conv || !conv.messages.length) {
      ui.thread.replaceChildren(renderEmptyState());
    } else {
      const hidden = outsideWindow(conv);
      const nodes = conv.messages.map((msg) => renderMessage(conv, msg));
      if (hidden) nodes.splice(hidden, 0, windowMarker(conv, hidden));
      ui.thread.replaceChildren(...nodes);
    }
    if (keepScroll) {
      ui.transcript.scrollTop = top;
      updateJumpButton();
    } else {
      state.stickToBottom = true;
      scrollToBottom();
    }
  }

  function renderMessage(conv, msg) {
    const el = h("article", { className: `msg ${msg.role}`, "data-role": msg.role, "data-id": msg.id, tabindex: "-1" });
    messageViews.set(msg, el);
    try {
      updateMessage(conv, msg, el);
    } catch (err) {
      // Never let one message stop the others (or the page) from showing.
      el.replaceChildren(h("div", { className: "msg-error", role: "alert", text: `This message could not be shown (${err && err.message}).` }),
        h("div", { className: "msg-meta" }, renderActionsSafe(conv, msg)));
    }
    return el;
  }

  function renderActionsSafe(conv, msg) {
    try {
      return renderActions(conv, msg);
    } catch {
      return h("span");
    }
  }

  // Re-render one message in place. While it streams, only its body's tail
  // changes on each frame (see renderStreamFrame); this runs on state changes.
  function updateMessage(conv, msg, el = null) {
    if (!el) {
      el = messageViews.get(msg);
      if (!el || !el.isConnected) return; // not on screen: rendered when its conversation opens
    }
    const idx = conv.messages.indexOf(msg);
    const openThinks = [...el.querySelectorAll(".msg-body details")].map((d) => d.open);
    const editing = state.editing && state.editing.id === msg.id;
    el.dataset.state = msg.status || "done";
    el.classList.toggle("editing", Boolean(editing));
    el.classList.toggle("outside-window", idx >= 0 && idx < outsideWindow(conv));
    const label = h("div", { className: "msg-role", text: msg.role === "user" ? "You" : (msg.model || server.model || "Assistant") });
    const parts = [label, editing ? renderEditor(conv, msg) : renderBody(msg)];
    if (!editing && msg.status === "waiting") parts.push(renderWaiting(msg));
    else if (!editing && msg.error) parts.push(renderError(conv, msg));
    if (!editing) parts.push(renderMeta(conv, msg));
    el.replaceChildren(...parts);
    el.querySelectorAll(".msg-body details").forEach((d, k) => { if (openThinks[k]) d.open = true; });
    if (msg.chunks) el.dataset.chunks = msg.chunks;
  }

  function renderBody(msg) {
    if (msg.role !== "assistant") return h("div", { className: "msg-body", text: msg.content, dir: "auto" }); // verbatim
    const body = h("div", { className: "msg-body md" });
    if (msg.status === "streaming") {
      const view = newStreamView(body);
      streamViews.set(msg, view);
      renderStreaming(view, shownText(msg));
    } else {
      body.append(renderMarkdown(shownText(msg)));
    }
    return body;
  }

  // A reply as the renderer shows it: its reasoning (msg.reasoning, from the
  // server's reasoning_content) first, as a collapsed <think> block, "Thinking…"
  // while it is still the only thing that came. The text only ever grows at
  // its end, as the incremental renderer needs.
  function shownText(msg) {
    if (!msg.reasoning) return msg.content;
    const thinking = msg.status === "streaming" && !msg.content;
    return `<think>${msg.reasoning}${thinking ? "" : "</think>"}${msg.content}`;
  }

  function renderEditor(conv, msg) {
    const later = conv.messages.length - conv.messages.indexOf(msg) - 1;
    const area = h("textarea", { className: "edit-box", dir: "auto", "aria-label": msg.role === "user" ? "Edit message" : "Edit reply" });
    area.value = state.editing.draft;
    const actions = h("div", { className: "edit-actions" });
    if (msg.role === "user" && later) {
      actions.append(h("p", { className: "hint", text: `Send replaces the ${later === 1 ? "message" : `${later} messages`} after this one (you can undo).` }));
    }
    actions.append(h("button", { type: "button", className: "btn small", "data-action": "edit-cancel", text: "Cancel" }),
      h("button", { type: "button", className: `btn small${msg.role === "user" ? "" : " primary"}`, "data-action": "edit-save", text: "Save" }));
    if (msg.role === "user") {
      actions.append(h("button", { type: "button", className: "btn small primary", "data-action": "edit-send", text: "Send" }));
    }
    return h("div", { className: "msg-edit" }, area, actions);
  }

  function previousUser(conv, msg) {
    const idx = conv.messages.indexOf(msg);
    for (let i = idx - 1; i >= 0; i--) if (conv.messages[i].role === "user") return conv.messages[i];
    return null;
  }

  function renderError(conv, msg) {
    const err = msg.error;
    const box = h("div", { className: "msg-error", role: "alert", "data-kind": err.kind }, h("p", { text: err.message }));
    const button = (action, text) => h("button", { type: "button", className: "btn small", "data-action": action, text });
    if (err.kind === "auth") box.append(button("api-key", "Enter API key"));
    if (err.kind === "too-long" && previousUser(conv, msg)) box.append(button("edit-prev", "Edit message"), button("delete-prev", "Delete message"));
    if (err.kind === "max-tokens") box.append(button("settings", "Open settings"));
    if (err.retryable !== false && err.kind !== "too-long") box.append(button("retry", "Retry"));
    return box;
  }

  function renderWaiting(msg) {
    const seconds = Math.max(0, Math.ceil((msg.retryAt - Date.now()) / 1000));
    return h("div", { className: "msg-error msg-wait", "data-kind": "busy" },
      h("p", { className: "wait-text", text: `Server busy: every slot is taken. Retrying in ${seconds} s…` }),
      h("button", { type: "button", className: "btn small", "data-action": "retry-now", text: "Retry now" }),
      h("button", { type: "button", className: "btn small", "data-action": "cancel-retry", text: "Cancel" }));
  }

  function renderMeta(conv, msg) {
    const meta = h("div", { className: "msg-meta" });
    if (variantCount(msg) > 1) meta.append(renderVariantNav(msg));
    if (msg.role === "assistant" && (msg.status === "streaming" || msg.status === "waiting")) {
      const run = runOf(conv);
      const text = run && run.msg === msg ? streamStatus(run) : "Streaming in another tab…";
      meta.append(h("span", { className: "msg-stats", text }));
      return meta;
    }
    if (msg.role === "assistant") {
      const stats = statsText(msg);
      if (stats) meta.append(h("span", { className: "msg-stats", text: stats.text, title: stats.title }));
      const note = { stopped: "Stopped", interrupted: "Interrupted: the page was closed or reloaded while this reply was streaming" }[msg.status];
      if (note) meta.append(h("span", { className: "msg-note", text: note }));
      if (msg.finishReason === "length") meta.append(h("span", { className: "msg-note", text: "Hit the max tokens limit" }));
    }
    meta.append(renderActions(conv, msg));
    return meta;
  }

  function renderVariantNav(msg) {
    const at = variantIndex(msg);
    const count = variantCount(msg);
    const what = msg.role === "user" ? "Versions of this message" : "Versions of this reply";
    return h("span", { className: "variant-nav", role: "group", "aria-label": what },
      h("button", { type: "button", className: "btn small ghost", "data-action": "prev-variant", "aria-label": "Previous version", title: "Previous version", text: "◀", disabled: at === 0 }),
      h("span", { className: "variant-pos", text: `${at + 1}/${count}`, "aria-label": `Version ${at + 1} of ${count}` }),
      h("button", { type: "button", className: "btn small ghost", "data-action": "next-variant", "aria-label": "Next version", title: "Next version", text: "▶", disabled: at === count - 1 }));
  }

  function renderActions(conv, msg) {
    const actions = h("span", { className: "msg-actions" });
    const button = (action, text, label) => h("button", { type: "button", className: "btn small ghost", "data-action": action, text, "aria-label": label });
    const isReply = msg.role === "assistant";
    if (msg.content || msg.reasoning) actions.append(button("copy", "Copy", isReply ? "Copy reply" : "Copy message"));
    actions.append(button("edit", "Edit", isReply ? "Edit reply" : "Edit message"));
    actions.append(button("delete", "Delete", isReply ? "Delete reply" : "Delete message"));
    const last = conv.messages[conv.messages.length - 1] === msg;
    if (isReply && msg.finishReason === "length" && !msg.error && !runOf(conv)) actions.append(button("continue", "Continue", "Continue"));
    if (isReply && !msg.error && (last || msg.status === "interrupted")) actions.append(button("regenerate", last ? "Regenerate" : "Retry"));
    return actions;
  }

  // In place of a re-render of the whole chat when another tab's write changed
  // only some messages (a reply streaming there, say).
  function refreshTranscript(conv, ids) {
    const shown = [...ui.thread.querySelectorAll("article.msg")].map((a) => a.dataset.id);
    const same = shown.length === conv.messages.length && conv.messages.every((m, i) => m.id === shown[i]);
    const follow = state.stickToBottom;
    if (!same) renderTranscript(true);
    else for (const m of conv.messages) if (ids.has(m.id)) updateMessage(conv, m);
    if (follow) scrollToBottom(true);
    renderChatHead();
  }

  // Both tabs changed the same message: the other tab's version stays, and
  // this tab's text is not lost: it goes back to the message box, with a notice.
  function showConflict(conv, texts) {
    const draft = texts.join("\n\n");
    if (conv.id === state.currentId && !ui.prompt.value.includes(draft)) {
      ui.prompt.value = ui.prompt.value ? `${ui.prompt.value}\n\n${draft}` : draft;
      autoSizePrompt();
    }
    ui.conflictText.textContent = `“${conv.title}” was changed in another tab at the same time as here. ` +
      (conv.id === state.currentId ? "The other tab's version is kept; your text is back in the message box."
        : "The other tab's version is kept; your text was: " + draft.slice(0, 300));
    ui.conflict.hidden = false;
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

  // What a reply in flight is doing, said plainly: a silent server is named as such.
  function streamStatus(run) {
    if (!run) return "Generating…";
    const silent = Date.now() - run.lastActivity;
    if (run.phase !== "waiting" && silent >= timing.stallNoticeMs) {
      return `No data from the server for ${Math.floor(silent / 1000)} s…`;
    }
    return run.phase === "waiting" ? "Waiting for a free slot…" : "Generating…";
  }

  // One frame of a streaming reply: the body's tail, the chunk count, the status line.
  function renderStreamFrame(run) {
    const el = messageViews.get(run.msg);
    const view = streamViews.get(run.msg);
    if (!el || !el.isConnected) return;
    if (run.msg.status === "waiting") {
      const text = el.querySelector(".wait-text");
      const seconds = Math.max(0, Math.ceil((run.msg.retryAt - Date.now()) / 1000));
      if (text) text.textContent = `Server busy: every slot is taken. Retrying in ${seconds} s…`;
      return;
    }
    if (view) renderStreaming(view, shownText(run.msg));
    if (run.msg.chunks) el.dataset.chunks = run.msg.chunks;
    const status = el.querySelector(".msg-meta .msg-stats");
    const text = streamStatus(run);
    if (status && status.textContent !== text) status.textContent = text;
  }

  // Batch a streaming reply's re-renders to one per frame.
  let renderQueued = false;
  function scheduleRender() {
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(() => {
      renderQueued = false;
      const run = state.runs.get(state.currentId);
      if (run) {
        renderStreamFrame(run);
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

  // The messages sent for the reply at index `upto`: the system prompt, then
  // the turns before it. Failed empty replies are skipped and consecutive
  // same-role turns merged, because many chat templates insist that user and
  // assistant alternate. sources[i] lists the ids of the conversation's
  // messages behind request message i, to map the server's window back.
  function buildMessages(conv, upto) {
    const messages = [];
    const sources = [];
    const system = chatSettings(conv).systemPrompt.trim();
    if (system) {
      messages.push({ role: "system", content: system });
      sources.push([]);
    }
    for (const msg of conv.messages.slice(0, upto)) {
      if (msg.status === "streaming" || msg.status === "waiting") continue;
      const content = msg.role === "assistant" ? stripThink(msg.content) : msg.content;
      if (!content) continue;
      const last = messages[messages.length - 1];
      if (last && last.role === msg.role && sources[sources.length - 1].length) {
        last.content += `\n\n${content}`;
        sources[sources.length - 1].push(msg.id);
      } else {
        messages.push({ role: msg.role, content });
        sources.push([msg.id]);
      }
    }
    return { messages, sources };
  }

  function requestBody(messages, conv) {
    const settings = chatSettings(conv);
    const body = {
      messages,
      stream: true,
      stream_options: { include_usage: true },
    };
    if (settings.temperature !== null) body.temperature = settings.temperature;
    // At the server's own limit, leave max_tokens out: the server then trims the
    // budget to what fits the model's context, where an explicit value that
    // cannot fit is refused (context_length_exceeded), as OpenAI does.
    const maxTokens = effectiveMaxTokens(settings);
    if (!server.maxTokens || maxTokens < server.maxTokens) body.max_tokens = maxTokens;
    if (server.thinking && !settings.thinking) body.chat_template_kwargs = { enable_thinking: false };
    return body;
  }

  // A prompt that cannot fit is a 400 with code context_length_exceeded. The
  // advice names what the page lets the user do about it.
  function contextError(detail, param) {
    if (param === "max_tokens") {
      return { kind: "max-tokens", message: `The reply cannot fit: ${detail}. Lower “Max tokens” in Settings, or delete or shorten long messages.` };
    }
    return { kind: "too-long", message: `This conversation no longer fits the model: ${detail}. ` +
      "Delete or shorten the long message (the buttons below act on the message this reply answers), or delete earlier messages, then Retry. Or start a new chat." };
  }

  async function errorFromResponse(res) {
    let error = {};
    try {
      const body = await res.json();
      error = (body && typeof body.error === "object" && body.error) || {};
    } catch {
      /* not JSON: fall back to the status */
    }
    const detail = typeof error.message === "string" ? error.message : "";
    const suffix = detail ? ` ${detail}` : "";
    switch (res.status) {
      case 401:
      case 403:
        return { kind: "auth", message: state.apiKey ? `The server rejected the API key (${res.status}).${suffix}` : "The server needs an API key." };
      case 429: {
        const retryAfter = parseInt(res.headers.get("Retry-After") || "", 10);
        return { kind: "busy", message: "Server busy: it is already answering as many requests as it allows.",
          retryAfter: Number.isFinite(retryAfter) ? retryAfter : 1 };
      }
      case 503:
        return { kind: "unavailable", message: `The model is unavailable (503).${suffix}` };
      case 504:
        return { kind: "timeout", message: `The server timed out (504).${suffix}` };
      case 400:
        if (error.code === "context_length_exceeded") return contextError(detail.replace(/\.$/, ""), error.param);
        return { kind: "invalid", retryable: false, message: `The server refused the request: ${detail || "bad request"}.` };
      default:
        return { kind: "http", message: `Request failed (${res.status}${res.statusText ? ` ${res.statusText}` : ""}).${suffix}`,
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

  // Streamed delta fields and the message field each one grows. The server
  // sends reasoning under two names (reasoning_content and reasoning); one is read.
  const DELTA_FIELDS = [["content", "content"], ["reasoning_content", "reasoning"]];

  function handleChunk(run, payload) {
    if (payload === "[DONE]") return "done";
    let chunk;
    try {
      chunk = JSON.parse(payload);
    } catch {
      return null; // a malformed chunk is skipped rather than killing the reply
    }
    const msg = run.msg;
    if (chunk.error) {
      // Headers were already sent, so errors after the stream started arrive in-band.
      const e = chunk.error;
      const timedOut = e.code === "timeout" || e.type === "timeout_error";
      msg.error = timedOut
        ? { kind: "timeout", message: `The server timed out: ${e.message || "the request took too long"}.` }
        : { kind: "server", message: `The server reported an error: ${e.message || "unknown error"}` };
      return null;
    }
    if (chunk.model && !msg.model) msg.model = chunk.model;
    if (chunk.usage) run.usage = chunk.usage;
    const choice = chunk.choices && chunk.choices[0];
    if (!choice) return null;
    const delta = choice.delta || {};
    for (const [from, to] of DELTA_FIELDS) {
      if (typeof delta[from] !== "string" || !delta[from]) continue;
      const now = performance.now();
      if (!run.firstTokenAt) run.firstTokenAt = now;
      run.lastTokenAt = now;
      msg[to] = (msg[to] || "") + delta[from];
      msg.chunks = (msg.chunks || 0) + 1;
      if (run.conv.id === state.currentId) scheduleRender();
      markDirty(run.conv, true);
    }
    if (choice.finish_reason) msg.finishReason = choice.finish_reason;
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
    delete msg.chunks;
  }

  // The server's window: the first N non-system messages of the request were
  // left out. Noted for the conversation's last reply only, whose request is
  // the whole conversation; the transcript greys what the model did not see.
  function noteWindow(run, res, sources) {
    const { conv, msg } = run;
    if (conv.messages[conv.messages.length - 1] !== msg) return;
    const dropped = parseInt(res.headers.get(WINDOW_HEADER) || "0", 10) || 0;
    const kept = sources.filter((ids) => ids.length);
    const before = conv.window ? conv.window.firstSeen : null;
    if (dropped > 0 && dropped < kept.length) conv.window = { firstSeen: kept[dropped][0], dropped, limit: server.maxContext };
    else delete conv.window;
    if ((conv.window ? conv.window.firstSeen : null) !== before && conv.id === state.currentId) {
      renderTranscript(true);
      scrollToBottom();
    }
  }

  // =========================================================================
  // Replies in flight: one per conversation, each bound to its message
  // =========================================================================

  // Stream a reply into `msg`, an assistant message already in `conv`; the
  // model is sent the messages before it (or `request`, for Continue).
  async function generate(conv, msg, request = null) {
    const run = { conv, msg, controller: new AbortController(), reason: null, phase: "connecting",
      startedAt: performance.now(), firstTokenAt: 0, lastTokenAt: 0, lastActivity: Date.now(),
      usage: null, gotResponse: false, wake: null, busySince: 0, finished: false, releaseLock: null };
    state.runs.set(conv.id, run);
    holdRunLock(run);
    const { messages, sources } = request || buildMessages(conv, conv.messages.indexOf(msg));
    const body = JSON.stringify(requestBody(messages, conv));
    showRunChange(run);
    announce("Generating a reply…");
    setTimeout(() => { if (state.runs.get(conv.id) === run) refreshHealth(); }, 300); // show "Busy" in the header
    const watchdog = setInterval(() => watchRun(run), 1000);
    try {
      await exchange(run, body, sources);
    } catch (err) {
      noteFailure(run, err);
    } finally {
      clearInterval(watchdog);
      finishRun(run);
    }
  }

  // One request, retried after Retry-After while the server says 429.
  async function exchange(run, body, sources) {
    for (let attempt = 1; ; attempt++) {
      run.phase = "connecting";
      run.gotResponse = false;
      const res = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...authHeaders() },
        body,
        signal: run.controller.signal,
        cache: "no-store",
      });
      run.gotResponse = true;
      run.lastActivity = Date.now();
      if (res.ok) {
        noteWindow(run, res, sources);
        run.phase = "streaming";
        const sawDone = await readEventStream(res, run, (payload) => handleChunk(run, payload));
        if (!sawDone && !run.msg.error && !run.msg.finishReason) {
          run.msg.error = { kind: "dropped", message: "The connection closed before the reply finished." };
        }
        return;
      }
      const error = await errorFromResponse(res);
      if (res.status === 429 && await waitForSlot(run, error, attempt)) continue;
      if (res.status === 429) error.message += run.reason ? " Stopped waiting for a free slot." : " Gave up waiting for a free slot.";
      run.msg.error = error;
      return;
    }
  }

  // The server's Retry-After for the first tries, then slowly longer waits.
  function retryDelay(retryAfter, attempt) {
    const base = Math.min(Math.max(1, retryAfter || 1), 60) * 1000;
    return attempt <= 5 ? base : Math.max(base, Math.min(timing.busyMaxDelayMs, base * 2 ** (attempt - 5)));
  }

  // Count down to the next try, visibly; resolves true to try again, false
  // when the user cancelled (or stopped) or the wait has gone on too long.
  function waitForSlot(run, error, attempt) {
    const now = Date.now();
    run.busySince = run.busySince || now;
    if (run.reason || now - run.busySince > timing.busyGiveUpMs) return Promise.resolve(false);
    const delay = retryDelay(error.retryAfter, attempt);
    run.phase = "waiting";
    run.msg.status = "waiting";
    run.msg.retryAt = now + delay;
    if (attempt === 1) announce(`Server busy. Retrying in ${Math.ceil(delay / 1000)} s.`);
    showRunChange(run);
    return new Promise((resolve) => {
      const tick = setInterval(() => { if (run.conv.id === state.currentId) scheduleRender(); }, 250);
      const timer = setTimeout(() => wake(true), delay);
      function wake(go) {
        clearInterval(tick);
        clearTimeout(timer);
        run.wake = null;
        run.msg.status = "streaming";
        delete run.msg.retryAt;
        run.lastActivity = Date.now();
        if (go) showRunChange(run);
        resolve(go);
      }
      run.wake = wake;
    });
  }

  function watchRun(run) {
    if (run.phase === "waiting") return;
    const silent = Date.now() - run.lastActivity;
    if (silent > timing.idleTimeoutMs) {
      run.reason = "timeout";
      run.controller.abort();
    } else if (silent >= timing.stallNoticeMs && run.conv.id === state.currentId) {
      scheduleRender();
    }
  }

  function noteFailure(run, err) {
    const msg = run.msg;
    if (run.reason === "stop" || state.unloading) return; // keep what arrived
    if (run.reason === "timeout") {
      msg.error = { kind: "timeout", message: `No data from the server for ${Math.round(timing.idleTimeoutMs / 1000)} s ` +
        "(while it works it sends a sign of life every few seconds), so the page gave up. The server may be stuck or unreachable." };
    } else if (run.gotResponse) {
      msg.error = { kind: "dropped", message: "The connection to the server was lost while the reply was streaming." };
    } else {
      msg.error = { kind: "network", message: `Could not reach the server${err && err.message ? ` (${err.message})` : ""}.` };
    }
  }

  function finishRun(run) {
    const { conv, msg } = run;
    if (state.unloading) msg.status = "interrupted";
    else msg.status = msg.error ? "error" : run.reason === "stop" ? "stopped" : "done";
    delete msg.retryAt;
    finishStats(run);
    if (state.runs.get(conv.id) === run) state.runs.delete(conv.id); // not a new run started after a Stop
    streamViews.delete(msg);
    markDirty(conv);
    releaseRunLock(run);
    if (conv.id === state.currentId) {
      updateMessage(conv, msg);
      renderChatHead();
      scrollToBottom();
    }
    renderConversationList();
    renderComposer();
    if (state.unloading) return;
    announce(msg.error ? msg.error.message : msg.status === "stopped" ? "Stopped." : `Reply complete. ${statsText(msg)?.text || ""}`);
    settleHealth();
    if (msg.error && msg.error.kind === "auth") openKeyDialog();
  }

  // A run started, began waiting or resumed: its message, the list and the composer show it.
  function showRunChange(run) {
    if (run.conv.id === state.currentId) {
      if (messageViews.get(run.msg)?.isConnected) updateMessage(run.conv, run.msg);
      else renderTranscript();
      scrollToBottom();
    }
    renderConversationList();
    renderComposer();
  }

  // Stop a conversation's reply (or its wait for a free slot).
  function stopGenerating(conv = currentConversation(), reason = "stop") {
    const run = runOf(conv);
    if (!run) return;
    run.reason = reason;
    if (run.wake) run.wake(false);
    // Aborting closes the connection; the server then frees its slot.
    run.controller.abort();
  }

  // =========================================================================
  // Actions on messages: send, regenerate, edit, delete
  // =========================================================================

  function newReply() {
    return { id: newId(), role: "assistant", content: "", status: "streaming", created: Date.now() };
  }

  // The conversation was just used: it goes to the top of the list.
  function touch(conv) {
    conv.updated = Date.now();
    const idx = state.conversations.indexOf(conv);
    if (idx > 0) {
      state.conversations.splice(idx, 1);
      state.conversations.unshift(conv);
    }
  }

  function sendMessage() {
    const text = composedText();
    if (!state.loaded || !text.trim()) return;
    let conv = currentConversation();
    if (runOf(conv)) {
      showComposerNote("A reply is still being written in this chat: stop it (Esc) to send now, or start a new chat.");
      return;
    }
    if (!conv) {
      conv = { id: newId(), title: titleFrom(ui.prompt.value.trim() ? ui.prompt.value : text), created: Date.now(), updated: Date.now(),
        messages: [], settings: chatDefaults() };
      state.conversations.unshift(conv);
      setCurrent(conv.id);
    }
    // A failed, empty reply is dropped from view when the user moves on.
    const last = conv.messages[conv.messages.length - 1];
    if (last && last.role === "assistant" && last.error && !last.content && !last.alts) conv.messages.pop();
    conv.messages.push({ id: newId(), role: "user", content: text, created: Date.now() });
    const reply = newReply();
    conv.messages.push(reply);
    touch(conv);
    markDirty(conv);
    ui.prompt.value = "";
    clearAttachments();
    autoSizePrompt();
    renderChatHead();
    generate(conv, reply);
  }

  // Regenerate (or retry) this very reply, from the messages before it; the
  // reply it had stays as an alternative.
  function regenerate(conv, msg) {
    if (!conv || !msg || msg.role !== "assistant") return;
    if (runOf(conv)) {
      showComposerNote("A reply is still being written in this chat: stop it (Esc) first.");
      return;
    }
    if (!conv.messages.slice(0, conv.messages.indexOf(msg)).some((m) => m.role === "user")) {
      announce("There is no message before this reply to answer.");
      return;
    }
    const focused = messageViews.get(msg)?.contains(document.activeElement);
    startVariant(conv, msg, { content: "", status: "streaming", created: Date.now() });
    markDirty(conv);
    generate(conv, msg);
    if (focused && !ui.stop.hidden) ui.stop.focus(); // its button is gone: focus goes to the way to stop it
  }

  // Continue a reply cut by max tokens: the conversation is sent ending in the
  // reply itself, which the server continues (a prefill: its text exactly as
  // it stands, with its reasoning); what it writes is appended to the same
  // message.
  function continueReply(conv, msg) {
    if (!conv || !msg || msg.role !== "assistant" || runOf(conv)) return;
    const request = buildMessages(conv, conv.messages.indexOf(msg));
    const cut = { role: "assistant", content: answerOf(msg.content) };
    if (msg.reasoning) cut.reasoning_content = msg.reasoning;
    request.messages.push(cut);
    request.sources.push([msg.id]);
    delete msg.finishReason;
    msg.status = "streaming";
    markDirty(conv);
    generate(conv, msg, request);
  }

  function switchVariant(conv, msg, step) {
    const run = runOf(conv);
    if (run && (run.msg === msg || (msg.role === "user" && conv.messages.indexOf(run.msg) > conv.messages.indexOf(msg)))) {
      showComposerNote("A reply is still being written after this message: stop it (Esc) first.");
      return;
    }
    if (state.editing) state.editing = null;
    showVariant(conv, msg, variantIndex(msg) + step);
    markDirty(conv);
    if (msg.role === "user") renderTranscript(true);
    else updateMessage(conv, msg);
    renderChatHead();
    messageViews.get(msg)?.querySelector(`[data-action="${step < 0 ? "prev" : "next"}-variant"]:not(:disabled), .msg-actions button`)?.focus();
  }

  function startEdit(conv, msg) {
    const run = runOf(conv);
    if ((run && run.msg === msg) || msg.status === "streaming") return; // a reply being written can't be edited yet
    const previous = state.editing && messageById(conv, state.editing.id);
    state.editing = { id: msg.id, draft: msg.content, base: msg.content };
    if (previous) updateMessage(conv, previous);
    updateMessage(conv, msg);
    const area = messageViews.get(msg)?.querySelector("textarea");
    if (area) {
      area.focus();
      area.setSelectionRange(area.value.length, area.value.length);
    }
  }

  function endEdit(conv, msg, focus = "edit") {
    state.editing = null;
    updateMessage(conv, msg);
    messageViews.get(msg)?.querySelector(`[data-action="${focus}"]`)?.focus();
  }

  // Save an edit in place, or (resend) send it as a new version of the
  // message: a new branch starts there, and the old one stays a version away.
  function saveEdit(conv, msg, resend) {
    const text = state.editing ? state.editing.draft : msg.content;
    if (msg.role === "user" && !text.trim()) {
      announce("A message cannot be empty: delete it instead.");
      return;
    }
    if (state.editing && state.editing.base !== msg.content) { // another tab changed it meanwhile
      endEdit(conv, msg);
      showConflict(conv, [text]);
      return;
    }
    if (!resend) {
      msg.content = text;
      msg.edited = Date.now();
      markDirty(conv);
      endEdit(conv, msg);
      return;
    }
    stopGenerating(conv);
    state.editing = null;
    const later = conv.messages.length - conv.messages.indexOf(msg) - 1;
    startVariant(conv, msg, { content: text, created: msg.created, edited: Date.now() });
    delete conv.window;
    const reply = newReply();
    conv.messages.push(reply);
    touch(conv);
    markDirty(conv);
    renderTranscript(true);
    generate(conv, reply);
    if (later) announce(`Sent as version ${variantCount(msg)}; the earlier version and what followed it are kept (Previous version).`);
  }

  // Delete one message, with Undo. A user message takes its failed, empty
  // reply with it (the too-long message case).
  function deleteMessage(conv, msg) {
    const run = runOf(conv);
    if (run && run.msg === msg) stopGenerating(conv);
    const idx = conv.messages.indexOf(msg);
    if (idx === -1) return;
    const next = conv.messages[idx + 1];
    const orphan = msg.role === "user" && next && next.role === "assistant" && next.error && !next.content && !next.alts && !(run && run.msg === next);
    const removed = conv.messages.splice(idx, orphan ? 2 : 1);
    if (state.editing && removed.some((m) => m.id === state.editing.id)) state.editing = null;
    const lastWindow = conv.window;
    delete conv.window; // it described the last request; the next one will say again
    markDirty(conv);
    renderTranscript(true);
    renderChatHead();
    focusMessageNear(conv, idx);
    const what = orphan ? "Message and its failed reply deleted." : msg.role === "user" ? "Message deleted." : "Reply deleted.";
    showToast(what, () => {
      conv.messages.splice(Math.min(idx, conv.messages.length), 0, ...removed);
      if (lastWindow) conv.window = lastWindow;
      markDirty(conv);
      if (conv.id !== state.currentId) return;
      renderTranscript(true);
      renderChatHead();
      messageViews.get(removed[0])?.focus();
    });
  }

  // After a deletion, focus stays where it was: on the message that took the
  // deleted one's place (or the one before), else the message box.
  function focusMessageNear(conv, idx) {
    const target = conv.messages[idx] || conv.messages[idx - 1];
    const el = target && messageViews.get(target);
    if (el && el.isConnected) el.focus();
    else ui.prompt.focus();
  }

  function messageOf(el) {
    const conv = currentConversation();
    const article = el.closest("article.msg");
    return { conv, msg: conv && article ? messageById(conv, article.dataset.id) : null };
  }

  // Every button in the transcript acts on the message it sits in, never on
  // "the last one": a stale Retry retries its own reply.
  function onThreadClick(event) {
    const button = event.target.closest("button");
    if (!button) return;
    if (button.classList.contains("copy-code")) {
      copyWithFeedback(button, button.closest(".code-block").querySelector("code").textContent);
      return;
    }
    const { conv, msg } = messageOf(button);
    const action = button.dataset.action;
    if (!msg || !action) return;
    const handlers = {
      copy: () => copyWithFeedback(button, msg.content || msg.reasoning || ""),
      continue: () => continueReply(conv, msg),
      retry: () => regenerate(conv, msg),
      regenerate: () => regenerate(conv, msg),
      "prev-variant": () => switchVariant(conv, msg, -1),
      "next-variant": () => switchVariant(conv, msg, 1),
      edit: () => startEdit(conv, msg),
      delete: () => deleteMessage(conv, msg),
      "edit-prev": () => startEdit(conv, previousUser(conv, msg)),
      "delete-prev": () => deleteMessage(conv, previousUser(conv, msg)),
      "edit-cancel": () => endEdit(conv, msg),
      "edit-save": () => saveEdit(conv, msg, false),
      "edit-send": () => saveEdit(conv, msg, true),
      "retry-now": () => runOf(conv)?.wake?.(true),
      "cancel-retry": () => stopGenerating(conv, "cancel"),
      "api-key": openKeyDialog,
      settings: openSettings,
    };
    if (handlers[action]) handlers[action]();
  }

  function onThreadInput(event) {
    if (event.target.matches(".edit-box") && state.editing) state.editing.draft = event.target.value;
  }

  function onThreadKeydown(event) {
    if (!event.target.matches(".edit-box")) return;
    const { conv, msg } = messageOf(event.target);
    if (!msg) return;
    if (event.key === "Escape") {
      event.preventDefault();
      endEdit(conv, msg);
    } else if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      saveEdit(conv, msg, msg.role === "user");
    }
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

  // =========================================================================
  // Actions on conversations: open, delete, rename, search
  // =========================================================================

  function openConversation(id) {
    state.editing = null;
    setCurrent(id);
    hideComposerNote();
    renderAll();
    closeSidebarIfOverlay();
    ui.prompt.focus();
  }

  function newChat() {
    openConversation(null); // no current conversation: the next message starts one
  }

  // Delete with Undo; keyboard focus moves to the conversation that took its place.
  function deleteConversation(id) {
    const idx = state.conversations.findIndex((c) => c.id === id);
    if (idx === -1) return;
    const conv = state.conversations[idx];
    const shownAt = [...ui.convList.querySelectorAll("[data-conv]")].findIndex((li) => li.dataset.conv === id);
    const wasCurrent = state.currentId === id;
    stopGenerating(conv);
    state.conversations.splice(idx, 1);
    if (wasCurrent) setCurrent(null);
    forgetConversation(id);
    renderAll();
    const items = ui.convList.querySelectorAll(".conv-open");
    (items[shownAt] || items[shownAt - 1] || ui.newChat).focus();
    showToast(`Deleted “${conv.title}”.`, () => {
      state.conversations.splice(Math.min(idx, state.conversations.length), 0, conv);
      markDirty(conv);
      if (wasCurrent) setCurrent(conv.id);
      renderAll();
      ui.convList.querySelector(`[data-id="${CSS.escape(conv.id)}"]`)?.focus();
    });
  }

  let renaming = null; // { id, opener }

  function openRename(id, opener) {
    const conv = conversationById(id);
    if (!conv) return;
    renaming = { id, opener };
    ui.renameInput.value = conv.title;
    ui.renameDialog.showModal();
    ui.renameInput.select();
  }

  function saveRename() {
    const conv = renaming && conversationById(renaming.id);
    const title = ui.renameInput.value.trim();
    if (conv && title) {
      conv.title = title.slice(0, 200);
      conv.titleEdited = true;
      markDirty(conv);
      renderConversationList();
      renderChatHead();
      announce(`Renamed to “${conv.title}”.`);
    }
    ui.renameDialog.close();
  }

  function onSearchInput() {
    state.search = ui.search.value;
    renderConversationList();
  }

  function onSearchKeydown(event) {
    if (event.key === "Escape" && ui.search.value) {
      event.preventDefault(); // clears the search; a second Esc goes on to the page
      ui.search.value = "";
      onSearchInput();
    }
  }

  function onConvListClick(event) {
    const target = event.target.closest("[data-delete], [data-rename], [data-id]");
    if (!target) return;
    if (target.dataset.delete) deleteConversation(target.dataset.delete);
    else if (target.dataset.rename) openRename(target.dataset.rename, target);
    else openConversation(target.dataset.id);
  }

  // =========================================================================
  // Export and import
  // =========================================================================

  function download(name, text, type) {
    const url = URL.createObjectURL(new Blob([text], { type }));
    const a = h("a", { href: url, download: name, hidden: true });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
  }

  function fileStem(text) {
    return (text || "chat").replace(/[\\/:*?"<>|\u0000-\u001f]+/g, " ").replace(/\s+/g, " ").trim().slice(0, 60) || "chat";
  }

  // Every conversation, every alternative, as one JSON file that Import reads back.
  function exportAll() {
    const data = { format: EXPORT_FORMAT, version: 1, exported: new Date().toISOString(), model: server.model || null,
      conversations: state.conversations };
    download(`lem-chat-${new Date().toISOString().slice(0, 10)}.json`, JSON.stringify(data, null, 2), "application/json");
    announce(`Exported ${state.conversations.length} conversations.`);
  }

  // One conversation as Markdown, to read or share: the shown version of each
  // reply, reasoning left out.
  function conversationMarkdown(conv) {
    const lines = [`# ${conv.title}`, "", `_Exported from lem-serve on ${new Date().toISOString().slice(0, 10)}${server.model ? ` (model ${server.model})` : ""}._`, ""];
    for (const msg of conv.messages) {
      const who = msg.role === "user" ? "You" : msg.role === "system" ? "System" : msg.model || server.model || "Assistant";
      const text = msg.role === "assistant" ? stripThink(msg.content) : msg.content;
      lines.push(`## ${who}`, "", text || (msg.error ? `_(no reply: ${msg.error.message})_` : "_(empty)_"), "");
    }
    return lines.join("\n");
  }

  function exportMarkdown() {
    const conv = currentConversation();
    if (conv) download(`${fileStem(conv.title)}.md`, conversationMarkdown(conv), "text/markdown");
  }

  // Add the conversations of an export file. One already here unchanged is
  // skipped; one here with other contents is added as a copy, never overwritten.
  async function importFile(file) {
    let data;
    try {
      data = JSON.parse(await file.text());
    } catch {
      showToast(`“${file.name}” is not a JSON export.`);
      return;
    }
    const list = Array.isArray(data) ? data : data && Array.isArray(data.conversations) ? data.conversations : null;
    if (!list) {
      showToast(`“${file.name}” holds no conversations.`);
      return;
    }
    const counts = { added: 0, same: 0, bad: 0 };
    const problems = [];
    for (const [k, raw] of list.entries()) {
      const conv = safeNormalize(raw);
      if (!conv) {
        counts.bad++;
        if (problems.length < 3) problems.push(`conversation ${k + 1}: ${whyNotConversation(raw)}`);
        continue;
      }
      const here = conversationById(conv.id);
      if (here && canonicalJSON(normalizeConversation(here)) === canonicalJSON(conv)) { counts.same++; continue; }
      if (here) {
        conv.id = newId();
        conv.title = `${conv.title} (imported copy)`;
      }
      state.conversations.push(conv);
      markDirty(conv);
      counts.added++;
    }
    state.conversations.sort((a, b) => b.updated - a.updated);
    renderAll();
    const parts = [`Imported ${counts.added} conversation${counts.added === 1 ? "" : "s"}`];
    if (counts.same) parts.push(`${counts.same} already here`);
    if (counts.bad) parts.push(`${counts.bad} could not be read (${problems.join("; ")})`);
    showToast(`${parts.join("; ")}.`);
  }

  // What makes an imported conversation unreadable, said plainly.
  function whyNotConversation(raw) {
    if (!raw || typeof raw !== "object") return "not an object";
    if (!Array.isArray(raw.messages)) return "no list of messages";
    for (const [i, m] of raw.messages.entries()) {
      if (!m || typeof m !== "object") return `message ${i + 1} is not an object`;
      if (!ROLES.has(m.role)) return `message ${i + 1} has the role ${JSON.stringify(String(m.role)).slice(0, 40)}`;
      if (!isText(m.content)) return `message ${i + 1} has no text`;
    }
    return "a version of a message has no text";
  }

  function onImportChosen() {
    const file = ui.importFile.files && ui.importFile.files[0];
    ui.importFile.value = "";
    if (file) importFile(file);
  }

  // =========================================================================
  // Attachments: text files picked or dropped into the message
  //
  // A file's text goes into the message as a fenced block headed by its name,
  // so the model reads it and the transcript shows it; until Send, each file
  // is a chip above the message box that can be removed. Binary and too
  // large files are refused with a message saying which and why.
  // =========================================================================

  const ATTACH_MAX_BYTES = 512 * 1024; // one file; a 30k-token prompt is ~120 KB of code
  const attachments = []; // { id, name, text }

  function looksBinary(text) {
    const sample = text.slice(0, 8192);
    if (sample.includes("\u0000")) return true;
    const odd = (sample.match(/[\u0001-\u0008\u000e-\u001f\ufffd]/g) || []).length;
    return odd > sample.length * 0.02;
  }

  // The longest run of backticks in a text decides the fence around it.
  function fenceFor(text) {
    const runs = text.match(/`{3,}/g) || [];
    return "`".repeat(Math.max(3, ...runs.map((r) => r.length + 1)));
  }

  function attachmentBlock(file) {
    const fence = fenceFor(file.text);
    const lang = (file.name.match(/\.([A-Za-z0-9+#-]{1,12})$/) || [])[1] || "";
    return `${file.name}:\n${fence}${lang.toLowerCase()}\n${file.text.replace(/\n$/, "")}\n${fence}`;
  }

  // What Send sends: the typed text, then each attached file.
  function composedText() {
    const parts = ui.prompt.value.trim() ? [ui.prompt.value] : [];
    for (const file of attachments) parts.push(attachmentBlock(file));
    return parts.join("\n\n");
  }

  async function addFiles(files) {
    const refused = [];
    for (const file of files) {
      if (file.size > ATTACH_MAX_BYTES) {
        refused.push(`“${file.name}” is too large (${Math.ceil(file.size / 1024)} KB; the limit is ${ATTACH_MAX_BYTES / 1024} KB)`);
        continue;
      }
      const text = await file.text().catch(() => null);
      if (text === null || looksBinary(text)) {
        refused.push(`“${file.name}” is not a text file (only text files such as code, logs or Markdown can be attached)`);
        continue;
      }
      attachments.push({ id: newId(), name: file.name || "file.txt", text });
    }
    renderAttachments();
    if (refused.length) showComposerNote(`Not attached: ${refused.join("; ")}.`);
    else if (files.length) hideComposerNote();
  }

  function renderAttachments() {
    ui.attachments.hidden = !attachments.length;
    ui.attachments.replaceChildren(...attachments.map((file) => h("li", { className: "chip", "data-id": file.id },
      h("span", { className: "chip-name", text: file.name, title: `${file.name} · ${file.text.length.toLocaleString("en-US")} characters` }),
      h("button", { type: "button", className: "btn small ghost chip-remove", "aria-label": `Remove ${file.name}`, text: "×" }))));
  }

  function clearAttachments() {
    attachments.length = 0;
    renderAttachments();
  }

  function onAttachmentsClick(event) {
    const button = event.target.closest(".chip-remove");
    if (!button) return;
    const at = attachments.findIndex((f) => f.id === button.closest(".chip").dataset.id);
    if (at !== -1) attachments.splice(at, 1);
    renderAttachments();
    ui.prompt.focus();
  }

  function onFileChosen() {
    const files = [...(ui.attachFile.files || [])];
    ui.attachFile.value = "";
    addFiles(files);
  }

  function hasFiles(event) {
    return event.dataTransfer && [...event.dataTransfer.types].includes("Files");
  }

  function wireDrop() {
    ui.main.addEventListener("dragover", (event) => {
      if (!hasFiles(event)) return;
      event.preventDefault();
      ui.main.classList.add("dropping");
    });
    ui.main.addEventListener("dragleave", (event) => { if (event.target === ui.main || !ui.main.contains(event.relatedTarget)) ui.main.classList.remove("dropping"); });
    ui.main.addEventListener("drop", (event) => {
      ui.main.classList.remove("dropping");
      if (!hasFiles(event)) return;
      event.preventDefault();
      addFiles([...event.dataTransfer.files]);
    });
  }

  // =========================================================================
  // Composer, keyboard, toasts, announcements
  // =========================================================================

  // On touch screens Enter makes a new line (there is no Shift on a phone
  // keyboard) and the Send button sends; Ctrl/Cmd+Enter sends everywhere.
  const touchFirst = window.matchMedia("(pointer: coarse)");

  function keyHint() {
    const kbd = (text) => h("span", { className: "kbd", text });
    return touchFirst.matches
      ? [kbd("Enter"), " for a new line · tap Send to send"]
      : [kbd("Enter"), " to send · ", kbd("Shift"), "+", kbd("Enter"), " for a new line"];
  }

  function renderKeyHint() {
    ui.hintKeys.replaceChildren(...keyHint());
    const empty = $("empty-state");
    if (empty) empty.replaceWith(renderEmptyState());
  }

  function renderComposer() {
    const running = Boolean(runOf(currentConversation()));
    // Keep keyboard focus on the composer's action button when it swaps.
    const moveFocus = document.activeElement === (running ? ui.send : ui.stop);
    ui.send.hidden = running;
    ui.stop.hidden = !running;
    if (moveFocus) (running ? ui.stop : ui.send).focus();
    if (!running) hideComposerNote();
  }

  function showComposerNote(text) {
    ui.composerNote.textContent = text;
    ui.composerNote.hidden = false;
  }

  function hideComposerNote() {
    ui.composerNote.hidden = true;
    ui.composerNote.textContent = "";
  }

  function autoSizePrompt() {
    ui.prompt.style.height = "auto";
    ui.prompt.style.height = `${Math.min(ui.prompt.scrollHeight, window.innerHeight * 0.4)}px`;
  }

  function onPromptKeydown(event) {
    if (event.key === "ArrowUp" && !ui.prompt.value && !attachments.length && !event.shiftKey && !event.altKey) {
      editLastMessage(event);
      return;
    }
    if (event.key !== "Enter" || event.shiftKey || event.altKey || event.isComposing) return;
    if (touchFirst.matches && !event.ctrlKey && !event.metaKey) return; // a new line
    event.preventDefault();
    sendMessage();
  }

  // ↑ in an empty message box edits the last message you sent.
  function editLastMessage(event) {
    const conv = currentConversation();
    const last = conv && [...conv.messages].reverse().find((m) => m.role === "user");
    if (!last) return;
    event.preventDefault();
    startEdit(conv, last);
  }

  function typingIn(target) {
    return target && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName));
  }

  // Shortcuts anywhere on the page (the help dialog, "?", lists them).
  // Dialogs, the search box and the message editor handle their own Esc first.
  function onDocumentKeydown(event) {
    if (event.defaultPrevented || document.querySelector("dialog[open]")) return;
    const mod = event.ctrlKey || event.metaKey;
    if (mod && event.shiftKey && event.key.toLowerCase() === "o") {
      event.preventDefault();
      newChat();
    } else if (event.key === "Escape" && event.shiftKey) {
      event.preventDefault();
      ui.prompt.focus();
    } else if (event.key === "Escape") {
      onEscape(event);
    } else if (event.key === "?" && !mod && !typingIn(event.target)) {
      event.preventDefault();
      ui.helpDialog.showModal();
    }
  }

  // Esc closes the drawer, else stops this chat's reply.
  function onEscape(event) {
    if (ui.app.classList.contains("sidebar-open")) {
      closeSidebarIfOverlay();
      ui.toggleSidebar.focus();
      return;
    }
    const conv = currentConversation();
    if (runOf(conv)) {
      event.preventDefault();
      stopGenerating(conv);
    }
  }

  let toastTimer = 0;
  let toastUndo = null;

  // A short notice at the bottom; with `undo`, an Undo button for UNDO_MS.
  function showToast(text, undo = null) {
    clearTimeout(toastTimer);
    toastUndo = undo;
    ui.toastText.textContent = text;
    ui.toastUndo.hidden = !undo;
    ui.toast.hidden = false;
    toastTimer = setTimeout(hideToast, undo ? UNDO_MS : UNDO_MS / 2);
  }

  function hideToast() {
    clearTimeout(toastTimer);
    ui.toast.hidden = true;
    toastUndo = null;
  }

  function undoFromToast() {
    const undo = toastUndo;
    hideToast();
    if (undo) {
      undo();
      announce("Undone.");
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
    const s = chatSettings(currentConversation());
    const parts = [s.temperature === null ? "Model's temperature" : `Temperature ${s.temperature}`,
      `Max ${effectiveMaxTokens(s)} tokens`];
    if (s.systemPrompt.trim()) parts.push("System prompt on");
    if (server.thinking) parts.push(s.thinking ? "Thinking on" : "Thinking off");
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
      if (open) (ui.convList.querySelector("[aria-current]") || ui.convList.querySelector("button") || ui.search).focus();
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

  // The settings a new chat starts with.
  function chatDefaults() {
    const { systemPrompt, temperature, maxTokens, thinking } = state.settings;
    return { systemPrompt, temperature, maxTokens, thinking };
  }

  // With a chat open, the dialog edits that chat's settings (stored with
  // it); with none, the defaults that new chats take.
  function openSettings() {
    const conv = currentConversation();
    const s = chatSettings(conv);
    ui.settingsScope.textContent = conv ? `For this chat: “${conv.title}”. New chats start from the defaults.`
      : "Defaults: every new chat starts with these.";
    ui.makeDefault.hidden = !conv;
    ui.setSystem.value = s.systemPrompt;
    ui.setTemperature.value = s.temperature === null ? "" : String(s.temperature);
    ui.setMaxTokens.value = String(effectiveMaxTokens(s));
    ui.setThinking.checked = s.thinking;
    ui.setApiKey.value = state.apiKey;
    if (server.maxTokens) {
      ui.setMaxTokens.max = String(server.maxTokens);
      ui.maxTokensHint.textContent = `Length limit of a reply. The server allows up to ${server.maxTokens}.`;
    }
    ui.settingsDialog.showModal();
  }

  function settingsFromForm(s) {
    s.systemPrompt = ui.setSystem.value;
    const t = parseFloat(ui.setTemperature.value);
    if (ui.setTemperature.value.trim() === "") s.temperature = null;
    else if (Number.isFinite(t)) s.temperature = Math.min(2, Math.max(0, Math.round(t * 100) / 100));
    const n = parseInt(ui.setMaxTokens.value, 10);
    if (Number.isFinite(n)) s.maxTokens = Math.max(1, server.maxTokens ? Math.min(n, server.maxTokens) : n);
    s.thinking = ui.setThinking.checked;
    return s;
  }

  // Settings are saved as they are edited; out-of-range numbers are clamped
  // when the field is left so typing is never fought.
  function saveSettingsFromForm(clamp) {
    const conv = currentConversation();
    const s = settingsFromForm(conv ? chatSettings(conv) : state.settings);
    if (clamp) {
      ui.setTemperature.value = s.temperature === null ? "" : String(s.temperature);
      ui.setMaxTokens.value = String(effectiveMaxTokens(s));
    }
    if (conv) {
      const { systemPrompt, temperature, maxTokens, thinking } = s;
      const next = { systemPrompt, temperature, maxTokens, thinking };
      if (canonicalJSON(next) !== canonicalJSON(conv.settings || {})) {
        conv.settings = next;
        markDirty(conv);
      }
    } else {
      writeJSON(STORE_SETTINGS, s);
    }
    setApiKey(ui.setApiKey.value.trim());
    renderSettingsSummary();
  }

  function makeDefaults() {
    saveSettingsFromForm(true);
    Object.assign(state.settings, chatSettings(currentConversation()));
    writeJSON(STORE_SETTINGS, state.settings);
    announce("These settings are now the defaults for new chats.");
    ui.makeDefault.textContent = "Saved as defaults";
    setTimeout(() => { ui.makeDefault.textContent = "Use as defaults for new chats"; }, 1500);
  }

  function setApiKey(key) {
    state.apiKey = key;
    writeLocal(STORE_API_KEY, key);
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
    if (last && last.role === "assistant" && last.error && last.error.kind === "auth") regenerate(conv, last);
  }

  function clearHistory() {
    if (!window.confirm("Delete all conversations stored in this browser? This cannot be undone; Export all keeps a copy.")) return;
    for (const conv of state.conversations) {
      stopGenerating(conv);
      forgetConversation(conv.id);
    }
    state.conversations = [];
    setCurrent(null);
    renderAll();
    ui.settingsDialog.close();
  }

  // =========================================================================
  // Health: model name and server status in the header
  // =========================================================================

  const HEALTH_TIMEOUT_MS = 5_000;
  let healthTimer = 0;
  let settleTimer = 0;

  function setHealth(kind, text) {
    ui.health.dataset.state = kind;
    ui.healthRetry.hidden = kind !== "offline";
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

  function noteServerLimits(body) {
    if (!server.maxTokens && Number.isInteger(body.max_tokens)) {
      server.maxTokens = body.max_tokens;
      renderSettingsSummary();
    }
    server.thinking = body.thinking === true;
    ui.thinkingField.hidden = !server.thinking;
    const contextLength = Number.isInteger(body.context_length) ? body.context_length : null;
    const maxContext = Number.isInteger(body.max_context) ? body.max_context : 0;
    if (contextLength !== server.contextLength || maxContext !== server.maxContext) {
      server.contextLength = contextLength;
      server.maxContext = maxContext;
      renderChatHead();
    }
  }

  // GET /healthz; returns its body when the server answered "ok", else null.
  async function refreshHealth() {
    clearTimeout(healthTimer);
    let result = null;
    try {
      const res = await fetch("/healthz", { cache: "no-store", headers: authHeaders(), signal: AbortSignal.timeout(HEALTH_TIMEOUT_MS) });
      let body = null;
      try { body = await res.json(); } catch { /* not JSON */ }
      if (res.ok && body && body.status === "ok") {
        setModelName(body.model);
        noteServerLimits(body);
        const active = body.active_requests ?? 0;
        const max = body.max_requests ?? 0;
        if (max && active >= max) setHealth("busy", `Busy (${active}/${max})`);
        else setHealth("ok", max ? `Ready (${active}/${max})` : "Ready");
        result = body;
      } else {
        const detail = body && (typeof body.error === "string" ? body.error : body.error && body.error.message);
        if (detail) setHealth("error", `Error: ${detail}`);
        else if (body && body.status === "error") setHealth("error", "Model engine stopped");
        else setHealth("error", `Error (${res.status})`);
      }
    } catch (err) {
      setHealth("offline", err && err.name === "TimeoutError" ? "Not responding" : "Offline");
    }
    if (!document.hidden) healthTimer = setTimeout(refreshHealth, HEALTH_INTERVAL_MS);
    return result;
  }

  // After a reply ends the server frees its slot a moment later: ask again
  // briefly until it has, so the header does not say "Busy" for a whole poll.
  async function settleHealth(deadline = Date.now() + HEALTH_INTERVAL_MS) {
    clearTimeout(settleTimer);
    const body = await refreshHealth();
    const busy = body && body.max_requests && body.active_requests >= body.max_requests;
    if (busy && !state.runs.size && Date.now() < deadline) settleTimer = setTimeout(() => settleHealth(deadline), 300);
  }

  // =========================================================================
  // Start-up and event wiring
  // =========================================================================

  function bindUI() {
    for (const [key, id] of Object.entries({
      app: "app", thread: "thread", transcript: "transcript", prompt: "prompt", send: "send", stop: "stop",
      newChat: "new-chat", openSettings: "open-settings", convList: "conv-list", sidebar: "sidebar", search: "conv-search",
      toggleSidebar: "toggle-sidebar", backdrop: "backdrop", jump: "jump-latest", health: "health",
      modelName: "model-name", announcer: "announcer", settingsSummary: "settings-summary", hintKeys: "hint-keys",
      composerNote: "composer-note", chatHead: "chat-head", chatTitle: "chat-title", gauge: "context-gauge",
      gaugeBar: "gauge-bar", gaugeFill: "gauge-fill", gaugeText: "gauge-text", renameChat: "rename-chat", exportMd: "export-md",
      storageWarning: "storage-warning", storageWarningText: "storage-warning-text", storageExport: "storage-export",
      storageRetry: "storage-retry", exportAll: "export-all", importChats: "import-chats", importFile: "import-file",
      settingsExport: "settings-export", toast: "toast", toastText: "toast-text", toastUndo: "toast-undo", toastClose: "toast-close",
      renameDialog: "rename-dialog", renameForm: "rename-form", renameInput: "rename-input", renameCancel: "rename-cancel",
      settingsDialog: "settings-dialog", setSystem: "set-system", setTemperature: "set-temperature",
      setMaxTokens: "set-max-tokens", maxTokensHint: "set-max-tokens-hint", setApiKey: "set-api-key",
      thinkingField: "thinking-field", setThinking: "set-thinking",
      settingsDone: "settings-done", clearHistory: "clear-history", keyDialog: "key-dialog",
      keyForm: "key-form", keyInput: "key-input", keyError: "key-error", keyCancel: "key-cancel",
      main: "main", attachButton: "attach", attachFile: "attach-file", attachments: "attachments",
      conflict: "conflict-note", conflictText: "conflict-text", conflictClose: "conflict-close",
      helpDialog: "help-dialog", helpClose: "help-close", openHelp: "open-help",
      settingsScope: "settings-scope", makeDefault: "make-default", gaugeToggle: "gauge-toggle", gaugeHelp: "gauge-help",
      recovery: "recovery", recoveryText: "recovery-text", recoveryExport: "recovery-export", recoveryReset: "recovery-reset",
      healthRetry: "health-retry",
    })) ui[key] = $(id);
    ui.healthText = ui.health.querySelector(".health-text");
  }

  function wireComposer() {
    ui.send.addEventListener("click", sendMessage);
    ui.stop.addEventListener("click", () => stopGenerating());
    ui.prompt.addEventListener("keydown", onPromptKeydown);
    ui.prompt.addEventListener("input", autoSizePrompt);
    ui.newChat.addEventListener("click", newChat);
    ui.thread.addEventListener("click", onThreadClick);
    ui.thread.addEventListener("input", onThreadInput);
    ui.thread.addEventListener("keydown", onThreadKeydown);
    ui.transcript.addEventListener("scroll", onTranscriptScroll, { passive: true });
    new ResizeObserver(onTranscriptResize).observe(ui.transcript);
    // Scrolling up with the wheel detaches immediately, before the next token pulls the view down.
    ui.transcript.addEventListener("wheel", (e) => { if (e.deltaY < 0) state.stickToBottom = false; }, { passive: true });
    ui.jump.addEventListener("click", () => { scrollToBottom(true); ui.prompt.focus(); });
    ui.toastUndo.addEventListener("click", undoFromToast);
    ui.toastClose.addEventListener("click", hideToast);
    touchFirst.addEventListener("change", renderKeyHint);
    document.addEventListener("keydown", onDocumentKeydown);
    ui.attachButton.addEventListener("click", () => ui.attachFile.click());
    ui.attachFile.addEventListener("change", onFileChosen);
    ui.attachments.addEventListener("click", onAttachmentsClick);
    ui.conflictClose.addEventListener("click", () => { ui.conflict.hidden = true; });
    ui.gaugeToggle.addEventListener("click", () => {
      ui.gaugeHelp.hidden = !ui.gaugeHelp.hidden;
      ui.gaugeToggle.setAttribute("aria-expanded", String(!ui.gaugeHelp.hidden));
    });
    wireDrop();
  }

  function wireConversations() {
    ui.convList.addEventListener("click", onConvListClick);
    ui.search.addEventListener("input", onSearchInput);
    ui.search.addEventListener("keydown", onSearchKeydown);
    ui.toggleSidebar.addEventListener("click", toggleSidebar);
    ui.backdrop.addEventListener("click", closeSidebarIfOverlay);
    narrowScreen.addEventListener("change", () => {
      ui.app.classList.remove("sidebar-open");
      syncSidebarButton();
    });
    ui.renameChat.addEventListener("click", () => openRename(state.currentId, ui.renameChat));
    ui.exportMd.addEventListener("click", exportMarkdown);
    for (const button of [ui.exportAll, ui.storageExport, ui.settingsExport]) button.addEventListener("click", exportAll);
    ui.importChats.addEventListener("click", () => ui.importFile.click());
    ui.importFile.addEventListener("change", onImportChosen);
    ui.storageRetry.addEventListener("click", () => {
      for (const id of store.failed.keys()) store.dirty.add(id);
      flush();
    });
    onSubmit(ui.renameForm, saveRename); // the Save button or Enter in the title
    ui.renameCancel.addEventListener("click", () => ui.renameDialog.close());
    ui.renameDialog.addEventListener("close", () => { if (renaming && renaming.opener && renaming.opener.isConnected) renaming.opener.focus(); renaming = null; });
    if (store.channel) store.channel.addEventListener("message", onStoreMessage);
  }

  // A dialog's form: its submit button or Enter in a field runs `action`
  // (the page stays: nothing is posted anywhere).
  function onSubmit(form, action) {
    form.addEventListener("submit", (event) => { event.preventDefault(); action(); });
  }

  function wireDialogs() {
    ui.openSettings.addEventListener("click", openSettings);
    ui.settingsSummary.addEventListener("click", openSettings);
    for (const input of [ui.setSystem, ui.setTemperature, ui.setMaxTokens, ui.setThinking, ui.setApiKey]) {
      input.addEventListener("input", () => saveSettingsFromForm(false));
      input.addEventListener("change", () => saveSettingsFromForm(true));
    }
    ui.settingsDone.addEventListener("click", () => { saveSettingsFromForm(true); ui.settingsDialog.close(); });
    ui.settingsDialog.addEventListener("close", () => saveSettingsFromForm(true));
    ui.clearHistory.addEventListener("click", clearHistory);
    onSubmit(ui.keyForm, saveKeyAndRetry);
    ui.keyCancel.addEventListener("click", () => ui.keyDialog.close());
    ui.makeDefault.addEventListener("click", makeDefaults);
    ui.openHelp.addEventListener("click", () => ui.helpDialog.showModal());
    ui.helpClose.addEventListener("click", () => ui.helpDialog.close());
    ui.recoveryExport.addEventListener("click", exportStoredRaw);
    ui.recoveryReset.addEventListener("click", resetStorage);
    ui.healthRetry.addEventListener("click", refreshHealth);
  }

  function wirePage() {
    document.addEventListener("visibilitychange", () => { if (!document.hidden) refreshHealth(); });
    window.addEventListener("online", refreshHealth);
    // Leaving while a save has failed loses those changes: the browser asks first.
    window.addEventListener("beforeunload", (event) => {
      if (store.failed.size) {
        event.preventDefault();
        event.returnValue = "";
      }
    });
    // Leaving mid-reply: keep what arrived, labelled as interrupted (not as an error).
    window.addEventListener("pagehide", () => {
      state.unloading = true;
      for (const run of state.runs.values()) {
        run.msg.status = "interrupted";
        store.dirty.add(run.conv.id);
      }
      keepUnsaved();
      if (store.dirty.size) flush();
    });
    window.addEventListener("pageshow", (event) => { if (event.persisted) state.unloading = false; });
    window.addEventListener("storage", (event) => {
      if (event.key === STORE_SETTINGS) {
        state.settings = loadSettings();
        renderSettingsSummary();
      } else if (event.key === STORE_API_KEY) {
        state.apiKey = event.newValue || "";
      }
    });
  }

  async function start() {
    bindUI();
    if (server.model) setModelName(server.model);
    syncSidebarButton();
    renderSettingsSummary();
    renderKeyHint();
    wireComposer();
    wireConversations();
    wireDialogs();
    wirePage();
    try {
      state.conversations = await loadConversations();
    } catch (err) {
      state.conversations = [];
      showRecovery(`The stored chats could not be read (${err && err.message}).`);
    }
    state.currentId = readLocal(STORE_CURRENT); // the old data may have named it
    state.loaded = true;
    if (!currentConversation()) setCurrent(null);
    renderStart();
    if (store.dirty.size) flush(); // conversations moved over from localStorage
    if (navigator.storage && navigator.storage.persist) navigator.storage.persist().catch(() => {});
    ui.app.dataset.ready = "true";
    if (!document.activeElement || document.activeElement === document.body) ui.prompt.focus();
    refreshHealth();
  }

  // The first render: a chat that cannot be shown is closed, never the page.
  function renderStart() {
    try {
      renderAll();
    } catch (err) {
      setCurrent(null);
      showRecovery(`A stored chat could not be shown (${err && err.message}).`);
      try { renderAll(); } catch { /* the recovery banner still works */ }
    }
    if (store.unreadable.length) {
      showRecovery(`${store.unreadable.length} stored conversation${store.unreadable.length === 1 ? "" : "s"} could not be read; ` +
        "they are left in storage untouched.");
    }
  }

  // =========================================================================
  // Recovery: storage the page cannot read
  // =========================================================================

  function showRecovery(text) {
    ui.recoveryText.textContent = `${text} Export the stored data to a file to keep it, or reset the storage to start afresh.`;
    ui.recovery.hidden = false;
  }

  // Everything stored, as it is (readable or not), so nothing is lost by a reset.
  async function exportStoredRaw() {
    let records = [];
    try {
      if (store.db) records = await readAllRecords();
    } catch { /* nothing more to get */ }
    const legacy = readLocal(STORE_CONVERSATIONS);
    const data = { format: EXPORT_FORMAT, version: 1, exported: new Date().toISOString(), raw: true,
      conversations: records.length ? records : state.conversations, legacy };
    download(`lem-chat-stored-${new Date().toISOString().slice(0, 10)}.json`, JSON.stringify(data, null, 2), "application/json");
  }

  async function resetStorage() {
    if (!window.confirm("Delete everything this page has stored in this browser (chats and settings)? Export first to keep a copy.")) return;
    try {
      if (store.db) store.db.close();
      await idbDone(indexedDB.deleteDatabase(DB_NAME)).catch(() => {});
    } catch { /* nothing to delete */ }
    for (const key of [STORE_CONVERSATIONS, STORE_SETTINGS, STORE_CURRENT]) writeLocal(key, null);
    location.reload();
  }

  // Exposed for tests and for the curious; renderMarkdown is pure.
  window.lemChat = { renderMarkdown, renderStreaming, newStreamView, splitThink, stripThink, answerOf, state, timing,
    stop: stopGenerating };

  // The offline copy (see the top of this file): only where the browser allows service workers.
  function registerOfflineCopy() {
    if (!("serviceWorker" in navigator) || !window.isSecureContext) return;
    navigator.serviceWorker.register("/chat.js", { scope: "/" }).catch(() => { /* no offline copy: the page works the same */ });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
  registerOfflineCopy();
})();
