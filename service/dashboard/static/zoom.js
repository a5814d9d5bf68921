// Zoom on a chart's x axis, computed here rather than by a plugin: drag across the plot to zoom
// into that span, Ctrl (or ⌘) + wheel to zoom around the pointer, double-click to reset. The y
// axis follows: Chart.js fits it to the points inside the x range. The chart does not change
// its own range: it asks (onZoom), and the view applies one range to all its charts.

import { h } from "./dom.js";

const MIN_DRAG_PX = 6;

export function attachZoom(chart, box, onZoom) {
  const canvas = chart.canvas;
  const shade = h("div", { class: "zoom-shade", hidden: true });
  box.append(shade);
  let from = null;

  const xAt = (ev) => ev.clientX - canvas.getBoundingClientRect().left;
  const inPlot = (px) => px >= chart.chartArea.left && px <= chart.chartArea.right;
  const clamp = (px) => Math.min(chart.chartArea.right, Math.max(chart.chartArea.left, px));

  const down = (ev) => {
    if (ev.button !== 0 || !chart.chartArea || !inPlot(xAt(ev))) return;
    from = xAt(ev);
    canvas.setPointerCapture?.(ev.pointerId);
  };
  const move = (ev) => {
    if (from === null) return;
    const to = clamp(xAt(ev));
    shade.hidden = Math.abs(to - from) < MIN_DRAG_PX;
    shade.style.left = `${Math.min(from, to)}px`;
    shade.style.width = `${Math.abs(to - from)}px`;
  };
  const up = (ev) => {
    if (from === null) return;
    const to = clamp(xAt(ev));
    const start = from;
    from = null;
    shade.hidden = true;
    if (Math.abs(to - start) < MIN_DRAG_PX) return;
    const scale = chart.scales.x;
    const [a, b] = [scale.getValueForPixel(start), scale.getValueForPixel(to)].sort((p, q) => p - q);
    onZoom({ min: a, max: b });
  };
  const wheel = (ev) => {
    if (!(ev.ctrlKey || ev.metaKey) || !chart.chartArea) return;
    ev.preventDefault();
    const scale = chart.scales.x;
    const at = scale.getValueForPixel(clamp(xAt(ev)));
    const factor = ev.deltaY < 0 ? 0.8 : 1.25;
    onZoom({ min: at - (at - scale.min) * factor, max: at + (scale.max - at) * factor });
  };
  const reset = () => onZoom(null);

  canvas.addEventListener("pointerdown", down);
  canvas.addEventListener("pointermove", move);
  canvas.addEventListener("pointerup", up);
  canvas.addEventListener("wheel", wheel, { passive: false });
  canvas.addEventListener("dblclick", reset);
  return () => {
    canvas.removeEventListener("pointerdown", down);
    canvas.removeEventListener("pointermove", move);
    canvas.removeEventListener("pointerup", up);
    canvas.removeEventListener("wheel", wheel);
    canvas.removeEventListener("dblclick", reset);
  };
}
