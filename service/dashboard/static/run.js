// One run: status with cancel / pause / resume, live curves (curves.js), samples, its resolved
// spec, checkpoints and events. While the run is queued or running, everything polls every 2 s,
// and the curves ask only for steps they have not drawn yet (since_step).

import { api, runPath } from "./api.js";
import { checkpointsPanel } from "./checkpoints.js";
import { configPanel } from "./config.js";
import { curves } from "./curves.js";
import { algorithmOf, fmtTime, h, stateBadge } from "./dom.js";
import { eventsPanel } from "./events.js";
import { poll } from "./live.js";
import { samplesPanel } from "./samples.js";
import { allows, isLive, isTerminal } from "./states.js";

// Built once; update(run) rewrites its values, so a button never changes under the pointer.
function header(runId, onAction) {
  const title = h("h2");
  const badge = h("span");
  const step = h("span", { id: "run-step" });
  const message = h("span", { id: "action-message", class: "error", role: "status" });
  const meta = h("div", { class: "meta" });
  const error = h("pre", { class: "run-error", hidden: true });
  const button = (label, action, cls) => h("button", {
    type: "button", id: `${action}-run`, class: cls, disabled: true,
    onclick: async (ev) => {
      ev.target.disabled = true;
      message.textContent = "";
      try {
        await api(`${runPath(runId)}/${action}`, { method: "POST" });
      } catch (err) {
        message.textContent = err.message;  // e.g. the 409 of an illegal transition
      }
      onAction();
    },
  }, label);
  const buttons = { pause: button("Pause", "pause", "secondary"), resume: button("Resume", "resume", "secondary"), cancel: button("Cancel", "cancel", "danger") };
  const section = h("section", { class: "card", id: "run-header" },
    h("div", { class: "run-head" }, title, h("code", {}, runId), badge, step, h("span", { class: "spacer" }),
      h("span", { class: "actions" }, buttons.pause, buttons.resume, buttons.cancel)),
    meta, error, message);
  const item = (label, value) => h("div", {}, h("span", {}, label), value);

  function update(run) {
    const a = run.spec?.algorithm || {};
    section.dataset.state = run.status;
    title.textContent = run.name || run.id;
    badge.replaceChildren(stateBadge(run.status));
    step.replaceChildren(`step ${run.step} / ${run.total_steps}`, h("progress", { max: run.total_steps, value: run.step }));
    buttons.pause.disabled = !allows("pause", run) || run.cancel_requested;
    buttons.resume.disabled = !allows("resume", run);
    buttons.cancel.disabled = !allows("cancel", run) || run.cancel_requested;
    meta.replaceChildren(
      item("algorithm", `${algorithmOf(run)} · β ${a.beta ?? "—"} · k ${a.group_size ?? "—"}`),
      item("model", run.spec?.model?.path ?? "—"),
      item("created", fmtTime(run.created_at)),
      item("started", fmtTime(run.started_at)),
      item("finished", fmtTime(run.finished_at)),
      item("samples", String(run.samples_generated)),
      item("tokens", String(run.tokens_generated)),
      ...(run.cancel_requested && !isTerminal(run) ? [item("cancel", "requested")] : []),
      ...(run.waiting_reason ? [item("waiting", run.waiting_reason)] : []));
    error.textContent = run.error ?? "";
    error.hidden = !run.error;
  }
  return { section, update };
}

export function runView(main, runId) {
  const head = header(runId, () => live.now());
  main.append(h("p", {}, h("a", { href: "#/runs" }, "← all runs")), head.section);
  const plots = curves(main, runId);
  const samples = samplesPanel(main, runId);
  const config = configPanel(main);
  const checkpoints = checkpointsPanel(main, runId);
  const events = eventsPanel(main, runId);
  let run = null;

  async function tick() {
    const wasLive = run === null || isLive(run);
    run = await api(runPath(runId)).catch((err) => {
      if (err.status === 404) live.stop();  // not this project's run: say so once
      throw err;
    });
    head.update(run);
    samples.setRun(run);
    config.setRun(run);
    // a run that just ended gets one last full round, then only its status is polled
    if (wasLive || isLive(run)) {
      await Promise.all([plots.update(true), events.update(), checkpoints.update()]);
    }
  }

  const live = poll(tick, () => (run && !isLive(run) ? 10000 : 2000));
  live.now();
  return {
    dispose() {
      live.stop();
      plots.destroy();
    },
  };
}
