"""Comment-preserving edits of a testbed TOML file (tomlkit), free of widgets.

ui/widgets.py TestbedEditor describes the testbed it shows as a plain dict in the shape testbed.from_dict reads
(config/testbed.py; the format is docs/formats.md), and this module writes that dict into the tomlkit document
of the original file, rewriting only the values that changed, so the user's comments and layout survive:

    doc = tomlkit.parse(text)
    text, kept = edited_toml(doc, raw, origins)   # origins[i]: the [[device]] table raw["device"][i] came from

Tables the editor does not edit ([[shared_cores]], token_file, description) are left as they are in the file.
When the edited document would not load back as the same testbed (a tomlkit corner case), edited_toml falls
back to plain testbed.dumps: correctness first, comments second.
"""

from __future__ import annotations

import dataclasses

import tomlkit

from edgeshard.config import testbed as testbed_mod
from edgeshard.config.testbed import Testbed

DEVICE_KEYS = ("name", "host", "port", "memory_gib", "kind", "cpu_share")  # in the order a new table gets them
LINK_VALUE_KEYS = ("src", "dst", "bandwidth_mbit_s", "latency_ms")


def same(a: Testbed, b: Testbed) -> bool:
    """Equal up to the path and the order of links (with_link appends, from_dict sorts)."""
    def norm(t):
        return dataclasses.replace(t, path=None, links=tuple(sorted(t.links, key=lambda lk: (lk.src, lk.dst))))
    return norm(a) == norm(b)


def copy(doc):
    """An independent copy of a tomlkit document (a failed edit must leave the original intact)."""
    return tomlkit.parse(tomlkit.dumps(doc))


def set_key(table, key: str, value) -> None:
    """Set a key, keeping its comment; a new key goes after the table's last key (before trailing comments,
    which usually describe the next table). An unchanged value (same value and type) is not touched."""
    if key in table:
        old = table[key]
        if old != value or type(old.unwrap() if hasattr(old, "unwrap") else old) != type(value):
            table[key] = value
        return
    keys = list(table.keys())
    container = getattr(table, "value", table)
    try:
        if keys and hasattr(container, "_insert_after"):
            container._insert_after(keys[-1], key, value)  # private tomlkit API; fallback below
            return
    except Exception:
        pass
    table[key] = value


def sync(table, desired: dict, keys) -> None:
    """Make `keys` of table what desired says: set those it has, delete those it lacks; other keys stay."""
    for key in keys:
        if key in desired:
            set_key(table, key, desired[key])
        elif key in table:
            del table[key]


def new_table(values: dict, blank_line: bool = True):
    t = tomlkit.table()
    for k, v in values.items():
        t[k] = v
    if blank_line:
        t.trivia.indent = "\n"  # a blank line before the header, like the rest of the file
    return t


def append(aot, values: dict) -> None:
    """Append a table to an array of tables with one blank line before it, not two."""
    last = aot[-1].as_string() if len(aot) else ""
    if last.endswith("\n\n"):  # the blank line after the last table stays; the new one brings its own
        t = new_table(values, blank_line=False)
        t.add(tomlkit.nl())
        aot.append(t)
    else:
        aot.append(new_table(values))


def update_doc(doc, raw: dict, origins: list[int | None]) -> None:
    """Rewrite in doc only what differs from raw (from_dict's shape: top-level keys, [defaults],
    [constraints], [[device]], [[link]] with directed entries). origins[i] is the index of the file's
    [[device]] table raw["device"][i] came from (None: a new device), so a renamed device keeps its table,
    its comments and the links that name it. Keys and tables raw does not describe are left alone."""
    for key in ("name", "source", "cloud"):
        if key in raw:
            set_key(doc, key, raw[key])
        elif key in doc:
            del doc[key]
    for table, keys in (("defaults", testbed_mod.DEFAULT_KEYS), ("constraints", testbed_mod.CONSTRAINT_KEYS)):
        desired = raw.get(table, {})
        if table in doc:
            sync(doc[table], desired, sorted(keys))
        elif desired:
            doc[table] = new_table(desired)
    devices = raw.get("device", [])
    aot = doc.get("device")
    old_names = [t.get("name") for t in aot] if aot is not None else []
    rename = {}  # name in the file -> name now, for the devices that were kept
    kept = {i for i in origins if i is not None}
    for i, d in zip(origins, devices):
        if i is not None:
            rename[old_names[i]] = d["name"]
            sync(aot[i], d, DEVICE_KEYS)
    for i in sorted(set(range(len(old_names))) - kept, reverse=True):
        del aot[i]
    for i, d in zip(origins, devices):
        if i is None:
            if aot is None:
                doc["device"] = tomlkit.aot()
                aot = doc["device"]
            append(aot, d)
    update_links(doc, raw.get("link", []), rename)


def update_links(doc, links: list[dict], rename: dict) -> None:
    """links: the wanted directed entries [{"src", "dst", "bandwidth_mbit_s"?, "latency_ms"?}]; rename: file
    name -> current name of each kept device. Keep the file's entries whose values still hold, update the ones
    whose pairs changed together, split or drop the rest, and append entries for new pairs (one undirected
    entry where both directions agree)."""
    want = {(lk["src"], lk["dst"]): (lk.get("bandwidth_mbit_s"), lk.get("latency_ms")) for lk in links}
    aot = doc.get("link")
    entries = list(aot) if aot is not None else []
    owner = {}  # pair -> index of the last entry covering it (the one from_dict keeps)
    covered = []
    for i, e in enumerate(entries):
        s, d = rename.get(e.get("src")), rename.get(e.get("dst"))
        pairs = [] if s is None or d is None else ([(s, d)] if e.get("directed", False) else [(s, d), (d, s)])
        covered.append(pairs)
        for p in pairs:
            owner[p] = i
    drop, add = [], []
    for i, e in enumerate(entries):
        own = [p for p in covered[i] if owner.get(p) == i]
        if not covered[i]:
            drop.append(i)  # names a removed device
            continue
        if not own:
            continue  # fully overridden by later entries: leave it as the user wrote it
        values = {want.get(p) for p in own}
        if len(values) == 1 and None not in values:  # every pair it decides still has one value: update it
            (bw, lat), = values
            s, d = covered[i][0]
            desired = {"src": s, "dst": d, "bandwidth_mbit_s": bw, "latency_ms": lat}
            sync(e, {k: v for k, v in desired.items() if v is not None}, LINK_VALUE_KEYS)
            continue
        cur = (e.get("bandwidth_mbit_s"), e.get("latency_ms"))
        kept = next((p for p in own if want.get(p) == cur), None)
        if kept is not None:  # one direction keeps the entry's values: keep the entry (and its comment) for it
            sync(e, {"src": kept[0], "dst": kept[1], "directed": True}, ["src", "dst", "directed"])
            add += [p for p in own if p != kept and p in want]
            continue
        drop.append(i)
        add += [p for p in own if p in want]
    for i in sorted(drop, reverse=True):
        del aot[i]
    add += [p for p in want if p not in owner]
    done = set()
    for a, b in add:
        if (a, b) in done:
            continue
        bw, lat = want[(a, b)]
        entry = {"src": a, "dst": b}
        if bw is not None:
            entry["bandwidth_mbit_s"] = bw
        if lat is not None:
            entry["latency_ms"] = lat
        if (b, a) in add and want[(b, a)] == (bw, lat) and (b, a) not in done:
            done.add((b, a))
        else:
            entry["directed"] = True
        done.add((a, b))
        if aot is None:
            doc["link"] = tomlkit.aot()
            aot = doc["link"]
        append(aot, entry)


def edited_toml(doc, raw: dict, origins: list[int | None], testbed: Testbed | None = None) -> tuple[str, bool]:
    """(text, comments_kept): doc with raw written into it (update_doc, on a copy: doc is not changed) when that
    text loads back as the same testbed as raw; else plain testbed.dumps and False. testbed: raw already
    validated (testbed.from_dict(raw)); raises the ConfigError when raw is invalid and testbed is None."""
    tb = testbed if testbed is not None else testbed_mod.from_dict(raw)
    edited = copy(doc)
    try:
        update_doc(edited, raw, origins)
        text = tomlkit.dumps(edited)
        kept = same(testbed_mod.loads(text), tb)
    except Exception:  # tomlkit corner cases: correctness first, comments second
        kept = False
    return (text if kept else testbed_mod.dumps(tb)), kept


def parse(text: str):
    """The tomlkit document of a testbed file's text (what edited_toml edits)."""
    return tomlkit.parse(text)


def plain(doc) -> dict:
    """The document as plain dicts and lists (what testbed.from_dict reads)."""
    return doc.unwrap()
