"""Template ids are the layout's own: the same in every process, another one for another layout.

A collector caches (exporter, domain, template id) -> layout and keeps it
across an exporter's restart or upgrade until a refresh brings the new one:
a restarted flowmeter whose layout changed must not reuse an id that the
collector still reads with the old layout.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from exporter.ie import IE
from exporter.template import (
    MIN_DATA_SET_ID,
    TemplateRegistry,
    default_registry,
    layout_id,
)

ROOT = Path(__file__).resolve().parents[2]

# One process's templates as a collector learns them: id -> (scope count, [(element id, length)]),
# with the flow layouts changed or not ("egressInterface" dropped or added stands for an upgrade).
_PROBE = """
import json, sys
from exporter.ie import IE
from exporter.template import FLOW_LAYOUTS, STATS_LAYOUT, STATS_NAME, STATS_SCOPE_COUNT, TemplateRegistry
changed = sys.argv[1] == "changed"
reg = TemplateRegistry()
for name, layout in FLOW_LAYOUTS.items():
    if changed:
        layout = tuple(e for e in layout if e.name != "ipClassOfService") + (IE["minimumTTL"],)
    reg.define(name, layout)
reg.define(STATS_NAME, STATS_LAYOUT, STATS_SCOPE_COUNT)
print(json.dumps({t.template_id: [t.scope_count, [[e.element_id, e.length] for e in t.elements]] for t in reg}))
"""


def _templates_of_a_process(layouts: str) -> dict[int, list]:
    out = subprocess.run([sys.executable, "-c", _PROBE, layouts], capture_output=True, text=True, check=True,
                         cwd=ROOT, timeout=120)
    return {int(k): v for k, v in json.loads(out.stdout).items()}


def test_a_restart_gives_every_layout_its_id_again_and_a_changed_layout_never_an_old_id():
    first = _templates_of_a_process("same")
    again = _templates_of_a_process("same")
    assert again == first  # a restart: the collector's cache stays right
    upgraded = _templates_of_a_process("changed")
    assert len(upgraded) == len(first)
    for tid, layout in upgraded.items():
        # every id the upgraded process uses either is new to the collector or means the same layout
        assert first.get(tid, layout) == layout
    changed = {tid for tid, layout in upgraded.items() if layout[1] not in [v[1] for v in first.values()]}
    assert len(changed) == 8 and not changed & first.keys()  # the eight changed flow layouts: eight new ids
    assert upgraded.keys() & first.keys()  # the statistics layout did not change: its id stayed


def test_ids_are_in_the_data_set_range_and_distinct():
    reg = default_registry()
    ids = [t.template_id for t in reg]
    assert len(set(ids)) == len(ids)
    assert all(MIN_DATA_SET_ID <= i <= 0xFFFF for i in ids)
    assert reg["ipv4_tcp"].template_id == layout_id(reg["ipv4_tcp"].elements)  # no move needed today


def test_a_taken_id_moves_the_later_layout_on_and_the_result_is_the_same_every_time():
    reg = TemplateRegistry()
    a = reg.define("a", (IE["sourceIPv4Address"],))
    # "b" with the very same layout under another name: the id is taken, "b" moves on (salted hash)
    b = reg.define("b", (IE["sourceIPv4Address"],))
    assert b.template_id != a.template_id
    assert b.template_id == layout_id(b.elements, 0, salt=1)
    reg2 = TemplateRegistry()
    assert reg2.define("a", a.elements).template_id == a.template_id
    assert reg2.define("b", b.elements).template_id == b.template_id


def test_names_do_not_count_lengths_and_scope_do():
    base = (IE["sourceIPv4Address"], IE["packetDeltaCount"])
    assert layout_id(base) == layout_id(tuple(e.with_length(e.length) for e in base))
    assert layout_id(base) != layout_id((base[0], base[1].with_length(4)))  # reduced size: another layout
    assert layout_id(base) != layout_id(base, scope_count=1)
