// A run's resolved spec (GET /v1/runs/{id} → spec, as the service stored it, defaults filled
// in): shown as YAML, the way the CLI takes it, and flattened to dotted keys for spec diffs.

import { h } from "./dom.js";

const PLAIN = /^[A-Za-z0-9_./@:+-][A-Za-z0-9_ ./@:+-]*$/;
const RESERVED = new Set(["null", "true", "false", "yes", "no", "on", "off", "~", ""]);

// A scalar as YAML writes it: strings bare when nothing could misread them, else JSON-quoted.
export function scalar(value) {
  if (value === null || value === undefined) return "null";
  if (typeof value !== "string") return JSON.stringify(value);
  const bare = PLAIN.test(value) && !RESERVED.has(value.toLowerCase()) && !/^[-+.\d]/.test(value) && !value.endsWith(" ");
  return bare ? value : JSON.stringify(value);
}

const isObject = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
const isLeaf = (v) => !isObject(v) && !Array.isArray(v);

// Lines of YAML for a value nested `depth` levels deep.
export function yamlLines(value, depth = 0) {
  const pad = "  ".repeat(depth);
  if (Array.isArray(value)) {
    if (!value.length) return [`${pad}[]`];
    if (value.every(isLeaf)) return [`${pad}[${value.map(scalar).join(", ")}]`];
    return value.flatMap((item) => {
      const inner = yamlLines(item, depth + 1);
      return [`${pad}- ${inner[0].trimStart()}`, ...inner.slice(1)];
    });
  }
  if (!isObject(value)) return [`${pad}${scalar(value)}`];
  if (!Object.keys(value).length) return [`${pad}{}`];
  return Object.entries(value).flatMap(([key, item]) => {
    if (isLeaf(item) || (Array.isArray(item) && (!item.length || item.every(isLeaf))) || (isObject(item) && !Object.keys(item).length)) {
      return [`${pad}${scalar(key)}: ${yamlLines(item).join("")}`];
    }
    return [`${pad}${scalar(key)}:`, ...yamlLines(item, depth + 1)];
  });
}

// {"algorithm.beta": 0.1, "reward.components[0].weight": 1, ...}: every leaf by its path.
// Empty objects and lists are leaves of their own, so that they still show in a diff.
export function flatten(value, prefix = "", out = {}) {
  if (Array.isArray(value) && value.length) {
    value.forEach((item, i) => flatten(item, `${prefix}[${i}]`, out));
  } else if (isObject(value) && Object.keys(value).length) {
    for (const [key, item] of Object.entries(value)) flatten(item, prefix ? `${prefix}.${key}` : key, out);
  } else {
    out[prefix] = value;
  }
  return out;
}

export function configPanel(main) {
  const yaml = h("pre", { class: "spec-yaml", id: "config-yaml" });
  const copy = h("button", { type: "button", class: "secondary", id: "copy-config" }, "Copy YAML");
  const note = h("span", { class: "muted", role: "status" });
  copy.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(yaml.textContent);
      note.textContent = "copied";
    } catch (err) {
      note.textContent = `cannot copy: ${err.message}`;
    }
  });
  main.append(h("details", { class: "card", id: "run-config" },
    h("summary", {}, h("h3", {}, "Config"), h("span", { class: "muted" }, " the run's resolved spec")),
    h("div", { class: "toolbar" }, copy, note), yaml));
  let shown = null;
  return {
    setRun(run) {
      const text = yamlLines(run.spec ?? {}).join("\n");
      if (text !== shown) yaml.textContent = text;
      shown = text;
    },
  };
}
