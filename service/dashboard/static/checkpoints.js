// Checkpoints with download links. A plain link cannot carry the API key, so a click asks for a
// signed, short-lived URL (POST .../download-url) and lets the browser download from it.

import { api, runPath } from "./api.js";
import { fmtBytes, fmtTime, flash, h } from "./dom.js";

async function download(runId, ckpt, format) {
  try {
    const link = await api(`${runPath(runId)}/checkpoints/${encodeURIComponent(ckpt.id)}/download-url`, { method: "POST", params: { format } });
    const a = h("a", { href: link.url, download: `${ckpt.id}${format === "merged" ? "-merged" : ""}.tar.gz`, hidden: true });
    document.body.append(a);
    a.click();
    a.remove();
  } catch (err) {
    flash(`download of ${ckpt.id}: ${err.message}`);
  }
}

export function checkpointsPanel(main, runId) {
  const body = h("tbody", { id: "checkpoints-body" });
  main.append(h("section", { class: "card", id: "checkpoints" }, h("h3", {}, "Checkpoints"),
    h("table", {},
      h("thead", {}, h("tr", {}, h("th", { class: "num" }, "step"), h("th", {}, "id"), h("th", {}, "kind"),
        h("th", { class: "num" }, "size"), h("th", {}, "saved"), h("th", {}, "download"))),
      body)));

  const row = (ckpt) => h("tr", { "data-checkpoint": ckpt.id, "data-step": ckpt.step },
    h("td", { class: "num" }, String(ckpt.step)),
    h("td", { class: "mono" }, ckpt.id),
    h("td", {}, ckpt.kind),
    h("td", { class: "num" }, fmtBytes(ckpt.bytes)),
    h("td", {}, fmtTime(ckpt.created_at)),
    h("td", {},
      h("button", { type: "button", class: "link download", onclick: () => download(runId, ckpt, "stored") }, ".tar.gz"),
      ckpt.kind === "lora_adapter"
        ? h("button", { type: "button", class: "link download-merged", onclick: () => download(runId, ckpt, "merged") }, "merged .tar.gz")
        : null));

  // Rows are kept by id, in step order: a new checkpoint is added below, so no row moves under
  // the pointer while the run trains.
  const rows = new Map();
  return {
    async update() {
      const list = (await api(`${runPath(runId)}/checkpoints`)).data;
      const ids = new Set(list.map((c) => c.id));
      for (const [id, tr] of rows) {
        if (!ids.has(id)) {  // pruned (keep_last)
          tr.remove();
          rows.delete(id);
        }
      }
      for (const ckpt of list.filter((c) => !rows.has(c.id))) {
        const tr = row(ckpt);
        rows.set(ckpt.id, tr);
        const next = [...body.querySelectorAll("tr[data-step]")].find((r) => Number(r.dataset.step) > ckpt.step);
        body.insertBefore(tr, next ?? null);
      }
      body.querySelector(".no-checkpoints")?.remove();
      if (!rows.size) body.append(h("tr", { class: "no-checkpoints" }, h("td", { colspan: 6, class: "muted" }, "no checkpoints yet")));
    },
  };
}
