// The run's event log, newest first, read incrementally with the ?after= cursor.

import { api, runPath } from "./api.js";
import { fmtTime, h } from "./dom.js";

const SHOWN = 500;

export function eventsPanel(main, runId) {
  let after = null;
  const body = h("tbody", { id: "events-body" });
  main.append(h("section", { class: "card" }, h("h3", {}, "Events"),
    h("div", { class: "events" }, h("table", {},
      h("thead", {}, h("tr", {}, h("th", {}, "time"), h("th", {}, "level"), h("th", {}, "type"), h("th", {}, "message"))),
      body))));

  return {
    async update() {
      for (let page = 0; page < 10; page += 1) {
        const got = await api(`${runPath(runId)}/events`, { params: { after, limit: 200 } });
        for (const e of got.data) {
          body.prepend(h("tr", { class: `level-${e.level}`, "data-type": e.type },
            h("td", {}, fmtTime(e.created_at)), h("td", {}, e.level), h("td", { class: "mono" }, e.type), h("td", {}, e.message)));
          after = e.id;
        }
        if (!got.has_more) break;
      }
      while (body.childElementCount > SHOWN) body.lastElementChild.remove();
    },
  };
}
