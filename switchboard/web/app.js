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

// A `reset`: the server did not know (or no longer kept) the cursor we resumed from.
const missing = (reason) => `The server could not resume (${reason}): something may be missing above.`;

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

// --- listening ----------------------------------------------------------------------------------

// The call's live audio arrives on its socket as binary frames: 20 ms of 16 kHz mono signed
// 16-bit little-endian PCM each (SPEC 5.3). Each frame becomes an AudioBuffer scheduled on the
// AudioContext's clock about 100 ms ahead of now (a jitter buffer: frames that arrive unevenly
// still play back to back); when the queue runs dry it fills up again from 100 ms ahead, and a
// frame that would play more than half a second late is dropped, so the listener stays near
// the present. No worklet, no blob: the page's `default-src 'self'` allows all of this.
const AUDIO_RATE = 16000, AHEAD = 0.1, MOST_AHEAD = 0.5;

function audioPlayer(meter) {
  let context = null, analyser = null, gain = null, samples = null, playAt = 0, timer = null;
  let scheduled = 0, dropped = 0, muted = false;
  const show = () => { meter.dataset.chunks = String(scheduled); meter.dataset.dropped = String(dropped); };
  // The level is measured before the mute, so a muted listener still sees the call talking.
  const measure = () => {
    analyser.getFloatTimeDomainData(samples);
    let sum = 0;
    for (const x of samples) sum += x * x;
    const rms = Math.sqrt(sum / samples.length);
    meter.value = Math.min(1, rms * 4);
    meter.dataset.rms = rms.toFixed(4);
  };
  return {
    start() {
      try { context = new AudioContext({ sampleRate: AUDIO_RATE, latencyHint: "interactive" }); }
      catch { context = new AudioContext({ latencyHint: "interactive" }); }  // buffers say 16 kHz anyway
      analyser = context.createAnalyser();
      analyser.fftSize = 2048;
      samples = new Float32Array(analyser.fftSize);
      gain = context.createGain();
      gain.gain.value = muted ? 0 : 1;
      analyser.connect(gain).connect(context.destination);
      playAt = 0; scheduled = 0; dropped = 0; show();
      timer = setInterval(measure, 100);
      context.resume();  // started from a click or a key: the browser lets it play
    },
    play(data) {
      if (!context) return;
      const view = new DataView(data), count = data.byteLength >> 1;
      if (!count) return;
      const buffer = context.createBuffer(1, count, AUDIO_RATE), channel = buffer.getChannelData(0);
      for (let i = 0; i < count; i++) channel[i] = view.getInt16(2 * i, true) / 32768;
      const now = context.currentTime;
      if (playAt < now) playAt = now + AHEAD;  // the first frame, or the queue ran dry
      else if (playAt > now + MOST_AHEAD) { dropped++; show(); return; }
      const source = context.createBufferSource();
      source.buffer = buffer;
      source.connect(analyser);
      source.start(playAt);
      playAt += buffer.duration;
      scheduled++; show();
    },
    mute(on) {
      muted = on;
      if (gain) gain.gain.value = on ? 0 : 1;
    },
    stop() {
      clearInterval(timer); timer = null;
      context?.close().catch(() => {});
      context = analyser = gain = null;
      meter.value = 0; meter.dataset.rms = "0";
    },
  };
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
  // Listen, mute and the level: toggle buttons whose names stay put and whose state is
  // aria-pressed (shown pressed), a labelled meter, and a status line that says what is heard.
  const listenButton = el("button", { id: "listen", type: "button", "aria-pressed": "false", disabled: "" }, "Listen");
  const muteButton = el("button", { id: "mute", type: "button", "aria-pressed": "false", disabled: "" }, "Mute");
  const level = el("meter", { id: "level", min: "0", max: "1", value: "0", "data-rms": "0", "data-chunks": "0" });
  const listenState = el("span", { id: "listen-state", role: "status" });
  setState(listenState, "off");
  const listenBar = el("div", { class: "listen", role: "group", "aria-label": "Listen to the call" },
    listenButton, muteButton, el("label", { for: "level" }, "Level"), level, listenState);
  app.replaceChildren(el("h2", {}, `Call ${callId}`), el("div", { class: "cols" },
    el("section", {}, el("h3", {}, "Transcript ", state), transcript),
    el("section", {}, el("h3", {}, "Events ", socketState), listenBar, keypad, results, timeline)));

  const token = async () => (await api("/v1/stream-tokens", {
    method: "POST", body: JSON.stringify({ call_id: callId, ttl_seconds: 600 }) })).token;

  // Transcript: the first EventSource asks for the call so far (`from=start`), so a call opened
  // mid-way or after its end shows every turn. On a dropped connection EventSource reconnects by
  // itself and sends `Last-Event-ID` on its own: the turns missed meanwhile come first. Only
  // when it has closed for good (an expired token, a 503) is a new one made, from the last id.
  let source = null, ended = false, lastId = null, caughtUp = false, cleanupDone = false;
  const player = audioPlayer(level);
  cleanup.push(() => { cleanupDone = true; source?.close(); socket?.close(); player.stop(); });
  const transcriptNotice = el("p", { id: "transcript-notice", class: "notice" });
  transcript.before(transcriptNotice);
  const openTranscript = async () => {
    setState(state, "connecting");
    const params = new URLSearchParams({ token: await token() });
    if (lastId !== null) params.set("last_event_id", lastId); else params.set("from", "start");
    const current = source = new EventSource(`/v1/calls/${callId}/transcript/stream?${params}`);
    const reopen = () => { current.close(); if (!ended && !cleanupDone) openTranscript(); };
    current.onopen = () => setState(state, "live");
    current.onmessage = (event) => {
      if (event.lastEventId) lastId = event.lastEventId;
      const turn = JSON.parse(event.data);
      let line = document.getElementById(`turn-${turn.turn_id}`);
      if (!line) { line = el("div", { id: `turn-${turn.turn_id}` }); transcript.append(line); }
      line.className = `turn ${turn.is_final ? "final" : "partial"}`;
      line.replaceChildren(el("span", { class: "role" }, turn.role), turn.text);
    };
    current.addEventListener("end", () => { ended = true; current.close(); setState(state, "ended"); });
    current.addEventListener("gap", (event) => {
      // Frames were dropped while this tab was slow: reopen from the last one delivered to get
      // the final turns back (a turn seen twice is only redrawn).
      const gap = JSON.parse(event.data);
      if (gap.resume_from) lastId = gap.resume_from;
      reopen();
    });
    current.addEventListener("reset", (event) => { transcriptNotice.textContent = missing(JSON.parse(event.data).reason); });
    current.addEventListener("error", (event) => {
      if (ended || current !== source) return;
      if (event.data) {  // a terminal error frame from the server
        const error = JSON.parse(event.data);
        if (error.error_code === "UNAVAILABLE" || error.error_code === "INTERNAL") { setState(state, "reconnecting"); return; }
        current.close();
        if (error.error_code !== "UNAUTHENTICATED") { setState(state, "error", error.message); return; }
        // UNAUTHENTICATED: the token expired, or the key was revoked; the API tells which.
      }
      if (current.readyState !== EventSource.CLOSED) { setState(state, "reconnecting"); return; }
      // Closed for good: a 204 (ended), a refused token, a 503. Ask the API (with the key).
      api(`/v1/calls/${callId}`).then((call) => {
        if (call.status === "in_progress") { setState(state, "reconnecting"); setTimeout(reopen, 1000); }
        else if (lastId !== null && !caughtUp) { caughtUp = true; reopen(); }  // the turns since our cursor, then `end`
        else { ended = true; setState(state, "ended"); }
      }).catch((error) => setState(state, "error", error.message));
    });
  };
  await openTranscript();

  // Events and DTMF: one WebSocket. Its first connection replays the call so far; a reconnect
  // (drain 1012, faults, a dropped connection; never after 1000) resumes after the last event
  // shown, and an event seen twice is shown once.
  let lastEventId = null;
  const seen = new Set();
  const timelineNotice = el("p", { id: "timeline-notice", class: "notice" });
  timeline.before(timelineNotice);
  // Listening is asked for per socket: a reconnected socket asks again.
  let listening = false, listenSeq = 0, callOver = false;
  const listenRequests = new Set();
  const askAudio = (action) => {
    const requestId = `${action}-${++listenSeq}`;
    listenRequests.add(requestId);
    if (socket?.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ action, request_id: requestId }));
  };
  const stopListening = (stateName) => {
    if (listening && stateName === "off") askAudio("unlisten");
    listening = false;
    player.stop();
    listenButton.setAttribute("aria-pressed", "false");
    muteButton.disabled = true;
    setState(listenState, stateName);
  };
  const callEnded = () => {
    callOver = true;
    stopListening("ended");
    listenButton.disabled = true;
  };
  listenButton.addEventListener("click", () => {
    if (listening) { stopListening("off"); return; }
    listening = true;
    player.start();
    listenButton.setAttribute("aria-pressed", "true");
    muteButton.disabled = false;
    setState(listenState, "connecting");
    askAudio("listen");
  });
  muteButton.addEventListener("click", () => {
    const on = muteButton.getAttribute("aria-pressed") !== "true";
    player.mute(on);
    muteButton.setAttribute("aria-pressed", String(on));
  });

  const openSocket = async (attempt = 0) => {
    setState(socketState, attempt ? "reconnecting" : "connecting");
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const params = new URLSearchParams({ token: await token() });
    if (lastEventId !== null) params.set("last_event_id", lastEventId);
    const current = socket = new WebSocket(`${scheme}://${location.host}/v1/calls/${callId}/stream?${params}`);
    current.binaryType = "arraybuffer";
    let resumeNow = false;
    current.onopen = () => {
      attempt = 0; setState(socketState, "live");
      if (callOver) return;
      listenButton.disabled = false;
      if (listening) { setState(listenState, "connecting"); askAudio("listen"); }
    };
    current.onmessage = (message) => {
      if (typeof message.data !== "string") {  // audio, after a listen
        if (listening) player.play(message.data);
        return;
      }
      const event = JSON.parse(message.data);
      if (event.event_type === "command.result" && listenRequests.delete(event.request_id)) {
        if (!event.request_id.startsWith("listen-") || !listening) return;
        if (event.ok) setState(listenState, "live", "listening");
        else { stopListening("error"); listenState.textContent = `${event.error_code} ${event.message}`; }
        return;
      }
      if (event.event_type === "command.result") {
        const row = document.getElementById(`result-${event.request_id}`);
        if (row) { row.textContent = `${row.textContent.split(":")[0]}: ${event.ok ? "ok" : `${event.error_code} ${event.message}`}`;
                   row.className = event.ok ? "ok" : "error"; }
        return;
      }
      if (event.event_type === "stream.gap") {  // dropped for a slow tab: get them back now
        if (event.resume_from) lastEventId = event.resume_from;
        resumeNow = true; current.close(); return;
      }
      if (event.event_type === "stream.reset") { timelineNotice.textContent = missing(event.reason); return; }
      if (seen.has(event.event_id)) return;
      seen.add(event.event_id); lastEventId = event.event_id;
      if (event.event_type === "call.completed") callEnded();
      timeline.prepend(el("li", { class: event.event_type.replace(".", "-") },
        `${event.timestamp.slice(11, 19)} ${event.event_type} ${JSON.stringify(event.payload)}`));
    };
    current.onclose = (close) => {
      if (cleanupDone) return;
      if (resumeNow) openSocket(0);
      else if (close.code === 1000) { setState(socketState, "ended"); callEnded(); }
      else if (close.code === 1008) {
        setState(socketState, "error", close.reason || "unauthorised");
        if (listening) stopListening("error");
      } else {  // a draining server may say when to come back ("... in 2345 ms"); else full jitter
        if (listening) setState(listenState, "reconnecting");  // the new socket asks again
        const paced = / in (\d+) ms$/.exec(close.reason);
        setTimeout(() => openSocket(attempt + 1), paced ? Number(paced[1]) : Math.min(30000, 500 * 2 ** attempt) * Math.random());
      }
    };
  };
  await openSocket();
}

// --- a conversation -----------------------------------------------------------------------------

// EventSource cannot send headers, and this stream takes the Authorization header only: read it
// with fetch and parse the frames by hand, keeping the last `id:` as EventSource would and
// sending it back as `Last-Event-ID` on every reconnect, so nothing durable is missed.
async function readSse(path, onEvent, signal, onState, onNotice) {
  let attempt = 0, lastId = null;
  while (!signal.aborted) {
    let resumeNow = false, delay = null;
    try {
      onState(attempt ? "reconnecting" : "connecting");
      const headers = { Authorization: `Bearer ${key()}` };
      if (lastId !== null) headers["Last-Event-ID"] = lastId;
      const response = await fetch(path, { headers, signal });
      if (response.status >= 502 && response.status <= 504) throw new Error(`${response.status}`);
      if (!response.ok) { const body = await response.json(); onState("error", body.message); return; }
      onState("live");
      attempt = 0;
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "", stop = false;
      while (!stop) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while (!stop && (cut = buffer.indexOf("\n\n")) >= 0) {
          const frame = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
          const fields = {};
          for (const line of frame.split("\n")) {
            if (line.startsWith(":")) continue;  // heartbeat
            const at = line.indexOf(":");
            const name = at < 0 ? line : line.slice(0, at), value = at < 0 ? "" : line.slice(at + 1).replace(/^ /, "");
            if (name === "id") lastId = value || null;
            else if (name === "data") fields.data = fields.data === undefined ? value : `${fields.data}\n${value}`;
            else fields[name] = value;
          }
          if (fields.data === undefined) continue;
          const data = JSON.parse(fields.data);
          if (fields.event === "error") {
            if (data.error_code !== "UNAVAILABLE" && data.error_code !== "INTERNAL") { onState("error", data.message); await reader.cancel(); return; }
            if (/^\d+$/.test(fields.retry || "")) delay = Number(fields.retry);  // a paced drain's own delay
            stop = true;  // draining: reconnect, after that delay or a backoff, from the last id
          } else if (fields.event === "gap") {
            if (data.resume_from) lastId = data.resume_from;
            resumeNow = stop = true;  // dropped while this tab was slow: get them back now
          } else if (fields.event === "reset") onNotice(data.reason);
          else if (!fields.event || fields.event === "message") onEvent(data);
        }
      }
      if (stop) await reader.cancel();
    } catch (error) { if (signal.aborted) return; }
    if (resumeNow) continue;
    attempt += 1;
    await new Promise((resolve) => setTimeout(resolve, delay ?? Math.min(30000, 500 * 2 ** attempt) * Math.random()));
  }
}

async function conversationView(conversationId) {
  const conversation = await api(`/v1/conversations/${conversationId}`);
  const state = el("span", { id: "conversation-state" });
  const mode = el("strong", { id: "mode" }, conversation.ai_mode);
  const messages = el("ul", { id: "messages" });
  const notice = el("p", { id: "conversation-notice", class: "notice" });
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
    el("section", {}, el("p", {}, "Mode: ", mode, " ", handoff("ai"), handoff("human"), handoff("closed"), " ", state), notice, messages));
  const controller = new AbortController();
  cleanup.push(() => controller.abort());
  readSse(`/v1/conversations/${conversationId}/stream`, (event) => {
    if (event.event_type === "conversation.mode_changed") mode.textContent = event.payload.to_mode;
    else if (event.event_type.startsWith("message.")) show({ id: event.payload.message_id, ...event.payload });
  }, controller.signal, (s, text) => setState(state, s, text),
  (reason) => { notice.textContent = missing(reason); });
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
