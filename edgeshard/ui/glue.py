"""Record a named value in a notebook's outputs, for the tests that execute the notebook (scrapbook-style).

`es.glue("tokens", run.texts)` displays nothing a reader sees but stores {"name": value} (JSON) under the
GLUE_MIME output type; tests/test_notebooks.py reads it back from the executed notebook. Stdlib + IPython.
"""

from __future__ import annotations

import json

GLUE_MIME = "application/vnd.edgeshard.ui.glue+json"


def glue(name: str, value) -> None:
    from IPython.display import display
    json.dumps(value)  # fail here, in the notebook, for a value tests could not read back
    display({GLUE_MIME: {"name": name, "value": value}, "text/plain": ""}, raw=True)


def read(nb) -> dict:
    """{name: value} of every glue() output of an executed notebook (nbformat node or dict)."""
    out = {}
    for cell in nb["cells"]:
        for o in cell.get("outputs", []):
            data = o.get("data", {})
            if GLUE_MIME in data:
                out[data[GLUE_MIME]["name"]] = data[GLUE_MIME]["value"]
    return out
