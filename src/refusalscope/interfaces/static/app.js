// refusalscope web app: sortable tables, filter auto-submit, the playground. No libraries, no
// network beyond this app; every model/prompt text goes into the page with textContent.
"use strict";

function sortTable(table, col) {
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  const dir = table.dataset.sortCol == col && table.dataset.sortDir == "asc" ? "desc" : "asc";
  const val = (r) => { const t = r.cells[col].textContent.trim(); const n = parseFloat(t.replace("%", ""));
                       return isNaN(n) || !/^[-+\d.]/.test(t) ? t.toLowerCase() : n; };
  rows.sort((a, b) => { const x = val(a), y = val(b);
    const c = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
    return dir === "asc" ? c : -c; });
  rows.forEach((r) => body.appendChild(r));
  table.dataset.sortCol = col; table.dataset.sortDir = dir;
}

function setupTables() {
  document.querySelectorAll("table.sortable").forEach((t) => {
    Array.from(t.tHead.rows[0].cells).forEach((th, i) => {
      th.title = "click to sort"; th.addEventListener("click", () => sortTable(t, i));
    });
  });
  const f = document.getElementById("latent-filters");
  if (f) f.querySelectorAll("select").forEach((s) => s.addEventListener("change", () => f.submit()));
}

function setupPlayground() {
  const form = document.getElementById("play-form");
  if (!form) return;
  const presets = JSON.parse(document.getElementById("presets").textContent);
  const $ = (id) => document.getElementById(id);
  const fill = () => { const p = presets[$("preset-prompt").value]; if (p) $("play-prompt").value = p.text; fillSet(); };
  const sets = {};  // a prompt's sets, fetched when first picked (a wide run's sets are not inlined)
  const fillSet = async () => {
    const pid = $("preset-prompt").value; const s = $("preset-set").value;
    if (!presets[pid] || !s) return;
    if (!sets[pid]) {
      const res = await fetch("/api/playground/preset/" + encodeURIComponent(pid));
      if (!res.ok) return;
      sets[pid] = await res.json();
    }
    if ($("preset-prompt").value === pid && $("preset-set").value === s) $("play-latents").value = sets[pid][s].join(" ");
  };
  $("preset-prompt").addEventListener("change", fill);
  $("preset-set").addEventListener("change", fillSet);
  if (form.dataset.chosen) { $("preset-set").value = "stage2"; fill(); }
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = { prompt: $("play-prompt").value, latents: $("play-latents").value.split(/[\s,;]+/).filter(Boolean),
                   mode: $("play-mode").value, value: parseFloat($("play-value").value || "5"),
                   positions: $("play-positions").value, direction: $("play-direction").checked };
    if ($("play-tokens").value) body.max_new_tokens = parseInt($("play-tokens").value, 10);
    $("play-run").disabled = true; $("play-busy").classList.add("on"); $("play-error").hidden = true;
    document.body.setAttribute("aria-busy", "true");
    try {
      const res = await fetch("/api/playground", { method: "POST", headers: { "Content-Type": "application/json" },
                                                   body: JSON.stringify(body) });
      const data = await res.json();
      if (!res.ok) throw new Error(data.detail || res.statusText);
      document.querySelectorAll(".tokname").forEach((e) => { e.textContent = data.refusal_token; });
      $("p-plain").textContent = data.plain.p_refusal.toFixed(4);
      $("p-int").textContent = data.intervened.p_refusal.toFixed(4);
      const v = (r) => (r === null ? "" : r ? "· refused" : "· complied");
      $("v-plain").textContent = v(data.plain.refused); $("v-int").textContent = v(data.intervened.refused);
      $("reply-plain").textContent = data.plain.reply; $("reply-int").textContent = data.intervened.reply;
      $("play-what").textContent = data.intervention + " · " + data.max_new_tokens + " new tokens";
      $("play-seconds").textContent = data.seconds;
      $("play-result").hidden = false;
    } catch (err) {
      $("play-error").textContent = String(err.message || err); $("play-error").hidden = false;
    } finally {
      $("play-run").disabled = false; $("play-busy").classList.remove("on");
      document.body.removeAttribute("aria-busy");
    }
  });
}

document.addEventListener("DOMContentLoaded", () => { setupTables(); setupPlayground(); });
