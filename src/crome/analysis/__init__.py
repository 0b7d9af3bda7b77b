"""Analysis: why edits collapse, one module per analysis (``update_anatomy``, ``key_geometry``,
``first_token``, ``prefix_effect``, ``guard_analysis``), where facts live (``trace_plot``, the
plots of ``crome.editing.locate``), one HTML page (``html_report``); ``output`` writes their files."""
