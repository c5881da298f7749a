// SAGE dashboard: reads the admin-keyed management API and draws it. No framework, no
// build step. Every value from the API reaches the page through textContent or an SVG
// attribute, never through innerHTML. The admin key lives in sessionStorage and travels
// only in the Authorization header.
"use strict";

(() => {
  const KEY_STORAGE = "sage.dashboard.adminKey";
  const REFRESH_MS = 3000;
  const PRESENT = new Set(["RUNNING", "STARTING"]);
  const SVG_NS = "http://www.w3.org/2000/svg";
  const PALETTE = 6; // colour classes s0..s5 in style.css

  const $ = (id) => document.getElementById(id);
  let timer = null;
  let busy = false;
  let backendsLoaded = false;
  let presets = [];

  // ---- small DOM helpers (text only) ----
  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }
  function row(cells) {
    const tr = document.createElement("tr");
    for (const cell of cells) {
      tr.appendChild(cell instanceof Node ? wrapCell(cell) : el("td", cell));
    }
    return tr;
  }
  function wrapCell(node) {
    if (node.tagName === "TD") return node;
    const td = document.createElement("td");
    td.appendChild(node);
    return td;
  }
  function svg(tag, attrs) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    return node;
  }
  function fill(tbody, rows, emptyText, columns) {
    tbody.replaceChildren();
    if (!rows.length) {
      const td = el("td", emptyText, "muted");
      td.colSpan = columns;
      const tr = document.createElement("tr");
      tr.appendChild(td);
      tbody.appendChild(tr);
      return;
    }
    for (const r of rows) tbody.appendChild(r);
  }

  // ---- formatting ----
  const GiB = 1024 ** 3;
  const gib = (bytes) => (bytes / GiB).toFixed(1) + " GiB";
  function num(value, digits) {
    if (value === undefined || value === null || Number.isNaN(value)) return "–";
    return Number(value).toFixed(digits);
  }
  const ms = (value) => (value ? num(value, 1) + " ms" : "–");
  const pct = (value) => num(value * 100, 1) + " %";
  const clock = (t) => new Date(t * 1000).toLocaleTimeString();

  // ---- the API ----
  function adminKey() {
    return sessionStorage.getItem(KEY_STORAGE) || "";
  }
  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }
  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    const key = adminKey();
    if (key) headers.Authorization = "Bearer " + key;
    const init = { method, headers, credentials: "omit", cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    let data = null;
    try {
      data = await response.json();
    } catch (_) {
      data = null;
    }
    if (!response.ok) {
      const message = (data && data.error && data.error.message) || response.statusText;
      throw new ApiError(response.status, message);
    }
    return data;
  }

  // ---- banner and action log ----
  function showBanner(text, kind) {
    const banner = $("banner");
    banner.textContent = text;
    banner.className = kind || "error";
    banner.hidden = !text;
  }
  function logAction(text, failed) {
    const line = el("div", clock(Date.now() / 1000) + "  " + text, failed ? "failed" : "ok");
    const log = $("action-log");
    log.prepend(line);
    while (log.childNodes.length > 6) log.lastChild.remove();
  }
  function authProblem(error) {
    if (error.status === 401) {
      return (
        "The admin key is required for the dashboard's data (the API answered 401): " +
        error.message
      );
    }
    if (error.status === 403) return "Access refused (403): " + error.message;
    return null;
  }

  // ---- rendering ----
  function renderSummary(status, series) {
    const cp = status.control_plane || {};
    const metrics = cp.metrics || {};
    const models = metrics.models || [];
    const slo = models.length ? Math.min(...models.map((m) => m.slo_attainment)) : null;
    const cards = [
      ["Policy", cp.policy || "–"],
      ["Engines ready", `${cp.instances_ready ?? 0} / ${cp.instances ?? 0}`],
      ["Queued", cp.pending_requests ?? 0],
      ["In flight", cp.running_requests ?? 0],
      ["Requests", metrics.requests_total ?? 0],
      ["Failed", metrics.requests_failed ?? 0],
      ["SLO attainment (worst model)", slo === null ? "–" : pct(slo)],
      ["Samples", `${series.samples.length} × ${series.interval_s} s`],
    ];
    const box = $("summary");
    box.replaceChildren();
    for (const [label, value] of cards) {
      const card = el("div", null, "card");
      card.appendChild(el("span", label, "label"));
      card.appendChild(el("strong", value));
      box.appendChild(card);
    }
  }

  function actionButton(text, engineId, handler) {
    const button = el("button", text);
    button.type = "button";
    button.dataset.engine = engineId;
    button.dataset.action = text.toLowerCase();
    button.addEventListener("click", handler);
    return button;
  }

  function renderEngines(status, latest) {
    const inFlight = (latest && latest.engine_in_flight) || {};
    const rows = (status.engines || []).map((e) => {
      const tr = row([
        el("td", e.engine_id, "mono"),
        e.model_id,
        e.engine_kind,
        e.backend,
        e.node_id || "local",
        el("td", e.status, "status " + String(e.status).toLowerCase()),
        e.restart_count,
        inFlight[e.engine_id] !== undefined ? num(inFlight[e.engine_id], 0) : "0",
        (e.gpu_ids || []).join(", ") || "–",
      ]);
      tr.dataset.engine = e.engine_id;
      const actions = document.createElement("td");
      if (PRESENT.has(e.status)) {
        actions.appendChild(actionButton("Drain", e.engine_id, () => stopEngine(e, true)));
        actions.appendChild(actionButton("Stop", e.engine_id, () => stopEngine(e, false)));
      }
      tr.appendChild(actions);
      if (e.error) tr.title = e.error;
      return tr;
    });
    fill($("engines").tBodies[0], rows, "No engines. Start one below or apply a preset.", 10);
  }

  function renderModels(status, latest) {
    const models = ((status.control_plane || {}).metrics || {}).models || [];
    const sampled = (latest && latest.models) || {};
    const rows = models.map((m) =>
      row([
        m.model,
        m.queued,
        num(m.rps, 2),
        num((sampled[m.model] || {}).tokens_per_s, 1),
        ms(m.ttft_p50_ms),
        ms(m.tpot_p50_ms),
        ms(m.p95_ms),
        pct(m.slo_attainment),
      ])
    );
    fill($("models").tBodies[0], rows, "No requests served yet.", 8);
  }

  function renderGpus(status) {
    const gpu = status.gpu;
    const rows = ((gpu && gpu.gpus) || []).map((g) => {
      const bar = el("div", null, "bar");
      const used = el("span", null, "used");
      const reserved = el("span", null, "reserved");
      const total = g.memory_total_bytes || 1;
      used.style.width = ((100 * g.memory_used_bytes) / total).toFixed(1) + "%";
      reserved.style.width = ((100 * g.memory_reserved_bytes) / total).toFixed(1) + "%";
      bar.append(used, reserved);
      return row([
        g.index,
        g.name,
        gib(g.memory_used_bytes),
        gib(g.memory_reserved_bytes),
        gib(g.memory_available_bytes),
        gib(g.memory_total_bytes),
        bar,
      ]);
    });
    let empty = "No GPUs.";
    if (gpu && !gpu.nvml_available) empty = "No GPUs: " + (gpu.nvml_error || "NVML unavailable");
    if (!gpu) empty = "gpu_manager did not answer.";
    fill($("gpus").tBodies[0], rows, empty, 7);
  }

  function renderNodes(status) {
    const rows = (status.nodes || []).map((n) =>
      row([
        n.node_id,
        el("td", n.state + (n.reason ? ": " + n.reason : ""), "status " + n.state),
        n.engines,
        n.gpu_count,
        n.last_seen_s_ago === null ? "–" : num(n.last_seen_s_ago, 0) + " s ago",
      ])
    );
    fill($("nodes").tBodies[0], rows, "Single machine (no node agents registered).", 5);
  }

  function renderErrors(status, series) {
    const items = [];
    for (const e of status.engines || []) {
      if (e.error) items.push({ t: e.started_at || 0, source: e.engine_id, message: e.status + ": " + e.error });
      if (e.restart_count > 0) {
        items.push({ t: e.started_at || 0, source: e.engine_id, message: `restarted ${e.restart_count}× after crashes` });
      }
    }
    for (const e of series.errors || []) items.push(e);
    items.sort((a, b) => b.t - a.t);
    const list = $("errors");
    list.replaceChildren();
    if (!items.length) {
      list.appendChild(el("li", "None in the last minutes.", "muted"));
      return;
    }
    for (const item of items.slice(0, 30)) {
      const li = document.createElement("li");
      li.appendChild(el("span", item.t ? clock(item.t) : "", "muted"));
      li.appendChild(el("span", item.source, "mono"));
      li.appendChild(el("span", item.message));
      list.appendChild(li);
    }
  }

  // ---- charts: inline SVG polylines, one per model ----
  const W = 480;
  const H = 170;
  const PAD = { left: 44, right: 8, top: 10, bottom: 22 };

  function spanLabel(seconds) {
    return seconds >= 120 ? `-${Math.round(seconds / 60)} min` : `-${Math.round(seconds)} s`;
  }

  function drawChart(node, lines, spanS, now) {
    node.replaceChildren();
    const points = lines.reduce((sum, line) => sum + line.points.length, 0);
    const max = Math.max(0, ...lines.flatMap((line) => line.points.map((p) => p[1])));
    const top = max > 0 ? max * 1.1 : 1;
    const x = (t) => PAD.left + ((W - PAD.left - PAD.right) * (t - (now - spanS))) / spanS;
    const y = (v) => H - PAD.bottom - ((H - PAD.top - PAD.bottom) * v) / top;
    node.appendChild(svg("line", { x1: PAD.left, y1: y(0), x2: W - PAD.right, y2: y(0), class: "axis" }));
    node.appendChild(svg("line", { x1: PAD.left, y1: PAD.top, x2: PAD.left, y2: y(0), class: "axis" }));
    const label = (text, attrs) => {
      const t = svg("text", attrs);
      t.textContent = text;
      node.appendChild(t);
    };
    label(top >= 10 ? top.toFixed(0) : top.toPrecision(2), { x: PAD.left - 4, y: PAD.top + 8, class: "tick end" });
    label("0", { x: PAD.left - 4, y: y(0), class: "tick end" });
    label(spanLabel(spanS), { x: PAD.left, y: H - 6, class: "tick" });
    label("now", { x: W - PAD.right, y: H - 6, class: "tick end" });
    lines.forEach((line, index) => {
      if (!line.points.length) return;
      const colour = "s" + ((line.colour ?? index) % PALETTE);
      const coords = line.points.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
      const poly = svg("polyline", { points: coords, class: "series " + colour });
      poly.dataset.model = line.name;
      node.appendChild(poly);
      const [lastT, lastV] = line.points[line.points.length - 1];
      node.appendChild(svg("circle", { cx: x(lastT).toFixed(1), cy: y(lastV).toFixed(1), r: 2.5, class: "dot " + colour }));
    });
    node.dataset.points = String(points);
    node.dataset.max = String(max);
  }

  function renderCharts(series) {
    const samples = series.samples || [];
    const now = samples.length ? samples[samples.length - 1].t : Date.now() / 1000;
    // The history held so far (at least a minute, at most the window the edge keeps).
    const held = samples.length ? now - samples[0].t : 0;
    const spanS = Math.min(series.window_s || 600, Math.max(60, held));
    const models = [...new Set(samples.flatMap((s) => Object.keys(s.models)))].sort();
    const perModel = (field) =>
      models.map((name, colour) => ({
        name,
        colour,
        points: samples.filter((s) => s.models[name]).map((s) => [s.t, s.models[name][field]]),
      }));
    drawChart($("chart-ttft"), perModel("ttft_p50_ms"), spanS, now);
    drawChart($("chart-tpot"), perModel("tpot_p50_ms"), spanS, now);
    drawChart($("chart-rps"), perModel("rps"), spanS, now);
    drawChart($("chart-queue"), perModel("queued"), spanS, now);
    const legend = $("legend");
    legend.replaceChildren();
    models.forEach((name, index) => legend.appendChild(el("span", name, "key s" + (index % PALETTE))));
  }

  // ---- refresh loop ----
  async function refresh() {
    if (busy) return;
    busy = true;
    try {
      const [status, series] = await Promise.all([
        api("GET", "/v1/management/status"),
        api("GET", "/v1/management/timeseries"),
      ]);
      const latest = series.samples.length ? series.samples[series.samples.length - 1] : null;
      renderSummary(status, series);
      renderEngines(status, latest);
      renderModels(status, latest);
      renderGpus(status);
      renderNodes(status);
      renderErrors(status, series);
      renderCharts(series);
      document.body.dataset.state = "live";
      showBanner("");
      $("updated").textContent = "updated " + clock(Date.now() / 1000);
      if (!backendsLoaded) await loadChoices();
    } catch (error) {
      const problem = authProblem(error);
      if (problem) {
        stopPolling();
        document.body.dataset.state = "unauthorized";
        showBanner(problem);
      } else {
        document.body.dataset.state = "error";
        showBanner("Could not load data: " + error.message);
      }
    } finally {
      busy = false;
    }
  }

  async function loadChoices() {
    const [backends, presetList] = await Promise.all([
      api("GET", "/v1/management/backends"),
      api("GET", "/v1/management/presets"),
    ]);
    const select = $("start-backend");
    select.replaceChildren(new Option("auto", "auto"));
    for (const b of backends.backends) {
      const option = new Option(b.name + (b.available ? "" : " (unavailable)"), b.name);
      option.disabled = !b.available;
      select.appendChild(option);
    }
    presets = presetList.presets;
    const names = $("preset-name");
    names.replaceChildren(...presets.map((p) => new Option(p.name, p.name)));
    showPresetDescription();
    backendsLoaded = true;
  }

  function showPresetDescription() {
    const preset = presets.find((p) => p.name === $("preset-name").value);
    $("preset-description").textContent = preset
      ? preset.description + " (" + preset.engines.map((e) => e.model_id).join(", ") + ")"
      : "";
  }

  function startPolling() {
    stopPolling();
    refresh();
    timer = setInterval(refresh, REFRESH_MS);
  }
  function stopPolling() {
    if (timer !== null) clearInterval(timer);
    timer = null;
  }

  // ---- actions (management API, admin key) ----
  async function act(description, work) {
    try {
      const text = await work();
      logAction(text || description + ": done");
    } catch (error) {
      logAction(description + " failed: " + error.message, true);
    }
    await refresh();
  }

  function stopEngine(engine, drain) {
    const verb = drain ? "Drain and stop" : "Stop";
    if (!window.confirm(`${verb} engine ${engine.engine_id} (${engine.model_id})?`)) return;
    const path =
      "/v1/management/engines/" + encodeURIComponent(engine.engine_id) + (drain ? "?drain=true" : "");
    act(`${verb} ${engine.engine_id}`, async () => {
      const stopped = await api("DELETE", path);
      return `${drain ? "drained and stopped" : "stopped"} ${stopped.engine_id}: ${stopped.status}`;
    });
  }

  function startEngine(event) {
    event.preventDefault();
    const body = {
      model_id: $("start-model").value.trim(),
      engine_kind: $("start-kind").value,
      backend: $("start-backend").value,
    };
    const label = $("start-label").value.trim();
    if (label) body.engine_label = label;
    if (!body.model_id) return;
    const button = $("start-submit");
    button.disabled = true;
    act(`start ${body.model_id}`, async () => {
      try {
        const engine = await api("POST", "/v1/management/engines", body);
        return `started ${engine.engine_id} (${engine.model_id}): ${engine.status}`;
      } finally {
        button.disabled = false;
      }
    });
  }

  // Same rules as `sage llm preset apply`: keep engines already present (same model, kind
  // and label), start the rest in order, and stop what this apply started if one fails.
  async function applyPreset(dryRun) {
    const preset = presets.find((p) => p.name === $("preset-name").value);
    if (!preset) return;
    if (!dryRun && !window.confirm(`Apply preset ${preset.name}: start ${preset.engines.length} engine(s)?`)) return;
    act(`${dryRun ? "plan" : "apply"} preset ${preset.name}`, async () => {
      const existing = (await api("GET", "/v1/management/engines")).engines;
      const claimed = new Set();
      const started = [];
      const steps = [];
      for (const spec of preset.engines) {
        const match = existing.find(
          (e) =>
            !claimed.has(e.engine_id) &&
            PRESENT.has(e.status) &&
            e.model_id === spec.model_id &&
            e.engine_kind === spec.engine_kind &&
            e.engine_label === spec.engine_label
        );
        if (match) {
          claimed.add(match.engine_id);
          steps.push(`keep ${spec.name} (${match.engine_id})`);
          continue;
        }
        if (dryRun) {
          steps.push(`would start ${spec.name} (${spec.model_id})`);
          continue;
        }
        try {
          const engine = await api("POST", "/v1/management/engines", spec.start);
          if (!PRESENT.has(engine.status)) throw new Error(engine.error || `engine is ${engine.status}`);
          started.push(engine.engine_id);
          steps.push(`started ${spec.name} (${engine.engine_id})`);
        } catch (error) {
          for (const id of started.reverse()) {
            try {
              await api("DELETE", "/v1/management/engines/" + encodeURIComponent(id));
            } catch (_) {
              /* reported below: the engine stays listed */
            }
          }
          throw new Error(`${spec.name}: ${error.message}; stopped what this apply started`);
        }
      }
      return `preset ${preset.name}${dryRun ? " (dry run)" : ""}: ${steps.join("; ")}`;
    });
  }

  // ---- wiring ----
  function useKey(event) {
    event.preventDefault();
    const input = $("admin-key");
    const key = input.value.trim();
    input.value = "";
    if (!key) return;
    sessionStorage.setItem(KEY_STORAGE, key);
    showBanner("");
    startPolling();
  }
  function forgetKey() {
    sessionStorage.removeItem(KEY_STORAGE);
    stopPolling();
    backendsLoaded = false;
    document.body.dataset.state = "unauthorized";
    showBanner("Admin key forgotten. Enter it again to see the control plane.", "info");
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("key-form").addEventListener("submit", useKey);
    $("key-forget").addEventListener("click", forgetKey);
    $("start-form").addEventListener("submit", startEngine);
    $("preset-name").addEventListener("change", showPresetDescription);
    $("preset-plan").addEventListener("click", () => applyPreset(true));
    $("preset-apply").addEventListener("click", () => applyPreset(false));
    startPolling(); // without a key this shows the API's 401 and waits for one
  });
})();
