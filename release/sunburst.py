"""The release's preference hierarchy, dimension -> subdimension -> preference, as pictures.

`sunburst_nodes` aggregates the preference sets in DuckDB (hundreds of thousands of free-text
preferences never become Python objects); the pictures show the most frequent subdimensions of each
dimension and the most frequent preferences of each subdimension, the rest gathered under "other".
Subdimensions are free text with a long tail, so most of a dimension is "other" in one wheel of all four:
the PNG gives each dimension a circle of its own and lists its top subdimensions with their shares, so
each is labelled; the HTML keeps the one interactive wheel with more detail.
The HTML inlines plotly.js, so it works offline (docs/ARCHITECTURE.md, decision 16); the PNG comes from matplotlib.
"""
from __future__ import annotations

import colorsys
import io
import math
from dataclasses import dataclass

import duckdb

from facets.schemas import DIMENSIONS

OTHER = "(other)"
MAX_SUBDIMENSIONS = 12      # the HTML's detail
MAX_PREFERENCES = 6
PNG_SUBDIMENSIONS = 8       # labelled in the PNG, per dimension
# one hue per dimension, in DIMENSIONS order
_BASE_COLOURS = ("#4C78A8", "#F58518", "#54A24B", "#B279A2")


@dataclass(frozen=True)
class Node:
    id: str
    label: str
    parent: str
    value: int
    dimension: str
    depth: int  # 1 dimension, 2 subdimension, 3 preference


def dimension_label(dimension: str) -> str:
    return dimension.replace("_", " ").capitalize()


def sunburst_nodes(con: duckdb.DuckDBPyConnection, relation: str, column: str = "preference_set",
                   max_subdimensions: int = MAX_SUBDIMENSIONS, max_preferences: int = MAX_PREFERENCES) -> list[Node]:
    """Nodes of the hierarchy over `column` (a list of preference structs) of table or view `relation`.

    Subdimensions and preferences are grouped case- and whitespace-insensitively and shown in their most
    frequent spelling; values count preference items (one per dimension per set).
    """
    rows = con.sql(f"""
        WITH items AS (
            SELECT p.dimension AS dimension, p.subdimension AS subdimension, p.preference AS preference
            FROM (SELECT unnest({column}) AS p FROM {relation})
        ),
        spelled AS (
            SELECT dimension,
                   lower(regexp_replace(trim(subdimension), '\\s+', ' ', 'g')) AS skey,
                   lower(regexp_replace(trim(preference), '\\s+', ' ', 'g')) AS pkey,
                   subdimension, preference, count(*) AS n
            FROM items GROUP BY ALL
        ),
        subs AS (
            SELECT dimension, skey, sum(n) AS n,
                   first(subdimension ORDER BY n DESC, subdimension) AS label
            FROM spelled GROUP BY ALL
        ),
        subs_ranked AS (
            SELECT *, row_number() OVER (PARTITION BY dimension ORDER BY n DESC, skey) AS r FROM subs
        ),
        prefs AS (
            SELECT dimension, skey, pkey, sum(n) AS n,
                   first(preference ORDER BY n DESC, preference) AS label
            FROM spelled GROUP BY ALL
        ),
        prefs_ranked AS (
            SELECT *, row_number() OVER (PARTITION BY dimension, skey ORDER BY n DESC, pkey) AS r FROM prefs
        )
        SELECT s.dimension,
               CASE WHEN s.r <= {int(max_subdimensions)} THEN s.label ELSE NULL END AS subdimension,
               CASE WHEN s.r > {int(max_subdimensions)} THEN NULL
                    WHEN p.r <= {int(max_preferences)} THEN p.label ELSE NULL END AS preference,
               CASE WHEN s.r <= {int(max_subdimensions)} THEN s.r ELSE 1000000 END AS sr,
               CASE WHEN s.r > {int(max_subdimensions)} THEN 0
                    WHEN p.r <= {int(max_preferences)} THEN p.r ELSE 1000000 END AS pr,
               sum(p.n) AS n
        FROM subs_ranked s JOIN prefs_ranked p USING (dimension, skey)
        GROUP BY ALL
        ORDER BY s.dimension, sr, pr
    """).fetchall()
    by_dimension: dict[str, list[tuple]] = {}
    for dimension, sub, pref, sr, pr, n in rows:
        by_dimension.setdefault(dimension, []).append((sub, pref, sr, pr, int(n)))
    nodes: list[Node] = []
    order = [d for d in DIMENSIONS if d in by_dimension] + sorted(d for d in by_dimension if d not in DIMENSIONS)
    for d, dimension in enumerate(order):
        entries = by_dimension[dimension]
        did = f"d{d}"
        nodes.append(Node(did, dimension_label(dimension), "", sum(e[4] for e in entries), dimension, 1))
        subs: dict[str | None, list[tuple]] = {}
        for sub, pref, _sr, _pr, n in entries:
            subs.setdefault(sub, []).append((pref, n))
        for s, (sub, leaves) in enumerate(subs.items()):
            sid = f"{did}.s{s}"
            nodes.append(Node(sid, sub if sub is not None else OTHER, did, sum(n for _, n in leaves), dimension, 2))
            if sub is None:
                continue
            for p, (pref, n) in enumerate(leaves):
                nodes.append(Node(f"{sid}.p{p}", pref if pref is not None else OTHER, sid, n, dimension, 3))
    return nodes


def _shade(colour: str, depth: int, position: float) -> str:
    """Lighter for deeper rings, with a little variation along the ring."""
    r, g, b = (int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5))
    h, lightness, s = colorsys.rgb_to_hls(r, g, b)
    lightness = min(0.92, lightness + 0.12 * (depth - 1) + 0.10 * position)
    r, g, b = colorsys.hls_to_rgb(h, lightness, s)
    return "#%02x%02x%02x" % (round(r * 255), round(g * 255), round(b * 255))


def _colours(nodes: list[Node]) -> dict[str, str]:
    base = {d: _BASE_COLOURS[i % len(_BASE_COLOURS)] for i, d in enumerate(dict.fromkeys(n.dimension for n in nodes))}
    siblings: dict[str, list[str]] = {}
    for node in nodes:
        siblings.setdefault(node.parent, []).append(node.id)
    colours = {}
    for node in nodes:
        group = siblings[node.parent]
        position = group.index(node.id) / max(1, len(group) - 1) if node.depth > 1 else 0.0
        colours[node.id] = _shade(base[node.dimension], node.depth, position)
    return colours


def sunburst_html(nodes: list[Node], title: str) -> str:
    """A self-contained HTML page: plotly.js is inlined, nothing is fetched from the network."""
    import plotly.graph_objects as go

    total = sum(n.value for n in nodes if n.depth == 1) or 1
    colours = _colours(nodes)
    figure = go.Figure(go.Sunburst(
        ids=[n.id for n in nodes],
        labels=[n.label for n in nodes],
        parents=[n.parent for n in nodes],
        values=[n.value for n in nodes],
        branchvalues="total",
        marker={"colors": [colours[n.id] for n in nodes]},
        customdata=[[100.0 * n.value / total] for n in nodes],
        hovertemplate="<b>%{label}</b><br>%{value} preferences (%{customdata[0]:.1f}%)<extra></extra>",
        insidetextorientation="radial",
        maxdepth=3,
    ))
    figure.update_layout(title={"text": title}, margin={"t": 60, "l": 10, "r": 10, "b": 10}, height=850)
    return figure.to_html(include_plotlyjs=True, full_html=True, div_id="sunburst",
                          config={"displaylogo": False, "responsive": True})


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _panel_subdimensions(dimension: Node, children: dict[str, list[Node]], top: int) -> list[tuple[Node | None, int]]:
    """(subdimension node, count) of the `top` most frequent subdimensions, then one `(other)` (None) entry
    holding the rest: what the HTML shows in more detail, merged."""
    named = sorted((n for n in children.get(dimension.id, []) if n.label != OTHER), key=lambda n: -n.value)
    rest = dimension.value - sum(n.value for n in named[:top])
    return [(n, n.value) for n in named[:top]] + ([(None, rest)] if rest > 0 else [])


def sunburst_png(nodes: list[Node], title: str, top: int = PNG_SUBDIMENSIONS) -> bytes:
    """One ring per dimension (2 x 2 panels, each dimension a full circle): its `top` subdimensions,
    labelled with their share, and their most frequent preferences around them; everything else is one grey
    `(other)`. A panel's list names every labelled subdimension again, however narrow its wedge."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Wedge

    colours = _colours(nodes)
    children: dict[str, list[Node]] = {}
    for node in nodes:
        children.setdefault(node.parent, []).append(node)
    dimensions = children.get("", [])
    figure = Figure(figsize=(14, 15), dpi=100)
    FigureCanvasAgg(figure)
    figure.suptitle(title, fontsize=15)
    for index, dimension in enumerate(dimensions[:4]):
        ax = figure.add_axes((0.02 + 0.49 * (index % 2), 0.50 - 0.47 * (index // 2), 0.47, 0.42))
        ax.set_aspect("equal")
        ax.axis("off")
        total = dimension.value or 1
        ax.text(0, 0, f"{dimension.label.replace(' ', chr(10))}\n{dimension.value:,}", ha="center", va="center", fontsize=12, weight="bold")
        start, listing = 90.0, []
        for sub, count in _panel_subdimensions(dimension, children, top):
            sweep = 360.0 * count / total
            share = 100.0 * count / total
            colour = colours[sub.id] if sub is not None else "#d9d9d9"
            ax.add_patch(Wedge((0, 0), 0.62, start, start + sweep, width=0.34, facecolor=colour, edgecolor="white",
                               linewidth=0.8))
            label = sub.label if sub is not None else OTHER
            middle = math.radians(start + sweep / 2)
            if sweep >= 9:
                angle = math.degrees(middle)
                rotation = angle if -90 <= ((angle + 180) % 360) - 180 <= 90 else angle + 180
                ax.text(0.45 * math.cos(middle), 0.45 * math.sin(middle), _short(label, 16), ha="center",
                        va="center", fontsize=7.5, rotation=rotation, rotation_mode="anchor")
            listing.append(f"{_short(label, 28)}  {share:.1f}%")
            if sub is not None:
                offset = start
                for leaf in children.get(sub.id, []):
                    leaf_sweep = 360.0 * leaf.value / total
                    ax.add_patch(Wedge((0, 0), 1.0, offset, offset + leaf_sweep, width=0.38,
                                       facecolor=colours[leaf.id] if leaf.label != OTHER else "#eeeeee",
                                       edgecolor="white", linewidth=0.5))
                    if leaf_sweep >= 7 and leaf.label != OTHER:
                        leaf_middle = math.radians(offset + leaf_sweep / 2)
                        angle = math.degrees(leaf_middle)
                        rotation = angle if -90 <= ((angle + 180) % 360) - 180 <= 90 else angle + 180
                        ax.text(0.81 * math.cos(leaf_middle), 0.81 * math.sin(leaf_middle), _short(leaf.label, 24),
                                ha="center", va="center", fontsize=6, rotation=rotation, rotation_mode="anchor")
                    offset += leaf_sweep
            start += sweep
        ax.set_xlim(-1.05, 1.75)
        ax.set_ylim(-1.05, 1.05)
        ax.text(1.08, 0.95, f"top {min(top, len(listing))} subdimensions", fontsize=9, weight="bold", va="top")
        ax.text(1.08, 0.85, "\n".join(listing), fontsize=8, va="top", linespacing=1.5)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()
