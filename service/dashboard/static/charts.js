// One metric's chart (Chart.js, window.Chart from vendor/): a line per series (one run's metric,
// or several runs' in compare), redrawn from the raw points whenever they grow or the view's
// controls change. With smoothing on, each line is drawn smoothed over its raw values, faint
// (as TensorBoard and W&B do); a band (reward/std) shades the first line ± std.
// The <figure> carries data-metric, data-points (points of the first line) and data-datasets
// (lines with points), which the browser test reads, as it reads the datasets themselves.

import { h } from "./dom.js";
import { X_AXES, drawn, xTick } from "./plot.js";
import { attachZoom } from "./zoom.js";

const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"];
export const RAW = " (raw)";
const BAND = "± std";
// Why recorded points draw nothing on this view.
const NOTHING_DRAWN = (view) => {
  if (view.log) return "no positive values to draw on a log scale";
  if (view.axis === "tokens") return "no tokens/total recorded at these steps: nothing to place on a tokens axis";
  if (view.axis === "time") return "the API gave no times for these points";
  return "no points in this range";
};
const hidden = (text) => text.startsWith(BAND) || text.endsWith(RAW);

function options() {
  return {
    animation: false,
    responsive: true,
    maintainAspectRatio: false,
    parsing: false,
    normalized: true,
    interaction: { mode: "nearest", axis: "x", intersect: false },
    elements: { point: { radius: 0, hoverRadius: 3 }, line: { borderWidth: 1.6 } },
    scales: {
      x: { type: "linear", title: { display: true, text: "step" } },
      y: { type: "linear", title: { display: false, text: "" } },
    },
    plugins: {
      legend: { labels: { boxWidth: 12, filter: (item) => !hidden(item.text) } },
      tooltip: { filter: (item) => !hidden(item.dataset.label), callbacks: { footer: (items) => (items[0] ? `step ${items[0].raw.step}` : "") } },
    },
  };
}

// The band's edges: the drawn mean ± the std recorded at the same step.
function bandData(mean, std) {
  const at = new Map(std.map(([step, value]) => [step, value]));
  const upper = [];
  const lower = [];
  for (const p of mean) {
    const s = at.get(p.step);
    if (s === undefined) continue;
    upper.push({ x: p.x, y: p.y + s, step: p.step });
    lower.push({ x: p.x, y: p.y - s, step: p.step });
  }
  return { upper, lower };
}

export class MetricChart {
  // onZoom({min, max} | null): a drag, ctrl-wheel or double-click on the chart asked for a range
  constructor(parent, { id, title, metric, yTitle = "", onZoom = () => {} }) {
    this.canvas = h("canvas");
    const box = h("div", { class: "canvas-box" }, this.canvas);
    this.note = h("p", { class: "chart-note muted", hidden: true });
    this.figure = h("figure", { class: "chart", id, "data-metric": metric ?? "", "data-points": "0", "data-datasets": "0" },
      h("figcaption", {}, title), box, this.note);
    parent.append(this.figure);
    this.chart = new window.Chart(this.canvas, { type: "line", data: { datasets: [] }, options: options() });
    this.yTitle = yTitle;
    this.detachZoom = attachZoom(this.chart, box, onZoom);
  }

  // lines: [{key, label, points: [[step, value, t]], run}]; band: std points of lines[0] or null;
  // view: {axis, smoothing, log, range}
  render(lines, band, view) {
    const shown = lines.map((line) => drawn(line.points, { ...view, run: line.run }));
    const datasets = lines.map((line, i) => {
      const color = COLORS[i % COLORS.length];
      return { label: line.label, data: shown[i], borderColor: color, backgroundColor: color, fill: false };
    });
    if (view.smoothing > 0) {
      lines.forEach((line, i) => {
        const color = `${COLORS[i % COLORS.length]}40`;
        const raw = drawn(line.points, { ...view, smoothing: 0, run: line.run });
        datasets.push({ label: `${line.label}${RAW}`, data: raw, borderColor: color, backgroundColor: color, borderWidth: 1, fill: false });
      });
    }
    if (band && shown.length) {
      const { upper, lower } = bandData(shown[0], band);
      const edge = { borderWidth: 0, pointRadius: 0, backgroundColor: "rgba(37, 99, 235, 0.15)" };
      datasets.push({ label: `${BAND} upper`, data: upper, fill: false, ...edge },
        { label: `${BAND} lower`, data: view.log ? lower.filter((p) => p.y > 0) : lower, fill: "-1", ...edge });
    }
    const { x, y } = this.chart.options.scales;
    x.title.text = X_AXES[view.axis];
    x.ticks = { callback: xTick(view.axis) };
    x.min = view.range?.min;
    x.max = view.range?.max;
    y.type = view.log ? "logarithmic" : "linear";
    y.title = { display: Boolean(this.yTitle), text: this.yTitle };
    this.chart.data.datasets = datasets;
    this.chart.update("none");
    const lost = lines.some((line) => line.points.length) && !shown.some((d) => d.length);
    this.note.hidden = !lost;
    this.note.textContent = lost ? NOTHING_DRAWN(view) : "";
    this.figure.dataset.points = String(shown[0]?.length ?? 0);
    this.figure.dataset.datasets = String(shown.filter((d) => d.length).length);
  }

  destroy() {
    this.detachZoom();
    this.chart.destroy();
    this.figure.remove();
  }
}
