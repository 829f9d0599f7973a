// The Switchboard dashboard: plain ES modules, no build step. The API key lives in
// sessionStorage only (gone with the tab) and never goes into a URL: browser streams use a
// short-lived stream token for one call instead.
const KEY = "switchboard.key";
const app = document.getElementById("app");
let cleanup = [];

const key = () => sessionStorage.getItem(KEY);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v); else node.setAttribute(k, v);
  }
  node.append(...children);
  return node;
};

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { "Authorization": `Bearer ${key()}`, "Content-Type": "application/json", ...(options.headers || {}) },
  });
  const body = response.status === 204 ? null : await response.json();
  if (!response.ok) throw new Error(`${body.error_code}: ${body.message}`);
  return body;
}

function setState(node, state, text) {
  node.className = `state ${state}`;
  node.textContent = text || state;
  node.dataset.state = state;
}

// --- sign in ------------------------------------------------------------------------------------

function signIn(message = "") {
  const input = el("input", { type: "password", id: "api-key", placeholder: "pk_live_…", size: "50" });
  const form = el("form", { onsubmit: async (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, input.value.trim());
    try { await api("/v1/workspace"); route(); }
    catch (error) { sessionStorage.removeItem(KEY); signIn(error.message); }
  } }, input, " ", el("button", { id: "sign-in" }, "Sign in"));
  app.replaceChildren(el("section", {}, el("h2", {}, "Sign in with an API key"), form,
    el("p", { class: "error" }, message)));
}

// --- lists --------------------------------------------------------------------------------------

async function home() {
  const calls = el("ul", { id: "calls" }), conversations = el("ul", { id: "conversations" });
  app.replaceChildren(el("div", { class: "cols" },
    el("section", {}, el("h2", {}, "Calls"), calls),
    el("section", {}, el("h2", {}, "Conversations"), conversations)));
  const refresh = async () => {
    const [c, v] = await Promise.all([api("/v1/calls?page_size=20"), api("/v1/conversations?page_size=20")]);
    calls.replaceChildren(...c.calls.map((call) => el("li", {},
      el("a", { href: `#/calls/${call.id}` }, `${call.direction} ${call.from_number} → ${call.to_number}`),
      ` ${call.transport} · ${call.status}`)));
    conversations.replaceChildren(...v.conversations.map((conv) => el("li", {},
      el("a", { href: `#/conversations/${conv.id}` }, `${conv.channel} ${conv.customer_number}`),
      ` · ${conv.ai_mode}`)));
  };
  await refresh();
  const timer = setInterval(() => refresh().catch(() => {}), 2000);  // live enough for a list
  cleanup.push(() => clearInterval(timer));
}

// --- a call -------------------------------------------------------------------------------------

async function callView(callId) {
  const state = el("span", { id: "transcript-state" }), socketState = el("span", { id: "socket-state" });
  const transcript = el("div", { id: "transcript" }), timeline = el("ul", { id: "timeline", class: "timeline" });
  const results = el("ul", { id: "dtmf-results" });
  let socket = null;
  const keypad = el("div", { class: "keypad" }, ..."123456789*0#".split("").map((digit) =>
    el("button", { "data-digit": digit, onclick: () => {
      const requestId = `r${Date.now()}${digit}`;
      results.prepend(el("li", { id: `result-${requestId}` }, `${digit}: sent…`));
      socket?.send(JSON.stringify({ action: "send_dtmf", digits: digit, request_id: requestId }));
    } }, digit)));
  app.replaceChildren(el("h2", {}, `Call ${callId}`), el("div", { class: "cols" },
    el("section", {}, el("h3", {}, "Transcript ", state), transcript),
    el("section", {}, el("h3", {}, "Events ", socketState), keypad, results, timeline)));

  const token = async () => (await api("/v1/stream-tokens", {
    method: "POST", body: JSON.stringify({ call_id: callId, ttl_seconds: 600 }) })).token;

  // Transcript: EventSource reconnects by itself; `end` and 204 stop it for good.
  let source = null, ended = false;
  const openTranscript = async () => {
    setState(state, "connecting");
    source = new EventSource(`/v1/calls/${callId}/transcript/stream?token=${encodeURIComponent(await token())}`);
    source.onopen = () => setState(state, "live");
    source.onmessage = (event) => {
      const turn = JSON.parse(event.data);
      let line = document.getElementById(`turn-${turn.turn_id}`);
      if (!line) { line = el("div", { id: `turn-${turn.turn_id}` }); transcript.append(line); }
      line.className = `turn ${turn.is_final ? "final" : "partial"}`;
      line.replaceChildren(el("span", { class: "role" }, turn.role), turn.text);
    };
    source.addEventListener("end", () => { ended = true; source.close(); setState(state, "ended"); });
    source.addEventListener("error", (event) => {
      if (event.data) {  // a terminal error frame from the server
        const error = JSON.parse(event.data);
        if (error.error_code !== "UNAVAILABLE") { source.close(); setState(state, "error", error.message); return; }
      }
      if (ended) return;
      if (source.readyState === EventSource.CLOSED) {
        // Closed for good: a 204 (ended) or a refused token. Ask the API which.
        api(`/v1/calls/${callId}`).then((call) => {
          if (call.status !== "in_progress") { ended = true; setState(state, "ended"); }
          else { setState(state, "reconnecting"); setTimeout(openTranscript, 1000); }
        }).catch((error) => setState(state, "error", error.message));
      } else {
        setState(state, "reconnecting");
      }
    });
  };
  await openTranscript();

  // Events and DTMF: one WebSocket; reconnect on drain (1012) and faults, not after 1000.
  const openSocket = async (attempt = 0) => {
    setState(socketState, attempt ? "reconnecting" : "connecting");
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    socket = new WebSocket(`${scheme}://${location.host}/v1/calls/${callId}/stream?token=${encodeURIComponent(await token())}`);
    socket.onopen = () => setState(socketState, "live");
    socket.onmessage = (message) => {
      const event = JSON.parse(message.data);
      if (event.event_type === "command.result") {
        const row = document.getElementById(`result-${event.request_id}`);
        if (row) { row.textContent = `${row.textContent.split(":")[0]}: ${event.ok ? "ok" : `${event.error_code} ${event.message}`}`;
                   row.className = event.ok ? "ok" : "error"; }
        return;
      }
      timeline.prepend(el("li", { class: event.event_type.replace(".", "-") },
        `${event.timestamp.slice(11, 19)} ${event.event_type} ${JSON.stringify(event.payload)}`));
    };
    socket.onclose = (close) => {
      if (close.code === 1000) setState(socketState, "ended");
      else if (close.code === 1008) setState(socketState, "error", close.reason || "unauthorised");
      else if (!cleanupDone) setTimeout(() => openSocket(attempt + 1), Math.min(30000, 500 * 2 ** attempt) * Math.random());
    };
  };
  let cleanupDone = false;
  await openSocket();
  cleanup.push(() => { cleanupDone = true; source?.close(); socket?.close(); });
}

// --- a conversation -----------------------------------------------------------------------------

// EventSource cannot send headers, and this stream takes the Authorization header only: read it
// with fetch and parse the frames by hand.
async function readSse(path, onEvent, signal, onState) {
  let attempt = 0;
  while (!signal.aborted) {
    try {
      onState(attempt ? "reconnecting" : "connecting");
      const response = await fetch(path, { headers: { Authorization: `Bearer ${key()}` }, signal });
      if (!response.ok) { const body = await response.json(); onState("error", body.message); return; }
      onState("live");
      attempt = 0;
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const frame = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
          const fields = {};
          for (const line of frame.split("\n")) {
            if (line.startsWith(":")) continue;  // heartbeat
            const at = line.indexOf(":");
            fields[line.slice(0, at)] = line.slice(at + 1).trimStart();
          }
          if (fields.event === "error") { const e = JSON.parse(fields.data); if (e.error_code !== "UNAVAILABLE") { onState("error", e.message); return; } }
          else if (fields.data) onEvent(JSON.parse(fields.data));
        }
      }
    } catch (error) { if (signal.aborted) return; }
    attempt += 1;
    await new Promise((resolve) => setTimeout(resolve, Math.min(30000, 500 * 2 ** attempt) * Math.random()));
  }
}

async function conversationView(conversationId) {
  const conversation = await api(`/v1/conversations/${conversationId}`);
  const state = el("span", { id: "conversation-state" });
  const mode = el("strong", { id: "mode" }, conversation.ai_mode);
  const messages = el("ul", { id: "messages" });
  const show = (m) => {
    let row = document.getElementById(`msg-${m.id}`);
    if (!row) { row = el("li", { id: `msg-${m.id}` }); messages.append(row); }
    row.textContent = `${m.direction === "inbound" ? "←" : "→"} ${m.text} (${m.status})`;
  };
  conversation.messages.forEach(show);
  const handoff = (to) => el("button", { id: `mode-${to}`, onclick: () =>
    api(`/v1/conversations/${conversationId}`, { method: "PATCH", body: JSON.stringify({ ai_mode: to }) })
      .catch((error) => setState(state, "error", error.message)) }, to);
  app.replaceChildren(el("h2", {}, `${conversation.channel} ${conversation.customer_number}`),
    el("section", {}, el("p", {}, "Mode: ", mode, " ", handoff("ai"), handoff("human"), handoff("closed"), " ", state), messages));
  const controller = new AbortController();
  cleanup.push(() => controller.abort());
  readSse(`/v1/conversations/${conversationId}/stream`, (event) => {
    if (event.event_type === "conversation.mode_changed") mode.textContent = event.payload.to_mode;
    else if (event.event_type.startsWith("message.")) show({ id: event.payload.message_id, ...event.payload });
  }, controller.signal, (s, text) => setState(state, s, text));
}

// --- routing ------------------------------------------------------------------------------------

async function route() {
  cleanup.forEach((fn) => fn()); cleanup = [];
  const signOut = document.getElementById("sign-out");
  if (!key()) { signOut.hidden = true; signIn(); return; }
  signOut.hidden = false;
  api("/v1/workspace").then((w) => { document.getElementById("workspace").textContent = w.name; })
    .catch(() => {});
  const [, kind, id] = location.hash.match(/^#\/(calls|conversations)\/(\w+)/) || [];
  try {
    if (kind === "calls") await callView(id);
    else if (kind === "conversations") await conversationView(id);
    else await home();
  } catch (error) { app.replaceChildren(el("p", { class: "error" }, error.message)); }
}

document.getElementById("sign-out").addEventListener("click", () => { sessionStorage.removeItem(KEY); route(); });
window.addEventListener("hashchange", route);
route();
