// Several runs in one chart (e.g. GVPO against GRPO on the same data): any metric, picked over
// every name the runs have recorded, each run labelled with its name and algorithm, under the
// same controls as a run's curves; below, the two runs' specs side by side. Runs still
// training keep growing.

import { api, runPath } from "./api.js";
import { MetricChart } from "./charts.js";
import { plotControls } from "./controls.js";
import { algorithmOf, flash, fmtNum, h, stateBadge } from "./dom.js";
import { poll } from "./live.js";
import { metricSelect } from "./picker.js";
import { RunSeries } from "./series.js";
import { specDiffPanel } from "./specdiff.js";
import { isLive } from "./states.js";

const DEFAULT_METRIC = "reward/mean";
const label = (run) => `${run.name || run.id} · ${algorithmOf(run)}`;

function picker(main, chosen) {
  const boxes = h("div", { class: "picker", id: "compare-picker" }, h("span", { class: "muted" }, "loading runs…"));
  const apply = h("button", { type: "button", id: "compare-apply" }, "Compare");
  main.append(h("section", { class: "card" }, h("h2", {}, "Compare runs"),
    h("p", { class: "muted" }, "Pick runs to overlay a metric of theirs and to diff their specs."), boxes, apply));
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

function summaryTable(section) {
  const head = h("th", { class: "num" }, "latest");
  const body = h("tbody", { id: "compare-summary" });
  section.append(h("table", {},
    h("thead", {}, h("tr", {}, h("th", {}, "run"), h("th", {}, "algorithm"), h("th", {}, "state"), h("th", { class: "num" }, "steps"),
      head, h("th", { class: "num" }, "mean of the last 10%"))),
    body));
  return (runs, metric, series) => {
    head.textContent = `latest ${metric}`;
    body.replaceChildren(...runs.map((run) => {
      const data = series.get(run.id)?.points(metric) || [];
      const tail = data.slice(Math.floor(data.length * 0.9));
      const tailMean = tail.length ? tail.reduce((s, p) => s + p[1], 0) / tail.length : null;
      return h("tr", { "data-run-id": run.id },
        h("td", {}, h("a", { href: `#/runs/${encodeURIComponent(run.id)}` }, run.name || run.id)),
        h("td", {}, algorithmOf(run)), h("td", {}, stateBadge(run.status)),
        h("td", { class: "num" }, `${run.step} / ${run.total_steps}`),
        h("td", { class: "num" }, fmtNum(data.length ? data[data.length - 1][1] : null)),
        h("td", { class: "num" }, fmtNum(tailMean)));
    }));
  };
}

export function compareView(main, ids, chosen) {
  picker(main, ids).catch(() => {});
  if (!ids.length) return { dispose() {} };

  let metric = chosen || DEFAULT_METRIC;
  const section = h("section", { class: "card compare" });
  main.append(section);
  const choice = metricSelect("compare-metric", (name) => {
    metric = name;
    // the address names the metric (a link to this view shows it), without a new route
    const listed = ids.map(encodeURIComponent).join(",");
    window.history.replaceState(null, "", `#/compare?runs=${listed}&metric=${encodeURIComponent(name)}`);
    for (const s of series.values()) s.want([name]);
    redraw();  // empty until the next tick brings the metric's points
    live.now();
  });
  section.append(h("div", { class: "toolbar" }, h("label", {}, "metric ", choice.select)));
  const controls = plotControls(section, () => redraw());
  const chart = new MetricChart(section, { id: "chart-compare", title: metric, metric, onZoom: (r) => controls.setRange(r) });
  const summary = summaryTable(section);
  const diff = specDiffPanel(main, label);

  const runs = new Map();
  const series = new Map();  // run id -> RunSeries
  const names = new Map();  // run id -> the names it has recorded
  const missing = new Set();
  const known = () => ids.filter((id) => runs.has(id)).map((id) => runs.get(id));

  function redraw() {
    const lines = known().map((run) => ({ key: run.id, label: label(run), points: series.get(run.id).points(metric), run: series.get(run.id) }));
    chart.render(lines, null, controls.view);
    chart.figure.querySelector("figcaption").textContent = metric;
    chart.figure.dataset.metric = metric;
    summary(known(), metric, series);
  }

  async function tick() {
    const wanted = ids.filter((id) => !missing.has(id) && (!runs.has(id) || isLive(runs.get(id))));
    const got = await Promise.allSettled(wanted.map((id) => api(runPath(id))));
    got.forEach((result, i) => {
      if (result.status === "fulfilled") runs.set(wanted[i], result.value);
      else if (result.reason.status === 404) missing.add(wanted[i]);
    });
    if (missing.size) flash(`not found: ${[...missing].join(", ")}`);
    for (const id of wanted.filter((i) => runs.has(i))) {
      if (!series.has(id)) series.set(id, new RunSeries(id));
      series.get(id).want([metric]);
    }
    // every run's names while any is live; the others' fetch only what they have not yet
    await Promise.all(known().map(async (run) => {
      const s = series.get(run.id);
      const live = wanted.includes(run.id);
      if (live || !names.has(run.id)) names.set(run.id, (await s.loadNames().catch(() => [])).map((n) => n.name));
      await s.update({ grow: live });
    }));
    const union = [...new Set([metric, ...[...names.values()].flat()])];
    choice.setNames(union, metric);
    diff.setRuns(known());
    redraw();
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
