// The Idempotency Log page (SPEC §8): lists, shows, forgets and settles records through the
// admin API. Every value from the API reaches the document as text (textContent, Text
// nodes), never as markup, so a key or body holding `<script>` is shown, not run. The
// token lives in sessionStorage and travels only as `Authorization: Bearer`; no cookie is
// ever sent, so another site cannot act through this browser.
"use strict";

(() => {
  const TOKEN_KEY = "idem.admin-token";
  const SETTLEABLE = new Set(["outcome_unknown", "needs_review"]);
  /// Characters of a body shown before it is cut (the size is always shown).
  const BODY_SHOWN = 64 * 1024;
  /// Bodies larger than this are not parsed as JSON for pretty-printing.
  const PRETTY_LIMIT = 1024 * 1024;
  const DECISIONS_EVERY_MS = 5000;
  const COUNTS_EVERY_MS = 30000;
  const DECISION_ORDER = [
    "executed", "replayed", "key_reused", "in_flight", "outcome_unknown", "missing_key", "passthrough", "rejected",
  ];
  const STATUS_ORDER = ["in_progress", "completed", "failed_retryable", "outcome_unknown", "needs_review"];

  const $ = (id) => document.getElementById(id);

  /// An element with attributes and children; strings become Text nodes, never markup.
  function el(tag, attributes = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes)) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "class") node.className = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child !== undefined && child !== null) node.append(child);
    }
    return node;
  }

  // ---- the API ---------------------------------------------------------------------

  class Unauthorized extends Error {}
  class ApiError extends Error {}

  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = `Bearer ${token}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "omit",
      cache: "no-store",
    });
    if (response.status === 401) throw new Unauthorized("the admin token was refused");
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = null;
    }
    if (!response.ok) {
      const detail = data && data.detail ? data.detail : text || response.statusText;
      throw new ApiError(`${response.status}: ${detail}`);
    }
    return data;
  }

  function query(params) {
    const search = new URLSearchParams();
    for (const [name, value] of Object.entries(params)) {
      if (value !== undefined && value !== null && value !== "") search.set(name, value);
    }
    const text = search.toString();
    return text ? `?${text}` : "";
  }

  const recordPath = (r) => `v1/records/${encodeURIComponent(r.scope)}/${encodeURIComponent(r.key)}`;

  // ---- small views -----------------------------------------------------------------

  /// A time in the viewer's local time; the UTC value on hover (and for screen readers).
  function time(iso) {
    if (!iso) return el("span", { class: "muted" }, "—");
    const utc = `${iso.replace("T", " ").replace("Z", "")} UTC`;
    return el("time", { datetime: iso, title: utc }, new Date(iso).toLocaleString());
  }

  function statusBadge(status) {
    return el("span", { class: `status s-${status}` }, status.replaceAll("_", " "));
  }

  function bytes(n) {
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
    return `${(n / 1024 / 1024).toFixed(1)} MiB`;
  }

  function tenantText(tenant) {
    return tenant === "" ? el("span", { class: "muted", title: "no tenant" }, "—") : tenant;
  }

  let noticeTimer = null;
  function notice(text, kind = "ok") {
    const box = $("notice");
    box.textContent = text;
    box.className = `notice ${kind}`;
    clearTimeout(noticeTimer);
    if (kind === "ok") noticeTimer = setTimeout(() => { box.textContent = ""; box.className = "notice"; }, 8000);
  }

  /// Runs an API call for the page; a refused token brings back the prompt, other failures
  /// are said in the notice line. Returns undefined on failure.
  async function attempt(work) {
    try {
      return await work();
    } catch (error) {
      if (error instanceof Unauthorized) {
        askForToken(sessionStorage.getItem(TOKEN_KEY) ? "That token was refused; enter the current one." : "");
      } else {
        notice(error instanceof ApiError ? error.message : `The admin API cannot be reached (${error.message}).`, "error");
      }
      return undefined;
    }
  }

  // ---- the token -------------------------------------------------------------------

  function askForToken(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    stopRefreshing();
    $("main").hidden = true;
    $("sign-out").hidden = true;
    $("login").hidden = false;
    $("token-error").hidden = !message;
    $("token-error").textContent = message;
    $("token").value = "";
    $("token").focus();
  }

  /// Checks the token with one call, then shows the page. A store that is down is said in
  /// the notice line and the page still opens: its refreshes pick the store up again.
  async function start() {
    let stats = null;
    try {
      stats = await api("GET", "v1/stats");
    } catch (error) {
      if (error instanceof Unauthorized) {
        askForToken(sessionStorage.getItem(TOKEN_KEY) ? "That token was refused." : "");
        return;
      }
      notice(error instanceof ApiError ? error.message : `The admin API cannot be reached (${error.message}).`, "error");
    }
    $("login").hidden = true;
    $("main").hidden = false;
    $("sign-out").hidden = !sessionStorage.getItem(TOKEN_KEY);
    $("where").textContent = location.host;
    if (stats) renderCounts(stats);
    startRefreshing();
    await route();
  }

  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("token").value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    start();
  });

  $("sign-out").addEventListener("click", () => askForToken(""));

  // ---- counts and decisions, refreshed live ---------------------------------------------

  function renderCounts(stats) {
    const scopes = Object.keys(stats.scopes).sort();
    const statuses = STATUS_ORDER.filter((s) => scopes.some((scope) => stats.scopes[scope][s]));
    const head = el("tr", {}, el("th", { scope: "col" }, "scope"),
      statuses.map((s) => el("th", { scope: "col", class: "num" }, s.replaceAll("_", " "))),
      el("th", { scope: "col", class: "num" }, "all"));
    const rows = scopes.map((scope) => {
      const counts = stats.scopes[scope];
      const total = Object.values(counts).reduce((a, b) => a + b, 0);
      return el("tr", {},
        el("th", { scope: "row" }, el("a", { href: listHash({ scope }) }, scope)),
        statuses.map((s) => el("td", { class: "num" },
          counts[s] ? el("a", { href: listHash({ scope, status: s }), "aria-label": `${counts[s]} ${s} in ${scope}` },
            String(counts[s])) : el("span", { class: "muted" }, "0"))),
        el("td", { class: "num" }, String(total)));
    });
    const foot = el("tr", { class: "total" }, el("th", { scope: "row" }, "all scopes"),
      statuses.map((s) => el("td", { class: "num" },
        String(scopes.reduce((sum, scope) => sum + (stats.scopes[scope][s] || 0), 0)))),
      el("td", { class: "num" }, String(stats.total)));
    const table = $("counts");
    table.replaceChildren(el("thead", {}, head), el("tbody", {}, rows), el("tfoot", {}, foot));
    if (scopes.length === 0) table.replaceChildren(el("tbody", {}, el("tr", {}, el("td", {}, "The store holds no records."))));
    $("scope-names").replaceChildren(...scopes.map((scope) => el("option", { value: scope })));
    $("counts-updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  }

  /// One table per kind of counter: rows are routes (or subscribers), columns decisions.
  /// Rows and columns that are all zero are left out (the recorder registers every label
  /// up front); a request that matched no route counts under "(no route)".
  function decisionTable(caption, entries, rowLabel, extra) {
    const live = entries.filter((e) => e.count > 0);
    const names = [...new Set(live.map((e) => e[rowLabel]))].sort();
    const seen = new Set(live.map((e) => e.decision));
    const decisions = [...DECISION_ORDER.filter((d) => seen.has(d)), ...[...seen].filter((d) => !DECISION_ORDER.includes(d)).sort()];
    const count = (list, name, decision) =>
      list.filter((e) => e[rowLabel] === name && (decision === undefined || e.decision === decision))
        .reduce((sum, e) => sum + e.count, 0);
    const extraNames = Object.keys(extra).filter((n) => names.some((name) => count(extra[n], name) > 0));
    if (!names.length) return null;
    return el("table", { class: "grid decisions" },
      el("caption", {}, caption),
      el("thead", {}, el("tr", {}, el("th", { scope: "col" }, rowLabel),
        decisions.map((d) => el("th", { scope: "col", class: "num" }, d.replaceAll("_", " "))),
        extraNames.map((n) => el("th", { scope: "col", class: "num" }, n)))),
      el("tbody", {}, names.map((name) => el("tr", { "data-name": name },
        el("th", { scope: "row" }, name === "" ? el("span", { class: "muted" }, "(no route)") : name),
        decisions.map((d) => el("td", { class: "num", "data-decision": d }, String(count(live, name, d)))),
        extraNames.map((n) => el("td", { class: "num" }, String(count(extra[n], name))))))));
  }

  function renderDecisions(counters) {
    const tables = [
      decisionTable("Gateway requests", counters.requests, "route", {
        "retry recoveries": counters.retry_recoveries,
        "expired key retries": counters.expired_key_retries,
      }),
      decisionTable("Consumer messages", counters.messages, "subscriber", {}),
    ].filter(Boolean);
    if (!tables.length) tables.push(el("p", { class: "muted" }, "No request or message has been decided yet."));
    $("decisions").replaceChildren(...tables);
    $("decisions-updated").textContent = `live, updated ${new Date().toLocaleTimeString()}`;
  }

  async function refreshCounts() {
    const stats = await attempt(() => api("GET", "v1/stats"));
    if (stats) renderCounts(stats);
  }

  async function refreshDecisions() {
    const counters = await attempt(() => api("GET", "v1/decisions"));
    if (counters) renderDecisions(counters);
  }

  const timers = [];
  function startRefreshing() {
    stopRefreshing();
    refreshDecisions();
    // Paused while the tab is hidden: a forgotten tab must not poll a store all night.
    const every = (ms, work) => timers.push(setInterval(() => { if (!document.hidden) work(); }, ms));
    every(DECISIONS_EVERY_MS, refreshDecisions);
    every(COUNTS_EVERY_MS, refreshCounts);
  }
  function stopRefreshing() {
    while (timers.length) clearInterval(timers.pop());
  }

  // ---- the list --------------------------------------------------------------------

  const FILTERS = ["scope", "tenant", "status", "key_prefix"];
  /// The list's position: the filters it was loaded with and the cursor of each page seen,
  /// so Previous goes back without a full scan (the API pages by cursor only).
  const list = { key: null, cursors: [null], page: 0, next: null };

  function listHash(filters) {
    return `#/${query(filters)}`;
  }

  function currentFilters(search) {
    const params = new URLSearchParams(search);
    const filters = {};
    for (const name of [...FILTERS, "limit"]) {
      if (params.get(name)) filters[name] = params.get(name);
    }
    return filters;
  }

  function fillForm(filters) {
    $("f-scope").value = filters.scope || "";
    $("f-tenant").value = filters.tenant || "";
    $("f-status").value = filters.status || "";
    $("f-key").value = filters.key_prefix || "";
    $("f-limit").value = filters.limit || "50";
  }

  $("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = new FormData($("filters"));
    const filters = {};
    for (const name of [...FILTERS, "limit"]) {
      const value = String(form.get(name) || "").trim();
      if (value && !(name === "limit" && value === "50")) filters[name] = value;
    }
    const hash = listHash(filters);
    if (location.hash === hash) showList(filters, { reload: true });
    else location.hash = hash;
  });

  $("clear").addEventListener("click", () => {
    fillForm({});
    location.hash = "#/";
  });

  function row(record) {
    const answer = record.response ? String(record.response.status) : "";
    const cell = (label, ...content) => el("td", { "data-label": label }, ...content);
    return el("tr", {},
      cell("Scope", record.scope),
      cell("Tenant", tenantText(record.tenant)),
      el("th", { scope: "row", "data-label": "Key", class: "key" },
        el("a", { href: detailHash(record), "data-key": record.key }, record.key)),
      cell("Status", statusBadge(record.status)),
      cell("Answer status", answer || el("span", { class: "muted" }, "—")),
      el("td", { class: "num", "data-label": "Attempts" }, String(record.attempt_count)),
      el("td", { class: "num", "data-label": "Replays" }, String(record.replay_count)),
      cell("Created", time(record.created_at)),
      cell("Expires", time(record.expires_at)));
  }

  async function loadPage() {
    const filters = currentFilters(location.hash.slice(location.hash.indexOf("?") + 1));
    const params = { ...filters, limit: filters.limit || "50", cursor: list.cursors[list.page] };
    const tbody = $("list").tBodies[0];
    $("list").setAttribute("aria-busy", "true");
    const page = await attempt(() => api("GET", `v1/records${query(params)}`));
    $("list").removeAttribute("aria-busy");
    if (!page) return;
    tbody.replaceChildren(...page.records.map(row));
    list.next = page.next_cursor;
    $("empty").hidden = page.records.length > 0;
    $("first").disabled = list.page === 0;
    $("prev").disabled = list.page === 0;
    $("next").disabled = !list.next;
    $("page-number").textContent = `page ${list.page + 1}`;
  }

  function showList(filters, { reload }) {
    const key = JSON.stringify(filters);
    if (reload || key !== list.key) {
      list.key = key;
      list.cursors = [null];
      list.page = 0;
    }
    fillForm(filters);
    $("detail").hidden = true;
    $("list-view").hidden = false;
    document.title = "Idempotency Log · idem";
    return loadPage();
  }

  $("next").addEventListener("click", () => {
    if (!list.next) return;
    list.cursors[list.page + 1] = list.next;
    list.page += 1;
    loadPage();
  });
  $("prev").addEventListener("click", () => {
    if (list.page === 0) return;
    list.page -= 1;
    loadPage();
  });
  $("first").addEventListener("click", () => {
    list.page = 0;
    loadPage();
  });

  // ---- the detail ------------------------------------------------------------------

  function detailHash(record) {
    return `#/record${query({ scope: record.scope, tenant: record.tenant, key: record.key })}`;
  }

  function facts(pairs) {
    return el("dl", { class: "facts" }, pairs.map(([name, value]) =>
      el("div", {}, el("dt", {}, name), el("dd", {}, value === null || value === undefined || value === ""
        ? el("span", { class: "muted" }, "—") : value))));
  }

  function base64Size(text) {
    const padding = text.endsWith("==") ? 2 : text.endsWith("=") ? 1 : 0;
    return Math.floor((text.length * 3) / 4) - padding;
  }

  /// The stored body: JSON pretty-printed, text as text, bytes as base64; cut when large.
  function bodyView(response) {
    let kind;
    let shown;
    let size;
    if (typeof response.body_base64 === "string") {
      size = base64Size(response.body_base64);
      kind = "binary, shown as base64";
      shown = response.body_base64;
    } else {
      shown = response.body || "";
      size = new TextEncoder().encode(shown).length;
      kind = "text";
      if (size === 0) return el("p", { class: "muted" }, "Empty body.");
      if (size <= PRETTY_LIMIT) {
        try {
          shown = JSON.stringify(JSON.parse(shown), null, 2);
          kind = "JSON";
        } catch {
          kind = "text";
        }
      }
    }
    const cut = shown.length > BODY_SHOWN;
    const note = `Body: ${kind}, ${bytes(size)}${cut ? `; showing the first ${bytes(BODY_SHOWN)}` : ""}.`;
    return el("div", { class: "body" }, el("p", { class: "muted" }, note),
      el("pre", { tabindex: "0", "aria-label": "body" }, cut ? `${shown.slice(0, BODY_SHOWN)}…` : shown));
  }

  function answerView(record) {
    const response = record.response;
    const section = el("section", { class: "panel" }, el("h3", {}, "Stored answer"));
    if (!response) {
      section.append(el("p", { class: "muted" }, "No answer is stored (the action has not completed)."));
      return section;
    }
    section.append(facts([["Answer status", String(response.status)]]));
    if (!response.retained) {
      section.append(el("p", { class: "warning" },
        "Body not retained: it was larger than the route's max_stored_response, so a retry gets 410."));
      return section;
    }
    if (response.headers.length) {
      section.append(el("table", { class: "grid headers" }, el("caption", {}, "Headers"),
        el("tbody", {}, response.headers.map(([name, value]) =>
          el("tr", {}, el("th", { scope: "row" }, name), el("td", {}, value))))));
    }
    section.append(bodyView(response));
    return section;
  }

  /// A runner step's stored answer is `{"captures": {...}}`: the ids its destination gave.
  function capturesView(record) {
    if (!record.scope.includes(":") || !record.response || typeof record.response.body !== "string") return null;
    let captures;
    try {
      captures = JSON.parse(record.response.body).captures;
    } catch {
      return null;
    }
    if (!captures || typeof captures !== "object") return null;
    const names = Object.keys(captures);
    return el("section", { class: "panel" }, el("h3", {}, "Captured external ids"),
      names.length ? el("table", { class: "grid captures" }, el("tbody", {}, names.map((name) =>
        el("tr", {}, el("th", { scope: "row" }, name),
          el("td", {}, typeof captures[name] === "string" ? captures[name] : JSON.stringify(captures[name]))))))
        : el("p", { class: "muted" }, "The step captured nothing."));
  }

  function actionsView(record) {
    const section = el("section", { class: "panel actions" }, el("h3", {}, "Actions"));
    section.append(el("div", { class: "action" },
      el("button", { type: "button", class: "danger", onclick: () => forget(record) }, "Forget"),
      el("p", { class: "muted" }, "Deletes the record: the next request or run with this key executes again (a re-send).")));
    if (SETTLEABLE.has(record.status)) {
      section.append(el("div", { class: "action" },
        el("button", { type: "button", onclick: () => release(record) }, "Release"),
        el("p", { class: "muted" }, "It did not happen: the next request or run executes it.")));
      const code = el("input", { id: "answer-code", type: "number", min: "100", max: "599", value: "200", required: true });
      const body = el("textarea", { id: "answer-body", rows: "3", spellcheck: "false", placeholder: "{\"id\": \"…\"}" });
      section.append(el("div", { class: "action settle" },
        el("div", { class: "field" }, el("label", { for: "answer-code" }, "Answer code"), code),
        el("div", { class: "field grow" }, el("label", { for: "answer-body" }, "Answer body (JSON or text, optional)"), body),
        el("button", { type: "button", onclick: () => complete(record, code, body) }, "Mark completed"),
        el("p", { class: "muted" }, "It happened: this answer is stored and replayed from now on; nothing executes.")));
    }
    return section;
  }

  async function showDetail(id) {
    $("list-view").hidden = true;
    $("detail").hidden = false;
    $("back").href = list.key ? listHash(JSON.parse(list.key)) : "#/";
    const title = $("detail-title");
    title.textContent = id.key;
    document.title = `${id.key} · Idempotency Log`;
    const body = $("detail-body");
    body.replaceChildren(el("p", { class: "muted" }, "Loading…"));
    let record;
    try {
      record = await api("GET", `${recordPath(id)}${query({ tenant: id.tenant })}`);
    } catch (error) {
      if (error instanceof ApiError && error.message.startsWith("404")) {
        body.replaceChildren(el("p", { class: "empty" }, "No such record: it was forgotten, purged or never made."));
        return;
      }
      body.replaceChildren();
      await attempt(() => Promise.reject(error));
      return;
    }
    renderDetail(record);
    title.focus();
  }

  function renderDetail(record) {
    const lease = record.locked_until ? el("span", {}, "held until ", time(record.locked_until)) : "none";
    $("detail-body").replaceChildren(
      el("section", { class: "panel" }, facts([
        ["Scope", record.scope],
        ["Tenant", tenantText(record.tenant)],
        ["Key", el("code", {}, record.key)],
        ["Status", statusBadge(record.status)],
        ["Fingerprint", el("code", { class: "wrap" }, record.fingerprint)],
        ["Created", time(record.created_at)],
        ["Last seen", time(record.last_seen_at)],
        ["Expires", time(record.expires_at)],
        ["Lease", lease],
        ["Attempts", String(record.attempt_count)],
        ["Replays", String(record.replay_count)],
        ["Correlation id", record.correlation_id],
        ["Error summary", record.error_summary],
      ])),
      ...[capturesView(record), answerView(record), actionsView(record)].filter(Boolean),
    );
  }

  // ---- actions (each confirmed first) --------------------------------------------------

  const describe = (r) => `${r.key} in ${r.scope}${r.tenant ? ` (tenant ${r.tenant})` : ""}`;

  async function forget(record) {
    if (!confirm(`Forget ${describe(record)}?\n\nThe next request or run with this key executes again.`)) return;
    const done = await attempt(() => api("DELETE", `${recordPath(record)}${query({ tenant: record.tenant })}`).then(() => true));
    if (!done) return;
    notice(`Forgot ${describe(record)}: the next request with this key executes.`);
    refreshCounts();
    location.hash = $("back").getAttribute("href");
  }

  async function resolve(record, body, message) {
    const settled = await attempt(() => api("POST", `${recordPath(record)}/resolve${query({ tenant: record.tenant })}`, body));
    if (!settled) return;
    notice(message);
    refreshCounts();
    renderDetail(settled);
  }

  function release(record) {
    if (!confirm(`Release ${describe(record)}?\n\nIt is treated as never done: the next request or run executes it.`)) return;
    resolve(record, { action: "release" }, `Released ${describe(record)}: the next attempt executes.`);
  }

  function complete(record, codeInput, bodyInput) {
    const status = Number(codeInput.value);
    if (!Number.isInteger(status) || status < 100 || status > 599) {
      codeInput.setCustomValidity("An HTTP status between 100 and 599");
      codeInput.reportValidity();
      return;
    }
    codeInput.setCustomValidity("");
    const text = bodyInput.value;
    let body = text;
    try {
      body = text.trim() ? JSON.parse(text) : null;
    } catch {
      body = text;
    }
    if (!confirm(`Mark ${describe(record)} completed with answer ${status}?\n\nNothing executes; this answer is replayed from now on.`)) return;
    resolve(record, { action: "complete", status, body }, `Marked ${describe(record)} completed (${status}).`);
  }

  $("purge").addEventListener("click", async () => {
    if (!confirm("Purge expired records now?\n\nEvery record past its expiry is removed.")) return;
    const purged = await attempt(() => api("POST", "v1/purge"));
    if (!purged) return;
    notice(`Purged ${purged.purged} expired record${purged.purged === 1 ? "" : "s"}.`);
    refreshCounts();
    loadPage();
  });

  // ---- routing: #/?filters is the list, #/record?scope=&tenant=&key= a detail ------------

  async function route() {
    const hash = location.hash || "#/";
    const search = hash.includes("?") ? hash.slice(hash.indexOf("?") + 1) : "";
    if (hash.startsWith("#/record")) {
      const params = new URLSearchParams(search);
      await showDetail({ scope: params.get("scope") || "", tenant: params.get("tenant") || "", key: params.get("key") || "" });
    } else {
      const opened = $("detail").hidden ? null : $("detail-title").textContent;
      await showList(currentFilters(search), { reload: false });
      // Back from a detail: the key that was opened gets the focus again.
      const link = [...document.querySelectorAll("#list a[data-key]")].find((a) => a.dataset.key === opened);
      if (link) link.focus();
    }
  }

  window.addEventListener("hashchange", () => {
    if (!$("main").hidden) route();
  });

  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !$("detail").hidden && !event.target.closest("input, textarea, select")) {
      location.hash = $("back").getAttribute("href");
    }
  });

  start();
})();
