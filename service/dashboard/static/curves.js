// A run's "Curves": a chart per chosen metric, picked from every series the run has recorded,
// under shared controls (smoothing, log y, x by step, time or tokens, zoom). The default charts
// are reward/mean with its ±reward/std band, loss and kl/ref, and, as soon as the run records
// them, its eval/* metrics and a multi-turn run's episode metrics. Charts grow while the run is
// live, each poll asking only for the steps since the last one seen.

import { runPath, saveAs } from "./api.js";
import { MetricChart } from "./charts.js";
import { plotControls } from "./controls.js";
import { flash, h } from "./dom.js";
import { metricPicker } from "./picker.js";
import { RunSeries } from "./series.js";

// The default charts' ids and titles (the names are the API's; these only dress them).
const KNOWN = {
  "reward/mean": { id: "chart-reward", title: "reward", band: "reward/std" },
  loss: { id: "chart-loss", title: "loss" },
  "kl/ref": { id: "chart-kl", title: "KL to the reference" },
  "episode/turns_mean": { id: "chart-turns", title: "assistant turns per episode" },
  "episode/truncated_frac": { id: "chart-truncated", title: "episodes truncated" },
  "time/environment_s": { id: "chart-environment", title: "waiting for the environment", yTitle: "s" },
};
const ALWAYS = ["reward/mean", "loss", "kl/ref"];
const isAuto = (name) => name.startsWith("eval/") || name.startsWith("episode/") || name === "time/environment_s";

export const chartId = (name) => KNOWN[name]?.id ?? `chart-m-${name.replace(/[^A-Za-z0-9_-]+/g, "-")}`;

export function curves(parent, runId) {
  const series = new RunSeries(runId);
  const card = h("section", { class: "card", id: "curves" }, h("h3", {}, "Curves"));
  parent.append(card);
  const controls = plotControls(card, () => redraw());
  const csv = h("button", { type: "button", class: "secondary", id: "download-csv", title: "the charted metrics, every point, as CSV (format=csv)" }, "Download CSV");
  csv.addEventListener("click", () => saveAs(`${runPath(runId)}/metrics`, { names: [...charts.keys()].join(","), format: "csv", with_time: true }, `${runId}-metrics.csv`)
    .catch((err) => flash(`CSV: ${err.message}`)));
  card.querySelector(".plot-controls .muted").before(csv);
  const picker = metricPicker(card, (name, on) => (on ? add(name) : remove(name)));
  const grid = h("div", { class: "charts", id: "charts" });
  const noEval = h("p", { class: "muted", id: "no-eval" }, "no eval metrics");
  card.append(grid, noEval);

  const charts = new Map();  // name -> MetricChart, in the order charted
  const dropped = new Set();  // defaults the user took off: not charted again on their own
  let names = [];

  function chart(name) {
    const known = KNOWN[name] || {};
    const made = new MetricChart(grid, { id: chartId(name), title: known.title ?? name, metric: name, yTitle: known.yTitle, onZoom: (r) => controls.setRange(r) });
    charts.set(name, made);
    series.want([name, ...(known.band ? [known.band] : [])]);
  }

  function redraw() {
    for (const [name, made] of charts) {
      const band = KNOWN[name]?.band;
      made.render([{ key: name, label: name, points: series.points(name), run: series }], band ? series.points(band) : null, controls.view);
    }
    const offered = [...new Set([...names, ...charts.keys()])];
    picker.setNames(offered, new Set(charts.keys()));
    noEval.hidden = offered.some((n) => n.startsWith("eval/"));
  }

  async function add(name) {
    dropped.delete(name);
    if (!charts.has(name)) chart(name);
    await series.update({ grow: false });
    redraw();
  }

  function remove(name) {
    dropped.add(name);
    charts.get(name)?.destroy();
    charts.delete(name);
    redraw();
  }

  for (const name of ALWAYS) chart(name);
  return {
    // live: the run may still record steps (and new series)
    async update(live) {
      if (live || !names.length) {
        names = (await series.loadNames().catch(() => [])).map((n) => n.name);
      }
      for (const name of names) {
        if (isAuto(name) && !charts.has(name) && !dropped.has(name)) chart(name);
      }
      await series.update({ grow: live });
      redraw();
    },
    destroy: () => charts.forEach((c) => c.destroy()),
  };
}
