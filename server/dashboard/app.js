// TuFT-JAX dashboard: a hash-routed page over /dashboard/api/* (sent with the API key kept in
// sessionStorage). Everything is built with DOM calls, never innerHTML, since run ids, names and
// completions are user data.
"use strict";

const KEY = "tuft-api-key";
const SVG = "http://www.w3.org/2000/svg";
const HEALTH_POLL_MS = 2000;
const SERIES_ORDER = ["loss_per_token", "loss:sum", "grad_norm:mean", "learning_rate", "tokens", "weighted_tokens", "step_seconds"];
const SERIES_TITLES = {
  loss_per_token: "Loss per token",
  "loss:sum": "Loss (sum)",
  "grad_norm:mean": "Gradient norm",
  learning_rate: "Learning rate",
  tokens: "Tokens per step",
  weighted_tokens: "Weighted target tokens",
  step_seconds: "Step time (s)",
};

let healthTimer = null;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children.flat().filter((c) => c !== null && c !== undefined));
  return node;
}

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  node.append(...children);
  return node;
}

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const headers = { "X-API-Key": sessionStorage.getItem(KEY) || "", ...(options.headers || {}) };
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { ...options, headers });
  const body = await response.json().catch(() => ({}));
  if (response.status === 401) {
    signOut(body.detail || "the API key was refused");
    throw new ApiError(401, body.detail);
  }
  if (!response.ok) throw new ApiError(response.status, body.detail || response.statusText);
  return body;
}

// ---- formatting ------------------------------------------------------------------------------

function num(value) {
  if (value === null || value === undefined) return "–";
  if (Number.isInteger(value)) return String(value);
  if (Math.abs(value) >= 1e5 || (value !== 0 && Math.abs(value) < 1e-3)) return value.toExponential(2);
  return String(Number(value.toPrecision(4)));
}

function bytes(size) {
  if (size === null || size === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (size >= 1024 && i < units.length - 1) { size /= 1024; i += 1; }
  return `${i ? size.toFixed(1) : size} ${units[i]}`;
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "–";
}

function ttl(iso) {
  if (!iso) return "none";
  const seconds = Math.round((new Date(iso) - Date.now()) / 1000);
  if (seconds <= 0) return "expired";
  const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60);
  return h ? `${h} h ${m} min` : m ? `${m} min` : `${seconds} s`;
}

function lora(config) {
  const parts = ["attn", "mlp", "unembed"].filter((p) => config[`train_${p}`]);
  return `rank ${config.rank} (${parts.join(", ")})`;
}

// ---- chart -----------------------------------------------------------------------------------

function lineChart(name, steps, values) {
  const width = 360, height = 190, left = 58, right = 12, top = 10, bottom = 26;
  const points = steps.map((s, i) => [s, values[i]]).filter(([, v]) => v !== null && Number.isFinite(v));
  const caption = el("figcaption", {}, SERIES_TITLES[name] || name);
  if (!points.length) return el("figure", { class: "chart", "data-metric": name }, caption, el("p", { class: "muted" }, "no values"));
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)], [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { const pad = Math.abs(y0) * 0.1 || 1; y0 -= pad; y1 += pad; }
  const x = (s) => left + ((s - x0) / (x1 - x0)) * (width - left - right);
  const y = (v) => top + (1 - (v - y0) / (y1 - y0)) * (height - top - bottom);
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, "data-series": name });
  chart.append(
    svg("line", { class: "axis", x1: left, y1: top, x2: left, y2: height - bottom }),
    svg("line", { class: "axis", x1: left, y1: height - bottom, x2: width - right, y2: height - bottom }),
    svg("text", { x: left - 4, y: top + 8, "text-anchor": "end" }, num(y1)),
    svg("text", { x: left - 4, y: height - bottom, "text-anchor": "end" }, num(y0)),
    svg("text", { x: left, y: height - 8 }, `step ${num(Math.min(...xs))}`),
    svg("text", { x: width - right, y: height - 8, "text-anchor": "end" }, `step ${num(Math.max(...xs))}`),
    svg("polyline", { class: "line", points: points.map(([s, v]) => `${x(s)},${y(v)}`).join(" ") }),
  );
  for (const [s, v] of points) {
    chart.append(svg("circle", { class: "point", cx: x(s), cy: y(v), r: 2.6 }, svg("title", {}, `step ${s}: ${num(v)}`)));
  }
  return el("figure", { class: "chart", "data-metric": name }, caption, chart);
}

function seriesNames(series) {
  const names = Object.keys(series);
  const rank = (n) => (SERIES_ORDER.includes(n) ? SERIES_ORDER.indexOf(n) : SERIES_ORDER.length);
  return names.sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
}

// ---- views -----------------------------------------------------------------------------------

function show(...nodes) {
  const view = document.getElementById("view");
  view.replaceChildren(...nodes);
  view.hidden = false;
}

function fail(error) {
  if (error.status !== 401) show(el("p", { class: "error", id: "view-error" }, error.message));
}

async function runsView() {
  const { runs, total } = await api("/dashboard/api/runs");
  if (!runs.length) {
    show(el("h2", {}, "Training runs"), el("p", { id: "no-runs", class: "muted" }, "No training runs yet."));
    return;
  }
  const rows = runs.map((r) =>
    el("tr", { "data-run-id": r.model_id },
      el("td", {}, el("a", { class: "run-link mono", href: `#/runs/${encodeURIComponent(r.model_id)}` }, r.model_id)),
      el("td", {}, r.base_model),
      el("td", {}, lora(r.lora)),
      el("td", { class: "step" }, String(r.step)),
      el("td", { class: "mono" }, r.session_id),
      el("td", {}, el("span", { class: `status ${r.status}` }, r.status)),
      el("td", {}, when(r.last_request_time))));
  show(
    el("h2", {}, `Training runs (${total})`),
    el("table", { id: "runs-table" },
      el("thead", {}, el("tr", {}, ["Run", "Base model", "LoRA", "Step", "Session", "Status", "Last request"].map((h) => el("th", {}, h)))),
      el("tbody", {}, rows)),
  );
}

async function runView(runId) {
  const { run, curves, checkpoints } = await api(`/dashboard/api/runs/${encodeURIComponent(runId)}`);
  const names = seriesNames(curves.series);
  const charts = names.length
    ? el("div", { class: "charts", id: "charts" }, names.map((n) => lineChart(n, curves.steps, curves.series[n])))
    : el("p", { class: "muted", id: "charts" }, "No optimizer steps yet.");
  const detail = el("div", { id: "checkpoint-detail", hidden: true });
  const rows = checkpoints.map((c) =>
    el("tr", { "data-path": c.tinker_path },
      el("td", {}, el("a", { class: "checkpoint-link mono", href: "#", onclick: (e) => { e.preventDefault(); openCheckpoint(c, detail); } }, c.name)),
      el("td", {}, c.kind),
      el("td", {}, bytes(c.size_bytes)),
      el("td", {}, when(c.created_at)),
      el("td", {}, ttl(c.expires_at)),
      el("td", {}, c.public ? "public" : "private")));
  show(
    el("p", {}, el("a", { href: "#/runs" }, "← all runs")),
    el("h2", { class: "mono", id: "run-title" }, run.model_id),
    el("dl", { class: "info" },
      el("dt", {}, "Base model"), el("dd", {}, run.base_model),
      el("dt", {}, "LoRA"), el("dd", {}, lora(run.lora)),
      el("dt", {}, "Step"), el("dd", { id: "run-step" }, String(run.step)),
      el("dt", {}, "Session"), el("dd", { class: "mono" }, run.session_id),
      el("dt", {}, "Status"), el("dd", {}, el("span", { class: `status ${run.status}` }, run.status)),
      el("dt", {}, "Created"), el("dd", {}, when(run.created_at))),
    el("h3", {}, "Metrics per step"),
    charts,
    el("h3", {}, "Checkpoints"),
    checkpoints.length
      ? el("table", { id: "checkpoints" },
          el("thead", {}, el("tr", {}, ["Name", "Kind", "Size", "Saved", "TTL", "Visibility"].map((h) => el("th", {}, h)))),
          el("tbody", {}, rows))
      : el("p", { class: "muted", id: "checkpoints" }, "No checkpoints."),
    detail,
  );
}

async function openCheckpoint(checkpoint, detail) {
  const download = el("a", { id: "download", class: "muted" }, "preparing download link…");
  const actions = [download];
  if (checkpoint.kind === "sampler_weights") {
    actions.push(" ", el("button", { type: "button", class: "secondary", id: "open-in-playground",
      onclick: () => { location.hash = `#/playground?model=${encodeURIComponent(checkpoint.tinker_path)}`; } }, "Sample in playground"));
  }
  detail.replaceChildren(
    el("h3", {}, `Checkpoint ${checkpoint.name}`),
    el("dl", { class: "info" },
      el("dt", {}, "Path"), el("dd", { class: "mono", id: "checkpoint-path" }, checkpoint.tinker_path),
      el("dt", {}, "Kind"), el("dd", {}, checkpoint.kind),
      el("dt", {}, "Size"), el("dd", {}, bytes(checkpoint.size_bytes)),
      el("dt", {}, "Saved"), el("dd", {}, when(checkpoint.created_at)),
      el("dt", {}, "Expires"), el("dd", {}, checkpoint.expires_at ? `${when(checkpoint.expires_at)} (in ${ttl(checkpoint.expires_at)})` : "never"),
      el("dt", {}, "Public"), el("dd", {}, checkpoint.public ? "yes" : "no")),
    el("p", {}, actions),
  );
  detail.hidden = false;
  try {
    const { url } = await api(checkpoint.archive, { headers: { Accept: "application/json" } });
    download.replaceChildren("Download .tar.gz");
    download.setAttribute("href", url);
    download.setAttribute("class", "");
  } catch (error) {
    download.replaceChildren(`download unavailable: ${error.message}`);
  }
}

async function playgroundView(params) {
  const { base_models, sampler_checkpoints } = await api("/dashboard/api/models");
  const chosen = params.get("model");
  const option = (value) => el("option", { value, selected: value === chosen }, value);
  const model = el("select", { id: "pg-model" },
    el("optgroup", { label: "Base models" }, base_models.map(option)),
    sampler_checkpoints.length ? el("optgroup", { label: "Sampler checkpoints" }, sampler_checkpoints.map(option)) : null);
  const prompt = el("textarea", { id: "pg-prompt", placeholder: "Type a prompt" });
  const maxTokens = el("input", { id: "pg-max-tokens", type: "number", min: 1, max: 1024, value: 24 });
  const temperature = el("input", { id: "pg-temperature", type: "number", min: 0, step: "any", value: 0.7 });
  const topP = el("input", { id: "pg-top-p", type: "number", min: 0.01, max: 1, step: "any", value: 1 });
  const stop = el("input", { id: "pg-stop", placeholder: "stop strings, comma-separated" });
  const output = el("div", { id: "pg-output" }, el("p", { class: "muted" }, "The completion appears here, each token shaded by its logprob."));
  const button = el("button", { id: "pg-sample", type: "submit" }, "Sample");
  const submit = async (event) => {
    event.preventDefault();
    button.disabled = true;
    output.replaceChildren(el("p", { class: "muted" }, "Sampling…"));
    try {
      const result = await api("/dashboard/api/sample", {
        method: "POST",
        body: JSON.stringify({
          model: model.value, prompt: prompt.value, max_tokens: Number(maxTokens.value),
          temperature: Number(temperature.value), top_p: Number(topP.value),
          stop: stop.value.split(",").map((s) => s.trim()).filter(Boolean),
        }),
      });
      output.replaceChildren(...completionView(prompt.value, result));
    } catch (error) {
      output.replaceChildren(el("p", { class: "error", id: "pg-error" }, error.message));
    } finally {
      button.disabled = false;
    }
  };
  show(
    el("h2", {}, "Sampling playground"),
    el("div", { class: "playground" },
      el("form", { id: "pg-form", onsubmit: submit },
        el("label", {}, "Model", model),
        el("label", {}, "Prompt", prompt),
        el("div", { class: "row" }, el("label", {}, "Max tokens", maxTokens), el("label", {}, "Temperature", temperature), el("label", {}, "Top-p", topP)),
        el("label", {}, "Stop", stop),
        el("div", {}, button)),
      output),
  );
}

function completionView(promptText, result) {
  const shade = (lp) => (lp > -1 ? "lp-high" : lp > -4 ? "lp-mid" : "lp-low");
  const spans = result.tokens.map((t) => el("span", { class: `token ${shade(t.logprob)}`, title: `logprob ${num(t.logprob)}`, "data-logprob": t.logprob }, t.text));
  return [
    el("div", { class: "completion", id: "pg-completion" }, el("span", { class: "prompt" }, promptText), spans),
    el("p", { class: "muted" }, `${result.tokens.length} tokens, finished by ${result.finish}; prompt ${result.prompt_tokens} tokens.`),
    el("table", { class: "tokens-table", id: "pg-tokens" },
      el("thead", {}, el("tr", {}, el("th", {}, "#"), el("th", {}, "Token"), el("th", {}, "Logprob"))),
      el("tbody", {}, result.tokens.map((t, i) => el("tr", {}, el("td", {}, String(i + 1)), el("td", { class: "mono" }, JSON.stringify(t.text)), el("td", {}, num(t.logprob)))))),
  ];
}

async function healthView() {
  const cards = el("div", { id: "health-cards" });
  const stamp = el("p", { class: "muted", id: "health-updated" });
  show(el("h2", {}, "Server health"), cards, stamp);
  const refresh = async () => {
    const health = await api("/dashboard/api/health");
    cards.replaceChildren(...healthCards(health));
    stamp.replaceChildren(`Updated ${new Date().toLocaleTimeString()} (every ${HEALTH_POLL_MS / 1000} s)`);
  };
  await refresh();
  healthTimer = setInterval(() => refresh().catch(fail), HEALTH_POLL_MS);
}

function healthCards(health) {
  const card = (label, value, id) => el("div", { class: "card", "data-figure": id }, el("div", { class: "value" }, value), el("div", { class: "label" }, label));
  const sections = [el("div", { class: "cards" }, card("XLA compilations", String(health.xla_compiles), "xla_compiles"),
    card("Compile time", `${num(health.xla_compile_seconds)} s`, "xla_compile_seconds"))];
  for (const [name, m] of Object.entries(health.models)) {
    const kv = m.kv || {};
    const rate = (kind) => (kind in m.tokens_per_second ? num(m.tokens_per_second[kind]) : "–");
    sections.push(el("h3", {}, name), el("div", { class: "cards", "data-model": name },
      card("Queue depth", String(m.queue_depth), "queue_depth"),
      card("Sampling tokens/s (latest)", rate("sample"), "sample_tokens_per_second"),
      card("Training tokens/s (latest)", rate("forward_backward"), "train_tokens_per_second"),
      card("KV blocks in use", `${kv.used ?? "–"} / ${kv.total ?? "–"}`, "kv_used"),
      card("KV blocks idle in prefix cache", String(kv.cached_idle ?? "–"), "kv_cached_idle"),
      card("Prefix-cache hit blocks", String(kv.prefix_hits ?? "–"), "kv_prefix_hits"),
      card("Preemptions", String(kv.preemptions ?? "–"), "kv_preemptions"),
      card("Engine calls", String(Object.values(m.calls).reduce((a, b) => a + b, 0)), "calls")));
  }
  return sections;
}

// ---- routing and sign-in ---------------------------------------------------------------------

function signOut(message = "") {
  sessionStorage.removeItem(KEY);
  document.getElementById("signin-error").textContent = message;
  route();
}

async function route() {
  clearInterval(healthTimer);
  const signedIn = Boolean(sessionStorage.getItem(KEY));
  document.getElementById("signin").hidden = signedIn;
  document.getElementById("nav").hidden = !signedIn;
  document.getElementById("view").hidden = !signedIn;
  if (!signedIn) return;
  const [path, query] = (location.hash.slice(1) || "/runs").split("?");
  const parts = path.split("/").filter(Boolean);
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("active", link.dataset.view === parts[0]);
  try {
    if (parts[0] === "runs" && parts[1]) await runView(decodeURIComponent(parts[1]));
    else if (parts[0] === "playground") await playgroundView(new URLSearchParams(query || ""));
    else if (parts[0] === "health") await healthView();
    else await runsView();
  } catch (error) {
    fail(error);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("signin-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, document.getElementById("api-key").value.trim());
    document.getElementById("api-key").value = "";
    document.getElementById("signin-error").textContent = "";
    route();
  });
  document.getElementById("sign-out").addEventListener("click", () => signOut());
  window.addEventListener("hashchange", route);
  route();
});
