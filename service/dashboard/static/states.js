// The run state machine, read once from the API (GET /v1/run-states) before any view is built:
// the dashboard keeps no list of states of its own.

async function load() {
  try {
    const resp = await fetch("/v1/run-states", { headers: { Accept: "application/json" } });
    if (resp.ok) return await resp.json();
  } catch (err) {
    // below: the page shows what went wrong
  }
  document.getElementById("flash").hidden = false;
  document.getElementById("flash").textContent = "cannot read the run states from the API (GET /v1/run-states); reload the page";
  return { states: [], terminal: [], live: [], transitions: {}, actions: {} };
}

const machine = await load();

export const STATES = machine.states;
const terminal = new Set(machine.terminal);
const live = new Set(machine.live);

export const isTerminal = (run) => terminal.has(run.status);
export const isLive = (run) => live.has(run.status);
// Whether POST /v1/runs/{id}/<action> would be accepted in the run's state.
export const allows = (action, run) => (machine.actions[action] || []).includes(run.status);
