// Metric pickers over the names a run has recorded (GET .../metrics/names), grouped by their
// prefix (reward/, time/, eval/, ...; names without one under "general"): a checkbox list with a
// search box for a run's charts, a select for compare's one metric.

import { h } from "./dom.js";

const GENERAL = "general";

export function groupOf(name) {
  const cut = name.indexOf("/");
  return cut > 0 ? name.slice(0, cut) : GENERAL;
}

function byGroup(names) {
  const groups = new Map();
  for (const name of [...names].sort()) {
    const group = groupOf(name);
    if (!groups.has(group)) groups.set(group, []);
    groups.get(group).push(name);
  }
  return [...groups].sort(([a], [b]) => (a === GENERAL ? -1 : b === GENERAL ? 1 : a.localeCompare(b)));
}

// onToggle(name, on): a box was ticked or cleared. setNames(names, chosen): the list to offer.
export function metricPicker(parent, onToggle) {
  const search = h("input", { id: "metric-search", type: "search", placeholder: "filter metrics" });
  const count = h("span", { class: "muted" });
  const groups = h("div", { class: "metric-groups" });
  parent.append(h("details", { class: "metric-picker", id: "metric-picker" },
    h("summary", {}, "Metrics ", count), h("div", { class: "toolbar" }, search), groups));
  let offered = "";

  const filter = () => {
    const needle = search.value.trim().toLowerCase();
    for (const label of groups.querySelectorAll("label[data-metric]")) label.hidden = Boolean(needle) && !label.dataset.metric.toLowerCase().includes(needle);
    for (const set of groups.querySelectorAll("fieldset")) set.hidden = !set.querySelector("label:not([hidden])");
  };
  search.addEventListener("input", filter);

  return {
    setNames(names, chosen) {
      count.textContent = `(${chosen.size} of ${names.length} charted)`;
      const key = names.join("\n");
      if (key === offered) {
        for (const box of groups.querySelectorAll("input")) box.checked = chosen.has(box.value);
        return;
      }
      offered = key;
      groups.replaceChildren(...byGroup(names).map(([group, members]) => h("fieldset", { "data-group": group },
        h("legend", {}, group),
        members.map((name) => {
          const box = h("input", { type: "checkbox", value: name, checked: chosen.has(name) });
          box.addEventListener("change", () => onToggle(name, box.checked));
          return h("label", { "data-metric": name }, box, " ", name);
        }))));
      filter();
    },
  };
}

// A <select> of one metric, with an optgroup per prefix; onPick(name).
export function metricSelect(id, onPick) {
  const select = h("select", { id, "aria-label": "metric" });
  select.addEventListener("change", () => onPick(select.value));
  let offered = "";
  return {
    select,
    // rebuilt only when the names change: an open menu is not closed under the pointer
    setNames(names, current) {
      const key = `${names.join("\n")}\n${current}`;
      if (key === offered) return;
      offered = key;
      const options = byGroup(names).map(([group, members]) => h("optgroup", { label: group },
        members.map((name) => h("option", { value: name, selected: name === current }, name))));
      select.replaceChildren(...options);
      select.value = current;
    },
  };
}
