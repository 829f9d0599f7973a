// Webhook endpoints: their filters and state, create, enable and disable, rotate the secret
// (shown once), the delivery log with every attempt, redeliver, and a test send.
import { el, api, errorBox, when, copyButton } from "./lib.js";

const CATALOGUE = [
  "call.initiated", "call.transcription", "call.agent_response", "call.barge_in", "call.idle_silence",
  "call.quality_degraded", "call.quality", "call.dtmf_sent", "call.completed",
  "message.received", "message.sent", "message.delivered", "message.read", "message.failed",
  "conversation.mode_changed",
];

// A secret, shown this once: a labelled read-only field, a copy button, and what to do with it.
export function shownOnce(id, label, secret, what) {
  const field = el("input", { id, type: "text", readonly: true, value: secret, class: "secret", "aria-label": label, spellcheck: "false" });
  return el("div", { class: "alert once", role: "status" },
    el("strong", {}, `${label}: shown this once.`), " ", what,
    el("div", { class: "row" }, field, copyButton(secret)));
}

// A confirmation in the page (no window.confirm): the warning, a button that does it, Cancel.
function confirmInline(holder, warning, label, action) {
  const go = el("button", { type: "button", class: "danger" }, label);
  const cancel = el("button", { type: "button" }, "Cancel");
  const box = el("div", { class: "alert warn confirm", role: "alertdialog", "aria-label": label }, el("p", {}, warning), el("div", { class: "row" }, go, cancel));
  go.addEventListener("click", async () => { go.disabled = true; await action(); box.remove(); });
  cancel.addEventListener("click", () => box.remove());
  holder.replaceChildren(box);
  go.focus();
}

export async function webhooksView(ctx) {
  const list = el("ul", { id: "webhooks", class: "endpoints" });
  const created = el("div", { id: "webhook-created" });
  const url = el("input", { id: "webhook-url", type: "url", required: true, placeholder: "https://example.com/hooks/switchboard", "aria-describedby": "url-help" });
  const boxes = CATALOGUE.map((type) => el("label", { class: "check" }, el("input", { type: "checkbox", name: "event_types", value: type }), type));
  const formError = el("div", {});
  const form = el("form", { id: "webhook-create", class: "stack", onsubmit: async (event) => {
    event.preventDefault();
    formError.replaceChildren();
    const types = boxes.map((b) => b.querySelector("input")).filter((i) => i.checked).map((i) => i.value);
    try {
      const hook = await api("/v1/webhooks", { method: "POST", body: JSON.stringify({ url: url.value.trim(), event_types: types.length ? types : null }) });
      created.replaceChildren(shownOnce("webhook-secret", "Signing secret", hook.secret,
        "Give it to the receiver to verify X-Voicebip-Signature; it cannot be shown again (rotate to get a new one)."));
      url.value = ""; boxes.forEach((b) => { b.querySelector("input").checked = false; });
      await load();
    } catch (error) { formError.replaceChildren(errorBox(error, "webhook-create-error")); }
  } },
  el("label", { for: "webhook-url" }, "Endpoint URL"),
  el("div", { class: "row" }, url, el("button", { class: "primary", id: "webhook-add" }, "Add endpoint")),
  el("p", { id: "url-help", class: "muted small" }, "Every event is POSTed there, signed, and retried for 24 hours until it answers 2xx."),
  el("details", { class: "filter" }, el("summary", {}, "Only some event types (leave all unticked for every event)"),
    el("fieldset", {}, el("legend", { class: "sr-only" }, "Event types"), el("div", { class: "checks" }, ...boxes))),
  formError);

  ctx.app.replaceChildren(
    el("h1", {}, "Webhooks"),
    el("section", { class: "card", "aria-labelledby": "new-hook-h" }, el("h2", { id: "new-hook-h" }, "Add an endpoint"), form, created),
    el("section", { class: "card", "aria-labelledby": "hooks-h" }, el("h2", { id: "hooks-h" }, "Endpoints"), list));

  async function load() {
    const page = await api("/v1/webhooks?page_size=100");
    if (!page.webhooks.length) {
      list.replaceChildren(el("li", { class: "empty muted" }, "No endpoints yet: add one above."));
      return;
    }
    const open = new Set([...list.querySelectorAll("li.endpoint[data-open]")].map((n) => n.dataset.id));
    list.replaceChildren(...page.webhooks.map((hook) => endpoint(hook, open.has(hook.id))));
  }

  function endpoint(hook, logOpen) {
    const node = el("li", { class: "endpoint", id: `webhook-${hook.id}`, "data-id": hook.id });
    const action = el("div", { class: "action-area" });
    const testResult = el("p", { class: "test-result", id: `test-result-${hook.id}`, role: "status" });
    const log = el("div", { class: "log", id: `deliveries-${hook.id}` });
    const toggle = el("button", { type: "button", class: "toggle" }, hook.enabled ? "Disable" : "Enable");
    toggle.addEventListener("click", async () => {
      try {
        const updated = await api(`/v1/webhooks/${hook.id}`, { method: "PATCH", body: JSON.stringify({ enabled: !hook.enabled }) });
        node.replaceWith(endpoint(updated, node.hasAttribute("data-open")));
        document.querySelector(`#webhook-${hook.id} .toggle`)?.focus();
      } catch (error) { action.replaceChildren(errorBox(error)); }
    });
    const rotate = el("button", { type: "button", class: "rotate" }, "Rotate secret");
    rotate.addEventListener("click", () => confirmInline(action,
      "A new secret signs from now on; the current one keeps signing too (X-Voicebip-Signature-Previous) for 24 hours, so update the receiver within a day.",
      "Rotate now", async () => {
        try {
          const rotated = await api(`/v1/webhooks/${hook.id}/rotate-secret`, { method: "POST" });
          created.replaceChildren();  // a secret shown earlier is not the one that signs now
          const fresh = endpoint(rotated, node.hasAttribute("data-open"));
          node.replaceWith(fresh);
          fresh.querySelector(".action-area").replaceChildren(shownOnce(`rotated-secret-${hook.id}`, "New signing secret", rotated.secret,
            "Put it in the receiver's configuration; it cannot be shown again."));
        } catch (error) { action.replaceChildren(errorBox(error)); }
      }));
    const edit = el("button", { type: "button", class: "edit-filter" }, "Edit filter");
    edit.addEventListener("click", () => {
      const ticks = CATALOGUE.map((type) => el("label", { class: "check" },
        el("input", { type: "checkbox", value: type, checked: hook.event_types?.includes(type) || null }), type));
      const save = el("button", { type: "button", class: "primary" }, "Save filter");
      const cancel = el("button", { type: "button" }, "Cancel");
      save.addEventListener("click", async () => {
        const types = ticks.map((t) => t.querySelector("input")).filter((i) => i.checked).map((i) => i.value);
        try {
          const updated = await api(`/v1/webhooks/${hook.id}`, { method: "PATCH", body: JSON.stringify({ event_types: types.length ? types : null }) });
          node.replaceWith(endpoint(updated, node.hasAttribute("data-open")));
        } catch (error) { action.append(errorBox(error)); }
      });
      cancel.addEventListener("click", () => action.replaceChildren());
      action.replaceChildren(el("fieldset", { class: "alert" },
        el("legend", {}, "Event types sent to this endpoint (none ticked: every event)"),
        el("div", { class: "checks" }, ...ticks), el("div", { class: "row" }, save, cancel)));
    });
    const remove = el("button", { type: "button", class: "danger-text" }, "Delete");
    remove.addEventListener("click", () => confirmInline(action,
      "Deleting stops every delivery to this URL, including those waiting for a retry.", "Delete endpoint",
      async () => {
        try { await api(`/v1/webhooks/${hook.id}`, { method: "DELETE" }); await load(); }
        catch (error) { action.replaceChildren(errorBox(error)); }
      }));
    const test = el("button", { type: "button", class: "test" }, "Send a test event");
    test.addEventListener("click", async () => {
      test.disabled = true;
      testResult.className = "test-result muted";
      testResult.textContent = "Sending a signed sample call.completed…";
      try {
        const r = await api("/v1/webhooks/test", { method: "POST", body: JSON.stringify({ webhook_id: hook.id }) });
        testResult.className = `test-result ${r.ok ? "ok" : "error"}`;
        testResult.textContent = r.ok
          ? `Test delivered: HTTP ${r.status_code} in ${Math.round(r.latency_ms)} ms.`
          : `Test failed: ${r.status_code ? `HTTP ${r.status_code}` : r.error} after ${Math.round(r.latency_ms)} ms. Check that the receiver is up and answers 2xx.`;
      } catch (error) { testResult.replaceChildren(errorBox(error)); }
      test.disabled = false;
    });
    const logButton = el("button", { type: "button", class: "log-toggle", "aria-expanded": String(logOpen), "aria-controls": `deliveries-${hook.id}` }, "Delivery log");
    const showLog = async (open) => {
      logButton.setAttribute("aria-expanded", String(open));
      logButton.textContent = open ? "Hide delivery log" : "Delivery log";
      if (open) { node.setAttribute("data-open", ""); await deliveries(hook, log); }
      else { node.removeAttribute("data-open"); log.replaceChildren(); }
    };
    logButton.addEventListener("click", () => showLog(logButton.getAttribute("aria-expanded") !== "true"));
    node.append(
      el("div", { class: "line" }, el("code", { class: "title url" }, hook.url),
        el("span", { class: `badge ${hook.enabled ? "good" : "off"}`, "data-enabled": String(hook.enabled) }, hook.enabled ? "enabled" : "disabled")),
      el("div", { class: "line meta" },
        el("span", {}, hook.event_types ? `only ${hook.event_types.join(", ")}` : "every event type"),
        el("span", { class: "muted" }, `added ${when(hook.created_at)}`),
        hook.secret_rotated_until ? el("span", { class: "muted" }, `previous secret signs until ${when(hook.secret_rotated_until)}`) : null),
      el("div", { class: "row buttons" }, toggle, test, edit, rotate, logButton, remove),
      action, testResult, log);
    if (logOpen) showLog(true);
    return node;
  }

  // The log of one endpoint, newest first; a redelivered one is watched until it settles.
  async function deliveries(hook, holder, token) {
    let page;
    try { page = await api(`/v1/webhooks/${hook.id}/deliveries?page_size=20${token ? `&page_token=${token}` : ""}`); }
    catch (error) { holder.replaceChildren(errorBox(error)); return; }
    const rows = page.deliveries.map((d) => delivery(hook, d, holder));
    const refresh = el("button", { type: "button", class: "refresh" }, "Refresh");
    refresh.addEventListener("click", () => deliveries(hook, holder));
    const older = page.next_page_token ? el("button", { type: "button", class: "more" }, "Older deliveries") : null;
    older?.addEventListener("click", async () => {
      older.remove();
      const more = el("div", {});
      holder.append(more);
      await deliveries(hook, more, page.next_page_token);
    });
    const content = [
      token ? null : el("div", { class: "line" }, el("h3", {}, "Deliveries"), refresh),
      rows.length ? el("ul", { class: "deliveries" }, ...rows) : el("p", { class: "muted" }, "Nothing delivered yet."),
      older,
    ];
    holder.replaceChildren(...content.filter(Boolean));
  }

  function delivery(hook, d, holder) {
    const attempts = d.attempts.map((a, i) => el("li", { class: a.status_code && a.status_code < 300 ? "ok" : "error" },
      el("span", {}, `#${i + 1} ${when(a.attempted_at)}`),
      el("span", {}, a.status_code ? `HTTP ${a.status_code}` : "no answer"),
      a.latency_ms == null ? null : el("span", {}, `${Math.round(a.latency_ms)} ms`),
      a.error ? el("span", { class: "err" }, a.error) : null,
      a.next_attempt_at ? el("span", { class: "muted" }, `next try ${when(a.next_attempt_at)}`) : null));
    const row = el("li", { class: `delivery status-${d.status}`, id: `delivery-${d.id}`, "data-status": d.status },
      el("div", { class: "line" },
        el("span", {}, el("strong", {}, d.event_type), " ", el("code", { class: "muted small" }, d.event_id)),
        el("span", { class: `badge status-${d.status}` }, d.status)),
      el("div", { class: "line meta" },
        el("span", { class: "muted" }, `created ${when(d.created_at)}`),
        el("span", {}, `${d.attempts.length} attempt${d.attempts.length === 1 ? "" : "s"}`),
        d.next_attempt_at ? el("span", {}, `next attempt ${when(d.next_attempt_at)}`) : null),
      attempts.length ? el("ol", { class: "attempts", "aria-label": "Attempts" }, ...attempts) : null);
    if (d.status !== "pending") {
      const again = el("button", { type: "button", class: "redeliver" }, d.status === "failed" ? "Redeliver" : "Send again");
      again.addEventListener("click", async () => {
        again.disabled = true;
        try {
          await api(`/v1/webhooks/${hook.id}/deliveries/${d.id}/redeliver`, { method: "POST" });
          await deliveries(hook, holder);
          watch(hook, d.id, holder);
        } catch (error) { row.append(errorBox(error)); again.disabled = false; }
      });
      row.append(again);
    }
    return row;
  }

  // After a redelivery, re-read the log a few times (1, 2, 3, 5, 8 s...) until that delivery is
  // no longer pending: the sender picks it up within a second or two.
  async function watch(hook, deliveryId, holder) {
    for (const wait of [1000, 1000, 2000, 3000, 5000, 8000, 13000]) {
      await new Promise((resolve) => setTimeout(resolve, wait));
      if (!holder.isConnected) return;
      await deliveries(hook, holder);
      const status = holder.querySelector(`#delivery-${deliveryId}`)?.dataset.status;
      if (status && status !== "pending") return;
    }
  }

  try { await load(); } catch (error) { list.replaceChildren(el("li", {}, errorBox(error, "webhooks-error"))); }
}
