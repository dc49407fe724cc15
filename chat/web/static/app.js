/* Web chat page. Plain JS, no build step, no dependencies.
 * Talks to the HTTP API: POST /api/chat (server-sent events), /api/conversations, /v1/models.
 * Text from the model or the server only ever reaches the page through text nodes and
 * createElement, never as HTML. */
(function () {
  "use strict";

  const KEYS = { client: "chat.clientId", apiKey: "chat.apiKey", model: "chat.model" };
  const PAGE_SIZE = 20, HISTORY_PAGE = 100, MAX_HISTORY_PAGES = 50, MAX_DEPTH = 8;
  const ui = {};
  const state = {
    conversationId: null, // the conversation on screen; null for a new chat
    view: 0,              // bumped whenever the screen switches conversation
    stream: null,         // the reply being streamed, if any
    list: { items: new Map(), cursor: null, loading: false, token: 0 },
    historyFirst: null,   // created_at of the oldest message on screen
    errorCode: null,
    modelProviders: new Map(), // model id -> provider serving it (owned_by in /v1/models)
  };

  /* ---------------------------------------------------------------- helpers */

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else node.setAttribute(key, String(value));
    }
    // append() turns strings into text nodes: never parsed as HTML.
    for (const child of children || []) if (child !== null && child !== undefined) node.append(child);
    return node;
  }

  const memory = new Map(); // used when the browser refuses localStorage
  const store = {
    get: (k) => { try { return localStorage.getItem(k); } catch { return memory.get(k) ?? null; } },
    set: (k, v) => { try { localStorage.setItem(k, v); } catch { memory.set(k, v); } },
    remove: (k) => { try { localStorage.removeItem(k); } catch { memory.delete(k); } },
  };

  function randomId() {
    if (window.crypto && typeof crypto.randomUUID === "function") return crypto.randomUUID();
    const b = crypto.getRandomValues(new Uint8Array(16)); // randomUUID needs a secure context
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }

  function clientId() {
    let id = store.get(KEYS.client);
    if (!id || !/^[A-Za-z0-9_-]{8,128}$/.test(id)) store.set(KEYS.client, (id = randomId()));
    return id;
  }

  function announce(text) {
    ui.status.textContent = "";
    setTimeout(() => { ui.status.textContent = text; }, 50);
  }

  const itemFor = (id) => id && ui.conversationList.querySelector(`.conversation-item[data-id="${CSS.escape(id)}"]`);

  /* -------------------------------------------------------------------- API */

  class ApiError extends Error {
    constructor(info) { super(info.message || info.code || "request failed"); Object.assign(this, info); }
  }

  const STATUS_CODES = { 401: "unauthorized", 403: "forbidden", 404: "not_found", 413: "payload_too_large",
    422: "validation_error", 429: "rate_limited", 502: "upstream_error", 503: "overloaded", 504: "upstream_timeout" };

  function parseRetryAfter(value) {
    if (!value) return null;
    if (/^\s*\d+(\.\d+)?\s*$/.test(value)) return Math.ceil(Number(value));
    const when = Date.parse(value); // the HTTP-date form
    return Number.isNaN(when) ? null : Math.max(0, Math.ceil((when - Date.now()) / 1000));
  }

  async function apiFetch(path, options = {}) {
    if (navigator.onLine === false) throw new ApiError({ code: "offline" });
    const headers = { Accept: options.accept || "application/json", "X-Client-Id": clientId() };
    const key = (store.get(KEYS.apiKey) || "").trim();
    if (key) headers.Authorization = `Bearer ${key}`;
    const request = { method: options.method || "GET", headers, signal: options.signal, cache: "no-store" };
    if (options.body !== undefined) {
      headers["Content-Type"] = "application/json";
      request.body = JSON.stringify(options.body);
    }
    try {
      return await fetch(path, request);
    } catch (err) {
      if (err && err.name === "AbortError") throw err;
      throw new ApiError({ code: "offline" }); // network failure: offline or server unreachable
    }
  }

  async function errorFromResponse(res) {
    let body = null;
    try { body = await res.json(); } catch { /* not JSON, e.g. a proxy's error page */ }
    const info = (body && typeof body.error === "object" && body.error) || {};
    return new ApiError({
      status: res.status,
      code: typeof info.code === "string" ? info.code : STATUS_CODES[res.status] || "http_error",
      message: typeof info.message === "string" ? info.message : "",
      details: Array.isArray(info.details) ? info.details : [],
      retryAfter: parseRetryAfter(res.headers.get("Retry-After")),
      requestId: (body && typeof body.request_id === "string" && body.request_id) || res.headers.get("X-Request-ID"),
    });
  }

  async function apiJson(path, options) {
    const res = await apiFetch(path, options);
    if (!res.ok) throw await errorFromResponse(res);
    return res.status === 204 ? null : res.json();
  }

  const conversationPath = (id) => `/api/conversations/${encodeURIComponent(id)}`;

  /* ----------------------------------------------------------------- errors */

  const ERROR_TEXT = {
    offline: () => "You appear to be offline, or the server can't be reached. Check your connection and try again.",
    rate_limited: (w) => (w ? `Too many messages. Try again in ${w} s.` : "Too many messages. Try again in a moment."),
    upstream_error: () => "The model provider isn't answering right now. Please try again in a little while.",
    upstream_timeout: () => "The model took too long to answer. Please try again.",
    overloaded: (w) => `The server is busy right now. ${w ? `Try again in ${w} s.` : "Please try again shortly."}`,
    storage_unavailable: () => "The server can't reach its database right now. Please try again shortly.",
    validation_error: (w, err) => validationText(err),
    unauthorized: () => "This server needs an API key. Add yours under Settings in the sidebar.",
    forbidden: () => "Your key isn't allowed to do that.",
    conversation_not_found: () => "That conversation no longer exists.",
    payload_too_large: () => "That message is too long to send.",
    stream_interrupted: () => "The connection dropped before the reply finished. Please try again.",
  };

  function validationText(err) {
    if (err.message) return err.message.slice(0, 500);
    const parts = (err.details || []).map((d) => {
      if (typeof d === "string") return d;
      const field = d && (Array.isArray(d.loc) ? d.loc.join(".") : d.field);
      const why = d && (d.message || d.msg);
      return typeof why === "string" ? (field ? `${field}: ${why}` : why) : "";
    }).filter(Boolean);
    return parts.length ? parts.join("; ").slice(0, 500) : "The server did not accept that message.";
  }

  function describeError(err) {
    if (!err || err.name === "AbortError") return "";
    const wait = typeof err.retryAfter === "number" ? Math.max(1, err.retryAfter) : null;
    if (ERROR_TEXT[err.code]) return ERROR_TEXT[err.code](wait, err);
    const ref = err.requestId ? ` (reference ${String(err.requestId).slice(0, 64)})` : "";
    return `Something went wrong${err.status ? ` (error ${err.status})` : ""}. Please try again.${ref}`;
  }

  function showError(err) {
    const text = typeof err === "string" ? err : describeError(err);
    if (!text) return;
    state.errorCode = (err && err.code) || null;
    ui.errorText.textContent = text;
    ui.errorBanner.hidden = false;
  }

  function clearError() {
    state.errorCode = null;
    ui.errorBanner.hidden = true;
    ui.errorText.textContent = "";
  }

  /* --------------------------------------------------------------- markdown */

  const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)/;
  const HEADING = /^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$/;
  const LIST_ITEM = /^( *)([-*+]|\d{1,9}[.)])[ \t]+(.*)$/;
  const indentOf = (line) => line.length - line.trimStart().length;

  function safeHref(raw) {
    const href = String(raw).trim();
    if (!/^(https?:\/\/|mailto:)/i.test(href)) return null;
    try {
      const url = new URL(href);
      return ["http:", "https:", "mailto:"].includes(url.protocol) ? url.href : null;
    } catch {
      return null;
    }
  }

  function renderMarkdown(text) {
    const frag = document.createDocumentFragment();
    const lines = String(text).replace(/\r\n?/g, "\n").split("\n")
      .map((line) => line.replace(/^\t+/, (tabs) => "    ".repeat(tabs.length)));
    renderBlocks(lines, frag, 0);
    return frag;
  }

  const isBlockStart = (line) => [FENCE, HEADING, LIST_ITEM].some((re) => re.test(line));

  function renderBlocks(lines, parent, depth) {
    let i = 0, m;
    while (i < lines.length) {
      const line = lines[i];
      if (!line.trim()) {
        i += 1;
      } else if ((m = FENCE.exec(line))) {
        i = renderFence(lines, i, m, parent);
      } else if ((m = HEADING.exec(line))) { // "#" is h3: the page owns h1 and h2
        parent.append(el(`h${Math.min(6, m[1].length + 2)}`, null, [renderInline(m[2])]));
        i += 1;
      } else if (LIST_ITEM.test(line) && depth < MAX_DEPTH) {
        i = renderList(lines, i, parent, depth);
      } else {
        const start = i; // a paragraph runs to a blank line or the start of another block
        while (i < lines.length && lines[i].trim() && (i === start || !isBlockStart(lines[i]))) i += 1;
        parent.append(el("p", null, [renderInline(lines.slice(start, i).map((l) => l.trim()).join("\n"))]));
      }
    }
  }

  function renderFence(lines, start, m, parent) {
    const close = new RegExp(`^ {0,3}${m[1][0] === "`" ? "`" : "~"}{${m[1].length},}\\s*$`);
    let i = start + 1;
    while (i < lines.length && !close.test(lines[i])) i += 1; // unclosed while streaming: runs to the end
    const language = m[2].replace(/[^\w+#.-]/g, "").slice(0, 30);
    const code = el("code", language ? { class: `language-${language}` } : null, [lines.slice(start + 1, i).join("\n")]);
    parent.append(el("div", { class: "code-block" }, [
      el("div", { class: "code-lang" }, [language || "code"]),
      el("pre", { tabindex: "0" }, [code]), // focusable so it scrolls from the keyboard
    ]));
    return i + 1;
  }

  function renderList(lines, start, parent, depth) {
    const first = LIST_ITEM.exec(lines[start]);
    const indent = first[1].length, ordered = /\d/.test(first[2]);
    const sameList = (m) => m && m[1].length >= indent && m[1].length <= indent + 1 && /\d/.test(m[2]) === ordered;
    const list = el(ordered ? "ol" : "ul");
    if (ordered && parseInt(first[2], 10) !== 1) list.setAttribute("start", String(parseInt(first[2], 10)));
    const items = [];
    let i = start;
    for (; i < lines.length; i += 1) {
      const line = lines[i], m = LIST_ITEM.exec(line), current = items[items.length - 1];
      if (sameList(m)) {
        items.push({ lines: [m[3]], offset: m[1].length + m[2].length + 1 });
      } else if (m && indentOf(line) <= indent + 1) {
        break; // a different kind of list, or an outer one
      } else if (!line.trim()) {
        let next = i + 1;
        while (next < lines.length && !lines[next].trim()) next += 1;
        if (next >= lines.length || !(indentOf(lines[next]) > indent + 1 || sameList(LIST_ITEM.exec(lines[next])))) break;
        current.lines.push("");
      } else if (indentOf(line) > indent + 1) {
        current.lines.push(line.slice(Math.min(indentOf(line), current.offset)));
      } else if (lines[i - 1].trim() && !isBlockStart(line)) {
        current.lines.push(line.trim()); // lazy continuation of the item's paragraph
      } else {
        break;
      }
    }
    for (const item of items) {
      const li = list.appendChild(el("li"));
      renderBlocks(item.lines, li, depth + 1);
      const p = li.firstElementChild;
      if (p && p.tagName === "P" && !item.lines.includes("")) p.replaceWith(...p.childNodes); // tight list
    }
    parent.append(list);
    return i;
  }

  // Inline rules, tried in order at the characters that can start them. `open` is the
  // opening delimiter alone: when it matches but the rule does not, no closer follows,
  // so the rule is skipped for the rest of the text (keeps rendering linear).
  const INLINE_RULES = [
    { starts: "\\", re: /\\([!-/:-@[-`{-~])/y, make: (m) => document.createTextNode(m[1]) },
    { starts: "[", link: true, make: makeLink,
      re: /\[([^[\]\n]+)\]\(\s*<?((?:[^\s<>()]|\([^\s<>()]*\))+)>?(?:\s+"[^"\n]*")?\s*\)/y },
    { starts: "hH", link: true, wordStart: true, re: /https?:\/\/[^\s<>"'`]*[^\s<>"'`.,:;!?)\]}*_~]/iy,
      make: (m, d) => makeLink([m[0], m[0], m[0]], d) },
    { starts: "*", re: /\*\*(?=\S)([\s\S]*?\S)\*\*/y, open: /\*\*(?=\S)/y, tag: "strong" },
    { starts: "_", wordStart: true, re: /__(?=\S)([\s\S]*?\S)__(?!\w)/y, open: /__(?=\S)/y, tag: "strong" },
    { starts: "*", re: /\*(?=[^\s*])([\s\S]*?[^\s*])\*(?!\*)/y, open: /\*(?=[^\s*])/y, tag: "em" },
    { starts: "_", wordStart: true, re: /_(?=[^\s_])([\s\S]*?[^\s_])_(?!\w)/y, open: /_(?=[^\s_])/y, tag: "em" },
  ];
  const INLINE_STARTS = new Set(INLINE_RULES.map((r) => r.starts).join(""));

  function makeLink(m, depth) {
    const href = safeHref(m[2]);
    if (!href) return document.createTextNode(m[0]); // not http(s)/mailto: shown as typed
    return el("a", { href, target: "_blank", rel: "noopener noreferrer" }, [renderInline(m[1], depth + 1, true)]);
  }

  // A code span: a run of backticks up to the next run of the same length.
  function matchCode(text, pos, dead) {
    let run = 0;
    while (text[pos + run] === "`") run += 1;
    for (let i = pos + run; !dead.has(`code${run}`) && i < text.length;) {
      let k = 0;
      while (text[i + k] === "`") k += 1;
      if (k === run) return [text.slice(pos, i + k), text.slice(pos + run, i)];
      i += k || 1;
    }
    dead.add(`code${run}`);
    return [text.slice(pos, pos + run), null]; // no closing run: the backticks are plain text
  }

  function appendText(parent, text) {
    text.split("\n").forEach((part, k) => {
      if (k) parent.append(el("br"));
      if (part) parent.append(document.createTextNode(part));
    });
  }

  function renderInline(text, depth = 0, inLink = false) {
    const frag = document.createDocumentFragment();
    const dead = new Set();
    let plain = "", pos = 0;
    scan: while (pos < text.length) {
      const ch = text[pos];
      if (ch === "`") {
        const [raw, code] = matchCode(text, pos, dead);
        if (code === null) {
          plain += raw;
        } else {
          appendText(frag, plain);
          plain = "";
          frag.append(el("code", null, [code.replace(/\n/g, " ")]));
        }
        pos += raw.length;
        continue;
      }
      if (INLINE_STARTS.has(ch) && depth < MAX_DEPTH) {
        for (const rule of INLINE_RULES) {
          if (!rule.starts.includes(ch) || (rule.link && inLink) || dead.has(rule)) continue;
          if (rule.wordStart && pos > 0 && /\w/.test(text[pos - 1])) continue;
          rule.re.lastIndex = pos;
          const m = rule.re.exec(text);
          if (!m) {
            if (rule.open) { rule.open.lastIndex = pos; if (rule.open.test(text)) dead.add(rule); }
            continue;
          }
          appendText(frag, plain);
          plain = "";
          frag.append(rule.tag ? el(rule.tag, null, [renderInline(m[1], depth + 1, inLink)]) : rule.make(m, depth));
          pos += m[0].length;
          continue scan;
        }
      }
      plain += ch;
      pos += 1;
    }
    appendText(frag, plain);
    return frag;
  }

  /* --------------------------------------------------------------- messages */

  const FINISH_LABELS = { cancelled: "stopped", length: "cut off (length limit)", content_filter: "filtered" };

  function setMessageMeta(node, info) {
    node.querySelector(".message-meta").replaceChildren(...[
      info.model && el("span", { class: "meta-model", title: "Model" }, [info.model]),
      info.provider && el("span", { class: "meta-provider", title: "Provider" }, [info.provider]),
      info.cached && el("span", { class: "badge badge-cached", title: "Answered from the cache" }, ["cached"]),
      typeof info.time === "number" && el("span", { class: "meta-time" }, [`${info.time.toFixed(1)} s`]),
      info.status && el("span", { class: "meta-status" }, [info.status]),
    ].filter(Boolean));
  }

  function setMessageText(node, text) {
    const body = node.querySelector(".message-body");
    if (node.classList.contains("assistant")) body.replaceChildren(renderMarkdown(text));
    else body.textContent = text;
  }

  function addMessage(role, text, options = {}) {
    const node = el("div", { class: `message ${role}`, "data-id": options.id, "data-created-at": options.createdAt }, [
      el("span", { class: "visually-hidden" }, [role === "user" ? "You said:" : "Assistant:"]),
      el("div", { class: "message-body" }),
      el("div", { class: "message-meta" }),
    ]);
    setMessageText(node, text);
    if (options.meta) setMessageMeta(node, options.meta);
    ui.emptyState.hidden = true;
    if (options.prepend) ui.messageList.prepend(node); else ui.messageList.append(node);
    return node;
  }

  function clearMessages() {
    ui.messageList.replaceChildren();
    ui.emptyState.hidden = false;
    state.historyFirst = null;
  }

  const nearBottom = () => ui.messages.scrollHeight - ui.messages.scrollTop - ui.messages.clientHeight < 80;
  const scrollToBottom = () => { ui.messages.scrollTop = ui.messages.scrollHeight; };

  function addHistory(messages) {
    const shown = messages.filter((msg) => msg && (msg.role === "user" || msg.role === "assistant"));
    if (!shown.length) return;
    // Pages come oldest first; a page older than what is on screen goes on top.
    const older = Boolean(state.historyFirst && shown[shown.length - 1].created_at < state.historyFirst);
    for (const msg of older ? shown.slice().reverse() : shown) {
      const meta = msg.role === "assistant" && { model: msg.model, provider: msg.provider,
        cached: msg.cached === true, status: FINISH_LABELS[msg.finish_reason] };
      addMessage(msg.role, typeof msg.content === "string" ? msg.content : "",
        { id: msg.id, createdAt: msg.created_at, meta, prepend: older });
    }
    if (!state.historyFirst || older) state.historyFirst = shown[0].created_at;
  }

  /* -------------------------------------------------------------- streaming */

  async function readEvents(res, onEvent) {
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", eventName = "message", data = [];
    const dispatch = () => {
      let parsed = null;
      try { parsed = data.length ? JSON.parse(data.join("\n")) : null; } catch { /* "[DONE]" or junk */ }
      if (parsed && typeof parsed === "object") onEvent(eventName, parsed);
      data = [];
      eventName = "message";
    };
    const handleLine = (line) => {
      if (line === "") return dispatch();
      const colon = line.indexOf(":");
      if (colon === 0) return undefined; // comment / keep-alive
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") eventName = value || "message";
      else if (field === "data") data.push(value);
      return undefined;
    };
    try {
      for (;;) {
        const { value, done } = await reader.read();
        buffer += decoder.decode(value || new Uint8Array(0), { stream: !done });
        let nl;
        while ((nl = buffer.indexOf("\n")) >= 0) {
          handleLine(buffer.slice(0, nl).replace(/\r$/, ""));
          buffer = buffer.slice(nl + 1);
        }
        if (done) {
          if (buffer) handleLine(buffer.replace(/\r$/, ""));
          return dispatch();
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  function handleStreamEvent(stream, eventName, data) {
    if (eventName === "error") {
      throw new ApiError({ code: String(data.code || "stream_error"), message: String(data.message || "") });
    }
    if (data.conversation_id && !stream.started) {
      stream.started = true;
      stream.conversationId = data.conversation_id;
      stream.info = { model: data.model, provider: data.provider };
      if (stream.view === state.view) state.conversationId = data.conversation_id;
      setMessageMeta(stream.reply, stream.info);
    }
    if (typeof data.delta === "string" && data.delta) {
      stream.text += data.delta;
      if (!stream.renderQueued) { // at most one re-render per frame; less often for long replies
        stream.renderQueued = true;
        setTimeout(() => requestAnimationFrame(() => {
          const started = performance.now(), stick = nearBottom();
          setMessageText(stream.reply, stream.text);
          if (stick) scrollToBottom();
          stream.renderMs = performance.now() - started;
          stream.renderQueued = false;
        }), Math.max(0, (stream.renderMs || 0) * 4 - 16));
      }
    }
    if (data.done) stream.done = data;
  }

  function setStreaming(on) {
    ui.sendButton.hidden = on;
    ui.stopButton.hidden = !on;
    document.body.classList.toggle("is-streaming", on);
  }

  async function sendMessage() {
    const text = ui.input.value;
    if (state.stream || !text.trim()) return;
    if (navigator.onLine === false) { showError({ code: "offline" }); return; }
    clearError();
    const body = { message: text, stream: true };
    if (ui.modelSelect.value) {
      body.model = ui.modelSelect.value;
      // /api/chat asks the default provider unless told; name the one that serves this model.
      const provider = state.modelProviders.get(body.model);
      if (provider) body.provider = provider;
    }
    if (state.conversationId) body.conversation_id = state.conversationId;
    ui.input.value = "";
    autoGrow();
    if (document.activeElement === ui.sendButton) ui.input.focus(); // the button is about to hide
    const userNode = addMessage("user", text);
    const reply = addMessage("assistant", "");
    reply.classList.add("streaming");
    reply.setAttribute("aria-busy", "true"); // the log announces the reply once it is complete
    scrollToBottom();
    const stream = state.stream = { controller: new AbortController(), reply, text: "", info: {}, done: null,
      started: false, stopped: false, view: state.view, isNew: !state.conversationId };
    setStreaming(true);
    try {
      const res = await apiFetch("/api/chat",
        { method: "POST", body, signal: stream.controller.signal, accept: "text/event-stream" });
      if (!res.ok) throw await errorFromResponse(res);
      await readEvents(res, (name, data) => handleStreamEvent(stream, name, data));
      if (!stream.done) throw new ApiError({ code: "stream_interrupted" });
      finishReply(stream);
    } catch (err) {
      if (stream.stopped) finishReply(stream);
      else failReply(stream, userNode, text, err);
    } finally {
      if (state.stream === stream) state.stream = null;
      setStreaming(Boolean(state.stream));
      afterReply(stream);
    }
  }

  function finishReply(stream) {
    const { reply, done } = stream;
    setMessageText(reply, stream.text);
    if (!stream.text && stream.stopped) reply.querySelector(".message-body").textContent = "(no reply)";
    reply.classList.remove("streaming");
    reply.removeAttribute("aria-busy");
    if (done && done.message_id) reply.dataset.id = done.message_id;
    setMessageMeta(reply, {
      model: stream.info.model || (done && done.model),
      provider: stream.info.provider || (done && done.provider),
      cached: Boolean(done && done.cached),
      time: done && typeof done.processing_time === "number" ? done.processing_time : undefined,
      status: stream.stopped ? "stopped" : FINISH_LABELS[done && done.finish_reason],
    });
    if (stream.stopped) announce("Reply stopped.");
    if (stream.view === state.view && nearBottom()) scrollToBottom();
  }

  function failReply(stream, userNode, text, err) {
    if (stream.view !== state.view) return;
    if (stream.text) { // keep the partial reply, marked as such
      setMessageText(stream.reply, stream.text);
      stream.reply.classList.replace("streaming", "incomplete");
      stream.reply.removeAttribute("aria-busy");
      setMessageMeta(stream.reply, { ...stream.info, status: "incomplete" });
    } else { // nothing came back: undo the exchange
      userNode.remove();
      stream.reply.remove();
      ui.emptyState.hidden = ui.messageList.children.length > 0;
    }
    if (!ui.input.value.trim()) { ui.input.value = text; autoGrow(); } // keep what the user typed
    showError(err);
    if (err && err.code === "conversation_not_found") {
      removeConversationItem(state.conversationId);
      state.conversationId = null;
    }
    ui.input.focus();
  }

  function afterReply(stream) {
    if (!stream.conversationId) return;
    if (stream.isNew) { // the sidebar now shows the new conversation
      loadConversations(true).then(() => { if (stream.view === state.view) markActive(stream.conversationId); });
    } else if (itemFor(stream.conversationId)) {
      ui.conversationList.prepend(itemFor(stream.conversationId)); // newest activity first
    }
  }

  function stopStream() {
    if (!state.stream) return;
    state.stream.stopped = true;
    state.stream.controller.abort();
  }

  /* ---------------------------------------------------------- conversations */

  function conversationItem(conv) {
    const title = conv.title || "Untitled";
    return el("li", { class: "conversation-item", "data-id": conv.id }, [
      el("button", { type: "button", class: "conversation-open", title }, [
        el("span", { class: "conversation-title" }, [title])]),
      el("button", { type: "button", class: "icon-button rename-button", "aria-label": `Rename “${title}”` }, ["\u270E"]),
      el("button", { type: "button", class: "icon-button delete-button", "aria-label": `Delete “${title}”` }, ["\u2715"]),
    ]);
  }

  function upsertConversation(conv) {
    if (!conv || typeof conv.id !== "string") return;
    state.list.items.set(conv.id, { ...state.list.items.get(conv.id), ...conv });
    const node = conversationItem(state.list.items.get(conv.id)), old = itemFor(conv.id);
    if (old) old.replaceWith(node); else ui.conversationList.append(node);
    if (conv.id === state.conversationId) markActive(conv.id);
  }

  function removeConversationItem(id) {
    state.list.items.delete(id);
    const node = itemFor(id);
    if (node) node.remove();
    updateListChrome();
  }

  function markActive(id) {
    for (const node of ui.conversationList.querySelectorAll(".conversation-item")) {
      const active = node.dataset.id === id;
      node.classList.toggle("active", active);
      node.querySelector(".conversation-open").setAttribute("aria-current", active ? "true" : "false");
    }
    setTitle(id && state.list.items.has(id) ? state.list.items.get(id).title : null);
  }

  function setTitle(title) {
    if (!title && state.conversationId) return; // keep what is shown until the title is known
    ui.title.textContent = title || "New chat";
    document.title = title ? `${title} – Chat` : "Chat";
  }

  function updateListChrome() {
    ui.loadMore.hidden = !state.list.cursor || state.list.loading;
    ui.listLoading.hidden = !state.list.loading;
    ui.listEmpty.hidden = state.list.loading || ui.conversationList.children.length > 0;
  }

  async function loadConversations(reset) {
    if (!reset && (state.list.loading || !state.list.cursor)) return;
    const token = ++state.list.token; // a reset supersedes a page still loading
    state.list.loading = true;
    updateListChrome();
    const params = new URLSearchParams({ limit: String(PAGE_SIZE) });
    if (!reset) params.set("cursor", state.list.cursor);
    try {
      const data = await apiJson(`/api/conversations?${params}`);
      if (token !== state.list.token) return;
      if (reset) { ui.conversationList.replaceChildren(); state.list.items.clear(); }
      for (const conv of (data && data.conversations) || []) upsertConversation(conv);
      state.list.cursor = (data && data.next_cursor) || null;
      markActive(state.conversationId);
    } catch (err) {
      if (token === state.list.token) showError(err);
    } finally {
      if (token === state.list.token) { state.list.loading = false; updateListChrome(); }
    }
  }

  async function openConversation(id) {
    stopStream();
    const view = ++state.view;
    state.conversationId = id;
    clearMessages();
    clearError();
    markActive(id);
    closeSidebar(false);
    ui.messageList.setAttribute("aria-busy", "true");
    let cursor = null, pages = 0;
    try {
      do {
        const params = new URLSearchParams({ limit: String(HISTORY_PAGE) });
        if (cursor) params.set("cursor", cursor);
        const conv = await apiJson(`${conversationPath(id)}?${params}`);
        if (view !== state.view) return;
        if (pages === 0) {
          const summary = { ...conv };
          delete summary.messages;
          delete summary.next_cursor;
          upsertConversation(summary);
          selectModel(conv.model, false);
        }
        addHistory(conv.messages || []);
        scrollToBottom();
        cursor = conv.next_cursor || null;
        pages += 1;
      } while (cursor && pages < MAX_HISTORY_PAGES);
      ui.input.focus();
    } catch (err) {
      if (view !== state.view) return;
      showError(err);
      if (err.code === "conversation_not_found") { removeConversationItem(id); newChat(false); }
    } finally {
      if (view === state.view) ui.messageList.removeAttribute("aria-busy");
    }
  }

  function newChat(clear = true) {
    stopStream();
    state.view += 1;
    state.conversationId = null;
    clearMessages();
    if (clear) clearError();
    markActive(null);
    selectModel(store.get(KEYS.model), false); // back to the user's own choice
    closeSidebar(false);
    ui.input.focus();
  }

  async function renameConversation(node) {
    const id = node.dataset.id, conv = state.list.items.get(id) || { id, title: "" };
    const answer = window.prompt("New title for this conversation:", conv.title || "");
    const title = answer === null ? "" : answer.trim();
    if (!title || title === conv.title) return;
    try {
      const updated = await apiJson(conversationPath(id), { method: "PATCH", body: { title } });
      upsertConversation(updated && updated.id ? updated : { ...conv, title });
      announce("Conversation renamed.");
    } catch (err) {
      showError(err);
    }
    const again = itemFor(id);
    if (again) again.querySelector(".rename-button").focus();
  }

  async function deleteConversation(node) {
    const id = node.dataset.id, conv = state.list.items.get(id) || {};
    if (!window.confirm(`Delete “${conv.title || "Untitled"}”? This can't be undone.`)) return;
    const neighbour = node.nextElementSibling || node.previousElementSibling;
    try {
      await apiJson(conversationPath(id), { method: "DELETE" });
    } catch (err) {
      if (err.code !== "conversation_not_found") { showError(err); return; }
    }
    removeConversationItem(id);
    announce("Conversation deleted.");
    if (state.conversationId === id) { newChat(); return; } // focuses the message box
    const target = neighbour && neighbour.isConnected && neighbour.querySelector(".conversation-open");
    (target || ui.newChat).focus();
  }

  /* ----------------------------------------------------------------- models */

  function selectModel(id, remember) {
    if (!id || ![...ui.modelSelect.options].some((o) => o.value === id)) return;
    ui.modelSelect.value = id;
    if (remember) store.set(KEYS.model, id);
  }

  async function loadModels() {
    let ids = [];
    try {
      const data = await apiJson("/v1/models");
      const models = ((data && data.data) || []).filter((m) => m && typeof m.id === "string" && m.id);
      ids = models.map((m) => m.id);
      state.modelProviders = new Map(models.filter((m) => typeof m.owned_by === "string" && m.owned_by)
        .map((m) => [m.id, m.owned_by]));
    } catch { /* the picker falls back to the server's default model */ }
    ui.modelSelect.replaceChildren(...(ids.length ? ids.map((id) => el("option", { value: id }, [id]))
      : [el("option", { value: "" }, ["Default model"])]));
    selectModel(store.get(KEYS.model), false);
  }

  /* ------------------------------------------------------- layout & settings */

  function autoGrow() {
    ui.input.style.height = "auto";
    ui.input.style.height = `${Math.min(ui.input.scrollHeight, 240)}px`;
  }

  function openSidebar() {
    document.body.classList.add("sidebar-open");
    ui.sidebarToggle.setAttribute("aria-expanded", "true");
    ui.backdrop.hidden = false;
    const active = ui.conversationList.querySelector(".conversation-item.active .conversation-open");
    (active || ui.newChat).focus();
  }

  function closeSidebar(returnFocus) {
    if (!document.body.classList.contains("sidebar-open")) return;
    document.body.classList.remove("sidebar-open");
    ui.sidebarToggle.setAttribute("aria-expanded", "false");
    ui.backdrop.hidden = true;
    if (returnFocus) ui.sidebarToggle.focus();
  }

  function saveApiKey(key) {
    if (key) store.set(KEYS.apiKey, key); else store.remove(KEYS.apiKey);
    ui.apiKey.value = key;
    ui.settingsStatus.textContent = key ? "API key saved." : "API key removed.";
    clearError();
    loadModels();
    loadConversations(true);
  }

  /* ----------------------------------------------------------------- wiring */

  function bindEvents() {
    const on = (node, type, handler) => node.addEventListener(type, handler);
    on(ui.composer, "submit", (event) => { event.preventDefault(); sendMessage(); });
    on(ui.input, "keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
        event.preventDefault(); // Enter sends; Shift+Enter (or an IME) adds a line
        sendMessage();
      }
    });
    on(ui.input, "input", autoGrow);
    on(ui.stopButton, "click", () => { stopStream(); ui.input.focus(); });
    on(ui.newChat, "click", () => newChat());
    on(ui.modelSelect, "change", () => selectModel(ui.modelSelect.value, true));
    on(ui.errorDismiss, "click", () => { clearError(); ui.input.focus(); });
    on(ui.loadMore, "click", () => loadConversations(false));
    on(ui.conversationList, "click", (event) => {
      const button = event.target.closest("button"), node = button && button.closest(".conversation-item");
      if (!node) return;
      if (button.classList.contains("rename-button")) renameConversation(node);
      else if (button.classList.contains("delete-button")) deleteConversation(node);
      else if (button.classList.contains("conversation-open")) openConversation(node.dataset.id);
    });
    on(ui.sidebarToggle, "click", openSidebar);
    on(ui.sidebarClose, "click", () => closeSidebar(true));
    on(ui.backdrop, "click", () => closeSidebar(true));
    on(document, "keydown", (event) => { if (event.key === "Escape") closeSidebar(true); });
    on(ui.settingsForm, "submit", (event) => { event.preventDefault(); saveApiKey(ui.apiKey.value.trim()); });
    on(ui.clearKey, "click", () => saveApiKey(""));
    on(window, "offline", () => showError({ code: "offline" }));
    on(window, "online", () => { if (state.errorCode === "offline") clearError(); });
    if ("IntersectionObserver" in window) { // infinite scroll of the conversation list
      new IntersectionObserver((entries) => { if (entries.some((e) => e.isIntersecting)) loadConversations(false); },
        { root: ui.conversationNav, rootMargin: "120px" }).observe(ui.loadMore);
    }
  }

  function init() {
    const ids = {
      input: "message-input", composer: "composer", sendButton: "send-button", stopButton: "stop-button",
      newChat: "new-chat", modelSelect: "model-select", conversationList: "conversation-list",
      conversationNav: "conversation-nav", loadMore: "load-more-conversations", listEmpty: "conversation-empty",
      listLoading: "conversation-loading", messages: "messages", messageList: "message-list",
      emptyState: "empty-state", title: "chat-title", errorBanner: "error-banner", errorText: "error-text",
      errorDismiss: "error-dismiss", sidebarToggle: "sidebar-toggle", sidebarClose: "sidebar-close",
      backdrop: "sidebar-backdrop", settingsForm: "settings-form", apiKey: "api-key-input",
      clearKey: "clear-api-key", settingsStatus: "settings-status", status: "status",
    };
    for (const [name, id] of Object.entries(ids)) ui[name] = document.getElementById(id);
    ui.apiKey.value = store.get(KEYS.apiKey) || "";
    clientId();
    bindEvents();
    loadModels();
    loadConversations(true);
    ui.input.focus();
  }

  // For tests and debugging; the page itself does not use it.
  window.ChatPage = { renderMarkdown, safeHref, describeError, parseRetryAfter };

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
