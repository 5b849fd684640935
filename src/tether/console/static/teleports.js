// Teleports: the organization's most recent ones, newest first, with their status and error.

import { api } from "./api.js";
import { h, replace } from "./dom.js";
import { stamp, text } from "./format.js";
import { Poller } from "./poll.js";

const REFRESH_MS = 3000;
const SHOWN = 50;

export function mount(main) {
  const body = h("tbody", { id: "teleport-rows" });
  const status = h("p", { class: "status", id: "status" });
  const heads = ["Created", "Status", "Error", "Agent", "Conversation", "From", "To", "Updated", "Id"];
  replace(main,
    h("section", { class: "view", id: "view-teleports" },
      h("h1", {}, "Teleports"),
      h("div", { class: "table-wrap" },
        h("table", { class: "grid" }, h("thead", {}, h("tr", {}, heads.map((t) => h("th", { scope: "col" }, t)))), body)),
      status));

  async function refresh(signal) {
    const data = await api(`/v1/tether/teleports?limit=${SHOWN}`, { signal });
    replace(body, data.items.length === 0 ? h("tr", { class: "empty" }, h("td", { colspan: heads.length }, "No teleports yet.")) :
      data.items.map((t) =>
        h("tr", { "data-id": t.id, "data-status": t.status },
          h("td", {}, stamp(t.createdAt)),
          h("td", {}, h("span", { class: `teleport teleport-${t.status}` }, t.status)),
          h("td", { class: "error-text" }, text(t.error)),
          h("td", {}, text(t.agentId)),
          h("td", {}, text(t.conversationId)),
          h("td", {}, text(t.sourceConnectionId)),
          h("td", {}, `${text(t.targetConnectionName)} (${text(t.targetConnectionId)})`),
          h("td", {}, stamp(t.updatedAt)),
          h("td", {}, h("code", {}, t.id)))));
    status.className = "status";
    status.textContent = `The latest ${SHOWN} · live, refreshed every ${REFRESH_MS / 1000} s`;
  }

  const poller = new Poller(refresh, REFRESH_MS, (err) => {
    status.className = "status error";
    status.textContent = `${err.message} (${err.code})`;
  }).start();
  return { stop: () => poller.stop() };
}
