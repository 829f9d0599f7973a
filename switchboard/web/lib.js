// Shared pieces of the console: building elements, calling the API with the key from
// sessionStorage, reading an SSE stream with fetch (so the key goes in a header, never a URL),
// and formatting times and durations the same way everywhere.
export const KEY = "switchboard.key";
export const key = () => sessionStorage.getItem(KEY);

export const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  node.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return node;
};

export class ApiError extends Error {
  constructor(status, body) {
    super(body?.message || `HTTP ${status}`);
    this.status = status;
    this.code = body?.error_code || `HTTP_${status}`;
    this.requestId = body?.request_id;
  }
}

export async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, {
      ...options,
      headers: { Authorization: `Bearer ${key()}`, "Content-Type": "application/json", ...(options.headers || {}) },
    });
  } catch {
    throw new ApiError(0, { error_code: "NETWORK", message: "The server cannot be reached: check that it is running, then try again." });
  }
  const text = response.status === 204 ? "" : await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch { body = { message: text }; }
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
}

// What a person can do about an error, by its code.
export function advice(error) {
  const code = error?.code || error?.error_code;
  if (code === "UNAUTHENTICATED") return "The key was refused (revoked or mistyped): sign out and sign in with a valid key.";
  if (code === "NOT_FOUND") return "Check the link, or pick it again from the board.";
  if (code === "RATE_LIMITED") return "Too many requests: wait a moment and try again.";
  if (code === "UNAVAILABLE" || code === "NETWORK") return "The server or one of its stores is down: it retries by itself; check the server if this lasts.";
  if (code === "INVALID_ARGUMENT") return "Correct the value and try again.";
  return "Try again; if it keeps failing, check the server's log for the request id.";
}

export function errorBox(error, id) {
  return el("div", { class: "alert error", role: "alert", id },
    el("strong", {}, error.message || String(error)), " ", el("span", {}, advice(error)),
    error.requestId ? el("small", { class: "muted" }, ` (${error.requestId})`) : null);
}

// A state pill: connecting, live, reconnecting, ended, error, off; `data-state` for tests.
export function setState(node, state, text) {
  node.className = `state ${state}`;
  node.textContent = text || state;
  node.dataset.state = state;
}

export const missing = (reason) =>
  `The server could not resume (${reason === "cursor_expired" ? "older than its history" : "unknown position"}): something may be missing above; reload the page to see everything.`;

// --- formatting ----------------------------------------------------------------------------------

export function clock(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

export function when(iso) {
  if (!iso) return "";
  const d = new Date(iso), now = new Date();
  if (d.toDateString() === now.toDateString()) return clock(iso);
  return d.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "—";
  const s = Math.max(0, Math.floor(seconds));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  const mm = String(m).padStart(h ? 2 : 1, "0"), ss = String(r).padStart(2, "0");
  return h ? `${h}:${mm}:${ss}` : `${mm}:${ss}`;
}

// Running timers: any element with data-since (an ISO time) shows the time elapsed since, and
// its data-seconds the whole seconds (tests read it). One interval for the whole page.
export function tickTimers() {
  const now = Date.now();
  for (const node of document.querySelectorAll("[data-since]")) {
    const seconds = Math.max(0, Math.floor((now - Date.parse(node.dataset.since)) / 1000));
    if (node.dataset.seconds !== String(seconds)) {
      node.dataset.seconds = String(seconds);
      node.textContent = duration(seconds);
    }
  }
}
setInterval(tickTimers, 1000);

export const timer = (since, id) => {
  const node = el("span", { class: "timer", "data-since": since, id, "aria-label": "Elapsed time" });
  node.textContent = duration((Date.now() - Date.parse(since)) / 1000);
  return node;
};

export const fields = (payload, names) => names.filter((n) => payload?.[n] !== undefined && payload[n] !== null)
  .map((n) => `${n.replaceAll("_", " ")} ${payload[n]}`).join(" · ");

// Quality: the level a call.quality_degraded or call.quality puts it at.
export function qualityLevel(metric, value) {
  if (metric === "mos") return value < 3.0 ? "bad" : value < 3.8 ? "poor" : "good";
  if (metric === "packet_loss" || metric === "packet_loss_pct") return value >= 5 ? "bad" : value >= 1 ? "poor" : "good";
  if (metric === "jitter" || metric === "jitter_ms") return value >= 60 ? "bad" : value >= 30 ? "poor" : "good";
  return "poor";
}

export function copyButton(text, label = "Copy") {
  const button = el("button", { type: "button", class: "copy" }, label);
  button.addEventListener("click", async () => {
    try { await navigator.clipboard.writeText(text); button.textContent = "Copied"; }
    catch { button.textContent = "Select and copy it by hand"; }
  });
  return button;
}

// --- SSE over fetch ------------------------------------------------------------------------------

// EventSource cannot send headers, and these streams take the Authorization header only: read
// them with fetch and parse the frames by hand, keeping the last `id:` as EventSource would and
// sending it back as `Last-Event-ID` on every reconnect, so nothing durable is missed.
// onState(state, text): connecting | live | reconnecting | error. onResumed(n): after a
// reconnect, how many envelopes the resume recovered (those stamped before the reconnection),
// said once the replay is over; null when there was no cursor to resume from (no frame had
// come yet), so the caller reloads what it shows. onReset(reason): the cursor could not be
// honoured, so the caller reloads too.
export async function readSse(path, { onEvent, signal, onState, onReset = () => {}, onResumed = () => {}, onCursor = () => {} }) {
  let attempt = 0, lastId = null, everLive = false;
  while (!signal.aborted) {
    let resumeNow = false, delay = null;
    try {
      onState(everLive ? "reconnecting" : "connecting");
      const headers = { Authorization: `Bearer ${key()}` };
      if (lastId !== null) headers["Last-Event-ID"] = lastId;
      const response = await fetch(path, { headers, signal, cache: "no-store" });
      if (response.status >= 500) throw new Error(`${response.status}`);
      if (response.status === 429) {  // too many streams or requests: come back when told
        const wait = Number(response.headers.get("Retry-After"));
        onState("reconnecting", "Too many streams or requests for this workspace: retrying shortly");
        await new Promise((resolve) => setTimeout(resolve, (Number.isFinite(wait) && wait > 0 ? wait : 5) * 1000));
        continue;
      }
      if (!response.ok) {
        let body = null;
        try { body = await response.json(); } catch { /* not JSON */ }
        const error = new ApiError(response.status, body);
        onState("error", `${error.message} ${advice(error)}`, error);
        return;
      }
      const resumed = everLive && lastId !== null;
      const blind = everLive && lastId === null;  // nothing had come yet: no cursor to resume from
      everLive = true;
      onState("live");
      if (blind) onResumed(null);
      attempt = 0;
      const connectedAt = Date.now();
      let recovered = 0, quietTimer = null, replaying = resumed;
      const settle = () => { if (replaying) { replaying = false; clearTimeout(quietTimer); onResumed(recovered); } };
      if (resumed) quietTimer = setTimeout(settle, 500);
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "", stop = false;
      while (!stop) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replaceAll("\r\n", "\n");
        let cut;
        while (!stop && (cut = buffer.indexOf("\n\n")) >= 0) {
          const frame = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
          const f = {};
          for (const line of frame.split("\n")) {
            if (line.startsWith(":")) continue;  // heartbeat
            const at = line.indexOf(":");
            const name = at < 0 ? line : line.slice(0, at), v = at < 0 ? "" : line.slice(at + 1).replace(/^ /, "");
            if (name === "id") { lastId = v || null; onCursor(lastId); }
            else if (name === "data") f.data = f.data === undefined ? v : `${f.data}\n${v}`;
            else f[name] = v;
          }
          if (f.data === undefined) continue;
          const data = JSON.parse(f.data);
          if (f.event === "error") {
            if (data.error_code !== "UNAVAILABLE" && data.error_code !== "INTERNAL") {
              const error = new ApiError(0, data);
              onState("error", `${data.message} ${advice(error)}`, error);
              await reader.cancel(); return;
            }
            if (/^\d+$/.test(f.retry || "")) delay = Number(f.retry);  // a paced drain's own delay
            stop = true;  // draining: reconnect, after that delay or a backoff, from the last id
          } else if (f.event === "gap") {
            if (data.resume_from) lastId = data.resume_from;
            resumeNow = stop = true;  // dropped while this tab was slow: get them back now
          } else if (f.event === "reset") onReset(data.reason);
          else if (!f.event || f.event === "message") {
            if (replaying) {
              if (Date.parse(data.timestamp) < connectedAt) {
                recovered += 1; clearTimeout(quietTimer); quietTimer = setTimeout(settle, 500);
              } else settle();
            }
            onEvent(data);
          }
        }
      }
      if (stop) await reader.cancel();
    } catch (error) { if (signal.aborted) return; }
    if (resumeNow) continue;
    attempt += 1;
    onState("reconnecting");
    await new Promise((resolve) => setTimeout(resolve, delay ?? Math.min(30000, 500 * 2 ** attempt) * (0.5 + Math.random() / 2)));
  }
}
