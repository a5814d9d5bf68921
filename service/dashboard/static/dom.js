// DOM and formatting helpers. Everything that came from the API (run names, prompts,
// completions, event messages) reaches the page as text nodes: h() never parses HTML.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  // append() turns strings into text nodes
  el.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false)
    .map((c) => (c instanceof Node ? c : String(c))));
  return el;
}

export function flash(message) {
  const box = document.getElementById("flash");
  if (!message) {
    box.hidden = true;
    box.replaceChildren();
    return;
  }
  box.replaceChildren(message, h("button", { type: "button", class: "secondary", onclick: () => flash(null) }, "dismiss"));
  box.hidden = false;
}

export function stateBadge(status) {
  return h("span", { class: `state state-${status}`, "data-state": status }, status);
}

export function fmtNum(value, digits = 3) {
  if (value === null || value === undefined || Number.isNaN(value)) return "—";
  if (value !== 0 && (Math.abs(value) >= 1e5 || Math.abs(value) < 1e-3)) return value.toExponential(2);
  return value.toFixed(digits);
}

export function fmtAge(iso, now = Date.now()) {
  const s = Math.max(0, (now - Date.parse(iso)) / 1000);
  if (s < 60) return `${Math.floor(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h`;
  return `${Math.floor(s / 86400)} d`;
}

export function fmtTime(iso) {
  return iso ? new Date(iso).toLocaleString() : "—";
}

export function fmtBytes(n) {
  if (n < 1024) return `${n} B`;
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let v = n / 1024;
  let i = 0;
  for (; v >= 1024 && i < units.length - 1; i += 1) v /= 1024;
  return `${v.toFixed(1)} ${units[i]}`;
}

export function algorithmOf(run) {
  return run.spec?.algorithm?.name ?? "gvpo";
}

// Text that may be empty or all whitespace still shows as something.
export function textBlock(text) {
  return text ? h("pre", { class: "text" }, text) : h("span", { class: "empty-text" }, "(empty)");
}
