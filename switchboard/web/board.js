// The live board: what is happening in the workspace now, pushed by GET /v1/events/stream (no
// polling). The REST lists give the state at opening (20 a page, more on demand); the stream
// is opened first and its events are applied on top, so nothing that happens while the lists
// load is lost, and a reconnect resumes with Last-Event-ID.
import { el, api, readSse, errorBox, clock, when, duration, timer, missing, qualityLevel } from "./lib.js";

const PAGE = 20;

export async function boardView(ctx) {
  const calls = new Map(), conversations = new Map(), agents = new Map();
  const fetching = new Set();
  const eventTimes = [];
  const more = { live: undefined, recent: undefined, conversations: undefined };

  const counter = (id, label) => el("div", { class: "counter" },
    el("span", { class: "value", id }, "–"), el("span", { class: "label" }, label));
  const liveList = el("ul", { id: "live-calls", class: "rows", "aria-label": "Live calls" });
  const endedList = el("ul", { id: "ended-calls", class: "rows", "aria-label": "Recent ended calls" });
  const convList = el("ul", { id: "conversations", class: "rows", "aria-label": "Conversations" });
  const moreButton = (id, label, load) => {
    const button = el("button", { id, type: "button", class: "more", hidden: true }, label);
    button.addEventListener("click", async () => {
      button.disabled = true; button.textContent = "Loading…";
      try { await load(); } catch (error) { button.after(errorBox(error)); }
      button.disabled = false; button.textContent = label;
    });
    return button;
  };
  const liveMore = moreButton("live-more", "Show 20 more live calls", () => loadLive(more.live));
  const recentMore = moreButton("recent-more", "Show older calls", () => loadRecent(more.recent));
  const convMore = moreButton("conversations-more", "Show 20 more conversations", () => loadConversations(more.conversations));
  const notice = el("p", { id: "board-notice", class: "notice", role: "status" });
  ctx.app.replaceChildren(
    el("h1", { class: "sr-only" }, "Live board"),
    el("div", { class: "counters", role: "group", "aria-label": "Now" },
      counter("count-live", "live calls"), counter("count-open", "open conversations"), counter("count-rate", "events / minute")),
    notice,
    el("div", { class: "board" },
      el("section", { class: "card live-calls", "aria-labelledby": "live-h" },
        el("h2", { id: "live-h" }, "Live calls"), liveList, liveMore),
      el("section", { class: "card", "aria-labelledby": "conv-h" },
        el("h2", { id: "conv-h" }, "Conversations"), convList, convMore),
      el("section", { class: "card", "aria-labelledby": "ended-h" },
        el("h2", { id: "ended-h" }, "Recently ended calls"), endedList, recentMore)));

  // --- drawing ---------------------------------------------------------------------------------

  const agentName = (id) => (id ? agents.get(id) || id : "no agent");
  const qualityBadge = (c) => {
    if (!c.quality) return el("span", { class: "badge good", title: "No quality dip reported" }, "quality ok");
    return el("span", { class: `badge ${c.quality.level}`, title: c.quality.title, "data-quality": c.quality.level }, c.quality.text);
  };
  const direction = (d) => (d === "inbound" ? "↙ inbound" : "↗ outbound");

  function liveRow(c) {
    return [
      el("div", { class: "line" },
        el("a", { href: `#/calls/${c.id}`, class: "title" }, `${c.from_number || "?"} → ${c.to_number || "?"}`),
        el("span", { class: "timer-wrap" }, timer(c.started_at))),
      el("div", { class: "line meta" },
        el("span", {}, direction(c.direction)), el("span", { class: "badge plain" }, c.transport || "?"),
        el("span", {}, agentName(c.agent_id)), qualityBadge(c),
        el("span", { class: "count", title: "Barge-ins seen" }, `${c.barge} barge-in${c.barge === 1 ? "" : "s"}`),
        el("span", { class: "count", title: "Idle silences seen" }, `${c.silence} silence${c.silence === 1 ? "" : "s"}`)),
      c.last ? el("div", { class: "line said" }, c.last) : null,
    ];
  }
  function endedRow(c) {
    return [
      el("div", { class: "line" },
        el("a", { href: `#/calls/${c.id}`, class: "title" }, `${c.from_number || "?"} → ${c.to_number || "?"}`)),
      el("div", { class: "line meta" },
        el("span", { class: `badge status-${c.status}` }, c.status.replace("_", " ")),
        el("span", {}, `lasted ${duration(c.duration_seconds)}`),
        el("span", { class: c.mos == null ? "muted" : `mos ${qualityLevel("mos", c.mos)}` }, c.mos == null ? "MOS —" : `MOS ${c.mos.toFixed(1)}`),
        el("span", { class: "muted" }, `ended ${when(c.ended_at)}`)),
    ];
  }
  function convRow(v) {
    return [
      el("div", { class: "line" },
        el("a", { href: `#/conversations/${v.id}`, class: "title" }, v.customer_number),
        el("span", { class: `badge mode-${v.ai_mode}` }, v.ai_mode === "ai" ? "AI" : v.ai_mode)),
      el("div", { class: "line meta" },
        el("span", { class: "badge plain" }, v.channel),
        el("span", { class: "last" }, v.last_text ?? (v.last_message_at ? "…" : "no messages yet")),
        el("span", { class: "muted" }, when(v.last_message_at || v.updated_at))),
    ];
  }

  // Keyed lists: a row keeps its node (and its link the focus) while its content changes.
  function draw(list, items, idOf, row, empty) {
    const wanted = items.map((item) => {
      const id = idOf(item);
      let node = list.querySelector(`:scope > li[data-id="${CSS.escape(id)}"]`);
      if (!node) node = el("li", { "data-id": id, id: `${list.id}-${id}` });
      const parts = row(item);
      const signature = JSON.stringify(item) + agents.size;
      if (node.dataset.sig !== signature) { node.replaceChildren(...parts.filter(Boolean)); node.dataset.sig = signature; }
      return node;
    });
    for (const stale of [...list.children]) if (!wanted.includes(stale)) stale.remove();
    wanted.forEach((node, i) => { if (list.children[i] !== node) list.insertBefore(node, list.children[i] || null); });
    if (!items.length) list.replaceChildren(el("li", { class: "empty" }, empty));
  }

  let scheduled = false;
  function render() {
    if (scheduled) return;
    scheduled = true;
    requestAnimationFrame(() => {
      scheduled = false;
      if (!liveList.isConnected) return;  // the view was left meanwhile
      const all = [...calls.values()];
      const live = all.filter((c) => c.status === "in_progress").sort((a, b) => b.started_at.localeCompare(a.started_at));
      const ended = all.filter((c) => c.status !== "in_progress").sort((a, b) => (b.ended_at || "").localeCompare(a.ended_at || ""));
      const convs = [...conversations.values()].sort((a, b) =>
        (b.last_message_at || b.updated_at || "").localeCompare(a.last_message_at || a.updated_at || ""));
      draw(liveList, live, (c) => c.id, liveRow, ["No live calls right now; they appear here the moment they start. To see some, run ",
        el("code", {}, "switchboard simulate"), " (or start the server with ", el("code", {}, "--demo"), ")."]);
      draw(endedList, ended, (c) => c.id, endedRow, "No ended calls yet.");
      draw(convList, convs, (v) => v.id, convRow, "No conversations yet. An SMS or WhatsApp message starts one.");
      ctx.app.querySelector("#count-live").textContent = `${live.length}${more.live ? "+" : ""}`;
      const open = convs.filter((v) => v.ai_mode !== "closed").length;
      ctx.app.querySelector("#count-open").textContent = `${open}${more.conversations ? "+" : ""}`;
      liveMore.hidden = !more.live; recentMore.hidden = !more.recent; convMore.hidden = !more.conversations;
    });
  }
  const rate = () => {
    const cutoff = Date.now() - 60000;
    while (eventTimes.length && eventTimes[0] < cutoff) eventTimes.shift();
    const node = document.getElementById("count-rate");
    if (node) node.textContent = String(eventTimes.length);
  };
  const rateTimer = setInterval(rate, 1000);
  ctx.onLeave(() => clearInterval(rateTimer));

  // --- state -----------------------------------------------------------------------------------

  const fromRest = (c) => {
    const known = calls.get(c.id);
    // The stream may already know better (a completion, counts): keep what it learnt.
    // The REST row's `quality` is the measurement (call.quality); the board's is the latest dip.
    const { quality: measured, ...row } = c;
    const fromRow = { ...row, ...(measured && measured.mos != null ? { mos: measured.mos } : {}) };
    const merged = { barge: 0, silence: 0, quality: null, mos: null, last: "", ...fromRow, ...(known || {}) };
    if (known && known.status === "in_progress" && c.status !== "in_progress") Object.assign(merged, fromRow);
    calls.set(c.id, merged);
  };
  async function loadLive(token) {
    const page = await api(`/v1/calls?status=in_progress&page_size=${PAGE}${token ? `&page_token=${token}` : ""}`);
    page.calls.forEach(fromRest); more.live = page.next_page_token; render();
  }
  async function loadRecent(token) {
    const page = await api(`/v1/calls?page_size=${PAGE}${token ? `&page_token=${token}` : ""}`);
    page.calls.filter((c) => c.status !== "in_progress").forEach(fromRest);
    more.recent = page.next_page_token; render();
  }
  async function lastMessage(v) {
    try {
      const full = await api(`/v1/conversations/${v.id}`);
      const last = full.messages[full.messages.length - 1];
      const current = conversations.get(v.id);
      if (current && current.last_text === undefined) {
        current.last_text = last ? `${last.direction === "inbound" ? "" : "↩ "}${last.text}` : "no messages yet";
        render();
      }
    } catch { /* the row still shows the time */ }
  }
  async function loadConversations(token) {
    const page = await api(`/v1/conversations?page_size=${PAGE}${token ? `&page_token=${token}` : ""}`);
    const fresh = [];
    for (const v of page.conversations) {
      const known = conversations.get(v.id);
      conversations.set(v.id, { ...v, ...(known || {}) });
      if (!known || known.last_text === undefined) fresh.push(v);
    }
    more.conversations = page.next_page_token; render();
    // The list has no message text: read each conversation's latest, four at a time.
    const queue = [...fresh];
    await Promise.all([0, 1, 2, 3].map(async () => { while (queue.length) await lastMessage(queue.shift()); }));
  }
  async function fetchCall(id) {
    if (fetching.has(id)) return;
    fetching.add(id);
    try { fromRest(await api(`/v1/calls/${id}`)); render(); } catch { /* shown when it speaks again */ }
    fetching.delete(id);
  }
  async function fetchConversation(id) {
    if (fetching.has(id)) return;
    fetching.add(id);
    try {
      const v = await api(`/v1/conversations/${id}`);
      const known = conversations.get(id) || {};
      const last = v.messages[v.messages.length - 1];
      conversations.set(id, { ...v, last_text: last ? last.text : "no messages yet", ...known });
      render();
    } catch { /* shown when it speaks again */ }
    fetching.delete(id);
  }

  function apply(event) {
    eventTimes.push(Date.now());
    rate();
    const p = event.payload || {};
    if (event.call_id) {
      let c = calls.get(event.call_id);
      if (event.event_type === "call.initiated") {
        if (c) return render();
        calls.set(event.call_id, {
          id: event.call_id, status: "in_progress", started_at: event.timestamp, ended_at: null,
          direction: p.direction, from_number: p.from_number, to_number: p.to_number, transport: p.transport,
          agent_id: event.agent_id, barge: 0, silence: 0, quality: null, mos: null, last: "",
        });
        return render();
      }
      if (!c) { fetchCall(event.call_id); return; }
      switch (event.event_type) {
        case "call.transcription": c.last = `${p.role === "agent" ? "Agent" : "Caller"}: ${p.text}`; break;
        case "call.barge_in": c.barge += 1; break;
        case "call.idle_silence": c.silence += 1; break;
        case "call.quality_degraded": {
          const doubled = p.metric === "mos" ? p.value < p.threshold - 0.5 : p.value >= 2 * p.threshold;
          const label = { packet_loss: `loss ${p.value}%`, jitter: `jitter ${p.value} ms`, mos: `MOS ${p.value}` }[p.metric] || `${p.metric} ${p.value}`;
          c.quality = { level: doubled ? "bad" : "poor", text: label, title: `${p.metric} ${p.value} (threshold ${p.threshold}) at ${clock(event.timestamp)}` };
          break;
        }
        case "call.quality": c.mos = p.mos; break;
        case "call.completed":
          Object.assign(c, { status: p.status, duration_seconds: p.duration_seconds, ended_by: p.ended_by, ended_at: event.timestamp });
          break;
        default: break;
      }
      return render();
    }
    if (event.conversation_id) {
      const v = conversations.get(event.conversation_id);
      if (!v) { fetchConversation(event.conversation_id); return; }
      if (event.event_type === "conversation.mode_changed") v.ai_mode = p.to_mode;
      else if (event.event_type === "message.received" || event.event_type === "message.sent") {
        v.last_text = `${p.direction === "inbound" ? "" : "↩ "}${p.text}`;
        v.last_message_at = event.timestamp;
      }
      render();
    }
  }

  // --- the stream, then the lists --------------------------------------------------------------

  const controller = new AbortController();
  ctx.onLeave(() => { controller.abort(); ctx.app.classList.remove("stale"); });
  let loaded = false;
  const early = [];
  let firstLive = null;
  const opened = new Promise((resolve) => { firstLive = resolve; });
  readSse("/v1/events/stream", {
    signal: controller.signal,
    onEvent: (event) => { if (loaded) apply(event); else early.push(event); },
    onState: (state, text) => {
      const words = { connecting: "Connecting…", live: "Live", reconnecting: "Reconnecting… missed events will be recovered" };
      ctx.connection(state, state === "error" ? `Error: ${text}` : words[state]);
      ctx.app.classList.toggle("stale", state === "reconnecting" || state === "error");  // may be behind
      if (state === "live" || state === "error") firstLive();
    },
    onResumed: (n) => {
      if (n === null) {
        reload().then(() => ctx.notify("Reconnected: the lists were reloaded (nothing had arrived before the cut to resume from)."));
      } else ctx.notify(n ? `Reconnected: ${n} event${n === 1 ? "" : "s"} missed meanwhile recovered.` : "Reconnected: nothing was missed.");
    },
    onReset: (reason) => { notice.textContent = missing(reason); reload(); },
  });
  // After a reset or a resume with no cursor, what is shown may be stale: read the lists again.
  const reload = async () => {
    try { await Promise.all([loadLive(), loadRecent()]); } catch (error) { notice.replaceChildren(errorBox(error)); }
    // A call shown live that the lists no longer call live ended meanwhile: ask for it.
    for (const c of calls.values()) if (c.status === "in_progress") fetchCall(c.id);
  };
  // The lists wait for the stream (so nothing falls between them), but not for ever: a stream
  // that cannot connect still leaves a board to read, and its events apply when they come.
  await Promise.race([opened, new Promise((resolve) => setTimeout(resolve, 5000))]);
  try {
    const agentPage = await api("/v1/agents?page_size=100").catch(() => ({ agents: [] }));
    for (const a of agentPage.agents) agents.set(a.id, a.name);
    await Promise.all([loadLive(), loadRecent()]);
    loaded = true;
    early.splice(0).forEach(apply);
    render();
    loadConversations().catch((error) => convList.replaceChildren(el("li", {}, errorBox(error))));
  } catch (error) {
    loaded = true;
    notice.replaceChildren(errorBox(error, "board-error"));
  }
  rate();
}
