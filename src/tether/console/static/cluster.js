// Cluster (admin keys only): every live pod as it last published its stats.

import { ApiError, api } from "./api.js";
import { h, replace } from "./dom.js";
import { age, bytes, num, text } from "./format.js";
import { Poller } from "./poll.js";

const REFRESH_MS = 2000;

function health(value) {
  const ok = value === "ok";
  const idle = value === "none";
  return h("span", { class: `health ${ok ? "ok" : idle ? "idle" : "bad"}` }, idle ? "none (one pod)" : text(value));
}

export function mount(main) {
  const body = h("tbody", { id: "pod-rows" });
  const status = h("p", { class: "status", id: "status" });
  const heads = ["Pod", "Version", "Uptime", "Devices", "Relay sockets", "Frames in/s", "Frames out/s", "CPU", "Memory", "Database", "Redis"];
  replace(main,
    h("section", { class: "view", id: "view-cluster" },
      h("h1", {}, "Cluster"),
      h("div", { class: "table-wrap" },
        h("table", { class: "grid" }, h("thead", {}, h("tr", {}, heads.map((t) => h("th", { scope: "col" }, t)))), body)),
      status));

  async function refresh(signal) {
    let data;
    try {
      data = await api("/v1/tether/pods", { signal });
    } catch (err) {
      if (err instanceof ApiError && err.status === 403) {
        status.className = "status error";
        status.textContent = `The cluster page needs an admin key: ${err.message}`;
        poller.stop();
        return;
      }
      throw err;
    }
    const pods = data.pods.slice().sort((a, b) => a.podId.localeCompare(b.podId));
    replace(body, pods.map((p) =>
      h("tr", { "data-pod": p.podId },
        h("td", {}, p.podId, p.self ? h("span", { class: "tag", title: "the pod that answered this page" }, "this pod") : ""),
        h("td", {}, text(p.version)),
        h("td", {}, age((p.uptimeSeconds ?? 0) * 1000)),
        h("td", { class: "num" }, text(p.devices)),
        h("td", { class: "num" }, text(p.relaySockets)),
        h("td", { class: "num" }, num(p.framesInPerSecond, 1)),
        h("td", { class: "num" }, num(p.framesOutPerSecond, 1)),
        h("td", { class: "num" }, p.cpuPercent === null || p.cpuPercent === undefined ? "—" : `${num(p.cpuPercent, 1)} %`),
        h("td", { class: "num" }, bytes(p.rssBytes)),
        h("td", {}, health(p.database)),
        h("td", {}, health(p.redis)))));
    status.className = "status";
    status.textContent = `${pods.length} pod${pods.length === 1 ? "" : "s"} · live, refreshed every ${REFRESH_MS / 1000} s`;
  }

  const poller = new Poller(refresh, REFRESH_MS, (err) => {
    status.className = "status error";
    status.textContent = `${err.message} (${err.code})`;
  }).start();
  return { stop: () => poller.stop() };
}
