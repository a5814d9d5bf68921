// The sample browser: one step's completions, grouped by prompt group, with their rewards. A
// multi-turn run's samples are episodes, shown turn by turn (episode.js).

import { api, runPath } from "./api.js";
import { fmtNum, h, textBlock } from "./dom.js";
import { episodeBlock } from "./episode.js";

// `limits`: the run spec's environment section (null for a run without one).
function groupBox(group, rows, limits) {
  const mean = rows.reduce((sum, s) => sum + s.reward, 0) / rows.length;
  const first = rows[0];
  return h("div", { class: "group", "data-group": group },
    h("div", { class: "group-head" },
      h("strong", {}, `group ${group}`),
      h("span", {}, "prompt ", h("code", { class: "prompt" }, first.prompt)),
      first.answer !== null ? h("span", {}, "answer ", h("code", {}, first.answer)) : null,
      h("span", {}, `mean reward ${fmtNum(mean)}`)),
    h("table", {},
      h("thead", {}, h("tr", {}, h("th", {}, "#"), h("th", {}, rows.some((s) => s.episode) ? "episode" : "completion"), h("th", { class: "num" }, "reward"))),
      h("tbody", {}, rows.map((s) => h("tr", { class: "sample" },
        h("td", {}, String(s.sample_index)),
        s.episode
          ? h("td", { class: "episode-cell" }, episodeBlock(s.episode, limits))
          : h("td", { class: "completion" }, textBlock(s.completion)),
        h("td", { class: "num reward" }, fmtNum(s.reward)))))));
}

export function samplesPanel(main, runId) {
  let latest = 0;
  let limits = null;
  const step = h("input", { id: "sample-step", type: "number", min: 1, step: 1, placeholder: "latest" });
  const info = h("span", { id: "samples-info", class: "muted" });
  const list = h("div", { id: "samples" });
  const go = (s) => {
    if (s !== null) step.value = String(Math.max(1, s));
    show();
  };
  const controls = h("div", { class: "toolbar" },
    h("label", {}, "step ", step),
    h("button", { type: "button", id: "show-samples", onclick: () => go(null) }, "Show"),
    h("button", { type: "button", class: "secondary", onclick: () => go(Number(step.value || latest) - 1) }, "◀ previous"),
    h("button", { type: "button", class: "secondary", onclick: () => go(Number(step.value || latest) + 1) }, "next ▶"),
    h("button", { type: "button", class: "secondary", id: "latest-samples", onclick: () => { step.value = ""; show(); } }, "latest"),
    info);
  main.append(h("section", { class: "card", id: "sample-browser" }, h("h3", {}, "Samples"), controls, list));

  async function show() {
    const body = await api(`${runPath(runId)}/samples`, { params: { step: step.value || null } }).catch((err) => {
      info.textContent = err.message;
      return null;
    });
    if (!body) return;
    const groups = new Map();
    for (const s of body.data) {
      if (!groups.has(s.group_index)) groups.set(s.group_index, []);
      groups.get(s.group_index).push(s);
    }
    list.dataset.step = body.step ?? "";
    list.replaceChildren(...[...groups].map(([g, rows]) => groupBox(g, rows, limits)));
    info.textContent = body.step === null ? "no samples yet" : `step ${body.step}: ${body.data.length} samples in ${groups.size} groups`;
    if (body.step !== null && !body.data.length) info.textContent = `no samples at step ${step.value}`;
  }

  return {
    // the first time the run is known, show its latest step
    setRun(run) {
      const first = latest === 0;
      latest = run.step;
      limits = run.spec?.environment ?? null;
      step.max = String(Math.max(1, run.step));
      if (first) show();
    },
  };
}
