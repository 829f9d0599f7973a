// API keys: the list, create (the secret shown once, with a copy button), and revoke, which
// stops the key at once on every replica and ends the streams opened with it.
import { el, api, key, KEY, errorBox, when } from "./lib.js";
import { shownOnce } from "./webhooks.js";

export async function keysView(ctx) {
  const list = el("ul", { id: "keys", class: "rows" });
  const created = el("div", { id: "key-created" });
  const name = el("input", { id: "key-name", type: "text", maxlength: "200", placeholder: "e.g. reporting server" });
  const mode = el("select", { id: "key-mode" }, el("option", { value: "live" }, "live"), el("option", { value: "test" }, "test"));
  const formError = el("div", {});
  const form = el("form", { id: "key-create", class: "stack", onsubmit: async (event) => {
    event.preventDefault();
    formError.replaceChildren();
    try {
      const made = await api("/v1/keys", { method: "POST", body: JSON.stringify({ name: name.value.trim(), mode: mode.value }) });
      created.replaceChildren(shownOnce("new-key-secret", `API key “${made.name || made.id}”`, made.api_key,
        "Store it now (a secrets manager, an environment variable): only a hash is kept, so it cannot be shown again."));
      name.value = "";
      await load();
    } catch (error) { formError.replaceChildren(errorBox(error, "key-create-error")); }
  } },
  el("div", { class: "row" },
    el("label", { for: "key-name" }, "Name"), name,
    el("label", { for: "key-mode" }, "Mode"), mode,
    el("button", { class: "primary", id: "key-add" }, "Create key")),
  formError);

  ctx.app.replaceChildren(
    el("h1", {}, "API keys"),
    el("section", { class: "card", "aria-labelledby": "new-key-h" }, el("h2", { id: "new-key-h" }, "Create a key"), form, created),
    el("section", { class: "card", "aria-labelledby": "keys-h" }, el("h2", { id: "keys-h" }, "Keys"), list));

  async function load() {
    const all = [];
    let token;
    do {
      const page = await api(`/v1/keys?page_size=100${token ? `&page_token=${token}` : ""}`);
      all.push(...page.keys);
      token = page.next_page_token;
    } while (token);
    list.replaceChildren(...all.map(row));
  }

  function row(k) {
    const mine = key()?.startsWith(k.display_prefix);
    const action = el("div", { class: "action-area" });
    const node = el("li", { id: `key-${k.id}`, class: k.revoked_at ? "revoked" : "", "data-id": k.id },
      el("div", { class: "line" },
        el("span", { class: "title" }, k.name || "(no name)", mine ? el("span", { class: "badge plain" }, "this console") : null),
        k.revoked_at ? el("span", { class: "badge off" }, `revoked ${when(k.revoked_at)}`) : el("span", { class: "badge good" }, "active")),
      el("div", { class: "line meta" },
        el("code", {}, `${k.display_prefix}…`), el("span", {}, k.mode), el("span", { class: "muted" }, `created ${when(k.created_at)}`),
        el("code", { class: "muted small" }, k.id)),
      action);
    if (!k.revoked_at) {
      const revoke = el("button", { type: "button", class: "revoke danger-text" }, "Revoke");
      node.querySelector(".line.meta").append(revoke);
      revoke.addEventListener("click", () => {
        const go = el("button", { type: "button", class: "danger confirm-revoke" }, "Revoke this key");
        const cancel = el("button", { type: "button" }, "Cancel");
        action.replaceChildren(el("div", { class: "alert warn", role: "alertdialog", "aria-label": "Revoke the key" },
          el("p", {}, el("strong", {}, "Revoking is immediate and cannot be undone. "),
            "Every request with this key fails from now on, on every replica, and every stream opened with it ends now (SSE with an error frame, WebSockets with close 1008).",
            mine ? el("strong", {}, " This is the key this console is signed in with: you will be signed out.") : null),
          el("div", { class: "row" }, go, cancel)));
        go.focus();
        cancel.addEventListener("click", () => action.replaceChildren());
        go.addEventListener("click", async () => {
          go.disabled = true;
          try {
            await api(`/v1/keys/${k.id}`, { method: "DELETE" });
            if (mine) { sessionStorage.removeItem(KEY); location.hash = "#/"; location.reload(); return; }
            await load();
          } catch (error) { action.replaceChildren(errorBox(error)); }
        });
      });
    }
    return node;
  }

  try { await load(); } catch (error) { list.replaceChildren(el("li", {}, errorBox(error, "keys-error"))); }
}
