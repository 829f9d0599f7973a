// One conversation (SMS or WhatsApp): its messages as a chat, history then live; who answers
// (the AI, a human, nobody: closed) shown plainly with the switches between them; in human
// mode, a reply box that sends through POST /v1/messages.
import { el, api, readSse, setState, errorBox, clock, when, missing } from "./lib.js";

const MODES = { ai: "AI answers", human: "A human answers", closed: "Closed" };
const SHORT = { ai: "AI", human: "human", closed: "closed" };

export async function conversationView(conversationId, ctx) {
  const conversation = await api(`/v1/conversations/${conversationId}`);
  let currentMode = conversation.ai_mode;
  const state = el("span", { id: "conversation-state" });
  const mode = el("strong", { id: "mode", class: `badge big mode-${currentMode}` }, SHORT[currentMode]);
  const modeText = el("span", { id: "mode-text" }, MODES[currentMode]);
  const messages = el("ul", { id: "messages", class: "chat", role: "log", "aria-label": "Messages", "aria-live": "polite" });
  const notice = el("p", { id: "conversation-notice", class: "notice", role: "status" });
  const modeError = el("div", { id: "mode-error" });

  const show = (m, at) => {
    messages.querySelector(".empty")?.remove();
    let row = document.getElementById(`msg-${m.id}`);
    if (!row) { row = el("li", { id: `msg-${m.id}`, "data-at": m.created_at || at }); messages.append(row); }
    row.className = `msg ${m.direction === "inbound" ? "in" : "out"} status-${m.status}`;
    row.replaceChildren(
      el("span", { class: "who" }, m.direction === "inbound" ? conversation.customer_number : "Business"),
      el("span", { class: "text" }, m.text),
      el("span", { class: "at" }, `${when(row.dataset.at)} · ${m.status}`));
  };
  // Who switched: a key's id is shown with the key's name when this key may list keys.
  const keyNames = new Map();
  api("/v1/keys?page_size=100").then((page) => page.keys.forEach((k) => keyNames.set(k.id, k.name))).catch(() => {});
  const actor = (id) => (keyNames.get(id) ? `the key “${keyNames.get(id)}”` : id || "someone");
  const switched = (event) => {
    const p = event.payload;
    if (document.getElementById(`switch-${event.event_id}`)) return;
    messages.append(el("li", { id: `switch-${event.event_id}`, class: "mode-change" },
      `${SHORT[p.from_mode]} → ${SHORT[p.to_mode]}, by ${actor(p.actor_user_id)} at ${clock(event.timestamp)}`));
  };
  conversation.messages.forEach((m) => show(m));
  if (!conversation.messages.length) messages.append(el("li", { class: "empty muted" }, "No messages yet."));

  const buttons = Object.keys(MODES).map((to) => el("button", {
    id: `mode-${to}`, type: "button", "aria-pressed": String(to === currentMode),
    onclick: async () => {
      modeError.replaceChildren();
      try {
        await api(`/v1/conversations/${conversationId}`, { method: "PATCH", body: JSON.stringify({ ai_mode: to }) });
      } catch (error) { modeError.replaceChildren(errorBox(error)); }
    } }, { ai: "AI", human: "Human", closed: "Closed" }[to]));

  const text = el("textarea", { id: "reply-text", rows: "2", maxlength: "4096", required: true, "aria-describedby": "reply-help" });
  const send = el("button", { id: "reply-send", class: "primary" }, "Send");
  const replyHelp = el("p", { id: "reply-help", class: "muted small" });
  const replyResult = el("div", { id: "reply-result", role: "status" });
  const reply = el("form", { id: "reply", class: "reply", onsubmit: async (event) => {
    event.preventDefault();
    if (!text.value.trim()) return;
    send.disabled = true; replyResult.replaceChildren(el("span", { class: "muted" }, "Sending…"));
    try {
      await api("/v1/messages", { method: "POST", body: JSON.stringify({ conversation_id: conversationId, text: text.value }) });
      text.value = "";
      replyResult.replaceChildren();
    } catch (error) { replyResult.replaceChildren(errorBox(error)); }
    send.disabled = currentMode !== "human";
    text.focus();
  } }, el("label", { for: "reply-text" }, "Reply as a human"), el("div", { class: "row" }, text, send), replyHelp, replyResult);

  const showMode = () => {
    mode.className = `badge big mode-${currentMode}`;
    mode.textContent = SHORT[currentMode];
    modeText.textContent = MODES[currentMode];
    for (const b of buttons) {
      const current = b.id === `mode-${currentMode}`;
      b.setAttribute("aria-pressed", String(current));
      b.disabled = current;  // already so: nothing to switch
    }
    const human = currentMode === "human";
    text.disabled = !human; send.disabled = !human;
    replyHelp.textContent = human ? "Sent by SMS/WhatsApp to the customer through POST /v1/messages; it appears above once sent."
      : currentMode === "ai" ? "The AI is answering. Switch to human to reply yourself." : "The conversation is closed. Switch to human to reply.";
  };
  showMode();

  ctx.app.replaceChildren(
    el("p", { class: "crumbs" }, el("a", { href: "#/" }, "← Board")),
    el("section", { class: "card call-head", "aria-labelledby": "conv-title" },
      el("div", { class: "line" },
        el("div", { class: "title-group" }, el("h1", { id: "conv-title" }, conversation.customer_number),
          el("span", { class: "badge plain" }, conversation.channel)), state),
      el("p", { class: "muted" }, `with ${conversation.business_number} · started ${when(conversation.created_at)}`),
      el("div", { class: "mode-bar" }, el("span", {}, "Mode: "), mode, modeText),
      el("div", { class: "switches", role: "group", "aria-labelledby": "switch-label" },
        el("span", { id: "switch-label" }, "Hand over to: "), ...buttons), modeError),
    el("section", { class: "card", "aria-labelledby": "messages-h" },
      el("h2", { id: "messages-h" }, "Messages"), notice, messages, reply));

  const controller = new AbortController();
  ctx.onLeave(() => controller.abort());
  const words = { connecting: "connecting…", live: "live", reconnecting: "reconnecting…" };
  readSse(`/v1/conversations/${conversationId}/stream`, {
    signal: controller.signal,
    onEvent: (event) => {
      if (event.event_type === "conversation.mode_changed") {
        currentMode = event.payload.to_mode;
        showMode();
        switched(event);
      } else if (event.event_type.startsWith("message.")) {
        show({ id: event.payload.message_id, ...event.payload }, event.timestamp);
      }
    },
    onState: (s, t) => {
      setState(state, s, s === "error" ? t : words[s]);
      ctx.connection(s, s === "error" ? `Error: ${t}` : { connecting: "Connecting…", live: "Live", reconnecting: "Reconnecting… missed messages will be recovered" }[s]);
    },
    onResumed: (n) => ctx.notify(n ? `Reconnected: ${n} missed event${n === 1 ? "" : "s"} recovered.` : "Reconnected: nothing was missed."),
    onReset: (reason) => { notice.textContent = missing(reason); },
  });
}
