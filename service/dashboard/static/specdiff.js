// Two runs' resolved specs side by side, flattened to dotted keys: changed, added (only in B)
// and removed (only in A) keys highlighted; the keys both share unchanged are hidden unless
// asked for.

import { flatten, scalar } from "./config.js";
import { h } from "./dom.js";

const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);

// [{key, a, b, change}], change one of "changed", "added", "removed", "same"; keys in order.
export function diffSpecs(specA, specB) {
  const a = flatten(specA ?? {});
  const b = flatten(specB ?? {});
  const keys = [...new Set([...Object.keys(a), ...Object.keys(b)])].sort();
  return keys.map((key) => {
    const inA = key in a;
    const inB = key in b;
    const change = !inA ? "added" : !inB ? "removed" : same(a[key], b[key]) ? "same" : "changed";
    return { key, a: a[key], b: b[key], change, inA, inB };
  });
}

const cell = (present, value) => h("td", { class: "mono" }, present ? scalar(value) : h("span", { class: "muted" }, "(absent)"));

// label(run): how a run is named in the pickers. setRuns(runs): the runs compared, in order.
export function specDiffPanel(parent, label) {
  const pickA = h("select", { id: "diff-a", "aria-label": "run A" });
  const pickB = h("select", { id: "diff-b", "aria-label": "run B" });
  const all = h("input", { id: "diff-all", type: "checkbox" });
  const summary = h("span", { id: "diff-summary", class: "muted" });
  const headA = h("th", {}, "A");
  const headB = h("th", {}, "B");
  const body = h("tbody", { id: "spec-diff" });
  parent.append(h("section", { class: "card", id: "spec-diff-panel" }, h("h3", {}, "Spec diff"),
    h("div", { class: "toolbar" }, h("label", {}, "A ", pickA), h("label", {}, "B ", pickB), h("label", {}, all, " show unchanged keys"), summary),
    h("table", { class: "spec-diff" }, h("thead", {}, h("tr", {}, h("th", {}, "key"), headA, headB)), body)));
  let runs = [];
  let offered = "";

  function render() {
    const [a, b] = [pickA.value, pickB.value].map((id) => runs.find((r) => r.id === id));
    if (!a || !b) {
      body.replaceChildren(h("tr", {}, h("td", { colspan: 3, class: "muted" }, "compare two runs to see how their specs differ")));
      return;
    }
    headA.textContent = `A: ${label(a)}`;
    headB.textContent = `B: ${label(b)}`;
    const rows = diffSpecs(a.spec, b.spec);
    const differ = rows.filter((r) => r.change !== "same");
    summary.textContent = `${differ.length} of ${rows.length} keys differ`;
    body.replaceChildren(...(all.checked ? rows : differ).map((r) => h("tr", { class: `diff-${r.change}`, "data-key": r.key, "data-change": r.change },
      h("td", { class: "mono key" }, r.key), cell(r.inA, r.a), cell(r.inB, r.b))));
    if (!differ.length && !all.checked) body.append(h("tr", {}, h("td", { colspan: 3, class: "muted" }, "the specs are the same")));
  }
  for (const input of [pickA, pickB, all]) input.addEventListener("change", render);

  return {
    setRuns(list) {
      runs = list;
      const key = list.map((r) => r.id).join(",");
      if (key !== offered) {
        offered = key;
        const keep = [pickA.value, pickB.value];
        const options = () => list.map((r) => h("option", { value: r.id }, label(r)));
        pickA.replaceChildren(...options());
        pickB.replaceChildren(...options());
        pickA.value = list.some((r) => r.id === keep[0]) ? keep[0] : list[0]?.id ?? "";
        pickB.value = list.some((r) => r.id === keep[1]) ? keep[1] : list[1]?.id ?? list[0]?.id ?? "";
        render();  // specs do not change: only a new set of runs redraws
      }
    },
  };
}
