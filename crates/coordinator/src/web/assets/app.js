// nixfarm's web UI: filters and live updates. The pages work without this script; it only
// filters on the page and keeps them current from the coordinator's event stream.
"use strict";

const CLASS = {
  ready: "ok", pending: "pending", unpinned: "warn", "needs-hash": "warn", "not-cached": "warn",
};
const statusClass = (s) => CLASS[s] || "bad";

function runPage(root) {
  const run = root.dataset.run;
  const tbody = document.querySelector("#packages tbody");
  const rows = new Map();
  for (const tr of tbody.rows) rows.set(tr.dataset.attr, tr);
  const sel = document.getElementById("status");
  const q = document.getElementById("q");
  const live = document.getElementById("live");

  const visible = (tr) => {
    const s = sel.value, text = q.value.trim().toLowerCase();
    return (!s || tr.dataset.status === s) && (!text || tr.dataset.attr.toLowerCase().includes(text));
  };
  const filter = () => {
    for (const tr of rows.values()) tr.hidden = !visible(tr);
    const u = new URL(location.href);
    sel.value ? u.searchParams.set("status", sel.value) : u.searchParams.delete("status");
    q.value ? u.searchParams.set("q", q.value) : u.searchParams.delete("q");
    history.replaceState(null, "", u);
  };
  document.getElementById("filter").addEventListener("submit", (e) => { e.preventDefault(); filter(); });
  sel.addEventListener("change", filter);
  q.addEventListener("input", filter);

  const cell = (tr, cls, text) => { const td = tr.querySelector("." + cls); if (td) td.textContent = text; };
  const newRow = (attr) => {
    const tr = document.createElement("tr");
    tr.dataset.attr = attr;
    const th = document.createElement("th");
    th.scope = "row";
    const a = document.createElement("a");
    a.href = "/runs/" + encodeURIComponent(run) + "/packages/" + encodeURIComponent(attr);
    a.textContent = attr;
    th.appendChild(a);
    tr.appendChild(th);
    for (const cls of ["st", "reason", "agent", "time"]) {
      const td = document.createElement("td");
      td.className = cls;
      tr.appendChild(td);
    }
    // Keep the table sorted by name, as the server renders it.
    let before = null;
    for (const [k, other] of rows) if (k > attr && (!before || k < before.dataset.attr)) before = other;
    tbody.insertBefore(tr, before);
    rows.set(attr, tr);
    return tr;
  };
  const summary = (s) => {
    document.getElementById("percent").textContent = s.percent.toFixed(1) + "%";
    document.getElementById("ready").textContent = s.ready;
    document.getElementById("total").textContent = s.total;
    const st = document.getElementById("state");
    st.textContent = s.state;
    st.className = "state-" + s.state;
    root.dataset.state = s.state;
    const counts = document.getElementById("counts");
    counts.replaceChildren();
    const bar = document.getElementById("bar");
    bar.replaceChildren();
    for (const [k, v] of Object.entries(s.by_status)) {
      const li = document.createElement("li");
      const a = document.createElement("a");
      a.href = "?status=" + encodeURIComponent(k);
      a.textContent = v + " " + k;
      li.appendChild(a);
      counts.appendChild(li);
      const span = document.createElement("span");
      span.className = statusClass(k);
      span.style.width = (v * 100 / Math.max(1, s.total)).toFixed(3) + "%";
      span.title = v + " " + k;
      bar.appendChild(span);
    }
  };

  if (["finished", "failed", "cancelled"].includes(root.dataset.state)) return;
  const es = new EventSource("/api/runs/" + encodeURIComponent(run) + "/live");
  es.addEventListener("rows", (e) => {
    const d = JSON.parse(e.data);
    summary(d.summary);
    for (const r of d.rows) {
      const tr = rows.get(r.attr) || newRow(r.attr);
      tr.dataset.status = r.status;
      const st = tr.querySelector(".st");
      st.textContent = r.status;
      st.className = "st " + statusClass(r.status);
      cell(tr, "reason", r.reason);
      cell(tr, "agent", r.agent);
      cell(tr, "time", r.time);
      tr.hidden = !visible(tr);
    }
    live.textContent = "live · updated " + new Date().toLocaleTimeString();
  });
  es.addEventListener("end", async () => {
    es.close();
    live.textContent = "run ended";
    // The hash fixes are found once the run is over: offer the patch if there is one.
    try {
      const r = await fetch("/api/runs/" + encodeURIComponent(run), { credentials: "same-origin" });
      const rep = await r.json();
      const n = new Set(rep.packages.flatMap((p) => p.hash_fixes.map((f) => f.file + ":" + f.line + ":" + f.new))).size;
      if (n > 0) {
        document.getElementById("fixes").textContent = n;
        document.getElementById("patch").hidden = false;
      }
    } catch (_) { /* the link appears on the next load */ }
  });
    // Its client token was replaced: the login form (the page's cookie is of the old one).
  es.addEventListener("token-replaced", () => { es.close(); location.reload(); });
  es.onerror = () => { live.textContent = "reconnecting…"; };
}

function agentsPage(table) {
  const tick = async () => {
    try {
      const r = await fetch("/api/agents", { credentials: "same-origin" });
      if (!r.ok) return;
      const d = await r.json();
      const tbody = table.tBodies[0];
      const now = Date.now();
      tbody.replaceChildren();
      for (const a of d.agents) {
        const tr = document.createElement("tr");
        tr.dataset.agent = a.name;
        const taking = !a.connected ? "—" : a.draining ? "no: draining" : a.paused ? "no: " + a.paused : "yes";
        const cells = [a.name, a.connected ? "yes" : "no", taking,
          a.building.map((p) => p.replace(/^.*\/[a-z0-9]{32}-/, "").replace(/\.drv$/, "")).join(", "),
          a.building.length + "/" + a.max_jobs, Math.max(0, Math.floor((now - a.last_seen_ms) / 1000)) + "s ago",
          a.systems.join(" "), a.nix_version];
        cells.forEach((text, i) => {
          const c = document.createElement(i === 0 ? "th" : "td");
          if (i === 0) c.scope = "row";
          c.textContent = text;
          tr.appendChild(c);
        });
        tbody.appendChild(tr);
      }
    } catch (_) { /* the next tick tries again */ }
  };
  setInterval(tick, 2000);
}

const root = document.getElementById("run");
if (root) runPage(root);
const agents = document.getElementById("agents");
if (agents) agentsPage(agents);
