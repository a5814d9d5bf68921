// Line charts over metric series ({key: [[step, value], ...]}) with Chart.js (window.Chart, from
// vendor/). Points are appended as they arrive; nothing is refetched. Each chart's <figure>
// carries data-points (points of its first series) and data-datasets (series drawn), which the
// browser test reads.

import { h } from "./dom.js";

const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"];
const BAND = "± std";

function options(yTitle) {
  return {
    animation: false,
    responsive: true,
    maintainAspectRatio: false,
    parsing: false,
    normalized: true,
    interaction: { mode: "nearest", axis: "x", intersect: false },
    elements: { point: { radius: 0, hoverRadius: 3 }, line: { borderWidth: 1.6 } },
    scales: {
      x: { type: "linear", title: { display: true, text: "step" }, ticks: { precision: 0 } },
      y: { title: { display: Boolean(yTitle), text: yTitle } },
    },
    plugins: { legend: { labels: { boxWidth: 12, filter: (item) => !item.text.startsWith(BAND) } } },
  };
}

export class SeriesChart {
  // series: [{key, label}]; band: {mean, std} draws mean ± std behind the mean's line
  constructor(parent, { id, title, yTitle = "", series = [], band = null }) {
    this.canvas = h("canvas");
    this.figure = h("figure", { class: "chart", id, "data-points": "0", "data-datasets": "0" },
      h("figcaption", {}, title), h("div", { class: "canvas-box" }, this.canvas));
    parent.append(this.figure);
    this.chart = new window.Chart(this.canvas, { type: "line", data: { datasets: [] }, options: options(yTitle) });
    this.byKey = new Map();
    for (const s of series) this.addSeries(s.key, s.label);
    this.band = null;
    if (band) {
      const color = "rgba(37, 99, 235, 0.15)";
      const edge = { borderWidth: 0, pointRadius: 0, backgroundColor: color };
      const upper = { label: `${BAND} upper`, data: [], fill: false, ...edge };
      const lower = { label: `${BAND} lower`, data: [], fill: "-1", ...edge };
      this.chart.data.datasets.push(upper, lower);
      this.band = { mean: band.mean, stdName: band.std, upper, lower, std: new Map() };
    }
  }

  addSeries(key, label) {
    const color = COLORS[this.byKey.size % COLORS.length];
    const dataset = { label, data: [], borderColor: color, backgroundColor: color, fill: false };
    // series lines before the band's edges, so the first dataset is always a series
    this.chart.data.datasets.splice(this.byKey.size, 0, dataset);
    this.byKey.set(key, dataset);
    return dataset;
  }

  lastStep(key) {
    const data = this.byKey.get(key)?.data;
    return data?.length ? data[data.length - 1].x : -1;
  }

  append(series) {
    if (this.band) {
      for (const [step, value] of series[this.band.stdName] || []) this.band.std.set(step, value);
    }
    for (const [key, dataset] of this.byKey) {
      const last = this.lastStep(key);
      const fresh = (series[key] || []).filter(([step]) => step > last).map(([x, y]) => ({ x, y }));
      dataset.data.push(...fresh);
      if (this.band && key === this.band.mean) this.extendBand(fresh);
    }
    this.chart.update("none");
    this.figure.dataset.points = String(this.chart.data.datasets[0]?.data.length ?? 0);
    this.figure.dataset.datasets = String([...this.byKey.values()].filter((d) => d.data.length).length);
  }

  extendBand(points) {
    for (const { x, y } of points) {
      const std = this.band.std.get(x);
      if (std === undefined) continue;
      this.band.upper.data.push({ x, y: y + std });
      this.band.lower.data.push({ x, y: y - std });
      this.band.std.delete(x);
    }
  }

  destroy() {
    this.chart.destroy();
  }
}

// Largest step in a {name: [[step, value], ...]} response, or -1.
export function maxStep(series) {
  let last = -1;
  for (const points of Object.values(series)) {
    if (points.length) last = Math.max(last, points[points.length - 1][0]);
  }
  return last;
}
