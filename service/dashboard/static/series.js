// One run's metric series as the dashboard holds them: raw points [step, value, unix_seconds],
// fetched once in full (downsampled by the server past MAX_POINTS) and then grown with only the
// steps since the last one seen. Views say which names they want; the x axes read the run's
// clock (its first point) and its token count (metric TOKENS) from here.

import { metricNames, metrics } from "./api.js";

export const MAX_POINTS = 1000;
export const TOKENS = "tokens/total";

export class RunSeries {
  constructor(runId) {
    this.runId = runId;
    this.data = new Map();  // name -> [[step, value, t], ...] in step order
    this.wanted = new Set([TOKENS]);
    this.last = -1;  // the largest step seen in any series
    this.names = [];  // GET .../metrics/names
  }

  want(names) {
    for (const name of names) this.wanted.add(name);
  }

  points(name) {
    return this.data.get(name) || [];
  }

  async loadNames() {
    this.names = await metricNames(this.runId);
    return this.names;
  }

  // Names never fetched: in full, in one request; the others: since the last step seen
  // (inclusive, as a step's metrics may land after the first of them was read).
  async update({ grow = true } = {}) {
    const fresh = [...this.wanted].filter((n) => !this.data.has(n));
    const known = [...this.wanted].filter((n) => this.data.has(n));
    const [whole, recent] = await Promise.all([
      fresh.length ? metrics(this.runId, fresh, null, { maxPoints: MAX_POINTS, withTime: true }) : {},
      grow && known.length ? metrics(this.runId, known, this.last < 0 ? null : this.last, { maxPoints: this.last < 0 ? MAX_POINTS : null, withTime: true }) : {},
    ]);
    for (const name of fresh) this.data.set(name, whole[name] || []);
    for (const [name, points] of Object.entries(recent)) {
      const have = this.points(name);
      const after = have.length ? have[have.length - 1][0] : -1;
      have.push(...points.filter(([step]) => step > after));
      this.data.set(name, have);
    }
    for (const points of this.data.values()) {
      if (points.length) this.last = Math.max(this.last, points[points.length - 1][0]);
    }
  }

  // The run's clock starts at its earliest timed point (values recorded before the service
  // kept times have none).
  startTime() {
    let start = Infinity;
    for (const points of this.data.values()) {
      const first = points.find((p) => p[2] !== null && p[2] !== undefined);
      if (first) start = Math.min(start, first[2]);
    }
    return Number.isFinite(start) ? start : null;
  }

  // Cumulative sampled tokens at `step`, interpolated between recorded (or downsampled) steps.
  tokensAt(step) {
    const known = this.points(TOKENS);
    if (!known.length) return null;
    let lo = 0;
    let hi = known.length - 1;
    if (step <= known[0][0]) return known[0][1] * (step / Math.max(1, known[0][0]));
    if (step >= known[hi][0]) return step === known[hi][0] ? known[hi][1] : null;
    while (hi - lo > 1) {
      const mid = (lo + hi) >> 1;
      if (known[mid][0] <= step) lo = mid;
      else hi = mid;
    }
    const [s0, v0] = known[lo];
    const [s1, v1] = known[hi];
    return v0 + ((v1 - v0) * (step - s0)) / (s1 - s0);
  }
}
