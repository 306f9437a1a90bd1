"""The operator page at ``/``: upload a part, see its overlay, score and verdict, and the last
results of the line. One static document (no network beyond this server, no libraries); the
token, when the server needs one, is typed once (or passed as ``/#token=...``) and kept in the
tab's sessionStorage."""
from __future__ import annotations

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>pyimgano inspection</title>
<link rel="icon" href="data:,">
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:15px system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{background:#1d2330;color:#fff;padding:10px 18px;display:flex;gap:18px;align-items:center;flex-wrap:wrap}
header h1{font-size:17px;margin:0 12px 0 0}
main{display:grid;grid-template-columns:minmax(320px,2fr) minmax(260px,1fr);gap:16px;padding:16px}
section{background:#fff;border-radius:6px;padding:14px;box-shadow:0 1px 2px #0002;overflow-x:auto}
#verdict{font-size:34px;font-weight:700;margin:6px 0}
.bad{color:#c0262d}.good{color:#17803d}.none{color:#666}
#overlay{width:100%;max-width:760px;display:block;margin-top:10px}
#overlay:not([src]){display:none}
table{border-collapse:collapse;width:100%;font-size:13px}td,th{padding:3px 6px;border-bottom:1px solid #e3e5ea;text-align:left}
#status{min-height:1.2em;color:#8a4b00}
</style></head><body>
<header><h1>pyimgano inspection</h1>
<label>model <select id="model"></select></label>
<label>part image <input id="file" type="file" accept="image/*"></label>
<label>token <input id="token" type="password" size="14" placeholder="(if required)"></label>
<span id="ready"></span></header>
<main><section><div id="status"></div>
<div id="verdict" class="none">no part yet</div>
<div id="details"></div><img id="overlay" alt=""></section>
<section><h2 style="font-size:15px;margin:0 0 8px">last results</h2>
<table><thead><tr><th>time</th><th>model</th><th>name</th><th>score</th><th>verdict</th></tr></thead><tbody id="recent"></tbody></table>
</section></main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const hash = new URLSearchParams(location.hash.slice(1));
if (hash.get("token")) sessionStorage.setItem("pyimgano-token", hash.get("token"));
$("token").value = sessionStorage.getItem("pyimgano-token") || "";
$("token").addEventListener("change", () => { sessionStorage.setItem("pyimgano-token", $("token").value); refresh(); });
function headers() { const t = $("token").value; return t ? {"Authorization": "Bearer " + t} : {}; }
function status(msg) { $("status").textContent = msg || ""; }
function verdictOf(r) { return r.is_anomalous === null ? ["no threshold (uncalibrated)", "none"] : r.is_anomalous ? ["ANOMALOUS", "bad"] : ["OK", "good"]; }
async function api(path, options) {
  const res = await fetch(path, Object.assign({headers: headers()}, options || {}));
  let body = null;
  try { body = await res.json(); } catch (e) { body = {error: res.status + " " + res.statusText}; }
  return [res.status, body];
}
async function refresh() {
  const [rs, ready] = await api("/readyz");
  $("ready").textContent = rs === 200 ? "ready" : "loading models...";
  if (rs !== 200) { setTimeout(refresh, 1000); return; }
  const [ms, models] = await api("/v1/models");
  if (ms !== 200) { status(models.error); return; }
  const sel = $("model"), keep = sel.value;
  sel.replaceChildren(...models.models.map((m) => new Option(m.name + " (" + m.runtime + ")", m.name)));
  if (keep) sel.value = keep;
  await recent();
}
async function recent() {
  const [st, body] = await api("/v1/recent");
  if (st !== 200) return;
  $("recent").replaceChildren(...body.results.map((r) => {
    const tr = document.createElement("tr"), [v, cls] = verdictOf(r);
    for (const text of [new Date(r.time * 1000).toLocaleTimeString(), r.model, r.name || "", r.score.toPrecision(4), v]) {
      const td = document.createElement("td"); td.textContent = text; tr.appendChild(td);
    }
    tr.lastChild.className = cls; return tr;
  }));
}
$("file").addEventListener("change", async () => {
  const f = $("file").files[0];
  if (!f) return;
  status("scoring " + f.name + " ...");
  const form = new FormData(); form.append("image", f, f.name);
  const [st, r] = await api("/v1/predict?map=png&model=" + encodeURIComponent($("model").value), {method: "POST", body: form});
  if (st !== 200) { status(r.error); $("verdict").textContent = "error"; $("verdict").className = "none"; return; }
  status("");
  const [v, cls] = verdictOf(r);
  $("verdict").textContent = v; $("verdict").className = cls;
  $("details").textContent = f.name + ": score " + r.score.toPrecision(4) + (r.threshold === null ? "" : " (threshold " +
    r.threshold.toPrecision(4) + ")") + ", " + r.width + "x" + r.height + " px, " + r.latency_ms.toFixed(1) + " ms";
  if (r.overlay_png) $("overlay").src = "data:image/png;base64," + r.overlay_png; else $("overlay").removeAttribute("src");
  await recent();
});
refresh();
setInterval(recent, 5000);
</script></body></html>
"""
