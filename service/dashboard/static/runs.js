// The runs table: state, step/total, latest reward and age, with a status filter (the API's),
// a name filter (over the loaded rows), "more" pages by cursor, and a refresh every 5 s.

import { api, metrics } from "./api.js";
import { algorithmOf, fmtAge, fmtNum, h, stateBadge } from "./dom.js";
import { poll } from "./live.js";
import { isLive, STATES } from "./states.js";

const PAGE = 20;

export function runsView(main) {
  const state = { rows: [], cursor: null, hasMore: false, rewards: new Map(), selected: new Set() };

  const status = h("select", { id: "status-filter", "aria-label": "status" },
    h("option", { value: "" }, "all states"), STATES.map((s) => h("option", { value: s }, s)));
  const nameFilter = h("input", { id: "name-filter", type: "search", placeholder: "filter by name or id" });
  const compare = h("button", { id: "compare-selected", type: "button", disabled: true }, "Compare selected");
  const body = h("tbody", { id: "runs-body" });
  const more = h("button", { id: "more-runs", type: "button", class: "secondary", hidden: true }, "More");
  const updated = h("span", { class: "muted" });
  main.append(h("section", { class: "card" },
    h("h2", {}, "Runs"),
    h("div", { class: "toolbar" }, status, nameFilter, compare, updated),
    h("table", { id: "runs-table" },
      h("thead", {}, h("tr", {}, h("th", {}, ""), h("th", {}, "run"), h("th", {}, "name"), h("th", {}, "algorithm"),
        h("th", {}, "state"), h("th", { class: "num" }, "step / total"), h("th", { class: "num" }, "latest reward"),
        h("th", { class: "num" }, "age"))),
      body),
    h("p", {}, more)));

  function row(run) {
    const box = h("input", { type: "checkbox", class: "select-run", "aria-label": `select ${run.id}`, checked: state.selected.has(run.id) });
    box.addEventListener("change", () => {
      if (box.checked) state.selected.add(run.id);
      else state.selected.delete(run.id);
      compare.disabled = state.selected.size === 0;
    });
    const reward = state.rewards.get(run.id);
    return h("tr", { "data-run-id": run.id, "data-state": run.status },
      h("td", {}, box),
      h("td", {}, h("a", { href: `#/runs/${encodeURIComponent(run.id)}`, class: "mono" }, run.id)),
      h("td", {}, run.name ?? ""),
      h("td", {}, algorithmOf(run)),
      h("td", {}, stateBadge(run.status)),
      h("td", { class: "num" }, `${run.step} / ${run.total_steps}`, h("progress", { max: run.total_steps, value: run.step })),
      h("td", { class: "num reward" }, fmtNum(reward?.value)),
      h("td", { class: "num", title: new Date(run.created_at).toLocaleString() }, fmtAge(run.created_at)));
  }

  function render() {
    const needle = nameFilter.value.trim().toLowerCase();
    const shown = state.rows.filter((r) => !needle || (r.name ?? "").toLowerCase().includes(needle) || r.id.includes(needle));
    body.replaceChildren(...shown.map(row));
    if (!shown.length) body.append(h("tr", {}, h("td", { colspan: 8, class: "muted" }, state.rows.length ? "no run matches the filter" : "no runs")));
    more.hidden = !state.hasMore;
    compare.disabled = state.selected.size === 0;
    updated.textContent = `updated ${new Date().toLocaleTimeString()}`;
  }

  // The latest reward/mean of each run whose step moved since we last asked.
  async function loadRewards(rows) {
    const stale = rows.filter((r) => r.step > 0 && state.rewards.get(r.id)?.step !== r.step);
    await Promise.all(stale.map(async (run) => {
      const points = (await metrics(run.id, ["reward/mean"], Math.max(0, run.step - 1)))["reward/mean"] || [];
      const last = points[points.length - 1];
      state.rewards.set(run.id, { step: run.step, value: last ? last[1] : state.rewards.get(run.id)?.value });
    }));
  }

  let latest = 0;  // a refresh that was overtaken (say, by a filter change) is dropped
  async function load({ append = false } = {}) {
    const seq = ++latest;
    const limit = append ? PAGE : Math.min(100, Math.max(PAGE, state.rows.length));
    const page = await api("/v1/runs", { params: { status: status.value, limit, after: append ? state.cursor : null } });
    if (seq !== latest) return;
    state.rows = append ? state.rows.concat(page.data) : page.data;
    state.cursor = page.next_cursor;
    state.hasMore = page.has_more;
    await loadRewards(page.data);
    if (seq === latest) render();
  }

  status.addEventListener("change", () => {
    state.rows = [];
    load();
  });
  nameFilter.addEventListener("input", render);
  more.addEventListener("click", () => load({ append: true }));
  compare.addEventListener("click", () => {
    window.location.hash = `#/compare?runs=${[...state.selected].map(encodeURIComponent).join(",")}`;
  });

  const refresh = poll(() => load(), () => (state.rows.some(isLive) ? 3000 : 5000));
  refresh.now();
  return { dispose: () => refresh.stop() };
}
