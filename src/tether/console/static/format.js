// How values read on the page.

export const STATES = ["online", "connecting", "away", "offline"];
export const STATE_TEXT = {
  online: "online",
  connecting: "connecting (not ready)",
  away: "away (grace window)",
  offline: "offline",
};

export function age(ms) {
  if (ms === null || ms === undefined) return "—";
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

export function since(at, now = Date.now()) {
  if (!at) return "—";
  return `${age(now - at)} ago`;
}

export function stamp(at) {
  if (!at) return "—";
  const d = new Date(at);
  return `${d.toLocaleDateString()} ${d.toLocaleTimeString()}`;
}

export function bytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit === 0 ? 0 : 1)} ${units[unit]}`;
}

export function num(n, digits = 0) {
  if (n === null || n === undefined) return "—";
  return Number(n).toFixed(digits);
}

export function text(value) {
  return value === null || value === undefined || value === "" ? "—" : String(value);
}
