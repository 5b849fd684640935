// The console's entry point: sign-in, the header, and hash routing between the views.

import { ApiError, api, keepKey, signOut, storedKey, takeNotice } from "./api.js";
import { h, replace } from "./dom.js";
import * as cluster from "./cluster.js";
import * as env from "./env.js";
import * as envs from "./envs.js";
import * as teleports from "./teleports.js";

const main = document.getElementById("main");
let me = null;
let current = null;

function signInPage(message) {
  document.getElementById("top").hidden = true;
  const key = h("input", { type: "password", id: "key", name: "key", autocomplete: "off", spellcheck: "false", required: true, placeholder: "tk_…" });
  const error = h("p", { class: "error", id: "sign-in-error", role: "alert", hidden: !message }, message ?? "");
  const button = h("button", { type: "submit", id: "sign-in" }, "Sign in");
  const form = h("form", { class: "sign-in", id: "sign-in-form" },
    h("h1", {}, "Tether console"),
    h("p", {}, "Sign in with an API key (",
      h("code", {}, "tether keys create --org ORG --user USER"),
      "; `make run` prints a development key). The key is kept in this tab only and forgotten when it closes."),
    h("label", { for: "key" }, "API key"),
    key,
    button,
    error);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const secret = key.value.trim();
    if (!secret) return;
    button.disabled = true;
    error.hidden = true;
    try {
      const who = await api("/v1/tether/whoami", { key: secret });
      keepKey(secret);
      key.value = "";
      start(who);
    } catch (err) {
      error.textContent = err instanceof ApiError && err.status === 401
        ? `That key was refused: ${err.message}.`
        : `Could not sign in: ${err.message}`;
      error.hidden = false;
      key.select();
    } finally {
      button.disabled = false;
    }
  });
  replace(main, form);
  key.focus();
}

function start(who) {
  me = who;
  document.getElementById("top").hidden = false;
  document.getElementById("nav-cluster").hidden = me.role !== "admin";
  replace(document.getElementById("who"),
    h("span", { id: "who-user" }, me.userName), " · ",
    h("span", { id: "who-org" }, me.orgName), " · ",
    h("span", { class: `role role-${me.role}`, id: "who-role" }, me.role));
  if (!location.hash || location.hash === "#") history.replaceState(null, "", "#/envs");
  route();
}

function parse() {
  const hash = location.hash.replace(/^#\/?/, "");
  const [path, search = ""] = hash.split("?", 2);
  const [name, ...rest] = path.split("/");
  return { name: name || "envs", id: rest.length ? decodeURIComponent(rest.join("/")) : null, params: new URLSearchParams(search) };
}

function route() {
  if (!me) return;
  current?.stop();
  current = null;
  const { name, id, params } = parse();
  for (const link of document.querySelectorAll("#nav a")) {
    link.classList.toggle("active", link.dataset.view === name || (name === "env" && link.dataset.view === "envs"));
  }
  if (name === "env" && id) current = env.mount(main, { me, id });
  else if (name === "cluster" && me.role === "admin") current = cluster.mount(main, { me });
  else if (name === "cluster") replace(main, h("p", { class: "error", role: "alert" }, "The cluster page needs an admin key."));
  else if (name === "teleports") current = teleports.mount(main, { me });
  else current = envs.mount(main, { me, params });
}

async function boot() {
  document.getElementById("sign-out").addEventListener("click", () => signOut());
  window.addEventListener("hashchange", route);
  if (!storedKey()) {
    signInPage(takeNotice());
    return;
  }
  try {
    start(await api("/v1/tether/whoami"));
  } catch (err) {
    // A refused key has already signed out; anything else (router away) is worth a retry.
    if (!(err instanceof ApiError) || err.status !== 401) {
      replace(main, h("p", { class: "error", role: "alert" }, `Could not reach the router: ${err.message}. `,
        h("button", { type: "button", onclick: () => location.reload() }, "Retry")));
    }
  }
}

boot();
