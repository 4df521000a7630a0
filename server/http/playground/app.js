// sol playground: a chat page over the server's own OpenAI-compatible API (same origin,
// no library, works offline). Streams with fetch + ReadableStream over server-sent events
// and shows each turn's usage (prompt, cached, completion tokens) and cost.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { history: [], controller: null, totals: { prompt: 0, cached: 0, completion: 0, cost: 0 } };

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function key() {
  return $("api-key").value.trim();
}

function headers() {
  return { "Content-Type": "application/json", "Authorization": `Bearer ${key()}` };
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : JSON.stringify(body);
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadModels() {
  const select = $("model");
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
  const previous = select.value;
  select.replaceChildren(...data.map((m) => {
    const option = document.createElement("option");
    option.value = m.id;
    option.textContent = m.id === m.root ? m.id : `${m.id} → ${m.root}`;
    return option;
  }));
  // Prefer an alias (it follows new versions) over a pinned version.
  const preferred = data.find((m) => m.id === previous) || data.find((m) => m.id.includes(":")) || data[0];
  if (preferred) select.value = preferred.id;
  select.disabled = data.length === 0;
  $("send").disabled = data.length === 0;
  sessionStorage.setItem("sol-api-key", key());
  setStatus(data.length ? `${data.length} model references` : "no model is served yet", data.length === 0);
}

function addTurn(role, text) {
  const turn = document.createElement("div");
  turn.className = `turn ${role}`;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  turn.append(body);
  $("transcript").append(turn);
  turn.scrollIntoView({ block: "end" });
  return turn;
}

function showUsage(turn, usage, sol, finish) {
  const line = document.createElement("span");
  line.className = "usage";
  const cached = usage.prompt_tokens_details ? usage.prompt_tokens_details.cached_tokens : 0;
  const parts = [`prompt ${usage.prompt_tokens} (cached ${cached})`, `completion ${usage.completion_tokens}`];
  if (sol) parts.push(`cost ${sol.cost.toFixed(6)}`, `version ${sol.version}`);
  if (finish) parts.push(`finish ${finish}`);
  line.textContent = parts.join(" · ");
  turn.append(line);
  const t = state.totals;
  t.prompt += usage.prompt_tokens; t.cached += cached; t.completion += usage.completion_tokens;
  t.cost += sol ? sol.cost : 0;
  $("totals").textContent = `this conversation: prompt ${t.prompt} (cached ${t.cached}), completion ${t.completion}, `
    + `cost ${t.cost.toFixed(6)}`;
}

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

async function send(text) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.history, { role: "user", content: text });
  addTurn("user", text);
  const turn = addTurn("assistant streaming", "");
  const out = turn.querySelector(".text");
  const request = {
    model: $("model").value, messages, stream: true, stream_options: { include_usage: true },
    temperature: Number($("temperature").value), top_p: Number($("top-p").value),
    max_tokens: Number($("max-tokens").value),
  };
  state.controller = new AbortController();
  $("send").disabled = true;
  $("stop").hidden = false;
  setStatus("generating...");
  let finish = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(request), signal: state.controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const data of events(response.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices) {
        if (choice.delta && choice.delta.content) out.textContent += choice.delta.content;
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      if (chunk.usage) showUsage(turn, chunk.usage, chunk.sol, finish);
      turn.scrollIntoView({ block: "end" });
    }
    state.history.push({ role: "user", content: text }, { role: "assistant", content: out.textContent });
    setStatus("ready");
  } catch (err) {
    if (err.name === "AbortError") {
      setStatus("stopped: the server aborted the request and billed what was generated");
      state.history.push({ role: "user", content: text }, { role: "assistant", content: out.textContent });
    } else {
      turn.classList.add("error");
      out.textContent += (out.textContent ? "\n" : "") + err.message;
      setStatus("request failed", true);
    }
  } finally {
    turn.classList.remove("streaming");
    state.controller = null;
    $("send").disabled = false;
    $("stop").hidden = true;
  }
}

$("api-key").addEventListener("change", loadModels);
$("temperature").addEventListener("input", (e) => { $("temperature-value").textContent = e.target.value; });
$("top-p").addEventListener("input", (e) => { $("top-p-value").textContent = e.target.value; });
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("clear").addEventListener("click", () => {
  state.history = [];
  state.totals = { prompt: 0, cached: 0, completion: 0, cost: 0 };
  $("transcript").replaceChildren();
  $("totals").textContent = "";
});
$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("message").value.trim();
  if (!text || state.controller || !$("model").value) return;
  $("message").value = "";
  send(text);
});
$("message").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});

const saved = sessionStorage.getItem("sol-api-key");
if (saved) {
  $("api-key").value = saved;
  loadModels();
}
