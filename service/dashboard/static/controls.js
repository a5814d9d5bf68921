// The controls a view's charts share: EMA smoothing (0 = off), log-scale y, the x axis (step,
// time or tokens) and the zoomed x range, with a button that resets it. onChange() redraws.

import { h } from "./dom.js";
import { X_AXES } from "./plot.js";

export function plotControls(parent, onChange) {
  const view = { axis: "step", smoothing: 0, log: false, range: null };
  const slider = h("input", { id: "smoothing", type: "range", min: 0, max: 0.99, step: 0.01, value: 0, "aria-label": "smoothing" });
  const shown = h("output", { id: "smoothing-value", for: "smoothing" }, "off");
  const log = h("input", { id: "log-y", type: "checkbox" });
  const axis = h("select", { id: "x-axis", "aria-label": "x axis" },
    Object.keys(X_AXES).map((name) => h("option", { value: name }, name)));
  const reset = h("button", { id: "reset-zoom", type: "button", class: "secondary", disabled: true }, "Reset zoom");

  const changed = () => {
    reset.disabled = view.range === null;
    onChange();
  };
  slider.addEventListener("input", () => {
    view.smoothing = Number(slider.value);
    shown.textContent = view.smoothing ? view.smoothing.toFixed(2) : "off";
    changed();
  });
  log.addEventListener("change", () => {
    view.log = log.checked;
    changed();
  });
  axis.addEventListener("change", () => {
    view.axis = axis.value;
    view.range = null;  // a range in steps means nothing in seconds
    changed();
  });
  reset.addEventListener("click", () => {
    view.range = null;
    changed();
  });

  parent.append(h("div", { class: "toolbar plot-controls" },
    h("label", { title: "exponential moving average; the raw values stay behind, faint" }, "smoothing ", slider, " ", shown),
    h("label", {}, log, " log y"),
    h("label", {}, "x ", axis),
    reset,
    h("span", { class: "muted" }, "drag across a chart to zoom, Ctrl + wheel to zoom around the pointer, double-click to reset")));

  return {
    view,
    setRange(range) {
      view.range = range && range.max > range.min ? range : null;
      changed();
    },
  };
}
