// What a chart draws from raw points [step, value, unix_seconds]: the x of each point (step,
// seconds since the run's first point, or tokens sampled so far), the EMA that smooths a curve,
// and how the axes label their ticks. Pure functions: charts.js applies them.

export const X_AXES = {
  step: "step",
  time: "time since the run's first point",
  tokens: "tokens sampled",
};

// TensorBoard's smoothing: an exponential moving average, debiased so that the first points do
// not lean towards zero. weight 0 = the raw values.
export function ema(ys, weight) {
  if (!weight) return ys.slice();
  let last = 0;
  let n = 0;
  return ys.map((y) => {
    if (!Number.isFinite(y)) return y;
    last = last * weight + (1 - weight) * y;
    n += 1;
    return last / (1 - weight ** n);
  });
}

// x of a point on the `axis` ("step" | "time" | "tokens") of `run` (a RunSeries); null when the
// run has not recorded what that axis needs for this point.
export function xOf(axis, run) {
  if (axis === "time") {
    const start = run.startTime();
    return (p) => (start === null || p[2] === null || p[2] === undefined ? null : p[2] - start);
  }
  if (axis === "tokens") return (p) => run.tokensAt(p[0]);
  return (p) => p[0];
}

// Points {x, y} of a series on an axis, smoothed, dropping what a log scale cannot show.
export function drawn(points, { axis, run, smoothing, log }) {
  const x = xOf(axis, run);
  const ys = ema(points.map((p) => p[1]), smoothing);
  const out = [];
  points.forEach((p, i) => {
    const px = x(p);
    if (px === null || px === undefined || !Number.isFinite(px)) return;
    if (log && !(ys[i] > 0)) return;
    out.push({ x: px, y: ys[i], step: p[0] });
  });
  return out;
}

export function fmtDuration(seconds, span) {
  if (span < 120) return `${Math.round(seconds)} s`;
  if (span < 3 * 3600) return `${+(seconds / 60).toFixed(1)} min`;
  return `${+(seconds / 3600).toFixed(2)} h`;
}

export function fmtCount(n) {
  const abs = Math.abs(n);
  if (abs >= 1e9) return `${+(n / 1e9).toFixed(2)}G`;
  if (abs >= 1e6) return `${+(n / 1e6).toFixed(2)}M`;
  if (abs >= 1e3) return `${+(n / 1e3).toFixed(1)}k`;
  return String(+n.toFixed(2));
}

// The x scale's tick label for an axis kind (called with the scale as `this`).
export function xTick(axis) {
  if (axis === "time") return function tick(value) { return fmtDuration(value, this.max - this.min); };
  if (axis === "tokens") return (value) => fmtCount(value);
  return (value) => (Number.isInteger(value) ? String(value) : "");
}
