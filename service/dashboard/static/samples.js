// The sample browser: one step's completions, grouped by prompt group, with their rewards and
// GVPO weights (w_i, the completion's weight in the loss) and log-ratios (log π/π_ref, summed).
// A multi-turn run's samples are episodes, shown turn by turn (episode.js). While the run
// trains, the browser follows its latest step until a step is chosen.

import { api, runPath } from "./api.js";
import { fmtNum, h, textBlock } from "./dom.js";
import { episodeBlock } from "./episode.js";
import { isLive } from "./states.js";

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
      h("thead", {}, h("tr", {}, h("th", {}, "#"), h("th", {}, rows.some((s) => s.episode) ? "episode" : "completion"), h("th", { class: "num" }, "reward"),
        h("th", { class: "num symbol", title: "w_i: the completion's GVPO weight in the loss, centred reward − β · centred log-ratio" }, "w", h("sub", {}, "i")),
        h("th", { class: "num", title: "log π/π_ref summed over the completion's tokens" }, "log-ratio"))),
      h("tbody", {}, rows.map((s) => h("tr", { class: "sample" },
        h("td", {}, String(s.sample_index)),
        s.episode
          ? h("td", { class: "episode-cell" }, episodeBlock(s.episode, limits))
          : h("td", { class: "completion" }, textBlock(s.completion)),
        h("td", { class: "num reward" }, fmtNum(s.reward)),
        h("td", { class: "num weight" }, fmtNum(s.weight)),
        h("td", { class: "num logratio" }, fmtNum(s.logratio)))))));
}

export function samplesPanel(main, runId) {
  let latest = null;
  let limits = null;
  const step = h("input", { id: "sample-step", type: "number", min: 1, step: 1, placeholder: "latest" });
  const follow = h("input", { id: "follow-samples", type: "checkbox", checked: true });
  const info = h("span", { id: "samples-info", class: "muted" });
  const list = h("div", { id: "samples" });
  // a step chosen by hand stops following the run
  const go = (s) => {
    follow.checked = false;
    if (s !== null) step.value = String(Math.max(1, s));
    show();
  };
  const toLatest = () => {
    follow.checked = true;
    step.value = "";
    show();
  };
  step.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter") go(null);
  });
  follow.addEventListener("change", () => {
    if (follow.checked) toLatest();
  });
  const controls = h("div", { class: "toolbar" },
    h("label", {}, "step ", step),
    h("button", { type: "button", id: "show-samples", onclick: () => go(null) }, "Show"),
    h("button", { type: "button", class: "secondary", onclick: () => go(Number(step.value || list.dataset.step || latest || 1) - 1) }, "◀ previous"),
    h("button", { type: "button", class: "secondary", onclick: () => go(Number(step.value || list.dataset.step || latest || 0) + 1) }, "next ▶"),
    h("button", { type: "button", class: "secondary", id: "latest-samples", onclick: toLatest }, "latest"),
    h("label", { title: "show each new step's samples as the run records them" }, follow, " follow the run"),
    info);
  main.append(h("section", { class: "card", id: "sample-browser" }, h("h3", {}, "Samples"), controls, list));

  let asked = 0;  // a slow answer overtaken by a newer question is dropped
  async function show() {
    const seq = ++asked;
    const body = await api(`${runPath(runId)}/samples`, { params: { step: step.value || null } }).catch((err) => {
      info.textContent = err.message;
      return null;
    });
    if (!body || seq !== asked) return;
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
    // the first time the run is known, show its latest step; then each new one while following
    setRun(run) {
      const first = latest === null;
      latest = run.step;
      limits = run.spec?.environment ?? null;
      step.max = String(Math.max(1, run.step));
      const behind = Number(list.dataset.step || 0) < run.step;  // e.g. its samples landed late
      if (first || (follow.checked && behind && isLive(run))) show();
    },
  };
}
