// The run's event log, newest first, read incrementally with the ?after= cursor, filtered in the
// page by level, type (the ones the log holds) and free text over type and message.

import { api, runPath } from "./api.js";
import { fmtTime, h } from "./dom.js";

const SHOWN = 500;

// A <select> whose options are "any" and every value seen so far, sorted.
function seenSelect(id, any) {
  const select = h("select", { id, "aria-label": any }, h("option", { value: "" }, any));
  const seen = new Set();
  return {
    select,
    see(value) {
      if (seen.has(value)) return;
      seen.add(value);
      const next = [...select.options].slice(1).find((o) => o.value > value);
      select.insertBefore(h("option", { value }, value), next ?? null);
    },
  };
}

export function eventsPanel(main, runId) {
  let after = null;
  const body = h("tbody", { id: "events-body" });
  const level = seenSelect("event-level", "any level");
  const type = seenSelect("event-type", "any type");
  const text = h("input", { id: "event-text", type: "search", placeholder: "filter by text" });
  const count = h("span", { id: "events-count", class: "muted" });
  main.append(h("section", { class: "card", id: "events" }, h("h3", {}, "Events"),
    h("div", { class: "toolbar" }, level.select, type.select, text, count),
    h("div", { class: "events" }, h("table", {},
      h("thead", {}, h("tr", {}, h("th", {}, "time"), h("th", {}, "level"), h("th", {}, "type"), h("th", {}, "message"))),
      body))));

  const matches = (tr) => {
    const needle = text.value.trim().toLowerCase();
    return (!level.select.value || tr.dataset.level === level.select.value)
      && (!type.select.value || tr.dataset.type === type.select.value)
      && (!needle || tr.textContent.toLowerCase().includes(needle));
  };
  const filter = () => {
    let shown = 0;
    for (const tr of body.rows) {
      tr.hidden = !matches(tr);
      if (!tr.hidden) shown += 1;
    }
    count.textContent = `${shown} of ${body.rows.length} events`;
  };
  for (const input of [level.select, type.select]) input.addEventListener("change", filter);
  text.addEventListener("input", filter);

  return {
    async update() {
      for (let page = 0; page < 10; page += 1) {
        const got = await api(`${runPath(runId)}/events`, { params: { after, limit: 200 } });
        for (const e of got.data) {
          body.prepend(h("tr", { class: `level-${e.level}`, "data-type": e.type, "data-level": e.level },
            h("td", {}, fmtTime(e.created_at)), h("td", {}, e.level), h("td", { class: "mono" }, e.type), h("td", {}, e.message)));
          level.see(e.level);
          type.see(e.type);
          after = e.id;
        }
        if (!got.has_more) break;
      }
      while (body.childElementCount > SHOWN) body.lastElementChild.remove();
      filter();
    },
  };
}
