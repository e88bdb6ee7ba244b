"""ui/tomledit.py: comment-preserving testbed TOML edits over plain dicts and a tomlkit document (no widgets)."""

import subprocess
import sys
from pathlib import Path

from edgeshard.config import testbed
from edgeshard.ui import tomledit

ROOT = Path(__file__).resolve().parent.parent

TEXT = """# my lab
name = "lab"  # what we call it
source = "a"

[defaults]
bandwidth_mbit_s = 100  # the switch
latency_ms = 1

# the edge box
[[device]]
name = "a"
memory_gib = 4  # half of it is free

[[device]]
name = "b"
memory_gib = 8

[[device]]
name = "c"
memory_gib = 2

# the slow cable
[[link]]
src = "a"
dst = "b"
bandwidth_mbit_s = 10
"""


def edit(text, change, origins=None):
    """(new text, comments kept, the testbed it loads as) after change(raw) on the file's plain dict."""
    doc = tomledit.parse(text)
    raw = tomledit.plain(doc)
    links = []
    for lk in raw.pop("link", []):  # the editor writes links per direction, each directed
        pairs = [(lk["src"], lk["dst"])] if lk.get("directed") else [(lk["src"], lk["dst"]), (lk["dst"], lk["src"])]
        for s, d in pairs:
            links.append({"src": s, "dst": d, "directed": True,
                          **{k: lk[k] for k in ("bandwidth_mbit_s", "latency_ms") if k in lk}})
    if links:
        raw["link"] = links
    change(raw)
    if origins is None:
        origins = list(range(len(raw["device"])))
    out, kept = tomledit.edited_toml(doc, raw, origins)
    assert tomledit.plain(doc) == tomledit.plain(tomledit.parse(text)), "the original document must not change"
    return out, kept, testbed.loads(out)


def test_no_change_is_byte_for_byte():
    out, kept, _ = edit(TEXT, lambda raw: None)
    assert kept and out == TEXT


def test_changed_values_keep_every_comment():
    def change(raw):
        raw["device"][0]["memory_gib"] = 6
        raw["defaults"]["latency_ms"] = 2
        raw["constraints"] = {"max_stages": 2}
    out, kept, tb = edit(TEXT, change)
    assert kept
    for comment in ("# my lab", "# what we call it", "# the switch", "# the edge box", "# half of it is free",
                    "# the slow cable"):
        assert comment in out
    assert "memory_gib = 6  # half of it is free" in out and "latency_ms = 2" in out and "[constraints]" in out
    assert tb.device("a").memory_gib == 6 and tb.constraints.max_stages == 2 and tb.default_latency_s == 0.002


def test_rename_keeps_the_table_and_renames_its_links():
    def change(raw):
        raw["device"][0]["name"] = "edge"
        raw["source"] = "edge"
        for lk in raw["link"]:
            lk["src"], lk["dst"] = [("edge" if n == "a" else n) for n in (lk["src"], lk["dst"])]
    out, kept, tb = edit(TEXT, change)
    assert kept and "# the edge box\n[[device]]\nname = \"edge\"" in out and "# the slow cable" in out
    assert tb.link("edge", "b").bandwidth_mbit_s == 10 == tb.link("b", "edge").bandwidth_mbit_s


def test_new_and_removed_devices():
    def change(raw):
        raw["device"] = [raw["device"][0], raw["device"][2], {"name": "d", "memory_gib": 1.5}]
        del raw["link"]  # its only link named b
    out, kept, tb = edit(TEXT, change, origins=[0, 2, None])
    assert kept and tb.names == ("a", "c", "d")
    assert "[[link]]" not in out  # its only link named the removed device b
    assert "\n\n\n" not in out and out.endswith('[[device]]\nname = "d"\nmemory_gib = 1.5\n')


def test_one_direction_changed_splits_the_undirected_link():
    def change(raw):
        for lk in raw["link"]:
            if (lk["src"], lk["dst"]) == ("b", "a"):
                lk["bandwidth_mbit_s"] = 50
    out, kept, tb = edit(TEXT, change)
    assert kept and "# the slow cable" in out and out.count("directed = true") == 2
    assert tb.link("a", "b").bandwidth_mbit_s == 10 and tb.link("b", "a").bandwidth_mbit_s == 50


def test_new_link_pair_is_one_undirected_entry():
    def change(raw):
        raw["link"] += [{"src": "b", "dst": "c", "latency_ms": 5, "directed": True},
                        {"src": "c", "dst": "b", "latency_ms": 5, "directed": True}]
    out, kept, tb = edit(TEXT, change)
    assert kept and out.count("[[link]]") == 2 and "directed" not in out
    assert tb.link("c", "b").latency_s == tb.link("b", "c").latency_s == 0.005


def test_tables_it_does_not_describe_are_kept():
    """[[shared_cores]] is not edited: it stays, with its comments (local.toml)."""
    text = (ROOT / "testbed_configs" / "local.toml").read_text()
    out, kept, tb = edit(text, lambda raw: raw["constraints"].update(max_stages=2))
    assert kept and "# The three device processes run on this machine" in out and 'cores = "auto"' in out
    assert tb.shared_cores == testbed.loads(text).shared_cores != ()


def test_falls_back_to_plain_toml_when_the_edit_fails(monkeypatch):
    def broken(doc, raw, origins):
        raise RuntimeError("a tomlkit corner case")
    monkeypatch.setattr(tomledit, "update_doc", broken)
    doc = tomledit.parse(TEXT)
    raw = tomledit.plain(doc)
    out, kept = tomledit.edited_toml(doc, raw, [0, 1, 2])
    assert not kept and out == testbed.dumps(testbed.from_dict(raw))


def test_set_key_leaves_an_unchanged_value_alone_and_appends_new_keys_after_the_last():
    doc = tomledit.parse('[t]\nx = 1.0  # float\ny = 2\n\n# next\n[u]\n')
    tomledit.set_key(doc["t"], "x", 1.0)
    tomledit.set_key(doc["t"], "z", 3)
    out = doc.as_string()
    assert "x = 1.0  # float" in out and out.index("z = 3") < out.index("# next")
    tomledit.sync(doc["t"], {"x": 1}, ["x", "y"])  # int now: rewritten; y not wanted: deleted
    assert tomledit.plain(doc)["t"] == {"x": 1, "z": 3}


def test_imports_no_widgets():
    code = "import sys, edgeshard.ui.tomledit; print(sorted(m for m in ('ipywidgets', 'bokeh') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert r.stdout.strip() == "[]"
