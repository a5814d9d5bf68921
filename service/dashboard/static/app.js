// The dashboard's entry point: the API key form and the hash router.
//   #/runs               runs table
//   #/runs/<id>          one run
//   #/compare?runs=a,b[&metric=m]   a metric of those runs overlaid, and their specs diffed

import { api, forgetKey, getKey, setKey, setUnauthorizedHandler } from "./api.js";
import { compareView } from "./compare.js";
import { flash, h } from "./dom.js";
import { runView } from "./run.js";
import { runsView } from "./runs.js";

const main = document.getElementById("main");
let view = null;

function leave() {
  view?.dispose();
  view = null;
  flash(null);
  main.replaceChildren();
}

function showKeyInfo() {
  const key = getKey();
  document.getElementById("key-info").textContent = key ? `key ${key.slice(0, 12)}…` : "";
  document.getElementById("change-key").hidden = !key;
}

function keyForm(message) {
  leave();
  showKeyInfo();
  const input = h("input", { id: "api-key", type: "password", autocomplete: "off", placeholder: "gvpo_sk_…", required: true });
  const form = h("form", { id: "key-form", class: "card" },
    h("h2", {}, "API key"),
    h("p", { class: "muted" }, "The dashboard calls the API with your project's key. It is kept in this browser's localStorage and sent only to this server."),
    message ? h("p", { class: "error", id: "key-error", role: "alert" }, message) : null,
    h("label", { for: "api-key" }, "key"), input,
    h("button", { type: "submit" }, "Use this key"));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    setKey(input.value.trim());
    try {
      await api("/v1/runs", { params: { limit: 1 } });
    } catch (err) {
      if (err.status === 401) return;  // the handler below shows the form with the message
    }
    route();
  });
  main.append(form);
  input.focus();
}

function route() {
  leave();
  if (!getKey()) {
    keyForm();
    return;
  }
  showKeyInfo();
  const [path, query] = window.location.hash.replace(/^#\/?/, "").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  if (parts[0] === "runs" && parts[1]) {
    view = runView(main, parts[1]);
  } else if (parts[0] === "compare") {
    const params = new URLSearchParams(query || "");
    const ids = (params.get("runs") || "").split(",").filter(Boolean);
    view = compareView(main, ids, params.get("metric"));
  } else {
    view = runsView(main);
  }
}

setUnauthorizedHandler((error) => {
  forgetKey();
  keyForm(error.message);
});
document.getElementById("change-key").addEventListener("click", () => {
  forgetKey();
  keyForm();
});
window.addEventListener("hashchange", route);
route();
