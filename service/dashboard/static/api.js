// The public REST API, called with the user's API key (kept in localStorage, sent as a Bearer
// token to this same origin). Errors arrive as {"error": {"code", "message", "details"}}.

const KEY = "gvpo.apiKey";

export const getKey = () => localStorage.getItem(KEY);
export const setKey = (key) => localStorage.setItem(KEY, key);
export const forgetKey = () => localStorage.removeItem(KEY);

export class ApiError extends Error {
  constructor(status, code, message, details) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details || {};
  }
}

let onUnauthorized = () => {};
export function setUnauthorizedHandler(handler) {
  onUnauthorized = handler;
}

async function call(path, { method = "GET", params, accept = "application/json" } = {}) {
  const url = new URL(path, window.location.origin);
  for (const [name, value] of Object.entries(params || {})) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, value);
  }
  let resp;
  try {
    resp = await fetch(url, { method, headers: { Authorization: `Bearer ${getKey() || ""}`, Accept: accept } });
  } catch (err) {
    throw new ApiError(0, "network_error", `cannot reach the API: ${err.message}`);
  }
  if (!resp.ok) {
    const e = (await resp.json().catch(() => null))?.error || {};
    const error = new ApiError(resp.status, e.code || "http_error", e.message || `HTTP ${resp.status}`, e.details);
    if (resp.status === 401) onUnauthorized(error);
    throw error;
  }
  return resp;
}

export async function api(path, options = {}) {
  const resp = await call(path, options);
  return resp.json().catch(() => null);
}

// Save what the API answers as a file: a link cannot carry the API key, so the page fetches it
// and hands the browser the bytes.
export async function saveAs(path, params, filename) {
  const blob = await (await call(path, { params, accept: "*/*" })).blob();
  const href = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = href;
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(href), 60_000);
}

export const runPath = (runId) => `/v1/runs/${encodeURIComponent(runId)}`;

// {name: [[step, value, unix_seconds], ...]} for the given names, from since_step on
// (inclusive). maxPoints: the server keeps each bucket's min and max (a long run's first load).
export async function metrics(runId, names, sinceStep, { maxPoints, withTime = false } = {}) {
  const params = { names: names.join(","), since_step: sinceStep, max_points: maxPoints, with_time: withTime || null };
  return (await api(`${runPath(runId)}/metrics`, { params })).metrics;
}

// Every series the run has recorded: [{name, points, first_step, last_step}].
export async function metricNames(runId) {
  return (await api(`${runPath(runId)}/metrics/names`)).data;
}
