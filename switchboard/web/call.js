// One call: its header, the whole transcript as a chat (from the start, partials settling in
// place) with barge-ins, silences, quality dips and keypad presses inline on its timeline, the
// readable event list, the keypad, Listen, and a summary once it has ended.
import { el, api, setState, errorBox, clock, duration, timer, missing, qualityLevel, fields } from "./lib.js";
import { audioPlayer } from "./audio.js";

const ROLE = { user: "Caller", agent: "Agent" };
const METRIC = { packet_loss: "packet loss", jitter: "jitter", mos: "MOS" };
const TITLES = {
  "call.initiated": "Call started", "call.transcription": "Turn", "call.agent_response": "Agent reply",
  "call.barge_in": "Barge-in", "call.idle_silence": "Silence", "call.quality_degraded": "Quality dip",
  "call.quality": "Call quality", "call.dtmf_sent": "Keypad", "call.completed": "Call ended",
};

// The fields that matter, in words, for the event list.
function describe(event) {
  const p = event.payload || {};
  switch (event.event_type) {
    case "call.initiated": return `${p.direction} ${p.from_number} → ${p.to_number} over ${p.transport}`;
    case "call.transcription": return `${ROLE[p.role] || p.role}: “${p.text}”`;
    case "call.agent_response": return `“${p.text}”`;
    case "call.barge_in": return `the caller cut in on “${p.interrupted_text}”`;
    case "call.idle_silence": return `${(p.silence_ms / 1000).toFixed(1)} s of silence (threshold ${(p.threshold_ms / 1000).toFixed(1)} s)`;
    case "call.quality_degraded": return `${METRIC[p.metric] || p.metric} ${p.value} (threshold ${p.threshold})`;
    case "call.quality": return `MOS ${p.mos} · packet loss ${p.packet_loss_pct}% · jitter ${p.jitter_ms} ms · RTT ${p.rtt_ms} ms`;
    case "call.dtmf_sent": return `sent ${p.digits}`;
    case "call.completed": return `${p.status}, after ${duration(p.duration_seconds)}, ended by ${p.ended_by}`;
    default: return fields(p, Object.keys(p));
  }
}

const at = (iso) => { const t = Date.parse(iso); return Number.isNaN(t) ? Date.now() : t; };

export async function callView(callId, ctx) {
  const call = await api(`/v1/calls/${callId}`);
  const agentName = call.agent_id ? await api(`/v1/agents/${call.agent_id}`).then((a) => a.name, () => call.agent_id) : "no agent";
  let callOver = call.status !== "in_progress";
  const counts = { barge: 0, silence: 0, dips: 0 };
  let completed = callOver ? { status: call.status, ended_by: call.ended_by, duration_seconds: call.duration_seconds } : null;
  let quality = null;

  // --- layout ----------------------------------------------------------------------------------
  const status = el("span", { id: "call-status" });
  const elapsed = el("span", { id: "call-duration" });
  const state = el("span", { id: "transcript-state" }), socketState = el("span", { id: "socket-state" });
  const transcript = el("div", { id: "transcript", class: "chat", role: "log", "aria-label": "Transcript", "aria-live": "polite" });
  const timeline = el("ul", { id: "timeline", class: "events", "aria-label": "Events, newest first" });
  const results = el("ul", { id: "dtmf-results", class: "results", "aria-live": "polite" });
  const summary = el("section", { id: "call-summary", class: "card summary", "aria-labelledby": "summary-h", hidden: true });
  const transcriptNotice = el("p", { id: "transcript-notice", class: "notice", role: "status" });
  const timelineNotice = el("p", { id: "timeline-notice", class: "notice", role: "status" });
  const keypadNote = el("p", { id: "keypad-note", class: "muted small" });
  const fact = (label, value, wide) => el("div", { class: wide ? "wide" : null }, el("dt", {}, label), el("dd", {}, value));

  let socket = null;
  const keypad = el("div", { class: "keypad", role: "group", "aria-label": "Keypad (sends DTMF into the call)" },
    ..."123456789*0#".split("").map((digit) =>
      el("button", { type: "button", "data-digit": digit, "aria-label": `Send ${digit}`, onclick: () => press(digit) }, digit)));
  const listenButton = el("button", { id: "listen", type: "button", "aria-pressed": "false", disabled: true }, "Listen");
  const muteButton = el("button", { id: "mute", type: "button", "aria-pressed": "false", disabled: true }, "Mute");
  const level = el("meter", { id: "level", min: "0", max: "1", value: "0", "data-rms": "0", "data-chunks": "0" });
  const listenState = el("span", { id: "listen-state", role: "status" });
  setState(listenState, "off");
  const listenBar = el("div", { class: "listen", role: "group", "aria-label": "Listen to the call" },
    listenButton, muteButton, el("label", { for: "level" }, "Level"), level, listenState);

  ctx.app.replaceChildren(
    el("p", { class: "crumbs" }, el("a", { href: "#/" }, "← Board")),
    el("section", { class: "card call-head", "aria-labelledby": "call-title" },
      el("div", { class: "line" },
        el("h1", { id: "call-title" }, `${call.from_number} → ${call.to_number}`), status),
      el("p", { class: "call-id muted small" }, el("code", {}, call.id)),
      el("dl", { class: "facts" },
        fact("Direction", call.direction), fact("Transport", call.transport), fact("Agent", agentName),
        fact("Started", clock(call.started_at)), fact("Duration", elapsed))),
    summary,
    el("div", { class: "call-grid" },
      el("section", { class: "card", "aria-labelledby": "transcript-h" },
        el("h2", { id: "transcript-h" }, "Transcript ", state), transcriptNotice, transcript),
      el("div", { class: "side" },
        el("section", { class: "card", "aria-labelledby": "controls-h" },
          el("h2", { id: "controls-h" }, "Listen and keypad ", socketState), listenBar, keypad, keypadNote, results),
        el("section", { class: "card", "aria-labelledby": "events-h" },
          el("h2", { id: "events-h" }, "Events"), timelineNotice, timeline))));

  const showStatus = () => {
    if (!callOver) { setState(status, "live", "live"); elapsed.replaceChildren(timer(call.started_at, "call-timer")); return; }
    setState(status, "ended", (completed?.status || call.status || "ended").replace("_", " "));
    const seconds = completed?.duration_seconds ?? call.duration_seconds;
    elapsed.replaceChildren(el("span", { id: "call-timer" }, duration(seconds)));
  };
  showStatus();

  function drawSummary() {
    if (!callOver) return;
    summary.hidden = false;
    const mos = quality?.mos;
    summary.replaceChildren(
      el("h2", { id: "summary-h" }, "Summary"),
      el("dl", { class: "facts" },
        fact("Status", el("span", { class: `badge status-${completed?.status}` }, (completed?.status || "ended").replace("_", " "))),
        fact("Ended by", completed?.ended_by || "—"),
        fact("Duration", duration(completed?.duration_seconds)),
        fact("Quality", quality ? el("span", { class: `mos ${qualityLevel("mos", mos)}` },
          `MOS ${mos} · loss ${quality.packet_loss_pct}% · jitter ${quality.jitter_ms} ms`) : "not reported", true),
        fact("Barge-ins", String(counts.barge)), fact("Silences", String(counts.silence)), fact("Quality dips", String(counts.dips))));
  }

  // --- the transcript's timeline ----------------------------------------------------------------

  const place = (node, when) => {
    node.dataset.ts = String(when);
    for (const child of transcript.children) {
      if (Number(child.dataset.ts) > when) { transcript.insertBefore(node, child); return; }
    }
    transcript.append(node);
  };
  const emptyNote = el("p", { class: "muted empty", id: "transcript-empty" }, callOver ? "Nothing was said on this call." : "Waiting for someone to speak…");
  transcript.append(emptyNote);
  emptyNote.dataset.ts = "0";
  const showTurn = (turn) => {
    emptyNote.remove();
    let node = document.getElementById(`turn-${turn.turn_id}`);
    if (!node) {
      node = el("div", { id: `turn-${turn.turn_id}` });
      place(node, at(turn.ts));
      const barge = transcript.querySelector(`.marker[data-turn="${CSS.escape(turn.turn_id)}"]`);
      if (barge) { node.classList.add("interrupted"); node.after(barge); barge.dataset.ts = node.dataset.ts; }
    }
    else if ((node.classList.contains("final") || callOver) && !turn.is_final) return;  // a late partial never undoes a final
    const interrupted = node.classList.contains("interrupted");
    node.className = `turn ${turn.is_final ? "final" : "partial"} role-${turn.role}${interrupted ? " interrupted" : ""}`;
    node.replaceChildren(el("span", { class: "role" }, ROLE[turn.role] || turn.role),
      el("span", { class: "text" }, turn.text), el("time", { class: "at" }, turn.is_final ? clock(turn.ts) : "speaking…"));
  };
  for (const turn of call.turns || []) showTurn({ turn_id: turn.id, role: turn.role, text: turn.text, is_final: true, ts: turn.spoken_at });

  const MARKS = {
    "call.barge_in": ["↯", (p) => `Barge-in: the caller cut in on “${p.interrupted_text}”`],
    "call.idle_silence": ["…", (p) => `Silence: ${(p.silence_ms / 1000).toFixed(1)} s (threshold ${(p.threshold_ms / 1000).toFixed(1)} s)`],
    "call.quality_degraded": ["▼", (p) => `Quality dip: ${METRIC[p.metric] || p.metric} ${p.value} (threshold ${p.threshold})`],
    "call.dtmf_sent": ["#", (p) => `Keypad: ${p.digits} sent into the call`],
  };
  const mark = (event) => {
    const [icon, say] = MARKS[event.event_type] || [];
    if (!icon || document.getElementById(`mark-${event.event_id}`)) return;
    emptyNote.remove();
    const kind = event.event_type.slice(5);
    const node = el("div", { class: `marker ${kind}`, id: `mark-${event.event_id}` },
      el("span", { class: "icon", "aria-hidden": "true" }, icon), el("span", {}, say(event.payload || {})),
      el("time", { class: "at" }, clock(event.timestamp)));
    place(node, at(event.timestamp));
    if (event.event_type === "call.barge_in") {
      // Shown right under the agent's turn it cut off (that turn's final may be stamped later).
      node.dataset.turn = event.payload.turn_id;
      const turn = document.getElementById(`turn-${event.payload.turn_id}`);
      if (turn) { turn.classList.add("interrupted"); turn.after(node); node.dataset.ts = turn.dataset.ts; }
    }
  };

  // --- the transcript stream --------------------------------------------------------------------

  const token = async () => (await api("/v1/stream-tokens", {
    method: "POST", body: JSON.stringify({ call_id: callId, ttl_seconds: 600 }) })).token;
  const transcriptWords = { connecting: "connecting…", live: "live", reconnecting: "reconnecting…", ended: "ended" };
  const transcriptState = (s, text) => {
    setState(state, s, text || transcriptWords[s]);
    const header = { connecting: "Connecting…", live: "Live", reconnecting: "Reconnecting… the turns missed meanwhile will be recovered", ended: "Call ended" };
    ctx.connection(s, s === "error" ? `Error: ${text}` : header[s]);
  };

  // The first EventSource asks for the call so far (`from=start`), so a call opened mid-way or
  // after its end shows every turn. On a dropped connection EventSource reconnects by itself and
  // sends `Last-Event-ID` on its own: the turns missed meanwhile come first. Only when it has
  // closed for good (an expired token, a 503) is a new one made, from the last id.
  let source = null, transcriptEnded = false, lastId = null, caughtUp = false, left = false, reconnecting = false;
  const player = audioPlayer(level);
  ctx.onLeave(() => { left = true; source?.close(); socket?.close(); player.stop(); });
  const openTranscript = async () => {
    transcriptState(lastId === null && !reconnecting ? "connecting" : "reconnecting");
    let params;
    try { params = new URLSearchParams({ token: await token() }); }
    catch (error) { transcriptState("error", `${error.message}`); transcriptNotice.replaceChildren(errorBox(error)); return; }
    if (lastId !== null) params.set("last_event_id", lastId); else params.set("from", "start");
    const current = source = new EventSource(`/v1/calls/${callId}/transcript/stream?${params}`);
    const reopen = () => { current.close(); if (!transcriptEnded && !left) openTranscript(); };
    current.onopen = () => {
      if (reconnecting) ctx.notify("Reconnected: the turns missed meanwhile were recovered.");
      reconnecting = false;
      transcriptState("live");
    };
    current.onmessage = (event) => {
      if (event.lastEventId) lastId = event.lastEventId;
      showTurn(JSON.parse(event.data));
    };
    current.addEventListener("end", () => { transcriptEnded = true; current.close(); transcriptState("ended"); callEnded(); });
    current.addEventListener("gap", (event) => {
      // Frames were dropped while this tab was slow: reopen from the last one delivered to get
      // the final turns back (a turn seen twice is only redrawn).
      const gap = JSON.parse(event.data);
      if (gap.resume_from) lastId = gap.resume_from;
      reopen();
    });
    current.addEventListener("reset", (event) => { transcriptNotice.textContent = missing(JSON.parse(event.data).reason); });
    current.addEventListener("error", (event) => {
      if (transcriptEnded || current !== source) return;
      if (event.data) {  // a terminal error frame from the server
        const error = JSON.parse(event.data);
        if (error.error_code === "UNAVAILABLE" || error.error_code === "INTERNAL") { reconnecting = true; transcriptState("reconnecting"); return; }
        current.close();
        if (error.error_code !== "UNAUTHENTICATED") { transcriptState("error", error.message); return; }
        // UNAUTHENTICATED: the token expired, or the key was revoked; the API tells which.
      }
      if (current.readyState !== EventSource.CLOSED) { reconnecting = true; transcriptState("reconnecting"); return; }
      // Closed for good: a 204 (ended), a refused token, a 503. Ask the API (with the key).
      api(`/v1/calls/${callId}`).then((now) => {
        if (now.status === "in_progress") { reconnecting = true; transcriptState("reconnecting"); setTimeout(reopen, 1000); }
        else if (lastId !== null && !caughtUp) { caughtUp = true; reopen(); }  // the turns since our cursor, then `end`
        else {
          transcriptEnded = true; transcriptState("ended");
          completed = completed || { status: now.status, ended_by: now.ended_by, duration_seconds: now.duration_seconds };
          callEnded();
        }
      }).catch((error) => { transcriptState("error", `${error.message}`); transcriptNotice.replaceChildren(errorBox(error)); });
    });
  };

  // --- keypad and listening --------------------------------------------------------------------

  const result = (requestId, text, tone) => {
    const row = el("li", { id: `result-${requestId}`, class: tone || "" }, text);
    results.prepend(row);
    return row;
  };
  let pressSeq = 0;
  function press(digit) {
    const requestId = `r${Date.now()}-${++pressSeq}`;
    if (callOver) { result(requestId, `${digit}: not sent, the call has ended`, "error"); return; }
    if (socket?.readyState !== WebSocket.OPEN) {
      result(requestId, `${digit}: not sent, the connection is down (it reconnects by itself; press again when it says live)`, "error");
      return;
    }
    result(requestId, `${digit}: sent…`);
    socket.send(JSON.stringify({ action: "send_dtmf", digits: digit, request_id: requestId }));
  }

  let listening = false, listenSeq = 0;
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
  function callEnded() {
    const first = !keypadNote.textContent;
    callOver = true;
    stopListening("ended");
    listenButton.disabled = true;
    for (const button of keypad.querySelectorAll("button")) button.disabled = true;
    keypadNote.textContent = "The call has ended: the keypad and Listen are off.";
    // A turn still in flight at the end was never finished: say so rather than "speaking…".
    for (const turn of transcript.querySelectorAll(".turn.partial")) {
      turn.classList.replace("partial", "unfinished");
      turn.querySelector(".at").textContent = "cut off by the end of the call";
    }
    showStatus();
    drawSummary();
    if (first) ctx.connection("ended", "Call ended");
  }
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

  // --- the event socket ------------------------------------------------------------------------

  // Events and DTMF: one WebSocket. Its first connection replays the call so far; a reconnect
  // (drain 1012, faults, a dropped connection; never after 1000) resumes after the last event
  // shown, and an event seen twice is shown once.
  let lastEventId = null;
  const seen = new Set();
  const showEvent = (event) => {
    const p = event.payload || {};
    switch (event.event_type) {
      case "call.barge_in": counts.barge += 1; break;
      case "call.idle_silence": counts.silence += 1; break;
      case "call.quality_degraded": counts.dips += 1; break;
      case "call.quality": quality = p; drawSummary(); break;
      case "call.completed":
        completed = { status: p.status, ended_by: p.ended_by, duration_seconds: p.duration_seconds };
        callEnded(); break;
      default: break;
    }
    mark(event);
    const raw = el("pre", {}, JSON.stringify(event, null, 2));
    timeline.prepend(el("li", { class: event.event_type.replace(".", "-"), id: `event-${event.event_id}` },
      el("div", { class: "ev" },
        el("time", {}, clock(event.timestamp)),
        el("strong", {}, TITLES[event.event_type] || event.event_type),
        el("span", { class: "what" }, describe(event))),
      el("details", {}, el("summary", {}, el("code", {}, event.event_type), " · raw envelope"), raw)));
  };
  const openSocket = async (attempt = 0) => {
    setState(socketState, attempt ? "reconnecting" : "connecting", attempt ? "reconnecting…" : "connecting…");
    let params;
    try { params = new URLSearchParams({ token: await token() }); }
    catch (error) { setState(socketState, "error", error.message); return; }
    if (lastEventId !== null) params.set("last_event_id", lastEventId);
    const scheme = location.protocol === "https:" ? "wss" : "ws";
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
        if (row) {
          row.textContent = `${row.textContent.split(":")[0]}: ${event.ok ? "ok" : `not sent, ${event.message}`}`;
          row.className = event.ok ? "ok" : "error";
        }
        return;
      }
      if (event.event_type === "stream.gap") {  // dropped for a slow tab: get them back now
        if (event.resume_from) lastEventId = event.resume_from;
        resumeNow = true; current.close(); return;
      }
      if (event.event_type === "stream.reset") { timelineNotice.textContent = missing(event.reason); return; }
      if (seen.has(event.event_id)) return;
      seen.add(event.event_id); lastEventId = event.event_id;
      showEvent(event);
    };
    current.onclose = (close) => {
      if (left) return;
      if (resumeNow) openSocket(0);
      else if (close.code === 1000) { setState(socketState, "ended"); callEnded(); }
      else if (close.code === 1008) {
        setState(socketState, "error", close.reason || "unauthorised: sign in again");
        if (listening) stopListening("error");
      } else {  // a draining server may say when to come back ("... in 2345 ms"); else full jitter
        if (listening) setState(listenState, "reconnecting");  // the new socket asks again
        setState(socketState, "reconnecting", "reconnecting…");
        const paced = / in (\d+) ms$/.exec(close.reason);
        setTimeout(() => openSocket(attempt + 1), paced ? Number(paced[1]) : Math.min(30000, 500 * 2 ** attempt) * Math.random());
      }
    };
  };

  if (callOver) {
    callEnded();
    setState(state, "ended", "ended");
  }
  await openTranscript();
  await openSocket();
}
