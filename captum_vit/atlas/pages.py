"""The atlas's static site: ``index.html``, one page per layer, one per unit, a style
sheet, and a search script. Pages open from disk (no server): the unit list for the search
box is a script (``units.js``), not a fetched file. Text is HTML (legible at any page
width); images carry no text. Every term is explained where it appears."""

from __future__ import annotations

import html
import json

import matplotlib

from .resume import AtlasFiles
from .units import unit_folder

__all__ = ["write_site"]

_CMAP = "inferno"  # the overlays' colour map (captum_vit.render's default for sign="positive")

STYLE = """
body { font: 16px/1.45 system-ui, sans-serif; max-width: 1120px; margin: 0 auto; padding: 0 16px 48px; color: #111; }
header { display: flex; flex-wrap: wrap; gap: 12px; align-items: center; border-bottom: 1px solid #ccc; padding: 8px 0; }
header nav { flex: 1; font-size: 15px; }
header nav a { margin-right: 10px; }
form#search input { font-size: 15px; width: 260px; padding: 3px 6px; }
form#search button { font-size: 15px; }
#search-result { font-size: 14px; color: #a00; margin: 0; min-height: 1em; }
h1 { font-size: 26px; } h2 { font-size: 21px; margin-top: 28px; } h3 { font-size: 17px; }
.explain { font-size: 15px; color: #333; max-width: 860px; }
dfn { font-style: normal; font-weight: 600; }
table { border-collapse: collapse; font-size: 15px; }
td, th { border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: left; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
.bar { display: inline-block; height: 12px; background: #4a7bd0; vertical-align: middle; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
.card { width: 148px; font-size: 14px; text-decoration: none; color: #111; }
.card img { width: 148px; height: 148px; display: block; border: 1px solid #ccc; }
.top { display: flex; flex-wrap: wrap; gap: 12px; }
.top figure { margin: 0; width: 200px; font-size: 14px; }
.top img { width: 96px; height: 96px; }
.viz img { width: 224px; height: 224px; border: 1px solid #ccc; }
.colorbar { width: 320px; height: 16px; border: 1px solid #888; }
.colorbar-labels { width: 320px; display: flex; justify-content: space-between; font-size: 14px; }
.pager { font-size: 15px; margin: 8px 0; }
.pager a { margin-right: 14px; }
"""

SEARCH = """
(function () {
  var form = document.getElementById("search");
  if (!form) return;
  var root = document.body.getAttribute("data-root");
  var atlas = window.ATLAS_UNITS;
  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var text = document.getElementById("unit-search").value.trim();
    var out = document.getElementById("search-result");
    var match = /^(?:(.+)[:\\/ ])?(\\d+)$/.exec(text);
    if (!match) { out.textContent = "type a unit as LAYER:UNIT, e.g. 2:17 or blocks.2.mlp.act:17"; return; }
    var unit = parseInt(match[2], 10), layers = atlas.layers;
    if (match[1] !== undefined) {
      var key = match[1];
      layers = /^\\d+$/.test(key) ? [atlas.layers[parseInt(key, 10)]] : [key];
    } else if (document.body.getAttribute("data-layer")) {
      layers = [document.body.getAttribute("data-layer")];
    }
    for (var i = 0; i < layers.length; i++) {
      var units = atlas.units[layers[i]];
      if (units && units.indexOf(unit) >= 0) {
        var id = ("000" + unit).slice(-4);
        window.location.href = root + "layers/" + layers[i] + "/unit_" + id + ".html";
        return;
      }
    }
    out.textContent = "unit " + text + " is not in this atlas (units are numbered per layer)";
  });
})();
"""

GLOSSARY = [
    (
        "layer",
        "a module of the model; the atlas reads its output. The default layers are every "
        "block's MLP hidden layer (after the activation), the layer the paper visualizes.",
    ),
    (
        "unit",
        "one channel (feature) of a layer, numbered from 0 within the layer; "
        "<code>2:17</code> means unit 17 of the third layer listed.",
    ),
    (
        "feature visualization",
        "an image optimized from noise so that the unit's mean "
        "activation over the patch tokens is as high as possible: what the unit responds to, "
        "with no dataset involved.",
    ),
    (
        "score",
        "a unit's activation on an image, averaged over the patch tokens (the cls and "
        "register tokens excluded). The top images are the images with the highest scores.",
    ),
    (
        "patch activation map",
        "the unit's activation at each patch of an image, drawn as a heat "
        "map over the image (with a colour bar under the maps): where in the image the unit fires.",
    ),
    (
        "prefix tokens",
        "tokens that are not image patches: the class token "
        "(<code>cls</code>), distillation or register tokens. The model's prediction is read from "
        "<code>cls</code> when it pools with cls.",
    ),
    (
        "locality",
        "for a layer, the share of each token's input gradient that falls inside its "
        "own patch, averaged over probed patches: 1 means tokens see only their own patch, "
        "about 1/(number of patches) means they mix the whole image.",
    ),
]

TABLE_ONE = [
    ("natural", "accuracy of the unchanged model."),
    (
        "isolated cls, L",
        "the prefix tokens run alone through the first L blocks (they see no "
        "patch before block L+1); L = 0 is the natural model, L = depth means cls never sees the "
        "image. Accuracy that holds up to a large L means the last blocks do the pooling.",
    ),
    (
        "tear after L",
        "every patch token is dropped after block L and only the prefix tokens "
        "go on; shows how late the patch information is still needed.",
    ),
    (
        "patch average",
        "the model's head applied to each patch token's final features instead "
        "of cls, accuracy averaged over positions.",
    ),
    ("best patch", "the accuracy of the best single position."),
]


def _inferno_gradient() -> str:
    colormap = matplotlib.colormaps[_CMAP]
    stops = []
    for step in range(11):
        r, g, b, _ = colormap(step / 10)
        stops.append(f"rgb({round(r * 255)},{round(g * 255)},{round(b * 255)}) {step * 10}%")
    return "linear-gradient(to right, " + ", ".join(stops) + ")"


def _e(value: object) -> str:
    return html.escape(str(value))


def _num(value: float) -> str:
    return f"{value:.3g}"


class _Site:
    def __init__(self, files: AtlasFiles, manifest: dict, overview: dict) -> None:
        self.files = files
        self.layers: dict = manifest["layers"]
        self.names = list(self.layers)
        self.settings = manifest["settings"]
        self.overview = overview

    # ------------------------------------------------------------------ frame

    def page(self, title: str, body: str, root: str, layer: str = "") -> str:
        links = "".join(
            f'<a href="{root}layers/{_e(name)}/index.html">{i}: {_e(name)}</a>'
            for i, name in enumerate(self.names)
        )
        return (
            "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{_e(title)}</title><link rel='stylesheet' href='{root}style.css'></head>\n"
            f"<body data-root='{root}' data-layer='{_e(layer)}'>\n<header><nav>"
            f"<a href='{root}index.html'>Atlas home</a> Layers: {links}</nav>"
            "<form id='search'><label for='unit-search'>Find a unit </label>"
            "<input id='unit-search' placeholder='LAYER:UNIT, e.g. 0:17'>"
            "<button type='submit'>Go</button></form></header>"
            "<p id='search-result'></p>\n"
            f"{body}\n<script src='{root}units.js'></script>"
            f"<script src='{root}search.js'></script>\n</body></html>\n"
        )

    # ------------------------------------------------------------------ index

    def index(self) -> str:
        s, o = self.settings, self.overview
        rows = []
        for i, name in enumerate(self.names):
            info = self.layers[name]
            value = o["locality"].get(name)
            bar = (
                f"<span class='bar' style='width:{round(160 * value)}px'></span> {_num(value)}"
                if value is not None
                else "-"
            )
            rows.append(
                f"<tr><td>{i}</td><td><a href='layers/{_e(name)}/index.html'>{_e(name)}</a></td>"
                f"<td class='num'>{len(info['units'])} / {info['channels']}</td>"
                f"<td>{info['grid'][0]}x{info['grid'][1]}</td><td>{bar}</td></tr>"
            )
        glossary = "".join(f"<dt><dfn>{_e(t)}</dfn></dt><dd>{d}</dd>" for t, d in GLOSSARY)
        skipped = o["skipped_files"]
        body = (
            f"<h1>Atlas of {_e(o['model'])}</h1>"
            f"<p class='explain'>What each unit of each layer responds to: its feature "
            f"visualization, the {s['k']} images that activate it most out of "
            f"{_e(o['images'])}{f' ({skipped} unreadable file(s) skipped)' if skipped else ''}, "
            f"with patch activation maps, and its activation histogram. Feature "
            f"visualizations: preset <code>{_e(s['preset'])}</code>, "
            f"{_e(s['steps'] if s['steps'] is not None else 'the preset default')} steps, "
            f"seed {s['seed']}. The terms are explained at the bottom of this page.</p>"
            "<h2>Layers</h2><p class='explain'>Units shown / units in the layer; the patch "
            "grid; the layer's <dfn>locality</dfn> (see the terms below; bar: 1 = fully local)."
            f"{self.tower_note()}</p>"
            "<table><tr><th>#</th><th>layer</th><th>units shown</th><th>grid</th>"
            f"<th>locality</th></tr>{''.join(rows)}</table>"
            f"<h2>Where the model pools spatial information (the paper's Table 1)</h2>"
            f"{self.table_one(o['pooling'])}<h2>Terms</h2><dl class='explain'>{glossary}</dl>"
        )
        return self.page(f"Atlas of {o['model']}", body, "")

    def tower_note(self) -> str:
        """For a CLIP model, how its image tower's layer names read in code."""
        tower = self.overview.get("tower")
        if not tower:
            return ""
        example = f"{tower}.{self.names[0]}"
        return (
            f" Layer names are paths inside the image tower <code>{_e(tower)}</code>; in code, "
            f"name a layer of the full model with the <code>{_e(tower)}.</code> prefix, e.g. "
            f"<code>{_e(example)}</code> (the name without it is also a path in the text "
            "tower)."
        )

    def table_one(self, pooling: dict) -> str:
        if "skipped" in pooling:
            reason = pooling["skipped"].rstrip(".")
            return f"<p class='explain'>Not measured: {_e(reason)}.</p>"
        terms = "".join(f"<dt><dfn>{_e(t)}</dfn></dt><dd>{_e(d)}</dd>" for t, d in TABLE_ONE)
        rows = [("natural", pooling["natural"])]
        rows += [(f"isolated cls, L = {k}", v) for k, v in pooling["isolated_cls"].items()]
        rows += [(f"tear after L = {k}", v) for k, v in pooling["tear"].items()]
        rows += [("patch average", pooling["patch_average"])]
        r, c = pooling["patch_max_position"]
        rows += [(f"best patch (row {r}, column {c})", pooling["patch_max"])]
        cells = "".join(
            f"<tr><td>{_e(name)}</td><td class='num'>{value:.1f}%</td></tr>" for name, value in rows
        )
        return (
            f"<p class='explain'>Top-1 accuracy in percent on {pooling['num_images']} labelled "
            f"images, model depth {pooling['depth']} blocks.</p><dl class='explain'>{terms}</dl>"
            f"<table><tr><th>experiment</th><th>top-1</th></tr>{cells}</table>"
        )

    # ------------------------------------------------------------------ layer

    def layer_page(self, position: int) -> str:
        name = self.names[position]
        info = self.layers[name]
        cards = []
        for unit in info["units"]:
            record = self.files.read_json(f"{unit_folder(name, unit)}/unit.json")
            cards.append(
                f"<a class='card' href='unit_{unit:04d}.html'>"
                f"<img src='unit_{unit:04d}/visualization.png' alt='feature visualization of "
                f"unit {unit}'>unit {unit}<br>best score {_num(record['top'][0]['score'])}</a>"
            )
        value = self.overview["locality"].get(name)
        locality = (
            f"locality {_num(value)} (1 = each token sees only its own patch). "
            if value is not None
            else ""
        )
        body = (
            f"{self.pager(position, self.names, lambda n: f'../{_e(n)}/index.html', 'layer')}"
            f"<h1>Layer {position}: {_e(name)}</h1><p class='explain'>{len(info['units'])} of "
            f"{info['channels']} units, patch grid {info['grid'][0]}x{info['grid'][1]}; "
            f"{locality}Each picture is a unit's <dfn>feature visualization</dfn> (an image "
            "optimized to activate the unit as much as possible); <dfn>best score</dfn> is the "
            "unit's mean activation over the patch tokens of its most activating image. Click "
            f"a unit for its top images.</p><div class='grid'>{''.join(cards)}</div>"
        )
        return self.page(f"{name}: layer {position}", body, "../../", name)

    @staticmethod
    def pager(position: int, items: list, href, noun: str) -> str:
        parts = []
        if position > 0:
            parts.append(f"<a href='{href(items[position - 1])}'>&larr; previous {noun}</a>")
        if position + 1 < len(items):
            parts.append(f"<a href='{href(items[position + 1])}'>next {noun} &rarr;</a>")
        return f"<div class='pager'>{''.join(parts)}</div>"

    # ------------------------------------------------------------------ unit

    def unit_page(self, layer_position: int, unit: int) -> str:
        name = self.names[layer_position]
        units = self.layers[name]["units"]
        r = self.files.read_json(f"{unit_folder(name, unit)}/unit.json")
        folder = f"unit_{unit:04d}"
        pager = self.pager(units.index(unit), units, lambda u: f"unit_{u:04d}.html", "unit")
        body = (
            f"{pager}<p class='pager'><a href='index.html'>all units of layer {layer_position}"
            f"</a></p><h1>Unit {unit} of layer {layer_position} ({_e(name)})</h1>"
            "<h2>Feature visualization</h2><div class='viz'>"
            f"<img src='{folder}/visualization.png' alt='feature visualization'></div>"
            "<p class='explain'>An image optimized from noise to raise this unit's mean "
            f"activation over the patch tokens; it reaches <b>{_num(r['visualization_score'])}"
            f"</b>, against <b>{_num(r['top'][0]['score'])}</b> for the most activating "
            f"image below (same measure).</p>{self.top_images(r, folder)}"
            f"{self.histogram(r)}{self.prefix_table(r)}"
        )
        return self.page(f"{name} unit {unit}", body, "../../", name)

    def top_images(self, r: dict, folder: str) -> str:
        figures = []
        for rank, item in enumerate(r["top"]):
            figures.append(
                f"<figure><img src='{folder}/top{rank}.png' alt='image {rank + 1}'>"
                f"<img src='{folder}/top{rank}_map.png' alt='activation map {rank + 1}'>"
                f"<figcaption>#{rank + 1}: {_e(item['name'])}<br>score "
                f"{_num(item['score'])}, peak patch {_num(item['peak'])}</figcaption></figure>"
            )
        return (
            f"<h2>Top {len(r['top'])} images</h2><p class='explain'>The images that activate "
            f"the unit most, out of {r['num_images']}. Left: the image as the model sees it; "
            "right: its <dfn>patch activation map</dfn>, the unit's activation at each patch, "
            "blended at 60% over the image. <dfn>score</dfn>: the activation averaged over "
            "all patches (how images are ranked); <dfn>peak patch</dfn>: the highest single "
            "patch.</p>"
            f"<div class='top'>{''.join(figures)}</div>"
            "<h3>Colour bar of the maps</h3><p class='explain'>One scale for all maps of "
            "this unit: from 0 (or below: black) to the highest patch activation among its "
            "top images.</p>"
            f"<div class='colorbar' style='background:{_inferno_gradient()}'></div>"
            f"<div class='colorbar-labels'><span>0</span><span>{_num(r['map_max'] / 2)}</span>"
            f"<span>{_num(r['map_max'])}</span></div>"
        )

    def histogram(self, r: dict) -> str:
        h = r["histogram"]
        counts, low, high = h["counts"], h["low"], h["high"]
        width, height, left, bottom = 640, 220, 56, 44
        plot_w, plot_h = width - left - 16, height - bottom - 12
        peak = max(counts) or 1
        bar_w = plot_w / len(counts)
        bars = "".join(
            f"<rect x='{left + i * bar_w:.1f}' y='{12 + plot_h * (1 - c / peak):.1f}' "
            f"width='{bar_w - 1:.1f}' height='{plot_h * c / peak:.1f}' fill='#4a7bd0'/>"
            for i, c in enumerate(counts)
        )
        threshold = r["top"][-1]["score"]
        x = left + plot_w * (threshold - low) / (high - low)
        text = "font-size='14' font-family='sans-serif'"
        svg = (
            f"<svg width='{width}' height='{height}' role='img' aria-label='histogram'>{bars}"
            f"<line x1='{x:.1f}' x2='{x:.1f}' y1='12' y2='{12 + plot_h}' stroke='#c00' "
            "stroke-width='2'/>"
            f"<text x='{left}' y='{height - 24}' {text}>{_num(low)}</text>"
            f"<text x='{left + plot_w}' y='{height - 24}' text-anchor='end' {text}>{_num(high)}</text>"
            f"<text x='{left + plot_w / 2}' y='{height - 6}' text-anchor='middle' {text}>"
            "score (mean activation over patches)</text>"
            f"<text x='{left - 6}' y='24' text-anchor='end' {text}>{peak}</text>"
            f"<text x='{left - 6}' y='{12 + plot_h}' text-anchor='end' {text}>0</text>"
            f"<text x='16' y='{12 + plot_h / 2}' transform='rotate(-90 16 {12 + plot_h / 2})' "
            f"text-anchor='middle' {text}>images</text></svg>"
        )
        return (
            "<h2>Activation histogram</h2><p class='explain'>How many of the "
            f"{r['num_images']} images give each score (mean {_num(r['mean'])}); the red line "
            "is the lowest score among the top images.</p>" + svg
        )

    def prefix_table(self, r: dict) -> str:
        if not r["prefix_names"]:
            return (
                "<h2>Prefix tokens</h2><p class='explain'>This layer has no prefix tokens "
                "(cls, registers).</p>"
            )
        head = "".join(f"<th>#{i + 1}</th>" for i in range(len(r["top"])))
        rows = "".join(
            f"<tr><td>{_e(token)}</td><td class='num'>{_num(r['prefix_mean'][p])}</td>"
            + "".join(f"<td class='num'>{_num(item['prefix'][p])}</td>" for item in r["top"])
            + "</tr>"
            for p, token in enumerate(r["prefix_names"])
        )
        return (
            "<h2>Activation at the prefix tokens</h2><p class='explain'>The unit's activation "
            "at each <dfn>prefix token</dfn> (not an image patch: the class token "
            "<code>cls</code>, registers), averaged over all images and on each top image; "
            f"compare with the mean score over patches, {_num(r['mean'])}.</p>"
            f"<table><tr><th>token</th><th>all images</th>{head}</tr>{rows}</table>"
        )

    # ------------------------------------------------------------------ assets

    def units_script(self) -> str:
        data = {"layers": self.names, "units": {n: self.layers[n]["units"] for n in self.names}}
        return "window.ATLAS_UNITS = " + json.dumps(data, sort_keys=True) + ";\n"


def write_site(files: AtlasFiles, manifest: dict, overview: dict) -> str:
    """Write every page of the atlas (from the units' ``unit.json`` files) and return the
    path of ``index.html``; the index is written last."""
    site = _Site(files, manifest, overview)
    files.write_text("style.css", STYLE.lstrip())
    files.write_text("search.js", SEARCH.lstrip())
    files.write_text("units.js", site.units_script())
    for position, name in enumerate(site.names):
        for unit in site.layers[name]["units"]:
            files.write_text(f"layers/{name}/unit_{unit:04d}.html", site.unit_page(position, unit))
        files.write_text(f"layers/{name}/index.html", site.layer_page(position))
    return str(files.write_text("index.html", site.index()))
