// Reward curves of several runs in one chart (e.g. GVPO against GRPO on the same data), each
// labelled with its name and algorithm; runs still training keep growing.

import { api, metrics, runPath } from "./api.js";
import { SeriesChart } from "./charts.js";
import { algorithmOf, flash, fmtNum, h, stateBadge } from "./dom.js";
import { poll } from "./live.js";
import { isLive } from "./states.js";

const label = (run) => `${run.name || run.id} · ${algorithmOf(run)}`;

function picker(main, chosen) {
  const boxes = h("div", { class: "picker", id: "compare-picker" }, h("span", { class: "muted" }, "loading runs…"));
  const apply = h("button", { type: "button", id: "compare-apply" }, "Compare");
  main.append(h("section", { class: "card" }, h("h2", {}, "Compare reward curves"),
    h("p", { class: "muted" }, "Pick runs to overlay their reward/mean."), boxes, apply));
  apply.addEventListener("click", () => {
    const ids = [...boxes.querySelectorAll("input:checked")].map((b) => encodeURIComponent(b.value));
    window.location.hash = `#/compare?runs=${ids.join(",")}`;
  });
  return api("/v1/runs", { params: { limit: 100 } }).then((page) => {
    boxes.replaceChildren(...page.data.map((run) => h("label", {},
      h("input", { type: "checkbox", value: run.id, checked: chosen.includes(run.id) }), " ", label(run), " ", stateBadge(run.status))));
    if (!page.data.length) boxes.replaceChildren(h("span", { class: "muted" }, "no runs"));
  });
}

export function compareView(main, ids) {
  picker(main, ids).catch(() => {});
  if (!ids.length) return { dispose() {} };

  const section = h("section", { class: "card compare" });
  main.append(section);
  const chart = new SeriesChart(section, { id: "chart-compare", title: "reward/mean", yTitle: "reward/mean" });
  const summary = h("tbody", { id: "compare-summary" });
  section.append(h("table", {},
    h("thead", {}, h("tr", {}, h("th", {}, "run"), h("th", {}, "algorithm"), h("th", {}, "state"), h("th", { class: "num" }, "steps"),
      h("th", { class: "num" }, "latest reward"), h("th", { class: "num" }, "mean of the last 10%"))),
    summary));
  const runs = new Map();

  function renderSummary() {
    summary.replaceChildren(...[...runs.values()].map((run) => {
      const data = chart.byKey.get(run.id)?.data || [];
      const tail = data.slice(Math.floor(data.length * 0.9));
      const tailMean = tail.length ? tail.reduce((s, p) => s + p.y, 0) / tail.length : null;
      return h("tr", { "data-run-id": run.id },
        h("td", {}, h("a", { href: `#/runs/${encodeURIComponent(run.id)}` }, run.name || run.id)),
        h("td", {}, algorithmOf(run)), h("td", {}, stateBadge(run.status)),
        h("td", { class: "num" }, `${run.step} / ${run.total_steps}`),
        h("td", { class: "num" }, fmtNum(data.length ? data[data.length - 1].y : null)),
        h("td", { class: "num" }, fmtNum(tailMean)));
    }));
  }

  const missing = new Set();
  async function tick() {
    const wanted = ids.filter((id) => !missing.has(id) && (!runs.has(id) || isLive(runs.get(id))));
    const got = await Promise.allSettled(wanted.map((id) => api(runPath(id))));
    got.forEach((result, i) => {
      if (result.status === "fulfilled") runs.set(wanted[i], result.value);
      else if (result.reason.status === 404) missing.add(wanted[i]);
    });
    if (missing.size) flash(`not found: ${[...missing].join(", ")}`);
    for (const id of ids) {  // series in the order asked for, whatever answered first
      if (runs.has(id) && !chart.byKey.has(id)) chart.addSeries(id, label(runs.get(id)));
    }
    const fresh = {};
    await Promise.all(wanted.filter((id) => runs.has(id)).map(async (id) => {
      const last = chart.lastStep(id);
      fresh[id] = (await metrics(id, ["reward/mean"], last < 0 ? null : last))["reward/mean"] || [];
    }));
    chart.append(fresh);
    renderSummary();
  }

  const live = poll(tick, () => 2000);
  live.now();
  return {
    dispose() {
      live.stop();
      chart.destroy();
    },
  };
}
