// The REST API, called with the signed-in key. The key lives in sessionStorage only: never in a URL, a
// cookie or localStorage, so it goes when the tab closes and no other tab or site can read it.

const KEY = "tether.console.key";
const NOTICE = "tether.console.notice";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function storedKey() {
  return sessionStorage.getItem(KEY);
}

export function keepKey(key) {
  sessionStorage.setItem(KEY, key);
}

// Forget the key and everything read with it: the page reloads, so no view, row or identity read with
// one key can show once another key signs in.
export function signOut(message) {
  sessionStorage.removeItem(KEY);
  if (message) sessionStorage.setItem(NOTICE, message);
  history.replaceState(null, "", "/ui");
  location.reload();
}

// A message left by signOut for the sign-in page (shown once).
export function takeNotice() {
  const text = sessionStorage.getItem(NOTICE);
  sessionStorage.removeItem(NOTICE);
  return text;
}

// One call. `key` overrides the stored key (the sign-in check). Errors are ApiError with the API's
// {errorCode, message}; a 401 on the stored key signs out, as the key was revoked meanwhile.
export async function api(path, { method = "GET", body, signal, key } = {}) {
  const secret = key ?? storedKey();
  const headers = { Authorization: `Bearer ${secret}`, Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: "no-store",
      credentials: "omit",
      redirect: "error",
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "UNREACHABLE", "cannot reach the router; retrying");
  }
  let data = null;
  const text = await response.text();
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!response.ok) {
    const code = data?.errorCode ?? `HTTP_${response.status}`;
    const message = data?.message ?? `the router answered ${response.status}`;
    if (response.status === 401 && key === undefined) {
      signOut(`Your key was refused (${message}). Sign in again.`);
    }
    throw new ApiError(response.status, code, message);
  }
  return data;
}

export function query(params) {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") search.set(name, String(value));
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}

export const enc = encodeURIComponent;
