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

export async function api(path, { method = "GET", params } = {}) {
  const url = new URL(path, window.location.origin);
  for (const [name, value] of Object.entries(params || {})) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, value);
  }
  let resp;
  try {
    resp = await fetch(url, { method, headers: { Authorization: `Bearer ${getKey() || ""}`, Accept: "application/json" } });
  } catch (err) {
    throw new ApiError(0, "network_error", `cannot reach the API: ${err.message}`);
  }
  const body = await resp.json().catch(() => null);
  if (!resp.ok) {
    const e = body?.error || {};
    const error = new ApiError(resp.status, e.code || "http_error", e.message || `HTTP ${resp.status}`, e.details);
    if (resp.status === 401) onUnauthorized(error);
    throw error;
  }
  return body;
}

export const runPath = (runId) => `/v1/runs/${encodeURIComponent(runId)}`;

// {name: [[step, value], ...]} for the given names, from since_step on (inclusive).
export async function metrics(runId, names, sinceStep) {
  const body = await api(`${runPath(runId)}/metrics`, { params: { names: names.join(","), since_step: sinceStep } });
  return body.metrics;
}
