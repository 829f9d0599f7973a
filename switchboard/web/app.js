// The Switchboard console: plain ES modules, no build step. The API key lives in sessionStorage
// only (gone with the tab) and never goes into a URL: the workspace and conversation streams
// are read with fetch and the key in a header, and a call's browser streams use a short-lived
// stream token for that one call instead.
import { KEY, key, el, api, errorBox, setState } from "./lib.js";
import { boardView } from "./board.js";
import { callView } from "./call.js";
import { conversationView } from "./conversation.js";
import { webhooksView } from "./webhooks.js";
import { keysView } from "./keys.js";

const app = document.getElementById("app");
const connection = document.getElementById("connection");
const banner = document.getElementById("banner");
let cleanup = [], bannerTimer = null;

// What the views share: where to draw, what to undo on leaving, and the header's status line.
const context = () => ({
  app,
  onLeave: (fn) => cleanup.push(fn),
  connection(state, text) {
    connection.hidden = state === "off";
    setState(connection, state, text);
  },
  notify(text, tone = "info") {
    banner.hidden = !text;
    banner.className = `banner ${tone}`;
    banner.textContent = text || "";
    clearTimeout(bannerTimer);
    if (text) bannerTimer = setTimeout(() => { banner.hidden = true; }, 20000);  // news, not a state
  },
});

function signIn(message = "") {
  const input = el("input", { type: "password", id: "api-key", name: "api-key", placeholder: "pk_live_…",
    autocomplete: "off", spellcheck: "false", required: true, "aria-describedby": "key-help" });
  const form = el("form", { class: "stack", onsubmit: async (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, input.value.trim());
    try { await api("/v1/workspace"); route(); }
    catch (error) { sessionStorage.removeItem(KEY); signIn(error.code === "UNAUTHENTICATED" ? "That key was refused: it is mistyped, revoked or from another server." : error.message); }
  } },
  el("label", { for: "api-key" }, "API key"),
  el("div", { class: "row" }, input, el("button", { id: "sign-in", class: "primary" }, "Sign in")),
  el("p", { id: "key-help", class: "muted" }, "The key printed by ", el("code", {}, "switchboard serve"),
    " on its first start, or one from ", el("code", {}, "switchboard keys create"),
    ". It stays in this tab only (sessionStorage) and is sent in a header, never in a URL."));
  app.replaceChildren(el("section", { class: "card narrow" }, el("h1", {}, "Sign in to the console"), form,
    message ? el("p", { class: "alert error", role: "alert" }, message) : null));
  input.focus();
}

async function route() {
  cleanup.forEach((fn) => { try { fn(); } catch { /* leaving anyway */ } });
  cleanup = [];
  const ctx = context();
  ctx.connection("off");
  ctx.notify("");
  const signOut = document.getElementById("sign-out"), nav = document.getElementById("nav");
  if (!key()) {
    signOut.hidden = true; nav.hidden = true;
    document.getElementById("workspace").textContent = "";
    signIn(); return;
  }
  signOut.hidden = false; nav.hidden = false;
  api("/v1/workspace").then((w) => { document.getElementById("workspace").textContent = w.name; })
    .catch(() => {});
  const [, kind, id] = location.hash.match(/^#\/(calls|conversations|webhooks|keys)(?:\/(\w+))?/) || [];
  for (const link of nav.querySelectorAll("a")) {
    const current = link.dataset.nav === (kind === "webhooks" || kind === "keys" ? kind : "board");
    if (current) link.setAttribute("aria-current", "page"); else link.removeAttribute("aria-current");
  }
  try {
    if (kind === "calls" && id) await callView(id, ctx);
    else if (kind === "conversations" && id) await conversationView(id, ctx);
    else if (kind === "webhooks") await webhooksView(ctx);
    else if (kind === "keys") await keysView(ctx);
    else await boardView(ctx);
  } catch (error) {
    app.replaceChildren(el("p", {}, el("a", { href: "#/" }, "← Board")), errorBox(error, "view-error"));
  }
}

document.getElementById("sign-out").addEventListener("click", () => { sessionStorage.removeItem(KEY); location.hash = "#/"; route(); });
// A new view: focus its content (tabindex -1), so Tab and screen readers start there.
window.addEventListener("hashchange", () => route().then(() => app.focus({ preventScroll: true })));
route();
