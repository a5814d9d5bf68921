// A multi-turn sample (the samples API's `episode`), turn by turn: the policy's turns are the
// tokens the loss trains on; the environment's answers and the chat template's tokens between
// turns are masked. Each turn carries data-role and data-trained, which the browser test reads.

import { h, textBlock } from "./dom.js";

// What ended the episode; `limits` is the run spec's environment section, for the limit's value.
function endText(end, limits) {
  if (end === "done") return "done: the environment ended it";
  const limit = limits?.[end];
  return `truncated at ${end}${limit === undefined ? "" : ` = ${limit}`}`;
}

// An OpenAI tool call ({id, type: "function", function: {name, arguments}}) as name(arguments).
function toolCall(call) {
  const fn = call?.function;
  const text = fn?.name ? `${fn.name}(${fn.arguments ?? ""})` : JSON.stringify(call);
  return h("div", { class: "tool-call" },
    h("span", { class: "muted" }, "tool call", call?.id ? ` ${call.id}` : ""),
    h("pre", { class: "text" }, text));
}

function turnBox(turn) {
  const trained = turn.trained ? "trained" : "not trained";
  return h("div", { class: `turn ${turn.trained ? "trained" : "masked"}`, "data-role": turn.role, "data-trained": String(turn.trained) },
    h("div", { class: "turn-head" },
      h("strong", { class: "role" }, turn.role),
      turn.tool_call_id ? h("span", { class: "muted" }, `answers ${turn.tool_call_id}`) : null,
      h("span", { class: "spacer" }),
      h("span", { class: "train-mark", title: turn.trained ? "sampled by the policy: in the loss" : "environment or template tokens: masked out of the loss" },
        `${trained} · ${turn.tokens} tokens`)),
    turn.content || !turn.tool_calls?.length ? textBlock(turn.content) : null,
    (turn.tool_calls || []).map(toolCall));
}

export function episodeBlock(episode, limits) {
  return h("div", { class: "episode", "data-end": episode.end },
    h("div", { class: "episode-head" },
      h("span", { class: `end end-${episode.end}` }, endText(episode.end, limits)),
      h("span", { class: "tokens" }, `${episode.trained_tokens} of ${episode.tokens} tokens trained`)),
    episode.turns.map(turnBox));
}
