"""Presentation: bokeh plots, ipywidgets views, HTML reports, notebook display and glue."""
