// sol playground: a chat page over the server's own OpenAI-compatible API (same origin,
// works offline). Answers stream over server-sent events and render as markdown
// (marked, vendored) sanitised by DOMPurify (vendored) before they touch the DOM.
// The conversation and settings live in localStorage (the API key only in
// sessionStorage); history that no longer fits the model's context is left out of the
// request (counted with /tokenize) and says so; each turn shows its usage and cost,
// stopped turns too (the server bills what was generated: /v1/requests/{id}/usage).
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "sol-playground";
const SETTINGS = ["temperature", "top-p", "max-tokens", "system", "response-format", "json-schema", "tools"];
const state = { messages: [], controller: null, models: [], busy: false };

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

const key = () => $("api-key").value.trim();
const headers = () => ({ "Content-Type": "application/json", "Authorization": `Bearer ${key()}` });

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : JSON.stringify(body);
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

// --- persistence --------------------------------------------------------------------------------
function save() {
  const settings = Object.fromEntries(SETTINGS.map((id) => [id, $(id).value]));
  settings.model = $("model").value;
  const messages = state.messages.map(({ streaming, ...m }) => m);
  localStorage.setItem(STORE, JSON.stringify({ messages, settings }));
}

function restore() {
  let saved;
  try {
    saved = JSON.parse(localStorage.getItem(STORE) || "null");
  } catch {
    saved = null;
  }
  if (!saved) return null;
  for (const [id, value] of Object.entries(saved.settings || {})) {
    if (id !== "model" && $(id)) $(id).value = value;
  }
  $("temperature-value").textContent = $("temperature").value;
  $("top-p-value").textContent = $("top-p").value;
  $("schema-label").hidden = $("response-format").value !== "json_schema";
  state.messages = Array.isArray(saved.messages) ? saved.messages : [];
  return saved.settings ? saved.settings.model : null;
}

// --- models ---------------------------------------------------------------------------------------
// The default: the newest chat version (not a base or reward model), by an alias that
// follows new versions when one points at it.
function defaultModel(data) {
  const versions = data.filter((m) => m.id === m.root && m.sol && !["base", "rm", "pretrain"].includes(m.sol.stage));
  versions.sort((a, b) => (b.created - a.created) || (b.sol.version - a.sol.version));
  const best = versions[0];
  if (!best) return data.find((m) => m.id.includes(":")) || data[0];
  const refs = data.filter((m) => m.root === best.id);
  return refs.find((m) => m.id === `${best.sol.name}:latest`) || refs.find((m) => m.id.includes(":")) || best;
}

async function loadModels(wanted) {
  if (!key()) return;
  setStatus("loading models...");
  let response;
  try {
    response = await fetch("/v1/models", { headers: headers() });
  } catch (err) {
    setStatus(`cannot reach the server: ${err}`, true);
    return;
  }
  if (!response.ok) {
    setStatus(await errorText(response), true);
    return;
  }
  const { data } = await response.json();
  state.models = data;
  const select = $("model");
  const previous = wanted || select.value;
  select.replaceChildren(...data.map((m) => {
    const option = document.createElement("option");
    option.value = m.id;
    const stage = m.sol && m.sol.stage ? ` (${m.sol.stage})` : "";
    option.textContent = (m.id === m.root ? m.id : `${m.id} → ${m.root}`) + stage;
    return option;
  }));
  const chosen = data.find((m) => m.id === previous) || defaultModel(data);
  if (chosen) select.value = chosen.id;
  select.disabled = data.length === 0;
  $("send").disabled = data.length === 0;
  sessionStorage.setItem("sol-api-key", key());
  setStatus(data.length ? `${data.length} model references` : "no model is served yet", data.length === 0);
}

const modelCard = () => state.models.find((m) => m.id === $("model").value);

// --- rendering ------------------------------------------------------------------------------------
function markdown(text) {
  const html = window.marked ? window.marked.parse(text, { gfm: true, breaks: true }) : null;
  if (html === null || !window.DOMPurify) {
    const pre = document.createElement("div");
    pre.textContent = text;
    return pre.innerHTML;
  }
  return window.DOMPurify.sanitize(html, { USE_PROFILES: { html: true } });
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const area = document.createElement("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  setStatus("copied");
}

function button(label, cls, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = `ghost ${cls}`;
  b.textContent = label;
  b.addEventListener("click", onClick);
  return b;
}

function fillText(node, m) {
  if (m.role === "assistant" && !m.error) {
    node.innerHTML = markdown(m.content);
    for (const pre of node.querySelectorAll("pre")) {
      pre.append(button("copy", "copy-code", () => copyText(pre.querySelector("code")?.textContent || pre.textContent)));
    }
  } else {
    node.textContent = m.content;
  }
}

function usageLine(m) {
  if (!m.usage) return m.finish ? `finish ${m.finish}` : "";
  const u = m.usage;
  const parts = [`prompt ${u.prompt} (cached ${u.cached})`, `completion ${u.completion}`];
  if (m.cost !== undefined) parts.push(`cost ${m.cost.toFixed(6)}`);
  if (m.version !== undefined) parts.push(`version ${m.version}`);
  if (m.finish) parts.push(`finish ${m.finish}`);
  return parts.join(" · ");
}

function renderTurn(m, index) {
  const turn = document.createElement("div");
  turn.className = `turn ${m.role}` + (m.error ? " error" : "") + (m.streaming ? " streaming" : "")
    + (m.trimmed ? " trimmed" : "");
  turn.dataset.index = index;
  const text = document.createElement("div");
  text.className = "text";
  fillText(text, m);
  turn.append(text);
  const usage = usageLine(m);
  if (usage) {
    const line = document.createElement("span");
    line.className = "usage";
    line.textContent = usage;
    turn.append(line);
  }
  if (!m.streaming) {
    const actions = document.createElement("div");
    actions.className = "actions";
    actions.append(button("Copy", "copy", () => copyText(m.content)));
    if (m.role === "user") actions.append(button("Edit", "edit", () => startEdit(turn, index)));
    const last = index === state.messages.length - 1;
    if (m.role === "assistant" && last) actions.append(button("Regenerate", "regenerate", regenerate));
    turn.append(actions);
  }
  return turn;
}

function render() {
  $("transcript").replaceChildren(...state.messages.map(renderTurn));
  const t = { prompt: 0, cached: 0, completion: 0, cost: 0, turns: 0 };
  for (const m of state.messages) {
    if (!m.usage) continue;
    t.turns += 1;
    t.prompt += m.usage.prompt; t.cached += m.usage.cached; t.completion += m.usage.completion;
    t.cost += m.cost || 0;
  }
  $("totals").textContent = t.turns ? `this conversation: ${t.turns} turns, prompt ${t.prompt} (cached ${t.cached}), `
    + `completion ${t.completion}, cost ${t.cost.toFixed(6)}` : "";
  const last = $("transcript").lastElementChild;
  if (last) last.scrollIntoView({ block: "end" });
}

function updateStreaming(index) {
  const turn = $("transcript").querySelector(`.turn[data-index="${index}"] .text`);
  if (turn) fillText(turn, state.messages[index]);
  turn?.parentElement.scrollIntoView({ block: "end" });
}

// --- editing --------------------------------------------------------------------------------------
function startEdit(turn, index) {
  if (state.busy) return;
  const box = document.createElement("textarea");
  box.className = "edit-box";
  box.value = state.messages[index].content;
  box.rows = 3;
  const actions = document.createElement("div");
  actions.className = "actions";
  actions.append(button("Save & send", "save-edit", () => {
    const text = box.value.trim();
    if (!text) return;
    state.messages = state.messages.slice(0, index);
    state.messages.push({ role: "user", content: text });
    render();
    generate();
  }), button("Cancel", "cancel-edit", render));
  turn.replaceChildren(box, actions);
  box.focus();
}

function regenerate() {
  if (state.busy) return;
  while (state.messages.length && state.messages[state.messages.length - 1].role === "assistant") state.messages.pop();
  render();
  generate();
}

// --- requests -------------------------------------------------------------------------------------
// Yields each `data:` payload of a server-sent event stream.
async function* events(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (data) yield data;
    }
  }
}

function extras() {
  const out = {};
  const format = $("response-format").value;
  if (format === "json_object") out.response_format = { type: "json_object" };
  if (format === "json_schema") {
    out.response_format = { type: "json_schema", json_schema: { name: "answer", schema: JSON.parse($("json-schema").value || "{}") } };
  }
  const tools = $("tools").value.trim();
  if (tools) out.tools = JSON.parse(tools);
  return out;
}

async function countTokens(messages) {
  const response = await fetch("/tokenize", {
    method: "POST", headers: headers(), body: JSON.stringify({ model: $("model").value, messages }),
  });
  if (!response.ok) throw new Error(await errorText(response));
  return response.json();
}

// The conversation that fits: the system prompt, then the newest turns whose prompt plus
// max_tokens fits the model's context; older turns are dropped (and marked) whole.
async function fitHistory(maxTokens) {
  const system = $("system").value.trim();
  const head = system ? [{ role: "system", content: system }] : [];
  const turns = state.messages.map((m, i) => ({ m, i })).filter(({ m }) => !m.error && !m.streaming && m.content);
  let start = 0;
  for (;;) {
    const messages = [...head, ...turns.slice(start).map(({ m }) => ({ role: m.role, content: m.content }))];
    const counted = await countTokens(messages);
    if (counted.count + maxTokens <= counted.max_model_len || start >= turns.length - 1) {
      const dropped = new Set(turns.slice(0, start).map(({ i }) => i));
      state.messages.forEach((m, i) => { m.trimmed = dropped.has(i); });
      const note = $("trim-note");
      note.hidden = start === 0;
      note.textContent = start ? `${start} earlier message${start > 1 ? "s" : ""} left out: the conversation `
        + `(${counted.count} tokens) + max_tokens ${maxTokens} must fit the model's context of `
        + `${counted.max_model_len} tokens` : "";
      return messages;
    }
    start += 1;
    // Keep a user turn first after the system prompt.
    while (start < turns.length - 1 && turns[start].m.role !== "user") start += 1;
  }
}

async function usageOf(requestId) {
  for (let attempt = 0; attempt < 40; attempt += 1) {
    const response = await fetch(`/v1/requests/${encodeURIComponent(requestId)}/usage`, { headers: headers() });
    if (response.ok) return response.json();
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
  return null;
}

function absorbUsage(m, usage, sol) {
  const cached = usage.prompt_tokens_details ? usage.prompt_tokens_details.cached_tokens : 0;
  m.usage = { prompt: usage.prompt_tokens, cached, completion: usage.completion_tokens };
  if (sol) { m.cost = sol.cost; m.version = sol.version; }
}

async function generate() {
  const maxTokens = Number($("max-tokens").value);
  const reply = { role: "assistant", content: "", streaming: true, model: $("model").value };
  state.busy = true;
  state.controller = new AbortController();
  $("send").disabled = true;
  $("stop").hidden = false;
  let requestId = null;
  let stopped = false;
  try {
    setStatus("counting tokens...");
    const messages = await fitHistory(maxTokens);
    state.messages.push(reply);
    const index = state.messages.length - 1;
    render();
    const request = {
      model: $("model").value, messages, stream: true, stream_options: { include_usage: true },
      temperature: Number($("temperature").value), top_p: Number($("top-p").value), max_tokens: maxTokens, ...extras(),
    };
    setStatus("generating...");
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(request), signal: state.controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    requestId = response.headers.get("x-request-id");
    let pending = false;
    for await (const data of events(response.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices) {
        if (choice.delta && choice.delta.content) reply.content += choice.delta.content;
        // A tool call shows as its name, then its arguments as they arrive.
        for (const call of (choice.delta && choice.delta.tool_calls) || []) {
          const fn = call.function || {};
          if (fn.name) reply.content += `${reply.content ? "\n" : ""}tool call: ${fn.name}(`;
          if (fn.arguments) reply.content += `${fn.arguments})`;
        }
        if (choice.finish_reason) reply.finish = choice.finish_reason;
      }
      if (chunk.usage) absorbUsage(reply, chunk.usage, chunk.sol);
      if (!pending) {
        pending = true;
        requestAnimationFrame(() => { pending = false; updateStreaming(index); });
      }
    }
    setStatus("ready");
  } catch (err) {
    if (err.name === "AbortError") {
      stopped = true;
      reply.finish = "stopped";
    } else {
      if (!state.messages.includes(reply)) state.messages.push(reply);
      reply.error = true;
      reply.content += (reply.content ? "\n" : "") + err.message;
      setStatus("request failed", true);
    }
  } finally {
    reply.streaming = false;
    state.controller = null;
    $("stop").hidden = true;
    render();
  }
  if (stopped && requestId) {
    setStatus("stopped: fetching what the server billed...");
    const billed = await usageOf(requestId);
    if (billed) absorbUsage(reply, billed.usage, billed.sol);
    setStatus(billed ? "stopped; usage is what the server generated and billed" : "stopped (usage not known yet)");
  }
  state.busy = false;
  $("send").disabled = !$("model").value;
  render();
  save();
}

// --- wiring ---------------------------------------------------------------------------------------
$("api-key").addEventListener("change", () => loadModels());
$("temperature").addEventListener("input", (e) => { $("temperature-value").textContent = e.target.value; });
$("top-p").addEventListener("input", (e) => { $("top-p-value").textContent = e.target.value; });
$("response-format").addEventListener("change", (e) => { $("schema-label").hidden = e.target.value !== "json_schema"; });
for (const id of [...SETTINGS, "model"]) $(id).addEventListener("change", save);
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("settings-toggle").addEventListener("click", () => {
  const open = $("settings").classList.toggle("open");
  $("settings-toggle").setAttribute("aria-expanded", String(open));
});
$("clear").addEventListener("click", () => {
  if (state.busy) return;
  state.messages = [];
  $("trim-note").hidden = true;
  render();
  save();
});
$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("message").value.trim();
  if (!text || state.busy || !$("model").value) return;
  try {
    extras();
  } catch (err) {
    setStatus(`response format or tools is not valid JSON: ${err.message}`, true);
    return;
  }
  $("message").value = "";
  state.messages.push({ role: "user", content: text });
  render();
  generate();
});
$("message").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});

const savedModel = restore();
render();
const savedKey = sessionStorage.getItem("sol-api-key");
if (savedKey) {
  $("api-key").value = savedKey;
  loadModels(savedModel);
}
