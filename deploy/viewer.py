"""The tree viewer: one self-contained HTML page per tree (no network, no external scripts).

Nodes are laid out in Python (x: leaf order, parent centred over its children; y: depth) and drawn as SVG by a
small script: colour = confidence (red low, green high), radius grows with visits, the chosen path is outlined,
rollouts are dashed. Clicking a node shows its text, confidence, visits and value. The page stays usable for
thousands of nodes (one SVG element per node and edge, wheel zoom, drag to pan).
"""

from __future__ import annotations

import html
import json
import re

TREE_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Forest tree __TITLE__</title>
<style>
body{margin:0;font:13px system-ui,sans-serif;display:flex;height:100vh}
#view{flex:1;cursor:grab;background:#fafafa} #side{width:360px;overflow:auto;padding:10px;border-left:1px solid #ddd}
pre{white-space:pre-wrap;background:#f3f3f3;padding:6px}
line,circle{vector-effect:non-scaling-stroke} .edge{stroke:#bbb;fill:none}
.best{stroke:#1f4fd1;stroke-width:3} circle{stroke:#555;stroke-width:.5;cursor:pointer}
circle.onpath{stroke:#1f4fd1;stroke-width:2.5} circle.rollout{stroke-dasharray:2 2}
</style></head><body>
<svg id="view" xmlns="http://www.w3.org/2000/svg"><g id="scene"></g></svg>
<div id="side"><h3>__TITLE__</h3><div id="summary"></div><div id="detail">Click a node.</div></div>
<script id="tree-data" type="application/json">__DATA__</script>
<script>
"use strict";
const data = JSON.parse(document.getElementById("tree-data").textContent);
const NS = "http://www.w3.org/2000/svg", scene = document.getElementById("scene");
const onPath = new Set(data.best_path);
function colour(c) { if (c === null) return "#ccc"; const h = Math.round(120 * Math.max(0, Math.min(1, c)));
  return "hsl(" + h + ",70%,50%)"; }
function el(name, attrs) { const e = document.createElementNS(NS, name);
  for (const k in attrs) e.setAttribute(k, attrs[k]); return e; }
const byId = new Map(data.nodes.map(n => [n.id, n]));
for (const n of data.nodes) {
  if (n.parent < 0) continue;
  const p = byId.get(n.parent);
  scene.appendChild(el("line", {x1: p.x, y1: p.y, x2: n.x, y2: n.y,
    class: onPath.has(n.id) && onPath.has(p.id) ? "edge best" : "edge"}));
}
let drawn = 0;
const circles = [];
for (const n of data.nodes) {
  const c = el("circle", {cx: n.x, cy: n.y, r: 1, fill: colour(n.confidence),
    class: (onPath.has(n.id) ? "onpath " : "") + n.kind, "data-node": n.id});
  c.addEventListener("click", () => show(n));
  circles.push([c, Math.min(3 + 2 * Math.sqrt(n.visits || 0), 14)]);  // radius in screen pixels
  scene.appendChild(c); drawn++;
}
document.body.setAttribute("data-drawn-nodes", String(drawn));
function fmt(v) { return v === null || v === undefined ? "-" : Number(v).toFixed(4); }
function show(n) {
  const d = document.getElementById("detail"); d.textContent = "";
  const h = document.createElement("h4");
  h.textContent = "node " + n.id + " (" + n.kind + ", depth " + n.depth + ")"; d.appendChild(h);
  const t = document.createElement("div");
  t.textContent = "confidence " + fmt(n.confidence) + " | visits " + n.visits + " | value " + fmt(n.value)
    + (n.terminal ? " | terminal" : ""); d.appendChild(t);
  const pre = document.createElement("pre"); pre.textContent = n.text; d.appendChild(pre);
}
document.getElementById("summary").textContent = data.nodes.length + " nodes; answer: " + (data.answer ?? "-");
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
console.log("forest-viewer drew " + drawn + " nodes");
</script></body></html>
"""

X_GAP, Y_GAP = 24, 70


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


def render(tree: dict, *, title: str, answer: str | None = None) -> str:
    """HTML for ``tree`` = {"nodes": [{id, parent, depth, kind, text, confidence, visits, value, terminal}],
    "best_path": [...]} (the shape of ``/v1/search``'s tree)."""
    nodes = [dict(n) for n in tree["nodes"]]
    bounds = layout(nodes)
    payload = json.dumps({"nodes": nodes, "best_path": tree["best_path"], "bounds": bounds, "answer": answer})
    payload = payload.replace("</", "<\\/")  # the JSON cannot close its <script> element
    return PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", payload)


def tree_from_output(output: str, tree_id: str) -> tuple[dict, str | None]:
    """Read one tree of a build's output back into the viewer's shape; (tree, final answer)."""
    from dataset.reader import read_tree

    if not TREE_ID_RE.match(tree_id):
        raise ValueError(f"tree id {tree_id!r} is not a valid id")
    row, nodes = read_tree(output, tree_id)
    out = [{"id": n["node_id"], "parent": n["parent_id"], "depth": n["depth"], "kind": n["kind"], "text": n["text"],
            "confidence": None if n["confidence"] is None or n["confidence"] != n["confidence"] else n["confidence"],
            "visits": n["visits"], "value": n["value_sum"] / n["visits"] if n["visits"] else None,
            "terminal": n["is_terminal"]} for n in nodes]
    return {"nodes": out, "best_path": row["best_path"]}, row["final_answer"]
