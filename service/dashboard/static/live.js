// Polling (EventSource cannot send an Authorization header): one tick at a time, paused while
// the tab is hidden, stopped when the view goes away.

import { flash } from "./dom.js";

export function poll(tick, intervalMs) {
  let timer = null;
  let busy = false;
  let stopped = false;

  const schedule = () => {
    if (!stopped && !busy && timer === null && !document.hidden) timer = setTimeout(run, intervalMs());
  };
  const run = async () => {
    timer = null;
    if (stopped || document.hidden) return;
    busy = true;
    try {
      await tick();
    } catch (err) {
      if (err.status !== 401) flash(err.message);
    }
    busy = false;
    schedule();
  };
  const onVisibility = () => {
    if (!document.hidden && !busy && timer === null) run();
  };
  document.addEventListener("visibilitychange", onVisibility);
  schedule();
  return {
    stop() {
      stopped = true;
      clearTimeout(timer);
      document.removeEventListener("visibilitychange", onVisibility);
    },
    // run a tick now (e.g. after a button changed the run's state)
    now() {
      if (stopped || busy) return;
      clearTimeout(timer);
      timer = null;
      run();
    },
  };
}
