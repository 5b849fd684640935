// One environment: its fields and metadata, the history of its connection, a live trace of its frames,
// and the actions an operator takes on it, each behind a confirmation.

import { ApiError, api, enc, query } from "./api.js";
import { confirmAction, h, notify, replace } from "./dom.js";
import { age, bytes, stamp, text } from "./format.js";
import { stateBadge } from "./envs.js";
import { Poller } from "./poll.js";

const REFRESH_MS = 2000;
const TRACE_MS = 1000;
const TRACE_KEPT = 500; // as many as the router keeps per environment
const CONTENT_SHOWN = 4000; // characters of one frame's content on the page
export const MODES = ["standard", "acceptEdits", "unrestricted", "strict"];

// A v4 UUID, also where crypto.randomUUID is missing (a console served over plain http off loopback).
function uuid() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const x = [...b].map((v) => v.toString(16).padStart(2, "0")).join("");
  return `${x.slice(0, 8)}-${x.slice(8, 12)}-${x.slice(12, 16)}-${x.slice(16, 20)}-${x.slice(20)}`;
}

// "in" is towards the router: from the device on its sockets, from a client on a relay socket.
function direction(f) {
  const peer = f.channel === "relay" ? "client" : "device";
  return f.direction === "in" ? `in (from ${peer})` : `out (to ${peer})`;
}

function field(label, value) {
  return [h("dt", {}, label), h("dd", {}, value)];
}

export function mount(main, { me, id }) {
  const readOnly = me.role === "readonly";
  let row = null;
  let gone = false;

  const title = h("h1", { id: "env-title" }, "Environment");
  const summary = h("dl", { class: "fields", id: "env-fields" });
  const metadata = h("dl", { class: "fields", id: "env-metadata" });
  const history = h("tbody", { id: "env-history" });
  const status = h("p", { class: "status", id: "status" });

  // Actions.
  const why = h("p", { class: "why", id: "actions-why" });
  const agent = h("input", { id: "msg-agent", placeholder: "agent-…", value: "agent-console", "aria-label": "agent id" });
  const conversation = h("input", { id: "msg-conversation", value: "default", "aria-label": "conversation id" });
  const message = h("input", { id: "msg-text", value: "Hello from the Tether console", "aria-label": "message text" });
  const send = h("button", { type: "button", id: "send" }, "Send test message");
  const disconnect = h("button", { type: "button", id: "disconnect", class: "secondary" }, "Disconnect");
  const forget = h("button", { type: "button", id: "forget", class: "danger" }, "Forget");
  const mode = h("select", { id: "mode", "aria-label": "permission mode" }, MODES.map((m) => h("option", { value: m }, m)));
  const applyMode = h("button", { type: "button", id: "apply-mode", class: "secondary" }, "Change mode");
  let modePicked = false;
  mode.addEventListener("change", () => (modePicked = true));

  // Trace.
  const traceOn = h("input", { type: "checkbox", id: "trace-on", checked: true });
  const traceContents = h("input", { type: "checkbox", id: "trace-contents" });
  const traceRows = h("tbody", { id: "trace-rows" });
  const traceStatus = h("p", { class: "status", id: "trace-status" });
  let frames = [];
  let after = 0;

  replace(main,
    h("section", { class: "view", id: "view-env" },
      h("p", {}, h("a", { href: "#/envs" }, "← Environments")),
      title,
      status,
      h("div", { class: "panels" },
        h("div", { class: "panel" }, h("h2", {}, "Connection"), summary),
        h("div", { class: "panel", id: "actions" },
          h("h2", {}, "Actions"),
          why,
          h("div", { class: "action" }, h("label", {}, "Agent ", agent), h("label", {}, "Conversation ", conversation),
            h("label", { class: "wide" }, "Text ", message), send),
          h("div", { class: "action" }, h("label", {}, "Permission mode ", mode), applyMode),
          h("div", { class: "action" }, disconnect, forget)),
        h("div", { class: "panel" }, h("h2", {}, "Metadata"), metadata)),
      h("div", { class: "panel" },
        h("h2", {}, "History"),
        h("table", { class: "grid" },
          h("thead", {}, h("tr", {}, ["When", "Event", "Close code", "Reason", "Pod"].map((t) => h("th", { scope: "col" }, t)))),
          history)),
      h("div", { class: "panel" },
        h("h2", {}, "Live trace"),
        h("div", { class: "filters" },
          h("label", {}, traceOn, " Trace frames"),
          h("label", {}, traceContents, " Show contents")),
        traceStatus,
        h("table", { class: "grid" },
          h("thead", {}, h("tr", {}, ["Seq", "Time", "Direction", "Channel", "Type", "Size", "Content"].map((t) => h("th", { scope: "col" }, t)))),
          traceRows))));

  function online() {
    return row !== null && row.connectionId !== null && row.state !== "offline";
  }

  function renderActions() {
    const connected = online();
    let reason = "";
    if (readOnly) reason = "This key is read-only: it can look but not act (the router refuses its writes with 403 FORBIDDEN).";
    else if (gone) reason = "This environment no longer exists.";
    else if (!connected) reason = "Offline: no socket holds this environment, so only Forget is possible.";
    why.textContent = reason;
    why.hidden = reason === "";
    for (const control of [send, disconnect, applyMode, agent, conversation, message, mode]) {
      control.disabled = readOnly || gone || !connected;
      control.title = reason;
    }
    forget.disabled = readOnly || gone;
    forget.title = reason;
  }

  function render() {
    title.replaceChildren(text(row.connectionName), " ", stateBadge(row.state),
      row.pendingApproval ? h("span", { class: "flag" }, "approval waiting") : "");
    const asOf = Date.now();
    replace(summary,
      field("Row id", row.id),
      field("Device id", text(row.deviceId)),
      field("Connection id", text(row.connectionId)),
      field("User", row.userId === me.userId ? `${me.userName} (me)` : text(row.userId)),
      field("Heartbeat", age(row.heartbeatAgeMs)),
      field("OS", text(row.os)),
      field("Letta Code", text(row.lettaCodeVersion)),
      field("Working directory", text(row.workingDirectory)),
      field("Branch", text(row.gitBranch)),
      field("Permission mode", text(row.permissionMode)),
      field("Pod", text(row.podId)),
      field("Connected since", row.connectedAt ? `${stamp(row.connectedAt)} (${age(asOf - row.connectedAt)})` : "—"),
      field("First seen", stamp(row.firstSeenAt)),
      field("Last seen", stamp(row.lastSeenAt)),
      field("Relay sockets", text(row.relaySockets)));
    const meta = row.metadata ?? {};
    const keys = Object.keys(meta).sort();
    replace(metadata, keys.length === 0 ? h("dd", {}, "—") :
      keys.map((k) => field(k, typeof meta[k] === "string" ? meta[k] : JSON.stringify(meta[k]))));
    const events = row.history ?? [];
    replace(history, events.length === 0 ? h("tr", { class: "empty" }, h("td", { colspan: 5 }, "No history yet.")) :
      events.map((e) => h("tr", { "data-event": e.event },
        h("td", {}, stamp(e.at)), h("td", {}, e.event), h("td", {}, text(e.code)), h("td", {}, text(e.reason)), h("td", {}, text(e.podId)))));
    // The operator's pick stands until applied; until then the select follows the device.
    if (!modePicked && MODES.includes(row.permissionMode)) mode.value = row.permissionMode;
    renderActions();
  }

  async function refresh(signal) {
    try {
      row = await api(`/v1/tether/environments/${enc(id)}`, { signal });
    } catch (err) {
      if (err instanceof ApiError && err.status === 404) {
        gone = true;
        renderActions();
        status.className = "status error";
        status.textContent = "This environment is not in your organization (or was forgotten).";
        poller.stop();
        trace.stop();
        return;
      }
      throw err;
    }
    status.className = "status";
    status.textContent = `Live: refreshed every ${REFRESH_MS / 1000} s`;
    render();
  }

  function renderTrace() {
    const shown = frames.slice().reverse();
    replace(traceRows, shown.length === 0 ? h("tr", { class: "empty" }, h("td", { colspan: 7 }, "No frames yet.")) :
      shown.map((f) => {
        let content = "";
        // The router records a frame's text only while a poll asks for contents (null before that).
        if (f.content === null) content = h("span", { class: "muted" }, "not recorded (contents were off)");
        else if (f.content !== undefined) {
          const body = typeof f.content === "string" ? f.content : JSON.stringify(f.content);
          content = h("code", {}, body.length > CONTENT_SHOWN ? `${body.slice(0, CONTENT_SHOWN)}…` : body);
        }
        return h("tr", { "data-seq": f.seq, "data-type": f.type },
          h("td", { class: "num" }, f.seq), h("td", {}, new Date(f.at).toLocaleTimeString()),
          h("td", {}, direction(f)), h("td", {}, text(f.channel)),
          h("td", {}, text(f.type)), h("td", { class: "num" }, bytes(f.size)), h("td", { class: "content" }, content));
      }));
  }

  async function pollTrace(signal) {
    if (!traceOn.checked || gone) return;
    let data;
    try {
      data = await api(`/v1/tether/environments/${enc(id)}/trace${query({ after, contents: traceContents.checked })}`, { signal });
    } catch (err) {
      if (err instanceof ApiError && (err.status === 403 || err.status === 404)) {
        traceStatus.className = "status error";
        traceStatus.textContent = err.status === 403
          ? `No trace: ${err.message} (members trace their own devices only; admins trace every device of the organization).`
          : "No trace: the environment is gone.";
        traceOn.checked = false;
        traceOn.disabled = true;
        return;
      }
      throw err;
    }
    if (data.frames.length > 0) {
      frames = frames.concat(data.frames).slice(-TRACE_KEPT);
      renderTrace();
    }
    after = data.next ?? after;
    traceStatus.className = "status";
    traceStatus.textContent = `Tracing (${frames.length} frames shown, newest first; the router keeps the last ${TRACE_KEPT}).`;
  }

  traceOn.addEventListener("change", () => {
    if (traceOn.checked) trace.now();
    else traceStatus.textContent = "Trace paused (tracing stops on the router 30 s after the last look).";
  });
  traceContents.addEventListener("change", () => {
    // Read the kept frames again, now with (or without) their contents.
    frames = [];
    after = 0;
    renderTrace();
    trace.now();
  });

  async function act(title, textLine, okLabel, danger, run) {
    if (!(await confirmAction(title, textLine, okLabel, danger))) return;
    try {
      await run();
    } catch (err) {
      notify(`${title} failed: ${err.message} (${err.code})`, "error");
    }
    poller.now();
  }

  send.addEventListener("click", () => {
    const agentId = agent.value.trim();
    const body = message.value;
    if (!agentId || !body) {
      notify("An agent id and a text are needed.", "error");
      return;
    }
    act("Send a test message", `Send "${body}" to agent ${agentId} on ${row.connectionName}?`, "Send", false, async () => {
      const answer = await api(`/v1/environments/${enc(row.connectionId)}/messages`, {
        method: "POST",
        body: {
          agentId,
          conversationId: conversation.value.trim() || "default",
          messages: [{ role: "user", content: body, client_message_id: uuid(), otid: uuid() }],
        },
      });
      if (answer.success) notify(`Delivered to ${row.connectionName}: ${answer.message}`);
      else notify(`Not delivered: ${answer.message}`, "error");
    });
  });
  disconnect.addEventListener("click", () =>
    act("Disconnect", `Close ${row.connectionName}'s sockets? The device reconnects on its own within seconds.`, "Disconnect", false, async () => {
      await api(`/v1/tether/environments/${enc(id)}/disconnect`, { method: "POST" });
      notify(`${row.connectionName} disconnected; it reconnects on its own.`);
    }));
  applyMode.addEventListener("click", () =>
    act("Change permission mode", `Set ${row.connectionName}'s permission mode to ${mode.value}?`, "Change", false, async () => {
      await api(`/v1/tether/environments/${enc(id)}/mode`, { method: "POST", body: { mode: mode.value } });
      notify(`Asked ${row.connectionName} to switch to ${mode.value}.`);
      modePicked = false;
    }));
  forget.addEventListener("click", () =>
    act("Forget", `Forget ${row?.connectionName ?? id}? Its row is deleted; a device still running registers again as a new row.`, "Forget", true, async () => {
      await api(`/v1/environments/${enc(id)}`, { method: "DELETE" });
      notify(`${row?.connectionName ?? id} forgotten.`);
      location.hash = "#/envs";
    }));

  renderActions();
  renderTrace();
  const fail = (target) => (err) => {
    target.className = "status error";
    target.textContent = `${err.message} (${err.code})`;
  };
  const poller = new Poller(refresh, REFRESH_MS, fail(status)).start();
  const trace = new Poller(pollTrace, TRACE_MS, fail(traceStatus)).start();
  return { stop: () => { poller.stop(); trace.stop(); } };
}
