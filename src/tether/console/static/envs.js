// Environments: one page of the organization's rows at a time, filtered, sorted and counted by the
// router. Only the visible page is ever fetched (at most 200 rows), so 10,000 devices cost the browser
// what 50 do. The filters live in the address (#/envs?q=...), so a view can be bookmarked or shared.

import { api, enc, query } from "./api.js";
import { h, replace } from "./dom.js";
import { STATES, STATE_TEXT, age, text } from "./format.js";
import { Poller } from "./poll.js";

const REFRESH_MS = 2000;
const PAGE_SIZES = [25, 50, 100, 200];
const DEFAULTS = { q: "", state: "", user: "", sort: "firstSeenAt", order: "desc", offset: 0, limit: 50 };

export function stateBadge(state) {
  return h("span", { class: `state state-${state}`, "data-state": state }, STATE_TEXT[state] ?? text(state));
}

function ago(at, asOf) {
  return at ? `${age(asOf - at)} ago` : "—";
}

function readParams(params) {
  const view = { ...DEFAULTS };
  for (const name of ["q", "state", "user", "sort", "order"]) view[name] = params.get(name) ?? DEFAULTS[name];
  const offset = Number.parseInt(params.get("offset") ?? "", 10);
  const limit = Number.parseInt(params.get("limit") ?? "", 10);
  view.offset = Number.isFinite(offset) && offset > 0 ? offset : 0;
  view.limit = PAGE_SIZES.includes(limit) ? limit : DEFAULTS.limit;
  if (view.order !== "asc" && view.order !== "desc") view.order = DEFAULTS.order;
  return view;
}

export function mount(main, { me, params }) {
  const view = readParams(params);
  let lastUsers = new Set();

  const columns = [
    { label: "Name", sort: "name", cell: (r) => h("a", { href: `#/env/${enc(r.id)}`, class: "env-link" }, text(r.connectionName)) },
    { label: "State", sort: "state", cell: (r) => stateBadge(r.state) },
    { label: "Heartbeat", sort: "heartbeat", cell: (r) => age(r.heartbeatAgeMs) },
    { label: "OS", cell: (r) => text(r.os) },
    { label: "Version", sort: "version", cell: (r) => text(r.lettaCodeVersion) },
    { label: "Working directory", cell: (r) => h("span", { class: "path", title: r.workingDirectory ?? "" }, text(r.workingDirectory)) },
    { label: "Branch", cell: (r) => text(r.gitBranch) },
    { label: "Mode", cell: (r) => text(r.permissionMode) },
    { label: "Pod", sort: "pod", cell: (r) => text(r.podId) },
    { label: "Connected", sort: "connectedAt", cell: (r, asOf) => ago(r.connectedAt, asOf) },
    { label: "First seen", sort: "firstSeenAt", cell: (r, asOf) => ago(r.firstSeenAt, asOf) },
    { label: "Relay", cell: (r) => text(r.relaySockets), class: "num" },
    {
      label: "User",
      cell: (r) =>
        r.userId
          ? h("button", { type: "button", class: "link", title: "show only this user's environments", onclick: () => setFilter({ user: r.userId }) },
              r.userId === me.userId ? `${me.userName} (me)` : r.userId)
          : "—",
    },
    { label: "Approval", cell: (r) => (r.pendingApproval ? h("span", { class: "flag", title: "a conversation waits for an approval" }, "waiting") : "") },
  ];

  const search = h("input", { type: "search", id: "search", placeholder: "Search name, device id, directory, branch, OS, version", value: view.q, "aria-label": "search" });
  const onlineOnly = h("input", { type: "checkbox", id: "online-only" });
  const stateSelect = h("select", { id: "state-filter", "aria-label": "state" },
    h("option", { value: "" }, "any state"), STATES.map((s) => h("option", { value: s }, STATE_TEXT[s])));
  const userSelect = h("select", { id: "user-filter", "aria-label": "user" });
  const pageSize = h("select", { id: "page-size", "aria-label": "rows per page" }, PAGE_SIZES.map((n) => h("option", { value: n }, `${n} per page`)));
  const counts = h("div", { class: "counts", id: "counts" });
  const head = h("tr");
  const body = h("tbody", { id: "env-rows" });
  const range = h("span", { id: "range" });
  const prev = h("button", { type: "button", id: "prev", class: "secondary", onclick: () => setFilter({ offset: Math.max(0, view.offset - view.limit) }, false) }, "← Previous");
  const next = h("button", { type: "button", id: "next", class: "secondary", onclick: () => setFilter({ offset: view.offset + view.limit }, false) }, "Next →");
  const status = h("p", { class: "status", id: "status" });

  for (const col of columns) {
    const th = h("th", { scope: "col" });
    if (col.sort) {
      th.append(h("button", { type: "button", class: "sort", "data-sort": col.sort, onclick: () => sortBy(col.sort) }, col.label));
      th.dataset.sort = col.sort;
    } else th.textContent = col.label;
    head.append(th);
  }

  replace(main,
    h("section", { class: "view", id: "view-envs" },
      h("h1", {}, "Environments"),
      counts,
      h("div", { class: "filters" },
        search,
        h("label", {}, onlineOnly, " Online only"),
        stateSelect,
        userSelect,
        pageSize),
      h("div", { class: "table-wrap" }, h("table", { class: "grid", id: "env-table" }, h("thead", {}, head), body)),
      h("div", { class: "pager" }, prev, range, next),
      status));

  let userOptions = "";

  // Leaves the search box alone: it is the operator's while they type.
  function renderControls() {
    onlineOnly.checked = view.state === "online";
    stateSelect.value = STATES.includes(view.state) ? view.state : "";
    stateSelect.disabled = onlineOnly.checked;
    pageSize.value = String(view.limit);
    const users = new Set(lastUsers);
    if (view.user) users.add(view.user);
    users.delete(me.userId);
    const others = [...users].sort();
    if (others.join("\n") !== userOptions || userSelect.options.length === 0) {
      // Rebuilt only when the users seen change, so an open drop-down is not closed by a refresh.
      userOptions = others.join("\n");
      replace(userSelect,
        h("option", { value: "" }, "all users"),
        h("option", { value: me.userId }, `mine (${me.userName})`),
        others.map((u) => h("option", { value: u }, u)));
    }
    userSelect.value = view.user;
    for (const th of head.children) {
      if (!th.dataset.sort) continue;
      const active = th.dataset.sort === view.sort;
      th.setAttribute("aria-sort", active ? (view.order === "asc" ? "ascending" : "descending") : "none");
      th.classList.toggle("sorted", active);
      th.classList.toggle("asc", active && view.order === "asc");
    }
  }

  function writeAddress() {
    const changed = {};
    for (const [name, value] of Object.entries(view)) if (value !== DEFAULTS[name]) changed[name] = value;
    history.replaceState(null, "", `#/envs${query(changed)}`);
  }

  function setFilter(change, resetOffset = true) {
    Object.assign(view, change);
    if (resetOffset && !("offset" in change)) view.offset = 0;
    writeAddress();
    renderControls();
    poller.now();
  }

  function sortBy(key) {
    if (view.sort === key) setFilter({ order: view.order === "asc" ? "desc" : "asc" });
    else setFilter({ sort: key, order: key === "heartbeat" || key === "firstSeenAt" || key === "connectedAt" ? "desc" : "asc" });
  }

  let typing = 0;
  search.addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => setFilter({ q: search.value.trim() }), 250);
  });
  onlineOnly.addEventListener("change", () => setFilter({ state: onlineOnly.checked ? "online" : "" }));
  stateSelect.addEventListener("change", () => setFilter({ state: stateSelect.value }));
  userSelect.addEventListener("change", () => setFilter({ user: userSelect.value }));
  pageSize.addEventListener("change", () => setFilter({ limit: Number(pageSize.value) }));

  function renderCounts(data) {
    const total = STATES.reduce((n, s) => n + (data.counts?.[s] ?? 0), 0);
    replace(counts,
      h("button", { type: "button", class: `count${view.state === "" ? " active" : ""}`, "data-count": "all", onclick: () => setFilter({ state: "" }) },
        h("strong", {}, total), " all"),
      STATES.map((s) =>
        h("button", { type: "button", class: `count count-${s}${view.state === s ? " active" : ""}`, "data-count": s, onclick: () => setFilter({ state: s }) },
          h("strong", {}, data.counts?.[s] ?? 0), ` ${s}`)));
  }

  function renderRows(data) {
    if (data.items.length === 0) {
      replace(body, h("tr", { class: "empty" }, h("td", { colspan: columns.length }, "No environments match.")));
    } else {
      replace(body, data.items.map((row) =>
        h("tr", { "data-id": row.id, "data-state": row.state },
          columns.map((col) => h("td", { class: col.class }, col.cell(row, data.asOf))))));
    }
    const first = data.total === 0 ? 0 : data.offset + 1;
    range.textContent = `${first}–${data.offset + data.items.length} of ${data.total}`;
    prev.disabled = data.offset === 0;
    next.disabled = !data.hasNextPage;
  }

  async function refresh(signal) {
    const data = await api(`/v1/tether/environments${query({
      limit: view.limit, offset: view.offset, sort: view.sort, order: view.order,
      q: view.q, state: view.state, userId: view.user,
    })}`, { signal });
    if (data.items.length === 0 && data.offset > 0 && data.total > 0) {
      // The page emptied under us (rows forgotten): step back to the last page that has rows.
      view.offset = Math.max(0, Math.floor((data.total - 1) / view.limit) * view.limit);
      writeAddress();
      poller.now();
      return;
    }
    for (const row of data.items) if (row.userId) lastUsers.add(row.userId);
    if (lastUsers.size > 100) lastUsers = new Set([...lastUsers].slice(-100));
    renderCounts(data);
    renderRows(data);
    renderControls();
    status.className = "status";
    status.textContent = `Live: refreshed every ${REFRESH_MS / 1000} s · updated ${new Date(data.asOf).toLocaleTimeString()}`;
  }

  renderControls();
  const poller = new Poller(refresh, REFRESH_MS, (err) => {
    status.className = "status error";
    status.textContent = `${err.message} (${err.code})`;
  }).start();
  return { stop: () => { clearTimeout(typing); poller.stop(); } };
}
