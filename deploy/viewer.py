"""The tree viewer: self-contained HTML pages (no network, no external scripts) for a build or the Serve app.

``index_page``: one row per tree (question, reference, answer, right or wrong, value, nodes, tokens, seconds, stop
reason), sortable by any column, filtered by outcome or text (also from the URL: ``#filter=wrong``), each row
linking to its tree page. ``tree_page``: the problem and the answer over the drawn tree. Nodes are laid out in
Python (x: leaf order, parent centred over its children; y: depth) and drawn as SVG: colour = value or confidence
on a scale fitted to the tree's own range, radius = visits, the chosen line outlined, rollouts dashed, reflections
in purple; hovering shows a node's text and numbers. The side panel groups the finished lines by answer (the vote
of the final-answer rule) and shows the chosen line in full. One element per node and one delegated listener keep
a page fast at thousands of nodes.
"""

from __future__ import annotations

import collections
import html
import json
import math
import re
from pathlib import Path

from search.prompts import extract_answer, normalize_answer

TREE_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
X_GAP, Y_GAP = 24, 70
DEFAULT_VIEW_FOLDER = "forest-view"  # where ``forest view OUT`` writes its pages
TOOLTIP_CHARS = 400  # node text shown on hover (the panel shows all of it on click)

_STYLE = """
body{margin:0;font:13px system-ui,sans-serif;color:#222}
table{border-collapse:collapse;width:100%} th,td{padding:4px 8px;border-bottom:1px solid #e4e4e4;text-align:left;
vertical-align:top} th{cursor:pointer;background:#f3f3f3;position:sticky;top:0;white-space:nowrap}
th[data-sorted]::after{content:attr(data-sorted)} td.num{text-align:right;font-variant-numeric:tabular-nums}
.right{color:#14803c;font-weight:600} .wrong{color:#c0262d;font-weight:600} .unknown{color:#777}
pre{white-space:pre-wrap;background:#f3f3f3;padding:6px;margin:4px 0}
"""

INDEX = """<!doctype html>
<html><head><meta charset="utf-8"><title>__TITLE__</title><style>__STYLE__
#bar{padding:8px 10px;display:flex;gap:12px;align-items:center;border-bottom:1px solid #ddd}
td.question{max-width:520px}
</style></head><body>
<div id="bar"><b>__TITLE__</b>
<label>show <select id="outcome"><option value="all">all trees</option><option value="right">right answers</option>
<option value="wrong">wrong answers</option><option value="unanswered">no answer</option></select></label>
<label>text <input id="text" placeholder="question or answer contains"></label><span id="count"></span></div>
<table><thead><tr>
<th data-key="tree_id">tree</th><th data-key="question">question</th><th data-key="reference">reference</th>
<th data-key="answer">answer</th><th data-key="correct">right</th><th data-key="value">value</th>
<th data-key="nodes">nodes</th><th data-key="tokens">tokens</th><th data-key="seconds">seconds</th>
<th data-key="stop_reason">stop reason</th></tr></thead><tbody id="rows"></tbody></table>
<script id="index-data" type="application/json">__DATA__</script>
<script>
"use strict";
const rows = JSON.parse(document.getElementById("index-data").textContent);
const body = document.getElementById("rows"), outcome = document.getElementById("outcome"),
  text = document.getElementById("text");
function outcomeOf(r) { return r.answer === null ? "unanswered" : r.correct === true ? "right"
  : r.correct === false ? "wrong" : "unknown"; }
function cell(tr, value, cls) { const td = document.createElement("td"); td.textContent = value;
  if (cls) td.className = cls; tr.appendChild(td); return td; }
function num(v, digits) { return v === null || v === undefined ? "-" : Number(v).toFixed(digits); }
for (const r of rows) {
  const tr = document.createElement("tr"); tr.dataset.tree = r.tree_id; tr.dataset.outcome = outcomeOf(r);
  const a = document.createElement("a"); a.href = r.href; a.textContent = r.tree_id;
  cell(tr, "").appendChild(a); cell(tr, r.question ?? "", "question"); cell(tr, r.reference ?? "-");
  cell(tr, r.answer ?? "-");
  cell(tr, {right: "right", wrong: "wrong", unanswered: "no answer", unknown: "-"}[tr.dataset.outcome],
       tr.dataset.outcome === "unanswered" ? "unknown" : tr.dataset.outcome);
  cell(tr, num(r.value, 4), "num"); cell(tr, r.nodes, "num"); cell(tr, r.tokens, "num");
  cell(tr, num(r.seconds, 2), "num"); cell(tr, r.stop_reason ?? "-");
  r.row = tr; body.appendChild(tr);
}
function filter() {
  const want = outcome.value, needle = text.value.toLowerCase();
  let visible = 0;
  for (const r of rows) {
    const hay = ((r.question ?? "") + " " + (r.answer ?? "")).toLowerCase();
    r.row.hidden = !((want === "all" || r.row.dataset.outcome === want) && hay.includes(needle));
    visible += r.row.hidden ? 0 : 1;
  }
  document.getElementById("count").textContent = visible + " of " + rows.length + " trees";
  document.body.dataset.visibleRows = String(visible);
}
let sortKey = null, ascending = true;
for (const th of document.querySelectorAll("th")) th.addEventListener("click", () => {
  const key = th.dataset.key; ascending = key === sortKey ? !ascending : true; sortKey = key;
  for (const h of document.querySelectorAll("th")) h.removeAttribute("data-sorted");
  th.dataset.sorted = ascending ? " \\u25b2" : " \\u25bc";
  const value = r => r[key] === null || r[key] === undefined ? -Infinity : r[key];
  rows.sort((a, b) => (value(a) > value(b) ? 1 : value(a) < value(b) ? -1 : 0) * (ascending ? 1 : -1));
  for (const r of rows) body.appendChild(r.row);
});
const fromUrl = new URLSearchParams(location.hash.slice(1));
if (fromUrl.get("filter")) outcome.value = fromUrl.get("filter");
if (fromUrl.get("text")) text.value = fromUrl.get("text");
outcome.addEventListener("change", filter); text.addEventListener("input", filter);
document.body.dataset.rows = String(rows.length);
filter();
</script></body></html>
"""

TREE = """<!doctype html>
<html><head><meta charset="utf-8"><title>__TITLE__</title><style>__STYLE__
body{display:flex;height:100vh}
#view{flex:1;cursor:grab;background:#fafafa} #side{width:420px;overflow:auto;padding:10px;border-left:1px solid #ddd}
line,circle{vector-effect:non-scaling-stroke} .edge{stroke:#bbb;fill:none}
.best{stroke:#1f4fd1;stroke-width:3} .lit{stroke:#f08c00;stroke-width:3} circle{stroke:#555;stroke-width:.5}
circle.onpath{stroke:#1f4fd1;stroke-width:2.5} circle.rollout{stroke-dasharray:2 2}
circle.reflection{stroke:#8a2be2;stroke-width:2.5}
#tip{position:fixed;pointer-events:none;background:#fff;border:1px solid #999;padding:6px;max-width:380px;
display:none;box-shadow:0 2px 6px #0003;white-space:pre-wrap;font-size:12px}
#legend svg{vertical-align:middle} .group{margin:6px 0;padding:4px;border:1px solid #e4e4e4}
.line{cursor:pointer;padding:1px 4px} .line:hover{background:#fff3d6} .chosen{font-weight:600}
</style></head><body>
<svg id="view" xmlns="http://www.w3.org/2000/svg"><g id="scene"></g></svg>
<div id="side"><h3>__TITLE__</h3><div id="problem"></div>
<div id="legend"><label>colour <select id="metric"><option value="value">value</option>
<option value="confidence">confidence</option></select></label> <span id="scale"></span>
<div><svg width="14" height="14"><circle cx="7" cy="7" r="6" fill="#fff" stroke="#1f4fd1" stroke-width="2.5"/></svg>
chosen line <svg width="14" height="14"><circle cx="7" cy="7" r="6" fill="#fff" stroke="#555"
stroke-dasharray="2 2"/></svg> rollout <svg width="14" height="14"><circle cx="7" cy="7" r="6" fill="#fff"
stroke="#8a2be2" stroke-width="2.5"/></svg> reflection <svg width="14" height="14"><circle cx="7" cy="7" r="6"
fill="#ccc"/></svg> not valued; size: visits (<span id="maxvisits"></span> at most)</div></div>
<h4>Finished lines by answer</h4><div id="lines"></div>
<h4>Chosen line</h4><pre id="chosen"></pre><div id="detail"></div></div><div id="tip"></div>
<script id="tree-data" type="application/json">__DATA__</script>
<script>
"use strict";
const data = JSON.parse(document.getElementById("tree-data").textContent);
const NS = "http://www.w3.org/2000/svg", scene = document.getElementById("scene"), tip = document.getElementById("tip");
const onPath = new Set(data.best_path), byId = new Map(data.nodes.map(n => [n.id, n]));
function el(name, attrs) { const e = document.createElementNS(NS, name);
  for (const k in attrs) e.setAttribute(k, attrs[k]); return e; }
function fmt(v) { return v === null || v === undefined ? "-" : Number(v).toFixed(4); }
const edges = new Map(), circles = [];
for (const n of data.nodes) {
  if (n.parent < 0) continue;
  const p = byId.get(n.parent);
  const e = el("line", {x1: p.x, y1: p.y, x2: n.x, y2: n.y,
    class: onPath.has(n.id) && onPath.has(p.id) ? "edge best" : "edge"});
  edges.set(n.id, e); scene.appendChild(e);
}
const maxVisits = Math.max(1, ...data.nodes.map(n => n.visits || 0));
for (const n of data.nodes) {
  const c = el("circle", {cx: n.x, cy: n.y, r: 1, class: (onPath.has(n.id) ? "onpath " : "") + n.kind,
    "data-node": n.id});
  n.circle = c; circles.push([c, 3 + 11 * Math.sqrt((n.visits || 0) / maxVisits)]);  // radius in screen pixels
  scene.appendChild(c);
}
document.getElementById("maxvisits").textContent = maxVisits;
function paint() {
  const key = document.getElementById("metric").value;
  const vals = data.nodes.map(n => n[key]).filter(v => v !== null && v !== undefined);
  const lo = vals.length ? Math.min(...vals) : 0, hi = vals.length ? Math.max(...vals) : 1, span = hi - lo || 1;
  const colour = v => v === null || v === undefined ? "#ccc"
    : "hsl(" + Math.round(120 * (v - lo) / span) + ",70%,48%)";
  for (const n of data.nodes) n.circle.setAttribute("fill", colour(n[key]));
  document.getElementById("scale").innerHTML = "";
  const scale = document.getElementById("scale");
  scale.append(fmt(lo) + " ");
  const bar = el("svg", {width: 120, height: 12}), grad = el("linearGradient", {id: "g"});
  for (let i = 0; i <= 4; i++) grad.appendChild(el("stop", {offset: i / 4, "stop-color": colour(lo + span * i / 4)}));
  const defs = el("defs", {}); defs.appendChild(grad); bar.appendChild(defs);
  bar.appendChild(el("rect", {width: 120, height: 12, fill: "url(#g)"})); scale.appendChild(bar);
  scale.append(" " + fmt(hi));
}
document.getElementById("metric").addEventListener("change", paint);
paint();
document.body.setAttribute("data-drawn-nodes", String(circles.length));
const m = data.meta, problem = document.getElementById("problem");
function row(label, value, cls) { const d = document.createElement("div"); const b = document.createElement("b");
  b.textContent = label + ": "; d.appendChild(b); const s = document.createElement("span"); s.textContent = value;
  if (cls) s.className = cls; d.appendChild(s); problem.appendChild(d); }
if (m.index) { const a = document.createElement("a"); a.href = m.index; a.textContent = "\u2190 all trees";
  problem.appendChild(a); }
row("question", m.question ?? "-"); row("reference", m.reference ?? "-");
row("answer", (m.answer ?? "none") + (m.correct === true ? "  (right)" : m.correct === false ? "  (wrong)" : ""),
    m.correct === true ? "right" : m.correct === false ? "wrong" : "unknown");
row("search", data.nodes.length + " nodes, " + (m.tokens ?? "-") + " tokens, " + fmt(m.seconds) + " s, stopped: "
    + (m.stop_reason ?? "-"));
let lit = [];
function light(leaf) {
  for (const e of lit) e.classList.remove("lit");
  lit = [];
  for (let id = leaf; id > 0; id = byId.get(id).parent) {
    const e = edges.get(id); e.classList.add("lit"); lit.push(e); }
}
const lines = document.getElementById("lines");
for (const g of data.groups) {
  const box = document.createElement("div"); box.className = "group";
  const h = document.createElement("div");
  h.textContent = g.answer + "  \\u2014 " + g.lines.length + " line(s), summed value " + fmt(g.value_sum)
    + (g.chosen ? "  (the chosen line's answer)" : "");
  if (g.chosen) h.className = "chosen";
  box.appendChild(h);
  for (const line of g.lines) {
    const d = document.createElement("div"); d.className = "line";
    d.textContent = "node " + line.leaf + ": value " + fmt(line.value) + ", visits " + line.visits;
    d.addEventListener("click", () => { light(line.leaf); show(byId.get(line.leaf)); });
    box.appendChild(d);
  }
  lines.appendChild(box);
}
if (!data.groups.length) lines.textContent = "none";
document.body.setAttribute("data-finished-lines", String(data.groups.reduce((s, g) => s + g.lines.length, 0)));
document.getElementById("chosen").textContent = data.chosen_text;
function describe(n) { return n.kind + " node " + n.id + ", depth " + n.depth + "\\nconfidence " + fmt(n.confidence)
  + " | value " + fmt(n.value) + " | visits " + n.visits + (n.terminal ? " | terminal" : ""); }
function show(n) {
  const d = document.getElementById("detail"); d.textContent = "";
  const h = document.createElement("h4"); h.textContent = "Selected node"; d.appendChild(h);
  const t = document.createElement("div"); t.textContent = describe(n); d.appendChild(t);
  const pre = document.createElement("pre"); pre.textContent = n.text; d.appendChild(pre);
}
scene.addEventListener("mouseover", e => { const id = e.target.dataset && e.target.dataset.node;
  if (id === undefined) return; const n = byId.get(Number(id));
  tip.textContent = describe(n) + "\\n\\n" + n.text.slice(0, __TIP__) + (n.text.length > __TIP__ ? " ..." : "");
  tip.style.display = "block"; tip.style.left = (e.clientX + 12) + "px"; tip.style.top = (e.clientY + 12) + "px"; });
scene.addEventListener("mouseout", () => { tip.style.display = "none"; });
scene.addEventListener("click", e => { const id = e.target.dataset && e.target.dataset.node;
  if (id !== undefined) show(byId.get(Number(id))); });
const svg = document.getElementById("view");
let box = {x: data.bounds[0] - 20, y: -20, w: data.bounds[1] - data.bounds[0] + 40, h: data.bounds[2] + 40};
function apply() {
  svg.setAttribute("viewBox", [box.x, box.y, box.w, box.h].join(" "));
  const perPixel = Math.max(box.w / (svg.clientWidth || 1), box.h / (svg.clientHeight || 1));
  for (const [c, px] of circles) c.setAttribute("r", px * perPixel);
}
svg.addEventListener("wheel", e => { e.preventDefault(); const f = e.deltaY > 0 ? 1.2 : 1 / 1.2;
  box.x += box.w * (1 - f) / 2; box.y += box.h * (1 - f) / 2; box.w *= f; box.h *= f; apply(); });
let drag = null;
svg.addEventListener("mousedown", e => { drag = [e.clientX, e.clientY]; });
window.addEventListener("mouseup", () => { drag = null; });
svg.addEventListener("mousemove", e => { if (!drag) return; const s = box.w / svg.clientWidth;
  box.x -= (e.clientX - drag[0]) * s; box.y -= (e.clientY - drag[1]) * s; drag = [e.clientX, e.clientY]; apply(); });
apply();
console.log("forest-viewer drew " + circles.length + " nodes");
</script></body></html>
"""


def _fill(template: str, title: str, payload) -> str:
    data = json.dumps(payload).replace("</", "<\\/")  # the JSON cannot close its <script> element
    return (template.replace("__STYLE__", _STYLE).replace("__TITLE__", html.escape(title))
            .replace("__TIP__", str(TOOLTIP_CHARS)).replace("__DATA__", data))


def layout(nodes: list[dict]) -> list[float]:
    """[min_x, max_x, max_y] after giving every node x (leaf order, parents centred) and y (depth)."""
    children: dict[int, list[int]] = {n["id"]: [] for n in nodes}
    for n in nodes:
        if n["parent"] >= 0:
            children[n["parent"]].append(n["id"])
    by_id = {n["id"]: n for n in nodes}
    next_leaf = 0.0
    order = [(nodes[0]["id"], False)] if nodes else []  # iterative post-order (trees can be deep)
    while order:
        node, visited = order.pop()
        kids = children[node]
        if not kids:
            by_id[node]["x"], next_leaf = next_leaf, next_leaf + X_GAP
        elif visited:
            by_id[node]["x"] = sum(by_id[k]["x"] for k in kids) / len(kids)
        else:
            order.append((node, True))
            order.extend((k, False) for k in reversed(kids))
    xs = [n["x"] for n in nodes] or [0.0]
    depth = max((n["depth"] for n in nodes), default=0) + 1
    y_gap = max(Y_GAP, (max(xs) - min(xs)) / 1.6 / depth)  # wide, shallow trees fill the screen, not a strip
    for n in nodes:
        n["y"] = n["depth"] * y_gap
    return [min(xs), max(xs), max((n["y"] for n in nodes), default=0.0)]


def _path_texts(nodes: list[dict]) -> dict[int, str]:
    """The text from the root to every node (nodes come parents first, as ids are handed out)."""
    texts: dict[int, str] = {}
    for n in nodes:
        texts[n["id"]] = (texts[n["parent"]] if n["parent"] >= 0 else "") + (n["text"] or "")
    return texts


def answer_groups(nodes: list[dict], best_path: list[int]) -> tuple[list[dict], str]:
    """The finished lines (terminal leaves whose text has an answer) grouped by normalised answer, largest summed
    value first (the value-weighted vote); and the chosen line's full text."""
    texts = _path_texts(nodes)
    parents = {n["parent"] for n in nodes}
    groups: dict[str, dict] = collections.OrderedDict()
    chosen = best_path[-1] if best_path else None
    for n in nodes:
        if not n["terminal"] or n["id"] in parents:
            continue
        answer = extract_answer(texts[n["id"]])
        if answer is None:
            continue
        group = groups.setdefault(normalize_answer(answer), {"answer": answer, "value_sum": 0.0, "lines": [],
                                                             "chosen": False})
        value = n["value"]
        group["value_sum"] += max(value, 0.0) if value is not None and not math.isnan(value) else 0.0
        group["lines"].append({"leaf": n["id"], "value": value, "visits": n["visits"]})
        group["chosen"] |= n["id"] == chosen
    for group in groups.values():
        group["lines"].sort(key=lambda line: -(line["value"] if line["value"] is not None else -math.inf))
    ordered = sorted(groups.values(), key=lambda g: (-g["value_sum"], -len(g["lines"])))
    return ordered, texts.get(chosen, "") if chosen is not None else ""


def tree_page(tree: dict, *, title: str, meta: dict | None = None) -> str:
    """HTML for ``tree`` = {"nodes": [{id, parent, depth, kind, text, confidence, visits, value, terminal}],
    "best_path": [...]} (the shape of ``/v1/search``'s tree); ``meta``: question, reference, answer, correct,
    tokens, seconds, stop_reason, index (a link back to the index; any may be missing)."""
    nodes = [dict(n) for n in tree["nodes"]]
    bounds = layout(nodes)
    groups, chosen_text = answer_groups(nodes, tree["best_path"])
    return _fill(TREE, title, {"nodes": nodes, "best_path": tree["best_path"], "bounds": bounds,
                               "meta": meta or {}, "groups": groups, "chosen_text": chosen_text})


def index_page(rows: list[dict], *, title: str) -> str:
    """HTML listing trees: ``rows`` of {tree_id, href, question, reference, answer, correct, value, nodes, tokens,
    seconds, stop_reason}."""
    return _fill(INDEX, title, rows)


def _clean(value):
    return None if isinstance(value, float) and math.isnan(value) else value


def _node_dicts(nodes: list[dict]) -> list[dict]:
    return [{"id": n["node_id"], "parent": n["parent_id"], "depth": n["depth"], "kind": n["kind"],
             "text": n["text"], "confidence": _clean(n["confidence"]), "visits": n["visits"],
             "value": n["value_sum"] / n["visits"] if n["visits"] else None, "terminal": n["is_terminal"]}
            for n in nodes]


def build_index_row(row: dict) -> dict:
    """The index row / page header of a build's tree row."""
    return {"tree_id": row["tree_id"], "question": row["question"], "reference": row["reference_answer"],
            "answer": row["final_answer"], "correct": row["correct"], "value": _clean(row["value"]),
            "nodes": row["num_nodes"], "tokens": row["tokens_generated"], "seconds": row["seconds"],
            "stop_reason": row["stop_reason"], "href": f"tree-{row['tree_id']}.html"}


def tree_from_output(output: str, tree_id: str) -> tuple[dict, dict]:
    """One tree of a build's output in the viewer's shape: (tree, meta)."""
    from dataset.reader import read_tree

    if not TREE_ID_RE.match(tree_id):
        raise ValueError(f"tree id {tree_id!r} is not a valid id")
    row, nodes = read_tree(output, tree_id)
    return {"nodes": _node_dicts(nodes), "best_path": row["best_path"]}, build_index_row(row)


def write_build_view(output: str, folder: str | Path) -> Path:
    """``forest view OUT``: ``folder/index.html`` listing every committed tree, and one page per tree beside it.
    Returns the index's path."""
    from dataset.reader import read_trees

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for row, nodes in read_trees(output):
        if not TREE_ID_RE.match(row["tree_id"]):
            raise ValueError(f"tree id {row['tree_id']!r} is not a valid id")
        meta = build_index_row(row)
        page = tree_page({"nodes": _node_dicts(nodes), "best_path": row["best_path"]},
                         title=f"tree {row['tree_id']}", meta={**meta, "index": "index.html"})
        (folder / meta["href"]).write_text(page, encoding="utf-8")
        rows.append(meta)
    index = folder / "index.html"
    index.write_text(index_page(rows, title=f"Forest build {output} ({len(rows)} trees)"), encoding="utf-8")
    return index
