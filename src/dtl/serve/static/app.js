// The DTL page: a client of the server's own OpenAI-compatible API. No libraries, no build.
//   Ask mode      -> POST v1/chat/completions {stream: true}, SSE read with fetch + a reader
//   Complete mode -> POST v1/completions {stream: true}, shown as ghost text after the caret
//   Header        -> GET v1/models (name, parameter count, context length)
// URLs are relative so the page also works behind a proxy that serves it under a prefix.
"use strict";

const $ = (id) => document.getElementById(id);
const SUGGEST_DELAY_MS = 450; // the typing pause before a suggestion is requested
const SLOW_NOTICE_MS = 3000; // after this with no token yet, say that we are still waiting
const CHARS_PER_TOKEN = 3; // a cautious guess, to keep a long text's tail inside the context

const state = {
  model: null, // the id from v1/models
  contextLength: null, // context_length from v1/models: the tokens the model trained at
  apiKey: sessionStorage.getItem("dtl-api-key") || "",
  needsKey: false,
};

// ----------------------------------------------------------------- errors

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// The server's message from an error body: OpenAI's {"error": {"message"}}, FastAPI's
// {"detail": "..." | [{loc, msg}]}, or plain text.
function errorMessage(bodyText) {
  let body;
  try {
    body = JSON.parse(bodyText);
  } catch {
    return bodyText.trim().slice(0, 500);
  }
  if (body && body.error) {
    return typeof body.error === "string" ? body.error : body.error.message || JSON.stringify(body.error);
  }
  if (body && Array.isArray(body.detail)) {
    return body.detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
  }
  if (body && body.detail) return String(body.detail);
  if (body && body.message) return String(body.message);
  return bodyText.trim().slice(0, 500);
}

// What a user reads for a failed request: what happened and what to do.
function describe(err) {
  if (err instanceof ApiError) {
    const said = err.message ? `: ${err.message}` : "";
    if (err.status === 401) {
      return state.apiKey
        ? "The server rejected the API key (401). Check the key given to dtl serve --api-key and enter it above."
        : "This server needs an API key (401). Enter the key given to dtl serve --api-key above.";
    }
    if (err.status === 400 || err.status === 422) return `The server refused the request (${err.status})${said}`;
    if (err.status === 404) return `Not found (404)${said}. Is this page served by dtl serve?`;
    if (err.status >= 500) return `The server failed (${err.status})${said}. Its terminal shows the details.`;
    return `Request failed (${err.status})${said}`;
  }
  if (err && err.lost) return `The connection to the server was lost mid-answer (${err.message}). Is dtl serve still running?`;
  return `Cannot reach the server at ${location.origin} (${err && err.message ? err.message : err}). Is dtl serve still running?`;
}

function showError(message) {
  $("error-text").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error-text").textContent = "";
}

// A failed request: show it, and for a 401 ask for the key.
function report(err) {
  if (err instanceof ApiError && err.status === 401) askForKey();
  if (!(err instanceof ApiError) && !err.lost) setServerState("down");
  showError(describe(err));
}

// ----------------------------------------------------------------- HTTP + server-sent events

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.apiKey) h.Authorization = `Bearer ${state.apiKey}`;
  return h;
}

// fetch that throws ApiError for a non-2xx answer (network failures throw TypeError).
async function request(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(), cache: "no-store" });
  if (!response.ok) {
    let text = "";
    try {
      text = await response.text();
    } catch {
      // the body is lost; the status alone still says what happened
    }
    throw new ApiError(response.status, errorMessage(text));
  }
  return response;
}

// The `data:` payloads of an SSE stream, one per event, until the stream ends. Copes with
// \n and \r\n line ends and with events split across network reads.
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  const takeEvents = function* (final) {
    // a trailing \r may be the first half of \r\n: leave it for the next read
    const keep = !final && buffer.endsWith("\r") ? 1 : 0;
    buffer = buffer.slice(0, buffer.length - keep).replace(/\r\n?/g, "\n") + buffer.slice(buffer.length - keep);
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0 || (final && buffer.trim())) {
      if (end < 0) end = buffer.length;
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) yield data;
    }
  };
  let drained = false;
  try {
    for (;;) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch (err) {
        if (err.name === "AbortError") throw err;
        err.lost = true; // the connection broke after the answer had started
        throw err;
      }
      if (chunk.done) break;
      buffer += decoder.decode(chunk.value, { stream: true });
      yield* takeEvents(false);
    }
    drained = true;
    buffer += decoder.decode();
    yield* takeEvents(true);
  } finally {
    // stopped reading early ([DONE], an error, Stop): close the connection, not just the loop
    if (!drained) reader.cancel().catch(() => {});
  }
}

// Stream the text pieces of a chat or completion request: calls onPiece(text) per chunk and
// returns {finishReason, pieces, usage}. Chat chunks carry choices[0].delta.content, completion
// chunks choices[0].text; with stream_options.include_usage a last chunk with no choices
// carries the token counts (`usage`, else null); the stream ends with `data: [DONE]`.
async function streamText(path, body, signal, onPiece) {
  const response = await request(path, { method: "POST", body: JSON.stringify(body), signal });
  let finishReason = null;
  let pieces = 0;
  let usage = null;
  let done = false;
  for await (const data of sseData(response)) {
    if (data.trim() === "[DONE]") {
      done = true;
      break;
    }
    let chunk;
    try {
      chunk = JSON.parse(data);
    } catch {
      throw new ApiError(502, `the server sent a stream event that is not JSON: ${data.slice(0, 120)}`);
    }
    if (chunk.error) throw new ApiError(Number(chunk.error.code) || 500, errorMessage(data));
    if (chunk.usage) usage = chunk.usage;
    const choice = (chunk.choices || [])[0];
    if (!choice) continue;
    const text = choice.delta ? choice.delta.content : choice.text;
    if (text) {
      pieces += 1;
      onPiece(text);
    }
    if (choice.finish_reason) finishReason = choice.finish_reason;
  }
  if (!done && !finishReason) {
    // the connection closed cleanly but the answer never said it was complete
    throw Object.assign(new Error("the stream ended before its last event"), { lost: true });
  }
  return { finishReason, pieces, usage };
}

// ----------------------------------------------------------------- model info and API key

function formatCount(n) {
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)}B`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)}M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)}K`;
  return String(n);
}

function setServerState(kind) {
  const titles = { ok: "server answering", down: "server unreachable", key: "API key needed" };
  $("server-dot").dataset.state = kind;
  $("server-dot").title = titles[kind] || "";
  $("retry-btn").hidden = kind !== "down";
  if (kind === "down" && !state.model) $("model-name").textContent = "server unreachable";
}

async function loadModel() {
  let models;
  try {
    models = await (await request("v1/models")).json();
  } catch (err) {
    report(err);
    if (err instanceof ApiError && err.status === 401) {
      setServerState("key");
      $("model-name").textContent = "API key needed";
    }
    return false;
  }
  const entry = (models.data || [])[0];
  if (!entry) {
    showError("The server lists no model at v1/models.");
    return false;
  }
  state.model = entry.id;
  state.contextLength = Number(entry.context_length || entry.max_seq_length) || null;
  $("model-name").textContent = entry.id;
  $("model-name").title = "model name (v1/models)";
  const params = Number(entry.parameters);
  $("model-params").textContent = params ? `${formatCount(params)} parameters` : "";
  $("model-params").title = params ? `${params.toLocaleString("en-US")} parameters` : "";
  $("model-context").textContent = state.contextLength ? `· context ${state.contextLength} tokens` : "";
  if (state.contextLength) {
    $("max-tokens").max = state.contextLength;
    $("suggest-tokens").max = state.contextLength;
  }
  setServerState("ok");
  if (state.needsKey) $("key-status").textContent = "key accepted";
  clearError();
  return true;
}

function askForKey() {
  state.needsKey = true;
  $("key-bar").hidden = false;
  $("key-status").textContent = state.apiKey ? "key rejected" : "";
  $("api-key").focus();
}

async function useKey(event) {
  event.preventDefault();
  state.apiKey = $("api-key").value.trim();
  sessionStorage.setItem("dtl-api-key", state.apiKey);
  $("key-status").textContent = "checking…";
  await loadModel();
}

// ----------------------------------------------------------------- settings

const SETTINGS = [
  // id, default, lowest, highest, integer?  The Ask settings' defaults are replaced by the
  // server's GET ask_defaults (the settings `dtl ask` starts from) as soon as it answers.
  ["temperature", 0, 0, 2, false],
  ["top-k", 50, 0, 1e6, true],
  ["top-p", 1, 0.05, 1, false],
  ["repetition-penalty", 1.3, 1, 3, false],
  ["no-repeat-ngram", 0, 0, 64, true],
  ["max-tokens", 64, 1, 1e6, true],
  ["suggest-tokens", 16, 1, 1e6, true],
];
// settings id -> the field of GET ask_defaults that gives its default
const ASK_DEFAULT_FIELDS = {
  temperature: "temperature",
  "top-k": "top_k",
  "top-p": "top_p",
  "repetition-penalty": "repetition_penalty",
  "no-repeat-ngram": "no_repeat_ngram_size",
  "max-tokens": "max_tokens",
};

function setting(id) {
  const [, fallback, lo, hi, integer] = SETTINGS.find((s) => s[0] === id);
  const text = $(id).value.trim();
  let value = text === "" ? fallback : Number(text); // an emptied field means its default
  if (!Number.isFinite(value)) value = fallback;
  if (integer) value = Math.round(value);
  const max = Number($(id).max) || hi;
  return Math.min(Math.max(value, lo), Math.min(hi, max));
}

// The server checks `model` against its own; before v1/models has answered, leave it out.
function modelField() {
  return state.model ? { model: state.model } : {};
}

function samplingFields() {
  const fields = { temperature: setting("temperature"), top_p: setting("top-p") };
  const topK = setting("top-k");
  if (topK > 0) fields.top_k = topK; // not in OpenAI's schema: the server honours or ignores it
  const penalty = setting("repetition-penalty");
  if (penalty !== 1) fields.repetition_penalty = penalty; // dtl's documented extensions
  const ngram = setting("no-repeat-ngram");
  if (ngram > 0) fields.no_repeat_ngram_size = ngram;
  return fields;
}

// The Ask settings `dtl ask` uses, from the server (one definition, not a copy here): they
// become the defaults, and the shown values of the settings the user has not changed.
async function loadAskDefaults() {
  let defaults;
  try {
    const response = await fetch("ask_defaults", { cache: "no-store" });
    if (!response.ok) return;
    defaults = await response.json();
  } catch {
    return; // an older server: keep the built-in defaults
  }
  const saved = JSON.parse(localStorage.getItem("dtl-settings") || "{}");
  for (const entry of SETTINGS) {
    const value = defaults[ASK_DEFAULT_FIELDS[entry[0]]];
    if (typeof value !== "number") continue;
    entry[1] = value;
    if (saved[entry[0]] === undefined) $(entry[0]).value = value;
  }
  showSettingValues();
}

function initSettings() {
  const saved = JSON.parse(localStorage.getItem("dtl-settings") || "{}");
  for (const [id] of SETTINGS) {
    if (saved[id] !== undefined) $(id).value = saved[id];
    $(id).addEventListener("input", () => {
      const all = {};
      for (const [key] of SETTINGS) all[key] = $(key).value;
      localStorage.setItem("dtl-settings", JSON.stringify(all));
      showSettingValues();
    });
  }
  showSettingValues();
}

function showSettingValues() {
  $("temperature-out").textContent = Number($("temperature").value).toFixed(2);
  $("top-p-out").textContent = Number($("top-p").value).toFixed(2);
  $("repetition-penalty-out").textContent = Number($("repetition-penalty").value).toFixed(2);
}

// ----------------------------------------------------------------- Ask mode

let askController = null;

function setAskStatus(text, kind = "") {
  $("ask-status").textContent = text;
  $("ask-status").dataset.kind = kind;
}

// The session's questions and answers: the one shown in #answer, and those before it,
// listed newest first under "Earlier in this session", each with its own copy button.
const MAX_HISTORY = 50;
let current = null; // {question, status} of the answer in #answer

function archiveCurrent() {
  const answer = $("answer").textContent;
  if (!current || !answer) return;
  const item = document.createElement("li");
  const q = document.createElement("div");
  q.className = "q";
  q.textContent = current.question; // text nodes only: nothing here is parsed as HTML
  const a = document.createElement("div");
  a.className = "a";
  a.textContent = answer;
  const meta = document.createElement("div");
  meta.className = "meta muted";
  const status = document.createElement("span");
  status.textContent = current.status;
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "link copy";
  copy.textContent = "copy";
  copy.addEventListener("click", () => copyText(answer, copy));
  meta.append(status, copy);
  item.append(q, a, meta);
  const list = $("history-list");
  list.prepend(item);
  while (list.children.length > MAX_HISTORY) list.lastElementChild.remove();
  $("history").hidden = false;
  current = null;
}

// Copy `text` to the clipboard (the Clipboard API where the page is a secure context, e.g.
// http://127.0.0.1; else the older copy command) and say so on `button` for a moment.
async function copyText(text, button) {
  let ok = false;
  try {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      ok = true;
    }
  } catch {
    ok = false;
  }
  if (!ok) {
    const area = document.createElement("textarea");
    area.value = text;
    area.readOnly = true;
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.append(area);
    area.select();
    try {
      ok = document.execCommand("copy");
    } catch {
      ok = false;
    }
    area.remove();
  }
  button.textContent = ok ? "copied" : "copy failed";
  clearTimeout(button.resetTimer);
  button.resetTimer = setTimeout(() => {
    button.textContent = "copy";
  }, 1500);
}

async function ask(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question) {
    setAskStatus("Type a question first.", "error");
    return;
  }
  if (askController) askController.abort();
  archiveCurrent();
  const controller = new AbortController();
  askController = controller;
  current = { question, status: "" };
  const answer = $("answer");
  answer.textContent = "";
  answer.dataset.state = "streaming";
  $("copy-answer").hidden = true;
  $("ask-btn").disabled = true;
  $("stop-btn").disabled = false;
  clearError();

  const started = performance.now();
  let pieces = 0;
  setAskStatus("Waiting for the model…");
  const slow = setInterval(() => {
    if (!pieces) setAskStatus(`Still waiting for the model (${Math.round((performance.now() - started) / 1000)} s)…`);
  }, SLOW_NOTICE_MS);
  const body = {
    ...modelField(),
    messages: [{ role: "user", content: question }],
    max_tokens: setting("max-tokens"),
    stream: true,
    stream_options: { include_usage: true }, // the last event counts the tokens
    ...samplingFields(),
  };
  try {
    const result = await streamText("v1/chat/completions", body, controller.signal, (text) => {
      pieces += 1;
      // the answer's first token usually starts with the space after "Answer:"; drop it
      const shown = answer.textContent ? text : text.trimStart();
      if (shown) answer.append(shown); // a text node: model output is never parsed as HTML
      setAskStatus(`Answering… ${pieces} tokens`);
    });
    setServerState("ok");
    clearError();
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    const why = result.finishReason === "length" ? " (reached max tokens)" : "";
    // the server's own count; a text piece can hold several tokens (or none, held back)
    const tokens = result.usage ? result.usage.completion_tokens : pieces;
    setAskStatus(`Done: ${tokens} tokens in ${seconds} s${why}`);
    if (!pieces) setAskStatus("The model gave an empty answer.");
  } catch (err) {
    if (err.name === "AbortError") {
      if (askController === controller) setAskStatus(`Stopped after ${pieces} tokens.`);
    } else {
      report(err);
      setAskStatus("No answer: see the message above.", "error");
    }
  } finally {
    clearInterval(slow);
    if (askController === controller) {
      askController = null;
      answer.dataset.state = answer.textContent ? "done" : "empty";
      $("copy-answer").hidden = !answer.textContent;
      if (current) current.status = $("ask-status").textContent;
      $("ask-btn").disabled = false;
      $("stop-btn").disabled = true;
    }
  }
}

function stopAsking() {
  if (askController) askController.abort();
}

function questionKeydown(event) {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("ask-form").requestSubmit();
  }
}

// ----------------------------------------------------------------- Complete mode
// The textarea sits over a mirror div. While a suggestion shows, the textarea's own text turns
// transparent (its caret stays) and the mirror draws: text before the caret, the ghost, the
// rest. Any edit, click or caret move puts the plain textarea back.

const ghost = { text: "", at: 0, value: "", controller: null, timer: 0, request: 0 };

function setCompleteStatus(text, kind = "") {
  $("complete-status").textContent = text;
  $("complete-status").dataset.kind = kind;
}

function renderGhost() {
  const editor = $("editor");
  const mirror = $("mirror");
  const showing = ghost.text.length > 0;
  $("editor-wrap").classList.toggle("ghosting", showing);
  if (!showing) {
    mirror.replaceChildren();
    return;
  }
  const span = document.createElement("span");
  span.className = "ghost";
  span.id = "ghost";
  span.textContent = ghost.text;
  // the zero-width space keeps a trailing newline's empty line in the layout
  mirror.replaceChildren(ghost.value.slice(0, ghost.at), span, ghost.value.slice(ghost.at) + "\u200b");
  mirror.scrollTop = editor.scrollTop;
}

// "loading" while a suggestion streams in, "ready" once it is whole, "" otherwise.
function setSuggestState(kind) {
  $("editor-wrap").dataset.suggest = kind;
}

function cancelSuggestion() {
  clearTimeout(ghost.timer);
  setSuggestState("");
  ghost.request += 1; // any answer still arriving is now stale
  if (ghost.controller) ghost.controller.abort();
  ghost.controller = null;
}

function discardGhost() {
  cancelSuggestion();
  if (ghost.text) {
    ghost.text = "";
    renderGhost();
    setCompleteStatus("Pause typing for a suggestion · Tab accepts it · → accepts a word · Esc dismisses");
  }
}

function scheduleSuggestion() {
  discardGhost();
  ghost.timer = setTimeout(suggest, SUGGEST_DELAY_MS);
}

// The prompt for a suggestion: the text before the caret, its tail only when it is long.
// Trailing spaces go (GPT-2's BPE writes a space with the word after it); the ghost then
// starts without the space the user already typed.
function suggestionPrompt(editor) {
  let before = editor.value.slice(0, editor.selectionStart);
  if (state.contextLength) {
    const budget = (state.contextLength - setting("suggest-tokens")) * CHARS_PER_TOKEN;
    if (budget > 0 && before.length > budget) before = before.slice(before.length - budget);
  }
  const trimmed = before.replace(/[ \t]+$/, "");
  return { prompt: trimmed, dropped: before.slice(trimmed.length) };
}

async function suggest() {
  const editor = $("editor");
  if (editor.selectionStart !== editor.selectionEnd || document.activeElement !== editor) return;
  const { prompt, dropped } = suggestionPrompt(editor);
  if (!prompt.trim()) return;
  cancelSuggestion();
  const request = ghost.request;
  const controller = new AbortController();
  ghost.controller = controller;
  ghost.at = editor.selectionStart;
  ghost.value = editor.value;
  ghost.text = "";
  let raw = "";
  setSuggestState("loading");
  setCompleteStatus("Thinking…");
  const body = {
    ...modelField(),
    prompt,
    max_tokens: setting("suggest-tokens"),
    stream: true,
    ...samplingFields(),
  };
  try {
    await streamText("v1/completions", body, controller.signal, (text) => {
      if (request !== ghost.request) return;
      raw += text;
      // what the user already typed after the prompt is not suggested again
      let shown = raw;
      if (dropped && shown.startsWith(dropped)) shown = shown.slice(dropped.length);
      else if (dropped) shown = shown.replace(/^[ \t]+/, "");
      ghost.text = shown;
      renderGhost();
      if (ghost.text) setCompleteStatus("Tab accepts · → accepts a word · Esc or typing dismisses");
    });
    if (request === ghost.request) {
      setServerState("ok");
      clearError(); // an earlier failure is over
      setSuggestState(ghost.text ? "ready" : "");
      if (!ghost.text) setCompleteStatus("No suggestion this time; keep typing.");
    }
  } catch (err) {
    if (err.name === "AbortError" || request !== ghost.request) return;
    setSuggestState("");
    report(err);
    setCompleteStatus("No suggestion: see the message above.", "error");
  } finally {
    if (ghost.controller === controller) ghost.controller = null;
  }
}

// Insert accepted text at the caret, keeping the browser's undo history where it can.
function insertAtCaret(editor, text) {
  editor.focus();
  if (!document.execCommand || !document.execCommand("insertText", false, text)) {
    editor.setRangeText(text, editor.selectionStart, editor.selectionEnd, "end");
  }
}

let accepting = false;

function accept(part) {
  const editor = $("editor");
  const rest = ghost.text.slice(part.length);
  cancelSuggestion(); // a suggestion accepted mid-stream stops there
  accepting = true;
  ghost.text = "";
  renderGhost();
  insertAtCaret(editor, part);
  accepting = false;
  if (rest) {
    ghost.text = rest;
    ghost.at = editor.selectionStart;
    ghost.value = editor.value;
    renderGhost();
    setSuggestState("ready");
  } else {
    scheduleSuggestion(); // all of it taken: offer what comes next
    setCompleteStatus("Accepted.");
  }
}

function editorKeydown(event) {
  if (!ghost.text) return;
  const editor = $("editor");
  const plain = !event.shiftKey && !event.ctrlKey && !event.altKey && !event.metaKey;
  const atGhost = editor.selectionStart === ghost.at && editor.selectionEnd === ghost.at;
  if (event.key === "Tab" && plain && atGhost) {
    event.preventDefault();
    accept(ghost.text);
  } else if (event.key === "ArrowRight" && plain && atGhost) {
    event.preventDefault();
    const word = ghost.text.match(/^\s*\S+/); // the next word with the space before it
    accept(word ? word[0] : ghost.text);
  } else if (event.key === "Escape") {
    event.preventDefault();
    discardGhost();
  } else if (!["Shift", "Control", "Alt", "Meta", "CapsLock"].includes(event.key)) {
    discardGhost(); // typing on (or moving the caret) throws the suggestion away
  }
}

function initEditor() {
  const editor = $("editor");
  editor.addEventListener("keydown", editorKeydown);
  editor.addEventListener("input", () => {
    if (!accepting) scheduleSuggestion();
  });
  editor.addEventListener("scroll", () => {
    $("mirror").scrollTop = editor.scrollTop;
  });
  for (const name of ["mousedown", "blur", "compositionstart"]) {
    editor.addEventListener(name, discardGhost);
  }
}

// ----------------------------------------------------------------- tabs and start-up

function showMode(mode) {
  for (const name of ["ask", "complete"]) {
    const on = name === mode;
    $(`tab-${name}`).setAttribute("aria-selected", String(on));
    $(`panel-${name}`).hidden = !on;
  }
  if (mode !== "complete") discardGhost();
  clearError(); // a message about the other tab's request is no longer about this one
  $(mode === "ask" ? "question" : "editor").focus();
  if (location.hash !== `#${mode}`) history.replaceState(null, "", `#${mode}`);
}

function init() {
  $("tab-ask").addEventListener("click", () => showMode("ask"));
  $("tab-complete").addEventListener("click", () => showMode("complete"));
  $("ask-form").addEventListener("submit", ask);
  $("stop-btn").addEventListener("click", stopAsking);
  $("copy-answer").addEventListener("click", () => copyText($("answer").textContent, $("copy-answer")));
  $("question").addEventListener("keydown", questionKeydown);
  $("key-bar").addEventListener("submit", useKey);
  $("error-close").addEventListener("click", clearError);
  $("retry-btn").addEventListener("click", loadModel);
  if (state.apiKey) $("api-key").value = state.apiKey;
  initSettings();
  loadAskDefaults();
  initEditor();
  showMode(location.hash === "#complete" ? "complete" : "ask");
  loadModel();
}

document.addEventListener("DOMContentLoaded", init);
